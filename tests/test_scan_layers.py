"""Repeated blocks under `jax.lax.scan` (layers.call_blocks with scan=True) against the unrolled
Python loop of blocks, which is the reference: ViT, T5 (encoder, decoder, loss), Q-Former and
the text tower,
forward and gradients w.r.t. every parameter, with remat "none" and "full"; equal within 1e-6
(float32, "highest" matmuls from conftest). The parameter layout (`blocks/{i}/...`) is the same
both ways, so the scanned module runs on the unrolled module's parameters.

Parameters are random everywhere (zero-initialised biases too, so no misplaced layer hides
behind a zero) at fan-in scale; T5's kernels at half of it: with unscaled attention logits, at
full scale T5 amplifies float32 round-off so much that the unrolled reference run eagerly and
jitted already differs by ~3e-6 of its largest gradient (~5e-7 at half scale).
Gradients are compared against the scale of the whole gradient tree (max |want| over all
leaves): some leaves are zero in exact arithmetic (a key bias under softmax) and hold round-off.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import common as configs_common
from dynrefer_jax import functional, sharding
from dynrefer_jax.models import eva_vit, layers, qformer, t5, text_tower

TOL = 1e-6


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _randomize(params, seed, kernel_scale=1.0):
  flat = functional.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(flat))
  def draw(key, path, leaf):
    noise = jax.random.normal(key, leaf.shape)
    if leaf.ndim > 1:
      return kernel_scale * noise * float(np.prod(leaf.shape[:-1])) ** -0.5
    return 1.0 + 0.2 * noise if path.endswith("scale") else 0.1 * noise
  return functional.unflatten({p: draw(k, p, l) for k, (p, l) in zip(keys, flat.items())})


def _vit(scan):
  return eva_vit.VisionTransformer(image_size=16, patch_size=8, width=16, depth=3, num_heads=2,
                                   mlp_dim=32, scan_layers=scan, rngs=nnx.Rngs(0))


def _t5(scan, dropout_rate=0.0):
  return t5.T5(vocab_size=40, d_model=16, d_kv=4, d_ff=32, num_heads=4, num_encoder_layers=3,
               num_decoder_layers=2, dropout_rate=dropout_rate, scan_layers=scan,
               rngs=nnx.Rngs(0))


def _qformer(scan, num_layers=4, freq=2, dropout=0.0):
  return qformer.QFormer(num_layers=num_layers, hidden=16, num_heads=2, mlp_dim=32,
                         encoder_width=24, cross_attention_freq=freq, dropout=dropout,
                         scan_layers=scan, rngs=nnx.Rngs(0))


def _text(scan):
  return text_tower.TextTransformer(vocab_size=40, context_length=6, width=16, depth=3,
                                    num_heads=2, mlp_dim=32, output_dim=12, scan_layers=scan,
                                    rngs=nnx.Rngs(0))


def _inputs():
  rng = np.random.default_rng(0)
  f32 = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32))
  return dict(
      images=f32(2, 16, 16, 3),
      embeds=f32(2, 5, 16), mask=jnp.asarray([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool),
      labels=jnp.asarray(rng.integers(1, 40, (2, 4)), jnp.int32),
      label_mask=jnp.asarray([[1, 1, 1, 1], [1, 1, 0, 0]], bool),
      queries=f32(2, 3, 16), encoder=f32(2, 7, 24),
      tokens=jnp.asarray([[3, 7, 39, 0, 0, 0], [5, 2, 9, 11, 39, 0]], jnp.int32))


def _loss_fns(inputs):
  """name → (build(scan), f(module) → (scalar loss, output array), kernel scale, the path
  prefixes f leaves unused)."""
  probe = lambda y: jnp.asarray(np.random.default_rng(1).normal(size=y.shape), y.dtype)
  def vit(m):
    y = m(inputs["images"])
    return jnp.mean(y * probe(y)), y
  def t5_loss(m):
    loss, logits = m(inputs["embeds"], inputs["mask"], inputs["labels"], inputs["label_mask"])
    return loss, logits
  def t5_encode(m):
    y = m.encode(inputs["embeds"], inputs["mask"])
    return jnp.mean(y * probe(y)), y
  def qf(m):
    y = m(inputs["queries"], inputs["encoder"])
    return jnp.mean(y * probe(y)), y
  def text(m):
    y = m(inputs["tokens"])
    return jnp.mean(y * probe(y)), y
  return {"vit": (_vit, vit, 1.0, ()), "t5_loss": (_t5, t5_loss, 0.5, ()),
          "text": (_text, text, 1.0, ()),
          "t5_encode": (_t5, t5_encode, 0.5, ("decoder/", "lm_head/")),
          "qformer": (_qformer, qf, 1.0, ()),
          "qformer_freq3": (lambda scan: _qformer(scan, num_layers=6, freq=3), qf, 1.0, ())}


# The default suite keeps one case per stack (and remat full on the ViT and the T5 loss); the
# other combinations run with -m slow, to keep the suite inside its 15 minutes on 2 cores.
_SLOW = pytest.mark.slow
@pytest.mark.parametrize("name,remat", [
    ("vit", "none"), ("vit", "full"), ("t5_loss", "none"), ("t5_loss", "full"),
    ("t5_encode", "none"), pytest.param("t5_encode", "full", marks=_SLOW),
    ("qformer", "none"), pytest.param("qformer", "full", marks=_SLOW), ("text", "none"),
    pytest.param("qformer_freq3", "none", marks=_SLOW),
    pytest.param("qformer_freq3", "full", marks=_SLOW)])
def test_scanned_equals_unrolled(name, remat):
  build, fn, kernel_scale, unused = _loss_fns(_inputs())[name]
  unrolled, scanned = build(False), build(True)
  graphdef, params, _ = functional.split(unrolled)
  scan_graphdef, scan_params, _ = functional.split(scanned)
  # The layout does not change with scanning: same paths, same shapes.
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, scan_params)
  params = _randomize(params, seed=len(name), kernel_scale=kernel_scale)

  def run(gd, remat_name):
    def loss(p):
      with layers.remat_policy(remat_name):
        return fn(functional.merge(gd, p))
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (want_loss, want_out), want_grads = run(graphdef, "none")
  (got_loss, got_out), got_grads = run(scan_graphdef, remat)
  assert _rel(got_loss, want_loss) < TOL
  assert _rel(got_out, want_out) < TOL
  flat_want, flat_got = functional.flatten(want_grads), functional.flatten(got_grads)
  assert flat_got.keys() == flat_want.keys()
  scale = max(float(np.abs(g).max()) for g in flat_want.values())
  for path in flat_want:
    if "kernel" in path and not path.startswith(unused):  # every used matmul gets a gradient
      assert float(np.abs(flat_want[path]).max()) > 1e-3 * scale, path
    err = float(np.abs(np.asarray(flat_got[path], np.float64) - flat_want[path]).max())
    assert err < TOL * scale, (path, err / scale)


def test_stacks_scan_in_periods_of_identical_blocks():
  assert layers._period(_vit(True).blocks) == 1  # pylint: disable=protected-access
  t = _t5(True)
  assert layers._period(t.encoder.layers) == 1  # pylint: disable=protected-access
  assert layers._period(t.decoder.layers) == 1  # pylint: disable=protected-access
  assert layers._period(_qformer(True).layers) == 2  # pylint: disable=protected-access
  assert layers._period(_qformer(True, 6, 3).layers) == 3  # pylint: disable=protected-access
  # No repeating structure: call_blocks runs such a stack unrolled.
  assert layers._period(_qformer(True, 3, 2).layers) is None  # pylint: disable=protected-access


def test_scan_is_one_loop_over_layers():
  """The scanned ViT's program is one scan of `depth` steps holding one block's matmuls."""
  images = _inputs()["images"]
  jaxpr = lambda m: str(jax.make_jaxpr(lambda x: m(x))(images))
  scanned = jaxpr(_vit(True))
  one_block = jaxpr(eva_vit.VisionTransformer(image_size=16, patch_size=8, width=16, depth=1,
                                              num_heads=2, mlp_dim=32, rngs=nnx.Rngs(0)))
  assert scanned.count("scan[") == 1 and "length=3" in scanned
  assert "scan[" not in jaxpr(_vit(False))
  assert scanned.count("dot_general") == one_block.count("dot_general")


@pytest.mark.parametrize("remat", ["none", pytest.param("full", marks=pytest.mark.slow)])
def test_scanned_stacks_with_dropout(remat):
  """Training dropout inside a scanned stack: each layer draws its own masks from the Rngs
  (equality with the unrolled loop is not expected: other masks), one key gives one result."""
  inputs = _inputs()
  model = _t5(True, dropout_rate=0.3)
  qf = _qformer(True, dropout=0.3)
  graphdef, params, _ = functional.split(model)
  q_graphdef, q_params, _ = functional.split(qf)

  def loss(p, qp, seed, train):
    with layers.remat_policy(remat):
      rngs = nnx.Rngs(dropout=jax.random.key(seed))
      m, q = functional.merge(graphdef, p), functional.merge(q_graphdef, qp)
      h = q(inputs["queries"], inputs["encoder"], train=train, rngs=rngs)
      embeds = jnp.concatenate([h, inputs["embeds"]], axis=1)
      mask = jnp.concatenate([jnp.ones(h.shape[:2], bool), inputs["mask"]], axis=1)
      out, _ = m(embeds, mask, inputs["labels"], inputs["label_mask"], train=train, rngs=rngs)
      return out

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=3)
  l0, g0 = grad(params, q_params, 0, True)
  l0_again, _ = grad(params, q_params, 0, True)
  l1, _ = grad(params, q_params, 1, True)
  l_eval, _ = grad(params, q_params, 0, False)
  assert np.isfinite(float(l0)) and all(np.isfinite(x).all() for x in jax.tree.leaves(g0))
  assert float(l0) == float(l0_again)
  assert float(l0) != float(l1) and float(l0) != float(l_eval)


def test_scanned_stacks_sharded_by_rules(devices8):
  """Scanned ViT and Q-Former on a (data 2, fsdp 2, tensor 2) mesh, parameters placed by the
  config's rules and the block-output constraint active, equal the unrolled single-device call."""
  rules = [tuple(r) for r in configs_common.sharding_config().rules]
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices=devices8)
  rng = np.random.default_rng(7)
  cases = [(_vit, lambda m, a: m(a[0]), [rng.normal(size=(8, 16, 16, 3))]),
           (_qformer, lambda m, a: m(a[0], a[1]),
            [rng.normal(size=(8, 3, 16)), rng.normal(size=(8, 7, 24))])]
  for build, call, inputs in cases:
    inputs = [jnp.asarray(a, jnp.float32) for a in inputs]
    graphdef, params, axes = functional.split(build(False))
    scan_graphdef = functional.split(build(True))[0]
    params = _randomize(params, seed=3)
    want = jax.jit(lambda p, a: call(functional.merge(graphdef, p), a))(params, inputs)

    def scanned(p, a):
      with sharding.activation_rules(mesh, rules), layers.remat_policy("full"):
        return call(functional.merge(scan_graphdef, p), a)
    placed = jax.device_put(params, sharding.tree_shardings(params, axes, mesh, rules))
    batch = [jax.device_put(a, sharding.batch_sharding(mesh, a.ndim, rules)) for a in inputs]
    with jax.set_mesh(mesh):
      got = jax.jit(scanned)(placed, batch)
    assert _rel(got, want) < TOL


