"""Host-side evaluation work that runs in worker processes: image loading, mask paste, RLE.

Two ways to a detection's mask: `paste_and_encode` pastes the 28x28 probabilities here (the host
paste, `config.eval.paste = 'host'`), `encode_tiles` unpacks the tiles the device pasted
(ops/paste_device.py, the default); both RLE-encode from the box window and give identical
results.

numpy + cv2 / Pillow + pycocotools only (no JAX import), so that the spawned worker processes of
`evaluation.evaluator` start fast and never touch the accelerator.

Memory per detection is bounded by its box window: the 28x28 probabilities are pasted only inside
the window the reference frameworks evaluate (ops/paste.py), and the COCO RLE of the full-image
mask is computed from that window directly (`window_rle`), without an [H, W] buffer, let alone an
[N, H, W] stack. The RLE string is identical to `pycocotools.mask.encode` of the full mask.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from pycocotools import mask as mask_util

from maskrcnn_jax import conventions as conventions_lib
from maskrcnn_jax import errors
from maskrcnn_jax.data import transforms
from maskrcnn_jax.evaluation import coco_format
from maskrcnn_jax.ops import paste as paste_lib
from maskrcnn_jax.ops import paste_plan


class ImageSizeMismatchError(errors.UserError, ValueError):
  """A decoded image's size differs from the width/height its annotation file records."""


def load_image(path: str, kwargs: Dict[str, Any], pad_to: Sequence[int],
               expected_hw: Optional[Sequence[int]] = None) -> Dict[str, Any]:
  """Decodes and preprocesses one image for the model (`transforms.read_image` + `preprocess`).

  Args:
    path: image file.
    kwargs: `transforms.preprocess_kwargs(config)`.
    pad_to: (Hp, Wp) the padded size of the image's batch.
    expected_hw: (H, W) from the annotation file; a decoded image of another size raises
      `ImageSizeMismatchError` naming the file (the batch plan was made from these sizes, and
      COCOeval would compare masks of different sizes; detectron2 raises here too,
      `detection_utils.check_image_size`).

  Returns:
    `transforms.preprocess`'s dict (image [Hp, Wp, 3] float32, image_hw, orig_hw, scale_factor)
    plus 'seconds' (float, the time this took).
  """
  t0 = time.perf_counter()
  image = transforms.read_image(path, convention=kwargs["convention"])
  if expected_hw is not None and tuple(image.shape[:2]) != tuple(int(v) for v in expected_hw):
    raise ImageSizeMismatchError(
        f"image {path} decodes to {image.shape[0]}x{image.shape[1]} (HxW) but the annotation file "
        f"says {int(expected_hw[0])}x{int(expected_hw[1])}")
  out = transforms.preprocess(image, pad_to=tuple(int(v) for v in pad_to), **kwargs)
  out["seconds"] = time.perf_counter() - t0
  return out


def window_rle(window: np.ndarray, y0: int, x0: int, image_hw: Sequence[int]) -> Dict[str, Any]:
  """COCO RLE of a full-image mask that is zero outside one window.

  Args:
    window: [h, w] bool, the mask inside rows y0..y0+h-1 and columns x0..x0+w-1 (inside the
      image).
    y0, x0: the window's top-left corner in image pixels.
    image_hw: (H, W) of the full image.

  Returns:
    {'size': [H, W], 'counts': str}, equal to `coco_format.encode_mask(full)` of the full mask,
    computed in O(h * w) rather than O(H * W).
  """
  h_img, w_img = int(image_hw[0]), int(image_hw[1])
  n = h_img * w_img
  window = np.asarray(window, bool)
  wh, ww = window.shape if window.ndim == 2 else (0, 0)
  if wh and ww and (y0 < 0 or x0 < 0 or y0 + wh > h_img or x0 + ww > w_img):
    raise ValueError(f"window {wh}x{ww} at ({y0}, {x0}) exceeds the image {h_img}x{w_img}")
  if wh == 0 or ww == 0 or not window.any():
    counts = np.array([n], np.int64)
  else:
    # pycocotools scans the mask in column-major (Fortran) order: pixel (y, x) is at x * H + y.
    cols = window.T.astype(np.int8)  # [ww, wh], one row per image column
    if wh == h_img:
      # The window spans whole columns, which are contiguous in Fortran order: runs may cross
      # from one column into the next.
      d = np.diff(cols.reshape(-1), prepend=np.int8(0), append=np.int8(0))
      starts = np.flatnonzero(d == 1) + x0 * h_img
      ends = np.flatnonzero(d == -1) + x0 * h_img
    else:
      # At least one zero pixel outside the window separates consecutive columns.
      d = np.diff(cols, axis=1, prepend=np.zeros((ww, 1), np.int8),
                  append=np.zeros((ww, 1), np.int8))
      js, is_ = np.nonzero(d == 1)  # row-major order = ascending Fortran index
      je, ie = np.nonzero(d == -1)
      starts = (x0 + js).astype(np.int64) * h_img + y0 + is_
      ends = (x0 + je).astype(np.int64) * h_img + y0 + ie
    bounds = np.empty(2 * len(starts) + 2, np.int64)
    bounds[0] = 0
    bounds[1:-1:2] = starts
    bounds[2:-1:2] = ends
    bounds[-1] = n
    counts = np.diff(bounds)  # zeros-run first (may be 0), alternating, like rleEncode
    if counts[-1] == 0:  # the mask ends with foreground: no trailing zeros run
      counts = counts[:-1]
  rle = mask_util.frPyObjects({"counts": counts.tolist(), "size": [h_img, w_img]}, h_img, w_img)
  c = rle["counts"]
  return {"size": [h_img, w_img], "counts": c.decode("utf-8") if isinstance(c, bytes) else c}


