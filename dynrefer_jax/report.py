"""The main job's comparisons over seeds: mean ± standard deviation per metric, and whether each
claim holds beyond the seed spread. Pure Python and numpy (no JAX), so its tests are instant.

A comparison (config.compare, e.g. configs/synthetic.py:ablation) trains each variant with
`seeds` seeds and evaluates it; `runs` below is {variant: [{split: {metric: value}}, one per
seed]}. A claim compares variant groups `a` and `b` on metrics and splits:

  dict(claim="three views beat two", a=["phash3"], b=["random2"],
       metrics=["region_caption/CIDEr"], splits=["test"], sides=1)

The rule (README, "View ablation"): a difference holds beyond the seed spread when the
difference of the two means is larger than the sum of their two standard deviations (sample
standard deviations, n − 1), i.e. the mean ± std intervals do not overlap. With 3 seeds each and
equal spreads that is a one-sided Welch t-test at p ≈ 0.035 (t = 2.45, 4 degrees of freedom).
One-sided claims (sides=1) say "a beats b": a row holds when mean(a) − mean(b) exceeds the
spread, is reversed when mean(b) − mean(a) does; the claim holds when every row holds.
Two-sided comparisons (sides=2) say which of the two is better beyond the spread, row by row.
"""

from __future__ import annotations

import math

import numpy as np

# (metric key, its name in tables); all are ×100, higher is better.
HEADLINE = (("region_caption/CIDEr", "CIDEr"), ("region_caption/METEOR", "METEOR"),
            ("region_caption/BLEU-4", "BLEU-4"), ("dense_caption/mAP", "dense mAP"),
            ("attributes/ap/all", "attribute mAP"), ("recognition/accuracy", "category acc"),
            ("recognition/mAP", "category COCO mAP"))
METRIC_NAMES = dict(HEADLINE)

HOLDS, REVERSED, WITHIN, ONE_SEED = ("holds", "reversed", "within the spread",
                                     "one seed: no spread")


def mean_std(values) -> tuple[float, float, int]:
  """(mean, sample standard deviation (n − 1; NaN for one value), n) of the finite values."""
  v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
  if v.size == 0:
    return float("nan"), float("nan"), 0
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan"), int(v.size)


def summarize(runs: list[dict]) -> dict:
  """{split: {metric: (mean, std, n)}} over one variant's per-seed results."""
  out = {}
  for split in dict.fromkeys(s for r in runs for s in r):
    metrics = dict.fromkeys(k for r in runs for k, v in r.get(split, {}).items()
                            if isinstance(v, (int, float)))
    out[split] = {k: mean_std([r.get(split, {}).get(k) for r in runs]) for k in metrics}
  return out


def verdict(a: tuple, b: tuple) -> tuple[str, float, float]:
  """(verdict, mean(a) − mean(b), std(a) + std(b)) for two (mean, std, n) summaries: HOLDS
  when a is above b beyond the spread, REVERSED when b is above a beyond it, WITHIN otherwise,
  ONE_SEED when either side has fewer than two seeds (no spread to judge by)."""
  diff, spread = a[0] - b[0], a[1] + b[1]
  if a[2] < 2 or b[2] < 2 or not math.isfinite(diff):
    return ONE_SEED, diff, spread
  if diff > spread:
    return HOLDS, diff, spread
  if -diff > spread:
    return REVERSED, diff, spread
  return WITHIN, diff, spread


def judge(claims, summaries: dict) -> list[dict]:
  """Each claim's rows (every pair of a × b variants, metric and split present in both) with
  their verdicts, and the claim's overall verdict (`holds`: one-sided and every row holds)."""
  judged = []
  for c in claims:
    sides = int(c.get("sides", 1))
    rows = []
    for split in c["splits"]:
      for metric in c["metrics"]:
        for a in c["a"]:
          for b in c["b"]:
            sa = summaries.get(a, {}).get(split, {}).get(metric)
            sb = summaries.get(b, {}).get(split, {}).get(metric)
            if sa is None or sb is None:
              continue
            v, diff, spread = verdict(sa, sb)
            rows.append(dict(split=split, metric=metric, a=a, b=b, verdict=v, diff=diff,
                             spread=spread, mean_a=sa[0], std_a=sa[1], mean_b=sb[0],
                             std_b=sb[1]))
    judged.append(dict(claim=c["claim"], sides=sides, rows=rows,
                       holds=bool(rows) and sides == 1 and all(r["verdict"] == HOLDS
                                                               for r in rows)))
  return judged


def _num(v: float) -> str:
  return "n/a" if v is None or not math.isfinite(v) else f"{v:.2f}"


