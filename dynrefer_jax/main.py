r"""The main job: synthetic data → training → evaluation → report, all into one workdir.

  python -m dynrefer_jax.main [--workdir workdirs/synthetic] [--config configs/synthetic.py]
                              [--config.train.steps=300 ...]

Writes DIR/report.md (metrics on the test and held-out-composition splits beside trivial
baselines), DIR/results.json, DIR/loss.png, plus the trainer's metrics.jsonl, tensorboard/ and
checkpoints/.
"""

from __future__ import annotations

import os
import resource
import sys
import time

import jax
import numpy as np

from dynrefer_jax import checkpoint as ckpt_lib
from dynrefer_jax import config_lib, train as train_lib
from dynrefer_jax.data import setup as data_setup
from dynrefer_jax import evaluate as eval_lib
from dynrefer_jax.evaluators import common as eval_common
from dynrefer_jax.inference import Predictor
from dynrefer_jax import sharding

HEADLINE = (("region_caption/CIDEr", "CIDEr"), ("region_caption/METEOR", "METEOR"),
            ("region_caption/BLEU-4", "BLEU-4"), ("dense_caption/mAP", "dense mAP"),
            ("attributes/ap/all", "attribute mAP"), ("recognition/accuracy", "category acc"),
            ("recognition/mAP", "category COCO mAP"))


def restore_params(config, workdir: str, data, step: int | None = None, state=None):
  """Builds the model (unless `state` is given) and restores the trainable parameters of
  checkpoint `step` (default: the latest) from the workdir. Returns (state, step)."""
  if state is None:
    mesh = sharding.make_mesh(dict(config.sharding.mesh))
    state = train_lib.build_model(config, train_lib.text_token_ids_from(data), mesh)
    if config.model.get("scan_layers", False):
      train_lib.stack_frozen(state)  # the predictor slices the stacks: no copy per call
  abstract = ckpt_lib.abstract_with_shardings(state.trainable, state.trainable_shardings)
  directory = os.path.join(workdir, "checkpoints")
  if step is None:
    ck = ckpt_lib.Checkpointer(directory, async_save=False)
    step = ck.latest_step()
    ck.close()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
  # Onto the state's shardings with explicit restore args (any saved device count).
  state.trainable = ckpt_lib.restore_item(directory, "trainable", abstract, step)
  return state, step


def checkpoint_steps(workdir: str) -> list[int]:
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  steps = sorted(ck.all_steps())
  ck.close()
  return steps


OVER_TRAINING = ("region_caption", "attributes", "recognition")


def predictors(state, config, data):
  """predictor_for(ts) for evaluate.score_split: the Predictor of the configured view selection
  (ts None) or of fixed views ts, each built (and compiled) once."""
  built = {}

  def predictor_for(ts):
    if ts not in built:
      built[ts] = Predictor(state.graphdef, config, data, fixed_ts=ts, groups=state.frozen_groups)
    return built[ts]

  return predictor_for


def metrics_over_training(config, workdir: str, data, split: str = "val") -> list[dict]:
  """Evaluates every kept checkpoint on `split` (captioning, attributes, recognition): the
  rows of metrics_over_training.json and metrics.png. One model build, one compile."""
  ev_cfg = eval_lib.evaluator_config(config)
  state, predictor_for, rows = None, None, []
  for step in checkpoint_steps(workdir):
    state, _ = restore_params(config, workdir, data, step=step, state=state)
    predictor_for = predictor_for or predictors(state, config, data)
    metrics, _, _ = eval_lib.score_split(predictor_for, state.held_params(),
                                         data.eval_iterator(split), config, split, ev_cfg,
                                         names=OVER_TRAINING)
    row = {"step": step, **metrics}
    rows.append({k: row[k] for k in ["step"] + [k for k, _ in HEADLINE if k in row]})
    print(f"[main] {split} at step {step}: " + ", ".join(
        f"{name} {row[k]:.1f}" for k, name in HEADLINE if k in row), flush=True)
  ckpt_lib.atomic_write_json(os.path.join(workdir, "metrics_over_training.json"), rows)
  return rows


