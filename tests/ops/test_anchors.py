"""Anchors against golden anchors.npz (README section 4; parity_spec 3.7)."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from maskrcnn_jax.ops import anchors
from tests import golden

SIZES = (32, 64, 128, 256, 512)
RATIOS = (0.5, 1.0, 2.0)
STRIDES = (4, 8, 16, 32, 64)
# prefix -> (round_to_int, dynamic_stride): mmdet and d2 share one formula, tv rounds and uses the
# padded // feature stride.
FRAMEWORKS = {"d2": (False, False), "mm": (False, False), "tv": (True, True)}


@pytest.mark.parametrize("fw", sorted(FRAMEWORKS))
def test_cell_anchors_bitwise(fw):
  g = golden.load("anchors")
  round_to_int, _ = FRAMEWORKS[fw]
  got = np.stack([anchors.cell_anchors(s, RATIOS, round_to_int=round_to_int) for s in SIZES])
  want = g[f"{fw}_cell_anchors"]
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_cell_anchors_hand_values():
  # parity_spec 3.7: level 0 is (+-22.627417, +-11.313708), (+-16, +-16), ...; tv rounds to 23 / 11.
  c = anchors.cell_anchors((32,), RATIOS, round_to_int=False)
  np.testing.assert_allclose(c[0], [-22.627417, -11.313708, 22.627417, 11.313708], rtol=1e-7)
  np.testing.assert_array_equal(c[1], [-16, -16, 16, 16])
  t = anchors.cell_anchors((512,), RATIOS, round_to_int=True)
  np.testing.assert_array_equal(t[0], [-362, -181, 362, 181])


def test_grid_anchor_order():
  cell = np.array([[-1, -2, 1, 2], [-3, -4, 3, 4]], np.float32)
  a = anchors.grid_anchors(cell, (2, 3), (5, 7))
  assert a.shape == (2 * 3 * 2, 4)
  # index (y * W + x) * A + a; x shifts by 7, y by 5.
  y, x, k = 1, 2, 1
  np.testing.assert_array_equal(a[(y * 3 + x) * 2 + k], cell[k] + [x * 7, y * 5, x * 7, y * 5])


@pytest.mark.parametrize("size", ["s800x1216", "s608x800"])
@pytest.mark.parametrize("fw", sorted(FRAMEWORKS))
def test_fpn_anchors_match_golden(size, fw):
  g = golden.load("anchors")
  round_to_int, dynamic_stride = FRAMEWORKS[fw]
  padded_hw = tuple(int(v) for v in size[1:].split("x"))
  feats = [tuple(int(v) for v in hw) for hw in g[f"{size}_feature_sizes_hw"]]
  levels = anchors.fpn_anchors(
      padded_hw=padded_hw, feature_sizes=feats, sizes=SIZES, aspect_ratios=RATIOS,
      strides=STRIDES, round_to_int=round_to_int, dynamic_stride=dynamic_stride)
  assert [len(a) for a in levels] == list(g[f"{size}_{fw}_count"])
  for lvl, a in enumerate(levels):
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a[:50], g[f"{size}_{fw}_first50"][lvl])
    np.testing.assert_array_equal(a[-50:], g[f"{size}_{fw}_last50"][lvl])
    np.testing.assert_array_equal(a.astype(np.float64).sum(0), g[f"{size}_{fw}_sum_f64"][lvl])
    digest = hashlib.sha256(np.ascontiguousarray(a, dtype="<f4").tobytes()).hexdigest()
    assert digest == g[f"{size}_{fw}_sha256"][lvl], f"level {lvl}"


@pytest.mark.parametrize("size", ["s800x1216", "s608x800"])
def test_tv_dynamic_strides(size):
  g = golden.load("anchors")
  padded_hw = tuple(int(v) for v in size[1:].split("x"))
  feats = g[f"{size}_feature_sizes_hw"]
  strides = np.asarray(padded_hw)[None, :] // feats
  np.testing.assert_array_equal(strides, g[f"{size}_tv_strides_hw"])
  # And fpn_anchors really uses them: the second P6 row's first anchor is shifted by stride_y.
  levels = anchors.fpn_anchors(
      padded_hw=padded_hw, feature_sizes=[tuple(f) for f in feats], sizes=SIZES,
      aspect_ratios=RATIOS, strides=STRIDES, round_to_int=True, dynamic_stride=True)
  w6, a = int(feats[4][1]), 3
  np.testing.assert_array_equal(levels[4][w6 * a, 1] - levels[4][0, 1], strides[4][0])
