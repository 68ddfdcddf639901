"""Builders for the recipe configs in configs/ (ml_collections).

A recipe file is `configs/<framework>/<upstream name>.py` with `get_config()` calling one builder
here with that recipe's few differences. No inheritance chains: a recipe is one call.

Config layout (every field can be overridden on the command line, e.g. --config.model.score_thresh=0.3):
  convention   'mmdet' | 'detectron2' | 'torchvision' (maskrcnn_jax/conventions.py)
  model        backbone (depth, groups, width_per_group, stride_in_1x1, norm, norm_eps, freeze_at),
               pixel_mean/pixel_std/to_rgb/input_scale, fpn, rpn, roi heads, mask head, maskiou head
  data         test_short/test_max_size, size_divisibility, val/train sources
  eval, optim, schedule, mesh, kernels, init, seed
"""
from __future__ import annotations

import ml_collections

# COCO category ids of the 80 classes in contiguous order (parity_spec 2.10).
COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
    31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55,
    56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
    85, 86, 87, 88, 89, 90)

COCO_CLASS_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush")

# Per-framework pixel statistics (parity_spec 3.3, 2.3, 2.6).
PYTORCH_RGB = dict(pixel_mean=(123.675, 116.28, 103.53), pixel_std=(58.395, 57.12, 57.375),
                   to_rgb=True, input_scale=1.0)
CAFFE_BGR = dict(pixel_mean=(103.53, 116.28, 123.675), pixel_std=(1.0, 1.0, 1.0), to_rgb=False,
                 input_scale=1.0)
D2_FAIR_BGR = dict(pixel_mean=(103.53, 116.28, 123.675), pixel_std=(57.375, 57.12, 58.395),
                   to_rgb=False, input_scale=1.0)
TORCHVISION_RGB01 = dict(pixel_mean=(0.485, 0.456, 0.406), pixel_std=(0.229, 0.224, 0.225),
                         to_rgb=True, input_scale=1.0 / 255.0)


def mask_rcnn(*, convention: str, depth: int = 50, groups: int = 1, width_per_group: int = 64,
              style: str = "pytorch", pixel: dict | None = None, norm_eps: float = 1e-5,
              mask_scoring: bool = False, schedule: str = "1x", multiscale: bool = False,
              torchvision_v2: bool = False, upstream: str = "") -> ml_collections.ConfigDict:
  """The FPN Mask R-CNN / Mask Scoring R-CNN config shared by all recipes.

  Args:
    convention: 'mmdet' | 'detectron2' | 'torchvision'.
    depth, groups, width_per_group: ResNet-50/101 or ResNeXt (32x4d, 64x4d, 32x8d).
    style: 'caffe' (stride in the 1x1 conv) or 'pytorch' (stride in the 3x3).
    pixel: one of the pixel dicts above; defaults by style.
    norm_eps: frozen BN eps (torchvision v1 weights use 0.0).
    mask_scoring: adds the MaskIoU head (mmdet ms_rcnn).
    schedule: '1x' | '2x' | '3x' (see the training issue; kept here for the recipe's record).
    multiscale: mstrain recipes.
    torchvision_v2: BN in FPN and heads, 2 RPN convs, 4conv1fc box head.
    upstream: the upstream config name, for the record.
  """
  if style not in ("caffe", "pytorch"):
    raise ValueError(f"style must be 'caffe' or 'pytorch', got {style!r}")
  c = ml_collections.ConfigDict()
  c.upstream = upstream
  c.convention = convention
  c.seed = 0

  m = c.model = ml_collections.ConfigDict()
  m.depth = depth
  m.groups = groups
  m.width_per_group = width_per_group
  m.stride_in_1x1 = style == "caffe"
  m.norm = "frozen_bn"
  m.norm_eps = norm_eps
  m.freeze_at = 2
  pixel = pixel or (CAFFE_BGR if style == "caffe" else PYTORCH_RGB)
  m.pixel_mean = pixel["pixel_mean"]
  m.pixel_std = pixel["pixel_std"]
  m.to_rgb = pixel["to_rgb"]
  m.input_scale = pixel["input_scale"]
  m.fpn_norm = "bn" if torchvision_v2 else ""
  m.fpn_channels = 256
  # RPN (parity_spec 3.7, 3.9).
  m.anchor_sizes = (32, 64, 128, 256, 512)
  m.anchor_ratios = (0.5, 1.0, 2.0)
  m.anchor_strides = (4, 8, 16, 32, 64)
  m.rpn_num_convs = 2 if torchvision_v2 else 1
  m.rpn_pre_nms_topk_test = 1000
  m.rpn_post_nms_topk_test = 1000
  m.rpn_pre_nms_topk_train = 2000
  m.rpn_post_nms_topk_train = 2000 if convention == "torchvision" else 1000
  m.rpn_nms_thresh = 0.7
  # RoI heads (parity_spec 3.12).
  m.num_classes = 80
  m.box_head_num_conv = 4 if torchvision_v2 else 0
  m.box_head_num_fc = 1 if torchvision_v2 else 2
  m.box_head_norm = "bn" if torchvision_v2 else ""
  m.mask_head_norm = "bn" if torchvision_v2 else ""
  m.bbox_reg_weights = (10.0, 10.0, 5.0, 5.0) if convention != "mmdet" else (0.1, 0.1, 0.2, 0.2)
  m.score_thresh = 0.05
  m.nms_thresh = 0.5
  m.detections_per_image = 100
  # Static bound of (RoI, class) candidates entering the class-wise NMS; the result is exact
  # whenever the 100th kept detection lies within the top `max_candidates` scores.
  m.max_candidates = 4000
  m.mask_scoring = mask_scoring
  # RoIAlign: the adaptive grid (sampling_ratio 0) is capped at this many samples per bin axis.
  m.roi_align_max_grid = 8
  # None: follow the convention (coordinate-offset trick on); False: exact per-class NMS.
  m.nms_coordinate_trick = None

  d = c.data = ml_collections.ConfigDict()
  d.test_short = 800
  d.test_max_size = 1333
  d.size_divisibility = 32
  d.train_short = (640, 800) if multiscale else (800,)
  d.train_short_mode = "range" if (multiscale and convention == "mmdet") else "choice"
  d.train_max_size = 1333
  d.val_json = ""
  d.val_images = ""

  c.schedule = schedule
  c.kernels = ml_collections.ConfigDict(dict(roi_align="auto"))
  c.init = ""
  return c


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """Imports a recipe file by path and returns its get_config(); clear errors for bad paths."""
  import importlib.util
  import os

  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file not found: {path}")
  spec = importlib.util.spec_from_file_location(
      "maskrcnn_jax_recipe_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"{path}: a config file must define get_config()")
  return module.get_config()


def published(*, box_ap: float, mask_ap: float, url: str) -> ml_collections.ConfigDict:
  """The upstream model-zoo row of a recipe: COCO val2017 box/mask AP and the checkpoint link.

  Documentation only: nothing here downloads. `checkpoint` is the file name that `url` ends with,
  the name `maskrcnn_jax.convert --src` expects after a manual download.
  """
  return ml_collections.ConfigDict(dict(
      box_ap=float(box_ap), mask_ap=float(mask_ap), url=url,
      checkpoint=url.rstrip("/").rsplit("/", 1)[-1]))
