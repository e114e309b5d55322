"""`python -m dynrefer_jax.evaluate`: bad input is one line / exit 2; the results table sets
each metric beside SPEC §14's published figure."""

import json
import os

import numpy as np
import pytest

from dynrefer_jax import config_lib, evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "synthetic.py") + ":smoke"
VG = os.path.join(ROOT, "configs", "dynrefer_vg.py")


@pytest.mark.parametrize("argv,message", [
    (["--config", CONFIG, "--checkpoint", "/nonexistent/run"], "no checkpoint in /nonexistent/run"),
    (["--config", "/nonexistent.py", "--checkpoint", "/tmp"], "config file not found"),
    (["--config", CONFIG, "--checkpoint", "/tmp", "--config.eval.nope=1"], "unknown config key"),
    (["--config", os.path.join(ROOT, "configs", "dynrefer_vg.py"), "--checkpoint", "/tmp",
      "--config.eval.tasks.coco=['recognition', 'detection']"],
     "config.eval.tasks.coco names unknown evaluator(s) detection"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, monkeypatch):
  from dynrefer_jax import predict
  monkeypatch.setattr(predict.Runner, "load", classmethod(lambda *a, **k: pytest.fail("loaded")))
  assert evaluate.main(argv) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_results_table_beside_published_figures():
  results = {"step": 7, "test": {"region_caption/CIDEr": 101.234, "region_caption/METEOR": 17.5},
             "test/baseline": {"region_caption/CIDEr": 3.0},
             "published": {"region_caption/CIDEr": {"readme": 115.3, "paper": 115.7}}}
  md = evaluate.results_table(results, {"test": evaluate.PUBLISHED["refcocog"]})
  assert "Checkpoint step 7." in md
  assert "| region_caption/CIDEr | 101.23 | 115.30 | 115.70 | 3.00 |" in md
  assert "| region_caption/METEOR | 17.50 | 18.10 | – | – |" in md
  assert "SPICE is not computed" in md and "`published`" not in md
  assert "No published figure" in evaluate.results_table(results, None)


def test_per_split_published_figures():
  """The VG config evaluates four splits, each beside its own published figure."""
  results = {"vg_dense": {"dense_caption/mAP": 40.0, "region_caption/CIDEr": 1.0},
             "coco": {"recognition/accuracy": 90.0, "dense_caption/mAP": 2.0}}
  config = config_lib.load(os.path.join(ROOT, "configs", "dynrefer_vg.py"))
  md = evaluate.results_table(results, {s: evaluate.published_for(config, s) for s in results})
  dense, coco = md.split("## Split `coco`")[0], md.split("## Split `coco`")[1]
  assert "| dense_caption/mAP | 40.00 | 47.60 | – | – |" in dense
  assert "| recognition/accuracy | 90.00 | 91.80 | 89.40 | – |" in coco
  assert "| dense_caption/mAP | 2.00 | – | – | – |" in coco   # not VG's figure on COCO
  assert "No published figure" not in md


def _batch(captions, attributes, category):
  n = len(captions)
  return ({"mask": np.array([True] * (n - 1) + [False]), "captions": captions,
           "attributes": np.asarray(attributes), "category": np.asarray(category)}, {})


def test_splits_scored_by_their_tasks_or_their_labels():
  """config.eval.tasks wins; otherwise only the evaluators whose ground truth the split has
  (a padding row's labels do not count)."""
  vg = config_lib.load(os.path.join(ROOT, "configs", "dynrefer_vg.py"))
  synthetic = config_lib.load(CONFIG)
  no_attrs = [_batch([["a dog"], ["a cat"], ["x"]], [[-1, -1]] * 3, [-1, -1, 2])]
  assert evaluate.evaluators_for(synthetic, "any", no_attrs) == [
      "region_caption", "dense_caption"]
  labelled = [_batch([[], [], []], [[-1, -1], [1, -1], [-1, -1]], [0, -1, -1])]
  assert evaluate.evaluators_for(synthetic, "any", labelled) == ["attributes", "recognition"]
  assert evaluate.evaluators_for(vg, "vg_dense", no_attrs) == ["dense_caption"]
  assert evaluate.evaluators_for(vg, "ovad", no_attrs) == ["attributes"]


def test_missing_java_is_one_line_before_any_work(smoke_workdir, tmp_path, capsys, monkeypatch):
  """pycocoevalcap runs `java` by name: without it on PATH, evaluate and the main job stop at
  once with one line (not a traceback after predicting, or after training), and only when an
  evaluator that needs it can run."""
  from dynrefer_jax import main, predict, train
  from dynrefer_jax.evaluators import common, region_caption
  workdir, _ = smoke_workdir
  monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no java
  monkeypatch.setattr(predict.Runner, "load", classmethod(lambda *a, **k: pytest.fail("loaded")))
  monkeypatch.setattr(train, "train", lambda *a, **k: pytest.fail("trained"))
  assert evaluate.main(["--config", CONFIG, "--checkpoint", str(workdir)]) == 2
  assert main.main(["--config", CONFIG, "--workdir", str(tmp_path / "run")]) == 2
  errors = capsys.readouterr().err.splitlines()
  assert len(errors) == 2 and all(e.startswith("error: ") and "needs Java" in e and
                                  "not on PATH" in e for e in errors), errors
  with pytest.raises(common.MissingJava):
    region_caption.caption_metrics({1: ["a dog"]}, {1: "a dog"})
  # Splits whose tasks need no Java (COCO recognition, OVAD attributes) still evaluate.
  vg = config_lib.load(os.path.join(ROOT, "configs", "dynrefer_vg.py"))
  evaluate.require_java_for(vg, ["coco", "ovad"])
  with pytest.raises(common.MissingJava, match="dense_caption"):
    evaluate.require_java_for(vg, ["coco", "vg_dense"])


def test_task_priors_score_each_evaluator_on_its_own_views(monkeypatch):
  """view_selection "task": one pass per distinct task prior, each evaluator on the pass of its
  task (captions: caption prior; attributes; recognition: category); otherwise one pass."""
  config = config_lib.load(CONFIG)
  batch = _batch([["a dog"], ["a cat"], ["x"]], [[1, -1], [0, 1], [-1, -1]], [0, 1, -1])[0]
  passes, scored = [], {}

  class Predictor:
    def __init__(self, ts):
      self.ts = ts

    def with_protocol(self, _):
      return self

    def __call__(self, _params, _batch):
      passes.append(self.ts)
      return {"ts": self.ts}

  predictor_for = Predictor

  def fake_run(cached, names, cfg=None):
    del cfg
    for name in names:
      scored[name] = cached[0][1]["ts"]
    return {f"{n}/x": 1.0 for n in names}

  monkeypatch.setattr(evaluate, "run_evaluators", fake_run)
  results, names, _ = evaluate.score_split(predictor_for, None, [batch], config, "test")
  assert names == list(evaluate.EVALUATORS) and passes == [None]
  assert scored == dict.fromkeys(evaluate.EVALUATORS) and len(results) == 4

  config.eval.view_selection = "task"
  passes.clear()
  evaluate.score_split(predictor_for, None, [batch], config, "test")
  assert passes == [(0.0, 0.4, 0.5), (0.0, 0.1, 0.2), (0.0, 0.1, 0.5)]  # captions first
  assert scored == {"region_caption": (0.0, 0.4, 0.5), "dense_caption": (0.0, 0.4, 0.5),
                    "attributes": (0.0, 0.1, 0.2), "recognition": (0.0, 0.1, 0.5)}
  passes.clear()  # named evaluators (the main job's curves over training)
  evaluate.score_split(predictor_for, None, [batch], config, "val", names=["attributes"])
  assert passes == [(0.0, 0.1, 0.2)]
  # Bad settings are configuration errors, named.
  config.eval.task_ts = {"caption": [0, 0.4, 0.5]}
  with pytest.raises(config_lib.ConfigError, match="needs the task priors attributes, category"):
    evaluate.views_by_evaluator(config)
  config.eval.task_ts = None
  config.model.fixed_ts = [0.0, 0.1, 0.2]
  with pytest.raises(config_lib.ConfigError, match="conflicts with config.model.fixed_ts"):
    evaluate.views_by_evaluator(config)


def test_vg_evaluates_each_split_under_its_protocol_in_one_run(vg_smoke_workdir, tmp_path,
                                                              monkeypatch):
  """configs/dynrefer_vg.py carries the original's per-split eval configs: one evaluate run
  predicts vg_dense with tag threshold 0.7 and vg_reg with 0.8 (ovad / coco: the model's), and
  results.md / results.json record each split's protocol."""
  workdir, _ = vg_smoke_workdir
  used = []
  real = evaluate.predict_split

  def spy(predictor, params, dataset):
    cached = real(predictor, params, dataset)
    used.append(predictor.tag_threshold)
    for batch, preds in cached:  # the control words are the tags above that threshold
      for i in np.flatnonzero(batch["mask"]):
        above = predictor.tag_names[preds["tag_scores"][i] > predictor.tag_threshold]
        assert sorted(preds["tags"][i]) == sorted(above.tolist())
    return cached

  monkeypatch.setattr(evaluate, "predict_split", spy)
  out = tmp_path / "eval"
  assert evaluate.main(["--config", VG + ":smoke", "--checkpoint", str(workdir),
                        "--out", str(out)]) == 0
  toy = config_lib.load(VG + ":smoke").model.tag_threshold
  assert used == [0.7, 0.8, toy, toy]           # vg_dense, vg_reg, ovad, coco
  results = json.load(open(out / "results.json"))
  assert {s: p["tag_threshold"] for s, p in results["protocol"].items()} == {
      "vg_dense": 0.7, "vg_reg": 0.8, "ovad": toy, "coco": toy}
  for split in ("vg_dense", "vg_reg"):
    assert results["protocol"][split]["num_beams"] == 2
  md = open(out / "results.md").read()
  for split, thr in (("vg_dense", "0.7"), ("vg_reg", "0.8")):
    section = md.split(f"## Split `{split}`")[1].split("## Split")[0]
    assert f"Protocol: tag threshold {thr} " in section
    assert "beam search 2 beams, at most 16 new tokens" in section   # the toy's generate


def test_protocol_keys_and_splits_are_checked(capsys):
  with pytest.raises(config_lib.ConfigError, match="unknown key.*tag_thresh"):
    evaluate.check_protocol(_with_protocol({"vg_reg": {"tag_thresh": 0.8}}), ["vg_reg"])
  with pytest.raises(config_lib.ConfigError, match="unknown split.*vg_regg"):
    evaluate.check_protocol(_with_protocol({"vg_regg": {"tag_threshold": 0.8}}), ["vg_reg"])
  p = evaluate.check_protocol(config_lib.load(VG), ["vg_dense", "vg_reg", "coco"])
  assert [p[s]["tag_threshold"] for s in ("vg_dense", "vg_reg", "coco")] == [0.7, 0.8, 0.7]
  assert all(p[s]["max_new_tokens"] == 20 and p[s]["repetition_penalty"] == 1.5 for s in p)
  ref = evaluate.check_protocol(config_lib.load(os.path.join(ROOT, "configs",
                                                             "dynrefer_refcocog.py")),
                                ["refcocog"])
  assert ref["refcocog"]["tag_threshold"] == 0.76
  argv = ["--config", VG, "--checkpoint", "/nonexistent", "--config.eval.protocol.vg_reg."
          "tag_threshold=high"]
  assert evaluate.main(argv) == 2
  assert capsys.readouterr().err.count("\n") == 1


def _with_protocol(protocol):
  c = config_lib.load(VG)
  c.eval.protocol = protocol
  return c
