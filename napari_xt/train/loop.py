"""Single-process training of an xT model, end to end (region encoder + context + head).

Memory stays bounded by three options of `RunSpec`:
- `stream_rows`: the crop is processed in bands of region rows; the context state (e.g. the
  Transformer-XL memory, already detached by the encoder) is carried from band to band and
  every band is backpropagated on its own, so activations of one band live at a time. The loss
  of every band is normalized by the counts of the whole crop, so the summed gradients are
  those of the whole-crop loss (truncated through the carried state).
- `grad_ratio`: a random fraction of the regions (drawn from (seed, step)) run the region
  encoder with gradients, the rest under no_grad.
- `checkpointing`: region encoder activations are recomputed in the backward pass.

Determinism: the data and every random draw of a step derive from (run.seed, step), and the
optimizer, scheduler and RNG states are saved with each checkpoint, so a resumed run takes the
same steps as an uninterrupted one.

Progress is reported as `TrainEvent`s to a callback.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint as recompute

from napari_xt.model.tokenizer import split_regions

from . import state as run_state
from .config import TrainConfig
from .data import IGNORE_INDEX, Normalization, SyntheticDataset, ZarrPairDataset, collate
from .evaluate import evaluate
from .losses import combine, loss_terms, token_class_targets, token_loss_sum
from .synthetic import CLASS_NAMES


@dataclass(frozen=True)
class TrainEvent:
    """kind: "start", "step", "eval", "checkpoint" or "done"."""

    kind: str
    step: int
    total: int
    loss: float | None = None
    terms: dict[str, float] = field(default_factory=dict)
    lr: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    path: str | None = None
    elapsed: float = 0.0


def cosine_with_warmup(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over `warmup` steps, then cosine down to `min_ratio`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith("token") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _normalization(cfg: TrainConfig, start: Path | None) -> Normalization:
    """The input normalization of a run: `data.normalize`, or, when fine-tuning and the
    config leaves it at its default, the checkpoint's own (a different explicit one is an
    error: the weights would see other inputs than they were trained on)."""
    given = cfg.data.normalize
    if start is None:
        return given
    import json

    from napari_xt.model.checkpoint import read_metadata

    stored = read_metadata(start).get("train.normalize")
    if stored is None:
        return given
    saved = json.loads(stored)
    ckpt = Normalization(tuple(saved["mean"]), tuple(saved["std"]))
    if given == Normalization():
        return ckpt
    if given != ckpt:
        raise ValueError(f"data.normalize {given.to_dict()} differs from the normalization "
                         f"{ckpt.to_dict()} that {start.name} was trained with")
    return given


class Trainer:
    """Builds the model, data and optimizer from a `TrainConfig` and trains into `out_dir`."""

    def __init__(
        self,
        cfg: TrainConfig,
        out_dir: str | os.PathLike,
        callback: Callable[[TrainEvent], None] | None = None,
    ) -> None:
        from napari_xt.model.xt import XT

        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.callback = callback or (lambda event: None)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        torch.manual_seed(cfg.run.seed)
        self.device = torch.device(cfg.run.device)
        self.model_config = cfg.model.build_config()
        start = cfg.model.checkpoint_path()
        self.normalization = _normalization(cfg, start)
        if self.normalization != cfg.data.normalize:  # saved with the checkpoints' config
            self.cfg = cfg = replace(cfg, data=replace(cfg.data, normalize=self.normalization))
        if start is None:
            self.model = XT(self.model_config).to(self.device).train()
            self._init_centre_bias()
            self._zero_init(cfg.model.zero_init)
        else:  # fine-tuning: the checkpoint's weights (content hash checked on load)
            self.model = _fine_tuned(self.model_config, start).to(self.device).train()
        self._freeze(cfg.run.freeze)
        # training-only token classifier (deep supervision, `loss.token_weight`); not part of
        # the saved model, kept in the training state for resume
        self.token_head: torch.nn.Linear | None = None
        groups = _param_groups(self.model, cfg.optim.weight_decay)
        if cfg.loss.token_weight > 0:
            self.token_head = torch.nn.Linear(
                self.model.token_dim, self.model_config.num_classes
            ).to(self.device)
            groups += _param_groups(self.token_head, cfg.optim.weight_decay)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_with_warmup(o.warmup_steps, o.steps, o.min_lr_ratio)
        )
        self.step = 0
        self._build_data()
        self.scenes = None  # whole-image context: scenes, their summaries and crops
        if self.model.global_context is not None:
            from .whole_image import SceneCrops

            self.scenes = SceneCrops(self)

    def _init_centre_bias(self) -> None:
        """Start the centre map at `loss.centre_prior` so the focal loss starts small."""
        outputs = getattr(self.model.head, "outputs", None)
        name = self.cfg.loss.centre_map
        if isinstance(outputs, torch.nn.ModuleDict) and name in outputs:
            p = self.cfg.loss.centre_prior
            torch.nn.init.constant_(outputs[name].bias, math.log(p / (1 - p)))

    def _freeze(self, prefixes: tuple[str, ...]) -> None:
        if not prefixes:
            return
        hit = False
        for name, p in self.model.named_parameters():
            if any(name.startswith(prefix) for prefix in prefixes):
                p.requires_grad_(False)
                hit = True
        if not hit:
            raise ValueError(f"run.freeze {list(prefixes)} matches no parameter")

    def _keep_frozen_eval(self) -> None:
        """A module with no trainable parameter stays in eval mode (its norms do not move)."""
        for module in self.model.children():
            if all(not p.requires_grad for p in module.parameters()):
                module.eval()

    def region_encoder_frozen(self) -> bool:
        return all(not p.requires_grad for p in self.model.region_encoder.parameters())

    def _zero_init(self, prefixes: tuple[str, ...]) -> None:
        if not prefixes:
            return
        hit = False
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if any(name.startswith(prefix) for prefix in prefixes):
                    p.zero_()
                    hit = True
        if not hit:
            raise ValueError(f"model.zero_init {list(prefixes)} matches no parameter")

    # ------------------------------------------------------------------ data

    def _build_data(self) -> None:
        d = self.cfg.data
        self.train_sets = []  # several scene sizes: one dataset per size, used in turn
        if d.kind == "synthetic":
            self.train_data = SyntheticDataset(d.scene, d.train_seed, d.train_count,
                                               self.normalization)
            self.train_sets = [
                SyntheticDataset(replace(d.scene, height=int(n), width=int(n)), d.train_seed,
                                 d.train_count, self.normalization) for n in d.scene_sizes]
            self.val_data = SyntheticDataset(d.scene, d.val_seed, d.val_count,
                                             self.normalization)
            self.class_names = list(CLASS_NAMES)
        else:
            self.train_data = ZarrPairDataset(
                d.train_paths, self.normalization, d.crop_size, length=d.train_count,
                seed=self.cfg.run.seed,
            )
            self.val_data = (
                ZarrPairDataset(d.val_paths, self.normalization) if d.val_paths else None
            )
            self.class_names = [f"class_{k}" for k in range(self.model_config.num_classes)]

    def batch_for_step(self, step: int) -> dict:
        """The training batch of `step` (a pure function of run.seed and step)."""
        rng = np.random.default_rng([self.cfg.run.seed, step])
        data = self.train_sets[step % len(self.train_sets)] if self.train_sets else \
            self.train_data
        idx = rng.integers(0, len(data), self.cfg.optim.batch_size)
        return collate([data[int(i)] for i in idx], self.cfg.data.heatmap_sigma)

    # ------------------------------------------------------------------ forward / backward

    def _encode(self, regions: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
        """regions (N, C, S, S) -> features [(N, C_l, h_l, w_l)], honouring grad_ratio."""
        run = self.cfg.run
        encode = self.model.encode_regions

        def with_grad(x: torch.Tensor) -> list[torch.Tensor]:
            if run.checkpointing:
                return list(recompute(encode, x, use_reentrant=False))
            return encode(x)

        n = regions.shape[0]
        if self.region_encoder_frozen():  # nothing to train there: no activations kept
            with torch.no_grad():
                return encode(regions)
        if run.grad_ratio >= 1.0:
            return with_grad(regions)
        k = max(1, int(round(run.grad_ratio * n)))
        perm = torch.randperm(n, generator=gen).to(regions.device)
        sel, rest = perm[:k], perm[k:]
        live = with_grad(regions[sel])
        if len(rest) == 0:
            return [f.index_select(0, torch.argsort(perm[:k])) for f in live]
        with torch.no_grad():
            frozen = encode(regions[rest])
        out = []
        for a, b in zip(live, frozen):
            full = a.new_zeros((n, *a.shape[1:]))
            full = full.index_copy(0, rest, b).index_copy(0, sel, a)
            out.append(full)
        return out

    def _targets_by_region(self, batch: dict, size: int) -> dict[str, torch.Tensor]:
        """Batch maps (B, K, H, W) -> (B, R, K, S, S) in raster order; padding ignored."""
        out = {}
        mask = batch["mask"][:, None]
        regions, valid, _ = split_regions(mask, size)
        out["mask"] = regions.masked_fill(~valid, IGNORE_INDEX)[:, :, 0]  # (B, R, S, S)
        for key in ("centre", "size", "size_weight"):
            out[key] = split_regions(batch[key], size)[0]
        return out

    def loss_counts(self, batch: dict) -> dict[str, float]:
        """What each loss term of `batch` is normalized by (pixels, centres, tokens)."""
        size = self.model_config.region.region_size
        targets = self._targets_by_region(batch, size)
        counts = {
            "ce": float((targets["mask"] != IGNORE_INDEX).sum()),
            "heatmap": float((targets["centre"] >= 1.0).sum()),
            "size": float(targets["size_weight"].sum()),
        }
        if self.token_head is not None:
            stride = self.model.region_encoder.feature_strides[-1]
            counts["token"] = float(token_class_targets(
                batch["mask"], stride, self.model_config.num_classes).sum())
        if self.cfg.loss.class_weights is not None:
            w = torch.tensor(self.cfg.loss.class_weights)
            m = targets["mask"]
            counts["ce"] = float(w[m.clamp(max=len(w) - 1)][m != IGNORE_INDEX].sum())
        return counts

    def forward_backward(self, batch: dict, step: int, counts: dict[str, float] | None = None,
                         scene=None, origins: np.ndarray | None = None
                         ) -> tuple[float, dict[str, float]]:
        """Loss of one batch with gradients accumulated into the parameters (streamed).

        With whole-image context, `scene` (the `SceneTokens` of the image the batch's crops
        come from) is read by every token, at its place in the image: `origins` (B, 2) is
        each crop's first region (row, col). `counts` normalize the loss terms (default: the
        batch's own), so several calls can make up one step's loss."""
        model, size = self.model, self.model_config.region.region_size
        gen = torch.Generator().manual_seed(int(self.cfg.run.seed) * 1_000_003 + step)
        image = batch["image"].to(self.device)  # (B, C, H, W)
        regions, _, grid = split_regions(image, size)  # (B, R, C, S, S)
        b = regions.shape[0]
        targets = {k: v.to(self.device) for k, v in self._targets_by_region(batch, size).items()}
        counts = counts or self.loss_counts(batch)
        stride = self.model.region_encoder.feature_strides[-1]
        token_targets = None
        if self.token_head is not None:
            token_targets = token_class_targets(
                batch["mask"].to(self.device), stride, self.model_config.num_classes
            )  # (B, K, H / stride, W / stride)
        band = self.cfg.run.stream_rows or grid.rows
        rc_all = grid.order("raster")  # (R, 2)
        state = None
        total, parts = 0.0, {}
        for r0 in range(0, grid.rows, band):
            idx = np.arange(r0 * grid.cols, min(grid.rows, r0 + band) * grid.cols)
            rc = rc_all[idx]
            tidx = torch.from_numpy(idx).to(self.device)
            feats = self._encode(regions[:, tidx].flatten(0, 1), gen)
            last = feats[-1]
            tokens, pos = model.region_tokens(last.reshape(b, len(idx), *last.shape[1:]), rc)
            if scene is not None:
                h, w = last.shape[-2:]
                at = torch.as_tensor(np.asarray(origins) * (h, w), device=pos.device)
                tokens = model.read_scene(tokens, pos + at[:, None], (h, w), scene)
            tokens, state = model.contextualize(tokens, state)
            maps = model.decode(tokens, feats, rc)  # {name: (B, r, K, S, S)}
            maps = {k: v.flatten(0, 1) for k, v in maps.items()}  # (B*r, K, S, S)
            piece = {k: v[:, tidx].flatten(0, 1) for k, v in targets.items()}
            terms = loss_terms(maps, piece, self.cfg.loss)
            if token_targets is not None:
                t_sum = token_loss_sum(self.token_head(tokens), token_targets, pos)
                terms["token"] = (self.cfg.loss.token_weight * t_sum, t_sum.new_tensor(0.0))
            loss = combine(terms, counts)
            loss.backward(retain_graph=scene is not None)  # the scene is read by every band
            total += float(loss.detach())
            for name, (s, _) in terms.items():
                parts[name] = parts.get(name, 0.0) + float(s.detach()) / max(counts[name], 1.0)
        return total, parts

    def train_step(self) -> tuple[float, dict[str, float]]:
        """One optimizer step on the batch of the current step; returns (loss, terms)."""
        self.model.train()
        self._keep_frozen_eval()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scenes is not None:
            loss, terms = self.scenes.forward_backward(self, self.step)
        else:
            loss, terms = self.forward_backward(self.batch_for_step(self.step), self.step)
        if self.cfg.optim.grad_clip:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return loss, terms

    # ------------------------------------------------------------------ eval / checkpoints

    def validate(self) -> dict[str, float]:
        if self.val_data is None:
            return {}
        e = self.cfg.eval
        samples = [self.val_data[i] for i in range(len(self.val_data))]
        return evaluate(
            self.model, samples, self.model_config.num_classes, self.class_names,
            e.context_classes, e.radius, e.threshold, e.min_distance,
        )

    def _metadata(self) -> dict[str, str]:
        import json

        return {
            "train.step": str(self.step),
            "train.normalize": json.dumps(self.normalization.to_dict()),
            "train.config": json.dumps(self.cfg.to_dict()),
        }

    def save(self) -> Path:
        """Model checkpoint + training state of the current step; returns the model path."""
        from napari_xt.model.checkpoint import save_checkpoint

        model_path, state_path = run_state.checkpoint_paths(self.out_dir, self.step)
        save_checkpoint(self.model, model_path, self._metadata(), overwrite=True)
        extra = {}
        if self.token_head is not None:
            extra["token_head"] = self.token_head.state_dict()
        run_state.save_training_state(
            state_path, self.optimizer, self.scheduler, self.step, extra
        )
        run_state.write_latest(self.out_dir, self.step, model_path, state_path)
        run_state.prune_checkpoints(self.out_dir, self.cfg.run.keep_checkpoints)
        return model_path

    def resume(self, model_path: str | os.PathLike | None = None,
               state_path: str | os.PathLike | None = None) -> int:
        """Load the latest checkpoint of `out_dir` (or the given files); returns the step."""
        from napari_xt.model.checkpoint import load_checkpoint

        if model_path is None or state_path is None:
            latest = run_state.read_latest(self.out_dir)
            if latest is None:
                raise FileNotFoundError(f"no checkpoint to resume in {self.out_dir}")
            _, model_path, state_path = latest
        loaded = load_checkpoint(model_path, device="cpu")
        if loaded.cfg != self.model_config:
            raise ValueError(f"{model_path} holds a different model than the config describes")
        self.model.load_state_dict(loaded.state_dict())
        payload = run_state.load_training_state(state_path)
        if self.token_head is not None:
            self.token_head.load_state_dict(payload["extra"]["token_head"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        run_state.set_rng_state(payload["rng"])
        self.step = int(payload["step"])
        return self.step

    def fit(self, steps: int | None = None) -> dict[str, float]:
        """Train until `steps` (default optim.steps); writes OUT/model.safetensors at the end
        of the schedule and returns the last validation metrics."""
        from napari_xt.model.checkpoint import save_checkpoint

        total = self.cfg.optim.steps
        stop = min(total, steps if steps is not None else total)
        run = self.cfg.run
        start = time.monotonic()
        self.callback(TrainEvent("start", self.step, total))
        metrics: dict[str, float] = {}
        while self.step < stop:
            loss, terms = self.train_step()
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {self.step}")
            elapsed = time.monotonic() - start
            if self.step % run.log_every == 0 or self.step == stop:
                lr = self.scheduler.get_last_lr()[0]
                self.callback(TrainEvent("step", self.step, total, loss, terms, lr,
                                         elapsed=elapsed))
            if run.eval_every and (self.step % run.eval_every == 0 or self.step == total):
                metrics = self.validate()
                self.callback(TrainEvent("eval", self.step, total, metrics=metrics,
                                         elapsed=time.monotonic() - start))
            if run.checkpoint_every and (self.step % run.checkpoint_every == 0
                                         or self.step == stop):
                path = self.save()
                self.callback(TrainEvent("checkpoint", self.step, total, path=str(path),
                                         elapsed=time.monotonic() - start))
        if self.step >= total:
            final = self.out_dir / "model.safetensors"
            meta = {**self._metadata(), "train.metrics": _json(metrics)}
            save_checkpoint(self.model, final, meta, overwrite=True)
            self.callback(TrainEvent("done", self.step, total, metrics=metrics, path=str(final),
                                     elapsed=time.monotonic() - start))
        return metrics


def _fine_tuned(cfg, start: Path):
    """The model of `cfg` with the weights of checkpoint `start`. A model that adds
    whole-image context to a crop model's checkpoint takes every weight of the checkpoint;
    its new `global_context` part starts fresh (its reader silent: the crop model's
    outputs at first)."""
    from napari_xt.model.checkpoint import load_weights
    from napari_xt.model.xt import XT

    model = XT(cfg)
    if cfg.global_context is None:
        return load_weights(model, start)
    import json

    from napari_xt.model.checkpoint import CONFIG_KEY, read_metadata
    from napari_xt.model.xt import XTConfig

    saved = XTConfig.from_dict(json.loads(read_metadata(start)[CONFIG_KEY]))
    if saved.global_context is not None:
        return load_weights(model, start)
    base = load_weights(XT(replace(cfg, global_context=None)), start)
    result = model.load_state_dict(base.state_dict(), strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert all(k.startswith("global_context.") for k in result.missing_keys), result
    return model


def _json(values: dict[str, float]) -> str:
    import json

    return json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v)
                       for k, v in values.items()})
