"""Flax NNX used functionally: modules in, plain pytrees out.

    graphdef, params, axes = split(model)      # params: nested dict of arrays
    out = merge(graphdef, params).method(...)  # inside any jitted function

`params` holds every variable (Params and Tables); `axes` is the same tree with each leaf's
logical axis names (a tuple, `()` for scalars). `partition(params, patterns)` splits a tree by
regular expressions over '/'-joined paths (the trainable/frozen split of the config).
"""

from __future__ import annotations

import re
from typing import Any, Iterable

import jax
from flax import nnx, traverse_util

from dynrefer_jax.models.layers import Table

PyTree = Any


def split(model: nnx.Module) -> tuple[nnx.GraphDef, dict, dict]:
  graphdef, state = nnx.split(model)
  params = state.to_pure_dict()
  flat_state = dict(nnx.to_flat_state(state))
  axes = {}
  for path, var in flat_state.items():
    names = var.get_metadata().get("out_sharding")
    value = var.get_value() if hasattr(var, "get_value") else var.value
    axes[path] = tuple(names) if names is not None else (None,) * len(getattr(value, "shape", ()))
  return graphdef, params, traverse_util.unflatten_dict(axes)


def merge(graphdef: nnx.GraphDef, params: dict) -> nnx.Module:
  return nnx.merge(graphdef, nnx.State(params))


def abstract_split(build_fn) -> tuple[nnx.GraphDef, dict, dict]:
  """Like split(build_fn()) but without allocating: leaves are jax.ShapeDtypeStruct."""
  model = nnx.eval_shape(build_fn)
  return split(model)


def table_paths(model: nnx.Module) -> set[str]:
  """'/'-joined paths of the Table variables (never trainable)."""
  _, tables, _ = nnx.split(model, Table, ...)
  return {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(tables)}


def flatten(tree: dict) -> dict[str, Any]:
  return {"/".join(map(str, k)): v for k, v in traverse_util.flatten_dict(tree).items()}


def unflatten(flat: dict[str, Any]) -> dict:
  return traverse_util.unflatten_dict({tuple(_maybe_int(p) for p in k.split("/")): v
                                       for k, v in flat.items()})


def _maybe_int(s: str):
  return int(s) if s.isdigit() else s


def partition(tree: dict, patterns: Iterable[str], exclude: Iterable[str] = ()) -> tuple[dict, dict]:
  """Splits `tree` into (matching, rest) by regexes searched in each '/'-joined path.

  A leaf matches when any of `patterns` is found in its path and none of `exclude` is.
  """
  patterns = [re.compile(p) for p in patterns]
  exclude = [re.compile(p) for p in exclude]
  match, rest = {}, {}
  for path, leaf in flatten(tree).items():
    hit = any(p.search(path) for p in patterns) and not any(e.search(path) for e in exclude)
    (match if hit else rest)[path] = leaf
  return unflatten(match), unflatten(rest)


def combine(*trees: dict) -> dict:
  """Inverse of partition: merges disjoint trees."""
  flat = {}
  for t in trees:
    for k, v in flatten(t).items():
      if k in flat:
        raise ValueError(f"parameter {k} appears in more than one tree")
      flat[k] = v
  return unflatten(flat)


def count(tree: PyTree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))
