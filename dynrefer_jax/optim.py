"""The optimizer and learning-rate schedule (SPEC §9): AdamW, no decay on biases, norms and
1-D parameters, LAVIS's linear-warmup cosine stepped per epoch (or per step)."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import ml_collections
import optax

from dynrefer_jax import functional


def lr_schedule(c: ml_collections.ConfigDict, steps_per_epoch: int,
                total_steps: int | None = None):
  """Returns step → learning rate.

  per_epoch (the original): lr(e) = min_lr + (lr − min_lr)·½(1 + cos(π e / E)) for the epoch e
  the step falls in. per_step: the same cosine over the run's `total_steps` (default
  epochs × steps_per_epoch), so that a run set by `train.steps` ends at min_lr. A linear warm-up from `warmup_lr` to
  `lr` over `warmup_steps` comes first when warmup_steps > 0 (the original's warmup_lr = lr makes
  it a no-op, which `warmup_lr=-1` reproduces: -1 means "same as lr").
  """
  lr, min_lr = c.lr, c.min_lr
  epochs = max(c.epochs, 1)
  total = max(total_steps or epochs * steps_per_epoch, 1)
  warmup = c.warmup_steps
  warmup_lr = lr if c.warmup_lr < 0 else c.warmup_lr

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    if c.schedule == "per_epoch":
      progress = jnp.floor(step / steps_per_epoch) / epochs
    elif c.schedule == "per_step":
      progress = step / total
    elif c.schedule == "constant":
      progress = jnp.zeros_like(step)
    else:
      raise ValueError(f"unknown schedule {c.schedule!r}: per_epoch, per_step or constant")
    cosine = min_lr + (lr - min_lr) * 0.5 * (1.0 + jnp.cos(math.pi * jnp.minimum(progress, 1.0)))
    if warmup > 0:
      ramp = warmup_lr + (lr - warmup_lr) * step / warmup
      return jnp.where(step < warmup, ramp, cosine)
    return cosine

  return schedule


def decay_mask(params: dict, no_decay_patterns=("bias", "ln", "bn")) -> dict:
  """True where weight decay applies: ndim ≥ 2 and no 'bias'/'ln'/'bn' in the path."""
  pats = [re.compile(p) for p in no_decay_patterns]
  flat = functional.flatten(params)
  return functional.unflatten({k: (v.ndim >= 2 and not any(p.search(k) for p in pats))
                               for k, v in flat.items()})


def make_optimizer(c: ml_collections.ConfigDict, params: dict, steps_per_epoch: int,
                   total_steps: int | None = None):
  """optax AdamW over the trainable tree, with optional global-norm clipping."""
  schedule = lr_schedule(c, steps_per_epoch, total_steps)
  chain = []
  if c.grad_clip_norm and c.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(c.grad_clip_norm))
  chain.append(optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                           mask=decay_mask(params, tuple(c.no_decay_patterns))))
  return optax.chain(*chain), schedule


def global_norm(tree) -> jax.Array:
  return optax.global_norm(tree)


def step_count(opt_state) -> jax.Array:
  """The number of updates applied so far: the optimizer's own (first) `count` leaf, int32[]."""
  found = optax.tree_utils.tree_get_all_with_path(opt_state, "count")
  if not found:
    raise ValueError("the optimizer state holds no 'count'; cannot tell the step")
  return found[0][1]
