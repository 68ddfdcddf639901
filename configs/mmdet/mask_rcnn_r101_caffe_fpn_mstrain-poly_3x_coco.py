"""mmdetection v2.x `mask_rcnn_r101_caffe_fpn_mstrain-poly_3x_coco`: Mask R-CNN, COCO.

Upstream: mmdetection v2.x configs/mask_rcnn/mask_rcnn_r101_caffe_fpn_mstrain-poly_3x_coco.py.
ResNet-101-FPN, caffe style (stride in the 1x1 conv), FrozenBN; BGR input, mean (103.53, 116.28,
123.675), std 1.
Schedule 3x (36 epochs), multi-scale training.
Built on configs/common/mstrain-poly_3x_coco_instance.py with the caffe img_norm_cfg and its
pipelines redefined (v2.x final version), backbone open-mmlab://detectron2/resnet101_caffe.
Test: short side 800, long side <= 1333, pad to 32, as for every mmdet row.
"""
from maskrcnn_jax import config_lib


def get_config():
  config = config_lib.mask_rcnn(
      convention="mmdet", depth=101, style="caffe", pixel=config_lib.CAFFE_BGR, schedule="3x",
      multiscale=True,
      backbone_init="open-mmlab://detectron2/resnet101_caffe",
      upstream="mask_rcnn_r101_caffe_fpn_mstrain-poly_3x_coco")
  config.published = config_lib.published(
      box_ap=42.9, mask_ap=38.5,
      url="https://download.openmmlab.com/mmdetection/v2.0/mask_rcnn/mask_rcnn_r101_caffe_fpn_mstrain-poly_3x_coco/mask_rcnn_r101_caffe_fpn_mstrain-poly_3x_coco_20210526_132339-3c33ce02.pth")  # noqa: E501
  return config
