"""The import direction of docs/internals.md ("Map"), enforced on every import statement (module
level or inside a function) of the package:

  pallas_kernels <- ops <- modeling <- training / evaluation <- CLIs (train, evaluate, predict,
  convert)

with the leaves errors, conventions and config_lib usable from every layer that needs them, data/
(host-side input pipeline) beside modeling, and checkpoints/ (reading zoo files into the model's
variables) above modeling.
"""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLIS = {"train", "evaluate", "predict", "convert", "cli"}

# Layer of a module -> the layers it may import (itself included).
LEAVES = {"errors", "conventions", "config_lib", "data.coco_categories"}
ALLOWED = {
    "pallas_kernels": {"pallas_kernels"},
    "errors": set(),
    "conventions": {"errors"},
    "config_lib": {"errors", "conventions", "data.coco_categories"},
    "data.coco_categories": set(),
    "ops": {"pallas_kernels", "ops"} | LEAVES,
    "modeling": {"pallas_kernels", "ops", "modeling"} | LEAVES,
    "data": {"ops", "data"} | LEAVES,
    "checkpoints": {"ops", "modeling", "data", "checkpoints"} | LEAVES,
    "training": {"pallas_kernels", "ops", "modeling", "data", "checkpoints", "evaluation",
                 "training", "inference"} | LEAVES,
    "evaluation": {"pallas_kernels", "ops", "modeling", "data", "checkpoints", "evaluation",
                   "inference"} | LEAVES,
    "inference": {"ops", "modeling", "data", "checkpoints", "inference"} | LEAVES,
}


def layer_of(dotted: str) -> str | None:
  """'maskrcnn_jax.ops.nms' -> 'ops'; 'pallas_kernels.roi_align.x' -> 'pallas_kernels'; a
  module outside the project -> None."""
  parts = dotted.split(".")
  if parts[0] == "pallas_kernels":
    return "pallas_kernels"
  if parts[0] != "maskrcnn_jax" or len(parts) == 1:
    return None
  if ".".join(parts[1:3]) in LEAVES:
    return ".".join(parts[1:3])
  head = parts[1]
  return "cli:" + head if head in CLIS else head


def imported_modules(path: pathlib.Path, module: str) -> list:
  """(line, dotted name) of every project module `path` imports ('from a import b' yields a.b
  when b is a module, else a)."""
  out = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out += [(node.lineno, a.name) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative import
        pkg = module.split(".")[:-node.level]
        base = ".".join(pkg + ([base] if base else []))
      for a in node.names:
        candidate = f"{base}.{a.name}"
        is_module = (ROOT / (candidate.replace(".", "/") + ".py")).exists() or (
            ROOT / candidate.replace(".", "/")).is_dir()
        out.append((node.lineno, candidate if is_module else base))
  return out


def violations(root: pathlib.Path = ROOT) -> list:
  found = []
  for path in sorted(list((root / "maskrcnn_jax").rglob("*.py")) +
                     list((root / "pallas_kernels").rglob("*.py"))):
    rel = path.relative_to(root)
    module = ".".join(rel.with_suffix("").parts)
    if module.endswith(".__init__"):
      module = module[: -len(".__init__")]
    mine = layer_of(module)
    if mine is None or mine.startswith("cli:"):
      continue  # the CLIs may import anything
    for line, name in imported_modules(path, module):
      theirs = layer_of(name)
      if theirs is None or theirs == mine:
        continue
      if theirs.startswith("cli:") or theirs not in ALLOWED[mine]:
        found.append(f"{rel}:{line}: {mine} imports {name}")
  return found


def test_layer_table_covers_every_package():
  for path in (ROOT / "maskrcnn_jax").iterdir():
    name = path.stem if path.suffix == ".py" else path.name
    if name.startswith("__") or not (path.suffix == ".py" or (path / "__init__.py").exists()):
      continue
    assert name in ALLOWED or name in CLIS, f"maskrcnn_jax/{path.name}: no layer in ALLOWED"


def test_the_checker_sees_an_upward_import(tmp_path):
  # A fake tree with ops importing training must be reported (the check can fail).
  for pkg in ("maskrcnn_jax", "maskrcnn_jax/ops", "maskrcnn_jax/training", "pallas_kernels"):
    (tmp_path / pkg).mkdir(parents=True)
    (tmp_path / pkg / "__init__.py").write_text("")
  (tmp_path / "maskrcnn_jax/training/losses.py").write_text("X = 1\n")
  (tmp_path / "maskrcnn_jax/ops/bad.py").write_text(
      "def f():\n  from maskrcnn_jax.training import losses\n  return losses\n")
  global ROOT
  saved, ROOT = ROOT, tmp_path
  try:
    assert violations(tmp_path) == [
        "maskrcnn_jax/ops/bad.py:2: ops imports maskrcnn_jax.training.losses"]
  finally:
    ROOT = saved


def test_imports_point_down():
  found = violations()
  assert not found, "imports against the layer order (docs/internals.md, Map):\n" + "\n".join(found)
