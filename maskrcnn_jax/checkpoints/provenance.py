"""Model constants that a checkpoint decides and its parameters do not show: the BatchNorm eps.

A converted checkpoint reproduces its framework only with the constants the model ran with. Most
are fixed per framework (`conventions.py`), but the eps of the frozen / eval-mode BatchNorm
layers depends on the file: torchvision's builder sets it to 0 only for its released COCO_V1
Mask R-CNN weights, which were trained before the eps became 1e-5 (`overwrite_eps(model, 0.0)` in
`maskrcnn_resnet50_fpn` when `weights == COCO_V1`); a model anyone built with `weights=None` or
ImageNet backbone weights and trained keeps 1e-5. The recipes leave `model.norm_eps` unset (None)
so that the converter decides it per file and records it in the converted checkpoint's
config.json; `predict`, `evaluate` and training from `config.init` then read it from there. An
explicit `--config.model.norm_eps=...` always wins (and the conversion summary says so).

What decides the eps, per framework (every BN flavour was checked in the framework's source):

| framework | eps | how |
|---|---|---|
| torchvision v1 `maskrcnn_resnet50_fpn` | 0.0 for the COCO_V1 file, else 1e-5 | the file's name or sha256 prefix `bf2d0c1e` (torchvision names its files `<name>-<first 8 hex of sha256>.pth`); FrozenBatchNorm2d (ImageNet backbone) and BatchNorm2d (`weights=None`) both default to 1e-5 |
| torchvision v2 `maskrcnn_resnet50_fpn_v2` | 1e-5 | BatchNorm2d everywhere, no `overwrite_eps` for its weights |
| detectron2 | 1e-5 | `FrozenBatchNorm2d(eps=1e-5)`; `get_norm` 'BN' / 'SyncBN' are torch's BatchNorm2d (1e-5) |
| mmdetection | the `eps` of the `norm_cfg` in the config stored in the file's meta, else 1e-5 | mmcv `build_norm_layer` passes `norm_cfg` through to BatchNorm2d (default 1e-5); mmdet v2 checkpoints carry `meta['config']` (mmengine: `meta['cfg']`) |
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from typing import Any, Mapping, Optional

from maskrcnn_jax import errors

# torchvision's released v1 Mask R-CNN weights (MaskRCNN_ResNet50_FPN_Weights.COCO_V1).
TORCHVISION_COCO_V1_FILE = "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"
TORCHVISION_COCO_V1_SHA256_PREFIX = "bf2d0c1e"
DEFAULT_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class Decision:
  """A constant decided for a checkpoint: the value and why (for the conversion summary)."""
  value: float
  reason: str


def _sha256_prefix(path: str, n: int = 8) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()[:n]


def is_torchvision_coco_v1(source: Optional[str]) -> bool:
  """Whether `source` is torchvision's released COCO_V1 Mask R-CNN file, by name or content."""
  if not source:
    return False
  if os.path.basename(source) == TORCHVISION_COCO_V1_FILE:
    return True
  return os.path.isfile(source) and _sha256_prefix(source) == TORCHVISION_COCO_V1_SHA256_PREFIX


def mmdet_config_eps(meta: Optional[Mapping[str, Any]]) -> Optional[float]:
  """The BatchNorm eps of the config text an mmdet checkpoint stores in its meta, if it sets one.

  mmdet v2 saves the config as `meta['config']` (a Python-syntax string), mmengine as
  `meta['cfg']`. Returns the eps of the `norm_cfg=dict(...)` entries that set one (they must
  agree), None when none does (then mmcv's default 1e-5 applied).
  """
  if not meta:
    return None
  text = meta.get("config") or meta.get("cfg")
  if not isinstance(text, str):
    return None
  values = set()
  for body in re.findall(r"norm_cfg\s*=\s*dict\(([^()]*)\)", text):
    match = re.search(r"\beps\s*=\s*([0-9.eE+-]+)", body)
    if match:
      values.add(float(match.group(1)))
  if len(values) > 1:
    raise errors.CheckpointContentError(
        f"the checkpoint's stored config sets several BatchNorm eps: {sorted(values)}")
  return values.pop() if values else None


