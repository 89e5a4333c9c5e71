"""Tests for training.matching: SciPy optimum, padding, empty inputs, hand costs, no grad."""

from __future__ import annotations

import functools
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from clipcrop_jax.training import matching

REPO = pathlib.Path(__file__).resolve().parents[1]
_hungarian = jax.jit(matching.hungarian_matching)


def _random_boxes(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
  """shape + (4,) valid xyxy boxes inside [0, 1]."""
  lo = rng.uniform(0.0, 0.5, shape + (2,))
  hi = lo + rng.uniform(0.05, 0.5, shape + (2,))
  return np.concatenate([lo, hi], axis=-1).astype(np.float32)


def _assignment_cost(cost: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> float:
  return float(np.sum(cost.astype(np.float64)[rows, cols]))


def _check_one_to_one(pred_idx: np.ndarray, target_idx: np.ndarray, m: int, n: int) -> None:
  assert len(set(pred_idx.tolist())) == len(pred_idx) and np.all((0 <= pred_idx) & (pred_idx < m))
  assert len(set(target_idx.tolist())) == len(target_idx)
  assert np.all((0 <= target_idx) & (target_idx < n))


@pytest.mark.parametrize('m,n', [(5, 5), (7, 4), (4, 7)])
def test_matches_scipy_optimum(m, n):
  rng = np.random.default_rng(m * 10 + n)
  cost = rng.normal(size=(3, m, n)).astype(np.float32)
  mask = np.ones((3, n), bool)
  pred_idx, target_idx, valid = map(np.asarray, _hungarian(jnp.asarray(cost), mask))
  k = min(m, n)
  assert pred_idx.shape == target_idx.shape == valid.shape == (3, k)
  assert pred_idx.dtype == target_idx.dtype == np.int32 and valid.dtype == bool
  assert valid.all()
  for b in range(3):
    _check_one_to_one(pred_idx[b], target_idx[b], m, n)
    rows, cols = linear_sum_assignment(cost[b].astype(np.float64))
    np.testing.assert_allclose(
        _assignment_cost(cost[b], pred_idx[b], target_idx[b]),
        _assignment_cost(cost[b], rows, cols),
        atol=1e-5,
    )


def test_ties_give_an_optimal_assignment():
  cost = np.zeros((1, 4, 3), np.float32)
  result = _hungarian(jnp.asarray(cost), np.ones((1, 3), bool))
  pred_idx, target_idx, valid = map(np.asarray, result)
  _check_one_to_one(pred_idx[0], target_idx[0], 4, 3)
  assert valid.all() and pred_idx.shape == (1, 3)


@pytest.mark.parametrize('m,n,num_real', [(6, 8, 3), (6, 8, 6), (4, 8, 7), (8, 5, 3)])
def test_padding(m, n, num_real):
  rng = np.random.default_rng(num_real + 100 * m)
  batch = 3
  cost = rng.normal(size=(batch, m, n)).astype(np.float32) * 3
  mask = np.zeros((batch, n), bool)
  for b in range(batch):  # Real targets at random positions.
    mask[b, rng.choice(n, num_real, replace=False)] = True
  padded_cost = np.where(mask[:, None, :], cost, matching.COST_UPPER_BOUND).astype(np.float32)
  pred_idx, target_idx, valid = map(np.asarray, _hungarian(jnp.asarray(padded_cost), mask))
  for b in range(batch):
    _check_one_to_one(pred_idx[b], target_idx[b], m, n)
    np.testing.assert_array_equal(valid[b], mask[b][target_idx[b]])  # Padding never valid.
    assert valid[b].sum() == min(m, num_real)  # All real matched if they fit, else M of them.
    real_cols = np.flatnonzero(mask[b])
    rows, cols = linear_sum_assignment(cost[b][:, real_cols].astype(np.float64))
    got = _assignment_cost(cost[b], pred_idx[b][valid[b]], target_idx[b][valid[b]])
    np.testing.assert_allclose(got, _assignment_cost(cost[b][:, real_cols], rows, cols), atol=1e-5)


def test_all_padding_row_and_empty_targets():
  cost = np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)
  mask = np.array([[False] * 4, [True, False, True, False]])
  pred_idx, target_idx, valid = map(np.asarray, _hungarian(jnp.asarray(cost), mask))
  assert not valid[0].any() and valid[1].sum() == 2
  _check_one_to_one(pred_idx[0], target_idx[0], 3, 4)

  pred_idx, target_idx, valid = _hungarian(jnp.zeros((2, 3, 0)), jnp.zeros((2, 0), bool))
  assert pred_idx.shape == target_idx.shape == valid.shape == (2, 0)
  pred_idx, target_idx, valid = jax.jit(matching.match)(
      jnp.asarray(_random_boxes(np.random.default_rng(1), (2, 3))),
      jnp.full((2, 3), 0.5),
      jnp.zeros((2, 0, 4)),
      jnp.zeros((2, 0), bool),
  )
  assert pred_idx.shape == (2, 0) and valid.dtype == bool


def test_vmap_over_extra_axis():
  rng = np.random.default_rng(3)
  cost = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
  mask = np.ones((2, 3, 5), bool)
  pred_idx, target_idx, _ = jax.vmap(matching.hungarian_matching)(jnp.asarray(cost), mask)
  for a in range(2):
    for b in range(3):
      rows, cols = linear_sum_assignment(cost[a, b].astype(np.float64))
      np.testing.assert_allclose(
          _assignment_cost(cost[a, b], np.asarray(pred_idx[a, b]), np.asarray(target_idx[a, b])),
          _assignment_cost(cost[a, b], rows, cols),
          atol=1e-5,
      )


def _giou_np(a: np.ndarray, b: np.ndarray) -> float:
  inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
  return inter / union - (hull - union) / hull


def _cxcywh_np(box: np.ndarray) -> np.ndarray:
  return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2, box[2] - box[0], box[3] - box[1]])


