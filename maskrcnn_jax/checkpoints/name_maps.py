"""Map mmdetection v2 / detectron2 / torchvision state dicts onto the Flax variable tree.

numpy only (no jax, no torch). The target tree, its paths and layouts are the contract in
docs/internals.md ("Flax variable tree of `modeling.MaskRCNN`"); the source names are
parity_spec 2.2-2.8, the layout conversions parity_spec 2.9.

Each framework keeps its native class layout (parity_spec 5 item 4): mmdet / d2 heads stay
81-way (background last) / 80-way, torchvision heads stay 91-way (background first).

Public API:
  ModelSpec(depth, has_maskiou, torchvision_v2, groups, width_per_group, num_classes, arch)
  map_state_dict(state, *, framework, spec, dtype=np.float32) -> MappingResult
  check_not_mmdet_v1(state, source)   raises LegacyMmdetCheckpointError
  infer_spec(state, *, framework) -> ModelSpec
  cell_anchors(state) -> list of (3, 4) arrays or None
  flatten_variables(tree) -> {path tuple: array};  unflatten_variables(flat) -> tree
  ImageNet backbone files (Caffe2 / detectron2 / torchvision-mmdetection names):
  map_backbone(state, *, depth, arch='FPN') -> BackboneMapping;  backbone_naming(state);
  c2_to_detectron2_name(key)

Only names live here. Whether the mapped variables fit the model, and why not, is
`checkpoints/diagnose.py`; the strict conversion that puts the two together is
`checkpoints/conversion.py`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from maskrcnn_jax import conventions
from maskrcnn_jax.checkpoints.torch_reader import CheckpointError
from maskrcnn_jax.checkpoints.torch_reader import guess_framework

__all__ = [
    'CheckpointMismatchError',
    'LegacyMmdetCheckpointError',
    'ModelSpec',
    'MappingResult',
    'FRAMEWORKS',
    'map_state_dict',
    'check_not_mmdet_v1',
    'canonical_framework',
    'infer_spec',
    'cell_anchors',
    'flatten_variables',
    'unflatten_variables',
    'conv_kernel',
    'linear_kernel',
    'roi_fc_kernel',
    'deconv_kernel',
    'BackboneMapping',
    'backbone_naming',
    'c2_to_detectron2_name',
    'detectron2_to_c2_name',
    'map_backbone',
]

FRAMEWORKS = ('mmdet', 'detectron2', 'torchvision')

# parity_spec 2.2 / 2.4: bottleneck blocks per stage (res2..res5) for each depth.
_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
_DEPTH_FROM_STAGE4_BLOCKS = {6: 50, 23: 101, 36: 152}
# RoI feature map fed to box_head/fc1 and maskiou_head/fc1: 7 x 7 (parity_spec 2.9).
_ROI_RES = 7


class CheckpointMismatchError(CheckpointError, ValueError):
  """The state dict does not fit the model: unmatched keys, missing paths, shape disagreements."""


class LegacyMmdetCheckpointError(CheckpointMismatchError):
  """An mmdetection 1.x checkpoint (background at class index 0), parity_spec 1.2."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What the checkpoint is expected to contain.

  Attributes:
    depth: ResNet / ResNeXt depth, 50 or 101 (152 also accepted).
    has_maskiou: Mask Scoring R-CNN MaskIoU head (mmdet `roi_head.mask_iou_head.*`).
    torchvision_v2: torchvision `maskrcnn_resnet50_fpn_v2`: BN in FPN and heads, 2 RPN convs,
      4conv1fc box head (parity_spec 2.7).
    groups: conv2 groups (1 for ResNet; 32 / 64 for ResNeXt), parity_spec 2.4.
    width_per_group: bottleneck width of the first stage per group (64 for ResNet; 4 for mmdet
      X101-32x4d / 64x4d; 8 for d2 X101-32x8d). Stage widths are width_per_group * groups * 2^i.
    num_classes: foreground classes in the framework's native layout: 80 for COCO mmdet / d2
      (heads 81 / 320 / 80) and 90 for COCO torchvision (heads 91 / 364 / 91).
    arch: 'FPN', or detectron2's 'C4' (backbone up to res4, `roi_heads.res5`, box predictor on
      res5's 2048-d mean, mask head deconv + predictor) and 'DC5' (dilated res5, RPN / 2-FC box
      head / 4-conv mask head on its 2048 channels); modeling/mask_rcnn.py.

  `groups`, `width_per_group` and `num_classes` may be None: `conversion.to_variables` then takes
  them from the checkpoint (`resolved`), leaving their check to `diagnose.check_against` with the
  model's own shapes.
  """

  depth: int = 50
  has_maskiou: bool = False
  torchvision_v2: bool = False
  groups: int | None = None
  width_per_group: int | None = None
  num_classes: int | None = None
  arch: str = 'FPN'

  def __post_init__(self):
    if self.arch not in ('FPN', 'C4', 'DC5'):
      raise ValueError(f"ModelSpec.arch must be 'FPN', 'C4' or 'DC5', got {self.arch!r}")
    if self.depth not in _BLOCKS:
      raise ValueError(f'ModelSpec.depth must be one of {sorted(_BLOCKS)}, got {self.depth}')
    if (self.groups is not None and self.groups < 1) or (
        self.width_per_group is not None and self.width_per_group < 1):
      raise ValueError(f'bad groups/width_per_group {self.groups}/{self.width_per_group}')

  def resolved(self, state: Mapping[str, np.ndarray], framework: str) -> 'ModelSpec':
    """This spec with None groups / width_per_group / num_classes taken from `state`."""
    if None not in (self.groups, self.width_per_group, self.num_classes):
      return self
    found = _infer_widths_and_classes(state, canonical_framework(framework))
    return dataclasses.replace(
        self, groups=self.groups if self.groups is not None else found['groups'],
        width_per_group=(self.width_per_group if self.width_per_group is not None
                         else found['width_per_group']),
        num_classes=self.num_classes if self.num_classes is not None else found['num_classes'])

  @property
  def blocks(self) -> tuple[int, int, int, int]:
    """Bottleneck blocks in res2..res5, e.g. (3, 4, 6, 3) for depth 50."""
    return _BLOCKS[self.depth]

  @property
  def stage_widths(self) -> tuple[int, ...]:
    """Bottleneck (conv1/conv2) width per stage: mmdet `floor(planes*base_width/64)*groups`,
    d2 `width_per_group*groups*2^i` (same numbers), parity_spec 2.4."""
    return tuple(self._wpg * self._groups * 2**i for i in range(4))

  @property
  def _groups(self) -> int:
    return 1 if self.groups is None else self.groups

  @property
  def _wpg(self) -> int:
    return 64 if self.width_per_group is None else self.width_per_group

  @property
  def stage_out_channels(self) -> tuple[int, ...]:
    """conv3 / shortcut output channels per stage: 256, 512, 1024, 2048."""
    return tuple(256 * 2**i for i in range(4))

  def class_counts(self, framework: str) -> tuple[int, int, int]:
    """(K_cls, K_reg, K_mask) of docs/internals.md for `framework` (native layout)."""
    framework = canonical_framework(framework)
    if framework == 'torchvision':
      n = 90 if self.num_classes is None else self.num_classes
      return n + 1, n + 1, n + 1
    n = 80 if self.num_classes is None else self.num_classes
    return n + 1, n, n

  def describe(self) -> str:
    name = f'ResNet-{self.depth}' if self._groups == 1 and self._wpg == 64 else (
        f'ResNeXt-{self.depth} {self._groups}x{self._wpg}d')
    extras = [s for s, on in (('MaskIoU head', self.has_maskiou),
                              ('torchvision v2', self.torchvision_v2)) if on]
    return name + f'-{self.arch}' + (f' ({", ".join(extras)})' if extras else '')


def canonical_framework(framework: str) -> str:
  """The framework's name in `FRAMEWORKS` (aliases: conventions.ALIASES); ValueError otherwise."""
  name = conventions.canonical_name(framework)
  if name not in FRAMEWORKS:
    raise ValueError(f'framework must be one of {FRAMEWORKS}, got {framework!r}')
  return name


