#!/usr/bin/env python
"""Generate tests/fixtures/parity_detectron2*.npz from real detectron2 runs (CPU).

NOT run by CI (CI has neither torch nor detectron2). Runs in the torchvision reference venv
(``scripts/reference_env/setup_torchvision_cpu.sh``) with detectron2 built from source into it
(tests/fixtures/README.md, "parity_detectron2.npz", lists the steps)::

    /work/tvenv/bin/python scripts/make_parity_fixtures_d2.py            # calibrate + record + verify
    /work/tvenv/bin/python scripts/make_parity_fixtures_d2.py --verify-only
    /work/tvenv/bin/python scripts/make_parity_fixtures_d2.py --model R_50_C4_3x
    /work/tvenv/bin/python scripts/make_parity_fixtures_d2.py --model R_50_DC5_3x --verify-only
    /work/tvenv/bin/python scripts/make_parity_fixtures_d2.py --model X_101_32x8d_FPN_3x

``--model`` picks the detectron2 model-zoo config (``MODELS`` below), its key file under
tests/fixtures/checkpoint_keys and the default output:

  R_50_FPN_3x (default)  mask_rcnn_R_50_FPN_3x.yaml  -> parity_detectron2.npz
  R_50_C4_3x             mask_rcnn_R_50_C4_3x.yaml   -> parity_detectron2_R_50_C4.npz
  R_50_DC5_3x            mask_rcnn_R_50_DC5_3x.yaml  -> parity_detectron2_R_50_DC5.npz
  X_101_32x8d_FPN_3x     mask_rcnn_X_101_32x8d_FPN_3x.yaml -> parity_detectron2_X_101_32x8d.npz
                         (ResNeXt-101 32x8d, stride in the 3x3 conv, PIXEL_STD (57.375, 57.12,
                         58.395); the coffee photograph only, to keep CI short)

The detectron2 twin of scripts/make_parity_fixtures.py (torchvision); it imports that script's
helpers (image loading, sampling, RLE, npz writer, calibration arithmetic) and keeps its
structure and fixture key names:

  1. Builds the model from the real yaml with ``get_cfg`` + ``build_model`` (MODEL.DEVICE cpu, no
     weights file), eval mode: MSRA ResNet-50 (stride in the 1x1 conv, FrozenBN eps 1e-5), BGR
     input, PIXEL_MEAN (103.53, 116.28, 123.675), PIXEL_STD 1, test resize ResizeShortestEdge
     800 / 1333 (PIL). The three architectures:
       FPN  backbone P2..P6, 3 anchors per position and level, StandardROIHeads (7x7 pooler over
            P2..P5, 2 FC, 4-conv mask head, 28x28 mask logits).
       C4   backbone res2..res4 ('res4', stride 16), one RPN level with 15 anchors (sizes
            32..512 x ratios 0.5/1/2, size-major), RPN pre/post-NMS top-k 6000/1000;
            Res5ROIHeads: 14x14 pooler on res4, roi_heads.res5 (stride 2), mean over 7x7 ->
            box predictor; the mask head (NUM_CONV 0) is deconv 2048->256 + predictor on the
            same res5 features: 14x14 mask logits.
       DC5  backbone res2..res5 with res5 dilated (dilation 2, stride 1: 'res5' at stride 16),
            one RPN level with 15 anchors, top-k 6000/1000; StandardROIHeads on res5 (7x7 pooler,
            2 FC; 14x14 pooler, 4-conv mask head, 28x28 mask logits).
  2. Weights: >=2-D tensors from ``synthetic.seeded_state_dict`` (He std, or ``scales[name]``
     as an absolute std for the calibrated layers: FPN output convs and head output layers);
     every 1-D tensor is calibrated here and stored (``w/<name>``), as in the torchvision script:
     FrozenBN statistics from activation statistics on the calibration images, then perturbed
     (C4: roi_heads.res5's FrozenBN statistics from res5 run on the calibration images' whole
     res4 maps); hidden biases N(0, 0.1 * output std); FPN output stds T_FPN_STD; head output
     spreads (RPN objectness std 1 + bias in [-7, -5], RPN deltas 0.2, class logits 1.5 +
     per-class bias 0.4, box deltas 1, mask logits 6 + per-class bias 1.5) set on the fixture
     images.
  3. Records, for three scikit-image pictures turned into what d2's decoder gives (BGR uint8),
     every stage of ``GeneralizedRCNN.inference``: d2's own test-time resize, preprocess_image,
     backbone (P2..P6, or the single feature map), RPN head / proposals (and, for one level, how
     many boxes entered the RPN NMS), box head on the first 200 proposals, final detections
     (detector_postprocess), mask logits (28x28; 14x14 for C4) and the pasted binary masks.
  4. Verifies: weights regenerated from the fixture alone, in a fresh model, reproduce the
     recorded detections and masks exactly.

The images are not stored: they are regenerated from scikit-image (all three files ship inside
the package) and checked against the stored sha256.

Imports only numpy / torch / detectron2 / skimage / pycocotools, plus the torchvision fixture
script and tests/synthetic_weights.py loaded as files (no jax needed).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import skimage
import torch
import torch.nn.functional as F

import detectron2
import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model as d2_build_model
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.modeling.proposal_generator import proposal_utils as d2_proposal_utils
from detectron2.modeling.roi_heads import fast_rcnn as d2_fast_rcnn
from detectron2.modeling.roi_heads.roi_heads import Res5ROIHeads
from detectron2.structures import Instances

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
# --model: the model-zoo config, its key file (tests/fixtures/checkpoint_keys), the default output,
# the 3 tensors whose sums guard numpy's RNG stream (C4/DC5 have no FPN, so no 'bottom_up.') and
# the photographs recorded (default: all three).
MODELS = {
    "R_50_FPN_3x": dict(
        config="COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml",
        keys="detectron2_mask_rcnn_R_50_FPN_3x.tsv", out="parity_detectron2.npz",
        checksum=("backbone.bottom_up.stem.conv1.weight", "backbone.bottom_up.res4.5.conv2.weight",
                  "roi_heads.box_predictor.cls_score.weight")),
    "R_50_C4_3x": dict(
        config="COCO-InstanceSegmentation/mask_rcnn_R_50_C4_3x.yaml",
        keys="detectron2_mask_rcnn_R_50_C4_3x.tsv", out="parity_detectron2_R_50_C4.npz",
        checksum=("backbone.stem.conv1.weight", "backbone.res4.5.conv2.weight",
                  "roi_heads.box_predictor.cls_score.weight")),
    "R_50_DC5_3x": dict(
        config="COCO-InstanceSegmentation/mask_rcnn_R_50_DC5_3x.yaml",
        keys="detectron2_mask_rcnn_R_50_DC5_3x.tsv", out="parity_detectron2_R_50_DC5.npz",
        checksum=("backbone.stem.conv1.weight", "backbone.res4.5.conv2.weight",
                  "roi_heads.box_predictor.cls_score.weight")),
    "X_101_32x8d_FPN_3x": dict(
        config="COCO-InstanceSegmentation/mask_rcnn_X_101_32x8d_FPN_3x.yaml",
        keys="detectron2_mask_rcnn_X_101_32x8d_FPN_3x.tsv", out="parity_detectron2_X_101_32x8d.npz",
        checksum=("backbone.bottom_up.stem.conv1.weight", "backbone.bottom_up.res4.5.conv2.weight",
                  "roi_heads.box_predictor.cls_score.weight"),
        images=("coffee",)),
}
DEFAULT_MODEL = "R_50_FPN_3x"


@functools.lru_cache(maxsize=None)
def tvfix():
    """scripts/make_parity_fixtures.py (the torchvision generator), loaded as a file."""
    spec = importlib.util.spec_from_file_location("_make_parity_fixtures_tv",
                                                  REPO / "scripts" / "make_parity_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TV = tvfix()
SEED = 20240611
# Same pictures as the torchvision fixture (TV.image_rgb), fed as BGR like d2's decoder:
#   astronaut   512x512   -> 800x800   (padded 800x800)
#   coffee      400x600   -> 800x1200  (padded 800x1216)
#   retina_crop 1400x700  -> 1333x667  (padded 1344x672; DOWNscaled by the 1333 cap: PIL
#               antialiases, and d2 rounds int(x + 0.5) where tv floors: 667 vs tv's 666)
FIXTURE_IMAGES = TV.FIXTURE_IMAGES
CALIB_IMAGES = TV.CALIB_IMAGES
FPN_LEVELS = ("p2", "p3", "p4", "p5", "p6")     # d2's own names of the FPN backbone outputs
N_SAMPLE = TV.N_SAMPLE
N_RPN_SAMPLE = TV.N_RPN_SAMPLE
N_BOX_HEAD = TV.N_BOX_HEAD
# Calibration targets: the torchvision fixture's (see its comments), unless noted.
T_FPN_STD = TV.T_FPN_STD
T_RPN_OBJ_STD = TV.T_RPN_OBJ_STD
T_RPN_DELTA_STD = TV.T_RPN_DELTA_STD
T_CLS_STD = TV.T_CLS_STD
T_CLS_BIAS_STD = TV.T_CLS_BIAS_STD
T_BOX_STD = TV.T_BOX_STD
T_MASK_STD = TV.T_MASK_STD
T_MASK_BIAS_STD = TV.T_MASK_BIAS_STD
HIDDEN_BIAS_REL = TV.HIDDEN_BIAS_REL


# ----------------------------------------------------------------------------- helpers
def rng_for(*parts) -> np.random.Generator:
    """Deterministic numpy generator from this fixture's seed and a name."""
    words = [SEED]
    for p in parts:
        words.append(zlib.crc32(str(p).encode()) if not isinstance(p, int) else p)
    return np.random.default_rng(words)


