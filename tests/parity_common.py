"""What the three stage-by-stage parity tests share (test_parity_{torchvision,detectron2,mmdet}.py).

Every fixture (scripts/make_parity_fixtures*.py) records, per image `<name>/`, sampled values of
each stage of a real reference run; the tests regenerate the calibrated weights, convert them with
our name maps and run the same stages. Test-side arithmetic is float64 numpy.

Each case has its `Tolerances`: about twice the worst error observed on its fixture (README
"Results" lists the observed figures), never looser than the inference issue's criteria (scores
within 1e-3, box IoU >= 0.99, mask IoU >= 0.98). The checks below record what they measure in an
`Observed`, which the tests print.
"""
from __future__ import annotations

import dataclasses
import hashlib
import struct
import zipfile
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from maskrcnn_jax import config_lib, inference
from maskrcnn_jax.checkpoints import conversion, provenance
from tests import synthetic_weights as synthetic
from maskrcnn_jax.modeling.mask_rcnn import MaskRCNN
from maskrcnn_jax.ops import paste as paste_lib
from maskrcnn_jax.ops import poolers


@dataclasses.dataclass(frozen=True)
class Tolerances:
  """The limits of one parity case (see the module docstring). Relative errors are
  max |ours - ref| / max |ref| over the recorded values."""
  feature_rtol: float  # sampled feature values (FPN P2-P6; res4 / res5 for C4 / DC5)
  channel_mean_rtol: float  # per-channel means of each whole map, relative to the largest mean
  rpn_rtol: float  # RPN head objectness and deltas
  proposal_score_atol: float  # score (tv, mmdet: sigmoid; d2: logit) of each matched proposal
  box_head_atol: float  # class logits and deltas on the reference's own proposals
  mask_logit_rtol: float  # mask logits on the reference's own detection boxes
  score_atol: float  # detection scores of matched detections
  box_iou_min: float  # box IoU of each matched detection
  mask_iou_min: float  # mask IoU of each matched detection, explained exceptions aside (`check_masks`)
  # Fraction of the detections that each kind of explained exception (NMS near-ties, RoI-sampling
  # flips, box-explained or threshold-tie masks) may concern.
  exceptions: float = 0.02
  # Preprocessed input values: a few float32 ulps at 255 (observed: 0; 2.4e-7 for mmdet's / 58).
  input_atol: float = 1e-6


# A mask allowed below `mask_iou_min` as a threshold tie must still have this IoU.
TIE_MASK_IOU_MIN = 0.9


def allowed(n: int, tol: "Tolerances") -> int:
  """How many of n detections one kind of explained exception may concern (`tol.exceptions`,
  rounded up, at least 1)."""
  return max(1, int(np.ceil(tol.exceptions * n - 1e-9)))


class Observed:
  """The worst value of each measured quantity over a case's images, for the printed summary."""

  def __init__(self):
    self.worst: dict = {}

  def add(self, key: str, value: float, low_is_worse: bool = False) -> float:
    value = float(value)
    old = self.worst.get(key)
    if old is None or (value < old if low_is_worse else value > old):
      self.worst[key] = value
    return value

  def summary(self) -> str:
    return ", ".join(f"{k} {v:.3g}" if abs(v) < 0.99 or v > 1 else f"{k} {v:.6f}"
                     for k, v in self.worst.items())


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
  variables, _ = conversion.convert_state_dict(resolved, state, source=source)
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
    logits, deltas = mdl.rpn.outputs(feats)
    return feats, logits, deltas

  images = jnp.asarray(batch["image"])[None]
  return jax.jit(lambda v, x: predictor.model.apply(v, x, method=stages))(predictor.variables,
                                                                          images)


