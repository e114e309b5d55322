r"""Evaluation of a trained model on all four tasks.

  python -m dynrefer_jax.evaluate --config configs/synthetic.py --checkpoint DIR [--split test]
                                  [--out DIR]

Runs the model once over each split (view selection as config.eval.view_selection; "task":
one pass per task prior, each evaluator scored on its own task's views) and feeds the cached
predictions to the evaluators: region captioning (METEOR, CIDEr, BLEU-4, ROUGE-L),
dense captioning mAP (DenseCap protocol), attribute mAP (OVAD-style), recognition (accuracy,
COCO mAP). Each split is scored by the evaluators config.eval.tasks names for it, else by
every evaluator whose ground truth it carries, and predicted under its protocol: the tag
threshold and beam-search settings of config.model, replaced by config.eval.protocol[split]
(the original's per-split eval configs; results.md records each split's). Writes results.json
and results.md (each metric beside the published figure of SPEC §14 that config.eval.published
names for the split, and the trivial baselines on the synthetic world) into --out, by default
the checkpoint directory. DIR: a training workdir or a
tools/convert_checkpoint.py output (see dynrefer_jax.predict).
"""

from __future__ import annotations

import collections
import os
import sys

import jax
import numpy as np

from dynrefer_jax import checkpoint as ckpt_lib
from dynrefer_jax import config_lib
from dynrefer_jax.evaluators import common as eval_common
# Registration side effects: each module registers its evaluator.
from dynrefer_jax.evaluators import attributes, dense_caption, recognition, region_caption  # noqa: F401  pylint: disable=unused-import
from dynrefer_jax import inference
from dynrefer_jax.inference import Predictor

EVALUATORS = ("region_caption", "dense_caption", "attributes", "recognition")


def predict_split(predictor: Predictor, params, dataset) -> list[tuple[dict, dict]]:
  """[(batch, predictions)] over one pass of the dataset."""
  return [(batch, predictor(params, batch)) for batch in dataset]


# config.eval.view_selection = "task": each evaluator reads predictions made with its task's
# prior (predict.task_priors), the paper's Figure 4 finding (attributes with little context,
# captions with t ≈ 0.4-0.5) in place of the image prior; one pass per distinct prior.
EVALUATOR_TASK = {"region_caption": "caption", "dense_caption": "caption",
                  "attributes": "attributes", "recognition": "category"}


def views_by_evaluator(config) -> dict[str, tuple[float, ...]] | None:
  """{evaluator: the t of its task prior} when config.eval.view_selection is "task"; None
  otherwise (every evaluator reads the configured selection's predictions). ConfigError for a
  task prior that is missing or malformed, or fixed views in the model config."""
  if config.get("eval", {}).get("view_selection", "phash") != "task":
    return None
  from dynrefer_jax import predict  # pylint: disable=import-outside-toplevel
  if config.model.get("fixed_ts", ()):
    raise config_lib.ConfigError("config.eval.view_selection='task' conflicts with "
                                 "config.model.fixed_ts (a model that always sees fixed views)")
  try:
    tasks = predict.task_priors(config)
  except predict.PredictError as e:
    raise config_lib.ConfigError(str(e)) from None
  missing = sorted({t for t in EVALUATOR_TASK.values()} - set(tasks))
  if missing:
    raise config_lib.ConfigError(f"config.eval.view_selection='task' needs the task priors "
                                 f"{', '.join(missing)} in config.eval.task_ts")
  return {name: tasks[task] for name, task in EVALUATOR_TASK.items()}


def score_split(predictor_for, params, dataset, config, split: str, cfg=None, names=None
                ) -> tuple[dict, list[str], list[tuple[dict, dict]]]:
  """Scores one split: the evaluators `names` (default: evaluators_for on the first pass's
  batches), each on the predictions of its views (views_by_evaluator; evaluators with the
  same views share a pass).

  predictor_for(ts): the Predictor for fixed views `ts`, or for None the configured selection;
  it runs under the split's protocol (`split_protocol_of`). `dataset` is re-iterable (one pass
  per distinct views). Returns (metrics, evaluator names, the first pass's [(batch,
  predictions)])."""
  views = views_by_evaluator(config)
  key = (lambda name: views[name]) if views else (lambda name: None)
  split_protocol = split_protocol_of(config, split)
  predictor_for = (lambda ts, base=predictor_for: base(ts).with_protocol(split_protocol))
  first = key((names or check_tasks(config).get(split, EVALUATORS))[0])
  passes = {first: predict_split(predictor_for(first), params, dataset)}
  names = list(names or evaluators_for(config, split, passes[first]))
  results = {}
  for views_key in dict.fromkeys(key(n) for n in names):
    if views_key not in passes:
      passes[views_key] = predict_split(predictor_for(views_key), params, dataset)
    results.update(run_evaluators(passes[views_key], [n for n in names if key(n) == views_key],
                                  cfg=cfg))
  return results, names, passes[first]


