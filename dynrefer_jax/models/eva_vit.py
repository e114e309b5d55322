"""The frozen vision tower: EVA-CLIP ViT-g/14 as LAVIS packages it (SPEC §1), or OpenAI CLIP ViT.

One pre-LN transformer class covers both by configuration:

| config            | EVA ViT-g (DynRefer default) | OpenAI CLIP ViT-L/14             |
|-------------------|------------------------------|----------------------------------|
| width/depth/heads | 1408 / 39 / 16               | 1024 / 24 / 16                   |
| mlp_dim           | 6144                         | 4096                             |
| qkv_bias          | "qv" (q and v, no k bias)    | "qkv"                            |
| act               | "gelu" (exact)               | "quick_gelu"                     |
| ln_eps            | 1e-6                         | 1e-5                             |
| pre_norm          | False                        | True (ln_pre)                    |
| patch_bias        | True                         | False                            |

Output semantics: with `post_norm=False` the output is the last block's residual stream, all
1 + P tokens (CLS first, then patches row-major). That is LAVIS `VisionTransformer` (depth 39,
i.e. EVA-CLIP-g's penultimate layer; LAVIS has no final norm), HF `Blip2VisionModel`'s
`hidden_states[-1]`, and HF `CLIPVisionModel`'s `last_hidden_state` (which includes ln_pre but
not post_layernorm). With `post_norm=True` a LayerNorm `ln_post` is applied to every token: that
is HF `Blip2VisionModel.last_hidden_state` (its `post_layernorm` is LAVIS's `ln_vision`), and
at the CLS token HF `CLIPVisionModel.pooler_output`. DynRefer keeps `ln_vision` outside this
module (eps 1e-5, loaded from the BLIP-2 checkpoint), so its tower uses post_norm=False.

Attention parameters are stored fused, `qkv_kernel: [C, 3, H, D]` (the layout of LAVIS's
`attn.qkv.weight` and of `nn.MultiheadAttention.in_proj_weight`), so one matmul makes q, k, v.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dynrefer_jax.models import fp8 as fp8_lib
from dynrefer_jax.models import layers


class Attention(nnx.Module):
  """Multi-head self-attention with a fused qkv kernel.

  qkv_bias: "qkv" (one bias per q, k, v: `qkv_bias[3, H, D]`), "qv" (EVA/BEiT: `q_bias[H, D]`
  and `v_bias[H, D]`, the k bias is identically zero and not a parameter) or "none".
  fp8: the fp8 recipe of the qkv and output matmuls (`fp8.RECIPES`; False = compute dtype).
  attention: `layers.dot_product_attention`'s implementation ("auto", "xla" or "cudnn").
  """

  def __init__(self, width: int, num_heads: int, *, qkv_bias: str = "qkv", fp8=False,
               attention: str = "auto", dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if attention not in layers.ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"attention must be one of {layers.ATTENTION_IMPLEMENTATIONS}, got "
                       f"{attention!r}")
    if width % num_heads:
      raise ValueError(f"width {width} not divisible by num_heads {num_heads}")
    if qkv_bias not in ("qkv", "qv", "none"):
      raise ValueError(f"qkv_bias must be 'qkv', 'qv' or 'none', got {qkv_bias!r}")
    head_dim = width // num_heads
    self.num_heads, self.head_dim, self.qkv_bias_mode = num_heads, head_dim, qkv_bias
    self.attention = attention  # a plain str: static, one graphdef for all blocks
    self.dtype = dtype
    self.fp8 = fp8_lib.recipe(fp8)  # a plain str or None: static, one graphdef for all blocks
    # PyTorch nn.Linear default init; the tower is loaded from checkpoints in practice.
    bound = 1.0 / math.sqrt(width)
    uniform = lambda key, shape, dt=jnp.float32: jax.random.uniform(key, shape, dt, -bound, bound)
    self.qkv_kernel = layers.param(rngs, uniform, (width, 3, num_heads, head_dim),
                                   ("embed", None, "heads", "kv"), param_dtype)
    def bias(shape, axes):
      return layers.param(rngs, layers.zeros, shape, axes, param_dtype)
    hd = (num_heads, head_dim)
    self.qkv_bias = bias((3, *hd), (None, "heads", "kv")) if qkv_bias == "qkv" else None
    self.q_bias = bias(hd, ("heads", "kv")) if qkv_bias == "qv" else None
    self.v_bias = bias(hd, ("heads", "kv")) if qkv_bias == "qv" else None
    self.out_kernel = layers.param(rngs, uniform, (num_heads, head_dim, width),
                                   ("heads", "kv", "embed"), param_dtype)
    self.out_bias = layers.param(rngs, layers.torch_linear_bias(width), (width,), ("embed",),
                                 param_dtype)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """x: float[B, L, C]; mask: bool, broadcastable to [B, H, L, L], True = attend.

    Returns float[B, L, C].
    """
    dtype = self.dtype or x.dtype
    qkv = fp8_lib.dense(x, self.qkv_kernel[...], recipe=self.fp8, role="qkv", dtype=dtype)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.qkv_bias is not None:
      bias = self.qkv_bias[...].astype(dtype)
      q, k, v = q + bias[0], k + bias[1], v + bias[2]
    elif self.q_bias is not None:
      q = q + self.q_bias[...].astype(dtype)
      v = v + self.v_bias[...].astype(dtype)
    out = layers.dot_product_attention(q, k, v, mask=mask, implementation=self.attention)
    return fp8_lib.dense(out, self.out_kernel[...], self.out_bias[...], contract=2,
                         recipe=self.fp8, role="out", dtype=dtype)


class Mlp(nnx.Module):
  """fc1 → activation → fc2; fp8: the recipe of both matmuls (False = compute dtype)."""

  def __init__(self, width: int, mlp_dim: int, *, act: str, fp8=False, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.fc1 = layers.Dense(width, mlp_dim, axes=("embed", "mlp"), dtype=dtype,
                            param_dtype=param_dtype, rngs=rngs)
    self.fc2 = layers.Dense(mlp_dim, width, axes=("mlp", "embed"), dtype=dtype,
                            param_dtype=param_dtype, rngs=rngs)
    self.act = layers.ACTIVATIONS[act]
    self.fp8, self.dtype = fp8_lib.recipe(fp8), dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: float[..., C] → float[..., C]."""
    if self.fp8 is None:
      return self.fc2(self.act(self.fc1(x)))
    dtype = self.dtype or x.dtype
    h = fp8_lib.dense(x, self.fc1.kernel[...], self.fc1.bias[...], recipe=self.fp8, role="fc1",
                      dtype=dtype)
    return fp8_lib.dense(self.act(h), self.fc2.kernel[...], self.fc2.bias[...],
                         recipe=self.fp8, role="fc2", dtype=dtype)


