#!/usr/bin/env python
"""Fixtures for the ImageNet-backbone initialisation (config.model.backbone_init), from the real
reference frameworks (CPU). NOT run by CI (no torch there). In the reference venv::

    /work/tvenv/bin/python scripts/make_backbone_fixtures.py keys       # key lists of the 11 files
    /work/tvenv/bin/python scripts/make_backbone_fixtures.py features   # calibrate, save, record
    /work/tvenv/bin/python scripts/make_backbone_fixtures.py narrow     # small files for the tests
    /work/tvenv/bin/python scripts/make_backbone_fixtures.py features --verify-only
    /work/tvenv/bin/python scripts/make_backbone_fixtures.py features --float64  # f32 vs f64 error

`keys` writes tests/fixtures/checkpoint_keys/imagenet_<file>.tsv, one per published file of
maskrcnn_jax/checkpoints/backbones.py CATALOG:
  * torchvision resnet50 / resnet101 / resnext101_32x8d (`torchvision://resnet*`,
    `ResNet*_Weights.IMAGENET1K_V1`): `torchvision.models.<arch>().state_dict()` of the installed
    torchvision (the classification model those files hold, `fc.*` included);
  * detectron2 ImageNetPretrained MSRA/R-50.pkl, R-101.pkl, FAIR/X-101-32x8d.pkl: Caffe2 blob
    names of detectron2's ResNet built from the recipe's yaml (`build_resnet_backbone`), written as
    C2 names and checked to map back onto the model's keys with detectron2's own
    `convert_basic_c2_names`; affine-only norms (`_bn_s`, `_bn_b`, no statistics); the MSRA files
    also hold `conv1_b`, `fc1000_w`, `fc1000_b` (the keys detectron2 reports as unused when it
    loads them: "fc1000.{bias, weight}, stem.conv1.bias");
  * mmdetection open-mmlab://detectron2/resnet{50,101}_caffe, detectron2/resnext101_32x8d: the C2
    lists above passed through mmdetection's tools/model_converters/detectron2pytorch.py rules
    (mmdet names, statistics written as mean 0 / var 1, `conv1.bias` kept when `conv1_b` exists);
  * mmdetection open-mmlab://resnext101_{32x4d,64x4d}: mmdet's ResNeXt backbone state dict, i.e.
    the `backbone.*` entries of the mmdet keys files dumped from mmdetection, prefix removed.

`features` builds, with fixed seeds and no download, (a) torchvision's resnet50 with
FrozenBatchNorm2d (what torchvision's detection builders make for `weights_backbone`; eps 1e-5)
and (b) detectron2's R-50 from configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml;
calibrates the norms on other scikit-image photographs (shared/reference/reference_frameworks.md:
statistics of the real activations, perturbed: mean + 0.1 std N(0,1), var x U[0.5, 2], weight
U[0.5, 1.5], bias N(0, 0.1); detectron2's Caffe2 norms store that BN folded into scale/bias);
saves each in its real format (torchvision: `torch.save` of the state dict; detectron2: a plain
protocol-2 pickle of the C2 blob dict, as the MSRA file is) and loads it back through the
framework's own loader (`load_state_dict` / `DetectionCheckpointer.load`, with detectron2's C2
renaming and FrozenBN filling); runs res2..res5 on a photograph (coffee, stored as
tests/fixtures/images/coffee_320x480.png) and writes tests/fixtures/backbone_parity.npz (sampled values and
channel means per stage; the weights are regenerated from seeds + the stored 1-D tensors).
`--verify-only` regenerates the files from the fixture alone and requires identical outputs.

`narrow` writes tests/fixtures/pth/imagenet_narrow_resnet50.pth (torchvision names, torch.save zip)
and imagenet_narrow_R-50.pkl (C2 names, affine only, plain pickle): ResNet-50 topology at widths
(stem 8, bottleneck 2..16, outputs 8..64), values from `synthetic.seeded_state_dict` (seed
NARROW_SEED, every 1-D tensor scaled by 0.1), so that the tests regenerate and compare them.
"""
from __future__ import annotations

