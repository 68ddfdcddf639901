"""Deterministic synthetic state dicts, regenerable anywhere from (seed, key list).

numpy only, and kept compatible with old numpy (>= 1.17, `default_rng`): the same code runs inside
a torch environment to build a reference model with these weights (parity fixtures, benchmarks),
and here to build the identical JAX variables through `name_maps.to_variables`.

Generation rule for one entry (name, shape, dtype), with `z = default_rng([seed, crc32(name)])
.standard_normal(shape)` in float64 and `leaf = name.rsplit('.', 1)[-1]`:

* >= 2-D (conv / linear / deconv weights): `z * s` rounded once to float32, with
  `s = scales[name]` if given, else He `sqrt(2 / fan_in)`, `fan_in = prod(shape[1:])` (torch's
  `_calculate_fan_in_and_fan_out` convention: conv (O, I/g, kh, kw) -> I/g*kh*kw, linear (O, I) ->
  I, ConvTranspose2d (I, O, kh, kw) -> O*kh*kw).
* 1-D: without a scale the norm/bias defaults, no randomness: weight 1, bias 0, running_mean 0,
  running_var 1 (any other 1-D leaf: z). With `scales[name] = s`: weight 1 + s*z, bias s*z,
  running_mean s*z, running_var exp(s*z) (stays positive), other leaves s*z.
* 0-D: integer dtypes (BatchNorm `num_batches_tracked`, int64) 0; floating z * scales.get(name, 1).
* Other integer / bool tensors: zeros.
* The result is cast to the entry's dtype (float16 / bfloat16 via ml_dtypes when available).

`overrides[name]` replaces an entry wholesale (as `np.asarray(value)`, not cast).
"""

from __future__ import annotations

import ast
import math
import zlib

import numpy as np

__all__ = ['seeded_state_dict', 'read_key_tsv', 'seeded_tensor', 'he_scale']


def _np_dtype(dtype) -> np.dtype:
  if isinstance(dtype, str) and dtype in ('bfloat16', 'torch.bfloat16'):
    import ml_dtypes  # pylint: disable=g-import-not-at-top  (optional; old torch envs may lack it)
    return np.dtype(ml_dtypes.bfloat16)
  if isinstance(dtype, str) and dtype.startswith('torch.'):
    dtype = dtype[len('torch.'):]
  return np.dtype(dtype)


def he_scale(shape) -> float:
  """sqrt(2 / fan_in), fan_in = prod(shape[1:]) (torch convention, see the module doc)."""
  fan_in = int(np.prod(shape[1:])) if len(shape) >= 2 else 1
  return math.sqrt(2.0 / max(fan_in, 1))


def seeded_tensor(name: str, shape, dtype, seed: int, scale: float | None = None) -> np.ndarray:
  """One entry of `seeded_state_dict` (same rule, see the module docstring)."""
  shape = tuple(int(s) for s in shape)
  dt = _np_dtype(dtype)
  is_float = dt.kind in 'fc' or dt.name.startswith(('bfloat16', 'float8'))
  if not is_float:
    return np.zeros(shape, dtype=dt)
  leaf = name.rsplit('.', 1)[-1]
  if len(shape) == 1 and scale is None:
    fill = {'weight': 1.0, 'bias': 0.0, 'running_mean': 0.0, 'running_var': 1.0}.get(leaf)
    if fill is not None:
      return np.full(shape, fill, dtype=np.float32).astype(dt)
  rng = np.random.default_rng([int(seed), zlib.crc32(name.encode('utf-8'))])
  z = rng.standard_normal(shape)  # float64
  if len(shape) >= 2:
    s = he_scale(shape) if scale is None else float(scale)
    out = z * s
  elif len(shape) == 1:
    s = 1.0 if scale is None else float(scale)
    if leaf == 'weight':
      out = 1.0 + s * z
    elif leaf == 'running_var':
      out = np.exp(s * z)
    else:
      out = s * z
  else:
    out = z * (1.0 if scale is None else float(scale))
  out = np.asarray(out, dtype=np.float64).astype(np.float32)
  return out.astype(dt) if dt != np.float32 else out


def seeded_state_dict(keys, seed: int, scales: dict | None = None,
                      overrides: dict | None = None) -> dict:
  """Deterministic state dict for `keys`.

  Args:
    keys: list of (name, shape, dtype) in state-dict order, e.g. from `read_key_tsv`; shapes in
      torch layout, dtype a numpy/torch dtype name ('float32', 'int64', ...).
    seed: non-negative int; each tensor uses `np.random.default_rng([seed, crc32(name)])`, so a
      tensor does not change when other keys are added or removed.
    scales: optional name -> float (see the module docstring for what it scales).
    overrides: optional name -> array replacing the generated entry wholesale.

  Returns:
    dict name -> np.ndarray in `keys` order (insertion-ordered), C-contiguous.

  Raises:
    KeyError: a name in `scales` / `overrides` is not among `keys` (a typo guard).
  """
  scales = dict(scales or {})
  overrides = dict(overrides or {})
  names = [k[0] for k in keys]
  unknown = sorted((set(scales) | set(overrides)) - set(names))
  if unknown:
    raise KeyError(f'scales/overrides name keys that are not in the key list: {unknown[:10]}')
  out = {}
  for name, shape, dtype in keys:
    if name in overrides:
      out[name] = np.asarray(overrides[name])
    else:
      out[name] = seeded_tensor(name, shape, dtype, seed, scales.get(name))
  return out


def read_key_tsv(path) -> list:
  """Parse a checkpoint-keys file: `name<TAB>(d0, d1, ...)<TAB>dtype[<TAB>comment]` per line.

  Returns:
    list of (name: str, shape: tuple[int, ...], dtype: str) in file order. Blank lines and lines
    starting with '#' are skipped.
  """
  entries = []
  with open(path, 'r', encoding='utf-8') as f:
    for lineno, line in enumerate(f, 1):
      line = line.rstrip('\n')
      if not line.strip() or line.startswith('#'):
        continue
      parts = line.split('\t')
      if len(parts) < 3:
        raise ValueError(
            f'{path}:{lineno}: expected 3 tab-separated fields, got {len(parts)}: {line!r}')
      # Further fields are comments, e.g. "(current name: ...)" in the tv legacy-names file.
      name, shape_text, dtype = parts[:3]
      shape = ast.literal_eval(shape_text.strip())
      if not isinstance(shape, tuple) or not all(isinstance(s, int) for s in shape):
        raise ValueError(f'{path}:{lineno}: bad shape {shape_text!r}')
      entries.append((name.strip(), shape, dtype.strip()))
  return entries


def state_dict_from_fixture(fixture, keys) -> dict:
  """Regenerates a calibrated state dict from a parity fixture (tests/fixtures/parity_*.npz).

  The fixture stores the seed, one scale per scaled >=2-D tensor (`scale_names`, `scale_values`)
  and every 1-D tensor verbatim (`w/<name>`); the >=2-D tensors are regenerated here exactly as
  scripts/make_parity_fixtures.py generated them for the reference framework.

  Args:
    fixture: a mapping such as np.load(path).
    keys: the model's (name, shape, dtype) key list.
  Returns:
    dict name -> float32 np.ndarray in `keys` order.
  """
  scales = {str(n): float(v) for n, v in zip(fixture['scale_names'], fixture['scale_values'])}
  overrides = {name: np.asarray(fixture['w/' + name]) for name, shape, _ in keys
               if len(shape) == 1}
  state = seeded_state_dict(keys, int(fixture['seed']), scales=scales, overrides=overrides)
  return {k: np.asarray(v, np.float32) for k, v in state.items()}
