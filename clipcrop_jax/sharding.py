"""Mesh and sharding rules: one `jax.sharding.Mesh` with axes ('data', 'model'), no pmap.

The batch is sharded on 'data'. Parameters and optimizer state follow regex rules matched (with
`re.search`, first match wins) against '/'-joined tree paths, e.g. 'params/owlvit/backbone/...'
or 'opt_state/.../mu/decoder/...' (an optimizer-state leaf carries its parameter's path, so one
rule covers both):

  'replicate'      every device holds the whole array (the default; data parallelism).
  'shard_largest'  the largest axis divisible by the 'model' axis size is split over 'model'
                   (tensor sharding of big encoder kernels, e.g. `('owlvit/.*kernel', ...)`);
                   arrays with no such axis are replicated.

The same config runs on 1 CPU, 8 GPUs or a TPU slice: `mesh_shape` (-1 = all remaining devices)
adapts to `jax.devices()`, which spans every process after `jax.distributed.initialize()`.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'model')
RULE_KINDS = ('replicate', 'shard_largest')


def make_mesh(
    mesh_shape: Sequence[int] = (-1, 1), devices: Optional[Sequence[jax.Device]] = None
) -> Mesh:
  """A ('data', 'model') mesh over `devices` (default: all devices of all processes).

  Args:
    mesh_shape: (data, model) sizes; one entry may be -1 (= the remaining devices).
    devices: devices to use (default `jax.devices()`).

  Raises:
    ValueError: the shape does not match the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = [int(s) for s in mesh_shape]
  if len(shape) != 2 or shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(
        f'sharding.mesh_shape={tuple(mesh_shape)}: expected (data, model) sizes, '
        'at most one of them -1'
    )
  if -1 in shape:
    known = int(np.prod([s for s in shape if s != -1]))
    if len(devices) % known:
      raise ValueError(
          f'sharding.mesh_shape={tuple(mesh_shape)} does not divide ' f'{len(devices)} devices'
      )
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(
        f'sharding.mesh_shape={tuple(mesh_shape)} needs {int(np.prod(shape))} '
        f'devices, found {len(devices)}'
    )
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def path_str(path: Sequence[Any]) -> str:
  """'/'-joined names of a `jax.tree_util` key path."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def _spec(kind: str, shape: Sequence[int], model_size: int) -> P:
  if kind == 'replicate' or model_size == 1:
    return P()
  candidates = [(size, axis) for axis, size in enumerate(shape) if size % model_size == 0]
  if not candidates:
    return P()
  _, axis = max(candidates)
  spec = [None] * len(shape)
  spec[axis] = 'model'
  return P(*spec)


def check_rules(rules: Sequence[Sequence[str]]) -> list[tuple[re.Pattern, str]]:
  """Compiles [(regex, kind), ...]; ValueError naming a bad entry."""
  compiled = []
  for i, rule in enumerate(rules):
    if len(rule) != 2:
      raise ValueError(f'sharding.rules[{i}]={rule!r}: expected (regex, kind)')
    pattern, kind = rule
    if kind not in RULE_KINDS:
      raise ValueError(f'sharding.rules[{i}]: kind {kind!r}; expected one of {RULE_KINDS}')
    try:
      compiled.append((re.compile(pattern), kind))
    except re.error as e:
      raise ValueError(f'sharding.rules[{i}]: bad regex {pattern!r}: {e}') from e
  return compiled


def tree_shardings(
    tree: Any, mesh: Mesh, rules: Sequence[Sequence[str]] = (('.*', 'replicate'),)
) -> Any:
  """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs) by the rules."""
  compiled = check_rules(rules)
  model_size = mesh.shape['model']

  def leaf_sharding(path, leaf):
    name = path_str(path)
    kind = next((k for pattern, k in compiled if pattern.search(name)), 'replicate')
    return NamedSharding(mesh, _spec(kind, getattr(leaf, 'shape', ()), model_size))

  return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis on 'data', the rest replicated."""
  return NamedSharding(mesh, P('data'))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def mesh_of(tree: Any) -> Mesh:
  """The mesh the (first) array of `tree` is sharded on, e.g. a TrainState's parameters."""
  return jax.tree_util.tree_leaves(tree)[0].sharding.mesh


def process_batch_size(global_batch_size: int, field: str = 'batch_size') -> int:
  """This process's share of a global batch; ValueError naming `field` when it does not divide.

  Every process feeds its own `global_batch_size // jax.process_count()` examples of each
  global batch (`input_pipeline.to_global_batches`).
  """
  n = jax.process_count()
  if global_batch_size % n:
    raise ValueError(f'{field}={global_batch_size} is not divisible by the {n} processes')
  return global_batch_size // n