import argparse
import collections
import functools
import hashlib
import importlib.util
import io
import json
import pickle
import sys
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
KEYS_DIR = REPO / "tests" / "fixtures" / "checkpoint_keys"
OUT_NPZ = REPO / "tests" / "fixtures" / "backbone_parity.npz"
PHOTO = REPO / "tests" / "fixtures" / "images" / "coffee_320x480.png"
PTH_DIR = REPO / "tests" / "fixtures" / "pth"
D2_CONFIGS = {"R-50.pkl": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
              "R-101.pkl": "COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml",
              "X-101-32x8d.pkl": "COCO-InstanceSegmentation/mask_rcnn_X_101_32x8d_FPN_3x.yaml"}
TV_FILES = {"resnet50-0676ba61.pth": "resnet50", "resnet101-63fe2227.pth": "resnet101",
            "resnext101_32x8d-8ba56ff5.pth": "resnext101_32x8d"}
MMDET_C2 = {"resnet50_msra-5891d200.pth": "R-50.pkl", "resnet101_msra-6cc46731.pth": "R-101.pkl",
            "resnext101_32x8d-1516f1aa.pth": "X-101-32x8d.pkl"}
MMDET_RESNEXT = {"resnext101_32x4d-a5af3160.pth": "mmdet_mask_rcnn_x101_32x4d_fpn_1x_coco.tsv",
                 "resnext101_64x4d-ee2c6f71.pth": "mmdet_mask_rcnn_x101_64x4d_fpn_1x_coco.tsv"}

SEED = {"tv": 20250101, "d2": 20250102}
NARROW_SEED = 20250103
# The photograph: skimage.data.coffee() (400x600), rows 40:360, cols 60:540 -> 320x480 (a
# multiple of 32: the backbones run without padding).
PHOTO_CROP = (slice(40, 360), slice(60, 540))
CALIB_IMAGES = ("astronaut", "chelsea", "rocket", "immunohistochemistry")
CALIB_SIZE = 256
N_SAMPLE = 2048
STAGES = ("res2", "res3", "res4", "res5")
EPS = 1e-5


