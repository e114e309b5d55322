"""The main job's evaluation half (dynrefer_jax/main.py) on the session's smoke workdir: the
trainable parameters restored onto the trainer's state (frozen stacks held stacked), every
evaluator the synthetic splits carry, the gallery and results.json. The evaluators themselves
are pinned against pycocoevalcap / pycocotools / sklearn in their own tests."""

import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys

import pytest

from dynrefer_jax import config_lib, console, main

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


# The console: the main job's own lines only, each with one of console.PREFIXES; what the
# libraries print (pycocoevalcap's Java tokenizer on the inherited stderr, its BLEU dictionaries
# from Python, TensorFlow's C++ banners, JAX and absl logging) lands in workdir/logs/main.log.

def _run_main_job(args, cwd=ROOT):
  env = dict(os.environ)
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # let TensorFlow's C++ banners happen: the log takes them
  return subprocess.run([sys.executable, "-m", "dynrefer_jax.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=900, check=False)


def _console_lines(text: str) -> list[str]:
  """Lines as a terminal shows them: tqdm redraws its bar after a carriage return."""
  return [line for line in re.split(r"[\r\n]", text) if line.strip()]


def _assert_only_own_lines(proc):
  lines = _console_lines(proc.stdout)
  strays = [line for line in lines if not line.startswith(console.PREFIXES)]
  assert not strays, strays[:10]
  assert proc.stderr == "", proc.stderr[-2000:]
  return lines


def test_main_job_console_shows_its_own_lines_and_logs_the_rest(smoke_workdir, tmp_path):
  """A short main job (the smoke config, resumed on the session's trained smoke workdir so that
  nothing compiles the train step again) as a subprocess: every console line carries one of the
  run's prefixes, and the third-party lines are in the log."""
  workdir = tmp_path / "run"
  shutil.copytree(smoke_workdir[0], workdir)
  proc = _run_main_job(["--config", os.path.join(ROOT, "configs/synthetic.py:smoke"),
                        "--workdir", str(workdir)])
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = _assert_only_own_lines(proc)
  assert lines[0].startswith(f"[main] workdir {workdir}")
  assert any(line.startswith("[train]") for line in lines)
  assert any(line.startswith("[eval] test: CIDEr") for line in lines)
  assert "[report] # DynRefer on the synthetic region world" in lines
  assert lines[-1].startswith("[main] done in")
  log = (workdir / "logs" / "main.log").read_text(encoding="utf-8")
  assert "PTBTokenizer tokenized" in log   # Java, through the inherited descriptor
  assert "'testlen'" in log                # pycocoevalcap's BLEU prints, from Python
  assert "PTBTokenizer" not in proc.stdout and "testlen" not in proc.stdout
  assert (workdir / "report.md").exists()


def test_main_job_failure_is_one_line_on_the_console(tmp_path):
  """A bad setting found inside the capture: its one line on the console's stderr, exit 2."""
  proc = _run_main_job(["--config", os.path.join(ROOT, "configs/synthetic.py:smoke"),
                        "--workdir", str(tmp_path / "run"), "--config.eval.view_selection=task",
                        "--config.model.fixed_ts=(0.0,)"])
  assert proc.returncode == 2
  errors = _console_lines(proc.stderr)
  assert len(errors) == 1 and errors[0].startswith("error: ") and "fixed_ts" in errors[0], errors
  assert _console_lines(proc.stdout) == [
      f"[main] workdir {tmp_path / 'run'}; library output goes to "
      f"{tmp_path / 'run' / 'logs' / 'main.log'}"]


def test_unexpected_failure_prints_its_cause_and_logs_the_traceback(tmp_path, capsys,
                                                                    monkeypatch):
  def boom(*args, **kwargs):
    print("third-party chatter")
    raise RuntimeError("disk on fire\nsecond line")

  monkeypatch.setattr(main, "run_one", boom)
  workdir = tmp_path / "run"
  assert main.main(["--config", os.path.join(ROOT, "configs/synthetic.py:smoke"),
                    "--workdir", str(workdir)]) == 1
  out, err = capsys.readouterr()
  log_path = workdir / "logs" / "main.log"
  assert err.splitlines() == [f"error: RuntimeError: disk on fire (traceback in {log_path})"]
  assert "chatter" not in out
  log = log_path.read_text(encoding="utf-8")
  assert "third-party chatter" in log and "Traceback" in log and "second line" in log


@pytest.mark.slow
def test_seeded_comparison_end_to_end(smoke_workdir, tmp_path):
  """configs/synthetic.py:smoke_compare: two seeds of the smoke model, each evaluated with the
  image prior and (same checkpoints, no training) with the task priors. The report's mean ± std
  and verdicts are recomputed here from the per-seed figures with the statistics module."""
  del smoke_workdir  # trained first: its compiled train step is in the session's cache
  workdir = tmp_path / "cmp"
  proc = _run_main_job(["--config", os.path.join(ROOT, "configs/synthetic.py:smoke_compare"),
                        "--workdir", str(workdir)])
  assert proc.returncode == 0, proc.stderr[-2000:]
  _assert_only_own_lines(proc)
  with open(workdir / "comparison.json", encoding="utf-8") as f:
    cmp = json.load(f)
  assert cmp["seeds"] == [0, 1]
  assert [r["seed"] for r in cmp["variants"]["image"]["runs"]] == [0, 1]
  for seed in (0, 1):  # trained once, evaluated twice; one synthetic world for all
    assert (workdir / "image" / f"seed{seed}" / "checkpoints").is_dir()
    assert not (workdir / "task" / f"seed{seed}" / "checkpoints").exists()
    assert (workdir / "task" / f"seed{seed}" / "results.json").exists()
  assert (workdir / "data").is_dir() and not (workdir / "image" / "seed0" / "data").exists()
  report_md = (workdir / "report.md").read_text(encoding="utf-8")
  per_seed = {v: [r["results"] for r in cmp["variants"][v]["runs"]] for v in ("image", "task")}
  for v, label in (("image", "image prior"), ("task", "task priors")):
    values = [r["test"]["region_caption/CIDEr"] for r in per_seed[v]]
    assert f"| {label} | {statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} |" \
        in report_md
  for claim in cmp["claims"]:
    for row in claim["rows"]:
      a = [r[row["split"]][row["metric"]] for r in per_seed[row["a"]]]
      b = [r[row["split"]][row["metric"]] for r in per_seed[row["b"]]]
      diff = statistics.mean(a) - statistics.mean(b)
      spread = statistics.stdev(a) + statistics.stdev(b)
      expected = ("holds" if diff > spread else "reversed" if -diff > spread
                  else "within the spread")
      assert row["verdict"] == expected, row
  one_sided = cmp["claims"][0]
  assert one_sided["holds"] == all(r["verdict"] == "holds" for r in one_sided["rows"])
  # A rerun reuses every finished run (run.json with the same config): nothing trains.
  again = _run_main_job(["--config", os.path.join(ROOT, "configs/synthetic.py:smoke_compare"),
                         "--workdir", str(workdir)])
  assert again.returncode == 0, again.stderr[-2000:]
  assert sum("reused" in line for line in _console_lines(again.stdout)) == 4
  assert not any(line.startswith("[train]") for line in _console_lines(again.stdout))


def test_lm_compare_plan_trains_t5_and_the_decoder_llm_on_one_world(tmp_path):
  """configs/synthetic.py:lm_compare: T5 (the default config) and the decoder-only LLM
  (synthetic.py:llama), seeded alike, on one synthetic world, scored on the test split; the
  only training difference is config.model.lm."""
  spec = os.path.join(ROOT, "configs/synthetic.py:lm_compare")
  config = config_lib.load(spec, ["compare.seeds=2"])
  plan = main.comparison_plan(config, spec, ["compare.seeds=2"], str(tmp_path))
  assert list(plan) == ["t5", "llama"]
  t5, llama = plan["t5"][1], plan["llama"][1]
  assert [c.seed for c in t5] == [c.seed for c in llama] == [0, 1]
  assert t5[0].model.lm.get("kind", "t5") == "t5" and llama[0].model.lm.kind == "llama"
  default = config_lib.load(os.path.join(ROOT, "configs/synthetic.py"))
  want = config_lib.load(os.path.join(ROOT, "configs/synthetic.py:llama"))
  assert t5[0].model.lm.to_dict() == default.model.lm.to_dict()
  assert llama[0].model.lm.to_dict() == want.model.lm.to_dict()
  assert t5[0].data.dir == llama[0].data.dir == str(tmp_path / "data")
  assert t5[0].eval.splits == llama[0].eval.splits == ["test"]
  strip = lambda c: {k: v for k, v in main._training_part(c).items() if k != "model"}  # pylint: disable=protected-access
  assert strip(t5[1]) == strip(llama[1])
  assert {k: v for k, v in main._training_part(t5[0])["model"].items() if k != "lm"} == \
      {k: v for k, v in main._training_part(llama[0])["model"].items() if k != "lm"}  # pylint: disable=protected-access
