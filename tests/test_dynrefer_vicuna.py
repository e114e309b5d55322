"""DynRefer-Vicuna (config.model.lm.kind "llama") against a PyTorch transcription of the
original's `dynrefer_vicuna.py` llm_forward (and InstructBLIP-Vicuna's
`concat_text_input_output`), at toy size: a SentencePiece Llama tokenizer trained here, given
LAVIS's special tokens ("[PAD]" added, "</s>" as bos / eos / unk), and transformers'
LlamaForCausalLM resized to it.

Checked, with the production code (DynRefer.lm_inputs / language_model / caption and the
pipeline's tokenisation, captions.encode_controls / encode_captions):
- the token ids of the control words and captions equal the transcription's tokenizer calls and
  SentencePiece's own pieces;
- the training loss and the prefix-conditioned logits of every caption token equal the
  transcription's (HF's packed sequence, labels -100 outside the caption) within 1e-5;
- beam search (2 beams, 20 new tokens, repetition penalty 1.5, length penalty 0) gives the ids
  of transformers' generate(inputs_embeds=...) on the left-padded prompt, scores within 1e-4.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
import torch
import transformers
from flax import nnx

from dynrefer_jax import config_lib, functional
from dynrefer_jax.convert.common import expected_shapes
from dynrefer_jax.convert.dynrefer import llm_tokenizer
from dynrefer_jax.convert.llama import convert_llama
from dynrefer_jax.data import captions
from dynrefer_jax.models import dynrefer as dynrefer_lib

from configs.dynrefer_vicuna_vg import LAVIS_VICUNA_TOKENS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = ["a man in a white shirt", "the red car parked on the street", "man,white shirt|",
          "two dogs playing with a ball", "a tall tree behind the fence", "red car,tree|",
          "a woman holding an umbrella", "white clouds in a blue sky", "|"]
CONTROLS = ["man,white shirt|", "|", "red car,tree,two dogs,a tall tree behind the fence|"]
GEN_CONTROLS = CONTROLS + ["white clouds|", "a woman,umbrella|", "dogs,ball|", "|", "fence|"]
CAPTIONS = ["a man in a white shirt", "white clouds", "two dogs playing with a ball behind "
            "the tall tree and the red car parked on the street"]
Q, DQ, D = 4, 32, 32          # query tokens, Q-Former width, LLM width
MAX_TXT, MAX_OUT = 12, 16     # the toy's max_txt_len (controls) and caption length


def write_llama_tokenizer(d) -> str:
  """A Llama-style SentencePiece BPE (unk 0, <s> 1, </s> 2) saved as Vicuna's tokenizer folder
  is: tokenizer.model + tokenizer_config.json naming LlamaTokenizer, add_bos_token true."""
  os.makedirs(d, exist_ok=True)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS * 20), model_prefix=os.path.join(d, "tokenizer"),
      vocab_size=70, model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      hard_vocab_limit=False, minloglevel=2)
  with open(os.path.join(d, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True,
               "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
               "unk_token": "<unk>", "legacy": False}, f)
  return str(d)


def lavis_tokenizer(d):
  """Blip2VicunaInstruct.__init__: LlamaTokenizer.from_pretrained(llm_model, use_fast=False,
  truncation_side="left"), then its four add_special_tokens calls."""
  tok = transformers.LlamaTokenizer.from_pretrained(d, use_fast=False, truncation_side="left")
  tok.add_special_tokens({"pad_token": "[PAD]"})
  tok.add_special_tokens({"bos_token": "</s>"})
  tok.add_special_tokens({"eos_token": "</s>"})
  tok.add_special_tokens({"unk_token": "</s>"})
  # transformers 5 has only the fast tokenizer, whose template keeps the old `<s>`; the slow
  # one LAVIS used prepends bos_token_id (now "</s>"). Rebuilt here, checked against
  # SentencePiece in test_tokenisation_is_the_originals.
  tok.update_post_processor()
  return tok


class VicunaLLMForward:
  """dynrefer_vicuna.py's DynReferVicuna.llm_forward, transcribed (training and inference),
  with Blip2VicunaInstruct.concat_text_input_output; `embeds` is the Q-Former output Z."""

  def __init__(self, llm_model, llm_proj, llm_tokenizer, max_txt_len, max_output_txt_len):
    self.llm_model, self.llm_proj, self.llm_tokenizer = llm_model, llm_proj, llm_tokenizer
    self.max_txt_len, self.max_output_txt_len = max_txt_len, max_output_txt_len

  @staticmethod
  def concat_text_input_output(input_ids, input_atts, output_ids, output_atts):
    input_part_targets_len = []
    llm_tokens = {"input_ids": [], "attention_mask": []}
    for i in range(input_ids.size(0)):
      this_input_ones = input_atts[i].sum()
      input_part_targets_len.append(this_input_ones)
      llm_tokens["input_ids"].append(torch.cat(
          [input_ids[i][:this_input_ones], output_ids[i][1:], input_ids[i][this_input_ones:]]))
      llm_tokens["attention_mask"].append(torch.cat(
          [input_atts[i][:this_input_ones], output_atts[i][1:], input_atts[i][this_input_ones:]]))
    llm_tokens["input_ids"] = torch.stack(llm_tokens["input_ids"])
    llm_tokens["attention_mask"] = torch.stack(llm_tokens["attention_mask"])
    return llm_tokens, input_part_targets_len

  def train(self, embeds, control_words, caps):
    """Returns (loss, HF logits of the packed sequence, its attention mask, targets)."""
    inputs_llm = self.llm_proj(embeds)
    atts_llm = torch.ones(inputs_llm.size()[:-1], dtype=torch.long)
    self.llm_tokenizer.padding_side = "right"
    self.llm_tokenizer.truncation_side = "left"
    text_input_tokens = self.llm_tokenizer(control_words, return_tensors="pt", padding="longest",
                                           truncation=True, max_length=self.max_txt_len)
    self.llm_tokenizer.truncation_side = "right"
    text_output_tokens = self.llm_tokenizer(
        [t + self.llm_tokenizer.eos_token for t in caps], return_tensors="pt",
        padding="longest", truncation=True, max_length=self.max_output_txt_len)
    llm_tokens, input_part_targets_len = self.concat_text_input_output(
        text_input_tokens.input_ids, text_input_tokens.attention_mask,
        text_output_tokens.input_ids, text_output_tokens.attention_mask)
    targets = llm_tokens["input_ids"].masked_fill(
        llm_tokens["input_ids"] == self.llm_tokenizer.pad_token_id, -100)
    for i, l in enumerate(input_part_targets_len):
      targets[i][:l] = -100
    empty_targets = torch.ones(atts_llm.size(), dtype=torch.long).fill_(-100)
    targets = torch.cat([empty_targets, targets], dim=1)
    inputs_embeds = self.llm_model.get_input_embeddings()(llm_tokens["input_ids"])
    inputs_embeds = torch.cat([inputs_llm, inputs_embeds], dim=1)
    attention_mask = torch.cat([atts_llm, llm_tokens["attention_mask"]], dim=1)
    outputs = self.llm_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                             return_dict=True, labels=targets)
    return outputs.loss, outputs.logits, attention_mask, targets

  def generate(self, embeds, control_words, **llm_kwargs):
    self.llm_tokenizer.padding_side = "left"
    inputs_llm = self.llm_proj(embeds)
    atts_llm = torch.ones(inputs_llm.size()[:-1], dtype=torch.long)
    llm_tokens = self.llm_tokenizer(control_words, padding="longest", return_tensors="pt")
    inputs_embeds = self.llm_model.get_input_embeddings()(llm_tokens.input_ids)
    inputs_embeds = torch.cat([inputs_llm, inputs_embeds], dim=1)
    attention_mask = torch.cat([atts_llm, llm_tokens.attention_mask], dim=1)
    outputs = self.llm_model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                      output_scores=True, return_dict_in_generate=True,
                                      **llm_kwargs)
    sequences = outputs.sequences.clone()
    sequences[sequences == 0] = 2  # convert output id 0 to 2 (eos_token_id)
    return sequences.numpy(), torch.exp(outputs.sequences_scores).numpy()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("vicuna")
  tok_dir = write_llama_tokenizer(tmp / "vicuna")
  ref_tok = lavis_tokenizer(tok_dir)
  ours_tok = llm_tokenizer(tok_dir, LAVIS_VICUNA_TOKENS)   # what the converter saves
  assert len(ref_tok) == len(ours_tok) == 71
  vocab = len(ref_tok)
  cfg = transformers.LlamaConfig(vocab_size=70, hidden_size=D, intermediate_size=40,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500.0,
                                 max_position_embeddings=128, tie_word_embeddings=False,
                                 bos_token_id=1, eos_token_id=2, pad_token_id=0)
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(cfg).eval()
  hf.resize_token_embeddings(vocab)   # LAVIS: the "[PAD]" row
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
      elif "embed" in name:
        p.copy_(torch.randn(p.shape, generator=gen))
      else:
        p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
    hf.lm_head.weight.mul_(3.0)
    hf.lm_head.weight[2] *= 1.6      # eos reachable within 20 tokens
  llm_proj = torch.nn.Linear(DQ, D)
  with torch.no_grad():
    llm_proj.weight.copy_(torch.randn(D, DQ, generator=gen) / DQ ** 0.5)
    llm_proj.bias.copy_(torch.randn(D, generator=gen) * 0.3)
  ref = VicunaLLMForward(hf, llm_proj, ref_tok, MAX_TXT, MAX_OUT)

  config = config_lib.load(os.path.join(ROOT, "configs", "dynrefer_vicuna_vg.py:smoke"), [
      f"model.num_query_tokens={Q}", f"model.lm.vocab_size={vocab}",
      f"model.lm.hidden_size={D}", "model.lm.intermediate_size=40", "model.lm.num_layers=2",
      "model.lm.num_heads=4", "model.lm.num_kv_heads=2", "model.lm.head_dim=8",
      "model.lm.rms_norm_eps=1e-5", "model.lm.rope_theta=500.0", "model.text.vocab_size=64"])
  ids = {k: np.full((3, config.model.text.context_length), 5, np.int32)
         for k in ("tags", "attributes", "classes")}
  model = dynrefer_lib.DynRefer(config.model, ids, rngs=nnx.Rngs(0))
  graphdef, params, _ = functional.split(model)
  flat = functional.flatten(params)
  llm = convert_llama({k: v.detach().numpy() for k, v in hf.state_dict().items()},
                      expected_shapes(params["llm_model"]))
  flat.update({"llm_model/" + k: jnp.asarray(v) for k, v in llm.items()})
  flat["llm_proj/kernel"] = jnp.asarray(llm_proj.weight.detach().numpy().T)
  flat["llm_proj/bias"] = jnp.asarray(llm_proj.bias.detach().numpy())
  z = np.random.RandomState(0).randn(len(GEN_CONTROLS), Q, DQ).astype(np.float32)
  return dict(ref=ref, ref_tok=ref_tok, tok=ours_tok, tok_dir=tok_dir, graphdef=graphdef,
              params=functional.unflatten(flat), z=z)


def test_tokenisation_is_the_originals(world):
  """Controls: <s> (LAVIS's "</s>", id 2) + the string's pieces, truncated on the left;
  captions: the pieces + eos, as the transcription's packed ids and SentencePiece say."""
  tok, ref_tok = world["tok"], world["ref_tok"]
  sp = spm.SentencePieceProcessor(model_file=os.path.join(world["tok_dir"], "tokenizer.model"))
  cids, cmask = captions.encode_controls(tok, CONTROLS, MAX_TXT, "llama")
  yids, ymask = captions.encode_captions(tok, CAPTIONS, MAX_OUT, "llama")
  ref_tok.truncation_side = "left"
  ref_in = ref_tok(CONTROLS, truncation=True, max_length=MAX_TXT).input_ids
  ref_tok.truncation_side = "right"
  ref_out = ref_tok([c + ref_tok.eos_token for c in CAPTIONS], truncation=True,
                    max_length=MAX_OUT + 1).input_ids
  for i in range(len(CONTROLS)):
    assert list(cids[i][cmask[i]]) == ref_in[i]
    pieces = sp.encode(CONTROLS[i])
    assert ref_in[i] == [2] + pieces[max(0, len(pieces) - (MAX_TXT - 1)):]
    want = ref_out[i][1:]
    if want[-1] != 2:  # truncated: the original loses the eos (max 256 tokens: never in VG)
      want = want[:-1] + [2]
    assert list(yids[i][ymask[i]]) == want
    assert want == sp.encode(CAPTIONS[i])[:MAX_OUT - 1] + [2]
  assert not cmask[1].all() and cmask[2].all() and ymask[2].all()  # padding and truncation
  assert (cids[~cmask] == 70).all() and (yids[~ymask] == 70).all()     # "[PAD]"


def test_prefix_loss_and_logits_match_dynrefer_vicuna(world):
  tok = world["tok"]
  cids, cmask = captions.encode_controls(tok, CONTROLS, MAX_TXT, "llama")
  caps = CAPTIONS[:2] + [" ".join(CAPTIONS[2].split()[:4])]  # no truncation: the same ids
  yids, ymask = captions.encode_captions(tok, caps, MAX_OUT, "llama")
  assert not ymask[:, -1].any()

  @jax.jit
  def ours(p):
    model = functional.merge(world["graphdef"], p)
    prefix, pmask = model.lm_inputs(jnp.asarray(world["z"][:3]), jnp.asarray(cids),
                                    jnp.asarray(cmask))
    return model.language_model(prefix, pmask, jnp.asarray(yids), jnp.asarray(ymask))

  loss, logits = ours(world["params"])
  with torch.no_grad():
    ref_loss, ref_logits, _, targets = world["ref"].train(torch.from_numpy(world["z"][:3]),
                                                          CONTROLS, caps)
  np.testing.assert_allclose(float(loss), ref_loss.item(), rtol=1e-5)
  ref_logits, targets = ref_logits.numpy(), targets.numpy()
  scale = np.abs(ref_logits).max()
  checked = 0
  for i in range(len(caps)):
    cap_pos = np.flatnonzero(targets[i] != -100)     # the caption tokens in the packed row
    assert list(targets[i][cap_pos]) == list(yids[i][ymask[i]])
    got = np.asarray(logits)[i][ymask[i]]
    want = ref_logits[i][cap_pos - 1]                # predicted from the previous position
    assert np.abs(got - want).max() <= 1e-5 * scale
    checked += len(cap_pos)
  assert checked == int(ymask.sum())


def test_beam_search_matches_transformers_generate(world):
  """2 beams, 20 new tokens, min_length 1, repetition penalty 1.5, length penalty 0."""
  tok = world["tok"]
  settings = dict(num_beams=2, max_new_tokens=20, min_length=1, repetition_penalty=1.5,
                  length_penalty=0.0)
  # The original's inference tokenises the control words without truncation; our
  # config.data.control_len must hold them (32 in the real configs).
  cids, cmask = captions.encode_controls(tok, GEN_CONTROLS, 32, "llama")
  assert not cmask[:, -1].any()

  @jax.jit
  def ours(p):
    model = functional.merge(world["graphdef"], p)
    return model.caption(jnp.asarray(world["z"]), jnp.asarray(cids), jnp.asarray(cmask),
                         **settings, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, decoder_start_token_id=tok.pad_token_id)

  ids, scores = (np.asarray(a) for a in ours(world["params"]))
  with torch.no_grad():
    ref_ids, ref_scores = world["ref"].generate(torch.from_numpy(world["z"]), GEN_CONTROLS,
                                                do_sample=False, **settings)
  ended = 0
  for i in range(len(GEN_CONTROLS)):
    row = list(ref_ids[i])
    n = row.index(2) + 1 if 2 in row else len(row)
    assert list(ids[i][:n]) == row[:n], (i, ids[i], row)
    ended += 2 in row
  assert 0 < ended < len(GEN_CONTROLS), (ended, ids)  # both the EOS and the max-length ends
  np.testing.assert_allclose(np.exp(scores), ref_scores, rtol=1e-4)
  # The captions the predictor writes: batch_decode(skip_special_tokens) of those ids.
  assert tok.batch_decode(ids, skip_special_tokens=True) == \
      world["ref_tok"].batch_decode(ref_ids, skip_special_tokens=True)
