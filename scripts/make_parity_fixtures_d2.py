#!/usr/bin/env python
"""Generate tests/fixtures/parity_detectron2.npz from a real detectron2 run (CPU).

NOT run by CI (CI has neither torch nor detectron2). Runs in the torchvision reference venv
(``scripts/reference_env/setup_torchvision_cpu.sh``) with detectron2 built from source into it
(tests/fixtures/README.md, "parity_detectron2.npz", lists the steps)::

    /work/tvenv/bin/python scripts/make_parity_fixtures_d2.py            # calibrate + record + verify
    /work/tvenv/bin/python scripts/make_parity_fixtures_d2.py --verify-only

The detectron2 twin of scripts/make_parity_fixtures.py (torchvision); it imports that script's
helpers (image loading, sampling, RLE, npz writer, calibration arithmetic) and keeps its
structure and fixture key names:

  1. Builds detectron2's ``COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml`` with
     ``get_cfg`` + ``build_model`` (MODEL.DEVICE cpu, no weights file), eval mode: MSRA
     ResNet-50 (stride in the 1x1 conv, FrozenBN eps 1e-5), BGR input, PIXEL_MEAN
     (103.53, 116.28, 123.675), PIXEL_STD 1, test resize ResizeShortestEdge 800 / 1333 (PIL).
  2. Weights: >=2-D tensors from ``synthetic.seeded_state_dict`` (He std, or ``scales[name]``
     as an absolute std for the 9 calibrated layers: FPN output convs and head output layers);
     every 1-D tensor is calibrated here and stored (``w/<name>``), as in the torchvision script:
     FrozenBN statistics from activation statistics on the calibration images, then perturbed;
     hidden biases N(0, 0.1 * output std); FPN output stds T_FPN_STD; head output spreads
     (RPN objectness std 1 + bias in [-7, -5], RPN deltas 0.2, class logits 1.5 + per-class
     bias 0.4, box deltas 1, mask logits 6 + per-class bias 1.5) set on the fixture images.
  3. Records, for three scikit-image pictures turned into what d2's decoder gives (BGR uint8),
     every stage of ``GeneralizedRCNN.inference``: d2's own test-time resize, preprocess_image,
     backbone (P2..P6), RPN head / proposals, box head on the first 200 proposals, final
     detections (detector_postprocess), 28x28 mask logits and the pasted binary masks.
  4. Verifies: weights regenerated from the fixture alone, in a fresh model, reproduce the
     recorded detections and masks exactly.

The images are not stored: they are regenerated from scikit-image (all three files ship inside
the package) and checked against the stored sha256.

Imports only numpy / torch / detectron2 / skimage / pycocotools, plus the torchvision fixture
script and maskrcnn_jax/checkpoints/synthetic.py loaded as files (no jax needed).
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
from detectron2.structures import Instances

REPO = Path(__file__).resolve().parents[1]
KEY_TSV = REPO / "tests" / "fixtures" / "checkpoint_keys" / "detectron2_mask_rcnn_R_50_FPN_3x.tsv"
OUT_DEFAULT = REPO / "tests" / "fixtures" / "parity_detectron2.npz"
D2_CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"


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
FPN_LEVELS = ("p2", "p3", "p4", "p5", "p6")     # d2's own names of the backbone outputs
N_SAMPLE = TV.N_SAMPLE
N_RPN_SAMPLE = TV.N_RPN_SAMPLE
N_BOX_HEAD = TV.N_BOX_HEAD
CHECKSUM_KEYS = (
    "backbone.bottom_up.stem.conv1.weight",
    "backbone.bottom_up.res4.5.conv2.weight",
    "roi_heads.box_predictor.cls_score.weight",
)
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


def build_cfg():
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(D2_CONFIG))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.freeze()
    return cfg


def build_model(cfg):
    return d2_build_model(cfg).eval()


def make_state_dict(synthetic, keys, scales, overrides):
    sd = synthetic.seeded_state_dict(keys, SEED, scales=scales, overrides=overrides)
    return OrderedDict((k, torch.from_numpy(np.ascontiguousarray(sd[k])).to(torch.float32)) for k, _, _ in keys)


def check_keys(keys, synthetic) -> None:
    ref = [(r[0], tuple(int(s) for s in r[1])) for r in synthetic.read_key_tsv(str(KEY_TSV))]
    got = [(k, s) for k, s, _ in keys]
    if ref != got:
        raise SystemExit(f"state_dict keys differ from {KEY_TSV.name}: {sorted(set(ref) ^ set(got))[:10]}")


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
def calibrate(cfg, model, synthetic, keys):
    t0 = time.time()
    scales: dict = {}
    ov: dict = {}
    model.load_state_dict(make_state_dict(synthetic, keys, scales, ov))
    il = model.preprocess_image(calib_inputs(cfg))
    padded = tuple(il.tensor.shape[-2:])
    print(f"[calib] {len(il)} images, sizes {il.image_sizes}, padded {padded}", flush=True)

    # ---- pass A: FrozenBN statistics (pre-hooks) + FPN conv biases (forward hooks), one pass.
    hooks = []
    name_of = {m: "backbone." + n for n, m in model.backbone.named_modules()}

    def bn_hook(mod, inp):
        name = name_of[mod]
        x = inp[0]
        m, v = TV.masked_stats(x, TV.valid_hw(il.image_sizes, padded, x.shape[-2:]))
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
    print(f"[calib] pass A (backbone BN + FPN) {time.time() - t0:.0f}s; scales {scales}", flush=True)
    for k, f in feats.items():
        print(f"    {k}: shape {tuple(f.shape)} std {float(f.std()):.3f} mean {float(f.mean()):.3f}")
    feats = il = None                      # free the calibration batch

    # ---- heads, on the fixture images one at a time (TV's HEAD_CALIB note).
    sets = []
    for name in FIXTURE_IMAGES:
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
    ov["proposal_generator.rpn_head.objectness_logits.bias"] = (
        -mean + rng_for("bias", "rpn_head.objectness_logits").uniform(-7.0, -5.0, 3)).astype(np.float32)
    sc, mean = TV.centred_scale(rpn_raw(head.anchor_deltas.weight), T_RPN_DELTA_STD, head.anchor_deltas.weight)
    scales["proposal_generator.rpn_head.anchor_deltas.weight"] = sc
    ov["proposal_generator.rpn_head.anchor_deltas.bias"] = (
        -mean + 0.1 * T_RPN_DELTA_STD * rng_for("bias", "rpn_head.anchor_deltas").standard_normal(12)
    ).astype(np.float32)
    model.load_state_dict(make_state_dict(synthetic, keys, scales, ov))
    print(f"[calib] RPN {time.time() - t0:.0f}s; scales {scales}", flush=True)

    # Box head: proposals -> fc1/fc2 biases -> box predictor scales.
    rh = model.roi_heads
    props = [rpn(il1, fe, None)[0] for il1, fe in sets]
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
        pred = bp(rh.box_head(rh.box_pooler([fe[f] for f in rh.box_in_features], [p.proposal_boxes for p in pr])))
        inst, _ = bp.inference(pred, pr)
        print(f"    {len(inst[0])} detections, scores {float(inst[0].scores.min()):.3f}.."
              f"{float(inst[0].scores.max()):.3f}")
        xs.append(rh.mask_pooler([fe[f] for f in rh.mask_in_features], [inst[0].pred_boxes]))
    mh = rh.mask_head
    for i in range(1, 5):
        cv = getattr(mh, f"mask_fcn{i}")
        y = torch.cat([F.conv2d(x, cv.weight, None, padding=1).flatten() for x in xs])
        set_bias(ov, cv, f"roi_heads.mask_head.mask_fcn{i}", float(y.double().std()))
        xs = [cv(x) for x in xs]                                   # conv + ReLU
    y = torch.cat([F.conv_transpose2d(x, mh.deconv.weight, None, stride=2).flatten() for x in xs])
    set_bias(ov, mh.deconv, "roi_heads.mask_head.deconv", float(y.double().std()))
    xs = [torch.relu(mh.deconv(x)) for x in xs]
    raws = [F.conv2d(x, mh.predictor.weight).double().permute(0, 2, 3, 1).reshape(-1, 80) for x in xs]
    sc, mean = TV.centred_scale(raws, T_MASK_STD, mh.predictor.weight)
    scales["roi_heads.mask_head.predictor.weight"] = sc
    ov["roi_heads.mask_head.predictor.bias"] = (
        -mean + T_MASK_BIAS_STD * rng_for("bias", "mask_predictor").standard_normal(80)).astype(np.float32)
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
    assert tuple(feats.keys()) == FPN_LEVELS, feats.keys()
    for lvl in FPN_LEVELS:
        f = feats[lvl][0].permute(1, 2, 0).numpy()            # (H, W, 256)
        q = f"{p}fpn/{lvl}/"
        out[q + "hw"] = np.array(f.shape[:2], np.int32)
        out[q + "channel_mean"] = f.astype(np.float64).mean((0, 1)).astype(np.float32)
        pos = TV.sample_positions(rng_for(name, "fpn", lvl), f.shape, N_SAMPLE)
        out[q + "sample_yxc"] = pos
        out[q + "sample_values"] = f[pos[:, 0], pos[:, 1], pos[:, 2]].astype(np.float32)

    rpn = model.proposal_generator
    fl = [feats[f] for f in rpn.in_features]
    obj, dl = rpn.rpn_head(fl)
    for lvl, o, d in zip(FPN_LEVELS, obj, dl):
        o = o[0].permute(1, 2, 0).numpy()                     # (H, W, 3)   anchor a = ratio index
        d = d[0].permute(1, 2, 0).numpy()                     # (H, W, 12)  channel a*4 + (dx,dy,dw,dh)
        q = f"{p}rpn/{lvl}/"
        pos = TV.sample_positions(rng_for(name, "rpn", lvl), o.shape[:2], N_RPN_SAMPLE)
        out[q + "sample_yx"] = pos
        out[q + "objectness"] = o[pos[:, 0], pos[:, 1]].astype(np.float32)
        out[q + "deltas"] = d[pos[:, 0], pos[:, 1]].astype(np.float32)
    anchors = rpn.anchor_generator(fl)
    objf = [s.permute(0, 2, 3, 1).flatten(1) for s in obj]
    dlf = [x.view(x.shape[0], -1, 4, x.shape[-2], x.shape[-1]).permute(0, 3, 4, 1, 2).flatten(1, -2) for x in dl]
    props = rpn.predict_proposals(anchors, objf, dlf, images.image_sizes)
    pr = props[0]
    out[p + "rpn/num_anchors_per_level"] = np.array([int(o[0].numel()) for o in obj], np.int32)
    out[p + "proposals"] = pr.proposal_boxes.tensor.numpy().astype(np.float32)
    out[p + "proposal_logits"] = pr.objectness_logits.numpy().astype(np.float32)
    pr2 = rpn(images, feats, None)[0][0]                      # proposals must equal rpn.forward's
    assert torch.equal(pr2.proposal_boxes.tensor, pr.proposal_boxes.tensor)
    assert torch.equal(pr2.objectness_logits, pr.objectness_logits)

    rh = model.roi_heads
    box_in = [feats[f] for f in rh.box_in_features]
    first = pr[:N_BOX_HEAD]
    cl, br = rh.box_predictor(rh.box_head(rh.box_pooler(box_in, [first.proposal_boxes])))
    out[p + "box_head/class_logits"] = cl.numpy().astype(np.float32)
    out[p + "box_head/box_regression"] = br.numpy().astype(np.float32)
    # (RoI, class) pairs entering the class-wise NMS: torchvision's batched_nms (which d2 calls)
    # loops per class on CPU above 1000 boxes and uses the coordinate trick at or below.
    pred_all = rh.box_predictor(rh.box_head(rh.box_pooler(box_in, [pr.proposal_boxes])))
    probs = rh.box_predictor.predict_probs(pred_all, [pr])[0]
    out[p + "det/num_candidates"] = np.array(int((probs[:, :-1] > rh.box_predictor.test_score_thresh).sum()),
                                             np.int32)

    dets, _ = rh(images, feats, props, None)
    d = dets[0]
    boxes_r = d.pred_boxes.tensor.clone()                     # detector_postprocess scales in place
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


def quality_report(arrs: dict):
    lines, problems = [], []
    for name in FIXTURE_IMAGES:
        s = arrs[f"{name}/det/scores"].astype(np.float64)
        lab = arrs[f"{name}/det/labels"]
        area = arrs[f"{name}/det/mask_area"]
        hw = arrs[f"{name}/image_hw"]
        frac = area / float(hw[0] * hw[1])
        ml = arrs[f"{name}/det/mask_logits"]
        ss = np.sort(s)[::-1]
        gaps = -np.diff(ss)
        prop = arrs[f"{name}/proposal_logits"]
        lv_det = np.bincount(d2_roi_level(arrs[f"{name}/det/boxes_resized"]), minlength=4)
        lv_prop = np.bincount(d2_roi_level(arrs[f"{name}/proposals"]), minlength=4)
        b = arrs[f"{name}/det/boxes"]
        box_area = np.maximum((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), 1.0)
        partial = int(((area > 0) & (area < 0.9 * box_area)).sum())
        lines.append(
            f"{name}: {len(s)} dets, {len(np.unique(lab))} classes, scores {ss[-1]:.4f}..{ss[0]:.4f}, "
            f"min gap {gaps.min():.2e}, ties {int((gaps == 0).sum())}, "
            f"mask logits std {ml.std():.2f} (fg frac of 28x28 {np.mean(ml > 0):.2f}), "
            f"pasted mask area frac median {np.median(frac):.4f} [{frac.min():.4f}, {frac.max():.4f}], "
            f"empty masks {int((area == 0).sum())}, partial masks {partial}; {len(prop)} proposals, "
            f"logit ties {len(prop) - len(np.unique(prop))}; NMS candidates "
            f"{int(arrs[f'{name}/det/num_candidates'])}; RoI level P2..P5 of detections {lv_det.tolist()}, "
            f"of proposals {lv_prop.tolist()}")
        if len(s) != 100:
            problems.append(f"{name}: {len(s)} detections != 100")
        if (gaps == 0).any():
            problems.append(f"{name}: tied detection scores")
        if (s >= 1.0).any():
            problems.append(f"{name}: a score equals 1.0")
        if len(np.unique(lab)) < 5:
            problems.append(f"{name}: only {len(np.unique(lab))} classes")
        if partial < 50:
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
    ap.add_argument("--out", type=Path, default=OUT_DEFAULT)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--verify-only", action="store_true", help="only re-run the fixture check")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    synthetic = TV.load_synthetic()
    cfg = build_cfg()
    model = build_model(cfg)
    keys = TV.model_keys(model)
    check_keys(keys, synthetic)

    if not args.verify_only:
        scales, one_d = calibrate(cfg, model, synthetic, keys)
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
        arrs["config"] = np.array(json.dumps({
            "model": f"detectron2 get_cfg() + configs/{D2_CONFIG}, MODEL.DEVICE=cpu, MODEL.WEIGHTS='', "
                     "build_model, eval",
            "min_size": cfg.INPUT.MIN_SIZE_TEST, "max_size": cfg.INPUT.MAX_SIZE_TEST,
            "resize": "ResizeShortestEdge (PIL BILINEAR on uint8)", "input_format": cfg.INPUT.FORMAT,
            "pixel_mean": list(cfg.MODEL.PIXEL_MEAN), "pixel_std": list(cfg.MODEL.PIXEL_STD),
            "stride_in_1x1": cfg.MODEL.RESNETS.STRIDE_IN_1X1, "norm": cfg.MODEL.RESNETS.NORM,
            "frozen_bn_eps": 1e-5,
            "input": "skimage RGB uint8 -> BGR (read_image format BGR) -> resize -> float32 CHW",
            "mask_binarization": "paste_masks_in_image (grid_sample) >= 0.5",
            "torch_threads": args.threads}))
        arrs["image_names"] = np.array(FIXTURE_IMAGES)
        arrs["image_sources"] = np.array(json.dumps({n: image_source(n) for n in FIXTURE_IMAGES}))
        arrs["calibration_images"] = np.array(CALIB_IMAGES)
        arrs["fpn_levels"] = np.array(FPN_LEVELS)
        arrs["scale_names"] = np.array(list(scales))
        arrs["scale_values"] = np.array(list(scales.values()), np.float64)
        arrs["checksum_names"] = np.array(CHECKSUM_KEYS)
        arrs["checksum_sums"] = np.array([sd[k].double().sum().item() for k in CHECKSUM_KEYS], np.float64)
        arrs["checksum_first8"] = np.stack([sd[k].flatten()[:8].numpy() for k in CHECKSUM_KEYS]).astype(np.float32)
        for k, v in one_d.items():
            arrs["w/" + k] = v
        for name in FIXTURE_IMAGES:
            t0 = time.time()
            arrs.update(record_image(cfg, model, name))
            print(f"[record] {name} {time.time() - t0:.0f}s", flush=True)
        lines, problems = quality_report(arrs)
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
            o = model([inp])[0]["instances"]
            for k, v, dt in (("boxes", o.pred_boxes.tensor, np.float32), ("scores", o.scores, np.float32),
                             ("labels", o.pred_classes, np.int32)):
                assert np.array_equal(v.numpy().astype(dt), fx[f"{name}/det/{k}"]), f"{name}: {k} differ"
            runs = np.concatenate([TV.rle_runs(m) for m in o.pred_masks.numpy()])
            assert np.array_equal(runs, fx[f"{name}/det/mask_rle_runs"]), f"{name}: masks differ"
            print(f"[verify] {name}: {len(o)} detections identical", flush=True)
    print("verify OK")


if __name__ == "__main__":
    main()
