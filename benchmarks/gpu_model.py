"""GPU throughput of the model stages (no IO): region encoder alone vs the full xT
(encoder + Hyper context + segmentation head) on 512 px crops, bf16 autocast, channels_last.

Prints regions/s for each and the ratio full / encoder-only, plus peak GPU memory.
Run: python benchmarks/gpu_model.py [--batch 64] [--seconds 8]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from napari_xt.model import create_model


def bench(fn, seconds: float) -> tuple[float, int]:
    fn()
    torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    torch.cuda.synchronize()
    return time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64, help="regions per batch")
    ap.add_argument("--seconds", type=float, default=8.0)
    args = ap.parse_args()
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(0)
    model = create_model("xt_swin_t_hyper_512_256", num_classes=3, head={"kind": "segmentation"})
    model = model.to(dev).eval().to(memory_format=torch.channels_last)
    regions = torch.randn(args.batch, 3, 256, 256, device=dev).to(
        memory_format=torch.channels_last)
    crops = torch.randn(args.batch // 4, 3, 512, 512, device=dev)
    results = {"device": name, "torch": torch.__version__, "batch_regions": args.batch}
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        torch.cuda.reset_peak_memory_stats()
        secs, n = bench(lambda: model.encode_regions(regions), args.seconds)
        results["encoder_regions_per_s"] = n * args.batch / secs
        results["encoder_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
        secs, n = bench(lambda: model(crops), args.seconds)
        results["full_regions_per_s"] = n * args.batch / secs
        results["full_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    results["ratio_full_to_encoder"] = (
        results["full_regions_per_s"] / results["encoder_regions_per_s"])
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gpu_model.json"), "w") as f:
            json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
