"""Trains Mask R-CNN / Mask Scoring R-CNN.

  python -m maskrcnn_jax.train --config configs/quickstart.py --workdir /tmp/quickstart
  python -m maskrcnn_jax.train --config configs/mmdet/mask_rcnn_r50_fpn_1x_coco.py \
      --workdir runs/r50_1x --config.data.train_json=... --config.train.global_batch=16

Every config field can be overridden on the command line (--config.optim.base_lr=0.01). Running
the same command again resumes from the newest checkpoint in the workdir. A recipe starts from its
upstream ImageNet backbone (config.model.backbone_init; download the file first: docs/training.md,
"Training a zoo recipe on COCO"; a missing file exits with status 2). Multi-host: start the same
command on every host (the coordinator is read from the cluster environment, or pass
--distributed to force jax.distributed.initialize()). See maskrcnn_jax/training/trainer.py for
what the workdir holds.
"""
from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags


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
    from maskrcnn_jax.checkpoints.backbones import BackboneInitError
    from maskrcnn_jax.training import sharding, trainer
    trainer.quiet_library_logs()
    sharding.initialize_distributed(force=distributed.value)
    try:
      trainer.train_and_evaluate(config.value, workdir.value, stop_after=stop_after.value)
    except BackboneInitError as e:  # the recipe's ImageNet file: missing, or not the config's
      print(f"error: {e}", file=sys.stderr, flush=True)
      sys.exit(2)
    except trainer.NonFiniteLossError as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      sys.exit(3)

  app.run(run)


if __name__ == "__main__":
  main()
