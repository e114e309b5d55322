"""tools/benchmark.py at toy size on the CPU (a subprocess, as a user runs it) and
tools/bench_report.py on synthetic JSON lines. No timing assertions: only that every figure is
there, finite and positive, and that the report's ratios are the ones the lines imply."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import bench_report  # noqa: E402  pylint: disable=wrong-import-position

# Small tables keep the toy compile short; the frozen tower lets --vit-fp8 reach its check.
TOY = ["--config", "configs/synthetic.py:smoke", "--regions", "8", "--steps", "2", "--warmup", "1",
       "--num-tags", "32", "--num-templates", "8", "--num-attributes", "4", "--num-classes", "8",
       "--set", "model.train_vision_encoder=False", "--vit-fp8", "--compare-attention"]
COMMON = ("config", "weights", "device_kind", "platform", "date", "command", "jax_version")
MEASURED = ("regions", "steps", "step_s", "step_s_min", "step_s_max", "regions_per_s",
            "flops_per_region", "tflops_per_s", "compile_s", "lower_s")


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench") / "toy.jsonl"
  env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             # LLVM at -O0: the toy programs compile in half the time; the figures are not judged.
             XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), *TOY,
                         "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  with open(out, encoding="utf-8") as f:
    written = [json.loads(line) for line in f]
  return lines, written


def _positive(record, key):
  value = record[key]
  assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)


def test_toy_run_prints_every_mode_with_finite_positive_figures(toy_run):
  lines, written = toy_run
  assert written == lines  # --out holds exactly the printed lines
  by_mode = {(r["mode"], r.get("vit_fp8", False)): r for r in lines}
  assert [r["mode"] for r in lines][:5] == ["setup", "vit_forward", "train", "caption", "views"]
  for r in lines:
    for key in COMMON:
      assert r[key], key
    assert r["command"].startswith("python tools/benchmark.py --config configs/synthetic.py:smoke")
    assert r["device_kind"] == "cpu" and r["weights"] == "random"
  setup = by_mode[("setup", False)]
  for key in ("build_s", "trainable_parameters", "frozen_parameters"):
    _positive(setup, key)
  for mode in ("vit_forward", "train", "caption"):
    r = by_mode[(mode, False)]
    assert r["status"] == "ok"
    for key in MEASURED:
      _positive(r, key)
    assert r["regions"] == 8 and r["steps"] == 2
    assert r["step_s_min"] <= r["step_s"] <= r["step_s_max"]
    assert r["regions_per_s"] == pytest.approx(8 / r["step_s"])
    assert r["tflops_per_s"] == pytest.approx(r["flops_per_region"] * 8 / r["step_s"] / 1e12)
    assert r["peak_bytes"] is None or r["peak_bytes"] > 0  # the CPU backend keeps no statistics
  vit = by_mode[("vit_forward", False)]
  assert vit["images"] == 8 * 3 and vit["attention"] == "xla"  # "auto" on a CPU
  # --compare-attention: the tower against itself with XLA's attention, timed, error exactly 0.
  assert vit["attention_rel_error_vs_xla"] == 0.0
  for key in ("xla_attention_step_s", "xla_attention_images_per_s", "xla_attention_compile_s"):
    _positive(vit, key)
  assert math.isfinite(by_mode[("train", False)]["loss"])
  cap = by_mode[("caption", False)]
  assert (cap["num_beams"], cap["max_new_tokens"], cap["generated_tokens"]) == (2, 20, 20)
  assert cap["repetition_penalty"] == 1.5
  views = by_mode[("views", False)]
  assert views["status"] == "ok" and (views["selection"], views["num_views"]) == ("phash", 3)
  for key in ("step_s", "regions_per_s", "compile_s", "train_views_s", "train_views_compile_s"):
    _positive(views, key)
  assert views["flops_per_region"] is None and views["tflops_per_s"] is None
  train_s = by_mode[("train", False)]["step_s"]
  assert views["train_step_s"] == train_s   # the bf16 step, not the fp8 one that runs later
  assert views["share_of_train_step"] == pytest.approx(views["step_s"] / train_s)
  assert views["train_views_share"] == pytest.approx(views["train_views_s"] / train_s)


def test_toy_run_flop_counts_are_flops_py(toy_run):
  from dynrefer_jax import config_lib, flops  # pylint: disable=import-outside-toplevel
  lines, _ = toy_run
  config = config_lib.load("configs/synthetic.py:smoke")
  for key in ("text", "lm"):
    config.model[key].vocab_size = 1024
  by_mode = {r["mode"]: r for r in lines if not r.get("vit_fp8")}
  f = flops.flops_per_region(config.model, num_tags=32)
  assert by_mode["train"]["flops_per_region"] == pytest.approx(f["total"])
  assert by_mode["vit_forward"]["flops_per_region"] == pytest.approx(f["vit"])


def test_toy_run_fp8_line_is_a_measurement(toy_run):
  """The fp8 tower is wired: the vit_fp8 line has its feature errors (the toy computes in
  float32, so that is the reference and no separate float32 forward runs), then an fp8 train."""
  lines, _ = toy_run
  fp8 = [r for r in lines if r["mode"] == "vit_fp8"]
  assert len(fp8) == 1
  r = fp8[0]
  assert r["status"] == "ok", r
  assert r["recipe"] == "rowwise" and r["reference_dtype"] == "float32" and r["images"] == 24
  assert r["f8_dots"] == 4  # qkv, attention output, fc1, fc2 once in the scanned stack
  for key in ("rel_error_vit", "rel_error_ln_vision", "max_token_rel_error_ln_vision"):
    assert math.isfinite(r[key]) and 0 < r[key] < 1, (key, r[key])
  assert r["rel_error_ln_vision"] <= r["max_token_rel_error_ln_vision"]
  assert r["within_1e-2"] == (r["rel_error_ln_vision"] <= 1e-2)
  assert not any(k.endswith("_vs_f32") for k in r)
  trains = [x for x in lines if x["mode"] == "train" and x.get("vit_fp8")]
  assert len(trains) == 1 and trains[0]["status"] == "ok"
  forwards = [x for x in lines if x["mode"] == "vit_forward" and x.get("vit_fp8")]
  assert len(forwards) == 1 and forwards[0]["status"] == "ok"
  captions = [x for x in lines if x["mode"] == "caption" and x.get("vit_fp8")]
  assert len(captions) == 1 and captions[0]["status"] == "ok"
  assert captions[0]["generated_tokens"] == 20


def test_bad_mode_is_a_usage_error():
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "benchmark.py"),
                         "--modes", "train,nonsense"], cwd=ROOT, capture_output=True, text=True,
                        timeout=120, check=False, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2 and "nonsense" in proc.stderr


# ------------------------------------------------------------------------------ bench_report

ANCHOR = [
    {"figure": "matmul_bf16_tflops", "value": 750.0},
    {"figure": "vit_g_forward", "images_per_s": 885.0, "tflops": 461.0},
    {"figure": "train_step", "regions_per_s": 131.7, "step_s": 0.486, "tflops": 262.0,
     "trainable_m": 120.0, "peak_gib": 28.4},
    {"figure": "caption_generate", "regions_per_s": 69.0, "batch_s": 0.928},
    {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11", "regions": 64, "compile": False,
     "flops_per_region_g": {"total": 1990.0}},
]


def _ours(fp8_status="ok"):
  common = {"device_kind": "NVIDIA H100 80GB HBM3", "date": "2026-11-27T00:00:00+00:00",
            "command": "python tools/benchmark.py --regions 64"}
  lines = [{"mode": "setup", "status": "ok", **common},
           {"mode": "vit_forward", "status": "ok", "vit_fp8": False, "regions": 64,
            "step_s": 0.2, "flops_per_region": 1.561e12, "tflops_per_s": 1.561e12 * 64 / 0.2 / 1e12,
            **common},
           {"mode": "train", "status": "ok", "vit_fp8": False, "regions": 64, "step_s": 0.25,
            "regions_per_s": 256.0, "flops_per_region": 1.99e12,
            "tflops_per_s": 1.99 * 256.0, "peak_gib": 20.0, "compile_s": 45.0, **common},
           {"mode": "caption", "status": "ok", "vit_fp8": False, "regions": 64,
            "regions_per_s": 300.0, **common},
           {"mode": "views", "status": "ok", "vit_fp8": False, "regions": 64, "step_s": 0.004,
            "train_step_s": 0.25, "share_of_train_step": 0.004 / 0.25, **common}]
  if fp8_status == "ok":
    lines += [{"mode": "vit_fp8", "status": "ok", "rel_error_ln_vision": 0.004, **common},
              {"mode": "train", "status": "ok", "vit_fp8": True, "regions": 64,
               "regions_per_s": 420.0, "flops_per_region": 1.99e12, **common},
              {"mode": "caption", "status": "ok", "vit_fp8": True, "regions": 64,
               "regions_per_s": 250.0, **common}]
  else:
    lines += [{"mode": "vit_fp8", "status": "pending", "message": "fp8 ViT wiring pending: x",
               **common}]
  return lines


def _write(path, records, junk=""):
  with open(path, "w", encoding="utf-8") as f:
    f.write(junk + "".join(json.dumps(r) + "\n" for r in records))


def test_report_ratios_from_synthetic_lines(tmp_path):
  _write(tmp_path / "a.jsonl", ANCHOR, junk="a warning line\n")
  _write(tmp_path / "o.jsonl", _ours())
  assert bench_report.main(["--anchor", str(tmp_path / "a.jsonl"), "--ours", str(tmp_path / "o.jsonl"),
                            "--out", str(tmp_path / "r.md"), "--json", str(tmp_path / "r.json")]) == 0
  with open(tmp_path / "r.json", encoding="utf-8") as f:
    result = json.load(f)
  fig = result["figures"]
  assert fig["train_bf16"]["value"] == pytest.approx(256.0 / 131.7)
  assert fig["train_bf16"]["met"] is False                # 1.94× < 2.0×
  assert fig["train_fp8"]["value"] == pytest.approx(420.0 / 131.7) and fig["train_fp8"]["met"]
  assert fig["fp8_feature_rel_error"]["value"] == 0.004 and fig["fp8_feature_rel_error"]["met"]
  assert fig["caption"]["value"] == pytest.approx(300.0 / 69.0) and fig["caption"]["met"]
  assert fig["caption_fp8"]["value"] == pytest.approx(250.0 / 69.0)
  assert fig["caption_fp8"]["met"] is False                  # 3.62× < 4.0×
  assert fig["vit_tflops"]["value"] == pytest.approx(1.561 * 64 / 0.2 / 461.0)
  assert fig["peak_memory"]["value"] == pytest.approx(20.0 / 28.4) and fig["peak_memory"]["met"]
  assert fig["train_compile_s"]["value"] == 45.0 and fig["train_compile_s"]["met"]
  assert fig["views_share"]["value"] == pytest.approx(0.016) and fig["views_share"]["met"]
  c = result["context"]
  assert c["same_device"] and c["flops_count_agrees"]
  # The roofline paragraph is filled from the same numbers.
  ideal = 750.0e12 / 1.99e12
  assert f"{ideal:.0f} regions/s" in result["roofline"]
  vit_ms = 1e3 * 0.2 / 64
  assert f"{vit_ms:.2f} ms of the {1e3 / 256.0:.2f} ms" in result["roofline"]
  text = (tmp_path / "r.md").read_text(encoding="utf-8")
  assert "| training regions/s, bf16 | 256 | 132 | 1.94× | ≥ 2.0× | **no** |" in text
  assert result["roofline"] in text
  assert "| 0.004 | — | 1.60% | ≤ 2% | yes |" in text


def test_report_with_fp8_pending_and_another_card(tmp_path):
  anchor = [dict(r) for r in ANCHOR]
  anchor[-1]["device"] = "NVIDIA H200"
  _write(tmp_path / "a.jsonl", anchor)
  _write(tmp_path / "o.jsonl", _ours(fp8_status="pending"))
  result = bench_report.summarize(bench_report.read_jsonl(tmp_path / "a.jsonl"),
                                  bench_report.read_jsonl(tmp_path / "o.jsonl"))
  fig = result["figures"]
  for name in ("train_fp8", "fp8_feature_rel_error"):
    assert fig[name]["value"] is None and fig[name]["met"] is None
    assert "wiring pending" in fig[name]["note"]
  assert fig["caption_fp8"]["value"] is None and fig["caption_fp8"]["met"] is None
  assert not result["context"]["same_device"]
  assert "not the same card" in bench_report.markdown(result)


def test_random_fill_follows_the_name_rules_on_the_shardings(devices8):
  """build_random's fill: unit norm scales, zero biases, SigLIP's ln 10 / −10, the token-id
  tables as given, normal(0, 0.02) elsewhere, each on the abstract leaf's shape, dtype and
  sharding (here an 8-device FSDP mesh)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import benchmark  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec as P

  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Explicit,),
                       devices=devices8)
  spec = lambda shape, dtype, *axes: jax.ShapeDtypeStruct(
      shape, dtype, sharding=NamedSharding(mesh, P(*axes)))
  ids = {"tags": np.arange(24, dtype=np.int32).reshape(3, 8)}
  abstract = {"blocks": {0: {"norm": {"scale": spec((64,), jnp.float32, None),
                                        "bias": spec((64,), jnp.float32, None)},
                               "mlp": {"kernel": spec((256, 512), jnp.bfloat16, "fsdp", None)}},
                         1: {"mlp": {"kernel": spec((256, 512), jnp.bfloat16, "fsdp", None)}}},
              "attr_t": spec((), jnp.float32), "attr_b": spec((), jnp.float32),
              "q_bias": spec((4, 8), jnp.float32, None, None),
              "tag_token_ids": spec((3, 8), jnp.int32, None, None)}
  out = benchmark.random_fill(abstract, ids)
  flat_in, flat_out = (dict(jax.tree_util.tree_flatten_with_path(t)[0]) for t in (abstract, out))
  for path, x in flat_in.items():
    y = flat_out[path]
    assert (y.shape, y.dtype, y.sharding) == (x.shape, x.dtype, x.sharding), path
  np.testing.assert_array_equal(out["blocks"][0]["norm"]["scale"], np.ones(64))
  np.testing.assert_array_equal(out["blocks"][0]["norm"]["bias"], np.zeros(64))
  np.testing.assert_array_equal(out["q_bias"], np.zeros((4, 8)))
  assert float(out["attr_t"]) == pytest.approx(math.log(10.0)) and float(out["attr_b"]) == -10.0
  np.testing.assert_array_equal(out["tag_token_ids"], ids["tags"])
  k0 = np.asarray(out["blocks"][0]["mlp"]["kernel"], np.float32)
  k1 = np.asarray(out["blocks"][1]["mlp"]["kernel"], np.float32)
  assert abs(k0.mean()) < 1e-3 and k0.std() == pytest.approx(0.02, rel=0.02)
  assert not np.array_equal(k0, k1)   # one program per shape, a key per array


