"""mmdetection v2.x `mask_rcnn_x101_32x4d_fpn_1x_coco`: Mask R-CNN, COCO.

Upstream: mmdetection v2.x configs/mask_rcnn/mask_rcnn_x101_32x4d_fpn_1x_coco.py.
ResNeXt-101 32x4d-FPN, pytorch style (stride in the 3x3 conv), FrozenBN; RGB input, mean (123.675,
116.28, 103.53), std (58.395, 57.12, 57.375).
Schedule 1x (12 epochs), single-scale (1333, 800).
Backbone BN has requires_grad=True upstream but norm_eval=True, so inference sees fixed statistics
exactly like FrozenBN.
Test: short side 800, long side <= 1333, pad to 32, as for every mmdet row.
"""
from maskrcnn_jax import config_lib


def get_config():
  config = config_lib.mask_rcnn(
      convention="mmdet", depth=101, groups=32, width_per_group=4, style="pytorch",
      pixel=config_lib.PYTORCH_RGB, schedule="1x",
      backbone_init="open-mmlab://resnext101_32x4d",
      upstream="mask_rcnn_x101_32x4d_fpn_1x_coco")
  config.published = config_lib.published(
      box_ap=41.9, mask_ap=37.5,
      url="https://download.openmmlab.com/mmdetection/v2.0/mask_rcnn/mask_rcnn_x101_32x4d_fpn_1x_coco/mask_rcnn_x101_32x4d_fpn_1x_coco_20200205-478d0b67.pth")  # noqa: E501
  return config
