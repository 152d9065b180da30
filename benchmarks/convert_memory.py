"""Peak memory of `napari_xt.io.convert` on a lazily generated RGB image.

The input (default 32768 x 32768 x 3 uint8 = 3 GiB) exists only as a dask graph whose chunks
are computed on demand from their block index, so the process never holds it. The script
converts it to OME-Zarr 0.5 with a full pyramid and prints the peak resident memory of the
process, the same figure before conversion (interpreter + imports), and their ratio to the
input size.

    python benchmarks/convert_memory.py [--size 32768] [--chunk 1024] [--workers 2]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import dask.array as da
import numpy as np


def _block(block_id=None, block_info=None):
    """A cheap, position-dependent RGB block (gradients + a block-index offset)."""
    (h, w, _), (iy, ix, _) = block_info[None]["chunk-shape"], block_id
    y = np.arange(h, dtype=np.uint16)[:, None]
    x = np.arange(w, dtype=np.uint16)[None, :]
    out = np.empty((h, w, 3), dtype=np.uint8)
    out[..., 0] = (y + 7 * iy) & 0xFF
    out[..., 1] = (x + 13 * ix) & 0xFF
    out[..., 2] = ((y ^ x) + iy * ix) & 0xFF
    return out


def lazy_rgb(size: int, chunk: int) -> da.Array:
    n, rest = divmod(size, chunk)
    chunks = (chunk,) * n + ((rest,) if rest else ())
    return da.map_blocks(_block, dtype=np.uint8, chunks=(chunks, chunks, (3,)),
                         meta=np.empty((0, 0, 0), np.uint8))


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32768)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: temp)")
    args = parser.parse_args()

    from napari_xt.io import convert, open_image

    image = lazy_rgb(args.size, args.chunk)
    input_bytes = image.nbytes
    before = peak_rss_bytes()
    tmp = Path(tempfile.mkdtemp(prefix="xt-convert-bench-"))
    out = (args.out or tmp) / "bench.ome.zarr"
    events = []
    start = time.perf_counter()
    try:
        convert(image, out, workers=args.workers, chunk=args.chunk, progress=events.append,
                overwrite=True)
        seconds = time.perf_counter() - start
        peak = peak_rss_bytes()
        written = open_image(out)
        check = written.to_yxc(0)[:512, -512:].compute()
        assert np.array_equal(check, image[:512, -512:].compute()), "converted values differ"
        on_disk = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    gib = 1024**3
    print(f"input      : {args.size} x {args.size} x 3 uint8 = {input_bytes / gib:.2f} GiB (lazy)")
    print(f"levels     : {written.num_levels} ({written.level_shape(-1)} smallest), "
          f"{events[-1].total} blocks, {seconds:.1f} s, {input_bytes / seconds / 2**20:.0f} MiB/s")
    print(f"on disk    : {on_disk / 2**20:.0f} MiB")
    print(f"RSS before : {before / 2**20:.0f} MiB (interpreter + imports)")
    print(f"peak RSS   : {peak / 2**20:.0f} MiB = {peak / input_bytes:.3f} x input size "
          f"(conversion added {(peak - before) / 2**20:.0f} MiB)")
    print("bounded    :", "yes" if peak < 2 * gib else "NO", "(limit 2 GiB)")


if __name__ == "__main__":
    main()