def fmt_mean_std(s: tuple | None) -> str:
  if s is None or s[2] == 0:
    return "n/a"
  return _num(s[0]) if s[2] < 2 else f"{s[0]:.2f} ± {s[1]:.2f}"


def claim_summary(c: dict, labels: dict) -> str:
  """One line: the claim and its verdict."""
  rows = c["rows"]
  if not rows:
    return f"**{c['claim']}**: no rows (the metrics or variants are missing)."
  if any(r["verdict"] == ONE_SEED for r in rows):
    return f"**{c['claim']}**: not judged (one seed: no spread)."
  if c["sides"] == 1:
    held = sum(r["verdict"] == HOLDS for r in rows)
    rev = sum(r["verdict"] == REVERSED for r in rows)
    if c["holds"]:
      return f"**{c['claim']}**: holds beyond the seed spread ({held}/{len(rows)} rows)."
    return (f"**{c['claim']}**: does not hold beyond the seed spread ({held}/{len(rows)} rows "
            f"hold, {rev} reversed).")
  a, b = rows[0]["a"], rows[0]["b"]
  la, lb = labels.get(a, a), labels.get(b, b)
  parts = []
  for name, v in ((la, HOLDS), (lb, REVERSED)):
    better = [f"{METRIC_NAMES.get(r['metric'], r['metric'])} ({r['split']})" for r in rows
              if r["verdict"] == v]
    if better:
      parts.append(f"{name} better on {', '.join(better)}")
  same = sum(r["verdict"] == WITHIN for r in rows)
  if same:
    parts.append(f"no difference beyond the spread on {same} of {len(rows)}")
  return f"**{c['claim']}**: " + "; ".join(parts) + "."


def comparison_lines(title: str, labels: dict, runs: dict, judged: list[dict],
                     seeds: list[int], minutes: dict, metrics=None) -> list[str]:
  """The report's comparison section: per split a mean ± std table (one row per variant), the
  claims with their rows, and the per-seed figures."""
  summaries = {v: summarize(r) for v, r in runs.items()}
  metrics = list(metrics or [k for k, _ in HEADLINE])
  splits = list(dict.fromkeys(s for v in summaries.values() for s in v))
  lines = [f"## {title}: mean ± standard deviation over seeds {', '.join(map(str, seeds))}", ""]
  for split in splits:
    keys = [k for k in metrics if any(k in summaries[v].get(split, {}) for v in summaries)]
    lines += [f"### Split `{split}`", "",
              "| variant | " + " | ".join(METRIC_NAMES.get(k, k) for k in keys)
              + " | minutes per seed |", "|---" * (len(keys) + 2) + "|"]
    for v, s in summaries.items():
      if split in s:
        lines.append(f"| {labels.get(v, v)} | "
                     + " | ".join(fmt_mean_std(s[split].get(k)) for k in keys)
                     + f" | {fmt_mean_std(minutes.get(v))} |")
    lines.append("")
  lines += ["## Claims", "",
            "A difference holds beyond the seed spread when the difference of the two means is "
            "larger than the sum of their standard deviations (the mean ± std intervals do not "
            "overlap).", ""]
  for c in judged:
    lines += ["- " + claim_summary(c, labels)]
  lines += ["", "| claim | split | metric | A | B | mean A − mean B | std A + std B | verdict |",
            "|---|---|---|---|---|---|---|---|"]
  for c in judged:
    for r in c["rows"]:
      verdict_text = r["verdict"]
      if c["sides"] == 2:
        verdict_text = {HOLDS: "A better", REVERSED: "B better"}.get(r["verdict"], r["verdict"])
      lines.append(f"| {c['claim']} | {r['split']} | {METRIC_NAMES.get(r['metric'], r['metric'])}"
                   f" | {labels.get(r['a'], r['a'])} | {labels.get(r['b'], r['b'])} | "
                   f"{_num(r['diff'])} | {_num(r['spread'])} | {verdict_text} |")
  lines += ["", "### Per seed", ""]
  for split in splits:
    keys = [k for k in metrics if any(k in summaries[v].get(split, {}) for v in summaries)]
    lines += [f"Split `{split}`:", "", "| variant | seed | "
              + " | ".join(METRIC_NAMES.get(k, k) for k in keys) + " |",
              "|---" * (len(keys) + 2) + "|"]
    for v, rs in runs.items():
      for seed, r in zip(seeds, rs):
        if split in r:
          lines.append(f"| {labels.get(v, v)} | {seed} | "
                       + " | ".join(_num(r[split].get(k)) for k in keys) + " |")
    lines.append("")
  return lines
