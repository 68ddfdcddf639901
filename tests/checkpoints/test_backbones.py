"""ImageNet backbone files (config.model.backbone_init): catalogue, names, conventions, errors.

Key lists: tests/fixtures/checkpoint_keys/imagenet_<published file>.tsv, written by
scripts/make_backbone_fixtures.py from the real packages (torchvision's state_dict(), detectron2's
ResNet in Caffe2 names checked with its own `convert_basic_c2_names`, mmdetection's ResNeXt) or
their documented layouts (mmdetection's detectron2pytorch.py). Each one is converted onto every
recipe that names it, with the model's own variable shapes (jax.eval_shape).
"""
from __future__ import annotations

import glob
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from maskrcnn_jax import config_lib
from maskrcnn_jax.checkpoints import backbones, diagnose, name_maps, torch_reader
from tests import synthetic_weights as synthetic
from maskrcnn_jax.modeling.build import build_model, variable_shapes
from maskrcnn_jax.training import checkpointing

ROOT = Path(__file__).resolve().parents[2]
KEYS = ROOT / "tests" / "fixtures" / "checkpoint_keys"
PTH = ROOT / "tests" / "fixtures" / "pth"
RECIPES = {os.path.relpath(p, ROOT): config_lib.load_config_file(p)
           for p in sorted(glob.glob(str(ROOT / "configs" / "*" / "*.py")))}
R50_C2 = "imagenet_R-50.pkl.tsv"


def keys_of(entry: backbones.ImageNetBackbone) -> list:
  return synthetic.read_key_tsv(KEYS / f"imagenet_{entry.files[0]}.tsv")


def state_of(entry, seed: int = 0, stats: bool = False) -> dict:
  """Seeded values for the entry's key list; `stats`: 1-D tensors random too (weight 1 + 0.1 z,
  running_var exp(0.1 z), ...) instead of the norm defaults."""
  keys = keys_of(entry)
  scales = {n: 0.1 for n, s, _ in keys if len(s) == 1} if stats else None
  return synthetic.seeded_state_dict(keys, seed, scales=scales)


_SHAPES: dict = {}


def backbone_shapes(config) -> dict:
  """The recipe model's variables under 'backbone' / 'roi_res5' (computed once per backbone)."""
  m = config.model
  key = tuple(m[k] for k in ("depth", "groups", "width_per_group", "stride_in_1x1", "arch",
                             "stem_out_channels", "res2_out_channels"))
  if key not in _SHAPES:
    _SHAPES[key] = {p: s for p, s in variable_shapes(build_model(config)).items()
                    if p[1] in checkpointing.BACKBONE_MODULES}
  return _SHAPES[key]


def convert(state, config, source="file"):
  mapping = name_maps.map_backbone(state, depth=int(config.model.depth), arch=config.model.arch)
  diagnose.check_backbone(mapping, backbone_shapes(config), depth=int(config.model.depth),
                           state_keys=list(state), source=source)
  return mapping


def config_with(recipe: str, **model):
  config = config_lib.load_config_file(str(ROOT / recipe))
  config.model.update(model)
  return config


# ---------------------------------------------------------------------------------------------
# The catalogue and the recipes.


