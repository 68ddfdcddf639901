"""detectron2 `COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x`: Mask R-CNN, COCO.

Upstream: detectron2 configs/COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml.
MODEL_ZOO.md row "R101-FPN 3x" (COCO Instance Segmentation Baselines with Mask R-CNN).
ResNet-101-FPN, caffe style (stride in the 1x1 conv), FrozenBN; BGR input, mean (103.53, 116.28,
123.675), std 1. ImageNet init: ImageNetPretrained/MSRA/R-101.pkl.
MSRA weights: detectron2 defaults PIXEL_STD [1, 1, 1] and STRIDE_IN_1X1 True.
Schedule 3x: 270k iterations at batch 16 (~37 epochs). Base-RCNN-FPN trains with MIN_SIZE_TRAIN
(640, 672, 704, 736, 768, 800) sampled per image ('choice'); test 800/1333.
"""
from maskrcnn_jax import config_lib


def get_config():
  config = config_lib.mask_rcnn(
      convention="detectron2", depth=101, style="caffe", pixel=config_lib.CAFFE_BGR, schedule="3x",
      multiscale=True,
      backbone_init="detectron2://ImageNetPretrained/MSRA/R-101.pkl",
      upstream="COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x")
  config.data.train_short = (640, 672, 704, 736, 768, 800)  # INPUT.MIN_SIZE_TRAIN
  config.published = config_lib.published(
      box_ap=42.9, mask_ap=38.6,
      url="https://dl.fbaipublicfiles.com/detectron2/COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x/138205316/model_final_a3ec72.pkl")  # noqa: E501
  return config
