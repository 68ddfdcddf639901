"""What the three stage-by-stage parity tests share (test_parity_{torchvision,detectron2,mmdet}.py).

Every fixture (scripts/make_parity_fixtures*.py) records, per image `<name>/`, sampled values of
each stage of a real reference run; the tests regenerate the calibrated weights, convert them with
our name maps and run the same stages. Test-side arithmetic is float64 numpy.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from maskrcnn_jax import config_lib, convert
from maskrcnn_jax.checkpoints import provenance, synthetic
from maskrcnn_jax.modeling.mask_rcnn import MaskRCNN


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """[N, 4] x [M, 4] xyxy -> [N, M] IoU in float64."""
  a = a.astype(np.float64)[:, None]
  b = b.astype(np.float64)[None]
  iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
  ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
  inter = iw * ih
  area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])
  return inter / np.maximum(area(a) + area(b) - inter, 1e-12)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
  """IoU of two [H, W] bool masks (1 when both are empty)."""
  return 1.0 if not (a | b).any() else float((a & b).sum() / (a | b).sum())


def sha256(a: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


IMAGES = Path(__file__).resolve().parent / "fixtures" / "images"


def fixture_image(fx, name: str, order: str = "rgb") -> np.ndarray:
  """The parity photograph `name` stored in tests/fixtures/images (RGB PNG), as uint8 [H, W, 3]
  in `order` ('rgb', or 'bgr' as the cv2 / detectron2 decoders give it).

  The fixtures record the sha256 of the RGB pixels they ran on; a different file is an error.
  """
  path = IMAGES / f"{name}.png"
  if not path.is_file():
    raise FileNotFoundError(f"parity image {path} is missing (restore tests/fixtures/images)")
  img = np.ascontiguousarray(np.asarray(Image.open(path).convert("RGB")))
  assert sha256(img) == str(fx[f"{name}/image_sha256"]), (
      f"{path} is not the image the fixture was recorded on (sha256 {sha256(img)[:12]})")
  return img if order == "rgb" else np.ascontiguousarray(img[:, :, ::-1])


def load_fixture(path: Path):
  """np.load of a parity fixture; a missing file fails the test (it is part of the repository)."""
  if not path.is_file():
    raise FileNotFoundError(f"parity fixture {path} is missing (restore it, or regenerate it with "
                            "the scripts/make_parity_fixtures*.py named in tests/fixtures/README.md)")
  return np.load(path)


def load_recipe(path: Path) -> ml_collections.FrozenConfigDict:
  """The recipe exactly as users load it (`config_lib.load_config_file`), frozen.

  Parity tests check what ships: any attempt to override a field of the returned config raises,
  and tests/test_recipe_guard.py fails when a parity test loads a recipe another way.
  """
  return ml_collections.FrozenConfigDict(config_lib.load_config_file(str(path)))


def converted(config, state, source: str):
  """What `python -m maskrcnn_jax.convert` makes of `state` read from a file named `source`:
  (the config with the checkpoint-decided constants filled in, as the converter records it in
  config.json, and the converted variables). The config is frozen again."""
  resolved, _ = provenance.decide(config, source=source)
  variables, _ = convert.convert_state_dict(resolved, state, source=source)
  return ml_collections.FrozenConfigDict(resolved), variables


def image_names(fx) -> list[str]:
  return [str(n) for n in fx["image_names"]]


def regenerated_state(fx, keys_path) -> dict:
  """The fixture's calibrated weights as a torch-style state dict (numpy), regenerated from the
  seeds and checked against the stored checksums."""
  state = synthetic.state_dict_from_fixture(fx, synthetic.read_key_tsv(keys_path))
  # The numpy RNG stream must be the one the fixture was generated with.
  for name, total in zip(fx["checksum_names"], fx["checksum_sums"]):
    assert float(state[str(name)].astype(np.float64).sum()) == pytest.approx(total, rel=1e-9), (
        f"regenerated {name} differs from the fixture: numpy's RNG stream changed?")
  return state


def check_input(batch, fx, p: str, *, atol: float, sum_rtol: float) -> float:
  """Preprocessed tensor vs the reference: sizes exactly, sampled values within `atol`, channel
  sums within `sum_rtol`. Returns the max sampled error."""
  name = p.rstrip("/")
  assert tuple(batch["image_hw"]) == tuple(fx[p + "resized_hw"]), name
  assert batch["image"].shape[:2] == tuple(fx[p + "padded_hw"]), name
  pos = fx[p + "input/sample_yxc"]
  err = float(np.abs(batch["image"][pos[:, 0], pos[:, 1], pos[:, 2]]
                     - fx[p + "input/sample_values"]).max())
  assert err <= atol, f"{name}: input error {err}"
  np.testing.assert_allclose(batch["image"].astype(np.float64).sum((0, 1)),
                             fx[p + "input/channel_sums"], rtol=sum_rtol)
  return err


def run_stages(predictor, batch):
  """Features (dict of [1, H, W, C]) and per-level RPN logits / deltas of one preprocessed image."""
  def stages(mdl: MaskRCNN, images):
    feats = mdl.features(images)
    logits, deltas = mdl.rpn_outputs(feats)
    return feats, logits, deltas

  images = jnp.asarray(batch["image"])[None]
  return jax.jit(lambda v, x: predictor.model.apply(v, x, method=stages))(predictor.variables,
                                                                          images)


def feature_rel_err(feature: np.ndarray, fx, q: str, rtol: float, what: str) -> float:
  """One feature map [H, W, C] vs the reference's samples under `q` ('<img>/fpn/<level>/'):
  shape, then max |ours - ref| / max |ref| < rtol. Returns the error."""
  assert feature.shape[:2] == tuple(fx[q + "hw"]), what
  ref, pos = fx[q + "sample_values"], fx[q + "sample_yxc"]
  err = float(np.abs(feature[pos[:, 0], pos[:, 1], pos[:, 2]] - ref).max() / np.abs(ref).max())
  assert err < rtol, f"{what}: max relative error {err:.2e}"
  return err


def rpn_rel_errs(logits, deltas, hw, anchors: int, fx, q: str, rtol: float, what: str) -> float:
  """One level's RPN head outputs ([H*W*A] logits, [H*W*A, 4] deltas) vs the reference's samples
  under `q` ('<img>/rpn/<level>/'). Returns the larger relative error."""
  h, w = hw
  outs = {"objectness": np.asarray(logits).reshape(h, w, anchors),
          "deltas": np.asarray(deltas).reshape(h, w, 4 * anchors)}
  yx = fx[q + "sample_yx"]
  worst = 0.0
  for key, ours in outs.items():
    ref = fx[q + key]
    err = float(np.abs(ours[yx[:, 0], yx[:, 1]] - ref).max() / np.abs(ref).max())
    assert err < rtol, f"{what} {key}: max relative error {err:.2e}"
    worst = max(worst, err)
  return worst


def proposals(predictor, feats, batch):
  """Our test-time proposals of one image: boxes [P, 4] and logits / scores [P] (valid only)."""
  props = jax.jit(lambda v, f, hw: predictor.model.apply(
      v, f, hw, method=lambda m, f_, hw_: m.proposals(f_, hw_)))(
          predictor.variables, feats, jnp.asarray(batch["image_hw"])[None])
  valid = np.asarray(props[2][0])
  return np.asarray(props[0][0])[valid], np.asarray(props[1][0])[valid]


def box_head_on(predictor, feats, boxes: np.ndarray):
  """Box head outputs on given [R, 4] boxes (resized-image pixels): class logits [R, K] and
  deltas [R, K_reg * 4]."""
  cls, reg = jax.jit(lambda v, f, b: predictor.model.apply(
      v, f, b, jnp.ones(b.shape[:2], bool),
      method=lambda m, f_, b_, v_: m.box_branch(f_, b_, v_)))(
          predictor.variables, feats, jnp.asarray(boxes)[None])
  return np.asarray(cls[0]), np.asarray(reg[0]).reshape(len(boxes), -1)


def mask_head_on(predictor, feats, boxes: np.ndarray, labels: np.ndarray):
  """Mask logits [R, M, M] (and MaskIoU [R] or None) on given boxes and class indices."""
  ml, miou = jax.jit(lambda v, f, b, lab: predictor.model.apply(
      v, f, b, lab, jnp.ones(b.shape[:2], bool),
      method=lambda m, f_, b_, l_, v_: m.mask_branch(f_, b_, l_, v_)))(
          predictor.variables, feats, jnp.asarray(boxes)[None], jnp.asarray(labels)[None])
  return np.asarray(ml[0]), None if miou is None else np.asarray(miou[0])


def decode_rles(counts, hw) -> np.ndarray:
  """The reference's COCO RLE strings -> [H, W, D] bool."""
  rles = [{"size": [int(hw[0]), int(hw[1])], "counts": str(c)} for c in counts]
  return mask_util.decode(rles).astype(bool)


