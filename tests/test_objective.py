"""The whole training objective, `DynRefer.__call__`, against an independent PyTorch
transcription of the original's forward loss (callsys/DynRefer `dynrefer_t5.py`
`DynReferT5.forward`: `cvem_forward` → `Qformer.bert` → `tag_forward` + `att_forward` +
`llm_forward`), on the same toy weights (PyTorch modules under the original's names, converted
by our converters) and the same batch: each head's loss within 1e-5 relative and the gradient of
every trainable parameter (the original's name rule: cvem, cem, tag, attr, Qformer, t5_proj)
within 1e-4 relative.

The transcription runs as one rank of the original's DDP job with B regions: LAVIS
`concat_all_gather` (no_grad) returns a detached copy, the SigLIP labels are +1 on the
diagonal, the tag loss is the ASL sum over the rank's B regions × 0.01 (so our
`loss.tag_regions` is B here), the LM loss T5's token mean. Dropout is off on both sides;
views are fixed (our `build_views` cuts the same pixels for both, tested in test_crop_resize).
Building blocks reused as references: transformers' Blip2VisionModel / Blip2QFormerModel /
T5ForConditionalGeneration, the RoI-Align and DCNv4 references of test_roi_align /
torch_references, and torch_references.EvaText.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from configs import common as configs_common
from dynrefer_jax import functional
from dynrefer_jax.convert.common import convert, expected_shapes
from dynrefer_jax.convert.aligner import convert_cvem
from dynrefer_jax.convert.dynrefer import DYNREFER_OWNED, HEAD_RULES, lm_rules
from dynrefer_jax.convert.qformer import convert_qformer_hf
from dynrefer_jax.convert.text_tower import convert_eva_clip_text
from dynrefer_jax.views import select as views

import test_dynrefer_parity as parity
from test_roi_align import torch_roi_align
from torch_references import EvaText, deformable_align

B, V = parity.B, parity.V
VOCAB = parity.VOCAB
K = 5                     # tags
TS = (0.0, 0.4, 0.8)      # fixed views
LOSS_TOL, GRAD_TOL = 1e-5, 1e-4


def _config():
  cfg = configs_common.toy_model(VOCAB)
  cfg.train_vision_encoder = False       # the original's frozen towers
  cfg.train_text_encoder = False
  cfg.recompute_text_tables = False      # tables computed once, as the original's clip_embeds
  cfg.text.eot_token_id = None           # CLIP pooling at the largest id (EvaText's argmax)
  cfg.head.num_layers = 2                # the original's 2 cross-attention layers
  cfg.fixed_ts = TS
  # The original's loss (configs/common.full_model), as one rank of B regions.
  cfg.loss = dict(lm=1.0, tag=0.01, rtc=0.5, siglip_stop_gradient=True, rtc_prompt_prob=0.0,
                  tag_regions=B, asl=dict(gamma_neg=7.0, gamma_pos=0.0, clip=0.05))
  return cfg


def _bert_tagging(p, name, hidden, memory, num_layers, num_heads):
  """RAM's BertModel in mode 'tagging' with `.attention` deleted (the original's tag_head /
  attr_head): per layer, cross-attention of `hidden` over `memory` (BertSelfAttention +
  BertSelfOutput: dense, LayerNorm(x + input)), then intermediate (dense, GELU) and output
  (dense, LayerNorm(x + attention output)); encoder_attention_mask all ones; eps 1e-12."""
  lin = lambda x, key: F.linear(x, p[f"{key}.weight"], p[f"{key}.bias"])
  ln = lambda x, key: F.layer_norm(x, x.shape[-1:], p[f"{key}.weight"], p[f"{key}.bias"],
                                   eps=1e-12)
  for i in range(num_layers):
    pre = f"{name}.encoder.layer.{i}."
    n, k, d = hidden.shape
    hd = d // num_heads
    heads = lambda x: x.view(n, x.shape[1], num_heads, hd).permute(0, 2, 1, 3)
    q = heads(lin(hidden, pre + "crossattention.self.query"))
    kk = heads(lin(memory, pre + "crossattention.self.key"))
    v = heads(lin(memory, pre + "crossattention.self.value"))
    probs = torch.softmax(q @ kk.transpose(-1, -2) / math.sqrt(hd), dim=-1)
    ctx = (probs @ v).permute(0, 2, 1, 3).reshape(n, k, d)
    attn = ln(lin(ctx, pre + "crossattention.output.dense") + hidden,
              pre + "crossattention.output.LayerNorm")
    inter = F.gelu(lin(attn, pre + "intermediate.dense"))
    hidden = ln(lin(inter, pre + "output.dense") + attn, pre + "output.LayerNorm")
  return hidden


def _asymmetric_loss(x, y, gamma_neg=7, gamma_pos=0, clip=0.05, eps=1e-8):
  """The AsymmetricLoss the original uses (RAM / ASL, disable_torch_grad_focal_loss)."""
  xs_pos = torch.sigmoid(x)
  xs_neg = (1 - xs_pos + clip).clamp(max=1)
  loss = y * torch.log(xs_pos.clamp(min=eps)) + (1 - y) * torch.log(xs_neg.clamp(min=eps))
  with torch.no_grad():
    pt = xs_pos * y + xs_neg * (1 - y)
    w = torch.pow(1 - pt, gamma_pos * y + gamma_neg * (1 - y))
  return -(loss * w).sum()


def original_forward(t, cfg, batch):
  """DynReferT5.forward as the original computes it, one rank; returns (loss_llm, loss_tag,
  loss_att), each already weighted (tag × 0.01, att × 0.5), as its output dict."""
  p = t["p"]
  c, s, patch = cfg.vit.width, cfg.vit.image_size, cfg.vit.patch_size
  o, nh = cfg.roi.output_size, cfg.head.num_heads
  nl = cfg.head.num_layers
  lin = lambda x, key: F.linear(x, p[f"{key}.weight"], p[f"{key}.bias"])
  # forward(): cascade_region_images [ns, nv, 3, h, w] → [ns·nv, 3, h, w]; frozen ViT, ln_vision
  image = torch.from_numpy(np.array(batch["pixels"])).reshape(B * V, s, s, 3).permute(0, 3, 1, 2)
  with torch.no_grad():
    hidden = t["vit"](image, output_hidden_states=True).hidden_states[-1]
    post = t["vit"].post_layernorm
    embeds = F.layer_norm(hidden, (c,), post.weight, post.bias, eps=cfg.ln_vision_eps)
  # cvem_forward → roi_align(embeds, cascade_region_bboxes.reshape(-1, 4))
  spatio, cls = embeds[:, 1:], embeds[:, 0][:, None]
  b, hw, _ = spatio.shape
  ns, h = b // V, int(math.sqrt(hw))
  spatio = spatio.reshape(b, h, h, c).permute(0, 3, 1, 2)
  rois = torch_roi_align(spatio, batch["vboxes"].reshape(-1, 4), o, 1.0 / patch, 2, False)
  rois = rois.reshape(ns, V, c, o, o).permute(1, 0, 2, 3, 4)      # (s v) → v s
  target = rois[1:].reshape(-1, c, o, o)
  source = rois[0:1].repeat(V - 1, 1, 1, 1, 1).reshape(-1, c, o, o)
  # cvem_align(source=ref, target=input): CustomDCNv4, channels-last in the reference
  dcn = {k[len("cvem_align."):]: v for k, v in p.items() if k.startswith("cvem_align.")}
  target = deformable_align(dcn, target.permute(0, 2, 3, 1), source.permute(0, 2, 3, 1),
                            cfg.aligner.groups)[0].permute(0, 3, 1, 2)
  rois = torch.cat([rois[0], target], dim=0)                        # (v s)
  rois = rois.reshape(V, ns, c, o, o).permute(1, 0, 2, 3, 4).reshape(ns * V, c, o, o)
  rois_seq = rois.permute(0, 2, 3, 1).reshape(ns * V, -1, c)
  rois_embeds = torch.cat([cls, rois_seq], 1)                       # [(s v), 1 + o², c]
  visual = rois_embeds.reshape(ns, V, 1 + o * o, c).permute(0, 2, 1, 3).reshape(ns, 1 + o * o,
                                                                                 V * c)
  visual = lin(F.relu(lin(visual, "cvem_mlp.0")), "cvem_mlp.2")
  z = t["qformer"](query_embeds=t["query_tokens"].expand(ns, -1, -1),
                   encoder_hidden_states=visual).last_hidden_state

  # tag_forward
  tag_vision = lin(z, "tag_vision_proj")
  tag_text = lin(p["clip_embeds"], "tag_text_proj").unsqueeze(0).repeat(ns, 1, 1)
  tag_logits = lin(_bert_tagging(p, "tag_head", tag_text, tag_vision, nl, nh),
                   "tag_fc").squeeze(-1)
  tags = torch.from_numpy(batch["tags2"]).long()
  tags = (tags[:, :K] + tags[:, K:]).clip(max=1, min=0)
  loss_tag = _asymmetric_loss(tag_logits, tags) * 0.01

  # att_forward; concat_all_gather runs under no_grad: a detached copy on one rank
  att_vision = lin(z, "attr_vision_proj")
  with torch.no_grad():
    caption_embeds = t["text"](torch.from_numpy(batch["text_ids"]).long())
  att_text = lin(caption_embeds, "attr_text_proj")
  att_vision_all, att_text_all = att_vision.detach(), att_text.detach()
  sim_i2t = _bert_tagging(p, "attr_head", att_text.unsqueeze(0).repeat(len(att_vision_all), 1, 1),
                          att_vision_all, nl, nh)
  sim_i2t = lin(F.normalize(sim_i2t, dim=-1), "attr_fc").squeeze(-1).permute(1, 0)
  sim_t2i = _bert_tagging(p, "attr_head", att_text_all.unsqueeze(0).repeat(len(att_vision), 1, 1),
                          att_vision, nl, nh)
  sim_t2i = lin(F.normalize(sim_t2i, dim=-1), "attr_fc").squeeze(-1)
  labels = 2 * torch.eye(ns) - 1
  pad_labels = -torch.ones_like(sim_i2t)
  pad_labels[:, 0:ns] = labels                                      # rank 0
  logits_i2t = sim_i2t * p["attr_t"].exp() + p["attr_b"]
  loss_i2t = -torch.sum(F.logsigmoid(pad_labels * logits_i2t)) / ns
  logits_t2i = sim_t2i * p["attr_t"].exp() + p["attr_b"]
  loss_t2i = -torch.sum(F.logsigmoid(pad_labels * logits_t2i)) / ns
  loss_att = (loss_i2t + loss_t2i) / 2 * 0.5

  # llm_forward
  control = torch.from_numpy(batch["control_ids"]).long()
  control_mask = torch.from_numpy(batch["control_mask"].astype(np.int64))
  control_embeds = t["t5"].encoder.embed_tokens(control) + p["cem_memory"]
  inputs_t5 = lin(z, "t5_proj")
  atts_t5 = torch.ones(inputs_t5.shape[:-1], dtype=torch.long)
  caption = torch.from_numpy(batch["caption_ids"]).long()
  caption_mask = torch.from_numpy(batch["caption_mask"].astype(np.int64))
  targets = caption.masked_fill(caption_mask == 0, -100)
  loss_llm = t["t5"](inputs_embeds=torch.cat([inputs_t5, control_embeds], 1),
                     attention_mask=torch.cat([atts_t5, control_mask], 1),
                     decoder_attention_mask=caption_mask, labels=targets).loss
  return loss_llm, loss_tag, loss_att


def _batch(cfg):
  rng = np.random.default_rng(5)
  size = 48
  image = rng.integers(0, 256, (B, size, size, 3)).astype(np.uint8)
  image_hw = np.array([[48, 48], [40, 44], [36, 48]], np.int32)
  box = np.array([[4, 6, 30, 40], [10, 3, 20, 15], [0, 0, 47, 35]], np.float32)
  ts = np.broadcast_to(np.asarray(TS, np.float32), (B, V))
  pixels, vboxes = jax.jit(views.build_views, static_argnums=4)(image, image_hw, box, ts,
                                                                cfg.vit.image_size)
  tags2 = np.zeros((B, 2 * K), np.int64)                # tag_set1 | tag_set2, overlapping
  tags2[0, [0, 2, K + 2, K + 4]] = 1
  tags2[1, [1, K + 1]] = 1
  tags2[2, [K + 3]] = 1
  ctx = cfg.text.context_length
  text_ids = rng.integers(2, VOCAB - 1, (B, ctx)).astype(np.int32)
  for i, n in enumerate((5, 9, 3)):                     # EOT = the largest id, then padding
    text_ids[i, n] = VOCAB - 1
    text_ids[i, n + 1:] = 0
  lm_batch = parity._lm_batch()  # pylint: disable=protected-access
  control, control_mask, caption, caption_mask = lm_batch
  return {"image": image, "image_hw": image_hw, "box": box, "pixels": np.asarray(pixels),
          "vboxes": np.asarray(vboxes), "tags2": tags2,
          "tags": np.minimum(tags2[:, :K] + tags2[:, K:], 1).astype(np.float32),
          "text_ids": text_ids, "control_ids": control, "control_mask": control_mask,
          "caption_ids": caption, "caption_mask": caption_mask,
          "category": np.full((B,), -1, np.int32), "attributes": np.full((B, 2), -1, np.int32),
          "mask": np.ones((B,), bool)}


def _original_names(cfg, gen):
  """Random heads, projections and SigLIP scalars under the original's parameter names."""
  h, w_in, d = cfg.head.hidden, cfg.head.mlp_dim, cfg.qformer.hidden
  text_dim = cfg.text.output_dim
  p = {}
  rand = lambda *shape, scale=0.3: torch.randn(*shape, generator=gen) * scale

  def linear(name, o, i, scale=None):
    p[name + ".weight"] = rand(o, i, scale=scale or i ** -0.5)
    p[name + ".bias"] = rand(o, scale=0.2)

  for head in ("tag_head", "attr_head"):
    for i in range(cfg.head.num_layers):
      pre = f"{head}.encoder.layer.{i}."
      for part in ("query", "key", "value"):
        linear(pre + "crossattention.self." + part, h, h)
      linear(pre + "crossattention.output.dense", h, h)
      linear(pre + "intermediate.dense", w_in, h)
      linear(pre + "output.dense", h, w_in)
      for ln in ("crossattention.output.LayerNorm", "output.LayerNorm"):
        p[pre + ln + ".weight"] = 1 + rand(h, scale=0.2)
        p[pre + ln + ".bias"] = rand(h, scale=0.2)
  for kind in ("tag", "attr"):
    linear(f"{kind}_vision_proj", h, d)
    linear(f"{kind}_text_proj", h, text_dim)
    linear(f"{kind}_fc", 1, h)
  p["attr_t"] = torch.tensor(math.log(10.0))
  p["attr_b"] = torch.tensor(-2.0)      # −10 in the original: σ saturates on random toy scores
  return p


