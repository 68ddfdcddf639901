"""bfloat16 vs float32 training on the same steps (scripts/compare_precision.py), on the tiny
detector and the built-in data: the loss curves stay within a stated tolerance and bfloat16 does
change the computation. The quickstart comparison over 200 steps is in docs/training.md."""
from __future__ import annotations

import sys
from pathlib import Path

from tests.training import tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from compare_precision import compare, run  # noqa: E402  pylint: disable=wrong-import-position

# Every logged loss (per step here: log_every 1) within 3 % of float32's over 8 steps.
TOLERANCE = 0.03


def test_bfloat16_loss_curve_follows_float32(tmp_path):
  config = tiny.tiny_config(str(tmp_path / "data"), steps=8)
  histories = {d: run(config, str(tmp_path), d, 8, model=tiny.TinyDetector(num_classes=5))
               for d in ("float32", "bfloat16")}
  assert [h["step"] for h in histories["bfloat16"]] == list(range(1, 9))
  result = compare(histories)["bfloat16"]
  assert 0 < result["max_rel"] < TOLERANCE, result["rows"]
