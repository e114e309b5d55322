"""The trainer end to end at toy size: metrics.jsonl, TensorBoard, Orbax, and learning."""

import glob
import json
import os

from dynrefer_jax import config_lib, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_config_trains_and_the_loss_falls(tmp_path):
  steps = 30
  config = config_lib.load(os.path.join(ROOT, "configs/synthetic.py:smoke"),
                           [f"train.steps={steps}", "train.checkpoint_every=30",
                            "optim.lr=0.003", "train.log_every=1"])
  summary = train.train(config, str(tmp_path), progress=False)
  assert summary["steps"] == steps

  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows] == list(range(1, steps + 1))
  for key in ("loss", "loss_lm", "loss_tag", "loss_rtc", "grad_norm", "lr"):
    assert all(r[key] is not None for r in rows), key
  # Stated margin: on this fixed seed the loss after 30 steps is at least 25% below step 1's,
  # and the LM and region-text losses fall too. The tag loss weighs 0.01 and is not monotone on
  # 8 images (ASL pushes every logit up until the negatives bite; measured: 49 → 36 at step 7 →
  # 79 at step 19 → 54), so for it: its best step is at least 20% below step 1.
  first, last = rows[0], rows[-1]
  assert last["loss"] < 0.75 * first["loss"], (first["loss"], last["loss"])
  for key in ("loss_lm", "loss_rtc"):
    assert last[key] < first[key], (key, first[key], last[key])
  best_tag = min(r["loss_tag"] for r in rows)
  assert best_tag < 0.8 * first["loss_tag"], (first["loss_tag"], best_tag)
  # The per-step cosine spans the run's train.steps (no warm-up in smoke): half the peak lr at
  # the midpoint, close to 0 at the end.
  lr = {r["step"]: r["lr"] for r in rows}
  assert abs(lr[16] - 0.0015) < 0.0003 and lr[steps] < 1e-4, (lr[16], lr[steps])
  assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
  assert os.path.isdir(tmp_path / "checkpoints" / str(steps))
