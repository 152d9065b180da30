"""How far context reaches: models and context modes on held-out synthetic scenes of growing
size, through the engine, against the region-only model of the same invocation.

Two tasks (`napari_xt.train.synthetic`):
- "coast": the demo task. Water is sea when its body touches the scene border; the sea
  enters from one side, so on a scene many crops wide a crop inland cannot see the border
  that decides.
- "beacon": one mark anywhere in the scene makes every water body sea (ring) or lake
  (cross); water farther than one crop from the mark ("far water") can only be told by
  context across the whole image. Chance there is 50 %.

Rows: the region-only model; the crop model (the shipped demo model, crop context); and a
model with whole-image context (`--model`, e.g. the shipped `demo-image`) in crop and in
image context. Reported per task and size: sea/lake mIoU, land IoU, vessel F1, accuracy on
far water (beacon), seconds per scene and megapixels per second.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from typing import Any

import numpy as np

TASKS = ("coast", "beacon")


def _model(choice: str):
    from napari_xt.model.choice import load_model

    model, _, norm = load_model(choice)
    return model, norm


def _scenes(task: str, size: int, count: int, first_seed: int):
    from napari_xt.train.synthetic import SceneConfig, SyntheticScene

    cfg = SceneConfig(height=size, width=size, beacon=task == "beacon")
    for i in range(count):
        yield SyntheticScene(first_seed + i, replace(cfg))


def _far_water(scene: Any, mask: np.ndarray, reach: float) -> np.ndarray:
    """Water pixels farther than `reach` px from the beacon's centre."""
    _, cy, cx = scene.beacon
    yy = np.arange(mask.shape[0])[:, None] - cy
    xx = np.arange(mask.shape[1])[None, :] - cx
    return (mask != 0) & (np.hypot(yy, xx) > reach)


def measure(sizes: dict[str, list[int]], count: int, rows: list[tuple[str, str, str]],
            first_seed: int, sieve_size: int = 0) -> list[dict[str, Any]]:
    """rows: (label, model choice, context). Returns one result per task, size and row, and
    with `sieve_size` > 1 also one per row whose labels were sieved (`napari_xt.io.sieve`,
    pieces under `sieve_size` px relabelled) after the engine; their seconds include it."""
    from napari_xt.engine import Finished, run
    from napari_xt.io.sieve import sieve
    from napari_xt.train.metrics import ConfusionMatrix, DetectionCounts

    models: dict[str, Any] = {}
    out = []
    for task, task_sizes in sizes.items():
        for size in task_sizes:
            scenes = list(_scenes(task, size, count, first_seed))
            rendered = []
            for scene in scenes:
                img, mask = scene.read()
                t = scene.targets()
                vessels = np.stack([t["y"], t["x"]], -1)[t["cls"] == 1].reshape(-1, 2)
                rendered.append((scene, img, mask, vessels))
            for label, choice, context in rows:
                if choice not in models:
                    models[choice] = _model(choice)
                model, norm = models[choice]
                reach = (model.cfg.crop_regions or 1) * model.cfg.region.region_size
                conf, det = ConfusionMatrix(3), DetectionCounts(radius=4.0)
                sieved = ConfusionMatrix(3)
                far_ok = far_n = 0
                far_each: list[float] = []  # a scene's far water is nearly all right or wrong
                seconds = sieve_seconds = 0.0
                for scene, img, mask, vessels in rendered:
                    t0 = time.perf_counter()
                    fin = None
                    for fin in run(img, model, None, cache=False, device="cpu", axes="CYX",  # noqa: B007
                                   normalize=norm, outputs=("labels", "detections"),
                                   threshold=0.3, min_distance=3, context=context):
                        pass
                    seconds += time.perf_counter() - t0
                    if not isinstance(fin, Finished):
                        raise RuntimeError(f"{label} on a {size}^2 {task} scene: {fin}")
                    labels = np.asarray(fin.summary["arrays"]["labels"])
                    conf.update(mask, labels)
                    if sieve_size > 1:
                        t0 = time.perf_counter()
                        sieved.update(mask, sieve(labels, sieve_size))
                        sieve_seconds += time.perf_counter() - t0
                    table = fin.summary["arrays"]["detections"]
                    det.update(np.stack([table["y"], table["x"]], -1).reshape(-1, 2),
                               table["score"], vessels)
                    if task == "beacon":
                        far = _far_water(scene, mask, reach)
                        right, n = int((labels[far] == mask[far]).sum()), int(far.sum())
                        far_ok, far_n = far_ok + right, far_n + n
                        far_each.append(right / max(1, n))
                iou = conf.iou()
                result = {
                    "task": task, "size": size, "row": label, "model": choice,
                    "context": context, "scenes": count,
                    "miou_sea_lake": float(np.nanmean(iou[[1, 2]])),
                    "iou_land": float(iou[0]), "vessel_f1": float(det.f1),
                    "far_water_accuracy": far_ok / far_n if far_n else None,
                    "far_water_per_scene": far_each if task == "beacon" else None,
                    "seconds_per_scene": seconds / count,
                    "mp_per_s": count * size * size / 1e6 / seconds,
                }
                out.append(result)
                print(_line(result), flush=True)
                if sieve_size > 1:
                    iou = sieved.iou()
                    total = seconds + sieve_seconds
                    result = {**result, "row": f"{label} + sieve {sieve_size}",
                              "sieve": sieve_size,
                              "miou_sea_lake": float(np.nanmean(iou[[1, 2]])),
                              "iou_land": float(iou[0]), "seconds_per_scene": total / count,
                              "sieve_seconds_per_scene": sieve_seconds / count,
                              "mp_per_s": count * size * size / 1e6 / total}
                    out.append(result)
                    print(_line(result), flush=True)
    return out


