"""FPN level assignment and multi-level RoIAlign (parity_spec 3.11).

Level rules (all use area = (x2 - x1) * (y2 - y1), no +1, computed in float32 as the references do:
detectron2 `Boxes` forces float32, and the model pipeline runs mmdet / torchvision in float32):

* 'mmdet' (`mmdet/models/roi_heads/roi_extractors/single_level_roi_extractor.py:map_roi_levels`,
  finest_scale 56): floor(log2(sqrt(area) / 56 + 1e-6)), clamped to [0, L - 1].
* 'detectron2' (`detectron2/modeling/poolers.py:assign_boxes_to_levels`, canonical 224 / level 4):
  floor(4 + log2(sqrt(area) / 224 + 1e-8)), clamped to [min_level, max_level], minus min_level.
* 'torchvision' (`torchvision/ops/poolers.py:LevelMapper`, eps 1e-6):
  floor((4 + log2(sqrt(area) / 224)) + 1e-6), clamped, minus min_level.

They are the same formula except where the epsilon sits, so they disagree only within ~1e-6
relative of the boundaries sqrt(area) = 112, 224, 448 (golden README section 2).

`multilevel_roi_align` pools each RoI once, from its own level, with
`pallas_kernels.roi_align.roi_align_pyramid` (one gather table over all levels): the cost of a
single-level RoIAlign over all RoIs, instead of pooling every RoI at every level and selecting.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

from pallas_kernels import roi_align as roi_align_lib

LEVEL_RULES = ("mmdet", "detectron2", "torchvision")


def _true_div(a, b):
  """IEEE a / b: XLA rewrites a division by a broadcast constant into a multiplication by its
  reciprocal (inexact: 49 / 7 -> 7.0000005), which would move boxes across level boundaries."""
  a, b = jnp.broadcast_arrays(a, b)
  return a / jax.lax.optimization_barrier(b)


def _log2(v):
  """float32 log2, close to correctly rounded (like torch.log2 on CPU).

  `jnp.log2(x)` is log(x) / log(2), which XLA turns into log(x) * (1 / log 2); on 2M random
  float32 inputs it differs from the correctly rounded value in 28% of cases. Here
  v = m * 2**e with m in [sqrt(1/2), sqrt(2)) and log2(v) = e + log(m) / log(2): the integer part
  is exact, so powers of two give exact integers, and 98% of the results are correctly rounded
  (the rest within 2 ulp). The level boundaries depend on the last ulp only within ~1e-7 relative.
  """
  v = jnp.asarray(v, jnp.float32)
  m, e = jnp.frexp(v)  # m in [0.5, 1)
  low = m < jnp.float32(math.sqrt(0.5))
  m = jnp.where(low, m * 2, m)
  e = jnp.where(low, e - 1, e)
  small = _true_div(jnp.log(m), jnp.float32(math.log(2.0)))
  out = e.astype(jnp.float32) + small
  # frexp of 0 / inf / nan gives e = 0; keep log2's own values there.
  special = (v == 0) | jnp.isinf(v) | jnp.isnan(v) | (v < 0)
  return jnp.where(special, jnp.log(v), out)


def assign_levels(boxes, *, rule: str, min_level: int = 2, max_level: int = 5,
                  canonical_box_size: float = 224.0, canonical_level: int = 4,
                  finest_scale: float = 56.0):
  """FPN level of each RoI, as the reference framework computes it in float32.

  Args:
    boxes: [K, 4] float32, (x1, y1, x2, y2) in input-image pixels.
    rule: 'mmdet' | 'detectron2' | 'torchvision' (module docstring).
    min_level, max_level: pyramid levels pooled from (P2..P5 -> 2, 5).
    canonical_box_size, canonical_level: detectron2 / torchvision canonical box (224 at P4).
    finest_scale: mmdet finest_scale (56; its level 0 is min_level).

  Returns:
    [K] int32 level index in [0, max_level - min_level] (0 = P{min_level}). Boxes with a NaN size
    (e.g. negative area) get 0; torch would cast NaN to an arbitrary integer.
  """
  if rule not in LEVEL_RULES:
    raise ValueError(f"unknown level rule {rule!r}; expected one of {LEVEL_RULES}")
  boxes = jnp.asarray(boxes, jnp.float32)
  f32 = jnp.float32
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  s = jnp.sqrt(area)
  if rule == "mmdet":
    # torch.floor(torch.log2(scale / self.finest_scale + 1e-6)).clamp(0, num_levels - 1)
    lvl = jnp.floor(_log2(_true_div(s, f32(finest_scale)) + f32(1e-6)))
    lo, hi = 0, max_level - min_level
  elif rule == "detectron2":
    # torch.floor(canonical_level + torch.log2(box_sizes / canonical_box_size + 1e-8))
    lvl = jnp.floor(f32(canonical_level)
                    + _log2(_true_div(s, f32(canonical_box_size)) + f32(1e-8)))
    lvl = lvl - f32(min_level)
    lo, hi = 0, max_level - min_level
  else:
    # torch.floor(self.lvl0 + torch.log2(s / self.s0) + torch.tensor(self.eps, dtype=s.dtype))
    lvl = jnp.floor((f32(canonical_level) + _log2(_true_div(s, f32(canonical_box_size))))
                    + f32(1e-6))
    lvl = lvl - f32(min_level)
    lo, hi = 0, max_level - min_level
  lvl = jnp.where(jnp.isnan(lvl), f32(lo), jnp.clip(lvl, lo, hi))
  return lvl.astype(jnp.int32)


def multilevel_roi_align(features: Sequence, boxes, batch_idx, *, level_rule: str, output_size,
                         sampling_ratio: int, aligned: bool, strides=(4, 8, 16, 32),
                         max_grid: int | None = None, valid=None, roi_chunk: int | None = None,
                         impl: str = "auto", deterministic: bool = False,
                         canonical_box_size: float = 224.0):
  """Multi-level RoIAlign: mmdet SingleRoIExtractor / detectron2 ROIPooler / tv MultiScaleRoIAlign.

  Args:
    features: L arrays [N, H_l, W_l, C] float32 / bfloat16, NHWC, the pyramid levels (P2..P5),
      at padded size.
    boxes: [K, 4] float32, (x1, y1, x2, y2) in input-image pixels.
    batch_idx: [K] int32, image of each RoI.
    level_rule: 'mmdet' | 'detectron2' | 'torchvision' (see `assign_levels`).
    output_size: int or (oh, ow).
    sampling_ratio: int, 0 = adaptive (mmdet, d2), 2 = torchvision.
    aligned: bool, True for mmdet / d2 (ROIAlignV2), False for torchvision.
    strides: L ints, the level strides (spatial scale 1 / stride; torchvision infers these same
      powers of two from the feature and image sizes); consecutive powers of two, the first giving
      min_level = log2(strides[0]).
    max_grid: static bound of the adaptive grid (required for sampling_ratio 0; see
      `pallas_kernels.roi_align.reference`).
    valid: optional [K] bool; invalid RoIs give zeros (and no gradient).
    canonical_box_size: sqrt(area) of a box pooled from P4 (224, every reference's value:
      detectron2 / torchvision ROIPooler `canonical_box_size`; mmdet's `finest_scale` is a
      quarter of it, 56). Smaller values send small RoIs to coarser levels (small images).
    roi_chunk, impl, deterministic: passed to `pallas_kernels.roi_align.roi_align_pyramid`
      (impl 'auto': the reference unless the Pallas kernels measured faster on this GPU, see
      `pallas_kernels.roi_align.AUTO_PALLAS_DEVICE_KINDS`; 'reference' | 'pallas' | 'interpret';
      deterministic: the kernels' bitwise reproducible backward).

  Returns:
    [K, oh, ow, C] in the features' dtype, NHWC per RoI.
  """
  features = list(features)
  strides = tuple(int(s) for s in strides)
  if len(features) != len(strides):
    raise ValueError(f"{len(features)} feature levels but {len(strides)} strides")
  min_level = int(round(math.log2(strides[0])))
  if any(s != 2 ** (min_level + i) for i, s in enumerate(strides)):
    raise ValueError(f"strides must be consecutive powers of two, got {strides}")
  max_level = min_level + len(strides) - 1
  boxes = jnp.asarray(boxes, jnp.float32)
  batch_idx = jnp.asarray(batch_idx, jnp.int32)
  if valid is not None:
    # Padded rows may hold garbage; give them a harmless box so no NaN reaches the gradient.
    valid = jnp.asarray(valid, bool)
    boxes = jnp.where(valid[:, None], boxes, 0.0)
    batch_idx = jnp.where(valid, batch_idx, 0)
  levels = assign_levels(boxes, rule=level_rule, min_level=min_level, max_level=max_level,
                         canonical_box_size=canonical_box_size,
                         finest_scale=canonical_box_size / 4)
  out = roi_align_lib.roi_align_pyramid(
      features, boxes, batch_idx, levels, spatial_scales=[1.0 / s for s in strides],
      output_size=output_size, sampling_ratio=sampling_ratio, aligned=aligned,
      max_grid=max_grid, roi_chunk=roi_chunk, impl=impl, deterministic=deterministic)
  if valid is not None:
    out = jnp.where(valid[:, None, None, None], out, jnp.zeros((), out.dtype))
  return out
