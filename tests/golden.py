"""Loads the golden test vectors in tests/fixtures/golden (see its README.md).

The vectors were produced by torchvision 0.28, detectron2 0.6 and mmdet 3.3 / mmcv 2.1 (copied from
the project's shared reference folder so that a clone of the repository tests itself). A missing
file is a test failure, never a skip: a clone without its fixtures must not pass silently.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

GOLDEN_DIR = Path(__file__).resolve().parent / "fixtures" / "golden"


def path(name: str) -> Path:
  """The golden file `name` (".npz" appended if missing); FileNotFoundError if it is absent."""
  if not name.endswith(".npz"):
    name += ".npz"
  p = GOLDEN_DIR / name
  if not p.is_file():
    raise FileNotFoundError(f"golden file {p} is missing: tests/fixtures/golden is part of the "
                            "repository (restore it with git checkout)")
  return p


def load(name: str):
  """Returns `np.load(<GOLDEN_DIR>/<name>)`; raises FileNotFoundError where it is missing."""
  return np.load(path(name))
