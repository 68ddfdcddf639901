"""CPU (or GPU) inference speed: our jitted Mask R-CNN R-50-FPN vs torchvision's, same image, same weights.

  python scripts/benchmark_inference.py [--image PATH] [--repeats 5] [--threads 2]

Both models get the same deterministic weights (tests.synthetic_weights; the decisive
calibrated ones of tests/fixtures/parity_torchvision.npz when present, so the detection stage does
realistic work) and the same photograph resized to 800 x 1333 style by each framework's own
transform. Prints seconds per image (end to end: preprocess + model + mask paste) for both and the
ratio. torchvision is optional: without it only our numbers are printed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tv_state_dict():
  from tests import synthetic_weights as synthetic
  keys = synthetic.read_key_tsv(
      ROOT / "tests/fixtures/checkpoint_keys/torchvision_maskrcnn_resnet50_fpn_v1.tsv")
  fixture = ROOT / "tests/fixtures/parity_torchvision.npz"
  if fixture.exists():
    return synthetic.state_dict_from_fixture(np.load(fixture), keys), "calibrated fixture"
  return synthetic.seeded_state_dict(keys, seed=0), "seeded (uncalibrated)"


def load_image(path):
  if path:
    from PIL import Image
    return np.asarray(Image.open(path).convert("RGB"))
  import skimage.data
  return skimage.data.coffee()  # 400 x 600 -> resized to 800 x 1200


def time_it(fn, repeats):
  fn()  # warm-up / compile
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), min(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--image", default="")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  args = parser.parse_args()

  import jax
  from maskrcnn_jax import config_lib, inference
  from maskrcnn_jax.checkpoints import conversion

  rgb = load_image(args.image)
  state, weights_kind = tv_state_dict()
  config = config_lib.load_config_file(str(ROOT / "configs/torchvision/maskrcnn_resnet50_fpn.py"))
  variables, _ = conversion.convert_state_dict(config, state)
  predictor = inference.Predictor(config, jax.device_put(variables))
  ours_med, ours_min = time_it(lambda: predictor(rgb), args.repeats)
  batch = inference.preprocess_image(rgb, config)
  dev_med, _ = time_it(lambda: predictor.raw(batch), args.repeats)
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
  print(f"image {rgb.shape[0]}x{rgb.shape[1]} -> padded {batch['image'].shape[:2]}, "
        f"weights: {weights_kind}")
  print(f"maskrcnn_jax end-to-end: {ours_med:.3f} s/image (min {ours_min:.3f}); "
        f"jitted model only: {dev_med:.3f} s/image")
  try:
    import torch
    import torchvision
  except Exception as e:  # pylint: disable=broad-except
    print(f"torchvision not available ({type(e).__name__}: {e}); no side-by-side ratio")
    return
  torch.set_num_threads(args.threads)
  model = torchvision.models.detection.maskrcnn_resnet50_fpn(
      weights=None, weights_backbone=None, num_classes=91).eval()
  from torchvision.models.detection._utils import overwrite_eps
  overwrite_eps(model, 0.0)
  model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
  x = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0

  def tv_run():
    with torch.no_grad():
      out = model([x])[0]
      (out["masks"] > 0.5).numpy()

  tv_med, tv_min = time_it(tv_run, args.repeats)
  print(f"torchvision {torchvision.__version__} (torch {torch.__version__}, {args.threads} "
        f"threads) end-to-end: {tv_med:.3f} s/image (min {tv_min:.3f})")
  print(f"ratio torchvision / maskrcnn_jax (end-to-end, >1 means we are faster): "
        f"{tv_med / ours_med:.2f}")


if __name__ == "__main__":
  main()
