"""Checkpoints: safetensors files that rebuild their own model, and official xT imports.

Our format
----------
A `.safetensors` file with the model's persistent state dict and, in the header metadata:
``napari_xt.format`` (``"1"``), ``napari_xt.config`` (the `XTConfig` as JSON, enough to rebuild
the model alone) and ``napari_xt.hash`` (`model_hash` of the saved tensors and config, checked
on load because safetensors itself carries no checksum). Writes go to a temporary file in the
target folder and are renamed into place; an existing file is never replaced unless
``overwrite=True``.

Official xT checkpoints
-----------------------
The official trainer saves ``torch.save({"epoch", "state_dict", "optimizer_state_dict",
"metrics"})`` where ``state_dict`` comes from a DistributedDataParallel wrapper (every key starts
with ``module.``). Key map (after ``module.`` is stripped), ours on the right:

- ``encoder.model.<timm FeatureListNet / FeatureGetterNet key>`` -> ``region_encoder.model.<key>``
  (names are compared with the FeatureListNet flattening undone, ``layers_0`` == ``layers.0``,
  and old swinv2 files that downsample at the end of a stage, ``layers_0.downsample``, are
  shifted to the start of the next one, ``layers_1.downsample``). timm buffers that newer timm
  no longer saves (``relative_position_index``, ``relative_coords_table``, ``attn_mask``,
  ``k_bias``) are dropped.
- ``decoder.input_proj.*`` -> ``input_proj.*``; ``decoder.cls_token`` -> ``cls_token``.
- ``decoder.layers.{i}.*`` -> ``context.layers.{i}.*`` (Hyper and XL: ``input_layernorm``,
  ``attn.qkv``, ``attn.proj``, ``post_attention_layernorm``, ``mlp.{gate,up,down}_proj``;
  Mamba: ``norm``, ``mixer.{in_proj,conv1d,x_proj,dt_proj,A_log,D,out_proj}``).
- ``decoder.cls.{0,1}.*`` (LayerNorm, Linear) -> ``head.cls.{0,1}.*``.
- Baselines without a context encoder: ``decoder.layers.{0,2,3}.*`` (Linear, GELU, LayerNorm,
  Linear on the pooled features) -> ``head.mlp.{0,2,3}.*``.

Our Hyper layers keep their LSH hyperplanes as a buffer (``attn.lsh_projections``) that the
official files do not hold; it is drawn from the config's seed and kept as built.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .xt import XT, XTConfig

FORMAT_VERSION = "1"
FORMAT_KEY = "napari_xt.format"
CONFIG_KEY = "napari_xt.config"
HASH_KEY = "napari_xt.hash"

_DROPPED_BUFFERS = ("relative_position_index", "relative_coords_table", "attn_mask", "k_bias")
_DROPPED_LSH_BUFFERS = ("proj_dir", "perm", "enc_vec")
_DERIVED_KEYS = re.compile(r"\.lsh_projections$")
_ZIP_MAGIC = b"PK\x03\x04"


PYTHON_REMEDIES = {
    "official": "an official xT checkpoint is loaded with import_official_checkpoint(path, "
                "zoo_name)",
    "in_chans": "pass in_chans={in_chans}",
}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, does not fit its model, or is not a checkpoint.

    `remedy` (a key of `PYTHON_REMEDIES`, with `values`) names what the user can do about
    it; the message ends with it in Python words, and `problem` is the message without it
    (the command line spells the remedy in its own words)."""

    def __init__(self, message: str, *, remedy: str | None = None, **values: Any) -> None:
        self.problem, self.remedy, self.values = message, remedy, values
        if remedy is not None:
            message = f"{message}; {PYTHON_REMEDIES[remedy].format(**values)}"
        super().__init__(message)


def _config_json(cfg: XTConfig) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True, separators=(",", ":"))


def _hash_tensors(tensors: Mapping[str, torch.Tensor], config_json: str) -> str:
    h = hashlib.sha256(config_json.encode())
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_hash(model: XT) -> str:
    """Stable SHA-256 of the model's config and persistent tensors (names, dtypes, bytes)."""
    return _hash_tensors(model.state_dict(), _config_json(model.cfg))


