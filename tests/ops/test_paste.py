"""Mask pasting against golden mask_paste.npz (README section 7; parity_spec 3.13).

Every comparison with the golden arrays is bitwise: the float32 grid arithmetic, torch's FMA
contractions and the kernel choice of F.interpolate are all reproduced (see ops/paste.py).
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from maskrcnn_jax.ops import paste
from tests import golden


@pytest.fixture(scope="module")
def g():
  return golden.load("mask_paste")


def _inputs(g):
  return (g["mask_probs"].astype(np.float32), g["boxes"].astype(np.float32),
          tuple(int(v) for v in g["image_size_hw"]))


def _full(y0, x0, window, hw, dtype):
  out = np.zeros(hw, dtype)
  out[y0:y0 + window.shape[0], x0:x0 + window.shape[1]] = window
  return out


@pytest.mark.parametrize("key", ["d2_soft_f32", "mm_soft_f32"])
def test_grid_sample_soft_full_image_bitwise(g, key):
  masks, boxes, hw = _inputs(g)
  for k in range(len(boxes)):
    _, _, soft = paste.paste_mask_grid_sample_soft(masks[k], boxes[k], hw, full_image=True)
    assert soft.dtype == np.float32 and soft.shape == hw
    np.testing.assert_array_equal(soft, g[key][k], err_msg=f"box {k} ({g['box_kind'][k]})")


def test_grid_sample_soft_window_is_cpu_window(g):
  # The CPU paths evaluate only [floor(x1) - 1, ceil(x2) + 1) x ...: there they equal the full map.
  masks, boxes, hw = _inputs(g)
  for k in range(len(boxes)):
    y0, x0, soft = paste.paste_mask_grid_sample_soft(masks[k], boxes[k], hw)
    ref = g["d2_soft_f32"][k]
    np.testing.assert_array_equal(soft, ref[y0:y0 + soft.shape[0], x0:x0 + soft.shape[1]])
    outside = ref.copy()
    outside[y0:y0 + soft.shape[0], x0:x0 + soft.shape[1]] = 0
    assert (outside < 0.5).all()
  # The box entirely outside the image (index 8): an empty window where the references raise.
  assert g["box_kind"][8] == "outside_image" and g["d2_binary_cpu_path_raised"][8]
  _, _, soft = paste.paste_mask_grid_sample_soft(masks[8], boxes[8], hw)
  assert soft.size == 0


@pytest.mark.parametrize("key", ["d2_binary", "mm_binary"])
def test_grid_sample_binary_bitwise(g, key):
  masks, boxes, hw = _inputs(g)
  got = paste.paste_masks(masks, boxes, hw, method="grid_sample", threshold=0.5, inclusive=True)
  assert got.dtype == bool and got.shape == g[key].shape
  for k in range(len(boxes)):
    np.testing.assert_array_equal(got[k], g[key][k], err_msg=f"box {k} ({g['box_kind'][k]})")
    y0, x0, window = paste.paste_mask_grid_sample(masks[k], boxes[k], hw)
    np.testing.assert_array_equal(_full(y0, x0, window, hw, bool), g[key][k])


def test_exact_half_pixels_follow_float32(g):
  masks, boxes, hw = _inputs(g)
  soft = np.stack([paste.paste_mask_grid_sample_soft(m, b, hw, full_image=True)[2]
                   for m, b in zip(masks, boxes)])
  # README: 29 pasted pixels of box 0 and 72 of box 6 are exactly 0.5.
  assert int((soft[0] == 0.5).sum()) == 29 and int((soft[6] == 0.5).sum()) == 72
  # float64 flips 9 of those decisions; the float32 result must not.
  f64 = g["d2_soft_f64"] >= 0.5
  assert int((f64 != g["d2_binary"]).sum()) == 9
  np.testing.assert_array_equal(soft >= 0.5, g["d2_binary"])
  strict = paste.paste_masks(masks, boxes, hw, inclusive=False)
  assert int((g["d2_binary"] & ~strict).sum()) == 29 + 72


def test_tv_legacy_soft_bitwise(g):
  masks, boxes, hw = _inputs(g)
  for k in range(len(boxes)):
    y0, x0, soft = paste.paste_mask_tv_legacy(masks[k], boxes[k], hw)
    if g["tv_raised"][k]:
      assert soft.size == 0  # torchvision raises on the box outside the image; we return nothing
      assert np.isnan(g["tv_soft_f32"][k]).all()
      continue
    np.testing.assert_array_equal(_full(y0, x0, soft, hw, np.float32), g["tv_soft_f32"][k],
                                  err_msg=f"box {k} ({g['box_kind'][k]})")


def test_tv_legacy_binary_gt05(g):
  masks, boxes, hw = _inputs(g)
  got = paste.paste_masks(masks, boxes, hw, method="tv_legacy", threshold=0.5, inclusive=False)
  np.testing.assert_array_equal(got, g["tv_binary_gt05"])


def test_tv_legacy_differs_from_grid_sample(g):
  # README: 478 binary pixels differ in all; guards against pasting with the wrong algorithm.
  assert int((g["tv_binary_gt05"] != g["d2_binary"]).sum()) == 478


def test_tv_expanded_box():
  # 28 -> 30: the box grows by 30/28 about its centre, then truncates toward zero.
  np.testing.assert_array_equal(paste.tv_legacy_expanded_box(np.float32([0, 0, 28, 28]), 28),
                                [-1, -1, 29, 29])
  box = np.float32([-10.5, -8.25, 30.4, 25.6])
  np.testing.assert_array_equal(paste.tv_legacy_expanded_box(box, 28),
                                [-11, -9, 31, 26])


def test_zero_width_box_mmdet_vs_d2():
  mask = np.ones((28, 28), np.float32)
  box = np.float32([50.0, 10.0, 50.0, 30.0])  # zero width: (x + 0.5 - x0) / 0 = +-inf
  y0, x0, soft = paste.paste_mask_grid_sample_soft(mask, box, (64, 100), inf_to_zero=True)
  # mmdet sets the infinite grid x to 0: every column of the window samples the mask centre.
  assert (y0, x0) == (9, 49) and soft.shape == (22, 2)
  assert (soft[1:21] >= 0.5).all() and not (soft[[0, 21]] >= 0.5).any()
  _, _, soft_d2 = paste.paste_mask_grid_sample_soft(mask, box, (64, 100), inf_to_zero=False)
  assert not (soft_d2 >= 0.5).any()  # NaN / 0 * inf: nothing pasted
  # tv: w = max(int(x2 - x1 + 1), 1) = 1 column.
  _, x0_tv, soft_tv = paste.paste_mask_tv_legacy(mask, box, (64, 100))
  assert soft_tv.shape[1] == 1 and x0_tv == 50


@pytest.mark.parametrize("box", [[200.0, 10.0, 250.0, 40.0], [-90.0, -50.0, -1.5, -2.0],
                                 [10.0, 500.0, 40.0, 600.0]])
def test_boxes_outside_give_empty_masks(box):
  mask = np.full((28, 28), 0.9, np.float32)
  for method in ("grid_sample", "tv_legacy"):
    out = paste.paste_masks(mask[None], np.float32([box]), (120, 160), method=method)
    assert out.shape == (1, 120, 160) and not out.any()


def test_empty_input():
  out = paste.paste_masks(np.zeros((0, 28, 28), np.float32), np.zeros((0, 4), np.float32), (5, 6))
  assert out.shape == (0, 5, 6) and out.dtype == bool


def test_huge_box_is_memory_bounded():
  # A box 1000x the image: only the in-image window is evaluated (fast, small).
  mask = np.random.default_rng(0).random((28, 28)).astype(np.float32)
  box = np.float32([-50000.0, -40000.0, 60000.0, 45000.0])
  t0 = time.time()
  y0, x0, soft = paste.paste_mask_grid_sample_soft(mask, box, (480, 640))
  y0t, x0t, soft_tv = paste.paste_mask_tv_legacy(mask, box, (480, 640))
  assert time.time() - t0 < 5
  assert (y0, x0, soft.shape) == (0, 0, (480, 640))
  assert (y0t, x0t, soft_tv.shape) == (0, 0, (480, 640))


def test_tv_window_subset_matches_full_interpolation():
  # The tv window interpolates only the in-image rows / columns; compare with the full resize.
  from maskrcnn_jax.data import transforms
  mask = np.random.default_rng(1).random((28, 28)).astype(np.float32)
  box = np.float32([-30.3, 20.7, 140.2, 170.9])
  hw = (100, 120)
  y0, x0, soft = paste.paste_mask_tv_legacy(mask, box, hw)
  b = paste.tv_legacy_expanded_box(box, 28)
  h, w = int(b[3] - b[1] + 1), int(b[2] - b[0] + 1)
  full = transforms.torch_upsample_bilinear(np.pad(mask, 1)[None], (h, w))[0]
  np.testing.assert_array_equal(soft, full[y0 - b[1]:y0 - b[1] + soft.shape[0],
                                           x0 - b[0]:x0 - b[0] + soft.shape[1]])


def test_convention_args_are_the_references_rules():
  """One place decides each convention's paste algorithm and threshold (parity_spec 3.13)."""
  assert paste.convention_args("mmdet") == dict(method="grid_sample", threshold=0.5, inclusive=True)
  assert paste.convention_args("detectron2") == dict(method="grid_sample", threshold=0.5,
                                                     inclusive=True)
  assert paste.convention_args("torchvision") == dict(method="tv_legacy", threshold=0.5,
                                                      inclusive=False)
