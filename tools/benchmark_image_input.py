r"""The input pipeline's image work per region, before and after full-resolution windows, in one
process on the same JPEGs.

  PYTHONPATH=. .venv/bin/python tools/benchmark_image_input.py [--images 24] [--regions 768] \
      [--size 800x600] [--window-size 1024] [--eval] [--order random|by-image]

"before": the image part of `data/pipeline._load_row` as it was until issue 21 (TensorFlow
decode, the image shrunk to 640 px with bilinear antialiasing when larger, zero-padded to 640²;
copied below as the baseline). "after": today's `pipeline._image_keys` (PIL decode by
data/images.py's rules, `views.windows.region_input` in a numpy_function) with the layout the
pipeline picks for these images (`pipeline.layout_for`; --eval adds the hash pixels evaluation
batches carry when images exceed the window). Both start from the encoded bytes, as the
pipeline reads them from its ArrayRecord source. Both run as tf.data maps with AUTOTUNE
parallelism, batched by 32, over the same (image, box) rows; each is warmed up once, then timed
over every row, best of --repeats. --order random (training: rows of random images; "after"
keeps only the last image's levels, as a training run over many images would mostly find) or
by-image (evaluation: an image's rows in a row, read once through the pipeline's cache).

Prints one JSON line: regions/s and host bytes per region of each, their ratios, the layout.
Images are photo-like (tiled photographs from scikit-image, a noise patch), JPEG quality 90, at
their own resolution (VG's are 800 px on the longer side); boxes are random, 8 px to the whole
image.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np


def _photo(h: int, w: int, seed: int) -> np.ndarray:
  import skimage.data  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(),
            skimage.data.rocket()]
  img = np.zeros((h, w, 3), np.uint8)
  y, k = 0, seed
  while y < h:
    x, row = 0, 0
    while x < w:
      p = photos[k % len(photos)]
      k += 1
      ph, pw = min(p.shape[0], h - y), min(p.shape[1], w - x)
      img[y:y + ph, x:x + pw] = p[:ph, :pw]
      x, row = x + pw, max(row, ph)
    y += row
  ph, pw = h // 4, w // 4
  img[:ph, :pw] = rng.integers(0, 256, (ph, pw, 3))
  return img


def before_image_keys(data, box, image_id, s: int = 640):
  """The pipeline's image handling before issue 21 (from `_load_row` at commit 6137e66, which
  read the file itself: tf.io.read_file(path))."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  del image_id
  image = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
  hw = tf.shape(image)[:2]
  scale = tf.minimum(1.0, s / tf.cast(tf.reduce_max(hw), tf.float32))
  new_hw = tf.maximum(1, tf.cast(tf.round(tf.cast(hw, tf.float32) * scale), tf.int32))
  new_hw = tf.minimum(new_hw, s)
  image = tf.cond(
      scale < 1.0,
      lambda: tf.cast(tf.clip_by_value(tf.round(tf.image.resize(
          image, new_hw, method="bilinear", antialias=True)), 0, 255), tf.uint8),
      lambda: image)
  image = tf.image.pad_to_bounding_box(image, 0, 0, s, s)
  sy, sx = tf.unstack(tf.cast(new_hw, tf.float32) / tf.cast(hw, tf.float32))
  return {"image": tf.ensure_shape(image, [s, s, 3]), "image_hw": new_hw,
          "box": box * tf.stack([sx, sy, sx, sy])}


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--images", type=int, default=24)
  p.add_argument("--regions", type=int, default=768)
  p.add_argument("--size", default="800x600", help="WxH of the JPEGs")
  p.add_argument("--window-size", type=int, default=1024, help="config.data.window_size")
  p.add_argument("--eval", action="store_true", help="evaluation rows (hash pixels if needed)")
  p.add_argument("--order", choices=("random", "by-image"), default="random")
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  import types  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from dynrefer_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  tf = pipeline._tensorflow()  # pylint: disable=protected-access
  w, h = (int(v) for v in args.size.lower().split("x"))
  rng = np.random.default_rng(0)
  tmp = tempfile.mkdtemp(prefix="bench_input_")
  encoded = []
  for i in range(args.images):
    path = os.path.join(tmp, f"{i}.jpg")
    Image.fromarray(_photo(h, w, i)).save(path, quality=90)
    with open(path, "rb") as f:
      encoded.append(f.read())
  rows = rng.integers(0, args.images, args.regions)
  if args.order == "by-image":
    rows = np.sort(rows)
  bw = np.exp(rng.uniform(np.log(8), np.log(w), args.regions))
  bh = np.exp(rng.uniform(np.log(8), np.log(h), args.regions))
  x1, y1 = rng.uniform(0, 1, args.regions) * (w - bw), rng.uniform(0, 1, args.regions) * (h - bh)
  boxes = np.stack([x1, y1, x1 + bw, y1 + bh], -1).astype(np.float32)
  row_bytes = np.asarray([encoded[r] for r in rows], object)
  # layout_for reads only the source's largest image side.
  lay = pipeline.layout_for(types.SimpleNamespace(max_image_side=max(w, h)), args.window_size,
                            hash=args.eval)

  def dataset(fn):
    ds = tf.data.Dataset.from_tensor_slices((row_bytes, boxes, rows.astype(np.int64)))
    ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(32).prefetch(2)

  def run(fn):
    nbytes = 0
    for batch in dataset(fn).as_numpy_iterator():
      nbytes += sum(v.nbytes for v in batch.values())
    return nbytes

  def after(data, box, image_id):
    cache = pipeline._ImageCache(0 if args.order == "random" else 1 << 30)  # pylint: disable=protected-access
    return {**pipeline._image_keys(data, box, lay, image_id, cache), "box": box}  # pylint: disable=protected-access

  ways = {"before": before_image_keys, "after": after}
  result = {}
  for name, fn in ways.items():
    run(fn)  # warm-up: graph tracing, file cache
    best = None
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      nbytes = run(fn)
      dt = time.perf_counter() - t0
      best = dt if best is None else min(best, dt)
    result[name] = {"regions_per_s": round(args.regions / best, 1),
                    "bytes_per_region": int(nbytes // args.regions)}
  print(json.dumps({
      "images": f"{args.images} JPEGs {w}x{h}", "regions": args.regions,
      "window_size": args.window_size, "eval": args.eval, "order": args.order,
      "layout": {"side": lay.side, "levels": lay.levels, "hash_pixels": lay.hash},
      **result,
      "regions_per_s_ratio": round(result["after"]["regions_per_s"]
                                   / result["before"]["regions_per_s"], 2),
      "bytes_ratio": round(result["after"]["bytes_per_region"]
                           / result["before"]["bytes_per_region"], 2),
      "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}))


if __name__ == "__main__":
  main()
