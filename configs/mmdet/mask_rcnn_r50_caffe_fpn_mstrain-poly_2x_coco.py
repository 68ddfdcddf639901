"""mmdetection v2.x `mask_rcnn_r50_caffe_fpn_mstrain-poly_2x_coco`: Mask R-CNN, COCO.

Upstream: mmdetection v2.x configs/mask_rcnn/mask_rcnn_r50_caffe_fpn_mstrain-poly_2x_coco.py.
ResNet-50-FPN, caffe style (stride in the 1x1 conv), FrozenBN; BGR input, mean (103.53, 116.28,
123.675), std 1.
Schedule 2x (24 epochs), multi-scale training.
Training: polygon masks, short side picked from six values (multiscale_mode='value').
Test: short side 800, long side <= 1333, pad to 32, as for every mmdet row.
"""
from maskrcnn_jax import config_lib


def get_config():
  config = config_lib.mask_rcnn(
      convention="mmdet", depth=50, style="caffe", pixel=config_lib.CAFFE_BGR, schedule="2x",
      multiscale=True,
      backbone_init="open-mmlab://detectron2/resnet50_caffe",
      upstream="mask_rcnn_r50_caffe_fpn_mstrain-poly_2x_coco")
  config.data.train_short = (640, 672, 704, 736, 768, 800)  # multiscale_mode='value'
  config.data.train_short_mode = "choice"
  config.published = config_lib.published(
      box_ap=40.3, mask_ap=36.5,
      url="https://download.openmmlab.com/mmdetection/v2.0/mask_rcnn/mask_rcnn_r50_caffe_fpn_mstrain-poly_2x_coco/mask_rcnn_r50_caffe_fpn_mstrain-poly_2x_coco_bbox_mAP-0.403__segm_mAP-0.365_20200504_231822-a75c98ce.pth")  # noqa: E501
  return config
