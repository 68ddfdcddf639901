"""Training checkpoints (orbax) and initialization from converted / zoo checkpoints.

Layout of `<workdir>/checkpoints/`:

  <step>/state/     orbax PyTree of TrainState: step, params, batch_stats, opt_state, rng
  <step>/loader/    JSON: {"process_count": P, "states": [loader.state() of each process]}

Saving is periodic (`train.checkpoint_every`), asynchronous (the device-to-host copy happens in
`save`, the file writes in a background thread, so training continues), keeps the last
`train.keep_checkpoints`, and atomic: orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it
into place once complete, and ignores (then deletes) such temporary folders when a run restarts.
A run killed at any point (SIGKILL included) restarts from the newest complete checkpoint.

The data position saved with step s is the loader position after s batches, so that a resumed run
sees exactly the batches that an uninterrupted one would (maskrcnn_jax/data/loader.py).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from maskrcnn_jax import errors

logger = logging.getLogger(__name__)


def _abstract(tree: Any) -> Any:
  """ShapeDtypeStructs with the leaves' shardings: the restore target."""
  def leaf(x):
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)
  return jax.tree_util.tree_map(leaf, tree)


def _gather_loader_states(loader_state: Dict[str, Any]) -> List[Dict[str, Any]]:
  """Every process's loader state (JSON), in process order."""
  if jax.process_count() == 1:
    return [loader_state]
  from jax.experimental import multihost_utils
  data = np.frombuffer(json.dumps(loader_state).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.asarray([data.size], np.int32))
  padded = np.zeros(int(np.max(sizes)), np.uint8)
  padded[:data.size] = data
  everything = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:int(n)]).decode())
          for row, n in zip(np.asarray(everything), np.asarray(sizes).reshape(-1))]


class Checkpointer:
  """orbax CheckpointManager for (TrainState, loader state)."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max(int(keep), 1), create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "loader"))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> Sequence[int]:
    return self._manager.all_steps()

  def save(self, step: int, state: Any, loader_state: Dict[str, Any]) -> bool:
    """Starts saving (asynchronously); returns True if a save was started."""
    states = _gather_loader_states(loader_state)
    return self._manager.save(
        int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            loader=ocp.args.JsonSave({"process_count": len(states), "states": states})),
        force=True)

  def restore(self, state_template: Any, step: Optional[int] = None
              ) -> Tuple[Any, Optional[Dict[str, Any]]]:
    """(state, this process's loader state) of `step` (default: the latest).

    `state_template`: a TrainState of arrays (or ShapeDtypeStructs) with the target shardings.
    The loader state is None when the checkpoint was written by a different number of processes.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise errors.CheckpointNotFoundError(f"no checkpoint in {self.directory}")
    restored = self._manager.restore(
        int(step), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(state_template)),
            loader=ocp.args.JsonRestore()))
    loader = restored["loader"] or {}
    states = loader.get("states", [])
    mine = None
    if loader.get("process_count") == jax.process_count() and len(states) > jax.process_index():
      mine = states[jax.process_index()]
    elif states:
      logger.warning("checkpoint %d was written by %s processes, this run has %d: the data "
                     "position is derived from the step", step, loader.get("process_count"),
                     jax.process_count())
    return restored["state"], mine

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def load_step_variables(step_dir: str) -> Dict[str, Any]:
  """{'params', 'batch_stats'} of one training checkpoint `<workdir>/checkpoints/<step>` as numpy.

  Only those two items of the saved TrainState are read (orbax partial restore; the optimizer
  state stays on disk), with no device placement, so any machine can read any run's checkpoint.
  """
  path = os.path.join(os.path.abspath(step_dir), "state")
  with ocp.PyTreeCheckpointer() as ckptr:
    meta = ckptr.metadata(path)
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
    wanted = {k: tree[k] for k in ("params", "batch_stats") if k in tree}
    restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                          wanted)
    out = ckptr.restore(path, args=ocp.args.PyTreeRestore(item=wanted, restore_args=restore_args,
                                                          partial_restore=True))
  out = dict(out)
  out.setdefault("batch_stats", {})
  return out


# ------------------------------------------------------------------------------------------------
# Initialization from a converted or zoo checkpoint (config.init)
# ------------------------------------------------------------------------------------------------

# The layers whose shape depends on the number of classes (docs/internals.md variable tree).
CLASS_DEPENDENT = (
    ("box_predictor", "cls_score"),
    ("box_predictor", "bbox_pred"),
    ("mask_head", "predictor"),
    ("maskiou_head", "fc_mask_iou"),
)


def is_class_dependent(path: Tuple[str, ...]) -> bool:
  """path: (collection, module, ..., name) or (module, ..., name)."""
  if path and path[0] in ("params", "batch_stats"):
    path = path[1:]
  return any(tuple(path[:len(p)]) == p for p in CLASS_DEPENDENT)


