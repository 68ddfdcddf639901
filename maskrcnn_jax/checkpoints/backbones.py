"""The ImageNet-pretrained backbones the upstream recipes start from, and how to read them.

numpy only (no jax, no torch). A recipe names its upstream backbone in `config.model.backbone_init`
with the identifier its own framework uses:

  detectron2 yaml    MODEL.WEIGHTS "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
  mmdetection v2     backbone.init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet50')
                     (or `pretrained=`), 'open-mmlab://detectron2/resnet50_caffe', ...
  torchvision        references/detection --weights-backbone ResNet50_Weights.IMAGENET1K_V1

`CATALOG` maps each identifier to the file it resolves to upstream (mmcv/mmengine
`open_mmlab.json` / `torchvision_0.12.json`, detectron2 `Detectron2Handler`, torchvision's weights
enums), its download link and its pixel convention. Nothing downloads: the file is looked up in
`default_directory()` ($MASKRCNN_JAX_PRETRAINED, else ~/.cache/maskrcnn_jax/pretrained) or given
as a path, and a missing file is an error that names it and its link.

Pixel conventions (`PixelConvention`): the MSRA ResNets (detectron2 R-50/R-101.pkl, mmdetection's
detectron2/resnet*_caffe) were trained on BGR 0-255 pixels minus the mean, std 1, stride in the
1x1 conv ("caffe" style); FAIR's Caffe2 ResNeXt (X-101-32x8d) on BGR divided by a std of ~57,
stride in the 3x3 conv; torchvision's files (and mmdetection's open-mmlab://resnext101_*) on RGB
[0, 1] minus (0.485, 0.456, 0.406) over (0.229, 0.224, 0.225), i.e. 0-255 pixels minus (123.675,
116.28, 103.53) over (58.395, 57.12, 57.375), stride in the 3x3 conv. `check_convention` refuses a
config that feeds a file other pixels or another stride placement.

Public API:
  CATALOG, lookup(identifier_or_file_name) -> ImageNetBackbone | None
  default_directory(), resolve(value, directory=None) -> (path, entry or None)
  read(path) -> (state, naming)             any of the three namings, .pth or .pkl
  file_convention(path, state, entry) -> (PixelConvention, how it was determined)
  check_convention(convention, model_config, *, what)   raises BackboneInitError
  check_network(entry, model_config, *, what)            raises BackboneInitError
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import numpy as np

from maskrcnn_jax.checkpoints import name_maps, torch_reader
from maskrcnn_jax.checkpoints.torch_reader import CheckpointError

__all__ = [
    'BackboneInitError', 'PixelConvention', 'ImageNetBackbone', 'CAFFE_MSRA', 'C2_FAIR', 'PYTORCH',
    'CATALOG', 'ENV_VAR', 'lookup', 'default_directory', 'resolve', 'read', 'file_convention',
    'check_convention', 'check_network', 'describe_pixels',
]

ENV_VAR = 'MASKRCNN_JAX_PRETRAINED'


class BackboneInitError(CheckpointError, ValueError):
  """The recipe's ImageNet backbone cannot be used: missing file, other pixels, other network.

  The message is one line (the train CLI prints it and exits with status 2).
  """


@dataclasses.dataclass(frozen=True)
class PixelConvention:
  """What the network saw during ImageNet training.

  Attributes:
    name: 'caffe' | 'c2_fair' | 'pytorch'.
    rgb: channel order of the network input (False: BGR).
    mean, std: per channel, in the network's order, in units of 0-255 pixels.
    stride_in_1x1: where the bottleneck's stride sits (caffe style: the 1x1 conv).
  """

  name: str
  rgb: bool
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  stride_in_1x1: bool

  def describe(self) -> str:
    return describe_pixels(self.rgb, self.mean, self.std, self.stride_in_1x1)


def describe_pixels(rgb: bool, mean, std, stride_in_1x1: bool) -> str:
  def fmt(v):
    return '(' + ', '.join(f'{float(x):g}' for x in v) + ')'
  return (f"{'RGB' if rgb else 'BGR'} 0-255 minus {fmt(mean)} over {fmt(std)}, stride in the "
          f"{'1x1' if stride_in_1x1 else '3x3'} conv")


_BGR_MEAN = (103.53, 116.28, 123.675)
CAFFE_MSRA = PixelConvention('caffe', False, _BGR_MEAN, (1.0, 1.0, 1.0), True)
C2_FAIR = PixelConvention('c2_fair', False, _BGR_MEAN, (57.375, 57.12, 58.395), False)
PYTORCH = PixelConvention('pytorch', True, (123.675, 116.28, 103.53), (58.395, 57.12, 57.375),
                          False)


@dataclasses.dataclass(frozen=True)
class ImageNetBackbone:
  """One upstream ImageNet file.

  Attributes:
    id: the identifier the upstream config uses (also the catalogue key).
    files: the published file name(s); files[0] is what the identifier resolves to today, others
      are earlier names of the same weights.
    url: where files[0] is published.
    convention: its `PixelConvention`.
    depth, groups, width_per_group: the network (ResNet-50: 50, 1, 64; X-101-32x8d: 101, 32, 8).
    naming: the state-dict naming of the file ('c2' | 'detectron2' | 'torchvision').
  """

  id: str
  files: tuple[str, ...]
  url: str
  convention: PixelConvention
  depth: int
  groups: int = 1
  width_per_group: int = 64
  naming: str = 'torchvision'

  def describe_network(self) -> str:
    return _network(self.depth, self.groups, self.width_per_group)


def _network(depth: int, groups: int, width_per_group: int) -> str:
  if groups == 1 and width_per_group == 64:
    return f'ResNet-{depth}'
  return f'ResNeXt-{depth} {groups}x{width_per_group}d'


_D2 = 'https://dl.fbaipublicfiles.com/detectron2/'  # detectron2/utils/file_io.py Detectron2Handler
_TV = 'https://download.pytorch.org/models/'
_MM = 'https://download.openmmlab.com/pretrain/third_party/'  # mmcv model_zoo/open_mmlab.json

CATALOG: dict[str, ImageNetBackbone] = {e.id: e for e in (
    # detectron2 configs/COCO-InstanceSegmentation/*.yaml MODEL.WEIGHTS (Caffe2 blob pickles).
    ImageNetBackbone('detectron2://ImageNetPretrained/MSRA/R-50.pkl', ('R-50.pkl',),
                     _D2 + 'ImageNetPretrained/MSRA/R-50.pkl', CAFFE_MSRA, 50, naming='c2'),
    ImageNetBackbone('detectron2://ImageNetPretrained/MSRA/R-101.pkl', ('R-101.pkl',),
                     _D2 + 'ImageNetPretrained/MSRA/R-101.pkl', CAFFE_MSRA, 101, naming='c2'),
    ImageNetBackbone('detectron2://ImageNetPretrained/FAIR/X-101-32x8d.pkl', ('X-101-32x8d.pkl',),
                     _D2 + 'ImageNetPretrained/FAIR/X-101-32x8d.pkl', C2_FAIR, 101, 32, 8,
                     naming='c2'),
    # mmdetection v2: torchvision:// resolves through mmcv/mmengine `torchvision_0.12.json` (the
    # 2020 zoo runs, on torchvision < 0.10, fetched the earlier file names of the same models).
    ImageNetBackbone('torchvision://resnet50', ('resnet50-0676ba61.pth', 'resnet50-19c8e357.pth'),
                     _TV + 'resnet50-0676ba61.pth', PYTORCH, 50),
    ImageNetBackbone('torchvision://resnet101',
                     ('resnet101-63fe2227.pth', 'resnet101-5d3b4d8f.pth'),
                     _TV + 'resnet101-63fe2227.pth', PYTORCH, 101),
    # mmcv model_zoo/open_mmlab.json; the detectron2/* files are the MSRA / FAIR Caffe2 models in
    # mmdetection names (tools/model_converters/detectron2pytorch.py), hence their BGR pixels.
    ImageNetBackbone('open-mmlab://detectron2/resnet50_caffe', ('resnet50_msra-5891d200.pth',),
                     _MM + 'resnet50_msra-5891d200.pth', CAFFE_MSRA, 50),
    ImageNetBackbone('open-mmlab://detectron2/resnet101_caffe', ('resnet101_msra-6cc46731.pth',),
                     _MM + 'resnet101_msra-6cc46731.pth', CAFFE_MSRA, 101),
    ImageNetBackbone('open-mmlab://detectron2/resnext101_32x8d',
                     ('resnext101_32x8d-1516f1aa.pth',), _MM + 'resnext101_32x8d-1516f1aa.pth',
                     C2_FAIR, 101, 32, 8),
    ImageNetBackbone('open-mmlab://resnext101_32x4d', ('resnext101_32x4d-a5af3160.pth',),
                     _MM + 'resnext101_32x4d-a5af3160.pth', PYTORCH, 101, 32, 4),
    ImageNetBackbone('open-mmlab://resnext101_64x4d', ('resnext101_64x4d-ee2c6f71.pth',),
                     _MM + 'resnext101_64x4d-ee2c6f71.pth', PYTORCH, 101, 64, 4),
    # torchvision weights enums (torchvision/models/resnet.py), references/detection
    # --weights-backbone.
    ImageNetBackbone('ResNet50_Weights.IMAGENET1K_V1', ('resnet50-0676ba61.pth',),
                     _TV + 'resnet50-0676ba61.pth', PYTORCH, 50),
    ImageNetBackbone('ResNet101_Weights.IMAGENET1K_V1', ('resnet101-63fe2227.pth',),
                     _TV + 'resnet101-63fe2227.pth', PYTORCH, 101),
    ImageNetBackbone('ResNeXt101_32X8D_Weights.IMAGENET1K_V1', ('resnext101_32x8d-8ba56ff5.pth',),
                     _TV + 'resnext101_32x8d-8ba56ff5.pth', PYTORCH, 101, 32, 8),
)}


def lookup(name: str) -> ImageNetBackbone | None:
  """The catalogue entry of an upstream identifier or of a published file name (a path's base
  name), else None."""
  if name in CATALOG:
    return CATALOG[name]
  base = os.path.basename(name)
  for entry in CATALOG.values():
    if base in entry.files:
      return entry
  return None


def default_directory() -> str:
  """$MASKRCNN_JAX_PRETRAINED if set, else ~/.cache/maskrcnn_jax/pretrained."""
  return os.environ.get(ENV_VAR) or os.path.join(
      os.path.expanduser('~'), '.cache', 'maskrcnn_jax', 'pretrained')


def resolve(value: str, directory: str | None = None) -> tuple[str, ImageNetBackbone | None]:
  """The local file of `model.backbone_init` and its catalogue entry.

  Args:
    value: an upstream identifier of `CATALOG` (looked up as its file name in `directory`) or a
      path to a backbone file.
    directory: where downloaded files live (default `default_directory()`).

  Raises:
    BackboneInitError: the file is not there (the message names the file, the folder searched and
      the download link), or `value` is neither a known identifier nor an existing file.
  """
  entry = CATALOG.get(value)
  if entry is None:
    path = os.path.expanduser(value)
    if os.path.isfile(path):
      return path, lookup(path)
    if '://' in value or '_Weights.' in value:
      raise BackboneInitError(
          f'model.backbone_init={value!r} is not a known upstream backbone (known: '
          f'{", ".join(sorted(CATALOG))}); give the path of the file instead')
    raise BackboneInitError(f'model.backbone_init={value!r}: no such file')
  directory = directory or default_directory()
  for name in entry.files:
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return path, entry
  raise BackboneInitError(
      f'model.backbone_init={value!r} needs the ImageNet file {entry.files[0]}, which is not in '
      f'{directory}: download it from {entry.url} into that folder (or set ${ENV_VAR}, or pass '
      f'--config.model.backbone_init=/path/to/{entry.files[0]}); nothing is downloaded at run '
      'time. To train from scratch instead: --config.model.backbone_init=')


def read(path: str) -> tuple[dict[str, np.ndarray], str]:
  """(state, naming) of a backbone file: torch `.pth` (zip or legacy), detectron2 `.pkl` (Caffe2
  blob dict or `{'model': ...}`), through torch_reader's allowlist unpickler."""
  _, state, _ = torch_reader.load_checkpoint(path, allow_caffe2=True)
  return state, name_maps.backbone_naming(state)