def evaluate_workdir(config, workdir: str, data=None, splits=None) -> dict:
  data = data or data_setup.prepare(config, workdir)
  data_setup.resolve_vocab(config, data)
  state, step = restore_params(config, workdir, data)
  predictor_for = predictors(state, config, data)
  params = state.held_params()
  train_summary = data.summarize("train")
  results = {"step": step}
  for split in splits or config.eval.splits:
    t0 = time.time()
    ev_cfg = eval_lib.evaluator_config(config)
    results[split], names, cached = eval_lib.score_split(
        predictor_for, params, data.eval_iterator(split), config, split, ev_cfg)
    results[split + "/baseline"] = eval_lib.baselines(train_summary, cached, cfg=ev_cfg,
                                                      names=names)
    results[split + "/seconds"] = time.time() - t0
    results[split + "/examples"] = [
        {"caption": p["caption"][i], "reference": b["captions"][i], "ts": p["ts"][i].tolist(),
         "tags": p["tags"][i]}
        for b, p in cached[:1] for i in range(min(12, len(p["caption"]))) if b["mask"][i]]
    if split == (splits or config.eval.splits)[0]:
      write_gallery(os.path.join(workdir, "gallery.png"), cached, data)
  ckpt_lib.atomic_write_json(os.path.join(workdir, "results.json"), results)
  return results


