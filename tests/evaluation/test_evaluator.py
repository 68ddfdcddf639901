"""Sharded evaluation end to end on a tiny Mask Scoring R-CNN (seeded weights, 60-80 px images).

* In this process (1 CPU device): the CLI's `evaluate_checkpoint` (orbax checkpoint -> evaluator)
  on a dataset with crowd regions, an image without annotations and two padded sizes; files,
  ordering, mask scores and metrics are checked.
* In subprocesses, started first so that they overlap with the in-process run: 8 host devices
  (`--xla_force_host_platform_device_count=8`, worker pool on) and 2 processes through
  `jax.distributed` on CPU (gloo collectives), both on a one-size subset with dummy padding slots.
  Their predictions and AP must equal the 1-device run's.
* Errors (empty set, missing images, categories, size mismatch, no val set) need no model.
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from maskrcnn_jax.checkpoints import orbax_io
from maskrcnn_jax.evaluation import coco_eval, evaluator, host
from tests.evaluation import tiny

ROOT = str(tiny.ROOT)
SUBPROCESS_TIMEOUT = 400


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(xla_flags: str = "") -> dict:
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("XLA_FLAGS", None)
  if xla_flags:
    env["XLA_FLAGS"] = xla_flags
  return env


def _start(args, out_dir, env, log_name):
  os.makedirs(out_dir, exist_ok=True)
  log = open(os.path.join(out_dir, log_name), "w")
  return subprocess.Popen([sys.executable, "-m", "tests.evaluation.tiny", *args], cwd=ROOT,
                          env=env, stdout=log, stderr=subprocess.STDOUT), log


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("evaldata")
  full = tiny.make_dataset(str(root))
  # The one-size subset: the landscape images (padded 64x96), including the crowd image (index 3)
  # and the image without annotations (index 5).
  keep = {im["id"] for im in full["images"] if im["height"] < im["width"]}
  subset = dict(full, images=[im for im in full["images"] if im["id"] in keep],
                annotations=[a for a in full["annotations"] if a["image_id"] in keep])
  with open(root / "subset.json", "w") as f:
    json.dump(subset, f)
  return dict(root=root, full=str(root / "annotations.json"), subset=str(root / "subset.json"),
              images=str(root / "images"), subset_ids=sorted(keep))


@pytest.fixture(scope="module")
def subprocess_runs(data, tmp_path_factory):
  """Starts the 8-device run and the 2-process run; yields a function that waits for them."""
  out = tmp_path_factory.mktemp("sub")
  runs = {}
  common = [data["subset"], data["images"]]
  runs["8dev"] = [_start(common + [str(out / "8dev"), "--num_workers", "2"], str(out / "8dev"),
                         _env("--xla_force_host_platform_device_count=8"), "log.txt")]
  port = _free_port()
  runs["2proc"] = [
      _start(common + [str(out / "2proc"), "--coordinator", f"127.0.0.1:{port}",
                       "--num_processes", "2", "--process_id", str(i),
                       "--num_workers", str(i)], str(out / "2proc"), _env(), f"log_{i}.txt")
      for i in range(2)]

  def wait(name):
    for proc, log in runs[name]:
      try:
        proc.wait(timeout=SUBPROCESS_TIMEOUT)
      finally:
        log.close()
    logs = "\n".join(open(os.path.join(out, name, f)).read()[-3000:]
                     for f in sorted(os.listdir(out / name)) if f.startswith("log"))
    for proc, _ in runs[name]:
      assert proc.returncode == 0, f"{name} failed:\n{logs}"
    results = [json.load(open(out / name / f)) for f in sorted(os.listdir(out / name))
               if f.startswith("result_")]
    with open(out / name / "predictions.json") as f:
      predictions = json.load(f)
    return results, predictions

  yield wait
  for procs in runs.values():
    for proc, log in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
      log.close()


@pytest.fixture(scope="module")
def full_run(data, subprocess_runs, tmp_path_factory):
  """The 1-device run through the CLI's evaluate_checkpoint (orbax checkpoint round trip)."""
  from maskrcnn_jax import evaluate as evaluate_cli  # pylint: disable=g-import-not-at-top
  del subprocess_runs  # requested so that the subprocesses start first
  tmp = tmp_path_factory.mktemp("full")
  config = tiny.tiny_config()
  orbax_io.save_variables(str(tmp / "ckpt"), tiny.tiny_variables(config), config)
  config.data.val_json = data["full"]
  config.data.val_images = data["images"]
  logs = []
  metrics = evaluate_cli.evaluate_checkpoint(
      config, str(tmp / "ckpt"), str(tmp / "out"), num_workers=0, per_class=True,
      log=logs.append, progress_every_s=0)
  with open(tmp / "out" / "predictions.json") as f:
    predictions = json.load(f)
  with open(tmp / "out" / "metrics.json") as f:
    metrics_file = json.load(f)
  return dict(metrics=metrics, predictions=predictions, metrics_file=metrics_file, logs=logs)


