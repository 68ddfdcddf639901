"""Loss scaling for float16 training: static (mmdetection's `fp16 = dict(loss_scale=512.)`) and
dynamic (torch.cuda.amp.GradScaler's rule).

float16 has 5 exponent bits: gradients below ~6e-8 flush to zero and activations above 65504
overflow. The loss is multiplied by `scale` before differentiation, the float32 gradients are
divided by it before the optimizer (any optax transformation: it sees ordinary gradients), and a
step whose gradients are not finite is skipped: parameters, optimizer state and batch statistics
stay as they were, the step counter still advances (mmcv's Fp16OptimizerHook: the runner's
iteration and the learning-rate schedule move on while `GradScaler.step` skips the update).

The rule of `torch.cuda.amp.GradScaler.update` (which mmcv's Fp16OptimizerHook calls):

  overflow:  scale *= backoff_factor (0.5); good_steps = 0
  otherwise: good_steps += 1; when good_steps == growth_interval (2000): scale *= growth_factor
             (2.0), good_steps = 0

`dynamic=False` keeps the scale at `init_scale` (mmcv passes the float loss_scale as the new
scale to every `update`), skipping overflowing steps all the same. The state (scale, good steps,
skipped steps) is part of the TrainState, so checkpoints restore it exactly.

`from_config(config)`: `config.train.loss_scale` is 'none' (the default: dynamic for float16, no
scaling otherwise), 'dynamic' (GradScaler's defaults, init 2**16), a number or a string holding
one (static: the mmdet fp16 recipe's '512.'; a string so that `--config.train.loss_scale=512`
overrides it) or a dict of `LossScale` fields (mmcv's dict form, GradScaler's arguments; a recipe
replaces the string field: `del config.train['loss_scale']` first).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class LossScaleState:
  scale: jax.Array       # float32 scalar: the current loss scale
  good_steps: jax.Array  # int32: finite steps since the scale last changed (GradScaler's tracker)
  skipped: jax.Array     # int32: steps skipped for non-finite gradients since the start


@dataclasses.dataclass(frozen=True)
class LossScale:
  """Static or dynamic loss scaling (module docstring); hashable, static under jit."""
  init_scale: float = 2.0 ** 16
  dynamic: bool = True
  growth_factor: float = 2.0
  backoff_factor: float = 0.5
  growth_interval: int = 2000
  # A scale below this means the gradients overflow whatever the scale: the run stops.
  min_scale: float = 2.0 ** -14

  def __post_init__(self):
    if not self.init_scale > 0:
      raise ValueError(f"loss scale must be > 0, got {self.init_scale}")
    if self.dynamic and not (self.growth_factor > 1 and 0 < self.backoff_factor < 1
                             and self.growth_interval >= 1):
      raise ValueError(f"dynamic loss scaling needs growth_factor > 1, 0 < backoff_factor < 1 "
                       f"and growth_interval >= 1, got {self}")

  def init(self) -> LossScaleState:
    return LossScaleState(scale=jnp.asarray(self.init_scale, jnp.float32),
                          good_steps=jnp.zeros((), jnp.int32), skipped=jnp.zeros((), jnp.int32))

  def scale_loss(self, state: LossScaleState, loss):
    return loss * state.scale.astype(loss.dtype)

  def unscale(self, state: LossScaleState, grads):
    """float32 gradients of the unscaled loss."""
    inv = 1.0 / state.scale
    return jax.tree_util.tree_map(lambda g: g.astype(jnp.float32) * inv, grads)

  def update(self, state: LossScaleState, finite) -> LossScaleState:
    """The state after a step whose gradients were `finite` (a bool scalar)."""
    skipped = state.skipped + jnp.where(finite, 0, 1).astype(jnp.int32)
    if not self.dynamic:
      return state.replace(skipped=skipped)
    good = jnp.where(finite, state.good_steps + 1, 0)
    grow = good >= self.growth_interval
    scale = jnp.where(finite, jnp.where(grow, state.scale * self.growth_factor, state.scale),
                      state.scale * self.backoff_factor)
    return LossScaleState(scale=scale.astype(jnp.float32),
                          good_steps=jnp.where(grow, 0, good).astype(jnp.int32), skipped=skipped)


def from_config(config) -> Optional[LossScale]:
  """The run's LossScale (module docstring), or None for no scaling."""
  dtype = str(config.model.get("dtype", "float32"))
  value: Any = config.get("train", {}).get("loss_scale", None)
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if value is None or (isinstance(value, str) and value.lower() == "none"):
    return LossScale() if dtype == "float16" else None
  if isinstance(value, str):
    if value.lower() == "dynamic":
      return LossScale()
    try:
      value = float(value)
    except ValueError:
      raise ValueError(f"train.loss_scale must be 'none', 'dynamic', a number or a dict, got "
                       f"{value!r}") from None
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return LossScale(init_scale=float(value), dynamic=False)
  if isinstance(value, dict):
    names = {f.name for f in dataclasses.fields(LossScale)}
    unknown = sorted(set(value) - names)
    if unknown:
      raise ValueError(f"train.loss_scale: unknown keys {unknown}; allowed: {sorted(names)}")
    return LossScale(**value)
  raise ValueError(f"train.loss_scale must be 'none', 'dynamic', a number or a dict, got {value!r}")
