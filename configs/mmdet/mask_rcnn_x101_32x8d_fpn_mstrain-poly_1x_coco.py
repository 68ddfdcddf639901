"""mmdetection v2.x `mask_rcnn_x101_32x8d_fpn_mstrain-poly_1x_coco`: Mask R-CNN, COCO.

Upstream: mmdetection v2.x configs/mask_rcnn/mask_rcnn_x101_32x8d_fpn_mstrain-poly_1x_coco.py.
ResNeXt-101 32x8d-FPN, pytorch style (stride in the 3x3 conv), FrozenBN; BGR input, mean (103.53,
116.28, 123.675), std (57.375, 57.12, 58.395).
Schedule 1x (12 epochs), multi-scale training.
Backbone from open-mmlab://detectron2/resnext101_32x8d, hence its BGR img_norm_cfg; style 'pytorch'.
Training: polygon masks, short side from six values (multiscale_mode='value').
Test: short side 800, long side <= 1333, pad to 32, as for every mmdet row.
"""
from maskrcnn_jax import config_lib


def get_config():
  config = config_lib.mask_rcnn(
      convention="mmdet", depth=101, groups=32, width_per_group=8, style="pytorch",
      pixel=config_lib.D2_FAIR_BGR, schedule="1x", multiscale=True,
      backbone_init="open-mmlab://detectron2/resnext101_32x8d",
      upstream="mask_rcnn_x101_32x8d_fpn_mstrain-poly_1x_coco")
  config.data.train_short = (640, 672, 704, 736, 768, 800)  # multiscale_mode='value'
  config.data.train_short_mode = "choice"
  config.published = config_lib.published(
      box_ap=43.4, mask_ap=39.0,
      url="https://download.openmmlab.com/mmdetection/v2.0/mask_rcnn/mask_rcnn_x101_32x8d_fpn_mstrain-poly_1x_coco/mask_rcnn_x101_32x8d_fpn_mstrain-poly_1x_coco_20220630_170346-b4637974.pth")  # noqa: E501
  return config
