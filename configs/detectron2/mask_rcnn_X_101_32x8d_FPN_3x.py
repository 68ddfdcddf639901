"""detectron2 `COCO-InstanceSegmentation/mask_rcnn_X_101_32x8d_FPN_3x`: Mask R-CNN, COCO.

Upstream: detectron2 configs/COCO-InstanceSegmentation/mask_rcnn_X_101_32x8d_FPN_3x.yaml.
MODEL_ZOO.md row "X101-FPN 3x" (COCO Instance Segmentation Baselines with Mask R-CNN).
ResNeXt-101 32x8d-FPN, pytorch style (stride in the 3x3 conv), FrozenBN; BGR input, mean (103.53,
116.28, 123.675), std (57.375, 57.12, 58.395). ImageNet init:
ImageNetPretrained/FAIR/X-101-32x8d.pkl.
The yaml sets PIXEL_STD [57.375, 57.120, 58.395] and RESNETS.STRIDE_IN_1X1 False (a C2 model),
NUM_GROUPS 32, WIDTH_PER_GROUP 8; INPUT.FORMAT stays BGR.
Schedule 3x: 270k iterations at batch 16 (~37 epochs). Base-RCNN-FPN trains with MIN_SIZE_TRAIN
(640, 672, 704, 736, 768, 800) sampled per image ('choice'); test 800/1333.
"""
from maskrcnn_jax import config_lib


def get_config():
  config = config_lib.mask_rcnn(
      convention="detectron2", depth=101, groups=32, width_per_group=8, style="pytorch",
      pixel=config_lib.D2_FAIR_BGR, schedule="3x", multiscale=True,
      backbone_init="detectron2://ImageNetPretrained/FAIR/X-101-32x8d.pkl",
      upstream="COCO-InstanceSegmentation/mask_rcnn_X_101_32x8d_FPN_3x")
  config.data.train_short = (640, 672, 704, 736, 768, 800)  # INPUT.MIN_SIZE_TRAIN
  config.published = config_lib.published(
      box_ap=44.3, mask_ap=39.5,
      url="https://dl.fbaipublicfiles.com/detectron2/COCO-InstanceSegmentation/mask_rcnn_X_101_32x8d_FPN_3x/139653917/model_final_2d9806.pkl")  # noqa: E501
  return config
