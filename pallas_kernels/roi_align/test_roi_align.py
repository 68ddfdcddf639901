"""RoIAlign against the torchvision / mmcv / detectron2 golden vectors (golden README section 1).

Every test runs once per implementation in `IMPLS` (today only the pure-JAX reference); a Pallas
kernel added to `pallas_kernels.roi_align.IMPLS` is then held to the same checks.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import roi_align as roi_align_lib

GOLDEN_DIR = Path(__file__).resolve().parents[2].parent / "shared/reference/golden"
IMPLS = roi_align_lib.IMPLS
CASES = ("A", "B")
# (rois key, spatial_scale): the same expected arrays hold for both (power-of-two scaling is exact).
SCALES = (("rois_s4", 0.25), ("rois_s16", 0.0625))
CONFIGS = [(o, a, s) for o in (7, 14) for a in (0, 1) for s in (0, 2)]
# torchvision's own float32 run differs from the float64 goldens by <= 9.3e-6 (golden README 1):
# float32 sample coordinates. Our float32 arithmetic follows the same order.
ATOL = 1.2e-5
# Gradients reach |10| and sum many float32 terms: relative tolerance as well.
GRAD_ATOL = 2e-5
GRAD_RTOL = 1e-5


def _max_grid(output_size):
  """Adaptive-grid bound that makes every golden box exact: huge_200 (300 feature units) needs
  ceil(300 / 7) = 43 samples per bin and axis at output 7, 22 at output 14."""
  return math.ceil(300 / output_size)

INVERTED = "inverted_x2<x1_y2<y1"


@pytest.fixture(scope="module")
def golden():
  path = GOLDEN_DIR / "roi_align.npz"
  if not path.is_file():
    pytest.skip(f"golden file {path} not found: the shared reference folder (../shared next to the "
                "repository) is not available here")
  with np.load(path) as z:
    return {k: z[k] for k in z.files}


def _nhwc(a):
  return np.asarray(a).transpose(0, 2, 3, 1)


@functools.lru_cache(maxsize=None)
def _fn(impl, output_size, sampling_ratio, aligned, max_grid, roi_chunk=None):
  """Jitted roi_align(features, boxes, batch_idx, spatial_scale) for one static configuration.

  The spatial scale is a traced argument so that both scales of a case share one compilation.
  """
  def f(features, boxes, batch_idx, spatial_scale):
    return roi_align_lib.roi_align(
        features, boxes, batch_idx, output_size=output_size, spatial_scale=spatial_scale,
        sampling_ratio=sampling_ratio, aligned=aligned, max_grid=max_grid, roi_chunk=roi_chunk,
        impl=impl)
  return jax.jit(f)


@functools.lru_cache(maxsize=None)
def _grad_fn(impl, output_size, sampling_ratio, aligned, max_grid):
  """Jitted d/dfeatures of sum(roi_align(...) * cotangent), via jax.vjp."""
  fwd = _fn(impl, output_size, sampling_ratio, aligned, max_grid)

  def g(features, boxes, batch_idx, spatial_scale, cotangent):
    _, vjp = jax.vjp(lambda f: fwd(f, boxes, batch_idx, spatial_scale), features)
    return vjp(cotangent)[0]
  return jax.jit(g)


def _inputs(golden, case, rois_key, keep=None):
  feats = jnp.asarray(_nhwc(golden[f"{case}_features"]).astype(np.float32))
  rois = golden[f"{case}_{rois_key}"]
  if keep is not None:
    rois = rois[keep]
  boxes = jnp.asarray(rois[:, 1:].astype(np.float32))
  bidx = jnp.asarray(rois[:, 0].astype(np.int32))
  return feats, boxes, bidx


def numpy_roi_align(feats, boxes, bidx, *, output_size, spatial_scale, sampling_ratio, aligned,
                    max_grid=None, dtype=np.float64):
  """Direct per-sample RoIAlign (parity_spec 3.11 steps 1-7) for cross-checks, NHWC.

  With max_grid, the adaptive grid is capped: min(grid, max_grid) evenly spaced samples per bin
  (the documented semantics of the JAX reference).
  """
  n, h, w, c = feats.shape
  oh = ow = output_size
  out = np.zeros((len(boxes), oh, ow, c), np.float64)
  t = dtype

  def axis(lo, hi, pooled, size):
    off = t(0.5) if aligned else t(0)
    start = t(lo) * t(spatial_scale) - off
    roi = t(t(hi) * t(spatial_scale) - off) - start
    if not aligned:
      roi = max(roi, t(1))
    bin_size = t(roi / t(pooled))
    grid = sampling_ratio if sampling_ratio > 0 else int(math.ceil(bin_size))
    if sampling_ratio == 0 and max_grid is not None:
      grid = min(grid, max_grid)
    g = max(grid, 0)
    p = np.arange(pooled, dtype=t)[:, None]
    i = np.arange(g, dtype=t)[None, :]
    y = (start + p * bin_size) + (i + t(0.5)) * bin_size / t(max(grid, 1))
    ok = (y >= -1) & (y <= size)
    y = np.where(y <= 0, 0, y)
    y_lo = np.floor(y).astype(np.int64)
    end = y_lo >= size - 1
    y_lo = np.where(end, size - 1, y_lo)
    y_hi = np.where(end, size - 1, y_lo + 1)
    y = np.where(end, y_lo.astype(t), y)
    ly = (y - y_lo).astype(t)
    hy = (t(1) - ly).astype(t)
    y_lo = np.clip(y_lo, 0, size - 1)
    y_hi = np.clip(y_hi, 0, size - 1)
    return grid, ok, y_lo, y_hi, hy, ly

  for k, ((x1, y1, x2, y2), b) in enumerate(zip(boxes, bidx)):
    gh, oky, ylo, yhi, hy, ly = axis(y1, y2, oh, h)
    gw, okx, xlo, xhi, hx, lx = axis(x1, x2, ow, w)
    if gh <= 0 or gw <= 0:
      continue
    f = feats[b].astype(t)
    # [oh, gh, ow, gw] samples
    idx = lambda a, bb: (a[:, :, None, None], bb[None, None, :, :])
    val = (hy[:, :, None, None, None] * hx[None, None, :, :, None] * f[idx(ylo, xlo)]
           + hy[:, :, None, None, None] * lx[None, None, :, :, None] * f[idx(ylo, xhi)]
           + ly[:, :, None, None, None] * hx[None, None, :, :, None] * f[idx(yhi, xlo)]
           + ly[:, :, None, None, None] * lx[None, None, :, :, None] * f[idx(yhi, xhi)])
    ok = oky[:, :, None, None] & okx[None, None, :, :]
    val = np.where(ok[..., None], val, 0)
    out[k] = val.sum(axis=(1, 3)) / max(gh * gw, 1)
  return out


@pytest.mark.parametrize("impl", IMPLS)
class TestRoIAlign:

  @pytest.mark.parametrize("case", CASES)
  @pytest.mark.parametrize("rois_key,scale", SCALES)
  def test_torchvision_forward(self, impl, golden, case, rois_key, scale):
    feats, boxes, bidx = _inputs(golden, case, rois_key)
    for o, a, s in CONFIGS:
      out = _fn(impl, o, s, bool(a), _max_grid(o))(feats, boxes, bidx, scale)
      assert out.shape == (40, o, o, feats.shape[-1]) and out.dtype == jnp.float32
      np.testing.assert_allclose(out, _nhwc(golden[f"{case}_tv_out{o}_aligned{a}_sr{s}"]),
                                 rtol=0, atol=ATOL, err_msg=f"{case} {rois_key} out{o} a{a} sr{s}")

  @pytest.mark.parametrize("case", CASES)
  def test_mmcv_and_detectron2_forward(self, impl, golden, case):
    for rois_key, scale in SCALES:
      feats, boxes, bidx = _inputs(golden, case, rois_key)
      for o in (7, 14):
        out = np.asarray(_fn(impl, o, 0, True, _max_grid(o))(feats, boxes, bidx, scale))
        exp = _nhwc(golden[f"{case}_mm_out{o}"])
        rows = ~np.isnan(exp).any(axis=(1, 2, 3))  # mmcv raises on the inverted box: NaN row
        assert golden[f"{case}_box_kind"][~rows].tolist() == [INVERTED]
        np.testing.assert_allclose(out[rows], exp[rows], rtol=0, atol=ATOL)
        if o == 7:
          np.testing.assert_allclose(out, _nhwc(golden[f"{case}_d2_out7"]), rtol=0, atol=ATOL)

  @pytest.mark.parametrize("case", CASES)
  def test_gradients(self, impl, golden, case):
    kinds = golden[f"{case}_box_kind"]
    for o in (7, 14):
      cot_all = _nhwc(golden[f"{case}_cotangent_out{o}"]).astype(np.float32)
      for name, aligned, sr, keep in (
          (f"{case}_tv_grad_out{o}_aligned1_sr0", True, 0, None),
          (f"{case}_tv_grad_out{o}_aligned0_sr2", False, 2, None),
          (f"{case}_mm_grad_out{o}", True, 0, kinds != INVERTED)):
        feats, boxes, bidx = _inputs(golden, case, "rois_s4", keep)
        cot = cot_all if keep is None else cot_all[keep]
        grad = _grad_fn(impl, o, sr, aligned, _max_grid(o))(feats, boxes, bidx, 0.25,
                                                            jnp.asarray(cot))
        np.testing.assert_allclose(grad, _nhwc(golden[name]), rtol=GRAD_RTOL, atol=GRAD_ATOL,
                                   err_msg=name)

  def test_inverted_box_adaptive_is_zero(self, impl, golden):
    feats, boxes, bidx = _inputs(golden, "A", "rois_s4")
    row = golden["A_box_kind"].tolist().index(INVERTED)
    out = _fn(impl, 7, 0, True, _max_grid(7))(feats, boxes, bidx, 0.25)
    assert np.all(np.asarray(out[row]) == 0)

  def test_capped_adaptive_grid(self, impl):
    """max_grid below the true grid: min(grid, max_grid) evenly spaced samples per bin."""
    h, w, c = 64, 80, 3
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    # Smooth features, so a coarser sampling of a bin stays close to the exact bin average.
    feats = np.stack([np.sin(0.05 * yy + 0.3 * k) * np.cos(0.04 * xx) + 0.01 * k * xx
                      for k in range(c)], -1)[None].astype(np.float32)
    boxes = np.array([[10, 6, 300, 250],      # 72.5 x 61 units: grids 11 x 9 at out 7 (capped)
                      [0, 0, 40, 30],         # grid 2 x 2: not capped
                      [4, 100, 316, 180],     # capped along x only
                      [33.3, 21.7, 55.1, 47.9]], np.float32)
    bidx = np.zeros(4, np.int32)
    f, b, i = jnp.asarray(feats), jnp.asarray(boxes), jnp.asarray(bidx)
    kw = dict(output_size=7, spatial_scale=0.25, sampling_ratio=0, aligned=True)
    exact = _fn(impl, 7, 0, True, 16)(f, b, i, 0.25)
    capped = _fn(impl, 7, 0, True, 4)(f, b, i, 0.25)
    # The documented semantics, exactly.
    np.testing.assert_allclose(capped, numpy_roi_align(feats, boxes, bidx, **kw, max_grid=4),
                               rtol=0, atol=1e-5)
    np.testing.assert_allclose(exact, numpy_roi_align(feats, boxes, bidx, **kw), rtol=0, atol=1e-5)
    # Uncapped RoIs sharing a chunk with capped ones are exact; capped ones (inside the map, where
    # the features are smooth) stay close to the exact bin averages.
    np.testing.assert_allclose(capped[1], exact[1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(capped[3], exact[3], rtol=0, atol=1e-6)
    err = np.abs(np.asarray(capped) - np.asarray(exact)).max(axis=(1, 2, 3))
    assert np.all(err[[0, 2]] > 0) and np.all(err[[0, 2]] < 0.01), err
    # Same with one RoI per chunk (capped and uncapped chunks take different paths).
    one = _fn(impl, 7, 0, True, 4, 1)(f, b, i, 0.25)
    np.testing.assert_allclose(one, capped, rtol=0, atol=1e-6)

  def test_numpy_cross_check_random(self, impl):
    """Random boxes, several chunk sizes, against the direct per-sample numpy algorithm."""
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((2, 21, 30, 5)).astype(np.float32)
    k = 23
    xy = rng.uniform(-20, 130, (k, 2))
    wh = rng.uniform(-5, 60, (k, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    bidx = rng.integers(0, 2, k).astype(np.int32)
    for sr, aligned, chunk in ((0, True, None), (0, False, 5), (2, False, 7), (3, True, 1)):
      out = _fn(impl, 7, sr, aligned, 8, chunk)(feats, boxes, bidx, 0.25)
      exp = numpy_roi_align(feats, boxes, bidx, output_size=7, spatial_scale=0.25,
                            sampling_ratio=sr, aligned=aligned, max_grid=8)
      np.testing.assert_allclose(out, exp, rtol=0, atol=2e-5, err_msg=f"sr{sr} a{aligned}")

  def test_bfloat16(self, impl, golden):
    feats, boxes, bidx = _inputs(golden, "B", "rois_s4")
    f16 = feats.astype(jnp.bfloat16)
    for sr, aligned in ((0, True), (2, False)):
      out = _fn(impl, 7, sr, aligned, _max_grid(7))(f16, boxes, bidx, 0.25)
      assert out.dtype == jnp.bfloat16 and out.shape == (40, 7, 7, 2)
      # float32 accumulation of bfloat16 inputs, rounded once to bfloat16 at the end.
      ref = _fn(impl, 7, sr, aligned, _max_grid(7))(f16.astype(jnp.float32), boxes, bidx, 0.25)
      np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=8e-3, atol=1e-6)
      exp = _nhwc(golden[f"B_tv_out7_aligned{int(aligned)}_sr{sr}"])
      np.testing.assert_allclose(np.asarray(out, np.float32), exp, rtol=0, atol=3e-2)

  def test_pyramid_matches_single_level(self, impl):
    rng = np.random.default_rng(1)
    feats = [rng.standard_normal((2, 32 // 2**l, 48 // 2**l, 4)).astype(np.float32)
             for l in range(3)]
    scales = [0.25, 0.125, 0.0625]
    k = 17
    xy = rng.uniform(-10, 180, (k, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 120, (k, 2))], 1).astype(np.float32)
    bidx = rng.integers(0, 2, k).astype(np.int32)
    levels = rng.integers(0, 3, k).astype(np.int32)
    for sr, aligned in ((0, True), (2, False)):
      out = jax.jit(functools.partial(
          roi_align_lib.roi_align_pyramid, spatial_scales=scales, output_size=7, sampling_ratio=sr,
          aligned=aligned, max_grid=12, roi_chunk=4, impl=impl))(feats, boxes, bidx, levels)
      for l in range(3):
        sel = levels == l
        exp = _fn(impl, 7, sr, aligned, 12)(feats[l], boxes[sel], bidx[sel], scales[l])
        # Different programs may contract different a * b + c into FMAs (reference.py docstring).
        np.testing.assert_allclose(np.asarray(out)[sel], exp, rtol=0, atol=ATOL)

  def test_adaptive_needs_max_grid(self, impl):
    feats = jnp.zeros((1, 4, 4, 1))
    with pytest.raises(ValueError, match="max_grid"):
      roi_align_lib.roi_align(feats, jnp.zeros((1, 4)), jnp.zeros((1,), jnp.int32), output_size=7,
                              spatial_scale=1.0, sampling_ratio=0, aligned=True, impl=impl)
