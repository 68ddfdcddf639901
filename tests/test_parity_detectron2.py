"""Stage-by-stage parity with real detectron2 runs: `mask_rcnn_R_50_FPN_3x`, `R_50_C4_3x`, `R_50_DC5_3x`.

tests/fixtures/parity_detectron2{,_R_50_C4,_R_50_DC5}.npz were produced by
scripts/make_parity_fixtures_d2.py (--model) with detectron2 (built from source) on CPU: the model
built from the real yaml got deterministic,
calibrated weights (seeded >=2-D tensors, stored 1-D tensors) and ran on three scikit-image
photographs, fed as BGR like detectron2's decoder (stored in tests/fixtures/images, checked against
the fixture's sha256). Here the shipped recipe, unmodified, gets the same weights regenerated,
converted with our detectron2 name map, and every stage is compared: the PIL resize (bit-exact),
preprocessed input, the features (P2-P6; res4 for C4; the dilated res5 for DC5), RPN head outputs, proposals (as sets), box-head outputs on the
reference's own proposals, mask logits on the reference's own detection boxes, final detections and
the pasted masks. Criteria of the inference issue: same detection set (same class, box IoU >= 0.99),
scores within 1e-3, mask IoU >= 0.98 per instance.
"""
from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from maskrcnn_jax import inference
from maskrcnn_jax.data import transforms
from maskrcnn_jax.modeling.mask_rcnn import LEVELS
from maskrcnn_jax.ops import paste as paste_lib
from tests import parity_common as pc

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
# model -> (fixture, key list, recipe). The fixtures record the 3x models; the 1x recipes differ
# only in the schedule.
MODELS = {
    "R_50_FPN": ("parity_detectron2.npz", "detectron2_mask_rcnn_R_50_FPN_3x.tsv",
                 "mask_rcnn_R_50_FPN_3x"),
    "R_50_C4": ("parity_detectron2_R_50_C4.npz", "detectron2_mask_rcnn_R_50_C4_3x.tsv",
                "mask_rcnn_R_50_C4_3x"),
    "R_50_DC5": ("parity_detectron2_R_50_DC5.npz", "detectron2_mask_rcnn_R_50_DC5_3x.tsv",
                 "mask_rcnn_R_50_DC5_3x"),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def setup(request):
  fixture, keys_file, recipe = MODELS[request.param]
  fx = pc.load_fixture(FIXTURES / fixture)
  state = pc.regenerated_state(fx, FIXTURES / "checkpoint_keys" / keys_file)
  # The recipe as shipped. Its NMS follows torchvision's batched_nms rule on CPU, where the
  # reference ran (per-class NMS above 1000 boxes: the RPN's ~4000 and, on all three images, the
  # detection stage's candidates, `det/num_candidates` below), and RoIAlign's adaptive grid is
  # exact for every RoI (several passes of roi_align_max_grid samples where the calibrated
  # random RPN's elongated proposals need up to 21).
  config, variables = pc.converted(
      pc.load_recipe(ROOT / "configs" / "detectron2" / f"{recipe}.py"), state,
      source="model_final.pkl")
  predictor = inference.Predictor(config, jax.device_put(variables),
                                  precision=jax.lax.Precision.HIGHEST)
  return fx, config, predictor


def test_resize_matches_detectron2(setup):
  """detectron2's ResizeShortestEdge (PIL bilinear on the BGR uint8 image), bit for bit."""
  fx, _, _ = setup
  for name in pc.image_names(fx):
    image = pc.fixture_image(fx, name, "bgr")
    hw = transforms.test_resize_size(*image.shape[:2], rule="detectron2", short=800, max_size=1333)
    assert hw == tuple(fx[f"{name}/resized_hw"]), name
    resized = transforms.resize_image(image, hw, rule="detectron2")
    assert pc.sha256(resized) == str(fx[f"{name}/resized_sha256"]), f"{name}: resized pixels differ"


def feature_keys(fx, config):
  """(fixture key, our feature name, anchors per location) of each RPN input map."""
  if config.model.arch == "FPN":
    assert tuple(str(n) for n in fx["fpn_levels"]) == LEVELS
    return [(f"fpn/{lvl}", lvl, 3) for lvl in LEVELS]
  (d2_name,) = (str(n) for n in fx["feature_names"])
  ours = {"C4": "c4", "DC5": "c5"}[config.model.arch]
  assert d2_name == {"c4": "res4", "c5": "res5"}[ours]
  return [(f"features/{d2_name}", ours, 15)]


def test_parity_stage_by_stage(setup):
  fx, config, predictor = setup
  levels = feature_keys(fx, config)
  report = []
  for name in pc.image_names(fx):
    p = f"{name}/"
    image = pc.fixture_image(fx, name, "bgr")
    batch = inference.preprocess_image(image, config)

    # 1. Preprocessed tensor: sizes exactly, values to float32 rounding.
    pc.check_input(batch, fx, p, atol=1e-4, sum_rtol=1e-6)

    # 2-3. Features (FPN levels / res4 / res5) and RPN head outputs.
    feats, logits, deltas = pc.run_stages(predictor, batch)
    assert list(feats) == [ours for _, ours, _ in levels]
    rpn_err = 0.0
    for (key, ours, a), lg, dl in zip(levels, logits, deltas):
      err = pc.feature_rel_err(np.asarray(feats[ours][0]), fx, f"{p}{key}/", 1e-4, f"{name} {ours}")
      report.append(f"{name} {ours} rel err {err:.1e}")
      rpn_err = max(rpn_err, pc.rpn_rel_errs(
          lg[0], dl[0], fx[f"{p}{key}/hw"], a, fx, f"{p}rpn/{key.split('/')[-1]}/", 1e-4,
          f"{name} rpn {ours}"))
    report.append(f"{name} rpn head max rel err {rpn_err:.1e}")

    # 4. Proposals, as sets (exact logit ties may order differently); the logits of matched pairs.
    raw = predictor.raw(batch)
    ours, ours_logits = pc.proposals(predictor, feats, batch)
    ref = fx[p + "proposals"]
    iou = pc.box_iou(ref, ours)
    matched = (iou.max(1) > 0.99).mean()
    assert len(ours) == len(ref) and matched >= 0.99, f"{name}: proposals matched {matched:.3f}"
    ok = iou.max(1) > 0.99
    logit_err = np.abs(ours_logits[iou.argmax(1)][ok] - fx[p + "proposal_logits"][ok]).max()
    assert logit_err < 1e-3, f"{name}: proposal logit error {logit_err:.2e}"
    report.append(f"{name} proposals matched {matched:.4f}, logit err {logit_err:.1e}")

    # 5. Box head on the reference's own first 200 proposals.
    cls, reg = pc.box_head_on(predictor, feats, fx[p + "proposals"][:200])
    np.testing.assert_allclose(cls, fx[p + "box_head/class_logits"], atol=2e-3, rtol=1e-3)
    np.testing.assert_allclose(reg, fx[p + "box_head/box_regression"], atol=2e-3, rtol=1e-3)
    report.append(f"{name} box head max abs err: class logits "
                  f"{np.abs(cls - fx[p + 'box_head/class_logits']).max():.1e}, "
                  f"deltas {np.abs(reg - fx[p + 'box_head/box_regression']).max():.1e}")

    # 6. Mask head on the reference's own detection boxes (resized coordinates) and classes.
    ml, _ = pc.mask_head_on(predictor, feats, fx[p + "det/boxes_resized"], fx[p + "det/labels"])
    ref_ml = fx[p + "det/mask_logits"]
    ml_err = np.abs(ml - ref_ml).max() / float(np.abs(ref_ml).max())
    assert ml_err < 1e-4, f"{name}: mask logits max relative error {ml_err:.2e}"
    report.append(f"{name} mask logits rel err {ml_err:.1e}")

    # 7. Final detections: same set (NMS near-ties explained, pc.match_detections), scores within
    # 1e-3, masks IoU >= 0.98.
    assert int(fx[p + "det/num_candidates"]) > 1000, "reference NMS used the coordinate trick"
    keep = raw["valid"]
    ref_boxes = fx[p + "det/boxes"]
    resized_boxes = raw["boxes"][keep] * np.tile(fx[p + "resized_hw"][::-1] / fx[p + "image_hw"][::-1], 2)
    m = pc.match_detections(name, raw, ref_boxes, fx[p + "det/scores"], fx[p + "det/labels"],
                            near_ties=(fx[p + "det/boxes_resized"], resized_boxes))
    masks = inference.paste_masks(raw["mask_probs"][keep], raw["paste_boxes"][keep], image.shape[:2],
                                  config.convention)
    ref_masks = pc.decode_rles(fx[p + "det/mask_rle_coco"], image.shape[:2])
    # The paste alone, on the reference's own probabilities and boxes: exact up to sigmoid ulps.
    ref_probs = pc.sigmoid32(fx[p + "det/mask_logits"])
    paste_diff = pc.reference_paste_diff(
        name, lambda pr, bx: inference.paste_masks(pr, bx, image.shape[:2], config.convention),
        ref_probs, ref_boxes, ref_masks)
    mask_ious = [pc.mask_iou(ref_masks[..., i], masks[j]) for i, j in zip(m.ref_ok, m.match)]
    pixel_diff = sum(int((ref_masks[..., i] != masks[j]).sum()) for i, j in zip(m.ref_ok, m.match))
    # A small mask can fall below IoU 0.98 through a few pixels whose probability sits at the 0.5
    # threshold: our box differs from the reference's by ~0.01 px (float32 summation order in the
    # box head; DC5's fc1 sums 100352 products), which moves the paste grid by ~1e-3 mask cells.
    # Such an instance is allowed (at most 2 % of them) only if every pixel that differs has a
    # reference soft value (the reference's own probabilities pasted at its own box) within 0.02
    # of the threshold: a threshold tie, not a different mask. DC5 coffee: a 201-px mask with 6
    # such pixels (|p - 0.5| <= 0.005) has IoU 0.971.
    low = [(k, i, j) for k, (i, j) in enumerate(zip(m.ref_ok, m.match)) if mask_ious[k] < 0.98]
    for k, i, j in low:
      differ = ref_masks[..., i] != masks[j]
      _, _, soft = paste_lib.paste_mask_grid_sample_soft(ref_probs[i], ref_boxes[i],
                                                         image.shape[:2], full_image=True)
      margin = float(np.abs(soft[differ] - 0.5).max())
      assert margin < 0.02, (f"{name}: detection {i} mask IoU {mask_ious[k]:.4f} with pixels "
                             f"{margin:.3f} away from the threshold")
    assert len(low) <= max(1, len(m.ref_ok) // 50), f"{name}: {len(low)} masks below IoU 0.98"
    report.append(f"{name}: {len(m.ref_ok)}/{len(ref_boxes)} dets matched (NMS near-ties: "
                  f"reference {m.ref_un.tolist()}, ours {m.our_un.tolist()}), max score err "
                  f"{m.score_err:.1e}, min box IoU {m.iou.max(1)[m.ref_ok].min():.5f}, max box err "
                  f"{np.abs(m.boxes[m.match] - ref_boxes[m.ref_ok]).max():.1e} px, min mask IoU "
                  f"{min(mask_ious):.4f} ({len(low)} below 0.98 by threshold ties), {pixel_diff} "
                  f"mask pixels differ in all; paste of the reference's masks: {paste_diff} px differ")
  print("\n".join(report))
