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
