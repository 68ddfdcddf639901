"""The training loop: `train_and_evaluate(config, workdir)`.

What a run writes into `workdir` (process 0 only, except checkpoints, which every process joins):

  config.json                 the resolved config (with the dataset paths and category ids)
  metrics.jsonl               one JSON object per logged step (loss terms, lr, grad norm, img/s)
                              and per periodic evaluation ('eval/bbox/AP', ...; written when its
                              COCOeval, which runs in a background thread, is done, so possibly
                              after lines of later steps)
  tensorboard/events.out.tfevents.*   the same scalars for TensorBoard (metric_writers.py)
  checkpoints/<step>/         orbax checkpoints (checkpointing.py), the last train.keep_checkpoints
  metrics.json, predictions.json      the final COCO evaluation (evaluation/evaluator.py):
                              {"bbox": {"AP": ..., "AP50": ..., ...}, "segm": {...}}
  model/                      the final variables + config.json in the converted-checkpoint layout
                              (predict / evaluate --checkpoint WORKDIR/model)

A new run starts from config.init (a whole converted detector) if set, else from the recipe's
ImageNet backbone (config.model.backbone_init, checkpointing.read_backbone_init; the FPN and heads
start fresh), else from scratch. Restarting the same command continues from the newest checkpoint
instead (neither is read then): params, optimizer state, batch statistics, step, rng and the data
position are restored, so the losses continue exactly as in an uninterrupted run. A non-finite loss stops the run with an error naming the step and the loss
terms; the state is never updated by that step and the checkpoints on disk stay the last good ones.

The progress line (stdout, every train.log_every steps) shows step, the loss terms averaged over
the interval, the learning rate, images per second and the ETA.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import functools
import importlib
import logging
import math
import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maskrcnn_jax import conventions as conventions_lib
from maskrcnn_jax import errors
from maskrcnn_jax.modeling.build import build_model, init_variables, variable_shapes
from maskrcnn_jax.training import checkpointing, loss_scale as loss_scale_lib
from maskrcnn_jax.training import metric_writers, optimizer as optimizer_lib
from maskrcnn_jax.training import sharding as sharding_lib
from maskrcnn_jax.training import train_state as train_state_lib

logger = logging.getLogger(__name__)

# The batch keys the train step reads (the loader also returns image_id, flipped, truncated):
# uint8 images and packed masks become the model's inputs inside the step (ops/inputs.py).
TRAIN_KEYS = ("image", "image_hw", "gt_boxes", "gt_labels", "gt_valid", "gt_crowd", "gt_masks",
              "gt_masks_bits")


class NonFiniteLossError(errors.UserError, FloatingPointError):
  """A training step produced a NaN / Inf loss or gradient (the train CLI exits with status 3)."""
  exit_code = 3


def _print(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def _fmt_time(seconds: float) -> str:
  if not math.isfinite(seconds) or seconds < 0:
    return "?"
  return str(datetime.timedelta(seconds=int(round(seconds))))


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def resolve_data(config: ml_collections.ConfigDict) -> None:
  """Fills config.data.{train,val}_{json,images} from config.data.builtin when that is set.

  config.data.builtin: a dict of `data.builtin.ensure_builtin_dataset` arguments (num_train,
  num_val, image_size, seed; cache_dir optional); the dataset is generated on first use.
  """
  if config.data.get("builtin", None):
    from maskrcnn_jax.data import builtin as builtin_lib
    paths = builtin_lib.from_config(config)
    config.data.train_json, config.data.train_images = paths["train"]
    config.data.val_json, config.data.val_images = paths["val"]
  if not config.data.get("train_json", ""):
    raise ValueError("no training data: set config.data.train_json and config.data.train_images "
                     "(COCO format) or config.data.builtin")


def set_categories(config: ml_collections.ConfigDict, category_ids) -> None:
  """Makes config.model.num_classes / config.category_ids agree with the training set.

  bg_last layouts (mmdet, detectron2): label i <-> category_ids[i]; num_classes = #categories.
  bg_first (torchvision): the class index is the category id (num_classes >= max id).
  A recipe's num_classes that disagrees with the dataset is corrected with a log line (the
  fine-tuning case: config.init then re-initialises the class layers).
  """
  ids = tuple(int(c) for c in category_ids)
  conv = conventions_lib.get(config.convention)
  if conv.class_layout == "bg_last":
    if int(config.model.num_classes) != len(ids):
      _print(f"training set has {len(ids)} categories: model.num_classes "
             f"{config.model.num_classes} -> {len(ids)}")
      config.model.num_classes = len(ids)
    config.category_ids = ids
  else:
    if int(config.model.num_classes) < max(ids):
      _print(f"training set category ids go up to {max(ids)}: model.num_classes "
             f"{config.model.num_classes} -> {max(ids)}")
      config.model.num_classes = max(ids)
    config.category_ids = ids


def _take_train_keys(batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  return {k: batch[k] for k in TRAIN_KEYS if k in batch}


# ------------------------------------------------------------------------------------------------
# Evaluation hook
# ------------------------------------------------------------------------------------------------


def import_evaluator():
  """The maskrcnn_jax.evaluation.evaluator module.

  Raises:
    errors.MissingDependencyError: one of the evaluation's packages (pycocotools, ...) does not
      import; the message names it and how to install it (a run asked to evaluate fails rather
      than silently skipping its evaluation).
  """
  try:
    return importlib.import_module("maskrcnn_jax.evaluation.evaluator")
  except ImportError as e:
    package = (e.name or "").split(".")[0]
    if not package or package == "maskrcnn_jax":
      raise  # a broken module of this project: a bug, not a missing package
    raise errors.MissingDependencyError(
        f"the evaluation needs the {package} package, which does not import ({e}); install it "
        f"(pip install {package.replace('_', '-')}, or pip install -e . for every dependency), or "
        "train without evaluating (--config.train.final_eval=False --config.train.eval_every=0)"
    ) from e


def run_evaluation(config: ml_collections.ConfigDict, variables: Any, *, workdir: Optional[str],
                   mesh=None, background: Optional[concurrent.futures.Executor] = None) -> Any:
  """COCO evaluation on config.data.val_json through maskrcnn_jax.evaluation.evaluator.

  With `background` (a thread pool), only the inference runs now; COCOeval runs there and a Future
  of the metrics is returned (`evaluator.evaluate_in_background`). Returns None (with a log line)
  when there is no val set.

  Raises:
    errors.MissingDependencyError: a package the evaluation needs does not import.
  """
  if not config.data.get("val_json", ""):
    _print("no config.data.val_json: skipping evaluation")
    return None
  evaluator = import_evaluator()
  ev = config.get("eval", ml_collections.ConfigDict())
  kwargs = dict(annotation_file=config.data.val_json, image_dir=config.data.val_images,
                workdir=workdir, batch_size_per_device=int(ev.get("batch_size_per_device", 1)),
                num_workers=int(ev.get("num_workers", 2)), log=_print)
  if mesh is not None:
    kwargs["mesh"] = mesh
  if background is not None:
    return evaluator.evaluate_in_background(config, variables, executor=background, **kwargs)
  return evaluator.evaluate(config, variables, **kwargs)


def _flat_eval(metrics: Dict[str, Dict[str, float]]) -> Dict[str, float]:
  out = {}
  for iou_type, values in (metrics or {}).items():
    for k, v in values.items():
      if isinstance(v, (int, float)) and v is not None:
        out[f"eval/{iou_type}/{k}"] = float(v)
  return out


# ------------------------------------------------------------------------------------------------
# Main loop
# ------------------------------------------------------------------------------------------------


def export_variables(config: ml_collections.ConfigDict, state: Any, directory: str) -> None:
  """The trained {'params', 'batch_stats'} + config.json in the layout of a converted checkpoint
  (checkpoints/orbax_io.py), for `maskrcnn_jax.predict` / `maskrcnn_jax.evaluate --checkpoint`."""
  if jax.process_count() > 1:
    return  # the orbax train checkpoints hold the same arrays
  from maskrcnn_jax.checkpoints import orbax_io
  host = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
  orbax_io.save_variables(directory, host, config, note="trained with maskrcnn_jax.train\n")
  _print(f"wrote the trained model to {directory} (config.json holds num_classes and "
         "category_ids)")


def _config_for_run(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(config.to_dict())  # an unlocked copy we may fill in
  if "train" not in c:
    from maskrcnn_jax import config_lib
    c.train = config_lib.train_config()
  if "model" in c and "norm_eps" in c.model:
    # The BatchNorm eps of the checkpoint training starts from (checkpoints/provenance.py), else
    # the convention's default; written into config.json so that the trained model records it.
    if c.get("init", ""):
      c, notes = checkpointing.init_settings(c)
      for note in notes:
        _print(f"{c.init}: {note}")
    if c.model.norm_eps is None:
      c.model.norm_eps = conventions_lib.get(c.convention).bn_eps
  return c


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, "config.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(tmp, path)


def _mean_metrics(history: List[Dict[str, np.ndarray]]) -> Dict[str, float]:
  keys = history[-1].keys()
  out = {}
  for k in keys:
    values = [float(h[k]) for h in history if k in h]
    out[k] = (float(np.mean(values)) if k not in ("lr", "finite", "loss_scale", "skipped_steps")
              else values[-1])
  return out


def _progress_line(step: int, total: int, m: Dict[str, float], ips: float, eta: float) -> str:
  terms = " ".join(f"{k[5:]} {m[k]:.4f}" for k in sorted(m) if k.startswith("loss_"))
  scale = (f"  loss scale {m['loss_scale']:g} ({int(m['skipped_steps'])} skipped)"
           if "loss_scale" in m else "")
  return (f"step {step}/{total}  loss {m['loss']:.4f} ({terms})  lr {m['lr']:.3g}{scale}  "
          f"{ips:.2f} img/s  ETA {_fmt_time(eta)}")


def prepare_batch_fn(config: ml_collections.ConfigDict):
  """The loader's batch -> the model's inputs, inside the jitted step: uint8 images normalized
  bit-identically to the host's float32 normalization, packed mask crops unpacked
  (`ops.inputs.model_inputs`, `data.pipeline.device_normalization`)."""
  from maskrcnn_jax.data import pipeline
  from maskrcnn_jax.ops import inputs as inputs_lib
  norm = pipeline.device_normalization(config)
  if norm is None:
    return inputs_lib.model_inputs
  table, source = norm
  return functools.partial(inputs_lib.model_inputs, table=table,
                           source=tuple(int(c) for c in source))


def sampler_kwargs(train_config) -> Dict[str, Any]:
  """config.train's sampler settings as `MaskRCNN.losses` keyword arguments (unset or 0 sizes
  keep the references' 256 / 512; fractions must lie in (0, 1])."""
  kwargs: Dict[str, Any] = {}
  for key in ("rpn_batch_per_image", "roi_batch_per_image"):
    if int(train_config.get(key, 0) or 0) > 0:
      kwargs[key] = int(train_config[key])
  for key in ("rpn_positive_fraction", "roi_positive_fraction"):
    if train_config.get(key, None) is not None:
      fraction = float(train_config[key])
      if not 0.0 < fraction <= 1.0:
        raise ValueError(f"train.{key} must be in (0, 1], got {train_config[key]!r}")
      kwargs[key] = fraction
  return kwargs


