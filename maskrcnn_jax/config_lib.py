"""Builders for the recipe configs in configs/ (ml_collections).

A recipe file is `configs/<framework>/<upstream name>.py` with `get_config()` calling one builder
here with that recipe's few differences. No inheritance chains: a recipe is one call.

Config layout (every field can be overridden on the command line, e.g. --config.model.score_thresh=0.3):
  convention   'mmdet' | 'detectron2' | 'torchvision' (maskrcnn_jax/conventions.py)
  model        backbone (depth, groups, width_per_group, stride_in_1x1, norm, norm_eps, freeze_at,
               backbone_init: the upstream ImageNet file training starts from),
               pixel_mean/pixel_std/to_rgb/input_scale, fpn, rpn, roi heads, mask head, maskiou head
  data         test_short/test_max_size, size_divisibility, val/train sources
  optim        optimizer (optim_config), schedule: learning-rate schedule (schedule_config),
  train        loop settings and global_batch (train_config), mesh: data-axis size (-1 = all)
  eval, kernels, init, seed
"""
from __future__ import annotations

import functools

import ml_collections

from maskrcnn_jax import errors

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
              style: str = "pytorch", pixel: dict | None = None,
              mask_scoring: bool = False, schedule: str = "1x", multiscale: bool = False,
              torchvision_v2: bool = False, arch: str = "FPN", backbone_init: str = "",
              upstream: str = "") -> ml_collections.ConfigDict:
  """The Mask R-CNN / Mask Scoring R-CNN config shared by all recipes.

  Args:
    convention: 'mmdet' | 'detectron2' | 'torchvision'.
    depth, groups, width_per_group: ResNet-50/101 or ResNeXt (32x4d, 64x4d, 32x8d).
    style: 'caffe' (stride in the 1x1 conv) or 'pytorch' (stride in the 3x3).
    pixel: one of the pixel dicts above; defaults by style.
    mask_scoring: adds the MaskIoU head (mmdet ms_rcnn).
    schedule: '1x' | '2x' | '3x' (torchvision: '26e' | '400e'); resolved by `schedule_config`.
    multiscale: mstrain recipes.
    torchvision_v2: BN in FPN and heads, 2 RPN convs, 4conv1fc box head.
    arch: 'FPN', or detectron2's 'C4' (Base-RCNN-C4.yaml: Res5ROIHeads, mask head with no convs)
      and 'DC5' (Base-RCNN-DilatedC5.yaml): one stride-16 feature map, all five anchor sizes on
      it, RPN top-k 6000 / 1000 at test time (12000 / 2000 in training, the defaults).
    backbone_init: the ImageNet-pretrained backbone the upstream recipe starts from, as its config
      names it (maskrcnn_jax/checkpoints/backbones.py CATALOG, e.g.
      'detectron2://ImageNetPretrained/MSRA/R-50.pkl', 'torchvision://resnet50'), or a file path;
      '' trains from scratch.
    upstream: the upstream config name, for the record.
  """
  if style not in ("caffe", "pytorch"):
    raise errors.ConfigError(f"style must be 'caffe' or 'pytorch', got {style!r}")
  c = ml_collections.ConfigDict()
  c.upstream = upstream
  c.convention = convention
  c.seed = 0
  if arch not in ("FPN", "C4", "DC5"):
    raise errors.ConfigError(f"arch must be 'FPN', 'C4' or 'DC5', got {arch!r}")
  if arch != "FPN" and (convention != "detectron2" or mask_scoring or torchvision_v2):
    raise errors.ConfigError(f"arch {arch!r} is detectron2's (no MaskIoU head, no torchvision v2)")
  single_level = arch != "FPN"

  m = c.model = ml_collections.ConfigDict()
  m.arch = arch
  m.depth = depth
  m.groups = groups
  m.width_per_group = width_per_group
  m.stride_in_1x1 = style == "caffe"
  m.norm = "frozen_bn"
  # BatchNorm eps: decided by the checkpoint (checkpoints/provenance.py: torchvision's COCO_V1
  # file ran with 0, every other known checkpoint with 1e-5), recorded by the converter in the
  # converted checkpoint; unset here so that no recipe hard-codes one file's value. Training
  # from scratch uses the convention's default (1e-5). Overridable: --config.model.norm_eps=0.
  m.norm_eps = ml_collections.config_dict.placeholder(float)
  m.freeze_at = 2
  # Training starts from this ImageNet file (backbone only; the FPN and heads start fresh) unless
  # config.init is set (maskrcnn_jax/training/checkpointing.py:read_backbone_init). Nothing is
  # downloaded: the file is looked up in $MASKRCNN_JAX_PRETRAINED, default
  # ~/.cache/maskrcnn_jax/pretrained (checkpoints/backbones.py).
  m.backbone_init = backbone_init
  m.stem_out_channels = 64  # detectron2 RESNETS.STEM_OUT_CHANNELS
  m.res2_out_channels = 256  # detectron2 RESNETS.RES2_OUT_CHANNELS
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
  # FPN: one size per level P2..P6; C4 / DC5: all sizes at the single stride-16 map.
  m.anchor_strides = (16,) if single_level else (4, 8, 16, 32, 64)
  m.rpn_num_convs = 2 if torchvision_v2 else 1
  # detectron2 defaults PRE_NMS_TOPK_TRAIN 12000 / POST_NMS_TOPK_TRAIN 2000 (per level; the FPN
  # yamls set 2000 / 1000); Base-RCNN-C4 / DilatedC5 set PRE_NMS_TOPK_TEST 6000, POST 1000.
  m.rpn_pre_nms_topk_test = 6000 if single_level else 1000
  m.rpn_post_nms_topk_test = 1000
  m.rpn_pre_nms_topk_train = 12000 if single_level else 2000
  m.rpn_post_nms_topk_train = (2000 if convention == "torchvision" or single_level else 1000)
  m.rpn_nms_thresh = 0.7
  # RoI heads (parity_spec 3.12).
  m.num_classes = 80
  m.box_head_num_conv = 4 if torchvision_v2 else 0
  # C4: no box head (the predictor reads res5's mean), mask head without convs (NUM_CONV 0).
  m.box_head_num_fc = 1 if torchvision_v2 else (0 if arch == "C4" else 2)
  m.box_head_norm = "bn" if torchvision_v2 else ""
  m.box_head_conv_dim = 256
  m.box_head_fc_dim = 1024
  m.mask_head_norm = "bn" if torchvision_v2 else ""
  m.mask_head_num_conv = 0 if arch == "C4" else 4
  m.mask_head_conv_dim = 256
  m.bbox_reg_weights = (10.0, 10.0, 5.0, 5.0) if convention != "mmdet" else (0.1, 0.1, 0.2, 0.2)
  m.score_thresh = 0.05
  m.nms_thresh = 0.5
  m.detections_per_image = 100
  # Static bound of (RoI, class) candidates entering the class-wise NMS; the result is exact
  # whenever the 100th kept detection lies within the top `max_candidates` scores.
  m.max_candidates = 4000
  m.mask_scoring = mask_scoring
  # RoIAlign: the adaptive grid (sampling_ratio 0) is capped at this many samples per bin axis.
  m.roi_align_max_grid = 16
  # FPN level of a RoI: P4 at sqrt(area) = this (detectron2 / torchvision ROIPooler
  # canonical_box_size; mmdet finest_scale = a quarter of it). 224 in every reference.
  m.roi_canonical_box_size = 224.0
  # Training compute dtype: 'float32', 'bfloat16' or 'float16' (mixed precision, float32 master
  # weights; float16 with loss scaling, train.loss_scale; maskrcnn_jax/training/train_state.py).
  m.dtype = "float32"
  # Batched NMS: coordinate-offset trick up to this many boxes per call, exact per-class NMS
  # above; -1 = the convention's rule (conventions.py: torchvision / detectron2 on CPU 1000,
  # mmcv always).
  m.nms_trick_max_boxes = -1

  d = c.data = ml_collections.ConfigDict()
  d.test_short = 800
  d.test_max_size = 1333
  # FPN pads to multiples of 32 (its top-down sums need it); detectron2's plain ResNet backbone
  # (C4 / DC5) has size_divisibility 0: the input is not padded, and padding would change the
  # border features (BN shifts the padded zeros), so exact parity needs the same.
  d.size_divisibility = 32 if arch == "FPN" else 0
  if not multiscale:
    d.train_short, d.train_short_mode = (800,), "choice"
  elif convention == "mmdet":  # mstrain-poly: short side uniformly in [640, 800]
    d.train_short, d.train_short_mode = (640, 800), "range"
  else:  # detectron2 MIN_SIZE_TRAIN (640, 672, ..., 800), one picked per image
    d.train_short, d.train_short_mode = (640, 672, 704, 736, 768, 800), "choice"
  d.train_max_size = 1333
  # Training image shapes (H, W), one compiled train step each; () = a landscape and a portrait
  # bucket of the largest resized size (data/pipeline.py:train_buckets).
  d.train_buckets = ()
  d.max_instances = 100
  d.gt_mask_size = 112  # instance masks cropped to their box and resized to this (training)
  d.flip_prob = 0.5
  d.train_filter_empty = True
  # Loader worker processes (grain; 0 = load in the training process). A host feeding 8 GPUs
  # needs about one per 150 images/s (docs/training.md, "Data loading").
  d.num_workers = 2
  # COCO-format annotation json and image folder of the training and val sets ("" = none; the
  # training set may also be config.data.builtin, the evaluate CLI's val set too).
  d.train_json = ""
  d.train_images = ""
  d.val_json = ""
  d.val_images = ""

  c.schedule = schedule_config(schedule, convention=convention, upstream=upstream)
  c.optim = optim_config(convention)
  c.train = train_config()
  c.mesh = ml_collections.ConfigDict(dict(data=-1))
  c.kernels = ml_collections.ConfigDict(dict(roi_align="auto"))
  c.eval = eval_config()
  # A converted checkpoint directory (python -m maskrcnn_jax.convert) or a zoo file (.pth / .pkl,
  # converted on the fly) to start training from; class-dependent layers are re-initialised when
  # num_classes differs (maskrcnn_jax/training/checkpointing.py:load_init).
  c.init = ""
  return c


