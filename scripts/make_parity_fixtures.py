#!/usr/bin/env python
"""Generate tests/fixtures/parity_torchvision*.npz from real torchvision runs (CPU).

NOT run by CI (CI has no torch). Run inside the reference venv built by
``scripts/reference_env/setup_torchvision_cpu.sh``::

    /work/tvenv/bin/python scripts/make_parity_fixtures.py            # calibrate + record + verify
    /work/tvenv/bin/python scripts/make_parity_fixtures.py --verify-only
    /work/tvenv/bin/python scripts/make_parity_fixtures.py --model v1_weights_none
    /work/tvenv/bin/python scripts/make_parity_fixtures.py --model v2

``--model`` picks how the model is built, its key file under tests/fixtures/checkpoint_keys, the
default output and the photographs it records (``MODELS`` below):

  v1_coco (default)  the COCO_V1 build path of ``maskrcnn_resnet50_fpn``  -> parity_torchvision.npz
                     (3 photographs)
  v1_weights_none    ``maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)``: what anyone
                     who trains their own torchvision model starts from (BatchNorm2d, eps 1e-5,
                     ``num_batches_tracked`` keys)        -> parity_torchvision_weights_none.npz
                     (coffee)
  v2                 ``maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None)``: BatchNorm2d
                     (eps 1e-5) in the backbone, FPN, box head (4 conv + 1 fc) and mask head, 2 RPN
                     convs                               -> parity_torchvision_v2.npz (coffee)

What it does
  1. v1_coco builds torchvision's ``maskrcnn_resnet50_fpn`` exactly as the COCO_V1 weights
     path of the builder does (FrozenBatchNorm2d backbone, ``overwrite_eps(model, 0.0)``,
     91 classes, default transform min 800 / max 1333), in eval mode. The other two call the
     public builders with ``weights=None, weights_backbone=None``, in eval mode.
  2. Weights: every >=2-D tensor is ``tests.synthetic_weights.seeded_state_dict``'s
     seeded normal tensor z * std, std = He sqrt(2/fan_in) or, for the 9 tensors in the
     fixture's ``scales`` (FPN output convs, head output layers), std = scales[name];
     every 1-D tensor (FrozenBN weight/bias/running stats, conv/linear
     biases) is calibrated here and stored verbatim in the fixture (``w/<name>``).
     Calibration (see shared/reference/reference_frameworks.md):
       * FrozenBN running mean/var = real activation statistics over calibration
         images (other scikit-image pictures), then perturbed: mean + 0.1*std*N(0,1),
         var * U[0.5, 2]; weight U[0.5, 1.5], bias N(0, 0.1);
       * hidden conv/linear biases (FPN, RPN conv, fc6/fc7, mask head, deconv):
         N(0, 0.1 * output std);
       * FPN output convs scaled so that P2..P5 have stds T_FPN_STD (growing with level);
       * head output layers scaled to set spreads (measured on the fixture images, see
         HEAD_CALIB below): RPN objectness std 1 with bias in [-7, -5], RPN deltas std
         0.2, class logits std 1.5 + per-class bias N(0,0.4^2) (doc: 2.5 / 1, see
         T_CLS_STD), box deltas std 1, mask
         logits std 6; each output channel's mean is removed through its bias first.
     BatchNorm2d layers (v1_weights_none, v2) are calibrated like FrozenBN ones; v2's FPN output
     levels get their stds T_FPN_STD through the BN affine weight and bias (its convs have no
     bias), and its head BNs take their statistics from the heads' inputs on the fixture image.
     v1_weights_none also stores a few channels per backbone BN with a tiny running variance
     (EPS_SENSITIVE_* below, as trained networks have), their weight adjusted so that the model
     with eps 1e-5 computes what it would have without them: run with eps 0 instead, those
     channels are amplified 1.4-2.2x, so the fixture tells the two eps apart.
  3. Records reference outputs for the model's fixture images (see tests/fixtures/README.md).
  4. Verifies: the state dict regenerated purely from the fixture reproduces the
     recorded detections exactly in a fresh model.

Imports only numpy / torch / torchvision / skimage / pycocotools (optional, for the
COCO RLE strings) plus the file tests/synthetic_weights.py (loaded
directly, so jax is not needed).
"""
from __future__ import annotations

import argparse
import copy
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

import numpy as np
import skimage
import skimage.data
import torch
import torchvision
from torchvision.models import resnet50
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.mask_rcnn import MaskRCNN, maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2
from torchvision.ops import misc as misc_nn_ops

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
FIXTURES = REPO / "tests" / "fixtures"

