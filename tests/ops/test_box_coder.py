"""Box coding against golden box_coding.npz (README section 5; parity_spec 3.8)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.ops import box_coder
from maskrcnn_jax.ops import boxes as box_ops
from tests import golden

# golden key infix -> (form, weights)
D2_WEIGHTS = {"w10_10_5_5": (10.0, 10.0, 5.0, 5.0), "w1_1_1_1": (1.0, 1.0, 1.0, 1.0)}
MM_STDS = {"std0.1_0.1_0.2_0.2": (0.1, 0.1, 0.2, 0.2), "std1_1_1_1": (1.0, 1.0, 1.0, 1.0)}

# Weights are traced (one compilation per form and dtype keeps the tests fast).
_DEC = jax.jit(box_coder.decode, static_argnames=("form",))
_ENC = jax.jit(box_coder.encode, static_argnames=("form",))


def _inputs(g, dtype):
  src = np.asarray(g["src_boxes"], dtype)
  tgt = np.asarray(g["tgt_boxes"], dtype)
  deltas = np.asarray(g["deltas"], dtype).reshape(-1, 2, 4)
  return src, tgt, deltas


def _bitwise(got, want):
  got = np.asarray(got).reshape(want.shape)
  assert got.dtype == want.dtype, (got.dtype, want.dtype)
  # assert_array_equal treats NaN == NaN and +0 == -0, which is what the framework comparisons mean.
  np.testing.assert_array_equal(got, want)


def _close_to_transcendental_ulp(got, want, *, max_ulps=4, max_inexact_frac=0.05):
  """Asserts `got` equals `want` up to the last-bit difference of exp / log implementations.

  torch's CPU exp / log (float32 and float64) and XLA's are both faithful to about 1 ulp but are
  not the same functions, so a result that went through exp / log can differ in the last bits
  (the arithmetic around them is bitwise; see test_op_order_*). The tolerance is `max_ulps`
  ulps of the largest magnitude in the box (cancellation in ctr -/+ w/2 amplifies relative
  error on a small coordinate), and at most `max_inexact_frac` of the elements may differ at
  all: an FMA contraction or reciprocal-multiply rewrite would change ~15 % of them.
  """
  got = np.asarray(got).reshape(want.shape)
  assert got.dtype == want.dtype, (got.dtype, want.dtype)
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  finite = np.isfinite(want)
  np.testing.assert_array_equal(got[~finite & ~np.isnan(want)], want[~finite & ~np.isnan(want)])
  g4 = np.where(finite, want, 0).reshape(*want.shape[:-1], -1, 4)
  scale = np.max(np.abs(g4), axis=-1, keepdims=True)
  tol = max_ulps * np.spacing(np.broadcast_to(scale, g4.shape).astype(want.dtype))
  diff = np.abs(np.where(finite, got, 0) - np.where(finite, want, 0)).reshape(g4.shape)
  assert np.all(diff <= tol), f"max diff / tol = {np.max(diff / tol)}"
  frac = np.mean(got[finite] != want[finite])
  assert frac <= max_inexact_frac, f"{frac:.1%} of the elements differ"


@pytest.mark.parametrize("wkey", sorted(D2_WEIGHTS))
def test_d2_tv_decode_f32(wkey):
  g = golden.load("box_coding")
  src, _, deltas = _inputs(g, np.float32)
  got = _DEC(deltas, src[:, None, :], form="detectron2", weights=D2_WEIGHTS[wkey])
  _close_to_transcendental_ulp(got, g[f"d2_{wkey}_apply_deltas_f32"])
  _close_to_transcendental_ulp(got, g[f"tv_{wkey}_decode_f32"])


@pytest.mark.parametrize("wkey", sorted(D2_WEIGHTS))
def test_d2_tv_encode_f32(wkey):
  g = golden.load("box_coding")
  src, tgt, _ = _inputs(g, np.float32)
  got = _ENC(src, tgt, form="detectron2", weights=D2_WEIGHTS[wkey])
  for key in (f"d2_{wkey}_get_deltas_f32", f"tv_{wkey}_encode_f32"):
    # dx, dy involve no transcendental function: bitwise. dw, dh go through log.
    _bitwise(np.asarray(got)[:, :2], g[key][:, :2])
    _close_to_transcendental_ulp(got, g[key])


@pytest.mark.parametrize("skey", sorted(MM_STDS))
def test_mm_decode_f32(skey):
  g = golden.load("box_coding")
  src, _, deltas = _inputs(g, np.float32)
  hw = tuple(int(v) for v in g["image_size_hw"])

  noclip = _DEC(deltas, src[:, None, :], form="mmdet", weights=MM_STDS[skey])
  clip = jax.jit(box_ops.clip_boxes)(noclip, hw)
  _close_to_transcendental_ulp(noclip, g[f"mm_{skey}_decode_noclip_f32"])
  _close_to_transcendental_ulp(clip, g[f"mm_{skey}_decode_clip_f32"])
  # Row 5 (dx = +1000, dy = -1000) collapses to (640, 0, 640, 0) after clipping (README 5 (c)).
  np.testing.assert_array_equal(np.asarray(clip)[5, 0], [640, 0, 640, 0])


@pytest.mark.parametrize("skey", sorted(MM_STDS))
def test_mm_encode_f32(skey):
  g = golden.load("box_coding")
  src, tgt, _ = _inputs(g, np.float32)
  got = _ENC(src, tgt, form="mmdet", weights=MM_STDS[skey])
  key = f"mm_{skey}_encode_f32"
  _bitwise(np.asarray(got)[:, :2], g[key][:, :2])
  _close_to_transcendental_ulp(got, g[key])


def test_float64_paths():
  """tv / d2 encode and decode and mmdet decode also run in float64 (with x64 enabled)."""
  g = golden.load("box_coding")
  with jax.enable_x64(True):
    src, tgt, deltas = (jnp.asarray(x) for x in _inputs(g, np.float64))
    hw = tuple(int(v) for v in g["image_size_hw"])
    for wkey, w in D2_WEIGHTS.items():
      enc = _ENC(src, tgt, form="detectron2", weights=w)
      # XLA's float64 log agrees with torch's on all of these: bitwise.
      _bitwise(enc, g[f"d2_{wkey}_get_deltas_f64"])
      _bitwise(enc, g[f"tv_{wkey}_encode_f64"])
      dec = _DEC(deltas, src[:, None], form="detectron2", weights=w)
      _close_to_transcendental_ulp(dec, g[f"tv_{wkey}_decode_f64"], max_ulps=16,
                                   max_inexact_frac=0.1)
    for skey, s in MM_STDS.items():
      dec = _DEC(deltas, src[:, None], form="mmdet", weights=s)
      _close_to_transcendental_ulp(dec, g[f"mm_{skey}_decode_noclip_f64"], max_ulps=16,
                                   max_inexact_frac=0.1)
      _close_to_transcendental_ulp(box_ops.clip_boxes(dec, hw), g[f"mm_{skey}_decode_clip_f64"],
                                   max_ulps=16, max_inexact_frac=0.1)


def _np_reference(form, deltas, src, tgt, w, exp, log):
  """The framework formulas transcribed op by op in numpy float32 (every op rounds once).

  `exp` / `log` are passed in, so that the comparison with JAX isolates the arithmetic around
  them (operation order, no FMA contraction, exact division by the weights).
  """
  f32 = np.float32
  w = np.asarray(w, f32)
  b = src[:, None, :]
  if form == "detectron2":  # Box2BoxTransform.apply_deltas / get_deltas
    wh = b[..., 2:] - b[..., :2]
    ctr = b[..., :2] + f32(0.5) * wh
    d = deltas / w
    dwh = np.minimum(d[..., 2:], f32(box_coder.DEFAULT_CLAMP))
    pc = d[..., :2] * wh + ctr
    pwh = exp(dwh) * wh
    dec = np.concatenate([pc - f32(0.5) * pwh, pc + f32(0.5) * pwh], -1)
    swh = src[:, 2:] - src[:, :2]
    sc = src[:, :2] + f32(0.5) * swh
    twh = tgt[:, 2:] - tgt[:, :2]
    tc = tgt[:, :2] + f32(0.5) * twh
    enc = np.concatenate([w[:2] * (tc - sc) / swh, w[2:] * log(twh / swh)], -1)
  else:  # delta2bbox / bbox2delta
    d = deltas * w
    pxy = (b[..., :2] + b[..., 2:]) * f32(0.5)
    pwh = b[..., 2:] - b[..., :2]
    c = f32(box_coder.DEFAULT_CLAMP)
    gxy = pxy + pwh * d[..., :2]
    gwh = pwh * exp(np.clip(d[..., 2:], -c, c))
    dec = np.concatenate([gxy - gwh * f32(0.5), gxy + gwh * f32(0.5)], -1)
    pxy, pwh = pxy[:, 0], pwh[:, 0]
    gxy = (tgt[:, :2] + tgt[:, 2:]) * f32(0.5)
    gwh = tgt[:, 2:] - tgt[:, :2]
    enc = np.concatenate([(gxy - pxy) / pwh, log(gwh / pwh)], -1) / w
  return dec, enc


@pytest.mark.parametrize("form,w", [("detectron2", (10.0, 10.0, 5.0, 5.0)),
                                    ("detectron2", (1.0, 1.0, 1.0, 1.0)),
                                    ("mmdet", (0.1, 0.1, 0.2, 0.2)),
                                    ("mmdet", (1.0, 1.0, 1.0, 1.0))])
def test_op_order_bitwise(form, w):
  """Jitted decode / encode equal the op-by-op transcription bitwise, given the same exp / log."""
  g = golden.load("box_coding")
  src, tgt, deltas = _inputs(g, np.float32)
  xla_exp = lambda x: np.asarray(jnp.exp(jnp.asarray(x)))  # elementwise, no fusion partner
  xla_log = lambda x: np.asarray(jnp.log(jnp.asarray(x)))
  want_dec, want_enc = _np_reference(form, deltas, src, tgt, w, xla_exp, xla_log)
  # Weights as compile-time constants here (the model's case): XLA must not turn the division by
  # the constant weights into a reciprocal multiply.
  dec = jax.jit(lambda d, b: box_coder.decode(d, b, form=form, weights=w))(deltas, src[:, None])
  enc = jax.jit(lambda s, t: box_coder.encode(s, t, form=form, weights=w))(src, tgt)
  _bitwise(dec, want_dec)
  _bitwise(enc, want_enc)
  # The transcription itself reproduces the golden arrays once exp / log are correctly rounded
  # (up to the few elements where torch's exp / log are not): a check of the transcription.
  cr_exp = lambda x: np.exp(x.astype(np.float64)).astype(np.float32)
  cr_log = lambda x: np.log(x.astype(np.float64)).astype(np.float32)
  ref_dec, ref_enc = _np_reference(form, deltas, src, tgt, w, cr_exp, cr_log)
  key = {"detectron2": "d2_w" + "_".join(f"{v:g}" for v in w),
         "mmdet": "mm_std" + "_".join(f"{v:g}" for v in w)}[form]
  want_g_dec = g[key + ("_apply_deltas_f32" if form == "detectron2" else "_decode_noclip_f32")]
  want_g_enc = g[key + ("_get_deltas_f32" if form == "detectron2" else "_encode_f32")]
  assert np.sum(ref_dec.reshape(want_g_dec.shape) != want_g_dec) <= 2
  assert np.sum(ref_enc != want_g_enc) <= 8


def test_clamp_semantics_by_hand():
  # dw = dh = -5: d2 does not clamp below, mmdet clamps at -log(1000/16) = -4.135.
  b = jnp.array([[0.0, 0.0, 100.0, 100.0]], jnp.float32)
  d = jnp.array([[0.0, 0.0, -5.0, -5.0]], jnp.float32)
  d2 = box_coder.decode(d, b, form="detectron2", weights=(1, 1, 1, 1))
  mm = box_coder.decode(d, b, form="mmdet", weights=(1, 1, 1, 1))
  np.testing.assert_allclose(d2[0, 2] - d2[0, 0], 100 * np.exp(-5), rtol=1e-5)
  np.testing.assert_allclose(mm[0, 2] - mm[0, 0], 100 * 16 / 1000, rtol=1e-5)
  # Upper clamp in both: dw = 30 -> 100 * 62.5.
  up = jnp.array([[0.0, 0.0, 30.0, 30.0]], jnp.float32)
  for form in box_coder.FORMS:
    out = box_coder.decode(up, b, form=form, weights=(1, 1, 1, 1))
    np.testing.assert_allclose(out[0, 2] - out[0, 0], 6250.0, rtol=1e-5)


def test_roundtrip():
  b = jnp.array([[10.0, 20.0, 50.0, 90.0], [0.0, 0.0, 3.0, 4.0]], jnp.float32)
  t = jnp.array([[12.0, 18.0, 60.0, 85.0], [1.0, 1.0, 5.0, 9.0]], jnp.float32)
  for form, w in (("detectron2", (10, 10, 5, 5)), ("mmdet", (0.1, 0.1, 0.2, 0.2))):
    d = box_coder.encode(b, t, form=form, weights=w)
    np.testing.assert_allclose(box_coder.decode(d, b, form=form, weights=w), t, atol=1e-4)


def test_unknown_form():
  with pytest.raises(ValueError):
    box_coder.decode(jnp.zeros((1, 4)), jnp.zeros((1, 4)), form="tv", weights=(1, 1, 1, 1))
