r"""Feature error of the fp8 vision tower's recipes against bf16 and float32 (issue 9).

  JAX_PLATFORMS=cpu python tools/fp8_error.py                      # every size and recipe
  JAX_PLATFORMS=cpu python tools/fp8_error.py --sizes toy --recipes rowwise --markdown

For each tower size, one set of random weights (the modules' init, rounded to bfloat16 as the
frozen tower is stored: config.frozen_dtype) and one batch of random normalised images go
through three towers that differ only in arithmetic: float32 (matmul precision "highest"),
bfloat16 (the compute dtype of the full-size model), and bfloat16 with `eva_vit`'s fp8 recipe
(dynrefer_jax/models/fp8.py). Each tower's output then goes through ln_vision (a LayerNorm, eps
1e-5, unit scale, in float32) as DynRefer does. Printed per size and recipe, as JSON lines:

- `vs_bf16` / `vs_f32`: the fp8 tower against the bf16 / float32 one; the `bf16` line's `vs_f32`
  is the reference floor (bf16 is not exact either);
- `rel_ln`: ‖a − b‖ / ‖b‖ (Frobenius, every image and token) after ln_vision; `worst_token_ln`:
  the largest per-token ‖a_t − b_t‖ / ‖b_t‖; `rel_raw`: `rel_ln` on the tower output itself;
  `cos_dist_ln`: mean over tokens of 1 − cos(a_t, b_t) after ln_vision (≈ rel²/2: a gentler
  measure, for comparison with papers that quote it).

Recipes: the names of fp8.RECIPES, and two per-module sensitivities of "rowwise": "attn_only"
(the MLPs in bf16) and "mlp_only" (attention in bf16).

Sizes: "toy" is configs/synthetic.py:smoke's ViT (width 32, depth 2, 4×4 patches of a 32-px
view; the benchmark's toy tower), "w256d8" and "w256d24" EVA-like towers (224 px, patch 14, 257
tokens, MLP ratio 4, q/v biases, exact GELU) at width 256 and depth 8 or 24. Random weights are
not EVA-CLIP's: the figures bound what scaling granularity can do, not the real tower's error,
which `tools/benchmark.py --weights ... --vit-fp8` measures on converted weights.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# pylint: disable=wrong-import-position
from dynrefer_jax import functional  # noqa: E402
from dynrefer_jax.models import eva_vit, fp8, layers  # noqa: E402
# pylint: enable=wrong-import-position

EVA_LIKE = dict(image_size=224, patch_size=14, qkv_bias="qv", act="gelu", ln_eps=1e-6)
SIZES = {  # name → (VisionTransformer kwargs, images per batch)
    "w256d8": (dict(EVA_LIKE, width=256, depth=8, num_heads=4, mlp_dim=1024), 8),
    "w256d24": (dict(EVA_LIKE, width=256, depth=24, num_heads=4, mlp_dim=1024), 8),
}
SENSITIVITY = ("attn_only", "mlp_only")


def toy_size():
  """configs/synthetic.py:smoke's ViT and the benchmark's toy batch (8 regions × 3 views)."""
  from dynrefer_jax import config_lib  # pylint: disable=import-outside-toplevel
  m = config_lib.load(os.path.join(ROOT, "configs", "synthetic.py") + ":smoke").model
  return dict(m.vit), 8 * m.num_views


def build(vit: dict, recipe, dtype):
  """(graphdef, params) of a scanned tower; recipe "attn_only"/"mlp_only": "rowwise" with the
  MLPs / attention blocks switched back to the compute dtype (their static recipe attribute)."""
  fp8_recipe = "rowwise" if recipe in SENSITIVITY else recipe
  model = eva_vit.VisionTransformer(**vit, fp8=fp8_recipe, dtype=dtype, scan_layers=True,
                                    rngs=nnx.Rngs(0))
  for block in model.blocks:
    if recipe == "attn_only":
      block.mlp.fp8 = None
    elif recipe == "mlp_only":
      block.attn.fp8 = None
  graphdef, params, _ = functional.split(model)
  return graphdef, params


def features(graphdef, params, images, ln):
  """(tower output, ln_vision of it), float64 numpy [N, L, C] each."""
  with jax.default_matmul_precision("highest"):
    out = jax.jit(lambda p, x: functional.merge(graphdef, p)(x))(params, images)
  out = out.astype(jnp.float32)
  return np.asarray(out, np.float64), np.asarray(ln(out), np.float64)


def errors(a, b) -> dict:
  """a, b: (raw, ln) from `features`; b is the reference."""
  (raw_a, ln_a), (raw_b, ln_b) = a, b
  token = np.linalg.norm(ln_a - ln_b, axis=-1) / np.linalg.norm(ln_b, axis=-1)
  cos = np.sum(ln_a * ln_b, -1) / (np.linalg.norm(ln_a, axis=-1) * np.linalg.norm(ln_b, axis=-1))
  return {"rel_ln": float(np.linalg.norm(ln_a - ln_b) / np.linalg.norm(ln_b)),
          "worst_token_ln": float(token.max()),
          "rel_raw": float(np.linalg.norm(raw_a - raw_b) / np.linalg.norm(raw_b)),
          "cos_dist_ln": float(np.mean(1.0 - cos))}


def measure(size: str, recipes: list[str]):
  """Yields one record for bf16 (against float32), then one per recipe."""
  vit, n = toy_size() if size == "toy" else SIZES[size]
  graphdef32, params = build(vit, False, jnp.float32)
  params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
  side = vit["image_size"]
  images = jax.random.normal(jax.random.key(1), (n, side, side, 3), jnp.float32)
  ln = layers.LayerNorm(vit["width"], eps=1e-5, rngs=nnx.Rngs(0))
  tokens = n * ((side // vit["patch_size"]) ** 2 + 1)
  common = {"size": size, "width": vit["width"], "depth": vit["depth"], "images": n,
            "tokens": tokens}
  f32 = features(graphdef32, params, images, ln)
  bf16 = features(build(vit, False, jnp.bfloat16)[0], params, images, ln)
  yield {**common, "recipe": "bf16", "vs_f32": errors(bf16, f32)}
  for recipe in recipes:
    t0 = time.perf_counter()
    out = features(build(vit, recipe, jnp.bfloat16)[0], params, images, ln)
    yield {**common, "recipe": recipe, "vs_bf16": errors(out, bf16), "vs_f32": errors(out, f32),
           "seconds": round(time.perf_counter() - t0, 1)}


def markdown(records: list[dict]) -> str:
  """One table row per record: rel_ln and worst token against bf16 and float32, in %."""
  pct = lambda r, ref, k: f"{100 * r[ref][k]:.2f}" if ref in r else "—"
  rows = ["| size | recipe | vs bf16: rel | worst token | vs f32: rel | worst token | "
          "1−cos vs bf16 |", "|---|---|---|---|---|---|---|"]
  for r in records:
    cos = f"{r['vs_bf16']['cos_dist_ln']:.1e}" if "vs_bf16" in r else "—"
    rows.append(f"| {r['size']} | {r['recipe']} | {pct(r, 'vs_bf16', 'rel_ln')} | "
                f"{pct(r, 'vs_bf16', 'worst_token_ln')} | {pct(r, 'vs_f32', 'rel_ln')} | "
                f"{pct(r, 'vs_f32', 'worst_token_ln')} | {cos} |")
  return "\n".join(rows)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python tools/fp8_error.py",
                              description=__doc__.split("\n")[0])
  p.add_argument("--sizes", default="toy," + ",".join(SIZES), help="comma list: toy, "
                 + ", ".join(SIZES))
  p.add_argument("--recipes", default=",".join([*fp8.RECIPES, *SENSITIVITY]),
                 help="comma list of fp8.RECIPES names, attn_only, mlp_only")
  p.add_argument("--markdown", action="store_true", help="also print a markdown table")
  args = p.parse_args(argv)
  sizes = [s for s in args.sizes.split(",") if s]
  recipes = [r for r in args.recipes.split(",") if r]
  bad = [s for s in sizes if s != "toy" and s not in SIZES]
  bad += [r for r in recipes if r not in fp8.RECIPES and r not in SENSITIVITY]
  if bad:
    p.error(f"unknown sizes or recipes: {bad}")
  records = []
  for size in sizes:
    for record in measure(size, recipes):
      print(json.dumps(record), flush=True)
      records.append(record)
  if args.markdown:
    print(markdown(records))
  return 0


if __name__ == "__main__":
  sys.exit(main())
