"""Mask paste on the device (ops/paste_device.py) against the host paste (ops/paste.py), bitwise.

The host paste is itself bitwise equal to the references (tests/ops/test_paste.py on
golden/mask_paste.npz); here the device's soft values are compared with the host's float for float
and its binary masks pixel for pixel, for both algorithms and both threshold rules, on the golden
boxes and on random boxes: inside, partly outside and entirely outside the image, sub-pixel, zero
width, far larger than the image, on small and large images, 28x28 and 14x14 masks, probabilities
with exact 0.5 values on integer boxes (ties of the threshold).
"""
from __future__ import annotations

from fractions import Fraction

import jax
import numpy as np
import pytest

from maskrcnn_jax.ops import paste, paste_device, paste_plan, resample
from tests import golden


def _host_soft(method, mask, box, hw, inf_to_zero=True):
  if method == "grid_sample":
    return paste.paste_mask_grid_sample_soft(mask, box, hw, inf_to_zero=inf_to_zero)
  return paste.paste_mask_tv_legacy(mask, box, hw)


def _device_soft(method, masks, boxes, hw, inf_to_zero=True, chunk_tiles=4096):
  """(y0, x0, soft window) per detection from `paste_device.soft_tiles` (reassembled tiles)."""
  n = len(boxes)
  plan = paste_plan.plan_tiles(np.arange(n), boxes, np.asarray(hw), method=method,
                                 mask_size=masks.shape[-1])
  fn = jax.jit(lambda p, b, t: paste_device.soft_tiles(p, b, t, method=method,
                                                       inf_to_zero=inf_to_zero))
  tiles = []
  with jax.enable_x64(True):
    start = 0
    for size in paste_plan.chunk_sizes(len(plan.table), chunk_tiles):
      part = np.zeros((size, plan.table.shape[1]), np.int32)
      rows = plan.table[start:start + size]
      part[:len(rows)] = rows
      soft, inside = fn(masks, boxes, part)
      soft = np.where(np.asarray(inside), np.asarray(soft), 0)
      tiles.append(soft[:len(rows)])
      start += size
  tiles = np.concatenate(tiles) if tiles else np.zeros((0, 32, 32), np.float32)
  out = []
  for i in range(n):
    y0, x0, h, w = plan.windows[i]
    th, tw = plan.grid[i]
    t = tiles[plan.first[i]:plan.first[i + 1]].reshape(th, tw, 32, 32)
    out.append((int(y0), int(x0), t.transpose(0, 2, 1, 3).reshape(th * 32, tw * 32)[:h, :w]))
  return out


def _random_case(rng, n, hw, mask_size=28):
  """Boxes of realistic and extreme kinds on an image of size hw."""
  h, w = hw
  size = np.exp(rng.normal(np.log(0.1 * min(h, w) + 4), 1.0, n))
  aspect = np.exp(rng.normal(0, 0.6, n))
  bw, bh = size * np.sqrt(aspect), size / np.sqrt(aspect)
  x = rng.uniform(-0.2 * w, w, n)
  y = rng.uniform(-0.2 * h, h, n)
  boxes = np.stack([x, y, x + bw, y + bh], 1)
  kinds = rng.integers(0, 8, n)
  boxes[kinds == 0] = np.round(boxes[kinds == 0])  # integer coordinates
  boxes[kinds == 1, 2:] = boxes[kinds == 1, :2] + rng.uniform(0.01, 0.9, (int((kinds == 1).sum()), 2))
  boxes[kinds == 2] = [-3.0 * w, -2.0 * h, 4.0 * w, 3.0 * h] + rng.normal(0, 1, (int((kinds == 2).sum()), 4))
  boxes[kinds == 3] = boxes[kinds == 3] + [w + 50.0, 0.0, w + 50.0, 0.0]  # right of the image
  boxes[kinds == 4, :2] = np.round(boxes[kinds == 4, :2]) + 0.5
  boxes[kinds == 4, 2:] = boxes[kinds == 4, :2] + mask_size  # 1:1 half-pixel boxes
  masks = rng.random((n, mask_size, mask_size)).astype(np.float32)
  # Exact 0.5 values and large constant areas: ties of the >= / > threshold.
  masks[kinds == 0] = np.where(rng.random((int((kinds == 0).sum()), mask_size, mask_size)) < 0.5,
                               np.float32(0.5), masks[kinds == 0])
  masks[kinds == 4] = np.where(masks[kinds == 4] < 0.3, np.float32(0.5), masks[kinds == 4])
  return masks, boxes.astype(np.float32)


