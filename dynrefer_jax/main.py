r"""The main job: synthetic data → training → evaluation → report, all into one workdir.

  python -m dynrefer_jax.main [--workdir workdirs/synthetic] [--config configs/synthetic.py]
                              [--config.train.steps=300 ...]

Writes DIR/report.md (metrics on the test and held-out-composition splits beside trivial
baselines), DIR/results.json, DIR/loss.png, plus the trainer's metrics.jsonl, tensorboard/ and
checkpoints/. A config with a `compare` entry (configs/synthetic.py:ablation) trains each of its
variants with several seeds instead and reports mean ± std and its claims' verdicts
(report.py); DIR/comparison.json holds the per-seed figures.

The console shows the job's own lines only (console.PREFIXES); everything the libraries print
goes to DIR/logs/main.log. The libraries are imported inside the functions, after the capture
has started: TensorFlow and transformers print when imported.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback

import numpy as np

from dynrefer_jax import config_lib, console
from dynrefer_jax import report as report_lib

HEADLINE = report_lib.HEADLINE


def restore_params(config, workdir: str, data, step: int | None = None, state=None):
  """Builds the model (unless `state` is given) and restores the trainable parameters of
  checkpoint `step` (default: the latest) from the workdir. Returns (state, step)."""
  from dynrefer_jax import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from dynrefer_jax import sharding, train as train_lib  # pylint: disable=import-outside-toplevel
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
  from dynrefer_jax import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  steps = sorted(ck.all_steps())
  ck.close()
  return steps


OVER_TRAINING = ("region_caption", "attributes", "recognition")


def predictors(state, config, data):
  """predictor_for(ts) for evaluate.score_split: the Predictor of the configured view selection
  (ts None) or of fixed views ts, each built (and compiled) once."""
  from dynrefer_jax.inference import Predictor  # pylint: disable=import-outside-toplevel
  built = {}

  def predictor_for(ts):
    if ts not in built:
      built[ts] = Predictor(state.graphdef, config, data, fixed_ts=ts, groups=state.frozen_groups)
    return built[ts]

  return predictor_for


def metrics_over_training(config, workdir: str, data, split: str = "val") -> list[dict]:
  """Evaluates every kept checkpoint on `split` (captioning, attributes, recognition): the
  rows of metrics_over_training.json and metrics.png. One model build, one compile."""
  from dynrefer_jax import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from dynrefer_jax import evaluate as eval_lib  # pylint: disable=import-outside-toplevel
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
    console.say("eval", f"{split} at step {step}: " + ", ".join(
        f"{name} {row[k]:.1f}" for k, name in HEADLINE if k in row))
  ckpt_lib.atomic_write_json(os.path.join(workdir, "metrics_over_training.json"), rows)
  return rows


def evaluate_workdir(config, workdir: str, data=None, splits=None, out: str | None = None
                     ) -> dict:
  """Evaluates the workdir's latest checkpoint on `splits` (default config.eval.splits) beside
  the trivial baselines; writes results.json and gallery.png into `out` (default: the
  workdir). Returns the results."""
  from dynrefer_jax import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from dynrefer_jax import evaluate as eval_lib  # pylint: disable=import-outside-toplevel
  from dynrefer_jax.data import setup as data_setup  # pylint: disable=import-outside-toplevel
  out = out or workdir
  os.makedirs(out, exist_ok=True)
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
      write_gallery(os.path.join(out, "gallery.png"), cached, data)
    console.say("eval", f"{split}: " + ", ".join(
        f"{name} {results[split][k]:.1f}" for k, name in HEADLINE if k in results[split])
        + f" ({results[split + '/seconds']:.0f} s)")
  ckpt_lib.atomic_write_json(os.path.join(out, "results.json"), results)
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


def _fmt4(v) -> str:
  return "n/a" if v is None else f"{v:.4f}"


def _fmt(v) -> str:
  return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.2f}"


def write_report(workdir: str, config, results: dict, summary: dict, wall: float,
                 over_training: list[dict] | None = None) -> str:
  from dynrefer_jax import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from dynrefer_jax.metrics_writer import read_jsonl  # pylint: disable=import-outside-toplevel
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  # From metrics.jsonl, not the summary: a rerun on a finished workdir trains no step and its
  # summary has no losses.
  jsonl = os.path.join(workdir, "metrics.jsonl")
  losses = [r["loss"] for r in (read_jsonl(jsonl) if os.path.exists(jsonl) else [])
            if r.get("loss") is not None]
  first, last = (losses[0], losses[-1]) if losses else (summary["first_loss"],
                                                        summary["last_loss"])
  lines = ["# DynRefer on the synthetic region world", "",
           f"Trained {summary['steps']} steps (batch {config.train.batch_size}, "
           f"{config.model.num_views} views); first logged loss {_fmt4(first)}, "
           f"last {_fmt4(last)}; wall time {wall / 60:.1f} min (data, compile, "
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
  lines += ["![loss per head](loss.png)", "", "## Gallery (test split)", "",
            "![gallery](gallery.png)", ""]
  path = os.path.join(workdir, "report.md")
  ckpt_lib.atomic_write_text(path, "\n".join(lines))
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


class Stopped(Exception):
  """Training stopped by a signal: its step is saved; nothing is evaluated or reported."""


def run_one(config, workdir: str, *, over_training: bool = True) -> tuple[dict, dict, list]:
  """data → train → (metrics over training) → evaluation, in one workdir. The METEOR process
  the evaluations share is stopped at the end (it holds ~2 GB while the next variant trains)."""
  try:
    return _run_one(config, workdir, over_training=over_training)
  finally:
    from dynrefer_jax.evaluators import common  # pylint: disable=import-outside-toplevel
    common.close_shared_meteor()


def _run_one(config, workdir: str, *, over_training: bool) -> tuple[dict, dict, list]:
  from dynrefer_jax import train as train_lib  # pylint: disable=import-outside-toplevel
  from dynrefer_jax.data import setup as data_setup  # pylint: disable=import-outside-toplevel
  t0 = time.time()
  data = data_setup.prepare(config, workdir)
  console.say("data", f"ready in {time.time() - t0:.0f} s: {data.num_train_examples} training "
              f"regions")
  summary = train_lib.train(config, workdir, data=data)
  if summary.get("stopped_by_signal"):
    raise Stopped(f"training stopped by signal {summary['stopped_by_signal']} at step "
                  f"{summary['steps']} (saved in {workdir}; a rerun resumes)")
  rows = []
  if over_training and data.meta.get("num_images", {}).get("val", 0) > 0:
    console.say("eval", "metrics over training (val split)")
    rows = metrics_over_training(config, workdir, data)
    plot_metrics_over_training(os.path.join(workdir, "metrics.png"), rows)
  console.say("eval", f"evaluating {', '.join(config.eval.splits)}")
  results = evaluate_workdir(config, workdir, data=data)
  return summary, results, rows


# ---------------------------------------------------------------------------------------------
# Comparisons over seeds (config.compare; configs/synthetic.py:ablation)


def _config_json(config) -> dict:
  return json.loads(config.to_json_best_effort())


def _training_part(config) -> dict:
  """What decides the checkpoints: the config without its evaluation settings."""
  return {k: v for k, v in _config_json(config).items() if k not in ("eval", "ablation",
                                                                          "compare")}


def comparison_plan(config, spec: str, overrides: list[str], workdir: str) -> dict:
  """{variant name: (its compare entry, [one config per seed])} for config.compare.

  Each variant's config is `<config file>:<arg>` with the command line's overrides (except
  compare.*, which belong to the comparison itself), seeded config.seed + 0, 1, ... (data.seed,
  the synthetic world, stays the same), with one data directory for every run that shares the
  same data settings. ConfigError for a malformed entry: an unknown or duplicate variant, a
  claim naming no variant, `checkpoints_of` naming no earlier trained variant or one whose
  training settings differ."""
  cmp = config.compare
  seeds = int(cmp.get("seeds", 3))
  if seeds < 1:
    raise config_lib.ConfigError(f"config.compare.seeds must be at least 1, got {seeds}")
  file = spec.partition(":")[0]
  shared = [o for o in overrides if not o.startswith("compare.")]
  plan, bases, data_dirs = {}, {}, {}
  for entry in cmp.get("variants", ()):
    entry = dict(entry)
    name = entry.get("name", "")
    if not name or name in plan or "arg" not in entry:
      raise config_lib.ConfigError(f"config.compare.variants: {entry} needs a unique name and "
                                   f"an arg")
    base = bases[name] = config_lib.load(f"{file}:{entry['arg']}", shared)
    of = entry.get("checkpoints_of")
    if of is not None:
      if of not in plan or plan[of][0].get("checkpoints_of"):
        raise config_lib.ConfigError(f"config.compare: variant {name!r} evaluates the "
                                     f"checkpoints of {of!r}, which is no earlier trained "
                                     f"variant")
      if _training_part(base) != _training_part(bases[of]):
        raise config_lib.ConfigError(f"config.compare: variant {name!r} evaluates the "
                                     f"checkpoints of {of!r} but its training settings differ")
    extra = []
    if base.data.get("name") == "synthetic" and not base.data.get("dir"):
      # One synthetic world per distinct data setting (generated once, not once per run).
      key = json.dumps(_config_json(base)["data"], sort_keys=True)
      if key not in data_dirs:
        data_dirs[key] = os.path.join(workdir, f"data{len(data_dirs) or ''}")
      extra = [f"data.dir={data_dirs[key]}"]
    plan[name] = (entry, [config_lib.load(f"{file}:{entry['arg']}",
                                          shared + extra + [f"seed={base.seed + k}"])
                          for k in range(seeds)])
  if not plan:
    raise config_lib.ConfigError("config.compare.variants is empty")
  for claim in cmp.get("claims", ()):
    unknown = sorted((set(claim["a"]) | set(claim["b"])) - set(plan))
    if unknown:
      raise config_lib.ConfigError(f"config.compare claim {claim['claim']!r} names unknown "
                                   f"variant(s) {', '.join(unknown)}")
  return plan


def _run_seed(name: str, entry: dict, cfg, workdir: str) -> dict:
  """One variant at one seed in workdir/<name>/seed<seed>: trained and evaluated, or (with
  `checkpoints_of`) the other variant's checkpoints of the same seed evaluated. A finished run
  (run.json with the same config) is reused, so an interrupted comparison restarts where it
  stopped."""
  from dynrefer_jax import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  run_dir = os.path.join(workdir, name, f"seed{cfg.seed}")
  record_path = os.path.join(run_dir, "run.json")
  config_json = _config_json(cfg)
  if os.path.exists(record_path):
    with open(record_path, encoding="utf-8") as f:
      record = json.load(f)
    if record.get("config") == config_json:
      console.say("main", f"{name} seed {cfg.seed}: finished before ({record_path}), reused")
      return record
  t0 = time.time()
  of = entry.get("checkpoints_of")
  if of:
    console.say("main", f"{name} seed {cfg.seed}: evaluating the checkpoints of {of}")
    try:
      results = evaluate_workdir(cfg, os.path.join(workdir, of, f"seed{cfg.seed}"), out=run_dir)
    finally:
      from dynrefer_jax.evaluators import common  # pylint: disable=import-outside-toplevel
      common.close_shared_meteor()
    steps = results["step"]
  else:
    console.say("main", f"{name} seed {cfg.seed}: training in {run_dir}")
    summary, results, _ = run_one(cfg, run_dir, over_training=False)
    steps = summary["steps"]
  record = {"config": config_json, "seed": cfg.seed, "steps": steps,
            "minutes": (time.time() - t0) / 60,
            "results": {split: results[split] for split in cfg.eval.splits}}
  ckpt_lib.atomic_write_json(record_path, record)
  return record


def run_comparison(config, plan: dict, workdir: str, t0: float) -> str:
  """Every variant × seed (_run_seed), then comparison.json and report.md. Returns the
  report's path."""
  from dynrefer_jax import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  cmp = config.compare
  labels = {name: entry.get("label", name) for name, (entry, _) in plan.items()}
  records = {name: [] for name in plan}
  total = sum(len(cfgs) for _, cfgs in plan.values())
  done = 0
  for name, (entry, cfgs) in plan.items():
    for cfg in cfgs:
      done += 1
      console.say("main", f"run {done}/{total}: {labels[name]}, seed {cfg.seed}")
      record = _run_seed(name, entry, cfg, workdir)
      records[name].append(record)
      first = record["results"][cfg.eval.splits[0]]
      console.say("eval", f"{name} seed {cfg.seed} ({cfg.eval.splits[0]}): " + ", ".join(
          f"{n} {first[k]:.1f}" for k, n in HEADLINE if k in first)
          + f"; {record['minutes']:.1f} min")
  seeds = [cfg.seed for cfg in next(iter(plan.values()))[1]]
  runs = {name: [r["results"] for r in rs] for name, rs in records.items()}
  summaries = {name: report_lib.summarize(r) for name, r in runs.items()}
  judged = report_lib.judge(list(cmp.get("claims", ())), summaries)
  minutes = {name: report_lib.mean_std([r["minutes"] for r in rs])
             for name, rs in records.items()}
  ckpt_lib.atomic_write_json(os.path.join(workdir, "comparison.json"), {
      "seeds": seeds,
      "variants": {name: {"label": labels[name], "arg": entry["arg"],
                          "checkpoints_of": entry.get("checkpoints_of"),
                          "runs": [{k: r[k] for k in ("seed", "steps", "minutes", "results")}
                                   for r in records[name]]}
                   for name, (entry, _) in plan.items()},
      "claims": judged})
  cfg0 = next(iter(plan.values()))[1][0]
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  lines = [f"# DynRefer on the synthetic region world: {cmp.get('title', 'comparison')}", "",
           f"Each variant: {cfg0.train.steps} steps, batch {cfg0.train.batch_size}, seeds "
           f"{', '.join(map(str, seeds))} (config.seed: initialisation, data order and "
           f"training randomness; the synthetic world, data.seed {cfg0.data.seed}, is the same "
           f"for every run). Total wall time {(time.time() - t0) / 60:.1f} min; peak host "
           f"memory {peak:.2f} GiB. Metrics ×100.", ""]
  lines += report_lib.comparison_lines(cmp.get("title", "Comparison"), labels, runs, judged,
                                       seeds, minutes, metrics=list(cmp.get("metrics", ())))
  path = os.path.join(workdir, "report.md")
  ckpt_lib.atomic_write_text(path, "\n".join(lines))
  return path


