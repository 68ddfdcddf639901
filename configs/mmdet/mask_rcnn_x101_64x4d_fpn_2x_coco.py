"""mmdetection v2.x `mask_rcnn_x101_64x4d_fpn_2x_coco`: Mask R-CNN, COCO.

Upstream: mmdetection v2.x configs/mask_rcnn/mask_rcnn_x101_64x4d_fpn_2x_coco.py.
ResNeXt-101 64x4d-FPN, pytorch style (stride in the 3x3 conv), FrozenBN; RGB input, mean (123.675,
116.28, 103.53), std (58.395, 57.12, 57.375).
Schedule 2x (24 epochs), single-scale (1333, 800).
Test: short side 800, long side <= 1333, pad to 32, as for every mmdet row.
"""
from maskrcnn_jax import config_lib


def get_config():
  config = config_lib.mask_rcnn(
      convention="mmdet", depth=101, groups=64, width_per_group=4, style="pytorch",
      pixel=config_lib.PYTORCH_RGB, schedule="2x",
      backbone_init="open-mmlab://resnext101_64x4d",
      upstream="mask_rcnn_x101_64x4d_fpn_2x_coco")
  config.published = config_lib.published(
      box_ap=42.7, mask_ap=38.1,
      url="https://download.openmmlab.com/mmdetection/v2.0/mask_rcnn/mask_rcnn_x101_64x4d_fpn_2x_coco/mask_rcnn_x101_64x4d_fpn_2x_coco_20200509_224208-39d6f70c.pth")  # noqa: E501
  return config