def check_feature(feature: np.ndarray, fx, q: str, tol: Tolerances, obs: Observed, what: str):
  """One feature map [H, W, C] vs the reference's record under `q` ('<img>/fpn/<level>/'): shape,
  the sampled values (relative to their max |value|) and the per-channel means of the whole
  padded map (relative to the largest |mean|)."""
  assert feature.shape[:2] == tuple(fx[q + "hw"]), what
  ref, pos = fx[q + "sample_values"], fx[q + "sample_yxc"]
  err = float(np.abs(feature[pos[:, 0], pos[:, 1], pos[:, 2]] - ref).max() / np.abs(ref).max())
  assert err <= tol.feature_rtol, f"{what}: max relative error {err:.2e}"
  obs.add("feature rel", err)
  ref_mean = fx[q + "channel_mean"].astype(np.float64)
  mean_err = float(np.abs(feature.astype(np.float64).mean((0, 1)) - ref_mean).max()
                   / np.abs(ref_mean).max())
  assert mean_err <= tol.channel_mean_rtol, f"{what}: channel means, relative error {mean_err:.2e}"
  obs.add("channel-mean rel", mean_err)


def check_rpn(logits, deltas, hw, anchors: int, fx, q: str, tol: Tolerances, obs: Observed,
              what: str) -> None:
  """One level's RPN head outputs ([H*W*A] logits, [H*W*A, 4] deltas) vs the reference's samples
  under `q` ('<img>/rpn/<level>/'), relative to their max |value|."""
  h, w = hw
  outs = {"objectness": np.asarray(logits).reshape(h, w, anchors),
          "deltas": np.asarray(deltas).reshape(h, w, 4 * anchors)}
  yx = fx[q + "sample_yx"]
  for key, ours in outs.items():
    ref = fx[q + key]
    err = float(np.abs(ours[yx[:, 0], yx[:, 1]] - ref).max() / np.abs(ref).max())
    assert err <= tol.rpn_rtol, f"{what} {key}: max relative error {err:.2e}"
    obs.add("rpn rel", err)


def check_proposals(name: str, ours, our_scores, ref, ref_scores, tol: Tolerances,
                    obs: Observed) -> None:
  """Proposals [P, 4] as sets (exact score ties may order differently, and mmcv's CPU NMS sorts
  unstably): as many as the reference's, at least 99 % of them matched (box IoU > 0.99; one
  entering or leaving at the tail of a list cut inside a run of near-equal scores), and the score
  of each matched reference proposal within `tol.proposal_score_atol` of one of ours at IoU >
  0.99."""
  close = box_iou(ref, ours) > 0.99
  ok = close.any(1)
  matched = float(ok.mean())
  assert len(ours) == len(ref) and matched >= 0.99, f"{name}: proposals matched {matched:.3f}"
  # Proposals of different levels can overlap that much: a pair is the closest score among them.
  diff = np.where(close, np.abs(ref_scores[:, None].astype(np.float64) - our_scores[None, :]), np.inf)
  err = float(diff.min(1)[ok].max())
  assert err <= tol.proposal_score_atol, f"{name}: proposal score error {err:.2e}"
  obs.add("proposals matched", matched, low_is_worse=True)
  obs.add("proposal score", err)


def check_box_head(name: str, cls, reg, fx, p: str, tol: Tolerances, obs: Observed) -> None:
  """Box head outputs on the reference's own first proposals vs `<p>box_head/*` (absolute)."""
  for key, ours in (("class_logits", cls), ("box_regression", reg)):
    err = float(np.abs(ours - fx[p + "box_head/" + key]).max())
    assert err <= tol.box_head_atol, f"{name}: box head {key} max error {err:.2e}"
    obs.add("box head", err)


def check_mask_logits(name: str, ours, ref, tol: Tolerances, obs: Observed) -> None:
  """Mask logits [D, M, M] on the reference's own boxes and classes vs the reference's."""
  err = float(np.abs(ours - ref).max() / np.abs(ref).max())
  assert err <= tol.mask_logit_rtol, f"{name}: mask logits max relative error {err:.2e}"
  obs.add("mask-logit rel", err)


def proposals(predictor, feats, batch):
  """Our test-time proposals of one image: boxes [P, 4] and logits / scores [P] (valid only)."""
  props = jax.jit(lambda v, f, hw: predictor.model.apply(
      v, f, hw, method=lambda m, f_, hw_: m.rpn(f_, hw_)))(
          predictor.variables, feats, jnp.asarray(batch["image_hw"])[None])
  valid = np.asarray(props[2][0])
  return np.asarray(props[0][0])[valid], np.asarray(props[1][0])[valid]


