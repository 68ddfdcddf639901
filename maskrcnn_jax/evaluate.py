"""COCO bbox / segm evaluation of a converted (or trained) checkpoint on a val set.

  python -m maskrcnn_jax.evaluate --config configs/mmdet/mask_rcnn_r50_fpn_1x_coco.py \
      --checkpoint converted/r50_fpn_1x --workdir eval_out \
      --config.data.val_json=coco/annotations/instances_val2017.json \
      --config.data.val_images=coco/val2017

--checkpoint takes a converted checkpoint (python -m maskrcnn_jax.convert: DIR/variables), a
training workdir (its newest checkpoints/<step>, else its final model/), or one training checkpoint
WORKDIR/checkpoints/<step> (`resolve_checkpoint`).

The val set is config.data.val_json / val_images (any COCO-format json and its images), or the
built-in shapes dataset's val split when config.data.builtin is set (or config.data.val_source is
'builtin'). Runs on every local device; for several hosts start one process per host with
--distributed (jax.distributed.initialize() auto-detection) or --coordinator_address /
--num_processes / --process_id. Writes OUT/predictions.json (COCO results) and OUT/metrics.json
(percent) and prints COCOeval's summaries and a table. Bad input (a --checkpoint path that holds
no checkpoint, no val set, missing images, a config typo) exits with status 2 and one line on
stderr (maskrcnn_jax/cli.py).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, Optional

from absl import app, flags
import ml_collections
from ml_collections import config_flags

from maskrcnn_jax import cli, errors


def resolve_val_set(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """(annotation json, image dir) of the config's val set; errors.ConfigError when there is none."""
  data = config.data
  builtin = data.get("builtin", None)
  if data.get("val_source", "") == "builtin" or (builtin and not data.get("val_json", "")):
    from maskrcnn_jax.data import builtin as builtin_lib  # pylint: disable=g-import-not-at-top
    return builtin_lib.from_config(config)["val"]
  if not data.get("val_json", ""):
    raise errors.ConfigError(
        "no val set: set --config.data.val_json and --config.data.val_images (a "
        "COCO-format json and its image folder), or config.data.builtin")
  images = data.get("val_images", "") or os.path.dirname(os.path.abspath(data.val_json))
  return data.val_json, images


CheckpointNotFoundError = errors.CheckpointNotFoundError  # --checkpoint is none of the forms


@dataclasses.dataclass
class ResolvedCheckpoint:
  """Where a --checkpoint path's variables and config are."""
  kind: str  # 'converted' | 'train_step'
  path: str  # the converted checkpoint / model dir, or the checkpoints/<step> dir
  config_dir: Optional[str]  # the folder whose config.json describes the model (None: none)

  def load_variables(self) -> Any:
    """{'params', 'batch_stats'} as numpy arrays."""
    if self.kind == "converted":
      from maskrcnn_jax.checkpoints import orbax_io  # pylint: disable=g-import-not-at-top
      return orbax_io.load_variables(self.path)
    from maskrcnn_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
    return checkpointing.load_step_variables(self.path)


def _is_converted(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "variables"))


def _is_train_step(path: str) -> bool:
  return os.path.basename(os.path.normpath(path)).isdigit() and os.path.isdir(
      os.path.join(path, "state"))


def _latest_step(checkpoints_dir: str) -> Optional[str]:
  """The newest complete checkpoints/<step> (orbax's temporary folders are not digits)."""
  if not os.path.isdir(checkpoints_dir):
    return None
  steps = [int(n) for n in os.listdir(checkpoints_dir)
           if n.isdigit() and _is_train_step(os.path.join(checkpoints_dir, n))]
  return os.path.join(checkpoints_dir, str(max(steps))) if steps else None


def resolve_checkpoint(path: str) -> ResolvedCheckpoint:
  """What a --checkpoint path holds, in this order:

  1. a converted checkpoint or a training run's model/: PATH/variables (config PATH/config.json);
  2. a training checkpoint: PATH is checkpoints/<step> holding state/ (config ../../config.json);
  3. a training workdir: its newest PATH/checkpoints/<step>, else PATH/model (config
     PATH/config.json, the resolved training config);
  4. a checkpoints/ folder: its newest <step> (config ../config.json).

  Raises:
    CheckpointNotFoundError: none of these, with one line listing what was looked for.
  """
  path = os.path.abspath(path)
  if _is_converted(path):
    return ResolvedCheckpoint("converted", path, path)
  if _is_train_step(path):
    return ResolvedCheckpoint("train_step", path, os.path.dirname(os.path.dirname(path)))
  step = _latest_step(os.path.join(path, "checkpoints"))
  if step is not None:
    return ResolvedCheckpoint("train_step", step, path)
  if _is_converted(os.path.join(path, "model")):
    return ResolvedCheckpoint("converted", os.path.join(path, "model"), os.path.join(path, "model"))
  step = _latest_step(path)
  if step is not None:
    return ResolvedCheckpoint("train_step", step, os.path.dirname(path))
  what = "does not exist" if not os.path.exists(path) else "holds none of them"
  raise CheckpointNotFoundError(
      f"--checkpoint {path} {what}; looked for a converted checkpoint (PATH/variables), a "
      "training checkpoint (PATH = WORKDIR/checkpoints/<step> with state/), a training workdir "
      "(PATH/checkpoints/<step>/state or PATH/model/variables) and a checkpoints folder "
      "(PATH/<step>/state)")