def write_gallery(path: str, cached: list[tuple[dict, dict]], data, num: int = 12) -> None:
  """A PNG of `num` regions: the image with the box, the chosen views (t), and the predicted
  caption, tags, attributes and category beside the ground truth."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  from dynrefer_jax.views import boxes as view_boxes  # pylint: disable=import-outside-toplevel
  from dynrefer_jax.views import windows  # pylint: disable=import-outside-toplevel

  # Spread the picks over images: the first region of each batch row group, then the rest.
  rows = [(b, p, i) for b, p in cached for i in range(len(p["caption"])) if b["mask"][i]]
  seen, first, rest = set(), [], []
  for b, p, i in rows:
    image_id = int(b["image_id"][i])
    (rest if image_id in seen else first).append((b, p, i))
    seen.add(image_id)
  picks = (first + rest)[:num]
  attrs, cats = data.attribute_names, data.category_names
  num_views = picks[0][1]["ts"].shape[1] if picks else 0
  fig, axes = plt.subplots(len(picks), num_views + 2, figsize=(2.0 * (num_views + 1) + 6.5,
                                                               2.0 * len(picks)),
                           gridspec_kw={"width_ratios": [1] * (num_views + 1) + [3.2]},
                           squeeze=False)
  for row, (b, p, i) in enumerate(picks):
    h, w = (int(v) for v in b["image_hw"][i])
    # The whole image from the row's windows (at full resolution when it fits in one).
    image, sx, sy = windows.overview(b["image"][i], b["window"][i], (h, w))
    box = np.asarray(b["box"][i], np.float32)
    vb = view_boxes.view_boxes(box[None], np.asarray([[h, w]]),
                               np.asarray(p["ts"][i:i + 1], np.float32), xp=np)[0]
    scale = np.asarray([sx, sy, sx, sy])
    box, vb = box / scale, vb / scale
    ax = axes[row, 0]
    ax.imshow(image)
    ax.add_patch(matplotlib.patches.Rectangle((box[0], box[1]), box[2] - box[0],
                                              box[3] - box[1], fill=False, color="lime", lw=1.5))
    ax.set_title("image", fontsize=8)
    for v in range(num_views):
      x1, y1, x2, y2 = (int(c) for c in vb[v])
      axes[row, 1 + v].imshow(image[y1:max(y2, y1 + 1), x1:max(x2, x1 + 1)])
      axes[row, 1 + v].set_title(f"view t={float(p['ts'][i][v]):.1f}", fontsize=8)
    a_scores = np.asarray(p["attribute_scores"][i])
    top = [attrs[k] for k in np.argsort(-a_scores)[:3]]
    truth = [attrs[k] for k in np.flatnonzero(np.asarray(b["attributes"][i]) == 1)]
    cat_pred = cats[int(np.argmax(p["class_scores"][i]))]
    cat_true = cats[int(b["category"][i])] if int(b["category"][i]) >= 0 else "-"
    text = (f"caption: {p['caption'][i]}\n   truth: {b['captions'][i][0]}\n"
            f"tags: {', '.join(p['tags'][i][:6])}\n"
            f"attributes: {', '.join(top)}\n   truth: {', '.join(truth)}\n"
            f"category: {cat_pred}   truth: {cat_true}")
    axes[row, -1].text(0.0, 0.5, text, fontsize=8, va="center", family="monospace")
    for ax in axes[row]:
      ax.set_xticks([])
      ax.set_yticks([])
    axes[row, -1].axis("off")
  fig.tight_layout()
  fig.savefig(path + ".tmp.png", dpi=80)
  plt.close(fig)
  os.replace(path + ".tmp.png", path)


def plot_metrics_over_training(path: str, rows: list[dict]) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(7, 4))
  for key, name in HEADLINE:
    pts = [(r["step"], r[key]) for r in rows if key in r]
    if pts and key != "recognition/mAP":
      ax.plot(*zip(*pts), marker="o", label=name)
  ax.set_xlabel("step")
  ax.set_ylabel("validation metric (×100)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path + ".tmp.png", dpi=100)
  plt.close(fig)
  os.replace(path + ".tmp.png", path)


def _fmt(v) -> str:
  return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.2f}"


def write_report(workdir: str, config, results: dict, summary: dict, wall: float,
                 over_training: list[dict] | None = None, ablation: dict | None = None) -> str:
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  lines = ["# DynRefer on the synthetic region world", "",
           f"Trained {summary['steps']} steps (batch {config.train.batch_size}, "
           f"{config.model.num_views} views); first logged loss {summary['first_loss']:.4f}, "
           f"last {summary['last_loss']:.4f}; wall time {wall / 60:.1f} min (data, compile, "
           f"training and evaluation); peak host memory {peak:.2f} GiB.", "",
           "Metrics ×100. Category accuracy and attribute mAP are zero-shot through the "
           "region–text head (class prompts \"the {class}\", attribute templates), as the "
           "original's recognition and OVAD evaluation (SPEC §7b, §11).", ""]
  for split in config.eval.splits:
    r, base = results[split], results[split + "/baseline"]
    lines += [f"## Split `{split}`", "", "| metric | DynRefer | trivial baseline |", "|---|---|---|"]
    for key, name in HEADLINE:
      if key in r:
        lines.append(f"| {name} | {_fmt(r[key])} | {_fmt(base.get(key, float('nan')))} |")
    lines += ["", "Examples (generated → reference, views t):", ""]
    for ex in results.get(split + "/examples", [])[:6]:
      ts = ", ".join(f"{t:.1f}" for t in ex["ts"])
      lines.append(f"- {ex['caption']!r} → {ex['reference'][:1]} (t = {ts})")
    lines.append("")
  lines += ["Baselines: the most frequent training caption for every region; the majority "
            "training category; each attribute's training frequency as its score.", ""]
  if over_training:
    keys = [(k, n) for k, n in HEADLINE if k in over_training[0]]
    lines += ["## Metrics over training (validation split)", "",
              "| step | " + " | ".join(n for _, n in keys) + " |",
              "|---" * (len(keys) + 1) + "|"]
    for row in over_training:
      lines.append(f"| {row['step']} | " + " | ".join(_fmt(row[k]) for k, _ in keys) + " |")
    lines += ["", "![metrics over training](metrics.png)", ""]
  if ablation:
    lines += ablation_table(ablation)
  lines += ["![loss per head](loss.png)", "", "## Gallery (test split)", "",
            "![gallery](gallery.png)", ""]
  path = os.path.join(workdir, "report.md")
  ckpt_lib.atomic_write_text(path, "\n".join(lines))
  _plot_losses(workdir)
  return path


ABLATION_NAMES = {"t0": "single view t=0", "t1": "single view t=1",
                  "random2": "2 views (t=0 + 1 random in training; pHash at inference)",
                  "phash3": "3 views, pHash prior (DynRefer)"}


def ablation_table(ablation: dict) -> list[str]:
  keys = [("region_caption/CIDEr", "CIDEr"), ("region_caption/METEOR", "METEOR"),
          ("attributes/ap/all", "attribute mAP"), ("recognition/accuracy", "category acc"),
          ("dense_caption/mAP", "dense mAP")]
  lines = ["## Ablation: views (test split, same training budget)", "",
           "| views | " + " | ".join(n for _, n in keys) + " | minutes |",
           "|---" * (len(keys) + 2) + "|"]
  for variant, r in ablation.items():
    lines.append(f"| {ABLATION_NAMES.get(variant, variant)} | "
                 + " | ".join(_fmt(r["test"].get(k)) for k, _ in keys)
                 + f" | {r['minutes']:.1f} |")
  return lines + [""]


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


def run_one(config, workdir: str, *, over_training: bool = True) -> tuple[dict, dict, list]:
  """data → train → (metrics over training) → evaluation, in one workdir. The METEOR process
  the evaluations share is stopped at the end (it holds ~2 GB while the next variant trains)."""
  try:
    return _run_one(config, workdir, over_training=over_training)
  finally:
    from dynrefer_jax.evaluators import common  # pylint: disable=import-outside-toplevel
    common.close_shared_meteor()


def _run_one(config, workdir: str, *, over_training: bool) -> tuple[dict, dict, list]:
  t0 = time.time()
  print(f"[main] workdir {workdir}", flush=True)
  data = data_setup.prepare(config, workdir)
  print(f"[main] data ready in {time.time() - t0:.0f} s: {data.num_train_examples} training "
        f"regions", flush=True)
  summary = train_lib.train(config, workdir, data=data)
  rows = []
  if over_training and data.meta.get("num_images", {}).get("val", 0) > 0:
    print("[main] metrics over training (val split)", flush=True)
    rows = metrics_over_training(config, workdir, data)
    plot_metrics_over_training(os.path.join(workdir, "metrics.png"), rows)
  print("[main] evaluating", flush=True)
  results = evaluate_workdir(config, workdir, data=data)
  return summary, results, rows


def main(argv=None) -> int:
  import argparse  # pylint: disable=import-outside-toplevel
  argv = list(sys.argv[1:] if argv is None else argv)
  t0 = time.time()
  try:
    rest, spec, overrides = config_lib.split_argv(argv)
    p = argparse.ArgumentParser(prog="python -m dynrefer_jax.main")
    p.add_argument("--workdir", default="workdirs/synthetic")
    args = p.parse_args(rest)
    spec = spec or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "configs", "synthetic.py")
    config = config_lib.load(spec, overrides)
    variants = list(config.get("ablation_variants", ()) or ())
    configs = {v: config_lib.load(f"{spec.partition(':')[0]}:ablation:{v}", overrides)
               for v in variants}
    # Before training, not after it: every split of the synthetic world is scored on captions.
    eval_common.require_java("the main job's evaluation (captions, with pycocoevalcap)")
    for c in [config, *configs.values()]:
      eval_lib.views_by_evaluator(c)  # a bad task-prior setting: one line now, not after training
  except (config_lib.ConfigError, ValueError, eval_common.MissingJava) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  workdir = os.path.abspath(args.workdir)
  try:
    if variants:
      ablation = {}
      for v, cfg in configs.items():
        t1 = time.time()
        summary, results, _ = run_one(cfg, os.path.join(workdir, v), over_training=False)
        ablation[v] = {"test": results["test"], "minutes": (time.time() - t1) / 60,
                       "steps": summary["steps"]}
        print("\n".join(ablation_table(ablation)), flush=True)
      path = os.path.join(workdir, "report.md")
      os.makedirs(workdir, exist_ok=True)
      ckpt_lib.atomic_write_json(os.path.join(workdir, "ablation.json"), ablation)
      ckpt_lib.atomic_write_text(path, "\n".join(
          ["# DynRefer on the synthetic region world: view ablation", "",
           f"Each variant: {config.train.steps} steps, batch {config.train.batch_size}; "
           f"total wall time {(time.time() - t0) / 60:.1f} min.", ""]
          + ablation_table(ablation)))
    else:
      summary, results, rows = run_one(config, workdir)
      path = write_report(workdir, config, results, summary, time.time() - t0, rows)
  except train_lib.TrainingError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(open(path, encoding="utf-8").read())
  print(f"[main] done in {(time.time() - t0) / 60:.1f} min; peak memory "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB; report: {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