# ------------------------------------------------------------------------------------------------
# Training: optimizer, schedule and loop settings (maskrcnn_jax/training/optimizer.py, parity_spec
# 4.3). All frameworks: SGD momentum 0.9, weight decay 1e-4, base lr 0.02 at batch 16.
# ------------------------------------------------------------------------------------------------

# mmdet v2 recipes whose steps differ from their schedule's default (read from the upstream
# configs): the r50-caffe mstrain-poly 2x/3x and x101-32x8d mstrain-poly 3x are `_base_`d on a 1x
# recipe with their own `lr_config.step` and `max_epochs`, not on configs/common/*.
_MMDET_STEP_OVERRIDES = {
    "mask_rcnn_r50_caffe_fpn_mstrain-poly_2x_coco": (24, (16, 23)),
    "mask_rcnn_r50_caffe_fpn_mstrain-poly_3x_coco": (36, (28, 34)),
    "mask_rcnn_x101_32x8d_fpn_mstrain-poly_3x_coco": (36, (28, 34)),
}


def schedule_config(name: str, *, convention: str, upstream: str = "") -> ml_collections.ConfigDict:
  """The recipe's learning-rate schedule (parity_spec 4.3) as config fields.

  Fields: name ('1x' | '2x' | '3x' | '26e' | '400e' | custom), unit ('epoch' | 'step'), length
  (epochs or iterations), steps (decay points, same unit), gamma, decay ('step' | 'cosine' |
  'constant'), warmup_steps (iterations), warmup_ratio, repeat (epoch schedules: an 'epoch' is
  `repeat` passes over the data, mmdet RepeatDataset), scale_steps_with_batch (step schedules:
  detectron2 auto_scale_workers), warmup_within_first_epoch (torchvision: min(1000, len - 1)).
  """
  s = ml_collections.ConfigDict()
  s.name = name
  s.gamma = 0.1
  s.decay = "step"
  s.final_ratio = 0.0
  s.warmup_ratio = 0.001
  s.repeat = 1
  s.scale_steps_with_batch = False
  s.warmup_within_first_epoch = False
  if convention == "detectron2":
    # configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_{1x,3x}.yaml, WARMUP_ITERS 1000,
    # WARMUP_FACTOR 1/1000.
    table = {"1x": (90000, (60000, 80000)), "3x": (270000, (210000, 250000))}
    if name not in table:
      raise errors.ConfigError(
          f"unknown detectron2 schedule {name!r}; expected one of {sorted(table)}")
    s.unit = "step"
    s.length, s.steps = table[name]
    s.warmup_steps = 1000
    s.scale_steps_with_batch = True
  elif convention == "mmdet":
    # configs/_base_/schedules/schedule_{1x,2x}.py; configs/common/mstrain-poly_3x_coco_instance.py
    # (RepeatDataset times=3 over a 12-epoch runner with steps [9, 11]). Warmup 500 it, 0.001.
    table = {"1x": (12, (8, 11), 1), "2x": (24, (16, 22), 1), "3x": (12, (9, 11), 3)}
    if name not in table:
      raise errors.ConfigError(f"unknown mmdet schedule {name!r}; expected one of {sorted(table)}")
    s.unit = "epoch"
    s.length, s.steps, s.repeat = table[name]
    if upstream in _MMDET_STEP_OVERRIDES:
      (s.length, s.steps), s.repeat = _MMDET_STEP_OVERRIDES[upstream], 1
    s.warmup_steps = 500
  elif convention == "torchvision":
    # references/detection: v1 26 epochs, steps [16, 22]; v2 400 epochs, steps [352, 384] (lr 0.1
    # at batch 64, weight decay 4e-5: set in the v2 recipe). Warmup min(1000, len - 1), 0.001.
    table = {"26e": (26, (16, 22)), "400e": (400, (352, 384)), "1x": (12, (8, 11)),
             "2x": (24, (16, 22)), "3x": (36, (27, 33))}
    if name not in table:
      raise errors.ConfigError(
          f"unknown torchvision schedule {name!r}; expected one of {sorted(table)}")
    s.unit = "epoch"
    s.length, s.steps = table[name]
    s.warmup_steps = 1000
    s.warmup_within_first_epoch = True
  else:
    raise errors.ConfigError(f"unknown convention {convention!r}")
  s.steps = tuple(s.steps)
  return s


