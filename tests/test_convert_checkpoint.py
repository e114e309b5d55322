"""tools/convert_checkpoint.py on toy-size files written here in the released layouts
(CHECKPOINTS.md §1-§5) from a PyTorch reference assembled here: HF Blip2VisionModel (ViT),
HF Blip2QFormerModel (Q-Former), HF T5ForConditionalGeneration (FlanT5), and, written in this
file with the original's parameter names, the DCNv4 aligner, the fusion MLP, the
cross-attention-only tag / region-text heads and the EVA-CLIP text tower.

Checked: the converted JAX model's tag logits, region-text scores (attribute templates and
class prompts) and LM logits equal the reference's within 1e-4; its ViT + ln_vision features
too; DynRefer's Q-Former / t5_proj override BLIP-2's; missing files and keys are one line
naming each, exit code 2. Without the DynRefer file: the pretrained init (BLIP-2's Q-Former and
t5_proj, the frozen towers) loads into the trainer's state and leaves DynRefer's own modules at
the trainer's initialisation; predict refuses it.
"""

import dataclasses
import importlib.util
import json
import os
import re
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import (Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig,
                          Blip2VisionModel, T5Config, T5ForConditionalGeneration)

from dynrefer_jax import config_lib, functional
from dynrefer_jax import predict as predict_lib

import torch_references
from torch_references import EvaText, lavis_vit_block

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Toy sizes, all different so that a transposed or swapped tensor cannot fit.
C, VIT_MLP, PATCH, SIZE = 16, 24, 7, 28          # ViT width, grid 4x4
Q, D, QF_MLP = 3, 32, 48                          # query tokens, Q-Former width
H, H_HEADS, H_MLP = 12, 2, 20                     # tag / region-text head width
TW, T_HEADS, T_MLP, T_OUT, CTX = 24, 2, 40, 20, 16  # text tower
LM_D, LM_VOCAB = 28, 64
G, V, R = 4, 3, 4                                 # aligner groups, views, RoI grid

CONFIG_PY = textwrap.dedent(f"""
    from configs import common

    def get_config(arg=None):
      c = common.base()
      c.seed = 0
      c.frozen_dtype = ""
      m = common.toy_model()
      m.num_query_tokens = {Q}
      m.vit = dict(image_size={SIZE}, patch_size={PATCH}, width={C}, depth=1, num_heads=2,
                   mlp_dim={VIT_MLP}, qkv_bias="qv", act="gelu", ln_eps=1e-6)
      m.roi = dict(output_size={R}, sampling_ratio=2, aligned=False)
      m.aligner = dict(kind="dcnv4", groups={G})
      m.qformer = dict(num_layers=2, hidden={D}, num_heads=4, mlp_dim={QF_MLP},
                       cross_attention_freq=2, dropout=0.0)
      m.head = dict(hidden={H}, num_layers=2, num_heads={H_HEADS}, mlp_dim={H_MLP}, dropout=0.0)
      m.text = dict(vocab_size=49408, context_length={CTX}, width={TW}, depth=1,
                    num_heads={T_HEADS}, mlp_dim={T_MLP}, output_dim={T_OUT}, act="gelu",
                    eot_token_id=None)
      m.lm = dict(vocab_size={LM_VOCAB}, d_model={LM_D}, d_kv=8, d_ff=36, num_heads=4,
                  num_encoder_layers=1, num_decoder_layers=2, dropout_rate=0.0)
      m.train_vision_encoder = False
      m.train_text_encoder = False
      m.recompute_text_tables = False
      c.model = m
      c.data = dict(name="converted", window_size=64, control_len=8, caption_len=8,
                    text_len={CTX})
      c.eval = dict(batch_size=4, view_selection="phash", splits=[])
      return c
    """)

TAGS = ["man", "white shirt", "dog", "red car", "tree"]
OVAD = [{"name": "color:black", "is_has_att": "is", "freq_set": "head"},
        {"name": "skin tone:light/dark", "is_has_att": "has", "freq_set": "tail"}]
CLASSES = ["Person", "Dog", "Traffic Light"]


def _randomize(module, gen, scale=0.3):
  with torch.no_grad():
    for name, p in module.named_parameters():
      if "LayerNorm.weight" in name or "layer_norm" in name or name.endswith("ln_1.weight"):
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
      else:
        p.copy_(torch.randn(p.shape, generator=gen) * scale)