# ------------------------------------------------------------------------------------------------
# The steps of `train_and_evaluate`
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StartingPoint:
  """Where a run's variables come from, settled before any data or compilation work."""
  resuming: bool  # workdir/checkpoints has a checkpoint: it holds everything, nothing else is read
  init: str  # config.init (a whole converted detector), '' when resuming or unset
  backbone_file: Optional[Tuple[str, Any]]  # (path, entry) of the ImageNet backbone, else None


def starting_point(config: ml_collections.ConfigDict, workdir: str) -> StartingPoint:
  """A run that resumes reads neither config.init nor the backbone (its checkpoint holds
  everything, as detectron2's resume_or_load); otherwise config.init, else the recipe's ImageNet
  backbone, whose file must be on disk (checked here, before any work)."""
  resuming = checkpointing.has_checkpoint(os.path.join(workdir, "checkpoints"))
  init = "" if resuming else config.get("init", "")
  backbone_file = None
  if not resuming and not init and config.model.get("backbone_init", ""):
    backbone_file = checkpointing.resolve_backbone_init(config)
  return StartingPoint(resuming, init, backbone_file)


def check_evaluation_available(config: ml_collections.ConfigDict) -> None:
  """Imports the evaluation now when the run will evaluate (a val set and train.final_eval or
  train.eval_every), so that a missing package fails the run before training rather than after.

  Raises:
    errors.MissingDependencyError: see `import_evaluator`.
  """
  tc = config.train
  if config.data.get("val_json", "") and (bool(tc.get("final_eval", True))
                                          or int(tc.get("eval_every", 0))):
    import_evaluator()