def split_protocol_of(config, split: str) -> dict:
  """The split's inference protocol (inference.protocol: config.model's tag threshold and
  beam-search settings, replaced by config.eval.protocol[split]); ConfigError for an unknown
  key."""
  try:
    return inference.protocol(config, split)
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None


def check_protocol(config, splits) -> dict[str, dict]:
  """{split: its protocol} for the splits evaluated; ConfigError for an unknown key, or a
  config.eval.protocol entry naming no split of config.eval.splits / config.data.splits."""
  named = dict(config.eval.get("protocol", None) or {})
  known = set(config.eval.get("splits", ())) | set(dict(config.data.get("splits", {}) or {}))
  stray = sorted(set(named) - known - set(splits))
  if stray:
    raise config_lib.ConfigError(f"config.eval.protocol names unknown split(s) "
                                 f"{', '.join(stray)} (splits: {', '.join(sorted(known))})")
  return {split: split_protocol_of(config, split) for split in splits}


def protocol_line(p: dict, view_selection: str) -> str:
  """One line of results.md: the protocol a split was evaluated with."""
  views = {"phash": "pHash image prior", "task": "task priors", "fixed": "fixed views"}
  return (f"Protocol: tag threshold {p['tag_threshold']:g} (σ above it → control words); "
          f"beam search {p['num_beams']} beams, at most {p['max_new_tokens']} new tokens, "
          f"min length {p['min_length']}, length penalty {p['length_penalty']:g}, repetition "
          f"penalty {p['repetition_penalty']:g}; views: "
          f"{views.get(view_selection, view_selection)}.")


def evaluator_config(config) -> dict:
  """config.eval.evaluators as a plain dict: {evaluator name: its keyword arguments}."""
  cfg = config.eval.get("evaluators", {})
  return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


# The ground truth each evaluator scores against (a batch key; captions: reference lists).
NEEDS = {"region_caption": "captions", "dense_caption": "captions", "attributes": "attributes",
         "recognition": "category"}


def _labelled(cached: list[tuple[dict, dict]]) -> dict[str, bool]:
  """{batch key in NEEDS: whether any real row carries that ground truth}, agreed by all
  processes (every process must run the same evaluators: they all-gather)."""
  keys = sorted(set(NEEDS.values()))
  found = dict.fromkeys(keys, False)
  for batch, _ in cached:
    mask = np.asarray(batch["mask"], bool)
    for key in keys:
      if key == "captions":
        found[key] |= any(len(c) > 0 for c, m in zip(batch["captions"], mask) if m)
      else:
        found[key] |= bool((np.asarray(batch[key])[mask] >= 0).any())
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    flags = multihost_utils.process_allgather(np.array([found[k] for k in keys]))
    found = dict(zip(keys, np.asarray(flags).reshape(-1, len(keys)).any(0).tolist()))
  return found


def require_java_for(config, splits) -> None:
  """eval_common.MissingJava before any work when an evaluator the splits may run needs Java:
  the split's config.eval.tasks, else every evaluator (which ones apply is known only from the
  data's labels)."""
  tasks = check_tasks(config)
  names = {n for split in splits for n in tasks.get(split, EVALUATORS)}
  needs = sorted(names & set(eval_common.NEEDS_JAVA))
  if needs:
    what = f"evaluating {' and '.join(needs)}"
    if any(split not in tasks for split in splits):
      what += " (config.eval.tasks can name a split's evaluators)"
    eval_common.require_java(what)