def build_cfg(spec: dict):
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(spec["config"]))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.freeze()
    return cfg


def build_model(cfg):
    return d2_build_model(cfg).eval()


def make_state_dict(synthetic, keys, scales, overrides):
    sd = synthetic.seeded_state_dict(keys, SEED, scales=scales, overrides=overrides)
    return OrderedDict((k, torch.from_numpy(np.ascontiguousarray(sd[k])).to(torch.float32)) for k, _, _ in keys)


def is_fpn(model) -> bool:
    """FPN model (P2..P6, several RPN levels); else one feature map (C4: 'res4', DC5: 'res5')."""
    return hasattr(model.backbone, "bottom_up")


def check_keys(keys, synthetic, key_tsv: Path) -> None:
    ref = [(r[0], tuple(int(s) for s in r[1])) for r in synthetic.read_key_tsv(str(key_tsv))]
    got = [(k, s) for k, s, _ in keys]
    if ref != got:
        raise SystemExit(f"state_dict keys differ from {key_tsv.name}: {sorted(set(ref) ^ set(got))[:10]}")


class NmsCounter:
    """Counts the boxes d2 passes to batched_nms in the RPN and in the box-head inference.

    Wraps the ``batched_nms`` names that detectron2's proposal_utils and fast_rcnn modules
    imported; the wrapped call is unchanged. ``rpn`` / ``det`` collect (boxes, distinct idxs)."""

    def __enter__(self):
        self.rpn, self.det = [], []
        self._orig = (d2_proposal_utils.batched_nms, d2_fast_rcnn.batched_nms)

        def wrap(fn, sink):
            def batched_nms(boxes, scores, idxs, iou_threshold):
                sink.append((int(boxes.shape[0]), int(torch.unique(idxs).numel())))
                return fn(boxes, scores, idxs, iou_threshold)
            return batched_nms
        d2_proposal_utils.batched_nms = wrap(self._orig[0], self.rpn)
        d2_fast_rcnn.batched_nms = wrap(self._orig[1], self.det)
        return self

    def __exit__(self, *exc):
        d2_proposal_utils.batched_nms, d2_fast_rcnn.batched_nms = self._orig
        return False


def image_bgr(name: str) -> np.ndarray:
    """What detectron2's read_image(format='BGR') gives for the picture: RGB reversed."""
    return np.ascontiguousarray(TV.image_rgb(name)[:, :, ::-1])