def prepare_data(config: ml_collections.ConfigDict, workdir: str):
  """The training set, the class table, the mesh and the loader; writes workdir/config.json.

  config's dataset paths must be resolved (`resolve_data`); its classes are set here
  (`set_categories`) before config.json records them.

  Returns:
    (loader: data.loader.TrainLoader positioned at step 0, mesh: 1-D jax Mesh with axis 'data').
  """
  from maskrcnn_jax.data import coco as coco_lib, loader as loader_lib
  train_set = coco_lib.CocoDataset(config.data.train_json, config.data.train_images,
                                   convention=config.convention)
  set_categories(config, train_set.category_ids)
  _write_config(config, workdir)

  mesh = sharding_lib.make_mesh(int(config.get("mesh", {}).get("data", -1)))
  global_batch = int(config.train.global_batch)
  sharding_lib.check_batch_divisible(global_batch, mesh)
  data_seed = int(config.train.get("data_seed", -1))
  data_seed = int(config.seed) if data_seed < 0 else data_seed
  loader = loader_lib.TrainLoader(
      train_set, config, seed=data_seed, process_index=jax.process_index(),
      process_count=jax.process_count(), global_batch=global_batch)
  return loader, mesh


def initial_state(config: ml_collections.ConfigDict, model: Any, start: StartingPoint,
                  schedule: Any, mesh) -> Tuple[Any, Any, Any]:
  """The step-0 train state, placed on `mesh`: fresh variables (seeded by config.seed) with
  config.init or the ImageNet backbone loaded into them, the optimizer and the loss scale.

  A checkpoint to resume from replaces this state afterwards (`restore`); the rng split is the
  same either way.

  Returns:
    (state: train_state.TrainState, tx: the optax optimizer, loss_scale: its config or None).
  """
  backbone = None
  if start.backbone_file is not None:  # read and checked before compiling anything
    backbone = checkpointing.read_backbone_init(config, variable_shapes(model),
                                                path=start.backbone_file[0],
                                                entry=start.backbone_file[1])
  rng = jax.random.PRNGKey(int(config.seed))
  init_rng, state_rng = jax.random.split(rng)
  variables = jax.device_get(init_variables(model, init_rng))
  variables = {k: v for k, v in dict(variables).items()}
  if start.init:
    variables, reinit = checkpointing.load_init(config, variables, start.init)
    _print(f"initialised from {start.init}"
           + (f" (re-initialised {len(reinit)} class-dependent variables)" if reinit else ""))
  elif backbone is not None:
    variables = checkpointing.replace_variables(variables, backbone[0])
    _print(f"initialised the backbone from {config.model.backbone_init}: {backbone[1]}")
  tx = optimizer_lib.build_optimizer(config, variables["params"], schedule)
  loss_scale = loss_scale_lib.from_config(config)
  state = train_state_lib.create_train_state(variables, tx, state_rng, loss_scale=loss_scale)
  return train_state_lib.place_state(state, mesh), tx, loss_scale