def check_tasks(config) -> dict[str, list[str]]:
  """config.eval.tasks ({split: [evaluator names]}, optional), checked: ConfigError names an
  unknown evaluator."""
  tasks = config.eval.get("tasks", None) or {}
  out = {split: list(names) for split, names in dict(tasks).items()}
  for split, names in out.items():
    unknown = [n for n in names if n not in NEEDS]
    if unknown:
      raise config_lib.ConfigError(f"config.eval.tasks.{split} names unknown evaluator(s) "
                                   f"{', '.join(unknown)} (known: {', '.join(EVALUATORS)})")
  return out


def evaluators_for(config, split: str, cached: list[tuple[dict, dict]]) -> list[str]:
  """The evaluators a split is scored with: config.eval.tasks[split] when the config names
  them (the published protocol: e.g. VG's dense split only by dense captioning), else every
  evaluator whose ground truth the split carries (NEEDS)."""
  tasks = check_tasks(config)
  if split in tasks:
    return tasks[split]
  found = _labelled(cached)
  return [n for n in EVALUATORS if found[NEEDS[n]]]


def published_for(config, split: str) -> dict | None:
  """SPEC §14's figures for a split: config.eval.published is one PUBLISHED key for every split
  or {split: key}; None where there are none."""
  key = config.eval.get("published", "") or ""
  if not isinstance(key, str):
    key = dict(key).get(split, "") or ""
  return PUBLISHED.get(key)


def run_evaluators(cached: list[tuple[dict, dict]], names=EVALUATORS, cfg=None) -> dict:
  """Runs the named evaluators over cached predictions; cfg: {name: evaluator kwargs}."""
  by_id = {id(b): p for b, p in cached}
  batches = [b for b, _ in cached]
  predict_fn = lambda _params, batch: by_id[id(batch)]
  results = {}
  for name in names:
    ev = eval_common.get(name)(predict_fn, batches, **((cfg or {}).get(name, {})))
    for metric, value in ev.run(None):
      results[f"{name}/{metric}"] = value
  return results


def baselines(train_table, cached: list[tuple[dict, dict]], cfg=None, names=EVALUATORS) -> dict:
  """Trivial baselines from the training split: the most frequent caption for every region,
  the majority category, and each attribute's training frequency as its score."""
  captions = collections.Counter(train_table["captions"])
  top_caption = captions.most_common(1)[0][0]
  cats = np.asarray(train_table["category"])
  majority = np.bincount(cats[cats >= 0]).argmax()
  attrs = np.asarray(train_table["attributes"], np.float64)
  prior = np.where(attrs >= 0, attrs, 0).sum(0) / np.maximum((attrs >= 0).sum(0), 1)
  fake = []
  for batch, preds in cached:
    b = len(preds["caption"])
    num_classes = preds["class_scores"].shape[1]
    fake.append((batch, {
        "caption": [top_caption] * b,
        "caption_score": np.ones(b),
        "tag_scores": np.zeros_like(preds["tag_scores"]),
        "attribute_scores": np.broadcast_to(prior, preds["attribute_scores"].shape).copy(),
        "class_scores": np.broadcast_to(np.eye(num_classes)[majority],
                                        preds["class_scores"].shape).copy()}))
  return run_evaluators(fake, names, cfg=cfg)


# SPEC §14: the figures the released checkpoints should reproduce (repo README; the paper's
# main table in parentheses where it differs). Keyed by config.eval.published.
PUBLISHED = {
    "vg_dense": {"dense_caption/mAP": (47.6, None)},
    "vg_reg": {"region_caption/METEOR": (21.2, None), "region_caption/CIDEr": (190.5, 190.9)},
    "refcocog": {"region_caption/METEOR": (18.1, None), "region_caption/CIDEr": (115.3, 115.7)},
    "ovad": {"attributes/ap/all": (29.2, 29.2)},
    "coco": {"recognition/accuracy": (91.8, 89.4)},
}


