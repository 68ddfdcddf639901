"""Random fg/bg subsampling (ops/sampler.py; d2 subsample_labels / mmdet RandomSampler counts)."""
from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from maskrcnn_jax.ops import sampler


@functools.partial(jax.jit, static_argnames=("num_samples", "positive_fraction"))
def _sample(labels, valid, rng, *, num_samples, positive_fraction):
  return sampler.sample_labels(labels, valid, rng, num_samples=num_samples,
                               positive_fraction=positive_fraction)


@pytest.mark.parametrize("n_pos,n_neg,num,frac,want_pos,want_neg", [
    (300, 5000, 256, 0.5, 128, 128),   # plenty of both
    (20, 5000, 256, 0.5, 20, 236),     # few positives: negatives fill up (d2 / mmdet)
    (300, 40, 256, 0.5, 128, 40),      # few negatives: the batch stays short
    (0, 900, 512, 0.25, 0, 512),
    (0, 0, 512, 0.25, 0, 0),
    (700, 700, 512, 0.25, 128, 384),
])
def test_counts(n_pos, n_neg, num, frac, want_pos, want_neg):
  n = 6000
  labels = np.full((n,), -1, np.int32)
  rs = np.random.RandomState(0)
  idx = rs.permutation(n)
  labels[idx[:n_pos]] = 1
  labels[idx[n_pos:n_pos + n_neg]] = 0
  valid = np.ones((n,), bool)
  pos, neg = _sample(labels, valid, jax.random.PRNGKey(3), num_samples=num, positive_fraction=frac)
  pos, neg = np.asarray(pos), np.asarray(neg)
  assert pos.sum() == want_pos and neg.sum() == want_neg
  assert (labels[pos] == 1).all() and (labels[neg] == 0).all()
  assert not (pos & neg).any()


def test_invalid_never_sampled():
  labels = np.array([1, 1, 0, 0, 0, 1, -1, 0], np.int32)
  valid = np.array([1, 0, 1, 0, 1, 1, 1, 0], bool)
  pos, neg = _sample(labels, valid, jax.random.PRNGKey(0), num_samples=8, positive_fraction=0.5)
  np.testing.assert_array_equal(np.asarray(pos), [1, 0, 0, 0, 0, 1, 0, 0])
  np.testing.assert_array_equal(np.asarray(neg), [0, 0, 1, 0, 1, 0, 0, 0])


def test_randomness_uniform_and_key_dependent():
  n = 40
  labels = np.where(np.arange(n) < 20, 1, 0).astype(np.int32)
  valid = np.ones((n,), bool)
  keys = jax.random.split(jax.random.PRNGKey(0), 2000)
  pos, neg = jax.jit(jax.vmap(lambda k: sampler.sample_labels(
      labels, valid, k, num_samples=10, positive_fraction=0.5)))(keys)
  pos, neg = np.asarray(pos), np.asarray(neg)
  assert (pos.sum(1) == 5).all() and (neg.sum(1) == 5).all()
  # Different keys give different subsets; same key the same subset.
  assert len({tuple(np.flatnonzero(p)) for p in pos[:50]}) > 45
  again = sampler.sample_labels(labels, valid, keys[7], num_samples=10, positive_fraction=0.5)
  np.testing.assert_array_equal(np.asarray(again[0]), pos[7])
  # Each positive is picked with probability 5/20, each negative 5/20: frequencies near 0.25.
  freq_pos = pos[:, :20].mean(0)
  freq_neg = neg[:, 20:].mean(0)
  assert np.abs(freq_pos - 0.25).max() < 0.05 and np.abs(freq_neg - 0.25).max() < 0.05
