"""mmdetection v2.x `mask_rcnn_r50_fpn_fp16_1x_coco`: Mask R-CNN, COCO.

Upstream: mmdetection v2.x configs/mask_rcnn/mask_rcnn_r50_fpn_fp16_1x_coco.py.
ResNet-50-FPN, pytorch style (stride in the 3x3 conv), FrozenBN; RGB input, mean (123.675, 116.28,
103.53), std (58.395, 57.12, 57.375).
Schedule 1x (12 epochs), single-scale (1333, 800).
Same model as mask_rcnn_r50_fpn_1x_coco, trained with mixed precision (`fp16 =
dict(loss_scale=512.)`): here `model.dtype = 'float16'` (float32 master weights, float16 compute)
with the same static loss scale 512 (`train.loss_scale`; overflowing steps are skipped, as mmcv's
Fp16OptimizerHook does; `--config.train.loss_scale=dynamic` for GradScaler's dynamic rule;
training/loss_scale.py). Evaluation and conversion ignore model.dtype (float32). The checkpoint
lives under the v2.0/fp16/ prefix (the row was first published in configs/fp16/README.md). Trained in Feb 2020 with the pre-torch-1.6 mmcv
fp16 path (model.half()), so the file may hold float16 tensors, which the converter casts to
float32.
Test: short side 800, long side <= 1333, pad to 32, as for every mmdet row.
"""
from maskrcnn_jax import config_lib


def get_config():
  config = config_lib.mask_rcnn(
      convention="mmdet", depth=50, style="pytorch", pixel=config_lib.PYTORCH_RGB, schedule="1x",
      backbone_init="torchvision://resnet50",
      upstream="mask_rcnn_r50_fpn_fp16_1x_coco")
  config.model.dtype = "float16"
  config.train.loss_scale = "512."  # mmdet: fp16 = dict(loss_scale=512.)
  config.published = config_lib.published(
      box_ap=38.1, mask_ap=34.7,
      url="https://download.openmmlab.com/mmdetection/v2.0/fp16/mask_rcnn_r50_fpn_fp16_1x_coco/mask_rcnn_r50_fpn_fp16_1x_coco_20200205-59faf7e4.pth")  # noqa: E501
  return config