def results_table(results: dict, published: dict | None) -> str:
  """Markdown: one section per split, every metric beside its published figure (if any) and
  the trivial baseline (if computed). published: {split: {metric: (readme, paper)} or None}
  (published_for)."""
  published = published or {}
  lines = ["# Evaluation", ""]
  if results.get("step") is not None:
    lines += [f"Checkpoint step {results['step']}.", ""]
  if results.get("views"):
    lines += ["Views: task priors (config.eval.view_selection = 'task'): " + "; ".join(
        f"{name} t = {', '.join(f'{t:g}' for t in ts)}"
        for name, ts in results["views"].items()) + ".", ""]
  for split, metrics in results.items():
    if (not isinstance(metrics, dict) or split.endswith("/baseline")
        or split in ("published", "views", "protocol")):
      continue
    base = results.get(split + "/baseline", {})
    lines += [f"## Split `{split}`", ""]
    split_protocol = results.get("protocol", {}).get(split)
    if split_protocol:
      lines += [protocol_line(split_protocol, split_protocol.get("views", "phash")), ""]
    lines += ["| metric | ours | published (README) | paper | trivial baseline |",
              "|---|---|---|---|---|"]
    figures = published.get(split)
    for key in sorted(metrics):
      readme, paper = (figures or {}).get(key, (None, None))
      cell = lambda v: "–" if v is None else f"{v:.2f}"
      lines.append(f"| {key} | {cell(metrics[key])} | {cell(readme)} | {cell(paper)} | "
                   f"{cell(base.get(key))} |")
    lines.append("")
  if not any(published.values()):
    lines.append("No published figure exists for this dataset (SPEC §14 lists VG, RefCOCOg, "
                 "OVAD and COCO).")
  lines.append("SPICE is not computed (it needs a download at run time).")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  import argparse  # pylint: disable=import-outside-toplevel
  from dynrefer_jax import predict as predict_lib  # pylint: disable=import-outside-toplevel
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    rest, spec, overrides = config_lib.split_argv(argv)
    p = argparse.ArgumentParser(prog="python -m dynrefer_jax.evaluate")
    p.add_argument("--checkpoint", "--workdir", dest="checkpoint", required=True,
                   help="a training workdir or a tools/convert_checkpoint.py output")
    p.add_argument("--out", default=None, help="where results.json / results.md go "
                   "(default: the checkpoint directory)")
    p.add_argument("--split", action="append", default=None, help="default: config.eval.splits")
    args = p.parse_args(rest)
    config = config_lib.load(spec or "configs/synthetic.py", overrides)
    check_tasks(config)
    views = views_by_evaluator(config)  # a bad task-prior setting: one line, before loading
    protocols = check_protocol(config, args.split or list(config.eval.splits))
    root, _ = predict_lib.checkpoint_root(args.checkpoint)
    require_java_for(config, args.split or list(config.eval.splits))
  except (config_lib.ConfigError, predict_lib.PredictError, eval_common.MissingJava) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  from dynrefer_jax.data import setup as data_setup  # pylint: disable=import-outside-toplevel
  try:
    runner = predict_lib.Runner.load(config, args.checkpoint)
    data = data_setup.prepare(config, root)
  except (data_setup.DataError, predict_lib.PredictError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)  # a missing data file or checkpoint piece: one line
    return 2
  predictor_for = lambda ts: runner.predictor("auto" if ts is None else ts)
  ev_cfg = evaluator_config(config)
  results = {"step": runner.step}
  if views:
    results["views"] = {name: list(ts) for name, ts in views.items()}
  view_selection = config.eval.get("view_selection", "phash")
  results["protocol"] = {split: dict(p, views=view_selection) for split, p in protocols.items()}
  synthetic = config.data.name == "synthetic"
  published = {}
  for split in args.split or list(config.eval.splits):
    results[split], names, cached = score_split(predictor_for, runner.params,
                                                data.eval_iterator(split), config, split, ev_cfg)
    published[split] = published_for(config, split)
    if synthetic:
      results[split + "/baseline"] = baselines(data.summarize("train"), cached, cfg=ev_cfg,
                                               names=names)
  results["published"] = {split: {k: {"readme": r, "paper": q} for k, (r, q) in figs.items()}
                          for split, figs in published.items() if figs}
  out = args.out or root
  os.makedirs(out, exist_ok=True)
  ckpt_lib.atomic_write_json(os.path.join(out, "results.json"), results)
  ckpt_lib.atomic_write_text(os.path.join(out, "results.md"), results_table(results, published))
  print(results_table(results, published))
  return 0


if __name__ == "__main__":
  sys.exit(main())
