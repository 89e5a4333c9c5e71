"""Hungarian matching of predicted crops to annotated crops (DETR-style set prediction).

All boxes are xyxy (x0, y0, x1, y1) normalised to [0, 1]. Shapes use B = batch, M = predictions
per image, N = target slots per image (real targets plus padding, marked by `target_mask`) and
K = min(M, N) matched pairs per image. Everything is jit-able with static shapes and carries no
gradient. The assignment is solved by one of `SOLVERS` (Scenic offers both kinds):
  'device'  `optax.assignment.hungarian_algorithm` under `jax.vmap`, inside the compiled step;
  'host'    `scipy.optimize.linear_sum_assignment` on the host through `jax.pure_callback`, one
            call per step for all images (and all decoder layers when vmapped over them);
  'auto'    `default_solver()`: chosen per platform by measurement (see there).
Both solve the same padded problem (`_solvable_cost`), so they return the same assignment (same
total cost; the same pairs whenever the optimum is unique).

The matching cost follows DETR / Scenic, with the class term replaced by the predicted quality:
  cost = l1_weight * L1(cxcywh) - giou_weight * GIoU - quality_weight * quality.
Detection (`detection_match`, OWL-ViT fine-tuning) matches image tokens to labelled objects with
DETR's focal class cost in place of the quality term.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.assignment

from clipcrop_jax import boxes as box_lib

# Cost of a padded target slot (and the bound for non-finite costs), as Scenic's matchers use.
COST_UPPER_BOUND = 1e6
SOLVERS = ('auto', 'device', 'host')


def default_solver(backend: str | None = None) -> str:
  """The solver 'auto' picks on `backend` (default `jax.default_backend()`).

  CPU: 'host', measured (tools/benchmark_train.py --matching on 2 CPU cores; B=8 images,
  M=90 predictions, N=128 crop slots of which 3..90 real, the 6 decoder layers vmapped as in the
  B/32 train step): device 334 ms, host 9.6 ms per step (batch 64: 1488 vs 114 ms); tiny (B=8,
  M=12, 2 layers): device 2.5 ms, host 0.4 ms. optax's solver is a `while_loop` of small
  dependent steps that XLA:CPU runs far slower than SciPy's C++ solver.
  GPU: 'host', a priori (pending `tools/gpu_check.sh`): each of those steps is a kernel launch
  on a GPU (Scenic's experience; the frozen B/32 step ran at 57 ex/s on an H200 while its
  encoder needs ~3 ms per image).
  TPU: 'device' (host callbacks leave the chip; Scenic matches on the TPU there).
  """
  backend = jax.default_backend() if backend is None else backend
  return 'device' if backend == 'tpu' else 'host'


def resolve_solver(solver: str) -> str:
  """'device' or 'host' for one of `SOLVERS` ('auto' -> `default_solver()`); ValueError else."""
  if solver not in SOLVERS:
    raise ValueError(f'matching solver {solver!r}: expected one of {SOLVERS}')
  return default_solver() if solver == 'auto' else solver


def match_cost(
    pred_boxes_xyxy: jax.Array,
    pred_quality: jax.Array,
    target_boxes_xyxy: jax.Array,
    target_mask: jax.Array,
    *,
    l1_weight: float = 5.0,
    giou_weight: float = 2.0,
    quality_weight: float = 1.0,
) -> jax.Array:
  """Pairwise matching cost between predictions and targets.

  Args:
    pred_boxes_xyxy: (B, M, 4) predicted boxes, xyxy in [0, 1].
    pred_quality: (B, M) predicted quality in [0, 1] (higher = better crop, so cheaper to match).
    target_boxes_xyxy: (B, N, 4) target boxes, xyxy in [0, 1].
    target_mask: (B, N) bool, True for real targets, False for padding.
    l1_weight: weight of the L1 distance between the cxcywh forms (summed over the 4 coords).
    giou_weight: weight of the (negated) generalised IoU.
    quality_weight: weight of the (negated) predicted quality.

  Returns:
    (B, M, N) float cost. Padded targets cost `COST_UPPER_BOUND`; NaN / inf are replaced by
    +-`COST_UPPER_BOUND` (`jnp.nan_to_num`, as Scenic).
  """
  pred_cxcywh = box_lib.xyxy_to_cxcywh(pred_boxes_xyxy)  # (B, M, 4)
  target_cxcywh = box_lib.xyxy_to_cxcywh(target_boxes_xyxy)  # (B, N, 4)
  # (B, M, N): sum over coordinates of |pred - target| (DETR's torch.cdist with p=1).
  cost_l1 = jnp.sum(jnp.abs(pred_cxcywh[:, :, None, :] - target_cxcywh[:, None, :, :]), axis=-1)
  # (B, M, N): generalised IoU, in [-1, 1].
  giou = jax.vmap(box_lib.pairwise_giou_xyxy)(pred_boxes_xyxy, target_boxes_xyxy)
  # (B, M, 1): the quality does not depend on the target.
  cost_quality = -jnp.asarray(pred_quality)[:, :, None]
  cost = l1_weight * cost_l1 - giou_weight * giou + quality_weight * cost_quality  # (B, M, N)
  cost = jnp.where(jnp.asarray(target_mask, dtype=bool)[:, None, :], cost, COST_UPPER_BOUND)
  return jnp.nan_to_num(
      cost, nan=COST_UPPER_BOUND, posinf=COST_UPPER_BOUND, neginf=-COST_UPPER_BOUND
  )


def _solvable_cost(cost: jax.Array, mask: jax.Array) -> jax.Array:
  """Replaces padded columns of one (M, N) cost by a bound scaled to the real costs.

  A constant 1e6 in float32 swamps the solver's potentials (errors of ~0.03 on the real costs).
  Instead each padded column gets the same value P. When M >= N every column is matched, so any
  constant works and P = max + 1. When M < N the solver must prefer real columns: a matching
  with one more real column costs at most max + r * (max - min) more in real terms than one with
  r real columns, r < M, so P = max + M * (max - min) + 1 suffices.

  Args:
    cost: (M, N) cost.
    mask: (N,) bool, True for real columns.

  Returns:
    (M, N) cost whose padded columns hold P (P = 1 when every column is padding).
  """
  num_preds, num_targets = cost.shape
  real = jnp.broadcast_to(mask[None, :], cost.shape)
  hi = jnp.max(jnp.where(real, cost, -jnp.inf), initial=-jnp.inf)
  lo = jnp.min(jnp.where(real, cost, jnp.inf), initial=jnp.inf)
  any_real = jnp.any(mask)
  hi, lo = jnp.where(any_real, hi, 0.0), jnp.where(any_real, lo, 0.0)
  spread = num_preds * (hi - lo) if num_preds < num_targets else 0.0
  return jnp.where(real, cost, hi + spread + 1.0)


def _scipy_assignment(cost: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Host side of the 'host' solver: cost (..., M, N), mask (..., N) (broadcast to cost's leading
  dims) -> (pred_idx, target_idx), each (..., K) int32, K = min(M, N).

  `linear_sum_assignment` runs on the real columns only (float64): every padded column of the
  device's problem (`_solvable_cost`) costs the same, so an optimal assignment matches the real
  targets exactly as this smaller problem does (all of them when <= M, else the best M), and the
  remaining predictions take padded columns in index order (pairs that are never `valid`). With
  ~20 real crops of 128 slots this is several times faster than solving the padded matrix.
  """
  from scipy import optimize  # pylint: disable=g-import-not-at-top

  cost = np.asarray(cost)
  lead, (num_preds, num_targets) = cost.shape[:-2], cost.shape[-2:]
  flat = cost.reshape((-1, num_preds, num_targets))
  masks = np.broadcast_to(np.asarray(mask, bool), lead + (num_targets,)).reshape((-1, num_targets))
  num_pairs = min(num_preds, num_targets)
  rows = np.empty((flat.shape[0], num_pairs), np.int32)
  cols = np.empty((flat.shape[0], num_pairs), np.int32)
  for i, (c, m) in enumerate(zip(flat, masks)):
    real = np.flatnonzero(m)
    r, k = optimize.linear_sum_assignment(c[:, real].astype(np.float64))
    free_rows = np.setdiff1d(np.arange(num_preds), r)[: num_pairs - len(r)]
    free_cols = np.flatnonzero(~m)[: len(free_rows)]
    rows[i] = np.concatenate([r, free_rows])
    cols[i] = np.concatenate([real[k], free_cols])
  return rows.reshape(lead + (num_pairs,)), cols.reshape(lead + (num_pairs,))


