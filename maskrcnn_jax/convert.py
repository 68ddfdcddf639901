"""Converts a released PyTorch checkpoint into an orbax checkpoint for a recipe config.

  python -m maskrcnn_jax.convert --config configs/mmdet/mask_rcnn_r50_fpn_1x_coco.py \
      --src mask_rcnn_r50_fpn_1x_coco_20200205-d4b0c5d6.pth --out converted/r50_fpn_1x

Reads mmdetection `.pth` (legacy or zip format), torchvision `.pth` and detectron2 `.pkl` without
torch, through an unpickling allowlist. Refuses to write anything when a parameter is unmatched or
a shape disagrees with the config's model, naming each one.
"""
from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from maskrcnn_jax import conventions
from maskrcnn_jax.checkpoints import name_maps, orbax_io, torch_reader
from maskrcnn_jax.modeling.build import build_model, variable_shapes

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe config file.", lock_config=True)
_SRC = flags.DEFINE_string("src", None, "Checkpoint to convert (.pth or .pkl).")
_OUT = flags.DEFINE_string("out", None, "Output directory.")


def model_spec(config) -> "name_maps.ModelSpec":
  m = config.model
  return name_maps.ModelSpec(
      depth=int(m.depth), has_maskiou=bool(m.mask_scoring),
      torchvision_v2=bool(m.fpn_norm) and config.convention == "torchvision")


def convert(config, src: str, out: str | None = None):
  """Converts `src` for `config`; writes to `out` if given. Returns (variables, summary)."""
  conventions.get(config.convention)
  _, state, _ = torch_reader.load_checkpoint(src)
  variables = name_maps.to_variables(state, framework=config.convention, spec=model_spec(config))
  expected = variable_shapes(build_model(config))
  name_maps.check_against(variables, expected)
  summary = name_maps.describe_match(variables)
  if out:
    orbax_io.save_variables(out, variables, config, note=f"source: {src}\n{summary}\n")
  return variables, summary


def main(argv):
  del argv
  if not _SRC.value or not _OUT.value:
    raise app.UsageError("--src and --out are required")
  _, summary = convert(_CONFIG.value, _SRC.value, _OUT.value)
  print(summary)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
