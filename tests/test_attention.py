"""layers.dot_product_attention's implementations against PyTorch's
scaled_dot_product_attention: the einsum form ("xla") and the jax.nn.dot_product_attention
mapping the "cudnn" branch calls (run here with JAX's XLA backend: same arguments, same layout),
with masks, additive bias and scale; and "auto" on a machine without cuDNN is the einsum form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dynrefer_jax.models import eva_vit, layers


def _inputs(seed, b=2, lq=7, lk=9, h=3, d=16):
  rs = np.random.RandomState(seed)
  q, k, v = (rs.randn(b, n, h, d).astype(np.float32) for n in (lq, lk, lk))
  mask = rs.uniform(size=(b, 1, lq, lk)) > 0.3
  mask[..., 0] = True  # every query attends somewhere
  bias = rs.randn(1, h, lq, lk).astype(np.float32)
  return q, k, v, mask, bias


def _torch(q, k, v, mask=None, bias=None, scale=None):
  """PyTorch SDPA on [B, L, H, D] inputs: mask True = attend, bias added to the logits."""
  t = lambda x: torch.from_numpy(np.asarray(x, np.float32)).transpose(1, 2).double()
  attn = None
  if bias is not None:
    attn = torch.from_numpy(np.asarray(bias)).double()
  if mask is not None:
    m = torch.from_numpy(np.asarray(mask))
    neg = torch.zeros(m.shape, dtype=torch.float64).masked_fill(~m, float("-inf"))
    attn = neg if attn is None else attn + neg
  out = F.scaled_dot_product_attention(t(q), t(k), t(v), attn_mask=attn, scale=scale)
  return out.transpose(1, 2).numpy()


@pytest.mark.parametrize("case", ["plain", "mask", "bias", "mask_bias_scale"])
def test_einsum_and_jax_mapping_match_torch_sdpa(case):
  q, k, v, mask, bias = _inputs(0)
  kw = {"plain": {}, "mask": {"mask": mask}, "bias": {"bias": bias},
        "mask_bias_scale": {"mask": mask, "bias": bias, "scale": 0.37}}[case]
  ref = _torch(q, k, v, **kw)
  ours = layers.dot_product_attention(q, k, v, implementation="xla", **kw)
  mapped = layers.jax_attention(q, k, v, kw.get("mask"), kw.get("bias"), kw.get("scale"),
                                implementation="xla")
  np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(mapped), ref, rtol=1e-5, atol=1e-5)


def test_bf16_einsum_and_jax_mapping_agree_with_torch():
  q, k, v, _, _ = _inputs(1, lq=257, lk=257, h=2, d=88)  # the ViT-g head dim and length
  ref = _torch(q, k, v)
  for impl in ("xla", "jax"):
    args = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    out = (layers.dot_product_attention(*args, implementation="xla") if impl == "xla"
           else layers.jax_attention(*args, implementation="xla"))
    assert out.dtype == jnp.bfloat16
    err = np.linalg.norm(np.asarray(out, np.float32) - ref) / np.linalg.norm(ref)
    assert err < 1e-2, (impl, err)


def test_auto_without_cudnn_is_the_einsum_form():
  assert jax.devices()[0].platform == "cpu"
  assert not layers.cudnn_attention_available("bfloat16", 88)
  q, k, v, mask, _ = _inputs(2)
  for kw in ({}, {"mask": mask}):
    auto = jax.jit(lambda a, b, c: layers.dot_product_attention(a, b, c, implementation="auto",
                                                                **kw))
    xla = jax.jit(lambda a, b, c: layers.dot_product_attention(a, b, c, **kw))
    assert auto.lower(q, k, v).as_text() == xla.lower(q, k, v).as_text()
    np.testing.assert_array_equal(np.asarray(auto(q, k, v)), np.asarray(xla(q, k, v)))


def test_unknown_implementation_is_an_error():
  q, k, v, _, _ = _inputs(3)
  with pytest.raises(ValueError, match="flash"):
    layers.dot_product_attention(q, k, v, implementation="flash")
  with pytest.raises(ValueError, match="attention must be one of"):
    from flax import nnx  # pylint: disable=import-outside-toplevel
    eva_vit.Attention(32, 4, attention="flash", rngs=nnx.Rngs(0))