class Block(nnx.Module):
  """Pre-LN residual block: x + attn(norm1(x)), then x + mlp(norm2(x)). Shared by the text tower."""

  def __init__(self, width: int, num_heads: int, mlp_dim: int, *, qkv_bias: str, act: str,
               ln_eps: float, fp8=False, attention: str = "auto", dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.norm1 = layers.LayerNorm(width, eps=ln_eps, param_dtype=param_dtype, rngs=rngs)
    self.attn = Attention(width, num_heads, qkv_bias=qkv_bias, fp8=fp8, attention=attention,
                          dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm2 = layers.LayerNorm(width, eps=ln_eps, param_dtype=param_dtype, rngs=rngs)
    self.mlp = Mlp(width, mlp_dim, act=act, fp8=fp8, dtype=dtype, param_dtype=param_dtype,
                   rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    x = x + self.attn(self.norm1(x), mask).astype(x.dtype)
    return x + self.mlp(self.norm2(x)).astype(x.dtype)


def _torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """float64[out, in]: PyTorch's 1-D bicubic resampling (align_corners=False, A=-0.75, no
  antialias, border indices clamped) written as a matrix, so 2-D resize is `M @ X @ M.T`."""
  a = -0.75
  def cubic(t):  # Keys' convolution kernel, as in ATen's upsample_bicubic2d.
    t = abs(t)
    if t <= 1:
      return ((a + 2) * t - (a + 3)) * t * t + 1
    if t < 2:
      return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return 0.0
  scale = in_size / out_size
  m = np.zeros((out_size, in_size), np.float64)
  for o in range(out_size):
    src = (o + 0.5) * scale - 0.5  # not clamped at 0 for cubic, unlike bilinear.
    base = math.floor(src)
    frac = src - base
    for tap in range(-1, 3):
      m[o, min(max(base + tap, 0), in_size - 1)] += cubic(tap - frac)
  return m


def interpolate_pos_embed(pos_embed, new_grid: int, num_extra_tokens: int = 1):
  """Resizes an absolute position embedding to a new square patch grid.

  pos_embed: float[E + g*g, C] (E = num_extra_tokens, the CLS rows, kept as they are)
  → float[E + new_grid**2, C]. The grid rows are resized with PyTorch bicubic
  (`F.interpolate(mode="bicubic", align_corners=False)`), as EVA/BLIP-2 `interpolate_pos_embed`
  does. Works on numpy arrays (converters) and inside jit (static shapes).
  """
  xp = np if isinstance(pos_embed, np.ndarray) else jnp
  extra, grid_tokens = pos_embed[:num_extra_tokens], pos_embed[num_extra_tokens:]
  old_grid = int(round(math.sqrt(grid_tokens.shape[0])))
  if old_grid * old_grid != grid_tokens.shape[0]:
    raise ValueError(f"position embedding has {grid_tokens.shape[0]} grid tokens: not square")
  if old_grid == new_grid:
    return pos_embed
  m = _torch_bicubic_matrix(old_grid, new_grid)
  grid = grid_tokens.reshape(old_grid, old_grid, -1)
  if xp is np:
    resized = np.einsum("yi,ijc,xj->yxc", m, grid.astype(np.float64), m).astype(pos_embed.dtype)
  else:
    m = jnp.asarray(m, jnp.float32)
    resized = jnp.einsum("yi,ijc,xj->yxc", m, grid.astype(jnp.float32), m,
                         precision=jax.lax.Precision.HIGHEST).astype(pos_embed.dtype)
  return xp.concatenate([extra, resized.reshape(new_grid * new_grid, -1)], axis=0)


class PatchEmbed(nnx.Module):
  """Non-overlapping p×p patches → width: a stride-p conv, `kernel[p, p, 3, C]` like a conv
  kernel so converters use the plain conv2d permute."""

  def __init__(self, patch_size: int, width: int, *, use_bias: bool = True, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.patch_size, self.dtype = patch_size, dtype
    self.kernel = layers.param(rngs, layers.torch_linear_kernel(),
                               (patch_size, patch_size, 3, width), (None, None, None, "embed"),
                               param_dtype)
    self.bias = (layers.param(rngs, layers.torch_linear_bias(3 * patch_size ** 2), (width,),
                              ("embed",), param_dtype) if use_bias else None)

  def __call__(self, images: jax.Array) -> jax.Array:
    """images: float[N, S, S, 3] → float[N, S/p, S/p, C]."""
    n, h, w, c = images.shape
    p = self.patch_size
    dtype = self.dtype or images.dtype
    patches = images.reshape(n, h // p, p, w // p, p, c)
    x = jnp.einsum("nyixjc,ijcd->nyxd", patches.astype(dtype), self.kernel[...].astype(dtype))
    if self.bias is not None:
      x = x + self.bias[...].astype(dtype)
    return x


def posemb_sincos_2d(grid: int, width: int, temperature: float = 10_000.0) -> jax.Array:
  """float[grid·grid, width] for row-major patches (x = column, y = row): the blocks
  [sin(x·ω), cos(x·ω), sin(y·ω), cos(y·ω)] with ω_k = temperature^(−k / (width/4)), k < width/4,
  as big_vision's "sincos2d"."""
  if width % 4:
    raise ValueError(f"width {width} must be divisible by 4 for sincos2d")
  y, x = jnp.mgrid[:grid, :grid]
  omega = 1.0 / temperature ** (jnp.arange(width // 4) / (width // 4))
  y = y.reshape(-1, 1) * omega[None]
  x = x.reshape(-1, 1) * omega[None]
  return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)


class VisionTransformer(nnx.Module):
  """ViT with a CLS token and absolute position embedding; returns all tokens.

  Parameters: `patch_embed/kernel[p, p, 3, C]` (+ `bias[C]`), `cls_token[C]`,
  `pos_embed[1 + (image_size/p)^2, C]`, optional `ln_pre`, `blocks/{i}/...`, optional `ln_post`.
  fp8: a frozen tower's fp8 recipe (`model.vit_fp8`: False, True or a `fp8.RECIPES` name) for the
  four matmuls of every block (qkv, attention output, fc1, fc2); the rest stays in `dtype`.
  attention: "auto" (cuDNN's fused attention on GPUs that take it, else XLA's), "xla" or "cudnn"
  (`layers.dot_product_attention`).
  """

  def __init__(self, *, image_size: int = 224, patch_size: int = 14, width: int = 1408,
               depth: int = 39, num_heads: int = 16, mlp_dim: int = 6144, qkv_bias: str = "qv",
               act: str = "gelu", ln_eps: float = 1e-6, pre_norm: bool = False,
               post_norm: bool = False, patch_bias: bool = True, pos_init: str = "normal",
               scan_layers: bool = False, fp8=False, attention: str = "auto", dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if image_size % patch_size:
      raise ValueError(f"image_size {image_size} not divisible by patch_size {patch_size}")
    self.patch_size, self.width, self.dtype = patch_size, width, dtype
    self.scan_layers = scan_layers  # blocks under lax.scan (layers.call_blocks)
    grid = image_size // patch_size
    self.patch_embed = PatchEmbed(patch_size, width, use_bias=patch_bias, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
    self.cls_token = layers.param(rngs, layers.normal(0.02), (width,), ("embed",), param_dtype)
    # "normal": EVA's trunc-normal-like 0.02 (the weights are pretrained anyway); "sincos2d":
    # big_vision's fixed-frequency 2-D init (CLS row 0), for a ViT trained from scratch, where
    # 0.02 positions drown under the patch embeddings and the model sees a bag of patches.
    if pos_init == "normal":
      pos_fn = layers.normal(0.02)
    elif pos_init == "sincos2d":
      pos_fn = lambda _key, shape, dtype=jnp.float32: jnp.concatenate(
          [jnp.zeros((1, width), dtype), posemb_sincos_2d(grid, width).astype(dtype)])
    else:
      raise ValueError(f"unknown pos_init {pos_init!r}: normal or sincos2d")
    self.pos_embed = layers.param(rngs, pos_fn, (1 + grid * grid, width), (None, "embed"),
                                  param_dtype)
    self.ln_pre = (layers.LayerNorm(width, eps=ln_eps, param_dtype=param_dtype, rngs=rngs)
                   if pre_norm else None)
    self.blocks = nnx.List([
        Block(width, num_heads, mlp_dim, qkv_bias=qkv_bias, act=act, ln_eps=ln_eps, fp8=fp8,
              attention=attention, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for _ in range(depth)])
    self.ln_post = (layers.LayerNorm(width, eps=ln_eps, param_dtype=param_dtype, rngs=rngs)
                    if post_norm else None)

  def embed(self, images: jax.Array) -> jax.Array:
    """images: float[N, S, S, 3] → float[N, 1 + (S/p)^2, C] (CLS + patches, with positions)."""
    n, h, w, _ = images.shape
    p = self.patch_size
    if h != w or h % p:
      raise ValueError(f"images must be square with a side divisible by {p}, got {images.shape}")
    g = h // p
    dtype = self.dtype or images.dtype
    x = self.patch_embed(images)
    x = x.reshape(n, g * g, self.width)
    cls = jnp.broadcast_to(self.cls_token[...].astype(dtype), (n, 1, self.width))
    x = jnp.concatenate([cls, x], axis=1)
    return x + interpolate_pos_embed(self.pos_embed[...], g).astype(dtype)

  def __call__(self, images: jax.Array, *, train: bool = False,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """images: float[N, S, S, 3], already normalised → float[N, 1 + (S/p)^2, C].

    S other than `image_size` uses a bicubically resized position embedding. No dropout or
    drop-path (the tower is frozen; drop_path 0 in the original): `train`/`rngs` are accepted for
    the common signature and unused.
    """
    del train, rngs
    x = self.embed(images)
    if self.ln_pre is not None:
      x = self.ln_pre(x)
    x = layers.call_blocks(self.blocks, x, scan=self.scan_layers)
    if self.ln_post is not None:
      x = self.ln_post(x)
    return x
