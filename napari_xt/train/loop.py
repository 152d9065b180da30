"""Training of an xT model, end to end (region encoder + context + head).

The memory options of `RunSpec` (`stream_rows`, `grad_ratio`, `checkpointing`) act in the
streamed forward/backward pass, `streamed_step.StreamedStep`.

Determinism: the data and every random draw of a step derive from (run.seed, step), and the
optimizer, scheduler and RNG states are saved with each checkpoint, so a resumed run takes the
same steps as an uninterrupted one.

Several processes (torchrun, `napari-xt train --nproc N`) train as data-parallel ranks of
one run and take the same steps as one process (see `train.ddp`): `Trainer(..., world=...)`.

Progress is reported as `TrainEvent`s to a callback.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from . import state as run_state
from .config import TrainConfig
from .data import Normalization, SyntheticDataset, ZarrPairDataset, collate
from .ddp import World, check_global_batch, data_parallel, step_seed
from .evaluate import evaluate
from .streamed_step import StreamedStep
from .synthetic import CLASS_NAMES


@dataclass(frozen=True)
class TrainEvent:
    """kind: "start", "step", "eval", "checkpoint" or "done"."""

    kind: str
    step: int
    total: int
    loss: float | None = None
    terms: dict[str, float] = field(default_factory=dict)
    lr: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    path: str | None = None
    elapsed: float = 0.0


def cosine_with_warmup(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over `warmup` steps, then cosine down to `min_ratio`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _by_prefix(model: torch.nn.Module, prefixes: tuple[str, ...]) -> list[torch.nn.Parameter]:
    """The parameters whose names start with one of `prefixes`."""
    return [p for name, p in model.named_parameters()
            if any(name.startswith(k) for k in prefixes)]


def _param_groups(model: torch.nn.Module, weight_decay: float, lr: float,
                  lr_scale: dict[str, float] | None = None) -> list[dict]:
    """AdamW groups: weight decay or not (biases, norms, tokens), and per `lr_scale` factor
    (parameter-name prefix -> factor on `lr`, the longest matching prefix)."""
    groups: dict[tuple[bool, float], list[torch.nn.Parameter]] = {
        (True, 1.0): [], (False, 1.0): []}
    prefixes = sorted((lr_scale or {}).items(), key=lambda kv: -len(kv[0]))
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = next((float(f) for k, f in prefixes if name.startswith(k)), 1.0)
        decays = not (p.ndim < 2 or name.endswith("token"))
        groups.setdefault((decays, scale), []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decays else 0.0, "lr": lr * scale}
            for (decays, scale), ps in groups.items() if ps or scale == 1.0]


def _normalization(cfg: TrainConfig, start: Path | None) -> Normalization:
    """The input normalization of a run: `data.normalize`, or, when fine-tuning and the
    config leaves it at its default, the checkpoint's own (a different explicit one is an
    error: the weights would see other inputs than they were trained on)."""
    given = cfg.data.normalize
    if start is None:
        return given
    import json

    from napari_xt.model.checkpoint import read_metadata

    stored = read_metadata(start).get("train.normalize")
    if stored is None:
        return given
    saved = json.loads(stored)
    ckpt = Normalization(tuple(saved["mean"]), tuple(saved["std"]))
    if given == Normalization():
        return ckpt
    if given != ckpt:
        raise ValueError(f"data.normalize {given.to_dict()} differs from the normalization "
                         f"{ckpt.to_dict()} that {start.name} was trained with")
    return given


class Trainer(StreamedStep):
    """Builds the model, data and optimizer from a `TrainConfig` and trains into `out_dir`.

    `world`: this process's rank in a data-parallel run (`train.ddp.init_world`); None for a
    run in one process. Then only rank 0 calls `callback` and writes into `out_dir`."""

    def __init__(
        self,
        cfg: TrainConfig,
        out_dir: str | os.PathLike,
        callback: Callable[[TrainEvent], None] | None = None,
        world: World | None = None,
    ) -> None:
        from napari_xt.model.xt import XT

        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.world = world
        self.is_main = world is None or world.is_main
        self.callback = (callback if self.is_main else None) or (lambda event: None)
        if world is not None:
            check_global_batch(cfg.optim.batch_size, world.size)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        torch.manual_seed(cfg.run.seed)
        self.device = world.device if world is not None else torch.device(cfg.run.device)
        self.model_config = cfg.model.build_config()
        start = cfg.model.checkpoint_path()
        self.normalization = _normalization(cfg, start)
        if self.normalization != cfg.data.normalize:  # saved with the checkpoints' config
            self.cfg = cfg = replace(cfg, data=replace(cfg.data, normalize=self.normalization))
        if start is None:
            weights = cfg.model.region_weights
            self.model = XT(self.model_config, region_weights=None if weights is None else
                            str(Path(weights).expanduser())).to(self.device).train()
            self._init_centre_bias()
            self._zero_init(cfg.model.zero_init)
        else:  # fine-tuning: the checkpoint's weights (content hash checked on load)
            self.model = _fine_tuned(self.model_config, start).to(self.device).train()
        self._freeze(cfg.run.freeze)
        # training-only token classifier (deep supervision, `loss.token_weight`); not part of
        # the saved model, kept in the training state for resume
        self.token_head: torch.nn.Linear | None = None
        o = cfg.optim
        unused = [k for k in o.lr_scale if not _by_prefix(self.model, (k,))]
        if unused:
            raise ValueError(f"optim.lr_scale: no parameter of the model starts with {unused}")
        groups = _param_groups(self.model, o.weight_decay, o.lr, o.lr_scale)
        if cfg.loss.token_weight > 0:
            self.token_head = torch.nn.Linear(
                self.model.token_dim, self.model_config.num_classes
            ).to(self.device)
            groups += _param_groups(self.token_head, o.weight_decay, o.lr)
        # training-only reader of a scene's kind from its detector peaks (`loss.scene_weight`)
        self.scene_head: torch.nn.Linear | None = None
        if cfg.loss.scene_weight > 0:
            gc = self.model_config.global_context
            if gc is None or not gc.scene_detectors:
                raise ValueError("loss.scene_weight needs a model with "
                                 "global_context.scene_detectors (it reads their peaks)")
            if world is not None:
                raise ValueError("loss.scene_weight runs in one process only (--nproc 1)")
            if cfg.data.kind != "synthetic" or cfg.data.beacon_fraction <= 0:
                raise ValueError("loss.scene_weight needs scenes whose kind is known: "
                                 "synthetic data with data.beacon_fraction > 0")
            self.scene_head = torch.nn.Linear(gc.scene_detectors, 1).to(self.device)
            groups += _param_groups(self.scene_head, o.weight_decay, o.lr)
        elif cfg.data.crops_per_scene == 0:
            raise ValueError("data.crops_per_scene 0 leaves only the scene-level target; "
                             "it needs loss.scene_weight > 0")
        self.optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_with_warmup(o.warmup_steps, o.steps, o.min_lr_ratio)
        )
        self.step = 0
        self._build_data()
        self.scenes = None  # whole-image context: scenes, their summaries and crops
        if self.model.global_context is not None:
            from .whole_image import SceneCrops

            self.scenes = SceneCrops(self)
        growth = cfg.loss.class_growth
        if growth is not None and self.scenes is None:
            raise ValueError("loss.class_growth weighs pixels by the size of their scene: it "
                             "needs whole-image training (a model with global_context)")
        if growth is not None and len(growth) != self.model_config.num_classes:
            raise ValueError(f"loss.class_growth has {len(growth)} entries for "
                             f"{self.model_config.num_classes} classes")
        # data parallel: every band's forward goes through the DDP module (after freezing:
        # DDP reduces the parameters that train)
        self.ddp = None if world is None else data_parallel(self.model, self.token_head, world)

    def _init_centre_bias(self) -> None:
        """Start the centre map at `loss.centre_prior` so the focal loss starts small."""
        outputs = getattr(self.model.head, "outputs", None)
        name = self.cfg.loss.centre_map
        if isinstance(outputs, torch.nn.ModuleDict) and name in outputs:
            p = self.cfg.loss.centre_prior
            torch.nn.init.constant_(outputs[name].bias, math.log(p / (1 - p)))

    def _freeze(self, prefixes: tuple[str, ...]) -> None:
        if not prefixes:
            return
        hit = _by_prefix(self.model, prefixes)
        if not hit:
            raise ValueError(f"run.freeze {list(prefixes)} matches no parameter")
        for p in hit:
            p.requires_grad_(False)

    def _keep_frozen_eval(self) -> None:
        """A module with no trainable parameter stays in eval mode (its norms do not move)."""
        for module in self.model.children():
            if all(not p.requires_grad for p in module.parameters()):
                module.eval()

    def region_encoder_frozen(self) -> bool:
        """Whether no parameter of the region encoder trains (all frozen by `run.freeze`)."""
        return all(not p.requires_grad for p in self.model.region_encoder.parameters())

    def _zero_init(self, prefixes: tuple[str, ...]) -> None:
        if not prefixes:
            return
        hit = _by_prefix(self.model, prefixes)
        if not hit:
            raise ValueError(f"model.zero_init {list(prefixes)} matches no parameter")
        with torch.no_grad():
            for p in hit:
                p.zero_()

    # ------------------------------------------------------------------ data

    def _build_data(self) -> None:
        d = self.cfg.data
        self.train_sets = []  # several scene sizes: one dataset per size, used in turn
        if d.kind == "synthetic":
            self.train_data = SyntheticDataset(d.scene, d.train_seed, d.train_count,
                                               self.normalization)
            self.train_sets = [
                SyntheticDataset(replace(d.scene, height=int(n), width=int(n)), d.train_seed,
                                 d.train_count, self.normalization) for n in d.scene_sizes]
            self.val_data = SyntheticDataset(d.scene, d.val_seed, d.val_count,
                                             self.normalization)
            self.class_names = list(CLASS_NAMES)
        else:
            self.train_data = ZarrPairDataset(
                d.train_paths, self.normalization, d.crop_size, length=d.train_count,
                seed=self.cfg.run.seed,
            )
            self.val_data = (
                ZarrPairDataset(d.val_paths, self.normalization) if d.val_paths else None
            )
            self.class_names = [f"class_{k}" for k in range(self.model_config.num_classes)]

    def batch_for_step(self, step: int) -> dict:
        """The training batch of `step` (a pure function of run.seed and step); with several
        ranks, this rank's share of the global batch."""
        rng = np.random.default_rng([self.cfg.run.seed, step])
        data = self.train_sets[step % len(self.train_sets)] if self.train_sets else \
            self.train_data
        idx = rng.integers(0, len(data), self.cfg.optim.batch_size)
        if self.world is not None:
            idx = idx[self.world.share(len(idx))]
        return collate([data[int(i)] for i in idx], self.cfg.data.heatmap_sigma)

    def train_step(self) -> tuple[float, dict[str, float]]:
        """One optimizer step on the batch of the current step; returns (loss, terms) of the
        whole (global) batch."""
        self.model.train()
        self._keep_frozen_eval()
        self.optimizer.zero_grad(set_to_none=True)
        world = self.world
        if world is not None:  # stochastic layers: rank's own draws, the same after a resume
            torch.manual_seed(step_seed(self.cfg.run.seed, self.step, world.rank))
        if self.scenes is not None:
            loss, terms = self.scenes.forward_backward(self, self.step, world)
        else:
            part = (0, 1) if world is None else (world.rank, world.size)
            loss, terms = self.forward_backward(self.batch_for_step(self.step), self.step,
                                                part=part)
        if world is not None:
            loss, terms = world.sum_loss(loss, terms)
        if self.cfg.optim.grad_clip:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return loss, terms

    # ------------------------------------------------------------------ eval / checkpoints

    def validate(self) -> dict[str, float]:
        """Metrics of the model on the validation data (`evaluate` with the `eval`
        settings); empty when there is no validation data."""
        if self.val_data is None:
            return {}
        e = self.cfg.eval
        samples = [self.val_data[i] for i in range(len(self.val_data))]
        return evaluate(
            self.model, samples, self.model_config.num_classes, self.class_names,
            e.context_classes, e.radius, e.threshold, e.min_distance,
            centre_map=self.cfg.loss.centre_map, size_map=self.cfg.loss.size_map,
        )

    def _metadata(self) -> dict[str, str]:
        import json

        return {
            "train.step": str(self.step),
            "train.normalize": json.dumps(self.normalization.to_dict()),
            "train.config": json.dumps(self.cfg.to_dict()),
        }

    def save(self) -> Path:
        """Model checkpoint + training state of the current step; returns the model path.
        Only rank 0 writes (the ranks hold the same weights and optimizer state)."""
        from napari_xt.model.checkpoint import save_checkpoint

        model_path, state_path = run_state.checkpoint_paths(self.out_dir, self.step)
        if not self.is_main:
            return model_path
        save_checkpoint(self.model, model_path, self._metadata(), overwrite=True)
        extra = {}
        if self.token_head is not None:
            extra["token_head"] = self.token_head.state_dict()
        if self.scene_head is not None:
            extra["scene_head"] = self.scene_head.state_dict()
        run_state.save_training_state(
            state_path, self.optimizer, self.scheduler, self.step, extra,
            global_batch=self.cfg.optim.batch_size,
            world_size=1 if self.world is None else self.world.size,
        )
        run_state.write_latest(self.out_dir, self.step, model_path, state_path)
        run_state.prune_checkpoints(self.out_dir, self.cfg.run.keep_checkpoints)
        return model_path

    def resume(self, model_path: str | os.PathLike | None = None,
               state_path: str | os.PathLike | None = None) -> int:
        """Load the latest checkpoint of `out_dir` (or the given files); returns the step.

        Any number of ranks may resume a run saved by any number, with the same global
        batch (`optim.batch_size`; another is a ValueError)."""
        from napari_xt.model.checkpoint import load_checkpoint

        if model_path is None or state_path is None:
            latest = run_state.read_latest(self.out_dir)
            if latest is None:
                raise FileNotFoundError(f"no checkpoint to resume in {self.out_dir}")
            _, model_path, state_path = latest
        loaded = load_checkpoint(model_path, device="cpu")
        if loaded.cfg != self.model_config:
            raise ValueError(f"{model_path} holds a different model than the config describes")
        payload = run_state.load_training_state(state_path)
        run_state.check_same_global_batch(payload, self.cfg.optim.batch_size, state_path)
        self.model.load_state_dict(loaded.state_dict())
        if self.token_head is not None:
            self.token_head.load_state_dict(payload["extra"]["token_head"])
        if self.scene_head is not None:
            if "scene_head" not in payload.get("extra", {}):
                raise ValueError(f"{state_path} was saved without loss.scene_weight; resume "
                                 "it with the config it was saved with")
            self.scene_head.load_state_dict(payload["extra"]["scene_head"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        run_state.set_rng_state(payload["rng"])
        self.step = int(payload["step"])
        return self.step

    def fit(self, steps: int | None = None) -> dict[str, float]:
        """Train until `steps` (default optim.steps); writes OUT/model.safetensors at the end
        of the schedule and returns the last validation metrics."""
        from napari_xt.model.checkpoint import save_checkpoint

        total = self.cfg.optim.steps
        stop = min(total, steps if steps is not None else total)
        run = self.cfg.run
        start = time.monotonic()
        self.callback(TrainEvent("start", self.step, total))
        metrics: dict[str, float] = {}
        while self.step < stop:
            loss, terms = self.train_step()
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {self.step}")
            elapsed = time.monotonic() - start
            if self.step % run.log_every == 0 or self.step == stop:
                lr = self.scheduler.get_last_lr()[0]
                self.callback(TrainEvent("step", self.step, total, loss, terms, lr,
                                         elapsed=elapsed))
            if run.eval_every and (self.step % run.eval_every == 0 or self.step == total):
                metrics = self.validate() if self.is_main else {}  # the others wait
                self._wait()
                self.callback(TrainEvent("eval", self.step, total, metrics=metrics,
                                         elapsed=time.monotonic() - start))
            if run.checkpoint_every and (self.step % run.checkpoint_every == 0
                                         or self.step == stop):
                path = self.save()
                self._wait()
                self.callback(TrainEvent("checkpoint", self.step, total, path=str(path),
                                         elapsed=time.monotonic() - start))
        if self.step >= total:
            final = self.out_dir / "model.safetensors"
            if self.is_main:
                meta = {**self._metadata(), "train.metrics": _json(metrics)}
                save_checkpoint(self.model, final, meta, overwrite=True)
            self._wait()
            self.callback(TrainEvent("done", self.step, total, metrics=metrics, path=str(final),
                                     elapsed=time.monotonic() - start))
        return metrics

    def _wait(self) -> None:
        """With several ranks: wait for all of them (rank 0 evaluating or writing)."""
        if self.world is not None:
            self.world.barrier()


def _fine_tuned(cfg, start: Path):
    """The model of `cfg` with the weights of checkpoint `start`. A model that adds
    whole-image context to a crop model's checkpoint takes every weight of the checkpoint;
    its new `global_context` part starts fresh (its reader silent: the crop model's
    outputs at first). So does a model that adds `summary_levels` or `whole_scene` to a
    whole-image checkpoint: only their maps start fresh (silent: the checkpoint's outputs at
    first), and so do `scene_detectors` added to a whole-scene checkpoint. Other settings
    may change as far as the weights still fit."""
    from napari_xt.model.checkpoint import load_weights
    from napari_xt.model.xt import XT

    model = XT(cfg)
    if cfg.global_context is None:
        return load_weights(model, start)
    import json

    from napari_xt.model.checkpoint import CONFIG_KEY, read_metadata
    from napari_xt.model.xt import XTConfig

    saved = XTConfig.from_dict(json.loads(read_metadata(start)[CONFIG_KEY]))
    old, want = saved.global_context, cfg.global_context
    if old is None:
        new: tuple[str, ...] = ("global_context.",)
        base_gc = None
    elif (old.summary_levels, old.whole_scene, old.scene_detectors) == (
            want.summary_levels, want.whole_scene, want.scene_detectors):
        return load_weights(model, start)  # nothing added: every weight is the checkpoint's
    else:
        if (old.summary_levels and old.summary_levels != want.summary_levels) or (
                old.whole_scene and not want.whole_scene) or (
                old.scene_detectors and old.scene_detectors != want.scene_detectors):
            raise ValueError(f"{start}: its summary_levels {list(old.summary_levels)}, "
                             f"whole_scene {old.whole_scene} and scene_detectors "
                             f"{old.scene_detectors} can be added to, not changed (the config "
                             f"asks for {list(want.summary_levels)}, {want.whole_scene} and "
                             f"{want.scene_detectors})")
        if old.whole_scene and want.summary_levels != old.summary_levels:
            raise ValueError(f"{start}: adding summary_levels to a model with whole_scene "
                             "would change the width of its whole-scene map; start from a "
                             "model without whole_scene")
        new = ("global_context.cell_extra.", "global_context.whole.")
        # the checkpoint's own parts as they were; any other setting as the config says (a
        # change that alters a weight's shape is refused when the weights load)
        base_gc = replace(want, summary_levels=old.summary_levels, whole_scene=old.whole_scene,
                          scene_detectors=old.scene_detectors)
    base = load_weights(XT(replace(cfg, global_context=base_gc)), start)
    result = model.load_state_dict(base.state_dict(), strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert all(k.startswith(new) for k in result.missing_keys), result
    return model


def _json(values: dict[str, float]) -> str:
    import json

    return json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v)
                       for k, v in values.items()})
