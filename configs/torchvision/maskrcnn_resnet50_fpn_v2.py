"""torchvision `maskrcnn_resnet50_fpn_v2` with `MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1`.

Upstream: torchvision/models/detection/mask_rcnn.py; recipe pytorch/vision PR 5773 (the weights'
"recipe" link): 400 epochs, lr steps (352, 384), SyncBN, large-scale-jitter augmentation ("lsj"),
which this config's data fields do not describe (schedule "400e" is a record only).
The "v2" architecture (Li et al., "Benchmarking Detection Transfer Learning with Vision
Transformers"): BatchNorm in the FPN, 2 RPN convs, 4conv1fc box head with BN, mask head convs with
BN; backbone BN is not frozen in training, so eval-mode BN keeps the default eps 1e-5 (no
overwrite_eps for these weights). ResNet-50 pytorch style; RGB in [0, 1], ImageNet mean/std.
91 class outputs with background first, hence num_classes = 90.
Trained from scratch: PR 5773's command passes no --weights-backbone, so torchvision builds an
untrained ResNet-50 with nn.BatchNorm2d and all 5 stages trainable (`_validate_trainable_layers`
without weights), converted to SyncBatchNorm by --sync-bn. Hence no backbone_init, trainable BN
(global batch statistics) and freeze_at 0; at inference BN uses its running statistics, as
frozen BN would.
"""
from maskrcnn_jax import config_lib


def get_config():
  config = config_lib.mask_rcnn(
      convention="torchvision", depth=50, style="pytorch", pixel=config_lib.TORCHVISION_RGB01,
      torchvision_v2=True, schedule="400e", backbone_init="",
      upstream="maskrcnn_resnet50_fpn_v2")
  config.model.num_classes = 90  # 91 outputs, background first
  config.model.norm, config.model.freeze_at = "bn", 0  # from scratch with SyncBN, all stages
  config.published = config_lib.published(
      box_ap=47.4, mask_ap=41.8,
      url="https://download.pytorch.org/models/maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth")
  return config
