"""Flax NNX used functionally: modules in, plain pytrees out.

    graphdef, params, axes = split(model)      # params: nested dict of arrays
    out = merge(graphdef, params).method(...)  # inside any jitted function

`params` holds every variable (Params and Tables); `axes` is the same tree with each leaf's
logical axis names (a tuple, `()` for scalars). `partition(params, patterns)` splits a tree by
regular expressions over '/'-joined paths (the trainable/frozen split of the config).
"""

from __future__ import annotations

import functools
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


def merge(graphdef: nnx.GraphDef, params: dict, groups=()) -> nnx.Module:
  """The module from its parameters; `groups`: the stacks held stacked in `params`
  (stack_layers), sliced back to layers (inside jit: no copy, see unstack_layers)."""
  if groups:
    params = unstack_layers(params, groups)
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


# --- per-layer weights held stacked -------------------------------------------------------------

STACKED = "stacked"  # the path component that replaces the layer index of a stacked group
_LAYER = re.compile(r"^(.*?)/(\d+)/(.+)$")
_STACKED = re.compile(rf"^(.*?)/{STACKED}/(.+)$")


def layer_groups(tree: dict) -> tuple[tuple[str, int], ...]:
  """The stacks of `tree`: ((prefix, n), ...) for every `prefix/{0..n-1}/...` (the first integer
  path component) whose n >= 2 layers hold the same leaves (paths, shapes and dtypes)."""
  layers_of: dict[str, dict[int, dict]] = {}
  for path, leaf in flatten(tree).items():
    m = _LAYER.match(path)
    if m:
      layers_of.setdefault(m[1], {}).setdefault(int(m[2]), {})[m[3]] = (
          tuple(leaf.shape), str(leaf.dtype))
  return tuple(sorted(
      (prefix, len(ls)) for prefix, ls in layers_of.items()
      if len(ls) >= 2 and sorted(ls) == list(range(len(ls)))
      and all(ls[i] == ls[0] for i in range(len(ls)))))


def stack_layers(tree: dict, groups, leaf_fn=None) -> dict:
  """Each group's leaves `prefix/{i}/rest` → one leaf `prefix/stacked/rest` with a leading layer
  axis: `leaf_fn(leaves in layer order)`, by default jnp.stack (see stacked_sharding and
  stacked_abstract for trees of shardings and of ShapeDtypeStructs). Other leaves are kept."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  leaf_fn = leaf_fn or jnp.stack
  prefixes = dict(groups)
  out, pending = {}, {}
  for path, leaf in flatten(tree).items():
    m = _LAYER.match(path)
    if m and m[1] in prefixes:
      pending.setdefault(f"{m[1]}/{STACKED}/{m[3]}", {})[int(m[2])] = leaf
    else:
      out[path] = leaf
  for path, by_layer in pending.items():
    out[path] = leaf_fn([by_layer[i] for i in range(len(by_layer))])
  return unflatten(out)


def unstack_layers(tree: dict, groups) -> dict:
  """Inverse of stack_layers: layer i's leaves are `stacked[i]`. Inside jit the scan over the
  layers (layers.call_blocks) stacks these slices again, which XLA folds back into the stacked
  array: no per-step copy of the weights."""
  counts = dict(groups)
  out = {}
  for path, leaf in flatten(tree).items():
    m = _STACKED.match(path)
    if m and m[1] in counts:
      for i in range(counts[m[1]]):
        out[f"{m[1]}/{i}/{m[2]}"] = leaf[i]
    else:
      out[path] = leaf
  return unflatten(out)


def stack_held(tree: dict, shardings, *, donate: bool = False) -> tuple[dict, Any, tuple]:
  """(tree, shardings, groups) with every uniform stack of `tree` (layer_groups) held stacked.
  Arrays are stacked leaf by leaf, jitted, onto the stacked shardings; `donate`: each leaf's
  per-layer arrays are deleted once it is stacked, so the transient is one stacked leaf, not a
  second copy of the tree (XLA cannot alias them to an output of another shape, so jit's
  donation would free nothing). A tree of ShapeDtypeStructs (an abstract state) gets stacked
  abstract leaves. With no stack: the arguments unchanged and groups ()."""
  groups = layer_groups(tree)
  if not groups:
    return tree, shardings, ()
  stacked_shardings = stack_layers(shardings, groups, leaf_fn=stacked_sharding)
  leaves = jax.tree.leaves(tree)
  if leaves and isinstance(leaves[0], jax.ShapeDtypeStruct):
    return stack_layers(tree, groups, leaf_fn=stacked_abstract), stacked_shardings, groups
  flat_shardings = flatten(stacked_shardings)
  held = {}
  # leaf_fn=list: each stacked path holds its per-layer arrays in layer order, stacked here.
  for path, leaf in flatten(stack_layers(tree, groups, leaf_fn=list)).items():
    if not isinstance(leaf, list):
      held[path] = leaf
      continue
    held[path] = _stack_onto(leaf, flat_shardings[path])
    if donate:
      for a in leaf:
        a.delete()
  return unflatten(held), stacked_shardings, groups


@functools.partial(jax.jit, static_argnums=1)
def _stack_onto(arrays: list, sharding) -> jax.Array:
  return jax.lax.with_sharding_constraint(jax.numpy.stack(arrays), sharding)


def stacked_sharding(shardings: list) -> jax.sharding.NamedSharding:
  """stack_layers' leaf_fn for shardings: layer 0's, with the new layer axis unsharded."""
  first = shardings[0]
  return jax.sharding.NamedSharding(first.mesh, jax.sharding.PartitionSpec(None, *first.spec))


def stacked_abstract(leaves: list) -> jax.ShapeDtypeStruct:
  """stack_layers' leaf_fn for ShapeDtypeStructs (with or without shardings)."""
  first = leaves[0]
  sh = getattr(first, "sharding", None)
  return jax.ShapeDtypeStruct((len(leaves),) + tuple(first.shape), first.dtype,
                              sharding=stacked_sharding([sh]) if sh is not None else None)


def count(tree: PyTree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))