SEED = 20240607
# Fixture images (uint8 RGB, stored in the fixture):
#   astronaut   512x512   square,    upscaled   -> 800x800
#   coffee      400x600   landscape, upscaled   -> 800x1200
#   retina_crop 1400x700  portrait,  DOWNscaled by the max_size=1333 cap (the
#               long-side branch of the resize rule); padded to 1344x672, so P6 is
#               21x11 and torchvision's P6 anchor stride is (64, 61).
# (chelsea, the brief's suggestion, was not used: its contrast is half that of the
# other two, and a random network's output spreads scale super-linearly with input
# contrast, so one set of head scales could not serve all three images.)
FIXTURE_IMAGES = ("astronaut", "coffee", "retina_crop")
# --model: the key file (tests/fixtures/checkpoint_keys; the builder's state_dict() must equal
# it), the default output, the photographs recorded (the later fixtures record one, to keep CI
# short) and whether the pixels are stored in the fixture (the later ones read
# tests/fixtures/images, checked by sha256).
MODELS = {
    "v1_coco": dict(keys="torchvision_maskrcnn_resnet50_fpn_v1.tsv", out="parity_torchvision.npz",
                    images=FIXTURE_IMAGES, store_images=True),
    "v1_weights_none": dict(keys="torchvision_maskrcnn_resnet50_fpn_v1_weights_none.tsv",
                            out="parity_torchvision_weights_none.npz", images=("coffee",),
                            store_images=False),
    "v2": dict(keys="torchvision_maskrcnn_resnet50_fpn_v2.tsv", out="parity_torchvision_v2.npz",
               images=("coffee",), store_images=False),
}
DEFAULT_MODEL = "v1_coco"
IMAGE_CROPS = {"retina_crop": ("retina", (slice(5, 1405), slice(355, 1055)))}
# Calibration images for the FrozenBN statistics and the FPN (other scikit-image
# pictures; several colour ones: BN statistics from grey images alone leave the
# chroma-sensitive channels uncalibrated and colourful photos then blow up).
# HEAD_CALIB: the hidden biases and output scales of the RPN / box / mask heads are
# calibrated on the fixture images themselves (geometric mean of the per-image spreads):
# calibrated on these other pictures, whose contrast is lower, the targets land 1.5-2x
# too high on the fixture images and astronaut's class scores crowd at 1.0.
CALIB_IMAGES = ("rocket", "chelsea", "immunohistochemistry", "colorwheel", "logo", "hubble_deep_field",
                "camera", "coins")
FPN_LEVELS = ("0", "1", "2", "3", "pool")                     # P2..P6
N_SAMPLE = 4096          # sampled values of the input tensor / each FPN level
N_RPN_SAMPLE = 512       # sampled (y, x) positions of each RPN head output level
N_BOX_HEAD = 200         # proposals re-run through the box head
CHECKSUM_KEYS = (
    "backbone.body.conv1.weight",
    "backbone.body.layer3.5.conv2.weight",
    "roi_heads.box_predictor.cls_score.weight",
)

# Std of the FPN outputs P2..P5 (P6 = P5 subsampled). Growing with the level so that
# the shared RPN head ranks anchors of the coarse levels high enough for proposals /
# detections to reach every RoI level (equal stds give ~98% P2-level detections).
T_FPN_STD = (3.0, 4.2, 5.9, 8.2)
# Target spreads of the head output layers (reference_frameworks.md), except the class
# logits: with std 2.5 + per-class bias std 1 the 100 detections (the extremes of
# 1000 proposals x 90 classes) crowd at 0.85..1.0 on astronaut (gaps ~1e-6), and on the
# lower-contrast retina crop the per-class bias picks one class for ~90% of them;
# std 1.5 + bias std 0.4 gives scores 0.2..0.998 and 5..36 classes per image.
T_RPN_OBJ_STD = 1.0
T_RPN_DELTA_STD = 0.2
T_CLS_STD = 1.5
T_CLS_BIAS_STD = 0.4
T_BOX_STD = 1.0
T_MASK_STD = 6.0
T_MASK_BIAS_STD = 1.5
HIDDEN_BIAS_REL = 0.1
# v1_weights_none: in each backbone BN, this fraction of the channels stores a running variance of
# EPS_SENSITIVE_VAR x U[0.25, 1] (a nearly constant channel, as trained networks have); its weight
# is multiplied by sqrt((var' + eps) / (var + eps)) so that with eps 1e-5 the layer computes what
# it computes without the change. With eps 0 such a channel comes out sqrt(1 + eps / var') =
# 1.4..2.2 times too large: an eps mix-up changes the features and the detections.
EPS_SENSITIVE_FRACTION = 0.125
EPS_SENSITIVE_VAR = 1e-5
BN_EPS = 1e-5


# ----------------------------------------------------------------------------- helpers
@functools.lru_cache(maxsize=None)
def load_synthetic():
    """tests/synthetic_weights.py, loaded as a file (no package import, no jax)."""
    path = REPO / "tests" / "synthetic_weights.py"
    spec = importlib.util.spec_from_file_location("_maskrcnn_jax_synthetic", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def synthetic_he_scale(shape) -> float:
    """The std synthetic.seeded_tensor uses for a >=2-D tensor without a scale."""
    return float(load_synthetic().he_scale(tuple(shape)))


def rng_for(*parts) -> np.random.Generator:
    """Deterministic numpy generator from the seed and a name (order independent)."""
    words = [SEED]
    for p in parts:
        words.append(zlib.crc32(str(p).encode()) if not isinstance(p, int) else p)
    return np.random.default_rng(words)


def round_sig(x: float, sig: int = 4) -> float:
    return float(f"{x:.{sig - 1}e}")


def build_model(which: str = DEFAULT_MODEL) -> MaskRCNN:
    """The untrained model of `which` (MODELS), in eval mode.

    v1_coco: maskrcnn_resnet50_fpn as built for weights=COCO_V1 (FrozenBN, eps 0). The others are
    the public builders with weights=None, weights_backbone=None (BatchNorm2d, eps 1e-5)."""
    if which == "v1_weights_none":
        return maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()
    if which == "v2":
        return maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None).eval()
    assert which == "v1_coco", which
    backbone = resnet50(weights=None, progress=False, norm_layer=misc_nn_ops.FrozenBatchNorm2d)
    backbone = _resnet_fpn_extractor(backbone, 3)      # trainable layers: 3 (as with weights)
    model = MaskRCNN(backbone, num_classes=91)         # min_size 800, max_size 1333
    overwrite_eps(model, 0.0)
    return model.eval()


