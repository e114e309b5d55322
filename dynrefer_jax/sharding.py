"""From logical axis names to mesh shardings.

Model code names logical axes (`embed`, `mlp`, `heads`, `batch`, ...). The config holds the rules
(`config.sharding.rules`: a list of (logical, mesh axis or tuple of mesh axes or None)) and the
mesh shape (`config.sharding.mesh`: {'data': n, 'fsdp': n, 'tensor': n}; -1 = all remaining
devices). A dimension whose size the mesh axes do not divide is replicated instead, so toy models
run on any mesh.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# The original's data parallelism is ('data', 'fsdp'): the batch is split over both.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("seq", None),
    ("query", None),
    ("conv", None),
    ("views", None),
    ("roi", None),
)

_CONTEXT: contextvars.ContextVar = contextvars.ContextVar("dynrefer_sharding", default=None)


def make_mesh(shape: dict[str, int] | Sequence[int], devices=None) -> Mesh:
  """A mesh with axes ('data', 'fsdp', 'tensor'); one entry may be -1 (all remaining devices)."""
  devices = list(jax.devices() if devices is None else devices)
  if isinstance(shape, dict):
    dims = [int(shape.get(a, 1)) for a in MESH_AXES]
  else:
    dims = [int(d) for d in shape]
  if dims.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dims}")
  if -1 in dims:
    rest = math.prod(d for d in dims if d != -1)
    if len(devices) % rest:
      raise ValueError(f"{len(devices)} devices cannot form mesh {dims}")
    dims[dims.index(-1)] = len(devices) // rest
  if math.prod(dims) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, dims))} needs {math.prod(dims)} devices, "
                     f"have {len(devices)}")
  return jax.make_mesh(tuple(dims), MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def _mesh_axes_for(name: str | None, rules: dict) -> tuple[str, ...]:
  if name is None:
    return ()
  if name not in rules:
    raise KeyError(f"no sharding rule for logical axis {name!r}; add it to config.sharding.rules")
  target = rules[name]
  if target is None:
    return ()
  return (target,) if isinstance(target, str) else tuple(target)


def spec_for(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules) -> P:
  """The PartitionSpec for an array with these logical axis names and shape."""
  rules = dict(rules)
  used: set[str] = set()
  parts = []
  for name, dim in zip(names, shape):
    axes = tuple(a for a in _mesh_axes_for(name, rules) if a not in used and mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in axes) if axes else 1
    if not axes or dim % size:
      parts.append(None)
      continue
    used.update(axes)
    parts.append(axes[0] if len(axes) == 1 else axes)
  return P(*parts)


def fsdp_fallback(spec: P, shape: Sequence[int], itemsize: int, mesh: Mesh,
                  min_bytes: int) -> P:
  """FSDP for arrays the rules leave without 'fsdp': a leaf of at least `min_bytes` whose spec
  does not use 'fsdp' gets its largest free dimension that 'fsdp' divides sharded over it.
  min_bytes <= 0 turns this off."""
  n = mesh.shape.get("fsdp", 1)
  if min_bytes <= 0 or n <= 1 or math.prod(shape) * itemsize < min_bytes:
    return spec
  parts = list(spec) + [None] * (len(shape) - len(spec))
  used = {a for p in parts if p is not None for a in ((p,) if isinstance(p, str) else p)}
  if "fsdp" in used:
    return spec
  free = [i for i, (p, d) in enumerate(zip(parts, shape)) if p is None and d % n == 0]
  if not free:
    return spec
  parts[max(free, key=lambda i: shape[i])] = "fsdp"
  return P(*parts)


def tree_shardings(tree: Any, axes: Any, mesh: Mesh, rules, *, fsdp_min_bytes: int = 0) -> Any:
  """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs) given its axes tree.

  fsdp_min_bytes > 0: leaves of at least that many bytes are also sharded over 'fsdp' when the
  rules alone would leave them unsharded on it (`fsdp_fallback`).
  """
  def one(leaf, names):
    shape = tuple(getattr(leaf, "shape", ()))
    names = tuple(names) if names else (None,) * len(shape)
    spec = spec_for(names, shape, mesh, rules)
    itemsize = np.dtype(getattr(leaf, "dtype", np.float32)).itemsize
    return NamedSharding(mesh, fsdp_fallback(spec, shape, itemsize, mesh, fsdp_min_bytes))
  return jax.tree.map(one, tree, axes, is_leaf=lambda x: isinstance(x, tuple))


def batch_sharding(mesh: Mesh, ndim: int, rules) -> NamedSharding:
  """Batch-major arrays: leading axis over the 'batch' rule, the rest replicated."""
  axes = _mesh_axes_for("batch", dict(rules))
  axes = tuple(a for a in axes if mesh.shape[a] > 1)
  lead = None if not axes else (axes[0] if len(axes) == 1 else axes)
  return NamedSharding(mesh, P(lead, *([None] * (ndim - 1))))


def bytes_per_device(tree: Any) -> dict:
  """{device: bytes} held by the shards of a tree of jax.Arrays."""
  out: dict = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
  return out


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules):
  """Within this context, `constrain` places activations on `mesh` by `rules`."""
  token = _CONTEXT.set((mesh, tuple(rules)))
  try:
    yield
  finally:
    _CONTEXT.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """A sharding constraint on an activation by logical names; a no-op outside a context."""
  ctx = _CONTEXT.get()
  if ctx is None:
    return x
  mesh, rules = ctx
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec_for(names, x.shape, mesh, rules)))


def host_to_global(batch: dict[str, np.ndarray], mesh: Mesh, rules) -> dict[str, jax.Array]:
  """Per-process local batches → global arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v), rules),
                                                    np.asarray(v))
          for k, v in batch.items()}
