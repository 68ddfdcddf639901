"""FPN level assignment and multi-level RoIAlign vs multilevel_pooling.npz (golden README 2)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.ops import poolers
from tests import golden as golden_lib

# torchvision float32 vs the float64 goldens differs by up to ~1e-5 (golden README 1).
ATOL = 1.5e-5
MAX_GRID = 9  # the 2000 px box at P5: 62.5 units / 7 -> 9 samples per bin (5 at output 14)


@pytest.fixture(scope="module")
def golden():
  z = golden_lib.load("multilevel_pooling")
  return {k: z[k] for k in z.files}


def _features(golden):
  return [jnp.asarray(golden[f"p{l}_features"].astype(np.float32).transpose(0, 2, 3, 1))
          for l in (2, 3, 4, 5)]


@functools.lru_cache(maxsize=None)
def _pool_fn(rule, output_size, sampling_ratio, aligned, max_grid, with_valid):
  def f(features, boxes, batch_idx, valid):
    return poolers.multilevel_roi_align(
        features, boxes, batch_idx, level_rule=rule, output_size=output_size,
        sampling_ratio=sampling_ratio, aligned=aligned, max_grid=max_grid,
        valid=valid if with_valid else None)
  return jax.jit(f)


@pytest.mark.parametrize("rule,key", [("detectron2", "d2_levels_f32"), ("mmdet", "mm_levels_f32"),
                                      ("torchvision", "tv_levels_f32")])
def test_assign_levels(golden, rule, key):
  boxes = jnp.asarray(golden["boxes"].astype(np.float32))
  got = jax.jit(functools.partial(poolers.assign_levels, rule=rule))(boxes)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, golden[key])


def test_levels_disagree_where_documented(golden):
  """Rows 6, 8, 9 (sqrt(area) = boundary * (1 - 3e-7)) are where the epsilons differ."""
  boxes = jnp.asarray(golden["boxes"].astype(np.float32))
  lv = {r: np.asarray(poolers.assign_levels(boxes, rule=r)) for r in poolers.LEVEL_RULES}
  diff = np.nonzero((lv["detectron2"] != lv["mmdet"]) | (lv["mmdet"] != lv["torchvision"]))[0]
  assert diff.tolist() == [6, 8, 9]


def test_log2_is_nearly_correctly_rounded():
  rng = np.random.default_rng(0)
  v = np.exp(rng.uniform(-20, 20, 100_000)).astype(np.float32)
  v = np.concatenate([v, (2.0 ** np.arange(-30, 30)).astype(np.float32)])
  got = np.asarray(jax.jit(poolers._log2)(v))
  exact = np.log2(v.astype(np.float64)).astype(np.float32)
  ulps = np.abs(got.view(np.int32).astype(np.int64) - exact.view(np.int32))
  assert ulps.max() <= 2 and (ulps > 0).mean() < 0.05
  np.testing.assert_array_equal(got[-60:], np.arange(-30, 30))  # powers of two exactly


@pytest.mark.parametrize("key,rule,output_size,sampling_ratio,aligned", [
    ("d2_pooled_out7", "detectron2", 7, 0, True),
    ("d2_pooled_out14", "detectron2", 14, 0, True),
    ("mm_pooled_out7", "mmdet", 7, 0, True),
    ("mm_pooled_out14", "mmdet", 14, 0, True),
    ("tv_pooled_out7_sr2", "torchvision", 7, 2, False),
])
def test_multilevel_roi_align(golden, key, rule, output_size, sampling_ratio, aligned):
  feats = _features(golden)
  boxes = jnp.asarray(golden["boxes"].astype(np.float32))
  bidx = jnp.asarray(golden["batch_idx"].astype(np.int32))
  fn = _pool_fn(rule, output_size, sampling_ratio, aligned, MAX_GRID, False)
  out = fn(feats, boxes, bidx, None)
  assert out.shape == (60, output_size, output_size, 2) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, golden[key].transpose(0, 2, 3, 1), rtol=0, atol=ATOL)


def test_valid_mask_gives_zeros_and_no_gradient(golden):
  feats = _features(golden)
  boxes = golden["boxes"].astype(np.float32).copy()
  bidx = golden["batch_idx"].astype(np.int32)
  valid = np.ones(60, bool)
  valid[::4] = False
  boxes[~valid] = np.nan  # padded rows may hold garbage
  fn = _pool_fn("detectron2", 7, 0, True, MAX_GRID, True)
  out = np.asarray(fn(feats, jnp.asarray(boxes), jnp.asarray(bidx), jnp.asarray(valid)))
  exp = golden["d2_pooled_out7"].transpose(0, 2, 3, 1)
  np.testing.assert_allclose(out[valid], exp[valid], rtol=0, atol=ATOL)
  assert np.all(out[~valid] == 0)
  grads = jax.grad(lambda f: jnp.sum(fn(f, jnp.asarray(boxes), jnp.asarray(bidx),
                                        jnp.asarray(valid)) ** 2))(feats)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_rejects_bad_strides(golden):
  feats = _features(golden)
  with pytest.raises(ValueError, match="strides"):
    poolers.multilevel_roi_align(feats, jnp.zeros((1, 4)), jnp.zeros((1,), jnp.int32),
                                 level_rule="mmdet", output_size=7, sampling_ratio=2,
                                 aligned=False, strides=(4, 8, 16, 64))


@pytest.mark.parametrize("rule", poolers.LEVEL_RULES)
def test_canonical_box_size_moves_the_level_boundaries(rule):
  """sqrt(area) 100 goes to P2 at the references' canonical 224 (100 < 112), to P4 at canonical
  100 (level 4 + floor(log2(100 / 100))) and to P5 at 50; mmdet's finest_scale follows as
  canonical / 4. Scaling the boxes and the canonical size together keeps every level."""
  box = jnp.asarray([[10.0, 20.0, 110.0, 120.0]])
  level = lambda c: int(poolers.assign_levels(box, rule=rule, canonical_box_size=c,
                                              finest_scale=c / 4)[0])
  assert [level(224.0), level(100.0), level(50.0)] == [0, 2, 3]
  boxes = jnp.asarray(np.random.RandomState(0).uniform(0, 600, (200, 2)).repeat(2, 1)
                      * np.array([1, 1, 1.3, 1.7]) + np.array([0, 0, 5, 5]), jnp.float32)
  np.testing.assert_array_equal(
      poolers.assign_levels(boxes * 4, rule=rule, canonical_box_size=896.0, finest_scale=224.0),
      poolers.assign_levels(boxes, rule=rule))


def test_multilevel_roi_align_uses_the_canonical_box_size(golden):
  """With canonical 100 a 100 px box is pooled from P4, exactly as single-level RoIAlign there."""
  feats = _features(golden)
  box = jnp.asarray([[4.0, 8.0, 104.0, 108.0]])
  bidx = jnp.zeros((1,), jnp.int32)
  kw = dict(level_rule="detectron2", output_size=7, sampling_ratio=2, aligned=True)
  out = poolers.multilevel_roi_align(feats, box, bidx, canonical_box_size=100.0, **kw)
  default = poolers.multilevel_roi_align(feats, box, bidx, **kw)
  p4_only = poolers.multilevel_roi_align(feats[2:3], box, bidx, strides=(16,), **kw)
  p2_only = poolers.multilevel_roi_align(feats[0:1], box, bidx, strides=(4,), **kw)
  np.testing.assert_array_equal(out, p4_only)
  np.testing.assert_array_equal(default, p2_only)
  assert np.abs(np.asarray(out) - np.asarray(default)).max() > 1e-3
