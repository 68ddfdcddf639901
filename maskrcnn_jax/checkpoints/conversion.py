"""A zoo checkpoint -> the variables of a recipe's model (the library half of `convert`).

`convert_file` is what `python -m maskrcnn_jax.convert` runs; `convert_state_dict` is also what
training from a zoo file (`config.init`) and the parity tests call. The converter is strict: it
maps every tensor by name (`name_maps`), checks the result against the model the config builds
(`diagnose.check_against` with `modeling.build.variable_shapes`: the one source of the expected
shapes) and refuses anything unmatched, missing or of another shape, naming each.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from maskrcnn_jax import conventions
from maskrcnn_jax.checkpoints import diagnose, name_maps, orbax_io, provenance, torch_reader
from maskrcnn_jax.modeling.build import build_model, variable_shapes


def model_spec(config) -> name_maps.ModelSpec:
  """The name tables' description of the recipe's model (depth, widths, classes, heads)."""
  m = config.model
  return name_maps.ModelSpec(
      depth=int(m.depth), has_maskiou=bool(m.mask_scoring),
      torchvision_v2=provenance.is_torchvision_v2(config),
      groups=int(m.groups), width_per_group=int(m.width_per_group),
      num_classes=int(m.num_classes), arch=str(m.get("arch", "FPN")))


def to_variables(state: Mapping[str, np.ndarray], *, framework: str, spec: name_maps.ModelSpec,
                 expected: Optional[Mapping[Tuple[str, ...], Tuple[int, ...]]] = None,
                 strict: bool = True, dtype=np.float32, source: Optional[str] = None
                 ) -> name_maps.MappingResult:
  """Checkpoint state dict -> Flax variables of docs/internals.md, checked.

  Args:
    state: name -> np.ndarray as returned by `torch_reader.load_checkpoint` (torch layouts, e.g.
      conv (O, I/g, kh, kw), linear (O, I), ConvTranspose2d (I, O, 2, 2), norms (C,)).
    framework: 'mmdet' | 'detectron2' | 'torchvision' (torchvision: current and 2019 names).
    spec: the model to fill (`model_spec`).
    expected: the model's variables, path tuple (collection first) -> shape
      (`modeling.build.variable_shapes` of the model the config builds).
    strict: raise `CheckpointMismatchError` unless every key that is not dropped on purpose is
      consumed and the tree has exactly the paths and shapes of `expected` (without `expected`:
      only the keys are checked).
    dtype: floating tensors are cast to this (float32 default; None keeps them).
    source: a file name for messages.

  Returns the `name_maps.MappingResult`: variables ({'params', 'batch_stats'} nested dict of
  numpy arrays: conv kernels HWIO, dense kernels (in, out) with RoI-fc rows in NHWC-flatten
  order, deconv (2, 2, in, out), norms params {scale, bias} + batch_stats {mean, var}), sources,
  unmatched and dropped keys.

  Raises:
    LegacyMmdetCheckpointError: an mmdet 1.x file (always checked for framework 'mmdet').
    CheckpointMismatchError: (strict) anything unmatched / missing / of the wrong shape.
  """
  framework = name_maps.canonical_framework(framework)
  if framework == "mmdet":
    name_maps.check_not_mmdet_v1(state, source)
  spec = spec.resolved(state, framework)
  result = name_maps.map_state_dict(state, framework=framework, spec=spec, dtype=dtype)
  if strict:
    if expected is None:  # keys only: every tree path counts as expected
      expected = {p: tuple(np.shape(v))
                  for p, v in name_maps.flatten_variables(result.variables).items()}
    diagnose.check_against(result.variables, expected, unmatched_keys=result.unmatched,
                           sources=result.sources, problems=result.problems,
                           framework=framework, spec=spec, source=source,
                           all_keys=list(state.keys()))
  return result


def convert_state_dict(config, state, source: Optional[str] = None
                       ) -> Tuple[Dict[str, Any], str]:
  """Maps a framework state dict (name -> numpy array, torch layouts) onto the config's model.

  Returns (variables {'params', 'batch_stats'} of float32 numpy arrays, a summary: per module
  the variables matched, then the checkpoint keys left unmatched and those dropped on purpose,
  by name). Raises name_maps.CheckpointMismatchError naming every unmatched key, missing variable
  and shape disagreement with the model `config` builds.
  """
  expected = variable_shapes(build_model(config))
  result = to_variables(state, framework=conventions.get(config.convention).name,
                        spec=model_spec(config), expected=expected, source=source)
  summary = diagnose.describe_match(result.variables, expected, unmatched_keys=result.unmatched,
                                    dropped_keys=result.dropped)
  return result.variables, summary


def convert_file(config, src: str, out: Optional[str] = None):
  """Converts the checkpoint file `src` for `config`; writes a converted directory to `out`.

  The written config.json is `config` with the constants the file decides filled in
  (`provenance`: the BatchNorm eps), so that predict / evaluate / training from it use them
  without the user repeating them; conversion.txt holds the summary. Returns (variables,
  summary, that config).
  """
  _, state, meta = torch_reader.load_checkpoint(src)
  resolved, notes = provenance.decide(config, source=src, meta=meta)
  variables, summary = convert_state_dict(resolved, state, source=src)
  summary = "\n".join([summary] + notes)
  if out:
    orbax_io.save_variables(out, variables, resolved, note=f"source: {src}\n{summary}\n")
  return variables, summary, resolved
