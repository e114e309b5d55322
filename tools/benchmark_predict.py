r"""Predicting over many images: one `Runner.predict` call per image against `predict_many`
(regions of consecutive images packed into shared batches), in one process on the same inputs.

  PYTHONPATH=. .venv/bin/python tools/benchmark_predict.py --config configs/synthetic.py \
      --checkpoint workdirs/synthetic [--images 32] [--boxes-per-image 1] [--batch-size 8]

Prints one JSON line: images/s and regions/s of each way, their ratio, and whether the captions
agree. Both ways are compiled (one warm-up each) before timing; best of --repeats.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--config", default="configs/synthetic.py")
  p.add_argument("--checkpoint", default="workdirs/synthetic")
  p.add_argument("--images", type=int, default=32)
  p.add_argument("--boxes-per-image", type=int, default=1)
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  from dynrefer_jax import predict  # pylint: disable=import-outside-toplevel
  runner = predict.Runner.load(args.config, args.checkpoint, batch_size=args.batch_size)
  rng = np.random.default_rng(0)
  items = []
  for _ in range(args.images):
    h, w = rng.integers(64, 160, 2)
    image = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    boxes = []
    for _ in range(args.boxes_per_image):
      x1, y1 = rng.integers(0, w // 2), rng.integers(0, h // 2)
      boxes.append((int(x1), int(y1), int(rng.integers(x1 + 8, w + 1)),
                    int(rng.integers(y1 + 8, h + 1))))
    items.append((image, boxes))

  def one_by_one():
    return [runner.predict(image, boxes) for image, boxes in items]

  def packed():
    return list(runner.predict_many(items))

  def best(fn):
    fn()  # compile
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      out = fn()
      times.append(time.perf_counter() - t0)
    return min(times), out

  t_one, out_one = best(one_by_one)
  t_many, out_many = best(packed)
  regions = args.images * args.boxes_per_image
  same = [r["caption"] for o in out_one for r in o] == [r["caption"] for o in out_many for r in o]
  print(json.dumps({
      "images": args.images, "boxes_per_image": args.boxes_per_image,
      "batch_size": args.batch_size, "per_image_s": round(t_one, 3),
      "predict_many_s": round(t_many, 3),
      "per_image_regions_per_s": round(regions / t_one, 1),
      "predict_many_regions_per_s": round(regions / t_many, 1),
      "ratio": round(t_one / t_many, 2), "same_captions": same,
      "date": time.strftime("%Y-%m-%d")}))


if __name__ == "__main__":
  main()
