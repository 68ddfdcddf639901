#!/usr/bin/env python
"""Generate tests/fixtures/parity_mmdet_*.npz from real mmdetection 3.3 runs (CPU).

NOT run by CI (CI has no torch / mmcv). Run inside the mmdetection reference venv (see
tests/fixtures/README.md, "mmdetection fixtures": torch 2.13 CPU + mmcv 2.1.0 built from source
with its CPU ops + mmengine + mmdet 3.3.0)::

    /work/mmenv/bin/python scripts/make_parity_fixtures_mmdet.py --model r50            # calibrate, record, verify
    /work/mmenv/bin/python scripts/make_parity_fixtures_mmdet.py --model ms_r50_caffe
    /work/mmenv/bin/python scripts/make_parity_fixtures_mmdet.py --model r50 --verify-only

What it does (the torchvision generator, scripts/make_parity_fixtures.py, is the template)
  1. Builds the detector from mmdet 3.3's own config (shipped in the package under
     mmdet/.mim/configs) with the backbone's `init_cfg` (pretrained) removed, eval mode, CPU:
       r50           mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py     (pytorch style, RGB, std 58)
       ms_r50_caffe  ms_rcnn/ms-rcnn_r50-caffe_fpn_1x_coco.py   (caffe style, BGR, std 1,
                                                                 + MaskIoU head)
       x101          mask_rcnn/mask-rcnn_x101-32x4d_fpn_1x_coco.py
     Its state-dict keys and shapes must equal tests/fixtures/checkpoint_keys/mmdet_*.tsv
     (the mmdet v2 zoo names: mmdet v3 kept them).
  2. Weights: every >=2-D tensor is `tests.synthetic_weights.seeded_state_dict`'s
     seeded tensor (He std, or the absolute std stored in `scale_names`/`scale_values` for the
     FPN output convs and the head output layers); every 1-D tensor (BN weight/bias/running
     stats, conv/linear biases) is calibrated here and stored verbatim (`w/<name>`); the BN
     `num_batches_tracked` scalars are 0. Calibration as in the torchvision generator
     (shared/reference/reference_frameworks.md): BN statistics from real activations on 8 other
     scikit-image pictures, perturbed; hidden biases N(0, (0.1 * output std)^2); FPN output stds
     growing with the level; head output layers scaled to set spreads on the fixture images.
  3. Records, for three scikit-image photographs fed as mmdet does (BGR uint8 -> the config's
     test pipeline: `LoadImageFromNDArray`, `Resize(scale=(1333, 800), keep_ratio=True)` with
     cv2, `PackDetInputs`; then the model's `DetDataPreprocessor`: bgr_to_rgb per config,
     (x - mean) / std, zero pad to a multiple of 32), every stage with the key names of the
     torchvision fixture (tests/fixtures/README.md).
     Detections twice:
       det/*     the real mmdet 3.3 end-to-end result (`model.test_step`). mmdet 3.x changed
                 the test-time order when a mask head is present (StandardRoIHead.predict,
                 `bbox_rescale = rescale if not self.with_mask else False`): the class-wise NMS
                 runs in *resized* coordinates and the mask RoIs are those resized boxes; the
                 boxes are divided by scale_factor afterwards (FCNMaskHead, in place). For Mask
                 Scoring, mmdet 3.3 overwrites `scores` with the mask score.
       det_v2/*  the mmdet v2.28 order (what maskrcnn_jax implements, parity_spec 3.12-3.14),
                 run with mmdet 3.3's own components: bbox_head decode + clip in resized
                 coordinates, divide by the float32 scale_factor, `multiclass_nms` in original
                 coordinates, mask RoIs = det_boxes * scale_factor (float32 round trip), paste
                 with (det * sf) / sf, mask score = MaskIoU[label] x bbox score.
  4. Verifies: a fresh model with the weights regenerated from the fixture alone reproduces the
     recorded end-to-end detections exactly.

Imports only numpy / torch / mmcv / mmengine / mmdet / cv2 / skimage / pycocotools plus the file
tests/synthetic_weights.py (loaded directly, so jax is not needed).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import io
import json
import sys
import time
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path

import cv2
import mmcv
import mmengine
import numpy as np
import skimage
import skimage.data
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_util

import mmdet
from mmdet.models.layers import multiclass_nms
from mmdet.structures.bbox import bbox2roi

REPO = Path(__file__).resolve().parents[1]
KEY_DIR = REPO / "tests" / "fixtures" / "checkpoint_keys"
MMDET_CONFIGS = Path(mmdet.__file__).resolve().parent / ".mim" / "configs"

MODELS_ = {
    "r50": dict(config="mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py",
                keys="mmdet_mask_rcnn_r50_fpn_1x_coco.tsv",
                out="parity_mmdet_r50.npz", ours="configs/mmdet/mask_rcnn_r50_fpn_1x_coco.py"),
    "ms_r50_caffe": dict(config="ms_rcnn/ms-rcnn_r50-caffe_fpn_1x_coco.py",
                         keys="mmdet_ms_rcnn_r50_caffe_fpn_1x_coco.tsv",
                         out="parity_mmdet_ms_r50_caffe.npz",
                         ours="configs/mmdet/ms_rcnn_r50_caffe_fpn_1x_coco.py"),
    "x101": dict(config="mask_rcnn/mask-rcnn_x101-32x4d_fpn_1x_coco.py",
                 keys="mmdet_mask_rcnn_x101_32x4d_fpn_1x_coco.tsv",
                 out="parity_mmdet_x101_32x4d.npz",
                 ours="configs/mmdet/mask_rcnn_x101_32x4d_fpn_1x_coco.py"),
}

SEED = 20240611
# Fixture images: the torchvision fixture's three (see scripts/make_parity_fixtures.py); they are
# NOT stored here: regenerate with `image_rgb(name)` (all three ship inside scikit-image, no
# network) and check `<img>/image_sha256` (sha256 of the RGB uint8 bytes). mmdet gets them BGR.
#   astronaut   512x512  -> 800x800    (padded 800x800)
#   coffee      400x600  -> 800x1200   (padded 800x1216)
#   retina_crop 1400x700 -> 1333x667   (padded 1344x672; mmdet rounds int(x + 0.5): tv has 666)
FIXTURE_IMAGES = ("astronaut", "coffee", "retina_crop")
IMAGE_CROPS = {"retina_crop": ("retina", (slice(5, 1405), slice(355, 1055)))}
CALIB_IMAGES = ("rocket", "chelsea", "immunohistochemistry", "colorwheel", "logo", "hubble_deep_field",
                "camera", "coins")
FPN_LEVELS = ("0", "1", "2", "3", "pool")     # P2..P6; key names shared with the torchvision fixture
N_SAMPLE = 4096
N_RPN_SAMPLE = 512
N_BOX_HEAD = 200

# Target spreads (see the torchvision generator for why these differ from the doc's).
T_FPN_STD = (3.0, 4.2, 5.9, 8.2)
T_RPN_OBJ_STD = 1.0
T_RPN_DELTA_STD = 0.2
T_CLS_STD = 1.5
T_CLS_BIAS_STD = 0.4
T_BOX_STD = 1.0
T_MASK_STD = 6.0
T_MASK_BIAS_STD = 1.5
# MaskIoU head output (a predicted IoU): std 0.12 around 0.65, per-class offset std 0.08.
T_IOU_STD = 0.12
T_IOU_MEAN = 0.65
T_IOU_BIAS_STD = 0.08
HIDDEN_BIAS_REL = 0.1


# ----------------------------------------------------------------------------- helpers
@functools.lru_cache(maxsize=None)
def load_synthetic():
  path = REPO / "tests" / "synthetic_weights.py"
  spec = importlib.util.spec_from_file_location("_maskrcnn_jax_synthetic", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def synthetic_he_scale(shape) -> float:
  return float(load_synthetic().he_scale(tuple(shape)))


def rng_for(*parts) -> np.random.Generator:
  words = [SEED]
  for p in parts:
    words.append(zlib.crc32(str(p).encode()) if not isinstance(p, int) else p)
  return np.random.default_rng(words)


def round_sig(x: float, sig: int = 4) -> float:
  return float(f"{x:.{sig - 1}e}")


def image_rgb(name: str) -> np.ndarray:
  base, crop = IMAGE_CROPS.get(name, (name, None))
  img = getattr(skimage.data, base)()
  if img.ndim == 2:
    img = np.stack([img] * 3, axis=-1)
  if img.shape[-1] == 4:
    img = img[..., :3]
  if crop is not None:
    img = img[crop]
  assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, (name, img.shape, img.dtype)
  return np.ascontiguousarray(img)


def image_bgr(name: str) -> np.ndarray:
  """What mmdet's loader (cv2.imdecode, IMREAD_COLOR) would give: BGR uint8."""
  return np.ascontiguousarray(image_rgb(name)[:, :, ::-1])


