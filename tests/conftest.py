"""Test harness: 8 fake CPU devices, float32 "highest" matmuls, offline Hugging Face."""

import atexit
import os
import shutil
import tempfile

# 8 fake CPU devices. LLVM at -O0 (XLA's HLO passes still run): most tests are bound by compiling
# toy programs, which then takes about half the time (test_scan_layers' no-copy test 50 -> 26 s,
# back to back); the few bound by running them get a little slower. Suite times: BENCHMARKS.md.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One XLA compilation cache per test session (and its CLI subprocesses, which inherit the
# variable): the suite compiles the same toy programs in several tests (the smoke trainer, the
# predictor behind predict / evaluate / demo), and a hit loads the executable instead of
# compiling it again. Empty at the start, removed at the end: nothing carries between sessions.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _XLA_CACHE = tempfile.mkdtemp(prefix="dynrefer_jax_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
  atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def devices8():
  devices = jax.devices()
  assert len(devices) == 8, f"expected 8 fake CPU devices, got {len(devices)}"
  return devices


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def smoke_workdir(tmp_path_factory):
  """configs/synthetic.py:smoke trained for its 2 steps, once per test session: a workdir with
  data, metrics.jsonl and a checkpoint at step 2. Shared because compiling is the cost."""
  from dynrefer_jax import config_lib, train  # pylint: disable=import-outside-toplevel
  workdir = tmp_path_factory.mktemp("smoke_workdir")
  summary = train.train(config_lib.load(os.path.join(ROOT, "configs", "synthetic.py:smoke")),
                        str(workdir), progress=False)
  return workdir, summary


@pytest.fixture(scope="session")
def vg_smoke_workdir(tmp_path_factory):
  """configs/dynrefer_vg.py:smoke trained for its 2 steps on the real-format fixture, once per
  test session (the smoke-mode test and the per-split evaluation protocol test share it)."""
  from dynrefer_jax import config_lib, train  # pylint: disable=import-outside-toplevel
  workdir = tmp_path_factory.mktemp("vg_smoke_workdir")
  summary = train.train(config_lib.load(os.path.join(ROOT, "configs", "dynrefer_vg.py:smoke")),
                        str(workdir), progress=False)
  return workdir, summary
