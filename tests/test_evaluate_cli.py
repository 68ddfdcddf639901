"""`python -m maskrcnn_jax.evaluate --checkpoint X` for the three forms users have, and bad paths.

X is a converted checkpoint (DIR/variables), a training workdir (its newest checkpoints/<step>)
or one training checkpoint (WORKDIR/checkpoints/<step>). The model is the tiny Mask Scoring R-CNN
of tests/evaluation/tiny.py on two 60x80 images; the training checkpoints are real TrainStates
(optimizer state included) saved by the trainer's Checkpointer. Steps 3 and 5 hold different
weights, the converted checkpoint step 5's: the workdir must evaluate like the converted
checkpoint (newest step), checkpoints/3 differently. The runs share a compilation cache.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import optax
import pytest

from maskrcnn_jax import evaluate as evaluate_cli
from maskrcnn_jax.checkpoints import orbax_io
from maskrcnn_jax.training import checkpointing, train_state
from tests.evaluation import tiny

ROOT = str(tiny.ROOT)


def _env():
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("XLA_FLAGS", None)
  return env


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("cli")
  data = tiny.make_dataset(str(tmp / "data"), sizes=((60, 80), (60, 80)), empty_images=())
  assert len(data["images"]) == 2
  config = tiny.tiny_config()
  (tmp / "tiny_config.py").write_text(
      "from tests.evaluation import tiny\n\n\ndef get_config():\n  return tiny.tiny_config()\n")
  weights = {step: tiny.tiny_variables(config, seed=seed) for step, seed in ((3, 0), (5, 1))}
  orbax_io.save_variables(str(tmp / "converted"), weights[5], config)
  run = tmp / "run"
  ckpt = checkpointing.Checkpointer(str(run / "checkpoints"), keep=5, async_save=False)
  tx = optax.sgd(0.01, momentum=0.9)
  for step, variables in weights.items():
    state = train_state.create_train_state(variables, tx, jax.random.PRNGKey(0), step=step)
    ckpt.save(step, state, {"epoch": 0, "position": step})
  ckpt.close()
  (run / "config.json").write_text(config.to_json_best_effort(indent=2))
  return tmp


def _evaluate(tmp, checkpoint, out):
  cmd = [sys.executable, "-m", "maskrcnn_jax.evaluate", "--config", str(tmp / "tiny_config.py"),
         "--checkpoint", str(checkpoint), "--workdir", str(out), "--num_workers", "0",
         "--compilation_cache", str(tmp / "jax_cache"),
         f"--config.data.val_json={tmp / 'data' / 'annotations.json'}",
         f"--config.data.val_images={tmp / 'data' / 'images'}"]
  return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)


def _predictions(out):
  with open(os.path.join(out, "predictions.json")) as f:
    preds = json.load(f)
  with open(os.path.join(out, "metrics.json")) as f:
    metrics = json.load(f)
  assert set(metrics) == {"bbox", "segm"}
  return preds


def test_three_checkpoint_forms(setup):
  tmp = setup
  runs = {}
  for name, path in (("converted", tmp / "converted"), ("workdir", tmp / "run"),
                     ("step3", tmp / "run" / "checkpoints" / "3")):
    proc = _evaluate(tmp, path, tmp / f"out_{name}")
    assert proc.returncode == 0, f"{name}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    runs[name] = _predictions(tmp / f"out_{name}")
    assert len(runs[name]) > 0
  assert runs["workdir"] == runs["converted"]  # the newest step, 5
  assert runs["step3"] != runs["converted"]


def test_bad_checkpoint_path_is_one_line_exit_2(setup, tmp_path):
  tmp = setup
  (tmp_path / "empty").mkdir()
  for path in (tmp_path / "missing", tmp_path / "empty"):
    proc = _evaluate(tmp, path, tmp_path / "out")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"error: --checkpoint {path}")
    for looked_for in ("PATH/variables", "checkpoints/<step>", "PATH/model/variables"):
      assert looked_for in lines[0]


def test_resolve_checkpoint_forms(setup, tmp_path):
  tmp = setup
  found = evaluate_cli.resolve_checkpoint(str(tmp / "run"))
  assert (found.kind, os.path.basename(found.path)) == ("train_step", "5")
  assert found.config_dir == str(tmp / "run")
  found = evaluate_cli.resolve_checkpoint(str(tmp / "run" / "checkpoints"))
  assert (found.kind, os.path.basename(found.path)) == ("train_step", "5")
  found = evaluate_cli.resolve_checkpoint(str(tmp / "run" / "checkpoints" / "3"))
  assert found.config_dir == str(tmp / "run")
  variables = found.load_variables()
  assert set(variables) == {"params", "batch_stats"}
  # A finished run without checkpoints: its exported model/.
  orbax_io.save_variables(str(tmp_path / "wd" / "model"), variables, tiny.tiny_config())
  found = evaluate_cli.resolve_checkpoint(str(tmp_path / "wd"))
  assert (found.kind, found.path) == ("converted", str(tmp_path / "wd" / "model"))
  with pytest.raises(evaluate_cli.CheckpointNotFoundError, match="looked for"):
    evaluate_cli.resolve_checkpoint(str(tmp_path))
