"""Write the small torch-saved fixtures used by tests/checkpoints/test_torch_reader.py.

Needs torch (any 2.x; the committed files were written with torch 2.13.0+cpu). The tests themselves
never import torch: they read these files with maskrcnn_jax.checkpoints.torch_reader and compare to
`expected.npz`, written here from the same tensors.

  python scripts/make_pth_fixtures.py [--out tests/fixtures/pth]

Files (each in the zip format, torch >= 1.6 default, and the legacy format that mmdet's publish
script forces, `_use_new_zipfile_serialization=False`; parity_spec 1.1):
  mmdet_like_{zip,legacy}.pth  {'meta': {...}, 'state_dict': OrderedDict('module.' + name: tensor)}
  tv_like_{zip,legacy}.pth     a bare nn.Module state_dict (keeps `_metadata` versions)
  expected.npz                 name -> expected array (bf16 stored as float32 values + uint16 bits)

and, with `--d2-pkl` (numpy only, no torch; the committed file was written under numpy 1.26.4 so
that it names `numpy.core.multiarray`, as 2019-era detectron2 zoo pickles do):
  d2_like_numpy1.pkl           {'model': {name: ndarray}, '__author__', 'matching_heuristics'}
"""

from __future__ import annotations

import argparse
import collections
import os

import pickle

import numpy as np


MMDET_META = {
    'mmdet_version': '2.28.2+fixture',
    'mmcv_version': '1.7.2',
    'CLASSES': ('person', 'bicycle', 'car'),
    'epoch': 12,
    'iter': 7330,
    'config': "model = dict(type='MaskRCNN')\n",
}


def d2_like_model() -> 'collections.OrderedDict[str, np.ndarray]':
  """A few detectron2 zoo-style entries (parity_spec 1.3), values fixed by formula."""
  model = collections.OrderedDict()
  stem = np.arange(64 * 3 * 2 * 2, dtype=np.float32) / 97
  model['backbone.bottom_up.stem.conv1.weight'] = stem.reshape(64, 3, 2, 2)
  model['backbone.bottom_up.stem.conv1.norm.running_var'] = np.linspace(0.5, 2.0, 64,
                                                                        dtype=np.float32)
  for i, size in enumerate((32, 64, 128, 256, 512)):
    # d2 DefaultAnchorGenerator cell anchors for ratios (0.5, 1, 2) at one size (parity_spec 3.7).
    rows = []
    for ratio in (0.5, 1.0, 2.0):
      w = np.sqrt(size * size / ratio)
      h = ratio * w
      rows.append([-w / 2, -h / 2, w / 2, h / 2])
    name = f'proposal_generator.anchor_generator.cell_anchors.{i}'
    model[name] = np.array(rows, dtype=np.float32)
  model['roi_heads.box_predictor.cls_score.bias'] = np.linspace(-1, 1, 81, dtype=np.float32)
  return model


def write_d2_like_pkl(out: str) -> None:
  with open(os.path.join(out, 'd2_like_numpy1.pkl'), 'wb') as f:
    # detectron2 zoo files are plain pickles of numpy arrays (protocol 2 here, like py2/py3 dumps).
    pickle.dump({'model': d2_like_model(), '__author__': 'Detectron2 Model Zoo',
                 'matching_heuristics': True}, f, protocol=2)


