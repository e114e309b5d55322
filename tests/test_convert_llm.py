"""tools/convert_checkpoint.py for the Vicuna variant (config.model.lm.kind "llama"): `--llm`
reads a toy Llama-format folder written by transformers' save_pretrained (sharded
safetensors, config.json) with its SentencePiece tokenizer, `--blip2` LAVIS's Vicuna BLIP-2
layout (query_tokens, ln_vision, Q-Former with its text embeddings, llm_proj) and `--dynrefer`
a DynRefer-Vicuna file (llm_proj, the unused cem_memory). The vision side and heads are
test_convert_checkpoint.py's toy world.

Checked against the PyTorch reference: the converted model's prefix-conditioned LLM logits
(llm_proj(Z) ; control embeddings → HF LlamaForCausalLM) within 1e-4, LAVIS's tokenizer
("[PAD]" row appended as the mean of the others, "</s>" as bos), the pretrained init taking
BLIP-2's llm_proj, and configs/dynrefer_llm_vg.py reading the LLM's sizes from the folders.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from dynrefer_jax import checkpoint as ckpt_lib
from dynrefer_jax import config_lib, functional
from dynrefer_jax import predict as predict_lib

from test_convert_checkpoint import (CONFIG_PY, D, Q, _close, _tool, world)  # noqa: F401  pylint: disable=unused-import
from test_dynrefer_vicuna import write_llama_tokenizer

LLM_D, VOCAB = 24, 70   # the toy LLM's width; its tokenizer's pieces (+ LAVIS's "[PAD]" = 71)

LLAMA_LM = (f"dict(kind='llama', vocab_size={VOCAB + 1}, hidden_size={LLM_D}, "
            "intermediate_size=36, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=6, "
            "rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling={}, attention_bias=False, "
            "o_bias=False, tie_word_embeddings=False)")


@pytest.fixture(scope="module")
def vicuna(world):  # pylint: disable=redefined-outer-name
  """The toy world with Vicuna in place of FlanT5: files and the torch reference."""
  tmp = world["tmp"]
  gen = torch.Generator().manual_seed(7)
  cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=LLM_D, intermediate_size=36,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
                                 tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
  hf = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen) if "norm" in name
              else torch.randn(p.shape, generator=gen) * 0.3)
  llm_dir = tmp / "vicuna-7b-v1.5"
  hf.save_pretrained(llm_dir, max_shard_size="20KB")     # several safetensors shards
  write_llama_tokenizer(llm_dir)
  shards = sorted(f for f in os.listdir(llm_dir) if f.endswith(".safetensors"))
  assert len(shards) > 1 and (llm_dir / "model.safetensors.index.json").exists()

  rn = lambda *s: torch.randn(*s, generator=gen) * 0.3
  llm_proj, blip2_llm_proj = torch.nn.Linear(D, LLM_D), torch.nn.Linear(D, LLM_D)
  with torch.no_grad():
    for lin in (llm_proj, blip2_llm_proj):
      lin.weight.copy_(rn(LLM_D, D))
      lin.bias.copy_(rn(LLM_D))
  t5_keys = lambda sd: {k: v for k, v in sd.items() if not k.startswith("t5_proj.")}
  dynrefer = t5_keys(world["dynrefer"])
  dynrefer["cem_memory"] = np.zeros(LLM_D, np.float32)   # created by dynrefer_vicuna.py, unused
  dynrefer["llm_proj.weight"] = llm_proj.weight.detach().numpy()
  dynrefer["llm_proj.bias"] = llm_proj.bias.detach().numpy()
  blip2 = t5_keys(torch.load(world["paths"]["blip2"], weights_only=True)["model"])
  blip2["llm_proj.weight"], blip2["llm_proj.bias"] = blip2_llm_proj.weight, blip2_llm_proj.bias
  blip2["Qformer.bert.embeddings.word_embeddings.weight"] = torch.zeros(30523, D)
  tt = lambda d: {k: torch.as_tensor(np.asarray(v.detach() if hasattr(v, "detach") else v))
                  for k, v in d.items()}
  paths = {"dynrefer": tmp / "vicuna_vg1.2_5e.pth", "blip2": tmp / "blip2_pretrained_vicuna7b.pth"}
  torch.save({"model": tt(dynrefer)}, paths["dynrefer"])
  torch.save({"model": tt(blip2)}, paths["blip2"])
  config_path = tmp / "configs" / "toy_convert_vicuna.py"
  text = CONFIG_PY.replace("  c.model = m\n", f"""  m.lm = {LLAMA_LM}
  c.model = m
  c.trainable = ['cvem', 'cem', 'tag', 'attr', 'Qformer', 'llm_proj']
