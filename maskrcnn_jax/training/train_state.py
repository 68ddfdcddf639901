"""The train state and the jitted, mesh-sharded train step.

`TrainState` holds everything a resumed run needs besides the data position: step, params (float32
master weights), batch_stats, opt_state and the base rng. The rng of step s is
`fold_in(state.rng, s)`, so the random stream does not depend on where a run was interrupted.

`make_train_step` returns a `jax.jit`-compiled function of (state, batch) for a `Mesh`: the batch is
sharded on 'data', the state replicated (maskrcnn_jax/training/sharding.py). A step whose loss or
gradient norm is not finite leaves the state unchanged (`metrics['finite'] == 0`), so the state the
trainer checkpoints is always the last good one.

Mixed precision (`compute_dtype='bfloat16'` or `'float16'`): the image enters the model in that
dtype; conv / dense layers compute in their input's dtype with float32 kernels cast on the fly
(modeling/layers.py), so the weights, gradients, optimizer state and batch statistics stay float32.
bfloat16 has float32's exponent range, hence no loss scaling; float16 needs it (`loss_scale`, a
`loss_scale.LossScale`: the loss is scaled before differentiation, the gradients unscaled before
the optimizer, and a step with non-finite gradients is skipped: the state keeps its values but
the step counter and the loss scale's state (`TrainState.loss_scale`) advance; the metrics then
report `finite` 1 unless the scale collapsed, plus `loss_scale` and `skipped_steps`).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from maskrcnn_jax.training import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: updates applied so far
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # uint32[2] base key (jax.random.PRNGKey)
  loss_scale: Any = None  # loss_scale.LossScaleState with float16 loss scaling, else None


def create_train_state(variables: Dict[str, Any], tx: optax.GradientTransformation,
                       rng: jax.Array, step: int = 0, loss_scale=None) -> TrainState:
  params = variables["params"]
  return TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                    rng=jnp.asarray(rng),
                    loss_scale=loss_scale.init() if loss_scale is not None else None)


def state_shardings(state: TrainState, mesh: Mesh) -> TrainState:
  """Replicated NamedSharding for every leaf (data parallelism)."""
  rep = sharding_lib.replicated(mesh)
  return jax.tree_util.tree_map(lambda _: rep, state)


def place_state(state: TrainState, mesh: Mesh) -> TrainState:
  return jax.device_put(state, state_shardings(state, mesh))


def _cast_batch(batch: Dict[str, jax.Array], compute_dtype) -> Dict[str, jax.Array]:
  if compute_dtype is None or jnp.dtype(compute_dtype) == jnp.float32:
    return batch
  batch = dict(batch)
  batch["image"] = batch["image"].astype(compute_dtype)
  return batch


def make_loss_fn(model: nn.Module, *, compute_dtype=None, loss_method: Optional[Callable] = None,
                 loss_kwargs: Optional[Dict[str, Any]] = None,
                 prepare_batch: Optional[Callable] = None):
  """(params, batch_stats, batch, rng) -> (loss, (terms, new_batch_stats)).

  Calls `model.apply(variables, batch, rng, method=<Model>.losses, mutable=['batch_stats'])`, on
  `prepare_batch(batch)` when given (the loader's uint8 images and packed masks -> model inputs,
  `ops.inputs.model_inputs`).
  """
  method = loss_method or type(model).losses
  kwargs = dict(loss_kwargs or {})

  def loss_fn(params, batch_stats, batch, rng):
    variables = {"params": params}
    if batch_stats:
      variables["batch_stats"] = batch_stats
    if prepare_batch is not None:
      batch = prepare_batch(batch)
    (loss, terms), new_vars = model.apply(
        variables, _cast_batch(batch, compute_dtype), rng, method=method,
        mutable=["batch_stats"], **kwargs)
    new_stats = new_vars.get("batch_stats", batch_stats) if batch_stats else batch_stats
    terms = {k: jnp.asarray(v, jnp.float32) for k, v in terms.items()}
    return jnp.asarray(loss, jnp.float32), (terms, new_stats)

  return loss_fn


def train_step_fn(model: nn.Module, tx: optax.GradientTransformation, schedule: Callable, *,
                  compute_dtype=None, loss_method: Optional[Callable] = None,
                  loss_kwargs: Optional[Dict[str, Any]] = None, loss_scale=None,
                  prepare_batch: Optional[Callable] = None):
  """The un-jitted step: (state, batch) -> (new_state, metrics dict of float32 scalars).

  loss_scale: a `loss_scale.LossScale` (the state must hold its LossScaleState) or None.
  prepare_batch: runs inside the step before the model (`make_loss_fn`).
  """
  loss_fn = make_loss_fn(model, compute_dtype=compute_dtype, loss_method=loss_method,
                         loss_kwargs=loss_kwargs, prepare_batch=prepare_batch)

  def scaled_loss_fn(params, batch_stats, batch, rng, scale_state):
    loss, aux = loss_fn(params, batch_stats, batch, rng)
    return loss_scale.scale_loss(scale_state, loss), (loss, aux)

  def step(state: TrainState, batch: Dict[str, jax.Array]):
    rng = jax.random.fold_in(state.rng, state.step)
    if loss_scale is None:
      grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
      (loss, (terms, new_stats)), grads = grad_fn(state.params, state.batch_stats, batch, rng)
    else:
      grad_fn = jax.value_and_grad(scaled_loss_fn, has_aux=True)
      (_, (loss, (terms, new_stats))), grads = grad_fn(state.params, state.batch_stats, batch, rng,
                                                       state.loss_scale)
      grads = loss_scale.unscale(state.loss_scale, grads)
    grad_norm = optax.tree.norm(grads)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = state.replace(step=state.step + 1, params=new_params, batch_stats=new_stats,
                              opt_state=new_opt)
    # A non-finite step changes nothing: the trainer stops and the state stays the last good one.
    new_state = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new_state, state)
    metrics = dict(terms)
    metrics.update(loss=loss, lr=jnp.asarray(schedule(state.step), jnp.float32),
                   grad_norm=grad_norm, param_norm=optax.tree.norm(state.params),
                   finite=finite.astype(jnp.float32))
    if loss_scale is not None:
      # An overflow skips the update but not the step (module docstring); the run goes on unless
      # the dynamic scale collapsed.
      scale_state = loss_scale.update(state.loss_scale, finite)
      new_state = new_state.replace(step=state.step + 1, loss_scale=scale_state)
      metrics.update(finite=(finite | (scale_state.scale >= loss_scale.min_scale)).astype(
          jnp.float32), loss_scale=state.loss_scale.scale,
                     skipped_steps=scale_state.skipped.astype(jnp.float32))
    return new_state, metrics

  return step


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule: Callable,
                    mesh: Mesh, state: TrainState, *, compute_dtype=None, donate: bool = True,
                    loss_method: Optional[Callable] = None,
                    loss_kwargs: Optional[Dict[str, Any]] = None, loss_scale=None,
                    prepare_batch: Optional[Callable] = None):
  """jax.jit of `train_step_fn` with the state replicated and the batch sharded on 'data'.

  The batch sharding is taken from the arrays (sharding.shard_batch); outputs: the state
  replicated, the metrics replicated scalars. `prepare_batch` runs inside the step (`make_loss_fn`).
  """
  fn = train_step_fn(model, tx, schedule, compute_dtype=compute_dtype, loss_method=loss_method,
                     loss_kwargs=loss_kwargs, loss_scale=loss_scale, prepare_batch=prepare_batch)
  shardings = state_shardings(state, mesh)
  rep = sharding_lib.replicated(mesh)
  return jax.jit(fn, in_shardings=(shardings, sharding_lib.data_sharding(mesh)),
                 out_shardings=(shardings, rep), donate_argnums=(0,) if donate else ())
