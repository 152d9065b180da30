"""The shipped demo model (synthetic SAR: land / sea / lake + vessels) and its baseline.

`load_demo_model()` rebuilds the model from ``napari_xt/weights/xt_demo_sar.safetensors``
with the checkpoint module (no network); `region_only=True` loads the same architecture
trained without a context encoder. Both files carry their training config in the header, so
the scene parameters and input normalization used in training come back with them
(`demo_training_config`). `evaluate_demo` scores a model on held-out synthetic seeds; the
measured numbers are in ``napari_xt/weights/demo_metrics.json`` and ``docs/demo_model.md``.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from napari_xt.model.demo_weights import (  # noqa: F401  (where the weights live)
    DEMO_METRICS,
    DEMO_WEIGHTS,
    REGION_ONLY_WEIGHTS,
    WEIGHTS_DIR,
    demo_weights_path,
    load_demo_weights,
)

from .config import TrainConfig
from .data import Normalization, SyntheticDataset
from .evaluate import evaluate
from .synthetic import CLASS_NAMES

HELD_OUT_SEED = 2_000_000_000  # held-out scenes: seeds never drawn in training or validation


def load_demo_model(region_only: bool = False, device: str | torch.device = "cpu"):
    """The shipped demo `XT` (eval mode). Input: normalized (B, 2, H, W) dB VV/VH images."""
    return load_demo_weights(region_only, device)


def demo_training_config(region_only: bool = False) -> TrainConfig:
    """The `TrainConfig` the demo weights were trained with (read from the file header)."""
    from napari_xt.model.checkpoint import read_metadata

    meta = read_metadata(demo_weights_path(region_only))
    return TrainConfig.from_dict(json.loads(meta["train.config"]))


def demo_normalization(region_only: bool = False) -> Normalization:
    """Per-channel normalization applied to dB images before the demo model."""
    return demo_training_config(region_only).data.normalize


def normalize_scene(image_db: np.ndarray, region_only: bool = False) -> torch.Tensor:
    """image (C, H, W) dB -> (1, C, H, W) float32 tensor ready for the demo model."""
    return torch.from_numpy(demo_normalization(region_only)(image_db))[None]


def documented_metrics() -> dict:
    """The held-out metrics measured for the shipped weights (demo_metrics.json)."""
    return json.loads(DEMO_METRICS.read_text())


def evaluate_demo(
    model: torch.nn.Module,
    count: int = 32,
    first_seed: int = HELD_OUT_SEED,
    region_only: bool = False,
) -> dict[str, float]:
    """Metrics of `model` on `count` held-out synthetic scenes (seeds from `first_seed`)."""
    cfg = demo_training_config(region_only)
    data = SyntheticDataset(cfg.data.scene, first_seed, count, cfg.data.normalize)
    samples = [data[i] for i in range(count)]
    e = cfg.eval
    return evaluate(
        model, samples, len(CLASS_NAMES), CLASS_NAMES, e.context_classes, e.radius,
        e.threshold, e.min_distance,
    )


def measure_demo_metrics(
    count: int = 128, quick_count: int = 32, quick_seed: int = HELD_OUT_SEED + 100_000
) -> dict:
    """Held-out metrics of both shipped models, as stored in demo_metrics.json.

    `held_out`: `count` scenes from HELD_OUT_SEED; `quick_check`: the small set the test suite
    re-evaluates (`quick_count` scenes from `quick_seed`).
    """
    context, region_only = load_demo_model(), load_demo_model(region_only=True)
    out: dict = {}
    for key, n, seed in (("held_out", count, HELD_OUT_SEED), ("quick_check", quick_count,
                                                               quick_seed)):
        out[key] = {
            "count": n,
            "first_seed": seed,
            "context": evaluate_demo(context, n, seed),
            "region_only": evaluate_demo(region_only, n, seed, region_only=True),
        }
    return out