def sigmoid32(logits: np.ndarray) -> np.ndarray:
  return (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)


@dataclasses.dataclass
class Matched:
  """Our detections matched to a reference set (see `match_detections`)."""
  boxes: np.ndarray  # [D, 4] ours, valid rows, original-image pixels
  scores: np.ndarray  # [D]
  labels: np.ndarray  # [D]
  iou: np.ndarray  # [D_ref, D] box IoU, other-class pairs zeroed
  ref_ok: np.ndarray  # reference rows matched
  match: np.ndarray  # our row matched to each of ref_ok
  ref_un: np.ndarray  # unmatched reference rows (explained near-ties)
  our_un: np.ndarray  # unmatched rows of ours
  score_err: float  # max score difference over the matches


def match_detections(tag: str, raw, ref_boxes, ref_scores, ref_labels, *,
                     near_ties: Optional[tuple] = None) -> Matched:
  """The inference issue's criteria: the same detection set (same class, box IoU >= 0.99) with
  one-to-one matches and scores within 1e-3.

  near_ties: None requires every detection matched. Otherwise (reference boxes, ours, both in the
  coordinates the reference's class-wise NMS ran in): a detection whose IoU with a
  higher-scoring one of its class lies within 1e-3 of the NMS threshold flips with float32 noise
  (detectron2's own float64 run flips such a pair), and a detection at the tail of the 100
  (within the score tolerance of the other side's last score) then takes or leaves its place.
  Such detections may stay unmatched, at most 2 % of them, each one explained.
  """
  keep = raw["valid"]
  boxes, scores, labels = raw["boxes"][keep], raw["scores"][keep], raw["labels"][keep]
  assert len(boxes) == len(ref_boxes), f"{tag}: {len(boxes)} vs {len(ref_boxes)} detections"
  iou = box_iou(ref_boxes, boxes)
  iou[ref_labels[:, None] != labels[None, :]] = 0
  ref_un = np.flatnonzero(iou.max(1) < 0.99)
  our_un = np.flatnonzero(iou.max(0) < 0.99)
  if near_ties is None:
    assert len(ref_un) == 0, f"{tag}: unmatched detections {ref_un}"
  else:
    ref_nms, ours_nms = near_ties
    explained = lambda b, s, l, i, other_min: s[i] <= other_min + 1e-3 or (np.abs(
        box_iou(b[i:i + 1], b)[0][(l == l[i]) & (s > s[i])] - 0.5) < 1e-3).any()
    for i in ref_un:
      assert explained(ref_nms, ref_scores, ref_labels, i, scores.min()), (
          f"{tag}: reference detection {i} unmatched")
    for j in our_un:
      assert explained(ours_nms, scores, labels, j, ref_scores.min()), (
          f"{tag}: our detection {j} unmatched")
    assert len(ref_un) == len(our_un) <= max(1, len(ref_boxes) // 50), (
        f"{tag}: unmatched detections: reference {ref_un}, ours {our_un}")
  ref_ok = np.flatnonzero(iou.max(1) >= 0.99)
  match = iou[ref_ok].argmax(1)
  assert len(set(match.tolist())) == len(match), f"{tag}: two references matched one detection"
  score_err = float(np.abs(scores[match] - ref_scores[ref_ok]).max())
  assert score_err <= 1e-3, f"{tag}: score error {score_err}"
  return Matched(boxes=boxes, scores=scores, labels=labels, iou=iou, ref_ok=ref_ok, match=match,
                 ref_un=ref_un, our_un=our_un, score_err=score_err)


