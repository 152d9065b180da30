"""CPU benchmark of the streaming engine (`napari-xt bench`, `benchmarks/cpu_engine.py`):
seconds per megapixel and peak RSS vs image size.

Each measurement runs in its own subprocess (so peak RSS is that run's alone) on a lazily
generated synthetic slide scene (`napari_xt.sample_data.slide_scene`, uint8 RGB) with the
zoo's smallest model (`xt_tiny_demo_seg`: test_convnext2 region encoder, 128 px regions,
4 x 4 region crops, Hyper context) with a narrow decoder (`--decoder 32,16,16,8,8`; the
zoo default is 256..16 wide and about 3x slower on CPU). Output: an OME-Zarr store in
a temporary folder (labels with their display pyramid, as `napari-xt predict` writes), no
embedding cache.

Baselines measured in the same invocation:
- the smallest size: ratios of seconds/MP and of peak RSS against it (flat is the goal);
- a naive whole-image `model(x)` of the same model at sizes up to `--naive-max`: ratio of
  the engine's peak RSS to the naive pass's (and time, for reference). Reading the pixels
  into memory is part of the naive pass; a naive pass that fails with MemoryError is
  reported as such.

Run: napari-xt bench [--sizes 4096,8192,16384,32768] [--naive-max 4096]
     [--model xt_tiny_demo_seg] [--threads 2] [--json out.json]
(or python benchmarks/cpu_engine.py with the same options).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def child(mode: str, size: int, model_name: str, threads: int, batch: int,
          decoder: str) -> dict:
    import numpy as np
    import torch

    from napari_xt.engine import Finished, run
    from napari_xt.model import create_model
    from napari_xt.sample_data import slide_scene

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    head = {"decoder_channels": tuple(int(c) for c in decoder.split(","))} if decoder else {}
    model = create_model(model_name, **({"head": head} if head else {})).eval()
    image = slide_scene(size, size, seed=1)
    base = _peak_rss_mib()
    t0 = time.perf_counter()
    if mode == "engine":
        fin = None
        import shutil
        import tempfile

        out = tempfile.mkdtemp(prefix="xt-bench-")
        try:
            for event in run(image, model, f"{out}/out.zarr", cache=False, device="cpu",
                             batch_size=batch):
                fin = event
        finally:
            shutil.rmtree(out, ignore_errors=True)
        assert isinstance(fin, Finished), fin
        extra = {"regions": fin.counts["regions"], "decoded": fin.counts["decoded"]}
    else:
        try:
            x = np.asarray(image.levels[0]).astype(np.float32).transpose(2, 0, 1)[None]
            with torch.inference_mode():
                out = model(torch.from_numpy(np.ascontiguousarray(x)))
            extra = {"shape": list(out["logits"].shape)}
        except (MemoryError, RuntimeError) as err:
            return {"mode": mode, "size": size, "error": f"{type(err).__name__}: {err}"[:200]}
    seconds = time.perf_counter() - t0
    return {"mode": mode, "size": size, "seconds": seconds,
            "s_per_mp": seconds / (size * size / 1e6), "peak_rss_mib": _peak_rss_mib(),
            "rss_before_mib": base, **extra}


def spawn(mode: str, size: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "napari_xt.bench.scaling", "--child", mode,
           "--sizes", str(size), "--model", args.model, "--threads", str(args.threads),
           "--batch", str(args.batch), "--decoder", args.decoder]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"mode": mode, "size": size, "error": f"exit {proc.returncode}: {tail[0]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """Options shared by `napari-xt bench scaling` and `benchmarks/cpu_engine.py`."""
    ap.add_argument("--sizes", default="4096,8192")
    ap.add_argument("--naive-max", type=int, default=4096)
    ap.add_argument("--model", default="xt_tiny_demo_seg")
    ap.add_argument("--decoder", default="32,16,16,8,8",
                    help="decoder widths, deepest first ('' keeps the zoo default)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--timeout", type=int, default=6 * 3600)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return run_benchmark(ap.parse_args(argv))


def run_benchmark(args: argparse.Namespace) -> int:
    """Run (or, with --child, measure one size); prints JSON lines and a table."""
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.child:
        print(json.dumps(child(args.child, sizes[0], args.model, args.threads, args.batch,
                               args.decoder)))
        return 0
    rows = []
    for size in sizes:
        r = spawn("engine", size, args)
        rows.append(r)
        print(json.dumps(r), flush=True)
        if size <= args.naive_max:
            r = spawn("naive", size, args)
            rows.append(r)
            print(json.dumps(r), flush=True)
    eng = [r for r in rows if r["mode"] == "engine" and "error" not in r]
    naive = {r["size"]: r for r in rows if r["mode"] == "naive"}
    print(f"\nengine, model {args.model} (decoder {args.decoder or 'default'}), "
          f"{args.threads} threads, {os.cpu_count()} cpus")
    print(f"{'size':>7} {'s/MP':>8} {'ratio':>6} {'peak RSS MiB':>13} {'ratio':>6} "
          f"{'naive RSS MiB':>14} {'engine/naive':>13}")
    ref = eng[0] if eng else None
    for r in eng:
        n = naive.get(r["size"], {})
        nrss = n.get("peak_rss_mib")
        naive_txt = f"{nrss:.0f}" if nrss else n.get("error", "-")[:14]
        ratio_txt = f"{r['peak_rss_mib'] / nrss:.2f}" if nrss else "-"
        print(f"{r['size']:>7} {r['s_per_mp']:>8.2f} {r['s_per_mp'] / ref['s_per_mp']:>6.2f} "
              f"{r['peak_rss_mib']:>13.0f} {r['peak_rss_mib'] / ref['peak_rss_mib']:>6.2f} "
              f"{naive_txt:>14} {ratio_txt:>13}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "threads": args.threads, "rows": rows}, f, indent=2)
    return 0 if eng and len(eng) == len(sizes) else 1


if __name__ == "__main__":
    sys.exit(main())
