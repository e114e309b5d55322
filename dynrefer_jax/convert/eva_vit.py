"""Vision-tower converters: LAVIS `eva_vit_g.pth`, HF BLIP-2 vision, HF CLIP vision.

Each `convert_*(state_dict, expected)` takes a flat {torch key: np.ndarray} and the expected
{path: shape} of our `VisionTransformer` (e.g. `common.expected_shapes(params)`), and returns
{path: array} with paths inside the module (the caller adds e.g. `visual_encoder/`). Problems
(unmapped, unused, missing, mis-shaped keys) raise `common.ConversionError` naming every key.

Head count and depth are read from `expected`, so the tables work at any size.
Source layouts: CHECKPOINTS.md §2.1 (LAVIS) and §5 (LAVIS ↔ HF BLIP-2).
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from dynrefer_jax.convert.common import ConversionError, Rule, convert
from dynrefer_jax.models.eva_vit import interpolate_pos_embed

Shapes = Mapping[str, tuple[int, ...]]


# ---------------------------------------------------------------------------------------------
# Transforms that need the model's sizes.

def heads_from_expected(expected: Shapes, prefix: str = "blocks/0/attn/") -> tuple[int, int]:
  """(num_heads, head_dim) from the fused qkv kernel's expected shape [C, 3, H, D]."""
  shape = expected.get(prefix + "qkv_kernel")
  if shape is None:
    raise ConversionError(f"expected shapes lack {prefix}qkv_kernel: cannot infer the head count")
  return shape[2], shape[3]


def fused_qkv_kernel(num_heads: int, head_dim: int):
  """torch [3C, C] (out row s·C + h·D + d) → [C, 3, H, D]."""
  return lambda w: np.ascontiguousarray(w.T).reshape(w.shape[1], 3, num_heads, head_dim)


def fused_qkv_bias(num_heads: int, head_dim: int):
  """torch [3C] → [3, H, D]."""
  return lambda b: b.reshape(3, num_heads, head_dim)


def head_bias(num_heads: int, head_dim: int):
  """torch [C] (a q or v bias) → [H, D]."""
  return lambda b: b.reshape(num_heads, head_dim)


def out_kernel(num_heads: int, head_dim: int):
  """torch out-projection [C_out, C_in] (in index h·D + d) → [H, D, C_out]."""
  return lambda w: np.ascontiguousarray(w.T).reshape(num_heads, head_dim, w.shape[0])


def _flat(w: np.ndarray) -> np.ndarray:
  return w.reshape(-1)


def _pos_embed(expected: Shapes):
  """[1, E + g², C] or [E + g², C] → expected [1 + g'², C], bicubic-resized when g != g'
  (what LAVIS does before loading eva_vit_g.pth into a tower of another input size)."""
  target = expected.get("pos_embed")

  def fn(w: np.ndarray) -> np.ndarray:
    w = w.reshape(w.shape[-2], w.shape[-1])
    if target is not None and w.shape != tuple(target) and w.shape[1] == target[1]:
      new_grid = int(round((target[0] - 1) ** 0.5))
      if new_grid * new_grid == target[0] - 1:
        w = interpolate_pos_embed(w.astype(np.float32), new_grid)
    return w
  return fn


def block_rules(src: str, dst: str, names: Mapping[str, str], num_heads: int, head_dim: int,
                fused_bias: bool) -> list[Rule]:
  """Rules of one pre-LN block family. `src`: regex of the block prefix with one group (the
  index), e.g. r"blocks\\.(\\d+)\\."; `dst`: e.g. "blocks/{0}/"; `names`: torch sub-names for
  norm1, norm2, qkv, q_bias, v_bias, qkv_bias, out, fc1, fc2."""
  h, d = num_heads, head_dim
  rules = [
      Rule(src + names["norm1"] + r"\.weight", dst + "norm1/scale"),
      Rule(src + names["norm1"] + r"\.bias", dst + "norm1/bias"),
      Rule(src + names["norm2"] + r"\.weight", dst + "norm2/scale"),
      Rule(src + names["norm2"] + r"\.bias", dst + "norm2/bias"),
      Rule(src + names["qkv"] + r"weight", dst + "attn/qkv_kernel", fused_qkv_kernel(h, d)),
      Rule(src + names["out"] + r"\.weight", dst + "attn/out_kernel", out_kernel(h, d)),
      Rule(src + names["out"] + r"\.bias", dst + "attn/out_bias"),
      Rule(src + names["fc1"] + r"\.weight", dst + "mlp/fc1/kernel", "linear"),
      Rule(src + names["fc1"] + r"\.bias", dst + "mlp/fc1/bias"),
      Rule(src + names["fc2"] + r"\.weight", dst + "mlp/fc2/kernel", "linear"),
      Rule(src + names["fc2"] + r"\.bias", dst + "mlp/fc2/bias"),
  ]
  if fused_bias:
    rules.append(Rule(src + names["qkv"] + r"bias", dst + "attn/qkv_bias", fused_qkv_bias(h, d)))
  else:
    rules += [Rule(src + names["q_bias"], dst + "attn/q_bias", head_bias(h, d)),
              Rule(src + names["v_bias"], dst + "attn/v_bias", head_bias(h, d))]
  return rules