# ---------------------------------------------------------------------------------------------
# Layout hooks (parity_spec 2.9, docs/internals.md "Layout conversions from PyTorch").


class _LayoutError(ValueError):
  pass


def conv_kernel(w: np.ndarray) -> np.ndarray:
  """torch Conv2d weight (O, I/g, kh, kw) -> Flax HWIO kernel (kh, kw, I/g, O)."""
  if w.ndim != 4:
    raise _LayoutError(f'expected a 4-D conv weight (O, I/g, kh, kw), got shape {tuple(w.shape)}')
  return w.transpose(2, 3, 1, 0)


def linear_kernel(w: np.ndarray) -> np.ndarray:
  """torch Linear weight (O, I) -> Flax Dense kernel (I, O)."""
  if w.ndim != 2:
    raise _LayoutError(f'expected a 2-D linear weight (O, I), got shape {tuple(w.shape)}')
  return w.T


def roi_fc_kernel(w: np.ndarray, resolution: int = _ROI_RES) -> np.ndarray:
  """Linear weight after a flattened NCHW RoI feature -> Dense kernel for an NHWC flatten.

  w: (O, C*R*R) with torch column c*R*R + h*R + w. Returns (R*R*C, O) with row h*R*C + w*C + c
  holding that column (parity_spec 2.9: reshape (O,C,R,R), transpose (0,2,3,1), reshape, .T).
  """
  if w.ndim != 2:
    raise _LayoutError(f'expected a 2-D linear weight (O, C*{resolution}*{resolution}), '
                       f'got shape {tuple(w.shape)}')
  o, i = w.shape
  if i % (resolution * resolution):
    raise _LayoutError(
        f'input size {i} is not C*{resolution}*{resolution} (a flattened RoI feature)')
  c = i // (resolution * resolution)
  return w.reshape(o, c, resolution, resolution).transpose(0, 2, 3, 1).reshape(o, i).T


def deconv_kernel(w: np.ndarray) -> np.ndarray:
  """torch ConvTranspose2d weight (I, O, kh, kw) -> (kh, kw, I, O) with
  out[2i+a, 2j+b, o] = bias[o] + sum_c x[i, j, c] * kernel[a, b, c, o] (k=2, s=2, p=0)."""
  if w.ndim != 4:
    raise _LayoutError(
        f'expected a 4-D ConvTranspose2d weight (I, O, kh, kw), got shape {tuple(w.shape)}')
  return w.transpose(2, 3, 0, 1)


def _vector(w: np.ndarray) -> np.ndarray:
  if w.ndim != 1:
    raise _LayoutError(f'expected a 1-D vector, got shape {tuple(w.shape)}')
  return w


