"""mmdetection v2.x `ms_rcnn_r101_caffe_fpn_1x_coco`: Mask Scoring R-CNN, COCO.

Upstream: mmdetection v2.x configs/ms_rcnn/ms_rcnn_r101_caffe_fpn_1x_coco.py.
Mask Scoring R-CNN: the Mask R-CNN recipe plus the MaskIoU head (4 convs, 2 fc, 14x14 RoIs) whose
predicted mask IoU rescales each detection's mask score.
ResNet-101-FPN, caffe style (stride in the 1x1 conv), FrozenBN; BGR input, mean (103.53, 116.28,
123.675), std 1.
Schedule 1x (12 epochs), single-scale (1333, 800).
Base: ms_rcnn_r50_caffe_fpn_1x_coco with depth 101.
"""
from maskrcnn_jax import config_lib


def get_config():
  config = config_lib.mask_rcnn(
      convention="mmdet", depth=101, style="caffe", pixel=config_lib.CAFFE_BGR, mask_scoring=True,
      schedule="1x",
      backbone_init="open-mmlab://detectron2/resnet101_caffe",
      upstream="ms_rcnn_r101_caffe_fpn_1x_coco")
  config.published = config_lib.published(
      box_ap=40.4, mask_ap=37.6,
      url="https://download.openmmlab.com/mmdetection/v2.0/ms_rcnn/ms_rcnn_r101_caffe_fpn_1x_coco/ms_rcnn_r101_caffe_fpn_1x_coco_bbox_mAP-0.404__segm_mAP-0.376_20200506_004755-b9b12a37.pth")  # noqa: E501
  return config
