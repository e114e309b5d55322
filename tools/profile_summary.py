r"""Where a profiled program's device time goes: by kind of op, by model source file, top ops.

  python tools/profile_summary.py PROFILE_DIR/train --hlo PROFILE_DIR/train.hlo.txt [--calls 2]
  python tools/profile_summary.py profile.tgz          # what tools/gpu_bench.sh brings back

Reads what `tools/benchmark.py --profile DIR` writes: the jax.profiler trace of `--calls` calls
of one compiled program (`*.trace.json.gz`) and the program's optimised HLO text. Every device
event (a GPU kernel, or on a CPU an executed HLO op) is attributed to its HLO instruction (the
trace's `hlo_op`, else the event's name), whose line in the HLO text gives its kind (cuBLAS GEMM,
cuDNN attention, a Triton GEMM fusion, an elementwise/reduction fusion, a copy, ...) and,
through its stack frames, the innermost dynrefer_jax source file and line that produced it
(models/eva_vit.py, models/t5.py, ...). Prints per-call milliseconds and shares, as markdown.
The sum is the device's busy time, which is at most the step time (gaps are host or launch time).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tarfile
import tempfile

# name = type opcode(...): the type may be a tuple with spaces, "(bf16[8,8]{1,0}, s8[0]{0})".
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\(")
_FRAME_ID = re.compile(r"stack_frame_id=(\d+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CUSTOM_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_FUSION_KIND = re.compile(r"kind=(k\w+)")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OWN = "dynrefer_jax/"
# Shared building blocks: time in them is charged to the model file that called them.
_GENERIC = ("models/layers.py", "models/fp8.py", "functional.py", "sharding.py")


class Hlo:
  """Instruction name → (kind, source) from an optimised HLO module's text."""

  def __init__(self, text: str):
    self.files, self.functions, self.locations, self.frames = {}, {}, {}, {}
    self.instructions = {}    # name → the whole line
    self.computations = {}    # computation name → its instruction lines
    section, current = None, None
    for line in text.splitlines():
      head = line.strip()
      if head in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
        section = head
        continue
      if section and head and head[0].isdigit():
        key, _, rest = head.partition(" ")
        self._table(section, int(key), rest)
        continue
      section = None
      if line and not line.startswith(" ") and "{" in line and ("->" in line or "ENTRY" in line):
        current = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
        self.computations[current] = []
        continue
      m = _INSTR.match(line)
      if m:
        self.instructions[m.group(1)] = line
        if current is not None:
          self.computations[current].append(line)

  def _table(self, section: str, key: int, rest: str) -> None:
    if section == "FileNames":
      self.files[key] = rest.strip('"')
    elif section == "FunctionNames":
      self.functions[key] = rest.strip('"')
    else:
      fields = dict(re.findall(r"(\w+)=(\d+)", rest))
      (self.locations if section == "FileLocations" else self.frames)[key] = {
          k: int(v) for k, v in fields.items()}

  def source(self, line: str, skip_generic: bool = False) -> str:
    """The innermost dynrefer_jax file:line (function) on the instruction's stack (with
    skip_generic, the innermost outside the shared building blocks), else its op_name's last
    components."""
    m = _FRAME_ID.search(line)
    seen = set()
    frame = int(m.group(1)) if m else 0
    # XLA's text prints each frame's parent one above its key (a root then points at itself):
    # seen on jax 0.10.2 (Dense → Mlp → Block → ... once shifted). Detected, not assumed.
    shift = self._parent_shift()
    while frame and frame not in seen and frame in self.frames:
      seen.add(frame)
      loc = self.locations.get(self.frames[frame].get("file_location_id", 0), {})
      path = self.files.get(loc.get("file_name_id", 0), "")
      if _OWN in path:
        rel = path[path.index(_OWN) + len(_OWN):]
        if not (skip_generic and rel in _GENERIC):
          fn = self.functions.get(loc.get("function_name_id", 0), "?")
          return f"{rel}:{loc.get('line', 0)} ({fn})"
      frame = self.frames[frame].get("parent_frame_id", 0) - shift
    op = _OP_NAME.search(line)
    return "/".join(op.group(1).split("/")[-2:]) if op else "?"

  def _parent_shift(self) -> int:
    if not hasattr(self, "_shift"):
      self._shift = int(any(f.get("parent_frame_id") == k for k, f in self.frames.items()))
    return self._shift

  def kind(self, name: str) -> str:
    line = self.instructions.get(name, "")
    m = _INSTR.match(line)
    if not m:
      return "?"
    opcode = m.group(3)
    if opcode == "custom-call":
      target = _CUSTOM_TARGET.search(line)
      target = target.group(1) if target else ""
      if "cublas" in target.lower() and "gemm" in target.lower():
        return "gemm (cuBLAS)"
      if "cudnn" in target.lower() and ("fmha" in target.lower() or "attention" in target.lower()):
        return "attention (cuDNN)"
      return f"custom-call {target}"
    if opcode == "fusion":
      fk = _FUSION_KIND.search(line)
      fk = fk.group(1) if fk else ""
      backend = line[line.find("backend_config"):] if "backend_config" in line else ""
      if "__triton_gemm" in backend or "triton_gemm" in backend:
        return "gemm (Triton)"
      if "__cublas" in backend or "cublas" in backend:
        return "gemm (cuBLAS)"
      if "__cudnn" in backend:
        return "cuDNN fusion"
      if "__triton" in backend:
        return "Triton fusion"
      calls = _CALLS.search(line)
      body = self.computations.get(calls.group(1), []) if calls else []
      ops = {(_INSTR.match(x).group(3) if _INSTR.match(x) else "") for x in body}
      if "dot" in ops or "convolution" in ops:
        return f"gemm (fusion {fk})"
      if fk == "kInput" or "reduce" in ops:
        return "reduction fusion"
      if ops <= {"parameter", "copy", "transpose", "bitcast", "tuple", "get-tuple-element"}:
        return "copy/transpose fusion"
      return f"elementwise fusion ({fk})"
    if opcode in ("dot", "convolution"):
      return "gemm (XLA)"
    if opcode in ("copy", "transpose", "copy-start", "copy-done"):
      return "copy/transpose"
    if opcode in ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                  "collective-permute", "all-reduce-start", "all-gather-start"):
      return "collective"
    return opcode


