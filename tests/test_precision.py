"""The per-stage precision policy (config.model.precision, models/dynrefer.stage_dtypes): the
real-data configs compute as the original evaluates (ViT fp16; RoI-Align, aligner, fusion and
Q-Former fp32; heads and T5 bf16), fp16 becoming bf16 off GPUs; each stage of the composed model
runs in its dtype, and the result stays close to an all-float32 model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import common
from dynrefer_jax import config_lib
from dynrefer_jax.models import aligner, dynrefer, eva_vit, fusion, heads, qformer, roi_align
from dynrefer_jax.models import t5 as t5_lib
from dynrefer_jax.models import text_tower

F16, F32, BF16 = jnp.dtype("float16"), jnp.dtype("float32"), jnp.dtype("bfloat16")
ORIGINAL = {"vit": F16, "region": F32, "heads": BF16, "lm": BF16, "text": BF16}


def test_real_configs_default_to_the_originals_policy():
  for name in ("dynrefer_vg.py", "dynrefer_refcocog.py"):
    m = config_lib.load(f"configs/{name}").model
    assert dynrefer.stage_dtypes(m, "gpu") == ORIGINAL
    # no fast fp16 on TPUs and CPUs: bfloat16 there
    assert dynrefer.stage_dtypes(m, "tpu") == dict(ORIGINAL, vit=BF16)
    assert dynrefer.stage_dtypes(m, "cpu") == dict(ORIGINAL, vit=BF16)
  # The toy / synthetic models name no stage: everything in config.model.dtype.
  toy = common.toy_model(32)
  assert set(dynrefer.stage_dtypes(toy, "gpu").values()) == {F32}
  toy.precision.heads = "bfloat16"
  assert dynrefer.stage_dtypes(toy, "gpu")["heads"] == BF16
  with pytest.raises(ValueError, match="unknown stage.*vision"):
    dynrefer.stage_dtypes(_with(toy, vision="float16"), "gpu")


def _with(config, **stages):
  c = config.copy_and_resolve_references()
  c.precision = dict(c.precision, **stages)
  return c


def _model(precision):
  config = config_lib.load("configs/synthetic.py:smoke", [
      "model.text.vocab_size=32", "model.lm.vocab_size=32", "model.vit.depth=1",
      "model.lm.num_decoder_layers=1", "model.vit.image_size=16", "model.roi.output_size=2"])
  config.model.precision = precision
  ids = np.random.default_rng(0).integers(2, 32, (3, 8)).astype(np.int32)
  return dynrefer.DynRefer(config.model, {"tags": ids, "attributes": ids, "classes": ids},
                           rngs=nnx.Rngs(0))


def _outputs(model):
  """Runs the heads and the LM loss; returns (their outputs, {stage: dtypes it produced})."""
  rng = np.random.default_rng(1)
  batch = {"image": jnp.asarray(rng.integers(0, 255, (2, 24, 24, 3)), jnp.uint8),
           "image_hw": jnp.asarray([[24, 24], [20, 22]], jnp.int32),
           "box": jnp.asarray([[2, 3, 15, 20], [5, 5, 18, 12]], jnp.float32)}
  ts = jnp.asarray([[0.0, 0.3, 0.8], [0.0, 0.5, 1.0]], jnp.float32)
  out = model.predict_heads(batch, ts, np.array([0, 1, 1]))
  enc, mask = model.lm_inputs(out["z"], jnp.asarray([[5, 6, 1], [1, 0, 0]]),
                              jnp.asarray([[1, 1, 1], [1, 0, 0]], bool))
  loss, _ = model.t5_model(enc, mask, jnp.asarray([[7, 8, 1], [9, 1, 0]]),
                           jnp.asarray([[1, 1, 1], [1, 1, 0]], bool))
  return dict(out, lm_loss=loss)


def test_each_stage_computes_in_its_dtype(monkeypatch):
  seen = {}

  def spy(stage, fn):
    def wrapped(*args, **kwargs):
      y = fn(*args, **kwargs)
      seen.setdefault(stage, set()).add(jnp.dtype(y.dtype))
      return y
    return wrapped

  for stage, owner, name in [("vit", eva_vit.VisionTransformer, "__call__"),
                             ("region", aligner.DeformableAligner, "__call__"),
                             ("region", fusion.FusionMLP, "__call__"),
                             ("region", qformer.QFormer, "__call__"),
                             ("heads", heads.CrossAttentionDecoder, "__call__"),
                             # (the decoder's logits are float32 by design: the loss's softmax)
                             ("lm", t5_lib.T5, "encode"),
                             ("text", text_tower.TextTransformer, "__call__")]:
    monkeypatch.setattr(owner, name, spy(stage, getattr(owner, name)))
  monkeypatch.setattr(roi_align, "roi_align", spy("region", roi_align.roi_align))
  monkeypatch.setattr(dynrefer, "_platform", lambda: "gpu")   # fp16 as on a GPU
  policy = {"vit": "float16", "region": "float32", "heads": "bfloat16", "lm": "bfloat16",
            "text": "bfloat16"}
  mixed = _outputs(_model(policy))
  assert seen == {stage: {dtype} for stage, dtype in ORIGINAL.items()}
  assert mixed["z"].dtype == F32

  seen.clear()
  full = _outputs(_model(dict.fromkeys(policy, "float32")))
  assert set().union(*seen.values()) == {F32}
  # The same model (same seed) in float32: the policy changes round-off only.
  rel = lambda a, b: float(jnp.abs(a - b).max() / jnp.abs(b).max())
  assert rel(mixed["z"], full["z"]) < 2e-2
  assert rel(mixed["tag_scores"], full["tag_scores"]) < 2e-2
  assert abs(float(mixed["lm_loss"]) - float(full["lm_loss"])) < 2e-2 * float(full["lm_loss"])