def main(argv=None) -> int:
  import argparse  # pylint: disable=import-outside-toplevel
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    rest, spec, overrides = config_lib.split_argv(argv)
  except config_lib.ConfigError as e:
    console.error(str(e))
    return 2
  p = argparse.ArgumentParser(prog="python -m dynrefer_jax.main")
  p.add_argument("--workdir", default="workdirs/synthetic")
  args = p.parse_args(rest)
  spec = spec or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "synthetic.py")
  workdir = os.path.abspath(args.workdir)
  log_path = os.path.join(workdir, "logs", "main.log")
  try:
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a", encoding="utf-8"):
      pass
  except OSError as e:
    console.error(f"cannot write the log {log_path}: {e.strerror or e}")
    return 2
  with console.capture(log_path):
    return _main(spec, overrides, workdir, log_path)


def _main(spec: str, overrides: list[str], workdir: str, log_path: str) -> int:
  """main() inside the console capture: every failure ends as one line on the console (the
  traceback of an unexpected one goes to the log)."""
  t0 = time.time()
  console.say("main", f"workdir {workdir}; library output goes to {log_path}")
  try:
    return _run_main(spec, overrides, workdir, t0)
  except KeyboardInterrupt:
    console.error(f"interrupted; what finished is kept in {workdir} (a rerun resumes)")
    return 130
  except Exception as e:  # pylint: disable=broad-except
    traceback.print_exc()  # into the log
    first = (str(e).strip().splitlines() or [""])[0]
    console.error(f"{type(e).__name__}: {first} (traceback in {log_path})")
    return 1


