"""Loads the golden test vectors of ../shared/reference/golden (see its README.md).

The golden folder sits next to the repository (`<parent of repo>/shared/reference/golden`); tests
that need it are skipped with a clear message where it is missing.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

GOLDEN_DIR = Path(__file__).resolve().parents[1].parent / "shared/reference/golden"


def load(name: str):
  """Returns `np.load(<GOLDEN_DIR>/<name>)` (".npz" appended if missing), or skips the test."""
  if not name.endswith(".npz"):
    name += ".npz"
  path = GOLDEN_DIR / name
  if not path.is_file():
    pytest.skip(f"golden file {path} not found: the shared reference folder (../shared next to the "
                "repository) is not available here")
  return np.load(path)
