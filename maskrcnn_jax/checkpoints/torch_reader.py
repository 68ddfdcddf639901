"""A torch-free reader for PyTorch `.pth` files and detectron2 `.pkl` files.

numpy only: no torch, no jax. Implements parity_spec 1.1 (a)-(d):

* zip format (torch >= 1.6 default): `<root>/data.pkl` + `<root>/data/<key>` raw storages;
* legacy format (mmdet publish script, torch < 1.6): magic, protocol, sys_info, object pickle,
  storage-key list, then `int64 count + raw bytes` per storage in key-list order;
* detectron2 model-zoo `.pkl`: a plain pickle of numpy arrays (parity_spec 1.3).

Every pickle goes through `_RestrictedUnpickler`, whose `find_class` resolves only an allowlist of
data constructors (OrderedDict, torch tensor/storage rebuild functions -- which are emulated here,
never imported --, numpy array reconstruction). Any other global raises `UnsafeCheckpointError`
before anything is called. Damaged files raise `CheckpointFormatError` naming the file and what is
wrong.

Public API:
  load_pth(path) -> (state, meta)
  load_pkl(path) -> (state, meta)
  load_checkpoint(path, allow_caffe2=False) -> (framework_guess, state, meta)
  load_pkl(path, allow_caffe2=True) also reads Caffe2 / Detectron1 pickles (ImageNet backbones)
  guess_framework(state) -> 'mmdet' | 'detectron2' | 'torchvision' | 'unknown'
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import os
import pickle
import re
import struct
import zipfile

import numpy as np

try:  # bf16 / fp8 storages (parity_spec 1.1 (c)); ml_dtypes is a declared dependency.
  import ml_dtypes
except ImportError:  # pragma: no cover - only hit in a stripped-down environment.
  ml_dtypes = None


__all__ = [
    'CheckpointError',
    'CheckpointFormatError',
    'UnsafeCheckpointError',
    'load_pth',
    'load_pkl',
    'load_checkpoint',
    'guess_framework',
    'sniff_format',
    'LEGACY_MAGIC_NUMBER',
]


class CheckpointError(Exception):
  """Base class of every checkpoint loading / mapping error."""


class CheckpointFormatError(CheckpointError, ValueError):
  """The file is truncated, corrupt, or not a checkpoint this reader understands."""


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
  """The pickle references a global that is not in the allowlist (parity_spec 1.1 (d))."""


# torch/serialization.py: MAGIC_NUMBER and PROTOCOL_VERSION of the legacy format.
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001
_ZIP_MAGIC = b'PK\x03\x04'
# pickle protocol-2 encoding of the magic int: LONG1 opcode, 10 bytes little-endian.
_LEGACY_MAGIC_PICKLED = b'\x8a\x0a' + LEGACY_MAGIC_NUMBER.to_bytes(10, 'little')


def _storage_dtypes() -> dict[str, np.dtype]:
  """torch `XxxStorage` class name -> numpy dtype (parity_spec 1.1 (c) table)."""
  table = {
      'FloatStorage': np.dtype(np.float32),
      'DoubleStorage': np.dtype(np.float64),
      'HalfStorage': np.dtype(np.float16),
      'LongStorage': np.dtype(np.int64),
      'IntStorage': np.dtype(np.int32),
      'ShortStorage': np.dtype(np.int16),
      'CharStorage': np.dtype(np.int8),
      'ByteStorage': np.dtype(np.uint8),
      'BoolStorage': np.dtype(np.bool_),
      'ComplexFloatStorage': np.dtype(np.complex64),
      'ComplexDoubleStorage': np.dtype(np.complex128),
      'UInt16Storage': np.dtype(np.uint16),
      'UInt32Storage': np.dtype(np.uint32),
      'UInt64Storage': np.dtype(np.uint64),
      # torch.storage.UntypedStorage: raw bytes (torch/serialization.py persistent_id).
      'UntypedStorage': np.dtype(np.uint8),
  }
  if ml_dtypes is not None:
    table['BFloat16Storage'] = np.dtype(ml_dtypes.bfloat16)
    for name in ('float8_e4m3fn', 'float8_e5m2', 'float8_e4m3fnuz', 'float8_e5m2fnuz'):
      if hasattr(ml_dtypes, name):
        table['Float8_' + name[len('float8_'):] + 'Storage'] = np.dtype(getattr(ml_dtypes, name))
  return table


_STORAGE_DTYPES = _storage_dtypes()


# ---------------------------------------------------------------------------------------------
# Inert stand-ins for the torch globals a checkpoint pickle references. None of them imports torch.


class _StorageType:
  """Stand-in for a `torch.XxxStorage` class global; carries the numpy dtype."""

  def __init__(self, qualname: str, dtype: np.dtype | None):
    self.qualname = qualname
    self.dtype = dtype

  def __repr__(self):
    return f'<storage type {self.qualname}>'


class _Storage:
  """One storage: a flat buffer of `numel` elements of `dtype`, filled when its bytes are read."""

  def __init__(self, key: str, dtype: np.dtype, numel: int, type_name: str):
    self.key = key
    self.dtype = dtype
    self.numel = numel
    self.type_name = type_name
    self.data: np.ndarray | None = None  # 1-D, `numel` elements, native byte order.
    # legacy files before torch 0.4: (root storage, element offset) of a storage view.
    self.view_of: tuple[_Storage, int] | None = None

  def array(self) -> np.ndarray:
    if self.view_of is not None:
      root, offset = self.view_of
      return root.array()[offset:offset + self.numel]
    assert self.data is not None, self.key
    return self.data


class _PendingTensor:
  """A `_rebuild_tensor_v2` call recorded before the storage bytes are available."""

  __slots__ = ('storage', 'offset', 'size', 'stride')

  def __init__(self, storage, offset, size, stride):
    self.storage = storage
    self.offset = offset
    self.size = size
    self.stride = stride


class _TensorType:
  """Stand-in for `torch.Tensor` / `torch.nn.parameter.Parameter` (`_rebuild_from_type_v2`)."""

  def __init__(self, qualname):
    self.qualname = qualname


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  """torch/_utils.py `_rebuild_tensor_v2`: records the view; materialised after storages load."""
  del requires_grad, backward_hooks, metadata
  if not isinstance(storage, _Storage):
    raise CheckpointFormatError(f'_rebuild_tensor_v2 got {type(storage).__name__}, not a storage')
  return _PendingTensor(storage, int(storage_offset), tuple(int(s) for s in size),
                        tuple(int(s) for s in stride))


def _rebuild_tensor(storage, storage_offset, size, stride):
  """torch/_utils.py `_rebuild_tensor` (torch 0.4-era files)."""
  return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  """torch/_utils.py `_rebuild_parameter`: a Parameter is just its data here."""
  del requires_grad, backward_hooks
  return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
  del requires_grad, backward_hooks, state
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  """torch/_tensor.py `_rebuild_from_type_v2`: call the (allowlisted) rebuild, drop the type."""
  del new_type, state
  if not callable(func):
    raise CheckpointFormatError('_rebuild_from_type_v2 with a non-callable rebuild function')
  return func(*args)


def _numpy_global(qualname: str):
  """Resolve an allowlisted numpy global under numpy 1 (`numpy.core`) or 2 (`numpy._core`)."""
  import importlib  # pylint: disable=g-import-not-at-top
  module, name = qualname.rsplit('.', 1)
  candidates = [module]
  if module.startswith('numpy.core'):
    candidates.insert(0, 'numpy._core' + module[len('numpy.core'):])
  elif module.startswith('numpy._core'):
    candidates.append('numpy.core' + module[len('numpy._core'):])
  for candidate in candidates:
    try:
      mod = importlib.import_module(candidate)
    except ImportError:
      continue
    if hasattr(mod, name):
      return getattr(mod, name)
  raise CheckpointFormatError(
      f'numpy global {qualname!r} is not available in numpy {np.__version__}')


_NUMPY_GLOBALS = frozenset({
    # parity_spec 1.1 (d): what numpy array pickles reference (protocol 2..5, numpy 1 and 2).
    'numpy.core.multiarray._reconstruct',
    'numpy._core.multiarray._reconstruct',
    'numpy.core.multiarray.scalar',
    'numpy._core.multiarray.scalar',
    'numpy.core.numeric._frombuffer',
    'numpy._core.numeric._frombuffer',
    'numpy.ndarray',
    'numpy.dtype',
})

_BUILTIN_GLOBALS = {
    'collections.OrderedDict': collections.OrderedDict,
    'builtins.set': set,
    'builtins.frozenset': frozenset,
    'builtins.complex': complex,
    'builtins.slice': slice,
    'builtins.bytearray': bytearray,
    # Protocol-2 pickles written by Python 3 encode `bytes` as _codecs.encode(str, 'latin1')
    # (numpy raw data, for one). Codecs are pure data transforms.
    '_codecs.encode': __import__('_codecs').encode,
}

_TORCH_GLOBALS = {
    'torch._utils._rebuild_tensor_v2': _rebuild_tensor_v2,
    'torch._utils._rebuild_tensor': _rebuild_tensor,
    'torch._utils._rebuild_parameter': _rebuild_parameter,
    'torch._utils._rebuild_parameter_with_state': _rebuild_parameter_with_state,
    'torch._tensor._rebuild_from_type_v2': _rebuild_from_type_v2,
    'torch._tensor.Tensor': _TensorType('torch.Tensor'),
    'torch.Tensor': _TensorType('torch.Tensor'),
    'torch.nn.parameter.Parameter': _TensorType('torch.nn.parameter.Parameter'),
}


class _RestrictedUnpickler(pickle.Unpickler):
  """`pickle.Unpickler` whose `find_class` resolves only allowlisted globals.

  Nothing outside the allowlist is ever imported or called: `find_class` raises first.
  """

  def __init__(self, file, *, source: str, allow_torch: bool, storages: dict | None = None,
               legacy: bool = False, **kwargs):
    super().__init__(file, **kwargs)
    self._source = source
    self._allow_torch = allow_torch
    self._storages = storages if storages is not None else {}
    self._legacy = legacy

  def find_class(self, module: str, name: str):
    # Python-2 pickles name `__builtin__`, `copy_reg`, ...; apply the stdlib's renames first
    # (a custom find_class bypasses the C unpickler's fix_imports handling).
    if (module, name) in _compat_pickle.NAME_MAPPING:
      module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
      module = _compat_pickle.IMPORT_MAPPING[module]
    qualname = f'{module}.{name}'
    if qualname in _BUILTIN_GLOBALS:
      return _BUILTIN_GLOBALS[qualname]
    if qualname in _NUMPY_GLOBALS:
      return _numpy_global(qualname)
    if self._allow_torch:
      if qualname in _TORCH_GLOBALS:
        return _TORCH_GLOBALS[qualname]
      if module in ('torch', 'torch.cuda', 'torch.storage') and name.endswith('Storage'):
        base = 'UntypedStorage' if name in ('UntypedStorage', '_UntypedStorage') else name
        if base in _STORAGE_DTYPES:
          return _StorageType(qualname, _STORAGE_DTYPES[base])
        if base == 'BFloat16Storage':
          raise CheckpointFormatError(
              f'{self._source}: a bfloat16 storage needs the ml_dtypes package')
        raise CheckpointFormatError(f'{self._source}: unsupported storage type {qualname!r}')
    raise UnsafeCheckpointError(
        f"{self._source}: refusing to load global '{qualname}' (not in the allowlist)")

  def persistent_load(self, pid):
    if not self._allow_torch:
      raise CheckpointFormatError(
          f'{self._source}: unexpected persistent id {pid!r} in a plain pickle')
    if not isinstance(pid, tuple) or not pid or pid[0] != 'storage':
      raise CheckpointFormatError(f'{self._source}: unsupported persistent id {pid!r}')
    if self._legacy:
      # ('storage', storage_type, root_key, location, numel, view_metadata)  parity_spec 1.1 (b).
      if len(pid) != 6:
        raise CheckpointFormatError(f'{self._source}: malformed legacy storage id {pid!r}')
      _, storage_type, key, _, numel, view_metadata = pid
    else:
      # ('storage', storage_type, key, location, numel)  parity_spec 1.1 (a).
      if len(pid) != 5:
        raise CheckpointFormatError(f'{self._source}: malformed storage id {pid!r}')
      _, storage_type, key, _, numel = pid
      view_metadata = None
    if not isinstance(storage_type, _StorageType):
      raise CheckpointFormatError(f'{self._source}: storage id with type {storage_type!r}')
    key = str(key)
    storage = self._storages.get(key)
    if storage is None:
      storage = _Storage(key, storage_type.dtype, int(numel), storage_type.qualname)
      self._storages[key] = storage
    if view_metadata is not None:
      # torch < 0.4 legacy files: (view_key, offset, size) in elements of the root storage.
      view_key, offset, size = view_metadata
      view_key = str(view_key)
      view = self._storages.get('view:' + view_key)
      if view is None:
        view = _Storage(view_key, storage.dtype, int(size), storage.type_name)
        view.view_of = (storage, int(offset))
        self._storages['view:' + view_key] = view
      return view
    return storage


# ---------------------------------------------------------------------------------------------
# Materialisation: turn recorded `_rebuild_tensor_v2` calls into numpy arrays.


def _materialize(pending: _PendingTensor, *, source: str, name: str) -> np.ndarray:
  """storage[offset + sum(i_k * stride_k)] for every index, as an owned C-contiguous array."""
  storage = pending.storage
  flat = storage.array()
  size, stride, offset = pending.size, pending.stride, pending.offset
  if len(size) != len(stride):
    raise CheckpointFormatError(f'{source}: tensor {name!r} has size {size} but stride {stride}')
  if any(s < 0 for s in size) or any(s < 0 for s in stride) or offset < 0:
    raise CheckpointFormatError(
        f'{source}: tensor {name!r} has a negative size/stride/offset ({size}, {stride}, {offset})')
  if 0 in size:
    return np.empty(size, dtype=flat.dtype)
  needed = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
  if needed > flat.shape[0]:
    raise CheckpointFormatError(
        f'{source}: tensor {name!r} (size {size}, stride {stride}, offset {offset}) reads '
        f'{needed} elements of storage {storage.key!r}, which has only {flat.shape[0]}')
  itemsize = flat.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
      flat[offset:], shape=size, strides=tuple(s * itemsize for s in stride), writeable=False)
  return np.array(view, order='C', copy=True)


def _resolve(obj, *, source: str, name: str = '', memo: dict | None = None):
  """Replace every `_PendingTensor` inside dicts / lists / tuples by its numpy array (in place
  for dicts and lists, so OrderedDict `_metadata` attributes survive)."""
  if memo is None:
    memo = {}
  if isinstance(obj, _PendingTensor):
    if id(obj) not in memo:
      memo[id(obj)] = _materialize(obj, source=source, name=name)
    return memo[id(obj)]
  if isinstance(obj, dict):
    if id(obj) in memo:
      return obj
    memo[id(obj)] = obj
    for k in list(obj.keys()):
      obj[k] = _resolve(obj[k], source=source, name=f'{name}.{k}' if name else str(k), memo=memo)
    return obj
  if isinstance(obj, list):
    if id(obj) in memo:
      return obj
    memo[id(obj)] = obj
    for i, v in enumerate(obj):
      obj[i] = _resolve(v, source=source, name=f'{name}[{i}]', memo=memo)
    return obj
  if isinstance(obj, tuple):
    return tuple(_resolve(v, source=source, name=f'{name}[{i}]', memo=memo)
                 for i, v in enumerate(obj))
  if isinstance(obj, (_Storage, _StorageType, _TensorType)):
    raise CheckpointFormatError(f'{source}: {name!r} is a bare {obj!r}, not a tensor')
  return obj


# ---------------------------------------------------------------------------------------------
# The two torch containers.


def sniff_format(head: bytes) -> str:
  """'zip' | 'legacy' | 'pickle' | 'tar' | 'unknown' from a file's first bytes (>= 512 for tar).

  parity_spec 1.1: `PK\\x03\\x04` is the zip format; a pickled magic int is the legacy format.
  """
  if head.startswith(_ZIP_MAGIC):
    return 'zip'
  # The magic is pickled with the caller's protocol (torch default 2): optional PROTO opcode.
  body = head[2:] if head[:1] == b'\x80' else head
  if body.startswith(_LEGACY_MAGIC_PICKLED):
    return 'legacy'
  if len(head) >= 262 and head[257:262] == b'ustar':
    return 'tar'
  if head[:1] == b'\x80' and len(head) > 1 and 2 <= head[1] <= 5:
    return 'pickle'
  if head[:1] in (b'(', b'}', b']', b'c'):  # protocol 0/1 pickles start with MARK / dict / global.
    return 'pickle'
  return 'unknown'


def _read_zip(path: str, raw: bytes):
  source = path
  try:
    zf = zipfile.ZipFile(io.BytesIO(raw))
  except zipfile.BadZipFile as e:
    raise CheckpointFormatError(
        f'{source}: truncated or corrupt zip archive ({len(raw)} bytes; the end-of-central-'
        f'directory record is missing or damaged): {e}') from None
  names = zf.namelist()
  # One top-level folder with an arbitrary name (parity_spec 1.1 (a)): find <root>/data.pkl.
  pkl_names = [n for n in names
               if n == 'data.pkl' or (n.endswith('/data.pkl') and n.count('/') == 1)]
  if len(pkl_names) != 1:
    raise CheckpointFormatError(
        f'{source}: zip archive without exactly one <root>/data.pkl (found {pkl_names or "none"})')
  pkl_name = pkl_names[0]
  root = pkl_name[:-len('data.pkl')]
  byteorder = 'little'
  if root + 'byteorder' in names:  # absent in older files: little-endian (parity_spec 1.1 (a)).
    byteorder = zf.read(root + 'byteorder').decode('ascii', 'replace').strip()
    if byteorder not in ('little', 'big'):
      raise CheckpointFormatError(f'{source}: unknown byteorder record {byteorder!r}')

  def read_entry(entry):
    try:
      return zf.read(entry)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, struct.error) as e:
      raise CheckpointFormatError(f'{source}: corrupt zip entry {entry!r}: {e}') from None

  storages: dict[str, _Storage] = {}
  unpickler = _RestrictedUnpickler(io.BytesIO(read_entry(pkl_name)), source=source,
                                   allow_torch=True, storages=storages, encoding='latin1')
  obj = _unpickle(unpickler, source, 'data.pkl')
  for key, storage in sorted(storages.items()):
    if storage.view_of is not None:
      continue
    entry = f'{root}data/{key}'
    if entry not in names:
      raise CheckpointFormatError(f'{source}: storage {key} has no record {entry!r} in the archive')
    data = read_entry(entry)
    nbytes = storage.numel * storage.dtype.itemsize
    if len(data) < nbytes:
      raise CheckpointFormatError(
          f'{source}: truncated: storage {key} ({storage.type_name}, {storage.numel} elements) '
          f'needs {nbytes} bytes, {len(data)} left')
    storage.data = _buffer_to_array(data[:nbytes], storage.dtype, byteorder)
  return obj, {'format': 'zip', 'byteorder': byteorder, 'archive_root': root.rstrip('/')}


def _buffer_to_array(data, dtype: np.dtype, byteorder: str) -> np.ndarray:
  if byteorder == 'big' and dtype.itemsize > 1:
    return np.frombuffer(data, dtype=dtype.newbyteorder('>')).astype(dtype)
  return np.frombuffer(data, dtype=dtype)


def _unpickle(unpickler: pickle.Unpickler, source: str, what: str):
  try:
    return unpickler.load()
  except CheckpointError:
    raise
  except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError,
          KeyError, struct.error, MemoryError, OverflowError, UnicodeDecodeError) as e:
    message = str(e) or type(e).__name__
    raise CheckpointFormatError(
        f'{source}: truncated or corrupt {what} pickle: {message}') from None


def _read_legacy(path: str, raw: bytes):
  source = path
  f = io.BytesIO(raw)

  def plain(what):
    return _unpickle(_RestrictedUnpickler(f, source=source, allow_torch=False, encoding='latin1'),
                     source, what)

  magic = plain('magic number')
  if magic != LEGACY_MAGIC_NUMBER:
    raise CheckpointFormatError(f'{source}: not a legacy torch file (magic {magic!r})')
  protocol = plain('protocol version')
  if protocol != LEGACY_PROTOCOL_VERSION:
    raise CheckpointFormatError(f'{source}: unsupported legacy protocol version {protocol!r}')
  sys_info = plain('sys_info')
  if not isinstance(sys_info, dict):
    raise CheckpointFormatError(f'{source}: malformed sys_info record {sys_info!r}')
  # Storage bytes are always written little-endian (torch/csrc/serialization.cpp
  # THPStorage_writeFileRaw swaps on big-endian hosts); only the int64 counts are native.
  count_order = '<' if sys_info.get('little_endian', True) else '>'

  storages: dict[str, _Storage] = {}
  unpickler = _RestrictedUnpickler(f, source=source, allow_torch=True, storages=storages,
                                   legacy=True, encoding='latin1')
  obj = _unpickle(unpickler, source, 'object')
  keys = plain('storage-key list')
  if not isinstance(keys, list):
    raise CheckpointFormatError(f'{source}: malformed storage-key list {type(keys).__name__}')
  for index, key in enumerate(keys):
    key = str(key)
    storage = storages.get(key)
    if storage is None:
      raise CheckpointFormatError(
          f'{source}: storage key {key} in the key list is never referenced')
    left = len(raw) - f.tell()
    if left < 8:
      raise CheckpointFormatError(
          f'{source}: truncated: storage {index} (key {key}) needs an 8-byte element count, '
          f'{left} bytes left')
    (count,) = struct.unpack(count_order + 'q', f.read(8))
    if count != storage.numel:
      raise CheckpointFormatError(
          f'{source}: corrupt: storage {index} (key {key}) records {count} elements, the pickle '
          f'says {storage.numel}')
    nbytes = count * storage.dtype.itemsize
    left = len(raw) - f.tell()
    if left < nbytes:
      raise CheckpointFormatError(
          f'{source}: truncated: storage {index} (key {key}, {storage.type_name}, {count} '
          f'elements) needs {nbytes} bytes, {left} left')
    start = f.tell()
    storage.data = _buffer_to_array(memoryview(raw)[start:start + nbytes], storage.dtype, 'little')
    f.seek(start + nbytes)
  missing = [k for k, s in storages.items() if s.view_of is None and s.data is None]
  if missing:
    raise CheckpointFormatError(
        f'{source}: storages {missing} are referenced but not in the key list')
  return obj, {'format': 'legacy', 'byteorder': 'little', 'sys_info': sys_info,
               'trailing_bytes': len(raw) - f.tell()}


def _read_file(path) -> bytes:
  path = os.fspath(path)
  try:
    with open(path, 'rb') as fh:
      return fh.read()
  except OSError as e:
    raise CheckpointFormatError(f'{path}: cannot read: {e}') from None


def _load_torch_object(path: str, raw: bytes):
  """Unpickle a torch.save file (either container) into python objects with numpy arrays."""
  kind = sniff_format(raw[:512])
  if kind == 'zip':
    obj, info = _read_zip(path, raw)
  elif kind == 'legacy':
    obj, info = _read_legacy(path, raw)
  elif kind == 'tar':
    raise CheckpointFormatError(f'{path}: pre-0.1.10 torch tar format is not supported')
  elif len(raw) == 0:
    raise CheckpointFormatError(f'{path}: empty file')
  else:
    raise CheckpointFormatError(
        f'{path}: not a torch.save file (first bytes {raw[:8]!r}: neither zip nor legacy magic)')
  obj = _resolve(obj, source=path)
  return obj, info


def _strip_prefix(state: dict, prefix: str = 'module.') -> collections.OrderedDict:
  """mmcv/runner/checkpoint.py: `revise_keys=[(r'^module\\.', '')]`."""
  pattern = re.compile('^' + re.escape(prefix))
  out = collections.OrderedDict((pattern.sub('', k), v) for k, v in state.items())
  if hasattr(state, '_metadata'):
    out._metadata = collections.OrderedDict(
        (pattern.sub('', k) if k != prefix[:-1] else '', v) for k, v in state._metadata.items())
  return out


def _check_arrays(state: dict, source: str) -> collections.OrderedDict:
  out = collections.OrderedDict()
  for k, v in state.items():
    if not isinstance(k, str):
      raise CheckpointFormatError(f'{source}: state-dict key {k!r} is not a string')
    if isinstance(v, np.generic):  # a numpy scalar in a plain pickle: a 0-d array
      v = np.asarray(v)
    if not isinstance(v, np.ndarray):
      raise CheckpointFormatError(
          f'{source}: state-dict entry {k!r} is a {type(v).__name__}, not a tensor')
    out[k] = v
  if hasattr(state, '_metadata'):
    out._metadata = state._metadata
  return out


def _unwrap(obj, *, source: str, info: dict):
  """The state dict: mmdet {'meta', 'state_dict'}, d2 {'model'}, tv bare (parity_spec 1.2-1.4)."""
  meta = dict(info)
  meta['source'] = source
  meta['meta'] = None
  if not isinstance(obj, dict):
    raise CheckpointFormatError(f'{source}: top-level object is a {type(obj).__name__}, not a dict')
  if 'state_dict' in obj and isinstance(obj['state_dict'], dict):
    state = obj['state_dict']
    meta['wrapper'] = 'state_dict'
    meta['meta'] = obj.get('meta')
    meta['top_level_keys'] = list(obj.keys())
    state = _strip_prefix(state)
  elif 'model' in obj and isinstance(obj['model'], dict):
    state = obj['model']
    meta['wrapper'] = 'model'
    meta['top_level_keys'] = list(obj.keys())
    for k in ('__author__', 'matching_heuristics', 'iteration'):
      if k in obj:
        meta[k] = obj[k]
  else:
    state = obj
    meta['wrapper'] = 'bare'
  state = _check_arrays(state, source)
  meta['version_metadata'] = getattr(state, '_metadata', None)
  return state, meta


def load_pth(path) -> tuple[collections.OrderedDict, dict]:
  """Read a `torch.save` checkpoint (zip or legacy container) without torch.

  Args:
    path: a `.pth` file.

  Returns:
    state: OrderedDict name -> np.ndarray in file order, each a C-contiguous owned copy with the
      storage dtype (float32 / float16 / ml_dtypes.bfloat16 / int64 ...); `num_batches_tracked`
      stays an int64 `()` array. For an mmdet `{'meta', 'state_dict'}` file a leading `module.` is
      stripped. The OrderedDict keeps torch's `_metadata` attribute when the file had one.
    meta: dict with 'format' ('zip' | 'legacy'), 'byteorder', 'wrapper' ('state_dict' | 'model' |
      'bare'), 'meta' (mmdet's meta dict or None), 'version_metadata' (torch `_metadata` or None),
      'source' (the path), and container details.

  Raises:
    UnsafeCheckpointError: the pickle names a global outside the allowlist.
    CheckpointFormatError: truncated / corrupt / not a torch file.
  """
  path = os.fspath(path)
  raw = _read_file(path)
  obj, info = _load_torch_object(path, raw)
  return _unwrap(obj, source=path, info=info)


def load_pkl(path, *, allow_caffe2: bool = False) -> tuple[collections.OrderedDict, dict]:
  """Read a detectron2 model-zoo `.pkl` (parity_spec 1.3) through the allowlist unpickler.

  Args:
    path: the `.pkl` file.
    allow_caffe2: also accept what detectron2's `DetectionCheckpointer._load_file` reads as a
      Caffe2 / Detectron1 file: a pickle without `model` + `__author__`, whose arrays are the dict
      itself (ImageNet backbones such as `ImageNetPretrained/MSRA/R-50.pkl`) or its `blobs` entry
      (Detectron1 detection models); `*_momentum` entries are dropped as detectron2 drops them.

  Returns:
    state: OrderedDict name -> np.ndarray (float32 for zoo files), the `model` entry (Caffe2 files:
      the blob dict, C2 names such as `res2_0_branch2a_w`).
    meta: dict with 'format' = 'pickle', 'wrapper' = 'model' ('caffe2' for a Caffe2 file),
      '__author__' and 'matching_heuristics' when present, 'source'.
  """
  path = os.fspath(path)
  raw = _read_file(path)
  kind = sniff_format(raw[:512])
  if kind != 'pickle':
    raise CheckpointFormatError(f'{path}: not a plain pickle (looks like {kind}); use load_pth')
  # d2 reads these with pickle.load(f, encoding='latin1') (detection_checkpoint.py `_load_file`).
  unpickler = _RestrictedUnpickler(io.BytesIO(raw), source=path, allow_torch=False,
                                   encoding='latin1')
  obj = _unpickle(unpickler, path, 'object')
  is_d2 = isinstance(obj, dict) and 'model' in obj and isinstance(obj['model'], dict)
  if allow_caffe2 and isinstance(obj, dict) and not is_d2:
    # detectron2/checkpoint/detection_checkpoint.py `_load_file`: "Detection models have
    # "blobs", but ImageNet models don't"; `_momentum` blobs are solver state.
    blobs = obj['blobs'] if isinstance(obj.get('blobs'), dict) else obj
    state = collections.OrderedDict(
        (k, v) for k, v in blobs.items() if not (isinstance(k, str) and k.endswith('_momentum')))
    meta = {'format': 'pickle', 'wrapper': 'caffe2', 'source': path, 'meta': None,
            'top_level_keys': list(obj.keys())[:10]}
    return _check_arrays(state, path), meta
  if isinstance(obj, dict) and 'blobs' in obj and 'model' not in obj:
    raise CheckpointFormatError(
        f'{path}: a Caffe2/Detectron1 blob file (`blobs` key); only detectron2 `model` pickles '
        'are supported')
  if not is_d2:
    keys = list(obj.keys())[:5] if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointFormatError(f'{path}: a pickle without a `model` dict (found {keys})')
  return _unwrap(obj, source=path, info={'format': 'pickle'})


_FRAMEWORK_MARKERS = (
    ('mmdet', ('neck.', 'roi_head.', 'rpn_head.')),
    ('detectron2', ('backbone.bottom_up.', 'proposal_generator.', 'backbone.fpn_lateral',
                    'backbone.fpn_output', 'roi_heads.res5.')),
    ('torchvision', ('backbone.body.', 'backbone.fpn.', 'rpn.head.', 'roi_heads.mask_predictor.')),
)


def guess_framework(state: dict) -> str:
  """'mmdet' | 'detectron2' | 'torchvision' | 'unknown' from the key prefixes (parity_spec 2.8)."""
  scores = {framework: sum(1 for k in state if k.startswith(prefixes))
            for framework, prefixes in _FRAMEWORK_MARKERS}
  best = max(scores, key=scores.get)
  return best if scores[best] else 'unknown'


def load_checkpoint(path, *, allow_caffe2: bool = False
                    ) -> tuple[str, collections.OrderedDict, dict]:
  """Load any supported checkpoint, dispatching on content (zip magic / legacy magic / pickle).

  `allow_caffe2` is passed to `load_pkl` (Caffe2 / Detectron1 pickles, e.g. ImageNet backbones).

  Returns:
    (framework_guess, state, meta): framework_guess in {'mmdet', 'detectron2', 'torchvision',
    'unknown'}; state and meta as in `load_pth` / `load_pkl`.
  """
  path = os.fspath(path)
  with open(path, 'rb') as fh:
    head = fh.read(512)
  kind = sniff_format(head)
  if kind in ('zip', 'legacy'):
    state, meta = load_pth(path)
  elif kind == 'pickle':
    state, meta = load_pkl(path, allow_caffe2=allow_caffe2)
  elif kind == 'tar':
    raise CheckpointFormatError(f'{path}: pre-0.1.10 torch tar format is not supported')
  elif not head:
    raise CheckpointFormatError(f'{path}: empty file')
  else:
    raise CheckpointFormatError(f'{path}: unknown checkpoint format (first bytes {head[:8]!r})')
  return guess_framework(state), state, meta
