"""Matcher against golden matcher.npz (README section 9; parity_spec 4.1)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.ops import boxes as box_ops
from maskrcnn_jax.ops import matcher
from tests import golden

CASES = ("main", "far_gt", "empty")
G_PAD = 6  # every case is padded to 6 GT rows with gt_valid, so one compilation serves all

# RPN settings of the golden run: d2 Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality=True);
# mmdet MaxIoUAssigner(pos 0.7, neg 0.3, min_pos_iou 0.3, match_low_quality=True).
D2 = dict(form="detectron2", high=0.7, low=0.3, allow_low_quality=True)
MM = dict(form="mmdet", high=0.7, low=0.3, allow_low_quality=True, min_pos_iou=0.3)


def _gt(g, case):
  if case == "main":
    return np.asarray(g["gt_boxes"], np.float32), g["gt_labels"]
  if case == "far_gt":
    return np.asarray(g["far_gt_boxes"], np.float32), g["far_gt_labels"]
  return np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)


def _padded_iou(g, case):
  """Our IoU of the case's GTs with the anchors, padded to G_PAD rows with garbage."""
  gt, _ = _gt(g, case)
  anchors = np.asarray(g["anchors"], np.float32)
  pad = np.tile(np.array([[0, 0, 50, 50]], np.float32), (G_PAD - len(gt), 1))
  iou = _IOU(np.concatenate([gt, pad]), anchors)
  return iou, np.arange(G_PAD) < len(gt)


_IOU = jax.jit(box_ops.pairwise_iou)
_MATCH = jax.jit(matcher.match, static_argnames=(
    "form", "high", "low", "allow_low_quality", "min_pos_iou", "gt_max_assign_all"))


@pytest.mark.parametrize("case", CASES)
def test_iou_matches_golden_bitwise(case):
  g = golden.load("matcher")
  iou, valid = _padded_iou(g, case)
  n_gt = int(valid.sum())
  got = np.asarray(iou)[:n_gt]
  for key in (f"{case}_d2_iou", f"{case}_mm_iou"):
    assert got.dtype == g[key].dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), g[key].view(np.uint32))


@pytest.mark.parametrize("case", CASES)
def test_d2_matcher(case):
  g = golden.load("matcher")
  iou, valid = _padded_iou(g, case)
  matches, labels = (np.asarray(x) for x in _MATCH(iou, valid, **D2))
  np.testing.assert_array_equal(matches, g[f"{case}_d2_matches"])
  np.testing.assert_array_equal(labels, g[f"{case}_d2_match_labels"])
  if case != "empty":  # torchvision raises on no GT
    # torchvision: GT index, -1 below low, -2 between (same decisions as d2).
    tv = np.where(labels == 1, matches, np.where(labels == 0, -1, -2))
    np.testing.assert_array_equal(tv, g[f"{case}_tv_matches"])


def test_d2_matcher_on_golden_iou():
  """The matcher alone, fed the framework's own IoU matrix (no padding)."""
  g = golden.load("matcher")
  for case in ("main", "far_gt"):
    matches, labels = matcher.match(jnp.asarray(g[f"{case}_d2_iou"]), **D2)
    np.testing.assert_array_equal(matches, g[f"{case}_d2_matches"])
    np.testing.assert_array_equal(labels, g[f"{case}_d2_match_labels"])
  matches, labels = matcher.match(jnp.asarray(g["empty_d2_iou"]), **D2)
  np.testing.assert_array_equal(matches, g["empty_d2_matches"])
  np.testing.assert_array_equal(labels, g["empty_d2_match_labels"])


@pytest.mark.parametrize("case", CASES)
def test_mm_assigner(case):
  g = golden.load("matcher")
  iou, valid = _padded_iou(g, case)
  matches, labels = (np.asarray(x) for x in _MATCH(iou, valid, **MM))
  gt_inds = np.where(labels == 1, matches + 1, labels)
  np.testing.assert_array_equal(gt_inds, g[f"{case}_mm_gt_inds"])
  _, gt_labels = _gt(g, case)
  cls = np.full(labels.shape, -1, np.int64)
  pos = labels == 1
  cls[pos] = gt_labels[matches[pos]]
  np.testing.assert_array_equal(cls, g[f"{case}_mm_labels"])
  # max_overlaps = max over valid GTs (0 without GT).
  iou = np.asarray(iou)
  max_ov = iou[valid].max(0) if valid.any() else np.zeros(iou.shape[1], np.float32)
  np.testing.assert_array_equal(max_ov, g[f"{case}_mm_max_overlaps"])


def test_documented_framework_differences():
  """README 9 'Surprises', checked on our outputs by anchor kind."""
  g = golden.load("matcher")
  kind = list(g["anchor_kind"])
  iou, valid = _padded_iou(g, "main")
  d2_m, d2_l = (np.asarray(x) for x in _MATCH(iou, valid, **D2))
  mm_m, mm_l = (np.asarray(x) for x in _MATCH(iou, valid, **MM))
  a = kind.index("equal_g1_g2")
  assert (d2_m[a], mm_m[a]) == (1, 2)  # d2 keeps the first tied GT, mmdet re-points to the last
  a = kind.index("iou_0.25_g3")
  assert (d2_l[a], mm_l[a]) == (1, 0)  # mmdet's min_pos_iou 0.3
  iou, valid = _padded_iou(g, "far_gt")
  assert (np.asarray(_MATCH(iou, valid, **D2)[1]) == 1).all()
  assert (np.asarray(_MATCH(iou, valid, **MM)[1]) == 1).sum() == 4


def test_threshold_compare_in_float32():
  # IoU float32(0.7) >= 0.7 is True in float32 (fg), float32(0.3) is not < 0.3 (ignore).
  iou = jnp.array([[np.float32(0.7), np.float32(0.3), 0.29999998, 0.9]], jnp.float32)
  for kw in (dict(D2, allow_low_quality=False), dict(MM, allow_low_quality=False)):
    _, labels = matcher.match(iou, **kw)
    np.testing.assert_array_equal(labels, [1, -1, 0, 1])


def test_mm_first_argmax_only_and_low_eq_high():
  iou = jnp.array([[0.6, 0.6, 0.1], [0.2, 0.6, 0.1]], jnp.float32)
  # gt_max_assign_all=False: GT0 assigns anchor 0 only, GT1 anchor 1 (overwriting GT0's claim).
  m, l = matcher.match(iou, form="mmdet", high=0.7, low=0.3, allow_low_quality=True,
                       min_pos_iou=0.3, gt_max_assign_all=False)
  np.testing.assert_array_equal(l, [1, 1, 0])
  np.testing.assert_array_equal(m[:2], [0, 1])
  # R-CNN stage: low == high, no ignore band, no low-quality (d2 ROI_HEADS IOU 0.5).
  m, l = matcher.match(iou, form="detectron2", high=0.5, low=0.5, allow_low_quality=False)
  np.testing.assert_array_equal(l, [1, 1, 0])
  np.testing.assert_array_equal(m, [0, 0, 0])