def _run_summary(config: ml_collections.ConfigDict, state: Any, mesh, loader: Any, schedule: Any,
                 total_steps: int) -> str:
  """The line a run starts with: parameters, devices, data, buckets and schedule."""
  counts = optimizer_lib.count_params(state.params, config)
  return (f"{config.get('upstream', '') or 'model'}: {sum(counts.values()) / 1e6:.2f}M params "
          f"({counts['frozen'] / 1e6:.2f}M frozen); {mesh.devices.size} device(s), "
          f"{jax.process_count()} process(es), global batch {int(config.train.global_batch)}; "
          f"{len(loader.image_ids)} training images, {loader.steps_per_epoch} steps/epoch, "
          f"image buckets {' '.join(f'{h}x{w}' for h, w in loader.buckets)}; "
          f"schedule: {schedule.describe()}; running {total_steps} steps")


def restore(ckpt: checkpointing.Checkpointer, state: Any, loader: Any) -> Tuple[Any, int]:
  """Continues from the newest checkpoint, if any: the state and the loader's data position
  (old checkpoints without one: derived from the step). Returns (state, start step)."""
  if ckpt.latest_step() is None:
    return state, 0
  state, loader_state = ckpt.restore(state)
  start_step = int(jax.device_get(state.step))
  if loader_state is not None:
    loader.restore(loader_state)
  else:
    loader.set_position_from_step(start_step)
  _print(f"resumed from {ckpt.directory}/{start_step} (data position {loader.state()})")
  return state, start_step