def model_keys(model) -> list:
    return [(k, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()]


def check_keys(keys, synthetic, key_tsv: Path) -> None:
    ref = synthetic.read_key_tsv(str(key_tsv))
    ref_ns = [(r[0], tuple(int(s) for s in r[1])) for r in ref]
    got_ns = [(k, s) for k, s, _ in keys]
    if ref_ns != got_ns:
        missing = set(ref_ns) ^ set(got_ns)
        raise SystemExit(f"state_dict keys differ from {key_tsv.name}: {sorted(missing)[:10]}")


def make_state_dict(synthetic, keys, scales, overrides):
    sd = synthetic.seeded_state_dict(keys, SEED, scales=scales, overrides=overrides)
    return OrderedDict((k, torch.from_numpy(np.ascontiguousarray(sd[k])).to(torch.float32)) for k, _, _ in keys)


def image_rgb(name: str) -> np.ndarray:
    base, crop = IMAGE_CROPS.get(name, (name, None))
    img = getattr(skimage.data, base)()
    if img.ndim == 2:                                   # grey -> RGB
        img = np.stack([img] * 3, axis=-1)
    if img.shape[-1] == 4:                              # RGBA (logo) -> RGB
        img = img[..., :3]
    if crop is not None:
        img = img[crop]
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, (name, img.shape, img.dtype)
    return np.ascontiguousarray(img)


def to_tv_input(img: np.ndarray) -> torch.Tensor:
    """What torchvision's reference preset feeds the model: float CHW in [0, 1]."""
    return torch.from_numpy(img).permute(2, 0, 1).to(torch.float32) / 255.0


def calib_inputs():
    """Calibration images, centre-cropped to a common aspect so the batch has ~no padding."""
    out = []
    for n in CALIB_IMAGES:
        img = image_rgb(n)
        h, w = img.shape[:2]
        tw = min(w, int(round(h * 1088 / 800)))
        th = min(h, int(round(tw * 800 / 1088)))
        y0, x0 = (h - th) // 2, (w - tw) // 2
        out.append(to_tv_input(img[y0:y0 + th, x0:x0 + tw]))
    return out


def valid_hw(image_sizes, padded_hw, feat_hw):
    """Valid (unpadded) rows/cols of a feature map for each image of the batch."""
    sy = padded_hw[0] / feat_hw[0]
    sx = padded_hw[1] / feat_hw[1]
    return [(int(np.ceil(h / sy)), int(np.ceil(w / sx))) for h, w in image_sizes]


def masked_stats(x: torch.Tensor, vhw):
    """Per-channel mean/var (float64) over the valid region of every image."""
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


# ----------------------------------------------------------------------------- calibration
def centred_scale(raws, target_std: float, weight: torch.Tensor):
    """raws: per image, (samples, channels) output of a head layer computed with its
    current (He-scaled, unscaled) seeded `weight` and zero bias.

    Returns (scale, per-channel mean of the output at that scale).  `scale` is the
    absolute std for `scales[name]` (synthetic.seeded_tensor draws z * scale in place of
    z * he_scale) chosen so that the channel-centred output has the target std
    (geometric mean over the images of the per-image std); the caller's bias then
    removes the per-channel mean, so that no channel (class) dominates every sample."""
    he = synthetic_he_scale(weight.shape)
    mean = torch.cat(raws).mean(0)
    stds = [float((r - mean).std()) for r in raws]
    geo = float(np.exp(np.mean(np.log(stds))))
    scale = round_sig(he * target_std / geo)
    # output scales linearly with the weight: current weight ~ he * z (up to its sample std)
    return scale, (mean * (scale / he)).numpy()


def set_bias(ov: dict, mod, name: str, out_std: float) -> None:
    """Hidden-layer bias: N(0, (HIDDEN_BIAS_REL * output std)^2), written to the module."""
    n = mod.bias.shape[0]
    b = (HIDDEN_BIAS_REL * out_std * rng_for("bias", name).standard_normal(n)).astype(np.float32)
    mod.bias.copy_(torch.from_numpy(b))
    ov[f"{name}.bias"] = b


BN_TYPES = (misc_nn_ops.FrozenBatchNorm2d, torch.nn.BatchNorm2d)


def set_bn(ov: dict, mod, name: str, m: torch.Tensor, v: torch.Tensor, eps_sensitive: bool = False,
           rng=None) -> None:
    """BN layer `name` from the per-channel mean `m` / variance `v` (float64) of its input:
    running mean m + 0.1 std N(0, 1), running var v x U[0.5, 2], weight U[0.5, 1.5], bias
    N(0, 0.1^2); written to the module and to `ov`. eps_sensitive: see EPS_SENSITIVE_FRACTION.
    rng: the generator factory (default `rng_for`; the detectron2 generator passes its own)."""
    r = (rng or rng_for)("bn", name)
    c = m.shape[0]
    rm = m.numpy() + 0.1 * np.sqrt(v.numpy()) * r.standard_normal(c)
    rv = v.numpy() * r.uniform(0.5, 2.0, c)
    wt = r.uniform(0.5, 1.5, c)
    bs = 0.1 * r.standard_normal(c)
    if eps_sensitive:
        q = rng_for("eps_sensitive", name)
        pick = q.random(c) < EPS_SENSITIVE_FRACTION
        tiny = EPS_SENSITIVE_VAR * q.uniform(0.25, 1.0, c)
        wt = np.where(pick, wt * np.sqrt((tiny + BN_EPS) / (rv + BN_EPS)), wt)
        rv = np.where(pick, tiny, rv)
    for attr, val in (("running_mean", rm), ("running_var", rv), ("weight", wt), ("bias", bs)):
        arr = val.astype(np.float32)
        getattr(mod, attr).copy_(torch.from_numpy(arr))
        ov[f"{name}.{attr}"] = arr


def set_conv_bn(ov: dict, blk, name: str, xs) -> None:
    """A head's Conv2dNormActivation `name` (conv without bias, BN, ReLU; torchvision v2): the BN
    from its input's statistics over all RoIs of `xs` (per image, [R, C, H, W])."""
    y = torch.cat([blk[0](x) for x in xs]).double()
    set_bn(ov, blk[1], f"{name}.1", y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False).clamp_min(1e-12))


