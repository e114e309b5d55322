"""Training metrics to `metrics.jsonl` (one JSON object per logged step) and TensorBoard."""

from __future__ import annotations

import json
import math
import os


class MetricsWriter:
  """Writes on process 0 only; other processes get a no-op writer."""

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
    if tensorboard:
      import tensorflow as tf  # pylint: disable=import-outside-toplevel
      self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    clean = {k: (float(v) if not isinstance(v, (str, int)) else v) for k, v in metrics.items()}
    record = {"step": int(step), **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                    for k, v in clean.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      import tensorflow as tf  # pylint: disable=import-outside-toplevel
      with self._tb.as_default(step=int(step)):
        for k, v in clean.items():
          if isinstance(v, (int, float)) and math.isfinite(float(v)):
            tf.summary.scalar(k, float(v))
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()


def read_jsonl(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
