"""The decoder-LLM model from the command line, as the T5 one: `python -m dynrefer_jax.train
--config configs/synthetic.py:llama:smoke` then `python -m dynrefer_jax.evaluate` on its
workdir (every evaluator of the synthetic splits), in process."""

import json
import math
import os

from dynrefer_jax import evaluate, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA = os.path.join(ROOT, "configs", "synthetic.py") + ":llama:smoke"


def test_llama_trains_and_evaluates_from_the_command_line(tmp_path, capsys):
  workdir, out = tmp_path / "run", tmp_path / "eval"
  assert train.main(["--config", LLAMA, "--workdir", str(workdir)]) == 0
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert rows[-1]["step"] == 2 and all(math.isfinite(r["loss_lm"]) for r in rows)
  capsys.readouterr()
  assert evaluate.main(["--config", LLAMA, "--checkpoint", str(workdir), "--out", str(out),
                        "--split", "test"]) == 0
  results = json.load(open(out / "results.json"))
  test = results["test"]
  for key in ("region_caption/CIDEr", "region_caption/METEOR", "dense_caption/mAP",
              "attributes/ap/all", "recognition/accuracy"):
    assert math.isfinite(test[key]), key
  assert "region_caption/CIDEr" in open(out / "results.md").read()
