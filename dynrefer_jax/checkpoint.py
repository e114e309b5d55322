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


def read_numpy(directory: str, step: int | None = None) -> tuple[int, dict]:
  """(step, state) of a trainer checkpoint as host numpy arrays, for inspection and tests.

  No target shardings are needed: every leaf is read whole onto the host.
  """
  mgr = ocp.CheckpointManager(os.path.abspath(directory), item_handlers={
      "state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
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


def load_params(path: str, target: Any) -> dict:
  """The {"params": tree} of a converted checkpoint (`path` or `path/checkpoints`, latest step)
  onto `target`: ShapeDtypeStructs carrying shardings (dtypes are cast to the target's).

  A pretrained init (tools/convert_checkpoint.py without --dynrefer) lacks the top-level
  modules its metadata lists under `left_to_model_init`: the returned tree lacks them too, and
  the caller keeps its own values. Any other missing parameter is an error."""
  directory = checkpoint_dir(path)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"model_init {path}: no such checkpoint directory")
  ck = Checkpointer(directory, async_save=False)
  try:
    step = ck.latest_step()
    if step is None:
      raise FileNotFoundError(f"model_init {path}: no checkpoint step in {directory}")
    left = set(ck.read_meta(step).get("left_to_model_init") or ())
    target = {k: v for k, v in target.items() if k not in left}
    _, state, _ = ck.restore({"params": target}, step=step)
    return state["params"]
  finally:
    ck.close()


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