def image_source(name: str) -> list:
    """[skimage.data function, crop (y0, y1, x0, x1) or None]: enough to regenerate the image."""
    base, crop = TV.IMAGE_CROPS.get(name, (name, None))
    return [base, None if crop is None else [crop[0].start, crop[0].stop, crop[1].start, crop[1].stop]]


def d2_input(cfg, img_bgr: np.ndarray):
    """DefaultPredictor.__call__: d2's test-time augmentation (PIL resize), then the input dict."""
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)
    resized = aug.get_transform(img_bgr).apply_image(img_bgr)
    h, w = img_bgr.shape[:2]
    return resized, {"image": torch.as_tensor(resized.astype("float32").transpose(2, 0, 1)),
                     "height": h, "width": w}


def calib_inputs(cfg):
    """Calibration images centre-cropped to a common aspect (TV.calib_inputs), as d2 inputs."""
    out = []
    for n in CALIB_IMAGES:
        img = image_bgr(n)
        h, w = img.shape[:2]
        tw = min(w, int(round(h * 1088 / 800)))
        th = min(h, int(round(tw * 800 / 1088)))
        y0, x0 = (h - th) // 2, (w - tw) // 2
        out.append(d2_input(cfg, np.ascontiguousarray(img[y0:y0 + th, x0:x0 + tw]))[1])
    return out


def set_bias(ov: dict, mod, name: str, out_std: float) -> None:
    """Hidden-layer bias: N(0, (HIDDEN_BIAS_REL * output std)^2), written to the module."""
    n = mod.bias.shape[0]
    b = (HIDDEN_BIAS_REL * out_std * rng_for("bias", name).standard_normal(n)).astype(np.float32)
    mod.bias.copy_(torch.from_numpy(b))
    ov[f"{name}.bias"] = b


def sha256(a: np.ndarray) -> np.ndarray:
    return np.array(hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest())


