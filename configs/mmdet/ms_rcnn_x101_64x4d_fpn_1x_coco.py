"""mmdetection v2.x `ms_rcnn_x101_64x4d_fpn_1x_coco`: Mask Scoring R-CNN, COCO.

Upstream: mmdetection v2.x configs/ms_rcnn/ms_rcnn_x101_64x4d_fpn_1x_coco.py.
Mask Scoring R-CNN: the Mask R-CNN recipe plus the MaskIoU head (4 convs, 2 fc, 14x14 RoIs) whose
predicted mask IoU rescales each detection's mask score.
ResNeXt-101 64x4d-FPN, pytorch style (stride in the 3x3 conv), FrozenBN; RGB input, mean (123.675,
116.28, 103.53), std (58.395, 57.12, 57.375).
Schedule 1x (12 epochs), single-scale (1333, 800).
Base: ms_rcnn_x101_32x4d_fpn_1x_coco with groups 64.
"""
from maskrcnn_jax import config_lib


def get_config():
  config = config_lib.mask_rcnn(
      convention="mmdet", depth=101, groups=64, width_per_group=4, style="pytorch",
      pixel=config_lib.PYTORCH_RGB, mask_scoring=True, schedule="1x",
      backbone_init="open-mmlab://resnext101_64x4d",
      upstream="ms_rcnn_x101_64x4d_fpn_1x_coco")
  config.published = config_lib.published(
      box_ap=43.0, mask_ap=39.5,
      url="https://download.openmmlab.com/mmdetection/v2.0/ms_rcnn/ms_rcnn_x101_64x4d_fpn_1x_coco/ms_rcnn_x101_64x4d_fpn_1x_coco_20200206-86ba88d2.pth")  # noqa: E501
  return config
