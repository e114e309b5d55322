"""tools/memory_plan.py at toy size: the compiled train step's per-device bytes from abstract
shapes, checked against each argument's shard size computed from its shape and sharding.

The full-size figure (64 devices, FSDP, 8 regions per device) is in BENCHMARKS.md; it takes
many minutes to compile on a CPU and is not part of the suite.
"""

import os
import sys

import jax
import numpy as np
import pytest

from dynrefer_jax import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import memory_plan  # noqa: E402  pylint: disable=wrong-import-position

sys.path.insert(0, os.path.join(ROOT, "tests"))
from test_scale import tiny_config  # noqa: E402  pylint: disable=wrong-import-position

SIZES = dict(image_size=32, caption_len=8, control_len=4, text_len=16, num_tags=12,
             num_templates=6, num_attributes=3, num_classes=5)


def test_fsdp_plan_matches_the_shards(devices8):
  config = tiny_config((1, 8, 1), **{"sharding.fsdp_min_bytes": 4096})
  mesh = sharding.make_mesh((1, 8, 1), devices8)
  r = memory_plan.plan(config, mesh, 2, **SIZES)
  assert r["global_batch"] == 16
  # Independent reference: the whole trainable tree in float32, from the parameter count.
  full = r["trainable_parameters"] * 4
  assert r["trainable_bytes"] < full / 4  # FSDP: far less than a replica per device
  resident = r["trainable_bytes"] + r["opt_state_bytes"]
  # The compiled program's arguments are the shards (XLA drops unused inputs, e.g. tables the
  # step recomputes, so <=); trainable and optimizer state are donated and alias the outputs.
  everything = resident + r["frozen_bytes"] + r["batch_bytes"] + 8
  assert resident <= r["argument_bytes"] <= everything
  assert r["alias_bytes"] >= resident - 64
  assert r["output_bytes"] >= resident
  assert r["peak_bytes"] == (r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"]
                             + r["temp_bytes"]) > r["argument_bytes"]
  # Optimizer moments follow their parameters: two float32 moments per trainable shard.
  assert abs(r["opt_state_bytes"] - 2 * r["trainable_bytes"]) <= 64


def test_shard_bytes_by_hand(devices8):
  mesh = sharding.make_mesh((2, 4, 1), devices8)
  P = jax.sharding.PartitionSpec
  x = jax.ShapeDtypeStruct((8, 12), np.float32,
                           sharding=jax.sharding.NamedSharding(mesh, P("fsdp", None)))
  y = jax.ShapeDtypeStruct((6,), np.int32, sharding=jax.sharding.NamedSharding(mesh, P()))
  assert memory_plan.shard_bytes({"x": x, "y": y}) == 2 * 12 * 4 + 6 * 4


@pytest.mark.parametrize("argv, message", [
    (["--devices", "8", "--mesh", "2,2,3"], "has 12 devices"),
    (["--devices", "8", "--mesh", "2,4"], "three positive integers"),
    (["--devices", "8", "--mesh", "1,8,1", "--regions-per-device", "0"], "at least 1"),
])
def test_bad_arguments_are_one_line(argv, message, capsys):
  assert memory_plan.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err


def test_needs_enough_devices(capsys):
  assert memory_plan.main(["--devices", "16", "--mesh", "1,16,1"]) == 2
  assert "16" in capsys.readouterr().err
