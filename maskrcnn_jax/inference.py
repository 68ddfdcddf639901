"""Host-side inference: image file -> preprocessed batch -> jitted model -> pasted masks -> COCO results.

The model returns fixed-size detections with 28x28 (C4: 14x14) mask probabilities; pasting into the original
image (bounded memory: only inside each box) and RLE encoding happen here on the host, following
the convention's paste algorithm and threshold (parity_spec 3.13).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maskrcnn_jax import conventions as conventions_lib
from maskrcnn_jax.data import coco_categories
from maskrcnn_jax.data import transforms
from maskrcnn_jax.modeling.build import build_model
from maskrcnn_jax.ops import paste as paste_lib


def preprocess_image(image: np.ndarray, config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """[H, W, 3] uint8 in the convention's decoder channel order -> the model inputs of one image."""
  return transforms.preprocess(image, **transforms.preprocess_kwargs(config))


def category_ids(config: ml_collections.ConfigDict) -> np.ndarray:
  """Maps the model's label index to the dataset category id.

  bg_last layouts: label i -> the i-th category id of the dataset (COCO: the 80 sorted ids).
  torchvision (bg_first): the label already is the COCO category id.
  """
  conv = conventions_lib.get(config.convention)
  ids = config.get("category_ids", None)
  if conv.class_layout == "bg_first":
    return np.arange(config.model.num_classes + 1)
  return np.asarray(ids if ids else coco_categories.COCO_CATEGORY_IDS)


def category_names(config: ml_collections.ConfigDict) -> Dict[int, str]:
  names = config.get("category_names", None)
  ids = config.get("category_ids", None)
  if names and ids:
    return dict(zip(ids, names))
  return dict(zip(coco_categories.COCO_CATEGORY_IDS, coco_categories.COCO_CLASS_NAMES))


def paste_masks(mask_probs: np.ndarray, boxes: np.ndarray, image_hw: Sequence[int],
                convention: str) -> List[np.ndarray]:
  """Binary full-image masks, one [H, W] bool array per detection (the convention's paste rule,
  `paste.convention_args`).

  mask_probs: [D, M, M] float32 (M = 28, or 14 for C4); boxes: [D, 4] float32 xyxy in
  original-image pixels.
  """
  return list(paste_lib.paste_masks(mask_probs, boxes, image_hw,
                                    **paste_lib.convention_args(convention)))


@dataclasses.dataclass
class Predictor:
  """A jitted model with its variables; call it on decoded images.

  The jit cache holds one executable per padded input size (multiples of size_divisibility), the
  exact padding the reference frameworks use, so results match them.
  """
  config: ml_collections.ConfigDict
  variables: Any
  precision: Any = None

  def __post_init__(self):
    self.model = build_model(self.config, precision=self.precision)
    self._forward = jax.jit(self.model.apply)

  def raw(self, batch: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """Runs the model on one preprocessed image; returns numpy arrays without the batch axis."""
    out = self._forward(
        self.variables, jnp.asarray(batch["image"])[None],
        jnp.asarray(batch["image_hw"], jnp.int32)[None],
        jnp.asarray(batch["orig_hw"], jnp.int32)[None],
        jnp.asarray(batch["scale_factor"], jnp.float32)[None])
    return {k: np.asarray(v)[0] for k, v in out.items()}

  def __call__(self, image: np.ndarray) -> Dict[str, Any]:
    """image [H, W, 3] uint8 (convention's channel order) -> detections with binary masks.

    Returns dict: boxes [D, 4] float32 xyxy (original pixels), scores [D], labels [D] int32,
    category_ids [D], masks list of [H, W] bool, and mask_scores [D] for Mask Scoring R-CNN; only
    valid detections, in score order.
    """
    batch = preprocess_image(image, self.config)
    raw = self.raw(batch)
    keep = raw["valid"]
    dets = {k: raw[k][keep] for k in ("boxes", "scores", "labels", "paste_boxes", "mask_probs")}
    if "mask_scores" in raw:
      dets["mask_scores"] = raw["mask_scores"][keep]
    dets["category_ids"] = category_ids(self.config)[dets["labels"]]
    dets["masks"] = paste_masks(dets["mask_probs"], dets["paste_boxes"], image.shape[:2],
                                self.config.convention)
    return dets