def optim_config(convention: str) -> ml_collections.ConfigDict:
  """SGD of the references (maskrcnn_jax/training/optimizer.py documents each rule).

  weight_decay_norm: None = same as weight_decay (mmdet decays every parameter; torchvision too);
  0.0 for detectron2 (SOLVER.WEIGHT_DECAY_NORM). grad_clip_norm 0 = off (mmdet Mask R-CNN
  `grad_clip=None`; detectron2 CLIP_GRADIENTS disabled). base_lr is for base_batch images per
  iteration and is scaled linearly to train.global_batch when scale_lr.
  """
  return ml_collections.ConfigDict(dict(
      name="sgd", base_lr=0.02, base_batch=16, scale_lr=True, momentum=0.9, nesterov=False,
      weight_decay=1e-4, weight_decay_norm=0.0 if convention == "detectron2" else None,
      grad_clip_norm=0.0, frozen_patterns=()))


def train_config() -> ml_collections.ConfigDict:
  """The training loop (maskrcnn_jax/training/trainer.py).

  global_batch: images per iteration over all devices and hosts (the recipes' 16 = 8 GPUs x 2).
  num_steps: 0 = the schedule's length. log_every / checkpoint_every / eval_every: iterations
  (eval_every 0 = only at the end). keep_checkpoints: the last N are kept. data_seed: -1 = seed.
  rpn_batch_per_image / roi_batch_per_image: the samplers' sizes (parity_spec 4.1: 256 and 512).
  rpn_positive_fraction / roi_positive_fraction: their foreground shares (0.5 and 0.25; detectron2
  MODEL.RPN.POSITIVE_FRACTION / MODEL.ROI_HEADS.POSITIVE_FRACTION, mmdet sampler.pos_fraction).
  loss_scale: 'none' (dynamic for model.dtype float16), 'dynamic' or a static scale such as '512.'
  (training/loss_scale.py).
  """
  return ml_collections.ConfigDict(dict(
      global_batch=16, num_steps=0, log_every=20, checkpoint_every=5000, keep_checkpoints=3,
      async_checkpoints=True, eval_every=0, final_eval=True, data_seed=-1,
      rpn_batch_per_image=256, roi_batch_per_image=512, rpn_positive_fraction=0.5,
      roi_positive_fraction=0.25, loss_scale="none"))