def sha256(a: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


# ----------------------------------------------------------------------------- model
def build_model(which: str):
  from mmengine.config import Config
  from mmdet.registry import MODELS
  from mmdet.utils import register_all_modules
  register_all_modules(init_default_scope=True)
  cfg = Config.fromfile(str(MMDET_CONFIGS / MODELS_[which]["config"]))
  cfg.model.backbone.init_cfg = None           # no pretrained download
  model = MODELS.build(cfg.model)
  model.cfg = cfg
  return model.eval()


def test_pipeline(model):
  from mmcv.transforms import Compose
  from mmdet.utils import get_test_pipeline_cfg
  steps = [s for s in get_test_pipeline_cfg(model.cfg.copy()) if s["type"] != "LoadAnnotations"]
  steps[0] = dict(type="mmdet.LoadImageFromNDArray")          # as mmdet.apis.inference_detector
  return Compose(steps), steps


def preprocess(model, pipeline, imgs_bgr):
  """[BGR uint8 HWC] -> (inputs [N,3,Hp,Wp] float32, data_samples) through the real pipeline."""
  datas = [pipeline(dict(img=im, img_id=i)) for i, im in enumerate(imgs_bgr)]
  data = {"inputs": [d["inputs"] for d in datas], "data_samples": [d["data_samples"] for d in datas]}
  data = model.data_preprocessor(data, False)
  return data["inputs"], data["data_samples"]


def model_keys(model) -> list:
  return [(k, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()]


def check_keys(keys, synthetic, key_tsv: Path) -> None:
  ref = synthetic.read_key_tsv(str(key_tsv))
  ref_ns = [(r[0], tuple(int(s) for s in r[1])) for r in ref]
  got_ns = [(k, s) for k, s, _ in keys]
  if sorted(ref_ns) != sorted(got_ns) or len(set(got_ns)) != len(got_ns):
    diff = sorted(set(ref_ns) ^ set(got_ns))
    raise SystemExit(f"state_dict keys differ from {key_tsv.name}: {diff[:10]}")
  if ref_ns != got_ns:   # same (name, shape) set; tensors are seeded per name, order is irrelevant
    print(f"[model] note: state_dict order differs from {key_tsv.name} (same keys and shapes)")


def make_state_dict(synthetic, keys, scales, overrides):
  sd = synthetic.seeded_state_dict(keys, SEED, scales=scales, overrides=overrides)
  out = OrderedDict()
  for k, _, dt in keys:
    t = torch.from_numpy(np.ascontiguousarray(sd[k]))
    out[k] = t.to(torch.int64) if dt == "int64" else t.to(torch.float32)
  return out


def state_dict_from_fixture(fx, synthetic, keys):
  scales = {str(n): float(v) for n, v in zip(fx["scale_names"], fx["scale_values"])}
  ov = {k: fx["w/" + k] for k, s, _ in keys if len(s) == 1}
  return make_state_dict(synthetic, keys, scales, ov)


def masked_stats(x: torch.Tensor, vhw):
  s = torch.zeros(x.shape[1], dtype=torch.float64)
  s2 = torch.zeros(x.shape[1], dtype=torch.float64)
  n = 0
  for i, (h, w) in enumerate(vhw):
    xi = x[i, :, :h, :w].double()
    s += xi.sum((1, 2))
    s2 += (xi * xi).sum((1, 2))
    n += h * w
  m = s / n
  return m, (s2 / n - m * m).clamp_min(1e-12)


def valid_hw(image_sizes, padded_hw, feat_hw):
  sy = padded_hw[0] / feat_hw[0]
  sx = padded_hw[1] / feat_hw[1]
  return [(int(np.ceil(h / sy)), int(np.ceil(w / sx))) for h, w in image_sizes]


# ----------------------------------------------------------------------------- calibration
def centred_scale(raws, target_std: float, weight: torch.Tensor):
  """As in the torchvision generator: (absolute weight std, per-channel mean at that scale)."""
  he = synthetic_he_scale(weight.shape)
  mean = torch.cat(raws).mean(0)
  stds = [float((r - mean).std()) for r in raws]
  geo = float(np.exp(np.mean(np.log(stds))))
  scale = round_sig(he * target_std / geo)
  return scale, (mean * (scale / he)).numpy()


def set_bias(ov: dict, mod, name: str, out_std: float) -> None:
  n = mod.bias.shape[0]
  b = (HIDDEN_BIAS_REL * out_std * rng_for("bias", name).standard_normal(n)).astype(np.float32)
  mod.bias.copy_(torch.from_numpy(b))
  ov[f"{name}.bias"] = b


def calib_images_bgr():
  """Calibration pictures centre-cropped to 800:1088 so the batch has ~no padding."""
  out = []
  for n in CALIB_IMAGES:
    img = image_bgr(n)
    h, w = img.shape[:2]
    tw = min(w, int(round(h * 1088 / 800)))
    th = min(h, int(round(tw * 800 / 1088)))
    y0, x0 = (h - th) // 2, (w - tw) // 2
    out.append(np.ascontiguousarray(img[y0:y0 + th, x0:x0 + tw]))
  return out


@torch.no_grad()
def calibrate(model, pipeline, synthetic, keys):
  t0 = time.time()
  scales: dict = {}
  ov: dict = {}
  model.load_state_dict(make_state_dict(synthetic, keys, scales, ov))
  inputs, samples = preprocess(model, pipeline, calib_images_bgr())
  sizes = [tuple(s.metainfo["img_shape"][:2]) for s in samples]
  padded = tuple(inputs.shape[-2:])
  print(f"[calib] {len(sizes)} images, sizes {sizes}, padded {padded}", flush=True)
  name_of = {m: n for n, m in model.named_modules()}
  hooks = []

  def bn_hook(mod, inp):
    name = name_of[mod]
    x = inp[0]
    m, v = masked_stats(x, valid_hw(sizes, padded, x.shape[-2:]))
    r = rng_for("bn", name)
    c = x.shape[1]
    rm = m.numpy() + 0.1 * np.sqrt(v.numpy()) * r.standard_normal(c)
    rv = v.numpy() * r.uniform(0.5, 2.0, c)
    wt = r.uniform(0.5, 1.5, c)
    bs = 0.1 * r.standard_normal(c)
    for attr, val in (("running_mean", rm), ("running_var", rv), ("weight", wt), ("bias", bs)):
      arr = val.astype(np.float32)
      getattr(mod, attr).copy_(torch.from_numpy(arr))
      ov[f"{name}.{attr}"] = arr

  def fpn_hook(mod, inp, out):
    name = name_of[mod]                      # neck.lateral_convs.{i}.conv / neck.fpn_convs.{i}.conv
    assert float(mod.bias.abs().max()) == 0.0
    if ".fpn_convs." in name:
      lvl = int(name.split(".")[-2])
      he = synthetic_he_scale(mod.weight.shape)
      s = round_sig(he * T_FPN_STD[lvl] / float(out.double().std()))
      scales[f"{name}.weight"] = s
      out = out * (s / he)
    std = float(out.double().std())
    b = (HIDDEN_BIAS_REL * std * rng_for("bias", name).standard_normal(out.shape[1])).astype(np.float32)
    mod.bias.copy_(torch.from_numpy(b))
    ov[f"{name}.bias"] = b
    return out + mod.bias.view(1, -1, 1, 1)

  for m in model.backbone.modules():
    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
      hooks.append(m.register_forward_pre_hook(bn_hook))
  for m in model.neck.modules():
    if isinstance(m, torch.nn.Conv2d):
      hooks.append(m.register_forward_hook(fpn_hook))
  feats = model.extract_feat(inputs)
  for h in hooks:
    h.remove()
  model.load_state_dict(make_state_dict(synthetic, keys, scales, ov))
  feats = model.extract_feat(inputs)
  print(f"[calib] pass A (backbone BN + FPN) {time.time() - t0:.0f}s; scales {scales}", flush=True)
  for k, f in zip(FPN_LEVELS, feats):
    print(f"    P{k}: shape {tuple(f.shape)} std {float(f.std()):.3f} mean {float(f.mean()):.3f}")
  feats = inputs = samples = None

  # ---- heads, on the fixture images one at a time.
  sets = []
  for name in FIXTURE_IMAGES:
    inp, smp = preprocess(model, pipeline, [image_bgr(name)])
    sets.append((smp[0].metainfo, model.extract_feat(inp)))
  print(f"[calib] fixture-image features {time.time() - t0:.0f}s", flush=True)

  head = model.rpn_head
  pre = torch.cat([F.conv2d(f, head.rpn_conv.weight, None, padding=1).flatten()
                   for _, fe in sets for f in fe])
  set_bias(ov, head.rpn_conv, "rpn_head.rpn_conv", float(pre.double().std()))
  del pre

  def rpn_raw(w):
    return [torch.cat([F.conv2d(F.relu(head.rpn_conv(f)), w).permute(0, 2, 3, 1).reshape(-1, w.shape[0])
                       for f in fe]).double() for _, fe in sets]

  sc, mean = centred_scale(rpn_raw(head.rpn_cls.weight), T_RPN_OBJ_STD, head.rpn_cls.weight)
  scales["rpn_head.rpn_cls.weight"] = sc
  ov["rpn_head.rpn_cls.bias"] = (-mean + rng_for("bias", "rpn_cls").uniform(-7.0, -5.0, 3)).astype(np.float32)
  sc, mean = centred_scale(rpn_raw(head.rpn_reg.weight), T_RPN_DELTA_STD, head.rpn_reg.weight)
  scales["rpn_head.rpn_reg.weight"] = sc
  ov["rpn_head.rpn_reg.bias"] = (
      -mean + 0.1 * T_RPN_DELTA_STD * rng_for("bias", "rpn_reg").standard_normal(12)).astype(np.float32)
  model.load_state_dict(make_state_dict(synthetic, keys, scales, ov))
  print(f"[calib] RPN {time.time() - t0:.0f}s", flush=True)

  # Box head.
  rh = model.roi_head
  bh = rh.bbox_head
  props = [model.rpn_head.predict_by_feat(*model.rpn_head(fe), batch_img_metas=[meta], rescale=False)[0]
           for meta, fe in sets]
  xs = [rh.bbox_roi_extractor(fe[:rh.bbox_roi_extractor.num_inputs], bbox2roi([p.bboxes])).flatten(1)
        for (meta, fe), p in zip(sets, props)]
  for i, fc in enumerate(bh.shared_fcs):
    y = torch.cat([F.linear(x, fc.weight) for x in xs])
    set_bias(ov, fc, f"roi_head.bbox_head.shared_fcs.{i}", float(y.double().std()))
    xs = [F.relu(fc(x)) for x in xs]
  sc, mean = centred_scale([F.linear(x, bh.fc_cls.weight).double() for x in xs], T_CLS_STD, bh.fc_cls.weight)
  scales["roi_head.bbox_head.fc_cls.weight"] = sc
  ov["roi_head.bbox_head.fc_cls.bias"] = (
      -mean + T_CLS_BIAS_STD * rng_for("bias", "fc_cls").standard_normal(bh.fc_cls.out_features)
  ).astype(np.float32)
  sc, mean = centred_scale([F.linear(x, bh.fc_reg.weight).double() for x in xs], T_BOX_STD, bh.fc_reg.weight)
  scales["roi_head.bbox_head.fc_reg.weight"] = sc
  ov["roi_head.bbox_head.fc_reg.bias"] = (
      -mean + 0.1 * T_BOX_STD * rng_for("bias", "fc_reg").standard_normal(bh.fc_reg.out_features)
  ).astype(np.float32)
  model.load_state_dict(make_state_dict(synthetic, keys, scales, ov))
  print(f"[calib] box head {time.time() - t0:.0f}s", flush=True)

  # Mask head on the detections (mmdet 3.3 flow: resized-coordinate boxes).
  mh = rh.mask_head
  xs, labels_all = [], []
  for (meta, fe), p in zip(sets, props):
    det = rh.predict_bbox(fe, [meta], [p], rcnn_test_cfg=rh.test_cfg, rescale=False)[0]
    print(f"    {len(det.scores)} detections, scores {float(det.scores.min()):.3f}..{float(det.scores.max()):.3f}, "
          f"{len(torch.unique(det.labels))} classes")
    xs.append(rh.mask_roi_extractor(fe[:rh.mask_roi_extractor.num_inputs], bbox2roi([det.bboxes])))
    labels_all.append(det.labels)
  mask_feats = xs
  for i, cm in enumerate(mh.convs):
    cv = cm.conv
    y = torch.cat([F.conv2d(x, cv.weight, None, padding=1).flatten() for x in xs])
    set_bias(ov, cv, f"roi_head.mask_head.convs.{i}.conv", float(y.double().std()))
    xs = [cm(x) for x in xs]
  y = torch.cat([F.conv_transpose2d(x, mh.upsample.weight, None, stride=2).flatten() for x in xs])
  set_bias(ov, mh.upsample, "roi_head.mask_head.upsample", float(y.double().std()))
  xs = [F.relu(mh.upsample(x)) for x in xs]
  nc = mh.conv_logits.out_channels
  raws = [F.conv2d(x, mh.conv_logits.weight).double().permute(0, 2, 3, 1).reshape(-1, nc) for x in xs]
  sc, mean = centred_scale(raws, T_MASK_STD, mh.conv_logits.weight)
  scales["roi_head.mask_head.conv_logits.weight"] = sc
  ov["roi_head.mask_head.conv_logits.bias"] = (
      -mean + T_MASK_BIAS_STD * rng_for("bias", "conv_logits").standard_normal(nc)).astype(np.float32)
  model.load_state_dict(make_state_dict(synthetic, keys, scales, ov))
  print(f"[calib] mask head {time.time() - t0:.0f}s", flush=True)

  # MaskIoU head (Mask Scoring R-CNN).
  if hasattr(rh, "mask_iou_head"):
    ih = rh.mask_iou_head
    xs = []
    for mf, lab in zip(mask_feats, labels_all):
      ml = mh(mf)[torch.arange(len(lab)), lab]
      xs.append(torch.cat((mf, ih.max_pool(ml.sigmoid().unsqueeze(1))), 1))
    for i, cv in enumerate(ih.convs):
      y = torch.cat([F.conv2d(x, cv.weight, None, stride=cv.stride, padding=cv.padding).flatten() for x in xs])
      set_bias(ov, cv, f"roi_head.mask_iou_head.convs.{i}", float(y.double().std()))
      xs = [F.relu(cv(x)) for x in xs]
    xs = [x.flatten(1) for x in xs]
    for i, fc in enumerate(ih.fcs):
      y = torch.cat([F.linear(x, fc.weight) for x in xs])
      set_bias(ov, fc, f"roi_head.mask_iou_head.fcs.{i}", float(y.double().std()))
      xs = [F.relu(fc(x)) for x in xs]
    w = ih.fc_mask_iou.weight
    sc, mean = centred_scale([F.linear(x, w).double() for x in xs], T_IOU_STD, w)
    scales["roi_head.mask_iou_head.fc_mask_iou.weight"] = sc
    ov["roi_head.mask_iou_head.fc_mask_iou.bias"] = (
        -mean + T_IOU_MEAN + T_IOU_BIAS_STD * rng_for("bias", "fc_mask_iou").standard_normal(w.shape[0])
    ).astype(np.float32)
    model.load_state_dict(make_state_dict(synthetic, keys, scales, ov))
    print(f"[calib] MaskIoU head {time.time() - t0:.0f}s", flush=True)

  sd = model.state_dict()
  one_d = OrderedDict((k, sd[k].numpy().astype(np.float32).copy()) for k, s, _ in keys if len(s) == 1)
  missing = [k for k in one_d if k not in ov]
  assert not missing, f"1-D tensors not calibrated: {missing[:5]}"
  print(f"[calib] scales {scales}", flush=True)
  return scales, one_d


# ----------------------------------------------------------------------------- recording
def sample_positions(rng, shape, n):
  total = int(np.prod(shape))
  flat = np.sort(rng.choice(total, size=min(n, total), replace=False))
  return np.stack(np.unravel_index(flat, shape), axis=1).astype(np.int32)


def rle_strings(binm: np.ndarray) -> np.ndarray:
  enc = mask_util.encode(np.asfortranarray(binm.transpose(1, 2, 0).astype(np.uint8)))
  return np.array([e["counts"].decode("ascii") for e in enc])


def mask_outputs(out, q, binm):
  out[q + "mask_area"] = binm.reshape(binm.shape[0], -1).sum(1).astype(np.int32)
  out[q + "mask_rle_coco"] = rle_strings(binm)


@torch.no_grad()
def record_image(model, pipeline, name: str, which: str) -> tuple[dict, dict]:
  rgb = image_rgb(name)
  bgr = image_bgr(name)
  out, info = {}, {}
  p = f"{name}/"
  out[p + "image_sha256"] = np.array(sha256(rgb))
  out[p + "image_hw"] = np.array(rgb.shape[:2], np.int32)
  rh = model.roi_head
  ms = hasattr(rh, "mask_iou_head")

  inputs, samples = preprocess(model, pipeline, [bgr])
  meta = samples[0].metainfo
  out[p + "resized_hw"] = np.array(meta["img_shape"][:2], np.int32)
  out[p + "padded_hw"] = np.array(inputs.shape[-2:], np.int32)
  out[p + "scale_factor"] = np.array(meta["scale_factor"], np.float32)       # (w, h)
  tn = inputs[0].permute(1, 2, 0).numpy()          # (H, W, 3), channel order as the network sees it
  pos = sample_positions(rng_for(name, "input"), tn.shape, N_SAMPLE)
  out[p + "input/sample_yxc"] = pos
  out[p + "input/sample_values"] = tn[pos[:, 0], pos[:, 1], pos[:, 2]].astype(np.float32)
  out[p + "input/channel_sums"] = tn.astype(np.float64).sum((0, 1))

  feats = model.extract_feat(inputs)
  assert len(feats) == len(FPN_LEVELS)
  for lvl, ft in zip(FPN_LEVELS, feats):
    f = ft[0].permute(1, 2, 0).numpy()
    q = f"{p}fpn/{lvl}/"
    out[q + "hw"] = np.array(f.shape[:2], np.int32)
    out[q + "channel_mean"] = f.astype(np.float64).mean((0, 1)).astype(np.float32)
    pos = sample_positions(rng_for(name, "fpn", lvl), f.shape, N_SAMPLE)
    out[q + "sample_yxc"] = pos
    out[q + "sample_values"] = f[pos[:, 0], pos[:, 1], pos[:, 2]].astype(np.float32)

  cls_scores, bbox_preds = model.rpn_head(feats)
  for lvl, o, d in zip(FPN_LEVELS, cls_scores, bbox_preds):
    o = o[0].permute(1, 2, 0).numpy()           # (H, W, 3): anchor a = ratio (0.5, 1, 2)[a]
    d = d[0].permute(1, 2, 0).numpy()           # (H, W, 12): a*4 + (dx, dy, dw, dh)
    q = f"{p}rpn/{lvl}/"
    pos = sample_positions(rng_for(name, "rpn", lvl), o.shape[:2], N_RPN_SAMPLE)
    out[q + "sample_yx"] = pos
    out[q + "objectness"] = o[pos[:, 0], pos[:, 1]].astype(np.float32)
    out[q + "deltas"] = d[pos[:, 0], pos[:, 1]].astype(np.float32)
  out[p + "rpn/num_anchors_per_level"] = np.array([int(o[0].numel()) for o in cls_scores], np.int32)
  rpn_res = model.rpn_head.predict_by_feat(cls_scores, bbox_preds, batch_img_metas=[meta], rescale=False)
  props = rpn_res[0]
  assert len(props) == 1000, len(props)
  rpn_e2e = model.rpn_head.predict(feats, samples, rescale=False)[0]
  assert torch.equal(rpn_e2e.bboxes, props.bboxes)
  out[p + "proposals"] = props.bboxes.numpy().astype(np.float32)
  out[p + "proposal_scores"] = props.scores.numpy().astype(np.float32)

  br = rh._bbox_forward(feats, bbox2roi([props.bboxes[:N_BOX_HEAD]]))
  out[p + "box_head/class_logits"] = br["cls_score"].numpy().astype(np.float32)
  out[p + "box_head/box_regression"] = br["bbox_pred"].numpy().astype(np.float32)

  # ---------------- mmdet 3.3 flow (= model.test_step), staged.
  det = rh.predict_bbox(feats, [meta], [props], rcnn_test_cfg=rh.test_cfg, rescale=False)[0]
  boxes_resized = det.bboxes.clone()
  mres = rh._mask_forward(feats, bbox2roi([det.bboxes]))
  n = len(det.labels)
  ml = mres["mask_preds"][torch.arange(n), det.labels]
  bbox_scores = det.scores.clone()
  mask_iou = None
  if ms:
    mask_iou = rh.mask_iou_head(mres["mask_feats"], ml)[torch.arange(n), det.labels]
  staged = rh.mask_head.predict_by_feat(mask_preds=(mres["mask_preds"],), results_list=[det],
                                        batch_img_metas=[meta], rcnn_test_cfg=rh.test_cfg,
                                        rescale=True)[0]
  d = pipeline(dict(img=bgr, img_id=0))
  e2e = model.test_step({"inputs": [d["inputs"]], "data_samples": [d["data_samples"]]})[0].pred_instances
  assert torch.equal(e2e.bboxes, staged.bboxes) and torch.equal(e2e.labels, staged.labels), name
  assert torch.equal(e2e.masks, staged.masks), name
  if ms:
    assert torch.equal(e2e.scores, bbox_scores * mask_iou), name
  else:
    assert torch.equal(e2e.scores, bbox_scores), name
  q = f"{p}det/"
  out[q + "boxes"] = e2e.bboxes.numpy().astype(np.float32)
  out[q + "scores"] = bbox_scores.numpy().astype(np.float32)
  out[q + "labels"] = e2e.labels.numpy().astype(np.int32)
  out[q + "boxes_resized"] = boxes_resized.numpy().astype(np.float32)
  if ms:
    out[q + "mask_iou"] = mask_iou.numpy().astype(np.float32)
    out[q + "mask_scores"] = e2e.scores.numpy().astype(np.float32)
  mask_outputs(out, q, e2e.masks.numpy())
  info["det_masks"] = e2e.masks.numpy()

  # ---------------- mmdet v2.28 order, from mmdet 3.3's components.
  bh = rh.bbox_head
  rois = bbox2roi([props.bboxes])
  full = rh._bbox_forward(feats, rois)
  raw = bh.predict_by_feat(rois=(rois,), cls_scores=(full["cls_score"],), bbox_preds=(full["bbox_pred"],),
                           batch_img_metas=[meta], rcnn_test_cfg=None, rescale=False)[0]
  boxes_all, scores_all = raw.bboxes, raw.scores            # (1000, 320) clipped, resized; (1000, 81)
  sw, sh = meta["scale_factor"]
  sf4 = torch.from_numpy(np.array([sw, sh, sw, sh], np.float32))   # v2: np.float32 img_meta array
  boxes_orig = (boxes_all.view(boxes_all.size(0), -1, 4) / sf4).view(boxes_all.size(0), -1)
  dets, labels = multiclass_nms(boxes_orig, scores_all, rh.test_cfg.score_thr, rh.test_cfg.nms,
                                rh.test_cfg.max_per_img)
  v2_boxes, v2_scores = dets[:, :4], dets[:, 4]
  mask_rois = v2_boxes * sf4                                 # simple_test_mask round trip
  mres2 = rh._mask_forward(feats, bbox2roi([mask_rois]))
  n2 = len(labels)
  ml2 = mres2["mask_preds"][torch.arange(n2), labels]
  q = f"{p}det_v2/"
  out[q + "boxes"] = v2_boxes.numpy().astype(np.float32)
  out[q + "scores"] = v2_scores.numpy().astype(np.float32)
  out[q + "labels"] = labels.numpy().astype(np.int32)
  out[q + "mask_rois"] = mask_rois.numpy().astype(np.float32)
  out[q + "mask_logits"] = ml2.numpy().astype(np.float32)
  if ms:
    iou2 = rh.mask_iou_head(mres2["mask_feats"], ml2)[torch.arange(n2), labels]
    out[q + "mask_iou"] = iou2.numpy().astype(np.float32)
    out[q + "mask_scores"] = (iou2 * v2_scores).numpy().astype(np.float32)   # get_mask_scores
  masks2 = rh.mask_head._predict_by_feat_single(
      mask_preds=mres2["mask_preds"], bboxes=mask_rois.clone(), labels=labels, img_meta=meta,
      rcnn_test_cfg=rh.test_cfg, rescale=True)                             # (det * sf) / sf, >= 0.5
  mask_outputs(out, q, masks2.numpy())
  info["det_v2_masks"] = masks2.numpy()
  return out, info


# ----------------------------------------------------------------------------- npz
def write_npz(path: Path, arrays: dict) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
    for k, v in arrays.items():
      buf = io.BytesIO()
      np.lib.format.write_array(buf, np.asanyarray(v), allow_pickle=False)
      zi = zipfile.ZipInfo(k + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
      zi.compress_type = zipfile.ZIP_DEFLATED
      zi.external_attr = 0o644 << 16
      zf.writestr(zi, buf.getvalue())
  tmp.replace(path)


def _version(pkg: str) -> str:
  try:
    from importlib.metadata import version
    return version(pkg)
  except Exception:  # pragma: no cover
    return "absent"


# ----------------------------------------------------------------------------- checks
def mm_roi_level(boxes: np.ndarray) -> np.ndarray:
  s = np.sqrt(np.maximum((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 0))
  with np.errstate(divide="ignore"):
    k = np.floor(np.log2(s / 56.0 + 1e-6))
  return np.clip(k, 0, 3).astype(np.int64)


def box_iou(a, b):
  a = a.astype(np.float64)[:, None]
  b = b.astype(np.float64)[None]
  iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
  ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
  inter = iw * ih
  ar = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])
  return inter / np.maximum(ar(a) + ar(b) - inter, 1e-12)


def quality_report(arrs: dict, infos: dict) -> tuple[list, list]:
  lines, problems = [], []
  for name in FIXTURE_IMAGES:
    for flow in ("det", "det_v2"):
      q = f"{name}/{flow}/"
      s = arrs[q + "scores"].astype(np.float64)
      lab = arrs[q + "labels"]
      area = arrs[q + "mask_area"]
      hw = arrs[f"{name}/image_hw"]
      frac = area / float(hw[0] * hw[1])
      ss = np.sort(s)[::-1]
      gaps = -np.diff(ss)
      b = arrs[q + "boxes"]
      box_area = np.maximum((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), 1.0)
      partial = int(((area > 0) & (area < 0.9 * box_area)).sum())
      line = (f"{name} {flow}: {len(s)} dets, {len(np.unique(lab))} classes, scores {ss[-1]:.4f}..{ss[0]:.4f}, "
              f"min gap {gaps.min():.2e}, pasted mask area frac median {np.median(frac):.4f} "
              f"[{frac.min():.4f}, {frac.max():.4f}], empty masks {int((area == 0).sum())}, partial {partial}")
      if flow == "det_v2":
        ml = arrs[q + "mask_logits"]
        rois = arrs[q + "mask_rois"]
        prop = arrs[f"{name}/proposal_scores"]
        line += (f"; mask logits std {ml.std():.2f} fg frac {np.mean(ml > 0):.2f}; proposal score ties "
                 f"{len(prop) - len(np.unique(prop))}; RoI level P2..P5 of detections "
                 f"{np.bincount(mm_roi_level(rois), minlength=4).tolist()}, of proposals "
                 f"{np.bincount(mm_roi_level(arrs[f'{name}/proposals']), minlength=4).tolist()}")
      if q + "mask_scores" in arrs:
        msc = arrs[q + "mask_scores"]
        line += (f"; mask_iou {arrs[q + 'mask_iou'].min():.3f}..{arrs[q + 'mask_iou'].max():.3f}, "
                 f"mask scores {msc.min():.4f}..{msc.max():.4f}")
      lines.append(line)
      if len(s) != 100:
        problems.append(f"{name} {flow}: {len(s)} detections != 100")
      if (gaps == 0).any():
        problems.append(f"{name} {flow}: tied detection scores")
      if (s >= 1.0).any():
        problems.append(f"{name} {flow}: a score equals 1.0")
      if len(np.unique(lab)) < 5:
        problems.append(f"{name} {flow}: only {len(np.unique(lab))} classes")
      if partial < 50:
        problems.append(f"{name} {flow}: only {partial} masks are neither empty nor filling their box")
    # mmdet 3.3 vs the v2.28 order.
    a, b = f"{name}/det/", f"{name}/det_v2/"
    iou = box_iou(arrs[a + "boxes"], arrs[b + "boxes"])
    iou[arrs[a + "labels"][:, None] != arrs[b + "labels"][None, :]] = 0
    j = iou.argmax(1)
    same = (iou.max(1) >= 0.999)
    m3, m2 = infos[name]["det_masks"], infos[name]["det_v2_masks"]
    miou = [((m3[i] & m2[k]).sum() / max((m3[i] | m2[k]).sum(), 1)) if same[i] else np.nan
            for i, k in enumerate(j)]
    box_err = np.abs(arrs[a + "boxes"][same] - arrs[b + "boxes"][j[same]]).max() if same.any() else np.nan
    lines.append(f"{name}: mmdet 3.3 vs v2.28 order: {int(same.sum())}/{len(same)} detections matched "
                 f"(IoU >= 0.999, same class), max box diff {box_err:.2e}, min mask IoU {np.nanmin(miou):.4f}, "
                 f"bit-equal boxes {int(np.sum(np.all(arrs[a + 'boxes'][same] == arrs[b + 'boxes'][j[same]], 1)))}, "
                 f"bit-equal masks {int(sum(np.array_equal(m3[i], m2[k]) for i, k in enumerate(j) if same[i]))}")
  return lines, problems


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", choices=sorted(MODELS_), default="r50")
  ap.add_argument("--out", type=Path, default=None)
  ap.add_argument("--threads", type=int, default=1)
  ap.add_argument("--verify-only", action="store_true")
  args = ap.parse_args()
  spec = MODELS_[args.model]
  out_path = args.out or (REPO / "tests" / "fixtures" / spec["out"])

  torch.set_num_threads(args.threads)
  synthetic = load_synthetic()
  model = build_model(args.model)
  pipeline, steps = test_pipeline(model)
  keys = model_keys(model)
  check_keys(keys, synthetic, KEY_DIR / spec["keys"])
  print(f"[model] {args.model}: {spec['config']}, {len(keys)} keys OK; pipeline {steps}; "
        f"data_preprocessor {model.cfg.model.data_preprocessor}", flush=True)

  if not args.verify_only:
    t0 = time.time()
    scales, one_d = calibrate(model, pipeline, synthetic, keys)
    sd = state_dict_from_fixture(
        {"scale_names": np.array(list(scales)), "scale_values": np.array(list(scales.values())),
         **{"w/" + k: v for k, v in one_d.items()}}, synthetic, keys)
    model = build_model(args.model)
    model.load_state_dict(sd)
    checksum_keys = ("backbone.conv1.weight", "backbone.layer3.5.conv2.weight", "roi_head.bbox_head.fc_cls.weight")
    dp = model.cfg.model.data_preprocessor
    arrs = OrderedDict()
    arrs["seed"] = np.array(SEED, np.int64)
    arrs["versions"] = np.array(json.dumps({
        "torch": torch.__version__, "mmcv": mmcv.__version__, "mmengine": mmengine.__version__,
        "mmdet": mmdet.__version__, "numpy": np.__version__, "opencv": cv2.__version__,
        "scikit-image": skimage.__version__, "pycocotools": _version("pycocotools"),
        "python": sys.version.split()[0]}))
    arrs["config"] = np.array(json.dumps({
        "model": f"mmdet {mmdet.__version__} configs/{spec['config']} (backbone init_cfg=None), eval, CPU",
        "maskrcnn_jax_config": spec["ours"],
        "test_pipeline": [dict(s) for s in steps],
        "data_preprocessor": dict(mean=list(dp.mean), std=list(dp.std), bgr_to_rgb=bool(dp.bgr_to_rgb),
                                  pad_size_divisor=int(dp.pad_size_divisor)),
        "test_cfg": json.loads(json.dumps(model.cfg.model.test_cfg.to_dict())),
        "input": "uint8 RGB from scikit-image, flipped to BGR (cv2 channel order)",
        "mask_binarization": "grid_sample paste >= 0.5 (mask_thr_binary)",
        "torch_threads": args.threads}))
    arrs["image_names"] = np.array(FIXTURE_IMAGES)
    arrs["image_crops"] = np.array(json.dumps({k: [v[0], [[s.start, s.stop] for s in v[1]]]
                                               for k, v in IMAGE_CROPS.items()}))
    arrs["calibration_images"] = np.array(CALIB_IMAGES)
    arrs["level_names"] = np.array(FPN_LEVELS)
    arrs["scale_names"] = np.array(list(scales))
    arrs["scale_values"] = np.array(list(scales.values()), np.float64)
    arrs["checksum_names"] = np.array(checksum_keys)
    arrs["checksum_sums"] = np.array([sd[k].double().sum().item() for k in checksum_keys], np.float64)
    arrs["checksum_first8"] = np.stack([sd[k].flatten()[:8].numpy() for k in checksum_keys]).astype(np.float32)
    for k, v in one_d.items():
      arrs["w/" + k] = v
    infos = {}
    for name in FIXTURE_IMAGES:
      t1 = time.time()
      o, infos[name] = record_image(model, pipeline, name, args.model)
      arrs.update(o)
      print(f"[record] {name} {time.time() - t1:.0f}s", flush=True)
    lines, problems = quality_report(arrs, infos)
    print("\n".join(lines))
    if problems:
      print("QUALITY PROBLEMS:\n  " + "\n  ".join(problems))
    write_npz(out_path, arrs)
    print(f"wrote {out_path} ({out_path.stat().st_size / 2**20:.2f} MiB, {len(arrs)} arrays) "
          f"in {time.time() - t0:.0f}s")

  # ---- self-consistency: a fresh model from the fixture only.
  fx = np.load(out_path)
  sd = state_dict_from_fixture(fx, synthetic, keys)
  for n, s in zip(fx["checksum_names"], fx["checksum_sums"]):
    assert sd[str(n)].double().sum().item() == s, f"checksum mismatch for {n}: RNG stream changed?"
  model = build_model(args.model)
  model.load_state_dict(sd)
  pipeline, _ = test_pipeline(model)
  from mmdet.apis import inference_detector
  for name in [str(n) for n in fx["image_names"]]:
    assert sha256(image_rgb(name)) == str(fx[f"{name}/image_sha256"]), f"{name}: image differs"
    r = inference_detector(model, image_bgr(name)).pred_instances
    assert np.array_equal(r.bboxes.numpy(), fx[f"{name}/det/boxes"]), f"{name}: boxes differ"
    assert np.array_equal(r.labels.numpy().astype(np.int32), fx[f"{name}/det/labels"]), f"{name}: labels differ"
    sk = "mask_scores" if f"{name}/det/mask_scores" in fx else "scores"
    assert np.array_equal(r.scores.numpy(), fx[f"{name}/det/{sk}"]), f"{name}: scores differ"
    assert np.array_equal(rle_strings(r.masks.numpy()), fx[f"{name}/det/mask_rle_coco"]), f"{name}: masks differ"
    print(f"[verify] {name}: {len(r.labels)} detections identical (inference_detector)", flush=True)
  print("verify OK")


if __name__ == "__main__":
  main()