def box_head_on(predictor, feats, boxes: np.ndarray):
  """Box head outputs on given [R, 4] boxes (resized-image pixels): class logits [R, K] and
  deltas [R, K_reg * 4]."""
  cls, reg = jax.jit(lambda v, f, b: predictor.model.apply(
      v, f, b, jnp.ones(b.shape[:2], bool),
      method=lambda m, f_, b_, v_: m.roi_heads.box_branch(f_, b_, v_)))(
          predictor.variables, feats, jnp.asarray(boxes)[None])
  return np.asarray(cls[0]), np.asarray(reg[0]).reshape(len(boxes), -1)


def mask_head_on(predictor, feats, boxes: np.ndarray, labels: np.ndarray):
  """Mask logits [R, M, M] (and MaskIoU [R] or None) on given boxes and class indices."""
  ml, miou = jax.jit(lambda v, f, b, lab: predictor.model.apply(
      v, f, b, lab, jnp.ones(b.shape[:2], bool),
      method=lambda m, f_, b_, l_, v_: m.roi_heads.mask_branch(f_, b_, l_, v_)))(
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


def roi_sampling(cfg, boxes) -> np.ndarray:
  """[K, 3] int: (pyramid level, RoIAlign samples per bin along y, along x) of box-head RoIs
  [K, 4] (resized-image pixels) under model config `cfg` (MaskRCNN.cfg). The pooled features
  jump where one of them changes: the level rule floors a log, and the adaptive grid (sampling
  ratio 0: detectron2, mmdet) takes ceil(bin size) samples."""
  b = np.asarray(boxes, np.float32)
  conv = cfg.conv
  if cfg.arch == "FPN":
    lvl = np.asarray(poolers.assign_levels(b, rule=conv.level_map,
                                           canonical_box_size=cfg.roi_canonical_box_size))
  else:
    lvl = np.zeros(len(b), np.int32)
  stride = np.asarray(cfg.feature_strides, np.float32)[lvl]
  if conv.roi_align_sampling_ratio > 0:
    grid = np.full((len(b), 2), conv.roi_align_sampling_ratio)
  else:
    size = np.stack([b[:, 3] - b[:, 1], b[:, 2] - b[:, 0]], 1) / stride[:, None]
    grid = np.ceil(size / np.float32(cfg.box_pool_size)).astype(np.int64)
  return np.concatenate([lvl[:, None], grid], 1)


def roi_flips(predictor, feats, ref_props, our_props, ref_dets, tol: Tolerances) -> Callable:
  """For `match_detections`: whether a reference detection's score difference comes from a
  discontinuity of RoI pooling rather than from the model.

  Our proposals agree with the reference's to ~0.03 px, but a proposal whose level or adaptive
  RoIAlign grid (`roi_sampling`) sits at a step can land on the other side of it (mmdet X-101
  coffee: a bin of 7.0002 samples is ours at 6.9999, 8 samples vs 7), and the detection it
  refines then moves by ~5e-3 in score and ~0.3 px. Returns f(i, label, score) -> bool for
  reference detection i ([D, 4] `ref_dets`, resized pixels): True when a reference proposal that
  overlaps it (IoU > 0.5) and steps differently on our side gives, through our box head on the
  reference's own coordinates, a `label` score within `tol.score_atol` of `score`.
  """
  close = box_iou(ref_props, our_props) > 0.99
  partner = close.argmax(1)
  flipped = close.any(1) & (roi_sampling(predictor.model.cfg, ref_props)
                            != roi_sampling(predictor.model.cfg, our_props[partner])).any(1)

  def explains(i: int, label: int, score: float) -> bool:
    cand = np.flatnonzero(flipped & (box_iou(ref_dets[i:i + 1], ref_props)[0] > 0.5))[:64]
    if not len(cand):
      return False
    cls, _ = box_head_on(predictor, feats, ref_props[np.resize(cand, 64)])  # one shape: one compile
    logits = cls[:len(cand)].astype(np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    return bool((np.abs(probs[:, label] - score) <= tol.score_atol).any())

  return explains


def match_detections(tag: str, raw, ref_boxes, ref_scores, ref_labels, tol: Tolerances,
                     obs: Observed, *, near_ties: Optional[tuple] = None,
                     roi_flip: Optional[Callable] = None) -> Matched:
  """The inference issue's criteria: the same detection set (same class, box IoU >= 0.99) with
  one-to-one matches, then the case's limits: box IoU >= `tol.box_iou_min` and scores within
  `tol.score_atol`, except, at most `tol.exceptions` of them, detections whose difference `roi_flip` (see
  `roi_flips`) explains.

  near_ties: None requires every detection matched. Otherwise (reference boxes, ours, both in the
  coordinates the reference's class-wise NMS ran in): a detection whose IoU with a
  higher-scoring one of its class lies within 1e-3 of the NMS threshold flips with float32 noise
  (detectron2's own float64 run flips such a pair), and a detection at the tail of the 100
  (within the score tolerance of the other side's last score) then takes or leaves its place.
  Such detections may stay unmatched, at most `tol.exceptions` of them, each one explained.
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
    assert len(ref_un) == len(our_un) <= allowed(len(ref_boxes), tol), (
        f"{tag}: unmatched detections: reference {ref_un}, ours {our_un}")
  ref_ok = np.flatnonzero(iou.max(1) >= 0.99)
  match = iou[ref_ok].argmax(1)
  assert len(set(match.tolist())) == len(match), f"{tag}: two references matched one detection"
  errs = np.abs(scores[match] - ref_scores[ref_ok])
  ious = iou[ref_ok, match]
  off = (errs > tol.score_atol) | (ious < tol.box_iou_min)
  for k in np.flatnonzero(off):
    i = ref_ok[k]
    assert roi_flip is not None and roi_flip(i, labels[match[k]], ref_scores[i]), (
        f"{tag}: reference detection {i}: score error {errs[k]:.2e}, box IoU {ious[k]:.5f}")
  assert off.sum() <= allowed(len(ref_boxes), tol), f"{tag}: {off.sum()} RoI-sampling flips"
  score_err = float(errs[~off].max())
  obs.add("score", score_err)
  obs.add("box IoU", ious[~off].min(), low_is_worse=True)
  obs.add("box px", np.abs(boxes[match] - ref_boxes[ref_ok])[~off].max())
  obs.add("unmatched dets", len(ref_un))
  obs.add("RoI-sampling flips", off.sum())
  return Matched(boxes=boxes, scores=scores, labels=labels, iou=iou, ref_ok=ref_ok, match=match,
                 ref_un=ref_un, our_un=our_un, score_err=score_err)


@dataclasses.dataclass
class MaskCase:
  """What `check_masks` needs of one image: the matched pairs (reference i, ours j), the binary
  masks (reference [H, W, D_ref], ours [D, H, W]), our probabilities [D, M, M], the reference's
  own probabilities [D_ref, M, M] (None when the fixture has none for this set) and paste boxes
  [D_ref, 4], and the framework's paste: binary (probs [K, M, M], boxes [K, 4]) -> [K, H, W] and
  soft (prob [M, M], box [4]) -> [H, W]."""
  pairs: list
  ref_masks: np.ndarray
  masks: np.ndarray
  probs: np.ndarray
  ref_probs: Optional[np.ndarray]
  ref_boxes: np.ndarray
  paste: Callable
  soft: Callable
  # (reference i, ours j) -> whether torchvision's legacy paste truncates the two boxes to
  # different integer windows (None for the other conventions).
  integer_step: Optional[Callable] = None


def mask_case(m: Matched, raw, ref_masks, ref_probs, ref_boxes, hw, convention: str) -> MaskCase:
  """The MaskCase of one image: our detections `raw` (Predictor.raw) matched in `m`, the
  reference's binary masks, probabilities (or None) and paste boxes, pasted the `convention`'s
  way into an image of size `hw`."""
  keep = raw["valid"]
  paste = lambda probs, boxes: inference.paste_masks(probs, boxes, hw, convention)

  def soft(prob, box):
    if convention == "torchvision":
      y0, x0, win = paste_lib.paste_mask_tv_legacy(prob, box, hw)
    else:
      y0, x0, win = paste_lib.paste_mask_grid_sample_soft(prob, box, hw, full_image=True)
    full = np.zeros(hw, np.float32)
    full[y0:y0 + win.shape[0], x0:x0 + win.shape[1]] = win
    return full

  probs, ours = raw["mask_probs"][keep], raw["paste_boxes"][keep]
  integer_step = None
  if convention == "torchvision":
    size = probs.shape[-1]
    integer_step = lambda i, j: not np.array_equal(
        paste_lib.tv_legacy_expanded_box(ref_boxes[i], size),
        paste_lib.tv_legacy_expanded_box(ours[j], size))
  return MaskCase(pairs=list(zip(m.ref_ok, m.match)), ref_masks=ref_masks,
                  masks=paste(probs, ours), probs=probs, ref_probs=ref_probs,
                  ref_boxes=ref_boxes, paste=paste, soft=soft, integer_step=integer_step)


def check_masks(tag: str, mc: MaskCase, tol: Tolerances, obs: Observed) -> None:
  """Mask IoU >= `tol.mask_iou_min` for each matched detection, with two explained exceptions,
  at most `tol.exceptions` of the instances together:

  * box-explained: our probabilities pasted at the reference's own box reach the IoU. The boxes
    agree to the case's box IoU, but a ~0.1 px difference (float32 noise from the box head and
    the RoIs it refines, as large as the reference's own float64-vs-float32 difference) moves
    every contour pixel of a large mask, and the random mask heads draw long contours (a 2x2
    checkerboard). torchvision's legacy paste also truncates the expanded box to integers, so a
    box that agrees to 1e-5 can stretch a small mask by a pixel row (IoU 0.84 seen).
  * threshold tie: at the reference's box, every pixel that still differs has a reference soft
    value (its own probabilities pasted at its own box) within 0.02 of 0.5, and the mask IoU is
    >= TIE_MASK_IOU_MIN.

  Either way, at the reference's box the IoU is >= TIE_MASK_IOU_MIN, and so is the IoU itself
  unless torchvision's legacy paste puts the two boxes in different integer windows (a
  discontinuity of the reference's own algorithm: there a box that agrees to 0.1 px can move a
  small mask by a whole pixel row).
  """
  ious, explained, exact = [], {"box": 0, "tie": 0}, 0
  for i, j in mc.pairs:
    ref = mc.ref_masks[..., i]
    iou = mask_iou(ref, mc.masks[j])
    ious.append(iou)
    exact += int(np.array_equal(ref, mc.masks[j]))
    if iou >= tol.mask_iou_min:
      continue
    at_ref_box = mc.paste(mc.probs[j:j + 1], mc.ref_boxes[i:i + 1])[0]
    iou_r = mask_iou(ref, at_ref_box)
    if iou_r >= tol.mask_iou_min:
      kind = "box"
      assert iou >= TIE_MASK_IOU_MIN or (mc.integer_step is not None and mc.integer_step(i, j)), (
          f"{tag}: reference detection {i} mask IoU {iou:.4f}")
    else:
      differ = ref != at_ref_box
      margin = (np.inf if mc.ref_probs is None else
                float(np.abs(mc.soft(mc.ref_probs[i], mc.ref_boxes[i])[differ] - 0.5).max()))
      assert margin < 0.02, (f"{tag}: reference detection {i} mask IoU {iou:.4f} ({iou_r:.4f} at "
                             f"its box) with pixels {margin:.3f} away from the threshold")
      kind = "tie"
      assert iou >= TIE_MASK_IOU_MIN, f"{tag}: reference detection {i} mask IoU {iou:.4f}"
    assert iou_r >= TIE_MASK_IOU_MIN, f"{tag}: reference detection {i} mask IoU {iou_r:.4f} at its box"
    explained[kind] += 1
  low = explained["box"] + explained["tie"]
  assert low <= allowed(len(ious), tol), f"{tag}: {low} masks below IoU {tol.mask_iou_min}"
  obs.add("mask IoU", min(ious), low_is_worse=True)
  if low:
    obs.add("mask IoU (explained aside)", min(x for x in ious if x >= tol.mask_iou_min),
            low_is_worse=True)
  obs.add("box-explained masks", explained["box"])
  obs.add("threshold-tie masks", explained["tie"])
  obs.add("masks pixel-identical", exact / len(ious), low_is_worse=True)


def check_reference_masks(tag: str, m: Matched, raw, fx, p: str, hw, convention: str,
                          tol: Tolerances, obs: Observed) -> int:
  """The masks of one image whose fixture records `<p>det/{boxes,mask_rle_coco,mask_logits}`
  (torchvision, detectron2): our paste alone on the reference's own probabilities and boxes
  (`reference_paste_diff`), then our masks (`check_masks`). Returns the paste's differing pixels."""
  ref_boxes = fx[p + "det/boxes"]
  ref_masks = decode_rles(fx[p + "det/mask_rle_coco"], hw)
  ref_probs = sigmoid32(fx[p + "det/mask_logits"])
  mc = mask_case(m, raw, ref_masks, ref_probs, ref_boxes, hw, convention)
  paste_diff = reference_paste_diff(tag, mc.paste, ref_probs, ref_boxes, ref_masks)
  check_masks(tag, mc, tol, obs)
  return paste_diff


def reference_paste_diff(tag: str, paste: Callable, probs, boxes, ref_masks) -> int:
  """Our paste alone on the reference's own probabilities [D, M, M] and boxes [D, 4]: at most 2
  pixels per mask may differ from the reference's masks [H, W, D] (sigmoid ulps at 0.5).
  Returns the total number of differing pixels."""
  own = paste(probs, boxes)
  diff = [int((ref_masks[..., i] != m).sum()) for i, m in enumerate(own)]
  assert max(diff) <= 2, f"{tag}: paste of the reference's masks differs by {max(diff)} px"
  return sum(diff)


_TORCH_STORAGES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}


