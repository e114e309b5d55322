"""The main job's console: its own progress and results only; everything else to a log file.

  with console.capture("workdir/logs/main.log"):
    console.say("train", "step 10")   # "[train] step 10" on the console
    print("anything else")            # the log file

Libraries write from Python (pycocoevalcap's BLEU dictionaries, transformers' "PyTorch was not
found", absl and JAX warnings), from C++ (TensorFlow's oneDNN banners) and from subprocesses
that inherit the descriptors (pycocoevalcap's Java tokenizer and METEOR). So the capture is at
the file-descriptor level: while it lasts, descriptors 1 and 2 and sys.stdout/sys.stderr all
write to the log, and the job's own lines go to duplicates of the original console, each
starting with one of PREFIXES (errors: "error: ", on the console's stderr).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time

# Every line the main job puts on its console starts with one of these ("[setup]": tools/env.sh,
# creating the venv; "error: ": a failure's one-line cause, on stderr).
PREFIXES = ("[setup]", "[main]", "[data]", "[train]", "[eval]", "[report]", "error: ")

_console: tuple | None = None  # (out, err) while a capture is active


def stream():
  """The console's stdout: the saved one during a capture, else sys.stdout (the CLIs that do
  not capture, such as `python -m dynrefer_jax.train`, print as before)."""
  return _console[0] if _console else sys.stdout


def say(prefix: str, message: str) -> None:
  """Prints `message` on the console, every line starting with "[prefix]"."""
  for line in str(message).split("\n"):
    print(f"[{prefix}] {line}".rstrip(), file=stream(), flush=True)


def error(message: str) -> None:
  """The one-line cause of a failure, on the console's stderr (and in the log)."""
  err = _console[1] if _console else sys.stderr
  print(f"error: {message}", file=err, flush=True)
  if _console:
    print(f"error: {message}", file=sys.stderr, flush=True)


def _keep(current, fd: int):
  """(a stream to the console, whether we opened it): a duplicate of `fd` when `current` writes
  to that descriptor; `current` itself when it has been redirected elsewhere already (pytest's
  capture), so that the console's lines still land where the caller expects them."""
  try:
    if current.fileno() == fd:
      dup = os.fdopen(os.dup(fd), "w", buffering=1, encoding=getattr(current, "encoding", None)
                      or "utf-8", errors="replace")
      return dup, True
  except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
    pass
  return current, False


@contextlib.contextmanager
def capture(log_path: str):
  """Sends descriptors 1 and 2 and sys.stdout/sys.stderr to `log_path` (appended, one header
  line per run) while the job's own lines (say, error) go to the console; restores all on exit.
  Child processes started meanwhile inherit the log as their stdout and stderr."""
  global _console
  os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
  log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
  for s in (sys.stdout, sys.stderr):
    with contextlib.suppress(Exception):
      s.flush()
  out, own_out = _keep(sys.stdout, 1)
  err, own_err = _keep(sys.stderr, 2)
  saved_fds = (os.dup(1), os.dup(2))
  saved_streams = (sys.stdout, sys.stderr, _console)
  log = os.fdopen(log_fd, "w", buffering=1, encoding="utf-8", errors="replace")
  log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n")
  os.dup2(log_fd, 1)
  os.dup2(log_fd, 2)
  sys.stdout = sys.stderr = log
  _console = (out, err)
  try:
    yield log_path
  finally:
    with contextlib.suppress(Exception):
      log.flush()
    sys.stdout, sys.stderr, _console = saved_streams
    os.dup2(saved_fds[0], 1)
    os.dup2(saved_fds[1], 2)
    for fd in saved_fds:
      os.close(fd)
    log.close()
    for s, own in ((out, own_out), (err, own_err)):
      if own:
        s.close()
