"""Reading a COCO-format instances dataset (json + image folder) through pycocotools.

`CocoDataset` validates the json once at construction (a missing required field raises
`DatasetError` naming the file and the image / annotation id), keeps the pycocotools `COCO` object
for evaluation (`.coco`), and serves per-image annotations with the reference frameworks'
filtering applied:

* Contiguous labels: label i is the i-th of the **sorted** dataset category ids (mmdet
  `CocoDataset.cat2label`, detectron2 `thing_dataset_id_to_contiguous_id`; parity_spec 2.10).
* Degenerate boxes are dropped by the rule of the convention (in original-image pixels):
  - mmdet (`mmdet/datasets/coco.py:_parse_ann_info`): the box does not overlap the image
    (intersection area 0), or the json 'area' <= 0, or w < 1, or h < 1 (w, h from 'bbox',
    unclipped).
  - detectron2 (`detection_utils.filter_empty_instances`, `Boxes.nonempty(threshold=1e-5)`): the box
    clipped to the image has w <= 1e-5 or h <= 1e-5. detectron2 applies it after the resize; here it
    is applied before, which differs only for boxes thinner than 1e-5 / scale pixels.
  - torchvision (`references/detection/coco_utils.py:ConvertCocoPolysToMask`): the clipped box has
    x2 <= x1 or y2 <= y1.
  An annotation flagged 'ignore' is dropped (mmdet). An annotation whose 'bbox' is null or [] is
  dropped (counted as 'missing_bbox'); a 'bbox' key that is absent altogether, or malformed, is a
  `DatasetError`.
* Polygons with fewer than 3 points or an odd coordinate count are dropped; an annotation left with
  no polygon is dropped (detectron2 `load_coco_json`, 'invalid_segmentation'). An annotation with
  no 'segmentation' key is kept box-only: its instance mask is the filled box (counted as
  'box_only').
* Crowd annotations (iscrowd=1) are returned with `crowd=True`. All three references leave them out
  of the training targets (mmdet puts them into `gt_bboxes_ignore`, which Mask R-CNN's assigner
  ignores with `ignore_iof_thr=-1`; detectron2's `DatasetMapper` and torchvision's
  `ConvertCocoPolysToMask` drop them); the flag lets the matcher do the same.
* Images without annotations stay in `.image_ids` (evaluation); `train_image_ids()` drops images
  with no valid non-crowd instance (torchvision's `_coco_remove_images_without_annotations`; d2's
  `filter_images_with_only_crowd_annotations` does the same minus the degenerate rule; mmdet's
  `filter_empty_gt` keeps crowd-only images) unless `filter_empty=False`.

Counts of everything dropped are in `.stats` and logged once at load.
"""
from __future__ import annotations

import collections
import contextlib
import io
import json
import logging
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
from pycocotools import coco as coco_lib
from pycocotools import mask as mask_util

from maskrcnn_jax import conventions as conventions_lib
from maskrcnn_jax import errors
from maskrcnn_jax.data import masks as masks_lib
from maskrcnn_jax.data import transforms

logger = logging.getLogger(__name__)


class DatasetError(errors.UserError, ValueError):
  """The annotation file or one of its images / annotations is invalid; the message names them."""


_REQUIRED_IMAGE_KEYS = ("id", "file_name", "height", "width")
_REQUIRED_ANN_KEYS = ("image_id", "category_id", "bbox")


