"""The prediction CLI end to end: converted checkpoint -> predictions.json + drawn PNG per image."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from maskrcnn_jax import config_lib, predict
from maskrcnn_jax.checkpoints import conversion
from maskrcnn_jax.checkpoints import orbax_io
from tests import synthetic_weights as synthetic
from maskrcnn_jax.data import transforms

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "parity_torchvision.npz"
KEYS = ROOT / "tests" / "fixtures" / "checkpoint_keys" / "torchvision_maskrcnn_resnet50_fpn_v1.tsv"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """The calibrated torchvision weights of the parity fixture, converted to an orbax checkpoint."""
  fx = np.load(FIXTURE)
  state = synthetic.state_dict_from_fixture(fx, synthetic.read_key_tsv(KEYS))
  config = config_lib.load_config_file(str(ROOT / "configs/torchvision/maskrcnn_resnet50_fpn.py"))
  config.data.test_short = 320  # small and fast; the parity test covers the full size
  config.data.test_max_size = 533
  variables, _ = conversion.convert_state_dict(config, state)
  out = tmp_path_factory.mktemp("ckpt")
  orbax_io.save_variables(str(out), variables, config)
  image = tmp_path_factory.mktemp("images") / "astronaut.png"
  Image.fromarray(fx["astronaut/image"]).save(image)
  return config, str(out), image


def test_predict_writes_coco_results_and_drawings(checkpoint, tmp_path):
  config, ckpt, image = checkpoint
  results = predict.predict(config, ckpt, str(tmp_path), [str(image)], draw_threshold=0.3)
  with open(tmp_path / "predictions.json") as f:
    written = json.load(f)
  assert written == json.loads(json.dumps(results)) and len(written) > 0
  h, w = 512, 512
  for r in written:
    assert r["file_name"] == "astronaut.png"
    assert 1 <= r["category_id"] <= 90
    x, y, bw, bh = r["bbox"]
    assert 0 <= x and 0 <= y and x + bw <= w + 1e-3 and y + bh <= h + 1e-3
    assert isinstance(r["segmentation"]["counts"], str)
    assert r["segmentation"]["size"] == [h, w]
    assert mask_util.decode({"size": [h, w], "counts": r["segmentation"]["counts"].encode()}).shape == (h, w)
  scores = [r["score"] for r in written]
  assert scores == sorted(scores, reverse=True) and min(scores) > 0.05
  drawn = np.asarray(Image.open(tmp_path / "astronaut.png"))
  assert drawn.shape == (h, w, 3)
  assert not np.array_equal(drawn, np.asarray(Image.open(image)))  # something was drawn


def test_missing_or_corrupt_image_is_named(checkpoint, tmp_path):
  config, ckpt, image = checkpoint
  missing = tmp_path / "nope.jpg"
  with pytest.raises(transforms.ImageReadError, match="nope.jpg"):
    predict.predict(config, ckpt, str(tmp_path / "out"), [str(image), str(missing)])
  corrupt = tmp_path / "broken.jpg"
  corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  with pytest.raises(transforms.ImageReadError, match="broken.jpg"):
    predict.predict(config, ckpt, str(tmp_path / "out"), [str(corrupt)])
  assert not (tmp_path / "out" / "predictions.json").exists()
