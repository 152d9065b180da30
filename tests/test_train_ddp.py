"""Data-parallel training: 2 gloo ranks on the CPU take the steps of one process (losses,
gradients, weights), rank 0 alone writes the run folder, resume works with another number of
processes, and a failing or cancelled launch ends every rank promptly.

Ranks are started by `napari_xt.train.launch.run_ranks`, the code path of
``napari-xt train --nproc 2``; helper ranks run this file as a script (see the bottom)."""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_train_loop import TINY

from napari_xt.cli import main
from napari_xt.commands.train import read_log
from napari_xt.train.config import load_config
from napari_xt.train.ddp import World
from napari_xt.train.launch import run_ranks
from napari_xt.train.loop import Trainer
from napari_xt.train.state import load_training_state

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]


def _config(tmp_path: Path, name: str = "tiny.yaml", **changes) -> Path:
    data = copy.deepcopy(TINY)
    data["optim"].update(steps=4, batch_size=4)
    data["run"].update(threads=1, checkpoint_every=2, eval_every=4, keep_checkpoints=3)
    for section, values in changes.items():
        if section == "context":
            data["model"]["overrides"]["context"].update(values)
        else:
            data[section].update(values)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _losses(out: Path) -> list[float]:
    return [e["loss"] for e in read_log(out) if e["kind"] == "step"]


def _weights_close(a: dict, b: dict) -> None:
    """The same weights up to float noise. A few weights whose gradient is zero up to rounding
    (in this model 0.07 % of them, in one decoder convolution) get another rounding-sized
    gradient from the sum over ranks, which Adam turns into a step of about the learning rate
    either way: the model as a whole must agree to 1e-3, and 99.5 % of the weights
    elementwise to 1e-3."""
    assert a.keys() == b.keys()
    diff = sum(float((a[k] - b[k]).double().pow(2).sum()) for k in a) ** 0.5
    norm = sum(float(a[k].double().pow(2).sum()) for k in a) ** 0.5
    assert diff < 1e-3 * norm, (diff, norm)
    close = sum(int(torch.isclose(a[k], b[k], rtol=1e-3, atol=1e-5).sum()) for k in a)
    assert close >= 0.995 * sum(a[k].numel() for k in a)


def test_a_global_batch_the_processes_cannot_share_is_refused(tmp_path, capsys):
    config = _config(tmp_path, optim={"batch_size": 3})
    out = tmp_path / "run"
    assert main(["train", str(config), "--out", str(out), "--nproc", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "optim.batch_size 3 is the global batch and must divide by the number of " \
           "processes (2)" in err
    assert not out.exists()
    with pytest.raises(ValueError, match="must divide"):  # the library refuses it as well
        Trainer(load_config(config), out, world=World(0, 2, 0, torch.device("cpu")))
    assert main(["train", str(config), "--nproc", "0"]) == 2


def test_launches_that_cannot_work_are_refused_before_any_process_starts(
        tmp_path, capsys, monkeypatch):
    config, out = _config(tmp_path), tmp_path / "run"
    for flag in ("--steps", "--threads"):  # (-1 trained nothing, or ended in a traceback)
        assert main(["train", str(config), "--out", str(out), flag, "-1"]) == 2
        assert f"{flag} must be at least 1, not -1" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["train", str(config), "--out", str(out), "--nproc", "2",
                     "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    assert main(["train", str(config), "--out", str(out), "--nproc", "2", "--device",
                 "mps"]) == 2
    assert "runs on 'cpu' (gloo) or 'cuda' (NCCL)" in capsys.readouterr().err
    for key, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "29500")):  # torchrun started this process
        monkeypatch.setenv(key, value)
    assert main(["train", str(config), "--out", str(out), "--nproc", "2"]) == 2
    assert "leave it out when torchrun starts them" in capsys.readouterr().err
    assert not out.exists()


