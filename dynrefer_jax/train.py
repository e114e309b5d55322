r"""The trainer: one pure jitted step over a device mesh, Orbax checkpoints, exact resume.

  python -m dynrefer_jax.train --config configs/synthetic.py:smoke --workdir /tmp/smoke \
      [--config.train.steps=100 ...]

Writes into the workdir: metrics.jsonl (one JSON object per logged step), tensorboard/ and
checkpoints/ (Orbax). Resume order: the workdir's latest checkpoint → config.resume →
config.model_init → random init. SIGTERM / SIGINT save a checkpoint and exit 0.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from dynrefer_jax import checkpoint as ckpt_lib
from dynrefer_jax import config_lib, console, functional, optim, sharding
from dynrefer_jax import flops as flops_lib
from dynrefer_jax.metrics_writer import MetricsWriter
from dynrefer_jax.models import dynrefer as dynrefer_lib
from dynrefer_jax.models import layers

log = logging.getLogger("dynrefer_jax.train")


class TrainingError(RuntimeError):
  """A run that must stop (NaN loss, bad configuration); the message is one line."""


@dataclasses.dataclass
class ModelState:
  """Everything built from a config: the module's graph, parameters split by role, shardings."""
  graphdef: Any
  trainable: dict
  frozen: dict
  axes: dict
  trainable_shardings: Any
  frozen_shardings: Any
  mesh: Any
  rules: Any
  # ((prefix, layers), ...) when `frozen` holds those stacks stacked (stack_frozen), else ().
  frozen_groups: tuple = ()
  # Top-level modules the model initialised because config.model_init does not hold them.
  initialised: tuple = ()

  def params(self) -> dict:
    """Every parameter in the module's per-layer layout (stacked frozen weights are sliced:
    copies outside jit; see held_params)."""
    return functional.combine(self.trainable,
                              functional.unstack_layers(self.frozen, self.frozen_groups))

  def held_params(self) -> dict:
    """Every parameter as held (frozen stacks stacked): for jitted functions that merge with
    `functional.merge(graphdef, params, state.frozen_groups)`."""
    return functional.combine(self.trainable, self.frozen)

  def model(self, params: dict | None = None) -> nnx.Module:
    return functional.merge(self.graphdef, params if params is not None else self.params())


def trainable_patterns(config) -> tuple[list[str], list[str]]:
  """(patterns, excludes): Tables are never trainable."""
  return list(config.trainable), [r"(^|/)(clip_embeds|att_embeds|ov_embeds|att_template_owner|\w+_token_ids)$"]


def _cast_frozen(frozen: dict, dtype_name: str) -> dict:
  """Floating frozen leaves in `dtype_name` ('' keeps them); works on arrays and abstract leaves."""
  if not dtype_name:
    return frozen
  dt = jnp.dtype(dtype_name)

  def cast(x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, dt, sharding=x.sharding)
    return x.astype(dt)
  return jax.tree.map(cast, frozen)


def abstract_model(config: ml_collections.ConfigDict, text_token_ids: dict, mesh, *,
                   seed: int | None = None):
  """Everything build_model makes, without allocating a parameter.

  Returns (build, ModelState) where the state's trainable/frozen leaves are
  jax.ShapeDtypeStructs carrying their target shardings and `build()` constructs the module.
  """
  rules = [tuple(r) for r in config.sharding.rules]
  seed = config.seed if seed is None else seed
  build = lambda: dynrefer_lib.DynRefer(config.model, text_token_ids, rngs=nnx.Rngs(seed))
  graphdef, abstract, axes = functional.abstract_split(build)
  shardings = sharding.tree_shardings(abstract, axes, mesh, rules,
                                      fsdp_min_bytes=config.sharding.get("fsdp_min_bytes", 0))
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, shardings)
  patterns, excludes = trainable_patterns(config)
  trainable, frozen = functional.partition(abstract, patterns, excludes)
  frozen = _cast_frozen(frozen, config.frozen_dtype)
  tr_sh, fr_sh = functional.partition(shardings, patterns, excludes)
  return build, ModelState(graphdef, trainable, frozen, axes, tr_sh, fr_sh, mesh, rules)