def test_scanned_with_rngs_but_no_dropout_equals_unrolled():
  """train=True with an Rngs but dropout 0: the per-layer Rngs the scan hands each block change
  nothing else."""
  inputs = _inputs()
  graphdef, params, _ = functional.split(_qformer(False))
  scan_graphdef = functional.split(_qformer(True))[0]
  t5_graphdef, t5_params, _ = functional.split(_t5(False))
  t5_scan_graphdef = functional.split(_t5(True))[0]
  params = _randomize(params, seed=5)
  t5_params = _randomize(t5_params, seed=6, kernel_scale=0.5)

  def loss(gd, t5_gd, p, t5p):
    with layers.remat_policy("full"):
      rngs = nnx.Rngs(dropout=jax.random.key(0))
      h = functional.merge(gd, p)(inputs["queries"], inputs["encoder"], train=True, rngs=rngs)
      embeds = jnp.concatenate([h, inputs["embeds"]], axis=1)
      mask = jnp.concatenate([jnp.ones(h.shape[:2], bool), inputs["mask"]], axis=1)
      out, _ = functional.merge(t5_gd, t5p)(embeds, mask, inputs["labels"],
                                            inputs["label_mask"], train=True, rngs=rngs)
      return out

  grad = jax.jit(jax.value_and_grad(loss, argnums=(2, 3)), static_argnums=(0, 1))
  want, want_g = grad(graphdef, t5_graphdef, params, t5_params)
  got, got_g = grad(scan_graphdef, t5_scan_graphdef, params, t5_params)
  assert _rel(got, want) < TOL
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(want_g))
  for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    assert float(np.abs(a - b).max()) < TOL * scale


