#!/usr/bin/env bash
# Issue 9 on one GPU in one go: the PyTorch anchor and tools/benchmark.py on the same card, back
# to back, then tools/bench_report.py's ratios. Wall time ≤ LIMIT_S (default 480 s = 8 min).
#
# 1. Here (the development machine), once: copy the anchor and the two wheels the device image
#    lacks or holds at another version into the ignored folder bench_local/:
#      bash tools/gpu_bench.sh --prepare
# 2. On the device, with the run tool: command "bash tools/gpu_bench.sh", carry ["bench_local"],
#    timeout_s 600. Everything comes back under $OUT (8 files at most):
#      env.txt       GPU, driver, Python / JAX / torch versions, which flax was used
#      anchor.jsonl  torch_anchor.py --regions 64 --steps 10 (eager)
#      ours.jsonl    tools/benchmark.py --regions 64 --steps 10 --vit-fp8 --profile
#      logs.tgz      anchor.log (its stderr) and ours.log (the benchmark's whole output)
#      profile.tgz   the bf16 train and caption programs' traces and optimised HLO
#                    (tools/profile_summary.py reads them here; PROFILE=0 skips them)
#      report.md, report.json   tools/bench_report.py (ratios, targets, roofline paragraph)
#      anchor_compiled.jsonl    only with ANCHOR_COMPILE=1 and time left (torch.compile peer)
#    BENCH_LOCAL names another folder than bench_local/ (e.g. a snapshot of the tree that
#    holds its own bench_local/: `bash snap/tools/gpu_bench.sh` runs that tree's code).
#
# The device image (/work/.library/device/KINDS.md, 2026-11): Python 3.12, torch 2.11,
# transformers 5.17, jax 0.11.2 with the CUDA 13 plugin, optax, orbax, tqdm; no ml-collections,
# and a flax whose version is not recorded. flax 0.12.8 (requirements.txt) does not import with
# jax 0.11.2; flax 0.12.10 does and runs this code (checked on a CPU with jax 0.11.2, Python 3.12).
# So bench_local/wheels carries ml-collections 1.1.0 and flax 0.12.10 (pure Python), installed
# into /tmp/site; if that flax fails to import there, the image's own flax is tried. Nothing is
# downloaded on the device (it has no network).
#
# A dry run of this script on a CPU at toy size (what the tests cannot cover: the stages, the
# package fall-back, the report), e.g.:
#   OUT=/tmp/bench_helper/gb SITE=/tmp/bench_helper/site JAX_PLATFORMS=cpu PYTHON=.venv/bin/python \
#     REGIONS=2 STEPS=2 ANCHOR_ARGS=--tiny BENCH_ARGS="--config configs/synthetic.py:smoke \
#     --set model.train_vision_encoder=False" bash tools/gpu_bench.sh
#
# Stage limits (timeout): anchor 150 s, ours whatever is left minus 30 s for the report; ours
# skips the modes that would start after its --budget-s and writes ours.jsonl after every line,
# so a stage cut short still leaves its finished figures.
set -u

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

if [ "${1:-}" = "--prepare" ]; then
  set -e
  src="$ROOT/../shared/bench/torch_anchor.py"
  [ -f "$src" ] || { echo "no $src" >&2; exit 2; }
  mkdir -p bench_local/wheels
  cp -f "$src" bench_local/ && chmod u+w bench_local/torch_anchor.py
  PIP="${PIP:-$ROOT/.venv/bin/python -m pip}"
  $PIP download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_17_x86_64 --platform any -d bench_local/wheels \
      flax==0.12.10 ml-collections==1.1.0
  ls -l bench_local bench_local/wheels
  git check-ignore -q bench_local || echo "warning: bench_local/ is not ignored by git" >&2
  exit 0
fi

OUT=${OUT:-/tmp/gpu_bench_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
LIMIT_S=${LIMIT_S:-480}
REGIONS=${REGIONS:-64}
STEPS=${STEPS:-10}
SITE=${SITE:-/tmp}
ANCHOR_ARGS=${ANCHOR_ARGS:-}
BENCH_ARGS=${BENCH_ARGS:-}
BENCH_LOCAL=${BENCH_LOCAL:-bench_local}
PROFILE=${PROFILE:-1}
LOGS=$(mktemp -d)
T0=$SECONDS
left() { echo $(( LIMIT_S - (SECONDS - T0) )); }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# JAX starts after torch has exited: let it take most of the card (its default is 75%).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu \
      --format=csv 2>&1
  $PY -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")' 2>&1
} > "$OUT/env.txt"