@pytest.fixture(scope="module")
def objective():
  cfg, graphdef, params, ts = parity.build(_config())
  gen = torch.Generator().manual_seed(11)
  # The frozen EVA-CLIP text tower (torch_references.EvaText) and the tag table it computes at
  # the original's init (build_tag_embeds).
  tc = cfg.text
  text = EvaText(vocab=VOCAB, context=tc.context_length, width=tc.width, heads=tc.num_heads,
                 mlp=tc.mlp_dim, depth=tc.depth, out=tc.output_dim).eval()
  with torch.no_grad():
    text.positional_embedding.copy_(torch.randn(tc.context_length, tc.width, generator=gen) * 0.3)
    text.text_projection.copy_(torch.randn(tc.width, tc.output_dim, generator=gen)
                               * tc.width ** -0.5)
    for name, q in text.named_parameters():
      if q.ndim == 1:
        q.copy_(torch.randn(q.shape, generator=gen) * 0.3 + float(name.endswith(".weight")))
  tag_ids = np.random.default_rng(6).integers(2, VOCAB - 1, (K, tc.context_length))
  tag_ids[:, 4] = VOCAB - 1
  tag_ids[:, 5:] = 0
  p = {"cvem_align." + k: v for k, v in ts["dcn"].items()}
  p.update({"cvem_mlp." + k: v.detach() for k, v in ts["mlp"].state_dict().items()})
  p.update({k: v.detach() for k, v in ts["original"].items()})   # t5_proj, cem_memory
  p.update(_original_names(cfg, gen))
  with torch.no_grad():
    p["clip_embeds"] = text(torch.from_numpy(tag_ids).long())

  # Our params: the parts parity.build left zero, converted from the modules above.
  flat = functional.flatten(params)
  exp = expected_shapes(params)
  np_sd = lambda m: {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}
  flat.update({"text_encoder/" + k: v for k, v in convert_eva_clip_text(
      {"text." + k: v for k, v in np_sd(text).items()},
      {k[len("text_encoder/"):]: v for k, v in exp.items()
       if k.startswith("text_encoder/")}).items()})
  heads = {k: v.numpy() for k, v in p.items() if k.startswith(("tag_", "attr_"))}
  flat.update(convert(heads, HEAD_RULES, {k: v for k, v in exp.items()
                                          if k.startswith(("tag_", "attr_"))
                                          and not k.endswith("_token_ids")}))
  flat["clip_embeds"] = p["clip_embeds"].numpy()
  flat["tag_token_ids"] = tag_ids.astype(np.int32)
  params = functional.unflatten({k: jnp.asarray(v) for k, v in flat.items()})
  return cfg, graphdef, params, dict(ts, p=p, text=text)


