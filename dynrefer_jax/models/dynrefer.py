"""DynRefer: the composition of all stages (SPEC §0, §12).

    views (t=0 first) → ViT per view → ln_vision → RoI-Align → align context views to t=0
    → [CLS; tokens] per view → concat views on channels → fusion MLP → Q-Former (32 queries) → Z
    Z → tag decoder (ASL) | region–text decoder (SigLIP) | t5_proj + control words → T5 (LM loss)

The language model is config.model.lm.kind: "t5" (dynrefer_t5.py: FlanT5 encoder-decoder,
`t5_proj`, control embeddings + `cem_memory`) or "llama" (dynrefer_vicuna.py: a decoder-only
Llama-format LLM `llm_model` with `llm_proj`; the prefix [llm_proj(Z) ; control embeddings] is
followed by the caption, as InstructBLIP-Vicuna builds it; no `cem_memory`, which the Vicuna
variant creates but never reads).

Submodule names follow the original so that its trainable-name rule applies unchanged
(docs/ARCHITECTURE.md). Text-embedding tables (`clip_embeds` for tags, `att_embeds` for attribute
templates, `ov_embeds` for class prompts) are `Table`s computed from the text tower; with
`config.recompute_text_tables` they are recomputed from their token ids inside every step instead
(for a trainable text tower, as in the synthetic world).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from dynrefer_jax import losses, sharding
from dynrefer_jax.views import select as views
from dynrefer_jax.models import aligner as aligner_lib
from dynrefer_jax.models import eva_vit, fp8, fusion, heads, layers, qformer, roi_align
from dynrefer_jax.models import llama as llama_lib
from dynrefer_jax.models import t5 as t5_lib
from dynrefer_jax.models import text_tower


def _dtype(name: str | None):
  return None if name in (None, "", "none") else jnp.dtype(name)


# config.model.precision: the compute dtype of each stage ("" = config.model.dtype).
#   vit:    the ViT (and ln_vision's output);
#   region: RoI-Align, aligner, fusion MLP, Q-Former (Z);
#   heads:  the tag and region-text heads with their projections;
#   lm:     t5_proj / llm_proj and the language model;
#   text:   the text tower (caption embeddings, and the tag / attribute / class tables).
PRECISION_STAGES = ("vit", "region", "heads", "lm", "text")


def _platform() -> str:
  return jax.default_backend()


def stage_dtypes(config, platform: str | None = None) -> dict:
  """{stage: compute dtype or None (the input's)} from config.model.precision / dtype.

  float16 needs a GPU: on other platforms (TPU, CPU: no fast fp16 matmul) it becomes bfloat16,
  as the README states. platform: `_platform()` unless given."""
  platform = platform or _platform()
  precision = dict(config.get("precision", None) or {})
  unknown = sorted(set(precision) - set(PRECISION_STAGES))
  if unknown:
    raise ValueError(f"config.model.precision has unknown stage(s) {', '.join(unknown)} "
                     f"(stages: {', '.join(PRECISION_STAGES)})")
  out = {}
  for stage in PRECISION_STAGES:
    dtype = _dtype(precision.get(stage) or config.get("dtype"))
    if dtype == jnp.float16 and platform != "gpu":
      dtype = jnp.dtype(jnp.bfloat16)
    out[stage] = dtype
  return out


def _t(x):
  return None if x is None else x.T


def sample_rtc_texts(rng: jax.Array, text_ids: jax.Array, category: jax.Array,
                     attributes: jax.Array, class_ids: jax.Array, template_ids: jax.Array,
                     template_owner: jax.Array, prompt_prob: float,
                     class_share: float | None = None):
  """Region-text training texts with true prompts mixed in, and their multi-positive labels.

  Each region keeps its caption (text_ids int[B, L]) with probability 1 − prompt_prob; otherwise
  its text is one of its true prompts drawn uniformly: its class prompt (class_ids int[C, L],
  from category int[B], −1 = none) or a template of one of its positive attributes
  (template_ids int[T, L], owned by attribute template_owner int[T]; attributes int[B, A] with
  1 / 0 / −1 = ignore). A region without a true prompt keeps its caption. With `class_share`
  set, a region that uses a prompt takes its class prompt with that probability (when it has a
  category and a positive attribute; otherwise whichever kind it has) instead of uniformly.

  Returns (ids int[B, L], labels bool[B, B], weights float[B, B]) with region i in rows and text
  j in columns: a caption is positive for its own region only (the original's diagonal); a
  prompt is positive for every region it is true for, and weighs 0 where that region's label is
  unknown (attribute −1, or no category).
  """
  text_ids, category, attributes, class_ids, template_ids, template_owner = map(
      jnp.asarray, (text_ids, category, attributes, class_ids, template_ids, template_owner))
  b = text_ids.shape[0]
  num_classes = class_ids.shape[0]
  if class_ids.shape[1] != text_ids.shape[1] or template_ids.shape[1] != text_ids.shape[1]:
    raise ValueError(f"prompt tables of length {class_ids.shape[1]}/{template_ids.shape[1]} do "
                     f"not match text_ids of length {text_ids.shape[1]}")
  owner_attr = attributes[:, jnp.maximum(template_owner, 0)]                  # [B, T]
  owner_known = (template_owner >= 0)[None]
  class_pos = (category[:, None] == jnp.arange(num_classes)[None]) & (category[:, None] >= 0)
  truth = jnp.concatenate([class_pos, (owner_attr == 1) & owner_known], axis=1)   # [B, C+T]
  known = jnp.concatenate([jnp.broadcast_to(category[:, None] >= 0, class_pos.shape),
                           (owner_attr >= 0) & owner_known], axis=1)

  pick_rng, use_rng, kind_rng = jax.random.split(rng, 3)
  gumbel = jax.random.gumbel(pick_rng, truth.shape)
  if class_share is not None:
    # Two-stage draw: the class prompt with probability class_share, else an attribute template.
    has_class, has_attr = class_pos.any(axis=1), truth[:, num_classes:].any(axis=1)
    want_class = jax.random.uniform(kind_rng, (b,)) < class_share
    take_class = has_class & (want_class | ~has_attr)
    kind = jnp.concatenate([jnp.broadcast_to(take_class[:, None], class_pos.shape),
                            jnp.broadcast_to(~take_class[:, None], (b, truth.shape[1] - num_classes))],
                           axis=1)
    gumbel = jnp.where(kind, gumbel, gumbel - 1e9)   # the other kind only when this one is empty
  choice = jnp.argmax(jnp.where(truth, gumbel, -jnp.inf), axis=1)               # [B]
  use_prompt = (jax.random.uniform(use_rng, (b,)) < prompt_prob) & truth.any(axis=1)
  prompts = jnp.concatenate([class_ids, template_ids], axis=0)[choice]          # [B, L]
  ids = jnp.where(use_prompt[:, None], prompts, text_ids)

  eye = jnp.eye(b, dtype=bool)
  labels = jnp.where(use_prompt[None, :], truth[:, choice], eye)
  weights = jnp.where(use_prompt[None, :], known[:, choice], True).astype(jnp.float32)
  return ids, labels, weights


def _share(x: float) -> float | None:
  return None if x is None or x < 0 else float(x)


class DynRefer(nnx.Module):
  """The whole model. `config` is `config.model` of a configs/*.py file.

  text_token_ids: {"tags": int[K, L], "attributes": int[T, L], "classes": int[C, L]} — the
  tokenised tag strings, attribute templates and class prompts whose text-tower embeddings the
  heads score against.
  """

  def __init__(self, config: ml_collections.ConfigDict, text_token_ids: dict, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    self.dtypes = dt = stage_dtypes(c)
    vit = dict(c.vit)
    width = vit["width"]
    scan = bool(c.get("scan_layers", False))  # repeated blocks under lax.scan
    self.visual_encoder = eva_vit.VisionTransformer(**vit, scan_layers=scan, dtype=dt["vit"],
                                                    fp8=fp8.vit_enabled(c), rngs=rngs)
    self.ln_vision = layers.LayerNorm(width, eps=c.ln_vision_eps, rngs=rngs)
    if c.num_views > 1:
      # groups belongs to the DCNv4 aligner only; the paper's offset variant takes none.
      kw = {k: v for k, v in c.aligner.items()
            if k != "kind" and (c.aligner.kind == "dcnv4" or k != "groups")}
      self.cvem_align = aligner_lib.build_aligner(c.aligner.kind, channels=width, **kw,
                                                  rngs=rngs)
    self.cvem_mlp = fusion.FusionMLP(width, c.num_views, rngs=rngs, dtype=dt["region"],
                                     init=c.get("fusion_init", "torch"))
    q = c.qformer
    self.query_tokens = layers.param(rngs, layers.normal(q.get("init_std", 0.02)),
                                     (c.num_query_tokens, q.hidden),
                                     ("query", "embed"))
    self.Qformer = qformer.QFormer(  # pylint: disable=invalid-name
        **q, encoder_width=width, scan_layers=scan, dtype=dt["region"], rngs=rngs)

    h = c.head
    text_dim = c.text.output_dim
    head_kw = dict(hidden=h.hidden, num_layers=h.num_layers, num_heads=h.num_heads,
                   mlp_dim=h.mlp_dim, dropout=h.dropout, init_std=h.get("init_std", 0.02),
                   dtype=dt["heads"], rngs=rngs)
    dense = lambda i, o, axes=("embed", "mlp"), dtype=dt["heads"]: layers.Dense(
        i, o, rngs=rngs, axes=axes, dtype=dtype)
    self.tag_vision_proj = dense(q.hidden, h.hidden)
    self.tag_text_proj = dense(text_dim, h.hidden)
    self.tag_head = heads.CrossAttentionDecoder(**head_kw)
    self.tag_fc = dense(h.hidden, 1, ("embed", None))
    self.attr_vision_proj = dense(q.hidden, h.hidden)
    self.attr_text_proj = dense(text_dim, h.hidden)
    self.attr_head = heads.CrossAttentionDecoder(**head_kw)
    self.attr_fc = dense(h.hidden, 1, ("embed", None))
    # SigLIP's ln 10 / −10 (SPEC §7b), set for huge batches of pretrained features; a model
    # trained from scratch on a small batch may start the bias nearer its positive rate.
    self.attr_t = nnx.Param(jnp.asarray(c.loss.get("rtc_t_init", float(np.log(10.0))), jnp.float32),
                            out_sharding=())
    self.attr_b = nnx.Param(jnp.asarray(c.loss.get("rtc_b_init", -10.0), jnp.float32),
                            out_sharding=())

    self.text_encoder = text_tower.TextTransformer(**c.text, scan_layers=scan, dtype=dt["text"],
                                                   rngs=rngs)
    lm = c.lm.to_dict() if hasattr(c.lm, "to_dict") else dict(c.lm)
    self.lm_kind = lm.pop("kind", "t5")
    if self.lm_kind == "t5":
      self.t5_model = t5_lib.T5(**lm, scan_layers=scan, dtype=dt["lm"], rngs=rngs)
      self.t5_proj = dense(q.hidden, lm["d_model"], dtype=dt["lm"])
      self.cem_memory = nnx.Param(jnp.zeros((lm["d_model"],), jnp.float32),
                                  out_sharding=("embed",))
    elif self.lm_kind == "llama":
      self.llm_model = llama_lib.Llama(**lm, scan_layers=scan, dtype=dt["lm"], rngs=rngs)
      self.llm_proj = dense(q.hidden, lm["hidden_size"], dtype=dt["lm"])
    else:
      raise ValueError(f"config.model.lm.kind {self.lm_kind!r}: 't5' or 'llama'")

    ids = {k: jnp.asarray(v, jnp.int32) for k, v in text_token_ids.items()}
    # Which attribute each template scores (int[T]); -1 where unknown (only the synthetic
    # world's prompt texts for the region-text loss need it).
    self.att_template_owner = layers.Table(ids.get(
        "template_to_attribute", jnp.full((ids["attributes"].shape[0],), -1, jnp.int32)))
    self.tag_token_ids = layers.Table(ids["tags"])
    self.att_token_ids = layers.Table(ids["attributes"])
    self.ov_token_ids = layers.Table(ids["classes"])
    self.clip_embeds = layers.Table(self.text_encoder(ids["tags"]))
    self.att_embeds = layers.Table(self.text_encoder(ids["attributes"]))
    self.ov_embeds = layers.Table(self.text_encoder(ids["classes"]))

  # --- tables -------------------------------------------------------------------------------

  def text_tables(self) -> dict[str, jax.Array]:
    """float[K|T|C, text_dim] embeddings of the tag strings, attribute templates, class prompts."""
    if self.config.recompute_text_tables:
      return {"tags": self.text_encoder(self.tag_token_ids[...]),
              "attributes": self.text_encoder(self.att_token_ids[...]),
              "classes": self.text_encoder(self.ov_token_ids[...])}
    return {"tags": self.clip_embeds[...], "attributes": self.att_embeds[...],
            "classes": self.ov_embeds[...]}

  def refresh_tables(self) -> None:
    """Recomputes the stored tables from the current text tower (after loading weights)."""
    self.clip_embeds[...] = self.text_encoder(self.tag_token_ids[...])
    self.att_embeds[...] = self.text_encoder(self.att_token_ids[...])
    self.ov_embeds[...] = self.text_encoder(self.ov_token_ids[...])

  # --- the vision side ----------------------------------------------------------------------

  def encode_views(self, pixels: jax.Array, boxes: jax.Array, *, train: bool = False,
                   rngs: nnx.Rngs | None = None) -> jax.Array:
    """pixels float[B, V, S, S, 3] (normalised; t=0 first), boxes float[B, V, 4] (referent in
    each view's pixels) → the Q-Former's region tokens Z float[B, Q, D]."""
    c = self.config
    b, v, s = pixels.shape[:3]
    frozen_vit = not c.train_vision_encoder
    dt = self.dtypes
    x = pixels.astype(dt["vit"] or pixels.dtype).reshape((b * v,) + pixels.shape[2:])
    x = sharding.constrain(x, ("batch", None, None, None))      # region-major: region·V + view
    feats = self.visual_encoder(x, train=train, rngs=rngs)      # [B·V, 1+P, C]
    # ln_vision in float32, its output back in the ViT's dtype (LAVIS's LayerNorm), then in the
    # region stages' dtype (the original's evaluation casts the ViT output to float32).
    feats = self.ln_vision(feats.astype(jnp.float32)).astype(feats.dtype)
    feats = feats.astype(dt["region"] or feats.dtype)
    if frozen_vit:
      feats = jax.lax.stop_gradient(feats)
    cls, patches = feats[:, :1], feats[:, 1:]
    grid = int(round(patches.shape[1] ** 0.5))
    c_dim = feats.shape[-1]
    fmap = patches.reshape(b * v, grid, grid, c_dim)
    r = c.roi
    roi = roi_align.roi_align(fmap, boxes.reshape(b * v, 4), output_size=r.output_size,
                              spatial_scale=1.0 / c.vit.patch_size,
                              sampling_ratio=r.sampling_ratio, aligned=r.aligned)
    out = r.output_size
    roi = roi.reshape(b, v, out, out, c_dim)
    if v > 1:
      ref = jnp.broadcast_to(roi[:, :1], (b, v - 1, out, out, c_dim))
      ctx = roi[:, 1:]
      aligned = self.cvem_align(ctx.reshape(b * (v - 1), out, out, c_dim),
                                ref.reshape(b * (v - 1), out, out, c_dim))
      roi = jnp.concatenate([roi[:, :1], aligned.reshape(b, v - 1, out, out, c_dim)], axis=1)
    tokens = jnp.concatenate([cls.reshape(b, v, 1, c_dim),
                              roi.reshape(b, v, out * out, c_dim).astype(cls.dtype)], axis=2)
    tokens = tokens.transpose(0, 2, 1, 3).reshape(b, 1 + out * out, v * c_dim)  # views on channels
    enc = self.cvem_mlp(tokens)                                   # [B, L, C]
    enc = sharding.constrain(enc, ("batch", None, "embed"))
    queries = jnp.broadcast_to(self.query_tokens[...][None], (b,) + self.query_tokens.shape)
    z = self.Qformer(queries.astype(enc.dtype), enc, train=train, rngs=rngs)
    return sharding.constrain(z, ("batch", None, "embed"))

  # --- heads ----------------------------------------------------------------------------------

  def tag_logits(self, z: jax.Array, tables: dict, *, train=False, rngs=None) -> jax.Array:
    """Z float[B, Q, D] → float[B, K]."""
    text = self.tag_text_proj(tables["tags"].astype(z.dtype))
    return heads.pair_scores(self.tag_head, self.tag_fc, self.tag_vision_proj(z), text,
                             normalize=False, train=train, rngs=rngs)

  def region_text_scores(self, z: jax.Array, text_embeds: jax.Array, *, train=False,
                         rngs=None) -> jax.Array:
    """Raw cross-encoder scores float[B, T] of each region against each text embedding."""
    return heads.pair_scores(self.attr_head, self.attr_fc, self.attr_vision_proj(z),
                             self.attr_text_proj(text_embeds.astype(z.dtype)), normalize=True,
                             train=train, rngs=rngs)

  def region_text_loss(self, z: jax.Array, text: jax.Array, mask=None, labels=None,
                       weights=None, *, train=False, rngs=None) -> jax.Array:
    """The SigLIP loss (unweighted) of regions Z float[B, Q, D] against their texts' embeddings
    float[B, text_dim], both directions averaged; labels/weights as `sample_rtc_texts`.

    The original gathers the *projected* embeddings (attr_vision_proj / attr_text_proj outputs)
    across GPUs under no_grad (SPEC §7b, dynrefer_t5.py att_forward): in each direction only the
    local side carries gradient, and each projection, like everything before it, is trained only
    through the direction where it is local. stop_gradient after the projections reproduces
    that over the global batch (config.model.loss.siglip_stop_gradient).
    """
    sg = jax.lax.stop_gradient if self.config.loss.siglip_stop_gradient else (lambda x: x)
    scale, bias = jnp.exp(self.attr_t[...]), self.attr_b[...]
    vis = self.attr_vision_proj(z)                                              # [B, Q, H]
    txt = self.attr_text_proj(text.astype(z.dtype))                            # [B, H]
    pair = lambda v, t: heads.pair_scores(self.attr_head, self.attr_fc, v, t, normalize=True,
                                          train=train, rngs=rngs)
    s_t2i = pair(vis, sg(txt))      # regions in rows; the region side trains
    s_i2t = pair(sg(vis), txt)      # the text side trains; transposed below: texts in rows
    return 0.5 * (losses.siglip_loss(s_t2i * scale + bias, mask, labels, weights)
                  + losses.siglip_loss((s_i2t * scale + bias).T, mask, _t(labels), _t(weights)))

  @property
  def language_model(self) -> nnx.Module:
    """The LM: `t5_model` or `llm_model`; called as (inputs, mask, labels, label_mask)."""
    return self.t5_model if self.lm_kind == "t5" else self.llm_model

  def lm_inputs(self, z: jax.Array, control_ids: jax.Array, control_mask: jax.Array):
    """Z float[B, Q, D], control ids / mask [B, Lc] → (float[B, Q + Lc, d], bool[B, Q + Lc]):
    T5's encoder input (t5_proj(Z) ; control embeddings + cem_memory, SPEC §7c) or the Llama
    prefix (llm_proj(Z) ; control embeddings, dynrefer_vicuna.py's llm_forward)."""
    if self.lm_kind == "t5":
      projected = self.t5_proj(z)                                          # [B, Q, d]
      control = self.t5_model.embed(control_ids).astype(projected.dtype)   # [B, Lc, d]
      control = control + self.cem_memory[...].astype(projected.dtype)     # SPEC §7c
    else:
      projected = self.llm_proj(z)
      control = self.llm_model.embed(control_ids).astype(projected.dtype)
    mask = jnp.concatenate([jnp.ones(projected.shape[:2], bool), control_mask.astype(bool)], 1)
    return jnp.concatenate([projected, control], axis=1), mask

  # --- training -------------------------------------------------------------------------------

  def __call__(self, batch: dict, rng: jax.Array, *, train: bool = True):
    """One training forward. Returns (total loss, aux with each head's loss).

    batch: the docs/ARCHITECTURE.md batch; rng: the step's key (views, dropout).
    """
    c = self.config
    view_rng, drop_rng = jax.random.split(rng)
    rngs = nnx.Rngs(dropout=drop_rng) if train else None
    b = batch["box"].shape[0]
    ts = self.train_views(view_rng, b) if train else batch["ts"]
    pixels, vboxes = views.build_views(batch["image"], batch["image_hw"], batch["box"], ts,
                                       c.vit.image_size, window=batch.get("window"))
    z = self.encode_views(pixels, vboxes, train=train, rngs=rngs)
    mask = batch.get("mask")
    tables = self.text_tables()

    tag_logits = self.tag_logits(z, tables, train=train, rngs=rngs)
    # The original sums ASL over each GPU's regions (64) and DDP averages the 8 GPUs' gradients:
    # the sum over the global batch times tag_regions / (regions in it), for any batch size
    # and device count (config.model.loss.tag_regions).
    regions = b if mask is None else jnp.maximum(mask.astype(jnp.float32).sum(), 1.0)
    tag_loss = (losses.asymmetric_loss(tag_logits, batch["tags"], mask=mask, **c.loss.asl)
                * (c.loss.tag_regions / regions))

    text_ids, labels, weights = batch["text_ids"], None, None
    prompt_prob = c.loss.get("rtc_prompt_prob", 0.0)
    if train and prompt_prob > 0:
      text_ids, labels, weights = sample_rtc_texts(
          jax.random.fold_in(view_rng, 1), batch["text_ids"], batch["category"],
          batch["attributes"], self.ov_token_ids[...], self.att_token_ids[...],
          self.att_template_owner[...], prompt_prob, _share(c.loss.get("rtc_class_share", -1.0)))
    text = self.text_encoder(text_ids)
    if not c.train_text_encoder:
      text = jax.lax.stop_gradient(text)
    rtc_loss = self.region_text_loss(z, text, mask, labels, weights, train=train, rngs=rngs)

    enc_in, enc_mask = self.lm_inputs(z, batch["control_ids"], batch["control_mask"])
    lm_loss, _ = self.language_model(enc_in, enc_mask, batch["caption_ids"],
                                     batch["caption_mask"].astype(bool), train=train, rngs=rngs)
    w = c.loss
    total = w.lm * lm_loss + w.tag * tag_loss + w.rtc * rtc_loss
    return total, {"loss_lm": lm_loss, "loss_tag": tag_loss, "loss_rtc": rtc_loss}

  # --- inference ------------------------------------------------------------------------------

  def train_views(self, rng: jax.Array, batch_size: int) -> jax.Array:
    """float[B, V] training t values: t=0 then distinct random candidates, or fixed ts."""
    fixed = tuple(self.config.get("fixed_ts", ()) or ())
    if fixed:
      return jnp.broadcast_to(jnp.asarray(fixed, jnp.float32), (batch_size, len(fixed)))
    return views.sample_train_ts(rng, batch_size, self.config.num_views)

  def predict_heads(self, batch: dict, ts: jax.Array, template_to_attribute: np.ndarray) -> dict:
    """Everything but the caption, for batch rows viewed at ts float[B, V].

    Returns z float[B, Q, D] (for captioning), tag_scores float[B, K] (σ), attribute_scores
    float[B, A] (σ, max over each attribute's templates; SPEC §7b), class_scores float[B, C]
    (raw scores, no sigmoid, as the original's recognition).
    """
    c = self.config
    pixels, vboxes = views.build_views(batch["image"], batch["image_hw"], batch["box"], ts,
                                       c.vit.image_size, window=batch.get("window"))
    z = self.encode_views(pixels, vboxes)
    tables = self.text_tables()
    tag_scores = jax.nn.sigmoid(self.tag_logits(z, tables))
    templ = jax.nn.sigmoid(self.region_text_scores(z, tables["attributes"]))     # [B, T]
    attr = heads.max_over_templates(templ, template_to_attribute)
    classes = self.region_text_scores(z, tables["classes"])
    return {"z": z, "tag_scores": tag_scores, "attribute_scores": attr, "class_scores": classes}

  def caption(self, z: jax.Array, control_ids: jax.Array, control_mask: jax.Array,
              **generate_kw) -> tuple[jax.Array, jax.Array]:
    """Beam-search captions: (ids int[B, T], sequence scores float[B]). T5 decodes from its
    encoder's states; Llama continues the prefix (its KV cache), with no start token."""
    from dynrefer_jax.decode import beam_search  # pylint: disable=import-outside-toplevel
    enc_in, enc_mask = self.lm_inputs(z, control_ids, control_mask)
    if self.lm_kind == "llama":
      generate_kw = dict(generate_kw, decoder_start_token_id=None)
      return beam_search.generate(self.llm_model, enc_in, enc_mask, **generate_kw)
    enc = self.t5_model.encode(enc_in, enc_mask)
    return beam_search.generate(self.t5_model, enc, enc_mask, **generate_kw)
