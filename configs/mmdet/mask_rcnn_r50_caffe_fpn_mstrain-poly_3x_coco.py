"""mmdetection v2.x `mask_rcnn_r50_caffe_fpn_mstrain-poly_3x_coco`: Mask R-CNN, COCO.

Upstream: mmdetection v2.x configs/mask_rcnn/mask_rcnn_r50_caffe_fpn_mstrain-poly_3x_coco.py.
ResNet-50-FPN, caffe style (stride in the 1x1 conv), FrozenBN; BGR input, mean (103.53, 116.28,
123.675), std 1.
Schedule 3x (36 epochs), multi-scale training.
Training: polygon masks, short side picked from six values (multiscale_mode='value').
Test: short side 800, long side <= 1333, pad to 32, as for every mmdet row.
"""
from maskrcnn_jax import config_lib


def get_config():
  config = config_lib.mask_rcnn(
      convention="mmdet", depth=50, style="caffe", pixel=config_lib.CAFFE_BGR, schedule="3x",
      multiscale=True,
      backbone_init="open-mmlab://detectron2/resnet50_caffe",
      upstream="mask_rcnn_r50_caffe_fpn_mstrain-poly_3x_coco")
  config.data.train_short = (640, 672, 704, 736, 768, 800)  # multiscale_mode='value'
  config.data.train_short_mode = "choice"
  config.published = config_lib.published(
      box_ap=40.8, mask_ap=37.0,
      url="https://download.openmmlab.com/mmdetection/v2.0/mask_rcnn/mask_rcnn_r50_caffe_fpn_mstrain-poly_3x_coco/mask_rcnn_r50_caffe_fpn_mstrain-poly_3x_coco_bbox_mAP-0.408__segm_mAP-0.37_20200504_163245-42aa3d00.pth")  # noqa: E501
  return config
