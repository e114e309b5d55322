"""Orbax checkpointing in one place.

Saved per step: {"trainable", "opt_state", "step", "rng"} as one PyTree plus JSON metadata
(data-iterator position, the frozen weights' source, the config). Frozen weights are never
re-saved. Restores go onto an abstract tree that carries the target shardings, so a checkpoint
restores onto any mesh. A corrupt or truncated latest step falls back to the previous one.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
  """Wraps ocp.CheckpointManager: async saves every N steps, keep the last K."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "meta"), options=options)

  def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)), force=force)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict] | None:
    """Restores the given step, else the newest readable one (falling back past corrupt ones).

    abstract_state: a tree of jax.ShapeDtypeStruct with `.sharding` set (the target placement).
    Returns (step, state, meta) or None when there is nothing to restore.
    """
    steps = [step] if step is not None else list(reversed(self.all_steps()))
    for s in steps:
      try:
        # Explicit restore args: without them Orbax places arrays by the saved sharding file,
        # which is wrong (or fails) on another mesh.
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
        out = self.manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(abstract_state, restore_args=restore_args),
            meta=ocp.args.JsonRestore()))
        return s, out["state"], dict(out["meta"] or {})
      except Exception as e:  # pylint: disable=broad-except
        if step is not None:
          raise
        log.warning("checkpoint step %d in %s is unreadable (%s: %s); trying the previous one",
                    s, self.directory, type(e).__name__, str(e).splitlines()[0][:200])
    return None

  def read_meta(self, step: int) -> dict:
    """The JSON metadata saved with `step` (the arrays are not read)."""
    out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out["meta"] or {})

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def _reading_manager(directory: str) -> ocp.CheckpointManager:
  """A manager whose items have explicit handlers, so that their metadata can be read."""
  return ocp.CheckpointManager(os.path.abspath(directory), item_handlers={
      "state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})


def read_numpy(directory: str, step: int | None = None) -> tuple[int, dict]:
  """(step, state) of a trainer checkpoint as host numpy arrays, for inspection and tests.

  No target shardings are needed: every leaf is read whole onto the host.
  """
  mgr = _reading_manager(directory)
  try:
    step = mgr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {directory}")
    meta = mgr.item_metadata(step)["state"]
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def args_for(entry):  # arrays whole onto one local device (any saved topology), then numpy
      if type(entry).__name__ == "ArrayMetadata" or getattr(entry, "value_type", "") == "jax.Array":
        return ocp.ArrayRestoreArgs(sharding=one)
      return ocp.RestoreArgs()
    is_entry = lambda x: hasattr(x, "value_type") or type(x).__name__.endswith("Metadata")
    restore_args = jax.tree.map(args_for, meta, is_leaf=is_entry)
    out = mgr.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(restore_args=restore_args)))
    return step, jax.tree.map(lambda x: np.asarray(x) if isinstance(x, jax.Array) else x,
                              out["state"])
  finally:
    mgr.close()


def checkpoint_dir(path: str) -> str:
  """`path/checkpoints` when it exists (a workdir or a converter output), else `path`."""
  path = os.path.abspath(path)
  sub = os.path.join(path, "checkpoints")
  return sub if os.path.isdir(sub) else path


def save_params(path: str, params: dict, meta: dict | None = None) -> None:
  """A full parameter tree in the layout tools/convert_checkpoint.py writes for
  config.model_init: `path/checkpoints/0` holding {"params": tree}."""
  ck = Checkpointer(os.path.join(os.path.abspath(path), "checkpoints"), async_save=False)
  ck.save(0, {"params": params}, meta or {}, force=True)
  ck.close()


def saved_shapes(directory: str, step: int, item: str) -> dict[str, tuple[int, ...]]:
  """{'/'-joined path: shape} of one entry ("params", "trainable") of a saved step, from the
  checkpoint's metadata (no array is read); {} when the step has no such entry."""
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  mgr = _reading_manager(directory)
  try:
    meta = mgr.item_metadata(step)["state"]
  finally:
    mgr.close()
  tree = getattr(meta, "tree", meta) or {}
  if item not in tree:
    return {}
  flat = traverse_util.flatten_dict(dict(tree[item]))
  return {"/".join(map(str, k)): tuple(getattr(v, "shape", ())) for k, v in flat.items()}


def restore_item(directory: str, item: str, abstract: Any, step: int) -> Any:
  """One entry of a saved step's state tree, only the leaves `abstract` names (partial restore),
  onto `abstract`'s shardings and dtypes."""
  ck = Checkpointer(directory, async_save=False)
  try:
    # Explicit restore args: without them Orbax places arrays by the saved sharding file,
    # which fails when the checkpoint was written on another device count.
    target = {item: abstract}
    out = ck.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            target, partial_restore=True,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target))))
  finally:
    ck.close()
  return out["state"][item]


