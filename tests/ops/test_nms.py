"""NMS against golden nms.npz (README section 3; parity_spec 3.10)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.ops import nms as nms_ops
from tests import golden

THRESHOLDS = {"05": 0.5, "07": 0.7}
MAX_OUT = 300  # all 300 boxes fit; the kept list is never truncated


def _kept(result):
  idx, ok = (np.asarray(x) for x in result)
  assert ok.dtype == bool and idx.dtype == np.int32
  # valid entries are a prefix, padding is index 0
  n = int(ok.sum())
  assert ok[:n].all() and not ok[n:].any() and (idx[n:] == 0).all()
  return idx[:n]


def _inputs(g, dtype=np.float32):
  return (np.asarray(g["boxes"], dtype), np.asarray(g["scores"], dtype), np.asarray(g["idxs"]))


# The threshold is traced (one compilation serves both thresholds); compilation dominates the
# run time of these tests.
_NMS = jax.jit(nms_ops.nms, static_argnames=("max_output",))
_BATCHED = jax.jit(nms_ops.batched_nms, static_argnames=("max_output", "coordinate_trick"))


@pytest.fixture(scope="module")
def jitted():
  return _NMS, _BATCHED


@pytest.mark.parametrize("tk", sorted(THRESHOLDS))
def test_tv_nms_f32(tk, jitted):
  g = golden.load("nms")
  boxes, scores, _ = _inputs(g)
  got = _kept(jitted[0](boxes, scores, iou_threshold=THRESHOLDS[tk], max_output=MAX_OUT))
  np.testing.assert_array_equal(got, g[f"tv_nms_iou{tk}_f32"])


@pytest.mark.parametrize("tk", sorted(THRESHOLDS))
def test_tv_d2_batched_nms_coordinate_trick_f32(tk, jitted):
  g = golden.load("nms")
  boxes, scores, idxs = _inputs(g)
  got = _kept(jitted[1](boxes, scores, idxs, iou_threshold=THRESHOLDS[tk], max_output=MAX_OUT,
                        coordinate_trick=True))
  np.testing.assert_array_equal(got, g[f"tv_batched_nms_iou{tk}_f32"])
  np.testing.assert_array_equal(got, g[f"d2_batched_nms_iou{tk}"])


@pytest.mark.parametrize("tk", sorted(THRESHOLDS))
def test_tv_batched_nms_vanilla_f32(tk, jitted):
  """Exact per-class NMS: same kept set; the order may differ only among equal scores, because
  torchvision's vanilla path re-sorts its result with an unstable sort."""
  g = golden.load("nms")
  boxes, scores, idxs = _inputs(g)
  got = _kept(jitted[1](boxes, scores, idxs, iou_threshold=THRESHOLDS[tk], max_output=MAX_OUT,
                        coordinate_trick=False))
  want = g[f"tv_batched_nms_vanilla_iou{tk}_f32"]
  np.testing.assert_array_equal(np.sort(got), np.sort(want))
  np.testing.assert_array_equal(scores[got], scores[want])
  # The vanilla and trick results differ by 4 boxes at both thresholds (README 3, "Surprises").
  trick = g[f"tv_batched_nms_iou{tk}_f32"]
  assert len(set(got) ^ set(trick)) == 4


@pytest.mark.parametrize("tk", sorted(THRESHOLDS))
def test_mm_nms_with_torch_unstable_order(tk, jitted):
  g = golden.load("nms")
  boxes, scores, idxs = _inputs(g)
  order = g["torch_sort_desc_unstable_order_f32"]
  got = _kept(jitted[0](boxes, scores, iou_threshold=THRESHOLDS[tk], max_output=MAX_OUT,
                        order=order))
  np.testing.assert_array_equal(got, g[f"mm_nms_iou{tk}"])
  got = _kept(jitted[1](boxes, scores, idxs, iou_threshold=THRESHOLDS[tk], max_output=MAX_OUT,
                        order=order, coordinate_trick=True))
  np.testing.assert_array_equal(got, g[f"mm_batched_nms_iou{tk}"])
  # mmcv's dets are the original (un-offset) boxes and scores of the kept indices.
  dets = g[f"mm_batched_nms_iou{tk}_dets"]
  np.testing.assert_array_equal(boxes[got], dets[:, :4])
  np.testing.assert_array_equal(scores[got], dets[:, 4])