@functools.lru_cache(maxsize=None)
def tvfix():
  """scripts/make_parity_fixtures.py (the torchvision generator), loaded as a file: its
  `sample_positions` and byte-reproducible `write_npz`."""
  spec = importlib.util.spec_from_file_location("_make_parity_fixtures_tv",
                                                REPO / "scripts" / "make_parity_fixtures.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def synthetic():
  """tests/synthetic_weights.py as a file (no package import, no jax)."""
  return tvfix().load_synthetic()


def rng_for(*parts) -> np.random.Generator:
  words = [int(zlib.crc32(str(p).encode())) for p in parts]
  return np.random.default_rng(words)


def write_tsv(path: Path, keys, header: str) -> None:
  lines = [f"# {line}" for line in header.splitlines()]
  lines += [f"{n}\t{tuple(int(s) for s in shape)}\t{dtype}" for n, shape, dtype in keys]
  path.write_text("\n".join(lines) + "\n")
  print(f"wrote {path.relative_to(REPO)} ({len(keys)} entries)")


# ----------------------------------------------------------------------------- C2 names
_C2_BRANCH = {"shortcut": "branch1", "conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c"}


def c2_name(d2_key: str) -> str | None:
  """detectron2 ResNet state-dict key -> Caffe2 blob name (None: statistics, absent in C2)."""
  module, _, leaf = d2_key.rpartition(".")
  norm = module.endswith(".norm")
  base = module[:-5] if norm else module
  if leaf in ("running_mean", "running_var", "num_batches_tracked"):
    return None
  if base == "stem.conv1":
    prefix = "res_conv1" if norm else "conv1"
  else:
    stage, block, conv = base.split(".")
    prefix = f"{stage}_{block}_{_C2_BRANCH[conv]}"
  return f"{prefix}_{'bn_' if norm else ''}{ {'weight': 's' if norm else 'w', 'bias': 'b'}[leaf]}"


def d2_bottom_up(cfg_name: str):
  from detectron2 import model_zoo
  from detectron2.config import get_cfg
  from detectron2.modeling import build_model
  cfg = get_cfg()
  cfg.merge_from_file(model_zoo.get_config_file(cfg_name))
  cfg.MODEL.DEVICE = "cpu"
  cfg.MODEL.WEIGHTS = ""
  return cfg, build_model(cfg)


def c2_keys(file_name: str):
  """(C2 key list, detectron2 key of each) for one detectron2 ImageNet file."""
  from detectron2.checkpoint.c2_model_loading import convert_basic_c2_names
  _, model = d2_bottom_up(D2_CONFIGS[file_name])
  sd = model.backbone.bottom_up.state_dict()
  keys, d2 = [], []
  for k, v in sd.items():
    name = c2_name(k)
    if name is not None:
      keys.append((name, tuple(v.shape), "float32"))
      d2.append(k)
  back = convert_basic_c2_names([k for k, _, _ in keys])
  assert back == d2, [(a, b) for a, b in zip(back, d2) if a != b][:5]
  if file_name.startswith("R-"):
    keys.append(("conv1_b", (64,), "float32"))
    keys += [("fc1000_w", (1000, 2048), "float32"), ("fc1000_b", (1000,), "float32")]
  return keys


def mmdet_from_c2(c2: list) -> list:
  """mmdetection tools/model_converters/detectron2pytorch.py `convert` on a C2 key list."""
  shapes = {n: s for n, s, _ in c2}
  out = []

  def conv_fc(caffe, torch_name):
    out.append((torch_name + ".weight", shapes[caffe + "_w"], "float32"))
    if caffe + "_b" in shapes:
      out.append((torch_name + ".bias", shapes[caffe + "_b"], "float32"))

  def bn(caffe, torch_name):
    c = shapes[caffe + "_s"]
    for leaf in ("bias", "weight", "running_mean", "running_var"):
      out.append((f"{torch_name}.{leaf}", c, "float32"))

  depth_blocks = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
  n4 = 1 + max(int(n.split("_")[1]) for n in shapes if n.startswith("res4_"))
  blocks = depth_blocks[50 if n4 == 6 else 101]
  conv_fc("conv1", "conv1")
  bn("res_conv1_bn", "bn1")
  for i, n in enumerate(blocks, 1):
    for j in range(n):
      if j == 0:
        conv_fc(f"res{i + 1}_{j}_branch1", f"layer{i}.{j}.downsample.0")
        bn(f"res{i + 1}_{j}_branch1_bn", f"layer{i}.{j}.downsample.1")
      for k, letter in enumerate("abc"):
        conv_fc(f"res{i + 1}_{j}_branch2{letter}", f"layer{i}.{j}.conv{k + 1}")
        bn(f"res{i + 1}_{j}_branch2{letter}_bn", f"layer{i}.{j}.bn{k + 1}")
  return out


def cmd_keys(_args) -> None:
  import torch
  import torchvision
  KEYS_DIR.mkdir(parents=True, exist_ok=True)
  for file_name, arch in TV_FILES.items():
    model = getattr(torchvision.models, arch)()
    keys = [(k, tuple(v.shape), str(v.dtype).replace("torch.", ""))
            for k, v in model.state_dict().items()]
    write_tsv(KEYS_DIR / f"imagenet_{file_name}.tsv", keys,
              f"{file_name}: torchvision.models.{arch}().state_dict() of torchvision "
              f"{torchvision.__version__} (torch {torch.__version__}); files published before\n"
              "torch 1.0 have no num_batches_tracked.")
  c2 = {}
  for file_name, cfg in D2_CONFIGS.items():
    c2[file_name] = c2_keys(file_name)
    write_tsv(KEYS_DIR / f"imagenet_{file_name}.tsv", c2[file_name],
              f"detectron2://ImageNetPretrained/.../{file_name}: Caffe2 blob names of detectron2's "
              f"ResNet ({cfg}),\nchecked with detectron2 convert_basic_c2_names; "
              + ("plus conv1_b, fc1000_w, fc1000_b (unused by detectron2)."
                 if file_name.startswith("R-") else "no classifier keys listed."))
  for file_name, src in MMDET_C2.items():
    write_tsv(KEYS_DIR / f"imagenet_{file_name}.tsv", mmdet_from_c2(c2[src]),
              f"open-mmlab {file_name}: {src}'s blobs through mmdetection "
              "tools/model_converters/detectron2pytorch.py (saved as {'state_dict': ...}).")
  syn = synthetic()
  for file_name, det in MMDET_RESNEXT.items():
    keys = [(n[len("backbone."):], s, d) for n, s, d in syn.read_key_tsv(str(KEYS_DIR / det))
            if n.startswith("backbone.")]
    write_tsv(KEYS_DIR / f"imagenet_{file_name}.tsv", keys,
              f"open-mmlab {file_name}: mmdetection's ResNeXt backbone state dict (the backbone.* "
              f"entries of {det}, dumped from mmdetection, prefix removed).")


# ----------------------------------------------------------------------------- images
def photo_rgb() -> np.ndarray:
  import skimage.data
  return np.ascontiguousarray(skimage.data.coffee()[PHOTO_CROP])


def calib_rgb() -> np.ndarray:
  """[N, S, S, 3] uint8 centre crops of other scikit-image photographs."""
  import skimage.data
  out = []
  for name in CALIB_IMAGES:
    img = getattr(skimage.data, name)()
    h, w = img.shape[:2]
    y0, x0 = (h - CALIB_SIZE) // 2, (w - CALIB_SIZE) // 2
    out.append(img[y0:y0 + CALIB_SIZE, x0:x0 + CALIB_SIZE, :3])
  return np.stack(out)


def tv_input(rgb: np.ndarray):
  """torchvision: to_tensor (x / 255) then GeneralizedRCNNTransform.normalize, NCHW float32."""
  import torch
  x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(0, 3, 1, 2).to(torch.float32) / 255.0
  mean = torch.tensor([0.485, 0.456, 0.406])[None, :, None, None]
  std = torch.tensor([0.229, 0.224, 0.225])[None, :, None, None]
  return (x - mean) / std


def d2_input(model, rgb: np.ndarray):
  """detectron2: BGR 0-255 CHW images through GeneralizedRCNN.preprocess_image, NCHW."""
  import torch
  images = [{"image": torch.from_numpy(np.ascontiguousarray(im[:, :, ::-1].transpose(2, 0, 1)))}
            for im in rgb]
  return model.preprocess_image(images).tensor


# ----------------------------------------------------------------------------- models
def tv_model():
  import torchvision
  from torchvision.ops import misc as misc_nn_ops
  # torchvision/models/detection/mask_rcnn.py with weights_backbone: FrozenBatchNorm2d (eps 1e-5).
  return torchvision.models.resnet50(weights=None, norm_layer=misc_nn_ops.FrozenBatchNorm2d).eval()


def tv_stages(model, x) -> dict:
  out = {}
  x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
  for i, stage in enumerate(STAGES):
    x = getattr(model, f"layer{i + 1}")(x)
    out[stage] = x
  return out


def bn_targets(name: str, m, v, c):
  """The calibrated BN of one layer: statistics from the activations, perturbed, and affine."""
  r = rng_for("bn", name)
  rm = m + 0.1 * np.sqrt(v) * r.standard_normal(c)
  rv = v * r.uniform(0.5, 2.0, c)
  return rm, rv, r.uniform(0.5, 1.5, c), 0.1 * r.standard_normal(c)


def channel_stats(x):
  x = x.double()
  return x.mean((0, 2, 3)).numpy(), x.var((0, 2, 3), unbiased=False).clamp_min(1e-12).numpy()


def calibrate(model, modules: dict, run, finish) -> dict:
  """Pre-hooks on each norm (in forward order) set its values from the activations it sees;
  `finish(module, name, rm, rv, w, b)` writes them and returns the fixture's 1-D entries."""
  import torch
  overrides = {}
  hooks = []
  for name, mod in modules.items():
    def hook(mod, inp, name=name):
      m, v = channel_stats(inp[0])
      overrides.update(finish(mod, name, *bn_targets(name, m, v, m.shape[0])))
    hooks.append(mod.register_forward_pre_hook(hook))
  with torch.no_grad():
    run()
  for h in hooks:
    h.remove()
  return overrides


def tv_weights(keys, overrides=None):
  """The torchvision state dict: seeded convs / fc, calibrated 1-D tensors."""
  import torch
  sd = synthetic().seeded_state_dict(keys, SEED["tv"], overrides=overrides)
  return collections.OrderedDict((k, torch.from_numpy(np.ascontiguousarray(v)))
                                 for k, v in sd.items())


def c2_blobs(keys, overrides):
  sd = synthetic().seeded_state_dict(keys, SEED["d2"], overrides=overrides)
  return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()}


