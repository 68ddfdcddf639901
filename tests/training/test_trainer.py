"""The training loop: exact resume (in process and after SIGKILL), 1 vs 8 devices, non-finite loss,
metric files. Uses `tiny.TinyDetector` on the real built-in data pipeline (64 px) so that each test
compiles in seconds; tests/training/test_mask_rcnn_training.py runs the real model.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from maskrcnn_jax.data import loader as loader_lib
from maskrcnn_jax.training import checkpointing, metric_writers, trainer
from tests.training import tiny

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data"))


def _run(config, workdir, **kw):
  return trainer.train_and_evaluate(config, workdir, model=tiny.TinyDetector(num_classes=5), **kw)


def _flat(state):
  from flax import traverse_util
  state = jax.device_get(state)
  return traverse_util.flatten_dict({"params": state.params, "batch_stats": state.batch_stats},
                                    sep="/")


def _subprocess(args, env=None, **kw):
  env = dict(os.environ if env is None else env)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return subprocess.Popen([sys.executable, "-m", "tests.training.run_tiny", *args], cwd=REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          **kw)


def test_resume_in_process_matches_uninterrupted(tmp_path, cache_dir):
  config = tiny.tiny_config(cache_dir, steps=8)
  full = _run(config, str(tmp_path / "full"))
  # Stop after 3 steps (checkpoints 2 and 3), then a new call resumes from 3 to the end.
  first = _run(config, str(tmp_path / "split"), stop_after=3)
  assert first["step"] == 3
  assert sorted(os.listdir(tmp_path / "split" / "checkpoints")) == ["2", "3"]
  second = _run(config, str(tmp_path / "split"))
  assert second["step"] == 8
  expected = tiny.workdir_losses(str(tmp_path / "full"))
  got = tiny.workdir_losses(str(tmp_path / "split"))
  assert sorted(got) == list(range(1, 9))
  assert got == expected  # bit-exact: same data position, rng stream, optimizer state
  a, b = _flat(full["state"]), _flat(second["state"])
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert int(second["state"].step) == 8


def test_sigkill_and_restart_continues_the_same_losses(tmp_path, cache_dir):
  steps = 14
  ref = _subprocess([str(tmp_path / "ref"), cache_dir, str(steps)])
  out, _ = ref.communicate(timeout=600)
  assert ref.returncode == 0, out
  expected = tiny.workdir_losses(str(tmp_path / "ref"))
  assert sorted(expected) == list(range(1, steps + 1))

  # The killed and the resumed run load with 2 worker processes, the reference synchronously.
  work = tmp_path / "killed"
  proc = _subprocess([str(work), cache_dir, str(steps), "--delay", "0.4", "--workers", "2"])
  deadline = time.time() + 600
  # Kill once checkpoint 6 is complete and training has gone beyond it.
  while time.time() < deadline:
    ckpts = os.listdir(work / "checkpoints") if (work / "checkpoints").is_dir() else []
    done = tiny.workdir_losses(str(work)) if (work / "metrics.jsonl").exists() else {}
    if "6" in ckpts and max(done, default=0) >= 7:
      break
    assert proc.poll() is None, proc.stdout.read()
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  killed_at = max(tiny.workdir_losses(str(work)))
  assert killed_at < steps, "the run finished before it could be killed"

  again = _subprocess([str(work), cache_dir, str(steps), "--workers", "2"])
  out, _ = again.communicate(timeout=600)
  assert again.returncode == 0, out
  assert "resumed from" in out, out
  got = tiny.workdir_losses(str(work))
  assert sorted(got) == list(range(1, steps + 1))
  assert got == expected  # the loss curve continues exactly


def test_one_vs_eight_devices(tmp_path, cache_dir):
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
  env["JAX_PLATFORMS"] = "cpu"
  results = {}
  for n in (1, 8):
    p = _subprocess([str(tmp_path / f"d{n}"), cache_dir, "6", "--mesh", str(n), "--batch", "8",
                     "--params", str(tmp_path / f"d{n}.npz")], env=env)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    assert f"{n} device(s)" in out, out
    results[n] = (tiny.workdir_losses(str(tmp_path / f"d{n}")), np.load(tmp_path / f"d{n}.npz"))
  (l1, p1), (l8, p8) = results[1], results[8]
  assert sorted(l1) == sorted(l8) == list(range(1, 7))
  for step in l1:
    np.testing.assert_allclose(l8[step], l1[step], rtol=2e-5, atol=1e-6, err_msg=str(step))
  assert sorted(p1.files) == sorted(p8.files)
  for k in p1.files:
    np.testing.assert_allclose(p8[k], p1[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_non_finite_loss_stops_with_the_last_good_checkpoint(tmp_path, cache_dir, monkeypatch):
  config = tiny.tiny_config(cache_dir, steps=8)
  original = loader_lib.TrainLoader.__next__
  count = {"n": 0}

  def poisoned(self):
    batch = original(self)
    count["n"] += 1
    if count["n"] == 5:
      batch = dict(batch, gt_boxes=np.full_like(batch["gt_boxes"], np.nan))
    return batch

  monkeypatch.setattr(loader_lib.TrainLoader, "__next__", poisoned)
  with pytest.raises(trainer.NonFiniteLossError) as e:
    _run(config, str(tmp_path / "w"))
  message = str(e.value)
  assert "non-finite loss at step 5" in message
  assert "the last good checkpoint is step 4" in message
  ckpt = checkpointing.Checkpointer(str(tmp_path / "w" / "checkpoints"))
  assert ckpt.latest_step() == 4
  ckpt.close()
  # Restarting without the bad batch resumes from step 4 and finishes with finite losses.
  monkeypatch.setattr(loader_lib.TrainLoader, "__next__", original)
  result = _run(config, str(tmp_path / "w"))
  assert result["step"] == 8
  losses = tiny.workdir_losses(str(tmp_path / "w"))
  assert sorted(losses) == list(range(1, 9))
  assert all(np.isfinite(v).all() for v in losses.values())


def test_missing_evaluation_dependency_is_an_error(tmp_path, cache_dir, monkeypatch):
  """A run that would evaluate fails before training, naming the package that does not import and
  how to install it (it used to skip the evaluation with a log line)."""
  import importlib  # pylint: disable=g-import-not-at-top
  from maskrcnn_jax import errors  # pylint: disable=g-import-not-at-top
  real_import = importlib.import_module

  def no_pycocotools(name, *args, **kwargs):
    if name == "maskrcnn_jax.evaluation.evaluator":
      raise ModuleNotFoundError("No module named 'pycocotools'", name="pycocotools")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(importlib, "import_module", no_pycocotools)
  config = tiny.tiny_config(cache_dir, steps=2)
  config.train.final_eval = True
  with pytest.raises(errors.MissingDependencyError, match="pycocotools") as e:
    _run(config, str(tmp_path))
  assert "pip install pycocotools" in str(e.value)
  assert not (tmp_path / "checkpoints").exists()  # nothing trained
  with_val = tiny.tiny_config(cache_dir)
  with_val.data.val_json = str(tmp_path / "val.json")
  with pytest.raises(errors.MissingDependencyError, match="pip install pycocotools"):
    trainer.run_evaluation(with_val, {}, workdir=None)
  # A run that does not evaluate does not need the package.
  config.train.final_eval = False
  assert _run(config, str(tmp_path))["step"] == 2


def test_workdir_files(tmp_path, cache_dir):
  config = tiny.tiny_config(cache_dir, steps=3)
  _run(config, str(tmp_path))
  saved = json.load(open(tmp_path / "config.json"))
  assert saved["model"]["num_classes"] == 5 and saved["category_ids"] == [1, 2, 3, 4, 5]
  assert saved["data"]["train_json"].endswith("instances_train.json")
  # The BatchNorm eps the run used is recorded (no checkpoint decided it: the convention's).
  assert saved["model"]["norm_eps"] == 1e-5
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [l["step"] for l in lines] == [1, 2, 3]
  assert {"train/loss", "train/lr", "train/loss_box", "train/grad_norm"} <= set(lines[0])
  (events,) = os.listdir(tmp_path / "tensorboard")
  records = list(metric_writers.read_records(str(tmp_path / "tensorboard" / events)))
  assert len(records) == 4  # file_version + 3 steps
  step, scalars = metric_writers.decode_scalars(records[-1])
  assert step == 3
  assert scalars["train/loss"] == pytest.approx(lines[-1]["train/loss"], rel=1e-6)


def test_crc32c_and_event_encoding(tmp_path):
  assert metric_writers.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
  assert metric_writers.crc32c(b"") == 0
  w = metric_writers.TensorBoardWriter(str(tmp_path))
  w.write_scalars(7, {"a": 1.5, "b/c": -2.0, "skip": "text"})
  w.close()
  records = list(metric_writers.read_records(w.path))
  assert metric_writers.decode_scalars(records[1]) == (7, {"a": 1.5, "b/c": -2.0})
  assert b"brain.Event:2" in records[0]


def test_jsonl_truncates_steps_after_resume(tmp_path):
  path = str(tmp_path / "m.jsonl")
  w = metric_writers.JsonlWriter(path)
  for s in range(1, 6):
    w.write_scalars(s, {"loss": s})
  w.close()
  with open(path, "a") as f:
    f.write('{"step": 6, "lo')  # torn line from a killed process
  w = metric_writers.JsonlWriter(path, truncate_after_step=3)
  w.write_scalars(4, {"loss": 40})
  w.close()
  steps = [(json.loads(l)["step"], json.loads(l)["loss"]) for l in open(path)]
  assert steps == [(1, 1), (2, 2), (3, 3), (4, 40)]


def _free_port():
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path, cache_dir):
  """Multi-host data parallelism on one machine: 2 processes (jax.distributed + gloo), each loading
  its half of every global batch, give the single-process losses and parameters."""
  single = _subprocess([str(tmp_path / "one"), cache_dir, "6", "--params",
                        str(tmp_path / "one.npz")])
  out, _ = single.communicate(timeout=600)
  assert single.returncode == 0, out
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = [_subprocess([str(tmp_path / "two"), cache_dir, "6", "--process", str(i),
                        "--num_processes", "2", "--coordinator", f"localhost:{port}",
                        "--params", str(tmp_path / f"two{i}.npz")], env=env) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
  assert "2 process(es)" in outs[0], outs[0]
  one, two = tiny.workdir_losses(str(tmp_path / "one")), tiny.workdir_losses(str(tmp_path / "two"))
  assert sorted(one) == sorted(two) == list(range(1, 7))
  for step in one:
    np.testing.assert_allclose(two[step], one[step], rtol=2e-5, atol=1e-6, err_msg=str(step))
  ref = np.load(tmp_path / "one.npz")
  for i in range(2):
    got = np.load(tmp_path / f"two{i}.npz")
    for k in ref.files:
      np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-5, err_msg=k)
  assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["2", "4", "6"]


def test_periodic_evaluation_scores_in_the_background(tmp_path, cache_dir, monkeypatch):
  """Training goes on while a periodic evaluation's COCOeval runs; its metrics land when ready.

  The tiny detector has no evaluation interface, so the inference is replaced by perfect
  predictions of the built-in val set (ground truth fed back); COCOeval and the metric writing are
  the real ones. The scoring of the evaluation at step s waits until metrics.jsonl shows step
  s + 2: were training held up by the scoring, that never happens (the wait times out).
  """
  from maskrcnn_jax.evaluation import coco_eval, coco_format, evaluator
  metrics_file = tmp_path / "metrics.jsonl"

  def train_steps():
    if not metrics_file.exists():
      return []
    return [json.loads(line)["step"] for line in open(metrics_file) if "train/loss" in line]

  inferred_at = {}

  def fake_infer(config, variables, *, annotation_file, image_dir, **unused):
    gt = coco_eval.load_ground_truth(annotation_file)
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                "score": 1.0, "segmentation": coco_format.encode_mask(gt.annToMask(a))}
               for a in gt.dataset["annotations"] if not a["iscrowd"]]
    done = evaluator.Inferred(gt, sorted(gt.getImgIds()), results,
                              evaluator.InferenceStats(wall=0.01))
    inferred_at[id(done)] = max(train_steps(), default=0)
    return done

  real_score = evaluator.score
  waits = []

  def slow_score(config, done, **kw):
    if kw.get("workdir") is None:  # a periodic evaluation
      step = inferred_at[id(done)]
      t0 = time.time()
      while max(train_steps(), default=0) < step + 2 and time.time() - t0 < 120:
        time.sleep(0.05)
      waits.append((step, max(train_steps()) >= step + 2))
    return real_score(config, done, **kw)

  monkeypatch.setattr(evaluator, "infer", fake_infer)
  monkeypatch.setattr(evaluator, "score", slow_score)
  config = tiny.tiny_config(cache_dir, steps=8)
  config.train.eval_every = 2
  config.train.final_eval = True
  out = _run(config, str(tmp_path))
  assert waits == [(2, True), (4, True), (6, True)]
  lines = [json.loads(line) for line in open(metrics_file)]
  evals = [(i, l["step"]) for i, l in enumerate(lines) if "eval/segm/AP" in l]
  assert [s for _, s in evals] == [2, 4, 6, 8]
  assert all(l["eval/bbox/AP"] == 100.0 and l["eval/segm/AP"] == 100.0
             for l in lines if "eval/segm/AP" in l)
  # Each periodic evaluation's line comes after the train lines of two later steps.
  for i, s in evals[:3]:
    assert any(l.get("step") == s + 2 and "train/loss" in l for l in lines[:i])
  # The final evaluation is complete when train_and_evaluate returns.
  final = json.load(open(tmp_path / "metrics.json"))
  assert final["segm"]["AP"] == 100.0 and out["metrics"]["bbox"]["AP"] == 100.0