def latest(path: str, what: str = "model_init") -> tuple[str, int, dict]:
  """(orbax directory, latest step, its JSON metadata) of a workdir or converted directory."""
  directory = checkpoint_dir(path)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{what} {path}: no such checkpoint directory")
  ck = Checkpointer(directory, async_save=False)
  try:
    step = ck.latest_step()
    if step is None:
      raise FileNotFoundError(f"{what} {path}: no checkpoint step in {directory}")
    return directory, step, ck.read_meta(step)
  finally:
    ck.close()


RANDOM_INIT = "random init"  # how a training run's metadata names frozen weights it did not load


def frozen_source(config) -> str:
  """What a training run records as the source of the weights it does not train."""
  if config.model_init:
    return os.path.abspath(config.model_init)
  return f"{RANDOM_INIT} (seed {config.seed})"


def recorded_init(workdir: str) -> str:
  """The model_init a training workdir's latest checkpoint was started from ("" when it has no
  checkpoint or started from a random init)."""
  if not workdir or not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return ""
  try:
    _, _, meta = latest(workdir)
  except FileNotFoundError:
    return ""
  source = str(meta.get("frozen_source", ""))
  return "" if source.startswith(RANDOM_INIT) else source


def converted_root(path: str) -> str:
  """The converted directory (one holding vocab.json and tokenizer/) a model_init rests on:
  `path` itself, or for a training workdir the one its run started from, followed down the
  chain; "" when there is none (a random init)."""
  seen = set()
  while path and os.path.abspath(path) not in seen:
    seen.add(os.path.abspath(path))
    if os.path.isfile(os.path.join(path, "vocab.json")):
      return path
    path = recorded_init(path)
  return ""


def _check_shapes(path: str, flat_target: dict, saved: dict) -> None:
  bad = [f"{k} {saved[k]} vs {tuple(v.shape)}" for k, v in flat_target.items()
         if k in saved and tuple(saved[k]) != tuple(v.shape)]
  if bad:
    raise ValueError(f"model_init {path}: {len(bad)} parameter(s) of another shape than this "
                     "model's (saved vs model): " + ", ".join(bad[:8])
                     + (" ..." if len(bad) > 8 else ""))


def load_params(path: str, target: Any, *, seed: int | None = None) -> dict:
  """config.model_init's weights onto `target` (a nested dict of ShapeDtypeStructs carrying
  shardings; dtypes are cast to the target's). `path` is one of:

  - a converted directory (tools/convert_checkpoint.py, save_params): {"params": tree};
  - a pretrained init (the converter without --dynrefer): the same, lacking the top-level
    modules its metadata lists under `left_to_model_init`;
  - a training workdir (latest step): its trainable parameters, and the rest from the weights
    that run started from (its metadata's `frozen_source`, followed down the chain). A chain
    ending in a random init leaves those parameters out; `seed` must then be that run's seed,
    so that the caller's own initialisation gives the same frozen weights.

  Returns the restored tree: every leaf of `target` except those a pretrained init or a random
  init leaves to the caller. Any other missing parameter is one error naming them.
  """
  from dynrefer_jax import functional  # pylint: disable=import-outside-toplevel
  directory, step, meta = latest(path)
  flat = functional.flatten(target)
  if "frozen_source" in meta:  # a training workdir
    saved = saved_shapes(directory, step, "trainable")
    _check_shapes(path, flat, saved)
    here = {k: v for k, v in flat.items() if k in saved}
    out = restore_item(directory, "trainable", functional.unflatten(here), step) if here else {}
    rest = {k: v for k, v in flat.items() if k not in saved}
    source = str(meta["frozen_source"])
    if not rest:
      return out
    if source.startswith(RANDOM_INIT):
      run_seed = (meta.get("config") or {}).get("seed")
      if seed is not None and run_seed is not None and int(run_seed) != int(seed):
        raise ValueError(f"model_init {path} was trained on randomly initialised frozen weights "
                         f"(seed {run_seed}); set --config.seed={run_seed} to rebuild them")
      return out
    below = load_params(source, functional.unflatten(rest), seed=seed)
    return functional.combine(out, below) if out else below
  left = set(meta.get("left_to_model_init") or ())
  want = {k: v for k, v in flat.items() if k.split("/")[0] not in left}
  saved = saved_shapes(directory, step, "params")
  _check_shapes(path, want, saved)
  missing = sorted(set(want) - set(saved))
  if missing:
    raise ValueError(f"model_init {path} lacks {len(missing)} parameter(s) of this model: "
                     + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
  return restore_item(directory, "params", functional.unflatten(want), step)


def atomic_write_text(path: str, text: str) -> None:
  """Writes text to a temporary file in the same directory, then renames it into place."""
  d = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def atomic_write_json(path: str, obj: Any) -> None:
  """atomic_write_text of JSON (numpy scalars written as floats)."""
  atomic_write_text(path, json.dumps(obj, indent=1, default=float))
