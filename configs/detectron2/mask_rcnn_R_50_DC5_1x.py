"""detectron2 `COCO-InstanceSegmentation/mask_rcnn_R_50_DC5_1x`: Mask R-CNN, COCO.

Upstream: detectron2 configs/COCO-InstanceSegmentation/mask_rcnn_R_50_DC5_1x.yaml.
MODEL_ZOO.md row "R50-DC5 1x" (COCO Instance Segmentation Baselines with Mask R-CNN).
Base-RCNN-DilatedC5.yaml: ResNet with res5 dilated (dilation 2, stride 1 -> stride 16),
RPN on res5 with 15 anchors per location (sizes 32..512 x ratios 0.5, 1, 2), 2-FC box head
(7x7 RoIAlignV2 on res5) and 4-conv mask head (14x14 -> 28x28 masks). RPN top-k 6000 / 1000
at test time, 12000 / 2000 in training.
ResNet-50, caffe style (stride in the 1x1 conv), FrozenBN; BGR input, mean (103.53, 116.28,
123.675), std 1. ImageNet init: ImageNetPretrained/MSRA/R-50.pkl.
Schedule 1x: 90k iterations at batch 16 (~12 epochs).
The base yaml trains with MIN_SIZE_TRAIN (640, 672, 704, 736, 768, 800) sampled per image
('choice'); test 800/1333.
"""
from maskrcnn_jax import config_lib


def get_config():
  config = config_lib.mask_rcnn(
      convention="detectron2", depth=50, style="caffe", pixel=config_lib.CAFFE_BGR,
      schedule="1x", multiscale=True, arch="DC5",
      backbone_init="detectron2://ImageNetPretrained/MSRA/R-50.pkl",
      upstream="COCO-InstanceSegmentation/mask_rcnn_R_50_DC5_1x")
  config.data.train_short = (640, 672, 704, 736, 768, 800)  # INPUT.MIN_SIZE_TRAIN
  config.published = config_lib.published(
      box_ap=38.3, mask_ap=34.2,
      url="https://dl.fbaipublicfiles.com/detectron2/COCO-InstanceSegmentation/mask_rcnn_R_50_DC5_1x/137260150/model_final_4f86c3.pkl")  # noqa: E501
  return config