# kind -> torch leaf -> (collection, flax leaf, hook)
_LEAVES: dict[str, dict[str, tuple[str, str, Callable[[np.ndarray], np.ndarray]]]] = {
    'conv': {'weight': ('params', 'kernel', conv_kernel), 'bias': ('params', 'bias', _vector)},
    'linear': {'weight': ('params', 'kernel', linear_kernel), 'bias': ('params', 'bias', _vector)},
    'roi_fc': {'weight': ('params', 'kernel', roi_fc_kernel), 'bias': ('params', 'bias', _vector)},
    'deconv': {'weight': ('params', 'kernel', deconv_kernel), 'bias': ('params', 'bias', _vector)},
    # BatchNorm2d / FrozenBatchNorm2d (parity_spec 2.2 "BN", 2.6 "FBN").
    'norm': {'weight': ('params', 'scale', _vector), 'bias': ('params', 'bias', _vector),
             'running_mean': ('batch_stats', 'mean', _vector),
             'running_var': ('batch_stats', 'var', _vector)},
}


# ---------------------------------------------------------------------------------------------
# Module tables: torch module prefix -> (flax module path, kind). Built forward from the spec, so
# a key that is not in the table is an unmatched key.

_Entry = tuple[tuple[str, ...], str]


def _d2_bottleneck(t: dict[str, _Entry], src: str, block: tuple[str, ...], *, first: bool) -> None:
  """detectron2 BottleneckBlock `src`.conv{1,2,3}[.norm] (+ shortcut[.norm] on a stage's first
  block) -> `block`/conv{k}, norm{k}, shortcut, shortcut_norm."""
  for k in (1, 2, 3):
    t[f'{src}.conv{k}'] = (block + (f'conv{k}',), 'conv')
    t[f'{src}.conv{k}.norm'] = (block + (f'norm{k}',), 'norm')
  if first:
    t[f'{src}.shortcut'] = (block + ('shortcut',), 'conv')
    t[f'{src}.shortcut.norm'] = (block + ('shortcut_norm',), 'norm')


def _resnet_modules(spec: ModelSpec, framework: str, prefix: str) -> dict[str, _Entry]:
  """Backbone bottom-up (parity_spec 2.2, 2.6, 2.7; cross map 2.8); C4: up to res4."""
  t: dict[str, _Entry] = {}
  if framework == 'detectron2':
    t[f'{prefix}stem.conv1'] = (('backbone', 'stem_conv'), 'conv')
    t[f'{prefix}stem.conv1.norm'] = (('backbone', 'stem_norm'), 'norm')
  else:
    t[f'{prefix}conv1'] = (('backbone', 'stem_conv'), 'conv')
    t[f'{prefix}bn1'] = (('backbone', 'stem_norm'), 'norm')
  for i, n_blocks in enumerate(spec.blocks):
    s = i + 2
    if s == 5 and spec.arch == 'C4':
      break
    for b in range(n_blocks):
      block = ('backbone', f'res{s}_{b}')
      if framework == 'detectron2':
        _d2_bottleneck(t, f'{prefix}res{s}.{b}', block, first=b == 0)
      else:
        src = f'{prefix}layer{i + 1}.{b}'
        for k in (1, 2, 3):
          t[f'{src}.conv{k}'] = (block + (f'conv{k}',), 'conv')
          t[f'{src}.bn{k}'] = (block + (f'norm{k}',), 'norm')
        if b == 0:
          t[f'{src}.downsample.0'] = (block + ('shortcut',), 'conv')
          t[f'{src}.downsample.1'] = (block + ('shortcut_norm',), 'norm')
  return t


def _mmdet_modules(spec: ModelSpec) -> tuple[dict[str, _Entry], dict[str, str]]:
  """mmdet v2 names, parity_spec 2.2 / 2.5."""
  t = _resnet_modules(spec, 'mmdet', 'backbone.')
  for i in range(4):
    t[f'neck.lateral_convs.{i}.conv'] = (('fpn', f'lateral{i + 2}'), 'conv')
    t[f'neck.fpn_convs.{i}.conv'] = (('fpn', f'output{i + 2}'), 'conv')
  t['rpn_head.rpn_conv'] = (('rpn_head', 'conv0'), 'conv')
  t['rpn_head.rpn_cls'] = (('rpn_head', 'objectness'), 'conv')
  t['rpn_head.rpn_reg'] = (('rpn_head', 'deltas'), 'conv')
  t['roi_head.bbox_head.shared_fcs.0'] = (('box_head', 'fc1'), 'roi_fc')
  t['roi_head.bbox_head.shared_fcs.1'] = (('box_head', 'fc2'), 'linear')
  t['roi_head.bbox_head.fc_cls'] = (('box_predictor', 'cls_score'), 'linear')
  t['roi_head.bbox_head.fc_reg'] = (('box_predictor', 'bbox_pred'), 'linear')
  for i in range(4):
    t[f'roi_head.mask_head.convs.{i}.conv'] = (('mask_head', f'conv{i + 1}'), 'conv')
  t['roi_head.mask_head.upsample'] = (('mask_head', 'deconv'), 'deconv')
  t['roi_head.mask_head.conv_logits'] = (('mask_head', 'predictor'), 'conv')
  if spec.has_maskiou:
    # Plain Conv2d / Linear, no `.conv.` (parity_spec 2.5).
    for i in range(4):
      t[f'roi_head.mask_iou_head.convs.{i}'] = (('maskiou_head', f'conv{i + 1}'), 'conv')
    t['roi_head.mask_iou_head.fcs.0'] = (('maskiou_head', 'fc1'), 'roi_fc')
    t['roi_head.mask_iou_head.fcs.1'] = (('maskiou_head', 'fc2'), 'linear')
    t['roi_head.mask_iou_head.fc_mask_iou'] = (('maskiou_head', 'fc_mask_iou'), 'linear')
  return t, {}