""").replace("text_len=16)", "text_len=16, lm_special_tokens=dict(pad_token='[PAD]', "
             "bos_token='</s>', eos_token='</s>', unk_token='</s>'))")
  assert "llm_proj" in text and "lm_special_tokens" in text
  config_path.write_text(text)
  argv = list(world["argv"])
  argv[argv.index("--config") + 1] = str(config_path)
  argv[argv.index("--dynrefer") + 1] = str(paths["dynrefer"])
  argv[argv.index("--blip2") + 1] = str(paths["blip2"])
  i = argv.index("--t5")
  argv[i:i + 2] = ["--llm", str(llm_dir)]
  return dict(hf=hf, llm_dir=llm_dir, llm_proj=llm_proj, blip2_llm_proj=blip2_llm_proj,
              argv=argv, config_path=str(config_path), tmp=tmp)


def test_whole_model_with_vicuna_matches_reference(world, vicuna, capsys):  # pylint: disable=redefined-outer-name
  out = vicuna["tmp"] / "vicuna_out"
  assert _tool().main(vicuna["argv"] + ["--out", str(out)]) == 0, capsys.readouterr().err
  report = json.loads(capsys.readouterr().out)
  assert report["kind"] == "converted DynRefer" and report["notes"] == []
  # LAVIS's tokenizer, saved: "[PAD]" appended (id 70), "</s>" (id 2) as bos, eos and unk.
  tok = transformers.AutoTokenizer.from_pretrained(out / "tokenizer")
  assert (len(tok), tok.pad_token, tok.pad_token_id) == (VOCAB + 1, "[PAD]", VOCAB)
  assert tok.bos_token_id == tok.eos_token_id == 2
  assert json.loads((out / "llm" / "config.json").read_text())["vocab_size"] == VOCAB + 1

  config = config_lib.load(vicuna["config_path"])
  vocab = predict_lib.Vocab.from_converted(str(out))
  graphdef, params, _ = predict_lib.load_params(config, str(out), vocab)
  flat = functional.flatten(params)
  assert "cem_memory" not in flat and "t5_model/shared" not in flat
  hf = vicuna["hf"]
  sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  emb = np.asarray(flat["llm_model/embed_tokens"])
  np.testing.assert_allclose(emb[:VOCAB], sd["model.embed_tokens.weight"])
  np.testing.assert_allclose(emb[VOCAB], sd["model.embed_tokens.weight"].mean(0), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(flat["llm_model/lm_head/kernel"])[:, VOCAB],
                             sd["lm_head.weight"].mean(0), rtol=1e-6)

  rng = np.random.default_rng(3)
  z = rng.normal(size=(2, Q, D)).astype(np.float32)
  control = np.array([[2, 5, 6, 7], [2, 8, VOCAB, VOCAB]], np.int32)
  cmask = control != VOCAB

  @jax.jit
  def forward(p):
    model = functional.merge(graphdef, p)
    prefix, mask = model.lm_inputs(jnp.asarray(z), jnp.asarray(control), jnp.asarray(cmask))
    return model.language_model.forward(prefix, mask)

  got = np.asarray(forward(params))
  ref_hf = transformers.LlamaForCausalLM(hf.config).eval()
  ref_hf.load_state_dict(hf.state_dict())
  ref_hf.resize_token_embeddings(VOCAB + 1)
  with torch.no_grad():
    ref_hf.model.embed_tokens.weight[VOCAB] = hf.model.embed_tokens.weight.mean(0)
    ref_hf.lm_head.weight[VOCAB] = hf.lm_head.weight.mean(0)
    t = torch.from_numpy
    prefix = torch.cat([vicuna["llm_proj"](t(z)), ref_hf.model.embed_tokens(t(control).long())], 1)
    mask = torch.cat([torch.ones(2, Q, dtype=torch.long), t(cmask.astype(np.int64))], 1)
    want = ref_hf(inputs_embeds=prefix, attention_mask=mask,
                  position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits.numpy()
  valid = mask.numpy().astype(bool)
  _close(got[valid], want[valid])


def test_pretrained_init_takes_blip2_llm_proj(vicuna, capsys):  # pylint: disable=redefined-outer-name
  argv = list(vicuna["argv"])
  i = argv.index("--dynrefer")
  del argv[i:i + 2]
  out = vicuna["tmp"] / "vicuna_init"
  assert _tool().main(argv + ["--out", str(out)]) == 0, capsys.readouterr().err
  report = json.loads(capsys.readouterr().out)
  assert report["kind"] == "pretrained init"
  assert "llm_proj" not in report["left_to_model_init"]
  assert "cvem_align" in report["left_to_model_init"]
  config = config_lib.load(vicuna["config_path"])
  vocab = predict_lib.Vocab.from_converted(str(out))
  _, abstract, shardings = predict_lib._abstract_model(config, vocab)  # pylint: disable=protected-access
  target = ckpt_lib.abstract_with_shardings(abstract, shardings)
  flat = functional.flatten(ckpt_lib.load_params(str(out), target))
  np.testing.assert_allclose(np.asarray(flat["llm_proj/kernel"]),
                             vicuna["blip2_llm_proj"].weight.detach().numpy().T)
  assert not any(k.startswith(("cvem", "tag_head", "tag_fc", "attr_head", "attr_fc")) for k in flat)


def test_llm_given_for_a_t5_config_is_one_line(world, vicuna, capsys):  # pylint: disable=redefined-outer-name
  argv = list(world["argv"])
  i = argv.index("--t5")
  argv[i:i + 2] = ["--llm", str(vicuna["llm_dir"])]
  assert _tool().main(argv + ["--out", str(vicuna["tmp"] / "never")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "lm.kind 't5'" in err and "--t5" in err


def test_llm_config_reads_sizes_from_the_folders(vicuna, tmp_path):  # pylint: disable=redefined-outer-name
  """configs/dynrefer_llm_vg.py:DIR: the LLM's sizes from a HF folder or a converted one."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = os.path.join(root, "configs", "dynrefer_llm_vg.py")
  c = config_lib.load(f"{spec}:{vicuna['llm_dir']}")
  assert (c.model.lm.kind, c.model.lm.hidden_size, c.model.lm.num_layers,
          c.model.lm.num_kv_heads, c.model.lm.vocab_size) == ("llama", LLM_D, 2, 2, VOCAB)
  assert "llm_proj" in c.trainable and c.model_init == ""
  qwen = tmp_path / "qwen"
  transformers.Qwen2Config(vocab_size=96, hidden_size=16, intermediate_size=24,
                           num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                           tie_word_embeddings=True).save_pretrained(qwen)
  c = config_lib.load(f"{spec}:{qwen}")
  assert (c.model.lm.attention_bias, c.model.lm.o_bias, c.model.lm.tie_word_embeddings,
          c.model.lm.num_kv_heads, c.model.lm.head_dim) == (True, False, True, 1, 4)
  converted = vicuna["tmp"] / "vicuna_out"
  if converted.exists():  # written by the whole-model test
    c = config_lib.load(f"{spec}:{converted}")
    assert c.model.lm.vocab_size == VOCAB + 1 and c.model_init == str(converted)
  with pytest.raises(config_lib.ConfigError, match="no config.json"):
    config_lib.load(f"{spec}:{tmp_path / 'missing'}")
