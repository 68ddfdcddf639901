"""A tiny COCO-format dataset and a small-input Mask R-CNN config with seeded weights for eval tests.

Also runnable as a script (the multi-device / multi-process tests start it in subprocesses):

  python -m tests.evaluation.tiny ANNOTATIONS IMAGE_DIR OUT_DIR [--num_workers W]
      [--coordinator HOST:PORT --num_processes N --process_id I]

evaluates the tiny model and writes OUT_DIR/predictions.json, metrics.json (process 0) and
OUT_DIR/result_<process index>.json (metrics and device / process counts).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
CATEGORIES = [{"id": 1, "name": "red"}, {"id": 2, "name": "green"}, {"id": 3, "name": "blue"}]


def _ellipse(h, w, cy, cx, ry, rx):
  yy, xx = np.mgrid[:h, :w]
  return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def _polygon(cy, cx, ry, rx, n=16):
  t = np.linspace(0, 2 * np.pi, n, endpoint=False)
  pts = np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)
  return [float(v) for v in pts.reshape(-1)]


def make_dataset(root: str, *, sizes=((60, 80), (60, 80), (80, 60), (60, 80), (80, 60), (64, 72)),
                 seed: int = 0, with_crowd: bool = True, empty_images=(5,)) -> dict:
  """Writes root/images/*.png and root/annotations.json; returns the json dict.

  Each image holds 1-3 coloured ellipses (category by colour) annotated as polygons; image 3 also
  holds a crowd region (RLE, iscrowd=1) when `with_crowd`; the images whose index is in
  `empty_images` have no annotations (but still some texture).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from pycocotools import mask as mask_util  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  images, anns = [], []
  colours = {1: (220, 30, 30), 2: (30, 200, 40), 3: (40, 50, 230)}
  for idx, (h, w) in enumerate(sizes):
    image_id = 10 + 3 * idx  # non-contiguous ids
    img = (rng.random((h, w, 3)) * 60 + 90).astype(np.uint8)
    name = f"img_{idx:02d}.png"
    if idx not in empty_images:
      for _ in range(int(rng.integers(1, 4))):
        cat = int(rng.integers(1, 4))
        ry, rx = rng.uniform(0.15, 0.35) * h, rng.uniform(0.15, 0.35) * w
        cy, cx = rng.uniform(ry, h - ry), rng.uniform(rx, w - rx)
        poly = _polygon(cy, cx, ry, rx)
        rle = mask_util.merge(mask_util.frPyObjects([poly], h, w))
        m = mask_util.decode(rle).astype(bool)
        img[m] = colours[cat]
        x, y, bw, bh = (float(v) for v in mask_util.toBbox(rle))
        anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat,
                     "segmentation": [poly], "area": float(mask_util.area(rle)),
                     "bbox": [x, y, bw, bh], "iscrowd": 0})
      if with_crowd and idx == 3:
        m = np.zeros((h, w), bool)
        m[2:h // 3, 2:w // 3] = True
        img[m] = colours[1]
        rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
        x, y, bw, bh = (float(v) for v in mask_util.toBbox(rle))
        anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1,
                     "segmentation": {"size": [h, w],
                                      "counts": rle["counts"].decode("utf-8")},
                     "area": float(mask_util.area(rle)), "bbox": [x, y, bw, bh], "iscrowd": 1})
    Image.fromarray(img).save(os.path.join(root, "images", name))
    images.append({"id": image_id, "file_name": name, "height": h, "width": w})
  data = {"images": images, "annotations": anns, "categories": CATEGORIES}
  with open(os.path.join(root, "annotations.json"), "w") as f:
    json.dump(data, f)
  return data


def tiny_config(recipe: str = "mmdet/ms_rcnn_r50_caffe_fpn_1x_coco"):
  """A real recipe shrunk to small inputs: 3 classes (ids 1..3), test size 64 / 96, small top-k.

  The default, mmdet Mask Scoring R-CNN, exercises the mask-score path end to end.
  """
  from maskrcnn_jax import config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config_file(str(ROOT / "configs" / f"{recipe}.py"))
  config.model.num_classes = 3
  config.category_ids = [1, 2, 3]
  config.category_names = ["red", "green", "blue"]
  config.model.detections_per_image = 20
  config.model.rpn_pre_nms_topk_test = 200
  config.model.rpn_post_nms_topk_test = 50
  config.model.max_candidates = 200
  config.model.score_thresh = 0.05
  config.data.test_short = 64
  config.data.test_max_size = 96
  return config


def tiny_variables(config, seed: int = 0):
  """Seeded He-normal weights (numpy) shaped for `config`'s model, biased to give detections.

  The RPN objectness and the foreground class logits get positive biases so that random features
  still produce detections above the 0.05 score threshold.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from maskrcnn_jax.modeling.build import build_model, dummy_inputs  # pylint: disable=g-import-not-at-top
  model = build_model(config)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *dummy_inputs(1, (64, 64))))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    names = [getattr(k, "key", str(k)) for k in path]
    name, shape = names[-1], tuple(leaf.shape)
    if name == "kernel":
      fan_in = int(np.prod(shape[:-1]))
      scale = np.sqrt(2.0 / fan_in)
      if names[-2] == "stem_conv":
        scale /= 64.0  # caffe-style inputs are raw pixel values minus the mean
      if names[-2] == "conv3" and "backbone" in names:
        scale *= 0.1  # small residual branches: features stay O(1) through 16 blocks
      if names[-2] in ("deltas", "bbox_pred", "objectness", "cls_score"):
        scale *= 0.01  # proposals ~ anchors, boxes ~ proposals, scores ~ the biases
      return (rng.standard_normal(shape) * scale).astype(np.float32)
    if name in ("scale", "var"):
      return np.ones(shape, np.float32)
    if "objectness" in names and name == "bias":
      return np.full(shape, 2.0, np.float32)
    if "cls_score" in names and name == "bias":
      b = np.zeros(shape, np.float32)
      b[:config.model.num_classes] = 3.0  # bg_last: foreground first
      return b
    return np.zeros(shape, np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def main(argv):
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser()
  parser.add_argument("annotation_file")
  parser.add_argument("image_dir")
  parser.add_argument("out_dir")
  parser.add_argument("--coordinator", default="")
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--num_workers", type=int, default=0)
  args = parser.parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  if args.coordinator:
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)
  from maskrcnn_jax.evaluation import evaluator  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  variables = tiny_variables(config)
  metrics = evaluator.evaluate(
      config, variables, annotation_file=args.annotation_file, image_dir=args.image_dir,
      workdir=args.out_dir, num_workers=args.num_workers, log=lambda m: None)
  with open(os.path.join(args.out_dir, f"result_{jax.process_index()}.json"), "w") as f:
    json.dump({"metrics": metrics, "devices": jax.device_count(),
               "local_devices": jax.local_device_count(), "processes": jax.process_count()}, f)


if __name__ == "__main__":
  main(sys.argv[1:])
