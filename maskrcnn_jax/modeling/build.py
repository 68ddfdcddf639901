"""Building the model from a config and describing its variables."""
from __future__ import annotations

from typing import Any, Dict, Tuple

from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maskrcnn_jax import errors
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


def check_variables(model: MaskRCNN, variables: Any, *, source: str) -> None:
  """Raises errors.CheckpointContentError unless `variables` has exactly `model`'s variables.

  A checkpoint of another recipe (other depth, classes, heads) is named with its first
  differences rather than failing inside `apply` with a traceback. `source` names the checkpoint.
  """
  expected = variable_shapes(model)
  given = {path: tuple(np.shape(v))
           for path, v in traverse_util.flatten_dict(dict(variables)).items()}
  missing = sorted("/".join(p) for p in expected if p not in given)
  unexpected = sorted("/".join(p) for p in given if p not in expected)
  other = sorted(f"{'/'.join(p)} {given[p]} (model {s})" for p, s in expected.items()
                 if p in given and given[p] != s)
  if missing or unexpected or other:
    parts = [f"{len(v)} {what}: {', '.join(v[:3])}{', ...' if len(v) > 3 else ''}"
             for what, v in (("missing", missing), ("not in the model", unexpected),
                             ("with another shape", other)) if v]
    raise errors.CheckpointContentError(
        f"{source} does not fit the config's model ({'; '.join(parts)}); is --config the "
        "recipe the checkpoint was made for?")