def _host_assignment(solvable: jax.Array, target_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(B, M, N) cost, (B, N) mask -> (pred_idx, target_idx) (B, K) int32 from SciPy via
  `jax.pure_callback`.

  `vmap_method='expand_dims'`: under `jax.vmap` (the decoder layers) the callback gets the
  stacked costs and solves them all in one host call.
  """
  batch, num_preds, num_targets = solvable.shape
  out = jax.ShapeDtypeStruct((batch, min(num_preds, num_targets)), jnp.int32)
  return jax.pure_callback(
      _scipy_assignment, (out, out), solvable, target_mask, vmap_method='expand_dims'
  )


def hungarian_matching(
    cost: jax.Array, target_mask: jax.Array, solver: str = 'device'
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Minimum-cost assignment of predictions to targets, per example; no gradient.

  Real targets always win over padding: all of them are matched when their number is <= M, the
  best M of them otherwise; the remaining pairs (if any) go to padded slots and are not `valid`.

  Args:
    cost: (B, M, N) cost, e.g. from `match_cost`; only its real columns matter.
    target_mask: (B, N) bool, True for real targets.
    solver: one of `SOLVERS` (see the module docstring); both give the same assignment.

  Returns:
    pred_idx: (B, K) int32 indices into M, K = min(M, N), each used at most once per example.
    target_idx: (B, K) int32 indices into N, each used at most once per example.
    valid: (B, K) bool, True where target_idx is a real target (padding never valid).
    Valid pairs come first, then the others, each part by increasing pred_idx. N == 0 (or
    M == 0) gives (B, 0) arrays.
  """
  solver = resolve_solver(solver)
  cost = jax.lax.stop_gradient(jnp.asarray(cost))
  target_mask = jnp.asarray(target_mask, dtype=bool)
  batch, num_preds, num_targets = cost.shape
  num_pairs = min(num_preds, num_targets)
  if num_pairs == 0:
    empty = jnp.zeros((batch, 0), jnp.int32)
    return empty, empty, jnp.zeros((batch, 0), bool)
  solvable = jax.vmap(_solvable_cost)(cost.astype(jnp.float32), target_mask)
  if solver == 'host':
    pred_idx, target_idx = _host_assignment(solvable, target_mask)
  else:
    pred_idx, target_idx = jax.vmap(optax.assignment.hungarian_algorithm)(solvable)
  pred_idx = jax.lax.stop_gradient(pred_idx.astype(jnp.int32))
  target_idx = jax.lax.stop_gradient(target_idx.astype(jnp.int32))
  valid = jnp.take_along_axis(target_mask, target_idx, axis=1)
  # One order for both solvers (valid pairs first, each part by prediction index), so the losses'
  # sums over pairs add the same numbers in the same order whichever solver ran.
  order = jnp.argsort(jnp.where(valid, 0, num_preds) + pred_idx, axis=1)
  return tuple(jnp.take_along_axis(x, order, axis=1) for x in (pred_idx, target_idx, valid))


def match(
    pred_boxes_xyxy: jax.Array,
    pred_quality: jax.Array,
    target_boxes_xyxy: jax.Array,
    target_mask: jax.Array,
    solver: str = 'device',
    **weights: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`match_cost` then `hungarian_matching`; `weights` are match_cost's keyword weights.

  Args:
    pred_boxes_xyxy: (B, M, 4) xyxy in [0, 1].
    pred_quality: (B, M) in [0, 1].
    target_boxes_xyxy: (B, N, 4) xyxy in [0, 1].
    target_mask: (B, N) bool.
    solver: one of `SOLVERS`.
    **weights: l1_weight, giou_weight, quality_weight.

  Returns:
    (pred_idx (B, K) int32, target_idx (B, K) int32, valid (B, K) bool), K = min(M, N).
  """
  cost = match_cost(pred_boxes_xyxy, pred_quality, target_boxes_xyxy, target_mask, **weights)
  return hungarian_matching(cost, target_mask, solver)


def matched_mask(pred_idx: jax.Array, valid: jax.Array, num_preds: int) -> jax.Array:
  """(B, M) bool: True for predictions matched to a real target.

  Args:
    pred_idx: (B, K) int indices into M.
    valid: (B, K) bool.
    num_preds: M (static).
  """
  one_hot = jax.nn.one_hot(pred_idx, num_preds, dtype=bool)  # (B, K, M)
  return jnp.any(one_hot & valid[..., None], axis=1)


def gather_matched(x: jax.Array, idx: jax.Array) -> jax.Array:
  """Rows of x at idx per example: x (B, N, ...), idx (B, K) int -> (B, K, ...)."""
  x = jnp.asarray(x)
  idx = jnp.asarray(idx).reshape(idx.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)


def scatter_to_preds(
    values: jax.Array, pred_idx: jax.Array, valid: jax.Array, num_preds: int, fill: float = 0.0
) -> jax.Array:
  """Per-pair values (B, K) placed at their predictions -> (B, M); `fill` where unmatched.

  Pairs with valid False are ignored. Each prediction is in at most one pair.
  """
  one_hot = jax.nn.one_hot(pred_idx, num_preds, dtype=bool) & valid[..., None]  # (B, K, M)
  placed = jnp.sum(jnp.where(one_hot, values[..., None], 0.0), axis=1)  # (B, M)
  return jnp.where(jnp.any(one_hot, axis=1), placed, fill)


# ------------------------------------------------------------------------------------------------
# Detection (OWL-ViT fine-tuning, `detection_train`): tokens matched to labelled objects.
# ------------------------------------------------------------------------------------------------


def target_logits(pred_logits: jax.Array, target_labels: jax.Array) -> jax.Array:
  """(B, P, Q) logits, (B, N) label ids -> (B, P, N): each token's logit for each object's label."""
  idx = jnp.broadcast_to(target_labels[:, None, :], pred_logits.shape[:2] + target_labels.shape[1:])
  return jnp.take_along_axis(pred_logits, idx.astype(jnp.int32), axis=2)


def focal_class_cost(logits: jax.Array, alpha: float = 0.25, gamma: float = 2.0) -> jax.Array:
  """DETR / Scenic focal matching cost of a logit for the positive class (lower = better):
  alpha (1-p)^g (-log p) - (1-alpha) p^g (-log(1-p)), p = sigmoid(logit)."""
  p = jax.nn.sigmoid(logits)
  pos = alpha * (1 - p) ** gamma * -jax.nn.log_sigmoid(logits)
  neg = (1 - alpha) * p**gamma * -jax.nn.log_sigmoid(-logits)
  return pos - neg


def detection_match_cost(
    pred_logits: jax.Array,
    pred_boxes_cxcywh: jax.Array,
    target_boxes_xyxy: jax.Array,
    target_labels: jax.Array,
    target_mask: jax.Array,
    *,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    cost_class: float = 2.0,
    cost_l1: float = 5.0,
    cost_giou: float = 2.0,
) -> jax.Array:
  """(B, P, N) cost: cost_class * focal cost + cost_l1 * L1(cxcywh) - cost_giou * GIoU."""
  pred_xyxy = box_lib.cxcywh_to_xyxy(pred_boxes_cxcywh)
  box_cost = match_cost(
      pred_xyxy,
      jnp.zeros(pred_xyxy.shape[:2], jnp.float32),
      target_boxes_xyxy,
      target_mask,
      l1_weight=cost_l1,
      giou_weight=cost_giou,
      quality_weight=0.0,
  )
  class_cost = focal_class_cost(
      target_logits(pred_logits, target_labels).astype(jnp.float32), focal_alpha, focal_gamma
  )
  cost = jnp.where(
      jnp.asarray(target_mask, bool)[:, None, :], box_cost + cost_class * class_cost, box_cost
  )
  return jnp.nan_to_num(
      cost, nan=COST_UPPER_BOUND, posinf=COST_UPPER_BOUND, neginf=-COST_UPPER_BOUND
  )


def detection_match(
    pred_logits,
    pred_boxes_cxcywh,
    target_boxes_xyxy,
    target_labels,
    target_mask,
    solver: str = 'device',
    **cost_kw,
):
  """Hungarian matching (`solver` of `SOLVERS`) -> (pred_idx, target_idx, valid), each
  (B, min(P, N))."""
  cost = detection_match_cost(
      pred_logits, pred_boxes_cxcywh, target_boxes_xyxy, target_labels, target_mask, **cost_kw
  )
  return hungarian_matching(cost, target_mask, solver)
