"""Every recipe in configs/ loads, and its fields agree with the upstream zoo it names.

The expected values below were read from the upstream sources (mmdetection v2.x configs, README and
metafile.yml; detectron2 MODEL_ZOO.md and configs/COCO-InstanceSegmentation/*.yaml; torchvision
models/detection/mask_rcnn.py weights enums). docs/model_zoo.md lists the same rows.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import re

import ml_collections
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_PATHS = sorted(glob.glob(os.path.join(REPO, "configs", "*", "*.py")))
CONVENTIONS = ("mmdet", "detectron2", "torchvision")

REQUIRED = (
    "configs/detectron2/mask_rcnn_R_50_FPN_1x.py",
    "configs/mmdet/mask_rcnn_r50_fpn_1x_coco.py",
    "configs/mmdet/ms_rcnn_r50_caffe_fpn_1x_coco.py",
    "configs/torchvision/maskrcnn_resnet50_fpn.py",
)

CAFFE_MEAN = (103.53, 116.28, 123.675)
RGB_MEAN = (123.675, 116.28, 103.53)
RGB_STD = (58.395, 57.12, 57.375)
C2_BGR_STD = (57.375, 57.12, 58.395)  # detectron2 FAIR X-101-32x8d PIXEL_STD, BGR order

# (box AP, mask AP, checkpoint file) as published upstream.
PUBLISHED = {
    "mmdet/mask_rcnn_r50_fpn_1x_coco": (
        38.2, 34.7, "mask_rcnn_r50_fpn_1x_coco_20200205-d4b0c5d6.pth"),
    "mmdet/mask_rcnn_r50_caffe_fpn_1x_coco": (
        38.0, 34.4,
        "mask_rcnn_r50_caffe_fpn_1x_coco_bbox_mAP-0.38__segm_mAP-0.344_20200504_231812-0ebd1859.pth"),  # noqa: E501
    "mmdet/mask_rcnn_r101_fpn_1x_coco": (
        40.0, 36.1, "mask_rcnn_r101_fpn_1x_coco_20200204-1efe0ed5.pth"),
    "mmdet/mask_rcnn_x101_64x4d_fpn_1x_coco": (
        42.8, 38.4, "mask_rcnn_x101_64x4d_fpn_1x_coco_20200201-9352eb0d.pth"),
    "mmdet/mask_rcnn_x101_32x8d_fpn_1x_coco": (
        42.8, 38.3, "mask_rcnn_x101_32x8d_fpn_1x_coco_20220630_173841-0aaf329e.pth"),
    "mmdet/mask_rcnn_r50_fpn_mstrain-poly_3x_coco": (
        40.9, 37.1, "mask_rcnn_r50_fpn_mstrain-poly_3x_coco_20210524_201154-21b550bb.pth"),
    "mmdet/mask_rcnn_x101_64x4d_fpn_mstrain-poly_3x_coco": (
        44.5, 39.7, "mask_rcnn_x101_64x4d_fpn_mstrain-poly_3x_coco_20210526_120447-c376f129.pth"),
    "mmdet/ms_rcnn_r50_caffe_fpn_1x_coco": (
        38.2, 36.0, "ms_rcnn_r50_caffe_fpn_1x_coco_20200702_180848-61c9355e.pth"),
    "mmdet/ms_rcnn_x101_64x4d_fpn_1x_coco": (
        43.0, 39.5, "ms_rcnn_x101_64x4d_fpn_1x_coco_20200206-86ba88d2.pth"),
    "detectron2/mask_rcnn_R_50_FPN_1x": (38.6, 35.2, "model_final_a54504.pkl"),
    "detectron2/mask_rcnn_R_50_FPN_3x": (41.0, 37.2, "model_final_f10217.pkl"),
    "detectron2/mask_rcnn_R_101_FPN_3x": (42.9, 38.6, "model_final_a3ec72.pkl"),
    "detectron2/mask_rcnn_X_101_32x8d_FPN_3x": (44.3, 39.5, "model_final_2d9806.pkl"),
    "detectron2/mask_rcnn_R_50_C4_1x": (36.8, 32.2, "model_final_9243eb.pkl"),
    "detectron2/mask_rcnn_R_50_C4_3x": (39.8, 34.4, "model_final_4ce675.pkl"),
    "detectron2/mask_rcnn_R_50_DC5_1x": (38.3, 34.2, "model_final_4f86c3.pkl"),
    "detectron2/mask_rcnn_R_50_DC5_3x": (40.0, 35.9, "model_final_84107b.pkl"),
    "detectron2/mask_rcnn_R_101_C4_3x": (42.6, 36.7, "model_final_a2914c.pkl"),
    "detectron2/mask_rcnn_R_101_DC5_3x": (41.9, 37.3, "model_final_0464b7.pkl"),
    "torchvision/maskrcnn_resnet50_fpn": (37.9, 34.6, "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"),
    "torchvision/maskrcnn_resnet50_fpn_v2": (
        47.4, 41.8, "maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth"),
}

URL_PREFIX = {
    "mmdet": "https://download.openmmlab.com/mmdetection/v2.0/",
    "detectron2": "https://dl.fbaipublicfiles.com/detectron2/COCO-InstanceSegmentation/",
    "torchvision": "https://download.pytorch.org/models/",
}


def _key(path: str) -> str:
  """'configs/mmdet/x.py' -> 'mmdet/x'."""
  framework = os.path.basename(os.path.dirname(path))
  return f"{framework}/{os.path.splitext(os.path.basename(path))[0]}"


def _load(path: str) -> ml_collections.ConfigDict:
  name = "recipe_" + re.sub(r"\W", "_", _key(path))
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


CONFIGS = {_key(p): _load(p) for p in CONFIG_PATHS}


def _select(framework: str, pattern: str = "") -> dict[str, ml_collections.ConfigDict]:
  return {k: c for k, c in CONFIGS.items()
          if k.startswith(framework + "/") and re.search(pattern, k.split("/", 1)[1])}


def test_required_recipes_exist():
  for rel in REQUIRED:
    assert os.path.isfile(os.path.join(REPO, rel)), rel


def test_row_counts():
  # mask_rcnn README: 12 "Results and models" rows (fp16 included) + 9 "Pre-trained Models" rows;
  # ms_rcnn: 7 rows; detectron2: 4 FPN + 3 C4 + 3 DC5 rows; torchvision: v1 and v2.
  assert len(_select("mmdet", r"^mask_rcnn_")) == 21
  assert len(_select("mmdet", r"^ms_rcnn_")) == 7
  assert len(_select("detectron2")) == 10
  assert len(_select("detectron2", r"_C4_")) == len(_select("detectron2", r"_DC5_")) == 3
  assert len(_select("torchvision")) == 2
  assert len(CONFIGS) == len(CONFIG_PATHS) == 40


def test_architecture_from_name():
  """detectron2 Base-RCNN-C4 / Base-RCNN-DilatedC5 settings; every other recipe is FPN."""
  for key, config in CONFIGS.items():
    m = config.model
    arch = re.search(r"_(C4|DC5)_", key)
    assert m.arch == (arch.group(1) if arch else "FPN"), key
    if m.arch == "FPN":
      assert tuple(m.anchor_strides) == (4, 8, 16, 32, 64), key
      assert config.data.size_divisibility == 32, key
      continue
    assert config.data.size_divisibility == 0, key  # d2 ResNet backbone: no padding
    assert tuple(m.anchor_sizes) == (32, 64, 128, 256, 512), key
    assert tuple(m.anchor_strides) == (16,), key
    assert (m.rpn_pre_nms_topk_test, m.rpn_post_nms_topk_test) == (6000, 1000), key
    assert (m.rpn_pre_nms_topk_train, m.rpn_post_nms_topk_train) == (12000, 2000), key
    if m.arch == "C4":  # Res5ROIHeads: no box head; MaskRCNNConvUpsampleHead NUM_CONV 0
      assert (m.box_head_num_conv, m.box_head_num_fc, m.mask_head_num_conv) == (0, 0, 0), key
    else:  # FastRCNNConvFCHead NUM_FC 2; mask head NUM_CONV 4
      assert (m.box_head_num_conv, m.box_head_num_fc, m.mask_head_num_conv) == (0, 2, 4), key


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_recipe_loads_with_published_row(key):
  config = CONFIGS[key]
  framework, stem = key.split("/")
  assert isinstance(config, ml_collections.ConfigDict)
  assert config.convention in CONVENTIONS
  assert config.convention == framework
  assert config.upstream.rsplit("/", 1)[-1] == stem
  p = config.published
  assert isinstance(p, ml_collections.ConfigDict)
  assert 30.0 < p.mask_ap < p.box_ap < 50.0
  assert p.url.startswith(URL_PREFIX[framework]), p.url
  assert p.checkpoint == p.url.rsplit("/", 1)[-1]
  assert p.checkpoint.endswith(".pkl" if framework == "detectron2" else ".pth")
  if framework == "mmdet":
    # mmdet checkpoint files are named after their config (the fp16 one sits under v2.0/fp16/).
    assert p.checkpoint.startswith(stem), p.checkpoint
  if framework == "detectron2":
    assert f"/{stem}/" in p.url


@pytest.mark.parametrize("key", sorted(PUBLISHED))
def test_published_numbers(key):
  box, mask, checkpoint = PUBLISHED[key]
  p = CONFIGS[key].published
  assert (p.box_ap, p.mask_ap, p.checkpoint) == (box, mask, checkpoint)


def test_model_section_is_accepted_by_the_model():
  try:
    from maskrcnn_jax.modeling.mask_rcnn import ModelConfig  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # the model package is still being assembled
    pytest.skip(f"maskrcnn_jax.modeling.mask_rcnn does not import yet: {e}")
  for config in CONFIGS.values():
    ModelConfig.from_config(config)  # raises on unknown model.* keys and conventions


def test_backbone_from_name():
  widths = {"x101_32x4d": (32, 4), "x101_64x4d": (64, 4), "x101_32x8d": (32, 8),
            "X_101_32x8d": (32, 8)}
  for key, config in CONFIGS.items():
    m = config.model
    stem = key.split("/")[1]
    found = [name for name in widths if name in stem]
    if found:
      assert (m.depth, m.groups, m.width_per_group) == (101, *widths[found[0]]), key
    elif re.search(r"r101|R_101", stem):
      assert (m.depth, m.groups, m.width_per_group) == (101, 1, 64), key
    else:
      assert re.search(r"r50|R_50|resnet50", stem), key
      assert (m.depth, m.groups, m.width_per_group) == (50, 1, 64), key


def test_mmdet_caffe_recipes_are_msra_bgr():
  caffe = _select("mmdet", r"_caffe_")
  assert len(caffe) == 9
  for key, config in caffe.items():
    m = config.model
    assert m.stride_in_1x1, key
    assert not m.to_rgb, key
    assert tuple(m.pixel_mean) == CAFFE_MEAN, key
    assert tuple(m.pixel_std) == (1.0, 1.0, 1.0), key


def test_mmdet_pytorch_recipes():
  for key, config in _select("mmdet", r"^(?!.*_caffe_)").items():
    m = config.model
    assert not m.stride_in_1x1, key
    if "x101_32x8d" in key:
      # open-mmlab://detectron2/resnext101_32x8d: its img_norm_cfg is BGR with the C2 std.
      assert not m.to_rgb, key
      assert tuple(m.pixel_mean) == CAFFE_MEAN, key
      assert tuple(m.pixel_std) == C2_BGR_STD, key
    else:
      assert m.to_rgb, key
      assert tuple(m.pixel_mean) == RGB_MEAN, key
      assert tuple(m.pixel_std) == RGB_STD, key


def test_mask_scoring_only_for_ms_rcnn():
  for key, config in CONFIGS.items():
    assert config.model.mask_scoring == ("/ms_rcnn_" in "/" + key.split("/")[1]), key


def test_schedules_and_multiscale():
  for key, config in CONFIGS.items():
    framework, stem = key.split("/")
    if framework != "torchvision":
      assert config.schedule.name == re.search(r"_(\d)x(?:_coco)?$", stem).group(1) + "x", key
    multiscale = framework == "detectron2" or "mstrain" in stem
    assert (len(config.data.train_short) > 1) == multiscale, key
  # detectron2 Base-RCNN-FPN: MIN_SIZE_TRAIN (640, ..., 800) sampled per image.
  for key, config in _select("detectron2").items():
    assert tuple(config.data.train_short) == (640, 672, 704, 736, 768, 800), key
    assert config.data.train_short_mode == "choice", key
  # mmdet: 'value' (six scales) for the r50 caffe and x101_32x8d mstrain recipes, else 'range'.
  for key, config in _select("mmdet", "mstrain").items():
    if "r50_caffe" in key or "x101_32x8d" in key:
      assert tuple(config.data.train_short) == (640, 672, 704, 736, 768, 800), key
      assert config.data.train_short_mode == "choice", key
    else:
      assert tuple(config.data.train_short) == (640, 800), key
      assert config.data.train_short_mode == "range", key


def test_detectron2_pixels_and_stride():
  for key, config in _select("detectron2").items():
    m = config.model
    assert not m.to_rgb, key
    assert tuple(m.pixel_mean) == CAFFE_MEAN, key
    if "X_101_32x8d" in key:
      assert tuple(m.pixel_std) == C2_BGR_STD, key  # PIXEL_STD [57.375, 57.120, 58.395]
      assert not m.stride_in_1x1, key  # STRIDE_IN_1X1: False
    else:
      assert tuple(m.pixel_std) == (1.0, 1.0, 1.0), key  # MSRA
      assert m.stride_in_1x1, key


def test_torchvision_recipes():
  v1 = CONFIGS["torchvision/maskrcnn_resnet50_fpn"].model
  v2 = CONFIGS["torchvision/maskrcnn_resnet50_fpn_v2"].model
  for m in (v1, v2):
    assert m.num_classes == 90  # 91 outputs, background first
    assert m.to_rgb and m.input_scale == pytest.approx(1 / 255)
    assert tuple(m.pixel_mean) == (0.485, 0.456, 0.406)
    assert tuple(m.pixel_std) == (0.229, 0.224, 0.225)
    assert not m.stride_in_1x1
  assert v1.fpn_norm == "" and v1.rpn_num_convs == 1 and v1.box_head_num_fc == 2
  assert v2.fpn_norm == "bn" and v2.rpn_num_convs == 2
  assert (v2.box_head_num_conv, v2.box_head_num_fc) == (4, 1)
  for key, config in CONFIGS.items():
    # No recipe hard-codes the BatchNorm eps: the checkpoint decides it (provenance.py).
    assert config.model.norm_eps is None, key
    if not key.startswith("torchvision/"):
      assert config.model.num_classes == 80, key


def test_model_zoo_doc_lists_every_recipe():
  with open(os.path.join(REPO, "docs", "model_zoo.md")) as f:
    doc = f.read()
  for path in CONFIG_PATHS:
    rel = os.path.relpath(path, REPO)
    config = CONFIGS[_key(path)]
    p = config.published
    rows = [line for line in doc.splitlines() if line.startswith(f"| [{rel}]")]
    assert len(rows) == 1, rel
    row = rows[0]
    assert f"| {p.box_ap:.1f} | {p.mask_ap:.1f} |" in row, rel
    assert f"]({p.url})" in row, rel
    assert f"--config {rel} --src {p.checkpoint} --out " in row, rel


def test_defaults_are_written_once_in_config_lib():
  """config_lib is the only place a default is written: ModelConfig has none of its own (a field
  the config lacks comes from config_lib.defaults()), MaskRCNN.losses' sampler defaults and
  data.pipeline's fallbacks read config_lib."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import inspect  # pylint: disable=g-import-not-at-top

  from maskrcnn_jax import config_lib  # pylint: disable=g-import-not-at-top
  from maskrcnn_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from maskrcnn_jax.modeling import mask_rcnn  # pylint: disable=g-import-not-at-top

  defaults = config_lib.defaults()
  fields = dataclasses.fields(mask_rcnn.ModelConfig)
  assert all(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
             for f in fields)
  missing = {f.name for f in fields} - set(defaults.model) - {"convention", "roi_align_impl"}
  assert not missing, f"ModelConfig fields without a config_lib default: {sorted(missing)}"
  # A config with an empty model section is the defaults' model.
  bare = ml_collections.ConfigDict(dict(convention=config_lib.DEFAULT_CONVENTION, model={}))
  full = mask_rcnn.ModelConfig.from_config(defaults)
  assert mask_rcnn.ModelConfig.from_config(bare) == full
  bare.model.num_classes = 3
  assert mask_rcnn.ModelConfig.from_config(bare).num_classes == 3
  bare.model.typo = 1
  with pytest.raises(ValueError, match="model.typo"):
    mask_rcnn.ModelConfig.from_config(bare)

  params = inspect.signature(mask_rcnn.MaskRCNN.losses).parameters
  for key in ("rpn_batch_per_image", "roi_batch_per_image", "rpn_positive_fraction",
              "roi_positive_fraction"):
    assert params[key].default == defaults.train[key] == config_lib.train_config()[key]

  assert not hasattr(pipeline, "DATA_DEFAULTS")
  empty = ml_collections.ConfigDict(dict(data={}))
  for key, value in defaults.data.items():
    assert pipeline.data_option(empty, key) == value
