r"""Evaluation of a trained model on all four tasks.

  python -m dynrefer_jax.evaluate --config configs/synthetic.py --workdir DIR [--split test]

Runs the model once over each split (view selection as config.eval.view_selection) and feeds
the cached predictions to the evaluators: region captioning (METEOR, CIDEr, BLEU-4, ROUGE-L),
dense captioning mAP (DenseCap protocol), attribute mAP (OVAD-style), recognition (accuracy,
COCO mAP). Writes results.json and results.md into the workdir.
"""

from __future__ import annotations

import collections
import json
import os
import sys

import jax
import numpy as np

from dynrefer_jax import config_lib
from dynrefer_jax.evaluators import common as eval_common
# Registration side effects: each module registers its evaluator.
from dynrefer_jax.evaluators import attributes, dense_caption, recognition, region_caption  # noqa: F401  pylint: disable=unused-import
from dynrefer_jax.inference import Predictor

EVALUATORS = ("region_caption", "dense_caption", "attributes", "recognition")


def predict_split(predictor: Predictor, params, dataset) -> list[tuple[dict, dict]]:
  """[(batch, predictions)] over one pass of the dataset."""
  return [(batch, predictor(params, batch)) for batch in dataset]


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


def baselines(train_table, cached: list[tuple[dict, dict]], cfg=None) -> dict:
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
  return run_evaluators(fake, cfg=cfg)


def main(argv=None) -> int:
  import argparse  # pylint: disable=import-outside-toplevel
  from dynrefer_jax import main as main_lib  # pylint: disable=import-outside-toplevel
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    rest, spec, overrides = config_lib.split_argv(argv)
    p = argparse.ArgumentParser(prog="python -m dynrefer_jax.evaluate")
    p.add_argument("--workdir", required=True, help="a workdir written by dynrefer_jax.train")
    args = p.parse_args(rest)
    config = config_lib.load(spec or "configs/synthetic.py", overrides)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if not os.path.isdir(os.path.join(args.workdir, "checkpoints")):
    print(f"error: no checkpoints in {args.workdir}", file=sys.stderr)
    return 2
  results = main_lib.evaluate_workdir(config, args.workdir)
  print(json.dumps(results, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