def paste_window(prob: np.ndarray, box: np.ndarray, image_hw: Sequence[int],
                 conv: conventions_lib.Convention) -> Tuple[int, int, np.ndarray]:
  """The binary mask of one detection inside its paste window (the convention's algorithm).

  The rule of `paste.convention_args` (parity_spec 3.13): grid_sample (mmdet / detectron2) with
  threshold 0.5 (>= for both), or torchvision's legacy paste binarized with > 0.5.

  Args:
    prob: [M, M] float32 mask probabilities (M = 28, or 14 for C4).
    box: [4] float32 xyxy paste box in original-image pixels.
    image_hw: (H, W) original image size.
    conv: the convention record.

  Returns:
    (y0, x0, window [h, w] bool).
  """
  return paste_lib.paste_mask(prob, box, image_hw, **paste_lib.convention_args(conv))


def _entries(job: Dict[str, Any]) -> Tuple[List[Dict[str, Any]], Tuple[int, int]]:
  """The COCO result dicts of a job's detections without 'segmentation' (and its image size)."""
  conv = conventions_lib.get(job["convention"])
  entries = coco_format.detections_to_coco(
      int(job["image_id"]), job["boxes"], job["scores"], job["labels"], None,
      category_ids=job["category_ids"], mask_scores=job.get("mask_scores"),
      float64_subtract=conv.coco_wh_float64)
  return entries, tuple(int(v) for v in job["orig_hw"])


def _set_segmentation(entry: Dict[str, Any], rle: Dict[str, Any]) -> None:
  mask_score = entry.pop("mask_score", None)  # keeps the key order of the host path
  entry["segmentation"] = rle
  if mask_score is not None:
    entry["mask_score"] = mask_score


def paste_and_encode(job: Dict[str, Any]) -> Tuple[int, List[Dict[str, Any]], float]:
  """COCO results of one image from the model's valid detections.

  Args:
    job: dict with
      image_id: int COCO image id.
      orig_hw: (H, W) original image size.
      convention: name.
      boxes [D, 4] float32 xyxy (original pixels), scores [D] float32, labels [D] int,
      paste_boxes [D, 4] float32, mask_probs [D, M, M] float32, optional mask_scores [D]
        (Mask Scoring R-CNN), all already restricted to the valid detections in score order.
      category_ids: [L] int table label -> dataset category id.

  Returns:
    (image_id, list of COCO result dicts in detection order, seconds spent). Each dict is
    `coco_format.detections_to_coco`'s entry with 'segmentation' (RLE, str counts) and, for Mask
    Scoring R-CNN, 'mask_score'.
  """
  t0 = time.perf_counter()
  conv = conventions_lib.get(job["convention"])
  entries, hw = _entries(job)
  for entry, prob, box in zip(entries, job["mask_probs"], job["paste_boxes"]):
    y0, x0, window = paste_window(prob, box, hw, conv)
    _set_segmentation(entry, window_rle(window, y0, x0, hw))
  return int(job["image_id"]), entries, time.perf_counter() - t0


def encode_tiles(job: Dict[str, Any]) -> Tuple[int, List[Dict[str, Any]], float]:
  """COCO results of one image whose masks were pasted on the device (ops/paste_device.py).

  Args:
    job: as `paste_and_encode`'s, with instead of mask_probs / paste_boxes
      windows [D, 4] int (y0, x0, h, w), grid [D, 2] int tiles down / across, first [D + 1] int
      offsets of each detection's tiles in `tiles`, tiles [T, 32, 4] uint8 (`paste_plan`).

  Returns:
    (image_id, COCO result dicts, seconds): the same dicts as `paste_and_encode` gives for the
    same detections.
  """
  t0 = time.perf_counter()
  entries, hw = _entries(job)
  windows, grid, first, tiles = job["windows"], job["grid"], job["first"], job["tiles"]
  for i, entry in enumerate(entries):
    window = paste_plan.unpack_window(tiles[first[i]:first[i + 1]], grid[i], windows[i, 2:])
    _set_segmentation(entry, window_rle(window, int(windows[i, 0]), int(windows[i, 1]), hw))
  return int(job["image_id"]), entries, time.perf_counter() - t0
