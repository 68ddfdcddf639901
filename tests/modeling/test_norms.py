"""Trainable BatchNorm in the RoI heads: statistics over the real RoIs only (layers.Norm `mask`).

The RoI heads run on static-size batches (the mask head on int(512 * 0.25) slots per image of which
only the positives are real, the box head on the sampler's slots), while torchvision's v2 heads and
detectron2 / mmdet heads with norm 'BN' / 'SyncBN' see the real RoIs only. The expected values
here are torch.nn.functional.batch_norm(training=True, momentum=0.1) written out in numpy
(biased variance to normalize, unbiased variance into running_var).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.modeling import heads
from maskrcnn_jax.modeling.layers import Norm
from maskrcnn_jax.modeling.resnet import Res5Head


def torch_bn_train(x, weight, bias, running_mean, running_var, eps=1e-5, momentum=0.1):
  """x [N, H, W, C] float64 -> (y, new_running_mean, new_running_var), as torch computes them."""
  n = x.shape[0] * x.shape[1] * x.shape[2]
  mean = x.mean(axis=(0, 1, 2))
  var = x.var(axis=(0, 1, 2))
  y = (x - mean) / np.sqrt(var + eps) * weight + bias
  new_mean = (1 - momentum) * running_mean + momentum * mean
  new_var = (1 - momentum) * running_var + momentum * var * n / (n - 1)
  return y, new_mean, new_var


def _apply_bn(x, mask, variables=None):
  norm = Norm("bn", train=True)
  if variables is None:
    variables = norm.init(jax.random.PRNGKey(0), x)
    c = x.shape[-1]
    rng = np.random.RandomState(1)
    variables = {"params": {"scale": jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32),
                            "bias": jnp.asarray(rng.randn(c), jnp.float32)},
                 "batch_stats": {"mean": jnp.asarray(rng.randn(c), jnp.float32),
                                 "var": jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32)}}
  y, updates = norm.apply(variables, x, mask, mutable=["batch_stats"])
  return variables, np.asarray(y), jax.tree_util.tree_map(np.asarray, updates["batch_stats"])


def _expected(variables, x_real):
  p, s = variables["params"], variables["batch_stats"]
  return torch_bn_train(x_real.astype(np.float64), np.asarray(p["scale"]), np.asarray(p["bias"]),
                        np.asarray(s["mean"]), np.asarray(s["var"]))


def test_bn_without_mask_is_torch_training_batch_norm():
  x = np.random.RandomState(0).randn(4, 5, 5, 8).astype(np.float32) * 3 + 1
  variables, y, stats = _apply_bn(x, None)
  want_y, want_mean, want_var = _expected(variables, x)
  np.testing.assert_allclose(y, want_y, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats["mean"], want_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["var"], want_var, rtol=1e-5, atol=1e-6)


def test_masked_bn_is_batch_norm_of_the_real_samples():
  rng = np.random.RandomState(0)
  x = rng.randn(6, 4, 4, 8).astype(np.float32) * 2 - 1
  mask = np.array([True, False, True, True, False, False])
  x[~mask] = 1e3 * rng.randn(3, 4, 4, 8)  # padding slots: anything at all
  variables, y, stats = _apply_bn(x, mask)
  want_y, want_mean, want_var = _expected(variables, x[mask])
  np.testing.assert_allclose(y[mask], want_y, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats["mean"], want_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["var"], want_var, rtol=1e-5, atol=1e-6)
  # The unmasked statistics differ by orders of magnitude: the test can tell them apart.
  _, y_all, stats_all = _apply_bn(x, None, variables)
  assert np.abs(stats_all["var"] - want_var).min() > 100
  assert np.abs(y_all[mask] - want_y).max() > 0.5


def test_masked_bn_with_no_real_sample_keeps_the_running_statistics():
  x = np.random.RandomState(0).randn(3, 4, 4, 8).astype(np.float32)
  variables, y, stats = _apply_bn(x, np.zeros(3, bool))
  np.testing.assert_array_equal(stats["mean"], np.asarray(variables["batch_stats"]["mean"]))
  np.testing.assert_array_equal(stats["var"], np.asarray(variables["batch_stats"]["var"]))
  assert np.isfinite(y).all()


def test_group_norm_with_indivisible_channels_is_a_clear_error():
  x = jnp.ones((1, 4, 4, 48))
  with pytest.raises(ValueError, match=r"GroupNorm\(32\).*divisible by 32, got 48"):
    Norm("gn").init(jax.random.PRNGKey(0), x)


HEADS = {
    "mask_head": (lambda: heads.MaskHead(3, num_conv=2, conv_dim=16, norm="bn", train=True),
                  (14, 14, 8)),
    "box_head": (lambda: heads.BoxHead(num_conv=2, conv_dim=16, num_fc=1, fc_dim=32, norm="bn",
                                       train=True), (7, 7, 8)),
    "c4_res5": (lambda: Res5Head(width_per_group=2, res2_out_channels=8, norm="bn", train=True),
                (14, 14, 32)),
}


@pytest.mark.parametrize("name", sorted(HEADS))
def test_roi_head_statistics_ignore_padding_slots(name):
  """A head on [real RoIs + padding] equals the head on the real RoIs alone: outputs of the real
  rows and every updated running statistic."""
  make, shape = HEADS[name]
  head = make()
  rng = np.random.RandomState(0)
  x = rng.randn(7, *shape).astype(np.float32)
  valid = np.array([True, True, False, True, False, True, False])
  variables = head.init(jax.random.PRNGKey(0), x, valid)
  alone, stats_alone = head.apply(variables, x[valid], mutable=["batch_stats"])
  x_pad = x.copy()
  x_pad[~valid] = 50 * rng.randn(int((~valid).sum()), *shape)
  padded, stats_padded = head.apply(variables, x_pad, valid, mutable=["batch_stats"])
  np.testing.assert_allclose(np.asarray(padded)[valid], np.asarray(alone), rtol=1e-4, atol=1e-5)
  flat_alone = jax.tree_util.tree_leaves_with_path(stats_alone)
  flat_padded = dict(jax.tree_util.tree_leaves_with_path(stats_padded))
  assert len(flat_alone) >= 2
  for path, leaf in flat_alone:
    np.testing.assert_allclose(np.asarray(flat_padded[path]), np.asarray(leaf), rtol=1e-4,
                               atol=1e-5, err_msg=jax.tree_util.keystr(path))
  # Without the mask the padding would shift the statistics (so the comparison above can fail).
  _, stats_unmasked = head.apply(variables, x_pad, mutable=["batch_stats"])
  first_path = flat_alone[0][0]
  assert not np.allclose(np.asarray(dict(jax.tree_util.tree_leaves_with_path(stats_unmasked))[
      first_path]), np.asarray(flat_alone[0][1]), rtol=1e-3)


def test_training_passes_the_positives_as_the_mask_head_batch(tmp_path):
  """MaskRCNN.losses (quickstart recipe with a BN mask head) gives every mask-head norm the positive
  RoIs as its mask: fewer than the padded slots, at least one, and the running mean it writes is
  the mean over those rows only. The samplers' positive fractions (train.rpn_positive_fraction /
  roi_positive_fraction) bound the positives and size the mask batch."""
  from maskrcnn_jax import config_lib
  from maskrcnn_jax.modeling.build import build_model, init_variables
  from maskrcnn_jax.training import trainer
  from tests.modeling.test_single_level_archs import _builtin_batch
  config = config_lib.load_config_file("configs/quickstart.py")
  config.model.mask_head_norm = "bn"
  # The loader's batch (uint8 images, packed masks) as the train step hands it to the model.
  batch = trainer.prepare_batch_fn(config)(_builtin_batch(tmp_path, config, 2))
  model = build_model(config, train=True)
  variables = init_variables(model, jax.random.PRNGKey(0), hw=(64, 64))
  seen = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, Norm) and context.method_name == "__call__":
      path = context.module.scope.path
      if path[0] == "mask_head":
        seen.append((path, args))
    return next_fun(*args, **kwargs)

  config.train.roi_batch_per_image = 64
  config.train.roi_positive_fraction = 0.125  # 8 positive slots per image
  config.train.rpn_positive_fraction = 0.01  # at most int(256 * 0.01) = 2 positive anchors
  kwargs = trainer.sampler_kwargs(config.train)
  with nn.intercept_methods(record):
    (_, terms), updates = model.apply(variables, batch, jax.random.PRNGKey(3),
                                      method=model.losses, mutable=["batch_stats"], **kwargs)
  assert len(seen) == config.model.mask_head_num_conv
  assert float(terms["num_fg_rois"]) <= 8 and float(terms["num_pos_anchors"]) <= 2
  path, (x, mask) = seen[0]
  x, mask = np.asarray(x, np.float64), np.asarray(mask)
  assert x.shape[0] == 2 * 8 and mask.shape == (16,)
  assert 0 < mask.sum() < 16
  old = np.asarray(variables["batch_stats"]["mask_head"][path[1]]["mean"])
  new = np.asarray(updates["batch_stats"]["mask_head"][path[1]]["mean"])
  np.testing.assert_allclose(new, 0.9 * old + 0.1 * x[mask].mean(axis=(0, 1, 2)), rtol=1e-4,
                             atol=1e-6)


def test_sampler_settings_are_checked():
  from maskrcnn_jax import config_lib
  from maskrcnn_jax.training import trainer
  tc = config_lib.train_config()
  assert trainer.sampler_kwargs(tc) == dict(
      rpn_batch_per_image=256, roi_batch_per_image=512, rpn_positive_fraction=0.5,
      roi_positive_fraction=0.25)
  tc.roi_positive_fraction = 1.5
  with pytest.raises(ValueError, match=r"train.roi_positive_fraction must be in \(0, 1\]"):
    trainer.sampler_kwargs(tc)
