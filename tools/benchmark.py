r"""Speed of DynRefer on one accelerator: the jitted train step, caption generation, the ViT.

  python tools/benchmark.py --regions 64 --steps 10 --out bench.jsonl     # full size, random weights
  python tools/benchmark.py --weights ckpts/vg1.2_jax --vit-fp8           # converted weights, + fp8
  HF_HUB_OFFLINE=1 JAX_PLATFORMS=cpu python tools/benchmark.py \
      --config configs/synthetic.py:smoke --regions 8 --steps 2          # toy size, on a CPU
  python tools/benchmark.py --config configs/dynrefer_vicuna_vg.py      # Vicuna-7B in place of T5

Builds the model from a config (default: `configs/common.py` `full_model()` in `base()`, i.e.
EVA ViT-g/14 on 3 views, RoI-Align, aligner, fusion, Q-Former, both heads, text tower, FlanT5-XL;
any config's language model, e.g. the Vicuna variant's decoder-only LLM, whose captions continue
the prefix's KV cache)
with random weights, or a tools/convert_checkpoint.py output (`--weights` or config.model_init),
and times at `--regions` regions per step (median of `--steps` calls after `--warmup`, each
waited for with jax.block_until_ready):

- `vit_forward`: the vision tower alone on regions × views images of random pixels; `attention`
  says which attention it ran (config.model.vit.attention, "auto" resolved: cuDNN's fused
  attention on GPUs that take it). When that is cuDNN, the same tower with XLA's attention is
  timed too (`xla_attention_*`) and the features' relative error between the two is given
  (`attention_rel_error_vs_xla`, after ln_vision); `--compare-attention` does that whatever
  the attention (against itself when it is XLA's: error 0, a check of the comparison);
- `train`: `dynrefer_jax.train.jit_train_step` (the trainer's shardings, donation, remat, the
  frozen stacks held stacked as train.stack_frozen does) on a random batch (tools/memory_plan.py's
  batch, 20 caption and 8 control tokens as the anchor); when XLA's compiled plan exceeds the
  free device memory it says so ("does_not_fit", with the plan) and retries with remat "dots",
  then "full", before running anything;
- `caption`: views → vision tower → RoI-Align/aligner/fusion/Q-Former → beam search (2 beams,
  20 new tokens, repetition penalty 1.5, EOS blocked for 20 tokens as the anchor's
  min_new_tokens), one jitted function; view t fixed at linspace(0, 1, V), no heads (the anchor
  times region tokens + generate).
- `views` (issue 11): the dynamic-resolution input work alone, on the same images and boxes:
  the image prior's view selection (all 11 candidate hashes per region and the scoring,
  `views.select.select_ts("phash")`) plus the V views cut, resized and normalised
  (`build_views`), one jitted function; step_s is that, `share_of_train_step` its fraction of
  the bf16 `train` line's step (the target: ≤ 2%). `train_views_s` / `train_views_share`: the
  train step's own view work (t=0 + random candidates, then build_views).

Modes run in the anchor's order (vit_forward, train, caption; then views) so that the cumulative
peak memory after `train` compares with the anchor's `peak_gib` (torch.cuda.max_memory_allocated,
also never reset). Each prints one JSON line: regions/s, step_s (median), achieved TFLOP/s by
dynrefer_jax/flops.py (the anchor's count: 1.99 TFLOP per training region at full size; caption:
the forward parts + T5 encoder + per beam and token the decoder), peak_bytes
(device.memory_stats()['peak_bytes_in_use'], null where the backend has none), compile_s (trace +
lower + XLA compile, ahead of time), the device kind, date and command. A first `setup` line has
the build time and parameter counts. A mode that fails prints status "error" and the rest go on.

`--vit-fp8 [RECIPE]` then repeats vit_forward, train and caption with config.model.vit_fp8 =
RECIPE (default True, i.e. "rowwise"; dynrefer_jax/models/fp8.py) and prints a `vit_fp8` line
with the ViT features' relative error against the config's compute dtype (bf16 at full size, float32 for
the toy) on the same images: Frobenius over all tokens of the tower output (`rel_error_vit`) and
after ln_vision (`rel_error_ln_vision`), and the worst token after ln_vision. When that reference
is not float32, an untimed float32 forward adds both towers' errors against float32 (`*_vs_f32`,
`reference_*_vs_f32`: bf16 is not exact either). `f8_dots` counts the dots with fp8 operands in
the lowered forward (4 per block; once for a scanned stack). A config that trains the tower gets
the feature error (the forward is that of the frozen tower) but no fp8 train step. If the
lowered fp8 forward has no f8 at all (the tower not wired), the line says so ("wiring pending")
instead of timing bf16 under an fp8 label.

`--profile DIR` also traces two more calls of the bf16 `train` and `caption` programs with
jax.profiler (DIR/<mode>/, a Perfetto trace among them) and writes each compiled program's
optimised HLO (DIR/<mode>.hlo.txt), so that tools/profile_summary.py can attribute the device
time to kernels, XLA fusions and the model's source files (eva_vit.py, t5.py, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MODES = ("vit_forward", "train", "caption", "views")
_T0 = time.perf_counter()


def log(msg: str) -> None:
  """A progress line on stderr with the seconds since start (where a cut-short run stopped)."""
  print(f"[{time.perf_counter() - _T0:7.1f} s] {msg}", file=sys.stderr, flush=True)
ANCHOR_CONTROL_LEN, ANCHOR_CAPTION_LEN = 8, 20   # bench/torch_anchor.py's ctrl and labels


# ------------------------------------------------------------------------------ inputs

def load_config(spec: str, sets: list[str]):
  """configs/<name>.py[:arg] (default: the full-size model), with vit_fp8 settable by --set."""
  from dynrefer_jax import config_lib  # pylint: disable=import-outside-toplevel
  import memory_plan  # pylint: disable=import-outside-toplevel
  if spec:
    config = config_lib.load(spec, [])
  else:
    config = memory_plan.full_config((-1, 1, 1), "none")
  with config.unlocked():
    for key in ("text", "lm"):           # AUTO vocabularies: no tokenizer is read here
      if config.model[key].vocab_size == -1:
        config.model[key].vocab_size = 1024
    vit_fp8 = config.model.get("vit_fp8", False)   # a recipe name stays a string
    config.model.vit_fp8 = vit_fp8 if isinstance(vit_fp8, str) else bool(vit_fp8)
  return config_lib.override(config, sets)


def text_token_ids(config, *, num_tags: int, num_templates: int, num_attributes: int,
                   num_classes: int, seed: int = 0) -> dict:
  """Random token ids of the tag / template / class tables (their embeddings are computed at
  init); template t scores attribute t mod A."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  rs = np.random.RandomState(seed)
  t = config.model.text
  ids = {k: rs.randint(2, t.vocab_size, (n, t.context_length)).astype(np.int32)
         for k, n in (("tags", num_tags), ("attributes", num_templates), ("classes", num_classes))}
  ids["template_to_attribute"] = (np.arange(num_templates) % num_attributes).astype(np.int32)
  return ids


