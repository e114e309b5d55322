"""Where the region–text (SigLIP) loss's gradient flows, against the original's multi-GPU
computation (dynrefer_t5.py `att_forward`, SPEC §7b) transcribed rank by rank.

The original, on each of G GPUs with its B local regions: project Z and the captions' text
embeddings (attr_vision_proj / attr_text_proj), gather both projected sets from every GPU under
no_grad (LAVIS concat_all_gather: no gradient even to the rank's own slice), score local texts
against all gathered regions (i2t) and all gathered texts against local regions (t2i), labels +1
at column rank·B + j for row j, loss per direction −Σ log σ(label·logit) / B, the mean of the
two; DDP averages the gradients over the G ranks. Our model computes the same over the global
batch at once (`DynRefer.region_text_loss`); the value and every gradient must agree.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dynrefer_jax import config_lib
from dynrefer_jax.models import dynrefer as dynrefer_lib

G, B_LOCAL = 4, 2   # 4 simulated GPUs with 2 regions each


def _model():
  config = config_lib.load("configs/synthetic.py:smoke", [
      "model.text.vocab_size=32", "model.lm.vocab_size=32", "model.vit.depth=1",
      "model.lm.num_decoder_layers=1", "model.vit.image_size=16", "model.roi.output_size=2",
      "model.loss.rtc_b_init=-2.0"])
  ids = np.random.default_rng(0).integers(2, 32, (3, 8)).astype(np.int32)
  return dynrefer_lib.DynRefer(config.model, {"tags": ids, "attributes": ids, "classes": ids},
                               rngs=nnx.Rngs(0))


def _original_ddp_loss(m, z, text):
  """The original's att_forward loss, per rank, then DDP's average over ranks."""
  def scores(text_q, vision):          # attr_head(queries=text, memory=vision) → fc(normalize)
    q = jnp.broadcast_to(text_q[None], (vision.shape[0],) + text_q.shape)
    out = m.attr_head(q, vision)
    out = out / jnp.maximum(jnp.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
    return m.attr_fc(out)[..., 0]      # [regions, texts]

  vis = [m.attr_vision_proj(z[r * B_LOCAL:(r + 1) * B_LOCAL]) for r in range(G)]
  txt = [m.attr_text_proj(text[r * B_LOCAL:(r + 1) * B_LOCAL]) for r in range(G)]
  vis_all = jax.lax.stop_gradient(jnp.concatenate(vis))     # concat_all_gather: no grad
  txt_all = jax.lax.stop_gradient(jnp.concatenate(txt))
  t, b = jnp.exp(m.attr_t[...]), m.attr_b[...]
  per_rank = []
  for r in range(G):
    sim_i2t = scores(txt[r], vis_all).T               # [B local texts, G·B regions]
    sim_t2i = scores(txt_all, vis[r])                 # [B local regions, G·B texts]
    pad = jnp.full((B_LOCAL, G * B_LOCAL), -1.0).at[:, r * B_LOCAL:(r + 1) * B_LOCAL].set(
        2 * jnp.eye(B_LOCAL) - 1)
    l_i2t = -jnp.sum(jax.nn.log_sigmoid(pad * (sim_i2t * t + b))) / B_LOCAL
    l_t2i = -jnp.sum(jax.nn.log_sigmoid(pad * (sim_t2i * t + b))) / B_LOCAL
    per_rank.append((l_i2t + l_t2i) / 2)
  return sum(per_rank) / G


def test_region_text_loss_and_gradients_match_the_original_per_rank():
  m = _model()
  rng = np.random.default_rng(1)
  n = G * B_LOCAL
  z = jnp.asarray(rng.normal(size=(n, m.query_tokens.shape[0], m.query_tokens.shape[1])),
                  jnp.float32)
  text = jnp.asarray(rng.normal(size=(n, m.attr_text_proj.kernel.shape[0])), jnp.float32)
  graphdef, params, rest = nnx.split(m, nnx.Param, ...)

  def grads(loss_fn):
    def f(p, z, text):
      return loss_fn(nnx.merge(graphdef, p, rest), z, text)
    return jax.value_and_grad(f, argnums=(0, 1, 2))(params, z, text)

  got_v, got_g = grads(lambda mm, z, t: mm.region_text_loss(z, t))
  want_v, want_g = grads(_original_ddp_loss)
  np.testing.assert_allclose(got_v, want_v, rtol=1e-5)
  flat_got = dict(jax.tree_util.tree_leaves_with_path(got_g))
  flat_want = dict(jax.tree_util.tree_leaves_with_path(want_g))
  # Entries that are 0 in exact arithmetic (the attention key bias: softmax is shift-invariant)
  # are round-off in both: absolute tolerance relative to the largest gradient.
  atol = 1e-6 * max(float(jnp.abs(w).max()) for w in flat_want.values())
  for k, want in flat_want.items():
    np.testing.assert_allclose(flat_got[k], want, rtol=1e-4, atol=atol,
                               err_msg=jax.tree_util.keystr(k))
  assert len(flat_want) > 10
  # Each projection trains (through its own direction), as do Z and the text embeddings.
  for name in ("attr_vision_proj", "attr_text_proj", "attr_fc"):
    assert float(jnp.abs(got_g[0][name]["kernel"][...]).max()) > 0, name
  assert float(jnp.abs(got_g[1]).max()) > 0 and float(jnp.abs(got_g[2]).max()) > 0