def _has_real_statistics(state: Mapping[str, np.ndarray]) -> bool:
  """False when the file has no BN statistics, or only the mean 0 / var 1 a converter writes for
  a Caffe2 affine-only model (mmdetection's detectron2pytorch.py)."""
  means = [v for k, v in state.items() if k.endswith(('running_mean', '_bn_rm'))]
  varis = [v for k, v in state.items() if k.endswith(('running_var', '_bn_riv'))]
  if not means:
    return False
  return not (all(np.all(np.asarray(v) == 0) for v in means)
              and all(np.all(np.asarray(v) == 1) for v in varis))


def file_convention(path: str, state: Mapping[str, np.ndarray], entry: ImageNetBackbone | None
                    ) -> tuple[PixelConvention, str]:
  """The pixel convention of a backbone file and how it was determined.

  From the catalogue when the file is a published one (by identifier or file name); otherwise
  from its contents: a file without BN statistics (Caffe2 affine-only, or converted from one) is
  a Caffe2 model, MSRA caffe style when it is a ResNet and FAIR's when it is a ResNeXt; a file
  with statistics (torchvision-trained) is pytorch style.
  """
  if entry is not None:
    return entry.convention, f'{os.path.basename(path)} is {entry.id}'
  naming = name_maps.backbone_naming(state)
  conv2 = {'c2': 'res2_0_branch2b_w', 'detectron2': 'res2.0.conv2.weight',
           'torchvision': 'layer1.0.conv2.weight'}[naming]
  shape = np.shape(state[conv2]) if conv2 in state else (64, 64)
  grouped = shape[0] != shape[1]
  if _has_real_statistics(state):
    return PYTORCH, f'{os.path.basename(path)} has BatchNorm statistics (torchvision-trained)'
  how = f'{os.path.basename(path)} has no BatchNorm statistics (a Caffe2 model)'
  return (C2_FAIR, how + ', grouped convs (FAIR ResNeXt)') if grouped else (CAFFE_MSRA, how)


