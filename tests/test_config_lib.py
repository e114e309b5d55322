"""Configs as code: loading, overrides, and one-line errors naming the closest keys."""

import glob
import json
import math
import os

import pytest

from dynrefer_jax import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_override_types_and_nesting():
  c = config_lib.load(os.path.join(ROOT, "configs/synthetic.py:smoke"),
                      ["train.batch_size=4", "optim.lr=0.5", "model.train_vision_encoder=false",
                       "eval.splits=['test']"])
  assert c.train.batch_size == 4 and isinstance(c.train.batch_size, int)
  assert c.optim.lr == 0.5
  assert c.model.train_vision_encoder is False
  assert list(c.eval.splits) == ["test"]


def test_unknown_key_names_closest():
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.load(os.path.join(ROOT, "configs/synthetic.py:smoke"), ["train.batch_sise=4"])
  msg = str(e.value)
  assert "\n" not in msg and "train.batch_sise" in msg and "train.batch_size" in msg


def test_bad_value_and_bad_arg():
  with pytest.raises(config_lib.ConfigError, match="expected an integer"):
    config_lib.load(os.path.join(ROOT, "configs/synthetic.py:smoke"), ["train.batch_size=four"])
  with pytest.raises(config_lib.ConfigError, match="bad config argument"):
    config_lib.load(os.path.join(ROOT, "configs/synthetic.py:nonsense"))
  with pytest.raises(config_lib.ConfigError, match="not found"):
    config_lib.load("configs/does_not_exist.py")


def test_split_argv():
  rest, spec, ov = config_lib.split_argv(
      ["--workdir", "w", "--config=c.py:smoke", "--config.train.steps=3", "--config.a", "1"])
  assert rest == ["--workdir", "w"] and spec == "c.py:smoke" and ov == ["train.steps=3", "a=1"]


# dynrefer_refcocog's smoke run is dynrefer_vg's toy model and trainer on another fixture split
# (its data path is covered by test_builders / test_data_setup), and the decoder-LLM configs'
# (dynrefer_vicuna_vg, dynrefer_llm_vg) are synthetic.py:llama's toy LLM on dynrefer_vg's
# fixture (tests/test_llm_cli.py trains and evaluates that one): they run with -m slow, to keep
# the default suite inside its 15 minutes on 2 cores.
SLOW_SMOKE = ("dynrefer_refcocog.py", "dynrefer_vicuna_vg.py", "dynrefer_llm_vg.py")


@pytest.mark.parametrize("path", [
    pytest.param(p, marks=pytest.mark.slow) if p.endswith(SLOW_SMOKE) else p
    for p in sorted(glob.glob(os.path.join(ROOT, "configs", "[!_]*.py")))])
def test_every_config_runs_two_steps_in_smoke_mode(path, tmp_path, request):
  if os.path.basename(path) == "common.py":  # building blocks, not a runnable config
    return
  from dynrefer_jax import train  # pylint: disable=import-outside-toplevel
  c = config_lib.load(path + ":smoke")
  assert c.train.steps == 2
  if os.path.basename(path) == "synthetic.py":  # the session's shared smoke runs (conftest.py)
    workdir, summary = request.getfixturevalue("smoke_workdir")
  elif os.path.basename(path) == "dynrefer_vg.py":
    workdir, summary = request.getfixturevalue("vg_smoke_workdir")
  else:
    workdir, summary = tmp_path, train.train(c, str(tmp_path), progress=False)
  assert summary["steps"] == 2
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert rows and rows[-1]["step"] == 2
  assert all(math.isfinite(r["loss"]) for r in rows)