def test_match_cost_hand_values():
  preds = np.array([[[0.0, 0.0, 0.5, 0.5], [0.2, 0.1, 0.9, 0.8]]], np.float32)
  quality = np.array([[0.3, 0.8]], np.float32)
  targets = np.array(
      [[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]], np.float32
  )
  mask = np.array([[True, True, False]])
  cost = np.asarray(
      matching.match_cost(
          preds, quality, targets, mask, l1_weight=5.0, giou_weight=2.0, quality_weight=1.5
      )
  )
  assert cost.shape == (1, 2, 3)
  for i in range(2):
    for j in range(2):
      p, t = preds[0, i].astype(np.float64), targets[0, j].astype(np.float64)
      l1 = np.abs(_cxcywh_np(p) - _cxcywh_np(t)).sum()
      expected = 5.0 * l1 - 2.0 * _giou_np(p, t) - 1.5 * quality[0, i]
      np.testing.assert_allclose(cost[0, i, j], expected, atol=1e-5)
  np.testing.assert_array_equal(cost[0, :, 2], matching.COST_UPPER_BOUND)
  # Identical boxes: L1 0, GIoU 1 -> cost = -2 - 1.5 * 0.3.
  np.testing.assert_allclose(cost[0, 0, 0], -2.0 - 1.5 * 0.3, atol=1e-5)


def test_match_cost_non_finite_is_bounded():
  preds = np.array([[[np.nan, 0.0, 0.5, 0.5]]], np.float32)
  cost = matching.match_cost(
      preds, np.ones((1, 1)), np.array([[[0.0, 0.0, 1.0, 1.0]]]), np.ones((1, 1), bool)
  )
  np.testing.assert_array_equal(cost, matching.COST_UPPER_BOUND)


def test_match_picks_the_obvious_pairs():
  targets = np.array(
      [[[0.0, 0.0, 0.4, 0.4], [0.5, 0.5, 1.0, 1.0], [0.1, 0.6, 0.4, 0.9]]], np.float32
  )
  preds = targets[:, [2, 0, 1]] + 0.01  # Prediction i is a slightly shifted target perm[i].
  pred_idx, target_idx, valid = jax.jit(matching.match)(
      preds, jnp.full((1, 3), 0.5), targets, np.array([[True, True, False]])
  )
  pairs = {(int(p), int(t)) for p, t, v in zip(pred_idx[0], target_idx[0], valid[0]) if v}
  assert pairs == {(1, 0), (2, 1)}
  np.testing.assert_array_equal(matching.matched_mask(pred_idx, valid, 3), [[False, True, True]])


def test_gather_and_scatter_helpers():
  x = np.arange(2 * 3 * 4).reshape(2, 3, 4)
  idx = np.array([[2, 0], [1, 1]])
  np.testing.assert_array_equal(matching.gather_matched(x, idx), [x[0, [2, 0]], x[1, [1, 1]]])
  np.testing.assert_array_equal(matching.gather_matched(x[..., 0], idx), [[8, 0], [16, 16]])
  values = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
  placed = matching.scatter_to_preds(
      values, np.array([[2, 0], [1, 0]]), np.array([[True, True], [False, True]]), 3, fill=-1.0
  )
  np.testing.assert_array_equal(placed, [[2.0, -1.0, 1.0], [4.0, -1.0, -1.0]])


