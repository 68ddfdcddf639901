"""Every CLI (train, evaluate, predict, convert) on bad input: one line on stderr, exit status 2.

Each case runs the real command in a subprocess on tiny inputs (the Mask Scoring R-CNN of
tests/evaluation/tiny.py on two 60x80 images, its converted checkpoint) and checks the exit
status, that stderr is exactly one `error: ...` line without a traceback, and what the line names.
The shared helper (maskrcnn_jax/cli.py) is also checked on a real bug (traceback, status 1) and
with --verbose (traceback and the line).
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest

from maskrcnn_jax.checkpoints import orbax_io
from tests.evaluation import tiny

ROOT = tiny.ROOT
R50 = str(ROOT / "configs" / "mmdet" / "mask_rcnn_r50_fpn_1x_coco.py")
LEGACY_PTH = ROOT / "tests" / "fixtures" / "pth" / "mmdet_like_legacy.pth"


def _env():
  env = dict(os.environ)
  env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("XLA_FLAGS", None)
  return env


def _run(*args, timeout=300):
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True,
                        text=True, timeout=timeout)


def _one_line(proc, *expected, status=2):
  """Asserts the error contract; returns the line."""
  assert proc.returncode == status, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
  for text in expected:
    assert text in lines[0], lines[0]
  return lines[0]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("cli")
  tiny.make_dataset(str(tmp / "data"), sizes=((60, 80), (60, 80)), empty_images=())
  config = tiny.tiny_config()
  (tmp / "tiny_config.py").write_text(
      "from tests.evaluation import tiny\n\n\ndef get_config():\n  return tiny.tiny_config()\n")
  (tmp / "broken_config.py").write_text("def get_config(:\n")
  orbax_io.save_variables(str(tmp / "converted"), tiny.tiny_variables(config), config)
  (tmp / "bad.json").write_text('{"images": [}')
  (tmp / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  data = LEGACY_PTH.read_bytes()
  (tmp / "truncated.pth").write_bytes(data[: len(data) * 2 // 3])

  class Evil:
    def __reduce__(self):
      return (os.system, ("echo pwned > " + str(tmp / "pwned"),))

  (tmp / "evil.pkl").write_bytes(pickle.dumps({"model": {"x": Evil()}}, protocol=2))
  (tmp / "empty").mkdir()
  return tmp


# ------------------------------------------------------------------------------------------------
# convert
# ------------------------------------------------------------------------------------------------


def _convert(*args):
  return _run("-m", "maskrcnn_jax.convert", *args)


def test_convert_config_typo_missing_and_broken_config_file(inputs):
  _one_line(_convert("--config", R50, "--config.model.dpth=3", "--src", "x", "--out", "o"),
            "--config.model.dpth", "'dpth'", 'Did you mean "depth"')
  _one_line(_convert("--config", str(inputs / "nope.py"), "--src", "x", "--out", "o"),
            f"--config {inputs / 'nope.py'}", "No such file")
  _one_line(_convert("--config", str(inputs / "broken_config.py"), "--src", "x", "--out", "o"),
            "invalid syntax", "broken_config.py")
  _one_line(_convert("--config", R50, "--bogus", "--src", "x", "--out", "o"), "'bogus'")


def test_convert_missing_truncated_unsafe_and_foreign_checkpoints(inputs):
  out = str(inputs / "out")
  _one_line(_convert("--config", R50, "--src", str(inputs / "gone.pth"), "--out", out),
            "gone.pth: no such file")
  _one_line(_convert("--config", R50, "--src", str(inputs / "truncated.pth"), "--out", out),
            "truncated.pth", "truncated")
  _one_line(_convert("--config", R50, "--src", str(inputs / "evil.pkl"), "--out", out),
            "evil.pkl", "system")
  assert not (inputs / "pwned").exists()
  # A checkpoint of another model: cut at MAX_CHARS, --verbose prints the whole listing.
  line = _one_line(_convert("--config", R50, "--src", str(LEGACY_PTH), "--out", out),
                   "does not match the model", "--verbose")
  assert len(line) < 700
  assert not os.path.exists(out)


# ------------------------------------------------------------------------------------------------
# predict
# ------------------------------------------------------------------------------------------------


def _predict(inputs, *args, checkpoint=None):
  return _run("-m", "maskrcnn_jax.predict", "--config", str(inputs / "tiny_config.py"),
              "--checkpoint", str(checkpoint or inputs / "converted"), "--out",
              str(inputs / "pred"), *args)


def test_predict_bad_images_checkpoints_and_no_images(inputs):
  image = str(inputs / "data" / "images" / "img_00.png")
  _one_line(_predict(inputs, str(inputs / "broken.jpg")), "broken.jpg")
  _one_line(_predict(inputs, str(inputs / "missing.png")), "missing.png", "not found")
  _one_line(_predict(inputs, image, checkpoint=inputs / "empty"), "empty",
            "no converted checkpoint")
  # The checkpoint of another model (3 classes, the config says 5).
  _one_line(_predict(inputs, image, "--config.model.num_classes=5"), "does not fit the config's "
            "model", "params/box_predictor/")
  _one_line(_predict(inputs), "give at least one image path")
  assert not (inputs / "pred" / "predictions.json").exists()


# ------------------------------------------------------------------------------------------------
# evaluate
# ------------------------------------------------------------------------------------------------


def _evaluate(inputs, *args, config="tiny_config.py"):
  return _run("-m", "maskrcnn_jax.evaluate", "--config", str(inputs / config), "--checkpoint",
              str(inputs / "converted"), "--workdir", str(inputs / "eval"), "--num_workers", "0",
              *args)


def test_evaluate_bad_annotations_missing_images_and_no_val_set(inputs):
  _one_line(_evaluate(inputs, f"--config.data.val_json={inputs / 'bad.json'}"), "bad.json",
            "not valid json")
  _one_line(_evaluate(inputs, f"--config.data.val_json={inputs / 'data' / 'annotations.json'}",
                      f"--config.data.val_images={inputs / 'empty'}"), "img_00.png")
  _one_line(_evaluate(inputs),
            "no val set")
  _one_line(_evaluate(inputs, f"--config.data.val_json={inputs / 'gone.json'}"), "gone.json")


# ------------------------------------------------------------------------------------------------
# train
# ------------------------------------------------------------------------------------------------


def _train(inputs, *args):
  return _run("-m", "maskrcnn_jax.train", "--config", str(inputs / "tiny_config.py"),
              "--workdir", str(inputs / "train"), "--config.train.global_batch=1",
              "--config.model.backbone_init=", *args)


def test_train_bad_annotations_unknown_convention_and_bad_value(inputs):
  _one_line(_train(inputs, f"--config.data.train_json={inputs / 'bad.json'}",
                   f"--config.data.train_images={inputs / 'data' / 'images'}"),
            "bad.json", "not valid json")
  _one_line(_train(inputs, "--config.convention=mmdetection3"), "unknown convention",
            "mmdetection3")
  _one_line(_train(inputs, "--config.model.depth=fifty"), "--config.model.depth", "fifty")


# ------------------------------------------------------------------------------------------------
# The helper itself
# ------------------------------------------------------------------------------------------------

SCRIPT = """
import sys
from maskrcnn_jax import cli, errors

def main(argv):
  if argv[1] == "user":
    raise errors.ConfigError("train.x must be positive\\ngot -1")
  raise ZeroDivisionError("a real bug")

cli.run(main)
"""


def test_a_bug_keeps_its_traceback_and_verbose_shows_it_for_bad_input():
  line = _one_line(_run("-c", SCRIPT, "user"), "train.x must be positive got -1")
  assert line == "error: train.x must be positive got -1"
  proc = _run("-c", SCRIPT, "user", "--verbose")
  assert proc.returncode == 2 and "Traceback" in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == line
  proc = _run("-c", SCRIPT, "bug")
  assert proc.returncode == 1 and "Traceback" in proc.stderr
  assert "ZeroDivisionError: a real bug" in proc.stderr
