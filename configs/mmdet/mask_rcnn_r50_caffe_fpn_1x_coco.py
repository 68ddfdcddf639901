"""mmdetection v2.x `mask_rcnn_r50_caffe_fpn_1x_coco`: Mask R-CNN, COCO.

Upstream: mmdetection v2.x configs/mask_rcnn/mask_rcnn_r50_caffe_fpn_1x_coco.py.
ResNet-50-FPN, caffe style (stride in the 1x1 conv), FrozenBN; BGR input, mean (103.53, 116.28,
123.675), std 1.
Schedule 1x (12 epochs), single-scale (1333, 800).
Backbone initialised from open-mmlab://detectron2/resnet50_caffe (MSRA weights).
Test: short side 800, long side <= 1333, pad to 32, as for every mmdet row.
"""
from maskrcnn_jax import config_lib


def get_config():
  config = config_lib.mask_rcnn(
      convention="mmdet", depth=50, style="caffe", pixel=config_lib.CAFFE_BGR, schedule="1x",
      backbone_init="open-mmlab://detectron2/resnet50_caffe",
      upstream="mask_rcnn_r50_caffe_fpn_1x_coco")
  config.published = config_lib.published(
      box_ap=38.0, mask_ap=34.4,
      url="https://download.openmmlab.com/mmdetection/v2.0/mask_rcnn/mask_rcnn_r50_caffe_fpn_1x_coco/mask_rcnn_r50_caffe_fpn_1x_coco_bbox_mAP-0.38__segm_mAP-0.344_20200504_231812-0ebd1859.pth")  # noqa: E501
  return config