def make_tv(keys):
  """Calibrated torchvision resnet50: (model loaded from its .pth, file bytes, 1-D entries)."""
  import torch
  from torchvision.ops import misc as misc_nn_ops
  model = tv_model()
  one_d = {k: np.zeros(s, np.float32) for k, s, _ in keys if len(s) == 1}
  one_d.update({k: np.ones(s, np.float32) for k, s, _ in keys
                if len(s) == 1 and k.endswith(("running_var", ".weight"))})
  one_d["fc.bias"] = (0.01 * rng_for("fc.bias").standard_normal(1000)).astype(np.float32)
  model.load_state_dict(tv_weights(keys, one_d))
  norms = {n: m for n, m in model.named_modules() if isinstance(m, misc_nn_ops.FrozenBatchNorm2d)}

  def finish(mod, name, rm, rv, w, b):
    vals = {"running_mean": rm, "running_var": rv, "weight": w, "bias": b}
    out = {}
    for leaf, val in vals.items():
      arr = val.astype(np.float32)
      getattr(mod, leaf).copy_(torch.from_numpy(arr))
      out[f"{name}.{leaf}"] = arr
    return out

  x = tv_input(calib_rgb())
  one_d.update(calibrate(model, norms, lambda: tv_stages(model, x), finish))
  return one_d


