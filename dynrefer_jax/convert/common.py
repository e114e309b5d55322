"""The declarative weight-conversion engine.

A converter is a table of `Rule(source_regex, target_template, transform)`. The engine reads a
source state dict (numpy arrays), maps every key through the first rule whose regex matches it in
full, applies the named transform, and checks the result against the target's expected shapes.
It fails with the complete list of problems: source keys no rule maps (unmapped), source keys
mapped to nothing the target has (unused), target keys nothing fills (missing), keys filled twice,
and shape mismatches. Nothing is unpickled: `.pth` files go through `torch.load(weights_only=True)`.

    rules = [Rule(r"blocks\\.(\\d+)\\.attn\\.proj\\.weight", "blocks/{0}/attn/out/kernel", "linear")]
    flat = convert(state_dict, rules, expected={"blocks/0/attn/out/kernel": (8, 8), ...})
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable, Iterable, Mapping

import numpy as np


class ConversionError(ValueError):
  """Raised with the full list of unmapped, unused, missing and mis-shaped keys."""


def _linear(w: np.ndarray) -> np.ndarray:
  """PyTorch Linear weight [out, in] → our kernel [in, out]."""
  return np.ascontiguousarray(w.T)


def _conv2d(w: np.ndarray) -> np.ndarray:
  """PyTorch Conv2d weight [out, in/groups, kh, kw] → [kh, kw, in/groups, out]."""
  return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def _squeeze0(w: np.ndarray) -> np.ndarray:
  """Drops a leading singleton batch axis ([1, N, C] → [N, C])."""
  return w.reshape(w.shape[1:]) if w.ndim and w.shape[0] == 1 else w


TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda w: w,
    "linear": _linear,
    "conv2d": _conv2d,
    "squeeze0": _squeeze0,
    "scalar": lambda w: np.asarray(w).reshape(()),
}


def register_transform(name: str, fn: Callable[[np.ndarray], np.ndarray]) -> None:
  if name in TRANSFORMS:
    raise ValueError(f"transform {name!r} already registered")
  TRANSFORMS[name] = fn


@dataclasses.dataclass(frozen=True)
class Rule:
  """Maps source keys matching `source` (a full-match regex) to `target` ('/'-joined path;
  `{0}`, `{1}`, ... are the regex groups). `target=None` drops the key on purpose (a buffer).
  `transform` is a name in TRANSFORMS or a callable."""
  source: str
  target: str | None
  transform: str | Callable[[np.ndarray], np.ndarray] = "identity"


def convert(state: Mapping[str, np.ndarray], rules: Iterable[Rule],
            expected: Mapping[str, tuple[int, ...]] | None = None,
            *, source_name: str = "checkpoint") -> dict[str, np.ndarray]:
  """Returns {target path: array}. Raises ConversionError listing every problem at once."""
  compiled = [(re.compile(r.source), r) for r in rules]
  out: dict[str, np.ndarray] = {}
  unmapped, duplicated, unused, misshaped = [], [], [], []
  seen: set[str] = set()
  for key in sorted(state):
    for regex, rule in compiled:
      m = regex.fullmatch(key)
      if m is None:
        continue
      if rule.target is None:
        break
      target = rule.target.format(*m.groups())
      fn = rule.transform if callable(rule.transform) else TRANSFORMS[rule.transform]
      value = fn(np.asarray(state[key]))
      if target in seen:
        duplicated.append(f"{key} -> {target}")
      elif expected is not None and target not in expected:
        unused.append(f"{key} -> {target}")
      elif expected is not None and tuple(value.shape) != tuple(expected[target]):
        misshaped.append(f"{key} -> {target}: got {tuple(value.shape)}, "
                         f"expected {tuple(expected[target])}")
      else:
        out[target] = value
      seen.add(target)
      break
    else:
      unmapped.append(key)
  missing = sorted(set(expected) - seen) if expected is not None else []
  problems = []
  for title, items in (("unmapped source keys", unmapped), ("unused source keys", unused),
                       ("keys mapped twice", duplicated), ("mis-shaped keys", misshaped),
                       ("missing target keys", missing)):
    if items:
      problems.append(f"{len(items)} {title}: " + ", ".join(items))
  if problems:
    raise ConversionError(f"cannot convert {source_name}: " + "; ".join(problems))
  return out


def load_state_dict(path: str | os.PathLike, key: str | None = None) -> dict[str, np.ndarray]:
  """Reads a `.safetensors` file, a directory of them, or a `.pth`/`.pt`/`.bin` torch file
  (weights only: `torch.load(weights_only=True)`; no arbitrary unpickling). If the torch file is
  a dict holding `key` (e.g. "model" for LAVIS checkpoints), that entry is returned."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"weights not found: {path}")
  if os.path.isdir(path):
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
      raise FileNotFoundError(f"no .safetensors files in {path}")
    state: dict[str, np.ndarray] = {}
    for f in files:
      state.update(load_state_dict(os.path.join(path, f)))
    return state
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    try:
      return dict(load_file(path))
    except Exception:  # bf16 tensors cannot be represented by numpy: read through torch.
      from safetensors.torch import load_file as load_torch  # pylint: disable=import-outside-toplevel
      return {k: _to_numpy(v) for k, v in load_torch(path).items()}
  import torch  # pylint: disable=import-outside-toplevel
  obj = torch.load(path, map_location="cpu", weights_only=True)
  if key is not None and isinstance(obj, dict) and key in obj:
    obj = obj[key]
  elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
    obj = obj["model"]
  return {k: _to_numpy(v) for k, v in obj.items() if hasattr(v, "shape")}


def _to_numpy(t) -> np.ndarray:
  import torch  # pylint: disable=import-outside-toplevel
  if isinstance(t, torch.Tensor):
    if t.dtype == torch.bfloat16:
      t = t.float()
    return t.detach().cpu().numpy()
  return np.asarray(t)


def expected_shapes(params: dict) -> dict[str, tuple[int, ...]]:
  """{'/'-joined path: shape} of a (possibly abstract) parameter tree."""
  from dynrefer_jax import functional  # pylint: disable=import-outside-toplevel
  return {k: tuple(v.shape) for k, v in functional.flatten(params).items()}
