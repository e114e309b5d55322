# Sourced by run.sh and test.sh: creates .venv at the repository root when missing and installs
# the pinned requirements (again only when a requirements file changed).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
want="$1"  # requirements.txt or requirements-test.txt
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.installed-$(basename "$want" .txt)"
digest="$(cat "$ROOT/requirements.txt" "$ROOT/$want" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ]; then
  # pip's own output goes to a log (the console shows the run's lines only); its tail on failure.
  log="$VENV/pip-install.log"
  echo "[setup] installing $want into $VENV (first run: a few minutes; pip's output: $log)" >&2
  # The CLIP BPE vocabulary ships as a data file inside open-clip-torch; its dependencies
  # (torchvision, timm) are not wanted, so it is installed without them.
  if ! { "$VENV/bin/python" -m pip install --disable-pip-version-check -r "$ROOT/$want" &&
         "$VENV/bin/python" -m pip install --disable-pip-version-check --no-deps \
           open_clip_torch==3.3.0; } >"$log" 2>&1; then
    tail -n 5 "$log" | sed "s/^/[setup] pip: /" >&2
    echo "error: pip install of $want failed (full output: $log)" >&2
    exit 1
  fi
  echo "$digest" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=3
cd "$ROOT"
