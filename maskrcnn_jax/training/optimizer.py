"""Optimizer and learning-rate schedules of the reference recipes (parity_spec 4.3), in optax.

SGD as torch.optim.SGD runs it in the three frameworks:

  g <- clip(g)                       (mmdet `optimizer_config.grad_clip`; None for Mask R-CNN)
  g <- g + wd * p                    (torch `weight_decay`: L2 added to the gradient, *not* AdamW-style)
  buf <- momentum * buf + g          (dampening 0; buf starts at 0 so the first step has buf = g)
  p <- p - lr(step) * buf

Which parameters are decayed:
  * mmdetection v2: `DefaultOptimizerConstructor` without `paramwise_cfg` puts every parameter with
    `requires_grad` in one group with `weight_decay` 1e-4: conv/linear weights, biases and norm
    affine parameters alike. No Mask R-CNN / MS R-CNN recipe sets `paramwise_cfg`.
  * detectron2: `build_optimizer` -> `get_default_optimizer_params` with `WEIGHT_DECAY_NORM 0.0`
    (norm scale/bias are not decayed) and `WEIGHT_DECAY_BIAS` = `WEIGHT_DECAY` (biases are).
  * torchvision references: `--weight-decay 1e-4` on every parameter (`--norm-weight-decay` unset).
  `optim.weight_decay_norm` selects it: None = same as `weight_decay` (mmdet, torchvision), 0.0 for
  detectron2.

Frozen parameters get no update at all (no decay either), as torch does for `requires_grad=False`
parameters and FrozenBatchNorm buffers: the stem and res2..res{freeze_at} (detectron2 FREEZE_AT,
mmdet frozen_stages + 1, torchvision trainable_layers), every norm of a `frozen_bn` backbone, and
whatever `optim.frozen_patterns` names.

Known difference: mmdet pytorch-style recipes train the affine scale/bias of the backbone's BN
(`norm_cfg=dict(type='BN', requires_grad=True), norm_eval=True`) while keeping its statistics
frozen; our `frozen_bn` stops those gradients (as detectron2/torchvision FrozenBN do), so those
2 x 53 vectors stay at their converted values when fine-tuning an mmdet pytorch-style model.

Schedules: linear warmup then step decay (or cosine), evaluated at the 0-based iteration whose update
it drives, as mmcv's `LrUpdaterHook.before_train_iter` and detectron2's `LRMultiplier` do:

  lr(it) = peak * gamma ** #{b in boundaries : it >= b}
  lr(it) *= r + (1 - r) * it / W            for it < W (mmcv 'linear': 1 - (1 - it/W)(1 - r);
                                             detectron2 WarmupParamScheduler 'linear'; torchvision
                                             LinearLR(start_factor=r): all the same line)

`peak = optim.base_lr * global_batch / optim.base_batch` (the linear scaling rule; base 0.02 at
batch 16). Epoch schedules (mmdet, torchvision) put the boundaries at `epoch * steps_per_epoch`
(mmcv StepLrUpdaterHook by_epoch: the 0-based runner epoch >= step); iteration schedules
(detectron2) are scaled to the global batch like `DefaultTrainer.auto_scale_workers`.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from flax import traverse_util

from maskrcnn_jax import errors


# ------------------------------------------------------------------------------------------------
# Schedules
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Schedule:
  """A resolved learning-rate schedule in iterations (one iteration = one global batch).

  `__call__(step)` works on Python ints and traced int arrays; it returns float32.
  """
  peak_lr: float
  total_steps: int
  boundaries: Tuple[int, ...] = ()
  gamma: float = 0.1
  warmup_steps: int = 0
  warmup_ratio: float = 0.001
  decay: str = "step"  # 'step' | 'cosine' | 'constant'
  final_ratio: float = 0.0  # cosine: lr at the last step / peak

  def __call__(self, step) -> jax.Array:
    step = jnp.asarray(step)
    t = step.astype(jnp.float32)
    peak = jnp.float32(self.peak_lr)
    if self.decay == "step":
      n = sum((step >= b).astype(jnp.int32) for b in self.boundaries) if self.boundaries else 0
      lr = peak * jnp.float32(self.gamma) ** jnp.asarray(n, jnp.float32)
    elif self.decay == "cosine":
      frac = jnp.clip(t / max(self.total_steps, 1), 0.0, 1.0)
      lr = peak * (self.final_ratio + (1 - self.final_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * frac)))
    elif self.decay == "constant":
      lr = peak * jnp.ones_like(t)
    else:
      raise errors.ConfigError(
          f"unknown schedule.decay {self.decay!r}; expected 'step', 'cosine' or "
          "'constant'")
    if self.warmup_steps > 0:
      r = jnp.float32(self.warmup_ratio)
      factor = r + (1 - r) * (t / jnp.float32(self.warmup_steps))
      lr = jnp.where(step < self.warmup_steps, lr * factor, lr)
    return lr.astype(jnp.float32)

  def describe(self) -> str:
    parts = [f"peak lr {self.peak_lr:g}", f"{self.total_steps} iterations"]
    if self.warmup_steps:
      parts.append(f"linear warmup {self.warmup_steps} it from x{self.warmup_ratio:g}")
    if self.decay == "step":
      parts.append(f"x{self.gamma:g} at {list(self.boundaries)}")
    else:
      parts.append(self.decay)
    return ", ".join(parts)


def _steps_per_epoch(num_images: int, global_batch: int, repeat: int = 1) -> int:
  """Iterations per (possibly repeated) epoch: ceil(repeat * N / B), as len(DataLoader).

  mmdet's GroupSampler pads each aspect-ratio group to a multiple of the batch, which can add one
  iteration per epoch on COCO; we do not model the groups.
  """
  if num_images <= 0:
    raise errors.ConfigError(f"the training set is empty (num_images={num_images})")
  return max(1, math.ceil(repeat * num_images / global_batch))


def scaled_lr(config: ml_collections.ConfigDict, global_batch: int) -> float:
  """optim.base_lr scaled linearly from optim.base_batch to `global_batch` (if optim.scale_lr)."""
  o = config.optim
  if not o.get("scale_lr", True):
    return float(o.base_lr)
  return float(o.base_lr) * global_batch / float(o.base_batch)


def make_schedule(config: ml_collections.ConfigDict, *, global_batch: int,
                  num_train_images: Optional[int] = None,
                  steps_per_epoch: Optional[int] = None) -> Schedule:
  """Resolves config.schedule / config.optim into iteration numbers for this global batch.

  Args:
    config: a recipe config (config.schedule and config.optim as written by config_lib).
    global_batch: images per iteration over all devices and hosts.
    num_train_images: size of the training set (unit='epoch': epoch = ceil(N / batch) steps).
    steps_per_epoch: or the loader's own iterations per pass over the data (takes precedence;
      maskrcnn_jax.data.loader.TrainLoader drops the last partial batch).
    For unit='epoch' one of the two is required; an epoch of the schedule is `schedule.repeat`
    passes (mmdet RepeatDataset).
  """
  s = config.schedule
  unit = s.unit
  peak = scaled_lr(config, global_batch)
  warmup = int(s.warmup_steps)
  if unit == "epoch":
    repeat = int(s.get("repeat", 1))
    if steps_per_epoch is not None:
      spe = max(1, int(steps_per_epoch) * repeat)
    elif num_train_images is not None:
      spe = _steps_per_epoch(num_train_images, global_batch, repeat)
    else:
      raise errors.ConfigError(
          "an epoch schedule needs the number of training images or steps per epoch")
    total = int(round(float(s.length) * spe))
    boundaries = tuple(int(round(float(e) * spe)) for e in s.steps)
    if s.get("warmup_within_first_epoch", False):
      # torchvision references/detection/train.py: warmup_iters = min(1000, len(data_loader) - 1).
      warmup = min(warmup, spe - 1)
  elif unit == "step":
    scale = 1.0
    if s.get("scale_steps_with_batch", False):
      # detectron2 DefaultTrainer.auto_scale_workers: iterations scale with 1 / (batch ratio).
      scale = float(config.optim.base_batch) / global_batch
    total = int(round(float(s.length) * scale))
    boundaries = tuple(int(round(float(b) * scale)) for b in s.steps)
    warmup = int(round(warmup * scale))
  else:
    raise errors.ConfigError(f"schedule.unit must be 'epoch' or 'step', got {unit!r}")
  return Schedule(peak_lr=peak, total_steps=max(total, 1), boundaries=boundaries,
                  gamma=float(s.gamma), warmup_steps=max(warmup, 0),
                  warmup_ratio=float(s.warmup_ratio), decay=s.get("decay", "step"),
                  final_ratio=float(s.get("final_ratio", 0.0)))


# ------------------------------------------------------------------------------------------------
# Parameter groups
# ------------------------------------------------------------------------------------------------

_NORM_MODULE = re.compile(r"(?:^|_)norm\d*$")  # stem_norm, norm1, shortcut_norm, conv0_norm, ...
_BACKBONE_STAGE = re.compile(r"^res(\d)_\d+$")


def is_norm_path(path: Tuple[str, ...]) -> bool:
  """True for the scale/bias of a norm module (BN, FrozenBN, GN): its parent module is a norm."""
  return len(path) >= 2 and bool(_NORM_MODULE.search(path[-2]))


def is_frozen_path(path: Tuple[str, ...], *, freeze_at: int, backbone_norm: str,
                   patterns: Sequence[str] = ()) -> bool:
  """Whether the parameter at `path` (inside the 'params' collection) is frozen.

  Frozen: backbone stem when freeze_at >= 1, backbone res{s}_* for s <= freeze_at, the norms of a
  'frozen_bn' backbone, and any path whose '/'-joined name matches one of `patterns` (re.search).
  """
  name = "/".join(path)
  if any(re.search(p, name) for p in patterns):
    return True
  if not path or path[0] != "backbone":
    return False
  module = path[1] if len(path) > 1 else ""
  if module.startswith("stem") and freeze_at >= 1:
    return True
  m = _BACKBONE_STAGE.match(module)
  if m and int(m.group(1)) <= freeze_at:
    return True
  return backbone_norm == "frozen_bn" and is_norm_path(path)


def param_labels(params: Any, config: ml_collections.ConfigDict) -> Any:
  """A pytree like `params` with 'frozen', 'norm' or 'default' at each leaf."""
  m, o = config.model, config.optim
  patterns = tuple(o.get("frozen_patterns", ()) or ())
  flat = traverse_util.flatten_dict(_to_dict(params))
  labels = {}
  for path, _ in flat.items():
    if is_frozen_path(path, freeze_at=int(m.get("freeze_at", 0)),
                      backbone_norm=m.get("norm", "frozen_bn"), patterns=patterns):
      labels[path] = "frozen"
    elif is_norm_path(path):
      labels[path] = "norm"
    else:
      labels[path] = "default"
  return traverse_util.unflatten_dict(labels)


def _to_dict(tree):
  from flax.core import frozen_dict
  return frozen_dict.unfreeze(tree) if isinstance(tree, frozen_dict.FrozenDict) else tree


def weight_decay_mask(params: Any, config: ml_collections.ConfigDict) -> Tuple[Any, Any]:
  """(decay_mask, norm_mask) as boolean pytrees: params decayed with optim.weight_decay, resp.
  with optim.weight_decay_norm. Frozen parameters are in neither."""
  labels = param_labels(params, config)
  wd_norm = config.optim.get("weight_decay_norm", None)
  same = wd_norm is None or float(wd_norm) == float(config.optim.weight_decay)
  decay = jax.tree_util.tree_map(lambda l: l == "default" or (same and l == "norm"), labels)
  norm = jax.tree_util.tree_map(lambda l: (not same) and l == "norm", labels)
  return decay, norm


def build_optimizer(config: ml_collections.ConfigDict, params: Any,
                    schedule: Callable) -> optax.GradientTransformation:
  """The recipe's optimizer for `params`: frozen leaves get zero updates and no state.

  optim.name:
    'sgd'   torch SGD with L2 weight decay in the gradient (module docstring).
    'adamw' decoupled weight decay (torch AdamW); for from-scratch quick runs, not a zoo recipe.
  Parameter groups ('default', 'norm', 'frozen', see `param_labels`) each get their own chain;
  momentum and Adam moments are element-wise, so splitting them changes nothing numerically.
  """
  o = config.optim
  labels = param_labels(params, config)
  wd = float(o.weight_decay)
  wd_norm = o.get("weight_decay_norm", None)
  wd_norm = wd if wd_norm is None else float(wd_norm)
  name = o.get("name", "sgd")

  def group(decay: float) -> optax.GradientTransformation:
    if name == "sgd":
      parts = [optax.add_decayed_weights(decay)] if decay else []
      parts.append(optax.trace(decay=float(o.momentum), nesterov=bool(o.get("nesterov", False))))
    elif name == "adamw":
      parts = [optax.scale_by_adam(b1=float(o.get("b1", 0.9)), b2=float(o.get("b2", 0.999)),
                                   eps=float(o.get("eps", 1e-8)))]
      if decay:
        parts.append(optax.add_decayed_weights(decay))
    else:
      raise errors.ConfigError(f"unknown optim.name {name!r}; expected 'sgd' or 'adamw'")
    parts.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*parts)

  chain = []
  frozen = jax.tree_util.tree_map(lambda l: "frozen" if l == "frozen" else "train", labels)
  # Zero the gradients of frozen leaves first, so that they do not count in the clipping norm.
  chain.append(optax.multi_transform({"train": optax.identity(), "frozen": optax.set_to_zero()},
                                     frozen))
  clip = float(o.get("grad_clip_norm", 0.0) or 0.0)
  if clip > 0:
    # mmcv OptimizerHook: clip_grad_norm_ over the trainable parameters, before the step.
    chain.append(optax.clip_by_global_norm(clip))
  chain.append(optax.multi_transform(
      {"default": group(wd), "norm": group(wd_norm), "frozen": optax.set_to_zero()}, labels))
  return optax.chain(*chain)


def count_params(params: Any, config: ml_collections.ConfigDict) -> dict:
  """Numbers of parameters per label ('frozen', 'norm', 'default'), for the log."""
  labels = traverse_util.flatten_dict(_to_dict(param_labels(params, config)))
  flat = traverse_util.flatten_dict(_to_dict(params))
  out = {"frozen": 0, "norm": 0, "default": 0}
  for path, label in labels.items():
    out[label] += int(flat[path].size)
  return out
