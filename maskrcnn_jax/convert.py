"""Converts a released PyTorch checkpoint into an orbax checkpoint for a recipe config.

  python -m maskrcnn_jax.convert --config configs/mmdet/mask_rcnn_r50_fpn_1x_coco.py \
      --src mask_rcnn_r50_fpn_1x_coco_20200205-d4b0c5d6.pth --out converted/r50_fpn_1x

Reads mmdetection `.pth` (legacy or zip format), torchvision `.pth` and detectron2 `.pkl` without
torch, through an unpickling allowlist. Refuses to write anything when a parameter is unmatched or
a shape disagrees with the config's model, naming each one; bad input (a missing, corrupt or
unsafe file, a checkpoint of another model, a config typo) exits with status 2 and one line on
stderr (maskrcnn_jax/cli.py).
"""
from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from maskrcnn_jax import cli
from maskrcnn_jax.checkpoints import conversion


def main():
  # Flags are defined here, not at import, so that the CLIs can be imported side by side.
  config = config_flags.DEFINE_config_file("config", None, "Recipe config file.", lock_config=True)
  src = flags.DEFINE_string("src", None, "Checkpoint to convert (.pth or .pkl).")
  out = flags.DEFINE_string("out", None, "Output directory.")
  flags.mark_flags_as_required(["config", "src", "out"])

  def run(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    _, summary, _ = conversion.convert_file(config.value, src.value, out.value)
    print(summary)
    print(f"wrote {out.value}")

  cli.run(run)


if __name__ == "__main__":
  main()