def _trace_files(path: str) -> list[str]:
  found = sorted(glob.glob(os.path.join(path, "**", "*.trace.json.gz"), recursive=True))
  if not found:
    raise SystemExit(f"error: no *.trace.json.gz under {path}")
  return found[-1:]


def device_events(trace_path: str) -> list[tuple[str, float]]:
  """(hlo op or kernel name, microseconds) of every device event in the trace."""
  with gzip.open(trace_path, "rt", encoding="utf-8") as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  procs, threads = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      procs[e["pid"]] = e["args"]["name"]
    if e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e["pid"], e.get("tid"))] = e["args"]["name"]
  gpu = {p for p, n in procs.items() if "GPU" in n or "/device:" in n}
  out = []
  for e in events:
    if e.get("ph") != "X" or "dur" not in e:
      continue
    args = e.get("args", {}) or {}
    if gpu:
      if e["pid"] not in gpu or "Stream" not in threads.get((e["pid"], e.get("tid")), "Stream"):
        continue
      out.append((args.get("hlo_op") or e["name"], float(e["dur"])))
    else:   # a CPU trace: executed HLO ops are named events on XLA's threads
      thread = threads.get((e["pid"], e.get("tid")), "")
      name = e["name"]
      if "XLA" in thread and not name.startswith(("end: ", "Thunk", "Threadpool", "$")):
        out.append((name, float(e["dur"])))
  return out


def summarize(events, hlo: Hlo | None, calls: int, top: int) -> str:
  total = sum(d for _, d in events) or 1.0
  by_kind, by_source, by_op = (collections.Counter() for _ in range(3))
  for name, dur in events:
    kind = hlo.kind(name) if hlo else "?"
    line = hlo.instructions.get(name, "") if hlo else ""
    src = hlo.source(line) if hlo else "?"
    by_kind[kind] += dur
    by_source[(hlo.source(line, skip_generic=True) if hlo else "?").split(":")[0]] += dur
    by_op[(name, kind, src)] += dur
  ms = lambda us: us / 1e3 / calls
  lines = [f"Device busy time per call: {ms(total):.2f} ms ({len(events) // max(calls, 1)} events "
           "per call)", "", "| kind | ms per call | share |", "|---|---|---|"]
  lines += [f"| {k} | {ms(v):.2f} | {v / total:.1%} |" for k, v in by_kind.most_common()]
  lines += ["", "| source file | ms per call | share |", "|---|---|---|"]
  lines += [f"| {k} | {ms(v):.2f} | {v / total:.1%} |" for k, v in by_source.most_common()]
  lines += ["", f"Top {top} ops:", "", "| op | kind | source | ms per call | share |",
            "|---|---|---|---|---|"]
  lines += [f"| {n} | {k} | {s} | {ms(v):.3f} | {v / total:.1%} |"
            for (n, k, s), v in by_op.most_common(top)]
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python tools/profile_summary.py", description=__doc__.split("\n")[0])
  p.add_argument("profile", help="a profile directory of one mode (DIR/train), or profile.tgz")
  p.add_argument("--hlo", default="", help="the mode's optimised HLO text (DIR/train.hlo.txt); "
                 "default: <profile>.hlo.txt beside the directory")
  p.add_argument("--mode", default="train", help="with a .tgz: which mode's profile (train, caption)")
  p.add_argument("--calls", type=int, default=2, help="calls the trace holds (benchmark: 2)")
  p.add_argument("--top", type=int, default=25)
  a = p.parse_args(argv)
  path = a.profile
  if path.endswith((".tgz", ".tar.gz")):
    tmp = tempfile.mkdtemp(prefix="profile_summary_")
    with tarfile.open(path) as tar:
      tar.extractall(tmp, filter="data")
    root = os.path.join(tmp, "profile")
    path = os.path.join(root, a.mode)
    a.hlo = a.hlo or os.path.join(root, f"{a.mode}.hlo.txt")
  hlo_path = a.hlo or path.rstrip("/") + ".hlo.txt"
  if not os.path.isdir(path):
    print(f"error: no profile directory {path}", file=sys.stderr)
    return 2
  hlo = None
  if os.path.exists(hlo_path):
    with open(hlo_path, encoding="utf-8") as f:
      hlo = Hlo(f.read())
  events = device_events(_trace_files(path)[0])
  if not events:
    print(f"error: the trace under {path} has no device events", file=sys.stderr)
    return 1
  print(summarize(events, hlo, a.calls, a.top))
  return 0


if __name__ == "__main__":
  sys.exit(main())
