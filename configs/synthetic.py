r"""DynRefer on the synthetic region world, trained and evaluated on a CPU.

  python -m dynrefer_jax.main --workdir workdirs/synthetic                      # the main job
  python -m dynrefer_jax.train --config configs/synthetic.py:smoke --workdir /tmp/smoke

Arguments: "" (the default main job), "smoke" (seconds; the test suite), "ablation" (the main
job trains and evaluates the four variants in turn and writes their table), "ablation:<variant>"
with variant in t0, t1, random2, phash3 (one of them; SPEC §14's ablation, same budget each).
Every part of DynRefer is present and, since nothing here is pretrained, trainable.
"""

from configs import common


def get_config(arg=None):
  arg = arg or ""
  c = common.base()
  c.seed = 0
  c.trainable = [".*"]           # nothing is pretrained in the synthetic world
  c.frozen_dtype = ""
  c.model = common.toy_model()
  c.model.vit.patch_size = 4     # an 8x8 patch grid per 32-px view: shapes need the detail
  # Trained from scratch, not from BLIP-2/EVA-CLIP, so three settings differ from the original:
  # - No pretrained text tower: 3/4 of the region-text training texts are true prompts (multi-
  #   positive SigLIP labels), standing in for CLIP pretraining so that zero-shot recognition
  #   and attribute scoring work as in the original; 60% of those are class prompts, the rest
  #   attribute templates. The region-text loss weighs 1.0 (0.5 in the original).
  # - The fusion MLP starts variance-preserving ("he"): PyTorch's default init leaves the fused
  #   tokens at ~0.1 scale, and the Q-Former output was then 0.3% region-dependent at init.
  # - SigLIP's bias starts at -2.5, not -10: scores fc(norm(.)) start within ±0.6, so with
  #   b = -10 and t = 10 every pair's logit is below -4 and negatives get no gradient.
  # With these, category accuracy on val goes 14% → 93% (see README, main job).
  c.model.loss.rtc_prompt_prob = 0.75
  c.model.loss.rtc_class_share = 0.6
  c.model.loss.rtc = 1.0
  c.model.loss.rtc_b_init = -2.5
  # The ASL sum per 32 regions (the original's: per 64, its per-GPU batch): the main job's
  # batch, so its tag loss is the sum over the batch it was tuned with.
  c.model.loss.tag_regions = 32
  c.model.fusion_init = "he"
  # ASL scores run high (γ_neg = 7 barely pushes negatives down), so σ > 0.5 keeps every tag;
  # the original's VG region-captioning threshold, 0.8 (SPEC §7a), keeps ~6 of ~7 true tags.
  c.model.tag_threshold = 0.8
  c.data = dict(name="synthetic", dir="", seed=0, image_size=96, window_size=96,
                num_images=dict(train=600, val=40, test=80, heldout=40),
                caption_len=16, control_len=16, text_len=16, control_phrases=True)
  c.optim.lr = 1e-3
  c.optim.weight_decay = 0.01
  c.optim.schedule = "per_step"
  c.optim.epochs = 1
  c.optim.warmup_steps = 50
  c.optim.warmup_lr = 0.0
  c.optim.grad_clip_norm = 1.0
  # 2,000 steps ≈ 17 epochs of the 3,818 training regions; a checkpoint every 500 steps, all
  # kept, for the report's metrics-over-training table.
  c.train = dict(batch_size=32, steps=2000, log_every=25, checkpoint_every=500,
                 keep_checkpoints=5, async_checkpoint=True)
  c.eval = dict(batch_size=64, view_selection="phash", splits=["test", "heldout"],
                # several regions per synthetic image: score each region on its own
                evaluators=dict(region_caption=dict(key="region_id")))

  if arg == "smoke":
    c.model.vit.patch_size = 8
    c.data.num_images = dict(train=8, val=4, test=4, heldout=4)
    c.data.image_size = 64
    c.data.window_size = 64
    c.train.batch_size = 8
    c.train.steps = 2
    c.train.log_every = 1
    c.train.checkpoint_every = 2
    c.optim.warmup_steps = 0
  elif arg == "ablation":
    # The main job runs each variant in turn (same budget) and writes the table.
    c.ablation_variants = ["t0", "t1", "random2", "phash3"]
  elif arg.startswith("ablation:"):
    variant = arg.partition(":")[2]
    if variant not in ("t0", "t1", "random2", "phash3"):
      raise ValueError(f"unknown ablation variant {variant!r}: t0, t1, random2 or phash3")
    c.ablation = variant
    c.model.num_views = {"t0": 1, "t1": 1, "random2": 2, "phash3": 3}[variant]
    c.model.fixed_ts = {"t0": (0.0,), "t1": (1.0,)}.get(variant, ())
    c.eval.view_selection = {"t0": "fixed", "t1": "fixed", "random2": "phash",
                             "phash3": "phash"}[variant]
    c.eval.splits = ["test"]
  elif arg:
    raise ValueError(f"unknown argument {arg!r}: '', 'smoke' or 'ablation:<variant>'")
  return c