def build_model(config: ml_collections.ConfigDict, text_token_ids: dict, mesh, *,
                seed: int | None = None, model_init: str = "") -> ModelState:
  """Initialises the model directly onto its shardings (never materialised on one device);
  frozen parameters are cast to config.frozen_dtype inside the same jitted init.

  With `model_init` (checkpoint.load_params: a converted directory, a pretrained init or a
  training workdir) its weights are restored straight onto the shardings and only the
  parameters it does not hold are initialised (a pretrained init's DynRefer modules; frozen
  weights a random-init run never saved); `state.initialised` names their top-level modules.
  The init program leaves the restored ones out, so XLA drops their random draws: at full size
  the init of every parameter compiles for minutes (over 6 min on an H200, 8 on a 2-core CPU).
  The values initialised are the same either way (one RNG stream from `seed`)."""
  build, state = abstract_model(config, text_token_ids, mesh, seed=seed)
  patterns, excludes = trainable_patterns(config)
  target = functional.combine(state.trainable, state.frozen)   # ShapeDtypeStructs, sharded
  loaded = {}
  if model_init:
    loaded = functional.flatten(ckpt_lib.load_params(model_init, target, seed=config.seed))
    tables = re.compile(excludes[0])  # derived from the text tower: not reported
    state.initialised = tuple(sorted({k.split("/")[0] for k in functional.flatten(target)
                                      if k not in loaded and not tables.search(k)}))
  shardings = functional.flatten(functional.combine(state.trainable_shardings,
                                                    state.frozen_shardings))
  todo = {k: s for k, s in shardings.items() if k not in loaded}

  def init():
    tr, fr = functional.partition(functional.split(build())[1], patterns, excludes)
    flat = functional.flatten(functional.combine(tr, _cast_frozen(fr, config.frozen_dtype)))
    return {k: flat[k] for k in todo}

  made = jax.jit(init, out_shardings=todo)() if todo else {}
  state.trainable, state.frozen = functional.partition(functional.unflatten({**made, **loaded}),
                                                       patterns, excludes)
  return state


def stack_frozen(state: ModelState) -> None:
  """Holds each uniform stack of frozen per-layer weights (the ViT's, T5's and the text tower's
  blocks) as one array with a leading layer axis (functional.stack_layers), in place of the
  per-layer arrays. The step slices it per layer and the scan over the layers stacks the slices
  again, which XLA folds away; with per-layer arrays the scan's stack is a copy of the frozen
  weights in every step (7.5 GB at full size on one device). Works on arrays (jitted, onto the
  stacked shardings, each per-layer array deleted once stacked) and on abstract states (memory
  plans).
  A no-op when nothing is stackable or already stacked. Meant for config.model.scan_layers
  (unrolled layers gain nothing from it)."""
  if state.frozen_groups:
    return
  state.frozen, state.frozen_shardings, state.frozen_groups = functional.stack_held(
      state.frozen, state.frozen_shardings, donate=True)


