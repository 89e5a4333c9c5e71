"""Tests for clipcrop_jax.losses: hand-computed values, positives, smoothing, normalisation, aux."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipcrop_jax import losses

_set_losses = jax.jit(losses.set_prediction_losses)


def _cxcywh(box: np.ndarray) -> np.ndarray:
  return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2, box[2] - box[0], box[3] - box[1]])


def _iou_giou(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
  """Exact IoU and GIoU of two xyxy boxes (float64, no eps)."""
  inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
  return inter / union, inter / union - (hull - union) / hull


def _smooth_l1(x: np.ndarray) -> np.ndarray:
  x = np.abs(x)
  return np.where(x <= 1.0, 0.5 * x**2, x - 0.5)


def _random_batch(seed: int, batch: int = 4, num_preds: int = 5, num_crops: int = 6):
  """Random predictions and padded annotations: (boxes, quality, crops, scores, mask)."""
  rng = np.random.default_rng(seed)

  def boxes(shape):
    lo = rng.uniform(0.0, 0.5, shape + (2,))
    return np.concatenate([lo, lo + rng.uniform(0.1, 0.5, shape + (2,))], -1).astype(np.float32)

  scores = rng.uniform(1.0, 5.0, (batch, num_crops)).astype(np.float32)
  mask = np.arange(num_crops)[None, :] < rng.integers(1, num_crops + 1, (batch, 1))
  quality = rng.uniform(0.0, 1.0, (batch, num_preds)).astype(np.float32)
  return boxes((batch, num_preds)), quality, boxes((batch, num_crops)), scores, mask


def test_normalise_scores_no_truncation():
  np.testing.assert_allclose(losses.normalise_scores(np.array([5.0, 1.0, 6.0, 3.0])),
                             [1.0, 0.0, 1.25, 0.5])
  np.testing.assert_allclose(losses.normalise_scores(np.array([0.0]), 0.0, 10.0), [0.0])


def test_select_positives():
  scores = np.array([[4.5, 3.9, 4.0, 5.0],  # threshold; the padded 5.0 is ignored
                     [3.0, 3.5, 3.5, 2.0],  # none >= 4: ties at the max
                     [3.0, 3.2, 4.8, 4.9],  # none real >= 4: the max over real crops only
                     [4.5, 4.5, 4.5, 4.5]])  # no real crop
  mask = np.array([[True, True, True, False], [True] * 4, [True, True, False, False],
                   [False] * 4])
  np.testing.assert_array_equal(losses.select_positives(scores, mask), [
      [True, False, True, False], [False, True, True, False], [False, True, False, False],
      [False] * 4])
  np.testing.assert_array_equal(losses.select_positives(scores[:1], mask[:1], threshold=4.6),
                                [[True, False, False, False]])
  assert float(losses.count_positives(scores, mask)) == 5.0


def test_quality_targets_smoothing():
  crops = np.array([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 0.5, 0.5]]],
                   np.float32)
  scores_norm = losses.normalise_scores(np.array([[3.0, 4.6, 5.0]]))
  crop_mask = np.array([[True, True, False]])  # The padded copy of crop 0 must be ignored.
  preds = np.array([[[0.0, 0.0, 0.5, 0.475],  # IoU 0.95 with crop 0 (score 3 -> 0.5)
                     [0.0, 0.0, 0.5, 0.425],  # IoU 0.85 with crop 0 -> 0
                     [0.5, 0.5, 1.0, 1.0],  # matched (own score 0.9)
                     [0.5, 0.5, 1.0, 0.98]]], np.float32)  # IoU 0.96 with crop 1 -> 0.9
  matched = np.array([[False, False, True, False]])
  matched_score = np.array([[7.0, 7.0, 0.9, 7.0]], np.float32)
  targets = losses.quality_targets(preds, matched, matched_score, crops, scores_norm, crop_mask)
  np.testing.assert_allclose(targets, [[0.5, 0.0, 0.9, 0.9]], atol=1e-6)
  for disabled in (None, 1.5, jnp.float32(1.5)):
    targets = jax.jit(losses.quality_targets)(preds, matched, matched_score, crops, scores_norm,
                                              crop_mask, smoothing_iou=disabled)
    np.testing.assert_allclose(targets, [[0.0, 0.0, 0.9, 0.0]], atol=1e-6)
  targets = losses.quality_targets(preds, matched, matched_score, crops, scores_norm, crop_mask,
                                   smoothing_iou=0.8)
  np.testing.assert_allclose(targets, [[0.5, 0.5, 0.9, 0.9]], atol=1e-6)


def test_hand_computed_losses():
  crops = np.array([[[0.1, 0.1, 0.6, 0.7], [0.4, 0.2, 0.9, 0.9], [0.0, 0.5, 0.3, 1.0],
                     [0.0, 0.0, 1.0, 1.0]]], np.float32)
  scores = np.array([[4.5, 3.0, 2.0, 5.0]], np.float32)  # Crop 3 is padding.
  mask = np.array([[True, True, True, False]])
  preds = np.array([[[0.15, 0.05, 0.65, 0.6],  # clearly matched to the positive crop 0
                     [0.4, 0.2, 0.9, 0.88],  # unmatched, IoU 0.97 with crop 1 -> target 0.5
                     [0.7, 0.0, 1.0, 0.2]]], np.float32)  # unmatched, no overlap -> target 0
  quality = np.array([[0.6, 0.2, 0.3]], np.float32)
  terms = _set_losses(preds, quality, crops, scores, mask)

  p, t = preds[0, 0].astype(np.float64), crops[0, 0].astype(np.float64)
  iou, giou = _iou_giou(p, t)
  expected_quality = _smooth_l1(quality[0] - np.array([0.875, 0.5, 0.0])).mean()
  np.testing.assert_allclose(terms['loss_l1'], np.abs(_cxcywh(p) - _cxcywh(t)).sum(), atol=1e-5)
  np.testing.assert_allclose(terms['loss_giou'], 1.0 - giou, atol=1e-5)
  np.testing.assert_allclose(terms['loss_quality'], expected_quality, atol=1e-6)
  np.testing.assert_allclose(terms['matched_iou_mean'], iou, atol=1e-5)
  assert float(terms['num_positives']) == 1.0


def test_smooth_l1_linear_branch():
  # Scores above score_max give targets > 1 (no truncation); a 0 prediction is then in the
  # linear part of Smooth-L1: |0 - 1.5| - 0.5 = 1.
  crops = np.array([[[0.0, 0.0, 1.0, 1.0]]], np.float32)
  terms = _set_losses(crops, np.zeros((1, 1)), crops, np.array([[7.0]]),
                                       np.ones((1, 1), bool))
  np.testing.assert_allclose(terms['loss_quality'], 1.0, atol=1e-6)


def test_perfect_predictions_have_near_zero_loss():
  crops = np.array([[[0.1, 0.1, 0.6, 0.7], [0.3, 0.2, 0.9, 0.9], [0.0, 0.5, 0.3, 1.0]]],
                   np.float32)
  scores = np.array([[4.2, 4.6, 2.0]], np.float32)
  mask = np.ones((1, 3), bool)
  preds = np.concatenate([crops, [[[0.8, 0.0, 1.0, 0.1]]]], axis=1)  # + one far-away box
  # Predicted qualities equal the targets: matched 0.8, 0.9; smoothed 0.25; background 0.
  quality = np.array([[0.8, 0.9, 0.25, 0.0]], np.float32)
  terms = _set_losses(preds, quality, crops, scores, mask)
  for name in losses.LOSS_NAMES:
    assert float(terms[name]) < 1e-5, name
  assert float(terms['num_positives']) == 2.0
  np.testing.assert_allclose(terms['matched_iou_mean'], 1.0, atol=1e-5)


def test_gradients_finite_and_nonzero():
  boxes, quality, crops, scores, mask = _random_batch(0)

  def loss(b, q):
    terms = _set_losses(b, q, crops, scores, mask)
    return 5.0 * terms['loss_l1'] + 2.0 * terms['loss_giou'] + terms['loss_quality']

  grad_boxes, grad_quality = jax.jit(jax.grad(loss, argnums=(0, 1)))(boxes, quality)
  for grad in (grad_boxes, grad_quality):
    assert np.all(np.isfinite(grad)) and np.any(np.asarray(grad) != 0)


def test_global_normalisation_splits_batch():
  boxes, quality, crops, scores, mask = _random_batch(1)
  full = _set_losses(boxes, quality, crops, scores, mask)
  num_positives = losses.count_positives(scores, mask)
  num_predictions = boxes.shape[0] * boxes.shape[1]
  halves = [_set_losses(boxes[s], quality[s], crops[s], scores[s], mask[s],
                        num_positives=num_positives, num_predictions=num_predictions)
            for s in (slice(0, 2), slice(2, 4))]
  for name in losses.LOSS_NAMES:
    np.testing.assert_allclose(halves[0][name] + halves[1][name], full[name], rtol=1e-5)
  np.testing.assert_allclose(full['num_positives'], num_positives)


def test_decoder_losses_aux_layers():
  boxes, quality, crops, scores, mask = _random_batch(2, batch=2)
  rng = np.random.default_rng(3)
  aux_boxes = np.stack([boxes, boxes + 0.02, boxes[:, ::-1]])  # (L=3, B, M, 4)
  logits = rng.normal(size=(3,) + quality.shape).astype(np.float32)
  weights = {'loss_l1': 5.0, 'loss_giou': 2.0, 'loss_quality': 1.0}
  fn = jax.jit(losses.decoder_losses, static_argnames=('aux_loss',))
  total, terms = fn(aux_boxes, logits, crops, scores, mask)

  per_layer = [_set_losses(aux_boxes[i], jax.nn.sigmoid(logits[i]), crops,
                                            scores, mask) for i in range(3)]
  expected_names = {f'{n}{s}' for n in losses.LOSS_NAMES + ('matched_iou_mean',)
                    for s in ('_0', '_1', '')} | {'loss', 'num_positives'}
  assert set(terms) == expected_names
  expected_total = 0.0
  for i, suffix in enumerate(('_0', '_1', '')):
    for name in losses.LOSS_NAMES:
      np.testing.assert_allclose(terms[name + suffix], per_layer[i][name], rtol=1e-5)
      expected_total += weights[name] * float(per_layer[i][name])
  np.testing.assert_allclose(total, expected_total, rtol=1e-5)
  np.testing.assert_allclose(terms['loss'], total)

  total_last, terms_last = fn(aux_boxes, logits, crops, scores, mask, aux_loss=False)
  assert set(terms_last) == {*losses.LOSS_NAMES, 'matched_iou_mean', 'loss', 'num_positives'}
  np.testing.assert_allclose(
      total_last, sum(weights[n] * float(per_layer[2][n]) for n in losses.LOSS_NAMES), rtol=1e-5)


def test_total_loss_weights_and_errors():
  terms = [{'loss_l1': 1.0, 'loss_giou': 2.0, 'loss_quality': 3.0, 'num_positives': 4.0,
            'matched_iou_mean': 0.5}] * 2
  total, flat = losses.total_loss(terms, {'loss_l1': 1.0, 'loss_quality': 10.0})
  np.testing.assert_allclose(total, 2 * (1.0 + 30.0))
  assert flat['loss_giou_0'] == 2.0 and flat['num_positives'] == 4.0
  with pytest.raises(ValueError):
    losses.total_loss([])