# ----------------------------------------------------------------------------- calibration
@torch.no_grad()
def calibrate(cfg, model, synthetic, keys, images=FIXTURE_IMAGES):
    t0 = time.time()
    scales: dict = {}
    ov: dict = {}
    model.load_state_dict(make_state_dict(synthetic, keys, scales, ov))
    il = model.preprocess_image(calib_inputs(cfg))
    padded = tuple(il.tensor.shape[-2:])
    print(f"[calib] {len(il)} images, sizes {il.image_sizes}, padded {padded}", flush=True)

    # ---- pass A: FrozenBN statistics (pre-hooks) + FPN conv biases (forward hooks), one pass.
    # (C4 / DC5: no FPN; C4's roi_heads.res5 gets its statistics in pass A2 below.)
    hooks = []
    name_of = {m: "backbone." + n for n, m in model.backbone.named_modules()}
    if isinstance(model.roi_heads, Res5ROIHeads):
        name_of.update({m: "roi_heads.res5." + n for n, m in model.roi_heads.res5.named_modules()})

    def bn_hook(mod, inp):
        x = inp[0]
        m, v = TV.masked_stats(x, TV.valid_hw(il.image_sizes, padded, x.shape[-2:]))
        TV.set_bn(ov, mod, name_of[mod], m, v, rng=rng_for)

    def fpn_hook(mod, inp, out):
        # d2 FPN 1x1 lateral (fpn_lateral{k}) / 3x3 output (fpn_output{k}) convs, k = 2..5: set the
        # bias; the output convs' weights are also scaled to the level's std T_FPN_STD[k - 2].
        name = name_of[mod]
        assert float(mod.bias.abs().max()) == 0.0
        if ".fpn_output" in name:
            lvl = int(name[-1]) - 2
            he = TV.synthetic_he_scale(mod.weight.shape)
            s = TV.round_sig(he * T_FPN_STD[lvl] / float(out.double().std()))   # absolute weight std
            scales[f"{name}.weight"] = s
            out = out * (s / he)
        std = float(out.double().std())
        b = (HIDDEN_BIAS_REL * std * rng_for("bias", name).standard_normal(out.shape[1])).astype(np.float32)
        mod.bias.copy_(torch.from_numpy(b))
        ov[f"{name}.bias"] = b
        return out + mod.bias.view(1, -1, 1, 1)

    for n, m in model.backbone.named_modules():
        if isinstance(m, FrozenBatchNorm2d):
            hooks.append(m.register_forward_pre_hook(bn_hook))
        elif n.startswith(("fpn_lateral", "fpn_output")):
            hooks.append(m.register_forward_hook(fpn_hook))
    model.backbone(il.tensor)
    for h in hooks:
        h.remove()
    model.load_state_dict(make_state_dict(synthetic, keys, scales, ov))
    feats = model.backbone(il.tensor)
    print(f"[calib] pass A (backbone BN{' + FPN' if is_fpn(model) else ''}) {time.time() - t0:.0f}s; "
          f"scales {scales}", flush=True)
    for k, f in feats.items():
        print(f"    {k}: shape {tuple(f.shape)} std {float(f.std()):.3f} mean {float(f.mean()):.3f}")
    if isinstance(model.roi_heads, Res5ROIHeads):
        # ---- pass A2 (C4): roi_heads.res5's FrozenBN statistics. res5 runs on pooled RoIs at
        # inference; here it runs on the calibration images' whole res4 maps (the same
        # activations, without RoI cropping), valid region only, as the backbone's statistics.
        res5 = model.roi_heads.res5
        hooks = [m.register_forward_pre_hook(bn_hook) for m in res5.modules() if isinstance(m, FrozenBatchNorm2d)]
        (f_in,) = [feats[f] for f in model.roi_heads.in_features]
        res5(f_in)
        for h in hooks:
            h.remove()
        model.load_state_dict(make_state_dict(synthetic, keys, scales, ov))
        f = model.roi_heads.res5(f_in)
        print(f"[calib] pass A2 (roi_heads.res5 BN on whole maps) {time.time() - t0:.0f}s", flush=True)
        print(f"    res5 on res4 maps: shape {tuple(f.shape)} std {float(f.std()):.3f} mean {float(f.mean()):.3f}")
        f = f_in = None
    feats = il = None                      # free the calibration batch

    # ---- heads, on the fixture images one at a time (TV's HEAD_CALIB note).
    sets = []
    for name in images:
        il1 = model.preprocess_image([d2_input(cfg, image_bgr(name))[1]])
        sets.append((il1, model.backbone(il1.tensor)))
    print(f"[calib] fixture-image features {time.time() - t0:.0f}s", flush=True)

    # RPN head: hidden 3x3 conv bias (the conv's ReLU is inside d2's Conv2d), then the two
    # output layers (all levels pooled).
    rpn = model.proposal_generator
    head = rpn.rpn_head
    pre = torch.cat([F.conv2d(fe[f], head.conv.weight, None, padding=1).flatten()
                     for _, fe in sets for f in rpn.in_features])
    set_bias(ov, head.conv, "proposal_generator.rpn_head.conv", float(pre.double().std()))
    del pre

    def rpn_raw(w):   # per image: (positions of all levels, channels) at scale 1, no bias
        return [torch.cat([F.conv2d(head.conv(fe[f]), w).permute(0, 2, 3, 1).reshape(-1, w.shape[0])
                           for f in rpn.in_features]).double() for _, fe in sets]

    sc, mean = TV.centred_scale(rpn_raw(head.objectness_logits.weight), T_RPN_OBJ_STD,
                                head.objectness_logits.weight)
    scales["proposal_generator.rpn_head.objectness_logits.weight"] = sc
    n_anchor = head.objectness_logits.weight.shape[0]       # anchors per position: 3 (FPN), 15
    ov["proposal_generator.rpn_head.objectness_logits.bias"] = (
        -mean + rng_for("bias", "rpn_head.objectness_logits").uniform(-7.0, -5.0, n_anchor)).astype(np.float32)
    sc, mean = TV.centred_scale(rpn_raw(head.anchor_deltas.weight), T_RPN_DELTA_STD, head.anchor_deltas.weight)
    scales["proposal_generator.rpn_head.anchor_deltas.weight"] = sc
    ov["proposal_generator.rpn_head.anchor_deltas.bias"] = (
        -mean + 0.1 * T_RPN_DELTA_STD * rng_for("bias", "rpn_head.anchor_deltas").standard_normal(4 * n_anchor)
    ).astype(np.float32)
    model.load_state_dict(make_state_dict(synthetic, keys, scales, ov))
    print(f"[calib] RPN {time.time() - t0:.0f}s; scales {scales}", flush=True)

    # Box head: proposals -> fc1/fc2 biases -> box predictor scales.
    rh = model.roi_heads
    res5_head = isinstance(rh, Res5ROIHeads)
    props = [rpn(il1, fe, None)[0] for il1, fe in sets]
    if res5_head:
        # C4: box features = roi_heads.res5(14x14 RoIAlign on res4).mean over 7x7; no hidden
        # layers left to calibrate (res5's BN statistics come from pass A2).
        xs = [rh._shared_roi_transform([fe[f] for f in rh.in_features], [p.proposal_boxes for p in pr]).mean(dim=[2, 3])
              for (_, fe), pr in zip(sets, props)]
    else:
        xs = [rh.box_pooler([fe[f] for f in rh.box_in_features], [p.proposal_boxes for p in pr]).flatten(1)
              for (_, fe), pr in zip(sets, props)]
        for fc_name in ("fc1", "fc2"):
            fc = getattr(rh.box_head, fc_name)
            y = torch.cat([F.linear(x, fc.weight) for x in xs])
            set_bias(ov, fc, f"roi_heads.box_head.{fc_name}", float(y.double().std()))
            xs = [torch.relu(fc(x)) for x in xs]
    bp = rh.box_predictor
    sc, mean = TV.centred_scale([F.linear(x, bp.cls_score.weight).double() for x in xs],
                                T_CLS_STD, bp.cls_score.weight)
    scales["roi_heads.box_predictor.cls_score.weight"] = sc
    ov["roi_heads.box_predictor.cls_score.bias"] = (
        -mean + T_CLS_BIAS_STD * rng_for("bias", "cls_score").standard_normal(81)).astype(np.float32)
    sc, mean = TV.centred_scale([F.linear(x, bp.bbox_pred.weight).double() for x in xs],
                                T_BOX_STD, bp.bbox_pred.weight)
    scales["roi_heads.box_predictor.bbox_pred.weight"] = sc
    ov["roi_heads.box_predictor.bbox_pred.bias"] = (
        -mean + 0.1 * T_BOX_STD * rng_for("bias", "bbox_pred").standard_normal(320)).astype(np.float32)
    model.load_state_dict(make_state_dict(synthetic, keys, scales, ov))
    print(f"[calib] box head {time.time() - t0:.0f}s; scales {scales}", flush=True)

    # Mask head: detections -> mask_fcn / deconv biases -> predictor scale and centring bias.
    xs = []
    for (_, fe), pr in zip(sets, props):
        if res5_head:
            pred = bp(rh._shared_roi_transform([fe[f] for f in rh.in_features],
                                               [p.proposal_boxes for p in pr]).mean(dim=[2, 3]))
        else:
            pred = bp(rh.box_head(rh.box_pooler([fe[f] for f in rh.box_in_features], [p.proposal_boxes for p in pr])))
        inst, _ = bp.inference(pred, pr)
        print(f"    {len(inst[0])} detections, scores {float(inst[0].scores.min()):.3f}.."
              f"{float(inst[0].scores.max()):.3f}")
        if res5_head:     # the mask head's input: res5 features of the detections (7x7, 2048)
            xs.append(rh._shared_roi_transform([fe[f] for f in rh.in_features], [inst[0].pred_boxes]))
        else:
            xs.append(rh.mask_pooler([fe[f] for f in rh.mask_in_features], [inst[0].pred_boxes]))
    mh = rh.mask_head
    for i in range(1, len(mh.conv_norm_relus) + 1):      # 4 convs (FPN, DC5); none for C4
        cv = getattr(mh, f"mask_fcn{i}")
        y = torch.cat([F.conv2d(x, cv.weight, None, padding=1).flatten() for x in xs])
        set_bias(ov, cv, f"roi_heads.mask_head.mask_fcn{i}", float(y.double().std()))
        xs = [cv(x) for x in xs]                                   # conv + ReLU
    y = torch.cat([F.conv_transpose2d(x, mh.deconv.weight, None, stride=2).flatten() for x in xs])
    set_bias(ov, mh.deconv, "roi_heads.mask_head.deconv", float(y.double().std()))
    xs = [torch.relu(mh.deconv(x)) for x in xs]
    n_mask = mh.predictor.weight.shape[0]
    raws = [F.conv2d(x, mh.predictor.weight).double().permute(0, 2, 3, 1).reshape(-1, n_mask) for x in xs]
    sc, mean = TV.centred_scale(raws, T_MASK_STD, mh.predictor.weight)
    scales["roi_heads.mask_head.predictor.weight"] = sc
    ov["roi_heads.mask_head.predictor.bias"] = (
        -mean + T_MASK_BIAS_STD * rng_for("bias", "mask_predictor").standard_normal(n_mask)).astype(np.float32)
    model.load_state_dict(make_state_dict(synthetic, keys, scales, ov))
    print(f"[calib] mask head {time.time() - t0:.0f}s; scales {scales}", flush=True)

    sd = model.state_dict()
    one_d = OrderedDict((k, sd[k].numpy().astype(np.float32).copy()) for k, s, _ in keys if len(s) == 1)
    missing = [k for k in one_d if k not in ov]
    assert not missing, f"1-D tensors not calibrated: {missing[:5]}"
    return scales, one_d


