"""`python -m dynrefer_jax.evaluate`: bad input is one line / exit 2; the results table sets
each metric beside SPEC §14's published figure."""

import os

import pytest

from dynrefer_jax import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "synthetic.py") + ":smoke"


@pytest.mark.parametrize("argv,message", [
    (["--config", CONFIG, "--checkpoint", "/nonexistent/run"], "no checkpoint in /nonexistent/run"),
    (["--config", "/nonexistent.py", "--checkpoint", "/tmp"], "config file not found"),
    (["--config", CONFIG, "--checkpoint", "/tmp", "--config.eval.nope=1"], "unknown config key"),
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
  md = evaluate.results_table(results, evaluate.PUBLISHED["refcocog"])
  assert "Checkpoint step 7." in md
  assert "| region_caption/CIDEr | 101.23 | 115.30 | 115.70 | 3.00 |" in md
  assert "| region_caption/METEOR | 17.50 | 18.10 | – | – |" in md
  assert "SPICE is not computed" in md and "`published`" not in md
  assert "No published figure" in evaluate.results_table(results, None)