def build_train_step(config: ml_collections.ConfigDict, model: Any, *, custom_model: bool,
                     tx: Any, schedule: Any, mesh, state: Any, loss_scale: Any):
  """The jitted train step (train_state.make_train_step): (state, batch) -> (state, metrics).

  The recipe's model gets the dataset's category ids (bg_first layouts) and config.train's
  sampler settings; a custom model's `losses` gets no keyword arguments.
  """
  loss_kwargs = {}
  if not custom_model:
    if conventions_lib.get(config.convention).class_layout == "bg_first":
      loss_kwargs["category_ids"] = tuple(config.category_ids)
    loss_kwargs.update(sampler_kwargs(config.train))
  compute_dtype = jnp.dtype(config.model.get("dtype", "float32"))
  return train_state_lib.make_train_step(
      model, tx, schedule, mesh, state, compute_dtype=compute_dtype, loss_kwargs=loss_kwargs,
      loss_scale=loss_scale, prepare_batch=prepare_batch_fn(config))


def open_writer(workdir: str, start_step: int):
  """metrics.jsonl (lines after `start_step` dropped: a resumed run rewrites them) and
  TensorBoard events on process 0; a writer that drops everything on the others."""
  if jax.process_index() != 0:
    return metric_writers.NullWriter()
  return metric_writers.MultiWriter(
      metric_writers.JsonlWriter(os.path.join(workdir, "metrics.jsonl"),
                                 truncate_after_step=start_step),
      metric_writers.TensorBoardWriter(os.path.join(workdir, "tensorboard")))


def check_finite(step: int, metrics: Dict[str, Any], ckpt: checkpointing.Checkpointer) -> None:
  """Raises NonFiniteLossError when train step `step`'s metrics flag a NaN / Inf (the step was not
  applied); the message names the loss terms and the last good checkpoint.

  metrics: the step's device metrics ('finite' float32 scalar, 'loss*', 'grad_norm', 'lr').
  """
  if float(jax.device_get(metrics["finite"])) > 0:
    return
  host = {k: float(v) for k, v in jax.device_get(metrics).items()}
  terms = ", ".join(f"{k}={v:.4g}" for k, v in sorted(host.items()) if k.startswith("loss"))
  ckpt.wait_until_finished()
  latest = ckpt.latest_step()
  where = (f"the last good checkpoint is step {latest} in {ckpt.directory} (the same command "
           "resumes from it)" if latest is not None
           else "no checkpoint was written yet (the same command starts over)")
  raise NonFiniteLossError(
      f"non-finite loss at step {step} ({terms}, grad_norm={host['grad_norm']:.4g}, "
      f"lr={host['lr']:.4g}); stopping. The step was not applied; {where}. Consider a lower "
      "optim.base_lr, a longer warmup or optim.grad_clip_norm.")


def write_scored(scored: List[Tuple[int, concurrent.futures.Future]], writer: Any,
                 wait: bool = False) -> None:
  """Writes the metrics of the periodic evaluations whose scoring is done (all, waiting, when
  `wait`), oldest first, removing them from `scored` ([(step, Future of metrics)])."""
  while scored and (wait or scored[0][1].done()):
    eval_step, future = scored.pop(0)
    writer.write_scalars(eval_step, _flat_eval(future.result()))


