"""What whole-image context costs: time per megapixel and peak memory of crop and image
context, on images of growing size, each run in a fresh process into a store on disk (with
the embedding cache, the default), against crop context on the same image in the same
invocation.

Images: 2-channel float32 zarr (512 px chunks) of random dB-like values (content does not
change the cost). Model: `--model` (default the built-in `demo-image`). Reported per size and
mode: seconds, s/MP, peak RSS of the process (MB); and the ratios image / crop (time) and
peak RSS at each size / the smallest size (image context).

Run: python benchmarks/context_cost.py [--sizes 1024,4096,16384] [--threads 2] [--json out]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import torch
from napari_xt.engine import Finished, run
from napari_xt.model.choice import load_model
image, out, model_name, context, threads = sys.argv[1:6]
torch.set_num_threads(int(threads))
model, _, norm = load_model(model_name)
t = time.perf_counter()
last = None
for last in run(image, model, out, normalize=norm, context=context, device="cpu"):
    pass
seconds = time.perf_counter() - t
assert isinstance(last, Finished), last
print(json.dumps({"seconds": seconds,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_image(path: Path, size: int) -> None:
    import numpy as np
    import zarr

    arr = zarr.create_array(str(path), shape=(2, size, size), chunks=(2, 512, 512),
                            dtype=np.float32, dimension_names=("c", "y", "x"))
    rng = np.random.default_rng(0)
    for y in range(0, size, 1024):
        h = min(1024, size - y)
        band = rng.normal(-15.0, 4.0, (2, h, size)).astype(np.float32)
        arr[:, y:y + h, :] = band


def measure(sizes: list[int], model: str, threads: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="xt-context-cost-") as tmp:
        for size in sizes:
            image = Path(tmp) / f"image{size}.zarr"
            write_image(image, size)
            for context in ("crop", "image"):
                out = Path(tmp) / f"out{size}_{context}.zarr"
                proc = subprocess.run([sys.executable, "-c", CHILD, str(image), str(out), model,
                                       context, str(threads)], capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(proc.stderr[-2000:])
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                mp = size * size / 1e6
                rows.append({"size": size, "context": context, **r,
                             "s_per_mp": r["seconds"] / mp})
                print(f"{size:>6} {context:>6} {r['seconds']:8.1f} s {r['seconds'] / mp:6.3f} s/MP "
                      f"peak RSS {r['peak_rss_mb']:7.0f} MB", flush=True)
                shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(image, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1024,4096,16384")
    p.add_argument("--model", default="demo-image")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"model {args.model}, {args.threads} torch threads, {platform.processor() or 'CPU'}")
    rows = measure(sizes, args.model, args.threads)
    by = {(r["size"], r["context"]): r for r in rows}
    print("time image / crop: " + ", ".join(
        f"{s}^2 {by[s, 'image']['seconds'] / by[s, 'crop']['seconds']:.2f}" for s in sizes))
    first = by[sizes[0], "image"]["peak_rss_mb"]
    print("peak RSS image context / at the smallest size: " + ", ".join(
        f"{s}^2 {by[s, 'image']['peak_rss_mb'] / first:.2f}" for s in sizes))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "threads": args.threads,
                                               "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
