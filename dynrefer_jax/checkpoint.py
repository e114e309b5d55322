"""Orbax checkpointing in one place.

Saved per step: {"trainable", "opt_state", "step", "rng"} as one PyTree plus JSON metadata
(data-iterator position, the frozen weights' source, the config). Frozen weights are never
re-saved. Restores go onto an abstract tree that carries the target shardings, so a checkpoint
restores onto any mesh. A corrupt or truncated latest step falls back to the previous one.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
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
        out = self.manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return s, out["state"], dict(out["meta"] or {})
      except Exception as e:  # pylint: disable=broad-except
        if step is not None:
          raise
        log.warning("checkpoint step %d in %s is unreadable (%s: %s); trying the previous one",
                    s, self.directory, type(e).__name__, str(e).splitlines()[0][:200])
    return None

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
