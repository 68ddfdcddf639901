"""Why a checkpoint does not fit the model: the strict comparison and its diagnosis.

`check_against` compares mapped variables (`name_maps.map_state_dict`) with the shapes of the
model the config builds (`modeling.build.variable_shapes`: the only statement of what the model
expects) and raises `CheckpointMismatchError` listing every unmatched key, missing variable and
shape disagreement, with plain-language guesses at the cause (another depth, ResNeXt widths,
another framework, class count, a missing head). `check_backbone` does the same in one line for
ImageNet backbone files; `describe_match` is the summary a successful conversion prints.

numpy only (no jax).
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

from maskrcnn_jax.checkpoints.name_maps import (_BLOCK_KEY_RES, _DEPTH_FROM_STAGE4_BLOCKS,
                                                BackboneMapping, _stage_index,
                                                CheckpointMismatchError, ModelSpec, _file_depth,
                                                _fmt_path, _fmt_shape, _infer_arch, _shape_of,
                                                canonical_framework, flatten_variables)
from maskrcnn_jax.checkpoints.torch_reader import guess_framework


def _shape_hints(shape_errors: list[tuple[tuple[str, ...], tuple, tuple]]) -> list[str]:
  """Hints that need only the shape disagreements (work with any `expected`)."""
  hints = []
  # ResNet vs ResNeXt widths.
  for path, got, want in shape_errors:
    if len(path) == 5 and path[1] == 'backbone' and path[2] == 'res2_0' and path[3] == 'conv2':
      w, w_per_group_in = got[3], got[2]
      g = w // max(1, w_per_group_in)
      kind = 'ResNet' if g == 1 and w == 64 else f'ResNeXt {g}x{w // max(g, 1)}d'
      hints.append(f'{_fmt_path(path)} is {_fmt_shape(got)} in the checkpoint, '
                   f'{_fmt_shape(want)} in the model: the checkpoint backbone is a {kind} '
                   f'(groups={g}, width_per_group={w // max(g, 1)}) — does the model config '
                   'match?')
  # Class counts.
  for path, got, want in shape_errors:
    if path[1] == 'box_predictor' and path[2] == 'cls_score' and path[-1] == 'kernel':
      hints.append(f'{_fmt_path(path)} has {got[1]} classes, the model {want[1]}: a checkpoint '
                   'trained on another dataset or another framework\'s class layout '
                   '(set model.num_classes)')
  return hints


def _diagnose(*, framework: str | None, spec: ModelSpec | None, unmatched: list[str],
              missing: list[tuple[str, ...]], expected: Mapping[tuple[str, ...], Any],
              shape_errors: list[tuple[tuple[str, ...], tuple, tuple]],
              all_keys: list[str] | None) -> list[str]:
  """Plain-language guesses at *why* a state dict does not fit (another architecture, framework)."""
  hints: list[str] = []
  keys = all_keys if all_keys is not None else unmatched
  # Another framework altogether.
  if framework is not None and unmatched:
    guess = guess_framework({k: None for k in unmatched})
    if guess not in ('unknown', framework) and len(unmatched) * 2 >= max(1, len(keys)):
      hints.append(f'the keys look like a {guess} state dict, not {framework} '
                   f"(e.g. {unmatched[0]}): use a {guess} recipe (convention '{guess}')")
      return hints
  hints += _shape_hints(shape_errors)
  if framework is None or spec is None:
    return hints
  depth_name = f'ResNet-{spec.depth}'
  # More / fewer backbone blocks than the spec's depth.
  block_re = _BLOCK_KEY_RES[framework]
  extra = []
  for k in unmatched:
    m = block_re.match(k)
    if m:
      stage = _stage_index(framework, m)
      if 0 <= stage < 4 and int(m.group(2)) >= spec.blocks[stage]:
        extra.append((k, stage, int(m.group(2))))
  if extra:
    counts = {}
    for _, stage, b in extra:
      counts[stage] = max(counts.get(stage, 0), b + 1)
    depth_guess = _DEPTH_FROM_STAGE4_BLOCKS.get(counts.get(2, spec.blocks[2]))
    guess = f' — is it a ResNet-{depth_guess} checkpoint?' if depth_guess else ''
    hints.append(f'unexpected key {extra[0][0]}: the checkpoint has more blocks than {depth_name}'
                 f'{guess} (set model.depth to match)')
  missing_blocks = {}
  for path in missing:
    if len(path) > 2 and path[1] == 'backbone' and path[2].startswith('res'):
      s, b = path[2][3:].split('_')
      stage = int(s) - 2
      missing_blocks[stage] = min(missing_blocks.get(stage, 10**6), int(b))
  if missing_blocks and not extra:
    present_res4 = missing_blocks.get(2)
    depth_guess = _DEPTH_FROM_STAGE4_BLOCKS.get(present_res4) if present_res4 is not None else None
    first = min((p for p in missing
                 if len(p) > 2 and p[1] == 'backbone' and p[2].startswith('res')),
                key=lambda p: (int(p[2][3]), int(p[2].split('_')[1]), p[0] != 'params', p))
    if depth_guess is not None and depth_guess < spec.depth:
      hints.append(f'missing {_fmt_path(first)}: the checkpoint has fewer blocks than {depth_name}'
                   f' — is it a ResNet-{depth_guess} checkpoint?')
  # Heads the checkpoint lacks or has in addition.
  def head_missing(module: str) -> bool:
    n_missing = sum(1 for p in missing if p[1] == module)
    return n_missing > 0 and n_missing == sum(1 for p in expected if p[1] == module)

  if head_missing('mask_head'):
    hints.append('the checkpoint has no mask-head keys — is it a Faster R-CNN (box-only) '
                 'checkpoint? Mask R-CNN needs the mask branch')
  iou_keys = [k for k in unmatched if 'mask_iou_head.' in k]
  if iou_keys and not spec.has_maskiou:
    hints.append(f'unexpected key {iou_keys[0]}: the checkpoint has a MaskIoU head — is it a '
                 'Mask Scoring R-CNN checkpoint? (use an ms_rcnn recipe: model.mask_scoring=True)')
  if spec.has_maskiou and head_missing('maskiou_head'):
    hints.append('the checkpoint has no MaskIoU-head keys — is it a plain Mask R-CNN checkpoint? '
                 '(model.mask_scoring=False)')
  if framework == 'detectron2':
    arch_guess = _infer_arch({k: None for k in keys}, framework)
    if arch_guess != spec.arch and unmatched:
      hints.append(f'unexpected key {unmatched[0]}: the checkpoint looks like a detectron2 '
                   f'{arch_guess} model, the config is {spec.arch} (set model.arch / use the '
                   f'mask_rcnn_*_{arch_guess}_* config)')
  if framework == 'torchvision':
    v2_markers = [k for k in unmatched if re.match(
        r'^(roi_heads\.box_head\.\d\.|rpn\.head\.conv\.1\.|'
        r'backbone\.fpn\.(inner|layer)_blocks\.\d\.1\.|roi_heads\.mask_head\.\d\.1\.)', k)]
    v1_markers = [k for k in unmatched
                  if k.startswith(('roi_heads.box_head.fc6', 'roi_heads.box_head.fc7'))]
    if v2_markers and not spec.torchvision_v2:
      hints.append(f'unexpected key {v2_markers[0]}: is it a torchvision v2 '
                   '(maskrcnn_resnet50_fpn_v2) checkpoint? (use '
                   'configs/torchvision/maskrcnn_resnet50_fpn_v2.py)')
    if v1_markers and spec.torchvision_v2:
      hints.append(f'unexpected key {v1_markers[0]}: is it a torchvision v1 '
                   '(maskrcnn_resnet50_fpn) checkpoint? (use '
                   'configs/torchvision/maskrcnn_resnet50_fpn.py)')
  return hints


def check_against(variables: Mapping[str, Any],
                  expected: Mapping[tuple[str, ...], tuple[int, ...]], *,
                  unmatched_keys: Iterable[str] = (),
                  sources: Mapping[tuple[str, ...], str] | None = None,
                  problems: Iterable[str] = (), framework: str | None = None,
                  spec: ModelSpec | None = None, source: str | None = None,
                  all_keys: list[str] | None = None) -> None:
  """Raise `CheckpointMismatchError` unless `variables` has exactly the `expected` paths and shapes.

  Args:
    variables: nested {'params': ..., 'batch_stats': ...} of arrays (anything with `.shape`).
    expected: path tuple (starting with the collection) -> shape of the model the config
      builds (`modeling.build.variable_shapes`).
    unmatched_keys: checkpoint keys that were not consumed; each is listed.
    sources: variable path -> checkpoint key, to name the key next to a shape disagreement.
    problems: further messages (layout errors, duplicates) to include.
    framework, spec, all_keys: enable the "is it a ResNet-101 checkpoint?"-style diagnosis.
    source: a file name for the message.

  The message lists every unmatched checkpoint key, every missing model path and every shape
  disagreement as "<path>: checkpoint (a,b) vs model (c,d)".
  """
  flat = flatten_variables(variables)
  unmatched = list(unmatched_keys)
  problems = list(problems)
  sources = sources or {}
  missing = [p for p in expected if p not in flat]
  unexpected = [p for p in flat if p not in expected]
  shape_errors = [(p, _shape_of(flat[p]), tuple(expected[p])) for p in flat
                  if p in expected and _shape_of(flat[p]) != tuple(expected[p])]
  if not (unmatched or missing or unexpected or shape_errors or problems):
    return
  framework = canonical_framework(framework) if framework else None
  hints = _diagnose(framework=framework, spec=spec, unmatched=unmatched, missing=missing,
                    expected=expected, shape_errors=shape_errors, all_keys=all_keys)
  what = f'{framework} checkpoint' if framework else 'checkpoint'
  head = f'{source}: ' if source else ''
  lines = [f'{head}the {what} does not match the model'
           + (f' ({spec.describe()})' if spec else '') + ':']
  if hints:
    lines.append('  diagnosis:')
    lines += [f'    - {h}' for h in hints]
  if problems:
    lines.append(f'  {len(problems)} conversion problem(s):')
    lines += [f'    {p}' for p in problems]
  if unmatched:
    lines.append(f'  {len(unmatched)} unmatched checkpoint key(s):')
    lines += [f'    {k}' for k in unmatched]
  if unexpected:
    lines.append(f'  {len(unexpected)} variable(s) the model does not have:')
    lines += [f'    {_fmt_path(p)}' + (f' (from {sources[p]})' if p in sources else '')
              for p in unexpected]
  if missing:
    lines.append(f'  {len(missing)} model path(s) missing from the checkpoint:')
    lines += [f'    {_fmt_path(p)} {_fmt_shape(expected[p])}' for p in missing]
  if shape_errors:
    lines.append(f'  {len(shape_errors)} shape disagreement(s):')
    lines += [f'    {_fmt_path(p)}: checkpoint {_fmt_shape(got)} vs model {_fmt_shape(want)}'
              + (f' [{sources[p]}]' if p in sources else '') for p, got, want in shape_errors]
  raise CheckpointMismatchError('\n'.join(lines))


_MODULE_ORDER = ('backbone', 'fpn', 'rpn_head', 'box_head', 'box_predictor', 'mask_head',
                 'maskiou_head')


def describe_match(variables: Mapping[str, Any],
                   expected: Mapping[tuple[str, ...], tuple[int, ...]] | None = None, *,
                   unmatched_keys: Iterable[str] = (), dropped_keys: Iterable[str] = ()) -> str:
  """A one-line-per-module summary, e.g.

    backbone: 265/265 variables matched, 0 missing, 0 shape mismatches
    ...
    checkpoint: 0 unmatched key(s), 53 dropped on purpose (53 x num_batches_tracked)

  Without `expected`, every variable counts as matched (a tally of what the tree holds).
  """
  flat = flatten_variables(variables)
  if expected is None:
    expected = {p: _shape_of(v) for p, v in flat.items()}
  modules: dict[str, dict[str, int]] = {}

  def counters(module: str) -> dict[str, int]:
    return modules.setdefault(
        module, {'expected': 0, 'matched': 0, 'missing': 0, 'shape': 0, 'extra': 0})

  for p, shape in expected.items():
    m = counters(p[1])
    m['expected'] += 1
    if p not in flat:
      m['missing'] += 1
    elif _shape_of(flat[p]) != tuple(shape):
      m['shape'] += 1
    else:
      m['matched'] += 1
  for p in flat:
    if p not in expected:
      counters(p[1])['extra'] += 1
  lines = []
  order = {name: i for i, name in enumerate(_MODULE_ORDER)}
  for name, m in sorted(modules.items(), key=lambda kv: order.get(kv[0], len(order))):
    line = (f"{name}: {m['matched']}/{m['expected']} variables matched, {m['missing']} missing, "
            f"{m['shape']} shape mismatches")
    if m['extra']:
      line += f", {m['extra']} unexpected"
    lines.append(line)
  unmatched = list(unmatched_keys)
  dropped = list(dropped_keys)
  kinds: dict[str, int] = {}
  for k in dropped:  # grouped by the key's last component (num_batches_tracked, cell_anchors.0)
    kind = k.rsplit('.', 1)[-1] if not k.startswith('proposal_generator.') else 'cell_anchors'
    kinds[kind] = kinds.get(kind, 0) + 1
  line = f'checkpoint: {len(unmatched)} unmatched key(s)'
  if unmatched:
    line += ' (' + ', '.join(unmatched[:5]) + (', ...' if len(unmatched) > 5 else '') + ')'
  line += f', {len(dropped)} dropped on purpose'
  if kinds:
    line += ' (' + ', '.join(f'{n} x {k}' for k, n in sorted(kinds.items())) + ')'
  lines.append(line)
  return '\n'.join(lines)


def _few(names: list[str], n: int = 4) -> str:
  shown = ', '.join(names[:n])
  return shown + (f', ... ({len(names)} in all)' if len(names) > n else '')


def check_backbone(mapping: BackboneMapping, expected: Mapping[tuple[str, ...], tuple[int, ...]],
                   *, depth: int, state_keys: Iterable[str] = (), source: str = '') -> None:
  """Raise `CheckpointMismatchError` (one line) unless `mapping` fills exactly the `expected`
  backbone paths with their shapes and left no key unexplained.

  Args:
    mapping: from `map_backbone`.
    expected: the model's backbone variables (path -> shape), e.g. those of
      `modeling.build.variable_shapes` whose module is 'backbone' (and 'roi_res5' for C4).
    depth: the model's depth, for the "is it a ResNet-101 file?" hint.
    state_keys: the file's keys, for that hint.
    source: the file name for the message.
  """
  flat = flatten_variables(mapping.variables)
  missing = [p for p in expected if p not in flat]
  extra = [p for p in flat if p not in expected]
  shapes = [(p, _shape_of(flat[p]), tuple(expected[p])) for p in flat
            if p in expected and _shape_of(flat[p]) != tuple(expected[p])]
  if not (missing or extra or shapes or mapping.unmatched or mapping.problems):
    return
  parts = []
  if mapping.unmatched:
    file_depth = _file_depth(state_keys, mapping.naming)
    hint = (f' (it has the blocks of a ResNet-{file_depth}; model.depth is {depth})'
            if file_depth not in (None, depth) else '')
    parts.append(f'{len(mapping.unmatched)} key(s) that a ResNet-{depth} backbone does not have: '
                 f'{_few(mapping.unmatched)}{hint}')

  def key_of(p):  # the file key a variable comes (or would come) from; statistics may be filled
    return mapping.sources.get(p) or mapping.keys.get(p) or _fmt_path(p)

  if missing:
    parts.append(f'{len(missing)} backbone key(s) missing from the file: '
                 + _few([key_of(p) for p in missing]))
  if extra:
    parts.append(f'{len(extra)} variable(s) the model does not have: '
                 + _few([f'{key_of(p)} -> {_fmt_path(p)}' for p in extra]))
  if shapes:
    hints = _shape_hints(shapes)
    shown = _few([f'{key_of(p)} gives {_fmt_path(p)} {_fmt_shape(got)} where the model has '
                  f'{_fmt_shape(want)}' for p, got, want in shapes], 2)
    parts.append(f'{len(shapes)} shape disagreement(s): {shown}'
                 + (f' ({hints[0]})' if hints else ''))
  parts += mapping.problems[:3]
  head = f'{source}: ' if source else ''
  raise CheckpointMismatchError(f'{head}the {mapping.naming}-named backbone file does not fit '
                                'the model: ' + '; '.join(parts))