def test_profile_summary_attributes_device_time(tmp_path):
  """tools/profile_summary.py on a hand-written GPU trace and HLO: each kernel's time goes to
  its HLO instruction's kind and to the innermost dynrefer_jax file outside the shared blocks."""
  import gzip
  import profile_summary  # pylint: disable=import-outside-toplevel
  hlo = "\n".join([
      "HloModule jit_step", "", "FileNames", '1 "/x/dynrefer_jax/models/layers.py"',
      '2 "/x/dynrefer_jax/models/eva_vit.py"', '3 "/x/dynrefer_jax/models/t5.py"', "",
      "FunctionNames", '1 "Dense.__call__"', '2 "Mlp.__call__"', '3 "T5.__call__"', "",
      "FileLocations", "1 {file_name_id=1 function_name_id=1 line=83}",
      "2 {file_name_id=2 function_name_id=2 line=114}",
      "3 {file_name_id=3 function_name_id=3 line=281}", "",
      # XLA prints a frame's parent one above its key (a root points at itself).
      "StackFrames", "1 {file_location_id=2 parent_frame_id=1}",
      "2 {file_location_id=1 parent_frame_id=2}", "3 {file_location_id=3 parent_frame_id=3}", "",
      "%fused_gelu (p: bf16[8]) -> bf16[8] {",
      "  %p = bf16[8]{0} parameter(0)",
      "  ROOT %m = bf16[8]{0} multiply(%p, %p)", "}", "",
      "ENTRY %main (a: bf16[8,8]) -> bf16[8,8] {",
      "  %a = bf16[8,8]{1,0} parameter(0)",
      '  %gemm.1 = (bf16[8,8]{1,0}, s8[0]{0}) custom-call(%a, %a), '
      'custom_call_target="__cublas$gemm", metadata={op_name="jit(step)/dot_general" '
      "stack_frame_id=2}",
      "  %loop_fusion.2 = bf16[8]{0} fusion(%a), kind=kLoop, calls=%fused_gelu, "
      'metadata={op_name="jit(step)/mul" stack_frame_id=3}',
      "  ROOT %t = bf16[8,8]{1,0} copy(%a)", "}"])
  (tmp_path / "train.hlo.txt").write_text(hlo)
  run = tmp_path / "train" / "plugins" / "profile" / "run1"
  run.mkdir(parents=True)
  events = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7"}},
            {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}}]
  for call in range(2):
    events += [{"ph": "X", "pid": 1, "tid": 7, "ts": call * 100, "dur": 30.0,
                "name": "sm90_gemm", "args": {"hlo_op": "gemm.1"}},
               {"ph": "X", "pid": 1, "tid": 7, "ts": call * 100 + 40, "dur": 10.0,
                "name": "loop_fusion_2", "args": {"hlo_op": "loop_fusion.2"}},
               {"ph": "X", "pid": 2, "tid": 1, "ts": call * 100, "dur": 500.0, "name": "host"}]
  with gzip.open(run / "h.trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)
  h = profile_summary.Hlo(hlo)
  evs = profile_summary.device_events(str(run / "h.trace.json.gz"))
  assert sorted(evs) == sorted([("gemm.1", 30.0), ("loop_fusion.2", 10.0)] * 2)  # host excluded
  assert h.kind("gemm.1") == "gemm (cuBLAS)" and h.kind("loop_fusion.2").startswith("elementwise")
  assert h.source(h.instructions["gemm.1"]).startswith("models/layers.py:83")
  assert h.source(h.instructions["gemm.1"], skip_generic=True).startswith("models/eva_vit.py:114")
  text = profile_summary.summarize(evs, h, calls=2, top=5)
  assert "Device busy time per call: 0.04 ms" in text
  assert "| models/eva_vit.py | 0.03 | 75.0% |" in text
  assert "| models/t5.py | 0.01 | 25.0% |" in text
