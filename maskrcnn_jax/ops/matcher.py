"""Anchor / proposal to ground-truth matching with fixed shapes (parity_spec 4.1).

Two forms:

* 'detectron2' (`detectron2/modeling/matcher.py:Matcher`, thresholds [low, high], labels
  [0, -1, 1]); torchvision's `models/detection/_utils.py:Matcher` makes the same decisions
  ('torchvision' is accepted as an alias). The matched GT is always the argmax (first on ties);
  low-quality matching marks every anchor that reaches some GT's best IoU as foreground, with no
  minimum IoU.
* 'mmdet' (`mmdet/models/task_modules/assigners/max_iou_assigner.py:MaxIoUAssigner`, pos_iou_thr
  = high, neg_iou_thr = low): negatives are 0 <= max IoU < low, positives max IoU >= high. The
  low-quality loop runs over GTs in index order; a GT whose best IoU is >= min_pos_iou assigns
  itself to all anchors reaching that best IoU (`gt_max_assign_all=True`) or to its first argmax
  anchor only, so on ties the *last* such GT wins and the anchor is re-pointed to it.

All comparisons are done in the IoU's own dtype (float32), like torch comparing a float32 tensor
with a Python float: IoU = float32(0.7) counts as >= 0.7, and float32(0.3) is not < 0.3.
"""
from __future__ import annotations

import jax.numpy as jnp

FORMS = ("detectron2", "torchvision", "mmdet")


def match(iou, gt_valid=None, *, form: str, high: float, low: float, allow_low_quality: bool,
          min_pos_iou: float = 0.0, gt_max_assign_all: bool = True):
  """Matches N anchors to G (padded) ground truths.

  Args:
    iou: [G, N] float32, IoU of GT g with anchor n (`boxes.pairwise_iou(gt, anchors)`).
    gt_valid: optional [G] bool; padded GT rows are ignored. No valid GT is the empty case.
    form: 'detectron2' / 'torchvision' or 'mmdet'.
    high: foreground threshold (d2 thresholds[1], mmdet pos_iou_thr); IoU >= high is positive.
    low: background threshold (d2 thresholds[0], mmdet neg_iou_thr); IoU < low is negative,
      low <= IoU < high is ignored (pass low == high for the R-CNN stage: no ignore band).
    allow_low_quality: d2 `allow_low_quality_matches`, mmdet `match_low_quality`.
    min_pos_iou: mmdet only; a GT takes part in low-quality matching when its best IoU >= this.
    gt_max_assign_all: mmdet only; low-quality assigns all tied anchors (True, the default) or
      only the first argmax anchor.

  Returns:
    matches: [N] int32 index of the matched GT in [0, G). For positives the GT the anchor is
      assigned to (mmdet: after low-quality re-pointing); otherwise the argmax GT. 0 when no GT
      is valid.
    labels: [N] int32, 1 foreground, 0 background, -1 ignore. With no valid GT all anchors are
      background (d2 returns labels[0] = 0; mmdet gt_inds 0).
    To get mmdet's `gt_inds`: `where(labels == 1, matches + 1, labels)`.
  """
  if form not in FORMS:
    raise ValueError(f"unknown matcher form {form!r}; expected one of {FORMS}")
  g, n = iou.shape
  if g == 0:
    return jnp.zeros((n,), jnp.int32), jnp.zeros((n,), jnp.int32)
  if gt_valid is None:
    gt_valid = jnp.ones((g,), bool)
  gt_valid = gt_valid.astype(bool)
  dtype = iou.dtype
  high = jnp.asarray(high, dtype)
  low = jnp.asarray(low, dtype)
  masked = jnp.where(gt_valid[:, None], iou, -jnp.inf)
  # torch `max(dim=0)` returns the first index of the maximum, like argmax.
  matched_vals = jnp.max(masked, axis=0)
  matches = jnp.argmax(masked, axis=0).astype(jnp.int32)
  any_gt = jnp.any(gt_valid)

  if form == "mmdet":
    # assign_wrt_overlaps: -1 everywhere, 0 for 0 <= max < neg_iou_thr, pos for max >= pos_iou_thr.
    labels = jnp.full((n,), -1, jnp.int32)
    labels = jnp.where((matched_vals >= 0) & (matched_vals < low), 0, labels)
    labels = jnp.where(matched_vals >= high, 1, labels)
    if allow_low_quality:
      gt_max = jnp.max(masked, axis=1)  # [G]
      gt_ok = gt_valid & (gt_max >= jnp.asarray(min_pos_iou, dtype))
      if gt_max_assign_all:
        hit = gt_ok[:, None] & (masked == gt_max[:, None])  # [G, N]
      else:
        gt_argmax = jnp.argmax(masked, axis=1)
        hit = gt_ok[:, None] & (jnp.arange(n)[None, :] == gt_argmax[:, None])
      # The python loop over GTs overwrites: the last GT that hits an anchor wins.
      last = (g - 1 - jnp.argmax(hit[::-1], axis=0)).astype(jnp.int32)
      any_hit = jnp.any(hit, axis=0)
      matches = jnp.where(any_hit, last, matches)
      labels = jnp.where(any_hit, 1, labels)
  else:
    # Matcher: thresholds [-inf, low, high, inf] with labels [0, -1, 1].
    labels = jnp.where(matched_vals < low, 0, jnp.where(matched_vals < high, -1, 1))
    labels = labels.astype(jnp.int32)
    if allow_low_quality:
      # set_low_quality_matches_: every anchor with IoU == a GT's best IoU (ties included, also a
      # best IoU of 0) becomes foreground; the match index stays the argmax.
      gt_max = jnp.max(masked, axis=1)
      hit = gt_valid[:, None] & (masked == gt_max[:, None])
      labels = jnp.where(jnp.any(hit, axis=0), 1, labels)

  matches = jnp.where(any_gt, matches, 0)
  labels = jnp.where(any_gt, labels, 0)
  return matches, labels