def test_config_flag_reaches_every_stack_and_keeps_the_layout():
  from dynrefer_jax.models.dynrefer import DynRefer  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  trees = {}
  for scan in (True, False):
    cfg = configs_common.toy_model(vocab_size=48)
    assert cfg.scan_layers  # the default, at full size and toy size
    cfg.scan_layers = scan
    ids = {k: rng.integers(2, 48, (n, cfg.text.context_length)).astype(np.int32)
           for k, n in (("tags", 5), ("attributes", 4), ("classes", 3))}
    model = nnx.eval_shape(lambda: DynRefer(cfg, ids, rngs=nnx.Rngs(0)))  # pylint: disable=cell-var-from-loop
    assert (model.visual_encoder.scan_layers, model.Qformer.scan_layers,
            model.t5_model.scan_layers, model.text_encoder.scan_layers) == (scan,) * 4
    trees[scan] = jax.tree.map(lambda x: (x.shape, x.dtype), functional.split(model)[1])
  assert trees[True] == trees[False]
  assert configs_common.full_model().scan_layers


def _frozen_stack_runs(devices, variants):
  """One train step of the tiny model with the towers frozen, per variant (False: per-layer
  frozen weights, True: train.stack_frozen). Returns {variant: (optimised HLO, loss, trainable
  after the step)} and the per-device shapes of the stacked leaves."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  import re  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from dynrefer_jax import optim, train  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from test_scale import make_batches, tiny_config, token_ids  # pylint: disable=import-outside-toplevel
  # The original's trainable set: the towers are frozen (float32 here, so that no dtype
  # conversion sits between the slices and the scan's stack).
  config = tiny_config((1, 2, 1), **{"model.vit.depth": 3, "model.lm.num_decoder_layers": 2,
                                     "frozen_dtype": ""})
  config.trainable = list(configs_common.ORIGINAL_TRAINABLE)
  mesh = sharding.make_mesh((1, 2, 1), devices[:2])
  batch = make_batches(1)[0]
  runs, stacks = {}, set()
  built = train.build_model(config, token_ids(), mesh)
  copy = lambda tree: jax.tree.map(lambda x: x.copy(), tree)
  for stacked in variants:
    # The same initial state each time (the step donates its trainable; stacking donates frozen).
    state = dataclasses.replace(built, trainable=copy(built.trainable), frozen=copy(built.frozen))
    if stacked:
      arrays = functional.flatten(state.frozen)
      per_layer = {k: np.asarray(v) for k, v in arrays.items()}
      train.stack_frozen(state)
      depths = {"t5_model/decoder/layers": 2, "visual_encoder/blocks": 3,
                "t5_model/encoder/layers": config.model.lm.num_encoder_layers,
                "text_encoder/blocks": config.model.text.depth}
      assert dict(state.frozen_groups) == {k: n for k, n in depths.items() if n >= 2}
      flat = functional.flatten(state.frozen)
      for k, v in per_layer.items():  # stacked[i] is layer i, bit for bit
        m = re.match(r"^(.*?)/(\d+)/(.+)$", k)
        stacked_here = m and m[1] in dict(state.frozen_groups)
        got = flat[f"{m[1]}/stacked/{m[3]}"][int(m[2])] if stacked_here else flat[k]
        np.testing.assert_array_equal(np.asarray(got), v, err_msg=k)
        # The stacked layers' own arrays are freed (donated); the rest are the same arrays.
        assert arrays[k].is_deleted() == bool(stacked_here), k
      # Per-device shapes: FSDP shards the larger weights along one axis (2 devices).
      for shape in {tuple(v.shape) for k, v in flat.items() if "/stacked/" in k}:
        stacks |= {shape} | {shape[:i] + (shape[i] // 2,) + shape[i + 1:]
                             for i in range(1, len(shape)) if shape[i] % 2 == 0}
    tx, schedule = optim.make_optimizer(config.optim, state.trainable, steps_per_epoch=10)
    opt_state, opt_sh = train.init_optimizer(tx, state)
    step = train.jit_train_step(state, tx, schedule, opt_sh,
                                train.batch_shardings(batch, mesh, state.rules))
    args = (state.trainable, opt_state, state.frozen,
            sharding.host_to_global(batch, mesh, state.rules),
            jax.random.key_data(jax.random.key(0)))
    compiled = step.lower(*args).compile()
    trainable, _, metrics = compiled(*args)
    runs[stacked] = (compiled.as_text(), float(metrics["loss"]),
                     {k: np.asarray(v) for k, v in functional.flatten(trainable).items()})
  return runs, stacks


def _concatenated(hlo):
  """The output dims of every float32 concatenate in an HLO text ("f32[3,32,64]" → (3, 32, 64))."""
  import re  # pylint: disable=import-outside-toplevel
  return {tuple(int(d) for d in m[1].split(",") if d)
          for m in re.finditer(r"= f32\[([\d,]*)\][^ ]* concatenate\(", hlo)}


def test_frozen_stacks_held_stacked_without_a_copy(devices8):
  """train.stack_frozen: the frozen ViT / T5 stacks held with a leading layer axis (layer i =
  stacked[i] bit for bit, on a 2-way FSDP mesh), and the compiled step concatenates none of
  them: no per-step copy of the frozen weights (the per-layer step makes one, see the slow
  test below)."""
  runs, stacks = _frozen_stack_runs(devices8, (True,))
  hlo, loss, _ = runs[True]
  assert np.isfinite(loss)
  assert _concatenated(hlo), "the pattern reads this HLO (it has other float32 concatenates)"
  assert stacks and not _concatenated(hlo) & stacks


@pytest.mark.slow
def test_frozen_stacks_held_stacked_same_update_as_per_layer(devices8):
  """The step on stacked frozen weights equals the per-layer one (loss and every updated
  parameter), and the per-layer step does stack the frozen layers (the copy it avoids)."""
  runs, stacks = _frozen_stack_runs(devices8, (False, True))
  (hlo_a, loss_a, tr_a), (_, loss_b, tr_b) = runs[False], runs[True]
  assert loss_b == pytest.approx(loss_a, rel=1e-6)
  for k in tr_a:
    np.testing.assert_allclose(tr_b[k], tr_a[k], rtol=1e-6, atol=1e-7, err_msg=k)
  assert _concatenated(hlo_a) & stacks, "the per-layer step stacks the frozen layers"