@pytest.mark.parametrize("tk", sorted(THRESHOLDS))
def test_trick_decided_by_the_number_of_boxes(tk):
  """torchvision's rule: the trick up to the limit (in boxes), per-class NMS above it, decided
  at run time from the valid count (the golden call holds 300 boxes)."""
  g = golden.load("nms")
  boxes, scores, idxs = _inputs(g)
  trick, vanilla = g[f"tv_batched_nms_iou{tk}_f32"], g[f"tv_batched_nms_vanilla_iou{tk}_f32"]
  assert nms_ops.trick_applies(300, -1, 300) is False
  assert nms_ops.trick_applies(300, 300, 300) is True  # the static size decides
  run = jax.jit(lambda limit, b, s, i, v: nms_ops.batched_nms(
      b, s, i, iou_threshold=THRESHOLDS[tk], max_output=MAX_OUT, valid=v,
      coordinate_trick=nms_ops.trick_applies(jnp.sum(v), limit, v.shape[0])),
      static_argnums=0)
  # 300 real boxes + 20 invalid rows (static size 320, so the decision is made at run time).
  pad = np.zeros((20, 4), np.float32)
  b2, s2 = np.concatenate([boxes, pad]), np.concatenate([scores, np.zeros(20, np.float32)])
  i2, v2 = np.concatenate([idxs, np.zeros(20, idxs.dtype)]), np.arange(320) < 300
  np.testing.assert_array_equal(_kept(run(300, b2, s2, i2, v2)), trick)
  got = _kept(run(299, b2, s2, i2, v2))
  np.testing.assert_array_equal(np.sort(got), np.sort(vanilla))
  # The two differ (4 boxes), so the limit really switched the algorithm.
  assert set(trick) != set(vanilla)


def test_float64_paths():
  """torchvision also runs in float64: nms, batched (trick) and vanilla."""
  g = golden.load("nms")
  with jax.enable_x64(True):
    boxes, scores, idxs = (jnp.asarray(x) for x in _inputs(g, np.float64))
    assert boxes.dtype == jnp.float64
    for tk, thr in THRESHOLDS.items():
      thr = jnp.float64(thr)
      got = _kept(_NMS(boxes, scores, iou_threshold=thr, max_output=MAX_OUT))
      np.testing.assert_array_equal(got, g[f"tv_nms_iou{tk}_f64"])
      got = _kept(_BATCHED(boxes, scores, idxs, iou_threshold=thr, max_output=MAX_OUT))
      np.testing.assert_array_equal(got, g[f"tv_batched_nms_iou{tk}_f64"])
      van = _kept(_BATCHED(boxes, scores, idxs, iou_threshold=thr, max_output=MAX_OUT,
                           coordinate_trick=False))
      want = g[f"tv_batched_nms_vanilla_iou{tk}_f64"]
      np.testing.assert_array_equal(np.sort(van), np.sort(want))
      np.testing.assert_array_equal(np.asarray(scores)[van], np.asarray(scores)[want])


def test_stable_tie_order_differs_from_torch_order():
  """Sanity check of the inputs: the golden mmcv order really reorders ties, so the mm tests
  above exercise the `order` argument."""
  g = golden.load("nms")
  _, scores, _ = _inputs(g)
  stable = np.asarray(nms_ops.processing_order(jnp.asarray(scores)))
  np.testing.assert_array_equal(stable, np.argsort(-scores, kind="stable"))
  assert (stable != g["torch_sort_desc_unstable_order_f32"]).any()


def test_valid_mask_and_truncation(jitted):
  g = golden.load("nms")
  boxes, scores, _ = _inputs(g)
  want = g["tv_nms_iou05_f32"]
  # Padding with invalid rows (any content, even NaN) changes nothing.
  pad = np.full((37, 4), np.nan, np.float32)
  b2 = np.concatenate([boxes, pad])
  s2 = np.concatenate([scores, np.full(37, 10.0, np.float32)])
  valid = np.arange(len(b2)) < len(boxes)
  got = _kept(jitted[0](b2, s2, iou_threshold=0.5, max_output=MAX_OUT, valid=valid))
  np.testing.assert_array_equal(got, want)
  # max_output keeps the first max_output of the full result.
  got = _kept(jitted[0](boxes, scores, iou_threshold=0.5, max_output=17))
  np.testing.assert_array_equal(got, want[:17])


