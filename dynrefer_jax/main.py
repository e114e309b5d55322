r"""The main job: synthetic data → training → evaluation → report, all into one workdir.

  python -m dynrefer_jax.main [--workdir workdirs/synthetic] [--config configs/synthetic.py]
                              [--config.train.steps=300 ...]

Writes DIR/report.md (metrics on the test and held-out-composition splits beside trivial
baselines), DIR/results.json, DIR/loss.png, plus the trainer's metrics.jsonl, tensorboard/ and
checkpoints/.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

import jax
import numpy as np

from dynrefer_jax import checkpoint as ckpt_lib
from dynrefer_jax import config_lib, train as train_lib
from dynrefer_jax.data import setup as data_setup
from dynrefer_jax.data import sources
from dynrefer_jax import evaluate as eval_lib
from dynrefer_jax.inference import Predictor
from dynrefer_jax import sharding

HEADLINE = (("region_caption/CIDEr", "CIDEr"), ("region_caption/METEOR", "METEOR"),
            ("region_caption/BLEU-4", "BLEU-4"), ("dense_caption/mAP", "dense mAP"),
            ("attributes/ap/all", "attribute mAP"), ("recognition/accuracy", "category acc"),
            ("recognition/mAP", "category COCO mAP"))


def restore_params(config, workdir: str, data):
  """Builds the model and restores the workdir's latest trainable parameters."""
  mesh = sharding.make_mesh(dict(config.sharding.mesh))
  state = train_lib.build_model(config, train_lib.text_token_ids_from(data), mesh)
  abstract = {"trainable": ckpt_lib.abstract_with_shardings(state.trainable,
                                                            state.trainable_shardings)}
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  step = ck.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  restored = ck.manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(abstract, partial_restore=True)))
  ck.close()
  state.trainable = restored["state"]["trainable"]
  return state, step


def evaluate_workdir(config, workdir: str, data=None, splits=None) -> dict:
  data = data or data_setup.prepare(config, workdir)
  data_setup.resolve_vocab(config, data)
  state, step = restore_params(config, workdir, data)
  predictor = Predictor(state.graphdef, config, data)
  params = state.params()
  train_table = sources.SyntheticSource(data.root, "train").table
  train_summary = {"captions": list(train_table.caption), "category": train_table.category,
                   "attributes": train_table.attributes}
  results = {"step": step}
  for split in splits or config.eval.splits:
    t0 = time.time()
    cached = eval_lib.predict_split(predictor, params, data.eval_iterator(split))
    ev_cfg = config.eval.get("evaluators", {})
    ev_cfg = ev_cfg.to_dict() if hasattr(ev_cfg, "to_dict") else dict(ev_cfg)
    results[split] = eval_lib.run_evaluators(cached, cfg=ev_cfg)
    results[split + "/baseline"] = eval_lib.baselines(train_summary, cached, cfg=ev_cfg)
    results[split + "/seconds"] = time.time() - t0
    results[split + "/examples"] = [
        {"caption": p["caption"][i], "reference": b["captions"][i], "ts": p["ts"][i].tolist(),
         "tags": p["tags"][i]}
        for b, p in cached[:1] for i in range(min(12, len(p["caption"]))) if b["mask"][i]]
  with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1, default=float)
  return results


def write_report(workdir: str, config, results: dict, summary: dict, wall: float) -> str:
  lines = ["# DynRefer on the synthetic region world", "",
           f"Trained {summary['steps']} steps (batch {config.train.batch_size}); "
           f"first logged loss {summary['first_loss']:.4f}, last {summary['last_loss']:.4f}; "
           f"wall time {wall / 60:.1f} min; peak host memory "
           f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB.", ""]
  for split in config.eval.splits:
    r, base = results[split], results[split + "/baseline"]
    lines += [f"## Split `{split}`", "", "| metric | DynRefer | trivial baseline |", "|---|---|---|"]
    for key, name in HEADLINE:
      if key in r:
        lines.append(f"| {name} | {r[key]:.2f} | {base.get(key, float('nan')):.2f} |")
    lines += ["", "Examples (generated → reference, views t):", ""]
    for ex in results.get(split + "/examples", [])[:6]:
      lines.append(f"- {ex['caption']!r} → {ex['reference'][:1]} (t={ex['ts']})")
    lines.append("")
  lines += ["Baselines: the most frequent training caption for every region; the majority "
            "training category; each attribute's training frequency as its score.", ""]
  path = os.path.join(workdir, "report.md")
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write("\n".join(lines))
  os.replace(path + ".tmp", path)
  _plot_losses(workdir)
  return path


def _plot_losses(workdir: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  from dynrefer_jax.metrics_writer import read_jsonl  # pylint: disable=import-outside-toplevel
  rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  fig, ax = plt.subplots(figsize=(7, 4))
  for key in ("loss", "loss_lm", "loss_tag", "loss_rtc"):
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    if pts:
      ax.plot(*zip(*pts), label=key)
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "loss.png"), dpi=100)
  plt.close(fig)


def main(argv=None) -> int:
  import argparse  # pylint: disable=import-outside-toplevel
  argv = list(sys.argv[1:] if argv is None else argv)
  t0 = time.time()
  try:
    rest, spec, overrides = config_lib.split_argv(argv)
    p = argparse.ArgumentParser(prog="python -m dynrefer_jax.main")
    p.add_argument("--workdir", default="workdirs/synthetic")
    args = p.parse_args(rest)
    config = config_lib.load(spec or os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "configs", "synthetic.py"), overrides)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  workdir = os.path.abspath(args.workdir)
  print(f"[main] workdir {workdir}", flush=True)
  data = data_setup.prepare(config, workdir)
  print(f"[main] data ready in {time.time() - t0:.0f} s: {data.num_train_examples} training "
        f"regions", flush=True)
  try:
    summary = train_lib.train(config, workdir, data=data)
  except train_lib.TrainingError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print("[main] evaluating", flush=True)
  results = evaluate_workdir(config, workdir, data=data)
  path = write_report(workdir, config, results, summary, time.time() - t0)
  print(open(path, encoding="utf-8").read())
  print(f"[main] done in {(time.time() - t0) / 60:.1f} min; peak memory "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB; report: {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
