"""The seed statistics and claim verdicts behind the main job's comparisons (report.py), on
hand-made per-seed metrics: means and standard deviations against the statistics module, the
verdicts against the rule worked by hand (mean difference vs the sum of the two standard
deviations). Also: configs/synthetic.py:ablation's plan (seeds, shared data, the task-prior
variant on the 3-view checkpoints) and its malformed variants (main.comparison_plan)."""

import os
import statistics

import pytest

from dynrefer_jax import config_lib, main, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIDER, ATTR = "region_caption/CIDEr", "attributes/ap/all"


def _runs(values: dict) -> list[dict]:
  """{metric: [per-seed values]} → [{"test": {metric: value}}, one per seed]."""
  n = len(next(iter(values.values())))
  return [{"test": {k: v[i] for k, v in values.items()}} for i in range(n)]


# Per seed (3 seeds): a is 10, 11, 12 (mean 11, sd 1); b is 7, 8, 9 (mean 8, sd 1): 3 > 1 + 1.
RUNS = {
    "a": _runs({CIDER: [10.0, 11.0, 12.0], ATTR: [50.0, 52.0, 57.0]}),
    "b": _runs({CIDER: [7.0, 8.0, 9.0], ATTR: [49.0, 50.0, 51.0]}),
    "c": _runs({CIDER: [14.0, 15.5, 16.0], ATTR: [40.0, 40.0, 40.0]}),
    "one": _runs({CIDER: [30.0], ATTR: [30.0]}),
}


def test_mean_std_match_the_statistics_module():
  for runs in RUNS.values():
    s = report.summarize(runs)["test"]
    for metric in (CIDER, ATTR):
      values = [r["test"][metric] for r in runs]
      mean, std, n = s[metric]
      assert n == len(values)
      assert mean == pytest.approx(statistics.mean(values), abs=1e-12)
      if n > 1:
        assert std == pytest.approx(statistics.stdev(values), abs=1e-12)  # n − 1
      else:
        assert std != std  # NaN: one seed has no spread
  # Missing and non-finite values are left out, not counted as zero.
  assert report.mean_std([1.0, None, float("nan"), 3.0]) == (2.0, pytest.approx(2 ** 0.5), 2)


def test_verdicts_by_the_rule():
  s = {k: report.summarize(v) for k, v in RUNS.items()}
  # CIDEr: a − b = 3 > 1 + 1: holds. ATTR: a (mean 53, sd 3.606) − b (50, 1) = 3 < 4.606: within.
  assert report.verdict(s["a"]["test"][CIDER], s["b"]["test"][CIDER])[0] == report.HOLDS
  v, diff, spread = report.verdict(s["a"]["test"][ATTR], s["b"]["test"][ATTR])
  assert v == report.WITHIN and diff == pytest.approx(3.0)
  assert spread == pytest.approx(statistics.stdev([50, 52, 57]) + 1.0)
  # c (15.1667, sd 1.041) above a (11, 1): a beats c is reversed.
  assert report.verdict(s["a"]["test"][CIDER], s["c"]["test"][CIDER])[0] == report.REVERSED
  # c's attribute mAP has zero spread: a (53 ± 3.606) − c (40) = 13 > 3.606 holds.
  assert report.verdict(s["a"]["test"][ATTR], s["c"]["test"][ATTR])[0] == report.HOLDS
  assert report.verdict(s["one"]["test"][CIDER], s["b"]["test"][CIDER])[0] == report.ONE_SEED