def _run4(boxes, scores, thr, idxs=None, *, trick=True, valid=None):
  """Runs on inputs padded to 4 boxes (one compilation for all hand cases)."""
  n = len(boxes)
  b = np.zeros((4, 4), np.float32)
  b[:n] = boxes
  s = np.zeros(4, np.float32)
  s[:n] = scores
  v = np.arange(4) < n
  if valid is not None:
    v[:n] &= valid
  if idxs is None:
    return _kept(_NMS(b, s, iou_threshold=thr, max_output=4, valid=v))
  i = np.zeros(4, np.int32)
  i[:n] = idxs
  return _kept(_BATCHED(b, s, i, iou_threshold=thr, max_output=4, valid=v, coordinate_trick=trick))


def test_hand_cases():
  f32 = np.float32
  # IoU exactly 0.5 is not suppressed (strict >); a hair more is.
  a = np.array([[0, 0, 10, 10], [0, 0, 10, 5], [0, 0, 10, 5.0001]], f32)  # IoU(0,1) = 50/100
  s = np.array([0.9, 0.8, 0.7], f32)
  np.testing.assert_array_equal(_run4(a[:2], s[:2], 0.5), [0, 1])
  np.testing.assert_array_equal(_run4(a[[0, 2]], s[:2], 0.5), [0])
  # Two identical zero-area boxes: IoU 0/0 = NaN never suppresses.
  z = np.array([[5, 5, 5, 9], [5, 5, 5, 9]], f32)
  np.testing.assert_array_equal(_run4(z, s[:2], 0.1), [0, 1])
  # Ties: lower index first.
  t = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10]], f32)
  np.testing.assert_array_equal(_run4(t, np.array([0.5, 0.5, 0.5], f32), 0.5), [0, 1])
  # Batched: the same box in two classes is kept twice (exact and trick); class-agnostic once.
  np.testing.assert_array_equal(_run4(t, s, 0.5, [0, 0, 1], trick=False), [0, 1, 2])
  np.testing.assert_array_equal(_run4(t, s, 0.5, [0, 0, 1], trick=True), [0, 1, 2])
  np.testing.assert_array_equal(_run4(t, s, 0.5), [0, 1])
  # An invalid box neither is kept nor suppresses.
  np.testing.assert_array_equal(_run4(t, s, 0.5, valid=np.array([False, True, True])), [1, 2])
  # Nothing valid / empty input.
  assert len(_run4(t, s, 0.5, valid=np.zeros(3, bool))) == 0
  got = nms_ops.nms(np.zeros((0, 4), f32), np.zeros((0,), f32), iou_threshold=0.5, max_output=4)
  assert got[0].shape == (4,) and not np.asarray(got[1]).any()


def test_iou_row_is_op_by_op_float32():
  """For random non-integer pairs, a threshold equal to the op-by-op float32 IoU keeps both boxes
  (strict >) and the next smaller float32 suppresses the second: the IoU inside the loop is
  rounded exactly like the kernels' `inter / (iarea + areas[j] - inter)` (no FMA contraction)."""
  rng = np.random.default_rng(0)
  f32 = np.float32
  n = 400
  xy = rng.uniform(0, 50, (n, 2, 2)).astype(f32)
  wh = rng.uniform(20, 60, (n, 2, 2)).astype(f32)
  b = np.concatenate([xy, xy + wh], -1)  # [n, 2, 4]
  area = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
  w = np.maximum(np.minimum(b[:, 0, 2], b[:, 1, 2]) - np.maximum(b[:, 0, 0], b[:, 1, 0]), f32(0))
  h = np.maximum(np.minimum(b[:, 0, 3], b[:, 1, 3]) - np.maximum(b[:, 0, 1], b[:, 1, 1]), f32(0))
  inter = w * h
  iou = inter / (area[:, 0] + area[:, 1] - inter)
  keep = (iou > 0)
  b, iou = b[keep], iou[keep]
  scores = np.array([0.9, 0.8], f32)
  run = jax.jit(jax.vmap(
      lambda bb, t: nms_ops.nms(bb, jnp.asarray(scores), iou_threshold=t, max_output=2)[1].sum()))
  np.testing.assert_array_equal(np.asarray(run(b, iou)), 2)
  np.testing.assert_array_equal(np.asarray(run(b, np.nextafter(iou, f32(-1)))), 1)
