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

from maskrcnn_jax import cli, conventions
from maskrcnn_jax.checkpoints import name_maps, orbax_io, provenance, torch_reader
from maskrcnn_jax.modeling.build import build_model, variable_shapes



def model_spec(config) -> "name_maps.ModelSpec":
  m = config.model
  return name_maps.ModelSpec(
      depth=int(m.depth), has_maskiou=bool(m.mask_scoring),
      torchvision_v2=bool(m.fpn_norm) and config.convention == "torchvision",
      groups=int(m.groups), width_per_group=int(m.width_per_group),
      num_classes=int(m.num_classes), arch=str(m.get("arch", "FPN")))


def convert(config, src: str, out: str | None = None):
  """Converts `src` for `config`; writes to `out` if given.

  The written config.json is `config` with the constants the file decides filled in
  (`checkpoints/provenance.py`: the BatchNorm eps), so that predict / evaluate / training from it
  use them without the user repeating them. Returns (variables, summary, that config).
  """
  _, state, meta = torch_reader.load_checkpoint(src)
  resolved, notes = provenance.decide(config, source=src, meta=meta)
  variables, summary = convert_state_dict(resolved, state, source=src)
  summary = "\n".join([summary] + notes)
  if out:
    orbax_io.save_variables(out, variables, resolved, note=f"source: {src}\n{summary}\n")
  return variables, summary, resolved


def convert_state_dict(config, state, source: str | None = None):
  """Maps a framework state dict (numpy arrays) onto the config's model; strict.

  Returns (variables {'params', 'batch_stats'} of numpy arrays, a match summary string).
  Raises name_maps.CheckpointMismatchError naming every unmatched key, missing variable and
  shape disagreement.
  """
  conventions.get(config.convention)
  src = source
  spec = model_spec(config)
  variables = name_maps.to_variables(state, framework=config.convention, spec=spec, source=src)
  # The name map's own table and the Flax model must agree too (a config/model drift check).
  expected = variable_shapes(build_model(config))
  name_maps.check_against(variables, expected, framework=config.convention, spec=spec,
                          source=src, all_keys=list(state.keys()))
  summary = name_maps.describe_match(variables, expected)
  return variables, summary


def main():
  # Flags are defined here, not at import, so that the CLIs can be imported side by side.
  config = config_flags.DEFINE_config_file("config", None, "Recipe config file.", lock_config=True)
  src = flags.DEFINE_string("src", None, "Checkpoint to convert (.pth or .pkl).")
  out = flags.DEFINE_string("out", None, "Output directory.")
  flags.mark_flags_as_required(["config", "src", "out"])

  def run(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    _, summary, _ = convert(config.value, src.value, out.value)
    print(summary)
    print(f"wrote {out.value}")

  cli.run(run)


if __name__ == "__main__":
  main()