# ----------------------------------------------------------------------------- recording
@torch.no_grad()
def record_image(cfg, model, name: str) -> dict:
    img_rgb = TV.image_rgb(name)
    img = image_bgr(name)
    resized, inp = d2_input(cfg, img)
    out = {}
    p = f"{name}/"
    out[p + "image_sha256"] = sha256(img_rgb)                 # RGB, as skimage returns it
    out[p + "image_hw"] = np.array(img.shape[:2], np.int32)
    out[p + "resized_sha256"] = sha256(resized)               # BGR HWC uint8 after d2's PIL resize

    # -- staged forward, exactly the calls GeneralizedRCNN.inference makes
    images = model.preprocess_image([inp])
    t = images.tensor
    out[p + "resized_hw"] = np.array(images.image_sizes[0], np.int32)
    assert tuple(out[p + "resized_hw"]) == resized.shape[:2]
    out[p + "padded_hw"] = np.array(t.shape[-2:], np.int32)
    tn = t[0].permute(1, 2, 0).numpy()                        # (H, W, 3), BGR
    pos = TV.sample_positions(rng_for(name, "input"), tn.shape, N_SAMPLE)
    out[p + "input/sample_yxc"] = pos
    out[p + "input/sample_values"] = tn[pos[:, 0], pos[:, 1], pos[:, 2]].astype(np.float32)
    out[p + "input/channel_sums"] = tn.astype(np.float64).sum((0, 1))

    feats = model.backbone(t)
    fpn = is_fpn(model)
    # FPN: P2..P6 under fpn/<level>/; C4 / DC5: the single map ('res4' / 'res5') under features/.
    feature_names = FPN_LEVELS if fpn else tuple(model.proposal_generator.in_features)
    assert tuple(feats.keys()) == feature_names, feats.keys()
    for lvl in feature_names:
        f = feats[lvl][0].permute(1, 2, 0).numpy()            # (H, W, C): C = 256 (FPN), 1024, 2048
        group = "fpn" if fpn else "features"
        q = f"{p}{group}/{lvl}/"
        out[q + "hw"] = np.array(f.shape[:2], np.int32)
        out[q + "channel_mean"] = f.astype(np.float64).mean((0, 1)).astype(np.float32)
        pos = TV.sample_positions(rng_for(name, group, lvl), f.shape, N_SAMPLE)
        out[q + "sample_yxc"] = pos
        out[q + "sample_values"] = f[pos[:, 0], pos[:, 1], pos[:, 2]].astype(np.float32)

    rpn = model.proposal_generator
    fl = [feats[f] for f in rpn.in_features]
    obj, dl = rpn.rpn_head(fl)
    for lvl, o, d in zip(rpn.in_features, obj, dl):
        # FPN: A = 3 anchors, a = ratio index. C4 / DC5: A = 15, a = size index * 3 + ratio index
        # (DefaultAnchorGenerator.generate_cell_anchors loops over sizes, then ratios).
        o = o[0].permute(1, 2, 0).numpy()                     # (H, W, A)
        d = d[0].permute(1, 2, 0).numpy()                     # (H, W, 4A)  channel a*4 + (dx,dy,dw,dh)
        q = f"{p}rpn/{lvl}/"
        pos = TV.sample_positions(rng_for(name, "rpn", lvl), o.shape[:2], N_RPN_SAMPLE)
        out[q + "sample_yx"] = pos
        out[q + "objectness"] = o[pos[:, 0], pos[:, 1]].astype(np.float32)
        out[q + "deltas"] = d[pos[:, 0], pos[:, 1]].astype(np.float32)
    anchors = rpn.anchor_generator(fl)
    objf = [s.permute(0, 2, 3, 1).flatten(1) for s in obj]
    dlf = [x.view(x.shape[0], -1, 4, x.shape[-2], x.shape[-1]).permute(0, 3, 4, 1, 2).flatten(1, -2) for x in dl]
    with NmsCounter() as rpn_nms:
        props = rpn.predict_proposals(anchors, objf, dlf, images.image_sizes)
    pr = props[0]
    if not fpn:
        # Boxes entering the RPN's batched_nms (top-k, then clip and the non-empty filter) and
        # their distinct level ids (1). torchvision's batched_nms loops over ids above 1000 boxes on
        # CPU and offsets coordinates at or below; with one id (offset 0) both give plain nms.
        ((n_in, n_ids),) = rpn_nms.rpn
        out[p + "rpn/num_nms_input"] = np.array(n_in, np.int32)
        out[p + "rpn/num_nms_levels"] = np.array(n_ids, np.int32)
    out[p + "rpn/num_anchors_per_level"] = np.array([int(o[0].numel()) for o in obj], np.int32)
    out[p + "proposals"] = pr.proposal_boxes.tensor.numpy().astype(np.float32)
    out[p + "proposal_logits"] = pr.objectness_logits.numpy().astype(np.float32)
    pr2 = rpn(images, feats, None)[0][0]                      # proposals must equal rpn.forward's
    assert torch.equal(pr2.proposal_boxes.tensor, pr.proposal_boxes.tensor)
    assert torch.equal(pr2.objectness_logits, pr.objectness_logits)

    rh = model.roi_heads
    res5_head = isinstance(rh, Res5ROIHeads)
    if res5_head:
        # C4 (Res5ROIHeads.forward): 14x14 RoIAlign on res4 -> roi_heads.res5 -> mean over 7x7.
        box_in = [feats[f] for f in rh.in_features]
        box_features = lambda b: rh._shared_roi_transform(box_in, b).mean(dim=[2, 3])
    else:
        box_in = [feats[f] for f in rh.box_in_features]
        box_features = lambda b: rh.box_head(rh.box_pooler(box_in, b))
    first = pr[:N_BOX_HEAD]
    cl, br = rh.box_predictor(box_features([first.proposal_boxes]))
    out[p + "box_head/class_logits"] = cl.numpy().astype(np.float32)
    out[p + "box_head/box_regression"] = br.numpy().astype(np.float32)
    # (RoI, class) pairs entering the class-wise NMS: torchvision's batched_nms (which d2 calls)
    # loops per class on CPU above 1000 boxes and uses the coordinate trick at or below.
    pred_all = rh.box_predictor(box_features([pr.proposal_boxes]))
    probs = rh.box_predictor.predict_probs(pred_all, [pr])[0]
    out[p + "det/num_candidates"] = np.array(int((probs[:, :-1] > rh.box_predictor.test_score_thresh).sum()),
                                             np.int32)

    with NmsCounter() as det_nms:
        dets, _ = rh(images, feats, props, None)
    assert [n for n, _ in det_nms.det] == [int(out[p + "det/num_candidates"])], det_nms.det
    d = dets[0]
    boxes_r = d.pred_boxes.tensor.clone()                     # detector_postprocess scales in place
    if res5_head:     # mask head (deconv + predictor) on res5 of the detections: 14x14 logits
        mf = rh.mask_head.layers(rh._shared_roi_transform(box_in, [d.pred_boxes]))
    else:             # 14x14 RoIAlign -> 4 convs -> deconv -> predictor: 28x28 logits
        mf = rh.mask_head.layers(rh.mask_pooler([feats[f] for f in rh.mask_in_features], [d.pred_boxes]))
    ml = mf[torch.arange(mf.shape[0]), d.pred_classes]
    assert torch.equal(ml.sigmoid(), d.pred_masks[:, 0]), "mask logits do not reproduce roi_heads' masks"

    h, w = img.shape[:2]
    post = detector_postprocess(Instances(d.image_size, **d.get_fields()), h, w)
    assert len(post) == len(d), "detector_postprocess dropped empty boxes (not handled here)"

    # -- the real end-to-end forward must give the same result
    e2e = model([inp])[0]["instances"]
    for k in ("pred_boxes", "scores", "pred_classes", "pred_masks"):
        a, b = e2e.get(k), post.get(k)
        a, b = (a.tensor, b.tensor) if k == "pred_boxes" else (a, b)
        assert torch.equal(a, b), f"staged != end-to-end for {k}"

    out[p + "det/boxes"] = e2e.pred_boxes.tensor.numpy().astype(np.float32)
    out[p + "det/scores"] = e2e.scores.numpy().astype(np.float32)
    out[p + "det/labels"] = e2e.pred_classes.numpy().astype(np.int32)
    out[p + "det/boxes_resized"] = boxes_r.numpy().astype(np.float32)
    out[p + "det/mask_logits"] = ml.numpy().astype(np.float32)
    binm = e2e.pred_masks.numpy().astype(bool)                # (N, H, W): paste >= 0.5
    runs = [TV.rle_runs(m) for m in binm]
    out[p + "det/mask_area"] = binm.reshape(binm.shape[0], -1).sum(1).astype(np.int32)
    out[p + "det/mask_rle_runs"] = np.concatenate(runs).astype(np.int32)
    out[p + "det/mask_rle_offsets"] = np.cumsum([0] + [len(r) for r in runs]).astype(np.int32)
    from pycocotools import mask as mask_util
    enc = mask_util.encode(np.asfortranarray(binm.transpose(1, 2, 0).astype(np.uint8)))
    out[p + "det/mask_rle_coco"] = np.array([e["counts"].decode("ascii") for e in enc])
    return out


