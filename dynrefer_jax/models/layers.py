"""Shared building blocks: parameters with logical axis names, Dense, LayerNorm, attention.

Every parameter is created through `param(...)`, which records its *logical* axis names
(`embed`, `mlp`, `heads`, `kv`, `vocab`, `layers`, ...) as the variable's `out_sharding`
metadata. `dynrefer_jax.sharding` maps those names to mesh axes with the rules in the config;
model code never names a mesh axis.

Layout conventions (PyTorch → ours): a Linear weight `[out, in]` is stored as `kernel[in, out]`;
activations are channels-last (`[B, H, W, C]`, `[B, L, C]`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dynrefer_jax import sharding

Axes = Sequence[str | None]
Initializer = Callable[..., jax.Array]

# Initialisers named after the PyTorch defaults they reproduce.
zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()
xavier_uniform = nnx.initializers.xavier_uniform()


def normal(stddev: float) -> Initializer:
  return nnx.initializers.normal(stddev)


def torch_linear_kernel() -> Initializer:
  """PyTorch nn.Linear default: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  return nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_linear_bias(fan_in: int) -> Initializer:
  bound = 1.0 / max(fan_in, 1) ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class Table(nnx.Variable):
  """A frozen, non-trainable array (precomputed text-embedding tables). Never optimised."""


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], axes: Axes,
          dtype=jnp.float32) -> nnx.Param:
  """Creates a parameter whose metadata carries its logical axis names."""
  if len(axes) != len(shape):
    raise ValueError(f"axes {tuple(axes)} do not match shape {tuple(shape)}")
  return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(axes))