def test_every_recipe_names_a_catalogued_backbone_of_its_pixel_convention():
  """Each recipe's backbone_init is its upstream config's (mmdet init_cfg / pretrained, detectron2
  MODEL.WEIGHTS, torchvision --weights-backbone), and the file's network and pixels are the
  recipe's. torchvision v2 was trained from scratch (pytorch/vision PR 5773 passes no
  --weights-backbone)."""
  expected = {
      "mmdet/mask_rcnn_r50_fpn": "torchvision://resnet50",
      "mmdet/mask_rcnn_r101_fpn": "torchvision://resnet101",
      "mmdet/mask_rcnn_r50_caffe": "open-mmlab://detectron2/resnet50_caffe",
      "mmdet/mask_rcnn_r101_caffe": "open-mmlab://detectron2/resnet101_caffe",
      "mmdet/ms_rcnn_r50_caffe": "open-mmlab://detectron2/resnet50_caffe",
      "mmdet/ms_rcnn_r101_caffe": "open-mmlab://detectron2/resnet101_caffe",
      "mmdet/mask_rcnn_x101_32x4d": "open-mmlab://resnext101_32x4d",
      "mmdet/ms_rcnn_x101_32x4d": "open-mmlab://resnext101_32x4d",
      "mmdet/mask_rcnn_x101_64x4d": "open-mmlab://resnext101_64x4d",
      "mmdet/ms_rcnn_x101_64x4d": "open-mmlab://resnext101_64x4d",
      "mmdet/mask_rcnn_x101_32x8d": "open-mmlab://detectron2/resnext101_32x8d",
      "detectron2/mask_rcnn_R_50": "detectron2://ImageNetPretrained/MSRA/R-50.pkl",
      "detectron2/mask_rcnn_R_101": "detectron2://ImageNetPretrained/MSRA/R-101.pkl",
      "detectron2/mask_rcnn_X_101_32x8d": "detectron2://ImageNetPretrained/FAIR/X-101-32x8d.pkl",
      "torchvision/maskrcnn_resnet50_fpn.py": "ResNet50_Weights.IMAGENET1K_V1",
      "torchvision/maskrcnn_resnet50_fpn_v2": "",
  }
  assert len(RECIPES) == 40
  for path, config in RECIPES.items():
    rel = path[len("configs/"):]
    want = [v for prefix, v in expected.items() if rel.startswith(prefix)]
    assert len(want) == 1, rel
    assert config.model.backbone_init == want[0], rel
    if not want[0]:
      assert config.model.norm == "bn" and config.model.freeze_at == 0, rel  # from scratch
      continue
    entry = backbones.CATALOG[want[0]]
    backbones.check_network(entry, config.model, what=rel)
    backbones.check_convention(entry.convention, config.model, what=rel)
  quickstart = config_lib.load_config_file(str(ROOT / "configs" / "quickstart.py"))
  assert quickstart.model.backbone_init == ""  # trains from scratch by design


def test_catalogue_entries():
  assert len(backbones.CATALOG) == 13
  for entry in backbones.CATALOG.values():
    assert entry.url.endswith("/" + entry.files[0]), entry.id
    assert entry.url.startswith(("https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/",
                                 "https://download.pytorch.org/models/",
                                 "https://download.openmmlab.com/pretrain/third_party/"))
    assert backbones.lookup(entry.id) is entry
    assert backbones.lookup("/some/dir/" + entry.files[-1]).convention == entry.convention
    # The key list has the catalogue's network and naming.
    state = {n: np.zeros(s, np.float32) for n, s, _ in keys_of(entry)}
    assert name_maps.backbone_naming(state) == entry.naming, entry.id
    assert name_maps._file_depth(state, entry.naming) == entry.depth, entry.id
  assert backbones.lookup("resnet50-19c8e357.pth").id == "torchvision://resnet50"  # 2020 name
  assert backbones.lookup("unknown.pth") is None


def zero_state(entry) -> dict:
  """The entry's keys and shapes, zeros (numpy allocates them lazily: cheap for R-101)."""
  return {n: np.zeros(s, np.int64 if "int" in d else np.float32) for n, s, d in keys_of(entry)}


@pytest.mark.parametrize("recipe", sorted(r for r, c in RECIPES.items() if c.model.backbone_init))
def test_recipe_backbone_key_list_converts_with_checked_shapes(recipe):
  """The recipe's ImageNet key list fills every backbone variable of its model (C4: res5 in the
  RoI head) with the model's shapes; the FPN and heads, absent from the file, are not asked for."""
  config = RECIPES[recipe]
  entry = backbones.CATALOG[config.model.backbone_init]
  mapping = convert(zero_state(entry), config, entry.files[0])
  flat = name_maps.flatten_variables(mapping.variables)
  assert set(flat) == set(backbone_shapes(config))
  assert {p[1] for p in flat} == ({"backbone", "roi_res5"} if config.model.arch == "C4"
                                  else {"backbone"})
  norms = sum(1 for p in flat if p[-1] == "var")
  assert len(mapping.filled) == (norms if entry.naming == "c2" else 0)
  for reason in {r for _, r in mapping.dropped}:
    assert reason in ("ImageNet classifier", "BatchNorm step counter",
                      "bias of a bias-free conv, unused by detectron2 and mmdetection too")


