"""Multi-view fusion MLP (`cvem_mlp`, SPEC §5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dynrefer_jax.models import layers


class FusionMLP(nnx.Module):
  """Linear(V·C → C) → ReLU → Linear(C → C), PyTorch default init.

  The original is `nn.Sequential(Linear, ReLU, Linear)`, so its weights are `cvem_mlp.0.*` and
  `cvem_mlp.2.*`; here they are `linear0` and `linear2` (index 1, the ReLU, has no weights).
  Input channels are the views concatenated in view order (t=0 first).
  """

  def __init__(self, channels: int, num_views: int, *, rngs: nnx.Rngs, dtype=None,
               param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.linear0 = layers.Dense(num_views * channels, channels, axes=("embed", "mlp"), **kw)
    self.linear2 = layers.Dense(channels, channels, axes=("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: float[B, L, V·C] → float[B, L, C]."""
    return self.linear2(jax.nn.relu(self.linear0(x)))