class Dense(nnx.Module):
  """y = x @ kernel + bias over the last axis.

  kernel: float[in, out] with logical axes `axes`; bias: float[out] with axes `(axes[1],)`.
  """

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs,
               axes: Axes = ("embed", "mlp"), use_bias: bool = True,
               kernel_init: Initializer | None = None, bias_init: Initializer | None = None,
               dtype=None, param_dtype=jnp.float32):
    kernel_init = kernel_init or torch_linear_kernel()
    bias_init = bias_init or torch_linear_bias(in_features)
    self.kernel = param(rngs, kernel_init, (in_features, out_features), axes, param_dtype)
    self.bias = (param(rngs, bias_init, (out_features,), (axes[1],), param_dtype)
                 if use_bias else None)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or x.dtype
    y = jnp.dot(x.astype(dtype), self.kernel[...].astype(dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype)
    return y


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis; statistics in float32, output cast back to the input dtype."""

  def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs, axis_name: str | None = "embed",
               use_bias: bool = True, param_dtype=jnp.float32):
    del rngs
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=(axis_name,))
    self.bias = (nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=(axis_name,))
                 if use_bias else None)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


def gelu_exact(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=False)


def quick_gelu(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": gelu_exact,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")


@functools.lru_cache(maxsize=None)
def cudnn_attention_available(dtype_name: str, head_dim: int) -> bool:
  """Whether cuDNN's fused (flash) attention compiles on the default device for this dtype and
  head dim: a GPU, bf16/fp16, and a cuDNN that takes the shape. Probed once per (dtype, head
  dim) by compiling a tiny instance, so "auto" never hands XLA a call it cannot build."""
  if jax.devices()[0].platform != "gpu" or dtype_name not in ("bfloat16", "float16"):
    return False
  x = jax.ShapeDtypeStruct((1, 16, 1, head_dim), jnp.dtype(dtype_name))
  try:
    jax.jit(lambda q, k, v: jax_attention(q, k, v, implementation="cudnn")).lower(
        x, x, x).compile()
  except Exception:  # pylint: disable=broad-except  (NotImplementedError, XlaRuntimeError, ...)
    return False
  return True


def jax_attention(q, k, v, mask=None, bias=None, scale=None, *, implementation: str):
  """jax.nn.dot_product_attention on dot_product_attention's arguments (same [B, L, H, D]
  layout, mask True = attend, additive bias, scale default D^-0.5)."""
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale,
                                      implementation=implementation)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          mask: jax.Array | None = None, bias: jax.Array | None = None,
                          scale: float | None = None, implementation: str = "xla") -> jax.Array:
  """Softmax attention.

  q: float[B, Lq, H, D]; k, v: float[B, Lk, H, D];
  mask: bool broadcastable to [B, H, Lq, Lk] (True = attend); bias: float, same broadcast.
  implementation: "xla" (the einsum form below: softmax in float32, logits materialised),
  "cudnn" (cuDNN's fused flash attention through jax.nn.dot_product_attention: GPUs, bf16/fp16,
  D ≤ 128, or 256 on Hopper, and a multiple of 8), or "auto" (cuDNN where
  cudnn_attention_available and there is no mask or bias, else "xla"; only the vision tower's
  unmasked attention qualifies, and on a CPU or TPU "auto" is "xla").
  Returns float[B, Lq, H, D].
  """
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r}: one of "
                     f"{ATTENTION_IMPLEMENTATIONS}")
  if implementation == "auto":
    plain = mask is None and bias is None
    implementation = ("cudnn" if plain and cudnn_attention_available(jnp.dtype(q.dtype).name,
                                                                     q.shape[-1]) else "xla")
  if implementation == "cudnn":
    return jax_attention(q, k, v, mask, bias, scale, implementation="cudnn")
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def dropout(x: jax.Array, rate: float, rngs: nnx.Rngs | None, deterministic: bool) -> jax.Array:
  """Inverted dropout; a no-op when deterministic, rate == 0 or no rngs are given."""
  if deterministic or rate == 0.0 or rngs is None:
    return x
  keep = jax.random.bernoulli(rngs.dropout(), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


# --- rematerialisation -----------------------------------------------------------------------

# config.model.remat → what a transformer block keeps for the backward pass.
REMAT_POLICIES = {
    "none": None,                                               # keep everything (no remat)
    "full": jax.checkpoint_policies.nothing_saveable,           # recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,            # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
_REMAT: contextvars.ContextVar = contextvars.ContextVar("dynrefer_remat", default="none")


@contextlib.contextmanager
def remat_policy(name: str):
  """Within this context, `call_block` rematerialises blocks by the named policy."""
  if name not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {name!r}: one of {sorted(REMAT_POLICIES)}")
  token = _REMAT.set(name)
  try:
    yield
  finally:
    _REMAT.reset(token)


def call_block(block: nnx.Module, x: jax.Array, *args, **kwargs) -> jax.Array:
  """block(x, *args, **kwargs) at a block boundary: rematerialised by the active policy
  (`remat_policy`), and the output float[B, L, C] constrained to ('batch', None, 'embed').

  Python scalars among kwargs (train=..., rates) stay static; arrays, None and nnx.Rngs are
  passed through the remat boundary.
  """
  name = _REMAT.get()
  if name == "none":
    y = block(x, *args, **kwargs)
  else:
    static = {k: v for k, v in kwargs.items() if isinstance(v, (bool, int, float, str))}
    dynamic = {k: v for k, v in kwargs.items() if k not in static}

    def run(blk, x, args, dynamic):
      return blk(x, *args, **dynamic, **static)
    policy = REMAT_POLICIES[name]
    y = nnx.remat(run, policy=policy, prevent_cse=True)(block, x, args, dynamic)
  return _constrain_block_output(y)


def _constrain_block_output(y: jax.Array) -> jax.Array:
  return sharding.constrain(y, ("batch",) + (None,) * (y.ndim - 2) + ("embed",))


# --- repeated blocks under lax.scan ------------------------------------------------------------

def call_blocks(blocks: Sequence[nnx.Module], x: jax.Array, *args, scan: bool = False,
                **kwargs) -> jax.Array:
  """x = call_block(block, x, *args, **kwargs) for each block in order.

  scan=True runs the stack as one `jax.lax.scan` over layers, so that XLA reuses one block's
  buffers instead of keeping every unrolled block's temporaries live (the full-size train step's
  memory, BENCHMARKS.md). The parameter layout is unchanged (`blocks/{i}/...`): each block is
  split into (graphdef, state) and the states are stacked leaf-wise here, in the forward pass (a
  temporary of one stack's parameters, sharded like them). Blocks whose structure repeats with
  a period p (the Q-Former's cross-attention every 2nd layer) are scanned p at a time; a stack
  with no period below its length, or fewer than 2 periods, runs unrolled.

  Inside the scan each block is rematerialised by the active `remat_policy` and its output
  constrained as in `call_block`. An `nnx.Rngs` among the arguments is replaced, per block, by
  `nnx.Rngs(dropout=fold_in(key, layer))` with one key drawn from its `dropout` stream (the
  blocks draw dropout masks only): dropout still works, with other masks than the unrolled loop.
  """
  period = _period(blocks) if scan else None
  if period is None or len(blocks) // period < 2:
    for block in blocks:
      x = call_block(block, x, *args, **kwargs)
    return x

  graphdefs, states = zip(*(nnx.split(block) for block in blocks))
  states = [state.to_pure_dict() for state in states]
  num_groups = len(blocks) // period
  # stacked[k]: the states of blocks k, k + p, k + 2p, ... with a leading layer axis.
  stacked = tuple(jax.tree.map(lambda *leaves: jnp.stack(leaves), *states[k::period])
                  for k in range(period))
  rng_args = [i for i, a in enumerate(args) if isinstance(a, nnx.Rngs)]
  rng_kwargs = [k for k, v in kwargs.items() if isinstance(v, nnx.Rngs)]
  rng_objects = [args[i] for i in rng_args] + [kwargs[k] for k in rng_kwargs]
  # An Rngs cannot be mutated inside the scan (another trace level): draw one key outside.
  base_key = rng_objects[0].dropout() if rng_objects else None
  static = {k: v for k, v in kwargs.items() if isinstance(v, (bool, int, float, str))}
  dynamic = {k: v for k, v in kwargs.items() if k not in static and k not in rng_kwargs}
  args = tuple(None if i in rng_args else a for i, a in enumerate(args))
  remat = REMAT_POLICIES[_REMAT.get()]

  def apply(graphdef, state, x, args, dynamic, key):
    block = nnx.merge(graphdef, nnx.State(state))
    if key is not None:
      rngs = nnx.Rngs(dropout=key)
      args = tuple(rngs if i in rng_args else a for i, a in enumerate(args))
      dynamic = {**dynamic, **{k: rngs for k in rng_kwargs}}
    return block(x, *args, **dynamic, **static)

  def body(x, xs):
    group_states, layer = xs
    for k in range(period):
      key = None if base_key is None else jax.random.fold_in(base_key, layer * period + k)
      fn = functools.partial(apply, graphdefs[k])
      if _REMAT.get() != "none":
        # prevent_cse is only needed outside scan/while (the JAX remat docs).
        fn = jax.checkpoint(fn, policy=remat, prevent_cse=False)
      x = _constrain_block_output(fn(group_states[k], x, args, dynamic, key))
    return x, None

  x, _ = jax.lax.scan(body, x, (stacked, jnp.arange(num_groups)))
  return x


def _period(blocks: Sequence[nnx.Module]) -> int | None:
  """The smallest p dividing len(blocks) with block i structured like block i mod p, else None."""
  n = len(blocks)
  if n < 2:
    return None
  graphdefs = [nnx.graphdef(block) for block in blocks]
  for p in range(1, n // 2 + 1):
    if n % p == 0 and all(graphdefs[i] == graphdefs[i % p] for i in range(p, n)):
      return p
  return None