def init_settings(config: ml_collections.ConfigDict
                  ) -> Tuple[ml_collections.ConfigDict, List[str]]:
  """`config` with the constants its `init` checkpoint decides (checkpoints/provenance.py: the
  BatchNorm eps, where the recipe leaves it unset): read from a converted directory's
  config.json, or decided for a zoo file. Returns (config copy, notes)."""
  from maskrcnn_jax.checkpoints import orbax_io, provenance, torch_reader
  source = config.init
  if os.path.isdir(source):
    return provenance.decide(config, recorded=orbax_io.load_saved_config(source))
  if not os.path.isfile(source):
    raise errors.CheckpointNotFoundError(
        f"config.init={source!r}: neither a converted checkpoint directory "
        "nor a checkpoint file")
  meta = None
  if provenance.reads_file_meta(config):  # mmdet: the eps of the config stored in the file
    _, _, meta = torch_reader.load_checkpoint(source)
  return provenance.decide(config, source=source, meta=meta)


def _read_init(config: ml_collections.ConfigDict, source: str) -> Tuple[Dict[str, Any], int]:
  """(variables, num_classes of the source) from a converted dir or a zoo .pth/.pkl file."""
  if os.path.isdir(source):
    from maskrcnn_jax.checkpoints import orbax_io
    variables = orbax_io.load_variables(source)
    saved = orbax_io.load_saved_config(source)
    if saved is not None and "model" in saved and "num_classes" in saved.model:
      num_classes = int(saved.model.num_classes)
    else:
      num_classes = -1  # unknown: decided by the shapes
    return variables, num_classes
  if not os.path.isfile(source):
    raise errors.CheckpointNotFoundError(
        f"config.init={source!r}: neither a converted checkpoint directory "
        "nor a checkpoint file")
  from maskrcnn_jax.checkpoints import conversion, name_maps, torch_reader
  _, state, _ = torch_reader.load_checkpoint(source)
  spec = name_maps.infer_spec(state, framework=config.convention)
  src_config = ml_collections.ConfigDict(config.to_dict())
  src_config.model.num_classes = int(spec.num_classes)
  src_config.model.mask_scoring = bool(spec.has_maskiou)
  variables, summary = conversion.convert_state_dict(src_config, state, source=source)
  logger.info("converted %s:\n%s", source, summary)
  return variables, int(spec.num_classes)


def load_init(config: ml_collections.ConfigDict, variables: Dict[str, Any], source: str
              ) -> Tuple[Dict[str, Any], List[str]]:
  """Overwrites the freshly initialised `variables` with those of `source`.

  Every variable of the model must be present in the source with the same shape, except the
  class-dependent layers (CLASS_DEPENDENT) when the class count differs: those keep their fresh
  initialisation (what detectron2's checkpointer and mmcv's load_checkpoint do when they skip
  shape-mismatched class layers). Variables of the source that the model does not have (e.g. a
  MaskIoU head when fine-tuning plain Mask R-CNN) are ignored and listed in the log.

  Returns (variables, '/'-joined paths that were re-initialised).
  """
  loaded, src_classes = _read_init(config, source)
  target = traverse_util.flatten_dict(jax.tree_util.tree_map(np.asarray, dict(variables)))
  src = traverse_util.flatten_dict(dict(loaded))
  num_classes = int(config.model.num_classes)
  reinit, missing, mismatched = [], [], []
  out = {}
  for path, value in target.items():
    name = "/".join(path)
    if is_class_dependent(path) and (src_classes not in (-1, num_classes)
                                     or (path in src and np.shape(src[path]) != value.shape)):
      reinit.append(name)
      out[path] = value
      continue
    if path not in src:
      missing.append(name)
      continue
    if np.shape(src[path]) != value.shape:
      mismatched.append(f"{name}: checkpoint {np.shape(src[path])} vs model {value.shape}")
      continue
    out[path] = np.asarray(src[path], value.dtype)
  if missing or mismatched:
    raise errors.CheckpointContentError(
        f"config.init={source}: the checkpoint does not fit the model "
        f"({len(missing)} missing, {len(mismatched)} with another shape):\n  "
        + "\n  ".join((missing + mismatched)[:40]))
  unused = sorted("/".join(p) for p in src if p not in target)
  if unused:
    logger.info("config.init: %d checkpoint variables not in the model (ignored): %s",
                len(unused), ", ".join(unused[:10]))
  if reinit:
    logger.info("config.init: %d -> %d classes: re-initialised %s", src_classes, num_classes,
                ", ".join(reinit))
  return traverse_util.unflatten_dict(out), reinit


# ------------------------------------------------------------------------------------------------
# Initialization from the recipe's ImageNet backbone (config.model.backbone_init)
# ------------------------------------------------------------------------------------------------

# The modules an ImageNet file fills: the ResNet, and res5 in the RoI head of the C4 architecture.
BACKBONE_MODULES = ("backbone", "roi_res5")