def test_claims_hold_only_when_every_row_holds():
  s = {k: report.summarize(v) for k, v in RUNS.items()}
  claims = [dict(claim="a beats b on captions", a=["a"], b=["b"], metrics=[CIDER],
                 splits=["test"]),
            dict(claim="a beats b and c", a=["a"], b=["b", "c"], metrics=[CIDER, ATTR],
                 splits=["test"], sides=1),
            dict(claim="a vs c", a=["a"], b=["c"], metrics=[CIDER, ATTR], splits=["test"],
                 sides=2),
            dict(claim="one seed", a=["one"], b=["b"], metrics=[CIDER], splits=["test"])]
  judged = report.judge(claims, s)
  assert judged[0]["holds"] and [r["verdict"] for r in judged[0]["rows"]] == [report.HOLDS]
  # Rows: (split, metric, a, b) in that order.
  assert [(r["metric"], r["b"], r["verdict"]) for r in judged[1]["rows"]] == [
      (CIDER, "b", report.HOLDS), (CIDER, "c", report.REVERSED),
      (ATTR, "b", report.WITHIN), (ATTR, "c", report.HOLDS)]
  assert not judged[1]["holds"]
  assert not judged[2]["holds"]  # two-sided comparisons report, they do not "hold"
  assert not judged[3]["holds"]
  labels = {"a": "A", "c": "C"}
  assert "holds beyond the seed spread (1/1 rows)" in report.claim_summary(judged[0], labels)
  assert "does not hold beyond the seed spread (2/4 rows hold, 1 reversed)" in \
      report.claim_summary(judged[1], labels)
  two = report.claim_summary(judged[2], labels)
  assert "C better on CIDEr (test)" in two and "A better on attribute mAP (test)" in two
  assert "not judged (one seed" in report.claim_summary(judged[3], labels)
  text = "\n".join(report.comparison_lines("T", labels, RUNS, judged, [0, 1, 2],
                                           {"a": report.mean_std([1.0, 3.0])}))
  assert "| A | 11.00 ± 1.00 | 53.00 ± 3.61 | 2.00 ± 1.41 |" in text
  assert "| one | 30.00 | 30.00 | n/a |" in text  # one seed: the value, no ±
  assert "| a vs c | test | CIDEr | A | C | -4.17 | 2.04 | B better |" in text


def test_ablation_plan_seeds_each_variant_and_shares_the_world(tmp_path):
  spec = os.path.join(ROOT, "configs", "synthetic.py:ablation")
  config = config_lib.load(spec, ["compare.seeds=2"])
  plan = main.comparison_plan(config, spec, ["compare.seeds=2", "train.steps=7"], str(tmp_path))
  assert list(plan) == ["t0", "t1", "random2", "phash3", "phash3_task"]
  for name, (entry, cfgs) in plan.items():
    assert [c.seed for c in cfgs] == [0, 1]
    assert {c.data.seed for c in cfgs} == {0}  # the same synthetic world for every run
    assert all(c.data.dir == str(tmp_path / "data") for c in cfgs)
    assert all(c.train.steps == 7 for c in cfgs)
  assert [c.model.num_views for c in (plan[v][1][0] for v in plan)] == [1, 1, 2, 3, 3]
  assert plan["phash3_task"][0]["checkpoints_of"] == "phash3"
  assert plan["phash3_task"][1][0].eval.view_selection == "task"
  assert plan["phash3"][1][0].eval.splits == ["test", "heldout"]
  claims = {c["claim"]: c for c in config.compare.claims}
  assert set(claims) == {"multi-view beats single view on captions and attributes",
                         "three views beat two", "the image prior vs the task priors"}


def test_comparison_plan_rejects_malformed_variants(tmp_path):
  spec = os.path.join(ROOT, "configs", "synthetic.py:ablation")

  def plan_with(edit):
    config = config_lib.load(spec)
    edit(config.compare)
    return main.comparison_plan(config, spec, [], str(tmp_path))

  def other_checkpoints(cmp):  # the single-view model's checkpoints under a 3-view config
    cmp.variants[-1]["checkpoints_of"] = "t0"

  def unknown_claim(cmp):
    cmp.claims[0]["b"] = ["t0", "t9"]

  def no_seeds(cmp):
    cmp.seeds = 0

  with pytest.raises(config_lib.ConfigError, match="training settings differ"):
    plan_with(other_checkpoints)
  with pytest.raises(config_lib.ConfigError, match="unknown variant.*t9"):
    plan_with(unknown_claim)
  with pytest.raises(config_lib.ConfigError, match="at least 1"):
    plan_with(no_seeds)