def _d2_modules(spec: ModelSpec) -> tuple[dict[str, _Entry], dict[str, str]]:
  """detectron2 names, parity_spec 2.6. C4 / DC5 (`build_resnet_backbone`): the ResNet is the
  backbone itself (`backbone.res2...`, no `bottom_up.`), C4 adds `roi_heads.res5.{0,1,2}`
  (Res5ROIHeads) and has neither `box_head` nor mask convs."""
  if spec.arch == 'FPN':
    t = _resnet_modules(spec, 'detectron2', 'backbone.bottom_up.')
    for level in range(2, 6):
      t[f'backbone.fpn_lateral{level}'] = (('fpn', f'lateral{level}'), 'conv')
      t[f'backbone.fpn_output{level}'] = (('fpn', f'output{level}'), 'conv')
  else:
    t = _resnet_modules(spec, 'detectron2', 'backbone.')
  t['proposal_generator.rpn_head.conv'] = (('rpn_head', 'conv0'), 'conv')
  t['proposal_generator.rpn_head.objectness_logits'] = (('rpn_head', 'objectness'), 'conv')
  t['proposal_generator.rpn_head.anchor_deltas'] = (('rpn_head', 'deltas'), 'conv')
  if spec.arch == 'C4':
    for b in range(spec.blocks[3]):
      _d2_bottleneck(t, f'roi_heads.res5.{b}', ('roi_res5', f'res5_{b}'), first=b == 0)
  else:
    t['roi_heads.box_head.fc1'] = (('box_head', 'fc1'), 'roi_fc')
    t['roi_heads.box_head.fc2'] = (('box_head', 'fc2'), 'linear')
    for i in range(1, 5):
      t[f'roi_heads.mask_head.mask_fcn{i}'] = (('mask_head', f'conv{i}'), 'conv')
  t['roi_heads.box_predictor.cls_score'] = (('box_predictor', 'cls_score'), 'linear')
  t['roi_heads.box_predictor.bbox_pred'] = (('box_predictor', 'bbox_pred'), 'linear')
  t['roi_heads.mask_head.deconv'] = (('mask_head', 'deconv'), 'deconv')
  t['roi_heads.mask_head.predictor'] = (('mask_head', 'predictor'), 'conv')
  return t, {}


def _tv_modules(spec: ModelSpec) -> tuple[dict[str, _Entry], dict[str, str]]:
  """torchvision names, parity_spec 2.7; v1 also accepts the 2019 names of parity_spec 1.4.

  Returns (table, aliases): aliases maps a legacy module name to its current name.
  """
  t = _resnet_modules(spec, 'torchvision', 'backbone.body.')
  aliases: dict[str, str] = {}
  v2 = spec.torchvision_v2
  for i in range(4):
    for tv_name, ours in (('inner_blocks', 'lateral'), ('layer_blocks', 'output')):
      current = f'backbone.fpn.{tv_name}.{i}.0'
      t[current] = (('fpn', f'{ours}{i + 2}'), 'conv')
      if v2:  # Conv2dNormActivation(norm_layer=BatchNorm2d): conv without bias, then BN.
        t[f'backbone.fpn.{tv_name}.{i}.1'] = (('fpn', f'{ours}{i + 2}_norm'), 'norm')
      else:
        aliases[f'backbone.fpn.{tv_name}.{i}'] = current
  t['rpn.head.conv.0.0'] = (('rpn_head', 'conv0'), 'conv')
  if v2:
    t['rpn.head.conv.1.0'] = (('rpn_head', 'conv1'), 'conv')
  else:
    aliases['rpn.head.conv'] = 'rpn.head.conv.0.0'
  t['rpn.head.cls_logits'] = (('rpn_head', 'objectness'), 'conv')
  t['rpn.head.bbox_pred'] = (('rpn_head', 'deltas'), 'conv')
  if v2:  # FastRCNNConvFCHead: 4 x (conv, BN, ReLU), Flatten (index 4), Linear (index 5).
    for i in range(4):
      t[f'roi_heads.box_head.{i}.0'] = (('box_head', f'conv{i}'), 'conv')
      t[f'roi_heads.box_head.{i}.1'] = (('box_head', f'conv{i}_norm'), 'norm')
    t['roi_heads.box_head.5'] = (('box_head', 'fc1'), 'roi_fc')
  else:  # TwoMLPHead
    t['roi_heads.box_head.fc6'] = (('box_head', 'fc1'), 'roi_fc')
    t['roi_heads.box_head.fc7'] = (('box_head', 'fc2'), 'linear')
  t['roi_heads.box_predictor.cls_score'] = (('box_predictor', 'cls_score'), 'linear')
  t['roi_heads.box_predictor.bbox_pred'] = (('box_predictor', 'bbox_pred'), 'linear')
  for i in range(4):
    t[f'roi_heads.mask_head.{i}.0'] = (('mask_head', f'conv{i + 1}'), 'conv')
    if v2:
      t[f'roi_heads.mask_head.{i}.1'] = (('mask_head', f'conv{i + 1}_norm'), 'norm')
    else:
      aliases[f'roi_heads.mask_head.mask_fcn{i + 1}'] = f'roi_heads.mask_head.{i}.0'
  t['roi_heads.mask_predictor.conv5_mask'] = (('mask_head', 'deconv'), 'deconv')
  t['roi_heads.mask_predictor.mask_fcn_logits'] = (('mask_head', 'predictor'), 'conv')
  return t, aliases


def _module_table(framework: str, spec: ModelSpec) -> tuple[dict[str, _Entry], dict[str, str]]:
  if spec.arch != 'FPN' and framework != 'detectron2':
    raise ValueError(f"arch {spec.arch!r} exists for detectron2 checkpoints only, not {framework}")
  builders = {'mmdet': _mmdet_modules, 'detectron2': _d2_modules, 'torchvision': _tv_modules}
  return builders[framework](spec)


