"""QFormer vs transformers' Blip2QFormerModel (PyTorch, toy config, random weights).

Weights go through our HF converter; the reference is HF's own forward with `query_embeds`
(LayerNorm → dropout → BERT layers with cross-attention every 2nd layer → query FFN).
Tolerances (float32, highest precision): outputs 1e-5 relative to the output scale,
parameter gradients 1e-4 relative, 8-way sharded vs unsharded 1e-6 relative.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from dynrefer_jax import functional
from dynrefer_jax.convert.common import expected_shapes
from dynrefer_jax.convert.qformer import convert_qformer_hf
from dynrefer_jax.models.qformer import QFormer

D, HEADS, LAYERS, MLP, ENC, Q, L, B = 32, 4, 2, 48, 24, 5, 7, 2


def _torch_model(seed=0, std=0.3):
  torch.manual_seed(seed)
  cfg = Blip2QFormerConfig(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                           intermediate_size=MLP, encoder_hidden_size=ENC,
                           cross_attention_frequency=2, hidden_act="gelu", layer_norm_eps=1e-12)
  model = Blip2QFormerModel(cfg).eval()
  with torch.no_grad():  # bigger than BERT init so every weight visibly matters
    for name, p in model.named_parameters():
      is_ln_scale = name.endswith("LayerNorm.weight") or name == "layernorm.weight"
      p.copy_(torch.randn_like(p) * (std if p.ndim > 1 else 0.2) + float(is_ln_scale))
  return model


def _ours(torch_model):
  model = QFormer(num_layers=LAYERS, hidden=D, num_heads=HEADS, mlp_dim=MLP, encoder_width=ENC,
                  rngs=nnx.Rngs(0))
  graphdef, params, axes = functional.split(model)
  sd = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
  flat = convert_qformer_hf(sd, expected_shapes(params))
  return graphdef, functional.unflatten({k: jnp.asarray(v) for k, v in flat.items()}), axes


def _data(seed=0):
  rng = np.random.default_rng(seed)
  queries = rng.normal(size=(B, Q, D)).astype(np.float32)
  enc = rng.normal(size=(B, L, ENC)).astype(np.float32)
  mask = np.ones((B, L), bool)
  mask[1, 4:] = False
  return queries, enc, mask


def _rel(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))


def _torch_forward(model, queries, enc, mask):
  return model(query_embeds=queries, encoder_hidden_states=enc,
               encoder_attention_mask=torch.from_numpy(mask.astype(np.int64))).last_hidden_state


@pytest.mark.parametrize("use_mask", [False, True])
def test_matches_hf_blip2_qformer(use_mask):
  tm = _torch_model()
  graphdef, params, _ = _ours(tm)
  queries, enc, mask = _data()
  if not use_mask:
    mask[:] = True
  with torch.no_grad():
    want = _torch_forward(tm, torch.from_numpy(queries), torch.from_numpy(enc), mask).numpy()
  got = jax.jit(lambda p, q, e, m: functional.merge(graphdef, p)(q, e, m))(
      params, jnp.asarray(queries), jnp.asarray(enc), jnp.asarray(mask) if use_mask else None)
  assert got.shape == (B, Q, D)
  assert _rel(got, want) < 1e-5


def test_structure_cross_attention_every_second_layer():
  model = QFormer(num_layers=LAYERS, hidden=D, num_heads=HEADS, mlp_dim=MLP, encoder_width=ENC,
                  rngs=nnx.Rngs(0))
  assert [layer.crossattention is not None for layer in model.layers] == [True, False]


def test_param_gradients_match_torch_autograd():
  tm = _torch_model()
  graphdef, params, _ = _ours(tm)
  queries, enc, mask = _data()
  cot = np.random.default_rng(9).normal(size=(B, Q, D)).astype(np.float32)
  tq, te = torch.from_numpy(queries).requires_grad_(), torch.from_numpy(enc).requires_grad_()
  (_torch_forward(tm, tq, te, mask) * torch.from_numpy(cot)).sum().backward()
  loss = lambda p, q, e: jnp.sum(functional.merge(graphdef, p)(q, e, jnp.asarray(mask)) * cot)
  gp, gq, ge = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params, jnp.asarray(queries), jnp.asarray(enc))
  torch_grads = {k: p.grad.numpy() for k, p in tm.named_parameters()}
  want = convert_qformer_hf(torch_grads, expected_shapes(params))
  flat = functional.flatten(gp)
  assert set(flat) == set(want)
  scale = max(np.abs(v).max() for v in want.values())
  for path, g in flat.items():
    if path.endswith("key/bias"):
      # Mathematically zero (softmax is invariant to the per-query shift q·b_k): both sides
      # hold only rounding noise, so check that instead of a relative error.
      assert np.abs(np.asarray(g)).max() < 1e-5 * scale and np.abs(want[path]).max() < 1e-5 * scale
      continue
    assert _rel(g, want[path]) < 1e-4, path
  assert _rel(gq, tq.grad.numpy()) < 1e-4
  assert _rel(ge, te.grad.numpy()) < 1e-4


def test_dropout_only_in_training():
  tm = _torch_model()
  graphdef, params, _ = _ours(tm)
  queries, enc, _ = (jnp.asarray(a) for a in _data())

  @jax.jit
  def run(p, key):
    model = functional.merge(graphdef, p)
    return (model(queries, enc), model(queries, enc, train=True),  # no rngs → no dropout
            model(queries, enc, train=True, rngs=nnx.Rngs(dropout=key)))

  eval_out, no_rng_out, train_out = run(params, jax.random.key(3))
  np.testing.assert_array_equal(no_rng_out, eval_out)
  assert np.abs(np.asarray(train_out - eval_out)).max() > 1e-2


def test_bert_init_and_full_size_parameter_count():
  model = QFormer(num_layers=LAYERS, hidden=D, num_heads=HEADS, mlp_dim=MLP, encoder_width=ENC,
                  rngs=nnx.Rngs(0))
  _, params, _ = functional.split(model)
  for path, leaf in functional.flatten(params).items():
    leaf = np.asarray(leaf)
    if path.endswith("kernel"):
      assert abs(leaf.std() - 0.02) < 0.004, path
    elif "layernorm" in path and path.endswith("scale"):
      assert np.all(leaf == 1), path
    else:
      assert np.all(leaf == 0), path
  # CHECKPOINTS.md §1.3: the BLIP-2 Q-Former without its text side has 105,137,664 parameters.
  _, abstract, _ = functional.abstract_split(lambda: QFormer(rngs=nnx.Rngs(0)))
  assert functional.count(abstract) == 105_137_664


def test_sharded_jit_equals_unsharded(devices8):
  # Sharding a contraction reorders float32 sums (~1e-7 relative per matmul); std 0.1 keeps
  # the layers from amplifying that past the 1e-6 budget while any layout error stays O(1).
  tm = _torch_model(std=0.1)
  graphdef, params, axes = _ours(tm)
  mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices8)

  def put(leaf, names):  # tiny stand-in for sharding rules: 'embed' → 'x' where divisible
    spec = [None] * leaf.ndim
    for d, name in enumerate(names):
      if name == "embed" and leaf.shape[d] % 8 == 0:
        spec[d] = "x"
        break
    return jax.device_put(leaf, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)))

  sharded = jax.tree.map(put, params, axes, is_leaf=lambda t: isinstance(t, tuple))
  assert sum(not l.sharding.is_fully_replicated for l in jax.tree.leaves(sharded)) > 10
  queries, enc, mask = (jnp.asarray(a) for a in _data())
  fn = jax.jit(lambda p, q, e, m: functional.merge(graphdef, p)(q, e, m))
  err = _rel(fn(sharded, queries, enc, mask), fn(params, queries, enc, mask))
  assert err < 1e-6