def _trainable(flat):
  return {k: v for k, v in flat.items() if DYNREFER_OWNED.match(k) and "token_ids" not in k}


def test_each_heads_loss_and_every_trainable_gradient_match_the_original(objective):
  cfg, graphdef, params, t = objective
  batch = _batch(cfg)
  flat = functional.flatten(params)
  trainable = _trainable(flat)
  frozen = {k: v for k, v in flat.items() if k not in trainable}
  keys = ("image", "image_hw", "box", "tags", "text_ids", "control_ids", "control_mask",
          "caption_ids", "caption_mask", "category", "attributes", "mask")
  jbatch = {k: jnp.asarray(batch[k]) for k in keys}

  def loss(train_params):
    model = functional.merge(graphdef, functional.unflatten({**frozen, **train_params}))
    return model(jbatch, jax.random.key(0), train=True)

  (total, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable)

  # The original, with requires_grad on exactly its trainable tensors.
  p = t["p"]
  for k in list(p):
    if re.match(r"(cvem|cem|tag|attr|t5_proj)", k) and not k.startswith("clip_embeds"):
      p[k] = p[k].detach().clone().requires_grad_()
  t["qformer"].zero_grad()
  loss_llm, loss_tag, loss_att = original_forward(t, cfg, batch)
  (loss_llm + loss_tag + loss_att).backward()

  np.testing.assert_allclose(float(aux["loss_lm"]), loss_llm.item(), rtol=LOSS_TOL)
  np.testing.assert_allclose(cfg.loss.tag * float(aux["loss_tag"]), loss_tag.item(), rtol=LOSS_TOL)
  np.testing.assert_allclose(cfg.loss.rtc * float(aux["loss_rtc"]), loss_att.item(), rtol=LOSS_TOL)
  np.testing.assert_allclose(float(total), (loss_llm + loss_tag + loss_att).item(), rtol=LOSS_TOL)

  # Torch gradients → our layout through the same converters.
  exp = {k: tuple(v.shape) for k, v in grads.items()}
  g = {k: v.grad.numpy() for k, v in p.items() if getattr(v, "grad", None) is not None}
  want = convert_cvem({k: v for k, v in g.items() if k.startswith("cvem_")},
                      {k: v for k, v in exp.items() if k.startswith("cvem_")})
  q_exp = {k[len("Qformer/"):]: v for k, v in exp.items() if k.startswith("Qformer/")}
  want.update({"Qformer/" + k: v for k, v in convert_qformer_hf(
      {k: q.grad.numpy() for k, q in t["qformer"].named_parameters()}, q_exp).items()})
  want.update(convert({k: v for k, v in g.items() if not k.startswith("cvem_")},
                      HEAD_RULES + lm_rules(exp),  # t5_proj and cem_memory
                      {k: v for k, v in exp.items()
                       if not k.startswith(("cvem_", "Qformer/"))}))
  assert set(want) == set(grads)
  scale = max(float(np.abs(v).max()) for v in want.values())
  for path, ref in want.items():
    got = np.asarray(grads[path])
    if path.endswith("key/bias"):
      # Mathematically zero (softmax is shift invariant per query): round-off only.
      assert np.abs(got).max() < 1e-5 * scale and np.abs(ref).max() < 1e-5 * scale, path
      continue
    assert np.abs(ref).max() > 0, path
    assert parity._rel(got, ref) < GRAD_TOL, path  # pylint: disable=protected-access
