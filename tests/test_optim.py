"""The original's recipe: per-epoch cosine values (SPEC §9) and the weight-decay mask."""

import numpy as np
import jax.numpy as jnp

from configs import common
from dynrefer_jax import optim


def test_per_epoch_cosine_matches_spec_table():
  c = common.optim()
  sched = optim.lr_schedule(c, steps_per_epoch=10)
  got = [float(sched(e * 10 + 3)) for e in range(5)]
  # SPEC's table, rounded to 3 significant figures there.
  np.testing.assert_allclose(got, [1.0e-4, 9.05e-5, 6.55e-5, 3.45e-5, 9.5e-6], atol=6e-8)
  c.epochs = 3
  sched = optim.lr_schedule(c, steps_per_epoch=10)
  np.testing.assert_allclose([float(sched(e * 10)) for e in range(3)], [1e-4, 7.5e-5, 2.5e-5],
                             rtol=1e-5)


def test_warmup_ramps_from_warmup_lr():
  c = common.optim()
  c.warmup_steps, c.warmup_lr, c.schedule = 10, 0.0, "constant"
  sched = optim.lr_schedule(c, steps_per_epoch=100)
  np.testing.assert_allclose([float(sched(s)) for s in (0, 5, 10, 50)], [0, 5e-5, 1e-4, 1e-4],
                             rtol=1e-6, atol=1e-12)


def test_decay_mask():
  params = {"Qformer": {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
                        "ln_x": {"scale": jnp.ones((2, 2))}},
            "attr_t": jnp.ones(())}
  m = optim.decay_mask(params)
  assert m["Qformer"]["dense"]["kernel"] is True
  assert m["Qformer"]["dense"]["bias"] is False
  assert m["Qformer"]["ln_x"]["scale"] is False  # 'ln' in the name, as the original
  assert m["attr_t"] is False


def test_per_step_cosine_spans_the_runs_total_steps():
  # A run set by train.steps (400) with 1 epoch of 10 steps: the cosine must reach its midpoint at
  # step 200 and min_lr at 400, not at the 10 steps of one epoch.
  c = common.optim()
  c.schedule, c.epochs, c.lr, c.min_lr = "per_step", 1, 1e-3, 0.0
  sched = optim.lr_schedule(c, steps_per_epoch=10, total_steps=400)
  np.testing.assert_allclose([float(sched(s)) for s in (0, 200, 400)], [1e-3, 5e-4, 0.0],
                             rtol=1e-5, atol=1e-9)
