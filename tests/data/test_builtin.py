"""The built-in shapes dataset: determinism, atomicity, content, COCOeval round trip."""
from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np
import pytest
from pycocotools import coco as coco_api
from pycocotools import cocoeval

from maskrcnn_jax.data import builtin
from maskrcnn_jax.data import coco

ARGS = dict(num_train=20, num_val=6, image_size=64, seed=3)


def _tree_bytes(root):
  out = {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      path = os.path.join(dirpath, f)
      with open(path, "rb") as fh:
        out[os.path.relpath(path, root)] = fh.read()
  return out


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
  return builtin.ensure_builtin_dataset(tmp_path_factory.mktemp("a"), **ARGS)


def test_deterministic_bytes(generated, tmp_path):
  other = builtin.ensure_builtin_dataset(tmp_path, **ARGS)
  a, b = _tree_bytes(generated["root"]), _tree_bytes(other["root"])
  assert len(a) == ARGS["num_train"] + ARGS["num_val"] + 3  # images + 2 json + meta
  assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
  # A different seed gives different data; a second call reuses the cache.
  assert builtin.ensure_builtin_dataset(os.path.dirname(generated["root"]), **ARGS) == generated
  c = builtin.ensure_builtin_dataset(tmp_path, **dict(ARGS, seed=4))
  assert _tree_bytes(c["root"])["train/000001.png"] != a["train/000001.png"]


def test_from_config(generated):
  """config.data.builtin (the train and evaluate CLIs' data set) -> the same cached dataset."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(dict(data=dict(builtin=dict(
      cache_dir=os.path.dirname(generated["root"]), **ARGS))))
  assert builtin.from_config(config) == generated


def test_paths_and_env_override(tmp_path, monkeypatch):
  monkeypatch.setenv(builtin.ENV_VAR, str(tmp_path))
  assert builtin.default_root() == str(tmp_path)
  assert builtin.dataset_dir(**builtin.DEFAULTS) == os.path.join(str(tmp_path), "shapes_v1")
  assert builtin.dataset_dir(tmp_path / "x", **ARGS).startswith(str(tmp_path / "x"))


def test_killed_generation_leaves_nothing(tmp_path, monkeypatch):
  calls = []

  def boom(rng, size):
    calls.append(1)
    if len(calls) > 3:
      raise KeyboardInterrupt
    return real(rng, size)

  real = builtin.render_image
  monkeypatch.setattr(builtin, "render_image", boom)
  with pytest.raises(KeyboardInterrupt):
    builtin.ensure_builtin_dataset(tmp_path, **ARGS)
  assert os.listdir(tmp_path) == []
  monkeypatch.setattr(builtin, "render_image", real)
  assert os.path.isfile(builtin.ensure_builtin_dataset(tmp_path, **ARGS)["train"][0])


@pytest.mark.parametrize("split", ["train", "val"])
def test_content_through_coco_dataset(generated, split):
  ds = coco.CocoDataset(*generated[split], convention="detectron2")
  assert len(ds) == ARGS[f"num_{split}"]
  assert ds.category_names == list(builtin.CLASSES)
  assert sum(ds.stats.values()) == 0  # nothing dropped
  labels = []
  for image_id in ds.image_ids:
    ann = ds.annotations(image_id)
    masks = ds.instance_masks(image_id)
    image = ds.read_image(image_id)
    assert image.shape == (64, 64, 3) and image.std() > 5  # textured, not flat
    assert 1 <= len(masks) <= 5
    for box, mask in zip(ann["boxes"], masks):
      assert mask.sum() >= 30
      ys, xs = np.nonzero(mask)
      # bbox = pycocotools toBbox of the visible mask: pixel extents.
      np.testing.assert_array_equal(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    # Visible masks of one image do not overlap (occluded parts are removed).
    assert masks.sum(0).max() <= 1
    labels += ann["labels"].tolist()
  if split == "train":
    assert set(labels) == set(range(len(builtin.CLASSES)))


def test_cocoeval_of_ground_truth_is_perfect(generated):
  path = generated["val"][0]
  with contextlib.redirect_stdout(io.StringIO()):
    gt = coco_api.COCO(path)
    results = [dict(image_id=a["image_id"], category_id=a["category_id"], bbox=a["bbox"],
                    segmentation=a["segmentation"], score=1.0) for a in gt.dataset["annotations"]]
    dt = gt.loadRes(json.loads(json.dumps(results)))
    for iou_type in ("bbox", "segm"):
      ev = cocoeval.COCOeval(gt, dt, iou_type)
      ev.evaluate()
      ev.accumulate()
      ev.summarize()
      assert ev.stats[0] == pytest.approx(1.0), iou_type
