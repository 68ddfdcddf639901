"""Building the model from a config and describing its variables."""
from __future__ import annotations

from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import ml_collections

from maskrcnn_jax.modeling.mask_rcnn import MaskRCNN, ModelConfig


def build_model(config: ml_collections.ConfigDict, *, train: bool = False,
                precision: Any = None) -> MaskRCNN:
  return MaskRCNN(ModelConfig.from_config(config), train=train, precision=precision)


def dummy_inputs(batch: int = 1, hw: Tuple[int, int] = (64, 64)):
  """Inputs of the right structure for init / eval_shape: a blank padded batch."""
  images = jnp.zeros((batch, hw[0], hw[1], 3), jnp.float32)
  image_hw = jnp.tile(jnp.array([hw], jnp.int32), (batch, 1))
  scale = jnp.ones((batch, 2), jnp.float32)
  return images, image_hw, image_hw, scale


def init_variables(model: MaskRCNN, rng: jax.Array, hw: Tuple[int, int] = (64, 64)):
  """Randomly initialised {'params', 'batch_stats'} for `model` (jitted: tracing op by op is slow)."""
  return jax.jit(model.init)(rng, *dummy_inputs(1, hw))


def variable_shapes(model: MaskRCNN) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
  """Flat {(collection, module, ..., name): shape} of every variable, without allocating them."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *dummy_inputs(1, (64, 64))))
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}
