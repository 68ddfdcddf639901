"""Synthetic COCO-val-like ground truth and model outputs, for evaluation benchmarks and tests.

No images and no model: `make_ground_truth` writes a COCO-format annotation dict with COCO val's
statistics (image sizes of COCO photos, ~7.3 instances per image, object sizes log-normal around
45 px with COCO's small / medium / large shares of roughly 40 / 35 / 25 %, 80 categories, a few
crowd regions and images without annotations); `iter_detections` yields per image what the model
returns after its valid mask (boxes, scores, labels, paste boxes, 28x28 mask probabilities),
`dets_per_image` of them: up to three per ground-truth instance (jittered boxes, ellipse-shaped
soft masks, mostly the right class) and false positives elsewhere, in score order. Nothing here
measures accuracy: it gives paste, RLE and COCOeval a realistic amount and shape of work.

numpy + pycocotools only.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
from pycocotools import mask as mask_util

from maskrcnn_jax.data import coco_categories

# (H, W) of frequent COCO val2017 photo sizes.
COCO_SIZES = ((480, 640), (427, 640), (640, 480), (375, 500), (640, 427), (424, 640),
              (512, 640), (333, 500), (480, 640), (360, 640))


def _object_sizes(rng: np.random.Generator, n: int, hw: Tuple[int, int]) -> np.ndarray:
  """[n, 2] (w, h): sqrt(area) log-normal (median 45 px, sigma 1), aspect log-normal (0.5)."""
  side = np.exp(rng.normal(np.log(45.0), 1.0, n))
  aspect = np.exp(rng.normal(0.0, 0.5, n))
  wh = np.stack([side * np.sqrt(aspect), side / np.sqrt(aspect)], 1)
  return np.clip(wh, 3.0, [hw[1] * 0.98, hw[0] * 0.98])


def _ellipse_polygon(cx, cy, rx, ry, n=16):
  t = np.linspace(0, 2 * np.pi, n, endpoint=False)
  return [float(v) for v in np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1).reshape(-1)]


def make_ground_truth(num_images: int, *, seed: int = 0, instances_per_image: float = 7.3,
                      crowd_fraction: float = 0.01, empty_fraction: float = 0.01,
                      sizes: Sequence[Tuple[int, int]] = COCO_SIZES) -> Dict[str, Any]:
  """A COCO-format annotation dict (images, annotations, the 80 COCO categories).

  Instances are ellipses annotated as 16-point polygons; a `crowd_fraction` of them are crowd
  regions (iscrowd=1, a rectangle as compressed RLE); an `empty_fraction` of the images have no
  annotations. Image ids are 1..num_images.
  """
  rng = np.random.default_rng(seed)
  images, anns = [], []
  cat_ids = np.asarray(coco_categories.COCO_CATEGORY_IDS)
  for i in range(num_images):
    h, w = sizes[int(rng.integers(len(sizes)))]
    image_id = i + 1
    images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "height": h, "width": w})
    if rng.random() < empty_fraction:
      continue
    n = max(int(rng.poisson(instances_per_image)), 1)
    for (bw, bh) in _object_sizes(rng, n, (h, w)):
      x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
      cat = int(cat_ids[int(rng.integers(len(cat_ids)))])
      if rng.random() < crowd_fraction:
        m = np.zeros((h, w), np.uint8)
        m[int(y):int(y + bh) + 1, int(x):int(x + bw) + 1] = 1
        rle = mask_util.encode(np.asfortranarray(m))
        segmentation = {"size": [h, w], "counts": rle["counts"].decode("utf-8")}
        crowd = 1
      else:
        poly = _ellipse_polygon(x + bw / 2, y + bh / 2, bw / 2, bh / 2)
        rle = mask_util.merge(mask_util.frPyObjects([poly], h, w))
        segmentation, crowd = [poly], 0
      bx, by, bbw, bbh = (float(v) for v in mask_util.toBbox(rle))
      anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat,
                   "segmentation": segmentation, "area": float(mask_util.area(rle)),
                   "bbox": [bx, by, bbw, bbh], "iscrowd": crowd})
  cats = [{"id": int(c), "name": name}
          for c, name in zip(coco_categories.COCO_CATEGORY_IDS, coco_categories.COCO_CLASS_NAMES)]
  return {"images": images, "annotations": anns, "categories": cats}


def _soft_ellipses(rng: np.random.Generator, boxes: np.ndarray, targets: np.ndarray,
                   mask_size: int) -> np.ndarray:
  """[n, M, M] float32 probabilities: a soft ellipse filling `targets` (xyxy) seen in `boxes`."""
  n = len(boxes)
  g = (np.arange(mask_size) + 0.5) / mask_size
  bw = np.maximum(boxes[:, 2] - boxes[:, 0], 1e-3)
  bh = np.maximum(boxes[:, 3] - boxes[:, 1], 1e-3)
  cx = ((targets[:, 0] + targets[:, 2]) / 2 - boxes[:, 0]) / bw
  cy = ((targets[:, 1] + targets[:, 3]) / 2 - boxes[:, 1]) / bh
  rx = np.maximum((targets[:, 2] - targets[:, 0]) / 2 / bw, 0.05)
  ry = np.maximum((targets[:, 3] - targets[:, 1]) / 2 / bh, 0.05)
  r2 = (((g[None, None, :] - cx[:, None, None]) / rx[:, None, None]) ** 2
        + ((g[None, :, None] - cy[:, None, None]) / ry[:, None, None]) ** 2)
  sharp = rng.uniform(3.0, 12.0, n)[:, None, None]
  logits = sharp * (1.0 - r2) + rng.normal(0.0, 0.7, (n, mask_size, mask_size))
  return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)


def iter_detections(gt: Dict[str, Any], *, dets_per_image: int = 100, seed: int = 0,
                    mask_size: int = 28, image_ids: Optional[Sequence[int]] = None,
                    category_ids: Sequence[int] = coco_categories.COCO_CATEGORY_IDS
                    ) -> Iterator[Dict[str, Any]]:
  """Per image of `gt` (or of `image_ids`), synthetic model outputs for `host.paste_and_encode`.

  Args:
    gt: a COCO-format annotation dict (`make_ground_truth`'s or any other).
    dets_per_image: D.
    seed: detections of an image depend only on (seed, image id).
    mask_size: M.
    image_ids: the images to yield (default all, ascending).
    category_ids: the model's classes: label i is category_ids[i] (the label table).

  Yields:
    dict(image_id, orig_hw (H, W), boxes [D, 4] float32 xyxy clipped to the image, scores [D]
    float32 descending, labels [D] int64 contiguous (index into category_ids), paste_boxes
    [D, 4] float32 (= boxes, detectron2's rule), mask_probs [D, M, M] float32), D = dets_per_image.
  """
  by_image: Dict[int, list] = {}
  for a in gt["annotations"]:
    if not a.get("iscrowd", 0):
      by_image.setdefault(int(a["image_id"]), []).append(a)
  label_of = {int(c): i for i, c in enumerate(category_ids)}
  num_labels = len(category_ids)
  infos = {int(im["id"]): im for im in gt["images"]}
  for image_id in (sorted(infos) if image_ids is None else image_ids):
    im = infos[int(image_id)]
    h, w = int(im["height"]), int(im["width"])
    rng = np.random.default_rng([seed, int(image_id)])
    anns = by_image.get(int(image_id), [])
    targets, labels, scores = [], [], []
    for a in anns:
      x, y, bw, bh = a["bbox"]
      for k in range(int(rng.integers(1, 4))):
        targets.append([x, y, x + bw, y + bh])
        right = rng.random() < 0.8
        labels.append(label_of[a["category_id"]] if right else int(rng.integers(num_labels)))
        scores.append(rng.uniform(0.3, 1.0) * (0.5 ** k) * (1.0 if right else 0.5))
    targets = np.asarray(targets, np.float64).reshape(-1, 4)[:dets_per_image]
    labels = labels[:dets_per_image]
    scores = scores[:dets_per_image]
    n_fp = dets_per_image - len(targets)
    wh = _object_sizes(rng, n_fp, (h, w))
    xy = rng.uniform(0, 1, (n_fp, 2)) * ([w, h] - wh)
    fp = np.concatenate([xy, xy + wh], 1)
    targets = np.concatenate([targets, fp])
    labels = np.concatenate([np.asarray(labels, np.int64), rng.integers(0, num_labels, n_fp)])
    scores = np.concatenate([np.asarray(scores), rng.uniform(0.05, 0.4, n_fp) ** 2])
    # Predicted boxes: the target jittered by ~10 % of its size, clipped to the image.
    size = np.concatenate([targets[:, 2:] - targets[:, :2]] * 2, 1)
    boxes = targets + rng.normal(0, 0.1, targets.shape) * size
    boxes = np.clip(boxes, 0, [w, h, w, h])
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 0.5)
    boxes = np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)
    order = np.argsort(-scores, kind="stable")
    boxes, targets, labels, scores = boxes[order], targets[order], labels[order], scores[order]
    yield dict(image_id=int(image_id), orig_hw=(h, w), boxes=boxes,
               scores=scores.astype(np.float32), labels=labels, paste_boxes=boxes.copy(),
               mask_probs=_soft_ellipses(rng, boxes.astype(np.float64), targets, mask_size))