def load_tv(keys, one_d):
  import torch
  buf = io.BytesIO()
  torch.save(tv_weights(keys, one_d), buf)
  model = tv_model()
  model.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), map_location="cpu"))
  return model, buf.getvalue()


def make_d2(keys):
  """Calibrated detectron2 R-50 Caffe2 blobs: the 1-D entries (`_bn_s`, `_bn_b`, classifier)."""
  import torch
  from detectron2.layers import FrozenBatchNorm2d
  one_d = {k: np.zeros(s, np.float32) for k, s, _ in keys if len(s) == 1}
  one_d.update({k: np.ones(s, np.float32) for k, s, _ in keys if k.endswith("_bn_s")})
  # The MSRA files' stem conv bias is ~1e-9 (unused); the classifier bias is arbitrary here.
  one_d["conv1_b"] = (1e-9 * rng_for("conv1_b").standard_normal(64)).astype(np.float32)
  one_d["fc1000_b"] = (0.01 * rng_for("fc1000_b").standard_normal(1000)).astype(np.float32)
  model, _ = load_d2(keys, one_d)
  bottom_up = model.backbone.bottom_up
  norms = {n: m for n, m in bottom_up.named_modules() if isinstance(m, FrozenBatchNorm2d)}

  def finish(mod, name, rm, rv, w, b):
    # A Caffe2 file stores the BN folded into an affine: s = w / sqrt(var + eps), b - mean * s;
    # detectron2 then runs it with mean 0, var 1 (and its eps, a 5e-6 relative scale).
    s = (w / np.sqrt(rv + EPS)).astype(np.float32)
    bias = (b - rm * s).astype(np.float32)
    mod.weight.copy_(torch.from_numpy(s))
    mod.bias.copy_(torch.from_numpy(bias))
    prefix = c2_name(name + ".weight")[:-len("_s")]
    return {prefix + "_s": s, prefix + "_b": bias}

  x = d2_input(model, calib_rgb())
  one_d.update(calibrate(model, norms, lambda: bottom_up(x), finish))
  return one_d


def load_d2(keys, one_d):
  """A fresh detectron2 Mask R-CNN R-50-FPN whose backbone is loaded from the C2 pickle by
  DetectionCheckpointer (C2 renaming, FrozenBN mean 0 / var 1); returns (model, file bytes)."""
  import tempfile
  from detectron2.checkpoint import DetectionCheckpointer
  raw = pickle.dumps(c2_blobs(keys, one_d), protocol=2)
  _, model = d2_bottom_up(D2_CONFIGS["R-50.pkl"])
  with tempfile.TemporaryDirectory() as d:
    path = Path(d) / "R-50.pkl"
    path.write_bytes(raw)
    DetectionCheckpointer(model).load(str(path))
  return model.eval(), raw


