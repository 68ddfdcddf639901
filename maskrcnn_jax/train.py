"""Trains Mask R-CNN / Mask Scoring R-CNN.

  python -m maskrcnn_jax.train --config configs/quickstart.py --workdir /tmp/quickstart
  python -m maskrcnn_jax.train --config configs/mmdet/mask_rcnn_r50_fpn_1x_coco.py \
      --workdir runs/r50_1x --config.data.train_json=... --config.train.global_batch=16

Every config field can be overridden on the command line (--config.optim.base_lr=0.01). Running
the same command again resumes from the newest checkpoint in the workdir. A recipe starts from its
upstream ImageNet backbone (config.model.backbone_init; download the file first: docs/training.md,
"Training a zoo recipe on COCO"). Bad input (a missing file, a config typo, bad annotations)
exits with status 2 and one line on stderr, a diverged run with status 3 (maskrcnn_jax/cli.py).
Multi-host: start the same
command on every host (the coordinator is read from the cluster environment, or pass
--distributed to force jax.distributed.initialize()). See maskrcnn_jax/training/trainer.py for
what the workdir holds.
"""
from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from maskrcnn_jax import cli


def main():
  # Flags are defined here, not at import, so that the CLIs can be imported side by side.
  config = config_flags.DEFINE_config_file("config", None, "Recipe config file.", lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, "Output / resume directory.")
  distributed = flags.DEFINE_bool("distributed", False,
                                  "Force jax.distributed.initialize() (multi-host).")
  stop_after = flags.DEFINE_integer("stop_after", None,
                                    "Stop (with a checkpoint) after this many steps in total.")
  flags.mark_flags_as_required(["config", "workdir"])

  def run(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from maskrcnn_jax.training import sharding, trainer
    sharding.initialize_distributed(force=distributed.value)
    trainer.train_and_evaluate(config.value, workdir.value, stop_after=stop_after.value)

  cli.run(run)


if __name__ == "__main__":
  main()