def save_checkpoint(
    model: XT,
    path: str | os.PathLike,
    extra_metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model` to `path` (.safetensors) atomically; returns the path.

    `extra_metadata` (str -> str) goes into the header next to the config; its keys must not
    start with ``napari_xt.``. Raises FileExistsError if `path` exists and not `overwrite`.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    extra = dict(extra_metadata or {})
    bad = [k for k, v in extra.items() if not isinstance(k, str) or not isinstance(v, str)]
    reserved = [k for k in extra if isinstance(k, str) and k.startswith("napari_xt.")]
    if bad or reserved:
        raise ValueError(
            f"extra_metadata must map str -> str without 'napari_xt.' keys: {bad or reserved}"
        )
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    config_json = _config_json(model.cfg)
    metadata = {
        **extra,
        FORMAT_KEY: FORMAT_VERSION,
        CONFIG_KEY: config_json,
        HASH_KEY: _hash_tensors(tensors, config_json),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if `path` appeared meanwhile: never clobber
            os.unlink(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _is_torch_save(path: Path) -> bool:
    """The file starts like a torch.save file (a zip archive, or the legacy pickle)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head == _ZIP_MAGIC or head[:1] == b"\x80"


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header metadata of a checkpoint (raises CheckpointError when unreadable)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types
        if _is_torch_save(path):
            raise CheckpointError(f"{path} is not a readable safetensors checkpoint: it is a "
                                  "torch.save file", remedy="official") from None
        raise CheckpointError(
            f"{path} is not a readable safetensors checkpoint: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    """An error's message up to its first line break (libraries' messages can run long)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_weights(model: XT, path: str | os.PathLike) -> XT:
    """Load the weights of checkpoint `path` into `model` (its config may differ in settings
    that hold no weights, such as `crop_regions`); every tensor must match by name and shape.
    The content hash is checked. Returns `model`."""
    from safetensors.torch import load_file

    path = Path(path)
    metadata = read_metadata(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as exc:
        raise CheckpointError(f"{path} is corrupt: {exc}") from None
    expected_hash = metadata.get(HASH_KEY)
    if expected_hash and _hash_tensors(tensors, metadata.get(CONFIG_KEY, "")) != expected_hash:
        raise CheckpointError(f"{path} is corrupt: its content hash does not match the header")
    _load_strict(model, tensors, str(path))
    return model


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu", in_chans: int | None = None
) -> XT:
    """Rebuild the model saved at `path` and load its weights (eval mode, on `device`).

    `in_chans`, when given, must match the channels the checkpoint's model was trained on.
    """
    from safetensors.torch import load_file

    path = Path(path)
    metadata = read_metadata(path)
    if CONFIG_KEY not in metadata:
        raise CheckpointError(
            f"{path} has no napari-xt config in its metadata ({CONFIG_KEY!r}); it was not "
            "written by save_checkpoint and cannot rebuild its model"
        )
    version = metadata.get(FORMAT_KEY)
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint format {version!r}")
    try:
        cfg = XTConfig.from_dict(json.loads(metadata[CONFIG_KEY]))
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{path}: invalid model config in metadata: {exc}") from None
    if in_chans is not None and in_chans != cfg.in_chans:
        raise CheckpointError(
            f"{path}: the model expects {cfg.in_chans} channels, {in_chans} were requested"
        )
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as exc:
        raise CheckpointError(f"{path} is corrupt: {exc}") from None
    expected_hash = metadata.get(HASH_KEY)
    if expected_hash and _hash_tensors(tensors, metadata[CONFIG_KEY]) != expected_hash:
        raise CheckpointError(f"{path} is corrupt: its content hash does not match the header")
    model = XT(cfg)
    _load_strict(model, tensors, str(path))
    return model.to(device).eval()


def _listing(title: str, items: list[str], limit: int = 12) -> str:
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"{len(items)} {title}: {', '.join(items[:limit])}{more}"


def _load_strict(model: XT, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    ours = model.state_dict()
    missing = sorted(k for k in ours if k not in tensors and not _DERIVED_KEYS.search(k))
    unexpected = sorted(k for k in tensors if k not in ours)
    mismatched = sorted(
        f"{k} {tuple(v.shape)} vs model {tuple(ours[k].shape)}"
        for k, v in tensors.items()
        if k in ours and v.shape != ours[k].shape
    )
    problems = [
        _listing(title, items)
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if items
    ]
    if problems:
        raise CheckpointError(f"{source} does not fit {model.cfg.name}: " + "; ".join(problems))
    model.load_state_dict(dict(tensors), strict=False)


# ----------------------------------------------------------------------------- official files


def _normalize_timm(key: str) -> str:
    """Backbone key with wrapper prefixes and FeatureListNet flattening undone."""
    key = re.sub(r"^(model\.)+", "", key)
    return re.sub(r"(^|\.)([A-Za-z]+)_(\d+)\.", r"\1\2.\3.", key)


def _shift_old_downsample(key: str) -> str:
    # old swinv2 layout: stage i ends with downsample -> new layout: stage i+1 starts with it
    m = re.match(r"^layers\.(\d+)\.downsample\.(.*)$", key)
    return f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}" if m else key


def official_to_ours(model: XT, state: Mapping[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """Rename an official xT state dict to our names; returns (renamed, unmapped keys)."""
    ours = model.state_dict()
    backbone = {_normalize_timm(k[len("region_encoder.") :]): k for k in ours
                if k.startswith("region_encoder.")}
    old_downsample = any(
        _normalize_timm(k[len("encoder.") :]).startswith("layers.0.downsample.")
        for k in state
        if k.startswith("encoder.model.")
    )
    has_context = model.context is not None
    renamed: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, value in state.items():
        target = None
        if key.startswith("encoder."):
            inner = _normalize_timm(key[len("encoder.") :])
            if inner.rsplit(".", 1)[-1] in _DROPPED_BUFFERS:
                continue
            if old_downsample:
                inner = _shift_old_downsample(inner)
            target = backbone.get(inner)
        elif key.startswith("decoder."):
            top, _, rest = key[len("decoder.") :].partition(".")
            if top == "cls_token" and not rest:
                target = "cls_token"
            elif top in ("input_proj", "cls") and rest:
                target = {"input_proj": "input_proj.", "cls": "head.cls."}[top] + rest
            elif top == "layers" and rest:
                if rest.rsplit(".", 1)[-1] in _DROPPED_LSH_BUFFERS:
                    continue
                target = ("context.layers." if has_context else "head.mlp.") + rest
        if target is None or target not in ours:
            unmapped.append(key)
        else:
            renamed[target] = value
    return renamed, unmapped


def ours_to_official(model: XT) -> dict[str, torch.Tensor]:
    """Our state dict under official xT names (without ``module.``): the inverse key map."""
    out = {}
    for key, value in model.state_dict().items():
        if _DERIVED_KEYS.search(key):
            continue
        if key.startswith("region_encoder.model."):
            out["encoder.model." + key[len("region_encoder.model.") :]] = value
        elif key.startswith("context."):
            out["decoder." + key[len("context.") :]] = value
        elif key.startswith("head.mlp."):
            out["decoder.layers." + key[len("head.mlp.") :]] = value
        elif key.startswith("head."):
            out["decoder." + key[len("head.") :]] = value
        else:
            out["decoder." + key] = value
    return out


def _read_official(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        why = (f"it holds a {found.group(1)} object, and objects other than tensors and plain "
               "containers are never unpickled" if found else _first_line(exc))
        raise CheckpointError(f"{path} could not be read as a torch checkpoint with "
                              f"weights_only=True: {why}") from None
    state = payload
    if isinstance(payload, Mapping):
        for wrapper in ("state_dict", "model", "model_state_dict"):
            if isinstance(payload.get(wrapper), Mapping):
                state = payload[wrapper]
                break
    if not isinstance(state, Mapping) or not state or not all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()
    ):
        raise CheckpointError(f"{path} is not a checkpoint: no state dict of tensors inside")
    state = dict(state)
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def import_official_checkpoint(
    path: str | os.PathLike, name_or_config: str | XTConfig, strict: bool = True, **overrides
) -> XT:
    """Build the zoo model `name_or_config` and load an official xT trainer checkpoint into it.

    `overrides` go to `get_config` (e.g. ``num_classes=``, ``in_chans=``). With `strict`, any
    missing, unexpected or mis-shaped key raises one CheckpointError naming them all.
    """
    from .zoo import get_config

    path = Path(path)
    cfg = name_or_config if isinstance(name_or_config, XTConfig) else get_config(
        name_or_config, **overrides
    )
    state = _read_official(path)
    model = XT(cfg)
    renamed, unmapped = official_to_ours(model, state)
    ours = model.state_dict()
    problems = []
    stem = next(  # the first convolution of the backbone sees the image channels
        (k for k, v in ours.items() if k.startswith("region_encoder.") and v.ndim == 4), None
    )
    if stem in renamed and renamed[stem].ndim == 4 and renamed[stem].shape[1] != cfg.in_chans:
        raise CheckpointError(
            f"{path}: the checkpoint's region encoder takes {renamed[stem].shape[1]} channels, "
            f"the model {cfg.in_chans}", remedy="in_chans", in_chans=int(renamed[stem].shape[1]))
    missing = sorted(k for k in ours if k not in renamed and not _DERIVED_KEYS.search(k))
    mismatched = sorted(
        f"{k} {tuple(v.shape)} vs model {tuple(ours[k].shape)}"
        for k, v in renamed.items()
        if k in ours and v.shape != ours[k].shape
    )
    if strict:
        problems += [
            _listing(title, items)
            for title, items in (
                ("missing keys (ours)", missing),
                ("unexpected keys (official)", sorted(unmapped)),
                ("shape mismatches", mismatched),
            )
            if items
        ]
    elif mismatched:
        problems.append(_listing("shape mismatches", mismatched))
    if problems:
        raise CheckpointError(f"{path} does not fit {cfg.name}: " + "; ".join(problems))
    model.load_state_dict({k: v for k, v in renamed.items() if k in ours}, strict=False)
    return model.eval()