def test_cpu_ranks_share_the_cores_unless_threads_is_given(tmp_path, monkeypatch):
    """N CPU ranks get cores // N threads each (at most run.threads), not N x run.threads."""
    import napari_xt.commands.train as train_command
    import napari_xt.train.launch as launch

    seen = []
    monkeypatch.setattr(launch, "run_ranks",
                        lambda argv, n: seen.append(list(argv)) or launch.LaunchResult(0))
    monkeypatch.setattr("napari_xt.distributed.cluster.usable_cpus", lambda: 8)
    config = _config(tmp_path, run={"threads": 6})
    out = str(tmp_path / "run")

    def threads_of(argv):
        return int(argv[argv.index("--threads") + 1])

    assert main(["train", str(config), "--out", out, "--nproc", "2"]) == 0
    assert threads_of(seen[-1]) == 4  # 8 cores // 2 ranks, below run.threads 6
    assert main(["train", str(config), "--out", out, "--nproc", "4"]) == 0
    assert threads_of(seen[-1]) == 2
    assert main(["train", str(config), "--out", out, "--nproc", "2", "--threads", "3"]) == 0
    assert threads_of(seen[-1]) == 3  # given: kept
    assert train_command.rank_threads(1, 2) == 1  # never more than run.threads
    assert train_command.rank_threads(None, 16) == 1  # at least one


def test_usable_cpus_are_the_affinity_mask_capped_by_the_cgroup_quota(tmp_path, monkeypatch):
    from napari_xt.distributed import cluster

    monkeypatch.setattr("os.cpu_count", lambda: 64)  # the machine: not what this process gets
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    monkeypatch.setattr(cluster, "CPU_QUOTA", str(tmp_path / "absent"))
    assert cluster.usable_cpus() == 6
    quota = tmp_path / "cpu.max"
    monkeypatch.setattr(cluster, "CPU_QUOTA", str(quota))
    quota.write_text("250000 100000\n")  # docker --cpus 2.5
    assert cluster.usable_cpus() == 2
    assert cluster.default_threads(2) == 1
    quota.write_text("max 100000\n")  # no quota
    assert cluster.usable_cpus() == 6
    quota.write_text("50000 100000\n")  # half a CPU: still one thread
    assert cluster.usable_cpus() == 1


def test_the_launcher_holds_the_rendezvous_port_the_ranks_join_on(tmp_path):
    """No port is picked free and bound later: while the ranks run, the launcher's store is
    bound to MASTER_PORT (nobody else can take it) and the ranks form their group there."""
    code = (
        "import os, socket, sys, torch, torch.distributed as dist\n"
        "s = socket.socket()\n"
        "try:\n"
        "    s.bind(('127.0.0.1', int(os.environ['MASTER_PORT']))); held = 0\n"
        "except OSError:\n"
        "    held = 1\n"
        "dist.init_process_group('gloo')\n"
        "t = torch.tensor([float(held)]); dist.all_reduce(t)\n"
        "open(os.path.join(sys.argv[1], os.environ['RANK']), 'w').write(str(int(t.item())))\n"
        "dist.destroy_process_group()\n"
    )
    result = run_ranks([sys.executable, "-c", code, str(tmp_path)], 2)
    assert result.code == 0, result
    assert [(tmp_path / r).read_text() for r in ("0", "1")] == ["2", "2"]


