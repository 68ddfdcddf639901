"""The device half of the training input pipeline: uint8 images and bit-packed masks -> model inputs.

The host loader (maskrcnn_jax/data) ships what is cheapest to move: images as uint8 in the decoder's
channel order, zero padded to their bucket, and the mask crops packed 8 pixels to a byte. The jitted
train step turns them into the float32 normalized image and the uint8 {0, 1} crops the model reads.

Normalization is a table lookup (`data.transforms.normalization_table`: the host's own float32
arithmetic evaluated for the 256 values of each channel), so the result is bit-identical to the
host normalization on every backend; XLA's own arithmetic would not be (it turns a division by a
broadcast constant into a multiplication by its reciprocal, ops/boxes.py:exact_div). The padding is
set to 0 after normalizing, as the references pad (parity_spec 3.3).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import jax.numpy as jnp


def normalize_image(image: jnp.ndarray, image_hw: jnp.ndarray, table: jnp.ndarray,
                    source: Sequence[int]) -> jnp.ndarray:
  """Normalizes a batch of uint8 images by table lookup and zeroes the padding.

  Args:
    image: [B, H, W, 3] uint8, decoder channel order, padded at the bottom / right.
    image_hw: [B, 2] int32, the unpadded (h, w) of each image.
    table: [256, 3] float32 (`normalization_table`): table[v, c] is output channel c for value v.
    source: 3 ints, the input channel of each output channel (a static channel permutation).

  Returns:
    [B, H, W, 3] float32, normalized in the network's channel order, 0 outside image_hw.
  """
  table = jnp.asarray(table, jnp.float32)
  index = image.astype(jnp.int32)
  out = jnp.stack([jnp.take(table[:, c], index[..., int(s)], mode="clip")
                   for c, s in enumerate(source)], axis=-1)
  h, w = image.shape[1:3]
  hw = jnp.asarray(image_hw, jnp.int32)
  inside = ((jnp.arange(h)[None, :, None] < hw[:, 0, None, None])
            & (jnp.arange(w)[None, None, :] < hw[:, 1, None, None]))
  return jnp.where(inside[..., None], out, jnp.float32(0))


def unpack_masks(bits: jnp.ndarray) -> jnp.ndarray:
  """[..., S, ceil(S / 8)] uint8 (`np.packbits` along the last axis, big-endian bit order) ->
  [..., S, S] uint8 in {0, 1}."""
  size = bits.shape[-2]
  return jnp.unpackbits(bits, axis=-1, count=size)


def model_inputs(batch: Dict[str, Any], *, table: Optional[jnp.ndarray] = None,
                 source: Sequence[int] = (0, 1, 2)) -> Dict[str, Any]:
  """The loader's batch as the model reads it (`MaskRCNN.losses`).

  Args:
    batch: the loader's arrays. 'image' uint8 is normalized with `table` / `source`
      (`normalize_image`); a float 'image' (torchvision's convention, normalized on the host)
      passes unchanged. 'gt_masks_bits' becomes 'gt_masks' (`unpack_masks`).
    table, source: `data.pipeline.device_normalization(config)`.

  Returns:
    a new dict: image [B, H, W, 3] float32; gt_masks [B, M, S, S] uint8; the other keys as given.
  """
  out = dict(batch)
  if out["image"].dtype == jnp.uint8:
    if table is None:
      raise ValueError("a uint8 image needs the normalization table "
                       "(data.pipeline.device_normalization)")
    out["image"] = normalize_image(out["image"], out["image_hw"], table, source)
  if "gt_masks_bits" in out:
    out["gt_masks"] = unpack_masks(out.pop("gt_masks_bits"))
  return out