def _np(sd, prefix=""):
  return {prefix + k: v.detach().numpy().copy() for k, v in sd.items()}


# ---- references written with the original's parameter names --------------------------------

class _Holder(torch.nn.Module):
  pass


class CrossLayer(torch.nn.Module):
  """RAM/Query2Label BERT layer with self-attention removed (SPEC §7a), original key names."""

  def __init__(self):
    super().__init__()
    self.crossattention = _Holder()
    att = _Holder()
    att.query, att.key, att.value = (torch.nn.Linear(H, H) for _ in range(3))
    self.crossattention.add_module("self", att)
    self.crossattention.output = _Holder()
    self.crossattention.output.dense = torch.nn.Linear(H, H)
    self.crossattention.output.LayerNorm = torch.nn.LayerNorm(H, eps=1e-12)
    self.intermediate = _Holder()
    self.intermediate.dense = torch.nn.Linear(H, H_MLP)
    self.output = _Holder()
    self.output.dense = torch.nn.Linear(H_MLP, H)
    self.output.LayerNorm = torch.nn.LayerNorm(H, eps=1e-12)

  def forward(self, x, mem):
    att = getattr(self.crossattention, "self")
    b, k, _ = x.shape
    split = lambda t: t.view(b, t.shape[1], H_HEADS, H // H_HEADS).transpose(1, 2)
    q, kk, v = split(att.query(x)), split(att.key(mem)), split(att.value(mem))
    a = torch.softmax(q @ kk.transpose(-1, -2) / (H // H_HEADS) ** 0.5, -1) @ v
    a = a.transpose(1, 2).reshape(b, k, H)
    x = self.crossattention.output.LayerNorm(x + self.crossattention.output.dense(a))
    f = self.output.dense(F.gelu(self.intermediate.dense(x)))
    return self.output.LayerNorm(x + f)


class Head(torch.nn.Module):
  """`{tag,attr}_head` + its projections and fc (CHECKPOINTS §1.4-1.5)."""

  def __init__(self):
    super().__init__()
    self.encoder = _Holder()
    self.encoder.layer = torch.nn.ModuleList([CrossLayer(), CrossLayer()])
    self.vision_proj = torch.nn.Linear(D, H)
    self.text_proj = torch.nn.Linear(T_OUT, H)
    self.fc = torch.nn.Linear(H, 1)

  def scores(self, z, text_embeds, normalize):
    mem = self.vision_proj(z)
    x = self.text_proj(text_embeds)[None].expand(z.shape[0], -1, -1)
    for layer in self.encoder.layer:
      x = layer(x, mem)
    if normalize:
      x = F.normalize(x, dim=-1)
    return self.fc(x)[..., 0]

  def state(self, name):
    sd = _np(self.encoder.state_dict(), f"{name}_head.encoder.")
    for part in ("vision_proj", "text_proj", "fc"):
      sd.update(_np(getattr(self, part).state_dict(), f"{name}_{part}."))
    return sd


def _hf_qformer(gen):
  cfg = Blip2QFormerConfig(hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=QF_MLP, encoder_hidden_size=C,
                           cross_attention_frequency=2)
  model = Blip2QFormerModel(cfg).eval()
  _randomize(model, gen)
  return model


def _lavis_qformer(model):
  """CHECKPOINTS §5 read right to left, plus the position_ids buffer LAVIS keeps."""
  out = {}
  for k, v in model.state_dict().items():
    if k.startswith("layernorm."):
      out["Qformer.bert.embeddings.LayerNorm." + k.split(".", 1)[1]] = v.numpy().copy()
    else:
      out["Qformer.bert." + k.replace("attention.attention.", "attention.self.")] = v.numpy().copy()
  out["Qformer.bert.embeddings.position_ids"] = np.arange(512)[None]
  return out


def _lavis_vit(model):
  sd = _np(model.state_dict())
  out = {"cls_token": sd["embeddings.class_embedding"],
         "pos_embed": sd["embeddings.position_embedding"],
         "patch_embed.proj.weight": sd["embeddings.patch_embedding.weight"],
         "patch_embed.proj.bias": sd["embeddings.patch_embedding.bias"],
         # EVA-CLIP-g's final norm / head, which LAVIS's depth-39 tower ignores.
         "norm.weight": np.ones(C, np.float32), "norm.bias": np.zeros(C, np.float32)}
  out.update(lavis_vit_block(sd, 0, C))
  return out


def _t5(gen):
  cfg = T5Config(vocab_size=LM_VOCAB, d_model=LM_D, d_kv=8, d_ff=36, num_heads=4, num_layers=1,
                 num_decoder_layers=2, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                 tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0,
                 eos_token_id=1)
  cfg.dense_act_fn = "gelu"  # LAVIS's override
  model = T5ForConditionalGeneration(cfg).eval()
  model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # FlanT5: untied
  _randomize(model, gen, 0.3)
  return model


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """Toy released files + the torch reference that they describe."""
  tmp = tmp_path_factory.mktemp("convert")
  gen = torch.Generator().manual_seed(0)
  torch.manual_seed(0)
  ref = {}
  vit = Blip2VisionModel(Blip2VisionConfig(
      hidden_size=C, intermediate_size=VIT_MLP, num_hidden_layers=1, num_attention_heads=2,
      image_size=SIZE, patch_size=PATCH, qkv_bias=True, layer_norm_eps=1e-6)).eval()
  _randomize(vit, gen)
  with torch.no_grad():  # the k third of the fused bias is zero in EVA (q and v biases only)
    vit.encoder.layers[0].self_attn.qkv.bias[C:2 * C] = 0
  ref["vit"] = vit
  qformer, blip2_qformer = _hf_qformer(gen), _hf_qformer(gen)
  ref["qformer"], ref["blip2_qformer"] = qformer, blip2_qformer
  rn = lambda *s, std=0.3: torch.randn(*s, generator=gen) * std
  dcn = {"value_proj.weight": rn(C, C), "value_proj.bias": rn(C),
         "offset_mask_dw.weight": rn(C, 2, 3, 3, std=0.5), "offset_mask_dw.bias": rn(C),
         "offset_mask.weight": rn(112, C, std=0.4), "offset_mask.bias": rn(112),
         "output_proj.weight": rn(C, C), "output_proj.bias": rn(C)}
  ref["dcn"] = dcn
  mlp = torch.nn.Sequential(torch.nn.Linear(V * C, C), torch.nn.ReLU(), torch.nn.Linear(C, C))
  _randomize(mlp, gen)
  ref["mlp"] = mlp
  tag, attr = Head(), Head()
  _randomize(tag, gen)
  _randomize(attr, gen)
  ref["tag"], ref["attr"] = tag, attr
  text = EvaText(vocab=49408, context=CTX, width=TW, heads=T_HEADS, mlp=T_MLP, depth=1,
                 out=T_OUT)
  _randomize(text, gen)
  ref["text"] = text
  t5 = _t5(gen)
  ref["t5"] = t5
  t5_proj, blip2_t5_proj = torch.nn.Linear(D, LM_D), torch.nn.Linear(D, LM_D)
  _randomize(t5_proj, gen)
  _randomize(blip2_t5_proj, gen)
  ref["t5_proj"], ref["blip2_t5_proj"] = t5_proj, blip2_t5_proj
  ref["cem_memory"] = rn(LM_D)
  ref["query_tokens"] = rn(1, Q, D, std=1.0)
  ref["ln_vision"] = (1 + rn(C, std=0.2), rn(C))

  dynrefer = {"cvem_align." + k: v.numpy() for k, v in dcn.items()}
  dynrefer.update(_np(mlp.state_dict(), "cvem_mlp."))
  dynrefer["cem_memory"] = ref["cem_memory"].numpy()
  dynrefer.update(_lavis_qformer(qformer))
  dynrefer.update(tag.state("tag"))
  dynrefer.update(attr.state("attr"))
  dynrefer["attr_t"], dynrefer["attr_b"] = np.float32(np.log(10.0)), np.float32(-10.0)
  dynrefer.update(_np(t5_proj.state_dict(), "t5_proj."))
  # BLIP-2: the frozen query tokens and ln_vision, plus its own Q-Former / t5_proj, which the
  # DynRefer file overrides (and which a pretrained init without the DynRefer file keeps).
  blip2 = _lavis_qformer(blip2_qformer)
  blip2.update({"query_tokens": ref["query_tokens"].numpy(),
                "ln_vision.weight": ref["ln_vision"][0].numpy(),
                "ln_vision.bias": ref["ln_vision"][1].numpy()})
  blip2.update(_np(blip2_t5_proj.state_dict(), "t5_proj."))
  eva_clip = _np(text.state_dict(), "text.")
  eva_clip["visual.cls_token"] = np.zeros((1, 1, C), np.float32)  # the unused vision half

  tt = lambda d: {k: torch.as_tensor(np.asarray(v)) for k, v in d.items()}
  paths = {"dynrefer": tmp / "vg1.2_5e.pth", "eva_vit": tmp / "eva_vit_g.pth",
           "blip2": tmp / "blip2_pretrained_flant5xl.pth", "eva_clip": tmp / "eva_clip_psz14.pt",
           "t5": tmp / "flan-t5-xl"}
  torch.save({"model": tt(dynrefer), "optimizer": {"state": {}}, "epoch": 4,
              "config": {"run": "vg1.2_5e"}}, paths["dynrefer"])
  torch.save(tt(_lavis_vit(vit)), paths["eva_vit"])
  torch.save({"model": tt(blip2)}, paths["blip2"])
  torch.save(tt(eva_clip), paths["eva_clip"])
  os.makedirs(paths["t5"])
  save_file({k: v.detach().clone().contiguous() for k, v in t5.state_dict().items()},
            str(paths["t5"] / "model.safetensors"))
  from dynrefer_jax.data import tokenizer as tokenizer_lib
  tokenizer_lib.build_tokenizer(["a man in a white shirt", "a red car"], str(paths["t5"]))
  (tmp / "tags.txt").write_text("\n".join(TAGS))
  (tmp / "ovad.json").write_text(json.dumps({"attributes": OVAD}))
  (tmp / "classes.json").write_text(json.dumps({"categories": [{"id": i + 1, "name": n}
                                                                for i, n in enumerate(CLASSES)]}))
  config_path = tmp / "configs" / "toy_convert.py"
  os.makedirs(config_path.parent)
  config_path.write_text(CONFIG_PY)
  argv = ["--config", str(config_path)]
  for name in ("dynrefer", "eva_vit", "blip2", "t5", "eva_clip"):
    argv += ["--" + name.replace("_", "-"), str(paths[name])]
  argv += ["--tags", str(tmp / "tags.txt"), "--ovad", str(tmp / "ovad.json"),
           "--classes", str(tmp / "classes.json")]
  return {"tmp": tmp, "ref": ref, "paths": paths, "argv": argv, "dynrefer": dynrefer,
          "config_path": str(config_path)}


def _tool():
  spec = importlib.util.spec_from_file_location(
      "convert_checkpoint_tool", os.path.join(ROOT, "tools", "convert_checkpoint.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _close(got, want, tol=1e-4):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape
  err = np.abs(got - want).max()
  assert err <= tol * max(1.0, np.abs(want).max()), err


@pytest.fixture(scope="module")
def converted(world):
  """The tool's output on the toy released files: (directory, printed report)."""
  import contextlib
  import io
  out, printed = world["tmp"] / "out", io.StringIO()
  with contextlib.redirect_stdout(printed):
    assert _tool().main(world["argv"] + ["--out", str(out)]) == 0
  return out, json.loads(printed.getvalue())


@pytest.fixture(scope="module")
def fresh_state(world, converted):
  """A factory of the trainer's initial state for the toy config (built once: its jitted init
  is the cost), each call with its own copies of the arrays."""
  import dataclasses as dc
  from dynrefer_jax import sharding
  from dynrefer_jax import train as train_lib
  config = config_lib.load(world["config_path"])
  vocab = predict_lib.Vocab.from_converted(str(converted[0]))
  built = train_lib.build_model(config, vocab.text_token_ids,
                                sharding.make_mesh(dict(config.sharding.mesh)))
  copy = lambda tree: jax.tree.map(lambda x: x.copy(), tree)
  return lambda: dc.replace(built, trainable=copy(built.trainable), frozen=copy(built.frozen))


def _from_model_init(config, path, vocab):
  """The trainer's state with config.model_init = path: train.build_model(model_init=)."""
  from dynrefer_jax import sharding
  from dynrefer_jax import train as train_lib
  return train_lib.build_model(config, vocab.text_token_ids,
                               sharding.make_mesh(dict(config.sharding.mesh)),
                               model_init=str(path))


def test_converted_model_matches_pytorch_reference(world, converted):
  out, report = converted
  assert report["notes"] == []
  vocab_json = json.loads((out / "vocab.json").read_text())
  assert vocab_json["class_prompts"] == ["the person", "the dog", "the traffic light"]
  # 1 + 2 synonyms, 2 templates each (SPEC §7b).
  assert vocab_json["template_to_attribute"] == [0, 0, 1, 1, 1, 1]

  config = config_lib.load(world["config_path"])
  vocab = predict_lib.Vocab.from_converted(str(out))
  graphdef, params, step = predict_lib.load_params(config, str(out), vocab)
  assert step == 0
  ref = world["ref"]
  flat = functional.flatten(params)
  trainable = sum(v.size for k, v in flat.items() if k.startswith(
      ("cvem", "cem", "tag_head", "tag_vision", "tag_text", "tag_fc", "attr_h", "attr_v",
       "attr_te", "attr_f", "attr_t", "attr_b", "Qformer", "t5_proj")) and "token_ids" not in k)
  assert report["trainable_parameters"] == trainable == sum(
      np.size(v) for k, v in world["dynrefer"].items() if k != "Qformer.bert.embeddings.position_ids")

  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
  b = 2
  roi = rng.normal(size=(b, V, R, R, C)).astype(np.float32)
  cls = rng.normal(size=(b, V, C)).astype(np.float32)
  ctx = roi[:, 1:].reshape(b * (V - 1), R, R, C)
  refv = np.broadcast_to(roi[:, :1], (b, V - 1, R, R, C)).reshape(b * (V - 1), R, R, C)
  control = np.array([[5, 6, 7, 1, 0], [8, 1, 0, 0, 0]], np.int32)
  cmask = control != 0
  cmask[:, 0] = True
  dec = np.array([[0, 9, 10, 11], [0, 12, 13, 14]], np.int32)

  @jax.jit
  def forward(p):
    """The converted model, one compile: ViT + ln_vision; and the region path from per-view RoI
    features and CLS tokens (align views 1, 2 to view 0, fuse, Q-Former with BLIP-2's query
    tokens) → Z → the three heads."""
    model = functional.merge(graphdef, p)
    feats = model.ln_vision(model.visual_encoder(jnp.asarray(pixels)))
    aligned = model.cvem_align(jnp.asarray(ctx), jnp.asarray(refv)).reshape(b, V - 1, R, R, C)
    views = jnp.concatenate([jnp.asarray(roi[:, :1]), aligned], 1).reshape(b, V, R * R, C)
    tokens = jnp.concatenate([jnp.asarray(cls)[:, :, None], views], 2)       # [B, V, 1+R², C]
    tokens = tokens.transpose(0, 2, 1, 3).reshape(b, 1 + R * R, V * C)
    queries = jnp.broadcast_to(model.query_tokens[...][None], (b, Q, D))
    z = model.Qformer(queries, model.cvem_mlp(tokens))
    tables = model.text_tables()
    enc_in, enc_mask = model.lm_inputs(z, jnp.asarray(control), jnp.asarray(cmask))
    lm = model.t5_model.decode(jnp.asarray(dec), model.t5_model.encode(enc_in, enc_mask),
                               enc_mask)
    return {"feats": feats, "z": z, "tag_table": tables["tags"],
            "tags": model.tag_logits(z, tables),
            "attrs": model.region_text_scores(z, tables["attributes"]),
            "classes": model.region_text_scores(z, tables["classes"]), "lm": lm}

  got = forward(params)
  with torch.no_grad():
    hidden = ref["vit"](torch.from_numpy(pixels).permute(0, 3, 1, 2),
                        output_hidden_states=True).hidden_states[-1]
    want = F.layer_norm(hidden, (C,), ref["ln_vision"][0], ref["ln_vision"][1], eps=1e-5)
  _close(got["feats"], want.numpy())

  tok_ids = {k: np.asarray(flat[k]) for k in ("tag_token_ids", "att_token_ids", "ov_token_ids")}
  with torch.no_grad():
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    tt = t(ctx).float()
    aligned_ref = torch_references.deformable_align(ref["dcn"], tt, t(refv), G)[0]
    views_ref = torch.cat([t(roi[:, :1]), aligned_ref.reshape(b, V - 1, R, R, C)], 1)
    tok_ref = torch.cat([t(cls)[:, :, None], views_ref.reshape(b, V, R * R, C)], 2)
    tok_ref = tok_ref.permute(0, 2, 1, 3).reshape(b, 1 + R * R, V * C)
    z_ref = ref["qformer"](query_embeds=ref["query_tokens"].expand(b, Q, D),
                           encoder_hidden_states=ref["mlp"](tok_ref)).last_hidden_state
    emb = {k: ref["text"](t(v).long()) for k, v in tok_ids.items()}
    tag_ref = ref["tag"].scores(z_ref, emb["tag_token_ids"], normalize=False)
    attr_ref = ref["attr"].scores(z_ref, emb["att_token_ids"], normalize=True)
    class_ref = ref["attr"].scores(z_ref, emb["ov_token_ids"], normalize=True)
    t5 = ref["t5"]
    control_emb = t5.shared(t(control).long()) + ref["cem_memory"]
    enc_ref = torch.cat([ref["t5_proj"](z_ref), control_emb], 1)
    mask_ref = torch.cat([torch.ones(b, Q, dtype=torch.long), t(cmask).long()], 1)
    lm_ref = t5(inputs_embeds=enc_ref, attention_mask=mask_ref,
                decoder_input_ids=t(dec).long()).logits
  _close(got["z"], z_ref.numpy())
  _close(got["tag_table"], emb["tag_token_ids"].numpy())
  _close(got["tags"], tag_ref.numpy())
  _close(got["attrs"], attr_ref.numpy())
  _close(got["classes"], class_ref.numpy())
  _close(got["lm"], lm_ref.numpy())
  # The tag table holds the tags' CLIP BPE ids (SOT ... EOT), not placeholders.
  assert (tok_ids["tag_token_ids"][:, 0] == 49406).all()
  assert (tok_ids["tag_token_ids"].max(1) == 49407).all()


def test_pretrained_init_without_dynrefer_file(world, capsys, fresh_state):
  """What the original trains from: BLIP-2's Q-Former / t5_proj + the frozen towers, against
  the PyTorch reference; DynRefer's own modules untouched in the trainer's state."""
  from dynrefer_jax import train as train_lib
  argv = list(world["argv"])
  i = argv.index("--dynrefer")
  del argv[i:i + 2]
  out = world["tmp"] / "init"
  assert _tool().main(argv + ["--out", str(out)]) == 0, capsys.readouterr().err
  report = json.loads(capsys.readouterr().out)
  left = ["attr_b", "attr_fc", "attr_head", "attr_t", "attr_text_proj", "attr_vision_proj",
          "cem_memory", "cvem_align", "cvem_mlp", "tag_fc", "tag_head", "tag_text_proj",
          "tag_vision_proj"]
  assert report["kind"] == "pretrained init" and report["left_to_model_init"] == left
  ref = world["ref"]
  assert report["trainable_parameters"] == (
      sum(p.numel() for p in ref["blip2_qformer"].parameters())
      + sum(p.numel() for p in ref["blip2_t5_proj"].parameters()))

  config = config_lib.load(world["config_path"])
  vocab = predict_lib.Vocab.from_converted(str(out))
  with pytest.raises(predict_lib.PredictError, match="pretrained init"):
    predict_lib.load_params(config, str(out), vocab)

  # The modules the pretrained init lacks get exactly the full init's values (the init program
  # that leaves the restored parameters out draws the same random stream).
  before = {k: np.asarray(v) for k, v in functional.flatten(fresh_state().trainable).items()}
  state = _from_model_init(config, out, vocab)
  assert list(state.initialised) == left
  params = functional.combine(state.trainable, state.frozen)
  flat = functional.flatten(params)
  for k, v in before.items():
    if k.split("/")[0] in left:
      np.testing.assert_array_equal(np.asarray(flat[k]), v, err_msg=k)
    elif k.startswith("Qformer/"):
      assert not np.array_equal(np.asarray(flat[k]), v), k  # replaced by BLIP-2's

  rng = np.random.default_rng(1)
  b = 2
  pixels = rng.normal(size=(b, SIZE, SIZE, 3)).astype(np.float32)
  enc = rng.normal(size=(b, 1 + R * R, C)).astype(np.float32)
  lm_in = rng.normal(size=(b, 5, LM_D)).astype(np.float32)
  dec = np.array([[0, 9, 10, 11], [0, 12, 13, 14]], np.int32)
  graphdef = state.graphdef

  @jax.jit
  def forward(p):
    model = functional.merge(graphdef, p)
    feats = model.ln_vision(model.visual_encoder(jnp.asarray(pixels)))
    queries = jnp.broadcast_to(model.query_tokens[...][None], (b, Q, D))
    z = model.Qformer(queries, jnp.asarray(enc))
    mask = jnp.ones(lm_in.shape[:2], bool)
    lm = model.t5_model.decode(jnp.asarray(dec), model.t5_model.encode(jnp.asarray(lm_in), mask),
                               mask)
    return {"feats": feats, "z": z, "proj": model.t5_proj(z), "lm": lm,
            "tag_table": model.text_tables()["tags"]}

  got = forward(params)
  t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
  with torch.no_grad():
    hidden = ref["vit"](t(pixels).permute(0, 3, 1, 2),
                        output_hidden_states=True).hidden_states[-1]
    feats = F.layer_norm(hidden, (C,), ref["ln_vision"][0], ref["ln_vision"][1], eps=1e-5)
    z = ref["blip2_qformer"](query_embeds=ref["query_tokens"].expand(b, Q, D),
                             encoder_hidden_states=t(enc)).last_hidden_state
    lm = ref["t5"](inputs_embeds=t(lm_in), decoder_input_ids=t(dec).long()).logits
    tags = ref["text"](t(np.asarray(flat["tag_token_ids"])).long())
    proj = ref["blip2_t5_proj"](z)
  _close(got["feats"], feats.numpy())
  _close(got["z"], z.numpy())
  _close(got["proj"], proj.numpy())
  _close(got["lm"], lm.numpy())
  _close(got["tag_table"], tags.numpy())


def _save_workdir(path, trainable, frozen_source, seed=0, step=5):
  """A training workdir's checkpoint as train._save writes it (trainable + metadata)."""
  from dynrefer_jax import checkpoint as ckpt_lib
  ck = ckpt_lib.Checkpointer(str(path / "checkpoints"), async_save=False)
  ck.save(step, {"trainable": trainable, "step": np.int32(step)},
          {"data_step": step, "frozen_source": frozen_source, "config": {"seed": seed}},
          force=True)
  ck.close()


def test_model_init_from_training_workdirs(world, converted, fresh_state):
  """model_init = a training workdir (the paper's RefCOCOg fine-tune from the VG model): its
  trainable parameters, the frozen ones from the weights it started from, down a chain of
  workdirs; a random-init chain needs the same seed; predict and the data setup follow it."""
  from dynrefer_jax import checkpoint as ckpt_lib
  from dynrefer_jax import train as train_lib
  conv = converted[0]
  config = config_lib.load(world["config_path"])
  vocab = predict_lib.Vocab.from_converted(str(conv))
  state = fresh_state()
  converted = {k: np.asarray(v) for k, v in functional.flatten(
      predict_lib.load_params(config, str(conv), vocab)[1]).items()}
  tr_keys = sorted(functional.flatten(state.trainable))
  # Run 1 (from the converted directory) and run 2 (from run 1): trainable values of their own.
  w1, w2 = world["tmp"] / "w_vg", world["tmp"] / "w_refcocog"
  run1 = {k: converted[k] + 1.0 for k in tr_keys}
  run2 = {k: converted[k] - 2.0 for k in tr_keys}
  _save_workdir(w1, functional.unflatten(run1), str(conv))
  _save_workdir(w2, functional.unflatten(run2), str(w1))
  assert ckpt_lib.converted_root(str(w2)) == str(conv) and ckpt_lib.recorded_init(str(w2)) == str(w1)

  state = _from_model_init(config, w2, vocab)
  assert state.initialised == ()
  got = functional.flatten(functional.combine(state.trainable, state.frozen))
  for k, v in got.items():
    np.testing.assert_array_equal(np.asarray(v), run2[k] if k in run2 else converted[k],
                                  err_msg=k)

  # predict / evaluate on run 2's workdir with no model_init in the config: run 2's trainables,
  # the frozen weights through run 1 down to the converted directory.
  ids = {"tags": converted["tag_token_ids"], "attributes": converted["att_token_ids"],
         "classes": converted["ov_token_ids"],
         "template_to_attribute": converted["att_template_owner"]}
  # What Runner.load builds for a workdir (data setup's tokenised vocabulary).
  data_vocab = dataclasses.replace(vocab, text_token_ids=ids)
  _, params, step = predict_lib.load_params(config, str(w2), data_vocab)
  flat = functional.flatten(params)
  assert step == 5
  assert set(flat) == set(converted)
  for k, v in flat.items():  # the text tables are recomputed from the restored text tower
    np.testing.assert_allclose(np.asarray(v), run2[k] if k in run2 else converted[k],
                               rtol=1e-5, atol=1e-6, err_msg=k)

  # A run on randomly initialised frozen weights: only its trainables; the seed must match.
  w3 = world["tmp"] / "w_random"
  _save_workdir(w3, functional.unflatten(run1), "random init (seed 7)", seed=7)
  with pytest.raises(ValueError, match="--config.seed=7"):
    _from_model_init(config, w3, vocab)
  seven = _with_seed(config, 7)
  state = _from_model_init(seven, w3, vocab)
  # The frozen weights are those run's: the trainer's own initialisation with seed 7.
  full = train_lib.build_model(seven, vocab.text_token_ids, state.mesh)
  frozen_before = {k: np.asarray(v) for k, v in functional.flatten(full.frozen).items()}
  assert not np.array_equal(frozen_before["visual_encoder/patch_embed/kernel"],
                            np.asarray(functional.flatten(fresh_state().frozen)[
                                "visual_encoder/patch_embed/kernel"]))   # seed 7 ≠ seed 0
  tables = re.compile(train_lib.trainable_patterns(config)[1][0])  # rebuilt, never saved
  assert list(state.initialised) == sorted({k.split("/")[0] for k in frozen_before
                                            if not tables.search(k)})
  assert "visual_encoder" in state.initialised and "ln_vision" in state.initialised
  for k, v in functional.flatten(state.frozen).items():
    np.testing.assert_array_equal(np.asarray(v), frozen_before[k], err_msg=k)
  np.testing.assert_array_equal(np.asarray(functional.flatten(state.trainable)["tag_fc/kernel"]),
                                run1["tag_fc/kernel"])

  # Another model's workdir: one line naming the mis-shaped parameter.
  w4 = world["tmp"] / "w_other"
  bad = dict(run1, **{"tag_fc/kernel": np.zeros((3, 3), np.float32)})
  _save_workdir(w4, functional.unflatten(bad), str(conv))
  with pytest.raises(ValueError, match="tag_fc/kernel"):
    _from_model_init(config, w4, vocab)


def _with_seed(config, seed):
  c = config.copy_and_resolve_references()
  c.seed = seed
  return c


def test_missing_files_named_before_loading(world, capsys):
  argv = list(world["argv"])
  argv[argv.index("--blip2") + 1] = "/nonexistent/blip2.pth"
  argv[argv.index("--t5") + 1] = "/nonexistent/flan-t5-xl"
  argv[argv.index("--tags") + 1] = "/nonexistent/tags.txt"
  assert _tool().main(argv + ["--out", str(world["tmp"] / "never")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: ")
  for name in ("--blip2: /nonexistent/blip2.pth", "--t5: /nonexistent/flan-t5-xl",
               "--tags: /nonexistent/tags.txt"):
    assert name in err
  assert not os.path.exists(world["tmp"] / "never")


def test_missing_and_unknown_keys_listed(world, capsys):
  sd = {k: v for k, v in world["dynrefer"].items()
        if k not in ("tag_fc.bias", "cvem_mlp.2.weight",
                     "Qformer.bert.encoder.layer.1.output_query.dense.weight")}
  sd["tag_extra.weight"] = np.zeros((2, 2), np.float32)
  bad = world["tmp"] / "bad_dynrefer.pth"
  torch.save({"model": {k: torch.as_tensor(np.asarray(v)) for k, v in sd.items()}}, bad)
  argv = list(world["argv"])
  argv[argv.index("--dynrefer") + 1] = str(bad)
  assert _tool().main(argv + ["--out", str(world["tmp"] / "bad_out")]) == 2
  lines = capsys.readouterr().err.splitlines()
  err = lines[-1]  # after the progress line naming the files read
  assert err.startswith("error: ") and sum(l.startswith("error") for l in lines) == 1
  for key in ("tag_fc/bias", "cvem_mlp/linear2/kernel", "layers/1/output_query/kernel",
              "tag_extra.weight"):
    assert key in err, key