def random_batch(config, regions: int, *, image_size: int, text_len: int, num_tags: int,
                 num_attributes: int, num_classes: int, seed: int = 0) -> dict:
  """One training batch (docs/ARCHITECTURE.md) of random values, as numpy arrays."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import memory_plan  # pylint: disable=import-outside-toplevel
  spec = memory_plan.batch_spec(config, regions, image_size=image_size,
                                caption_len=ANCHOR_CAPTION_LEN, control_len=ANCHOR_CONTROL_LEN,
                                text_len=text_len, num_tags=num_tags,
                                num_attributes=num_attributes)
  rs = np.random.RandomState(seed)
  s = image_size
  xy = rs.uniform(0, s / 2, (regions, 2))
  wh = rs.uniform(s / 16, s / 2, (regions, 2))
  lm_vocab, text_vocab = config.model.lm.vocab_size, config.model.text.vocab_size
  values = {
      "image": lambda shape: rs.randint(0, 256, shape),
      "image_hw": lambda shape: np.full(shape, s),
      "box": lambda shape: np.concatenate([xy, np.minimum(xy + wh, s)], 1),
      "caption_ids": lambda shape: rs.randint(2, lm_vocab, shape),
      "caption_mask": np.ones,
      "control_ids": lambda shape: rs.randint(2, lm_vocab, shape),
      "control_mask": np.ones,
      "text_ids": lambda shape: rs.randint(1, text_vocab, shape),
      "tags": lambda shape: rs.uniform(size=shape) < 0.002,
      "category": lambda shape: rs.randint(0, num_classes, shape),
      "attributes": lambda shape: rs.randint(-1, 2, shape),
      "mask": np.ones,
  }
  return {k: np.asarray(values[k](shape), np.dtype(dtype)) for k, (shape, dtype) in spec.items()}


TABLE_IDS = {"tag_token_ids": "tags", "att_token_ids": "attributes", "ov_token_ids": "classes",
             "att_template_owner": "template_to_attribute"}   # int tables: the ids given


def fill_value(path: str) -> tuple[str, float]:
  """How random_fill makes a parameter, by its name: ("const", c) or ("normal", std)."""
  name = path.split("/")[-1]
  if name == "scale":
    return "const", 1.0
  if name == "attr_t":
    return "const", float(math.log(10.0))     # SPEC §7b's initial values
  if name == "attr_b":
    return "const", -10.0
  if name.endswith("bias") or name == "cem_memory":
    return "const", 0.0
  return "normal", 0.02


def random_fill(abstract: dict, ids: dict, seed: int = 0) -> dict:
  """Arrays for a tree of jax.ShapeDtypeStructs (with shardings), made on the devices by one
  tiny jitted program per distinct (shape, dtype, sharding, rule) (fill_value: normal(0, 0.02)
  matrices and embeddings, unit norm scales, zero biases); the int token-id tables are `ids`."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from dynrefer_jax import functional  # pylint: disable=import-outside-toplevel
  programs, out = {}, {}
  for i, (path, x) in enumerate(sorted(functional.flatten(abstract).items())):
    name = path.split("/")[-1]
    if name in TABLE_IDS:
      out[path] = jax.device_put(np.asarray(ids[TABLE_IDS[name]], x.dtype).reshape(x.shape),
                                 x.sharding)
      continue
    rule, value = fill_value(path)
    key = (x.shape, x.dtype, x.sharding, rule, value)
    if key not in programs:
      if rule == "const":
        fn = lambda k, shape=x.shape, dtype=x.dtype, v=value: jnp.full(shape, v, dtype)
      else:
        fn = lambda k, shape=x.shape, dtype=x.dtype, v=value: (
            v * jax.random.normal(k, shape, jnp.float32)).astype(dtype)
      programs[key] = jax.jit(fn, out_shardings=x.sharding)
    out[path] = programs[key](jax.random.key(seed + i))
  log(f"random_fill: {len(out)} arrays from {len(programs)} programs")
  return functional.unflatten(out)