# ----------------------------------------------------------------------------- checks
def d2_roi_level(boxes: np.ndarray) -> np.ndarray:
    """detectron2 assign_boxes_to_levels: 0..3 = P2..P5."""
    s = np.sqrt(np.maximum((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 0))
    k = np.floor(4 + np.log2(s / 224.0 + 1e-8))
    return (np.clip(k, 2, 5) - 2).astype(np.int64)


def d2_adaptive_grid(boxes: np.ndarray, stride: float, output_size: int) -> np.ndarray:
    """Samples per bin axis of ROIAlignV2 with sampling_ratio 0, for one feature stride."""
    b = boxes.astype(np.float64)
    return np.maximum(np.ceil((b[:, 3] - b[:, 1]) / stride / output_size),
                      np.ceil((b[:, 2] - b[:, 0]) / stride / output_size)).astype(np.int64)


def quality_report(arrs: dict, fpn: bool = True, box_pooler_res: int = 7, images=FIXTURE_IMAGES):
    lines, problems = [], []
    for name in images:
        s = arrs[f"{name}/det/scores"].astype(np.float64)
        lab = arrs[f"{name}/det/labels"]
        area = arrs[f"{name}/det/mask_area"]
        hw = arrs[f"{name}/image_hw"]
        frac = area / float(hw[0] * hw[1])
        ml = arrs[f"{name}/det/mask_logits"]
        ss = np.sort(s)[::-1]
        gaps = -np.diff(ss)
        prop = arrs[f"{name}/proposal_logits"]
        if fpn:
            lv_det = np.bincount(d2_roi_level(arrs[f"{name}/det/boxes_resized"]), minlength=4)
            lv_prop = np.bincount(d2_roi_level(arrs[f"{name}/proposals"]), minlength=4)
            rois = (f"RoI level P2..P5 of detections {lv_det.tolist()}, of proposals {lv_prop.tolist()}")
        else:
            # one level at stride 16; box pooler 14x14 (C4) or 7x7 (DC5), mask pooler 14x14
            g_prop = d2_adaptive_grid(arrs[f"{name}/proposals"], 16.0, box_pooler_res)
            g_det = d2_adaptive_grid(arrs[f"{name}/det/boxes_resized"], 16.0, 14)
            rois = (f"RoIAlign samples per bin axis: proposals max {g_prop.max()} (> 8: {int((g_prop > 8).sum())}), "
                    f"detections max {g_det.max()}; RPN NMS input {int(arrs[f'{name}/rpn/num_nms_input'])}")
        b = arrs[f"{name}/det/boxes"]
        box_area = np.maximum((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), 1.0)
        partial = int(((area > 0) & (area < 0.9 * box_area)).sum())
        lines.append(
            f"{name}: {len(s)} dets, {len(np.unique(lab))} classes, scores {ss[-1]:.4f}..{ss[0]:.4f}, "
            f"min gap {gaps.min():.2e}, ties {int((gaps == 0).sum())}, "
            f"mask logits std {ml.std():.2f} (fg frac of {ml.shape[1]}x{ml.shape[2]} {np.mean(ml > 0):.2f}), "
            f"pasted mask area frac median {np.median(frac):.4f} [{frac.min():.4f}, {frac.max():.4f}], "
            f"empty masks {int((area == 0).sum())}, partial masks {partial}; {len(prop)} proposals, "
            f"logit ties {len(prop) - len(np.unique(prop))}; NMS candidates "
            f"{int(arrs[f'{name}/det/num_candidates'])}; {rois}")
        if fpn and len(s) != 100:
            problems.append(f"{name}: {len(s)} detections != 100")
        if not 10 <= len(s) <= 100:
            problems.append(f"{name}: {len(s)} detections")
        if (gaps == 0).any():
            problems.append(f"{name}: tied detection scores")
        if (s >= 1.0).any():
            problems.append(f"{name}: a score equals 1.0")
        if len(np.unique(lab)) < 5:
            problems.append(f"{name}: only {len(np.unique(lab))} classes")
        if partial < len(s) // 2:
            problems.append(f"{name}: only {partial} masks are neither empty nor filling their box")
    return lines, problems


def _version(pkg: str) -> str:
    try:
        from importlib.metadata import version
        return version(pkg)
    except Exception:  # pragma: no cover
        return "absent"


def _d2_commit() -> str:
    """The detectron2 source commit: git, else $D2_COMMIT (a `git archive` export has no .git)."""
    try:
        return subprocess.run(["git", "-C", str(Path(detectron2.__file__).parents[1]), "rev-parse", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return os.environ.get("D2_COMMIT", "unknown")


def state_dict_from_fixture(fx, synthetic, keys):
    """Regenerate the full state dict from the fixture alone (what the JAX test does)."""
    assert int(fx["seed"]) == SEED
    scales = {str(n): float(v) for n, v in zip(fx["scale_names"], fx["scale_values"])}
    ov = {k: fx["w/" + k] for k, s, _ in keys if len(s) == 1}
    return make_state_dict(synthetic, keys, scales, ov)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=list(MODELS), default=DEFAULT_MODEL,
                    help="detectron2 model-zoo row (config, key file, default output)")
    ap.add_argument("--out", type=Path, default=None,
                    help="output npz (default: tests/fixtures/<the model's fixture>)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--verify-only", action="store_true", help="only re-run the fixture check")
    args = ap.parse_args()

    spec = MODELS[args.model]
    images = spec.get("images", FIXTURE_IMAGES)
    if args.out is None:
        args.out = FIXTURES / spec["out"]
    checksum_keys = spec["checksum"]

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    synthetic = TV.load_synthetic()
    cfg = build_cfg(spec)
    model = build_model(cfg)
    keys = TV.model_keys(model)
    check_keys(keys, synthetic, FIXTURES / "checkpoint_keys" / spec["keys"])
    fpn = is_fpn(model)

    if not args.verify_only:
        scales, one_d = calibrate(cfg, model, synthetic, keys, images)
        # Final weights: regenerated from (seed, scales, stored 1-D tensors) only.
        sd = state_dict_from_fixture(
            {"seed": SEED, "scale_names": np.array(list(scales)), "scale_values": np.array(list(scales.values())),
             **{"w/" + k: v for k, v in one_d.items()}}, synthetic, keys)
        model = build_model(cfg)
        model.load_state_dict(sd)

        arrs = OrderedDict()
        arrs["seed"] = np.array(SEED, np.int64)
        arrs["versions"] = np.array(json.dumps({
            "torch": torch.__version__, "torchvision": _version("torchvision"),
            "detectron2": detectron2.__version__, "detectron2_commit": _d2_commit(),
            "numpy": np.__version__, "scikit-image": skimage.__version__, "pillow": _version("pillow"),
            "pycocotools": _version("pycocotools"), "python": sys.version.split()[0]}))
        config = {
            "model": f"detectron2 get_cfg() + configs/{spec['config']}, MODEL.DEVICE=cpu, MODEL.WEIGHTS='', "
                     "build_model, eval",
            "min_size": cfg.INPUT.MIN_SIZE_TEST, "max_size": cfg.INPUT.MAX_SIZE_TEST,
            "resize": "ResizeShortestEdge (PIL BILINEAR on uint8)", "input_format": cfg.INPUT.FORMAT,
            "pixel_mean": list(cfg.MODEL.PIXEL_MEAN), "pixel_std": list(cfg.MODEL.PIXEL_STD),
            "stride_in_1x1": cfg.MODEL.RESNETS.STRIDE_IN_1X1, "norm": cfg.MODEL.RESNETS.NORM,
            "frozen_bn_eps": 1e-5,
            "input": "skimage RGB uint8 -> BGR (read_image format BGR) -> resize -> float32 CHW",
            "mask_binarization": "paste_masks_in_image (grid_sample) >= 0.5",
            "torch_threads": args.threads}
        if cfg.MODEL.RESNETS.NUM_GROUPS > 1:     # ResNeXt
            config.update({"depth": cfg.MODEL.RESNETS.DEPTH, "num_groups": cfg.MODEL.RESNETS.NUM_GROUPS,
                           "width_per_group": cfg.MODEL.RESNETS.WIDTH_PER_GROUP})
        if not fpn:     # the settings that differ between the C4 / DC5 rows and FPN
            a = cfg.MODEL.ANCHOR_GENERATOR
            config.update({
                "backbone_out_features": list(cfg.MODEL.RESNETS.OUT_FEATURES),
                "res5_dilation": cfg.MODEL.RESNETS.RES5_DILATION,
                "rpn_in_features": list(cfg.MODEL.RPN.IN_FEATURES),
                "anchor_sizes": [list(x) for x in a.SIZES], "anchor_aspect_ratios": [list(x) for x in a.ASPECT_RATIOS],
                "anchor_offset": a.OFFSET, "anchor_order": "size-major: a = size_index * 3 + ratio_index",
                "rpn_pre_nms_topk_test": cfg.MODEL.RPN.PRE_NMS_TOPK_TEST,
                "rpn_post_nms_topk_test": cfg.MODEL.RPN.POST_NMS_TOPK_TEST,
                "rpn_nms_thresh": cfg.MODEL.RPN.NMS_THRESH,
                "roi_heads": cfg.MODEL.ROI_HEADS.NAME, "roi_in_features": list(cfg.MODEL.ROI_HEADS.IN_FEATURES),
                "box_pooler": [cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE, cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION,
                               cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO],
                "box_head": (cfg.MODEL.ROI_BOX_HEAD.NAME if cfg.MODEL.ROI_HEADS.NAME != "Res5ROIHeads"
                             else "res5 (stride 2) + mean over 7x7"),
                "box_head_num_fc": cfg.MODEL.ROI_BOX_HEAD.NUM_FC,
                "mask_pooler": [cfg.MODEL.ROI_MASK_HEAD.POOLER_TYPE, cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION,
                                cfg.MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO],
                "mask_head_num_conv": cfg.MODEL.ROI_MASK_HEAD.NUM_CONV,
                "score_thresh_test": cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST,
                "nms_thresh_test": cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST,
                "detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE})
        arrs["config"] = np.array(json.dumps(config))
        arrs["image_names"] = np.array(images)
        arrs["image_sources"] = np.array(json.dumps({n: image_source(n) for n in images}))
        arrs["calibration_images"] = np.array(CALIB_IMAGES)
        if fpn:
            arrs["fpn_levels"] = np.array(FPN_LEVELS)
        else:
            arrs["feature_names"] = np.array(list(model.proposal_generator.in_features))
            # the 15 cell anchors (XYXY around 0) of the single level, in channel order a
            arrs["cell_anchors"] = next(iter(model.proposal_generator.anchor_generator.cell_anchors)).numpy().astype(np.float32)
        arrs["scale_names"] = np.array(list(scales))
        arrs["scale_values"] = np.array(list(scales.values()), np.float64)
        arrs["checksum_names"] = np.array(checksum_keys)
        arrs["checksum_sums"] = np.array([sd[k].double().sum().item() for k in checksum_keys], np.float64)
        arrs["checksum_first8"] = np.stack([sd[k].flatten()[:8].numpy() for k in checksum_keys]).astype(np.float32)
        for k, v in one_d.items():
            arrs["w/" + k] = v
        for name in images:
            t0 = time.time()
            arrs.update(record_image(cfg, model, name))
            print(f"[record] {name} {time.time() - t0:.0f}s", flush=True)
        lines, problems = quality_report(arrs, fpn, cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION, images)
        print("\n".join(lines))
        if problems:
            print("QUALITY PROBLEMS:\n  " + "\n  ".join(problems))
        TV.write_npz(args.out, arrs)
        print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.2f} MiB, {len(arrs)} arrays)")

    # ---- self-consistency: fresh model from the fixture only, rerun, compare.
    fx = np.load(args.out)
    sd = state_dict_from_fixture(fx, synthetic, keys)
    for n, s in zip(fx["checksum_names"], fx["checksum_sums"]):
        assert sd[str(n)].double().sum().item() == s, f"checksum mismatch for {n}: RNG stream changed?"
    model = build_model(cfg)
    model.load_state_dict(sd)
    with torch.no_grad():
        for name in [str(n) for n in fx["image_names"]]:
            img = image_bgr(name)
            assert sha256(img[:, :, ::-1]) == fx[f"{name}/image_sha256"], f"{name}: image differs"
            resized, inp = d2_input(cfg, img)
            assert sha256(resized) == fx[f"{name}/resized_sha256"], f"{name}: resized image differs"
            t1 = time.time()
            o = model([inp])[0]["instances"]
            t_e2e = time.time() - t1
            for k, v, dt in (("boxes", o.pred_boxes.tensor, np.float32), ("scores", o.scores, np.float32),
                             ("labels", o.pred_classes, np.int32)):
                assert np.array_equal(v.numpy().astype(dt), fx[f"{name}/det/{k}"]), f"{name}: {k} differ"
            runs = np.concatenate([TV.rle_runs(m) for m in o.pred_masks.numpy()])
            assert np.array_equal(runs, fx[f"{name}/det/mask_rle_runs"]), f"{name}: masks differ"
            print(f"[verify] {name}: {len(o)} detections identical (d2 forward {t_e2e:.1f}s, "
                  f"{args.threads} thread(s))", flush=True)
    print("verify OK")


if __name__ == "__main__":
    main()