def norm_eps(framework: str, *, torchvision_v2: bool = False, source: Optional[str] = None,
             meta: Optional[Mapping[str, Any]] = None) -> Decision:
  """The eps the checkpoint's BatchNorm layers ran with (module docstring table).

  Args:
    framework: 'torchvision' | 'detectron2' | 'mmdet' (the recipe's convention).
    torchvision_v2: the torchvision checkpoint is `maskrcnn_resnet50_fpn_v2`.
    source: the checkpoint's path or file name (torchvision v1: identifies COCO_V1).
    meta: the reader's meta of the file (`torch_reader.load_checkpoint`); mmdet: its config.
  """
  if framework == "torchvision":
    if torchvision_v2:
      return Decision(DEFAULT_EPS, "torchvision v2: BatchNorm2d default eps")
    if is_torchvision_coco_v1(source):
      return Decision(0.0, f"torchvision COCO_V1 weights ({TORCHVISION_COCO_V1_FILE}): the "
                           "builder overwrites the eps with 0")
    return Decision(DEFAULT_EPS, "torchvision weights other than COCO_V1: eps 1e-5 (the "
                                 "builder overwrites it with 0 only for COCO_V1)")
  if framework == "mmdet":
    eps = mmdet_config_eps((meta or {}).get("meta"))
    if eps is not None:
      return Decision(eps, "mmdet: norm_cfg eps of the config stored in the checkpoint")
    return Decision(DEFAULT_EPS, "mmdet: BatchNorm default eps (no eps in a stored norm_cfg)")
  if framework == "detectron2":
    return Decision(DEFAULT_EPS, "detectron2: FrozenBatchNorm2d / BatchNorm default eps")
  raise errors.ConfigError(f"unknown framework {framework!r}")


def is_torchvision_v2(config) -> bool:
  """Whether the recipe is torchvision's `maskrcnn_resnet50_fpn_v2` (its FPN has a norm)."""
  return str(config.convention) == "torchvision" and bool(config.model.get("fpn_norm", ""))


def reads_file_meta(config) -> bool:
  """Whether `norm_eps` needs the checkpoint file's own metadata (mmdet: its stored config)."""
  return str(config.convention) == "mmdet"


def decide(config, *, source: Optional[str] = None, meta: Optional[Mapping[str, Any]] = None,
           recorded=None):
  """A copy of `config` with the checkpoint-decided constants filled in, and a note on each.

  `config.model.norm_eps` None (the recipes' default) takes the checkpoint's eps: the value a
  converted checkpoint or training run recorded (`recorded`, its config.json ConfigDict) or else
  what `norm_eps` decides for the file `source`. An explicit value is kept (the note says when it
  differs from the checkpoint's).

  Returns (config copy, list of human-readable notes).
  """
  import ml_collections  # pylint: disable=g-import-not-at-top

  resolved = ml_collections.ConfigDict(config.to_dict())
  given = config.model.get("norm_eps", None)
  if recorded is not None and recorded.get("model", {}).get("norm_eps", None) is not None:
    decision = Decision(float(recorded.model.norm_eps), "recorded in the checkpoint's config.json")
  elif source is not None or meta is not None:
    decision = norm_eps(str(config.convention),
                        torchvision_v2=bool(config.model.get("fpn_norm", "")), source=source,
                        meta=meta)
  else:
    decision = None
  notes = []
  if given is None and decision is not None:
    resolved.model.norm_eps = decision.value
    notes.append(f"model.norm_eps = {decision.value:g} ({decision.reason})")
  elif given is not None and decision is not None and float(given) != decision.value:
    notes.append(f"model.norm_eps = {float(given):g} as given, although the checkpoint says "
                 f"{decision.value:g} ({decision.reason})")
  return resolved, notes
