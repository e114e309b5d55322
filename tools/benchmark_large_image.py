r"""`python -m dynrefer_jax.predict` on one very large image with a small box: exit code, caption,
wall time and peak host memory of the predict process.

  PYTHONPATH=. .venv/bin/python tools/benchmark_large_image.py --checkpoint workdirs/synthetic \
      [--config configs/synthetic.py] [--side 12000] [--box-side 50] [--format png]

The image is a synthetic-world test scene rendered at side/10 px and enlarged to side × side
(bicubic, plus mild noise so that full-resolution detail exists), written as PNG (the case of
issue 21: a 12000 × 12000 PNG) or JPEG; the box is box-side × box-side at the centre of the
scene's largest object. The predict command runs as a child process (its own interpreter, as a
user runs it): wall time from start to exit, peak RSS from getrusage(RUSAGE_CHILDREN). Prints
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np


def make_image(path: str, side: int, seed: int = 0) -> tuple[int, int]:
  """Writes the image; returns the centre (x, y) of its largest object."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from dynrefer_jax.data import synthetic  # pylint: disable=import-outside-toplevel
  small, _, boxes, _ = synthetic.render_image(seed, "test", 0, max(64, side // 10))
  x, y, bw, bh = max(boxes, key=lambda b: b[2] * b[3])
  sy, sx = side / small.shape[0], side / small.shape[1]
  big = Image.fromarray(small).resize((side, side), Image.BICUBIC)
  arr = np.asarray(big)
  del big
  noise = np.random.default_rng(seed).integers(-3, 4, (side, 1, 3), dtype=np.int16)
  arr = np.clip(arr.astype(np.int16) + noise, 0, 255).astype(np.uint8)  # row-wise texture
  img = Image.fromarray(arr)
  del arr
  if path.endswith(".png"):
    img.save(path, compress_level=1)
  else:
    img.save(path, quality=92)
  return int((x + bw / 2) * sx), int((y + bh / 2) * sy)


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--config", default="configs/synthetic.py")
  p.add_argument("--checkpoint", default="workdirs/synthetic")
  p.add_argument("--side", type=int, default=12000)
  p.add_argument("--box-side", type=int, default=50)
  p.add_argument("--format", choices=("png", "jpg"), default="png")
  p.add_argument("--dir", default="", help="where to write the image (default: a temp dir)")
  args = p.parse_args()
  work = args.dir or tempfile.mkdtemp(prefix="bench_large_")
  os.makedirs(work, exist_ok=True)
  path = os.path.join(work, f"large.{args.format}")
  cx, cy = make_image(path, args.side)
  half = args.box_side // 2
  box = f"{cx - half},{cy - half},{cx - half + args.box_side},{cy - half + args.box_side}"
  out = os.path.join(work, "out")
  cmd = [sys.executable, "-m", "dynrefer_jax.predict", "--config", args.config,
         "--checkpoint", args.checkpoint, "--image", path, "--box", box, "--out", out]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  wall = time.perf_counter() - t0
  peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  caption = None
  if proc.returncode == 0:
    with open(os.path.join(out, "large.json"), encoding="utf-8") as f:
      caption = json.load(f)["regions"][0]["caption"]
  print(json.dumps({
      "image": f"{args.side}x{args.side} {args.format.upper()}",
      "file_mb": round(os.path.getsize(path) / 2**20, 1), "box": box,
      "exit_code": proc.returncode, "caption": caption,
      "stderr_tail": proc.stderr.strip().splitlines()[-1:] if proc.returncode else [],
      "wall_s": round(wall, 1), "peak_rss_gib": round(peak_kib / 2**20, 2),
      "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}))


if __name__ == "__main__":
  main()