def _run_main(spec: str, overrides: list[str], workdir: str, t0: float) -> int:
  from dynrefer_jax import evaluate as eval_lib  # pylint: disable=import-outside-toplevel
  from dynrefer_jax import train as train_lib  # pylint: disable=import-outside-toplevel
  from dynrefer_jax.evaluators import common as eval_common  # pylint: disable=import-outside-toplevel
  try:
    config = config_lib.load(spec, overrides)
    plan = (comparison_plan(config, spec, overrides, workdir) if config.get("compare")
            else None)
    # Before training, not after it: every split of the synthetic world is scored on captions.
    eval_common.require_java("the main job's evaluation (captions, with pycocoevalcap)")
    for c in [config] + [c for _, cfgs in (plan or {}).values() for c in cfgs[:1]]:
      eval_lib.views_by_evaluator(c)  # a bad task-prior setting: one line now, not after training
  except (config_lib.ConfigError, ValueError, eval_common.MissingJava) as e:
    console.error(str(e))
    return 2
  try:
    if plan:
      path = run_comparison(config, plan, workdir, t0)
    else:
      summary, results, rows = run_one(config, workdir)
      path = write_report(workdir, config, results, summary, time.time() - t0, rows)
  except train_lib.TrainingError as e:
    console.error(str(e))
    return 1
  except Stopped as e:
    console.error(str(e))
    return 130
  with open(path, encoding="utf-8") as f:
    console.say("report", f.read().rstrip("\n"))
  console.say("main", f"done in {(time.time() - t0) / 60:.1f} min; peak memory "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB; report: "
              f"{path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