# ---------------------------------------------------------------------------------------------
# Tree helpers.


def flatten_variables(tree: Mapping[str, Any],
                      prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  """Nested dict -> {path tuple: leaf} (like flax.traverse_util.flatten_dict, without flax)."""
  flat = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      flat.update(flatten_variables(v, prefix + (k,)))
    else:
      flat[prefix + (k,)] = v
  return flat


def unflatten_variables(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  """{path tuple: leaf} -> nested dict."""
  tree: dict[str, Any] = {}
  for path, v in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return tree


def _fmt_path(path: tuple[str, ...]) -> str:
  return '/'.join(path)


def _fmt_shape(shape) -> str:
  """(a,b) without spaces; (a,) for one dimension, () for a scalar."""
  dims = [str(int(s)) for s in shape]
  return '(' + ','.join(dims) + (',' if len(dims) == 1 else '') + ')'


def _shape_of(x) -> tuple[int, ...]:
  return tuple(int(s) for s in getattr(x, 'shape', ()))


# ---------------------------------------------------------------------------------------------
# Mapping.


def _is_dropped(key: str, framework: str) -> bool:
  # num_batches_tracked: BN step counter, unused at inference (parity_spec 1.2 / 5 item 1).
  if key.endswith('.num_batches_tracked') or key == 'num_batches_tracked':
    return True
  if framework == 'detectron2':
    # cell_anchors: a persistent buffer in 2019-era d2 zoo files (parity_spec 1.3); see
    # cell_anchors(). pixel_mean / pixel_std: buffers in checkpoints saved by older d2 training
    # runs (not in zoo .pkl files); they are config (parity_spec 3.3), not variables.
    return key.startswith('proposal_generator.anchor_generator.cell_anchors.') or key in (
        'pixel_mean', 'pixel_std')
  return False


_CELL_ANCHOR_RE = re.compile(r'^proposal_generator\.anchor_generator\.cell_anchors\.(\d+)$')


def cell_anchors(state: Mapping[str, np.ndarray]) -> list[np.ndarray] | None:
  """The d2 `cell_anchors.{i}` buffers (each (3, 4) float32, xyxy around the origin, one per FPN
  level P2..P6) in level order, or None when the file has none (parity_spec 1.3, 3.7)."""
  found = {}
  for k, v in state.items():
    m = _CELL_ANCHOR_RE.match(k)
    if m:
      found[int(m.group(1))] = np.asarray(v)
  if not found:
    return None
  return [found[i] for i in sorted(found)]


def _is_float(dtype: np.dtype) -> bool:
  return dtype.kind == 'f' or dtype.name.startswith(('bfloat16', 'float8'))


@dataclasses.dataclass
class MappingResult:
  """Outcome of `map_state_dict`.

  Attributes:
    variables: {'params': ..., 'batch_stats': ...} nested dict of numpy arrays.
    sources: variable path -> the checkpoint key it came from.
    unmatched: checkpoint keys that map to nothing for this spec (in state order).
    dropped: keys dropped on purpose (num_batches_tracked; d2 cell_anchors, pixel_mean/std).
    problems: layout errors and duplicate mappings, as messages.
  """

  variables: dict[str, Any]
  sources: dict[tuple[str, ...], str]
  unmatched: list[str]
  dropped: list[str]
  problems: list[str]


def map_state_dict(state: Mapping[str, np.ndarray], *, framework: str, spec: ModelSpec,
                   dtype=np.float32) -> MappingResult:
  """Rename and re-layout every tensor; never raises for mismatches (see `to_variables`).

  Args:
    state: name -> array in the framework's state-dict naming (after `module.` stripping).
    framework: 'mmdet' | 'detectron2' | 'torchvision'.
    spec: the model the tree is for; keys outside it are reported as unmatched.
    dtype: floating tensors are cast to this (None keeps the checkpoint dtype).
  """
  framework = canonical_framework(framework)
  table, aliases = _module_table(framework, spec)
  flat: dict[tuple[str, ...], np.ndarray] = {}
  sources: dict[tuple[str, ...], str] = {}
  unmatched: list[str] = []
  dropped: list[str] = []
  problems: list[str] = []
  for key, value in state.items():
    if _is_dropped(key, framework):
      dropped.append(key)
      continue
    module, _, leaf = key.rpartition('.')
    module = aliases.get(module, module)
    entry = table.get(module)
    if entry is None or leaf not in _LEAVES[entry[1]]:
      unmatched.append(key)
      continue
    target, hook = _leaf_target(entry, leaf)
    if target in flat:
      problems.append(f'{key} and {sources[target]} both map to {_fmt_path(target)} '
                      '(the checkpoint has the legacy and the current spelling)')
      continue
    _store(flat, sources, problems, key, value, target, hook, dtype)
  return MappingResult(unflatten_variables(flat), sources, unmatched, dropped, problems)


def _leaf_target(entry: _Entry, leaf: str) -> tuple[tuple[str, ...], Callable]:
  """(variable path, layout hook) of the torch leaf `leaf` ('weight', 'running_mean', ...) of the
  module table entry `entry`."""
  path, kind = entry
  collection, name, hook = _LEAVES[kind][leaf]
  return (collection,) + path + (name,), hook


def _store(flat: dict, sources: dict, problems: list, key: str, value, target: tuple[str, ...],
           hook: Callable, dtype) -> None:
  """flat[target] = hook(value) with floating results cast to `dtype` (None keeps them), and
  sources[target] = key; a layout error goes to `problems` instead."""
  try:
    arr = hook(np.asarray(value))
  except _LayoutError as e:
    problems.append(f'{key}: {e}')
    return
  if dtype is not None and _is_float(arr.dtype):
    arr = arr.astype(dtype)
  flat[target] = np.asarray(arr, order='C')  # not ascontiguousarray: it makes 0-d arrays 1-d
  sources[target] = key


def check_not_mmdet_v1(state: Mapping[str, np.ndarray], source: str | None):
  """Reject mmdetection 1.x files: background at index 0, so fc_reg has 4 * 81 rows and
  conv_logits 81 channels (parity_spec 1.2 "Class order guard", 2.10)."""
  def rows(*names):
    for n in names:
      if n in state:
        return int(np.shape(state[n])[0])
    return None

  fc_cls = rows('roi_head.bbox_head.fc_cls.weight', 'bbox_head.fc_cls.weight')
  fc_reg = rows('roi_head.bbox_head.fc_reg.weight', 'bbox_head.fc_reg.weight')
  logits = rows('roi_head.mask_head.conv_logits.weight', 'mask_head.conv_logits.weight')
  v1_names = any(k.startswith(('bbox_head.', 'mask_head.')) for k in state)
  reg_with_bg = fc_cls is not None and fc_reg is not None and fc_reg == 4 * fc_cls
  mask_with_bg = fc_cls is not None and logits is not None and logits == fc_cls
  if reg_with_bg or mask_with_bg or v1_names:
    where = f'{source}: ' if source else ''
    raise LegacyMmdetCheckpointError(
        f'{where}this is an mmdetection 1.x checkpoint: fc_cls has {fc_cls} rows, fc_reg {fc_reg} '
        f'rows, conv_logits {logits} channels'
        + (', and heads are named bbox_head./mask_head. without roi_head.' if v1_names else '')
        + ' -- mmdet 1.x puts background at class index 0 and gives the regression and mask layers '
        'a background slot (mmdet v2: 81 / 320 / 80, background last). Upgrade it with mmdetection '
        'tools/model_converters/upgrade_model_version.py first (parity_spec 1.2).')


# ---------------------------------------------------------------------------------------------
# Spec inference.


_BLOCK_KEY_RES = {
    'mmdet': re.compile(r'^backbone\.layer(\d)\.(\d+)\.'),
    'torchvision': re.compile(r'^backbone\.body\.layer(\d)\.(\d+)\.'),
    # FPN: backbone.bottom_up.resN; C4 / DC5: backbone.resN (and C4's roi_heads.res5).
    'detectron2': re.compile(r'^(?:backbone\.(?:bottom_up\.)?|roi_heads\.)res(\d)\.(\d+)\.'),
}


def _stage_index(framework: str, m: re.Match) -> int:
  """0..3 for res2..res5 from a block-key match."""
  return int(m.group(1)) - (2 if framework == 'detectron2' else 1)


def infer_spec(state: Mapping[str, np.ndarray], *, framework: str) -> ModelSpec:
  """Guess the ModelSpec of a state dict from its keys and shapes.

  depth from the number of res4 blocks (6 -> 50, 23 -> 101, 36 -> 152); groups and
  width_per_group from res2 block 0 conv2 (w, w/g, 3, 3); has_maskiou from `mask_iou_head.` keys;
  arch (detectron2) from `roi_heads.res5.` (C4) or `backbone.resN` without `bottom_up.` (DC5);
  torchvision_v2 from the 4conv1fc box head / second RPN conv; num_classes = cls_score rows - 1.
  """
  framework = canonical_framework(framework)
  block_re = _BLOCK_KEY_RES[framework]
  counts = [0, 0, 0, 0]
  for k in state:
    m = block_re.match(k)
    if m:
      stage = _stage_index(framework, m)
      if 0 <= stage < 4:
        counts[stage] = max(counts[stage], int(m.group(2)) + 1)
  depth = _DEPTH_FROM_STAGE4_BLOCKS.get(counts[2])
  if depth is None:
    raise CheckpointMismatchError(
        f'cannot infer the ResNet depth: blocks per stage {tuple(counts)} match none of '
        f'{ {d: b for d, b in _BLOCKS.items()} } (is it a {framework} Mask R-CNN state dict?)')
  found = _infer_widths_and_classes(state, framework)
  v2 = framework == 'torchvision' and any(
      k.startswith(('roi_heads.box_head.5.', 'rpn.head.conv.1.')) for k in state)
  has_maskiou = any('mask_iou_head.' in k for k in state)
  return ModelSpec(depth=depth, has_maskiou=has_maskiou, torchvision_v2=v2,
                   arch=_infer_arch(state, framework), **found)


def _infer_arch(state: Mapping[str, np.ndarray], framework: str) -> str:
  """'C4' when the RoI head holds res5, 'DC5' for a plain-ResNet backbone, else 'FPN'."""
  if framework != 'detectron2':
    return 'FPN'
  if any(k.startswith('roi_heads.res5.') for k in state):
    return 'C4'
  if any(k.startswith('backbone.res') for k in state):
    return 'DC5'
  return 'FPN'


def _infer_widths_and_classes(state: Mapping[str, np.ndarray],
                              framework: str) -> dict[str, int]:
  """groups / width_per_group from res2 block 0 conv2 (w, w/g, 3, 3); num_classes = cls rows - 1."""
  conv2 = {'mmdet': 'backbone.layer1.0.conv2.weight',
           'torchvision': 'backbone.body.layer1.0.conv2.weight',
           'detectron2': 'backbone.bottom_up.res2.0.conv2.weight'}[framework]
  if framework == 'detectron2' and conv2 not in state:
    conv2 = 'backbone.res2.0.conv2.weight'  # C4 / DC5
  groups, width_per_group = 1, 64
  if conv2 in state and len(np.shape(state[conv2])) == 4:
    w, w_in = np.shape(state[conv2])[:2]
    groups = max(1, int(w) // max(1, int(w_in)))
    width_per_group = int(w) // groups
  cls = ('roi_head.bbox_head.fc_cls.weight' if framework == 'mmdet'
         else 'roi_heads.box_predictor.cls_score.weight')
  if cls in state:
    num_classes = int(np.shape(state[cls])[0]) - 1
  else:
    num_classes = 90 if framework == 'torchvision' else 80
  return {'groups': groups, 'width_per_group': width_per_group, 'num_classes': num_classes}


# ---------------------------------------------------------------------------------------------
# ImageNet backbone files (a recipe's `model.backbone_init`): the ResNet alone, in one of three
# namings. The FPN and heads are absent by design; every backbone variable must be present.

BACKBONE_NAMINGS = ('c2', 'detectron2', 'torchvision')

# detectron2/checkpoint/c2_model_loading.py `convert_basic_c2_names`, in its order, restricted to
# what a ResNet classification file holds (`pred_w` -> `linear_w` is its hard-coded classifier
# rename; GroupNorm and DensePose rules do not apply to these files).
_C2_RENAMES = tuple((re.compile(p), r) for p, r in (
    (r'^pred_([wb])$', r'linear_\1'),
    (r'_', '.'),
    (r'\.b$', '.bias'),
    (r'\.w$', '.weight'),
    (r'bn\.s$', 'norm.weight'),
    (r'bn\.bias$', 'norm.bias'),
    (r'bn\.rm', 'norm.running_mean'),
    (r'bn\.running\.mean$', 'norm.running_mean'),
    (r'bn\.riv$', 'norm.running_var'),
    (r'bn\.running\.var$', 'norm.running_var'),
    (r'bn\.gamma$', 'norm.weight'),
    (r'bn\.beta$', 'norm.bias'),
    (r'^res\.conv1\.norm\.', 'conv1.norm.'),
    (r'^conv1\.', 'stem.conv1.'),
    (r'\.branch1\.', '.shortcut.'),
    (r'\.branch2a\.', '.conv1.'),
    (r'\.branch2b\.', '.conv2.'),
    (r'\.branch2c\.', '.conv3.'),
))
_C2_BRANCHES = {'shortcut': 'branch1', 'conv1': 'branch2a', 'conv2': 'branch2b',
                'conv3': 'branch2c'}
_C2_LEAVES = {('conv', 'weight'): 'w', ('conv', 'bias'): 'b', ('norm', 'weight'): 'bn_s',
              ('norm', 'bias'): 'bn_b', ('norm', 'running_mean'): 'bn_rm',
              ('norm', 'running_var'): 'bn_riv'}
# Modules of an ImageNet classification file that a detector does not use.
_CLASSIFIER_MODULES = ('fc', 'stem.fc', 'fc1000', 'linear')


def c2_to_detectron2_name(key: str) -> str:
  """A Caffe2 blob name (`res2_0_branch2a_bn_s`) -> its detectron2 state-dict name
  (`res2.0.conv1.norm.weight`), as detectron2's `convert_basic_c2_names` renames it."""
  for pattern, repl in _C2_RENAMES:
    key = pattern.sub(repl, key)
  return key


def detectron2_to_c2_name(name: str) -> str:
  """The inverse of `c2_to_detectron2_name` for ResNet backbone names (stem, blocks), e.g.
  `stem.conv1.norm.weight` -> `res_conv1_bn_s`, `res3.0.shortcut.weight` -> `res3_0_branch1_w`."""
  module, _, leaf = name.rpartition('.')
  kind = 'norm' if module.endswith('.norm') else 'conv'
  base = module[:-len('.norm')] if kind == 'norm' else module
  if base == 'stem.conv1':
    prefix = 'res_conv1' if kind == 'norm' else 'conv1'
  else:
    m = re.fullmatch(r'res(\d)\.(\d+)\.(shortcut|conv[123])', base)
    if m is None or (kind, leaf) not in _C2_LEAVES:
      raise ValueError(f'{name!r} is not a detectron2 ResNet backbone name')
    prefix = f'res{m.group(1)}_{m.group(2)}_{_C2_BRANCHES[m.group(3)]}'
  return f'{prefix}_{_C2_LEAVES[(kind, leaf)]}'


def backbone_naming(state: Mapping[str, Any]) -> str:
  """'c2' (`conv1_w`, `res2_0_branch2a_w`: detectron2's ImageNetPretrained/*.pkl), 'detectron2'
  (`stem.conv1.weight`, `res2.0.conv1.weight`: tools/convert-torchvision-to-d2.py output) or
  'torchvision' (`conv1.weight`, `layer1.0.conv1.weight`: torchvision and mmdetection files)."""
  keys = list(state)
  if any(re.fullmatch(r'(conv1|res\d_\d+_branch(1|2[abc]))_w', k) for k in keys):
    return 'c2'
  if any(re.match(r'(stem\.conv1|res\d\.\d+)\.', k) for k in keys):
    return 'detectron2'
  if any(k == 'conv1.weight' or re.match(r'layer\d\.\d+\.', k) for k in keys):
    return 'torchvision'
  guess = guess_framework(state)
  hint = (f': it looks like a {guess} detection checkpoint, which config.init reads'
          if guess != 'unknown' else '')
  raise CheckpointMismatchError(
      f'not a ResNet backbone file: no stem or block key in any of the Caffe2 (conv1_w), '
      f'detectron2 (stem.conv1.weight) or torchvision/mmdetection (conv1.weight) namings '
      f'(first keys: {", ".join(keys[:3])}){hint}')


@dataclasses.dataclass
class BackboneMapping:
  """Outcome of `map_backbone`.

  Attributes:
    variables: {'params': ..., 'batch_stats': ...} with the 'backbone' subtree (and 'roi_res5'
      for the C4 architecture, whose res5 is the RoI head).
    naming: 'c2' | 'detectron2' | 'torchvision' (`backbone_naming`).
    sources: variable path -> the file key it came from.
    keys: every variable path the naming provides -> the file key that would hold it.
    dropped: (key, reason) of keys a detector does not use (classifier, BN step counters,
      biases of bias-free convs).
    filled: norm modules (file naming) without statistics, given mean 0 / var 1.
    unmatched: keys that are none of the above (another depth, another network).
    problems: layout errors, half-present statistics.
  """

  variables: dict[str, Any]
  naming: str
  sources: dict[tuple[str, ...], str]
  keys: dict[tuple[str, ...], str]
  dropped: list[tuple[str, str]]
  filled: list[str]
  unmatched: list[str]
  problems: list[str]


def map_backbone(state: Mapping[str, np.ndarray], *, depth: int, arch: str = 'FPN',
                 dtype=np.float32) -> BackboneMapping:
  """Rename and re-layout the tensors of an ImageNet backbone file; never raises for mismatches
  (see `diagnose.check_backbone`).

  Args:
    state: name -> array as read from the file (torch layouts; Caffe2 names for `.pkl` files).
    depth: the model's ResNet depth (50, 101, 152): which blocks to expect.
    arch: 'FPN' / 'DC5' (res2..res5 under 'backbone') or 'C4' (res5 under 'roi_res5').
    dtype: floating tensors are cast to this.

  Norms with a scale and a bias but no statistics (Caffe2 files store BN folded into an affine
  `_bn_s` / `_bn_b`) get running mean 0 and variance 1, as detectron2's
  `FrozenBatchNorm2d._load_from_state_dict` fills them for files without version metadata (and as
  mmdetection's tools/model_converters/detectron2pytorch.py writes them): the model's eps still
  applies, y = x * s / sqrt(1 + eps) + b.
  """
  naming = backbone_naming(state)
  framework = 'torchvision' if naming == 'torchvision' else 'detectron2'
  table = _resnet_modules(ModelSpec(depth=depth), framework, '')
  if arch == 'C4':  # detectron2 Res5ROIHeads: res5 is the RoI head (`roi_heads.res5`)
    table = {k: ((('roi_res5',) + path[1:]) if path[1].startswith('res5_') else path, kind)
             for k, (path, kind) in table.items()}

  def file_key(module: str, leaf: str) -> str:
    name = f'{module}.{leaf}'
    return detectron2_to_c2_name(name) if naming == 'c2' else name

  keys = {}
  for module, entry in table.items():
    for leaf in _LEAVES[entry[1]]:
      if entry[1] == 'conv' and leaf == 'bias':
        continue  # the backbone convs have no bias
      keys[_leaf_target(entry, leaf)[0]] = file_key(module, leaf)
  flat: dict[tuple[str, ...], np.ndarray] = {}
  sources: dict[tuple[str, ...], str] = {}
  dropped: list[tuple[str, str]] = []
  unmatched: list[str] = []
  problems: list[str] = []
  for key, value in state.items():
    name = c2_to_detectron2_name(key) if naming == 'c2' else key
    module, _, leaf = name.rpartition('.')
    entry = table.get(module)
    if leaf == 'num_batches_tracked':
      dropped.append((key, 'BatchNorm step counter'))
    elif module in _CLASSIFIER_MODULES:
      dropped.append((key, 'ImageNet classifier'))
    elif entry is not None and entry[1] == 'conv' and leaf == 'bias':
      # detectron2 lists `stem.conv1.bias` (C2 `conv1_b`) as unused; mmcv skips it as unexpected.
      dropped.append((key, 'bias of a bias-free conv, unused by detectron2 and mmdetection too'))
    elif entry is None or leaf not in _LEAVES[entry[1]]:
      unmatched.append(key)
    else:
      _store(flat, sources, problems, key, value, *_leaf_target(entry, leaf), dtype)
  filled = []
  for module, (path, kind) in table.items():
    if kind != 'norm':
      continue
    stats = [('batch_stats',) + path + (n,) for n in ('mean', 'var')]
    present = [p in flat for p in stats]
    affine = [flat[('params',) + path + (n,)] for n in ('scale', 'bias')
              if ('params',) + path + (n,) in flat]
    if affine and not any(present):
      flat[stats[0]] = np.zeros(affine[0].shape, np.float32)
      flat[stats[1]] = np.ones(affine[0].shape, np.float32)
      filled.append(file_key(module, 'weight').rpartition('_s' if naming == 'c2' else '.')[0])
    elif any(present) and not all(present):
      problems.append(f'{file_key(module, "running_mean")} / {file_key(module, "running_var")}: '
                      'one of the two statistics is missing')
  return BackboneMapping(unflatten_variables(flat), naming, sources, keys, dropped, filled,
                         unmatched, problems)


def _file_depth(state_keys: Iterable[str], naming: str) -> int | None:
  """ResNet depth from the number of res4 blocks of an ImageNet backbone file."""
  pattern = {'c2': r'res4_(\d+)_', 'detectron2': r'res4\.(\d+)\.',
             'torchvision': r'layer3\.(\d+)\.'}[naming]
  blocks = [int(m.group(1)) + 1 for m in map(lambda k: re.match(pattern, k), state_keys) if m]
  return _DEPTH_FROM_STAGE4_BLOCKS.get(max(blocks)) if blocks else None
