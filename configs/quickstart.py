"""Quickstart: Mask R-CNN trained from scratch on the built-in shapes dataset, on a CPU.

  python -m maskrcnn_jax.train --config configs/quickstart.py --workdir workdir/quickstart

The built-in dataset (maskrcnn_jax/data/builtin.py: 5 shape classes on textured backgrounds,
128 px, 600 train / 100 val) is generated on first use. The model is a narrow ResNet-18-FPN
(BasicBlocks; detectron2's STEM_OUT_CHANNELS / RES2_OUT_CHANNELS knobs at 8 / 32, so stage outputs
32..256 channels), trainable BatchNorm in the backbone and FPN, GroupNorm in the mask head, a
2-FC box head of 256, 64 RoIs per image (at 128 px the RoI heads, not the backbone, dominate the
step) and AdamW with a linear warmup and cosine decay. From scratch, a shallow network learns this task much faster per
step than the 16-block ResNet-50 topology (docs/training.md, "Quickstart").

Measured on the 2-core CPU machine: docs/training.md, "Quickstart" (wall time, COCO AP).
"""
from maskrcnn_jax import config_lib


def get_config():
  config = config_lib.mask_rcnn(convention="detectron2", depth=18, style="pytorch",
                                pixel=config_lib.PYTORCH_RGB, schedule="1x",
                                upstream="quickstart")
  m = config.model
  # ResNet-18 topology, narrow: stem 8, stage outputs 32 / 64 / 128 / 256; trained from scratch.
  m.norm = "bn"
  m.freeze_at = 0
  m.stem_out_channels = 8
  m.res2_out_channels = 32
  m.fpn_channels = 64
  m.fpn_norm = "bn"
  m.box_head_num_conv = 0
  m.box_head_num_fc = 2
  m.box_head_fc_dim = 256
  m.mask_head_norm = "gn"  # per RoI: the few positives of a batch make noisy BN statistics
  m.mask_head_num_conv = 4
  m.mask_head_conv_dim = 64
  # The shapes' boxes are ~15-62 px at 128 px: anchors one octave smaller than COCO's.
  m.anchor_sizes = (16, 32, 64, 128, 256)
  m.rpn_pre_nms_topk_train = 500
  m.rpn_post_nms_topk_train = 200
  m.rpn_pre_nms_topk_test = 300
  m.rpn_post_nms_topk_test = 100
  m.detections_per_image = 20  # 1-5 shapes per image
  m.max_candidates = 500
  m.roi_align_max_grid = 2  # RoIs of <= 64 px on P2..P5: at most 2 samples per bin axis

  d = config.data
  d.builtin = dict(num_train=600, num_val=100, image_size=128, seed=0)
  d.train_short = (128,)
  d.train_short_mode = "choice"
  d.train_max_size = 128
  d.test_short = 128
  d.test_max_size = 128
  d.max_instances = 8
  d.gt_mask_size = 56

  s = config.schedule
  s.name = "quickstart"
  s.unit = "step"
  s.length = 1400  # batch 8: 18.7 epochs of the 600 training images
  s.steps = ()
  s.decay = "cosine"
  s.warmup_steps = 100
  s.warmup_ratio = 0.01
  s.scale_steps_with_batch = False

  o = config.optim
  o.name = "adamw"
  o.base_lr = 0.002
  o.base_batch = 16
  o.scale_lr = False
  o.weight_decay = 0.05
  o.weight_decay_norm = 0.0

  t = config.train
  t.global_batch = 8
  t.log_every = 20
  t.checkpoint_every = 500
  t.roi_batch_per_image = 64
  t.rpn_batch_per_image = 256
  return config
