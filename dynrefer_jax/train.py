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
from dynrefer_jax import config_lib, functional, optim, sharding
from dynrefer_jax.metrics_writer import MetricsWriter
from dynrefer_jax.models import dynrefer as dynrefer_lib
from dynrefer_jax.models.layers import Table

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

  def params(self) -> dict:
    return functional.combine(self.trainable, self.frozen)

  def model(self, params: dict | None = None) -> nnx.Module:
    return functional.merge(self.graphdef, params if params is not None else self.params())


def trainable_patterns(config) -> tuple[list[str], list[str]]:
  """(patterns, excludes): Tables are never trainable."""
  return list(config.trainable), [r"(^|/)(clip_embeds|att_embeds|ov_embeds|\w+_token_ids)$"]


def build_model(config: ml_collections.ConfigDict, text_token_ids: dict, mesh, *,
                seed: int | None = None) -> ModelState:
  """Initialises the model directly onto its shardings (never materialised on one device)."""
  rules = [tuple(r) for r in config.sharding.rules]
  seed = config.seed if seed is None else seed
  build = lambda: dynrefer_lib.DynRefer(config.model, text_token_ids, rngs=nnx.Rngs(seed))
  graphdef, abstract, axes = functional.abstract_split(build)
  shardings = sharding.tree_shardings(abstract, axes, mesh, rules)
  params = jax.jit(lambda: functional.split(build())[1], out_shardings=shardings)()
  patterns, excludes = trainable_patterns(config)
  trainable, frozen = functional.partition(params, patterns, excludes)
  if config.frozen_dtype:
    dt = jnp.dtype(config.frozen_dtype)
    frozen = jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                          frozen)
  tr_sh, fr_sh = functional.partition(shardings, patterns, excludes)
  return ModelState(graphdef, trainable, frozen, axes, tr_sh, fr_sh, mesh, rules)


def make_train_step(state: ModelState, tx: optax.GradientTransformation, schedule: Callable):
  """(trainable, opt_state, frozen, batch, rng, step) → (trainable, opt_state, metrics)."""
  graphdef, mesh, rules = state.graphdef, state.mesh, state.rules

  def step_fn(trainable, opt_state, frozen, batch, rng, step):
    rng = jax.random.fold_in(rng, step)

    def loss_fn(tr):
      with sharding.activation_rules(mesh, rules):
        model = functional.merge(graphdef, functional.combine(tr, frozen))
        return model(batch, rng, train=True)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics = {"loss": loss, **aux, "grad_norm": optax.global_norm(grads),
               "param_norm": optax.global_norm(trainable), "lr": schedule(step)}
    return trainable, opt_state, metrics

  return step_fn


def text_token_ids_from(data) -> dict:
  return {k: np.asarray(v, np.int32) for k, v in data.text_token_ids.items()}


def _install_signal_handlers(flag: dict) -> None:
  def handler(signum, _frame):
    flag["stop"] = signum
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, handler)


def initialize_distributed(config) -> None:
  d = config.distributed
  if not d.enabled:
    return
  address = d.coordinator_address or os.environ.get("DYNREFER_COORDINATOR", "")
  nproc = d.num_processes or int(os.environ.get("DYNREFER_NUM_PROCESSES", "1"))
  pid = d.process_id if d.process_id >= 0 else int(os.environ.get("DYNREFER_PROCESS_ID", "0"))
  jax.distributed.initialize(coordinator_address=address, num_processes=nproc, process_id=pid)