def test_no_gradient_through_matching():
  rng = np.random.default_rng(5)
  preds = jnp.asarray(_random_boxes(rng, (2, 4)))
  targets = jnp.asarray(_random_boxes(rng, (2, 3)))
  mask = jnp.array([[True, True, False], [True, True, True]])

  def loss(p):
    pred_idx, target_idx, valid = matching.match(p, jnp.full((2, 4), 0.5), targets, mask)
    diff = matching.gather_matched(p, pred_idx) - matching.gather_matched(targets, target_idx)
    return jnp.sum(jnp.abs(diff) * valid[..., None])

  grad = jax.jit(jax.grad(loss))(preds)
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)
  # The gradient is that of the same loss with the indices frozen.
  pred_idx, target_idx, valid = matching.match(preds, jnp.full((2, 4), 0.5), targets, mask)

  def frozen_loss(p):
    diff = matching.gather_matched(p, pred_idx) - matching.gather_matched(targets, target_idx)
    return jnp.sum(jnp.abs(diff) * valid[..., None])

  np.testing.assert_allclose(grad, jax.grad(frozen_loss)(preds), atol=1e-6)


# ------------------------------------------------------------------------------------------------
# The two solvers ('device': optax under vmap, 'host': SciPy through pure_callback) agree.
# ------------------------------------------------------------------------------------------------

_BOTH = {
    s: jax.jit(functools.partial(matching.hungarian_matching, solver=s)) for s in ('device', 'host')
}


def _real_pairs(pred_idx, target_idx, valid) -> set[tuple[int, int]]:
  return {(int(p), int(t)) for p, t, v in zip(pred_idx, target_idx, valid) if v}


@pytest.mark.parametrize(
    'm,n,num_real',
    [
        (6, 6, 6),  # square, no padding
        (7, 4, 4),  # M > N
        (4, 7, 7),  # M < N
        (6, 9, 3),  # padding, all real fit
        (4, 9, 7),  # padding, more real than predictions
        (8, 5, 2),  # M > N with padding
        (5, 6, 0),  # all padding
    ],
)
def test_device_and_host_solvers_agree(m, n, num_real):
  """Same valid pairs (the optimum is unique for continuous random costs), same real cost (=
  SciPy's on the real columns), padding never valid, under jit and vmap over a layer axis."""
  rng = np.random.default_rng(1000 + 100 * m + 10 * n + num_real)
  layers, batch = 2, 3
  cost = rng.normal(size=(layers, batch, m, n)).astype(np.float32) * 3
  mask = np.zeros((batch, n), bool)
  for b in range(batch):
    mask[b, rng.choice(n, num_real, replace=False)] = True
  cost = np.where(mask[None, :, None, :], cost, matching.COST_UPPER_BOUND).astype(np.float32)
  results = {
      s: [np.asarray(x) for x in jax.vmap(f, in_axes=(0, None))(cost, mask)]
      for s, f in _BOTH.items()
  }
  for layer in range(layers):
    for b in range(batch):
      pairs = {}
      for solver, (pred_idx, target_idx, valid) in results.items():
        pred_idx, target_idx, valid = pred_idx[layer, b], target_idx[layer, b], valid[layer, b]
        assert pred_idx.shape == (min(m, n),) and pred_idx.dtype == np.int32
        _check_one_to_one(pred_idx, target_idx, m, n)
        np.testing.assert_array_equal(valid, mask[b][target_idx])
        assert valid.sum() == min(m, num_real), solver
        # One order for both: valid pairs first, each part by increasing prediction index.
        assert list(valid) == sorted(valid, reverse=True)
        assert all(np.all(np.diff(pred_idx[part]) > 0) for part in (valid, ~valid))
        pairs[solver] = _real_pairs(pred_idx, target_idx, valid)
      assert pairs['device'] == pairs['host']
      real_cols = np.flatnonzero(mask[b])
      rows, cols = linear_sum_assignment(cost[layer, b][:, real_cols].astype(np.float64))
      got = sum(cost[layer, b, p, t] for p, t in pairs['host'])
      np.testing.assert_allclose(
          got, _assignment_cost(cost[layer, b][:, real_cols], rows, cols), atol=1e-4
      )


