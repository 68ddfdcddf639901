"""Box area / IoU / clipping (parity_spec 3.10, 3.8), against golden matcher.npz and by hand."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from maskrcnn_jax.ops import boxes as box_ops
from tests import golden


def test_area_and_iou_by_hand():
  a = jnp.array([[0, 0, 10, 10], [5, 5, 15, 15], [20, 20, 20, 30]], jnp.float32)
  np.testing.assert_array_equal(box_ops.area(a), [100, 100, 0])
  iou = np.asarray(box_ops.pairwise_iou(a, a))
  assert iou.dtype == np.float32 and iou.shape == (3, 3)
  # overlap 5x5 = 25, union 175
  np.testing.assert_array_equal(iou[0, 1], np.float32(25) / np.float32(175))
  np.testing.assert_array_equal(iou[0, 0], 1)
  # zero-area box: 0 against everything, itself included (d2: where(inter > 0, ..., 0)), no NaN
  np.testing.assert_array_equal(iou[2], [0, 0, 0])
  np.testing.assert_array_equal(iou[:, 2], [0, 0, 0])
  # touching boxes do not overlap
  t = jnp.array([[10, 0, 20, 10]], jnp.float32)
  np.testing.assert_array_equal(box_ops.pairwise_iou(a[:1], t), [[0]])


def test_pairwise_iou_matches_golden():
  """d2 `pairwise_iou` and mmdet `BboxOverlaps2D`, float32, bit for bit (README 9)."""
  g = golden.load("matcher")
  anchors = np.asarray(g["anchors"], np.float32)
  f = jax.jit(box_ops.pairwise_iou)
  for gt_key, case in (("gt_boxes", "main"), ("far_gt_boxes", "far_gt")):
    got = np.asarray(f(np.asarray(g[gt_key], np.float32), anchors))
    for fw in ("d2", "mm"):
      want = g[f"{case}_{fw}_iou"]
      np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
  # mmdet in float64 agrees too (x64 path).
  with jax.enable_x64(True):
    got = np.asarray(box_ops.pairwise_iou(jnp.asarray(g["gt_boxes"]), jnp.asarray(g["anchors"])))
  assert got.dtype == np.float64
  np.testing.assert_array_equal(got, g["main_mm_iou_f64"])


def test_iou_arithmetic_is_op_by_op_under_jit():
  """Jitted IoU equals the op-by-op float32 formula on non-integer boxes: no FMA contraction of
  `area_a + area_b - w * h` (which would change ~1/4 of the values by an ulp)."""
  rng = np.random.default_rng(0)
  xy = rng.uniform(0, 100, (300, 2)).astype(np.float32)
  wh = rng.uniform(1, 60, (300, 2)).astype(np.float32)
  b = np.concatenate([xy, xy + wh], 1)
  a, c = b[:150], b[150:]
  f32 = np.float32
  area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])
  lt = np.maximum(a[:, None, :2], c[None, :, :2])
  rb = np.minimum(a[:, None, 2:], c[None, :, 2:])
  whi = np.maximum(rb - lt, f32(0))
  inter = whi[..., 0] * whi[..., 1]
  union = area(a)[:, None] + area(c)[None, :] - inter
  with np.errstate(invalid="ignore", divide="ignore"):
    want = np.where(inter > 0, inter / union, f32(0))
  assert (want > 0).sum() > 1000
  got = np.asarray(jax.jit(box_ops.pairwise_iou)(a, c))
  np.testing.assert_array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32))


def test_clip_boxes():
  b = jnp.array([[-5.5, -1, 700, 20], [10, 500, 20, 479.5], [np.nan, 3, 4, 5]], jnp.float32)
  got = np.asarray(box_ops.clip_boxes(b, (480, 640)))
  np.testing.assert_array_equal(got[:2], [[0, 0, 640, 20], [10, 480, 20, 479.5]])
  assert np.isnan(got[2, 0]) and (got[2, 1:] == [3, 4, 5]).all()
  # per-image sizes broadcast over a batch, traced under jit
  bb = jnp.stack([b[:2], b[:2]])
  hw = jnp.array([[[480, 640]], [[10, 15]]], jnp.float32)
  got = np.asarray(jax.jit(box_ops.clip_boxes)(bb, hw))
  np.testing.assert_array_equal(got[1], [[0, 0, 15, 10], [10, 10, 15, 10]])


def test_clip_matches_mmdet_decode_clip_golden():
  """mmdet decodes then clips in delta2bbox; clipping its own unclipped output gives its clipped
  output exactly (README 5)."""
  g = golden.load("box_coding")
  hw = tuple(int(v) for v in g["image_size_hw"])
  for key in ("std0.1_0.1_0.2_0.2", "std1_1_1_1"):
    noclip = g[f"mm_{key}_decode_noclip_f32"].reshape(-1, 2, 4)
    got = np.asarray(box_ops.clip_boxes(jnp.asarray(noclip), hw)).reshape(-1, 8)
    np.testing.assert_array_equal(got, g[f"mm_{key}_decode_clip_f32"])


def test_exact_div_and_no_fma_helpers():
  rng = np.random.default_rng(1)
  x = rng.uniform(-100, 100, (1000, 4)).astype(np.float32)
  w = np.array([0.1, 0.1, 0.2, 0.2], np.float32)
  got = np.asarray(jax.jit(lambda x: box_ops.exact_div(x, jnp.asarray(w)))(x))
  np.testing.assert_array_equal(got, x / w)
  y = rng.uniform(-100, 100, (1000, 4)).astype(np.float32)
  got = np.asarray(jax.jit(lambda x, y: box_ops.no_fma(x * y) + y)(x, y))
  np.testing.assert_array_equal(got, x * y + y)
  v = jnp.array([np.nan, -0.0, 0.0, -np.inf, 3.5], jnp.float32)
  np.testing.assert_array_equal(np.asarray(box_ops.no_fma(v)).view(np.uint32),
                                np.asarray(v).view(np.uint32))
