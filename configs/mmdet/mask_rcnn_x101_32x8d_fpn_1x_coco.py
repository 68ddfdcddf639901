"""mmdetection v2.x `mask_rcnn_x101_32x8d_fpn_1x_coco`: Mask R-CNN, COCO.

Upstream: mmdetection v2.x configs/mask_rcnn/mask_rcnn_x101_32x8d_fpn_1x_coco.py.
ResNeXt-101 32x8d-FPN, pytorch style (stride in the 3x3 conv), FrozenBN; BGR input, mean (103.53,
116.28, 123.675), std (57.375, 57.12, 58.395).
Schedule 1x (12 epochs), single-scale (1333, 800).
Backbone from open-mmlab://detectron2/resnext101_32x8d (the FAIR/C2 X-101-32x8d), hence its
img_norm_cfg (to_rgb=False, the std above) while the style stays 'pytorch'.
Test: short side 800, long side <= 1333, pad to 32, as for every mmdet row.
"""
from maskrcnn_jax import config_lib


def get_config():
  config = config_lib.mask_rcnn(
      convention="mmdet", depth=101, groups=32, width_per_group=8, style="pytorch",
      pixel=config_lib.D2_FAIR_BGR, schedule="1x",
      backbone_init="open-mmlab://detectron2/resnext101_32x8d",
      upstream="mask_rcnn_x101_32x8d_fpn_1x_coco")
  config.published = config_lib.published(
      box_ap=42.8, mask_ap=38.3,
      url="https://download.openmmlab.com/mmdetection/v2.0/mask_rcnn/mask_rcnn_x101_32x8d_fpn_1x_coco/mask_rcnn_x101_32x8d_fpn_1x_coco_20220630_173841-0aaf329e.pth")  # noqa: E501
  return config