# ----------------------------------------------------------------------------- recording
def record(prefix: str, x, feats: dict) -> dict:
  out = {}
  xin = x[0].permute(1, 2, 0).numpy()
  pos = tvfix().sample_positions(rng_for(prefix, "input"), xin.shape, N_SAMPLE)
  out[prefix + "input/sample_yxc"] = pos
  out[prefix + "input/sample_values"] = xin[pos[:, 0], pos[:, 1], pos[:, 2]].astype(np.float32)
  for stage in STAGES:
    f = feats[stage][0].permute(1, 2, 0).numpy()
    q = f"{prefix}{stage}/"
    out[q + "hw"] = np.array(f.shape[:2], np.int32)
    out[q + "channel_mean"] = f.astype(np.float64).mean((0, 1)).astype(np.float32)
    pos = tvfix().sample_positions(rng_for(prefix, stage), f.shape, N_SAMPLE)
    out[q + "sample_yxc"] = pos
    out[q + "sample_values"] = f[pos[:, 0], pos[:, 1], pos[:, 2]].astype(np.float32)
    print(f"  {prefix}{stage}: {f.shape} mean {f.mean():.3f} std {f.std():.3f} "
          f"zero fraction {(f == 0).mean():.2f}")
  return out


def run_tv(keys, one_d, rgb):
  import torch
  model, raw = load_tv(keys, one_d)
  x = tv_input(rgb[None])
  with torch.no_grad():
    return x, tv_stages(model, x), raw


def run_d2(keys, one_d, rgb):
  import torch
  model, raw = load_d2(keys, one_d)
  x = d2_input(model, rgb[None])
  with torch.no_grad():
    return x, model.backbone.bottom_up(x), raw


def cmd_features(args) -> None:
  import torch
  import torchvision
  import detectron2
  from PIL import Image
  torch.set_num_threads(1)
  syn = synthetic()
  keys = {"tv": syn.read_key_tsv(str(KEYS_DIR / "imagenet_resnet50-0676ba61.pth.tsv")),
          "d2": syn.read_key_tsv(str(KEYS_DIR / "imagenet_R-50.pkl.tsv"))}
  rgb = photo_rgb()
  if args.float64:
    # The references' own float32 error: the same run in float64, max |f32 - f64| / max |f64|.
    fx = dict(np.load(OUT_NPZ))
    for m in ("tv", "d2"):
      one_d = {k: fx[f"{m}/w/{k}"] for k, s, _ in keys[m] if len(s) == 1}
      if m == "tv":
        model, _ = load_tv(keys[m], one_d)
        x = tv_input(rgb[None])
        run = lambda mdl, y: tv_stages(mdl, y)
      else:
        model, _ = load_d2(keys[m], one_d)
        x = d2_input(model, rgb[None])
        model = model.backbone.bottom_up
        run = lambda mdl, y: mdl(y)
      with torch.no_grad():
        f32 = run(model, x)
        f64 = run(model.double(), x.double())
      for stage in STAGES:
        a, b = f32[stage].numpy(), f64[stage].numpy()
        print(f"{m} {stage}: float32 vs float64 max rel {np.abs(a - b).max() / np.abs(b).max():.1e}")
    return
  if args.verify_only:
    fx = dict(np.load(OUT_NPZ))
    stored = np.asarray(Image.open(PHOTO).convert("RGB"))
    assert np.array_equal(stored, rgb), "the stored photograph is not skimage's coffee crop"
    for m in ("tv", "d2"):
      one_d = {k: fx[f"{m}/w/{k}"] for k, s, _ in keys[m] if len(s) == 1}
      x, feats, _ = (run_tv if m == "tv" else run_d2)(keys[m], one_d, rgb)
      got = record(f"{m}/", x, feats)
      for k, v in got.items():
        assert np.array_equal(v, fx[k]), f"{k} differs from the fixture"
    print("verified: the fixture regenerates bit-identical reference outputs")
    return
  PHOTO.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(rgb).save(PHOTO, optimize=True)
  print(f"wrote {PHOTO.relative_to(REPO)} {rgb.shape}")
  out = {"versions": np.array(json.dumps({
      "torch": torch.__version__, "torchvision": torchvision.__version__,
      "detectron2": detectron2.__version__, "numpy": np.__version__})),
         "image_file": np.array(str(PHOTO.relative_to(REPO / "tests" / "fixtures"))),
         "image_sha256": np.array(hashlib.sha256(rgb.tobytes()).hexdigest()),
         "calibration_images": np.array(CALIB_IMAGES)}
  for m, make, run in (("tv", make_tv, run_tv), ("d2", make_d2, run_d2)):
    print(f"[{m}] calibrating", flush=True)
    one_d = make(keys[m])
    x, feats, raw = run(keys[m], one_d, rgb)
    out[f"{m}/seed"] = np.array(SEED[m], np.int64)
    out[f"{m}/file_bytes"] = np.array(len(raw), np.int64)
    for k, s, _ in keys[m]:
      if len(s) == 1:
        out[f"{m}/w/{k}"] = np.asarray(one_d[k], np.float32)
    out.update(record(f"{m}/", x, feats))
  tvfix().write_npz(OUT_NPZ, out)
  print(f"wrote {OUT_NPZ.relative_to(REPO)} ({OUT_NPZ.stat().st_size / 1e6:.2f} MB)")