def tensors():
  """The state-dict entries; each exercises one reader feature (parity_spec 1.1 (c))."""
  import torch  # pylint: disable=g-import-not-at-top
  sd = collections.OrderedDict()
  # Plain contiguous float32, conv-shaped.
  sd['backbone.conv1.weight'] = (
      torch.arange(4 * 3 * 3 * 3, dtype=torch.float32).reshape(4, 3, 3, 3) / 7)
  # A transposed, non-contiguous view (stride (1, 7)).
  base = torch.arange(35, dtype=torch.float32).reshape(5, 7) - 17.5
  sd['head.fc.weight_t'] = base.t()
  # Two tensors sharing one storage, at different offsets, plus a strided slice of it.
  shared = torch.linspace(-1.0, 1.0, 24, dtype=torch.float32)
  sd['shared.a'] = shared[3:11].view(2, 4)
  sd['shared.b'] = shared[10:16]
  sd['shared.every_other'] = shared.view(4, 6)[1:, ::2]
  # Reduced / other dtypes.
  sd['half.weight'] = (torch.arange(10, dtype=torch.float32) / 3).to(torch.float16)
  bf16 = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 8 - 0.5
  sd['bf16.weight'] = bf16.to(torch.bfloat16)
  sd['f64.value'] = torch.tensor([1.0 / 3.0, -2.5], dtype=torch.float64)
  sd['int32.index'] = torch.tensor([[1, -2], [3, 2**30]], dtype=torch.int32)
  sd['bool.mask'] = torch.tensor([True, False, True])
  sd['empty.weight'] = torch.zeros(0, 3)
  # BatchNorm-style buffers, with the int64 () scalar counter that the converter drops.
  sd['backbone.bn1.weight'] = torch.tensor([1.0, 2.0, 3.0, 4.0])
  sd['backbone.bn1.bias'] = torch.tensor([0.5, -0.5, 0.25, 0.0])
  sd['backbone.bn1.running_mean'] = torch.tensor([0.1, 0.2, 0.3, 0.4])
  sd['backbone.bn1.running_var'] = torch.tensor([1.5, 2.5, 3.5, 4.5])
  sd['backbone.bn1.num_batches_tracked'] = torch.tensor(7, dtype=torch.int64)
  # An mmdet-style name, so that the framework guess has something to go on.
  sd['neck.lateral_convs.0.conv.bias'] = torch.tensor([0.125, -0.375])
  # An nn.Parameter pickles through torch._utils._rebuild_parameter.
  sd['param.weight'] = torch.nn.Parameter(torch.tensor([[0.25, -4.0]]), requires_grad=True)
  return sd


def tv_like_module():
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  return torch.nn.Sequential(
      torch.nn.Conv2d(3, 4, 3, bias=False),
      torch.nn.BatchNorm2d(4),
      torch.nn.Linear(6, 2),
  )


def to_numpy(t) -> dict[str, np.ndarray]:
  import torch  # pylint: disable=g-import-not-at-top
  t = t.detach()
  if t.dtype == torch.bfloat16:
    return {'': t.float().numpy(), '#bf16_bits': t.view(torch.int16).numpy().view(np.uint16)}
  return {'': t.numpy().copy()}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument(
      '--out', default=os.path.join(os.path.dirname(__file__), '..', 'tests', 'fixtures', 'pth'))
  parser.add_argument('--d2-pkl', action='store_true',
                      help='write only d2_like_numpy1.pkl (no torch)')
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  if args.d2_pkl:
    write_d2_like_pkl(args.out)
    print('wrote d2_like_numpy1.pkl with numpy', np.__version__)
    return
  import torch  # pylint: disable=g-import-not-at-top

  sd = tensors()
  mmdet_like = {'meta': MMDET_META,
                'state_dict': collections.OrderedDict(('module.' + k, v) for k, v in sd.items())}
  tv_sd = tv_like_module().state_dict()
  expected = {}
  for prefix, state in (('mmdet/', sd), ('tv/', tv_sd)):
    for k, v in state.items():
      for suffix, arr in to_numpy(v).items():
        expected[prefix + k + suffix] = arr

  for fmt, zip_flag in (('zip', True), ('legacy', False)):
    torch.save(mmdet_like, os.path.join(args.out, f'mmdet_like_{fmt}.pth'),
               _use_new_zipfile_serialization=zip_flag)
    torch.save(tv_sd, os.path.join(args.out, f'tv_like_{fmt}.pth'),
               _use_new_zipfile_serialization=zip_flag)
    # Round-trip check with torch itself.
    back = torch.load(os.path.join(args.out, f'mmdet_like_{fmt}.pth'), weights_only=True)
    for k, v in sd.items():
      assert torch.equal(back['state_dict']['module.' + k], v.detach()), k
  np.savez(os.path.join(args.out, 'expected.npz'), **expected)
  with open(os.path.join(args.out, 'tv_like_metadata.txt'), 'w') as f:
    for k, v in tv_sd._metadata.items():  # pylint: disable=protected-access
      f.write(f'{k!r}\t{v!r}\n')
  print('wrote', sorted(os.listdir(args.out)), 'with torch', torch.__version__)


if __name__ == '__main__':
  main()
