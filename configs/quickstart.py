"""Quickstart: Mask R-CNN R-50-FPN trained from scratch on the built-in shapes dataset (CPU-sized).

  python -m maskrcnn_jax.train --config configs/quickstart.py --workdir workdir/quickstart

The built-in dataset (maskrcnn_jax/data/builtin.py: 5 shape classes on textured backgrounds,
128 px, 600 train / 100 val) is generated on first use. The model is the ResNet-50-FPN topology at
1/4 width (detectron2's STEM_OUT_CHANNELS / RES2_OUT_CHANNELS / WIDTH_PER_GROUP knobs; 2.8M
parameters instead of 44M), trainable BatchNorm in the backbone and FPN, GroupNorm in the mask
head, a 2-FC box head of 256, few RoIs per image (the RoI heads, not the backbone, dominate the
step at 128 px) and AdamW with warmup + cosine decay.

Measured (docs/training.md, "Quickstart"): 11 min 44 s wall-clock for the whole command on a
2-core CPU (dataset cached, machine shared with other jobs), final val bbox AP 29.0, segm AP 27.7.
Not yet the targeted segm AP 50: AP is still rising steeply when the schedule ends.
"""
from maskrcnn_jax import config_lib


def get_config():
  config = config_lib.mask_rcnn(convention="detectron2", depth=50, style="pytorch",
                                pixel=config_lib.PYTORCH_RGB, schedule="1x",
                                upstream="quickstart")
  m = config.model
  # ResNet-50 topology, narrow: stage widths 16/32/64/128, outputs 64/128/256/512.
  m.norm = "bn"
  m.freeze_at = 0
  m.stem_out_channels = 16
  m.res2_out_channels = 64
  m.width_per_group = 16
  m.fpn_channels = 64
  m.fpn_norm = "bn"
  m.box_head_num_conv = 0
  m.box_head_num_fc = 2
  m.box_head_fc_dim = 256
  # GroupNorm (per RoI) in the mask head: BN statistics there would include the zero rows of the
  # padded (non-positive) mask RoIs.
  m.mask_head_norm = "gn"
  m.mask_head_num_conv = 4
  m.mask_head_conv_dim = 64
  # Shapes are ~15-62 px boxes at 128 px.
  m.anchor_sizes = (16, 32, 64, 128, 256)
  m.rpn_pre_nms_topk_train = 500
  m.rpn_post_nms_topk_train = 200
  m.rpn_pre_nms_topk_test = 300
  m.rpn_post_nms_topk_test = 100
  m.detections_per_image = 20
  m.max_candidates = 500
  m.roi_align_max_grid = 2

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
  s.length = 2000  # batch 4: 13.3 epochs of the 600 training images
  s.steps = ()
  s.decay = "cosine"
  s.warmup_steps = 100
  s.warmup_ratio = 0.01
  s.scale_steps_with_batch = False

  o = config.optim
  o.name = "adamw"
  o.base_lr = 0.002
  o.base_batch = 4
  o.scale_lr = False
  o.b1 = 0.9
  o.b2 = 0.99
  o.weight_decay = 0.05
  o.weight_decay_norm = 0.0

  t = config.train
  t.global_batch = 4
  t.log_every = 50
  t.checkpoint_every = 1000
  t.roi_batch_per_image = 32
  t.rpn_batch_per_image = 256
  t.eval_every = 0
  return config