def _printed(metrics):
  """The digits COCOeval prints (fractions to 3 decimals), NaN as 'nan'."""
  return {t: {k: ("nan" if math.isnan(v) else f"{v / 100:.3f}") for k, v in m.items()}
          for t, m in metrics.items()}


def test_full_run_outputs(data, full_run):
  metrics, preds = full_run["metrics"], full_run["predictions"]
  assert set(metrics) == {"bbox", "segm"}
  for t in metrics:
    assert set(coco_eval.STAT_NAMES) <= set(metrics[t])
    assert {"AP-red", "AP-green", "AP-blue"} <= set(metrics[t])
  assert full_run["metrics_file"] == json.loads(json.dumps(coco_eval.metrics_to_json(metrics)))
  assert len(preds) > 20, "the seeded tiny model should produce detections"
  assert metrics["bbox"]["AP50"] > 0
  # Ordered by image id; inside an image, by score (the model's order).
  ids = [p["image_id"] for p in preds]
  assert ids == sorted(ids)
  gt = coco_eval.load_ground_truth(data["full"])
  for image_id in set(ids):
    scores = [p["score"] for p in preds if p["image_id"] == image_id]
    assert scores == sorted(scores, reverse=True)
    info = gt.imgs[image_id]
    for p in preds:
      if p["image_id"] == image_id:
        assert p["segmentation"]["size"] == [info["height"], info["width"]]
        assert "mask_score" in p and p["category_id"] in (1, 2, 3)
  # The written predictions give the returned metrics through the same COCOeval path (segm
  # scored with mask_score, bbox with the class score).
  again = coco_eval.evaluate_results(gt, preds, per_class=True, log=None)
  assert _printed(again) == _printed(metrics)
  # The default scorer (faster-coco-eval) and pycocotools agree on the model's results.
  ref = coco_eval.evaluate_results(gt, preds, per_class=True, log=None, scorer="pycocotools")
  for t in metrics:
    for k, v in metrics[t].items():
      assert (math.isnan(v) and math.isnan(ref[t][k])) or abs(v - ref[t][k]) <= 1e-10, (t, k)
  text = "\n".join(full_run["logs"])
  assert "2 padded sizes" in text and "img/s" in text and "| segm |" in text


def test_host_paste_gives_identical_predictions(data, full_run):
  # The full run pasted on the device (the default); the host paste (config.eval.paste = 'host')
  # must give the same result dicts, RLE strings included. A small paste chunk makes the device
  # paste take several calls per batch.
  config = tiny.tiny_config()
  variables = tiny.tiny_variables(config)
  kw = dict(annotation_file=data["full"], image_dir=data["images"], log=lambda m: None)
  config.eval.paste = "host"
  on_host = evaluator.infer(config, variables, num_workers=0, **kw)
  assert on_host.results == full_run["predictions"]
  chunked = evaluator.infer(config, variables, num_workers=0, paste="device",
                            paste_chunk_tiles=64, **kw)
  assert chunked.results == full_run["predictions"]
  assert chunked.stats.paste_bytes > 0 and on_host.stats.paste_bytes == 0