@pytest.mark.parametrize("file_id,recipe", [
    ("detectron2://ImageNetPretrained/MSRA/R-50.pkl", "configs/detectron2/mask_rcnn_R_50_C4_1x.py"),
    ("torchvision://resnet50", "configs/mmdet/mask_rcnn_r50_fpn_1x_coco.py"),
    ("open-mmlab://detectron2/resnet50_caffe", "configs/mmdet/ms_rcnn_r50_caffe_fpn_1x_coco.py")])
def test_converted_values(file_id, recipe):
  """Values: conv (O, I/g, kh, kw) -> HWIO, norm vectors as they are; statistics filled (mean 0,
  var 1) exactly where the file has none."""
  entry = backbones.CATALOG[file_id]
  state = state_of(entry, seed=1, stats=True)
  mapping = convert(state, RECIPES[recipe], entry.files[0])
  flat = name_maps.flatten_variables(mapping.variables)
  for path, key in mapping.sources.items():
    src = state[key]
    np.testing.assert_array_equal(flat[path], src.transpose(2, 3, 1, 0) if src.ndim == 4 else src,
                                  err_msg=key)
  filled = [p for p in flat if p[0] == "batch_stats" and p not in mapping.sources]
  assert len(filled) == (2 * len(mapping.filled)) == (106 if entry.naming == "c2" else 0)
  for p in filled:
    np.testing.assert_array_equal(flat[p], 0.0 if p[-1] == "mean" else 1.0)


@pytest.mark.parametrize("file_id", ["ResNet101_Weights.IMAGENET1K_V1",
                                     "ResNeXt101_32X8D_Weights.IMAGENET1K_V1"])
def test_catalogued_files_no_recipe_uses_convert(file_id):
  entry = backbones.CATALOG[file_id]
  config = config_lib.mask_rcnn(convention="torchvision", depth=entry.depth, groups=entry.groups,
                                width_per_group=entry.width_per_group, style="pytorch",
                                pixel=config_lib.TORCHVISION_RGB01, backbone_init=file_id)
  convert(state_of(entry), config, entry.files[0])
  backbones.check_convention(entry.convention, config.model, what=file_id)


def test_caffe2_names_follow_detectron2():
  """C2 blob name -> detectron2 name (convert_basic_c2_names' rules) and back, for every key of
  the three detectron2 files; classifier keys map to the modules that are dropped."""
  for name in ("R-50.pkl", "R-101.pkl", "X-101-32x8d.pkl"):
    for key, _, _ in synthetic.read_key_tsv(KEYS / f"imagenet_{name}.tsv"):
      d2 = name_maps.c2_to_detectron2_name(key)
      if key.startswith("fc1000_"):
        assert d2 in ("fc1000.weight", "fc1000.bias")
      else:
        assert name_maps.detectron2_to_c2_name(d2) == key
  assert name_maps.c2_to_detectron2_name("res_conv1_bn_s") == "stem.conv1.norm.weight"
  assert name_maps.c2_to_detectron2_name("res3_0_branch1_bn_riv") == (
      "res3.0.shortcut.norm.running_var")
  assert name_maps.c2_to_detectron2_name("res4_5_branch2b_w") == "res4.5.conv2.weight"
  assert name_maps.c2_to_detectron2_name("pred_w") == "linear.weight"