class ProgressLog:
  """The progress line and train/* metrics of every log interval.

  `add` keeps each step's device metrics (a dict of float32 scalars); `log` averages the interval
  (`_mean_metrics`), prints the line with images/s and ETA, writes the scalars and keeps them in
  `history`.
  """

  def __init__(self, writer: Any, *, global_batch: int, total_steps: int, t_start: float):
    self.writer = writer
    self.global_batch = global_batch
    self.total_steps = total_steps
    self.t_start = t_start
    self.history: List[Dict[str, float]] = []
    self.window: List[Dict[str, Any]] = []
    self.t_window: Optional[float] = None
    self.n_window = 0  # steps timed in this interval (the first step, compiling, is not)
    self.t_first_done: Optional[float] = None

  def add(self, metrics: Dict[str, Any]) -> None:
    """One more step's metrics; the first step is waited for, to report the compile time."""
    self.window.append(metrics)
    if self.t_first_done is None:
      jax.block_until_ready(metrics["loss"])
      self.t_first_done = time.time()
      self.t_window, self.n_window = self.t_first_done, 0
      _print(f"first step done in {self.t_first_done - self.t_start:.1f} s since start "
             "(compilation included)")
    else:
      self.n_window += 1

  def log(self, step: int) -> None:
    """Averages, prints and writes the interval that ends at `step`."""
    host = [dict((k, np.asarray(v)) for k, v in m.items()) for m in jax.device_get(self.window)]
    self.window = []
    mean = _mean_metrics(host)
    now = time.time()
    ips = (self.n_window * self.global_batch / max(now - self.t_window, 1e-9) if self.n_window
           else float("nan"))
    eta = ((self.total_steps - step) * self.global_batch / ips if ips and ips == ips
           else float("nan"))
    self.t_window, self.n_window = now, 0
    mean["images_per_sec"] = ips
    _print(_progress_line(step, self.total_steps, mean, ips, eta))
    self.writer.write_scalars(step, {("train/" + k): v for k, v in mean.items()})
    self.history.append(dict(step=step, **mean))


def train_loop(config: ml_collections.ConfigDict, state: Any, train_step: Callable, *,
               loader: Any, ckpt: checkpointing.Checkpointer, writer: Any, mesh,
               start_step: int, end_step: int, total_steps: int, t_start: float
               ) -> Tuple[Any, int, List[Dict[str, float]]]:
  """Steps start_step+1 .. end_step: logging, checkpoints and periodic evaluations.

  Each step's finiteness is checked while the next one runs (no pipeline stall), and always before
  a log line or a checkpoint, so a checkpoint never holds a state after a non-finite step. The
  periodic evaluations' inference holds up training; their COCOeval runs on a thread and their
  metrics are written once ready (all awaited before returning). Closes `ckpt` and `loader`.

  Returns:
    (state, the last step done, history: the logged metric dicts).

  Raises:
    NonFiniteLossError: `check_finite`.
  """
  tc = config.train
  log_every = max(int(tc.log_every), 1)
  ckpt_every = int(tc.checkpoint_every)
  eval_every = int(tc.get("eval_every", 0))
  progress = ProgressLog(writer, global_batch=int(tc.global_batch), total_steps=total_steps,
                         t_start=t_start)
  pending: Optional[Tuple[int, Dict[str, Any]]] = None  # (step, metrics) not yet checked
  last_saved = start_step
  scoring = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="coco-eval")
  scored: List[Tuple[int, concurrent.futures.Future]] = []
  try:
    step = start_step
    while step < end_step:
      batch = sharding_lib.shard_batch(_take_train_keys(next(loader)), mesh)
      state, metrics = train_step(state, batch)
      step += 1
      if pending is not None:  # the previous step, checked while this one runs
        check_finite(*pending, ckpt)
      pending = (step, metrics)
      progress.add(metrics)
      is_last = step == end_step
      if step % log_every == 0 or is_last:
        check_finite(*pending, ckpt)
        pending = None
        progress.log(step)
      if (ckpt_every and step % ckpt_every == 0) or is_last:
        if pending is not None:
          check_finite(*pending, ckpt)
          pending = None
        ckpt.save(step, state, loader.state())
        last_saved = step
      if eval_every and step % eval_every == 0 and step < total_steps:
        future = run_evaluation(config, {"params": state.params,
                                         "batch_stats": state.batch_stats},
                                workdir=None, mesh=mesh, background=scoring)
        if future is not None:
          scored.append((step, future))
      write_scored(scored, writer)
    write_scored(scored, writer, wait=True)
    if pending is not None:
      check_finite(*pending, ckpt)
    if last_saved != step and step > start_step:
      ckpt.save(step, state, loader.state())
    ckpt.wait_until_finished()
  finally:
    scoring.shutdown(wait=True)
    ckpt.close()
    loader.close()
  return state, step, progress.history


