"""Writing and reading converted model variables as orbax checkpoints (plus the resolved config).

Layout of a converted checkpoint directory:
  DIR/variables/      orbax PyTree checkpoint of {'params': ..., 'batch_stats': ...} (float32)
  DIR/config.json     the resolved ml_collections config (JSON)
  DIR/conversion.txt  what the converter matched (human-readable)
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from maskrcnn_jax import errors


def save_variables(directory: str, variables: Any, config: ml_collections.ConfigDict | None = None,
                   note: str = "") -> None:
  """Writes `variables` (nested dict of arrays) to DIR/variables, the config to DIR/config.json."""
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  target = os.path.join(directory, "variables")
  variables = jax.tree_util.tree_map(np.asarray, variables)
  with ocp.PyTreeCheckpointer() as ckptr:
    ckptr.save(target, variables, force=True)
  if config is not None:
    with open(os.path.join(directory, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  if note:
    with open(os.path.join(directory, "conversion.txt"), "w") as f:
      f.write(note)


def load_variables(directory: str) -> Any:
  """Reads DIR/variables back as a nested dict of numpy arrays.

  Raises errors.CheckpointNotFoundError naming the directory when it holds no converted checkpoint.
  """
  target = os.path.join(os.path.abspath(directory), "variables")
  if not os.path.isdir(target):
    raise errors.CheckpointNotFoundError(
        f"{directory}: no converted checkpoint here (expected a 'variables' folder written by "
        f"python -m maskrcnn_jax.convert)")
  with ocp.PyTreeCheckpointer() as ckptr:
    restored = ckptr.restore(target)
  return jax.tree_util.tree_map(np.asarray, restored)


def load_saved_config(directory: str) -> ml_collections.ConfigDict | None:
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))
