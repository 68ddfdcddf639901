"""torchvision `maskrcnn_resnet50_fpn` with `MaskRCNN_ResNet50_FPN_Weights.COCO_V1`.

Upstream: torchvision/models/detection/mask_rcnn.py (builder and weights enum); recipe
references/detection/README.md "Mask R-CNN": 26 epochs, lr steps (16, 22), aspect-ratio grouping,
single-scale training at min_size 800 / max_size 1333.
ResNet-50-FPN, pytorch style (stride in the 3x3 conv). FrozenBatchNorm2d eps: 0.0 for these weights
(the builder calls overwrite_eps(model, 0.0) after loading them: they were trained before the eps
became 1e-5), 1e-5 for any other checkpoint of this architecture (e.g. trained from
`weights=None`); the converter decides it per file and records it (checkpoints/provenance.py). RGB input scaled to [0, 1], ImageNet mean/std, normalized before the resize.
91 class outputs with background first (index = COCO category id), hence num_classes = 90.
"""
from maskrcnn_jax import config_lib


def get_config():
  config = config_lib.mask_rcnn(
      convention="torchvision", depth=50, style="pytorch", pixel=config_lib.TORCHVISION_RGB01,
      schedule="26e", backbone_init="ResNet50_Weights.IMAGENET1K_V1",
      upstream="maskrcnn_resnet50_fpn")
  config.model.num_classes = 90  # 91 outputs, background first
  config.published = config_lib.published(
      box_ap=37.9, mask_ap=34.6,
      url="https://download.pytorch.org/models/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth")
  return config