def optimizer_shardings(tx: optax.GradientTransformation, abstract_opt_state, param_shardings,
                        mesh):
  """Moments follow their parameters' shardings; everything else (counts) is replicated."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return optax.tree_utils.tree_map_params(
      tx, lambda _, s: s, abstract_opt_state, param_shardings,
      transform_non_params=lambda _: replicated)


def init_optimizer(tx, state: ModelState):
  """(opt_state, opt_shardings): the optimizer state created directly on its shardings."""
  abstract = jax.eval_shape(tx.init, state.trainable)
  shardings = optimizer_shardings(tx, abstract, state.trainable_shardings, state.mesh)
  return jax.jit(tx.init, out_shardings=shardings)(state.trainable), shardings


def make_train_step(state: ModelState, tx: optax.GradientTransformation, schedule: Callable,
                    *, remat: str = "none"):
  """The pure update (trainable, opt_state, frozen, batch, rng) → (trainable, opt_state, metrics).

  The step number is the optimizer's own count, so the update needs nothing else: the step's
  key is fold_in(rng, step). `frozen` is in the state's layout (stacked after stack_frozen).
  Gradients are taken with respect to `trainable` only; `frozen` (possibly bf16) is never
  differentiated. Metrics: loss, each head's loss, grad_norm, param_norm, lr (all scalars,
  replicated).
  """
  graphdef, mesh, rules, groups = state.graphdef, state.mesh, state.rules, state.frozen_groups

  def step_fn(trainable, opt_state, frozen, batch, rng):
    step = optim.step_count(opt_state)
    rng = jax.random.fold_in(rng, step)
    frozen = functional.unstack_layers(frozen, groups)  # slices of the stacks (stack_frozen)

    def loss_fn(tr):
      with sharding.activation_rules(mesh, rules), layers.remat_policy(remat):
        model = functional.merge(graphdef, functional.combine(tr, frozen))
        return model(batch, rng, train=True)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics = {"loss": loss, **aux, "grad_norm": optax.global_norm(grads),
               "param_norm": optax.global_norm(trainable), "lr": schedule(step)}
    return trainable, opt_state, metrics

  return step_fn


def batch_shardings(batch: dict, mesh, rules) -> dict:
  return {k: sharding.batch_sharding(mesh, np.ndim(v), rules) for k, v in batch.items()}


def jit_train_step(state: ModelState, tx, schedule, opt_shardings, batch_sh: dict, *,
                   remat: str = "none"):
  """make_train_step jitted with explicit in/out shardings, donating trainable and opt_state."""
  replicated = jax.sharding.NamedSharding(state.mesh, jax.sharding.PartitionSpec())
  return jax.jit(
      make_train_step(state, tx, schedule, remat=remat),
      in_shardings=(state.trainable_shardings, opt_shardings, state.frozen_shardings, batch_sh,
                    replicated),
      out_shardings=(state.trainable_shardings, opt_shardings, replicated),
      donate_argnums=(0, 1))


def text_token_ids_from(data) -> dict:
  ids = {k: np.asarray(v, np.int32) for k, v in data.text_token_ids.items()}
  ids["template_to_attribute"] = np.asarray(data.template_to_attribute, np.int32)
  return ids


def _install_signal_handlers(flag: dict) -> dict:
  """SIGTERM / SIGINT only set a flag; the loop saves and exits. Returns the previous handlers."""
  def handler(signum, _frame):
    flag["stop"] = signum
  previous = {}
  for sig in (signal.SIGTERM, signal.SIGINT):
    previous[sig] = signal.signal(sig, handler)
  return previous


def initialize_distributed(config) -> None:
  """jax.distributed from config.distributed, else the DYNREFER_* environment variables.

  coordinator_address '' → $DYNREFER_COORDINATOR (else JAX's own cluster detection);
  num_processes 0 → $DYNREFER_NUM_PROCESSES; process_id -1 → $DYNREFER_PROCESS_ID.
  """
  d = config.distributed
  address = d.coordinator_address or os.environ.get("DYNREFER_COORDINATOR", "")
  if not (d.enabled or address):
    return
  if jax.distributed.is_initialized():
    return
  nproc = d.num_processes or int(os.environ.get("DYNREFER_NUM_PROCESSES", "0")) or None
  pid = d.process_id if d.process_id >= 0 else os.environ.get("DYNREFER_PROCESS_ID")
  pid = None if pid is None else int(pid)
  jax.distributed.initialize(coordinator_address=address or None, num_processes=nproc,
                             process_id=pid)


def train(config: ml_collections.ConfigDict, workdir: str, *, data=None,
          progress: bool = True) -> dict:
  """Trains to config.train.steps; returns a summary dict (first/last loss, steps, timings).

  From the start SIGTERM / SIGINT only set a flag: the loop saves after the current step and
  returns (summary["stopped_by_signal"]); the previous handlers are restored on return.
  """
  stop = {"stop": None}
  previous_handlers = _install_signal_handlers(stop)
  try:
    return _train(config, workdir, data=data, progress=progress, stop=stop)
  finally:
    for sig, h in previous_handlers.items():
      signal.signal(sig, h)


def configure_jax() -> None:
  """Process-wide JAX settings for training at scale. On GPUs threefry lowers to its CUDA
  kernel (the same bits) instead of an unrolled fusion per random draw: XLA:GPU compiled the
  full-size model's init, one such fusion per parameter, for over 6 min on an H200."""
  if jax.default_backend() == "gpu":
    jax.config.update("jax_threefry_gpu_kernel_lowering", True)


def _train(config, workdir, *, data, progress, stop) -> dict:
  from dynrefer_jax.data import setup as data_setup  # pylint: disable=import-outside-toplevel
  initialize_distributed(config)
  configure_jax()
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  mesh = sharding.make_mesh(dict(config.sharding.mesh))
  data = data or data_setup.prepare(config, workdir)
  data_setup.resolve_vocab(config, data)

  token_ids = text_token_ids_from(data)
  state = build_model(config, token_ids, mesh, model_init=config.model_init)
  if state.initialised and is_main:
    console.say("train", f"model_init {config.model_init} does not hold "
                f"{', '.join(state.initialised)}: they start from the model's initialisation "
                f"(seed {config.seed})")
  if config.model.get("scan_layers", False):
    stack_frozen(state)
  steps_per_epoch = max(data.num_train_examples // config.train.batch_size, 1)
  total_steps = config.train.steps or config.optim.epochs * steps_per_epoch
  tx, schedule = optim.make_optimizer(config.optim, state.trainable, steps_per_epoch,
                                      total_steps)
  opt_state, opt_shardings = init_optimizer(tx, state)
  # Replicated on the global mesh; make_array_from_callback also works across processes.
  rng_host = np.asarray(jax.random.key_data(jax.random.key(config.seed)))
  rng = jax.make_array_from_callback(
      rng_host.shape, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
      lambda idx: rng_host[idx])

  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       keep=config.train.keep_checkpoints,
                                       async_save=config.train.async_checkpoint)
  start_step = 0
  abstract = {"trainable": ckpt_lib.abstract_with_shardings(state.trainable,
                                                            state.trainable_shardings),
              "opt_state": ckpt_lib.abstract_with_shardings(opt_state, opt_shardings),
              "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=rng.sharding),
              "rng": jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=rng.sharding)}
  restored, source = checkpointer.restore(abstract), checkpointer.directory
  if restored is None and config.resume:
    resume_dir = ckpt_lib.checkpoint_dir(config.resume)
    if not os.path.isdir(resume_dir):
      raise TrainingError(f"config.resume={config.resume}: no such directory")
    other = ckpt_lib.Checkpointer(resume_dir, async_save=False)
    restored, source = other.restore(abstract), config.resume
    other.close()
    if restored is None:
      raise TrainingError(f"config.resume={config.resume}: no readable checkpoint there")
  if restored is not None:
    _, st, meta = restored
    state.trainable, opt_state, rng = st["trainable"], st["opt_state"], st["rng"]
    start_step = int(meta.get("data_step", int(st["step"])))
    if is_main:
      console.say("train", f"resumed from step {start_step} ({source})")

  example = {k: np.asarray(v) for k, v in data.example_batch().items()}
  step_fn = jit_train_step(state, tx, schedule, opt_shardings,
                           batch_shardings(example, mesh, state.rules),
                           remat=config.model.get("remat", "none"))
  region_flops = flops_lib.flops_per_region(config.model, token_ids["tags"].shape[0])["total"]

  writer = MetricsWriter(workdir, enabled=is_main)
  it = data.train_iterator(start_step=start_step)
  first_loss = last_loss = None
  bar = None
  if progress and is_main:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    # On the console even while the main job sends everything else to its log (console.py).
    bar = tqdm(total=total_steps, initial=start_step, desc="[train]", dynamic_ncols=True,
               file=console.stream())
  t_start = time.time()
  t_log, n_log = time.time(), 0
  step = start_step
  compile_s = None
  try:
    while step < total_steps:
      batch = sharding.host_to_global(next(it), mesh, state.rules)
      t0 = time.time()
      new_trainable, new_opt_state, metrics = step_fn(state.trainable, opt_state, state.frozen,
                                                       batch, rng)
      step += 1
      n_log += 1
      if compile_s is None:  # the first step (compile included) is left out of the rates
        jax.block_until_ready(metrics["loss"])
        compile_s = time.time() - t0
        t_log, n_log = time.time(), 0
      state.trainable, opt_state = new_trainable, new_opt_state
      must_save = (step % config.train.checkpoint_every == 0 or step == total_steps
                   or bool(stop["stop"]))
      if step % config.train.log_every == 0 or step == total_steps or step == start_step + 1:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        _check_finite(m["loss"], step, checkpointer)
        if n_log:
          dt = time.time() - t_log
          m["step_time_s"] = dt / n_log
          m["regions_per_s"] = n_log * config.train.batch_size / max(dt, 1e-9)
          m["tflops_per_s"] = m["regions_per_s"] * region_flops / 1e12
        else:
          m["compile_s"] = compile_s
        t_log, n_log = time.time(), 0
        first_loss = m["loss"] if first_loss is None else first_loss
        last_loss = m["loss"]
        writer.write(step, m)
        if bar is not None:
          bar.set_postfix(loss=f"{m['loss']:.3f}", lm=f"{m['loss_lm']:.3f}",
                          tag=f"{m['loss_tag']:.2f}", rtc=f"{m['loss_rtc']:.3f}",
                          rps=f"{m.get('regions_per_s', 0.0):.1f}")
      elif must_save:
        _check_finite(float(metrics["loss"]), step, checkpointer)
      if bar is not None:
        bar.update(1)
      stopping = bool(stop["stop"])  # read once: a signal may land between two reads
      if must_save or stopping:
        if not must_save:
          _check_finite(float(metrics["loss"]), step, checkpointer)
        _save(checkpointer, step, state, opt_state, rng, config, force=True)
      if stopping:
        if is_main:
          console.say("train", f"received signal {stop['stop']}: saved step {step}, exiting")
        break
  finally:
    if bar is not None:
      bar.close()
    checkpointer.close()
    writer.close()
  summary = {"first_loss": first_loss, "last_loss": last_loss, "steps": step,
             "start_step": start_step, "train_seconds": time.time() - t_start,
             "compile_seconds": compile_s, "stopped_by_signal": stop["stop"]}
  if is_main:
    ckpt_lib.atomic_write_json(os.path.join(workdir, "train_summary.json"), summary)
  return summary