# --- Python packages for our code ------------------------------------------------------------
ours_env=""
if ls "$BENCH_LOCAL"/wheels/*.whl > /dev/null 2>&1; then
  for w in "$BENCH_LOCAL"/wheels/*.whl; do
    case "$(basename "$w")" in
      flax-*) dest=$SITE/site_flax ;;
      *) dest=$SITE/site ;;
    esac
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$dest" "$w" >> "$OUT/env.txt" 2>&1
  done
fi
# JAX on the GPU or not at all: a silent fall-back to the CPU would build 4 B parameters there.
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
check='import jax, flax, ml_collections; from dynrefer_jax import train; print("jax", jax.__version__, jax.devices(), "flax", flax.__version__, flax.__file__)'
for candidate in "$SITE/site_flax:$SITE/site:$ROOT" "$SITE/site:$ROOT"; do
  if PYTHONPATH="$candidate" $PY -c "$check" >> "$OUT/env.txt" 2>&1; then
    ours_env=$candidate
    break
  fi
done
echo "PYTHONPATH for ours: ${ours_env:-none worked}" >> "$OUT/env.txt"
cat "$OUT/env.txt"

# --- the PyTorch anchor (eager), 150 s at most ---------------------------------------------------
anchor=$BENCH_LOCAL/torch_anchor.py
if [ -f "$anchor" ]; then
  echo "== anchor ($(left) s left)"
  timeout 150 $PY "$anchor" --regions "$REGIONS" --steps "$STEPS" $ANCHOR_ARGS \
      > "$OUT/anchor.jsonl" 2> "$LOGS/anchor.log"
  echo "anchor exit $?" >> "$LOGS/anchor.log"
  tail -3 "$LOGS/anchor.log"
  cat "$OUT/anchor.jsonl"
else
  echo "no $anchor: run 'bash tools/gpu_bench.sh --prepare' here and carry bench_local" \
      | tee "$LOGS/anchor.log"
fi

# --- ours: bf16 train, fp8 train, caption, ViT forward -------------------------------------------
if [ -n "$ours_env" ]; then
  limit=$(( $(left) - 30 ))
  echo "== ours ($limit s)"
  if [ "$limit" -gt 60 ]; then
    profile_args=()
    [ "$PROFILE" = "1" ] && profile_args=(--profile "$LOGS/profile")
    PYTHONPATH="$ours_env" timeout "$limit" $PY tools/benchmark.py --regions "$REGIONS" \
        --steps "$STEPS" --warmup 3 --vit-fp8 --budget-s $(( limit - 60 )) "${profile_args[@]}" \
        $BENCH_ARGS --out "$OUT/ours.jsonl" > "$LOGS/ours.log" 2>&1
    echo "benchmark exit $?" >> "$LOGS/ours.log"
    grep '^{' "$LOGS/ours.log" | cut -c1-400
    grep -v '^{' "$LOGS/ours.log" | tail -15
    if [ -d "$LOGS/profile" ]; then
      # The Perfetto/trace JSON and the HLO text; the raw xplane.pb only while under 15 MB.
      (cd "$LOGS" && tar czf "$OUT/profile.tgz" --exclude='*.xplane.pb' profile)
      (cd "$LOGS" && tar czf "$LOGS/profile_full.tgz" profile) \
        && [ "$(stat -c %s "$LOGS/profile_full.tgz")" -lt 15000000 ] \
        && mv "$LOGS/profile_full.tgz" "$OUT/profile.tgz"
    fi
  fi
fi

# --- optional: the torch.compile peer, if asked for and time is left -------------------------------
compiled_args=()
if [ "${ANCHOR_COMPILE:-0}" = "1" ] && [ -f "$anchor" ] && [ "$(left)" -gt 150 ]; then
  echo "== anchor --compile --compile-t5 ($(left) s left)"
  timeout $(( $(left) - 20 )) $PY "$anchor" --regions "$REGIONS" --steps "$STEPS" --compile \
      --compile-t5 --skip vit,generate $ANCHOR_ARGS > "$OUT/anchor_compiled.jsonl" 2>> "$LOGS/anchor.log"
  compiled_args=(--anchor-compiled "$OUT/anchor_compiled.jsonl")
fi

# --- the ratios --------------------------------------------------------------------------------
if [ -f "$OUT/anchor.jsonl" ] && [ -f "$OUT/ours.jsonl" ]; then
  $PY tools/bench_report.py --anchor "$OUT/anchor.jsonl" --ours "$OUT/ours.jsonl" \
      "${compiled_args[@]}" --out "$OUT/report.md" --json "$OUT/report.json"
fi
(cd "$LOGS" && tar czf "$OUT/logs.tgz" ./*.log)
echo "== done in $(( SECONDS - T0 )) s"
