"""What a few corrected windows buy: the annotator loop, measured end to end.

Scenario: SAR scenes from a sensor calibrated `--shift` dB brighter than the demo model's
training data (the shipped model breaks there). On `--scenes` such scenes (`--size` px) the
demo model predicts through the engine; an annotator corrects `--windows` windows of
`--window` px per scene (simulated: the windows are painted to the true classes and the
detections inside them set to the true vessels, exactly what `io.corrections` stores from
the Correct results widget); the corrections are exported as training pairs
(`export_pairs`) and the demo checkpoint is fine-tuned on them (`Trainer`, `model:
{checkpoint: demo}`) for `--steps` steps.

Prints, on held-out shifted scenes and on held-out scenes of the original calibration:
land IoU, sea/lake mIoU and vessel F1 of the shipped model (the baseline, same run) and of
the fine-tuned one, the corrected pixel count and the fine-tuning time.

Run: python benchmarks/finetune_corrections.py [--steps 300] [--threads 2] [--json out.json]
     [--png picture.png]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def shifted_samples(scene_cfg, first_seed: int, count: int, shift: float, normalization):
    from napari_xt.train.data import Sample
    from napari_xt.train.synthetic import SyntheticScene

    out = []
    for i in range(count):
        scene = SyntheticScene(first_seed + i, scene_cfg)
        image, mask = scene.read()
        t = scene.targets()
        vessel = t["cls"] == 1
        points = np.stack([t["y"][vessel], t["x"][vessel]], -1).reshape(-1, 2)
        out.append(Sample(normalization(image + shift), mask.astype(np.int64), points,
                          t["size"][vessel]))
    return out


def window_boxes(size: int, window: int, count: int) -> list[tuple[int, int, int, int]]:
    """`count` windows spread over the scene: corners (the sea enters from a border) first,
    then the centre and the edge middles (lakes)."""
    far = size - window
    mid = (size - window) // 2
    starts = [(0, 0), (far, far), (0, far), (far, 0), (mid, mid), (0, mid), (mid, 0),
              (far, mid), (mid, far)]
    return [(y, y + window, x, x + window) for y, x in starts[:count]]


def annotate(store: Path, boxes, truth: np.ndarray, targets: dict) -> int:
    """Correct `boxes` to the truth: labels painted, detections inside them replaced by the
    true vessels (the model's detections elsewhere are left as they were)."""
    from napari_xt.io.corrections import read_corrected_detections, save_detections, save_window

    for y0, y1, x0, x1 in boxes:
        save_window(store, "prediction", (y0, y1, x0, x1), truth[y0:y1, x0:x1])
    table = read_corrected_detections(store, "prediction")

    def inside(y, x):
        hit = np.zeros(len(y), bool)
        for y0, y1, x0, x1 in boxes:
            hit |= (y >= y0) & (y < y1) & (x >= x0) & (x < x1)
        return hit

    keep = ~inside(np.asarray(table["y"]), np.asarray(table["x"]))
    vessel = targets["cls"] == 1
    ty, tx = targets["y"][vessel] + 0.5, targets["x"][vessel] + 0.5  # pixel centres
    add = inside(ty, tx)
    fixed = {
        "y": np.concatenate([np.asarray(table["y"])[keep], ty[add]]),
        "x": np.concatenate([np.asarray(table["x"])[keep], tx[add]]),
        "class": np.concatenate([np.asarray(table["class"])[keep], np.ones(add.sum(), int)]),
        "score": np.concatenate([np.asarray(table["score"])[keep], np.ones(add.sum())]),
        "size": np.concatenate([np.asarray(table["size"])[keep], targets["size"][vessel][add]]),
    }
    save_detections(store, "prediction", fixed)
    return sum((b - a) * (d - c) for a, b, c, d in boxes)


def picture(path: str, models, shift: float, norm, scene_cfg, seed: int) -> None:
    """Truth | shipped | fine-tuned on one held-out shifted scene, side by side (PNG)."""
    from napari_xt.engine import run
    from napari_xt.train.synthetic import make_scene
    from napari_xt.widgets.snapshot import compose_overlay, write_png

    image, truth, t = make_scene(seed, scene_cfg)
    image = image + shift
    vessel = t["cls"] == 1
    panels = [compose_overlay(image[0], truth, {"y": t["y"][vessel], "x": t["x"][vessel],
                                                "class": np.zeros(vessel.sum(), int)})]
    for model in models:
        arrays = list(run(image, model, None, axes="CYX", normalize=(norm.mean, norm.std),
                          outputs=("labels", "detections"), threshold=0.3))[-1].summary["arrays"]
        panels.append(compose_overlay(image[0], arrays["labels"], arrays["detections"]))
    gap = np.full((panels[0].shape[0], 12, 3), 255, np.uint8)
    write_png(path, np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shift", type=float, default=8.0, help="calibration offset in dB")
    p.add_argument("--scenes", type=int, default=2, help="annotated scenes")
    p.add_argument("--size", type=int, default=512, help="annotated scene size (px)")
    p.add_argument("--windows", type=int, default=5, help="corrected windows per scene")
    p.add_argument("--window", type=int, default=128, help="window side (px)")
    p.add_argument("--margin", type=int, default=64, help="context around the windows (px)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--eval-count", type=int, default=32, help="held-out 256 px scenes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--png", default=None,
                   help="also write truth | shipped | fine-tuned on a held-out shifted scene")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from napari_xt.engine import Finished, run
    from napari_xt.model import load_checkpoint
    from napari_xt.train.config import TrainConfig
    from napari_xt.train.demo import HELD_OUT_SEED, demo_training_config, load_demo_model
    from napari_xt.train.evaluate import evaluate
    from napari_xt.train.from_corrections import export_pairs
    from napari_xt.train.loop import Trainer
    from napari_xt.train.synthetic import CLASS_NAMES, make_scene

    demo_cfg = demo_training_config()
    norm = demo_cfg.data.normalize
    work = Path(tempfile.mkdtemp(prefix="xt-finetune-"))
    model = load_demo_model()
    big = dataclasses.replace(demo_cfg.data.scene, height=args.size, width=args.size)
    labelled = 0
    t0 = time.perf_counter()
    for s in range(args.scenes):
        image, truth, targets = make_scene(HELD_OUT_SEED + 700_000 + s, big)
        image = image + args.shift
        store = work / f"scene{s}.xt.zarr"
        events = list(run(image, model, store, axes="CYX", normalize=(norm.mean, norm.std),
                          outputs=("labels", "detections"), threshold=demo_cfg.eval.threshold))
        assert isinstance(events[-1], Finished), events[-1]
        labelled += annotate(store, window_boxes(args.size, args.window, args.windows), truth,
                             targets)
        export_pairs(store, image, work / "pairs", margin=args.margin, axes="CYX")
    t_prep = time.perf_counter() - t0

    cfg = TrainConfig.from_dict({
        "model": {"checkpoint": "demo"},
        "data": {"kind": "zarr", "train_paths": [str(work / "pairs")], "crop_size": 256,
                 "train_count": 100_000},
        "optim": {"steps": args.steps, "batch_size": 4, "lr": args.lr,
                  "warmup_steps": max(1, args.steps // 20)},
        "loss": dataclasses.asdict(demo_cfg.loss),
        "run": {"threads": args.threads, "checkpoint_every": 0, "eval_every": 0,
                "log_every": max(1, args.steps // 5)},
    })
    t0 = time.perf_counter()
    trainer = Trainer(cfg, work / "finetune",
                      lambda e: print(f"  step {e.step}: loss {e.loss:.4f}", flush=True)
                      if e.kind == "step" else None)
    trainer.fit()
    t_train = time.perf_counter() - t0
    tuned = load_checkpoint(work / "finetune" / "model.safetensors")

    e = demo_cfg.eval
    scene = demo_cfg.data.scene
    sets = {"shifted": shifted_samples(scene, HELD_OUT_SEED, args.eval_count, args.shift, norm),
            "original": shifted_samples(scene, HELD_OUT_SEED, args.eval_count, 0.0, norm)}
    rows = []
    for set_name, samples in sets.items():
        for model_name, m in (("shipped", model), ("fine-tuned", tuned)):
            metrics = evaluate(m, samples, len(CLASS_NAMES), CLASS_NAMES, e.context_classes,
                               e.radius, e.threshold, e.min_distance)
            rows.append({"scenes": set_name, "model": model_name,
                         **{k: 100 * metrics[k] for k in ("iou_land", "miou_context", "det_f1")}})
    base = {r["scenes"]: r for r in rows if r["model"] == "shipped"}
    print(f"\nannotated: {args.scenes} scenes of {args.size}^2 at +{args.shift:g} dB, "
          f"{args.windows} windows of {args.window}^2 each = {labelled:,} corrected pixels "
          f"({100 * labelled / (args.scenes * args.size ** 2):.1f} % of those scenes); "
          f"predict + correct + export {t_prep:.1f} s; fine-tune {args.steps} steps "
          f"{t_train:.1f} s ({torch.get_num_threads()} threads)")
    print(f"held-out: {args.eval_count} scenes of 256^2 per set\n")
    print(f"{'scenes':<10}{'model':<12}{'land IoU':>10}{'sea/lake mIoU':>15}{'vessel F1':>11}"
          f"   (fine-tuned minus shipped)")
    for r in rows:
        b = base[r["scenes"]]
        diff = "" if r["model"] == "shipped" else "   " + " / ".join(
            f"{r[k] - b[k]:+.1f}" for k in ("iou_land", "miou_context", "det_f1"))
        print(f"{r['scenes']:<10}{r['model']:<12}{r['iou_land']:>10.1f}"
              f"{r['miou_context']:>15.1f}{r['det_f1']:>11.1f}{diff}")
    if args.png:
        picture(args.png, (model, tuned), args.shift, norm, big, HELD_OUT_SEED + 800_000)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "labelled_pixels": labelled, "prep_s": t_prep,
            "train_s": t_train, "rows": rows, "torch": torch.__version__}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
