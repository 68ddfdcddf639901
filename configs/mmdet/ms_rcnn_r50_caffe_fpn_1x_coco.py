"""mmdetection v2.x `ms_rcnn_r50_caffe_fpn_1x_coco`: Mask Scoring R-CNN, COCO.

Upstream: mmdetection v2.x configs/ms_rcnn/ms_rcnn_r50_caffe_fpn_1x_coco.py.
Mask Scoring R-CNN: the Mask R-CNN recipe plus the MaskIoU head (4 convs, 2 fc, 14x14 RoIs) whose
predicted mask IoU rescales each detection's mask score.
ResNet-50-FPN, caffe style (stride in the 1x1 conv), FrozenBN; BGR input, mean (103.53, 116.28,
123.675), std 1.
Schedule 1x (12 epochs), single-scale (1333, 800).
Base: mask_rcnn_r50_caffe_fpn_1x_coco.
"""
from maskrcnn_jax import config_lib


def get_config():
  config = config_lib.mask_rcnn(
      convention="mmdet", depth=50, style="caffe", pixel=config_lib.CAFFE_BGR, mask_scoring=True,
      schedule="1x",
      backbone_init="open-mmlab://detectron2/resnet50_caffe",
      upstream="ms_rcnn_r50_caffe_fpn_1x_coco")
  config.published = config_lib.published(
      box_ap=38.2, mask_ap=36.0,
      url="https://download.openmmlab.com/mmdetection/v2.0/ms_rcnn/ms_rcnn_r50_caffe_fpn_1x_coco/ms_rcnn_r50_caffe_fpn_1x_coco_20200702_180848-61c9355e.pth")  # noqa: E501
  return config