# ----------------------------------------------------------------------------- narrow files
NARROW = dict(stem=8, width_per_group=2, res2_out=8, blocks=(3, 4, 6, 3))


def narrow_keys(naming: str) -> list:
  """ResNet-50 topology at NARROW widths, in torchvision or Caffe2 names (torch layouts)."""
  stem, out0 = NARROW["stem"], NARROW["res2_out"]
  keys = []

  def conv(name, o, i, k):
    keys.append((name, (o, i, k, k), "float32"))

  def norm(prefix, c):
    leaves = (("weight", "bias", "running_mean", "running_var") if naming == "tv" else ("s", "b"))
    for leaf in leaves:
      keys.append(((f"{prefix}.{leaf}" if naming == "tv" else f"{prefix}_{leaf}"), (c,), "float32"))
    if naming == "tv":
      keys.append((f"{prefix}.num_batches_tracked", (), "int64"))

  conv("conv1.weight" if naming == "tv" else "conv1_w", stem, 3, 7)
  norm("bn1" if naming == "tv" else "res_conv1_bn", stem)
  cin = stem
  for i, n in enumerate(NARROW["blocks"]):
    w, cout = NARROW["width_per_group"] * 2**i, out0 * 2**i
    for b in range(n):
      tv, c2 = f"layer{i + 1}.{b}", f"res{i + 2}_{b}"
      for k, (ci, co, ks) in enumerate(((cin, w, 1), (w, w, 3), (w, cout, 1)), 1):
        branch = f"{c2}_branch2{'abc'[k - 1]}"
        conv(f"{tv}.conv{k}.weight" if naming == "tv" else f"{branch}_w", co, ci, ks)
        norm(f"{tv}.bn{k}" if naming == "tv" else f"{branch}_bn", co)
      if b == 0:
        conv(f"{tv}.downsample.0.weight" if naming == "tv" else f"{c2}_branch1_w", cout, cin, 1)
        norm(f"{tv}.downsample.1" if naming == "tv" else f"{c2}_branch1_bn", cout)
      cin = cout
  if naming == "tv":
    keys += [("fc.weight", (10, cin), "float32"), ("fc.bias", (10,), "float32")]
  else:
    keys += [("conv1_b", (stem,), "float32"), ("fc1000_w", (10, cin), "float32"),
             ("fc1000_b", (10,), "float32")]
  return keys


def narrow_state(keys) -> dict:
  scales = {n: 0.1 for n, s, _ in keys if len(s) == 1}
  return synthetic().seeded_state_dict(keys, NARROW_SEED, scales=scales)


def cmd_narrow(_args) -> None:
  import torch
  PTH_DIR.mkdir(parents=True, exist_ok=True)
  sd = narrow_state(narrow_keys("tv"))
  path = PTH_DIR / "imagenet_narrow_resnet50.pth"
  torch.save(collections.OrderedDict((k, torch.from_numpy(np.ascontiguousarray(v)))
                                     for k, v in sd.items()), path)
  print(f"wrote {path.relative_to(REPO)} ({path.stat().st_size} bytes)")
  blobs = {k: np.ascontiguousarray(v) for k, v in narrow_state(narrow_keys("c2")).items()}
  path = PTH_DIR / "imagenet_narrow_R-50.pkl"
  path.write_bytes(pickle.dumps(blobs, protocol=2))
  print(f"wrote {path.relative_to(REPO)} ({path.stat().st_size} bytes)")


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("what", choices=("keys", "features", "narrow", "all"))
  p.add_argument("--verify-only", action="store_true")
  p.add_argument("--float64", action="store_true",
                 help="features: report the references' float32 error against float64")
  args = p.parse_args(argv)
  for name, fn in (("keys", cmd_keys), ("narrow", cmd_narrow), ("features", cmd_features)):
    if args.what in (name, "all"):
      fn(args)


if __name__ == "__main__":
  sys.exit(main())
