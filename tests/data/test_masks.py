"""Mask crops inside the box (data/masks.py) against pycocotools' full-image bitmaps."""
from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_util

from maskrcnn_jax.data import masks

H, W = 48, 64


def _random_polygons(rng):
  """1-2 polygons of 3-8 vertices, some outside the image, with 0-2 decimals (like COCO's)."""
  parts = [list(rng.uniform(-10, W + 10, 2 * int(rng.integers(3, 9))).round(rng.integers(0, 3)))]
  if rng.random() < 0.3:
    parts.append(list(rng.uniform(0, W - 4, 8)))
  return parts


def _random_box(rng):
  x1, y1 = rng.uniform(0, W), rng.uniform(0, H)
  return (x1, y1, min(x1 + rng.uniform(0, 60), W), min(y1 + rng.uniform(0, 50), H))


def _compressed(bitmap):
  rle = mask_util.encode(np.asfortranarray(bitmap.astype(np.uint8)))
  return dict(size=list(bitmap.shape), counts=rle["counts"].decode("ascii"))


def _uncompressed(bitmap):
  flat = bitmap.astype(np.uint8).flatten(order="F")
  change = np.flatnonzero(np.diff(flat)) + 1
  bounds = np.concatenate([[0], change, [flat.size]])
  counts = np.diff(bounds).tolist()
  if flat[0]:
    counts = [0] + counts
  return dict(size=list(bitmap.shape), counts=counts)


def test_rle_counts_and_windows_match_pycocotools():
  rng = np.random.default_rng(0)
  for _ in range(300):
    bitmap = mask_util.decode(mask_util.merge(
        mask_util.frPyObjects(_random_polygons(rng), H, W))).astype(bool)
    if rng.random() < 0.2:  # large runs and a mask touching the first pixel
      bitmap[:, : int(rng.integers(0, W))] = True
    rle = _compressed(bitmap)
    counts = masks.rle_counts(rle["counts"])
    np.testing.assert_array_equal(counts, masks.rle_counts(_uncompressed(bitmap)["counts"]))
    assert counts.sum() == H * W
    r0, c0 = int(rng.integers(0, H)), int(rng.integers(0, W))
    r1, c1 = int(rng.integers(r0 + 1, H + 1)), int(rng.integers(c0 + 1, W + 1))
    np.testing.assert_array_equal(masks.window_from_counts(counts, H, (r0, r1), (c0, c1)),
                                  bitmap[r0:r1, c0:c1])
  # Long runs take several characters, negative differences a sign bit.
  big = np.zeros((600, 500), bool)
  big[100:550, 30:470] = True
  big[300:310, 200:210] = False
  np.testing.assert_array_equal(masks.window_from_counts(
      masks.rle_counts(_compressed(big)["counts"]), 600, (0, 600), (0, 500)), big)


@pytest.mark.parametrize("size", [4, 7, 8, 16])
def test_crop_segmentation_is_the_crop_of_the_full_bitmap(size):
  """Polygons (frPyObjects + merge, like the references), compressed and uncompressed RLE, and
  box-only annotations: the crop from the json segmentation equals `crop_from_bitmap` of
  pycocotools' full-image bitmap, bit for bit."""
  rng = np.random.default_rng(size)
  for _ in range(250):
    polygons = _random_polygons(rng)
    bitmap = mask_util.decode(mask_util.merge(mask_util.frPyObjects(polygons, H, W))).astype(bool)
    box = _random_box(rng)
    want = masks.crop_from_bitmap(bitmap, box, size)
    assert want.shape == (size, size) and want.dtype == np.uint8
    for segm in (polygons, _compressed(bitmap), _uncompressed(bitmap)):
      np.testing.assert_array_equal(masks.crop_segmentation(segm, box, (H, W), size), want)
    # Box only: the filled box (pixels whose centre is inside it), coco.instance_masks' rule.
    filled = np.zeros((H, W), bool)
    x1, y1, x2, y2 = box
    filled[int(np.ceil(y1 - 0.5)):int(np.ceil(y2 - 0.5)),
           int(np.ceil(x1 - 0.5)):int(np.ceil(x2 - 0.5))] = True
    np.testing.assert_array_equal(masks.crop_segmentation(None, box, (H, W), size),
                                  masks.crop_from_bitmap(filled, box, size))


def test_crop_area_averages_large_boxes():
  """A box of more than S pixels: each cell is the majority of its G x G samples."""
  bitmap = np.zeros((H, W), bool)
  bitmap[:, :30] = True  # the left 30 of 60 columns of the box below
  bitmap[10:20, 40:42] = True  # 2 of the 5 sample columns of a cell: under half
  bitmap[20:30, 45:48] = True  # 3 of 5 columns, all sample rows of cells 6 and 7: set
  crop = masks.crop_from_bitmap(bitmap, (0.0, 0.0, 60.0, 40.0), 12)  # G = 5 x 4 (x, y)
  want = np.repeat([[1] * 6 + [0] * 6], 12, axis=0)
  want[6:9, 9] = 1  # cell i covers rows [10 i / 3, 10 (i + 1) / 3): rows 20..30 are cells 6..8
  np.testing.assert_array_equal(crop, want)
  np.testing.assert_array_equal(masks.crop_segmentation(_compressed(bitmap), (0, 0, 60, 40),
                                                        (H, W), 12), crop)