@pytest.mark.parametrize("method", ["grid_sample", "tv_legacy"])
@pytest.mark.parametrize("hw,n,mask_size,seed", [((120, 160), 60, 28, 0), ((37, 300), 40, 28, 1),
                                                 ((1100, 1700), 24, 28, 2),
                                                 ((96, 128), 40, 14, 3)])
def test_soft_values_equal_host_bitwise(method, hw, n, mask_size, seed):
  rng = np.random.default_rng(seed)
  masks, boxes = _random_case(rng, n, hw, mask_size)
  got = _device_soft(method, masks, boxes, hw)
  for i in range(n):
    y0, x0, soft = _host_soft(method, masks[i], boxes[i], hw)
    gy, gx, gsoft = got[i]
    assert gsoft.shape == soft.shape, (i, boxes[i])
    if soft.size:
      assert (gy, gx) == (y0, x0)
      np.testing.assert_array_equal(gsoft, soft, err_msg=f"{method} box {i} {boxes[i]}")


@pytest.mark.parametrize("method,inclusive", [("grid_sample", True), ("grid_sample", False),
                                              ("tv_legacy", False), ("tv_legacy", True)])
def test_binary_masks_equal_host(method, inclusive):
  rng = np.random.default_rng(7)
  for hw in [(64, 80), (333, 517)]:
    masks, boxes = _random_case(rng, 50, hw)
    want = paste.paste_masks(masks, boxes, hw, method=method, inclusive=inclusive)
    got = paste_device.paste_masks(masks, boxes, hw, method=method, inclusive=inclusive)
    np.testing.assert_array_equal(got, want)
    assert want.any() and not want.all()


def test_golden_masks():
  g = golden.load("mask_paste")
  masks, boxes = g["mask_probs"].astype(np.float32), g["boxes"].astype(np.float32)
  hw = tuple(int(v) for v in g["image_size_hw"])
  np.testing.assert_array_equal(paste_device.paste_masks(masks, boxes, hw), g["d2_binary"])
  np.testing.assert_array_equal(paste_device.paste_masks(masks, boxes, hw), g["mm_binary"])
  np.testing.assert_array_equal(
      paste_device.paste_masks(masks, boxes, hw, method="tv_legacy", inclusive=False),
      g["tv_binary_gt05"])
  # The exact-0.5 pixels (29 of box 0, 72 of box 6) decide differently under > 0.5.
  strict = paste_device.paste_masks(masks, boxes, hw, inclusive=False)
  assert int((g["d2_binary"] & ~strict).sum()) == 29 + 72
  # Soft values of the device equal the golden float32 maps inside the CPU window.
  for k, (y0, x0, soft) in enumerate(_device_soft("grid_sample", masks, boxes, hw)):
    ref = g["d2_soft_f32"][k][y0:y0 + soft.shape[0], x0:x0 + soft.shape[1]]
    np.testing.assert_array_equal(soft, ref, err_msg=f"box {k}")