def build_random(config, ids: dict, mesh):
  """train.ModelState with random weights, without compiling the model's init: every array
  comes from random_fill. The model's own init is one program with an RNG fusion per parameter
  and the text tower run over every tag for the tables: at full size it compiled for over
  6 minutes on the H200 (8 min on a 2-core CPU, 59 MB of HLO), so the first GPU runs ended
  before their first figure. Values only matter for timing here: the tables are random, not
  the text tower's embeddings of the tags, and DynRefer's modules do not start as the original's
  (the aligner's offsets are not zero, for one)."""
  from dynrefer_jax import train  # pylint: disable=import-outside-toplevel
  log("abstract model")
  _, state = train.abstract_model(config, ids, mesh)
  state.trainable = random_fill(state.trainable, ids, seed=0)
  state.frozen = random_fill(state.frozen, ids, seed=1 << 20)
  return state


def build_state(config, ids: dict, weights: str):
  """train.ModelState on all local devices: random init (build_random), or `weights` (a
  converted directory) restored straight onto the shardings."""
  from dynrefer_jax import sharding, train  # pylint: disable=import-outside-toplevel
  mesh = sharding.make_mesh(dict(config.sharding.mesh))
  if not weights:
    state = build_random(config, ids, mesh)
  else:
    state = train.build_model(config, ids, mesh, model_init=weights)
  if config.model.get("scan_layers", False):
    train.stack_frozen(state)  # as the trainer holds them (no per-step copy of the stacks)
  return state


def converted_ids(weights: str) -> dict:
  """The table shapes of a converted checkpoint (its vocab.json)."""
  from dynrefer_jax import predict  # pylint: disable=import-outside-toplevel
  root, _ = predict.checkpoint_root(weights)
  return predict.Vocab.from_converted(root).text_token_ids


# ------------------------------------------------------------------------------ measuring