@torch.no_grad()
def calibrate(model, synthetic, keys, images=FIXTURE_IMAGES, eps_sensitive: bool = False):
    t0 = time.time()
    scales: dict = {}
    ov: dict = {}
    model.load_state_dict(make_state_dict(synthetic, keys, scales, ov))
    imgs = calib_inputs()
    il, _ = model.transform(imgs)
    padded = tuple(il.tensors.shape[-2:])
    print(f"[calib] {len(imgs)} images, sizes {il.image_sizes}, padded {padded}", flush=True)

    # ---- pass A: backbone BN statistics (pre-hooks) + FPN conv biases (forward hooks), one pass;
    # v2: the FPN's BNs (pre-hooks) and the output levels' scale (forward hooks on their BN).
    hooks = []
    name_of = {m: n for n, m in model.named_modules()}

    def bn_hook(mod, inp):
        x = inp[0]
        m, v = masked_stats(x, valid_hw(il.image_sizes, padded, x.shape[-2:]))
        set_bn(ov, mod, name_of[mod], m, v, eps_sensitive and name_of[mod].startswith("backbone.body."))

    def fpn_bn_hook(mod, inp, out):
        # v2 FPN output block (conv without bias, BN): weight and bias of the BN scaled so that the
        # level's output has the std T_FPN_STD[level].
        name = name_of[mod]
        k = T_FPN_STD[int(name.split(".")[-2])] / float(out.double().std())
        for attr in ("weight", "bias"):
            arr = (getattr(mod, attr).double() * k).numpy().astype(np.float32)
            getattr(mod, attr).copy_(torch.from_numpy(arr))
            ov[f"{name}.{attr}"] = arr
        return out * k

    def fpn_hook(mod, inp, out):
        # FPN 1x1 lateral / 3x3 output convs (bias still 0 here): set the bias, and for
        # the output convs (layer_blocks.{i}) also scale the weight to the level's std.
        name = name_of[mod]
        assert float(mod.bias.abs().max()) == 0.0
        if ".layer_blocks." in name:
            lvl = int(name.split(".")[-2])
            he = synthetic_he_scale(mod.weight.shape)
            s = round_sig(he * T_FPN_STD[lvl] / float(out.double().std()))   # absolute weight std
            scales[f"{name}.weight"] = s
            out = out * (s / he)
        std = float(out.double().std())
        b = (HIDDEN_BIAS_REL * std * rng_for("bias", name).standard_normal(out.shape[1])).astype(np.float32)
        mod.bias.copy_(torch.from_numpy(b))
        ov[f"{name}.bias"] = b
        return out + mod.bias.view(1, -1, 1, 1)

    for n, m in model.backbone.body.named_modules():
        if isinstance(m, BN_TYPES):
            hooks.append(m.register_forward_pre_hook(bn_hook))
    for n, m in model.backbone.fpn.named_modules():
        if isinstance(m, torch.nn.Conv2d) and m.bias is not None:           # v1
            hooks.append(m.register_forward_hook(fpn_hook))
        elif isinstance(m, torch.nn.BatchNorm2d):                            # v2
            hooks.append(m.register_forward_pre_hook(bn_hook))
            if n.startswith("layer_blocks."):
                hooks.append(m.register_forward_hook(fpn_bn_hook))
    feats = model.backbone(il.tensors)
    for h in hooks:
        h.remove()
    model.load_state_dict(make_state_dict(synthetic, keys, scales, ov))
    feats = model.backbone(il.tensors)
    print(f"[calib] pass A (backbone BN + FPN) {time.time() - t0:.0f}s; scales {scales}", flush=True)
    for k, f in feats.items():
        print(f"    P{k}: shape {tuple(f.shape)} std {float(f.std()):.3f} mean {float(f.mean()):.3f}")

    feats = il = imgs = None                      # free the calibration batch

    # ---- heads, on the fixture images one at a time (see HEAD_CALIB note at the top).
    sets = []
    for name in images:
        il1, _ = model.transform([to_tv_input(image_rgb(name))])
        sets.append((il1, model.backbone(il1.tensors)))
    print(f"[calib] fixture-image features {time.time() - t0:.0f}s", flush=True)

    # RPN head: hidden 3x3 conv biases (v2: two convs), then the two output layers (all levels pooled).
    head = model.rpn.head
    xs = [f for _, fe in sets for f in fe.values()]
    for i, blk in enumerate(head.conv):
        pre = torch.cat([torch.nn.functional.conv2d(x, blk[0].weight, None, padding=1).flatten() for x in xs])
        set_bias(ov, blk[0], f"rpn.head.conv.{i}.0", float(pre.double().std()))
        del pre
        xs = [blk(x) for x in xs] if i + 1 < len(head.conv) else None

    def rpn_raw(w):   # per image: (positions of all levels, channels) at scale 1, no bias
        return [torch.cat([torch.nn.functional.conv2d(head.conv(f), w).permute(0, 2, 3, 1).reshape(-1, w.shape[0])
                           for f in fe.values()]).double() for _, fe in sets]

    sc, mean = centred_scale(rpn_raw(head.cls_logits.weight), T_RPN_OBJ_STD, head.cls_logits.weight)
    scales["rpn.head.cls_logits.weight"] = sc
    ov["rpn.head.cls_logits.bias"] = (
        -mean + rng_for("bias", "rpn.head.cls_logits").uniform(-7.0, -5.0, 3)).astype(np.float32)
    sc, mean = centred_scale(rpn_raw(head.bbox_pred.weight), T_RPN_DELTA_STD, head.bbox_pred.weight)
    scales["rpn.head.bbox_pred.weight"] = sc
    ov["rpn.head.bbox_pred.bias"] = (
        -mean + 0.1 * T_RPN_DELTA_STD * rng_for("bias", "rpn.head.bbox_pred").standard_normal(12)
    ).astype(np.float32)
    model.load_state_dict(make_state_dict(synthetic, keys, scales, ov))
    print(f"[calib] RPN {time.time() - t0:.0f}s; scales {scales}", flush=True)

    # Box head: proposals -> fc6/fc7 biases -> box predictor scales.
    rh = model.roi_heads
    props = [model.rpn(il1, fe)[0] for il1, fe in sets]
    xs = [rh.box_roi_pool(fe, pr, il1.image_sizes) for (il1, fe), pr in zip(sets, props)]
    if isinstance(rh.box_head, FastRCNNConvFCHead):
        # v2: 4 x (conv, BN, ReLU), Flatten, Linear, ReLU.
        for i, blk in enumerate(rh.box_head):
            if isinstance(blk, misc_nn_ops.Conv2dNormActivation):
                set_conv_bn(ov, blk, f"roi_heads.box_head.{i}", xs)
            elif isinstance(blk, torch.nn.Linear):
                y = torch.cat([torch.nn.functional.linear(x, blk.weight) for x in xs])
                set_bias(ov, blk, f"roi_heads.box_head.{i}", float(y.double().std()))
            xs = [blk(x) for x in xs]
    else:
        xs = [x.flatten(1) for x in xs]
        for fc_name in ("fc6", "fc7"):
            fc = getattr(rh.box_head, fc_name)
            y = torch.cat([torch.nn.functional.linear(x, fc.weight) for x in xs])
            set_bias(ov, fc, f"roi_heads.box_head.{fc_name}", float(y.double().std()))
            xs = [torch.relu(fc(x)) for x in xs]
    bp = rh.box_predictor
    sc, mean = centred_scale([torch.nn.functional.linear(x, bp.cls_score.weight).double() for x in xs],
                              T_CLS_STD, bp.cls_score.weight)
    scales["roi_heads.box_predictor.cls_score.weight"] = sc
    ov["roi_heads.box_predictor.cls_score.bias"] = (
        -mean + T_CLS_BIAS_STD * rng_for("bias", "cls_score").standard_normal(91)).astype(np.float32)
    sc, mean = centred_scale([torch.nn.functional.linear(x, bp.bbox_pred.weight).double() for x in xs],
                              T_BOX_STD, bp.bbox_pred.weight)
    scales["roi_heads.box_predictor.bbox_pred.weight"] = sc
    ov["roi_heads.box_predictor.bbox_pred.bias"] = (
        -mean + 0.1 * T_BOX_STD * rng_for("bias", "bbox_pred").standard_normal(364)).astype(np.float32)
    model.load_state_dict(make_state_dict(synthetic, keys, scales, ov))
    print(f"[calib] box head {time.time() - t0:.0f}s; scales {scales}", flush=True)

    # Mask head: detections -> mask head / deconv biases -> mask logits scale and centring bias.
    xs = []
    for (il1, fe), pr in zip(sets, props):
        cl, br = rh.box_predictor(rh.box_head(rh.box_roi_pool(fe, pr, il1.image_sizes)))
        boxes, scores, labels = rh.postprocess_detections(cl, br, pr, il1.image_sizes)
        print(f"    {len(scores[0])} detections, scores {float(scores[0].min()):.3f}..{float(scores[0].max()):.3f}")
        xs.append(rh.mask_roi_pool(fe, boxes, il1.image_sizes))
    for i, blk in enumerate(rh.mask_head):
        if isinstance(blk[1], torch.nn.BatchNorm2d):         # v2: conv without bias, BN, ReLU
            set_conv_bn(ov, blk, f"roi_heads.mask_head.{i}", xs)
        else:                                                # v1: conv with bias, ReLU
            cv = blk[0]
            y = torch.cat([torch.nn.functional.conv2d(x, cv.weight, None, padding=1).flatten() for x in xs])
            set_bias(ov, cv, f"roi_heads.mask_head.{i}.0", float(y.double().std()))
        xs = [blk(x) for x in xs]
    mp = rh.mask_predictor
    y = torch.cat([torch.nn.functional.conv_transpose2d(x, mp.conv5_mask.weight, None, stride=2).flatten()
                   for x in xs])
    set_bias(ov, mp.conv5_mask, "roi_heads.mask_predictor.conv5_mask", float(y.double().std()))
    xs = [torch.relu(mp.conv5_mask(x)) for x in xs]
    raws = [torch.nn.functional.conv2d(x, mp.mask_fcn_logits.weight).double().permute(0, 2, 3, 1).reshape(-1, 91)
            for x in xs]
    sc, mean = centred_scale(raws, T_MASK_STD, mp.mask_fcn_logits.weight)
    scales["roi_heads.mask_predictor.mask_fcn_logits.weight"] = sc
    ov["roi_heads.mask_predictor.mask_fcn_logits.bias"] = (
        -mean + T_MASK_BIAS_STD * rng_for("bias", "mask_fcn_logits").standard_normal(91)).astype(np.float32)
    model.load_state_dict(make_state_dict(synthetic, keys, scales, ov))
    print(f"[calib] mask head {time.time() - t0:.0f}s; scales {scales}", flush=True)

    # Every 1-D tensor is now calibrated; take them all from the state dict.
    sd = model.state_dict()
    one_d = OrderedDict((k, sd[k].numpy().astype(np.float32).copy()) for k, s, _ in keys if len(s) == 1)
    missing = [k for k in one_d if k not in ov]
    assert not missing, f"1-D tensors not calibrated: {missing[:5]}"
    return scales, one_d


