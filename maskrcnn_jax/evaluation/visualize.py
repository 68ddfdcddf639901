"""Drawing detections (masks, boxes, class names, scores) on an image with Pillow."""
from __future__ import annotations

from typing import Dict, Mapping

import numpy as np
from PIL import Image, ImageDraw


def _color(i: int) -> tuple[int, int, int]:
  """A deterministic, well-spread colour per index (golden-ratio hue steps)."""
  import colorsys
  r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.75, 1.0)
  return int(r * 255), int(g * 255), int(b * 255)


def draw(image_rgb: np.ndarray, dets: Dict, names: Mapping[int, str], path: str,
         threshold: float = 0.5, alpha: float = 0.45) -> np.ndarray:
  """Writes `image_rgb` [H, W, 3] uint8 with the detections above `threshold` to `path` (PNG).

  dets: boxes [D, 4] xyxy original pixels, scores [D], category_ids [D], masks list of [H, W] bool.
  Returns the drawn image [H, W, 3] uint8.
  """
  canvas = image_rgb.astype(np.float32).copy()
  keep = [i for i, s in enumerate(dets["scores"]) if s >= threshold]
  for rank, i in enumerate(keep):
    mask = dets["masks"][i]
    color = np.array(_color(rank), np.float32)
    canvas[mask] = canvas[mask] * (1 - alpha) + color * alpha
  img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
  draw_ctx = ImageDraw.Draw(img)
  for rank, i in enumerate(keep):
    x1, y1, x2, y2 = (float(v) for v in dets["boxes"][i])
    color = _color(rank)
    draw_ctx.rectangle([x1, y1, x2, y2], outline=color, width=2)
    cid = int(dets["category_ids"][i])
    label = f"{names.get(cid, str(cid))} {float(dets['scores'][i]):.2f}"
    tx, ty = x1 + 2, max(y1 - 12, 0)
    bbox = draw_ctx.textbbox((tx, ty), label)
    draw_ctx.rectangle(bbox, fill=color)
    draw_ctx.text((tx, ty), label, fill=(0, 0, 0))
  img.save(path)
  return np.asarray(img)
