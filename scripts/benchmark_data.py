"""Host data pipeline throughput: images/s of `TrainLoader` on COCO-like synthetic data.

  python scripts/benchmark_data.py                       # 1x recipe, 1 and 2 workers
  python scripts/benchmark_data.py --workers 0,1,2,4 --images 400
  python scripts/benchmark_data.py --config configs/mmdet/mask_rcnn_r50_fpn_mstrain-poly_3x_coco.py
  python scripts/benchmark_data.py --profile             # per-stage times of `train_example`

The data is generated once into --data_dir (default: a temporary folder): `--images` JPEGs (quality
90) at a mix of common COCO sizes (640 x 480, 480 x 640, 640 x 427, 427 x 640, 640 x 360, 500 x 375,
640 x 640), smooth textures with edges (JPEG sizes and decode times like photographs), 7 instances per
image (COCO's mean is 7.3) as polygons of 12-40 vertices, sizes log-uniform from 12 px to most of the
image, and a crowd RLE on every tenth image.

For each worker count the loader (`maskrcnn_jax.data.loader.TrainLoader`, the one `maskrcnn_jax.train`
uses, with the recipe's batch per process) runs `--warmup` batches (worker start-up) and then
`--batches` timed ones; images/s = timed images / wall-clock seconds. It also prints the bytes of one
example as the device receives it and the pixels the device convolves per image (padded bucket
area) next to those of the unpadded resized image, and the per-host rate 8 GPUs need.

--profile times each stage of `pipeline.train_example` (one process, no loader) with
`pipeline.TIMINGS`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import cv2
import numpy as np
from pycocotools import mask as mask_util

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# (width, height, weight): landscape / portrait / square sizes that are common in COCO train2017.
SIZES = ((640, 480, 36), (480, 640, 14), (640, 427, 20), (427, 640, 8), (640, 360, 6),
         (500, 375, 6), (640, 640, 10))
INSTANCES = 7
GPU_RATE = 230  # images/s per GPU of MLPerf-class Mask R-CNN training (the figure)


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """A photograph-like [h, w, 3] uint8: smooth colour fields, a few sharp edges, sensor noise."""
  small = rng.uniform(0, 255, (max(h // 40, 2), max(w // 40, 2), 3)).astype(np.float32)
  img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
  for _ in range(6):
    pts = rng.uniform(0, 1, (int(rng.integers(3, 7)), 2)) * (w, h)
    cv2.fillPoly(img, [pts.astype(np.int32)], rng.uniform(0, 255, 3).tolist())
  img += rng.normal(0, 14, img.shape).astype(np.float32)
  return np.clip(img, 0, 255).astype(np.uint8)


def _polygon(rng: np.random.Generator, w: int, h: int):
  """A star-shaped polygon of 12-40 vertices, size log-uniform in [12, 0.8 * min(w, h)] px."""
  size = math.exp(rng.uniform(math.log(12), math.log(0.8 * min(w, h))))
  cx, cy = rng.uniform(size / 2, w - size / 2), rng.uniform(size / 2, h - size / 2)
  n = int(rng.integers(12, 41))
  ang = np.sort(rng.uniform(0, 2 * np.pi, n))
  rad = size / 2 * rng.uniform(0.5, 1.0, n)
  xy = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1)
  xy = np.clip(xy, 0, [w - 0.01, h - 0.01])
  return [float(round(v, 2)) for v in xy.reshape(-1)]


def make_dataset(root: str, num_images: int, seed: int = 0) -> str:
  """Writes root/ann.json and root/images/*.jpg (see the module docstring); returns the json path."""
  ann_path = os.path.join(root, "ann.json")
  if os.path.exists(ann_path):
    return ann_path
  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  rng = np.random.default_rng(seed)
  weights = np.array([s[2] for s in SIZES], np.float64)
  images, anns = [], []
  for i in range(num_images):
    w, h, _ = SIZES[int(rng.choice(len(SIZES), p=weights / weights.sum()))]
    name = f"{i:06d}.jpg"
    cv2.imwrite(os.path.join(root, "images", name), _texture(rng, h, w),
                [cv2.IMWRITE_JPEG_QUALITY, 90])
    images.append(dict(id=i + 1, file_name=name, height=h, width=w))
    for _ in range(INSTANCES):
      poly = _polygon(rng, w, h)
      rle = mask_util.merge(mask_util.frPyObjects([poly], h, w))
      x, y, bw, bh = (float(v) for v in mask_util.toBbox(rle))
      anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=int(rng.integers(1, 81)),
                       iscrowd=0, bbox=[x, y, bw, bh], area=float(mask_util.area(rle)),
                       segmentation=[poly]))
    if i % 10 == 0:  # a crowd region as compressed RLE, as COCO stores them
      m = np.zeros((h, w), np.uint8)
      x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
      cv2.ellipse(m, (x0 + w // 6, y0 + h // 6), (w // 6, h // 8), 0, 0, 360, 1, -1)
      rle = mask_util.encode(np.asfortranarray(m))
      x, y, bw, bh = (float(v) for v in mask_util.toBbox(rle))
      anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=1, iscrowd=1,
                       bbox=[x, y, bw, bh], area=float(mask_util.area(rle)),
                       segmentation=dict(size=[h, w], counts=rle["counts"].decode("ascii"))))
  cats = [dict(id=c, name=f"class{c}") for c in range(1, 81)]
  with open(ann_path + ".tmp", "w") as f:
    json.dump(dict(images=images, annotations=anns, categories=cats), f)
  os.replace(ann_path + ".tmp", ann_path)
  return ann_path