def reference_paste_diff(tag: str, paste: Callable, probs, boxes, ref_masks) -> int:
  """Our paste alone on the reference's own probabilities [D, M, M] and boxes [D, 4]: at most 2
  pixels per mask may differ from the reference's masks [H, W, D] (sigmoid ulps at 0.5).
  Returns the total number of differing pixels."""
  own = paste(probs, boxes)
  diff = [int((ref_masks[..., i] != m).sum()) for i, m in enumerate(own)]
  assert max(diff) <= 2, f"{tag}: paste of the reference's masks differs by {max(diff)} px"
  return sum(diff)


def torch_positions(config, state, variables, names, source: str) -> dict:
  """Where the entries of some reference tensors land in our converted parameters.

  Converts `state` with the tensors `names` replaced by codes (tensor k's flat entry j -> the
  float k * 2**20 + j, exact in float32) and compares with `variables`, the plain conversion
  (`converted(config, state, source)`), so every layout change of the name map (transposes,
  flips, permutations) is followed as it is.

  Returns {name: (path, index)}: path is the tuple of keys of our parameter under 'params', index
  an int64 array of that parameter's shape holding, per entry, the reference's flat index.
  """
  probe = dict(state)
  for k, name in enumerate(names):
    n = int(np.prod(state[name].shape))
    assert n < 2 ** 20 and len(names) * 2 ** 20 < 2 ** 24, (name, n)
    probe[name] = (k * 2 ** 20 + np.arange(n, dtype=np.float64)).astype(
        np.float32).reshape(state[name].shape)
  _, coded = converted(config, probe, source)
  flat_plain = dict(jax.tree_util.tree_flatten_with_path(variables["params"])[0])
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(coded["params"])[0]:
    leaf = np.asarray(leaf)
    if np.array_equal(leaf, np.asarray(flat_plain[path])):
      continue
    code = leaf.astype(np.int64)
    k = int(code.reshape(-1)[0]) >> 20
    assert np.all(code >> 20 == k), f"{path}: mixes several reference tensors"
    out[names[k]] = (tuple(p.key for p in path), code - (k << 20))
  missing = sorted(set(names) - set(out))
  assert not missing, f"no converted parameter holds {missing}"
  return out