def _check_same_as_full_run(data, full_run, results, predictions, devices, processes):
  subset_ids = set(data["subset_ids"])
  expected = [p for p in full_run["predictions"] if p["image_id"] in subset_ids]
  assert len(predictions) == len(expected) > 0
  for a, b in zip(predictions, expected):
    assert a["image_id"] == b["image_id"] and a["category_id"] == b["category_id"]
    np.testing.assert_allclose(a["bbox"], b["bbox"], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose([a["score"], a["mask_score"]], [b["score"], b["mask_score"]],
                               rtol=1e-4, atol=1e-5)
  gt = coco_eval.load_ground_truth(data["subset"])
  expected_metrics = coco_eval.evaluate_results(gt, expected, log=None)
  assert len(results) == processes
  for r in results:
    assert r["devices"] == devices and r["processes"] == processes
    assert _printed(r["metrics"]) == _printed(expected_metrics)


def test_eight_devices_give_identical_ap(data, full_run, subprocess_runs):
  results, predictions = subprocess_runs("8dev")
  assert results[0]["local_devices"] == 8
  _check_same_as_full_run(data, full_run, results, predictions, devices=8, processes=1)


def test_two_processes_give_identical_ap(data, full_run, subprocess_runs):
  results, predictions = subprocess_runs("2proc")
  _check_same_as_full_run(data, full_run, results, predictions, devices=2, processes=2)


# ------------------------------------------------------------------------------------------------
# Plan and errors (no model)
# ------------------------------------------------------------------------------------------------


def test_plan_batches_groups_by_padded_size():
  ims = [evaluator.EvalImage(i, f"{i}.png", (60, 80), hw) for i, hw in
         [(5, (64, 85)), (1, (85, 64)), (3, (64, 85)), (2, (64, 72)), (9, (64, 96))]]
  batches = evaluator.plan_batches(ims, global_batch=2, pad_multiple=32)
  got = [(b.padded_hw, [None if im is None else im.image_id for im in b.images])
         for b in batches]
  assert got == [((64, 96), [2, 3]), ((64, 96), [5, 9]), ((96, 64), [1, None])]
  assert len(evaluator.plan_batches(ims, global_batch=8, pad_multiple=128)) == 1


def _write(path, data):
  with open(path, "w") as f:
    json.dump(data, f)
  return str(path)


def test_empty_val_set_is_an_error(tmp_path):
  ann = _write(tmp_path / "a.json", {"images": [], "annotations": [],
                                     "categories": tiny.CATEGORIES})
  with pytest.raises(evaluator.EmptyDatasetError, match="a.json has no images"):
    evaluator.load_val_set(tiny.tiny_config(), ann, str(tmp_path))


def test_missing_images_are_named(data, tmp_path):
  full = json.load(open(data["full"]))
  full["images"][2]["file_name"] = "not_there.png"
  full["images"][4]["file_name"] = "sub/also_missing.jpg"
  ann = _write(tmp_path / "a.json", full)
  with pytest.raises(evaluator.MissingImagesError) as e:
    evaluator.load_val_set(tiny.tiny_config(), ann, data["images"])
  msg = str(e.value)
  assert "2 of 6 images" in msg and "not_there.png" in msg and "also_missing.jpg" in msg


def test_mismatched_categories_are_an_error(data):
  config = tiny.tiny_config()
  config.category_ids = [1, 2, 7]
  with pytest.raises(coco_eval.CategoryMismatchError, match=r"absent from the json: \[7\]"):
    evaluator.load_val_set(config, data["full"], data["images"])


def test_image_size_mismatch_is_an_error(data, tmp_path):
  full = json.load(open(data["full"]))
  full["images"] = full["images"][:1]
  full["images"][0]["height"] += 4
  ann = _write(tmp_path / "a.json", full)
  config = tiny.tiny_config()
  with pytest.raises(host.ImageSizeMismatchError, match="img_00.png"):
    evaluator.evaluate(config, tiny.tiny_variables(config), annotation_file=ann,
                       image_dir=data["images"], num_workers=0, log=lambda m: None)


def test_val_set_resolution(tmp_path):
  from maskrcnn_jax import evaluate as evaluate_cli  # pylint: disable=g-import-not-at-top
  config = tiny.tiny_config()
  with pytest.raises(ValueError, match="no val set"):
    evaluate_cli.resolve_val_set(config)
  config.data.val_json = "/x/val.json"
  config.data.val_images = "/x/images"
  assert evaluate_cli.resolve_val_set(config) == ("/x/val.json", "/x/images")
  config.data.val_source = "builtin"
  config.data.builtin = dict(num_train=0, num_val=2, image_size=32, cache_dir=str(tmp_path))
  ann, images = evaluate_cli.resolve_val_set(config)
  assert os.path.isfile(ann) and os.path.isdir(images)


def test_checkpoint_classes_are_adopted(tmp_path):
  from maskrcnn_jax import evaluate as evaluate_cli  # pylint: disable=g-import-not-at-top
  saved = tiny.tiny_config()
  saved.model.num_classes = 5
  saved.category_ids = [1, 2, 3, 4, 5]
  (tmp_path / "config.json").write_text(saved.to_json_best_effort())
  config = tiny.tiny_config()
  del config["category_ids"]
  evaluate_cli.adopt_checkpoint_classes(config, str(tmp_path), log=lambda m: None)
  assert list(config.category_ids) == [1, 2, 3, 4, 5] and config.model.num_classes == 5


def test_cli_reports_missing_val_set():
  proc = subprocess.run(
      [sys.executable, "-m", "maskrcnn_jax.evaluate", "--config",
       os.path.join(ROOT, "configs/mmdet/mask_rcnn_r50_fpn_1x_coco.py"), "--checkpoint",
       "/nonexistent"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "no val set" in proc.stderr
