"""RoIAlign against the torchvision / mmcv / detectron2 golden vectors (golden README section 1).

Every test of `TestRoIAlign` runs once per implementation that runs here
(`pallas_kernels.roi_align.available_impls()`): 'reference' (pure JAX), 'interpret' (the Triton
kernels in the Pallas interpreter) and 'mosaic_interpret' (the Mosaic GPU kernel bodies in the
Pallas interpreter) everywhere, plus 'pallas' (the Triton kernels natively) on a GPU and 'mosaic'
(the Mosaic GPU kernels natively) on a Hopper GPU. The interpreter is slow, so the interpreted
implementations check a subset where a test loops over many configurations (`_subset`); every
kind of box and configuration is still covered: aligned 0 / 1, sampling_ratio 0 / 2, output 7 /
14, both goldens cases (every box kind), both scales, bfloat16, the capped grid, several levels,
both backwards. `test_mosaic_gpu_interpreter` runs the Mosaic GPU kernels through Mosaic GPU's own
interpreter (its device launch path), and the lowering tests lower both kernel families for a
CUDA target without a GPU.
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

# The repository's copy of the framework-produced goldens (tests/fixtures/golden/README.md).
GOLDEN_DIR = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "golden"
IMPLS = roi_align_lib.available_impls()
KERNEL_IMPLS = roi_align_lib.KERNEL_IMPLS
INTERPRETED = ("interpret", "mosaic_interpret")
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
  if not path.is_file():  # a failure, not a skip: the fixture is part of the repository
    raise FileNotFoundError(f"golden file {path} is missing (restore tests/fixtures/golden)")
  with np.load(path) as z:
    return {k: z[k] for k in z.files}


def _nhwc(a):
  return np.asarray(a).transpose(0, 2, 3, 1)


def _subset(impl, items, every=2):
  """All items for the reference and native kernels; every `every`-th (from the first) in the
  interpreter, which is slow on CPU (the callers pick orders that keep every case kind)."""
  items = list(items)
  return items[::every] if impl in INTERPRETED else items


@functools.lru_cache(maxsize=None)
def _fn(impl, output_size, sampling_ratio, aligned, max_grid, roi_chunk=None, deterministic=False):
  """Jitted roi_align(features, boxes, batch_idx, spatial_scale) for one static configuration.

  The spatial scale is a traced argument so that both scales of a case share one compilation.
  """
  def f(features, boxes, batch_idx, spatial_scale):
    return roi_align_lib.roi_align(
        features, boxes, batch_idx, output_size=output_size, spatial_scale=spatial_scale,
        sampling_ratio=sampling_ratio, aligned=aligned, max_grid=max_grid, roi_chunk=roi_chunk,
        impl=impl, deterministic=deterministic)
  return jax.jit(f)


@functools.lru_cache(maxsize=None)
def _grad_fn(impl, output_size, sampling_ratio, aligned, max_grid, deterministic=False):
  """Jitted d/dfeatures of sum(roi_align(...) * cotangent), via jax.vjp."""
  fwd = _fn(impl, output_size, sampling_ratio, aligned, max_grid, deterministic=deterministic)

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
  (the semantics of the Pallas kernels; the reference caps only past what a RoI inside the map
  can need).
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


# The interpreter's split of CONFIGS between the two golden cases: each half holds both output
# sizes, both `aligned` and both sampling ratios (indices 0, 3, 4, 7 for A; 1, 2, 5, 6 for B).
_INTERPRET_CONFIGS = {"A": [CONFIGS[i] for i in (0, 3, 4, 7)],
                      "B": [CONFIGS[i] for i in (1, 2, 5, 6)]}


def _configs(impl, case):
  return _INTERPRET_CONFIGS[case] if impl in INTERPRETED else CONFIGS


def _backwards(impl):
  """Backward variants to check: the reference has one; the kernels an atomic and a
  deterministic one."""
  return (False, True) if impl in KERNEL_IMPLS else (False,)


@pytest.mark.parametrize("impl", IMPLS)
class TestRoIAlign:

  @pytest.mark.parametrize("case", CASES)
  @pytest.mark.parametrize("rois_key,scale", SCALES)
  def test_torchvision_forward(self, impl, golden, case, rois_key, scale):
    feats, boxes, bidx = _inputs(golden, case, rois_key)
    for o, a, s in _configs(impl, case):
      out = _fn(impl, o, s, bool(a), _max_grid(o))(feats, boxes, bidx, scale)
      assert out.shape == (40, o, o, feats.shape[-1]) and out.dtype == jnp.float32
      np.testing.assert_allclose(out, _nhwc(golden[f"{case}_tv_out{o}_aligned{a}_sr{s}"]),
                                 rtol=0, atol=ATOL, err_msg=f"{case} {rois_key} out{o} a{a} sr{s}")

  @pytest.mark.parametrize("case", CASES)
  def test_mmcv_and_detectron2_forward(self, impl, golden, case):
    if impl in INTERPRETED and case == "A":
      pytest.skip("interpreter subset: case B holds the same box kinds (and two images)")
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
    """d/dfeatures against torch autograd, with every backward of the implementation (the
    interpreter: output 7 on case A, 14 on B, the two backwards alternating)."""
    kinds = golden[f"{case}_box_kind"]
    sizes = ((7,) if case == "A" else (14,)) if impl in INTERPRETED else (7, 14)
    for o in sizes:
      cot_all = _nhwc(golden[f"{case}_cotangent_out{o}"]).astype(np.float32)
      variants = [(f"{case}_tv_grad_out{o}_aligned1_sr0", True, 0, None),
                  (f"{case}_tv_grad_out{o}_aligned0_sr2", False, 2, None),
                  (f"{case}_mm_grad_out{o}", True, 0, kinds != INVERTED)]
      for v, (name, aligned, sr, keep) in enumerate(variants):
        if impl in INTERPRETED:
          if keep is not None and case == "A":
            continue  # the mmcv gradient equals torchvision's without the inverted box
          backwards = ((v + (case == "B")) % 2 == 1,)
        else:
          backwards = _backwards(impl)
        feats, boxes, bidx = _inputs(golden, case, "rois_s4", keep)
        cot = cot_all if keep is None else cot_all[keep]
        for det in backwards:
          grad = _grad_fn(impl, o, sr, aligned, _max_grid(o), det)(feats, boxes, bidx, 0.25,
                                                                   jnp.asarray(cot))
          np.testing.assert_allclose(grad, _nhwc(golden[name]), rtol=GRAD_RTOL, atol=GRAD_ATOL,
                                     err_msg=f"{name} deterministic={det}")

  def test_inverted_box_adaptive_is_zero(self, impl, golden):
    case = "B" if impl in INTERPRETED else "A"  # B's configuration is compiled already
    feats, boxes, bidx = _inputs(golden, case, "rois_s4")
    row = golden[f"{case}_box_kind"].tolist().index(INVERTED)
    out = _fn(impl, 7, 0, True, _max_grid(7))(feats, boxes, bidx, 0.25)
    assert np.all(np.asarray(out[row]) == 0)

  def test_capped_adaptive_grid(self, impl):
    """max_grid below the true grid. The reference takes the samples in passes of max_grid and
    is exact; the kernels take min(grid, max_grid) evenly spaced samples per bin."""
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
    np.testing.assert_allclose(exact, numpy_roi_align(feats, boxes, bidx, **kw), rtol=0, atol=1e-5)
    if impl == "reference":
      # Several passes of 4 samples: the exact algorithm, for every RoI inside the map.
      np.testing.assert_allclose(capped, numpy_roi_align(feats, boxes, bidx, **kw),
                                 rtol=0, atol=1e-5)
      return
    # The documented semantics, exactly.
    np.testing.assert_allclose(capped, numpy_roi_align(feats, boxes, bidx, **kw, max_grid=4),
                               rtol=0, atol=1e-5)
    # Uncapped RoIs sharing a chunk with capped ones are exact; capped ones (inside the map, where
    # the features are smooth) stay close to the exact bin averages.
    np.testing.assert_allclose(capped[1], exact[1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(capped[3], exact[3], rtol=0, atol=1e-6)
    err = np.abs(np.asarray(capped) - np.asarray(exact)).max(axis=(1, 2, 3))
    assert np.all(err[[0, 2]] > 0) and np.all(err[[0, 2]] < 0.01), err
    if impl in KERNEL_IMPLS:
      return  # the kernels have no chunks (each RoI picks its own path)
    # Same with one RoI per chunk (capped and uncapped chunks take different paths).
    one = _fn(impl, 7, 0, True, 4, 1)(f, b, i, 0.25)
    np.testing.assert_allclose(one, capped, rtol=0, atol=1e-6)

  def test_numpy_cross_check_random(self, impl):
    """Random boxes, several chunk sizes, against the direct per-sample numpy algorithm; plus a
    NaN box (zeros) and an all-zero (padding) box."""
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((2, 21, 30, 5)).astype(np.float32)
    k = 23
    xy = rng.uniform(-20, 130, (k, 2))
    wh = rng.uniform(-5, 60, (k, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    boxes = np.concatenate([boxes, [[np.nan, 3, 40, 50], [0, 0, 0, 0]]]).astype(np.float32)
    bidx = np.concatenate([rng.integers(0, 2, k), [1, 0]]).astype(np.int32)
    for sr, aligned, chunk in _subset(impl, ((0, True, None), (0, False, 5), (2, False, 7),
                                             (3, True, 1)), every=3):
      out = np.asarray(_fn(impl, 7, sr, aligned, 8, chunk)(feats, boxes, bidx, 0.25))
      exp = numpy_roi_align(feats, boxes[:k], bidx[:k], output_size=7, spatial_scale=0.25,
                            sampling_ratio=sr, aligned=aligned, max_grid=8)
      np.testing.assert_allclose(out[:k], exp, rtol=0, atol=2e-5, err_msg=f"sr{sr} a{aligned}")
      assert np.all(out[k] == 0), f"NaN box, sr{sr} a{aligned}"
      if aligned and sr == 0:  # adaptive grid ceil(0 / 7) = 0: no samples (aligned=False widens
        assert np.all(out[k + 1] == 0)  # the box to 1x1; a fixed grid samples pixel (0, 0))

  def test_bfloat16(self, impl, golden):
    feats, boxes, bidx = _inputs(golden, "B", "rois_s4")
    f16 = feats.astype(jnp.bfloat16)
    for sr, aligned in _subset(impl, ((0, True), (2, False))):
      out = _fn(impl, 7, sr, aligned, _max_grid(7))(f16, boxes, bidx, 0.25)
      assert out.dtype == jnp.bfloat16 and out.shape == (40, 7, 7, 2)
      # float32 accumulation of bfloat16 inputs, rounded once to bfloat16 at the end.
      ref = _fn(impl, 7, sr, aligned, _max_grid(7))(f16.astype(jnp.float32), boxes, bidx, 0.25)
      np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=8e-3, atol=1e-6)
      exp = _nhwc(golden[f"B_tv_out7_aligned{int(aligned)}_sr{sr}"])
      np.testing.assert_allclose(np.asarray(out, np.float32), exp, rtol=0, atol=3e-2)
    # The gradient w.r.t. bfloat16 features, against torch's float64 gradient of the float32
    # features: the inputs' rounding (~2**-9 relative) and the gradient's own rounding to
    # bfloat16 (the kernels accumulate in float32; the reference scatter-adds in bfloat16).
    cot = jnp.asarray(_nhwc(golden["B_cotangent_out7"]).astype(np.float32))
    exp = _nhwc(golden["B_tv_grad_out7_aligned1_sr0"])
    for det in _subset(impl, _backwards(impl)):
      grad = _grad_fn(impl, 7, 0, True, _max_grid(7), det)(f16, boxes, bidx, 0.25,
                                                            cot.astype(jnp.bfloat16))
      assert grad.dtype == jnp.bfloat16
      tol = 2e-2 if impl in KERNEL_IMPLS else 6e-2
      np.testing.assert_allclose(np.asarray(grad, np.float32), exp, rtol=tol, atol=tol,
                                 err_msg=f"deterministic={det}")

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
    for sr, aligned in _subset(impl, ((0, True), (2, False))):
      pyramid = lambda which, det=False: functools.partial(
          roi_align_lib.roi_align_pyramid, spatial_scales=scales, output_size=7, sampling_ratio=sr,
          aligned=aligned, max_grid=12, roi_chunk=4, impl=which, deterministic=det)
      if impl not in KERNEL_IMPLS:
        out = jax.jit(pyramid(impl))(feats, boxes, bidx, levels)
        for l in range(3):
          sel = levels == l
          exp = _fn(impl, 7, sr, aligned, 12)(feats[l], boxes[sel], bidx[sel], scales[l])
          # Different programs may contract different a * b + c into FMAs (reference.py).
          np.testing.assert_allclose(np.asarray(out)[sel], exp, rtol=0, atol=ATOL)
        continue
      # Kernels: forward and per-level gradients against the reference's pyramid (checked against
      # single-level pooling by the reference's own run of this test), with both backwards.
      cot = jnp.asarray(rng.standard_normal((k, 7, 7, 4)).astype(np.float32))

      def out_and_grad(which, det=False):
        def f(fs):
          out, vjp = jax.vjp(lambda x: pyramid(which, det)(x, boxes, bidx, levels), fs)
          return out, vjp(cot)[0]
        return jax.jit(f)

      exp_out, exp_grad = out_and_grad("reference")(feats)
      for det in _backwards(impl):
        fn = out_and_grad(impl, det)
        out, grad = fn(feats)
        np.testing.assert_allclose(out, exp_out, rtol=0, atol=ATOL)
        for l in range(3):
          np.testing.assert_allclose(grad[l], exp_grad[l], rtol=GRAD_RTOL, atol=GRAD_ATOL,
                                     err_msg=f"level {l} deterministic={det}")
        if det:  # bitwise reproducible
          _, again = fn(feats)
          for l in range(3):
            np.testing.assert_array_equal(grad[l], again[l])

  def test_empty(self, impl):
    out = roi_align_lib.roi_align(jnp.ones((1, 4, 4, 3)), jnp.zeros((0, 4)),
                                  jnp.zeros((0,), jnp.int32), output_size=7, spatial_scale=1.0,
                                  sampling_ratio=2, aligned=True, impl=impl)
    assert out.shape == (0, 7, 7, 3)

  def test_adaptive_needs_max_grid(self, impl):
    feats = jnp.zeros((1, 4, 4, 1))
    with pytest.raises(ValueError, match="max_grid"):
      roi_align_lib.roi_align(feats, jnp.zeros((1, 4)), jnp.zeros((1,), jnp.int32), output_size=7,
                              spatial_scale=1.0, sampling_ratio=0, aligned=True, impl=impl)


def test_impl_resolution():
  on_gpu = jax.default_backend() == "gpu"
  assert roi_align_lib.resolve_impl("reference") == "reference"
  assert roi_align_lib.resolve_impl("interpret") == "interpret"
  if not on_gpu:
    assert roi_align_lib.resolve_impl("auto") == "reference"
    with pytest.raises(ValueError, match="GPU"):
      roi_align_lib.resolve_impl("pallas")
  with roi_align_lib.auto_impl("interpret"):
    assert roi_align_lib.resolve_impl("auto") == "interpret"
  with pytest.raises(ValueError, match="unknown"):
    roi_align_lib.resolve_impl("cuda")
  if not roi_align_lib._on_hopper():  # pylint: disable=protected-access
    with pytest.raises(ValueError, match="Hopper"):
      roi_align_lib.resolve_impl("mosaic")


def test_auto_reads_the_device_table(monkeypatch):
  """impl='auto' takes the implementation named by AUTO_PALLAS_DEVICE_KINDS for this device."""
  kind = jax.devices()[0].device_kind
  monkeypatch.setattr(roi_align_lib, "_on_gpu", lambda: True)
  monkeypatch.setitem(roi_align_lib.AUTO_PALLAS_DEVICE_KINDS, kind, ("mosaic", "test entry"))
  assert roi_align_lib.resolve_impl("auto") == "mosaic"
  # float16 features, which the kernels do not take, stay on the reference under 'auto'.
  out = roi_align_lib.roi_align(jnp.ones((1, 4, 4, 3), jnp.float16), jnp.asarray([[0, 0, 8, 8.]]),
                                jnp.zeros((1,), jnp.int32), output_size=2, spatial_scale=0.5,
                                sampling_ratio=2, aligned=True)
  assert out.dtype == jnp.float16 and np.allclose(np.asarray(out, np.float32), 1.0)
  monkeypatch.delitem(roi_align_lib.AUTO_PALLAS_DEVICE_KINDS, kind)
  assert roi_align_lib.resolve_impl("auto") == "reference"


def _random_pyramid(seed, *, channels, k=7):
  """Two levels of 2 images, k random boxes (some outside), their levels and a cotangent."""
  rng = np.random.default_rng(seed)
  feats = [jnp.asarray(rng.standard_normal((2, 16 // 2**l, 24 // 2**l, channels)), jnp.float32)
           for l in range(2)]
  xy = rng.uniform(-10, 70, (k, 2))
  boxes = np.concatenate([xy, xy + rng.uniform(1, 50, (k, 2))], 1).astype(np.float32)
  bidx = rng.integers(0, 2, k).astype(np.int32)
  levels = rng.integers(0, 2, k).astype(np.int32)
  cot = jnp.asarray(rng.standard_normal((k, 7, 7, channels)), jnp.float32)
  return feats, jnp.asarray(boxes), jnp.asarray(bidx), jnp.asarray(levels), cot


def test_mosaic_gpu_interpreter():
  """The Mosaic GPU kernels through Mosaic GPU's own interpreter, i.e. the device launch path
  (`pl.kernel` over a Mosaic GPU mesh, `lax.axis_index`, the gradient tables updated in place as
  `jax.new_ref`s, NaN-filled uninitialized outputs, raising out-of-bounds reads): forward and
  both backwards against the reference. Slow (every load is a host callback): one small case."""
  from pallas_kernels.roi_align import kernel, kernel_mosaic
  if not kernel_mosaic.interpreter_available():
    pytest.skip("this JAX has no Mosaic GPU interpreter")
  feats, boxes, bidx, levels, cot = _random_pyramid(3, channels=5, k=4)
  kw = dict(spatial_scales=[0.25, 0.125], output_size=7, sampling_ratio=0, aligned=True,
            max_grid=3)

  def out_and_grad(pool):
    def f(fs):
      out, vjp = jax.vjp(lambda x: pool(x, boxes, bidx, levels, **kw), fs)
      return out, vjp(cot)[0]
    return jax.jit(f)(feats)

  exp_out, exp_grad = out_and_grad(roi_align_lib.roi_align_pyramid)
  for det in (False, True):
    out, grad = out_and_grad(functools.partial(kernel.pool_levels, lowering="mosaic",
                                               interpret="mosaic_gpu", deterministic=det))
    np.testing.assert_allclose(out, exp_out, rtol=0, atol=ATOL)
    for l in range(2):
      np.testing.assert_allclose(grad[l], exp_grad[l], rtol=GRAD_RTOL, atol=GRAD_ATOL,
                                 err_msg=f"level {l} deterministic={det}")


def test_mosaic_lowering_for_gpu():
  """The Mosaic GPU kernels lower for a CUDA target on any machine: the Python half of the Mosaic
  GPU compiler emits one verified module per kernel, for compute capability 9.0, with [2]-element vector loads of
  the channel vectors and `red.*.add.f32` atomics in the atomic backward only (mosaic_check.py;
  MLIR -> PTX needs a GPU)."""
  from pallas_kernels.roi_align import mosaic_check
  feats, boxes, bidx, levels, _ = _random_pyramid(0, channels=256, k=8)
  feats = [f.astype(jnp.bfloat16) for f in feats]
  for det in (False, True):
    hlo, modules = mosaic_check.lower(feats, boxes, bidx, levels, spatial_scales=[0.25, 0.125],
                                      output_size=7, sampling_ratio=0, aligned=True, max_grid=8,
                                      deterministic=det)
    assert hlo.count("mosaic_gpu_v2") == 2 and len(modules) == 2
    fwd, bwd = map(mosaic_check.summarize, modules)
    assert fwd["arch"] == ["9"] and fwd["vector_loads"] == ["2xbf16"]
    assert fwd["vector_stores"] == ["2xbf16"] and fwd["atomic_adds"] == 0
    if det:
      assert bwd["atomic_adds"] == 0 and bwd["vector_stores"] == ["2xf32"]
    else:  # one reduction per element of the thread's vector, per level
      assert bwd["atomic_adds"] == 2 * 2 and not bwd["vector_stores"]


def _abstract_gpu():
  """A context naming an H100 for the Triton lowering, which reads the compute capability off the
  device from JAX 0.11 on (an abstract device stands in for the absent GPU); none before."""
  import contextlib
  sharding = jax.sharding
  if jax.default_backend() == "gpu" or not hasattr(sharding, "AbstractDevice"):
    return contextlib.nullcontext()
  device = sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                   platform="gpu")
  mesh = sharding.AbstractMesh((1,), ("x",), abstract_device=device)
  return sharding.use_abstract_mesh(mesh)


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
def test_triton_lowering_for_gpu():
  """The kernels lower to Triton IR for a CUDA target, on any machine (no GPU needed): the
  Pallas-to-TTIR step of impl='pallas' (the TTIR-to-PTX compilation still needs a GPU). Each
  Triton module is verified by MLIR."""
  pltriton = pytest.importorskip("jax.experimental.pallas.triton")
  del pltriton
  from pallas_kernels.roi_align import kernel
  try:
    from jax._src.pallas.triton import pallas_call_registration as registration
  except ImportError:
    registration = None
  capture_modules = registration is not None and hasattr(registration, "lowering")
  modules = []
  if capture_modules:
    original = registration.lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
      result = original(*args, **kwargs)
      modules.append(result.module)
      return result
  rng = np.random.default_rng(0)
  feats = [jnp.asarray(rng.standard_normal((2, 16 // 2**l, 24 // 2**l, 256)), jnp.bfloat16)
           for l in range(2)]
  boxes = jnp.asarray(rng.uniform(0, 90, (8, 4)), jnp.float32)
  bidx = jnp.zeros((8,), jnp.int32)
  levels = jnp.asarray(rng.integers(0, 2, 8), jnp.int32)
  texts = []
  try:
    if capture_modules:
      registration.lowering.lower_jaxpr_to_triton_module = capture
    for det in (False, True):
      def loss(fs):
        out = kernel.pool_levels(fs, boxes, bidx, levels, spatial_scales=[0.25, 0.125],
                                 output_size=7, sampling_ratio=0, aligned=True, max_grid=8,
                                 deterministic=det)
        return jnp.sum(out.astype(jnp.float32))
      with _abstract_gpu():
        lowered = jax.jit(jax.grad(loss)).trace(feats).lower(lowering_platforms=("cuda",))
      texts.append(lowered.as_text())
  finally:
    if capture_modules:
      registration.lowering.lower_jaxpr_to_triton_module = original
  assert len(modules) == (4 if capture_modules else 0)
  for text in texts:
    assert text.count("xla.gpu.triton") == 2  # the forward and one backward kernel
  for module in modules:
    assert module.operation.verify()


def test_reference_multipass_matches_one_pass_with_gradients():
  """The reference's passes (max_grid 3) give the one-pass result (max_grid 64), forward and
  gradient, on a pyramid with RoIs needing up to 26 samples per bin; a RoI reaching far outside
  its map (grid 150 > the bound ceil((extent + 1) / 7)) is sampled with the bound's evenly
  spaced points, as the one-pass computation capped at the same number."""
  rng = np.random.default_rng(3)
  feats = [rng.standard_normal((2, 48, 40, 5)).astype(np.float32),
           rng.standard_normal((2, 24, 20, 5)).astype(np.float32)]
  boxes = np.array([[1, 2, 150, 30], [0, 0, 160, 190], [40, 5, 60, 180], [3, 3, 9, 8],
                    [-4000, 10, 60, 50]], np.float32)
  bidx = np.array([0, 1, 1, 0, 1], np.int32)
  levels = np.array([0, 1, 0, 0, 0], np.int32)
  kw = dict(spatial_scales=[0.25, 0.125], output_size=7, sampling_ratio=0, aligned=True)

  def pooled(max_grid):
    def f(fs):
      return roi_align_lib.reference.roi_align_pyramid(fs, boxes, bidx, levels, max_grid=max_grid,
                                                       **kw)
    return f

  # RoI 4 is sampled differently by the two (7 vs 64 points per bin): no cotangent on it.
  cot = [rng.standard_normal((5, 7, 7, 5)).astype(np.float32) * (np.arange(5) < 4)[:, None, None,
                                                                                  None]]
  outs, grads = {}, {}
  for g in (3, 64):
    fn = jax.jit(pooled(g))
    outs[g] = np.asarray(fn(feats))
    grads[g] = jax.grad(lambda fs: jnp.sum(fn(fs) * cot[0]))(feats)
  bound_x = -(-(40 + 1) // 7)  # the widest map is 40: RoI 4 is capped at 6 samples along x
  assert bound_x == 6
  np.testing.assert_allclose(outs[3][:4], outs[64][:4], rtol=0, atol=2e-6)
  for a, b in zip(grads[3], grads[64]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)
  # RoI 4: x extent 4060 / 4 / 7 -> grid 145, sampled at bound_x points per bin (y: grid 2).
  ref = numpy_roi_align(feats[0][1:2], boxes[4:5], np.zeros(1, np.int32), output_size=7,
                        spatial_scale=0.25, sampling_ratio=0, aligned=True, max_grid=bound_x)
  np.testing.assert_allclose(outs[3][4], ref[0], rtol=0, atol=1e-5)