def test_zero_width_boxes_mmdet_vs_d2():
  mask = np.ones((1, 28, 28), np.float32)
  box = np.float32([[50.0, 10.0, 50.0, 30.0]])
  for inf_to_zero in (True, False):
    want = paste.paste_masks(mask, box, (64, 100), inf_to_zero=inf_to_zero)
    got = paste_device.paste_masks(mask, box, (64, 100), inf_to_zero=inf_to_zero)
    np.testing.assert_array_equal(got, want)
    assert want.any() == inf_to_zero


def test_chunking_bounds_calls_and_keeps_results():
  assert paste_plan.chunk_sizes(0, 4096) == []
  assert paste_plan.chunk_sizes(5, 4096) == [64]
  assert paste_plan.chunk_sizes(300, 4096) == [512]
  assert paste_plan.chunk_sizes(10000, 4096) == [4096, 4096, 2048]
  assert paste_plan.chunk_sizes(130, 64) == [64, 64, 64]
  rng = np.random.default_rng(3)
  masks, boxes = _random_case(rng, 30, (400, 500))
  big = paste_device.paste_masks(masks, boxes, (400, 500))
  small = paste_device.paste_masks(masks, boxes, (400, 500), chunk_tiles=64)
  np.testing.assert_array_equal(small, big)
  plan = paste_plan.plan_tiles(np.arange(30), boxes, np.asarray((400, 500)),
                                 method="grid_sample", mask_size=28)
  assert len(paste_plan.chunk_sizes(len(plan.table), 64)) > 1
  # Bytes moved per detection: its tiles only, not the image.
  assert paste_plan.tiles_bytes(plan) < 30 * 400 * 500 // 8


def test_windows_match_host_windows():
  rng = np.random.default_rng(5)
  masks, boxes = _random_case(rng, 80, (90, 140))
  for method in ("grid_sample", "tv_legacy"):
    windows, _ = paste_plan.window_bounds(boxes, np.tile([90, 140], (80, 1)), method, 28)
    for i in range(80):
      y0, x0, soft = _host_soft(method, masks[i], boxes[i], (90, 140))
      want = (y0, x0) + soft.shape if soft.size else (0, 0, 0, 0)
      assert tuple(windows[i]) == want, (method, boxes[i])


def _midpoint_cases(rng, n):
  """a * b + 1 with a * b within 2^-53 of 2^-24: the float64 sum lands on a float32 midpoint."""
  a = (1 + rng.integers(1, 1 << 23, n) * 2.0 ** -23).astype(np.float32)
  b = (2.0 ** -24 / a.astype(np.float64)).astype(np.float32)
  c = np.ones(n, np.float32)
  p = a.astype(np.float64) * b
  s = p + 1.0
  mid = (s.view(np.uint64) & np.uint64(0x1FFFFFFF)) == np.uint64(0x10000000)
  return a[mid], b[mid], c[mid]


def test_fma_f32_is_correctly_rounded():
  rng = np.random.default_rng(0)
  a, b, c = _midpoint_cases(rng, 20000)
  assert len(a) > 100
  ra = rng.random(5000, np.float32) * 4 - 2
  rb = rng.random(5000, np.float32) * 4 - 2
  rc = -(ra * rb) + rng.normal(0, 1e-6, 5000).astype(np.float32)
  a, b, c = (np.concatenate(v) for v in ((a, ra), (b, rb), (c, rc)))
  with jax.enable_x64(True):
    got = np.asarray(jax.jit(paste_device.fma_f32)(a, b, c))
  want = resample.fma_f32(a, b, c)
  np.testing.assert_array_equal(got, want)
  naive = (a.astype(np.float64) * b + c).astype(np.float32)  # double rounding
  assert (naive != want).sum() > 50
  for i in np.flatnonzero(naive != want)[:20]:  # exact rational check of a few
    exact = Fraction(float(a[i])) * Fraction(float(b[i])) + Fraction(float(c[i]))
    lo, hi = sorted((float(want[i]), float(naive[i])))
    assert abs(Fraction(float(want[i])) - exact) < abs(Fraction(float(naive[i])) - exact)
    assert lo < hi