def adopt_checkpoint_classes(config: ml_collections.ConfigDict, checkpoint: str,
                             log: Callable[[str], None] = print) -> None:
  """Takes category_ids / num_classes from the checkpoint's saved config where the recipe lacks them.

  A checkpoint trained on a custom dataset records its classes in DIR/config.json; the recipe file
  usually does not.
  """
  from maskrcnn_jax.checkpoints import orbax_io  # pylint: disable=g-import-not-at-top
  saved = orbax_io.load_saved_config(checkpoint)
  if saved is None or config.get("category_ids", None):
    return
  ids = saved.get("category_ids", None)
  if not ids:
    return
  with config.unlocked():
    config.category_ids = tuple(int(i) for i in ids)
    if saved.get("category_names", None):
      config.category_names = tuple(saved.category_names)
    num = int(saved.get("model", {}).get("num_classes", config.model.num_classes))
    if num != int(config.model.num_classes):
      log(f"{checkpoint}/config.json: model.num_classes {config.model.num_classes} -> {num}")
      config.model.num_classes = num
  log(f"using the checkpoint's {len(config.category_ids)} category ids")


def evaluate_checkpoint(config: ml_collections.ConfigDict, checkpoint: str,
                        workdir: Optional[str] = None, **kwargs) -> Dict[str, Dict[str, float]]:
  """Loads the checkpoint (`resolve_checkpoint`: converted, training workdir or step) and runs
  `evaluator.evaluate`.

  kwargs go to `evaluator.evaluate` (batch_size_per_device, num_workers, per_class, ...).
  """
  from maskrcnn_jax.checkpoints import orbax_io, provenance  # pylint: disable=g-import-not-at-top
  from maskrcnn_jax.evaluation import evaluator  # pylint: disable=g-import-not-at-top
  log = kwargs.get("log", evaluator._default_log)  # pylint: disable=protected-access
  annotation_file, image_dir = resolve_val_set(config)
  found = resolve_checkpoint(checkpoint)
  kind = "training checkpoint" if found.kind == "train_step" else "converted"
  log(f"checkpoint: {found.path} ({kind})")
  if found.config_dir:
    adopt_checkpoint_classes(config, found.config_dir, log)
    # The constants the checkpoint decided (BatchNorm eps), recorded by the converter / trainer.
    config, notes = provenance.decide(config,
                                      recorded=orbax_io.load_saved_config(found.config_dir))
    for note in notes:
      log(note)
  variables = found.load_variables()
  from maskrcnn_jax.modeling import build  # pylint: disable=g-import-not-at-top
  build.check_variables(build.build_model(config), variables, source=found.path)
  return evaluator.evaluate(config, variables, annotation_file=annotation_file,
                            image_dir=image_dir, workdir=workdir, **kwargs)


def main():
  # Flags are defined here, not at import, so that the CLIs can be imported side by side.
  config = config_flags.DEFINE_config_file("config", None, "Recipe config file.", lock_config=True)
  checkpoint = flags.DEFINE_string(
      "checkpoint", None, "A converted checkpoint directory, a training workdir (its newest "
      "checkpoints/<step>, else model/) or a training checkpoint WORKDIR/checkpoints/<step>.")
  workdir = flags.DEFINE_string(
      "workdir", None, "Output directory for predictions.json and metrics.json "
      "(default: <checkpoint>/eval).")
  paste = flags.DEFINE_enum("paste", None, ["device", "host"], "Where masks are pasted (default "
                            "config.eval.paste: device).")
  scorer = flags.DEFINE_enum("scorer", None, ["auto", "faster_coco_eval", "pycocotools"],
                             "COCOeval implementation (default config.eval.scorer: auto).")
  batch = flags.DEFINE_integer("batch_size_per_device", 1, "Images per device per step.")
  workers = flags.DEFINE_integer("num_workers", 2, "Mask paste / RLE / COCOeval worker processes "
                                 "(0: in the main process).")
  threads = flags.DEFINE_integer("num_loader_threads", 4, "Image decoding threads.")
  pad_multiple = flags.DEFINE_integer(
      "pad_multiple", None, "Pad inputs to multiples of this (default data.size_divisibility, "
      "the references' padding; larger = fewer compiles, small differences at image borders).")
  per_class = flags.DEFINE_bool("per_class", False, "Also report per-category AP.")
  max_images = flags.DEFINE_integer("max_images", None, "Evaluate only the first N image ids.")
  cache = flags.DEFINE_string("compilation_cache", None,
                              "JAX persistent compilation cache directory (speeds up reruns).")
  distributed = flags.DEFINE_bool("distributed", False,
                                  "Call jax.distributed.initialize() (cluster auto-detection).")
  coordinator = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
  num_processes = flags.DEFINE_integer("num_processes", None, "Number of processes.")
  process_id = flags.DEFINE_integer("process_id", None, "This process's index.")
  flags.mark_flags_as_required(["config", "checkpoint"])

  def run(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax  # pylint: disable=g-import-not-at-top
    if coordinator.value or distributed.value:
      jax.distributed.initialize(coordinator_address=coordinator.value,
                                 num_processes=num_processes.value, process_id=process_id.value)
    if cache.value:
      jax.config.update("jax_compilation_cache_dir", cache.value)
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    # Bad input fails before any model or data work.
    resolve_val_set(config.value)
    resolve_checkpoint(checkpoint.value)
    out = workdir.value or os.path.join(checkpoint.value, "eval")
    evaluate_checkpoint(
        config.value, checkpoint.value, out, batch_size_per_device=batch.value,
        num_workers=workers.value, num_loader_threads=threads.value,
        pad_multiple=pad_multiple.value, per_class=per_class.value, max_images=max_images.value,
        paste=paste.value, scorer=scorer.value)

  cli.run(run)


if __name__ == "__main__":
  main()