def _check_finite(loss: float, step: int, checkpointer) -> None:
  if not np.isfinite(loss):
    raise TrainingError(f"non-finite loss {loss} at step {step}; the last good checkpoint "
                        f"(step {checkpointer.latest_step()}) is kept in {checkpointer.directory}")


def _save(checkpointer, step, state, opt_state, rng, config, *, force=False):
  meta = {"data_step": int(step),
          "frozen_source": ckpt_lib.frozen_source(config),
          "process_count": jax.process_count(),
          "config": json.loads(config.to_json_best_effort())}
  # A global (replicated) array: Orbax refuses host-local arrays when there are several hosts.
  step_array = jax.make_array_from_callback((), rng.sharding,
                                            lambda _: np.asarray(step, np.int32))
  checkpointer.save(step, {"trainable": state.trainable, "opt_state": opt_state,
                           "step": step_array, "rng": rng}, meta, force=force)


def main(argv: list[str] | None = None) -> int:
  import argparse  # pylint: disable=import-outside-toplevel
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    rest, spec, overrides = config_lib.split_argv(argv)
    parser = argparse.ArgumentParser(prog="python -m dynrefer_jax.train")
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args(rest)
    if spec is None:
      raise config_lib.ConfigError("--config=configs/<name>.py[:arg] is required")
    config = config_lib.load(spec, overrides)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    summary = train(config, args.workdir)
  except TrainingError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(json.dumps({k: summary[k] for k in ("first_loss", "last_loss", "steps")}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
