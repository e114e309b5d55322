"""The conversion engine: every key consumed once; every problem named."""

import numpy as np
import pytest

from dynrefer_jax.convert.common import ConversionError, Rule, convert

RULES = [
    Rule(r"layer\.(\d+)\.fc\.weight", "layers/{0}/fc/kernel", "linear"),
    Rule(r"layer\.(\d+)\.fc\.bias", "layers/{0}/fc/bias"),
    Rule(r"position_ids", None),
]
EXPECTED = {"layers/0/fc/kernel": (3, 2), "layers/0/fc/bias": (2,)}


def _state():
  return {"layer.0.fc.weight": np.arange(6.0).reshape(2, 3), "layer.0.fc.bias": np.ones(2),
          "position_ids": np.arange(4)}


def test_maps_and_transposes():
  out = convert(_state(), RULES, EXPECTED)
  np.testing.assert_array_equal(out["layers/0/fc/kernel"], np.arange(6.0).reshape(2, 3).T)
  assert set(out) == set(EXPECTED)


@pytest.mark.parametrize("mutate, needle", [
    (lambda s: s.update({"extra.weight": np.ones(1)}), "unmapped source keys: extra.weight"),
    (lambda s: s.pop("layer.0.fc.bias"), "missing target keys: layers/0/fc/bias"),
    (lambda s: s.update({"layer.0.fc.bias": np.ones(5)}), "layer.0.fc.bias -> layers/0/fc/bias: got (5,)"),
    (lambda s: s.update({"layer.1.fc.bias": np.ones(2)}), "unused source keys: layer.1.fc.bias"),
])
def test_names_every_problem(mutate, needle):
  state = _state()
  mutate(state)
  with pytest.raises(ConversionError, match=None) as err:
    convert(state, RULES, EXPECTED, source_name="toy.pth")
  assert needle in str(err.value) and "toy.pth" in str(err.value)


def test_duplicate_target_is_an_error():
  rules = RULES + [Rule(r"alias\.bias", "layers/0/fc/bias")]
  state = _state()
  state["alias.bias"] = np.ones(2)
  with pytest.raises(ConversionError, match="mapped twice"):
    convert(state, rules, EXPECTED)


def test_load_state_dict_reads_every_format(tmp_path):
  """.safetensors (float32 and bfloat16), a directory of shards, and torch files (a bare state
  dict and LAVIS's {"model": ...} wrapper): same names, same values."""
  import torch
  from safetensors.torch import save_file

  from dynrefer_jax.convert.common import load_state_dict

  gen = torch.Generator().manual_seed(0)
  a = {"enc.weight": torch.randn(3, 4, generator=gen), "enc.bias": torch.randn(4, generator=gen)}
  b = {"dec.weight": torch.randn(2, 2, generator=gen).to(torch.bfloat16)}
  save_file(a, str(tmp_path / "a.safetensors"))
  shards = tmp_path / "shards"
  shards.mkdir()
  save_file(a, str(shards / "model-00001-of-00002.safetensors"))
  save_file(b, str(shards / "model-00002-of-00002.safetensors"))
  torch.save(a, str(tmp_path / "bare.pth"))
  torch.save({"model": {**a, "step": torch.tensor(3)}, "epoch": 5}, str(tmp_path / "lavis.pth"))

  want = {k: v.float().numpy() for k, v in {**a, **b}.items()}
  for path, keys in ((tmp_path / "a.safetensors", a), (shards, {**a, **b}),
                     (tmp_path / "bare.pth", a)):
    got = load_state_dict(path)
    assert set(got) == set(keys), path
    for k in keys:
      np.testing.assert_array_equal(got[k], want[k])
  got = load_state_dict(tmp_path / "lavis.pth")
  assert set(got) == set(a) | {"step"}
  np.testing.assert_array_equal(got["enc.weight"], want["enc.weight"])
  with pytest.raises(FileNotFoundError, match="weights not found"):
    load_state_dict(tmp_path / "missing.safetensors")