def _depth(expected: Shapes, pattern: str = r"blocks/(\d+)/") -> int:
  idx = [int(m.group(1)) for k in expected if (m := re.match(pattern, k))]
  return max(idx) + 1 if idx else 0


def drop_blocks_from(state: Mapping[str, np.ndarray], pattern: str, depth: int) -> dict:
  """Removes blocks with index >= depth (LAVIS builds 39 of EVA-CLIP-g's 40 blocks and loads
  with strict=False, so a file holding block 39 is valid). `pattern` has one group: the index."""
  regex = re.compile(pattern)
  return {k: v for k, v in state.items()
          if not ((m := regex.match(k)) and int(m.group(1)) >= depth)}


def fuse_separate_qkv(state: Mapping[str, np.ndarray], q: str = "q_proj", k: str = "k_proj",
                      v: str = "v_proj", fused: str = "qkv_proj") -> dict:
  """HF CLIP's separate q/k/v Linears → one `{fused}.weight [3C, C]` / `.bias [3C]`, the
  layout of our fused kernel. Incomplete triples are left alone so the engine names them."""
  out = dict(state)
  for key in list(state):
    m = re.fullmatch(rf"(.*)\.{q}\.(weight|bias)", key)
    if m is None:
      continue
    parts = [f"{m.group(1)}.{n}.{m.group(2)}" for n in (q, k, v)]
    if all(p in out for p in parts):
      out[f"{m.group(1)}.{fused}.{m.group(2)}"] = np.concatenate([out.pop(p) for p in parts], 0)
  return out


def strip_prefix(state: Mapping[str, np.ndarray], prefix: str) -> dict:
  if not prefix:
    return dict(state)
  return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


# ---------------------------------------------------------------------------------------------
# (a) LAVIS eva_vit_g.pth (also the `visual.` half of eva_clip_psz14.pt, prefix="visual.").

_LAVIS_BLOCK = dict(norm1=r"norm1", norm2=r"norm2", qkv=r"attn\.qkv\.", q_bias=r"attn\.q_bias",
                    v_bias=r"attn\.v_bias", out=r"attn\.proj", fc1=r"mlp\.fc1", fc2=r"mlp\.fc2")


def lavis_eva_vit_rules(expected: Shapes) -> list[Rule]:
  h, d = heads_from_expected(expected)
  return [
      Rule(r"cls_token", "cls_token", _flat),
      Rule(r"pos_embed", "pos_embed", _pos_embed(expected)),
      Rule(r"patch_embed\.proj\.weight", "patch_embed/kernel", "conv2d"),
      Rule(r"patch_embed\.proj\.bias", "patch_embed/bias"),
      *block_rules(r"blocks\.(\d+)\.", "blocks/{0}/", _LAVIS_BLOCK, h, d, fused_bias=False),
      # EVA-CLIP's final norm and projection head: LAVIS comments them out (CHECKPOINTS §2.1).
      Rule(r"(norm|fc_norm|head)\.(weight|bias)", None),
  ]


def convert_lavis_eva_vit(state_dict: Mapping[str, np.ndarray], expected: Shapes, *,
                          prefix: str = "") -> dict[str, np.ndarray]:
  """LAVIS `eva_vit_g.pth` (keys without prefix; `prefix="visual_encoder."` for a BLIP-2 /
  DynRefer model dict whose vision keys were selected, `"visual."` for eva_clip_psz14.pt's
  vision keys). Blocks beyond the expected depth and the final norm/head are dropped, as LAVIS's
  strict=False load does; `pos_embed` is bicubic-resized to the expected grid."""
  state = drop_blocks_from(strip_prefix(state_dict, prefix), r"blocks\.(\d+)\.",
                           _depth(expected))
  return convert(state, lavis_eva_vit_rules(expected), expected, source_name="LAVIS eva_vit")


# ---------------------------------------------------------------------------------------------
# (b) HF Blip2VisionModel (`vision_model.` prefix optional).

_HF_BLIP2_BLOCK = dict(norm1=r"layer_norm1", norm2=r"layer_norm2", qkv=r"self_attn\.qkv\.",
                       q_bias=r"self_attn\.q_bias", v_bias=r"self_attn\.v_bias",
                       out=r"self_attn\.projection", fc1=r"mlp\.fc1", fc2=r"mlp\.fc2")


