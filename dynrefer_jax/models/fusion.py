"""Multi-view fusion MLP (`cvem_mlp`, SPEC §5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dynrefer_jax.models import layers


class FusionMLP(nnx.Module):
  """Linear(V·C → C) → ReLU → Linear(C → C).

  The original is `nn.Sequential(Linear, ReLU, Linear)`, so its weights are `cvem_mlp.0.*` and
  `cvem_mlp.2.*`; here they are `linear0` and `linear2` (index 1, the ReLU, has no weights).
  Input channels are the views concatenated in view order (t=0 first).

  init: "torch" (the original's PyTorch default, U(±1/√fan_in) for weights and biases: about
  1/3 of the input's variance per layer, harmless when the Q-Former is pretrained) or "he"
  (variance preserving: normal weights of std √(2/fan_in) before the ReLU and √(1/fan_in) after
  it, zero biases). Trained from scratch, "torch" leaves the fused tokens at ~0.1 of the unit
  scale of the Q-Former's normalised queries, so its output barely depends on the region.
  """

  def __init__(self, channels: int, num_views: int, *, rngs: nnx.Rngs, dtype=None,
               param_dtype=jnp.float32, init: str = "torch"):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    fan0 = num_views * channels
    if init == "he":
      inits = [dict(kernel_init=layers.normal((2.0 / fan0) ** 0.5), bias_init=jax.nn.initializers.zeros),
               dict(kernel_init=layers.normal((1.0 / channels) ** 0.5), bias_init=jax.nn.initializers.zeros)]
    elif init == "torch":
      inits = [{}, {}]
    else:
      raise ValueError(f"unknown fusion init {init!r}: 'torch' or 'he'")
    self.linear0 = layers.Dense(fan0, channels, axes=("embed", "mlp"), **kw, **inits[0])
    self.linear2 = layers.Dense(channels, channels, axes=("mlp", "embed"), **kw, **inits[1])

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: float[B, L, V·C] → float[B, L, C]."""
    return self.linear2(jax.nn.relu(self.linear0(x)))