def test_solver_names():
  assert matching.resolve_solver('device') == 'device'
  assert matching.resolve_solver('host') == 'host'
  assert matching.resolve_solver('auto') == matching.default_solver(jax.default_backend())
  assert matching.default_solver('cpu') == 'host' and matching.default_solver('tpu') == 'device'
  with pytest.raises(ValueError, match="matching solver 'gpu'"):
    matching.hungarian_matching(jnp.zeros((1, 2, 2)), jnp.ones((1, 2), bool), solver='gpu')


def test_host_solver_gives_no_gradient_and_works_under_grad():
  rng = np.random.default_rng(7)
  preds = jnp.asarray(_random_boxes(rng, (2, 5)))
  targets = jnp.asarray(_random_boxes(rng, (2, 4)))
  mask = jnp.array([[True, True, False, True], [True, False, False, False]])

  def loss(p, solver):
    pred_idx, target_idx, valid = matching.match(p, jnp.full((2, 5), 0.5), targets, mask, solver)
    diff = matching.gather_matched(p, pred_idx) - matching.gather_matched(targets, target_idx)
    return jnp.sum(jnp.abs(diff) * valid[..., None])

  grads = {s: jax.jit(jax.grad(loss), static_argnums=1)(preds, s) for s in ('device', 'host')}
  assert np.any(np.asarray(grads['host']) != 0)
  np.testing.assert_allclose(grads['host'], grads['device'], atol=1e-6)


_SHARDED_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from clipcrop_jax.training import matching
assert jax.device_count() == 8, jax.devices()
mesh = Mesh(np.array(jax.devices()), ('data',))
rng = np.random.default_rng(0)
cost = rng.normal(size=(3, 16, 6, 9)).astype(np.float32)
mask = np.arange(9)[None] < rng.integers(0, 9, size=(16,))[:, None]
cost_s = jax.device_put(cost, NamedSharding(mesh, P(None, 'data')))
mask_s = jax.device_put(mask, NamedSharding(mesh, P('data')))
out = {}
for solver in ('device', 'host'):
  f = jax.jit(jax.vmap(lambda c, m: matching.hungarian_matching(c, m, solver), in_axes=(0, None)))
  out[solver] = [np.asarray(x) for x in f(cost_s, mask_s)]
for l in range(3):
  for b in range(16):
    sets = [{(p, t) for p, t, v in zip(*(x[l, b] for x in out[s])) if v} for s in out]
    assert sets[0] == sets[1], (l, b)
print('SHARDED_OK')
"""


def test_host_solver_on_a_batch_sharded_over_eight_devices(tmp_path):
  """pure_callback with a batch-sharded cost on 8 fake CPU devices gives the device result."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'JAX_NUM_CPU_DEVICES': '8', 'PYTHONPATH': str(REPO)}
  out = subprocess.run(
      [sys.executable, '-c', _SHARDED_SCRIPT],
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert out.returncode == 0 and 'SHARDED_OK' in out.stdout, out.stderr[-3000:]


def test_decoder_losses_equal_with_either_solver():
  """The whole set-prediction loss (every decoder layer re-matched, padded crops, an image
  without real crops) and its gradient are the same with the device and the host solver."""
  from clipcrop_jax.training import losses  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(11)
  layers, batch, m, c = 3, 4, 12, 20
  boxes = jnp.asarray(_random_boxes(rng, (layers, batch, m)))
  logits = jnp.asarray(rng.normal(size=(layers, batch, m)).astype(np.float32))
  crops = _random_boxes(rng, (batch, c))
  scores = rng.uniform(1.0, 5.0, size=(batch, c)).astype(np.float32)
  mask = np.arange(c)[None] < np.array([[20], [7], [0], [3]])

  def total(b, l, solver):
    return losses.decoder_losses(b, l, crops, scores, mask, matching_solver=solver)

  fn = jax.jit(jax.value_and_grad(total, argnums=(0, 1), has_aux=True), static_argnums=2)
  (loss_d, terms_d), grads_d = fn(boxes, logits, 'device')
  (loss_h, terms_h), grads_h = fn(boxes, logits, 'host')
  assert float(terms_d['loss_l1_0']) > 0
  np.testing.assert_allclose(loss_h, loss_d, rtol=1e-6)
  for k in terms_d:
    np.testing.assert_allclose(terms_h[k], terms_d[k], rtol=1e-6, atol=1e-7, err_msg=k)
  for g_h, g_d in zip(grads_h, grads_d):
    np.testing.assert_allclose(g_h, g_d, rtol=1e-5, atol=1e-7)
