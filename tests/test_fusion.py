"""The fusion MLP's two initialisations (SPEC §5: PyTorch default; "he" for training from scratch)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dynrefer_jax.models import fusion


def _weights(init, channels=64, views=3):
  m = fusion.FusionMLP(channels, views, rngs=nnx.Rngs(0), init=init)
  return m, [np.asarray(m.linear0.kernel[...]), np.asarray(m.linear0.bias[...]),
             np.asarray(m.linear2.kernel[...]), np.asarray(m.linear2.bias[...])]


def test_torch_init_is_uniform_with_bound_one_over_sqrt_fan_in():
  _, (k0, b0, k2, b2) = _weights("torch")
  for w, fan_in in ((k0, 192), (b0, 192), (k2, 64), (b2, 64)):
    bound = 1 / np.sqrt(fan_in)
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound
    np.testing.assert_allclose(w.std(), bound / np.sqrt(3), rtol=0.1)   # U(-a, a): sd a/√3


def test_he_init_preserves_the_variance_of_unit_inputs():
  m, (k0, b0, k2, b2) = _weights("he")
  np.testing.assert_allclose(k0.std(), np.sqrt(2 / 192), rtol=0.05)
  np.testing.assert_allclose(k2.std(), np.sqrt(1 / 64), rtol=0.1)
  assert not b0.any() and not b2.any()
  # x ~ N(0, 1): Var(linear0 x) = 2, E[relu(.)^2] = 1, so Var(linear2 relu(linear0 x)) = 1.
  x = jax.random.normal(jax.random.key(1), (4096, 1, 192))
  np.testing.assert_allclose(float(jnp.var(m(x))), 1.0, rtol=0.15)
  y = fusion.FusionMLP(64, 3, rngs=nnx.Rngs(0), init="torch")(x)
  assert float(jnp.var(y)) < 0.1   # the default init shrinks it about tenfold


def test_unknown_init_is_refused():
  with pytest.raises(ValueError, match="fusion init"):
    fusion.FusionMLP(8, 3, rngs=nnx.Rngs(0), init="xavier")