def write_torch_zip(path: Path, state: dict) -> None:
  """Writes `state` (name -> float32 / int64 numpy array) as `torch.save(state_dict)` does in its
  zip format (torch >= 1.6), without torch: `<stem>/data.pkl` (pickle protocol 2 of an OrderedDict
  of `torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())`, each
  storage a persistent id ('storage', torch.XxxStorage, key, 'cpu', numel)), `<stem>/data/<key>`
  (little-endian bytes), `<stem>/byteorder`, `<stem>/version`. Lets a test run the converter CLI
  on a real-format .pth of a parity fixture's weights (`torch.load(weights_only=True)` reads the
  result; checked with torch 2.13 when this was written)."""
  def text(s: str) -> bytes:  # BINUNICODE
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b

  def ints(values) -> bytes:  # MARK BININT... TUPLE
    return b"(" + b"".join(b"J" + struct.pack("<i", int(v)) for v in values) + b"t"

  ordered_dict = b"ccollections\nOrderedDict\n)R"
  pkl, records = [b"\x80\x02", ordered_dict, b"("], {}
  for key, (name, value) in enumerate(state.items()):
    a = np.array(value, order="C")  # (np.ascontiguousarray makes 0-d arrays 1-d)
    strides = [s // a.itemsize for s in a.strides]
    pkl += [text(name), b"ctorch._utils\n_rebuild_tensor_v2\n(",
            b"(" + text("storage") + f"ctorch\n{_TORCH_STORAGES[a.dtype]}\n".encode() + text(str(key))
            + text("cpu") + b"J" + struct.pack("<i", a.size) + b"tQ",
            b"J\x00\x00\x00\x00", ints(a.shape), ints(strides), b"\x89", ordered_dict, b"tR"]
    records[f"data/{key}"] = a.astype(a.dtype.newbyteorder("<")).tobytes()
  pkl += [b"u."]
  root = Path(path).stem
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    zf.writestr(f"{root}/data.pkl", b"".join(pkl))
    zf.writestr(f"{root}/byteorder", "little")
    for name, data in records.items():
      zf.writestr(f"{root}/{name}", data)
    zf.writestr(f"{root}/version", "3\n")


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
