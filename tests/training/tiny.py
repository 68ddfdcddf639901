"""A tiny stand-in detector and config for fast trainer tests (the real model compiles for minutes).

`TinyDetector` has the training interface of `modeling.MaskRCNN` (`losses(batch, rng)` on the
loader's batch, a trainable BatchNorm in 'batch_stats', rng-dependent sampling) at a size that
compiles in about a second, so the loop, sharding, checkpointing and resume logic can be tested
exactly on the real data pipeline.
"""
from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp

from maskrcnn_jax import config_lib
from maskrcnn_jax.modeling.layers import Conv, Dense, Norm


class TinyDetector(nn.Module):
  num_classes: int = 5
  train: bool = True

  def setup(self):
    self.stem = Conv(8, 3, 2, use_bias=False, name="stem_conv")
    self.stem_norm = Norm("bn", train=self.train, name="stem_norm")
    self.conv = Conv(16, 3, 2, name="conv")
    self.box = Dense(4, name="bbox_pred")
    self.cls = Dense(self.num_classes + 1, name="cls_score")
    self.mask = Dense(16, name="mask")

  def features(self, images):
    x = nn.relu(self.stem_norm(self.stem(images)))
    return nn.relu(self.conv(x))

  def __call__(self, images, image_hw, orig_hw, scale_factor):
    pooled = jnp.mean(self.features(images), axis=(1, 2))
    return dict(boxes=self.box(pooled), logits=self.cls(pooled), masks=self.mask(pooled))

  def losses(self, batch, rng, **unused):
    x = self.features(batch["image"])
    n = x.shape[0]
    pooled = jnp.mean(x, axis=(1, 2))  # [N, 16]
    # An rng-dependent "sampler": random feature dropout, so resume must restore the rng stream.
    keep = jax.random.bernoulli(rng, 0.8, pooled.shape)
    pooled = jnp.where(keep, pooled / 0.8, 0.0)
    hw = batch["image_hw"].astype(jnp.float32)
    scale = jnp.concatenate([hw[:, ::-1], hw[:, ::-1]], axis=-1)
    target = batch["gt_boxes"][:, 0] / scale  # first instance, normalized
    valid = batch["gt_valid"][:, 0].astype(jnp.float32)
    loss_box = jnp.sum(jnp.abs(jax.nn.sigmoid(self.box(pooled)) - target).sum(-1) * valid) / \
        jnp.maximum(jnp.sum(valid), 1.0)
    logits = self.cls(pooled)
    labels = jnp.where(batch["gt_valid"][:, 0], batch["gt_labels"][:, 0], self.num_classes)
    loss_cls = jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
    m = batch["gt_masks"][:, 0].astype(jnp.float32)  # [N, S, S]
    coarse = m.reshape(n, 4, m.shape[1] // 4, 4, m.shape[2] // 4).mean((2, 4)).reshape(n, 16)
    loss_mask = jnp.mean(optax_bce(self.mask(pooled), coarse))
    terms = dict(loss_box=loss_box, loss_cls=loss_cls, loss_mask=loss_mask,
                 kept=jnp.mean(keep.astype(jnp.float32)))
    return loss_box + loss_cls + loss_mask, terms


def optax_bce(logits, targets):
  return jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def tiny_config(cache_dir: str, *, steps: int = 8, batch: int = 4):
  """A detectron2-convention config on a 64 px built-in dataset (generated in `cache_dir`)."""
  c = config_lib.mask_rcnn(convention="detectron2", upstream="tiny")
  c.model.norm, c.model.freeze_at = "bn", 0
  c.data.builtin = dict(num_train=24, num_val=4, image_size=64, seed=0, cache_dir=cache_dir)
  c.data.train_short, c.data.train_max_size = (64,), 64
  c.data.test_short, c.data.test_max_size = 64, 64
  c.data.max_instances = 5
  c.data.gt_mask_size = 16
  c.data.num_workers = 0
  c.schedule.update(unit="step", length=steps, steps=(steps // 2,), warmup_steps=2,
                    scale_steps_with_batch=False)
  c.train.update(global_batch=batch, log_every=1, checkpoint_every=2, keep_checkpoints=10,
                 final_eval=False)
  return c


def workdir_losses(workdir: str):
  """{step: (loss, loss_box, ...)} from workdir/metrics.jsonl."""
  import json
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      if "train/loss" in r:
        out[r["step"]] = tuple(r[k] for k in sorted(r) if k.startswith("train/loss"))
  return out
