"""Conventions as data (README, maskrcnn_jax/conventions.py): every per-framework decision of the
model, the data pipeline, training and evaluation reads a field of `Convention`; no code outside
conventions.py branches on which framework it is serving, and every field is read.

Two places legitimately speak of frameworks by name and are exempt:
* config_lib.py builds the per-framework recipes: its branches choose config *values* (which the
  config then carries, visible in every recipe), not code paths.
* checkpoints/ reads the frameworks' checkpoint *files*: name tables and provenance are keyed by the
  file's source framework, which is not a numerical convention.
"""
from __future__ import annotations

import ast
import dataclasses
import pathlib

from maskrcnn_jax import conventions

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "maskrcnn_jax"
EXEMPT = ("conventions.py", "config_lib.py", "checkpoints/")
FRAMEWORK_WORDS = {"mmdet", "mmdetection", "detectron2", "torchvision", "d2", "tv", "mm"}


def _strings(node: ast.AST) -> set:
  if isinstance(node, ast.Constant) and isinstance(node.value, str):
    return {node.value}
  if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
    return set().union(*(_strings(e) for e in node.elts)) if node.elts else set()
  return set()


def _names_convention(node: ast.AST) -> bool:
  """Whether an expression denotes a convention's identity: `<x>.name` of a convention, the
  config's `convention` string, or a variable holding either."""
  text = ast.unparse(node)
  return text.endswith((".name", "convention")) or text in ("name", "framework")


def branches_on_framework(source: str) -> list:
  """(line, code) of each comparison of a convention's identity with a framework's name."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if not isinstance(node, ast.Compare):
      continue
    operands = [node.left] + list(node.comparators)
    words = set().union(*(_strings(o) for o in operands))
    if not words & FRAMEWORK_WORDS:
      continue
    others = [o for o in operands if not _strings(o)]
    if any(_names_convention(o) for o in others):
      found.append((node.lineno, ast.unparse(node)))
  return found


def _package_sources():
  for path in sorted(PACKAGE.rglob("*.py")):
    rel = path.relative_to(PACKAGE).as_posix()
    if rel.startswith(EXEMPT) or rel in EXEMPT:
      continue
    yield rel, path.read_text()


def test_detector_flags_name_branches():
  # The scanner itself: it must catch each spelling used before the conventions became data,
  # and leave comparisons of a field's value (a rule that happens to be named after a framework).
  flagged = branches_on_framework(
      'a = 1 if convention.name == "mmdet" else 2\n'
      'if cfg.conv.name == "detectron2": pass\n'
      'b = config.convention == "mmdet"\n'
      'c = self.convention.name in ("torchvision", "d2")\n'
      'if name == "mmdet": pass\n')
  assert sorted(line for line, _ in flagged) == [1, 2, 3, 4, 5]
  assert branches_on_framework('if rule == "mmdet": pass\nx = conv.resize == "detectron2"\n'
                               'y = form == "mmdet"\nz = conv.name\n') == []


def test_no_module_branches_on_the_framework_name():
  offenders = []
  for rel, source in _package_sources():
    for line, code in branches_on_framework(source):
      offenders.append(f"maskrcnn_jax/{rel}:{line}: {code}")
  assert not offenders, ("branch on a Convention field instead of the framework's name:\n" +
                         "\n".join(offenders))


def test_every_convention_field_is_read():
  fields = [f.name for f in dataclasses.fields(conventions.Convention) if f.name != "name"]
  text = "\n".join(source for _, source in _package_sources())
  text += (PACKAGE / "config_lib.py").read_text()
  unread = [f for f in fields if f".{f}" not in text]
  assert not unread, f"Convention fields nobody reads (dead data): {unread}"


def test_conventions_differ_only_in_fields():
  # One record per framework, all fields set explicitly (no field silently left at a default
  # that belongs to another framework): every field but bn_eps has no default.
  defaults = [f.name for f in dataclasses.fields(conventions.Convention)
              if f.default is not dataclasses.MISSING]
  assert defaults == ["bn_eps"]
  records = [conventions.get(n) for n in ("mmdet", "detectron2", "torchvision")]
  for a in records:
    for b in records:
      if a is not b:
        assert dataclasses.replace(a, name=b.name) != b
