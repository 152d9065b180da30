"""Where the shipped demo model's weights are, and how they load (no training code).

The package ships `weights/xt_demo_sar.safetensors` (the demo model, trained by
`napari-xt train configs/demo.yaml` then `configs/demo_wide.yaml` on the synthetic SAR task
of `napari_xt.train.synthetic`) and `weights/xt_demo_sar_region_only.safetensors` (the same
architecture without context, its baseline), `xt_demo_sar_image.safetensors` (whole-image
context, `configs/demo_image.yaml`) and `xt_demo_sar_beacon.safetensors` (that model taught
the beacon variant too, `configs/demo_beacon.yaml`, with scene detectors trained by
`configs/demo_beacon_detect.yaml` and read after `configs/demo_beacon_read.yaml`). All
carry their config and training config in
the header, so they rebuild themselves; the task's class names are added here when a file
predates names in configs.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
DEMO_WEIGHTS = WEIGHTS_DIR / "xt_demo_sar.safetensors"
REGION_ONLY_WEIGHTS = WEIGHTS_DIR / "xt_demo_sar_region_only.safetensors"
IMAGE_WEIGHTS = WEIGHTS_DIR / "xt_demo_sar_image.safetensors"  # whole-image context
BEACON_WEIGHTS = WEIGHTS_DIR / "xt_demo_sar_beacon.safetensors"  # ... and the beacon task
#: built-in models by the names a user types: the demo model, its whole-image context
#: version, that version taught the beacon variant too, and its region-only baseline
BUILT_IN = {"demo": DEMO_WEIGHTS, "demo-image": IMAGE_WEIGHTS, "demo-beacon": BEACON_WEIGHTS,
            "demo-region-only": REGION_ONLY_WEIGHTS}
DEMO_METRICS = WEIGHTS_DIR / "demo_metrics.json"
#: the synthetic SAR task's classes (label values 0, 1, 2) and detection class
CLASS_NAMES = ("land", "sea", "lake")
POINT_NAMES = ("vessel",)


def demo_weights_path(region_only: bool = False, name: str | None = None) -> Path:
    """The weights file (of built-in model `name`, default the demo model or, with
    `region_only`, its baseline); FileNotFoundError naming it when the installation lacks
    it."""
    path = BUILT_IN[name] if name else (REGION_ONLY_WEIGHTS if region_only else DEMO_WEIGHTS)
    if not path.is_file():
        raise FileNotFoundError(f"the demo model's weights are missing from this "
                                f"installation: {path} (reinstall napari-xt)")
    return path


def load_demo_weights(region_only: bool = False, device="cpu", name: str | None = None):
    """A shipped demo `XT` (eval mode; see `demo_weights_path`). Input: normalized
    (B, 2, H, W) dB VV/VH images."""
    from .checkpoint import load_checkpoint

    model = load_checkpoint(demo_weights_path(region_only, name), device=device)
    cfg = model.cfg
    if not cfg.head.class_names:
        model.cfg = replace(cfg, head=replace(cfg.head, class_names=CLASS_NAMES,
                                              point_names=POINT_NAMES))
    return model
