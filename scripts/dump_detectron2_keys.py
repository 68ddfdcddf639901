#!/usr/bin/env python
"""Dump the state-dict key list of a detectron2 model-zoo config (name, shape, dtype per line).

NOT run by CI (needs torch + detectron2). Runs in the torchvision reference venv with detectron2
built from source into it (tests/fixtures/README.md, "parity_detectron2.npz", lists the steps)::

    # one config -> stdout, or -> a file
    /work/tvenv/bin/python scripts/dump_detectron2_keys.py COCO-InstanceSegmentation/mask_rcnn_R_50_C4_3x.yaml
    /work/tvenv/bin/python scripts/dump_detectron2_keys.py COCO-InstanceSegmentation/mask_rcnn_R_50_C4_3x.yaml \
        --out tests/fixtures/checkpoint_keys/detectron2_mask_rcnn_R_50_C4_3x.tsv
    # every C4 / DC5 Mask R-CNN row into tests/fixtures/checkpoint_keys/detectron2_mask_rcnn_<row>.tsv
    /work/tvenv/bin/python scripts/dump_detectron2_keys.py --all-c4-dc5
    # check that a key file equals what the config builds (exit status 1 if not)
    /work/tvenv/bin/python scripts/dump_detectron2_keys.py COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml \
        --check tests/fixtures/checkpoint_keys/detectron2_mask_rcnn_R_50_FPN_3x.tsv

The model is built the way the zoo's models are: ``get_cfg()`` + ``merge_from_file`` of the yaml
(from ``detectron2.model_zoo``, i.e. the configs/ of the detectron2 source tree), MODEL.DEVICE cpu,
no weights, ``build_model``. A zoo ``model_final.pkl`` stores ``model.state_dict()`` of exactly this
model under ``'model'`` (as numpy arrays), so the dump is the released checkpoint's key list.

Output format (what ``tests.synthetic_weights.read_key_tsv`` reads): one line per
state-dict entry, in state-dict order, ``name<TAB>shape<TAB>dtype`` with the shape written as a
Python tuple (``(256, 256, 1, 1)``, ``(256,)``) and the dtype without the ``torch.`` prefix.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEY_DIR = REPO / "tests" / "fixtures" / "checkpoint_keys"
# The detectron2 model-zoo Mask R-CNN rows with a C4 or DC5 backbone (configs/COCO-InstanceSegmentation).
C4_DC5_ROWS = ("R_50_C4_1x", "R_50_C4_3x", "R_50_DC5_1x", "R_50_DC5_3x", "R_101_C4_3x", "R_101_DC5_3x")


def zoo_config(row: str) -> str:
    """'R_50_C4_3x' -> the model-zoo config path of that Mask R-CNN row."""
    return f"COCO-InstanceSegmentation/mask_rcnn_{row}.yaml"


def build(config: str):
    """detectron2 model for a model-zoo config path (or a yaml file), CPU, eval, no weights."""
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    path = config if Path(config).is_file() else model_zoo.get_config_file(config)
    cfg.merge_from_file(path)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.freeze()
    return build_model(cfg).eval()


def key_lines(model) -> list:
    """'name\\t(shape)\\tdtype' for every state-dict entry, in order."""
    lines = []
    for name, t in model.state_dict().items():
        lines.append(f"{name}\t{tuple(int(s) for s in t.shape)}\t{str(t.dtype).replace('torch.', '')}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", nargs="?", help="model-zoo config path (e.g. COCO-InstanceSegmentation/"
                    "mask_rcnn_R_50_C4_3x.yaml) or a yaml file")
    ap.add_argument("--out", type=Path, help="write the key list here (default: stdout)")
    ap.add_argument("--check", type=Path, help="compare with this key file instead of writing")
    ap.add_argument("--all-c4-dc5", action="store_true",
                    help=f"write {KEY_DIR.relative_to(REPO)}/detectron2_mask_rcnn_<row>.tsv for {C4_DC5_ROWS}")
    args = ap.parse_args()

    if args.all_c4_dc5:
        for row in C4_DC5_ROWS:
            lines = key_lines(build(zoo_config(row)))
            out = KEY_DIR / f"detectron2_mask_rcnn_{row}.tsv"
            out.write_text("\n".join(lines) + "\n")
            print(f"{zoo_config(row)}: {len(lines)} entries -> {out.relative_to(REPO)}")
        return 0
    if not args.config:
        ap.error("a config (or --all-c4-dc5) is required")
    lines = key_lines(build(args.config))
    if args.check:
        ref = args.check.read_text().splitlines()
        if ref == lines:
            print(f"{args.check}: identical ({len(lines)} entries)")
            return 0
        diff = [(i, a, b) for i, (a, b) in enumerate(zip(ref, lines)) if a != b][:10]
        print(f"{args.check}: DIFFERS ({len(ref)} vs {len(lines)} entries); first differences: {diff}")
        return 1
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
        print(f"{args.config}: {len(lines)} entries -> {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
