"""Pieces shared by the configs: the original's recipe (SPEC §9) and the model sizes."""

import ml_collections

from dynrefer_jax import sharding

# SPEC §9: a parameter is trainable iff its path contains one of these.
ORIGINAL_TRAINABLE = ("cvem", "cem", "tag", "attr", "Qformer", "t5_proj")
# dynrefer_vicuna.py's rule: llm_proj in place of t5_proj (the LLM stays frozen).
ORIGINAL_TRAINABLE_LLM = ("cvem", "cem", "tag", "attr", "Qformer", "llm_proj")

AUTO = -1  # resolved at run time (e.g. vocabulary sizes from the tokenizer)


def full_model() -> ml_collections.ConfigDict:
  """The full-size DynRefer: EVA ViT-g/14, BLIP-2 Q-Former, EVA-CLIP text tower, FlanT5-XL."""
  return ml_collections.ConfigDict(dict(
      dtype="bfloat16",
      # Per-stage compute dtypes as the original evaluates (SPEC §1, §4, §12): the ViT in fp16,
      # RoI-Align / aligner / fusion / Q-Former in fp32, heads and T5 under bf16 autocast.
      # fp16 becomes bf16 off GPUs (models/dynrefer.stage_dtypes); "" = dtype.
      precision=dict(vit="float16", region="float32", heads="bfloat16", lm="bfloat16",
                     text="bfloat16"),
      num_views=3,
      fixed_ts=(),            # non-empty: always these t (ablations), else t=0 + random / pHash
      ln_vision_eps=1e-5,
      num_query_tokens=32,
      vit=dict(image_size=224, patch_size=14, width=1408, depth=39, num_heads=16, mlp_dim=6144,
               qkv_bias="qv", act="gelu", ln_eps=1e-6,
               # "auto": cuDNN's fused attention on GPUs that take it (layers.dot_product_attention)
               attention="auto"),
      roi=dict(output_size=16, sampling_ratio=2, aligned=False),
      aligner=dict(kind="dcnv4", groups=4),
      qformer=dict(num_layers=12, hidden=768, num_heads=12, mlp_dim=3072,
                   cross_attention_freq=2, dropout=0.1),
      head=dict(hidden=256, num_layers=2, num_heads=4, mlp_dim=1024, dropout=0.1),
      text=dict(vocab_size=49408, context_length=77, width=768, depth=12, num_heads=12,
                mlp_dim=3072, output_dim=1024, act="gelu", eot_token_id=None),
      lm=dict(vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_heads=32,
              num_encoder_layers=24, num_decoder_layers=24, dropout_rate=0.1),
      train_vision_encoder=False,
      train_text_encoder=False,
      recompute_text_tables=False,
      # rtc_prompt_prob: share of regions whose region-text training text is one of its true
      # class prompts / attribute templates instead of its caption (multi-positive labels).
      # 0 = the original (captions only); the synthetic world, with no pretrained text tower,
      # uses it in place of CLIP pretraining (the original's unused attr_pos_templates).
      # tag_regions: the ASL sum is per this many regions (the original's 64 per GPU, its
      # 8 GPUs' gradients averaged), whatever the global batch and the device count.
      loss=dict(lm=1.0, tag=0.01, rtc=0.5, siglip_stop_gradient=True, rtc_prompt_prob=0.0,
                tag_regions=64, asl=dict(gamma_neg=7.0, gamma_pos=0.0, clip=0.05)),
      generate=dict(num_beams=2, max_new_tokens=20, min_length=1, repetition_penalty=1.5,
                    length_penalty=0.0),
      tag_threshold=0.7,
      remat="none",           # per-block rematerialisation: none, full, dots, dots_no_batch
      # Repeated blocks (ViT, T5 stacks, Q-Former pairs, text tower) under lax.scan: XLA
      # reuses one block's buffers instead of keeping every unrolled block's live
      # (BENCHMARKS.md, memory plan).
      scan_layers=True,
  ))