def eval_config() -> ml_collections.ConfigDict:
  """COCO evaluation (maskrcnn_jax/evaluation/evaluator.py; training's evaluations use it too).

  paste: 'device' (masks pasted on the accelerator in tiles around each box, ops/paste_device.py)
  or 'host' (the 28x28 probabilities pasted by host worker processes, ops/paste.py); bitwise the
  same masks. scorer: 'auto' (faster-coco-eval when installed, else pycocotools),
  'faster_coco_eval' or 'pycocotools'. batch_size_per_device / num_workers: training's evaluations
  (the evaluate CLI has flags).
  """
  return ml_collections.ConfigDict(dict(paste="device", scorer="auto", batch_size_per_device=1,
                                        num_workers=2))


# The convention of `defaults()`: detectron2's ResNet-50-FPN.
DEFAULT_CONVENTION = "detectron2"


@functools.lru_cache(maxsize=None)
def defaults() -> ml_collections.FrozenConfigDict:
  """The default of every config field: `mask_rcnn(convention=DEFAULT_CONVENTION)`, frozen.

  The one place defaults are written is this module; code that reads a config lacking a field (a
  hand-built config, a config.json written before the field existed) takes its value from here:
  `ModelConfig.from_config` for config.model, `data.pipeline.data_option` for config.data,
  `MaskRCNN.losses` for the samplers' config.train settings.
  """
  return ml_collections.FrozenConfigDict(mask_rcnn(convention=DEFAULT_CONVENTION))


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """Imports a recipe file by path and returns its get_config(); clear errors for bad paths."""
  import importlib.util
  import os

  if not os.path.isfile(path):
    raise errors.InputNotFoundError(f"config file not found: {path}")
  spec = importlib.util.spec_from_file_location(
      "maskrcnn_jax_recipe_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise errors.ConfigError(f"{path}: a config file must define get_config()")
  return module.get_config()


def published(*, box_ap: float, mask_ap: float, url: str) -> ml_collections.ConfigDict:
  """The upstream model-zoo row of a recipe: COCO val2017 box/mask AP and the checkpoint link.

  Documentation only: nothing here downloads. `checkpoint` is the file name that `url` ends with,
  the name `maskrcnn_jax.convert --src` expects after a manual download.
  """
  return ml_collections.ConfigDict(dict(
      box_ap=float(box_ap), mask_ap=float(mask_ap), url=url,
      checkpoint=url.rstrip("/").rsplit("/", 1)[-1]))
