"""Hugging Face Llama-format checkpoints (LlamaForCausalLM: LLaMA, Vicuna, Llama 3;
Qwen2ForCausalLM; MistralForCausalLM without a sliding window) -> models/llama.Llama.

    lm = lm_config(read_hf_config("vicuna-7b-v1.5/"))        # config.model.lm (kind "llama")
    flat = convert_llama(load_state_dict("vicuna-7b-v1.5/"), expected_shapes(params))

`rules(src, dst)` prefixes sources/targets (the original's Vicuna variant stores the LLM under
`llm_model.`); `dynrefer_rules()` maps its trainable `llm_proj` (and drops `cem_memory`, which
dynrefer_vicuna.py creates but never uses). `resize_vocab` appends rows for tokens a tokenizer
gained (LAVIS adds "[PAD]" to Vicuna's 32000), as transformers' `resize_token_embeddings` does
with `mean_resizing`: the mean of the existing rows.
"""

from __future__ import annotations

import json
import os
import re
from typing import Mapping

import numpy as np

from dynrefer_jax.convert.common import Rule, convert

# Model types whose checkpoints have the Llama layout and semantics (HF modeling files).
SUPPORTED = ("llama", "qwen2", "mistral")


def rules(src: str = "", dst: str = "", *, tied: bool = False) -> list[Rule]:
  """Biases (q/k/v for Qwen2, q/k/v/o for Llama's attention_bias) map when present; whether the
  target has them is `expected`'s business (an unexpected one is an 'unused' key)."""
  s, d = re.escape(src), dst
  layer = rf"{s}model\.layers\.(\d+)"
  return [
      Rule(rf"{s}model\.embed_tokens\.weight", f"{d}embed_tokens"),
      Rule(rf"{s}model\.norm\.weight", f"{d}norm/scale"),
      Rule(rf"{s}lm_head\.weight", None if tied else f"{d}lm_head/kernel", "linear"),
      Rule(rf"{layer}\.self_attn\.([qkvo])_proj\.weight", d + "layers/{0}/{1}/kernel", "linear"),
      Rule(rf"{layer}\.self_attn\.([qkvo])_proj\.bias", d + "layers/{0}/{1}/bias"),
      Rule(rf"{layer}\.mlp\.(gate|up|down)_proj\.weight", d + "layers/{0}/{1}/kernel", "linear"),
      Rule(rf"{layer}\.input_layernorm\.weight", d + "layers/{0}/input_norm/scale"),
      Rule(rf"{layer}\.post_attention_layernorm\.weight", d + "layers/{0}/post_norm/scale"),
      # Rotary frequencies are recomputed from rope_theta; old checkpoints carry them.
      Rule(rf"{s}model\.(?:layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq", None),
  ]


def dynrefer_rules(dst: str = "") -> list[Rule]:
  """The Vicuna variant's projection from the Q-Former width to the LLM width. Its
  `cem_memory` (zeros, trainable, never read by dynrefer_vicuna.py's forward) is dropped."""
  return [Rule(r"llm_proj\.weight", f"{dst}llm_proj/kernel", "linear"),
          Rule(r"llm_proj\.bias", f"{dst}llm_proj/bias"),
          Rule(r"cem_memory", None)]


def convert_llama(state: Mapping[str, np.ndarray],
                  expected: Mapping[str, tuple[int, ...]] | None,
                  *, source_name: str = "Llama checkpoint") -> dict[str, np.ndarray]:
  """HF state dict -> {our '/'-joined path: array}; tied when `expected` has no lm_head. When
  `expected`'s vocabulary is larger than the checkpoint's (tokens added to the tokenizer), the
  embedding and lm_head gain mean rows (`resize_vocab`)."""
  tied = expected is not None and "lm_head/kernel" not in expected
  if expected is not None and "embed_tokens" in expected:
    src = state.get("model.embed_tokens.weight")
    want = expected["embed_tokens"][0]
    if src is not None and src.shape[0] < want:
      state = resize_vocab(state, want)
  return convert(state, rules(tied=tied), expected, source_name=source_name)


def resize_vocab(state: Mapping[str, np.ndarray], vocab_size: int) -> dict[str, np.ndarray]:
  """The HF state dict with `model.embed_tokens.weight` [V, d] and `lm_head.weight` [V, d]
  grown to vocab_size rows, each new row the mean of the old ones (transformers'
  resize_token_embeddings(mean_resizing=True); LAVIS's 2023 transformers drew them from
  N(0, 0.02), which no conversion can reproduce. The added "[PAD]" is never attended to nor a
  target, so only its generation logit depends on the choice, and the mean keeps it ordinary)."""
  out = dict(state)
  for key in ("model.embed_tokens.weight", "lm_head.weight"):
    if key in out:
      w = np.asarray(out[key])
      extra = vocab_size - w.shape[0]
      if extra < 0:
        raise ValueError(f"{key} has {w.shape[0]} rows, more than the vocabulary {vocab_size}")
      mean = w.astype(np.float32).mean(0, keepdims=True).astype(w.dtype)
      out[key] = np.concatenate([w, np.repeat(mean, extra, 0)], 0)
  return out


# ------------------------------------------------------------------------- configuration

def read_hf_config(path: str) -> dict:
  """config.json of a Hugging Face model folder (or the file itself)."""
  file = os.path.join(path, "config.json") if os.path.isdir(path) else path
  if not os.path.isfile(file):
    raise FileNotFoundError(f"no config.json in {path} (a Hugging Face Llama-format folder)")
  with open(file, encoding="utf-8") as f:
    return json.load(f)


def lm_config(hf: Mapping, *, vocab_size: int | None = None) -> dict:
  """config.model.lm for models/llama.Llama from a HF config.json dict. vocab_size: the
  tokenizer's size when it has more tokens than the checkpoint (the embedding is then resized).
  ValueError (one line) for what the Llama module does not implement."""
  kind = hf.get("model_type")
  if kind not in SUPPORTED:
    raise ValueError(f"model_type {kind!r} is not a Llama-format LLM ({', '.join(SUPPORTED)})")
  problems = []
  if hf.get("hidden_act", "silu") != "silu":
    problems.append(f"hidden_act {hf.get('hidden_act')!r} (only silu)")
  if hf.get("mlp_bias"):
    problems.append("mlp_bias")
  if kind == "qwen2" and hf.get("use_sliding_window"):
    problems.append("use_sliding_window")
  if kind == "mistral" and hf.get("sliding_window"):
    problems.append(f"sliding_window {hf['sliding_window']}")
  rope = dict(hf.get("rope_parameters") or {})        # transformers v5 layout
  theta = float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0)
  scaling = dict(hf.get("rope_scaling") or rope)
  scaling.pop("rope_theta", None)
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  if rope_type not in ("default", "llama3"):
    problems.append(f"rope scaling {rope_type!r} (default or llama3)")
  if problems:
    raise ValueError(f"{kind} config not supported: " + ", ".join(problems))
  heads = int(hf["num_attention_heads"])
  qkv_bias = True if kind == "qwen2" else bool(hf.get("attention_bias", False))
  vocab = int(hf["vocab_size"])
  return dict(
      kind="llama", vocab_size=max(vocab, int(vocab_size or 0)),
      hidden_size=int(hf["hidden_size"]), intermediate_size=int(hf["intermediate_size"]),
      num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta,
      rope_scaling=(dict(rope_type="llama3", **{k: float(scaling[k]) for k in (
          "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")})
                    if rope_type == "llama3" else {}),
      attention_bias=qkv_bias, o_bias=kind == "llama" and bool(hf.get("attention_bias", False)),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)))
