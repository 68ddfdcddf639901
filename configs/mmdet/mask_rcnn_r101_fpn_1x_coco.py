"""mmdetection v2.x `mask_rcnn_r101_fpn_1x_coco`: Mask R-CNN, COCO.

Upstream: mmdetection v2.x configs/mask_rcnn/mask_rcnn_r101_fpn_1x_coco.py.
ResNet-101-FPN, pytorch style (stride in the 3x3 conv), FrozenBN; RGB input, mean (123.675, 116.28,
103.53), std (58.395, 57.12, 57.375).
Schedule 1x (12 epochs), single-scale (1333, 800).
Test: short side 800, long side <= 1333, pad to 32, as for every mmdet row.
"""
from maskrcnn_jax import config_lib


def get_config():
  config = config_lib.mask_rcnn(
      convention="mmdet", depth=101, style="pytorch", pixel=config_lib.PYTORCH_RGB, schedule="1x",
      backbone_init="torchvision://resnet101",
      upstream="mask_rcnn_r101_fpn_1x_coco")
  config.published = config_lib.published(
      box_ap=40.0, mask_ap=36.1,
      url="https://download.openmmlab.com/mmdetection/v2.0/mask_rcnn/mask_rcnn_r101_fpn_1x_coco/mask_rcnn_r101_fpn_1x_coco_20200204-1efe0ed5.pth")  # noqa: E501
  return config
