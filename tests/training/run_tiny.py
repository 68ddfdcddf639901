"""Subprocess entry point for the trainer tests: trains `tiny.TinyDetector` in a fresh process.

  python -m tests.training.run_tiny WORKDIR CACHE_DIR STEPS [--mesh N] [--batch B] [--delay S]
      [--params OUT.npz] [--workers W]

--delay sleeps S seconds before each batch (host side only), so that a test can SIGKILL the
process in the middle of a run; --params writes the final parameters as a flat npz.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("workdir")
  p.add_argument("cache_dir")
  p.add_argument("steps", type=int)
  p.add_argument("--mesh", type=int, default=-1)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--delay", type=float, default=0.0)
  p.add_argument("--checkpoint_every", type=int, default=2)
  p.add_argument("--params", default="")
  p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
  p.add_argument("--process", type=int, default=-1, help="multi-process: this process's id")
  p.add_argument("--num_processes", type=int, default=1)
  p.add_argument("--coordinator", default="")
  args = p.parse_args(argv)

  import jax
  if args.process >= 0:
    # Multi-process on one machine: CPU collectives through gloo.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process)
  from flax import traverse_util
  from maskrcnn_jax.data import loader as loader_lib
  from maskrcnn_jax.training import trainer
  from tests.training import tiny

  if args.delay:
    original = loader_lib.TrainLoader.__next__

    def slow_next(self):
      time.sleep(args.delay)
      return original(self)

    loader_lib.TrainLoader.__next__ = slow_next
  config = tiny.tiny_config(args.cache_dir, steps=args.steps, batch=args.batch)
  config.mesh.data = args.mesh
  config.data.num_workers = args.workers
  config.train.checkpoint_every = args.checkpoint_every
  result = trainer.train_and_evaluate(config, args.workdir, model=tiny.TinyDetector(num_classes=5))
  if args.params:
    state = jax.device_get(result["state"])
    flat = traverse_util.flatten_dict({"params": state.params, "batch_stats": state.batch_stats},
                                      sep="/")
    np.savez(args.params, **{k: np.asarray(v) for k, v in flat.items()})
  print(f"DONE step {result['step']}", flush=True)


if __name__ == "__main__":
  sys.exit(main())