@pytest.mark.slow
def test_two_processes_take_the_steps_of_one_and_resume_with_any_number(tmp_path):
    config = _config(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", str(config), "--out", str(one)]) == 0
    reference = _losses(one)
    assert len(reference) == 4

    t0 = time.monotonic()
    assert main(["train", str(config), "--out", str(two), "--nproc", "2", "--steps", "2"]) == 0
    assert main(["train", str(config), "--out", str(two), "--nproc", "2", "--resume"]) == 0
    launches = time.monotonic() - t0
    events = read_log(two)
    # rank 0 alone reports: every event once
    assert [e["kind"] for e in events].count("eval") == 1
    assert [e["step"] for e in events if e["kind"] == "step"] == [1, 2, 3, 4]
    torch.testing.assert_close(torch.tensor(_losses(two)), torch.tensor(reference),
                               rtol=1e-4, atol=0)

    # rank 0's checkpoints: the same format as one process's, plus the run's shape
    names = sorted(p.name for p in (two / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (one / "checkpoints").iterdir())
    state = load_training_state(two / "checkpoints" / "step_0000002.state.pt")
    assert (state["world_size"], state["global_batch"], state["step"]) == (2, 4, 2)
    assert json.loads((two / "latest.json").read_text())["step"] == 4
    _weights_close(load_file(one / "model.safetensors"), load_file(two / "model.safetensors"))

    # the 2-process checkpoint of step 2 resumed by one process continues the same run
    events = []
    resumed = Trainer(load_config(config), tmp_path / "three", events.append)
    assert resumed.resume(two / "checkpoints" / "step_0000002.safetensors",
                          two / "checkpoints" / "step_0000002.state.pt") == 2
    resumed.fit()
    torch.testing.assert_close(torch.tensor([e.loss for e in events if e.kind == "step"]),
                               torch.tensor(reference[2:]), rtol=1e-4, atol=0)
    # another global batch is another run: refused
    other = Trainer(load_config(_config(tmp_path, "b2.yaml", optim={"batch_size": 2})),
                    tmp_path / "four")
    with pytest.raises(ValueError, match="optim.batch_size 4"):
        other.resume(two / "checkpoints" / "step_0000002.safetensors",
                     two / "checkpoints" / "step_0000002.state.pt")
    assert launches < 60


WHOLE_IMAGE = {  # whole-image context, frozen region encoder with kept scene summaries
    "model": {"checkpoint": "demo", "overrides": {"global_context": {"grid": 8}}},
    "data": {"scene": {"height": 256, "width": 256}, "scene_sizes": [256],
             "beacon_fraction": 1.0, "scene_pool": 2, "crops_per_scene": 2, "val_count": 1},
    "optim": {"steps": 2, "batch_size": 2, "lr": 2e-3, "warmup_steps": 1, "grad_clip": None},
    "loss": {"token_weight": 0.5},
    "run": {"threads": 1, "freeze": ["region_encoder"], "checkpoint_every": 0,
            "eval_every": 0},
}


def _named_parameters(trainer: Trainer) -> dict[str, torch.nn.Parameter]:
    named = dict(trainer.model.named_parameters())
    if trainer.token_head is not None:
        named.update({f"token_head.{k}": p for k, p in trainer.token_head.named_parameters()})
    return named


@pytest.mark.slow
def test_every_option_averages_to_the_one_process_gradient(tmp_path):
    # crops: two bands (stream_rows 1) with Transformer-XL memory carried between them, one
    # region in 8 keeping encoder gradients (so in every band one rank has none), a token head
    crops = _config(tmp_path, context={"kind": "transformer_xl", "chunk_len": 4, "mem_len": 8},
                    run={"stream_rows": 1, "grad_ratio": 0.125}, loss={"token_weight": 0.5},
                    optim={"grad_clip": None})  # clipping would hide a wrong scale
    scenes = tmp_path / "whole_image.yaml"
    scenes.write_text(yaml.safe_dump(WHOLE_IMAGE))
    result = run_ranks([sys.executable, str(HERE), "gradients", str(tmp_path), str(crops),
                        str(scenes)], 2)
    assert result.code == 0, result
    for k, config in enumerate((crops, scenes)):
        ranks = torch.load(tmp_path / f"rank0_{k}.pt", weights_only=True)
        single = Trainer(load_config(config), tmp_path / f"single{k}")
        loss, terms = single.train_step()  # the gradients stay until the next step
        assert ranks["loss"] == pytest.approx(loss, rel=1e-5)
        assert ranks["terms"] == pytest.approx(terms, rel=1e-5)
        named = _named_parameters(single)
        assert ranks["grads"].keys() == {k for k, p in named.items() if p.grad is not None}
        for name, g in ranks["grads"].items():  # float noise: ~1e-6 of the largest entry
            want = named[name].grad
            torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()),
                                       msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.slow
def test_a_failing_rank_ends_the_launch_promptly(tmp_path, capfd):
    # rank 1 raises while rank 0 would wait for ever: the launcher stops rank 0
    t0 = time.monotonic()
    result = run_ranks([sys.executable, str(HERE), "fail", str(tmp_path)], 2, grace_s=2.0)
    assert time.monotonic() - t0 < 30
    assert result.code == 1 and (1, 1) in result.failed and not result.cancelled
    pid0 = int((tmp_path / "rank0.pid").read_text())
    assert not _alive(pid0)
    # through the command: ranks that fail (nothing to resume) give its exit code and say so
    config = _config(tmp_path)
    assert main(["train", str(config), "--out", str(tmp_path / "empty"), "--nproc", "2",
                 "--resume"]) == 2
    err = capfd.readouterr().err
    assert "napari-xt train [rank 1]: no checkpoint to resume" in err
    # both fail at once: the launcher names whichever it saw end first (or both)
    assert re.search(r"napari-xt train: rank [01] \(exit code 2\)(, rank 1 \(exit code 2\))? "
                     r"failed", err), err
    assert not (tmp_path / "empty").exists()  # a refused resume writes nothing


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "expected"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_stops_every_rank(tmp_path, signum, expected):
    code = ("import sys; from napari_xt.train.launch import run_ranks; "
            f"r = run_ranks([sys.executable, {str(HERE)!r}, 'wait', {str(tmp_path)!r}], 2, "
            "grace_s=2.0); print(r.code, r.cancelled); sys.exit(r.code)")
    launcher = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                                text=True)
    pids = [tmp_path / f"rank{r}.pid" for r in (0, 1)]
    deadline = time.monotonic() + 30
    while not all(p.exists() for p in pids):
        assert time.monotonic() < deadline and launcher.poll() is None
        time.sleep(0.05)
    launcher.send_signal(signum)
    out, _ = launcher.communicate(timeout=20)
    assert launcher.returncode == expected and out.split() == [str(expected), "True"]
    assert not any(_alive(int(p.read_text())) for p in pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --------------------------------------------------------------------- helper ranks

def _rank_gradients(folder: str, *configs: str) -> None:
    """One training step of each config on this rank's share; rank 0 saves the step's loss
    and terms and the averaged gradients."""
    from napari_xt.train.ddp import init_world

    world = init_world("cpu")
    for k, config in enumerate(configs):
        trainer = Trainer(load_config(config), Path(folder) / f"ranks{k}", world=world)
        loss, terms = trainer.train_step()
        if world.is_main:
            grads = {name: p.grad for name, p in _named_parameters(trainer).items()
                     if p.grad is not None}
            torch.save({"loss": loss, "terms": terms, "grads": grads},
                       Path(folder) / f"rank0_{k}.pt")
    world.close()


def _rank_fail(folder: str) -> None:
    rank = int(os.environ["RANK"])
    Path(folder, f"rank{rank}.pid").write_text(str(os.getpid()))
    if rank == 1:
        time.sleep(0.5)
        raise RuntimeError("rank 1 fails")
    time.sleep(300)


def _rank_wait(folder: str) -> None:
    Path(folder, f"rank{os.environ['RANK']}.pid").write_text(str(os.getpid()))
    time.sleep(300)


if __name__ == "__main__":
    torch.set_num_threads(1)
    {"gradients": _rank_gradients, "fail": _rank_fail, "wait": _rank_wait}[sys.argv[1]](
        *sys.argv[2:])


def test_a_stray_world_size_is_not_a_launch_and_a_bad_one_is_named(monkeypatch, tmp_path,
                                                                   capsys):
    from napari_xt.train.ddp import launched_world_size

    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")  # left in a shell: not a torchrun launch
    assert launched_world_size() is None
    for key, value in (("RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")):
        monkeypatch.setenv(key, value)
    assert launched_world_size() == 1
    monkeypatch.setenv("WORLD_SIZE", "abc")
    assert main(["train", str(_config(tmp_path)), "--out", str(tmp_path / "run")]) == 2
    assert "WORLD_SIZE='abc' is not a number of processes" in capsys.readouterr().err


def test_a_trained_batchnorm_is_refused_for_several_processes():
    import types

    from napari_xt.train.ddp import data_parallel

    model = torch.nn.Module()
    model.region_encoder = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    model.head = torch.nn.Linear(4, 2)
    world = types.SimpleNamespace(device=torch.device("cpu"))
    with pytest.raises(ValueError, match="region_encoder.1 is a BatchNorm layer"):
        data_parallel(model, None, world)