# ----------------------------------------------------------------------------- recording
def sample_positions(rng, shape, n):
    """n distinct flat positions of an array of `shape`, sorted; returned as an index tuple."""
    total = int(np.prod(shape))
    flat = np.sort(rng.choice(total, size=min(n, total), replace=False))
    return np.stack(np.unravel_index(flat, shape), axis=1).astype(np.int32)


def rle_runs(mask: np.ndarray) -> np.ndarray:
    """COCO uncompressed RLE counts: column-major runs, starting with a run of zeros."""
    v = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    change = np.flatnonzero(np.diff(v)) + 1
    bounds = np.concatenate([[0], change, [v.size]])
    runs = np.diff(bounds)
    if v.size and v[0] == 1:
        runs = np.concatenate([[0], runs])
    return runs.astype(np.int32)


@torch.no_grad()
def record_image(model, name: str, store_image: bool = True) -> dict:
    img = image_rgb(name)
    x = to_tv_input(img)
    out = {}
    p = f"{name}/"
    if store_image:
        out[p + "image"] = img
    out[p + "image_sha256"] = np.array(hashlib.sha256(img.tobytes()).hexdigest())
    out[p + "image_hw"] = np.array(img.shape[:2], np.int32)

    # -- staged forward, exactly the calls GeneralizedRCNN.forward makes
    il, _ = model.transform([x])
    t = il.tensors
    out[p + "resized_hw"] = np.array(il.image_sizes[0], np.int32)
    out[p + "padded_hw"] = np.array(t.shape[-2:], np.int32)
    tn = t[0].permute(1, 2, 0).numpy()                       # (H, W, 3)
    pos = sample_positions(rng_for(name, "input"), tn.shape, N_SAMPLE)
    out[p + "input/sample_yxc"] = pos
    out[p + "input/sample_values"] = tn[pos[:, 0], pos[:, 1], pos[:, 2]].astype(np.float32)
    out[p + "input/channel_sums"] = tn.astype(np.float64).sum((0, 1))

    feats = model.backbone(t)
    assert list(feats.keys()) == list(FPN_LEVELS)
    for lvl in FPN_LEVELS:
        f = feats[lvl][0].permute(1, 2, 0).numpy()           # (H, W, 256)
        q = f"{p}fpn/{lvl}/"
        out[q + "hw"] = np.array(f.shape[:2], np.int32)
        out[q + "channel_mean"] = f.astype(np.float64).mean((0, 1)).astype(np.float32)
        pos = sample_positions(rng_for(name, "fpn", lvl), f.shape, N_SAMPLE)
        out[q + "sample_yxc"] = pos
        out[q + "sample_values"] = f[pos[:, 0], pos[:, 1], pos[:, 2]].astype(np.float32)

    rpn = model.rpn
    fl = list(feats.values())
    obj, dl = rpn.head(fl)
    for lvl, o, d in zip(FPN_LEVELS, obj, dl):
        o = o[0].permute(1, 2, 0).numpy()                    # (H, W, 3)   anchors a = ratio index
        d = d[0].permute(1, 2, 0).numpy()                    # (H, W, 12)  channel = a*4 + (dx,dy,dw,dh)
        q = f"{p}rpn/{lvl}/"
        pos = sample_positions(rng_for(name, "rpn", lvl), o.shape[:2], N_RPN_SAMPLE)
        out[q + "sample_yx"] = pos
        out[q + "objectness"] = o[pos[:, 0], pos[:, 1]].astype(np.float32)
        out[q + "deltas"] = d[pos[:, 0], pos[:, 1]].astype(np.float32)
    anchors = rpn.anchor_generator(il, fl)
    num_per_level = [int(o[0].numel()) for o in obj]
    from torchvision.models.detection.rpn import concat_box_prediction_layers
    objc, dlc = concat_box_prediction_layers(obj, dl)
    proposals = rpn.box_coder.decode(dlc.detach(), anchors).view(1, -1, 4)
    pboxes, pscores = rpn.filter_proposals(proposals, objc, il.image_sizes, num_per_level)
    pboxes, pscores = pboxes[0], pscores[0]
    assert pboxes.shape[0] == 1000, pboxes.shape
    out[p + "rpn/num_anchors_per_level"] = np.array(num_per_level, np.int32)
    out[p + "proposals"] = pboxes.numpy().astype(np.float32)
    out[p + "proposal_scores"] = pscores.numpy().astype(np.float32)
    # proposals must equal what model.rpn returns
    pb2, _ = rpn(il, feats)
    assert torch.equal(pb2[0], pboxes)

    rh = model.roi_heads
    bf = rh.box_head(rh.box_roi_pool(feats, [pboxes[:N_BOX_HEAD]], il.image_sizes))
    cl, br = rh.box_predictor(bf)
    out[p + "box_head/class_logits"] = cl.numpy().astype(np.float32)
    out[p + "box_head/box_regression"] = br.numpy().astype(np.float32)

    dets, _ = rh(feats, [pboxes], il.image_sizes)
    d = dets[0]
    boxes_r = d["boxes"]
    out[p + "det/boxes_resized"] = boxes_r.numpy().astype(np.float32)
    # mask logits of the predicted class, on the detection boxes in resized coordinates
    mf = rh.mask_predictor(rh.mask_head(rh.mask_roi_pool(feats, [boxes_r], il.image_sizes)))
    ml = mf[torch.arange(mf.shape[0]), d["labels"]]
    assert torch.equal(ml.sigmoid(), d["masks"][:, 0]), "mask logits do not reproduce roi_heads' masks"
    out[p + "det/mask_logits"] = ml.numpy().astype(np.float32)

    post = model.transform.postprocess(dets, il.image_sizes, [tuple(x.shape[-2:])])[0]

    # -- the real end-to-end forward must give the same result
    e2e = model([x])[0]
    for k in ("boxes", "scores", "labels", "masks"):
        assert torch.equal(e2e[k], post[k]), f"staged != end-to-end for {k}"

    out[p + "det/boxes"] = e2e["boxes"].numpy().astype(np.float32)
    out[p + "det/scores"] = e2e["scores"].numpy().astype(np.float32)
    out[p + "det/labels"] = e2e["labels"].numpy().astype(np.int32)
    binm = (e2e["masks"][:, 0] > 0.5).numpy()                 # (N, H, W) bool, original size
    runs = [rle_runs(m) for m in binm]
    out[p + "det/mask_area"] = binm.reshape(binm.shape[0], -1).sum(1).astype(np.int32)
    out[p + "det/mask_rle_runs"] = np.concatenate(runs).astype(np.int32)
    out[p + "det/mask_rle_offsets"] = np.cumsum([0] + [len(r) for r in runs]).astype(np.int32)
    try:
        from pycocotools import mask as mask_util
        enc = mask_util.encode(np.asfortranarray(binm.transpose(1, 2, 0).astype(np.uint8)))
        out[p + "det/mask_rle_coco"] = np.array([e["counts"].decode("ascii") for e in enc])
    except ImportError:  # pragma: no cover
        pass
    return out