def _is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class CocoDataset:
  """A COCO-format instances dataset.

  Args:
    annotation_file: path of the instances json ('images', 'annotations', 'categories').
    image_dir: folder that the images' 'file_name' entries are relative to.
    convention: 'mmdet' | 'detectron2' | 'torchvision' (or a `Convention`; 'd2'/'tv' accepted):
      selects the image decoder (`transforms.read_image`) and the degenerate-box rule.

  Raises:
    DatasetError: the file is not valid json, a top-level list is missing, or an image / annotation
      / category lacks a required field; the message names the file and the id (or list index).
  """

  def __init__(self, annotation_file: Union[str, os.PathLike], image_dir: Union[str, os.PathLike],
               *, convention: Union[str, conventions_lib.Convention]):
    self.annotation_file = os.fspath(annotation_file)
    self.image_dir = os.fspath(image_dir)
    self.convention = transforms._convention(convention)  # pylint: disable=protected-access
    self.stats: Dict[str, int] = collections.Counter()
    data = self._load_json()
    self._validate_and_index(data)
    self._coco = self._make_coco(data)
    dropped = {k: v for k, v in self.stats.items() if v}
    logger.info("%s: %d images, %d annotations kept, %d categories; %s", self.annotation_file,
                len(self.image_ids), sum(len(v) for v in self._anns.values()),
                len(self.category_ids), dropped or "nothing dropped")

  @staticmethod
  def _make_coco(data: Dict[str, Any]) -> coco_lib.COCO:
    coco = coco_lib.COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints; keep the log clean
      coco.createIndex()
    return coco

  @property
  def coco(self) -> coco_lib.COCO:
    """pycocotools' COCO object, for evaluation (COCOeval) and for users; built from the validated
    dict so that nothing is read twice (re-read from the file in a copy made by pickling)."""
    if self._coco is None:
      self._coco = CocoDataset(self.annotation_file, self.image_dir,
                               convention=self.convention).coco
    return self._coco

  def __getstate__(self) -> Dict[str, Any]:
    # Worker processes (data/loader.py) need the parsed annotations, not pycocotools' index of the
    # whole json (hundreds of MB more to pickle per worker for COCO train).
    state = dict(self.__dict__)
    state["_coco"] = None
    return state

  # ---------------------------------------------------------------------------------------------
  # loading and validation
  # ---------------------------------------------------------------------------------------------

  def _error(self, what: str) -> DatasetError:
    return DatasetError(f"{self.annotation_file}: {what}")

  def _load_json(self) -> Dict[str, Any]:
    try:
      with open(self.annotation_file, "r", encoding="utf-8") as f:
        data = json.load(f)
    except FileNotFoundError as e:
      raise DatasetError(f"annotation file not found: {self.annotation_file}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise self._error(f"not valid json: {e}") from e
    if not isinstance(data, dict):
      raise self._error("the top level must be a json object")
    for key in ("images", "annotations", "categories"):
      if key not in data:
        raise self._error(f"missing required top-level field {key!r}")
      if not isinstance(data[key], list):
        raise self._error(f"top-level field {key!r} must be a list")
    return data

  def _validate_and_index(self, data: Dict[str, Any]) -> None:
    cats = {}
    for i, c in enumerate(data["categories"]):
      if not isinstance(c, dict) or "id" not in c:
        raise self._error(f"category at index {i} has no 'id'")
      if c["id"] in cats:
        raise self._error(f"duplicate category id {c['id']}")
      cats[c["id"]] = str(c.get("name", c["id"]))
    if not cats:
      raise self._error("'categories' is empty")
    self.category_ids: List[int] = sorted(cats)
    self.category_names: List[str] = [cats[i] for i in self.category_ids]
    self._cat_to_label = {cid: i for i, cid in enumerate(self.category_ids)}

    self._images: Dict[int, Dict[str, Any]] = {}
    for i, img in enumerate(data["images"]):
      if not isinstance(img, dict):
        raise self._error(f"image at index {i} is not an object")
      for key in _REQUIRED_IMAGE_KEYS:
        if key not in img:
          ident = f"image id {img['id']}" if "id" in img else f"image at index {i}"
          raise self._error(f"{ident} is missing required field {key!r}")
      if img["id"] in self._images:
        raise self._error(f"duplicate image id {img['id']}")
      if not (_is_number(img["height"]) and _is_number(img["width"])
              and img["height"] > 0 and img["width"] > 0):
        raise self._error(f"image id {img['id']} ({img['file_name']}) has invalid size "
                          f"{img['height']}x{img['width']}")
      self._images[img["id"]] = img
    self.image_ids: List[int] = sorted(self._images)

    self._anns: Dict[int, List[Dict[str, Any]]] = {i: [] for i in self.image_ids}
    next_id = 1 + max([a.get("id", 0) for a in data["annotations"] if isinstance(a, dict)
                       and _is_number(a.get("id", 0))] + [0])
    for i, ann in enumerate(data["annotations"]):
      ident = f"annotation id {ann['id']}" if isinstance(ann, dict) and "id" in ann else \
          f"annotation at index {i}"
      if not isinstance(ann, dict):
        raise self._error(f"{ident} is not an object")
      for key in _REQUIRED_ANN_KEYS:
        if key not in ann:
          raise self._error(f"{ident} (image id {ann.get('image_id', '?')}) is missing required "
                            f"field {key!r}")
      if "id" not in ann:
        # pycocotools indexes annotations by 'id'; some exporters omit it.
        ann["id"] = next_id
        next_id += 1
        self.stats["assigned_id"] += 1
      if ann["image_id"] not in self._images:
        raise self._error(f"{ident} refers to unknown image id {ann['image_id']}")
      if ann["category_id"] not in self._cat_to_label:
        raise self._error(f"{ident} (image id {ann['image_id']}) has unknown category id "
                          f"{ann['category_id']}")
      img = self._images[ann["image_id"]]
      parsed = self._parse_annotation(ann, img, ident)
      if "area" not in ann:
        # COCOeval reads gt 'area' for its area ranges.
        ann["area"] = parsed["area"] if parsed is not None else 0.0
      ann.setdefault("iscrowd", 0)
      if parsed is not None:
        self._anns[ann["image_id"]].append(parsed)

  def _parse_annotation(self, ann: Dict[str, Any], img: Dict[str, Any],
                        ident: str) -> Optional[Dict[str, Any]]:
    """Validates one annotation; returns its parsed form, or None when it is dropped."""
    where = f"{ident} (image id {ann['image_id']})"
    bbox = ann["bbox"]
    if bbox is None or (isinstance(bbox, (list, tuple)) and len(bbox) == 0):
      self.stats["missing_bbox"] += 1
      return None
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(map(_is_number, bbox))):
      raise self._error(f"{where} has a malformed 'bbox' {bbox!r}; expected [x, y, w, h]")
    x, y, w, h = (float(v) for v in bbox)
    crowd = bool(ann.get("iscrowd", 0))
    H, W = int(img["height"]), int(img["width"])
    segm = ann.get("segmentation", None)
    if segm is None:
      self.stats["box_only"] += 1
    elif isinstance(segm, list):
      # Numbers inside the polygons are left to pycocotools (a per-number check costs seconds on
      # COCO train); a bad one surfaces as a skipped sample in training.
      if not all(isinstance(p, list) for p in segm):
        raise self._error(f"{where} has a malformed polygon 'segmentation'")
      # detectron2/data/datasets/coco.py:load_coco_json: polygons with < 3 points are invalid.
      valid = [p for p in segm if len(p) % 2 == 0 and len(p) >= 6]
      if not valid:
        self.stats["invalid_segmentation"] += 1
        return None
      segm = valid
    elif isinstance(segm, dict):
      if "counts" not in segm or "size" not in segm:
        raise self._error(f"{where} has an RLE 'segmentation' without 'counts' / 'size'")
      if [int(v) for v in segm["size"]] != [H, W]:
        raise self._error(f"{where}: RLE size {segm['size']} differs from the image size "
                          f"{[H, W]} ({img['file_name']})")
    else:
      raise self._error(f"{where} has a 'segmentation' of type {type(segm).__name__}")

    if ann.get("ignore", 0):
      # mmdet `_parse_ann_info` skips `ignore` annotations (detectron2 asserts there are none).
      self.stats["ignore_flag"] += 1
      return None
    if self._degenerate(x, y, w, h, ann, H, W):
      self.stats["degenerate_box"] += 1
      return None
    if "area" in ann:
      area = float(ann["area"])
    elif segm is None:
      area = w * h
    else:
      area = float(mask_util.area(self._to_rle(segm, H, W)))
    return dict(id=ann["id"], box=(x, y, x + w, y + h),
                label=self._cat_to_label[ann["category_id"]], crowd=crowd, segmentation=segm,
                area=area)

  def _degenerate(self, x: float, y: float, w: float, h: float, ann: Dict[str, Any], H: int,
                  W: int) -> bool:
    """The convention's degenerate-box rule (module docstring), original-image pixels."""
    rule = self.convention.degenerate_box_rule
    cw = min(x + w, W) - max(x, 0.0)
    ch = min(y + h, H) - max(y, 0.0)
    if rule == "mmdet":
      # mmdet/datasets/coco.py:_parse_ann_info
      inter = max(0.0, cw) * max(0.0, ch)
      return inter == 0 or ("area" in ann and ann["area"] <= 0) or w < 1 or h < 1
    if rule == "detectron2":
      return cw <= 1e-5 or ch <= 1e-5
    return cw <= 0 or ch <= 0  # torchvision: keep x2 > x1 and y2 > y1 after clamping

  @staticmethod
  def _to_rle(segm, h: int, w: int):
    """pycocotools RLE (compressed) of a polygon list, uncompressed or compressed RLE."""
    return masks_lib.to_rle(segm, h, w)

  # ---------------------------------------------------------------------------------------------
  # public accessors
  # ---------------------------------------------------------------------------------------------

  @property
  def num_classes(self) -> int:
    return len(self.category_ids)

  def __len__(self) -> int:
    return len(self.image_ids)

  def label_to_category_id(self, label: int) -> int:
    """Contiguous label -> dataset category id (for COCO results)."""
    return self.category_ids[int(label)]

  def image_info(self, image_id: int) -> Dict[str, Any]:
    """The json 'images' entry (id, file_name, height, width, ...) of `image_id`."""
    try:
      return self._images[image_id]
    except KeyError:
      raise KeyError(f"{self.annotation_file}: unknown image id {image_id}") from None

  def image_path(self, image_id: int) -> str:
    return os.path.join(self.image_dir, self.image_info(image_id)["file_name"])

  def read_image(self, image_id: int, *, check_size: bool = True) -> np.ndarray:
    """Decodes one image in the convention's decoder order (`transforms.read_image`).

    Returns:
      [H, W, 3] uint8, BGR (mmdet, detectron2) or RGB (torchvision).

    Raises:
      transforms.ImageReadError: missing / corrupt file; the message names the file and image id.
      DatasetError: with check_size, the decoded size differs from the json's height / width
        (detectron2 `check_image_size`; the masks would not line up).
    """
    info = self.image_info(image_id)
    path = self.image_path(image_id)
    try:
      image = transforms.read_image(path, convention=self.convention)
    except transforms.ImageReadError as e:
      raise transforms.ImageReadError(f"image id {image_id} ({info['file_name']}): {e}") from e
    if check_size and tuple(image.shape[:2]) != (int(info["height"]), int(info["width"])):
      raise DatasetError(f"image id {image_id} ({path}): decoded size {image.shape[:2]} differs "
                         f"from the annotation's {(info['height'], info['width'])}")
    return image

  def annotations(self, image_id: int) -> Dict[str, Any]:
    """The kept annotations of one image, in json order.

    Returns:
      dict with
        boxes: [M, 4] float32, (x1, y1, x2, y2) in original-image pixels, from 'bbox' (x, y, w, h)
          as x2 = x + w (unclipped);
        labels: [M] int32, contiguous labels in [0, num_classes);
        crowd: [M] bool (iscrowd);
        segmentations: list of M json segmentations: polygon lists, RLE dicts, or None (box only);
        ann_ids: [M] int64 annotation ids;
        areas: [M] float32.
    """
    anns = self._anns[self.image_info(image_id)["id"]]
    return dict(
        boxes=np.array([a["box"] for a in anns], np.float32).reshape(-1, 4),
        labels=np.array([a["label"] for a in anns], np.int32),
        crowd=np.array([a["crowd"] for a in anns], bool),
        segmentations=[a["segmentation"] for a in anns],
        ann_ids=np.array([a["id"] for a in anns], np.int64),
        areas=np.array([a["area"] for a in anns], np.float32),
    )

  def instance_masks(self, image_id: int, hw: Optional[Sequence[int]] = None) -> np.ndarray:
    """Rasterizes the kept annotations of one image with pycocotools.

    Args:
      image_id: the image.
      hw: (H, W) to rasterize at; defaults to the json's (height, width). RLE segmentations must
        have this size.

    Returns:
      [M, H, W] bool, in the order of `annotations(image_id)`. Polygons: frPyObjects + merge +
      decode (as mmdet / detectron2 / torchvision); uncompressed and compressed RLE: decode.
      Box-only annotations give the filled box (pixels whose centre lies inside it).

    Raises:
      DatasetError: an RLE whose size differs from hw (names the annotation and image).
    """
    info = self.image_info(image_id)
    h, w = (int(info["height"]), int(info["width"])) if hw is None else (int(hw[0]), int(hw[1]))
    anns = self._anns[info["id"]]
    out = np.zeros((len(anns), h, w), bool)
    for i, a in enumerate(anns):
      segm = a["segmentation"]
      if segm is None:
        x1, y1, x2, y2 = a["box"]
        c0, c1 = max(int(math.ceil(x1 - 0.5)), 0), min(int(math.ceil(x2 - 0.5)), w)
        r0, r1 = max(int(math.ceil(y1 - 0.5)), 0), min(int(math.ceil(y2 - 0.5)), h)
        out[i, r0:r1, c0:c1] = True
        continue
      if isinstance(segm, dict) and [int(v) for v in segm["size"]] != [h, w]:
        raise DatasetError(f"{self.annotation_file}: annotation id {a['id']} (image id "
                           f"{info['id']}): RLE size {segm['size']} differs from {[h, w]}")
      out[i] = mask_util.decode(self._to_rle(segm, h, w)).astype(bool)
    return out

  def train_image_ids(self, *, filter_empty: bool = True) -> List[int]:
    """Image ids for training: those with >= 1 kept non-crowd instance (see the module docstring),
    or all of them with filter_empty=False. Sorted."""
    if not filter_empty:
      return list(self.image_ids)
    return [i for i in self.image_ids if any(not a["crowd"] for a in self._anns[i])]
