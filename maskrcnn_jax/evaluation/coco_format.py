"""COCO results-format conversion of detections (parity_spec 3.15).

Host-side numpy + pycocotools. Boxes go out as [x, y, w, h] with w = x2 - x1 (no +1) in all three
frameworks; masks as pycocotools RLE of the Fortran-order uint8 mask with `counts` decoded to str
(mmdet `datasets/coco.py:_segm2json`, detectron2
`evaluation/coco_evaluation.py:instances_to_coco_json`, torchvision
`references/detection/coco_eval.py`).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from pycocotools import mask as mask_util


def encode_mask(mask: np.ndarray) -> Dict[str, Any]:
  """RLE-encodes one binary mask.

  Args:
    mask: [H, W] bool (or any dtype; nonzero = foreground).

  Returns:
    {'size': [H, W], 'counts': str}: `mask_util.encode(np.array(mask[:, :, None], order='F',
    dtype='uint8'))[0]` with the bytes counts decoded as UTF-8 (JSON serializable).
  """
  mask = np.asarray(mask)
  if mask.ndim != 2:
    raise ValueError(f"expected an [H, W] mask, got shape {mask.shape}")
  rle = mask_util.encode(np.asfortranarray((mask != 0)[:, :, None].astype(np.uint8)))[0]
  counts = rle["counts"]
  return {"size": [int(v) for v in rle["size"]],
          "counts": counts.decode("utf-8") if isinstance(counts, bytes) else counts}


def decode_mask(rle: Dict[str, Any]) -> np.ndarray:
  """Inverse of `encode_mask`: [H, W] bool."""
  counts = rle["counts"]
  rle = {"size": list(rle["size"]),
         "counts": counts.encode("utf-8") if isinstance(counts, str) else counts}
  return mask_util.decode(rle).astype(bool)


def xyxy_to_xywh(boxes: np.ndarray, *, float64_subtract: bool = False) -> np.ndarray:
  """(x1, y1, x2, y2) -> (x1, y1, x2 - x1, y2 - y1), no +1.

  Args:
    boxes: [N, 4] (or [4]) float32, xyxy in original-image pixels.
    float64_subtract: mmdet's `xyxy2xywh` subtracts the Python floats of `bbox.tolist()` (float64);
      detectron2 (`BoxMode.convert`) and torchvision (`convert_to_xywh`) subtract in float32. The
      difference is at most half a float32 ulp of the coordinate.

  Returns:
    Same shape; float64 if float64_subtract else float32.
  """
  b = np.asarray(boxes)
  b = b.astype(np.float64) if float64_subtract else b.astype(np.float32)
  out = b.copy()
  out[..., 2] = b[..., 2] - b[..., 0]
  out[..., 3] = b[..., 3] - b[..., 1]
  return out


def detections_to_coco(image: Union[int, str], boxes: np.ndarray, scores: np.ndarray,
                       labels: np.ndarray,
                       masks: Optional[Union[np.ndarray, Sequence[np.ndarray]]] = None,
                       *, category_ids: Optional[Sequence[int]] = None,
                       mask_scores: Optional[np.ndarray] = None,
                       float64_subtract: bool = False) -> List[Dict[str, Any]]:
  """One COCO result dict per detection.

  Args:
    image: the COCO image id (int) or, for images outside a dataset, the file name (str); stored
      as 'image_id' or 'file_name'.
    boxes: [N, 4] float32 xyxy in original-image pixels.
    scores: [N] float32 box scores.
    labels: [N] int contiguous labels; mapped through `category_ids` when given (mmdet
      `cat_ids[label]`, d2 reverse `thing_dataset_id_to_contiguous_id`), else used as the category
      id directly (torchvision, or already mapped).
    masks: optional [N, H, W] bool or a sequence of N [H, W] bool masks (full image).
    category_ids: optional table label -> dataset category id.
    mask_scores: optional [N] float32 (Mask Scoring R-CNN: bbox score x MaskIoU). Stored as
      'mask_score'; `split_bbox_segm` puts it in 'score' of the segm results (mmdet `_segm2json`).
    float64_subtract: see `xyxy_to_xywh` (True = mmdet).

  Returns:
    list of {'image_id' | 'file_name', 'category_id': int, 'bbox': [x, y, w, h] floats,
    'score': float, optional 'segmentation': RLE with str counts, optional 'mask_score': float}.
  """
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  scores = np.asarray(scores, np.float32).reshape(-1)
  labels = np.asarray(labels).reshape(-1)
  n = len(boxes)
  if len(scores) != n or len(labels) != n:
    raise ValueError(f"boxes ({n}), scores ({len(scores)}) and labels ({len(labels)}) differ in "
                     "length")
  if masks is not None and len(masks) != n:
    raise ValueError(f"{len(masks)} masks for {n} boxes")
  if mask_scores is not None:
    mask_scores = np.asarray(mask_scores, np.float32).reshape(-1)
    if len(mask_scores) != n:
      raise ValueError(f"{len(mask_scores)} mask scores for {n} boxes")
  key = "file_name" if isinstance(image, str) else "image_id"
  image_value = image if isinstance(image, str) else int(image)
  xywh = xyxy_to_xywh(boxes, float64_subtract=float64_subtract)
  table = None if category_ids is None else np.asarray(category_ids)
  results = []
  for i in range(n):
    label = int(labels[i])
    entry = {
        key: image_value,
        "category_id": int(table[label]) if table is not None else label,
        "bbox": [float(v) for v in xywh[i]],
        "score": float(scores[i]),
    }
    if masks is not None:
      entry["segmentation"] = encode_mask(masks[i])
    if mask_scores is not None:
      entry["mask_score"] = float(mask_scores[i])
    results.append(entry)
  return results


def split_bbox_segm(results: Sequence[Dict[str, Any]]
                    ) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
  """Splits `detections_to_coco` entries into bbox results and segm results for COCOeval.

  The segm entries score with 'mask_score' where present (mmdet `_segm2json` for Mask Scoring
  R-CNN), else with the box score.
  """
  bbox, segm = [], []
  for r in results:
    base = {k: v for k, v in r.items() if k not in ("segmentation", "mask_score")}
    bbox.append(base)
    if "segmentation" in r:
      s = dict(base, segmentation=r["segmentation"])
      if "mask_score" in r:
        s["score"] = r["mask_score"]
      segm.append(s)
  return bbox, segm
