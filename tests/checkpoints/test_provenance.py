"""The constants a checkpoint decides (BatchNorm eps): per framework, recorded, read back.

torchvision's builder sets the eps to 0 only for its released COCO_V1 weights (`overwrite_eps`);
every other torchvision checkpoint (weights=None, ImageNet backbone, the v2 model) ran with 1e-5,
as did every detectron2 one; mmdet reads it from `norm_cfg` (stored in the checkpoint's meta).
"""
from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import ml_collections
import pytest

from maskrcnn_jax import config_lib
from maskrcnn_jax.checkpoints import conversion
from maskrcnn_jax.checkpoints import orbax_io, provenance
from tests import synthetic_weights as synthetic
from maskrcnn_jax.modeling.mask_rcnn import ModelConfig
from maskrcnn_jax.training import checkpointing

ROOT = Path(__file__).resolve().parents[2]
KEYS = ROOT / "tests" / "fixtures" / "checkpoint_keys"


def recipe(name: str) -> ml_collections.ConfigDict:
  return config_lib.load_config_file(str(ROOT / "configs" / f"{name}.py"))


def test_torchvision_coco_v1_file_by_name_else_default():
  d = provenance.norm_eps("torchvision", source="downloads/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth")
  assert d.value == 0.0 and "COCO_V1" in d.reason
  for other in ("my_maskrcnn.pth", "model_final.pth", None):
    assert provenance.norm_eps("torchvision", source=other).value == 1e-5
  # The v2 model never had its eps overwritten, whatever the file is called.
  assert provenance.norm_eps("torchvision", torchvision_v2=True,
                             source=provenance.TORCHVISION_COCO_V1_FILE).value == 1e-5


def test_torchvision_coco_v1_file_by_content(tmp_path, monkeypatch):
  """A renamed COCO_V1 file is recognised by its sha256 (torchvision's name suffix)."""
  f = tmp_path / "renamed.pth"
  f.write_bytes(b"pretend this is the released file")
  prefix = hashlib.sha256(f.read_bytes()).hexdigest()[:8]
  assert provenance.norm_eps("torchvision", source=str(f)).value == 1e-5
  monkeypatch.setattr(provenance, "TORCHVISION_COCO_V1_SHA256_PREFIX", prefix)
  assert provenance.norm_eps("torchvision", source=str(f)).value == 0.0


def test_detectron2_and_mmdet():
  assert provenance.norm_eps("detectron2", source="model_final_f10217.pkl").value == 1e-5
  assert provenance.norm_eps("mmdet", meta={"meta": None}).value == 1e-5
  text = ("model = dict(backbone=dict(type='ResNet', norm_cfg=dict(type='BN', "
          "requires_grad=False, eps=0.001), style='caffe'))")
  assert provenance.norm_eps("mmdet", meta={"meta": {"config": text}}).value == 0.001
  assert provenance.norm_eps("mmdet", meta={"meta": {"cfg": "norm_cfg=dict(type='BN')"}}
                             ).value == 1e-5
  with pytest.raises(ValueError, match="several BatchNorm eps"):
    provenance.mmdet_config_eps({"config": "norm_cfg=dict(eps=1e-3) norm_cfg=dict(eps=1e-4)"})


def test_recipes_leave_the_eps_to_the_checkpoint():
  config = recipe("torchvision/maskrcnn_resnet50_fpn")
  assert config.model.norm_eps is None
  # Training from scratch / no checkpoint: the convention's default.
  assert ModelConfig.from_config(config).norm_eps == 1e-5
  coco, notes = provenance.decide(config, source=provenance.TORCHVISION_COCO_V1_FILE)
  assert coco.model.norm_eps == 0.0 and ModelConfig.from_config(coco).norm_eps == 0.0
  assert len(notes) == 1 and "COCO_V1" in notes[0]
  own, _ = provenance.decide(config, source="my_maskrcnn.pth")
  assert own.model.norm_eps == 1e-5
  assert config.model.norm_eps is None  # decide() returns a copy


def test_explicit_value_wins_and_is_noted():
  config = recipe("torchvision/maskrcnn_resnet50_fpn")
  config.model.norm_eps = 1e-5
  resolved, notes = provenance.decide(config, source=provenance.TORCHVISION_COCO_V1_FILE)
  assert resolved.model.norm_eps == 1e-5
  assert len(notes) == 1 and "as given" in notes[0]


def test_recorded_value_is_adopted():
  """predict / evaluate / config.init read what the converter recorded in config.json."""
  config = recipe("torchvision/maskrcnn_resnet50_fpn")
  recorded = ml_collections.ConfigDict({"model": {"norm_eps": 0.0}})
  resolved, _ = provenance.decide(config, recorded=recorded)
  assert resolved.model.norm_eps == 0.0
  nothing, notes = provenance.decide(config, recorded=ml_collections.ConfigDict({"model": {}}))
  assert nothing.model.norm_eps is None and not notes


def test_converter_records_the_eps_and_init_reads_it(tmp_path):
  """convert() writes the decided eps into config.json; training from that directory adopts it."""
  keys = synthetic.read_key_tsv(KEYS / "detectron2_mask_rcnn_R_50_FPN_3x.tsv")
  state = synthetic.seeded_state_dict(keys, seed=3)
  src = tmp_path / "model_final.pkl"
  with open(src, "wb") as f:
    pickle.dump({"model": state, "__author__": "test", "matching_heuristics": True}, f)
  config = recipe("detectron2/mask_rcnn_R_50_FPN_3x")
  _, summary, resolved = conversion.convert_file(config, str(src), str(tmp_path / "out"))
  assert resolved.model.norm_eps == 1e-5 and "norm_eps = 1e-05" in summary
  saved = orbax_io.load_saved_config(str(tmp_path / "out"))
  assert saved.model.norm_eps == 1e-5
  with open(tmp_path / "out" / "conversion.txt") as f:
    assert "norm_eps" in f.read()
  # A converted directory that recorded another eps (e.g. a COCO_V1 conversion) is followed.
  saved.model.norm_eps = 0.0
  with open(tmp_path / "out" / "config.json", "w") as f:
    f.write(saved.to_json())
  config.init = str(tmp_path / "out")
  from_init, notes = checkpointing.init_settings(config)
  assert from_init.model.norm_eps == 0.0 and notes
  config.init = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="config.init"):
    checkpointing.init_settings(config)