def final_evaluation(config: ml_collections.ConfigDict, state: Any, *, workdir: str, mesh,
                     writer: Any, step: int, t_start: float) -> Optional[Dict[str, Any]]:
  """The COCO evaluation of the trained state (workdir's metrics.json / predictions.json), its
  eval/* scalars at `step` and a summary line; None without a val set."""
  final = run_evaluation(config, {"params": state.params, "batch_stats": state.batch_stats},
                         workdir=workdir, mesh=mesh)
  if final:
    writer.write_scalars(step, _flat_eval(final))
    _print("final: " + "  ".join(
        f"{t} AP {final[t].get('AP', float('nan')):.2f}" for t in ("bbox", "segm") if t in final)
           + f"  (total {_fmt_time(time.time() - t_start)})")
  return final


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after: Optional[int] = None, model: Any = None) -> Dict[str, Any]:
  """Trains `config` in `workdir` (resuming if it holds checkpoints), then evaluates.

  Args:
    config: a recipe config (config_lib layout).
    workdir: output folder (module docstring).
    stop_after: stop (with a checkpoint) once this many steps are done in total; for tests and
      for splitting a run into jobs. The schedule still runs to train.num_steps.
    model: a train-mode Flax module with `losses(batch, rng, **kwargs)` to use instead of
      `build_model(config, train=True)` (tests use a tiny stand-in).

  Returns:
    dict(step=final step, metrics=final evaluation or None, history=[logged metric dicts],
    state=the final train state).

  Raises:
    NonFiniteLossError: a NaN / Inf loss or gradient (the message names the step and the terms).
    errors.MissingDependencyError: the run would evaluate but the evaluation's packages do not
      import (raised before training).
  """
  config = _config_for_run(config)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  t_start = time.time()
  start = starting_point(config, workdir)
  resolve_data(config)
  check_evaluation_available(config)
  loader, mesh = prepare_data(config, workdir)
  schedule = optimizer_lib.make_schedule(config, global_batch=int(config.train.global_batch),
                                         steps_per_epoch=loader.steps_per_epoch)
  total_steps = int(config.train.num_steps) or schedule.total_steps

  custom_model = model is not None
  model = model if custom_model else build_model(config, train=True)
  state, tx, loss_scale = initial_state(config, model, start, schedule, mesh)
  _print(_run_summary(config, state, mesh, loader, schedule, total_steps))
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    keep=int(config.train.keep_checkpoints),
                                    async_save=bool(config.train.async_checkpoints))
  state, start_step = restore(ckpt, state, loader)
  train_step = build_train_step(config, model, custom_model=custom_model, tx=tx,
                                schedule=schedule, mesh=mesh, state=state, loss_scale=loss_scale)
  writer = open_writer(workdir, start_step)
  end_step = total_steps if stop_after is None else min(total_steps, int(stop_after))

  state, step, history = train_loop(
      config, state, train_step, loader=loader, ckpt=ckpt, writer=writer, mesh=mesh,
      start_step=start_step, end_step=end_step, total_steps=total_steps, t_start=t_start)
  if step > start_step:
    _print(f"trained to step {step} in {_fmt_time(time.time() - t_start)}")
  if step >= total_steps and not custom_model:
    export_variables(config, state, os.path.join(workdir, "model"))
  final = None
  if step >= total_steps and bool(config.train.get("final_eval", True)):
    final = final_evaluation(config, state, workdir=workdir, mesh=mesh, writer=writer, step=step,
                             t_start=t_start)
  writer.close()
  return dict(step=step, metrics=final, history=history, state=state)
