"""PyTorch reference modules and key layouts shared by several tests, written from
CHECKPOINTS.md and SPEC.md (not from our code): the EVA-CLIP / OpenCLIP text tower, the LAVIS key
names of an EVA ViT block built from transformers' Blip2VisionModel state_dict, and the DCNv4
alignment written with grid_sample."""

import numpy as np
import torch
import torch.nn.functional as F


class EvaTextBlock(torch.nn.Module):
  """OpenCLIP/EVA-CLIP ResidualAttentionBlock as CHECKPOINTS.md §4 describes it (ln_1, attn =
  nn.MultiheadAttention, ln_2, mlp.c_fc / GELU / mlp.c_proj)."""

  def __init__(self, width: int, heads: int, mlp: int):
    super().__init__()
    self.ln_1 = torch.nn.LayerNorm(width, eps=1e-5)
    self.attn = torch.nn.MultiheadAttention(width, heads)
    self.ln_2 = torch.nn.LayerNorm(width, eps=1e-5)
    self.mlp = torch.nn.Sequential()
    self.mlp.add_module("c_fc", torch.nn.Linear(width, mlp))
    self.mlp.add_module("gelu", torch.nn.GELU())
    self.mlp.add_module("c_proj", torch.nn.Linear(mlp, width))

  def forward(self, x, mask):  # x: [L, N, W] (nn.MultiheadAttention's sequence-first layout)
    h = self.ln_1(x)
    x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
    return x + self.mlp(self.ln_2(x))


class EvaText(torch.nn.Module):
  """EVA-CLIP TextTransformer (CHECKPOINTS.md §4): causal blocks, ln_final, argmax-EOT pooling,
  x @ text_projection, no normalisation. Positions and projection start at zero: set them."""

  def __init__(self, *, vocab: int, context: int, width: int, heads: int, mlp: int, depth: int,
               out: int):
    super().__init__()
    self.token_embedding = torch.nn.Embedding(vocab, width)
    self.positional_embedding = torch.nn.Parameter(torch.zeros(context, width))
    self.transformer = torch.nn.Module()
    self.transformer.resblocks = torch.nn.ModuleList(
        [EvaTextBlock(width, heads, mlp) for _ in range(depth)])
    self.ln_final = torch.nn.LayerNorm(width, eps=1e-5)
    self.text_projection = torch.nn.Parameter(torch.zeros(width, out))

  def forward(self, ids):
    n, length = ids.shape
    x = self.token_embedding(ids) + self.positional_embedding[:length]
    mask = torch.full((length, length), float("-inf")).triu(1)
    x = x.permute(1, 0, 2)
    for block in self.transformer.resblocks:
      x = block(x, mask)
    x = self.ln_final(x.permute(1, 0, 2))
    return x[torch.arange(n), ids.argmax(-1)] @ self.text_projection


def lavis_vit_block(sd: dict, i: int, width: int) -> dict:
  """Block i of a Blip2VisionModel state_dict (numpy) under LAVIS's names (`blocks.{i}.`): the
  fused qkv weight, and the q and v biases (EVA has no k bias)."""
  hf, lv = f"encoder.layers.{i}.", f"blocks.{i}."
  out = {}
  for part in ("weight", "bias"):
    for a, b in (("layer_norm1", "norm1"), ("layer_norm2", "norm2"),
                 ("self_attn.projection", "attn.proj"), ("mlp.fc1", "mlp.fc1"),
                 ("mlp.fc2", "mlp.fc2")):
      out[lv + f"{b}.{part}"] = sd[hf + f"{a}.{part}"]
  out[lv + "attn.qkv.weight"] = sd[hf + "self_attn.qkv.weight"]
  qkv_bias = np.asarray(sd[hf + "self_attn.qkv.bias"])
  out[lv + "attn.q_bias"], out[lv + "attn.v_bias"] = qkv_bias[:width], qkv_bias[2 * width:]
  return out


def grid_sample_pixels(img, rows, cols):
  """Bilinear, zero padding, pixel i at coordinate i. img [M, c, H, W]; rows/cols [M, H, W]."""
  h, w = img.shape[-2:]
  grid = torch.stack([(cols + 0.5) / w * 2 - 1, (rows + 0.5) / h * 2 - 1], dim=-1)
  return F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def deformable_align(p, x, ref, groups: int):
  """DCNv4 alignment, SPEC §4 steps 1-5, with the released key names (CHECKPOINTS.md).

  p: torch tensors by key (value_proj, offset_mask_dw, offset_mask, output_proj); x, ref: torch
  [M, H, W, C]. Returns (aligned [M, H, W, C], the offset/modulation map [M, H, W, 27·groups]).
  """
  m, h, w, c = x.shape
  value = F.linear(x, p["value_proj.weight"], p["value_proj.bias"]).permute(0, 3, 1, 2)
  cat = torch.cat([x, ref], dim=-1).permute(0, 3, 1, 2)
  feat = F.conv2d(cat, p["offset_mask_dw.weight"], p["offset_mask_dw.bias"], padding=1,
                  groups=c).permute(0, 2, 3, 1)
  om = F.linear(feat, p["offset_mask.weight"], p["offset_mask.bias"])
  hh, ww = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype),
                          indexing="ij")
  cg = c // groups
  outs = []
  for g in range(groups):
    base = g * 27
    acc = 0
    for i in range(3):
      for j in range(3):
        k = i * 3 + j
        dx, dy, mod = om[..., base + 2 * k], om[..., base + 2 * k + 1], om[..., base + 18 + k]
        s = grid_sample_pixels(value[:, g * cg:(g + 1) * cg], hh - 1 + j + dy, ww - 1 + i + dx)
        acc = acc + s * mod[:, None]
    outs.append(acc)
  sampled = torch.cat(outs, dim=1).permute(0, 2, 3, 1)
  return F.linear(sampled, p["output_proj.weight"], p["output_proj.bias"]), om