def split_blip2_qkv_bias(state: Mapping[str, np.ndarray]) -> dict:
  """HF's fused `qkv.bias [3C]` = concat(q_bias, 0, v_bias) → `q_bias`, `v_bias` (older Hub
  uploads store those two directly). A non-zero k third cannot be represented: error."""
  out = dict(state)
  for key in list(state):
    m = re.fullmatch(r"(.*\.self_attn)\.qkv\.bias", key)
    if m is None:
      continue
    b = out.pop(key)
    c = b.shape[0] // 3
    if np.any(b[c:2 * c] != 0):
      raise ConversionError(f"{key}: the k third of the fused qkv bias is not zero; an EVA "
                            "tower has no k bias (use qkv_bias='qkv')")
    out[m.group(1) + ".q_bias"], out[m.group(1) + ".v_bias"] = b[:c], b[2 * c:]
  return out


def hf_blip2_vision_rules(expected: Shapes) -> list[Rule]:
  h, d = heads_from_expected(expected)
  # post_layernorm is LAVIS's ln_vision: ours only with post_norm=True; DynRefer's composition
  # keeps ln_vision outside the tower and reads these keys itself.
  ln_post = "ln_post/scale" in expected
  return [
      Rule(r"embeddings\.class_embedding", "cls_token", _flat),
      Rule(r"embeddings\.position_embedding", "pos_embed", _pos_embed(expected)),
      Rule(r"embeddings\.patch_embedding\.weight", "patch_embed/kernel", "conv2d"),
      Rule(r"embeddings\.patch_embedding\.bias", "patch_embed/bias"),
      *block_rules(r"encoder\.layers\.(\d+)\.", "blocks/{0}/", _HF_BLIP2_BLOCK, h, d,
                   fused_bias=False),
      Rule(r"post_layernorm\.weight", "ln_post/scale" if ln_post else None),
      Rule(r"post_layernorm\.bias", "ln_post/bias" if ln_post else None),
  ]


def convert_hf_blip2_vision(state_dict: Mapping[str, np.ndarray], expected: Shapes, *,
                            prefix: str = "vision_model.") -> dict[str, np.ndarray]:
  """HF `Blip2VisionModel` state dict (or the `vision_model.*` keys of
  `Blip2ForConditionalGeneration`). `post_layernorm.*` fills `ln_post` when the module has one,
  and is otherwise left to the caller (it is DynRefer's `ln_vision`)."""
  state = split_blip2_qkv_bias(strip_prefix(state_dict, prefix))
  return convert(state, hf_blip2_vision_rules(expected), expected, source_name="HF Blip2 vision")


# ---------------------------------------------------------------------------------------------
# (c) HF CLIPVisionModel (`vision_model.` prefix optional).

_HF_CLIP_BLOCK = dict(norm1=r"layer_norm1", norm2=r"layer_norm2", qkv=r"self_attn\.qkv_proj\.",
                      q_bias="", v_bias="", out=r"self_attn\.out_proj", fc1=r"mlp\.fc1",
                      fc2=r"mlp\.fc2")


def hf_clip_vision_rules(expected: Shapes) -> list[Rule]:
  h, d = heads_from_expected(expected)
  ln_post = "ln_post/scale" in expected
  return [
      Rule(r"embeddings\.class_embedding", "cls_token", _flat),
      Rule(r"embeddings\.position_embedding\.weight", "pos_embed", _pos_embed(expected)),
      Rule(r"embeddings\.patch_embedding\.weight", "patch_embed/kernel", "conv2d"),
      Rule(r"embeddings\.position_ids", None),
      Rule(r"pre_layrnorm\.weight", "ln_pre/scale"),  # (sic) HF's spelling
      Rule(r"pre_layrnorm\.bias", "ln_pre/bias"),
      *block_rules(r"encoder\.layers\.(\d+)\.", "blocks/{0}/", _HF_CLIP_BLOCK, h, d,
                   fused_bias=True),
      # HF applies it to the pooled CLS only; ours applies it to all tokens when post_norm=True.
      Rule(r"post_layernorm\.weight", "ln_post/scale" if ln_post else None),
      Rule(r"post_layernorm\.bias", "ln_post/bias" if ln_post else None),
  ]


def convert_hf_clip_vision(state_dict: Mapping[str, np.ndarray], expected: Shapes, *,
                           prefix: str = "vision_model.") -> dict[str, np.ndarray]:
  """HF `CLIPVisionModel`. HF applies post_layernorm only to the pooled CLS token, so a module
  matching `last_hidden_state` has post_norm=False and `post_layernorm.*` is dropped; with
  post_norm=True it fills `ln_post` (then output[:, 0] == HF pooler_output)."""
  state = fuse_separate_qkv(strip_prefix(state_dict, prefix))
  return convert(state, hf_clip_vision_rules(expected), expected, source_name="HF CLIP vision")