def has_checkpoint(directory: str) -> bool:
  """Whether `directory` (a run's checkpoints/ folder) holds a complete step (orbax writes each
  into a temporary folder and renames it to the step number when done)."""
  return os.path.isdir(directory) and any(
      name.isdigit() and os.path.isdir(os.path.join(directory, name))
      for name in os.listdir(directory))


def resolve_backbone_init(config: ml_collections.ConfigDict):
  """(path, catalogue entry or None) of config.model.backbone_init; raises
  `backbones.BackboneInitError` naming the file and its link when it is not on disk."""
  from maskrcnn_jax.checkpoints import backbones
  return backbones.resolve(str(config.model.backbone_init))


def read_backbone_init(config: ml_collections.ConfigDict,
                       shapes: Dict[Tuple[str, ...], Tuple[int, ...]], *,
                       path: Optional[str] = None, entry: Any = None
                       ) -> Tuple[Dict[Tuple[str, ...], np.ndarray], str]:
  """Reads and checks the ImageNet file of config.model.backbone_init for a model.

  Args:
    config: the run's config (model.backbone_init, depth, arch and the pixel settings).
    shapes: the model's variables, {(collection, module, ..., name): shape}, e.g.
      `modeling.build.variable_shapes(model)`; those under BACKBONE_MODULES must all come from the
      file with these shapes.
    path, entry: the resolved file (`resolve_backbone_init`), resolved here when None.

  Returns:
    ({path: float32 array} of every backbone variable, a one-line summary for the log).

  Raises:
    backbones.BackboneInitError (one line): missing file, a pixel convention or network that is
      not the config's, a backbone key missing from the file, an unknown key, a shape mismatch.
  """
  from maskrcnn_jax.checkpoints import backbones, diagnose, name_maps
  from maskrcnn_jax.checkpoints.torch_reader import CheckpointError
  if path is None:
    path, entry = resolve_backbone_init(config)
  name = os.path.basename(path)
  m = config.model
  try:
    state, naming = backbones.read(path)
    convention, how = backbones.file_convention(path, state, entry)
    what = f"model.backbone_init {name} ({how})"
    backbones.check_network(entry, m, what=what)
    backbones.check_convention(convention, m, what=what)
    mapping = name_maps.map_backbone(state, depth=int(m.depth), arch=str(m.get("arch", "FPN")))
    expected = {p: tuple(s) for p, s in shapes.items() if p[1] in BACKBONE_MODULES}
    diagnose.check_backbone(mapping, expected, depth=int(m.depth), state_keys=list(state),
                             source=name)
  except backbones.BackboneInitError:
    raise
  except (OSError, CheckpointError) as e:
    raise backbones.BackboneInitError(" ".join(str(e).split())) from None
  loaded = traverse_util.flatten_dict(mapping.variables)
  dropped = sorted({reason for _, reason in mapping.dropped})
  summary = (f"{name} ({naming} names, {convention.name} style): {len(loaded)} backbone variables"
             + (f", {len(mapping.filled)} norms without statistics given mean 0 / var 1"
                if mapping.filled else "")
             + (f"; dropped {len(mapping.dropped)} keys ({'; '.join(dropped)})"
                if mapping.dropped else "")
             + "; the other modules keep their fresh initialisation")
  return loaded, summary


def load_backbone_init(config: ml_collections.ConfigDict, variables: Dict[str, Any], *,
                       path: Optional[str] = None, entry: Any = None
                       ) -> Tuple[Dict[str, Any], str]:
  """`variables` ({'params', 'batch_stats'}, freshly initialised) with the backbone replaced by
  the ImageNet file of config.model.backbone_init (`read_backbone_init`), as the upstream
  frameworks start training: detectron2's DetectionCheckpointer on MODEL.WEIGHTS, mmcv's
  `init_cfg=dict(type='Pretrained')`, torchvision's `weights_backbone`. Convs, norm affine and
  statistics come from the file (a frozen_bn backbone keeps them fixed); the FPN, RPN and RoI heads
  keep their fresh initialisation. Returns (variables, summary)."""
  target = traverse_util.flatten_dict(jax.tree_util.tree_map(np.asarray, dict(variables)))
  loaded, summary = read_backbone_init(config, {p: np.shape(v) for p, v in target.items()},
                                       path=path, entry=entry)
  return replace_variables(variables, loaded), summary


def replace_variables(variables: Dict[str, Any], loaded: Dict[Tuple[str, ...], np.ndarray]
                      ) -> Dict[str, Any]:
  """`variables` with the leaves at the paths of `loaded` replaced (cast to their dtype)."""
  out = traverse_util.flatten_dict(jax.tree_util.tree_map(np.asarray, dict(variables)))
  for p, v in loaded.items():
    out[p] = np.asarray(v, out[p].dtype)
  return traverse_util.unflatten_dict(out)