def peak_bytes():
  """device.memory_stats()['peak_bytes_in_use'] of the first local device, None if unknown."""
  import jax  # pylint: disable=import-outside-toplevel
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def free_device_bytes() -> int | None:
  """bytes_limit − bytes_in_use of the first local device, None where the backend keeps none."""
  import jax  # pylint: disable=import-outside-toplevel
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  if not stats or "bytes_limit" not in stats:
    return None
  return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def compiled_bytes(compiled) -> dict:
  """XLA's per-device plan of a compiled program: arguments, outputs, aliases, temporaries and
  what it needs on top of its (already resident) arguments."""
  ma = compiled.memory_analysis()
  if ma is None:
    return {}
  out = {k: int(getattr(ma, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
  out["extra"] = out["output"] - out["alias"] + out["temp"]
  return out


class DoesNotFit(RuntimeError):
  """The compiled step needs more device memory than is free (nothing was run)."""


def time_calls(run, steps: int, warmup: int) -> tuple[float, list[float]]:
  """(median seconds, every timed call): `run()` returns something to block on."""
  import jax  # pylint: disable=import-outside-toplevel
  for _ in range(warmup):
    jax.block_until_ready(run())
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(run())
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times


def maybe_profile(b: "Bench", mode: str, compiled, run, calls: int = 2) -> None:
  """With --profile: `calls` more calls of `run` under jax.profiler.trace(DIR/mode), and the
  compiled program's optimised HLO text beside them (DIR/mode.hlo.txt). A profiler failure is
  reported on stderr and does not fail the mode."""
  if not b.args.profile:
    return
  import jax  # pylint: disable=import-outside-toplevel
  os.makedirs(b.args.profile, exist_ok=True)
  try:
    with open(os.path.join(b.args.profile, f"{mode}.hlo.txt"), "w", encoding="utf-8") as f:
      f.write(compiled.as_text())
    with jax.profiler.trace(os.path.join(b.args.profile, mode), create_perfetto_trace=True):
      for _ in range(calls):
        jax.block_until_ready(run())
  except Exception:  # pylint: disable=broad-except
    print(f"profile of {mode} failed:", file=sys.stderr)
    traceback.print_exc()


def aot_compile(jitted, *args) -> tuple[object, float, float]:
  """(compiled, lower seconds, compile seconds): tracing + lowering, then XLA."""
  t0 = time.perf_counter()
  lowered = jitted.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  return compiled, t1 - t0, time.perf_counter() - t1


def caption_flops_per_region(m, *, num_beams: int, new_tokens: int,
                             n_control: int = ANCHOR_CONTROL_LEN) -> float:
  """Forward matmul FLOPs per captioned region, in flops.py's terms: ViT, the trainable vision
  side once (flops.py counts it 3× for training), T5 encoder, and per beam and generated token
  the decoder's per-token term (8·d·inner + 3·d·ff per layer) plus the LM head. A decoder-only
  LLM (lm.kind "llama"): the prefix (queries + control) through its layers, and per beam and
  token its layers plus the LM head."""
  from dynrefer_jax import flops  # pylint: disable=import-outside-toplevel
  f = flops.flops_per_region(m, num_tags=1)
  vision = f["vit"] + (f["qformer"] + f["fusion"] + f["align"]) / 3
  lm = m.lm
  n_ctx = m.num_query_tokens + n_control
  if lm.get("kind", "t5") == "llama":
    prefix = n_ctx * flops.llm_per_token(lm)
    per_token = flops.llm_per_token(lm) + 2 * lm.hidden_size * lm.vocab_size
  else:
    prefix, per_token = flops.t5_encoder(lm, n_ctx), flops.t5_decoder_per_token(lm)
  return float(vision + prefix + num_beams * new_tokens * per_token)


def relative_errors(graphdef, params, feats, ref, groups=()) -> dict:
  """‖a − b‖ / ‖b‖ of ViT features float[N, L, C] (a against the reference b), raw and after
  ln_vision (in float32), and the worst token's after ln_vision."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from dynrefer_jax import functional  # pylint: disable=import-outside-toplevel

  @jax.jit
  def errors(params, a, b):
    ln = functional.merge(graphdef, params, groups).ln_vision
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    la, lb = ln(a), ln(b)
    token = jnp.linalg.norm(la - lb, axis=-1) / jnp.maximum(jnp.linalg.norm(lb, axis=-1), 1e-30)
    return {"rel_error_vit": jnp.linalg.norm(a - b) / jnp.linalg.norm(b),
            "rel_error_ln_vision": jnp.linalg.norm(la - lb) / jnp.linalg.norm(lb),
            "max_token_rel_error_ln_vision": jnp.max(token)}
  return {k: float(v) for k, v in jax.device_get(errors(params, feats, ref)).items()}


@dataclasses.dataclass
class Bench:
  """One benchmark run: the model, its inputs and where the JSON lines go."""
  config: object
  state: object
  ids: dict                       # the text tables' token ids the state was built with
  batch: dict                     # numpy
  args: argparse.Namespace
  common: dict
  out_lines: list = dataclasses.field(default_factory=list)
  failed: bool = False
  train_step_s: float | None = None   # the bf16 train line's median step, for `views`

  def emit(self, record: dict) -> None:
    line = json.dumps({**record, **self.common}, default=float)
    print(line, flush=True)
    self.out_lines.append(line + "\n")
    if self.args.out:
      from dynrefer_jax import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
      ckpt_lib.atomic_write_text(self.args.out, "".join(self.out_lines))

  def measured(self, mode: str, *, step_s: float, times: list, compile_s: float, lower_s: float,
               flops_per_region: float | None, fp8: bool, **extra) -> None:
    regions = self.args.regions
    peak = peak_bytes()
    self.emit({"mode": mode, "status": "ok", "vit_fp8": fp8, "regions": regions,
               "steps": len(times), "warmup": self.args.warmup,
               "step_s": step_s, "step_s_min": min(times), "step_s_max": max(times),
               "regions_per_s": regions / step_s,
               "flops_per_region": flops_per_region,
               "tflops_per_s": (None if flops_per_region is None
                                else flops_per_region * regions / step_s / 1e12),
               "compile_s": compile_s, "lower_s": lower_s,
               "peak_bytes": peak, "peak_gib": None if peak is None else peak / 2**30, **extra})


# ------------------------------------------------------------------------------ modes

def vit_fn(graphdef, groups=()):
  """(params, images float[N, S, S, 3]) → the vision tower's features float[N, 1 + P, C];
  params as the state holds them (`groups`: its stacked frozen stacks)."""
  from dynrefer_jax import functional  # pylint: disable=import-outside-toplevel
  return lambda params, images: functional.merge(graphdef, params, groups).visual_encoder(images)


def caption_fn(graphdef, m, gen: dict, groups=()):
  """(params, batch with image, image_hw, box, control_ids, control_mask) → (ids int[B, T],
  scores float[B]): views at t = linspace(0, 1, V) → region tokens → beam search."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from dynrefer_jax import functional  # pylint: disable=import-outside-toplevel
  from dynrefer_jax.views import select as views  # pylint: disable=import-outside-toplevel
  dtype = jnp.dtype(m.get("dtype") or "float32")

  def caption(params, batch):
    model = functional.merge(graphdef, params, groups)
    n = batch["box"].shape[0]
    ts = jnp.broadcast_to(jnp.linspace(0.0, 1.0, m.num_views), (n, m.num_views))
    pixels, vboxes = views.build_views(batch["image"], batch["image_hw"], batch["box"], ts,
                                       m.vit.image_size)
    z = model.encode_views(pixels.astype(dtype), vboxes)
    return model.caption(z, batch["control_ids"], batch["control_mask"].astype(bool), **gen)
  return caption


def caption_settings(args, m=None) -> dict:
  """The anchor's decoding: EOS blocked until new_tokens are out (its min_new_tokens). HF counts
  T5's decoder start token in min_length; a decoder-only LLM's prefix has none."""
  start = 0 if m is not None and m.lm.get("kind", "t5") == "llama" else 1
  return dict(num_beams=args.beams, max_new_tokens=args.new_tokens,
              repetition_penalty=args.repetition_penalty, length_penalty=0.0,
              min_length=args.new_tokens + start)

def run_vit_forward(b: Bench, graphdef, *, fp8: bool = False):
  """The vision tower on regions × views random images; returns (features, images)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from dynrefer_jax import flops  # pylint: disable=import-outside-toplevel
  m = b.config.model
  n = b.args.regions * m.num_views
  dtype = jnp.dtype(m.get("dtype") or "float32")
  images = jax.jit(lambda k: jax.random.normal(k, (n, m.vit.image_size, m.vit.image_size, 3),
                                               dtype))(jax.random.key(1))
  params, groups = b.state.held_params(), b.state.frozen_groups
  compiled, lower_s, compile_s = aot_compile(jax.jit(vit_fn(graphdef, groups)), params, images)
  step_s, times = time_calls(lambda: compiled(params, images), b.args.steps, b.args.warmup)
  feats = compiled(params, images)
  per_region = flops.flops_per_region(m, num_tags=1)["vit"]
  attention = resolved_attention(m)
  extra = {"attention": attention}
  if (attention == "cudnn" or b.args.compare_attention) and not fp8:
    # The same tower with XLA's attention on the same images: its time, and how far cuDNN's
    # fused attention moves the features (both bf16).
    xla = model_graphdef(b, vit=dict(m.vit, attention="xla"))
    compiled_xla, _, xla_compile_s = aot_compile(jax.jit(vit_fn(xla, groups)), params, images)
    xla_s, _ = time_calls(lambda: compiled_xla(params, images), b.args.steps, b.args.warmup)
    errors = relative_errors(graphdef, params, feats, compiled_xla(params, images), groups)
    extra.update({"xla_attention_step_s": xla_s, "xla_attention_images_per_s": n / xla_s,
                  "xla_attention_compile_s": xla_compile_s,
                  "attention_rel_error_vs_xla": errors["rel_error_ln_vision"]})
  b.measured("vit_forward", step_s=step_s, times=times, compile_s=lower_s + compile_s,
             lower_s=lower_s, flops_per_region=per_region, fp8=fp8, images=n,
             images_per_s=n / step_s, **extra)
  return feats, images


def resolved_attention(m) -> str:
  """What the vision tower's attention runs as here: config.model.vit.attention, with "auto"
  resolved as layers.dot_product_attention resolves it for the tower's unmasked attention."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from dynrefer_jax.models import layers  # pylint: disable=import-outside-toplevel
  attention = m.vit.get("attention", "auto")
  if attention != "auto":
    return attention
  dtype = jnp.dtype(m.get("dtype") or "float32").name
  head_dim = m.vit.width // m.vit.num_heads
  return "cudnn" if layers.cudnn_attention_available(dtype, head_dim) else "xla"


def run_train_fitting(b: Bench, graphdef, *, fp8: bool = False) -> None:
  """run_train at config.model.remat; when its compiled plan does not fit in the free device
  memory, a `train` line with status "does_not_fit" and the plan, then remat "dots", then
  "full" (the figure line names the remat it ran with)."""
  first = b.config.model.get("remat", "none")
  order = [first] + [r for r in ("dots", "full") if r != first]
  for i, remat in enumerate(order):
    try:
      return run_train(b, graphdef, fp8=fp8, remat=remat, must_fit=i + 1 < len(order))
    except DoesNotFit as e:
      b.emit({"mode": "train", "status": "does_not_fit", "vit_fp8": fp8, "remat": remat,
              **e.args[0]})
  return None


def run_train(b: Bench, graphdef, *, fp8: bool = False, remat: str | None = None,
              must_fit: bool = False) -> None:
  """Steps of the trainer's jitted update; the state goes on from the last step. must_fit:
  raise DoesNotFit (before running, so nothing is donated) when XLA's plan exceeds the free
  device memory."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from dynrefer_jax import flops, optim, train  # pylint: disable=import-outside-toplevel
  state = dataclasses.replace(b.state, graphdef=graphdef)
  tx, schedule = optim.make_optimizer(b.config.optim, state.trainable, steps_per_epoch=1000)
  opt_state, opt_sh = train.init_optimizer(tx, state)
  batch_sh = train.batch_shardings(b.batch, state.mesh, state.rules)
  batch = {k: jax.device_put(v, batch_sh[k]) for k, v in b.batch.items()}
  replicated = jax.sharding.NamedSharding(state.mesh, jax.sharding.PartitionSpec())
  rng = jax.device_put(np.asarray(jax.random.key_data(jax.random.key(0))), replicated)
  remat = remat or b.config.model.get("remat", "none")
  step = train.jit_train_step(state, tx, schedule, opt_sh, batch_sh, remat=remat)
  compiled, lower_s, compile_s = aot_compile(step, state.trainable, opt_state, state.frozen,
                                             batch, rng)
  plan, free = compiled_bytes(compiled), free_device_bytes()
  if must_fit and plan and free is not None and plan["extra"] > free:
    raise DoesNotFit({"plan_bytes": plan, "free_bytes": free, "compile_s": lower_s + compile_s})
  carry = {"trainable": state.trainable, "opt": opt_state, "loss": None}

  def run():
    carry["trainable"], carry["opt"], metrics = compiled(carry["trainable"], carry["opt"],
                                                         state.frozen, batch, rng)
    carry["loss"] = metrics["loss"]
    return metrics["loss"]

  step_s, times = time_calls(run, b.args.steps, b.args.warmup)
  if not fp8:
    maybe_profile(b, "train", compiled, run)
  b.state.trainable = carry["trainable"]  # the old buffers were donated
  if not fp8:
    b.train_step_s = step_s
  per_region = flops.flops_per_region(b.config.model, num_tags=b.batch["tags"].shape[1])["total"]
  b.measured("train", step_s=step_s, times=times, compile_s=lower_s + compile_s,
             lower_s=lower_s, flops_per_region=per_region, fp8=fp8,
             loss=float(carry["loss"]), remat=remat, plan_bytes=plan,
             frozen_stacked=[p for p, _ in state.frozen_groups])


def run_caption(b: Bench, graphdef, *, fp8: bool = False) -> None:
  """Views → region tokens → beam search, as one jitted function."""
  import jax  # pylint: disable=import-outside-toplevel
  from dynrefer_jax import train  # pylint: disable=import-outside-toplevel
  m, a = b.config.model, b.args
  gen = caption_settings(a, m)
  keys = ("image", "image_hw", "box", "control_ids", "control_mask")
  batch_sh = train.batch_shardings({k: b.batch[k] for k in keys}, b.state.mesh, b.state.rules)
  batch = {k: jax.device_put(b.batch[k], batch_sh[k]) for k in keys}
  params = b.state.held_params()
  compiled, lower_s, compile_s = aot_compile(
      jax.jit(caption_fn(graphdef, m, gen, b.state.frozen_groups)), params, batch)
  step_s, times = time_calls(lambda: compiled(params, batch), a.steps, a.warmup)
  if not fp8:
    maybe_profile(b, "caption", compiled, lambda: compiled(params, batch))
  ids, _ = compiled(params, batch)
  b.measured("caption", step_s=step_s, times=times, compile_s=lower_s + compile_s,
             lower_s=lower_s, fp8=fp8, generated_tokens=int(ids.shape[1]),
             flops_per_region=caption_flops_per_region(m, num_beams=a.beams,
                                                       new_tokens=a.new_tokens),
             **{k: v for k, v in gen.items() if k != "length_penalty"})


def views_fn(m, method: str):
  """(image, image_hw, box, rng) → (pixels float[B, V, S, S, 3] in the model dtype, boxes in the
  views): method "phash" = inference (the image prior picks the views), "train" = the train
  step's draw (t=0, then distinct random candidates)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from dynrefer_jax.views import select as views  # pylint: disable=import-outside-toplevel
  dtype = jnp.dtype(m.get("dtype") or "float32")

  def fn(image, image_hw, box, rng):
    if method == "train":
      ts = views.sample_train_ts(rng, box.shape[0], m.num_views)
    else:
      ts = views.select_ts(method, image, image_hw, box, num_views=m.num_views)
    pixels, vboxes = views.build_views(image, image_hw, box, ts, m.vit.image_size)
    return pixels.astype(dtype), vboxes
  return fn


def run_views(b: Bench, graphdef, *, fp8: bool = False) -> None:
  """View selection + construction alone, and the train step's view construction alone; each
  as a share of the bf16 train step measured before it (issue 11: ≤ 2%)."""
  del graphdef  # views have no parameters
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from dynrefer_jax import train  # pylint: disable=import-outside-toplevel
  m, a = b.config.model, b.args
  keys = ("image", "image_hw", "box")
  batch_sh = train.batch_shardings({k: b.batch[k] for k in keys}, b.state.mesh, b.state.rules)
  inputs = [jax.device_put(b.batch[k], batch_sh[k]) for k in keys]
  replicated = jax.sharding.NamedSharding(b.state.mesh, jax.sharding.PartitionSpec())
  rng = jax.device_put(jax.random.key(0), replicated)
  timed = {}
  for method in ("phash", "train"):
    compiled, lower_s, compile_s = aot_compile(jax.jit(views_fn(m, method)), *inputs, rng)
    step_s, times = time_calls(lambda c=compiled: c(*inputs, rng), a.steps, a.warmup)
    timed[method] = (step_s, times, lower_s + compile_s, lower_s)
  step_s, times, compile_s, lower_s = timed["phash"]
  train_s = b.train_step_s
  share = lambda t: None if not train_s else t / train_s
  b.measured("views", step_s=step_s, times=times, compile_s=compile_s, lower_s=lower_s,
             flops_per_region=None, fp8=fp8, selection="phash", num_views=int(m.num_views),
             candidates=11, image_size=int(np.shape(b.batch["image"])[1]),
             train_step_s=train_s, share_of_train_step=share(step_s),
             train_views_s=timed["train"][0], train_views_share=share(timed["train"][0]),
             train_views_compile_s=timed["train"][2])


def model_graphdef(b: Bench, **model_overrides):
  """The graphdef of b's model with config.model keys replaced (vit_fp8, dtype); same params."""
  from dynrefer_jax import train  # pylint: disable=import-outside-toplevel
  config = b.config.copy_and_resolve_references()
  with config.unlocked(), config.model.ignore_type():   # vit_fp8: a bool or a recipe name
    for key, value in model_overrides.items():
      config.model[key] = value
  return train.abstract_model(config, b.ids, b.state.mesh)[1].graphdef


def fp8_graphdef(b: Bench, recipe=True):
  """(graphdef with config.model.vit_fp8 = recipe, the number of dots with f8 operands in its
  lowered ViT forward, None if the program has no f8 at all: the tower is not wired)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  # The forward is the same with the tower frozen (only gradients stop), and fp8 needs it frozen.
  graphdef = model_graphdef(b, vit_fp8=recipe, train_vision_encoder=False)
  m = b.config.model
  image = jax.ShapeDtypeStruct((1, m.vit.image_size, m.vit.image_size, 3),
                               jnp.dtype(m.get("dtype") or "float32"))
  hlo = jax.jit(vit_fn(graphdef, b.state.frozen_groups)).lower(b.state.held_params(),
                                                                 image).as_text()
  if "f8e4m3fn" not in hlo.lower():
    return graphdef, None
  return graphdef, sum("dot_general" in line and "f8E4M3FN" in line for line in hlo.splitlines())


# ------------------------------------------------------------------------------ main

def parse_args(argv):
  p = argparse.ArgumentParser(prog="python tools/benchmark.py",
                              description=__doc__.split("\n")[0])
  p.add_argument("--config", default="", help="configs/<name>.py[:arg]; default: full size")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override, e.g. --set model.remat=dots (repeatable)")
  p.add_argument("--weights", default="", help="a tools/convert_checkpoint.py output "
                 "(default: config.model_init, else random init)")
  p.add_argument("--regions", type=int, default=64, help="regions per step")
  p.add_argument("--steps", type=int, default=10, help="timed calls per mode (median reported)")
  p.add_argument("--warmup", type=int, default=3, help="untimed calls before them")
  p.add_argument("--modes", default=",".join(MODES), help="comma list of " + ", ".join(MODES)
                 + ", run in that order (default: the anchor's)")
  p.add_argument("--vit-fp8", nargs="?", const=True, default=False, metavar="RECIPE",
                 help="also vit_forward and train with the fp8 ViT (RECIPE: a name of "
                 "dynrefer_jax/models/fp8.py RECIPES, default rowwise), and its feature error")
  p.add_argument("--compare-attention", action="store_true",
                 help="time the ViT with XLA's attention too, and the features' difference, "
                 "even when the tower's attention is not cuDNN's (done then anyway)")
  p.add_argument("--beams", type=int, default=2)
  p.add_argument("--new-tokens", type=int, default=20)
  p.add_argument("--repetition-penalty", type=float, default=1.5)
  p.add_argument("--image-size", type=int, default=0,
                 help="padded image side of the batch (0: config.data.window_size, else 640)")
  p.add_argument("--num-tags", type=int, default=4585)
  p.add_argument("--num-templates", type=int, default=474)
  p.add_argument("--num-attributes", type=int, default=117)
  p.add_argument("--num-classes", type=int, default=80)
  p.add_argument("--budget-s", type=float, default=0.0,
                 help="skip the modes that would start after this many seconds (0: no limit)")
  p.add_argument("--profile", default="", metavar="DIR",
                 help="trace the bf16 train and caption programs into DIR (tools/profile_summary.py)")
  p.add_argument("--out", default="", help="also write the JSON lines here (rewritten "
                 "atomically after each line)")
  args = p.parse_args(argv)
  modes = [x for x in args.modes.split(",") if x]
  bad = [x for x in modes if x not in MODES]
  if bad or not modes:
    p.error(f"--modes: unknown {bad}; choose from {', '.join(MODES)}")
  if min(args.regions, args.steps) < 1 or args.warmup < 0:
    p.error("--regions and --steps must be at least 1, --warmup at least 0")
  if "views" in modes and "train" in modes and modes.index("views") < modes.index("train"):
    p.error("--modes: views reports its share of the train step, so it runs after train")
  args.modes = list(dict.fromkeys(modes))   # in the order given
  if isinstance(args.vit_fp8, str):
    from dynrefer_jax.models import fp8  # pylint: disable=import-outside-toplevel
    if args.vit_fp8 not in fp8.RECIPES:
      p.error(f"--vit-fp8: unknown recipe {args.vit_fp8!r}; choose from {', '.join(fp8.RECIPES)}")
  return args


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  t_start = time.perf_counter()
  import jax  # pylint: disable=import-outside-toplevel
  from dynrefer_jax import train as train_lib  # pylint: disable=import-outside-toplevel
  train_lib.configure_jax()   # as the trainer runs (threefry's CUDA kernel on GPUs)
  from dynrefer_jax import config_lib  # pylint: disable=import-outside-toplevel
  try:
    config = load_config(args.config, args.set)
  except (ValueError, config_lib.ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  weights = args.weights or config.get("model_init", "") or ""
  if weights:
    ids = converted_ids(weights)
  else:
    ids = text_token_ids(config, num_tags=args.num_tags, num_templates=args.num_templates,
                         num_attributes=args.num_attributes, num_classes=args.num_classes)
  image_size = args.image_size or config.get("data", {}).get("window_size", 640)
  text_len = config.model.text.context_length
  batch = random_batch(config, args.regions, image_size=image_size, text_len=text_len,
                       num_tags=ids["tags"].shape[0],
                       num_attributes=int(ids["template_to_attribute"].max()) + 1,
                       num_classes=ids["classes"].shape[0])
  dev = jax.local_devices()[0]
  common = {"config": args.config or "full_model", "weights": weights or "random",
            "device_kind": dev.device_kind, "platform": dev.platform,
            "num_devices": jax.device_count(), "jax_version": jax.__version__,
            "threefry_gpu_kernel": bool(jax.config.jax_threefry_gpu_kernel_lowering),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python tools/benchmark.py " + " ".join(argv)}
  t0 = time.perf_counter()
  state = build_state(config, ids, weights)
  jax.block_until_ready(state.frozen)
  b = Bench(config, state, ids, batch, args, common)
  count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
  b.emit({"mode": "setup", "status": "ok", "build_s": time.perf_counter() - t0,
          "trainable_parameters": count(state.trainable),
          "frozen_parameters": count(state.frozen), "image_size": image_size,
          "num_tags": int(ids["tags"].shape[0]), "frozen_dtype": config.frozen_dtype,
          "dtype": config.model.get("dtype"), "peak_bytes": peak_bytes()})

  def attempt(mode, fn, *fn_args, **kw):
    elapsed = time.perf_counter() - t_start
    if args.budget_s and elapsed > args.budget_s:
      b.emit({"mode": mode, "status": "skipped", "vit_fp8": kw.get("fp8", False),
              "reason": f"time budget: {elapsed:.0f} s elapsed of {args.budget_s:.0f} s"})
      return None
    log(f"{mode} (fp8={kw.get('fp8', False)})")
    try:
      return fn(b, *fn_args, **kw)
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      b.failed = True
      b.emit({"mode": mode, "status": "error", "vit_fp8": kw.get("fp8", False),
              "error": f"{type(e).__name__}: {str(e)[:2000]}"})
      return None

  runners = {"vit_forward": run_vit_forward, "train": run_train_fitting,
             "caption": run_caption, "views": run_views}
  base_fp8 = bool(config.model.get("vit_fp8", False))   # --set model.vit_fp8=true
  for mode in args.modes:
    attempt(mode, runners[mode], state.graphdef, fp8=base_fp8)
  if args.vit_fp8:
    graphdef = attempt("vit_fp8", run_fp8, recipe=args.vit_fp8)
    if graphdef is not None and "train" in args.modes:
      attempt("train", run_train_fitting, graphdef, fp8=True)
    if graphdef is not None and "caption" in args.modes:
      attempt("caption", run_caption, graphdef, fp8=True)
  return 1 if b.failed else 0


def run_fp8(b: Bench, recipe=True):
  """The fp8 ViT: the wiring check, then vit_forward in fp8 and the features' error against the
  compute-dtype forward on the same images (and both against float32 when that is not float32).
  Returns the fp8 graphdef for the fp8 train step, None when there is none to run (not wired, or
  the config trains the tower: its features are still measured, as the forward is the same)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from dynrefer_jax.models import fp8  # pylint: disable=import-outside-toplevel
  name = fp8.recipe(recipe)
  trainable = bool(b.config.model.get("train_vision_encoder", False))
  graphdef, f8_dots = fp8_graphdef(b, name)
  if f8_dots is None:
    b.emit({"mode": "vit_fp8", "status": "pending", "vit_fp8": True, "recipe": name,
            "message": "fp8 ViT wiring pending: the lowered ViT forward with "
                       f"config.model.vit_fp8={name!r} has no f8 dot; dynrefer_jax/models/fp8.py "
                       "says where it must be wired. No fp8 figure is measured."})
    return None
  feats, images = run_vit_forward(b, graphdef, fp8=True)
  # The reference runs now, on the same parameters: the train mode has updated a trainable tower.
  params, groups = b.state.held_params(), b.state.frozen_groups
  ref = jax.jit(vit_fn(b.state.graphdef, groups))(params, images)
  errors = relative_errors(b.state.graphdef, params, feats, ref, groups)
  ref_dtype = jnp.dtype(b.config.model.get("dtype") or "float32")
  if ref_dtype != jnp.float32:
    g32 = model_graphdef(b, dtype="float32")
    with jax.default_matmul_precision("highest"):
      f32 = jax.jit(vit_fn(g32, groups))(params, images.astype(jnp.float32))
    vs32 = relative_errors(b.state.graphdef, params, feats, f32, groups)
    ref32 = relative_errors(b.state.graphdef, params, ref, f32, groups)
    errors.update({f"{k}_vs_f32": v for k, v in vs32.items()})
    errors.update({f"reference_{k}_vs_f32": v for k, v in ref32.items()})
  note = ({"note": "the config trains the vision tower: fp8 features measured with it frozen "
                   "(same forward), no fp8 train step (fp8 needs a frozen tower)"}
          if trainable else {})
  b.emit({"mode": "vit_fp8", "status": "ok", "vit_fp8": True, "recipe": name,
          "f8_dots": f8_dots, "reference_dtype": ref_dtype.name, "images": int(images.shape[0]),
          **errors, "within_1e-2": errors["rel_error_ln_vision"] <= 1e-2, **note})
  return None if trainable else graphdef


if __name__ == "__main__":
  sys.exit(main())