def _line(r: dict[str, Any]) -> str:
    far = "" if r["far_water_accuracy"] is None else f"{100 * r['far_water_accuracy']:6.1f}"
    return (f"{r['task']:>6} {r['size']:>5} {r['row']:>32} {100 * r['miou_sea_lake']:7.1f} "
            f"{100 * r['iou_land']:6.1f} {100 * r['vessel_f1']:6.1f} {far:>6} "
            f"{r['seconds_per_scene']:8.2f} {r['mp_per_s']:6.2f}")


HEADER = (f"{'task':>6} {'size':>5} {'model / context':>32} {'s/l':>7} {'land':>6} "
          f"{'F1':>6} {'far':>6} {'s/scene':>8} {'MP/s':>6}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coast-sizes", default="256,512,1024,2048,4096",
                   help="comma list of square scene sides (px) of the coast task; '' for none")
    p.add_argument("--beacon-sizes", default="2048,8192",
                   help="comma list of square scene sides (px) of the beacon task; '' for none")
    p.add_argument("--count", type=int, default=4, help="held-out scenes per task and size")
    p.add_argument("--model", default="demo-image",
                   help="the model with whole-image context (a name or a checkpoint)")
    p.add_argument("--rows", default="region-only,crop,image-as-crop,image",
                   help="comma list of: region-only, crop, image-as-crop, image")
    p.add_argument("--sieve", type=int, default=0, metavar="N",
                   help="also report each row with its labels sieved (pieces under N px take "
                        "the label around them, as `napari-xt sieve` does); 0 for none")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--json", help="also write the results to this JSON file")


def _sides(text: str) -> list[int] | None:
    """'2048,8192' -> [2048, 8192] ('' -> []); None unless every item is a positive integer."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not all(p.isascii() and p.isdigit() and int(p) > 0 for p in parts):
        return None
    return [int(p) for p in parts]


def run_benchmark(args: argparse.Namespace) -> int:
    import torch

    from napari_xt.train.demo import HELD_OUT_SEED

    torch.set_num_threads(args.threads)
    known = {"region-only": ("region-only", "demo-region-only", "crop"),
             "crop": ("crop model, crop", "demo", "crop"),
             "image-as-crop": ("image model, crop", args.model, "crop"),
             "image": ("image model, image", args.model, "image")}
    unknown = [r for r in args.rows.split(",") if r.strip() and r.strip() not in known]
    if unknown:
        print(f"napari-xt bench context: unknown rows {unknown} (choose from "
              f"{', '.join(known)})", file=sys.stderr)
        return 2
    rows = [known[r.strip()] for r in args.rows.split(",") if r.strip()]
    sizes = {}
    for task, flag, text in (("coast", "--coast-sizes", args.coast_sizes),
                             ("beacon", "--beacon-sizes", args.beacon_sizes)):
        sizes[task] = _sides(text)
        if sizes[task] is None:
            print(f"napari-xt bench context: {flag} takes a comma list of positive scene "
                  f"sides in px, got {text!r}", file=sys.stderr)
            return 2
    if args.sieve < 0:
        print(f"napari-xt bench context: --sieve takes a piece size in px (0 for none), got "
              f"{args.sieve}", file=sys.stderr)
        return 2
    if args.count < 1:
        print(f"napari-xt bench context: --count must be at least 1, got {args.count}",
              file=sys.stderr)
        return 2
    print(f"held-out scenes from seed {HELD_OUT_SEED + 700_000}, {args.count} per task and "
          f"size, CPU, {args.threads} thread(s); s/l = sea/lake mIoU, far = accuracy on water "
          "farther than one crop from the beacon (%)")
    print(HEADER)
    out = measure(sizes, args.count, rows, HELD_OUT_SEED + 700_000, args.sieve)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"count": args.count, "threads": args.threads, "model": args.model,
                       "sieve": args.sieve, "results": out}, f, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    return run_benchmark(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
