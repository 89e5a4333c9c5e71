"""Tests for clipcrop_jax.sharding (rules, mesh shapes); multi-device runs are in test_train."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from clipcrop_jax import sharding


def test_make_mesh_shapes_and_errors():
  mesh = sharding.make_mesh((-1, 1))
  assert mesh.axis_names == ('data', 'model')
  assert mesh.shape['data'] == jax.device_count()
  with pytest.raises(ValueError, match='mesh_shape'):
    sharding.make_mesh((-1, -1))
  with pytest.raises(ValueError, match='needs'):
    sharding.make_mesh((jax.device_count() + 1, 1))


def test_spec_shard_largest_divisible_axis():
  assert sharding._spec('shard_largest', (8, 12), 4) == P(None, 'model')
  assert sharding._spec('shard_largest', (12, 8), 4) == P('model', None)
  assert sharding._spec('shard_largest', (7, 9), 4) == P()  # nothing divisible: replicate
  assert sharding._spec('replicate', (8, 12), 4) == P()
  assert sharding._spec('shard_largest', (8, 12), 1) == P()


def test_tree_shardings_first_rule_wins():
  mesh = sharding.make_mesh((-1, 1))
  tree = {'owlvit': {'kernel': np.zeros((4, 4))}, 'decoder': {'bias': np.zeros(4)}}
  out = sharding.tree_shardings(tree, mesh, (('owlvit', 'shard_largest'), ('.*', 'replicate')))
  assert out['decoder']['bias'].spec == P()
  with pytest.raises(ValueError, match='kind'):
    sharding.tree_shardings(tree, mesh, (('.*', 'fsdp'),))
  with pytest.raises(ValueError, match='regex'):
    sharding.tree_shardings(tree, mesh, (('(', 'replicate'),))
