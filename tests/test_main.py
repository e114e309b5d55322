"""The main job's evaluation half (dynrefer_jax/main.py) on the session's smoke workdir: the
trainable parameters restored onto the trainer's state (frozen stacks held stacked), every
evaluator the synthetic splits carry, the gallery and results.json. The evaluators themselves
are pinned against pycocoevalcap / pycocotools / sklearn in their own tests."""

import json
import math
import os
import shutil

from dynrefer_jax import config_lib, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_evaluate_workdir_restores_step_2_and_writes_results(smoke_workdir, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(smoke_workdir[0], workdir)  # the shared workdir stays untouched
  config = config_lib.load(os.path.join(ROOT, "configs/synthetic.py:smoke"))
  results = main.evaluate_workdir(config, str(workdir), splits=["val"])
  assert results["step"] == 2
  val = results["val"]
  for key, _ in main.HEADLINE:
    assert key in val and math.isfinite(val[key]) and 0 <= val[key] <= 100, (key, val.get(key))
  assert set(results["val/baseline"]) <= set(val)
  assert results["val/examples"] and all(len(e["ts"]) == 3 and e["ts"][0] == 0.0
                                         for e in results["val/examples"])
  with open(workdir / "results.json", encoding="utf-8") as f:
    assert json.load(f)["val"] == json.loads(json.dumps(val))
  assert (workdir / "gallery.png").stat().st_size > 10_000