# ----------------------------------------------------------------------------- npz
def write_npz(path: Path, arrays: dict) -> None:
    """np.savez_compressed equivalent with fixed zip timestamps (byte-reproducible)."""
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


def _pycocotools_version() -> str:
    try:
        from importlib.metadata import version
        return version("pycocotools")
    except Exception:  # pragma: no cover
        return "absent"


def state_dict_from_fixture(fx, synthetic, keys):
    """Regenerate the full state dict from the fixture alone (what a JAX test does)."""
    scales = {str(n): float(v) for n, v in zip(fx["scale_names"], fx["scale_values"])}
    ov = {k: fx["w/" + k] for k, s, _ in keys if len(s) == 1}
    return make_state_dict(synthetic, keys, scales, ov)


# ----------------------------------------------------------------------------- checks
def tv_roi_level(boxes: np.ndarray) -> np.ndarray:
    """torchvision LevelMapper: 0..3 = P2..P5."""
    s = np.sqrt(np.maximum((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 0))
    with np.errstate(divide="ignore"):
        k = np.floor(4 + np.log2(s / 224.0) + 1e-6)
    return (np.clip(k, 2, 5) - 2).astype(np.int64)


def quality_report(arrs: dict, images=FIXTURE_IMAGES) -> list:
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
        prop = arrs[f"{name}/proposal_scores"]
        lv_det = np.bincount(tv_roi_level(arrs[f"{name}/det/boxes_resized"]), minlength=4)
        lv_prop = np.bincount(tv_roi_level(arrs[f"{name}/proposals"]), minlength=4)
        lines.append(
            f"{name}: {len(s)} dets, {len(np.unique(lab))} classes, scores {ss[-1]:.4f}..{ss[0]:.4f}, "
            f"min gap {gaps.min():.2e}, ties {int((gaps == 0).sum())}, "
            f"mask logits std {ml.std():.2f} (per-det fg frac of 28x28 {np.mean(ml > 0):.2f}), "
            f"pasted mask area frac median {np.median(frac):.4f} [{frac.min():.4f}, {frac.max():.4f}], "
            f"empty masks {int((area == 0).sum())}; proposal score ties {len(prop) - len(np.unique(prop))}; "
            f"RoI level P2..P5 of detections {lv_det.tolist()}, of proposals {lv_prop.tolist()}")
        if len(s) != 100:
            problems.append(f"{name}: {len(s)} detections != 100")
        if (gaps == 0).any():
            problems.append(f"{name}: tied detection scores")
        if (s >= 1.0).any():
            problems.append(f"{name}: a score equals 1.0")
        if len(np.unique(lab)) < 5:
            problems.append(f"{name}: only {len(np.unique(lab))} classes")
        b = arrs[f"{name}/det/boxes"]
        box_area = np.maximum((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), 1.0)
        partial = int(((area > 0) & (area < 0.9 * box_area)).sum())
        if partial < 50:
            problems.append(f"{name}: only {partial} masks are neither empty nor filling their box")
    return lines, problems


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[N, 4] x [M, 4] xyxy -> [N, M] IoU."""
    return torchvision.ops.box_iou(torch.from_numpy(a).double(), torch.from_numpy(b).double()).numpy()


@torch.no_grad()
def eps_mixup_report(model, arrs: dict, images) -> list:
    """The recorded model run with its BN eps overwritten by 0 (what eps 0 for this checkpoint
    would give): how many of the recorded detections survive (same class, box IoU >= 0.99)."""
    model = copy.deepcopy(model)
    for m in model.modules():      # torchvision's overwrite_eps only touches FrozenBatchNorm2d
        if isinstance(m, BN_TYPES):
            m.eps = 0.0
    lines = []
    for name in images:
        o = model([to_tv_input(image_rgb(name))])[0]
        iou = box_iou(arrs[f"{name}/det/boxes"], o["boxes"].numpy())
        iou[arrs[f"{name}/det/labels"][:, None] != o["labels"].numpy()[None, :]] = 0
        lines.append(f"{name}: with eps 0, {int((iou.max(1) >= 0.99).sum())} of "
                     f"{len(arrs[f'{name}/det/boxes'])} detections remain")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=list(MODELS), default=DEFAULT_MODEL,
                    help="how the model is built (key file, default output, photographs)")
    ap.add_argument("--out", type=Path, default=None,
                    help="output npz (default: tests/fixtures/<the model's fixture>)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--verify-only", action="store_true", help="only re-run the fixture check")
    args = ap.parse_args()

    spec = MODELS[args.model]
    images = spec["images"]
    if args.out is None:
        args.out = FIXTURES / spec["out"]
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    synthetic = load_synthetic()
    model = build_model(args.model)
    keys = model_keys(model)
    check_keys(keys, synthetic, FIXTURES / "checkpoint_keys" / spec["keys"])

    if not args.verify_only:
        scales, one_d = calibrate(model, synthetic, keys, images,
                                  eps_sensitive=args.model == "v1_weights_none")
        # Final weights: regenerated from (seed, scales, stored 1-D tensors) only.
        sd = state_dict_from_fixture(
            {"scale_names": np.array(list(scales)), "scale_values": np.array(list(scales.values())),
             **{"w/" + k: v for k, v in one_d.items()}}, synthetic, keys)
        model = build_model(args.model)
        model.load_state_dict(sd)

        arrs = OrderedDict()
        arrs["seed"] = np.array(SEED, np.int64)
        arrs["versions"] = np.array(json.dumps({
            "torch": torch.__version__, "torchvision": torchvision.__version__, "numpy": np.__version__,
            "scikit-image": skimage.__version__, "pycocotools": _pycocotools_version(),
            "python": sys.version.split()[0]}))
        if args.model == "v1_coco":
            model_desc = {"model": "torchvision.models.detection.maskrcnn_resnet50_fpn, COCO_V1 build path "
                                   "(FrozenBatchNorm2d, overwrite_eps(model, 0.0)), num_classes=91, eval",
                          "min_size": 800, "max_size": 1333, "frozen_bn_eps": 0.0}
        else:
            builder = {"v1_weights_none": "maskrcnn_resnet50_fpn", "v2": "maskrcnn_resnet50_fpn_v2"}[args.model]
            model_desc = {"model": f"torchvision.models.detection.{builder}(weights=None, weights_backbone=None)"
                                   ", num_classes=91, eval",
                          "min_size": 800, "max_size": 1333, "norm": "BatchNorm2d", "bn_eps": BN_EPS}
            if args.model == "v1_weights_none":
                model_desc["eps_sensitive_channels"] = {"fraction": EPS_SENSITIVE_FRACTION,
                                                        "running_var": [EPS_SENSITIVE_VAR / 4, EPS_SENSITIVE_VAR]}
        arrs["config"] = np.array(json.dumps({
            **model_desc,
            "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
            "input": "uint8 RGB image -> float32 CHW / 255",
            "mask_binarization": "pasted soft mask > 0.5",
            "torch_threads": args.threads}))
        arrs["image_names"] = np.array(images)
        arrs["calibration_images"] = np.array(CALIB_IMAGES)
        arrs["scale_names"] = np.array(list(scales))
        arrs["scale_values"] = np.array(list(scales.values()), np.float64)
        arrs["checksum_names"] = np.array(CHECKSUM_KEYS)
        arrs["checksum_sums"] = np.array([sd[k].double().sum().item() for k in CHECKSUM_KEYS], np.float64)
        arrs["checksum_first8"] = np.stack([sd[k].flatten()[:8].numpy() for k in CHECKSUM_KEYS]).astype(np.float32)
        for k, v in one_d.items():
            arrs["w/" + k] = v
        for name in images:
            t0 = time.time()
            arrs.update(record_image(model, name, spec["store_images"]))
            print(f"[record] {name} {time.time() - t0:.0f}s", flush=True)
        lines, problems = quality_report(arrs, images)
        if args.model == "v1_weights_none":
            lines += eps_mixup_report(model, arrs, images)
        print("\n".join(lines))
        if problems:
            print("QUALITY PROBLEMS:\n  " + "\n  ".join(problems))
        write_npz(args.out, arrs)
        print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.2f} MiB, {len(arrs)} arrays)")

    # ---- self-consistency: fresh model from the fixture only, rerun, compare.
    fx = np.load(args.out)
    sd = state_dict_from_fixture(fx, synthetic, keys)
    for n, s in zip(fx["checksum_names"], fx["checksum_sums"]):
        assert sd[str(n)].double().sum().item() == s, f"checksum mismatch for {n}: RNG stream changed?"
    model = build_model(args.model)
    model.load_state_dict(sd)
    with torch.no_grad():
        for name in [str(n) for n in fx["image_names"]]:
            img = image_rgb(name)
            assert hashlib.sha256(img.tobytes()).hexdigest() == str(fx[f"{name}/image_sha256"]), name
            o = model([to_tv_input(img)])[0]
            for k, dt in (("boxes", np.float32), ("scores", np.float32), ("labels", np.int32)):
                assert np.array_equal(o[k].numpy().astype(dt), fx[f"{name}/det/{k}"]), f"{name}: {k} differ"
            binm = (o["masks"][:, 0] > 0.5).numpy()
            runs = np.concatenate([rle_runs(m) for m in binm])
            assert np.array_equal(runs, fx[f"{name}/det/mask_rle_runs"]), f"{name}: masks differ"
            print(f"[verify] {name}: {len(o['scores'])} detections identical", flush=True)
    print("verify OK")


if __name__ == "__main__":
    main()
