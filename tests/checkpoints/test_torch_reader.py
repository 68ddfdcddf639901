"""The torch-free checkpoint reader on real torch-written files (tests/fixtures/pth, written by
scripts/make_pth_fixtures.py with torch 2.13) and on damaged / hostile / d2-like files made here.

Nothing here imports torch.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import re
import zipfile

import importlib.util

import ml_dtypes
import numpy as np
import pytest

from maskrcnn_jax.checkpoints import name_maps
from maskrcnn_jax.checkpoints import torch_reader as tr

PTH_DIR = os.path.join(os.path.dirname(__file__), '..', 'fixtures', 'pth')
FIXTURES = ['mmdet_like_zip.pth', 'mmdet_like_legacy.pth', 'tv_like_zip.pth', 'tv_like_legacy.pth']


@pytest.fixture(scope='module')
def expected():
  with np.load(os.path.join(PTH_DIR, 'expected.npz')) as f:
    return {k: f[k] for k in f.files}


def fixture_path(name):
  return os.path.join(PTH_DIR, name)


def read_bytes(name):
  with open(fixture_path(name), 'rb') as f:
    return f.read()


@pytest.mark.parametrize('name', FIXTURES)
def test_fixture_matches_expected(name, expected):
  state, meta = tr.load_pth(fixture_path(name))
  prefix = 'mmdet/' if name.startswith('mmdet') else 'tv/'
  want_keys = [k[len(prefix):] for k in expected if k.startswith(prefix) and '#' not in k]
  assert list(state) == want_keys  # file order kept, `module.` stripped
  for k, v in state.items():
    e = expected[prefix + k]
    assert isinstance(v, np.ndarray) and v.flags['C_CONTIGUOUS'], k
    assert v.shape == e.shape, k
    if v.dtype == np.dtype(ml_dtypes.bfloat16):
      np.testing.assert_array_equal(v.view(np.uint16), expected[prefix + k + '#bf16_bits'])
      np.testing.assert_array_equal(v.astype(np.float32), e)
    else:
      assert v.dtype == e.dtype, k
      np.testing.assert_array_equal(v, e)
  assert meta['format'] == ('zip' if 'zip' in name else 'legacy')
  assert meta['source'] == fixture_path(name)


@pytest.mark.parametrize('fmt', ['zip', 'legacy'])
def test_mmdet_wrapper_views_and_dtypes(fmt, expected):
  state, meta = tr.load_pth(fixture_path(f'mmdet_like_{fmt}.pth'))
  assert meta['wrapper'] == 'state_dict'
  assert meta['meta']['mmdet_version'] == '2.28.2+fixture'
  assert meta['meta']['CLASSES'] == ('person', 'bicycle', 'car')
  assert meta['meta']['epoch'] == 12
  assert not any(k.startswith('module.') for k in state)
  # transposed view: (7, 5) with the values of base.t()
  base = np.arange(35, dtype=np.float32).reshape(5, 7) - 17.5
  np.testing.assert_array_equal(state['head.fc.weight_t'], base.T)
  # two tensors sharing one storage at offsets 3 and 10, plus a strided slice of it
  shared = expected['mmdet/shared.a'].ravel()
  np.testing.assert_array_equal(state['shared.a'].ravel()[7], state['shared.b'][0])  # element 10
  state['shared.a'][0, 0] = 99.0  # copies, not aliases of one buffer
  assert state['shared.b'][0] != 99.0 and shared[0] != 99.0
  assert state['shared.every_other'].shape == (3, 3)
  assert state['half.weight'].dtype == np.float16
  assert state['bf16.weight'].dtype == np.dtype(ml_dtypes.bfloat16)
  assert state['f64.value'].dtype == np.float64
  assert state['int32.index'].dtype == np.int32
  assert state['bool.mask'].dtype == np.bool_
  assert state['empty.weight'].shape == (0, 3)
  nbt = state['backbone.bn1.num_batches_tracked']
  assert nbt.shape == () and nbt.dtype == np.int64 and int(nbt) == 7
  np.testing.assert_array_equal(state['param.weight'], [[0.25, -4.0]])  # via _rebuild_parameter


@pytest.mark.parametrize('fmt', ['zip', 'legacy'])
def test_bare_state_dict_keeps_metadata(fmt):
  state, meta = tr.load_pth(fixture_path(f'tv_like_{fmt}.pth'))
  assert meta['wrapper'] == 'bare'
  metadata = state._metadata  # pylint: disable=protected-access
  versions = {k: v['version'] for k, v in metadata.items()}
  assert versions == {'': 1, '0': 1, '1': 2, '2': 1}
  assert meta['version_metadata'] is metadata
  assert list(state) == ['0.weight', '1.weight', '1.bias', '1.running_mean', '1.running_var',
                         '1.num_batches_tracked', '2.weight', '2.bias']


def test_load_checkpoint_dispatch():
  fw, state, meta = tr.load_checkpoint(fixture_path('mmdet_like_legacy.pth'))
  assert fw == 'mmdet' and meta['format'] == 'legacy' and 'neck.lateral_convs.0.conv.bias' in state
  fw, _, meta = tr.load_checkpoint(fixture_path('tv_like_zip.pth'))
  assert fw == 'unknown' and meta['format'] == 'zip'
  assert tr.sniff_format(read_bytes('mmdet_like_zip.pth')[:512]) == 'zip'
  assert tr.sniff_format(read_bytes('mmdet_like_legacy.pth')[:512]) == 'legacy'


# ---------------------------------------------------------------------------------------------
# Damaged files.


def test_truncated_legacy_in_storage_data(tmp_path):
  raw = read_bytes('mmdet_like_legacy.pth')
  path = tmp_path / 'cut.pth'
  # The last storage may be the empty tensor's (count only): walk back to a cut inside data.
  for cut in range(len(raw) - 1, len(raw) - 400, -1):
    path.write_bytes(raw[:cut])
    with pytest.raises(tr.CheckpointFormatError) as info:
      tr.load_pth(path)
    if 'element count' not in str(info.value):
      break
  assert re.fullmatch(r'.*cut\.pth: truncated: storage \d+ \(key \d+, torch\.\w+Storage, '
                      r'\d+ elements\) needs \d+ bytes, \d+ left', str(info.value)), str(info.value)


def test_truncated_legacy_in_element_count(tmp_path):
  raw = read_bytes('mmdet_like_legacy.pth')
  path = tmp_path / 'cut.pth'
  # Cut points walking back from the end: some land inside a storage's 8-byte element count.
  for cut in range(len(raw) - 1, len(raw) - 400, -1):
    path.write_bytes(raw[:cut])
    with pytest.raises(tr.CheckpointFormatError,
                       match=r'cut\.pth: truncated: storage \d+ ') as info:
      tr.load_pth(path)
    if 'needs an 8-byte element count' in str(info.value):
      return
  pytest.fail('no cut point produced the element-count message')


def test_truncated_legacy_in_pickle(tmp_path):
  raw = read_bytes('mmdet_like_legacy.pth')
  path = tmp_path / 'cut.pth'
  path.write_bytes(raw[:300])
  with pytest.raises(tr.CheckpointFormatError,
                     match=r'cut\.pth: truncated or corrupt object pickle'):
    tr.load_pth(path)


def test_truncated_zip(tmp_path):
  raw = read_bytes('mmdet_like_zip.pth')
  path = tmp_path / 'cut.pth'
  path.write_bytes(raw[:len(raw) // 2])
  with pytest.raises(tr.CheckpointFormatError,
                     match=r'cut\.pth: truncated or corrupt zip archive \(\d+ bytes; '
                           r'the end-of-central-directory'):
    tr.load_checkpoint(path)


def _rewrite_zip(raw: bytes, edit) -> bytes:
  """Copy a torch zip, passing each (name, data) through `edit` (stored, like torch writes)."""
  src = zipfile.ZipFile(io.BytesIO(raw))
  out = io.BytesIO()
  with zipfile.ZipFile(out, 'w', compression=zipfile.ZIP_STORED) as dst:
    for info in src.infolist():
      data = edit(info.filename, src.read(info.filename))
      if data is not None:
        dst.writestr(info.filename, data)
  return out.getvalue()


def test_zip_storage_record_too_short(tmp_path):
  raw = _rewrite_zip(read_bytes('mmdet_like_zip.pth'),
                     lambda n, d: d[:100] if n.endswith('/data/0') else d)
  path = tmp_path / 'short.pth'
  path.write_bytes(raw)
  with pytest.raises(tr.CheckpointFormatError,
                     match=r'short\.pth: truncated: storage 0 \(torch\.FloatStorage, '
                           r'108 elements\) needs 432 bytes, 100 left'):
    tr.load_pth(path)


def test_zip_missing_storage_record(tmp_path):
  raw = _rewrite_zip(read_bytes('mmdet_like_zip.pth'),
                     lambda n, d: None if n.endswith('/data/1') else d)
  path = tmp_path / 'missing.pth'
  path.write_bytes(raw)
  with pytest.raises(tr.CheckpointFormatError,
                     match=r"storage 1 has no record 'mmdet_like_zip/data/1'"):
    tr.load_pth(path)


def test_zip_corrupt_bytes(tmp_path):
  raw = bytearray(read_bytes('mmdet_like_zip.pth'))
  zf = zipfile.ZipFile(io.BytesIO(bytes(raw)))
  info = zf.getinfo('mmdet_like_zip/data/0')
  # Local header: 30 bytes + name + extra; flip one data byte (CRC now fails).
  name_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], 'little')
  extra_len = int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], 'little')
  raw[info.header_offset + 30 + name_len + extra_len + 5] ^= 0xFF
  path = tmp_path / 'flipped.pth'
  path.write_bytes(bytes(raw))
  with pytest.raises(tr.CheckpointFormatError,
                     match=r"flipped\.pth: corrupt zip entry 'mmdet_like_zip/data/0'"):
    tr.load_pth(path)


def test_not_a_checkpoint(tmp_path):
  path = tmp_path / 'notes.txt'
  path.write_bytes(b'hello world, not a checkpoint')
  with pytest.raises(tr.CheckpointFormatError, match=r'notes\.txt: unknown checkpoint format'):
    tr.load_checkpoint(path)
  empty = tmp_path / 'empty.pth'
  empty.write_bytes(b'')
  with pytest.raises(tr.CheckpointFormatError, match='empty file'):
    tr.load_checkpoint(empty)


# ---------------------------------------------------------------------------------------------
# Hostile pickles: refused before anything is called.

# GLOBAL 'os system', a string argument, REDUCE: pickle opcodes for os.system('touch <marker>').
def _evil_pickle(marker: str) -> bytes:
  cmd = f'touch {marker}'.encode()
  return (b'\x80\x02cos\nsystem\nq\x00X' + len(cmd).to_bytes(4, 'little') + cmd
          + b'q\x01\x85q\x02Rq\x03.')


def _legacy_prefix() -> bytes:
  return (pickle.dumps(tr.LEGACY_MAGIC_NUMBER, protocol=2) + pickle.dumps(1001, protocol=2)
          + pickle.dumps({'protocol_version': 1001, 'little_endian': True,
                          'type_sizes': {'short': 2, 'int': 4, 'long': 4}}, protocol=2))


@pytest.mark.parametrize('container', ['pkl', 'zip', 'legacy', 'mmdet_meta'])
def test_os_system_is_refused(tmp_path, container):
  marker = tmp_path / 'pwned'
  evil = _evil_pickle(str(marker))
  path = tmp_path / f'evil.{container}'
  if container == 'pkl':
    path.write_bytes(evil)
  elif container == 'zip':
    path.write_bytes(_rewrite_zip(read_bytes('mmdet_like_zip.pth'),
                                  lambda n, d: evil if n.endswith('data.pkl') else d))
  elif container == 'legacy':
    path.write_bytes(_legacy_prefix() + evil)
  else:  # hidden inside an mmdet meta dict of an otherwise valid-looking pickle
    payload = pickle.dumps({'meta': {'x': 1}, 'state_dict': {}}, protocol=2)
    payload = payload.replace(b'K\x01', evil[2:-1], 1)  # meta['x'] = os.system(...)
    path.write_bytes(_legacy_prefix() + payload)
  with pytest.raises(tr.UnsafeCheckpointError) as info:
    tr.load_checkpoint(path)
  assert str(info.value) == f"{path}: refusing to load global 'os.system' (not in the allowlist)"
  assert not marker.exists()


class _Evil:

  def __reduce__(self):
    return (eval, ("__import__('os').getcwd()",))


def test_reduce_based_payload_is_refused(tmp_path):
  path = tmp_path / 'reduce.pkl'
  path.write_bytes(pickle.dumps({'model': {'w': _Evil()}}, protocol=4))
  with pytest.raises(tr.UnsafeCheckpointError, match=r"refusing to load global 'builtins\.eval'"):
    tr.load_pkl(path)


def test_torch_globals_are_not_allowed_in_a_plain_pickle(tmp_path):
  path = tmp_path / 'torchy.pkl'
  path.write_bytes(b'\x80\x02ctorch._utils\n_rebuild_tensor_v2\nq\x00.')
  with pytest.raises(tr.UnsafeCheckpointError, match=r"'torch\._utils\._rebuild_tensor_v2'"):
    tr.load_pkl(path)


# ---------------------------------------------------------------------------------------------
# detectron2-like .pkl (parity_spec 1.3).


def _d2_model():
  rng = np.random.default_rng(0)
  f32 = np.float32
  return collections.OrderedDict([
      ('backbone.bottom_up.stem.conv1.weight', rng.standard_normal((64, 3, 7, 7)).astype(f32)),
      ('backbone.bottom_up.stem.conv1.norm.running_var', np.ones(64, np.float32)),
      ('proposal_generator.anchor_generator.cell_anchors.0',
       np.array([[-22.6274, -11.3137, 22.6274, 11.3137]] * 3, np.float32)),
      ('roi_heads.box_predictor.cls_score.weight', rng.standard_normal((81, 1024)).astype(f32)),
  ])


@pytest.mark.parametrize('protocol', [2, 4, 5])
def test_d2_pkl(tmp_path, protocol):
  model = _d2_model()
  path = tmp_path / 'model_final.pkl'
  with open(path, 'wb') as f:
    pickle.dump({'model': model, '__author__': 'Detectron2 Model Zoo',
                 'matching_heuristics': True}, f, protocol=protocol)
  fw, state, meta = tr.load_checkpoint(path)
  assert fw == 'detectron2'
  assert meta['format'] == 'pickle' and meta['__author__'] == 'Detectron2 Model Zoo'
  assert meta['matching_heuristics'] is True
  assert list(state) == list(model)
  for k in model:
    assert state[k].dtype == np.float32
    np.testing.assert_array_equal(state[k], model[k])


def test_d2_pkl_written_by_numpy1(tmp_path):
  """Old numpy pickles name numpy.core.multiarray (numpy 2 has numpy._core)."""
  w = np.arange(6, dtype=np.float32).reshape(2, 3)
  raw = pickle.dumps({'model': {'w': w}, '__author__': 'x'}, protocol=2)
  raw = raw.replace(b'cnumpy._core.multiarray\n', b'cnumpy.core.multiarray\n')
  assert b'numpy.core.multiarray' in raw
  path = tmp_path / 'old.pkl'
  path.write_bytes(raw)
  state, _ = tr.load_pkl(path)
  np.testing.assert_array_equal(state['w'], w)


def test_detectron1_blobs_are_rejected(tmp_path):
  path = tmp_path / 'blobs.pkl'
  path.write_bytes(pickle.dumps({'blobs': {'conv1_w': np.zeros(3)}}, protocol=2))
  with pytest.raises(tr.CheckpointFormatError, match=r'Caffe2/Detectron1 blob file'):
    tr.load_pkl(path)


def _fixture_script():
  path = os.path.join(os.path.dirname(__file__), '..', '..', 'scripts', 'make_pth_fixtures.py')
  spec = importlib.util.spec_from_file_location('_make_pth_fixtures', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)  # imports torch only inside its torch functions
  return module


def test_committed_numpy1_d2_pkl():
  """A real numpy-1.26 pickle (numpy.core.multiarray globals), read under the numpy here."""
  path = fixture_path('d2_like_numpy1.pkl')
  with open(path, 'rb') as f:
    assert b'numpy.core.multiarray' in f.read()
  fw, state, meta = tr.load_checkpoint(path)
  assert fw == 'detectron2' and meta['__author__'] == 'Detectron2 Model Zoo'
  want = _fixture_script().d2_like_model()
  assert list(state) == list(want)
  for k, v in want.items():
    assert state[k].dtype == v.dtype
    np.testing.assert_array_equal(state[k], v)
  anchors = name_maps.cell_anchors(state)
  assert [a.shape for a in anchors] == [(3, 4)] * 5
  # d2 cell anchors for size 32, ratios (0.5, 1, 2): w = sqrt(32^2 / r), h = r * w, centred at 0.
  np.testing.assert_allclose(anchors[0][1], [-16, -16, 16, 16])
  np.testing.assert_allclose(anchors[0][0], [-22.627417, -11.313708, 22.627417, 11.313708],
                             rtol=1e-6)