def _config_pixels(model: Any) -> tuple[bool, np.ndarray, np.ndarray]:
  """(rgb, mean, std) the config feeds the network, in 0-255 units (config_lib pixel dicts)."""
  scale = float(model.get('input_scale', 1.0))
  return (bool(model.to_rgb), np.asarray(model.pixel_mean, np.float64) / scale,
          np.asarray(model.pixel_std, np.float64) / scale)


def check_convention(convention: PixelConvention, model: Any, *, what: str) -> None:
  """Refuse a config whose input pixels or stride placement differ from the file's.

  Args:
    convention: the file's (`file_convention`).
    model: config.model (pixel_mean, pixel_std, to_rgb, input_scale, stride_in_1x1).
    what: names the file and how its convention is known, for the message.
  """
  rgb, mean, std = _config_pixels(model)
  stride_in_1x1 = bool(model.stride_in_1x1)
  same = (rgb == convention.rgb and np.allclose(mean, convention.mean, rtol=1e-3)
          and np.allclose(std, convention.std, rtol=1e-3)
          and stride_in_1x1 == convention.stride_in_1x1)
  if not same:
    raise BackboneInitError(
        f'{what}: a {convention.name}-style file (trained on '
        f'{convention.describe()}), but the config feeds '
        f'{describe_pixels(rgb, mean, std, stride_in_1x1)}; the pixel convention of the recipe '
        'and of its backbone file disagree (set model.pixel_mean / pixel_std / to_rgb / '
        'input_scale / stride_in_1x1 to the file\'s, or use a file of the recipe\'s convention)')


def check_network(entry: ImageNetBackbone | None, model: Any, *, what: str) -> None:
  """Refuse a catalogued file whose network is not the config's (depth, groups, width)."""
  if entry is None:
    return
  want = (int(model.depth), int(model.groups), int(model.width_per_group))
  if (entry.depth, entry.groups, entry.width_per_group) != want:
    raise BackboneInitError(
        f'{what}: the file is a {entry.describe_network()}, the config builds a '
        f'{_network(*want)} (model.depth / groups / width_per_group)')