def test_detectron2_names_and_caffe2_statistics():
  """A torchvision file converted with detectron2's tools/convert-torchvision-to-d2.py (d2 names,
  `stem.fc.*`) loads like the original; C2 files with `_bn_rm` / `_bn_riv` keep them."""
  entry = backbones.CATALOG["torchvision://resnet50"]
  state = state_of(entry, seed=3, stats=True)
  d2 = {}
  for k, v in state.items():  # the conversion script's renaming rules
    n = k if "layer" in k else "stem." + k
    for t in (1, 2, 3, 4):
      n = n.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
      n = n.replace(f"bn{t}", f"conv{t}.norm")
    d2[n.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")] = v
  config = RECIPES["configs/mmdet/mask_rcnn_r50_fpn_1x_coco.py"]
  a = name_maps.flatten_variables(convert(state, config).variables)
  mapping = convert(d2, config)
  assert mapping.naming == "detectron2" and not mapping.filled
  b = name_maps.flatten_variables(mapping.variables)
  assert a.keys() == b.keys()
  for p in a:
    np.testing.assert_array_equal(a[p], b[p])
  c2 = state_of(backbones.CATALOG["detectron2://ImageNetPretrained/MSRA/R-50.pkl"])
  c2["res_conv1_bn_rm"] = np.full(64, 0.5, np.float32)
  c2["res_conv1_bn_riv"] = np.full(64, 2.0, np.float32)
  flat = name_maps.flatten_variables(convert(c2, RECIPES["configs/detectron2/"
                                                         "mask_rcnn_R_50_FPN_1x.py"]).variables)
  assert flat[("batch_stats", "backbone", "stem_norm", "var")][0] == 2.0
  assert flat[("batch_stats", "backbone", "res2_0", "norm1", "var")][0] == 1.0  # filled


# ---------------------------------------------------------------------------------------------
# Errors: one line, naming what is wrong.

D2_R50 = "configs/detectron2/mask_rcnn_R_50_FPN_1x.py"


def mismatch(state, config) -> str:
  with pytest.raises(name_maps.CheckpointMismatchError) as e:
    convert(state, config, "R-50.pkl")
  assert "\n" not in str(e.value)
  return str(e.value)


def test_missing_backbone_key_is_an_error_naming_it():
  state = state_of(backbones.CATALOG["detectron2://ImageNetPretrained/MSRA/R-50.pkl"])
  del state["res5_2_branch2c_bn_s"], state["res3_1_branch2b_w"]
  msg = mismatch(state, RECIPES[D2_R50])
  assert "2 backbone key(s) missing from the file" in msg
  assert "res5_2_branch2c_bn_s" in msg and "res3_1_branch2b_w" in msg
  tv = state_of(backbones.CATALOG["torchvision://resnet50"])
  del tv["layer4.2.bn3.running_var"]
  msg = mismatch(tv, RECIPES["configs/mmdet/mask_rcnn_r50_fpn_1x_coco.py"])
  assert "layer4.2.bn3.running_var" in msg and "one of the two statistics is missing" in msg


def test_unknown_key_other_depth_and_other_network_are_errors():
  config = RECIPES[D2_R50]
  state = state_of(backbones.CATALOG["detectron2://ImageNetPretrained/MSRA/R-50.pkl"])
  state["res5_0_branch3_w"] = np.zeros((4, 4, 1, 1), np.float32)
  assert "res5_0_branch3_w" in mismatch(state, config)
  r101 = state_of(backbones.CATALOG["detectron2://ImageNetPretrained/MSRA/R-101.pkl"])
  assert "blocks of a ResNet-101; model.depth is 50" in mismatch(r101, config)
  x101 = state_of(backbones.CATALOG["open-mmlab://resnext101_32x4d"])
  msg = mismatch(x101, config_with("configs/mmdet/mask_rcnn_r101_fpn_1x_coco.py"))
  assert "shape disagreement" in msg and "ResNeXt 32x4d" in msg
  with pytest.raises(name_maps.CheckpointMismatchError, match="config.init reads"):
    name_maps.backbone_naming({"backbone.bottom_up.res2.0.conv1.weight": 0,
                               "proposal_generator.rpn_head.conv.weight": 0})


def test_quickstart_resnet18_is_not_a_resnet50_file_target():
  """A bottleneck file onto a BasicBlock model: every mismatch named, nothing loaded silently."""
  config = config_lib.load_config_file(str(ROOT / "configs" / "quickstart.py"))
  shapes = {p: s for p, s in variable_shapes(build_model(config)).items() if p[1] == "backbone"}
  state = state_of(backbones.CATALOG["detectron2://ImageNetPretrained/MSRA/R-50.pkl"])
  mapping = name_maps.map_backbone(state, depth=50)
  with pytest.raises(name_maps.CheckpointMismatchError, match="the model does not have"):
    diagnose.check_backbone(mapping, shapes, depth=18)


# ---------------------------------------------------------------------------------------------
# Pixel conventions, resolution of the file, reading.


def test_pixel_convention_mismatch_is_refused():
  caffe = backbones.CATALOG["detectron2://ImageNetPretrained/MSRA/R-50.pkl"].convention
  pytorch_recipe = RECIPES["configs/mmdet/mask_rcnn_r50_fpn_1x_coco.py"].model
  with pytest.raises(backbones.BackboneInitError) as e:
    backbones.check_convention(caffe, pytorch_recipe, what="R-50.pkl")
  msg = str(e.value)
  assert "a caffe-style file (trained on BGR 0-255 minus (103.53, 116.28, 123.675) over (1, 1, 1)"\
      in msg and "the config feeds RGB" in msg and "disagree" in msg and "\n" not in msg
  tv = backbones.CATALOG["ResNet50_Weights.IMAGENET1K_V1"].convention
  with pytest.raises(backbones.BackboneInitError, match="pytorch-style file"):
    backbones.check_convention(tv, RECIPES[D2_R50].model, what="resnet50-0676ba61.pth")
  # The same pixels in another unit are the same convention (torchvision [0, 1] vs mmdet 0-255);
  # the stride placement is part of it.
  backbones.check_convention(tv, RECIPES["configs/torchvision/maskrcnn_resnet50_fpn.py"].model,
                             what="tv")
  backbones.check_convention(tv, pytorch_recipe, what="mmdet")
  caffe_pixels_pytorch_stride = config_with(D2_R50, stride_in_1x1=False).model
  with pytest.raises(backbones.BackboneInitError, match="stride in the 3x3 conv"):
    backbones.check_convention(caffe, caffe_pixels_pytorch_stride, what="R-50.pkl")


def test_convention_of_an_uncatalogued_file_from_its_contents():
  def conv(state):
    return backbones.file_convention("renamed.pkl", state, None)[0]

  assert conv(state_of(backbones.CATALOG["detectron2://ImageNetPretrained/MSRA/R-50.pkl"])) is (
      backbones.CAFFE_MSRA)
  assert conv(state_of(backbones.CATALOG["detectron2://ImageNetPretrained/FAIR/X-101-32x8d.pkl"])
              ) is backbones.C2_FAIR
  mmdet_c2 = state_of(backbones.CATALOG["open-mmlab://detectron2/resnet50_caffe"])
  for k in mmdet_c2:  # detectron2pytorch.py writes mean 0 / var 1
    if k.endswith("running_mean"):
      mmdet_c2[k] = np.zeros_like(mmdet_c2[k])
    if k.endswith("running_var"):
      mmdet_c2[k] = np.ones_like(mmdet_c2[k])
  assert conv(mmdet_c2) is backbones.CAFFE_MSRA
  assert conv(state_of(backbones.CATALOG["torchvision://resnet50"], stats=True)) is (
      backbones.PYTORCH)


def test_resolve_names_the_missing_file_and_its_link(tmp_path, monkeypatch):
  monkeypatch.setenv(backbones.ENV_VAR, str(tmp_path))
  with pytest.raises(backbones.BackboneInitError) as e:
    backbones.resolve("detectron2://ImageNetPretrained/MSRA/R-50.pkl")
  msg = str(e.value)
  assert "R-50.pkl" in msg and str(tmp_path) in msg and "\n" not in msg
  assert "https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/MSRA/R-50.pkl" in msg
  (tmp_path / "resnet50-19c8e357.pth").write_bytes(b"x")  # the 2020 name of the same weights
  path, entry = backbones.resolve("torchvision://resnet50")
  assert path == str(tmp_path / "resnet50-19c8e357.pth") and entry.depth == 50
  path, entry = backbones.resolve(path)  # a path: catalogued by its file name
  assert entry.id in ("torchvision://resnet50", "ResNet50_Weights.IMAGENET1K_V1")
  with pytest.raises(backbones.BackboneInitError, match="not a known upstream backbone"):
    backbones.resolve("torchvision://resnet18")
  with pytest.raises(backbones.BackboneInitError, match="no such file"):
    backbones.resolve(str(tmp_path / "nothing.pkl"))


NARROW = dict(depth=50, width_per_group=2, stem_out_channels=8, res2_out_channels=8)


@pytest.mark.parametrize("name,naming", [("imagenet_narrow_resnet50.pth", "torchvision"),
                                         ("imagenet_narrow_R-50.pkl", "c2")])
def test_narrow_files_are_read_without_torch(name, naming):
  """Real torch.save / pickle files (scripts/make_backbone_fixtures.py narrow): the torch-free
  reader returns the seeded values they were written from."""
  state, got_naming = backbones.read(str(PTH / name))
  assert got_naming == naming
  keys = [(k, v.shape, str(v.dtype)) for k, v in state.items()]
  want = synthetic.seeded_state_dict(
      keys, 20250103, scales={k: 0.1 for k, s, _ in keys if len(s) == 1})
  for k, v in state.items():
    np.testing.assert_array_equal(v, want[k], err_msg=k)
  assert ("conv1_b" in state) == (naming == "c2") and ("fc.weight" in state) == (naming != "c2")


def test_caffe2_blob_pickles(tmp_path):
  """detectron2 `_load_file`: a flat blob dict or a `blobs` entry; `*_momentum` dropped."""
  w = np.ones((2, 3), np.float32)
  for obj in ({"conv1_w": w, "conv1_w_momentum": w}, {"blobs": {"conv1_w": w}, "cfg": "x"}):
    path = tmp_path / "c2.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=2))
    state, meta = torch_reader.load_pkl(path, allow_caffe2=True)
    assert list(state) == ["conv1_w"] and meta["wrapper"] == "caffe2"
    with pytest.raises(torch_reader.CheckpointFormatError):
      torch_reader.load_pkl(path)  # detection checkpoints: `model` pickles only


def test_read_backbone_init_refuses_a_mismatched_recipe(tmp_path):
  """The whole path on a narrow C2 file: loads with a caffe config, refused (one line) with a
  pytorch-style one."""
  config = config_lib.mask_rcnn(convention="detectron2", style="caffe",
                                backbone_init=str(PTH / "imagenet_narrow_R-50.pkl"))
  config.model.update(NARROW)
  shapes = variable_shapes(build_model(config))
  loaded, summary = checkpointing.read_backbone_init(config, shapes)
  assert len(loaded) == 265 and "caffe style" in summary
  config.model.update(stride_in_1x1=False, to_rgb=True, pixel_mean=(123.675, 116.28, 103.53),
                      pixel_std=(58.395, 57.12, 57.375))
  with pytest.raises(backbones.BackboneInitError, match=r"imagenet_narrow_R-50.pkl has no "
                     r"BatchNorm statistics \(a Caffe2 model\)\): a caffe-style file"):
    checkpointing.read_backbone_init(config, shapes)


def test_train_cli_missing_file_exits_2_with_one_line(tmp_path):
  """`python -m maskrcnn_jax.train` with a recipe whose ImageNet file is not downloaded: status 2,
  one line on stderr naming the file and its link, before any data or compilation work."""
  env = dict(os.environ, PYTHONPATH=str(ROOT), MASKRCNN_JAX_PRETRAINED=str(tmp_path / "empty"))
  proc = subprocess.run(
      [sys.executable, "-m", "maskrcnn_jax.train",
       "--config", str(ROOT / "configs" / "detectron2" / "mask_rcnn_R_101_FPN_3x.py"),
       "--workdir", str(tmp_path / "w")], capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
  assert "R-101.pkl" in lines[0]
  assert "https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/MSRA/R-101.pkl" in lines[0]


def test_docs_list_every_recipe_backbone_with_its_link():
  zoo = (ROOT / "docs" / "model_zoo.md").read_text()
  training = (ROOT / "docs" / "training.md").read_text()
  assert "## Training a zoo recipe on COCO" in training
  for path, config in RECIPES.items():
    backbone_init = config.model.backbone_init
    if not backbone_init:
      continue
    entry = backbones.CATALOG[backbone_init]
    rows = [line for line in zoo.splitlines() if line.startswith(f"| `{backbone_init}` |")]
    assert len(rows) == 1, backbone_init
    assert f"[{entry.files[0]}]({entry.url})" in rows[0], backbone_init
    assert f"`{Path(path).stem}`" in rows[0], path
    assert entry.url in training, entry.url  # the download command's table
