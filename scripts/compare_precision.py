"""Mixed precision vs float32 on the same steps: the loss curves of one recipe trained twice.

  python scripts/compare_precision.py --config configs/quickstart.py --steps 200 \
      --workdir /tmp/precision [--dtypes float32 bfloat16]

Runs `maskrcnn_jax.train`'s loop (trainer.train_and_evaluate, the recipe's schedule, stopped after
--steps) once per dtype from the same seed, data order and initial weights (model.dtype only
changes the compute dtype: float32 master weights in every run), then compares the logged loss
curves (`train/loss` and each `train/loss_*` term, means over train.log_every steps): for each
logged step the relative difference |x - x_float32| / |x_float32|, and prints the largest, the
mean and the table. Writes <workdir>/comparison.json. The figures in docs/training.md came from
this script.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(config, workdir, dtype, steps, model=None):
  """Trains `config` in `dtype` for `steps` steps in workdir/<dtype>; returns the logged history."""
  from maskrcnn_jax.training import trainer
  c = type(config)(config.to_dict())
  c.model.dtype = dtype
  c.train.final_eval = False
  out = trainer.train_and_evaluate(c, os.path.join(workdir, dtype), stop_after=steps, model=model)
  return out["history"]


def compare(histories, reference="float32"):
  """{dtype: {'max_rel': ..., 'mean_rel': ..., 'rows': [(step, key, ref, value, rel)]}} of every
  dtype against `reference` over the logged loss keys."""
  ref = {h["step"]: h for h in histories[reference]}
  result = {}
  for dtype, history in histories.items():
    if dtype == reference:
      continue
    rows = []
    for h in history:
      r = ref.get(h["step"])
      if r is None:
        continue
      for key in sorted(k for k in h if k == "loss" or k.startswith("loss_")):
        rel = abs(h[key] - r[key]) / max(abs(r[key]), 1e-12)
        rows.append((h["step"], key, r[key], h[key], rel))
    rels = [row[-1] for row in rows]
    total = [row[-1] for row in rows if row[1] == "loss"]
    result[dtype] = dict(max_rel=max(rels), mean_rel=sum(rels) / len(rels),
                         max_rel_total_loss=max(total), rows=rows)
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/quickstart.py")
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--dtypes", nargs="+", default=("float32", "bfloat16"))
  args = parser.parse_args()
  from maskrcnn_jax import config_lib
  config = config_lib.load_config_file(args.config)
  histories = {d: run(config, args.workdir, d, args.steps) for d in args.dtypes}
  result = compare(histories, reference=args.dtypes[0])
  with open(os.path.join(args.workdir, "comparison.json"), "w") as f:
    json.dump(dict(config=args.config, steps=args.steps, histories=histories, comparison=result),
              f, indent=1)
  for dtype, r in result.items():
    print(f"\n{dtype} vs {args.dtypes[0]}, {args.config}, {args.steps} steps: largest relative "
          f"difference of a logged loss mean {r['max_rel']:.4f} (total loss {r['max_rel_total_loss']:.4f}), "
          f"mean {r['mean_rel']:.4f}")
    print(f"{'step':>6} {'loss':<16}{args.dtypes[0]:>12}{dtype:>12}{'rel':>9}")
    for step, key, a, b, rel in r["rows"]:
      if key == "loss":
        print(f"{step:>6} {key:<16}{a:>12.4f}{b:>12.4f}{rel:>9.4f}")


if __name__ == "__main__":
  main()