def train(config: ml_collections.ConfigDict, workdir: str, *, data=None,
          progress: bool = True) -> dict:
  """Trains to config.train.steps; returns a summary dict (first/last loss, steps, timings)."""
  from dynrefer_jax.data import setup as data_setup  # pylint: disable=import-outside-toplevel
  initialize_distributed(config)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  mesh = sharding.make_mesh(dict(config.sharding.mesh))
  data = data or data_setup.prepare(config, workdir)
  data_setup.resolve_vocab(config, data)

  state = build_model(config, text_token_ids_from(data), mesh)
  steps_per_epoch = max(data.num_train_examples // config.train.batch_size, 1)
  total_steps = config.train.steps or config.optim.epochs * steps_per_epoch
  tx, schedule = optim.make_optimizer(config.optim, state.trainable, steps_per_epoch,
                                      total_steps)
  opt_state = jax.jit(tx.init)(state.trainable)
  # Moments follow their parameters' shardings; scalars (counts) are replicated on the mesh.
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  opt_shardings = jax.tree.map(
      lambda x: x.sharding if isinstance(x.sharding, jax.sharding.NamedSharding) else replicated,
      opt_state)
  opt_state = jax.device_put(opt_state, opt_shardings)
  rng = jax.random.key_data(jax.random.key(config.seed))

  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       keep=config.train.keep_checkpoints,
                                       async_save=config.train.async_checkpoint)
  start_step = 0
  abstract = {"trainable": ckpt_lib.abstract_with_shardings(state.trainable,
                                                            state.trainable_shardings),
              "opt_state": ckpt_lib.abstract_with_shardings(opt_state, opt_shardings),
              "step": jax.ShapeDtypeStruct((), jnp.int32),
              "rng": jax.ShapeDtypeStruct(rng.shape, rng.dtype)}
  restored = checkpointer.restore(abstract)
  if restored is None and config.resume:
    restored = ckpt_lib.Checkpointer(config.resume, async_save=False).restore(abstract)
  if restored is not None:
    start_step, st, _meta = restored
    state.trainable, opt_state, rng = st["trainable"], st["opt_state"], st["rng"]
    start_step = int(st["step"])
    if is_main:
      print(f"resumed from step {start_step}", flush=True)

  batch_shape = {k: np.asarray(v) for k, v in data.example_batch().items()}
  batch_shardings = {k: sharding.batch_sharding(mesh, v.ndim, state.rules)
                     for k, v in batch_shape.items()}
  step_fn = jax.jit(
      make_train_step(state, tx, schedule),
      in_shardings=(state.trainable_shardings, opt_shardings, state.frozen_shardings,
                    batch_shardings, None, None),
      out_shardings=(state.trainable_shardings, opt_shardings, None),
      donate_argnums=(0, 1))

  writer = MetricsWriter(workdir, enabled=is_main)
  stop = {"stop": None}
  _install_signal_handlers(stop)
  it = data.train_iterator(start_step=start_step)
  first_loss = last_loss = None
  bar = None
  if progress and is_main:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
               file=sys.stdout)
  t_start = time.time()
  t_log, n_log = time.time(), 0
  step = start_step
  pending = None
  compile_s = None
  try:
    while step < total_steps:
      batch = sharding.host_to_global(next(it), mesh, state.rules)
      t0 = time.time()
      new_trainable, new_opt_state, metrics = step_fn(state.trainable, opt_state, state.frozen,
                                                       batch, rng, jnp.int32(step))
      if compile_s is None:
        jax.block_until_ready(metrics["loss"])
        compile_s = time.time() - t0
      step += 1
      n_log += 1
      state.trainable, opt_state = new_trainable, new_opt_state
      if step % config.train.log_every == 0 or step == total_steps or step == start_step + 1:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not np.isfinite(m["loss"]):
          raise TrainingError(f"non-finite loss {m['loss']} at step {step}; the last good "
                              f"checkpoint is kept in {checkpointer.directory}")
        dt = time.time() - t_log
        m["steps_per_s"] = n_log / max(dt, 1e-9)
        m["regions_per_s"] = m["steps_per_s"] * config.train.batch_size
        t_log, n_log = time.time(), 0
        first_loss = m["loss"] if first_loss is None else first_loss
        last_loss = m["loss"]
        writer.write(step, m)
        if bar is not None:
          bar.set_postfix(loss=f"{m['loss']:.3f}", lm=f"{m['loss_lm']:.3f}",
                          tag=f"{m['loss_tag']:.2f}", rtc=f"{m['loss_rtc']:.3f}",
                          rps=f"{m['regions_per_s']:.0f}")
      if bar is not None:
        bar.update(1)
      if step % config.train.checkpoint_every == 0 or step == total_steps or stop["stop"]:
        _save(checkpointer, step, state, opt_state, rng, data, config, force=bool(stop["stop"]))
      if stop["stop"]:
        if is_main:
          print(f"received signal {stop['stop']}: saved step {step}, exiting", flush=True)
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
    with open(os.path.join(workdir, "train_summary.json"), "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=1)
  return summary


def _save(checkpointer, step, state, opt_state, rng, data, config, *, force=False):
  meta = {"data_step": int(step), "frozen_source": config.model_init or "random init",
          "config": json.loads(config.to_json_best_effort())}
  checkpointer.save(step, {"trainable": state.trainable, "opt_state": opt_state,
                           "step": jnp.int32(step), "rng": rng}, meta, force=force)


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
