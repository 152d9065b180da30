"""Training configuration: a YAML file mapped onto frozen dataclasses (configs are data).

Top-level sections: `model`, `data`, `optim`, `loss`, `run`, `eval` (see the dataclasses).
The model is a zoo name with overrides (`model: {zoo: NAME, overrides: {...}}`), a whole
`XTConfig` as a dict (`model: {config: {...}}`), or a checkpoint to fine-tune
(`model: {checkpoint: PATH | demo | demo-image}`). Unknown keys are errors.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from napari_xt.model.fields import from_mapping

from .data import Normalization
from .losses import LossConfig
from .synthetic import SceneConfig


@dataclass(frozen=True)
class ModelSpec:
    """`zoo` + `overrides`, a whole `config`, or a `checkpoint` to fine-tune (a napari-xt
    safetensors file, or ``demo`` for the shipped demo model: its architecture and weights,
    and its input normalization unless `data.normalize` is given). `zero_init` lists
    parameter-name prefixes set to zero at the start (e.g. ``output_proj``: the context path
    starts silent, so a context model begins as its region-only counterpart and learns what
    context adds). `region_weights`: a local weights file of the region encoder's backbone
    (a plain timm state dict or napari-xt's own, .safetensors or a torch file read with
    `weights_only=True`), loaded into a `zoo` or `config` model before training starts; the
    context encoder and the head start from their random initialisation."""

    zoo: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    zero_init: tuple[str, ...] = ()
    checkpoint: str | None = None
    region_weights: str | None = None

    def checkpoint_path(self) -> Path | None:
        """The checkpoint file to start from, or None."""
        if self.checkpoint is None:
            return None
        from napari_xt.model.demo_weights import BUILT_IN

        if self.checkpoint in BUILT_IN:  # a built-in model by name (demo, demo-image, ...)
            from napari_xt.model.demo_weights import demo_weights_path

            return demo_weights_path(name=self.checkpoint)
        path = Path(self.checkpoint).expanduser()
        if not path.is_file():
            raise ValueError(f"model.checkpoint: no file {path}")
        return path

    def build_config(self):
        """The `XTConfig` this spec names."""
        from napari_xt.model.xt import XTConfig

        if sum(x is not None for x in (self.zoo, self.config, self.checkpoint)) != 1:
            raise ValueError("model: give exactly one of 'zoo' (a zoo name), 'config' or "
                             "'checkpoint' (a model to fine-tune)")
        if self.region_weights is not None:
            if self.checkpoint is not None:
                raise ValueError("model: 'region_weights' start a new model; a 'checkpoint' "
                                 "that is fine-tuned has its region encoder's weights already")
            if not Path(self.region_weights).expanduser().is_file():
                raise ValueError(f"model.region_weights: no file {self.region_weights}")
        if self.checkpoint is not None:
            if self.zero_init:
                raise ValueError("model: 'zero_init' cannot change a checkpoint that is "
                                 "fine-tuned")
            import json
            from dataclasses import replace

            from napari_xt.model.checkpoint import CONFIG_KEY, CheckpointError, read_metadata
            from napari_xt.model.zoo import apply_overrides

            path = self.checkpoint_path()
            meta = read_metadata(path)
            if CONFIG_KEY not in meta:
                raise CheckpointError(f"{path} has no napari-xt model config to fine-tune")
            cfg = XTConfig.from_dict(json.loads(meta[CONFIG_KEY]))
            # settings without weights (crop_regions, name, ...) may change; the weights must
            # still fit (checked when they are loaded)
            overrides = dict(self.overrides)
            name = overrides.pop("name", None)
            cfg = apply_overrides(cfg, **overrides) if overrides else cfg
            return cfg if name is None else replace(cfg, name=name)
        if self.config is not None:
            return XTConfig.from_dict(self.config)
        from dataclasses import replace

        from napari_xt.model.zoo import get_config

        overrides = dict(self.overrides)
        name = overrides.pop("name", None)  # get_config's first argument is the zoo name
        cfg = get_config(self.zoo, **overrides)
        return cfg if name is None else replace(cfg, name=name)


@dataclass(frozen=True)
class DataSpec:
    """`kind: synthetic` (scenes of `scene`, seeds from `train_seed`) or `kind: zarr`
    (`train_paths` / `val_paths`: folders of pair stores or lists of stores, `crop_size`)."""

    kind: str = "synthetic"
    scene: SceneConfig = field(default_factory=SceneConfig)
    train_seed: int = 0
    train_count: int = 1_000_000
    val_seed: int = 1_000_000_000
    val_count: int = 8
    scene_sizes: list[int] = field(default_factory=list)  # synthetic: square scene sizes,
    # taken in turn by the steps (step k: sizes[k % n]); empty: the scene's own size
    train_paths: list[str] = field(default_factory=list)
    val_paths: list[str] = field(default_factory=list)
    crop_size: int = 256
    normalize: Normalization = field(default_factory=Normalization)
    heatmap_sigma: float = 2.0
    # whole-image context training (a model with global_context; see train/whole_image.py)
    beacon_fraction: float = 0.0  # synthetic: share of scenes in the beacon variant
    scene_pool: int = 0  # distinct scenes per size (0: a fresh scene every time)
    # per entry of scene_sizes, its own scene_pool (a large scene's summary is costly, a
    # small one's is not); empty: scene_pool for every size
    scene_pools: list[int] = field(default_factory=list)
    crops_per_scene: int = 2  # crops of a scene that carry the loss in a step (0: only
    # the scene-level target of loss.scene_weight)
    # where those crops lie: "random" (any region-aligned place) or "tiling" (where the
    # engine's crops start: every k // 2 regions, the last at the far border)
    crop_places: str = "random"
    beacon_crop: bool = False  # in a beacon scene, the first of its crops holds the beacon

    def __post_init__(self) -> None:
        if self.kind not in ("synthetic", "zarr"):
            raise ValueError(f"data.kind must be 'synthetic' or 'zarr', got {self.kind!r}")
        if self.kind == "zarr" and not self.train_paths:
            raise ValueError("data.kind 'zarr' needs train_paths")
        if any(int(s) < 1 for s in self.scene_sizes):
            raise ValueError(f"data.scene_sizes must be positive, got {self.scene_sizes}")
        if not 0.0 <= self.beacon_fraction <= 1.0:
            raise ValueError(f"data.beacon_fraction must be in [0, 1], got "
                             f"{self.beacon_fraction}")
        if self.crop_places not in ("random", "tiling"):
            raise ValueError(f"data.crop_places must be 'random' or 'tiling', got "
                             f"{self.crop_places!r}")
        if self.scene_pool < 0 or self.crops_per_scene < 0:
            raise ValueError("data.scene_pool and data.crops_per_scene must be >= 0")
        if self.scene_pools:
            pools: dict[int, int] = {}
            for size, pool in zip(self.scene_sizes, self.scene_pools):
                pools.setdefault(int(size), int(pool))
            if (len(self.scene_pools) != len(self.scene_sizes) or min(self.scene_pools) < 0
                    or any(pools[int(s)] != int(p)
                           for s, p in zip(self.scene_sizes, self.scene_pools))):
                raise ValueError(f"data.scene_pools must give one pool >= 0 per entry of "
                                 f"data.scene_sizes, the same for a size listed twice; got "
                                 f"{self.scene_pools} for sizes {self.scene_sizes}")

    def pool_for(self, size: int) -> int:
        """Distinct scenes of side `size` (0: a fresh scene every time)."""
        if self.scene_pools:
            return int(self.scene_pools[[int(s) for s in self.scene_sizes].index(int(size))])
        return self.scene_pool


@dataclass(frozen=True)
class OptimSpec:
    """Optimizer and schedule: AdamW with `lr`, `betas` and `weight_decay` (not applied to
    biases, norms and tokens), `steps` optimizer steps of `batch_size` samples (the global
    batch over all ranks), a linear warm-up over `warmup_steps` then a cosine decay to
    `min_lr_ratio * lr`, and gradients clipped to norm `grad_clip` (None or 0: no clipping).
    `lr_scale`: parameter-name prefix -> factor on `lr` for those parameters (e.g. a new map
    of a fine-tuned model that must move further than the rest; the longest prefix wins)."""

    steps: int = 1000
    batch_size: int = 4
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.05
    warmup_steps: int = 50
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0
    lr_scale: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = {k: v for k, v in self.lr_scale.items()
               if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0}
        if bad:
            raise ValueError(f"optim.lr_scale factors must be numbers > 0, got {bad}")


@dataclass(frozen=True)
class RunSpec:
    """How to run: device, threads, seeds, memory options, checkpoint and log cadence.

    `freeze`: parameter-name prefixes that do not train (e.g. ``region_encoder``: with
    whole-image context its scene summaries are then computed once per scene).
    `grad_ratio`: fraction of regions whose encoder activations keep gradients (the others
    run under no_grad). `stream_rows`: region rows per streamed piece for context encoders
    that carry state (transformer_xl); None runs the whole crop at once. `checkpointing`:
    recompute region encoder activations in the backward pass.
    """

    seed: int = 0
    device: str = "cpu"
    threads: int | None = 2
    grad_ratio: float = 1.0
    stream_rows: int | None = None
    checkpointing: bool = False
    checkpoint_every: int = 200
    eval_every: int = 200
    log_every: int = 10
    keep_checkpoints: int = 2
    freeze: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 < self.grad_ratio <= 1.0:
            raise ValueError(f"grad_ratio must be in (0, 1], got {self.grad_ratio}")
        if self.stream_rows is not None and self.stream_rows < 1:
            raise ValueError("stream_rows must be None or >= 1")


@dataclass(frozen=True)
class EvalSpec:
    """Validation settings: detections are the local maxima of the centre map scoring at
    least `threshold`, with `min_distance` pixels of suppression around each, matched to the
    truth within `radius` pixels; `context_classes` are the class values whose mean IoU is
    reported as `miou_context`."""

    radius: float = 4.0
    threshold: float = 0.3
    min_distance: int = 3
    context_classes: tuple[int, ...] = (1, 2)


@dataclass(frozen=True)
class TrainConfig:
    """A training run: the sections `model`, `data`, `optim`, `loss`, `run` and `eval` of
    the YAML file (see `load_config`)."""

    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    loss: LossConfig = field(default_factory=LossConfig)
    run: RunSpec = field(default_factory=RunSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain dicts and lists (tuples become lists), as saved
        with checkpoints; `from_dict` reads it back."""
        return _plain(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of `to_dict`. Unknown keys are errors (named by their path, e.g.
        ``config.optim``); an empty section (None) means its defaults."""
        return from_mapping(cls, data or {}, "config", none_is_empty=True)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def load_config(path: str | os.PathLike) -> TrainConfig:
    """Read a training YAML file; a file that is not YAML, or not a mapping of sections, is
    a ValueError naming where it stops making sense."""
    text = Path(path).read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ValueError(f"not valid YAML{where}: {problem}") from None
    if data is not None and not isinstance(data, dict):
        raise ValueError(f"expected a mapping of sections (model:, data:, ...), found a "
                         f"{type(data).__name__}")
    return TrainConfig.from_dict(data or {})