def toy_model(vocab_size: int = AUTO) -> ml_collections.ConfigDict:
  """Every stage of DynRefer at a size that trains in seconds on a CPU."""
  m = full_model()
  m.dtype = "float32"
  m.precision = dict(vit="", region="", heads="", lm="", text="")  # all float32 (dtype)
  m.num_query_tokens = 8
  # Trained from scratch: 2-D sincos positions (EVA's 0.02 init leaves a bag of patches).
  m.vit = dict(image_size=32, patch_size=8, width=32, depth=2, num_heads=4, mlp_dim=64,
               qkv_bias="qv", act="gelu", ln_eps=1e-6, pos_init="sincos2d",
               attention="auto")
  m.roi = dict(output_size=4, sampling_ratio=2, aligned=False)
  # BERT's init std 0.02 suits width 768 (pretrained anyway); trained from scratch at width 32
  # it shrinks every residual branch ~10× per layer and the heads stall, so use width**-0.5.
  m.qformer = dict(num_layers=2, hidden=32, num_heads=4, mlp_dim=64, cross_attention_freq=2,
                   dropout=0.0, init_std=32 ** -0.5)
  m.head = dict(hidden=32, num_layers=1, num_heads=2, mlp_dim=64, dropout=0.0,
                init_std=32 ** -0.5)
  m.text = dict(vocab_size=vocab_size, context_length=24, width=32, depth=1, num_heads=2,
                mlp_dim=64, output_dim=32, act="gelu", eot_token_id=1)
  m.lm = dict(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_heads=4,
              num_encoder_layers=1, num_decoder_layers=2, dropout_rate=0.0)
  m.train_vision_encoder = True
  m.train_text_encoder = True
  m.recompute_text_tables = True
  m.generate = dict(num_beams=2, max_new_tokens=16, min_length=1, repetition_penalty=1.0,
                    length_penalty=0.0)
  m.tag_threshold = 0.5
  # scan_layers stays on (from full_model): on the 2-core CPU the smoke train step took the same
  # time both ways (medians 20.1 / 21.0 and 22.2 / 22.4 ms unrolled / scanned, within the noise),
  # losses equal to float32 round-off, and the toy runs then test the full-size code path.
  return m


def optim() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      lr=1e-4, min_lr=0.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05,
      no_decay_patterns=("bias", "ln", "bn"), schedule="per_epoch", epochs=5,
      warmup_steps=0, warmup_lr=-1.0, grad_clip_norm=0.0))


def sharding_config(mesh=None) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      mesh=mesh or dict(data=-1, fsdp=1, tensor=1),
      rules=[list(r) for r in sharding.DEFAULT_RULES],
      # FSDP for what the rules leave unsharded on 'fsdp': arrays of at least this many bytes
      # get their largest divisible dimension sharded over it (0 = rules only).
      fsdp_min_bytes=1 << 20))


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 42
  c.trainable = list(ORIGINAL_TRAINABLE)
  c.frozen_dtype = "bfloat16"
  c.optim = optim()
  c.train = dict(batch_size=512, steps=0, log_every=50, checkpoint_every=1000,
                 keep_checkpoints=3, async_checkpoint=True)
  c.sharding = sharding_config()
  # jax.distributed: '' / 0 / -1 = from $DYNREFER_COORDINATOR, $DYNREFER_NUM_PROCESSES,
  # $DYNREFER_PROCESS_ID (a set coordinator address alone enables it).
  c.distributed = dict(enabled=False, coordinator_address="", num_processes=0, process_id=-1)
  c.resume = ""
  c.model_init = ""
  return c


def real_data(train: str = "", splits: dict | None = None) -> ml_collections.ConfigDict:
  """config.data for the TFDS datasets tools/prepare_data.py builds (data/setup.REAL_DATA_FIELDS).

  Paths left empty are set on the command line: --config.data.dir (required), and the
  tokenizer / vocabulary files unless config.model_init is a converted checkpoint (its
  tokenizer/ and vocab.json are used then).
  """
  return ml_collections.ConfigDict(dict(
      name="prepared", dir="", train=train, splits=dict(splits or {}),
      tokenizer_dir="", text_tokenizer="clip", bpe_path="",
      tag_list="", max_tags=4585, ovad_annotations="", class_names="", fixture=False,
      # Views are cut on the device from windows of the full-resolution image
      # (views/windows.py): an image up to max(window_size, 1024) px is padded whole (COCO's,
      # Visual Genome's); a larger one gets a full-resolution window of that side around the
      # box and coarser levels.
      window_size=1024, caption_len=32, control_len=32, text_len=77,
      # Training control-word candidates: the tag sets and the caption's noun/adjective-led
      # phrases (SPEC §7c; data/control_words.py). False: the tag sets alone.
      control_phrases=True))


def smoke_real(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a full-size real-data config to 2 CPU steps on the tiny fixture (data/fixture.py)
  written under <workdir>/data: the toy model, the CLIP BPE text tokenizer, no user files."""
  c.model = toy_model()
  c.model.text.vocab_size = AUTO          # 49408 from the CLIP BPE
  c.model.text.eot_token_id = None        # CLIP pools at the EOT id (the largest)
  c.trainable = [".*"]
  c.frozen_dtype = ""
  c.model_init = ""
  c.data.dir = ""
  c.data.fixture = True
  c.data.window_size = 64
  c.data.caption_len = c.data.control_len = 16
  c.data.text_len = c.model.text.context_length
  c.train = dict(batch_size=8, steps=2, log_every=1, checkpoint_every=2, keep_checkpoints=1,
                 async_checkpoint=False)
  c.eval.batch_size = 8
  c.sharding = sharding_config()
  return c
