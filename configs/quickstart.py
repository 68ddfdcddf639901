"""Quickstart: Mask R-CNN R-50-FPN trained from scratch on the built-in shapes dataset (CPU-sized).

  python -m maskrcnn_jax.train --config configs/quickstart.py --workdir /tmp/quickstart

Draft: being tuned.
"""
from maskrcnn_jax import config_lib


def get_config():
  config = config_lib.mask_rcnn(convention="detectron2", depth=50, style="pytorch",
                                pixel=config_lib.PYTORCH_RGB, schedule="1x",
                                upstream="quickstart")
  m = config.model
  m.norm = "bn"
  m.freeze_at = 0
  m.anchor_sizes = (16, 32, 64, 128, 256)
  m.rpn_pre_nms_topk_train = 1000
  m.rpn_post_nms_topk_train = 500
  m.rpn_pre_nms_topk_test = 500
  m.rpn_post_nms_topk_test = 200
  m.detections_per_image = 20
  m.max_candidates = 1000
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
  s.length = 200
  s.steps = ()
  s.decay = "cosine"
  s.warmup_steps = 50
  s.warmup_ratio = 0.1
  s.scale_steps_with_batch = False

  o = config.optim
  o.base_lr = 0.04
  o.base_batch = 16
  o.weight_decay_norm = 0.0

  t = config.train
  t.global_batch = 8
  t.log_every = 10
  t.checkpoint_every = 100
  t.roi_batch_per_image = 32
  t.rpn_batch_per_image = 256
  return config
