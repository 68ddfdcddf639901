"""Random positive / negative subsampling with fixed shapes (parity_spec 4.1).

The three references draw the same kind of subset:

* detectron2 `modeling/sampling.py:subsample_labels` and torchvision
  `models/detection/_utils.py:BalancedPositiveNegativeSampler`: num_pos = min(#pos,
  int(num_samples * positive_fraction)), num_neg = min(#neg, num_samples - num_pos), each a uniform
  random subset (`torch.randperm`).
* mmdet `core/bbox/samplers/random_sampler.py:RandomSampler` (neg_pos_ub = -1): num_expected_pos =
  int(num * pos_fraction); all positives when there are fewer, else a random subset; then
  num_expected_neg = num - #sampled positives, likewise.

Here every candidate gets an independent uniform priority and the `k` highest-priority candidates
of each kind are kept with `lax.top_k`, k = the static bound (num_samples * positive_fraction
positives, num_samples negatives) and a mask `rank < count` for the dynamic count. The kept set
is a uniform random subset of the requested size, like `randperm(n)[:k]`; torch's RNG stream
itself cannot be reproduced (golden README: the samplers were not produced for that reason).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _top_k_mask(candidates, rng, k_static: int, count):
  """[N] bool: `count` (<= k_static) uniformly random members of `candidates` [N] bool."""
  n = candidates.shape[0]
  k_static = min(k_static, n)
  if k_static == 0:
    return jnp.zeros((n,), bool)
  priority = jax.random.uniform(rng, (n,), jnp.float32)
  # Non-candidates get -1 and sort after every candidate (priorities are in [0, 1)).
  priority = jnp.where(candidates, priority, -1.0)
  _, idx = jax.lax.top_k(priority, k_static)
  keep = jnp.arange(k_static) < count
  return jnp.zeros((n,), bool).at[idx].set(keep)


def sample_labels(labels, valid, rng, *, num_samples: int, positive_fraction: float):
  """Subsamples foreground / background candidates (d2 `subsample_labels` semantics).

  Args:
    labels: [N] int, 1 foreground, 0 background, -1 ignore (any other value is ignored too).
    valid: [N] bool; invalid (padded) candidates are never sampled.
    rng: a PRNG key.
    num_samples: static int, total samples wanted (256 RPN, 512 R-CNN).
    positive_fraction: static float, the foreground share (0.5 RPN, 0.25 R-CNN).

  Returns:
    pos_mask [N] bool, neg_mask [N] bool, disjoint, with
    sum(pos_mask) = min(#fg, int(num_samples * positive_fraction)) and
    sum(neg_mask) = min(#bg, num_samples - sum(pos_mask)).
  """
  labels = jnp.asarray(labels)
  valid = jnp.asarray(valid, bool)
  pos = (labels == 1) & valid
  neg = (labels == 0) & valid
  max_pos = int(num_samples * positive_fraction)
  num_pos = jnp.minimum(jnp.sum(pos), max_pos)
  num_neg = jnp.minimum(jnp.sum(neg), num_samples - num_pos)
  rng_pos, rng_neg = jax.random.split(rng)
  pos_mask = _top_k_mask(pos, rng_pos, max_pos, num_pos)
  neg_mask = _top_k_mask(neg, rng_neg, num_samples, num_neg)
  return pos_mask, neg_mask
