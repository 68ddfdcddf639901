"""The parity tests check the recipes users run: no test may change a field of the recipe it loads.

Each tests/test_parity_*.py loads its recipe through `parity_common.load_recipe` (a frozen
config: an assignment raises) and converts through `parity_common.converted` (the converter's own
decisions, e.g. the BatchNorm eps of the file). This test reads their source and fails when one
loads a recipe another way, builds a model config by hand, or assigns to a config field.
"""
from __future__ import annotations

import ast
from pathlib import Path

import ml_collections
import pytest

from tests import parity_common as pc

TESTS = Path(__file__).resolve().parent
PARITY_TESTS = sorted(TESTS.glob("test_parity_*.py"))
FORBIDDEN_CALLS = {"load_config_file", "mask_rcnn", "ModelConfig", "unlocked", "update",
                   "convert_state_dict"}


def _violations(source: str) -> list[str]:
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
      targets = node.targets if isinstance(node, ast.Assign) else [node.target]
      for t in targets:
        # config.x = ..., fx.model.y = ..., config["model"] = ...: any attribute or item store
        # on a name that holds a config.
        base = t
        while isinstance(base, (ast.Attribute, ast.Subscript)):
          base = base.value
        if isinstance(base, ast.Name) and "config" in base.id and base is not t:
          found.append(f"line {node.lineno}: assignment to {ast.unparse(t)}")
    if isinstance(node, ast.Call):
      fn = node.func
      name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
      if name in FORBIDDEN_CALLS:
        found.append(f"line {node.lineno}: call to {name}")
  return found


def test_there_are_parity_tests():
  assert len(PARITY_TESTS) >= 3, PARITY_TESTS


@pytest.mark.parametrize("path", PARITY_TESTS, ids=lambda p: p.name)
def test_parity_test_runs_the_shipped_recipe(path):
  problems = _violations(path.read_text())
  assert not problems, f"{path.name} does not run the recipe as shipped: {problems}"


def test_the_guard_catches_overrides():
  """The checks above can fail: each kind of override is detected."""
  assert _violations("config.model.roi_align_max_grid = 21\n")
  assert _violations("cfg = config_lib.load_config_file(p)\n")
  assert _violations("with config.unlocked():\n  pass\n")
  assert not _violations("config = pc.load_recipe(p)\nx = config.model.depth\n")


def test_loaded_recipes_are_frozen():
  config = pc.load_recipe(TESTS.parent / "configs" / "mmdet" / "mask_rcnn_r50_fpn_1x_coco.py")
  assert isinstance(config, ml_collections.FrozenConfigDict)
  with pytest.raises(AttributeError):
    config.model.roi_align_max_grid = 21
