"""What a contribution map costs: seconds per method for one region, with the built-in
model, in a crop of 8 x 8 regions (its own, 256 tokens) and of 32 x 32 regions (1,024
regions, 4,096 tokens: the largest crop its Hyper encoder attends to exactly), against the
model's own forward of the same crop (contextualize + decode of the region) in the same
run.

Each image is exactly one crop (512^2 and 2048^2 synthetic scenes of the model's task), the
region is the crop's centre. Times are the best of `--repeat` calls.

Run: python benchmarks/inspect_timing.py [--threads 2] [--repeat 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time


def measure(threads: int = 2, repeat: int = 2) -> dict:
    import torch

    from napari_xt.engine.plan import RegionPlan
    from napari_xt.inspect import METHODS, contribution_map
    from napari_xt.inspect.contributions import _crop_inputs, _target_probs
    from napari_xt.io.source import ImageSource
    from napari_xt.model.choice import load_model
    from napari_xt.train.synthetic import SceneConfig, SyntheticScene

    torch.set_num_threads(threads)
    model, _, norm = load_model("demo")
    out: dict = {"threads": threads, "machine": f"{platform.processor() or platform.machine()}",
                 "torch": torch.__version__, "crops": {}}
    for k in (8, 32):
        side = k * 64
        img, _ = SyntheticScene(5, SceneConfig(height=side, width=side)).read()
        src = ImageSource(img, axes="CYX", normalize=norm)
        region = (k // 2, k // 2)
        plan = RegionPlan(side, side, 64, k)
        inputs = _crop_inputs(model, src, plan, plan.crops[0], region, None)
        with torch.no_grad():
            t = time.perf_counter()
            for _ in range(repeat):
                _target_probs(model, model.contextualize(inputs.tokens)[0], inputs)
            forward = (time.perf_counter() - t) / repeat
        row = {"regions": k * k, "tokens": int(inputs.tokens.shape[1]),
               "forward_s": forward, "methods": {}}
        for method in METHODS:
            best = float("inf")
            for _ in range(repeat):
                cm = contribution_map(model, src, region, method, crop_regions=k)
                best = min(best, cm.seconds)
            row["methods"][method] = {"seconds": best, "self_share": cm.self_share,
                                      "over_forward": best / forward}
        out["crops"][f"{k}x{k}"] = row
    return out


def report(r: dict) -> str:
    lines = [f"contribution maps, built-in model, {r['threads']} torch threads, {r['machine']}"]
    for name, row in r["crops"].items():
        lines.append(f"  crop {name} ({row['regions']} regions, {row['tokens']} tokens): "
                     f"model forward {row['forward_s']:.3f} s")
        for m, v in row["methods"].items():
            lines.append(f"    {m:10s} {v['seconds']:7.2f} s  ({v['over_forward']:6.1f}x the "
                         f"forward; region's own share {100 * v['self_share']:.0f}%)")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    r = measure(args.threads, args.repeat)
    print(report(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
