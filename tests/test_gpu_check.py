"""scripts/gpu_check.sh end to end in its dry mode (tiny shapes, interpreted kernels, CPU).

The GPU run measures; this checks that every section of the script runs and reports: a real
Mask R-CNN train step, inference, a whole evaluation, the kernels' correctness against the
reference (which would fail on a wrong kernel) and timings. About 2 minutes of CPU (each section
compiles a model).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_mode(tmp_path):
  env = dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS="cpu")
  proc = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), str(tmp_path), "--dry",
                         "--budget-s", "1200"], capture_output=True, text=True, env=env,
                        timeout=1500)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  report = json.loads((tmp_path / "gpu_check.json").read_text())
  assert report["meta"]["dry"] is True
  rows = report["results"]
  by_section = {}
  for row in rows:
    by_section.setdefault(row["section"], []).append(row)
  # Every section ran (none skipped for the budget) and none failed.
  assert not [r for r in rows if "FAIL" in r["text"] or "error" in r["data"]], rows
  kernels = by_section["kernels"]
  assert {r["name"] for r in kernels} == {"mosaic_interpret float32", "mosaic_interpret bfloat16"}
  assert all(r["data"]["ok"] and r["data"]["fwd_rel_err"] < 1e-5 for r in kernels
             if "float32" in r["name"])
  speed = {r["name"]: r["data"] for r in by_section["kernel_speed"]}
  assert all(d["fwd_ms"] > 0 and d["fwd_bwd_ms"] > 0 for d in speed.values()) and len(speed) == 2
  (train,) = by_section["train"]
  assert train["name"] == "bfloat16 batch 2" and train["data"]["images_per_s"] > 0
  assert train["data"]["global_batch"] == 2 and train["data"]["dtype"] == "bfloat16"
  (inference,) = by_section["inference"]
  assert inference["data"]["ms"] > 0
  (evaluation,) = by_section["evaluation"]
  assert evaluation["data"]["images"] == 2 and evaluation["data"]["images_per_s"] > 0
  assert by_section["largest_batch"][0]["text"].startswith("skipped in dry mode")
  table = (tmp_path / "gpu_check.md").read_text()
  assert "| kernels | mosaic_interpret float32 |" in table and "DRY" in table


def test_gpu_check_refuses_without_gpu_unless_dry(tmp_path):
  proc = subprocess.run([sys.executable, str(ROOT / "scripts/gpu_check.py"), "--out",
                         str(tmp_path)], capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
  assert proc.returncode == 2 and "--dry" in proc.stderr and "Traceback" not in proc.stderr


def test_largest_batch_estimate():
  sys.path.insert(0, str(ROOT / "scripts"))
  from gpu_check import largest_batch_estimate
  gb = 1e9
  # 1 GB of state, 3 GB peak at batch 2 (1 GB per image), 80 GB device: (72 - 1) / 1 = 71.
  assert largest_batch_estimate(dict(peak_bytes=3 * gb, bytes_limit=80 * gb,
                                     state_bytes=1 * gb)) == 71
  assert largest_batch_estimate(dict(peak_bytes=None, bytes_limit=80 * gb, state_bytes=0)) is None
