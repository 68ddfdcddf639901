"""Runs a converted (or trained) checkpoint on images.

  python -m maskrcnn_jax.predict --config CONFIG --checkpoint DIR --out OUT IMAGE [IMAGE ...]

Writes OUT/predictions.json in the COCO results format (file_name, category_id, bbox [x, y, w, h]
in original pixels, score, segmentation RLE with str counts; mask_score for Mask Scoring R-CNN)
and OUT/<image stem>.png with masks, boxes, class names and scores drawn on the image. Bad input
(a missing or corrupt image, a bad checkpoint, a config typo) exits with status 2 and one line on
stderr (maskrcnn_jax/cli.py).
"""
from __future__ import annotations

import json
import os
import time

from absl import app, flags
from ml_collections import config_flags

from maskrcnn_jax import cli, inference
from maskrcnn_jax import conventions as conventions_lib
from maskrcnn_jax.checkpoints import orbax_io, provenance
from maskrcnn_jax.data import transforms
from maskrcnn_jax.evaluation import coco_format, visualize
from maskrcnn_jax.modeling import build



def predict(config, checkpoint: str, out: str, images, draw_threshold: float = 0.5):
  """Predicts every image; returns the list of COCO result dicts (also written to out)."""
  # Fail on a bad image before spending time on the model.
  decoded = []
  for path in images:
    decoded.append((path, transforms.read_image(path, convention=config.convention)))
  variables = orbax_io.load_variables(checkpoint)
  # The constants the checkpoint decided (BatchNorm eps), recorded by the converter / trainer.
  config, notes = provenance.decide(config, recorded=orbax_io.load_saved_config(checkpoint))
  for note in notes:
    print(note)
  predictor = inference.Predictor(config, variables)
  build.check_variables(predictor.model, variables, source=checkpoint)
  names = inference.category_names(config)
  os.makedirs(out, exist_ok=True)
  results = []
  for path, image in decoded:
    t0 = time.time()
    dets = predictor(image)
    stem = os.path.splitext(os.path.basename(path))[0]
    entries = coco_format.detections_to_coco(
        os.path.basename(path), dets["boxes"], dets["scores"], dets["category_ids"],
        dets["masks"], mask_scores=dets.get("mask_scores"),
        float64_subtract=conventions_lib.get(config.convention).coco_wh_float64)
    results.extend(entries)
    rgb = image[..., ::-1] if not transforms.decoder_is_rgb(config.convention) else image
    visualize.draw(rgb, dets, names, os.path.join(out, f"{stem}.png"), threshold=draw_threshold)
    print(f"{path}: {len(entries)} detections ({time.time() - t0:.2f} s)")
  with open(os.path.join(out, "predictions.json"), "w") as f:
    json.dump(results, f)
  return results


def main():
  # Flags are defined here, not at import, so that the CLIs can be imported side by side.
  config = config_flags.DEFINE_config_file("config", None, "Recipe config file.", lock_config=True)
  checkpoint = flags.DEFINE_string("checkpoint", None, "Converted checkpoint directory.")
  out = flags.DEFINE_string("out", None, "Output directory.")
  threshold = flags.DEFINE_float("draw_threshold", 0.5, "Only detections above this are drawn.")
  flags.mark_flags_as_required(["config", "checkpoint", "out"])

  def run(argv):
    images = argv[1:]
    if not images:
      raise app.UsageError("give at least one image path")
    predict(config.value, checkpoint.value, out.value, images, threshold.value)

  cli.run(run)


if __name__ == "__main__":
  main()
