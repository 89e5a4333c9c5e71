"""Tests for training.losses: hand-computed values, positives, smoothing, normalisation, aux."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipcrop_jax import default_config
from clipcrop_jax.training import clipcrop_task
from clipcrop_jax.training import losses
from clipcrop_jax.training import matching

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
  np.testing.assert_allclose(
      losses.normalise_scores(np.array([5.0, 1.0, 6.0, 3.0])), [1.0, 0.0, 1.25, 0.5]
  )
  np.testing.assert_allclose(losses.normalise_scores(np.array([0.0]), 0.0, 10.0), [0.0])


def test_select_positives():
  scores = np.array(
      [
          [4.5, 3.9, 4.0, 5.0],  # threshold; the padded 5.0 is ignored
          [3.0, 3.5, 3.5, 2.0],  # none >= 4: ties at the max
          [3.0, 3.2, 4.8, 4.9],  # none real >= 4: the max over real crops only
          [4.5, 4.5, 4.5, 4.5],
      ]
  )  # no real crop
  mask = np.array([[True, True, True, False], [True] * 4, [True, True, False, False], [False] * 4])
  np.testing.assert_array_equal(
      losses.select_positives(scores, mask),
      [
          [True, False, True, False],
          [False, True, True, False],
          [False, True, False, False],
          [False] * 4,
      ],
  )
  np.testing.assert_array_equal(
      losses.select_positives(scores[:1], mask[:1], threshold=4.6), [[True, False, False, False]]
  )
  assert float(losses.count_positives(scores, mask)) == 5.0


def test_quality_targets_smoothing():
  crops = np.array([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 0.5, 0.5]]], np.float32)
  scores_norm = losses.normalise_scores(np.array([[3.0, 4.6, 5.0]]))
  crop_mask = np.array([[True, True, False]])  # The padded copy of crop 0 must be ignored.
  preds = np.array(
      [
          [
              [0.0, 0.0, 0.5, 0.475],  # IoU 0.95 with crop 0 (score 3 -> 0.5)
              [0.0, 0.0, 0.5, 0.425],  # IoU 0.85 with crop 0 -> 0
              [0.5, 0.5, 1.0, 1.0],  # matched (own score 0.9)
              [0.5, 0.5, 1.0, 0.98],
          ]
      ],
      np.float32,
  )  # IoU 0.96 with crop 1 -> 0.9
  matched = np.array([[False, False, True, False]])
  matched_score = np.array([[7.0, 7.0, 0.9, 7.0]], np.float32)
  targets = losses.quality_targets(preds, matched, matched_score, crops, scores_norm, crop_mask)
  np.testing.assert_allclose(targets, [[0.5, 0.0, 0.9, 0.9]], atol=1e-6)
  for disabled in (None, 1.5, jnp.float32(1.5)):
    targets = jax.jit(losses.quality_targets)(
        preds, matched, matched_score, crops, scores_norm, crop_mask, smoothing_iou=disabled
    )
    np.testing.assert_allclose(targets, [[0.0, 0.0, 0.9, 0.0]], atol=1e-6)
  targets = losses.quality_targets(
      preds, matched, matched_score, crops, scores_norm, crop_mask, smoothing_iou=0.8
  )
  np.testing.assert_allclose(targets, [[0.5, 0.5, 0.9, 0.9]], atol=1e-6)


def test_hand_computed_losses():
  crops = np.array(
      [[[0.1, 0.1, 0.6, 0.7], [0.4, 0.2, 0.9, 0.9], [0.0, 0.5, 0.3, 1.0], [0.0, 0.0, 1.0, 1.0]]],
      np.float32,
  )
  scores = np.array([[4.5, 3.0, 2.0, 5.0]], np.float32)  # Crop 3 is padding.
  mask = np.array([[True, True, True, False]])
  preds = np.array(
      [
          [
              [0.15, 0.05, 0.65, 0.6],  # clearly matched to the positive crop 0
              [0.4, 0.2, 0.9, 0.88],  # unmatched, IoU 0.97 with crop 1 -> target 0.5
              [0.7, 0.0, 1.0, 0.2],
          ]
      ],
      np.float32,
  )  # unmatched, no overlap -> target 0
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
  terms = _set_losses(crops, np.zeros((1, 1)), crops, np.array([[7.0]]), np.ones((1, 1), bool))
  np.testing.assert_allclose(terms['loss_quality'], 1.0, atol=1e-6)


def test_perfect_predictions_have_near_zero_loss():
  crops = np.array([[[0.1, 0.1, 0.6, 0.7], [0.3, 0.2, 0.9, 0.9], [0.0, 0.5, 0.3, 1.0]]], np.float32)
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
  halves = [
      _set_losses(
          boxes[s],
          quality[s],
          crops[s],
          scores[s],
          mask[s],
          num_positives=num_positives,
          num_predictions=num_predictions,
      )
      for s in (slice(0, 2), slice(2, 4))
  ]
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

  per_layer = [
      _set_losses(aux_boxes[i], jax.nn.sigmoid(logits[i]), crops, scores, mask) for i in range(3)
  ]
  expected_names = {
      f'{n}{s}' for n in losses.LOSS_NAMES + ('matched_iou_mean',) for s in ('_0', '_1', '')
  } | {'loss', 'num_positives'}
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
      total_last, sum(weights[n] * float(per_layer[2][n]) for n in losses.LOSS_NAMES), rtol=1e-5
  )


def test_total_loss_weights_and_errors():
  terms = [
      {
          'loss_l1': 1.0,
          'loss_giou': 2.0,
          'loss_quality': 3.0,
          'num_positives': 4.0,
          'matched_iou_mean': 0.5,
      }
  ] * 2
  total, flat = losses.total_loss(terms, {'loss_l1': 1.0, 'loss_quality': 10.0})
  np.testing.assert_allclose(total, 2 * (1.0 + 30.0))
  assert flat['loss_giou_0'] == 2.0 and flat['num_positives'] == 4.0
  with pytest.raises(ValueError):
    losses.total_loss([])


# ------------------------------------------------------------------------------------------------
# Quality objectives (`quality_loss`, `quality_target`).
# ------------------------------------------------------------------------------------------------

_COMBOS = [(loss, target) for loss in losses.QUALITY_LOSSES for target in losses.QUALITY_TARGETS]
_set_losses_q = jax.jit(
    losses.set_prediction_losses, static_argnames=('quality_loss', 'quality_target')
)


def _np_softplus(x: float) -> float:
  return float(np.log1p(np.exp(-abs(x))) + max(x, 0.0))


def _np_pairwise(logits, targets, margin=losses.PAIRWISE_MARGIN) -> float:
  """Mean over ordered pairs with t_i > t_j + margin of log(1 + exp(-(l_i - l_j))), else 0."""
  values = [
      _np_softplus(-(logits[i] - logits[j]))
      for i in range(len(logits))
      for j in range(len(logits))
      if targets[i] > targets[j] + margin
  ]
  return float(np.mean(values)) if values else 0.0


def _np_listwise(logits, targets, tau) -> float:
  p = np.exp(np.asarray(targets, np.float64) / tau)
  p /= p.sum()
  logits = np.asarray(logits, np.float64)
  log_q = logits - np.log(np.exp(logits).sum())
  return float(-(p * log_q).sum())


def _np_objective(name, logits, targets, tau=0.2, pointwise_weight=0.1) -> float:
  """One image's 'loss_quality' (the image is the whole batch)."""
  pointwise = _smooth_l1(1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64))) - targets).mean()
  if name == 'smooth_l1':
    return float(pointwise)
  rank = _np_pairwise(logits, targets) if name == 'pairwise' else _np_listwise(logits, targets, tau)
  return rank + pointwise_weight * float(pointwise)


def _hand_example():
  """The `test_hand_computed_losses` image (pred 0 matched to crop 0), with quality logits."""
  crops = np.array(
      [[[0.1, 0.1, 0.6, 0.7], [0.4, 0.2, 0.9, 0.9], [0.0, 0.5, 0.3, 1.0], [0.0, 0.0, 1.0, 1.0]]],
      np.float32,
  )
  scores = np.array([[4.5, 3.0, 2.0, 5.0]], np.float32)  # Crop 3 is padding (and would win).
  mask = np.array([[True, True, True, False]])
  preds = np.array(
      [[[0.15, 0.05, 0.65, 0.6], [0.4, 0.2, 0.9, 0.88], [0.7, 0.0, 1.0, 0.2]]], np.float32
  )
  logits = np.log(np.array([[0.6, 0.2, 0.3]]) / (1 - np.array([[0.6, 0.2, 0.3]])))
  return preds, logits.astype(np.float32), crops, scores, mask


def test_iou_quality_targets_hand_computed():
  preds, _, crops, scores, mask = _hand_example()
  preds = np.concatenate([preds, preds[:, ::-1]])  # Image 1: no real crop.
  crops, scores = np.concatenate([crops, crops]), np.concatenate([scores, scores])
  mask = np.concatenate([mask, np.zeros_like(mask)])
  targets = losses.iou_quality_targets(preds, crops, losses.normalise_scores(scores), mask)
  norm = (scores[0, :3] - 1.0) / 4.0  # 0.875, 0.5, 0.25
  expected = [
      max(
          _iou_giou(p.astype(np.float64), c.astype(np.float64))[0] * s
          for c, s in zip(crops[0, :3], norm)
      )
      for p in preds[0]
  ]
  assert expected[2] == 0.0 and 0.4 < expected[1] < 0.5  # no overlap; IoU 0.97 x 0.5
  np.testing.assert_allclose(targets[0], expected, atol=1e-5)
  np.testing.assert_array_equal(targets[1], 0.0)


def test_pairwise_and_listwise_hand_computed():
  logits = np.array(
      [[1.0, -0.5, 0.3, 2.0], [0.2, 0.1, -0.3, 0.4], [3.0, 1.0, 0.0, -1.0]], np.float32
  )
  targets = np.array(
      [
          [0.9, 0.2, 0.5, 0.52],  # 0.52 vs 0.5 is within the margin: no pair
          [0.3, 0.3, 0.3, 0.3],  # all tied: no pair
          [0.1, 0.9, 0.5, 0.0],
      ],
      np.float32,
  )  # masked: no real crop
  image_mask = np.array([True, True, False])
  pairwise = losses.pairwise_ranking_loss(logits, targets, image_mask)
  # Pairs of image 0 (i above j): (0,1) (0,2) (0,3) (2,1) (3,1), each softplus(-(l_i - l_j)).
  by_hand = np.mean(
      [
          _np_softplus(-1.5),
          _np_softplus(-0.7),
          _np_softplus(1.0),
          _np_softplus(-0.8),
          _np_softplus(-2.5),
      ]
  )
  np.testing.assert_allclose(pairwise, [by_hand, 0.0, 0.0], rtol=1e-5)
  np.testing.assert_allclose(_np_pairwise(logits[0], targets[0]), by_hand, rtol=1e-6)
  listwise = losses.listwise_ranking_loss(logits, targets, image_mask, temperature=0.2)
  expected = [_np_listwise(logits[i], targets[i], 0.2) for i in (0, 1)] + [0.0]
  np.testing.assert_allclose(listwise, expected, rtol=1e-5)
  # A tied image's target is uniform: equal logits give exactly log M.
  tied = losses.listwise_ranking_loss(np.zeros((1, 4)), targets[1:2], [True], temperature=0.2)
  np.testing.assert_allclose(tied, [np.log(4.0)], rtol=1e-6)


@pytest.mark.parametrize('quality_loss,quality_target', _COMBOS)
def test_quality_objectives_hand_computed(quality_loss, quality_target):
  preds, logits, crops, scores, mask = _hand_example()
  quality = jax.nn.sigmoid(logits)
  terms = _set_losses_q(
      preds,
      quality,
      crops,
      scores,
      mask,
      quality_logits=logits,
      quality_loss=quality_loss,
      quality_target=quality_target,
  )
  if quality_target == 'matched':
    targets = np.array([0.875, 0.5, 0.0])  # matched; IoU 0.97 with crop 1; nothing
  elif quality_target == 'top_iou':  # all 3 real crops are among the 4 best
    targets = np.array(
        [
            np.mean(
                [_iou_giou(p.astype(np.float64), c.astype(np.float64))[0] for c in crops[0, :3]]
            )
            for p in preds[0]
        ]
    )
  else:
    norm = [0.875, 0.5, 0.25]
    targets = np.array(
        [
            max(
                _iou_giou(p.astype(np.float64), c.astype(np.float64))[0] * s
                for c, s in zip(crops[0, :3], norm)
            )
            for p in preds[0]
        ]
    )
  expected = _np_objective(quality_loss, logits[0].astype(np.float64), targets)
  np.testing.assert_allclose(terms['loss_quality'], expected, rtol=1e-5)
  # The box terms do not depend on the quality objective.
  default = _set_losses(preds, quality, crops, scores, mask)
  for name in ('loss_l1', 'loss_giou'):
    np.testing.assert_allclose(terms[name], default[name], rtol=1e-6)


@pytest.mark.parametrize('quality_loss', ['pairwise', 'listwise'])
def test_ranking_losses_prefer_the_target_order(quality_loss):
  targets = np.array([[0.9, 0.6, 0.3, 0.0]], np.float32)
  agree = np.array([[2.0, 1.0, 0.0, -1.0]], np.float32)
  mask = np.ones((1, 2), bool)
  values = [
      float(
          losses.quality_objective(
              jax.nn.sigmoid(l),
              l,
              targets,
              mask,
              quality_loss=quality_loss,
              quality_pointwise_weight=0.0,
          )
      )
      for l in (agree, agree[:, ::-1], agree * 0.0)
  ]
  assert values[0] < values[2] < values[1], values


def test_default_objective_is_the_papers_formula():
  """Defaults (and the default config's loss kwargs) give the previous Smooth-L1 loss exactly."""
  boxes, quality, crops, scores, mask = _random_batch(4)
  pred_idx, crop_idx, valid = matching.match(
      boxes, quality, crops, losses.select_positives(scores, mask)
  )
  norm = np.asarray(losses.normalise_scores(scores))
  matched = np.zeros(quality.shape, bool)
  matched_score = np.zeros(quality.shape, np.float32)
  for b, (p, c, v) in enumerate(zip(np.asarray(pred_idx), np.asarray(crop_idx), np.asarray(valid))):
    matched[b, p[v]], matched_score[b, p[v]] = True, norm[b, c[v]]
  targets = losses.quality_targets(boxes, matched, matched_score, crops, norm, mask)
  previous = _smooth_l1(quality - np.asarray(targets)).sum() / quality.size
  terms = _set_losses(boxes, quality, crops, scores, mask)
  np.testing.assert_allclose(terms['loss_quality'], previous, rtol=1e-6)

  kwargs = clipcrop_task.loss_kwargs(default_config.get_default_config())
  assert (kwargs['quality_loss'], kwargs['quality_target']) == ('smooth_l1', 'matched')
  logits = np.random.default_rng(5).normal(size=(2,) + quality.shape).astype(np.float32)
  aux = np.stack([boxes, boxes[:, ::-1]])
  new_total, new_terms = jax.jit(functools.partial(losses.decoder_losses, **kwargs))(
      aux, logits, crops, scores, mask
  )
  old_total, old_terms = jax.jit(losses.decoder_losses)(aux, logits, crops, scores, mask)
  np.testing.assert_array_equal(new_total, old_total)
  for name in old_terms:
    np.testing.assert_array_equal(new_terms[name], old_terms[name])


# Each loss and each target once (two compilations a case).
@pytest.mark.parametrize(
    'quality_loss,quality_target',
    [('smooth_l1', 'iou'), ('pairwise', 'iou'), ('listwise', 'matched')],
)
def test_quality_objectives_ignore_padding_crops(quality_loss, quality_target):
  boxes, quality, crops, scores, mask = _random_batch(6, num_crops=4)
  logits = np.log(quality / (1.0 - quality))
  rng = np.random.default_rng(7)
  # Two more slots of padding that would be the best crops (score 5) were they real.
  pad_crops = np.concatenate([crops, boxes[:, :2]], axis=1)
  pad_scores = np.concatenate([scores, np.full((4, 2), 5.0, np.float32)], axis=1)
  pad_mask = np.concatenate([mask, np.zeros((4, 2), bool)], axis=1)
  # Scramble what was already padding too.
  pad_crops = np.where(pad_mask[..., None], pad_crops, rng.uniform(0, 1, pad_crops.shape))
  kw = dict(quality_logits=logits, quality_loss=quality_loss, quality_target=quality_target)
  plain = _set_losses_q(boxes, quality, crops, scores, mask, **kw)
  padded = _set_losses_q(boxes, quality, pad_crops.astype(np.float32), pad_scores, pad_mask, **kw)
  for name in losses.LOSS_NAMES:
    np.testing.assert_allclose(padded[name], plain[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('quality_loss,quality_target', _COMBOS)
def test_quality_objectives_empty_images_and_grads(quality_loss, quality_target):
  boxes, quality, crops, scores, mask = _random_batch(8, batch=3)
  mask[1] = False  # one image without real crops
  logits = np.random.default_rng(9).normal(size=(2,) + quality.shape).astype(np.float32)
  aux = np.stack([boxes, boxes[:, ::-1]])
  kw = dict(quality_loss=quality_loss, quality_target=quality_target)

  @jax.jit
  def loss(b, l, m):
    return losses.decoder_losses(b, l, crops, scores, m, **kw)[0]

  for m in (mask, np.zeros_like(mask)):  # some, then no image with real crops
    value, (grad_boxes, grad_logits) = jax.value_and_grad(loss, argnums=(0, 1))(aux, logits, m)
    assert np.isfinite(value)
    assert np.all(np.isfinite(grad_boxes)) and np.all(np.isfinite(grad_logits))
    assert np.any(np.asarray(grad_logits) != 0)
  # No real crop anywhere: every target is 0 and a ranking loss adds nothing beyond Smooth-L1.
  sig = 1.0 / (1.0 + np.exp(-logits[-1].astype(np.float64)))
  empty = _set_losses_q(
      boxes,
      sig.astype(np.float32),
      crops,
      scores,
      np.zeros_like(mask),
      quality_logits=logits[-1],
      **kw,
  )
  weight = 1.0 if quality_loss == 'smooth_l1' else 0.1
  np.testing.assert_allclose(empty['loss_quality'], weight * _smooth_l1(sig).mean(), rtol=1e-5)


@pytest.mark.parametrize('quality_loss', ['pairwise', 'listwise'])
def test_ranking_normalisation_splits_batch(quality_loss):
  boxes, quality, crops, scores, mask = _random_batch(10)
  mask[2] = False  # not counted in num_images
  logits = np.log(quality / (1.0 - quality))
  kw = dict(quality_loss=quality_loss, quality_target='iou')
  full = _set_losses_q(boxes, quality, crops, scores, mask, quality_logits=logits, **kw)
  num_images = losses.count_ranked_images(mask)
  assert float(num_images) == 3.0
  halves = [
      _set_losses_q(
          boxes[s],
          quality[s],
          crops[s],
          scores[s],
          mask[s],
          quality_logits=logits[s],
          num_positives=losses.count_positives(scores, mask),
          num_predictions=quality.size,
          num_images=num_images,
          **kw,
      )
      for s in (slice(0, 2), slice(2, 4))
  ]
  for name in losses.LOSS_NAMES:
    np.testing.assert_allclose(halves[0][name] + halves[1][name], full[name], rtol=1e-5)


def test_quality_objective_errors():
  boxes, quality, crops, scores, mask = _random_batch(11)
  with pytest.raises(ValueError, match="quality_loss='ranknet': expected one of"):
    losses.set_prediction_losses(boxes, quality, crops, scores, mask, quality_loss='ranknet')
  with pytest.raises(ValueError, match="quality_target='best': expected one of"):
    losses.set_prediction_losses(boxes, quality, crops, scores, mask, quality_target='best')
  with pytest.raises(ValueError, match="quality_loss='pairwise' needs quality_logits"):
    losses.set_prediction_losses(boxes, quality, crops, scores, mask, quality_loss='pairwise')


def test_top_iou_targets_hand_values_and_masking():
  preds = np.array([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]], np.float32)
  crops = np.array(
      [[[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 1.0], [0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]],
      np.float32,
  )
  scores = np.array([[4.0, 4.2, 2.0, 5.0]], np.float32)
  mask = np.array([[True, True, True, False]])  # the best-scored (whole-image) crop is padding
  top2 = np.asarray(losses.top_crops_mask(scores, mask, 2))
  np.testing.assert_array_equal(top2, [[True, True, False, False]])
  np.testing.assert_array_equal(np.asarray(losses.top_crops_mask(scores, mask, 9)), mask)
  targets = np.asarray(losses.top_iou_targets(preds, crops, top2))[0]
  expected = [
      np.mean([_iou_giou(p.astype(np.float64), crops[0, c].astype(np.float64))[0] for c in (0, 1)])
      for p in preds[0]
  ]
  np.testing.assert_allclose(targets, expected, atol=1e-5)  # (1 + 0.5) / 2, 0, (0.25 + 0.5) / 2
  none = losses.top_iou_targets(preds, crops, np.zeros((1, 4), bool))
  np.testing.assert_array_equal(np.asarray(none), 0.0)
  # Through the loss: 'top_iou' with k = 2 uses exactly these targets (Smooth-L1 of qualities).
  quality = np.array([[0.2, 0.7, 0.4]], np.float32)
  terms = losses.set_prediction_losses(
      preds, quality, crops, scores, mask, quality_target='top_iou', quality_top_k=2
  )
  assert float(terms['loss_quality']) == pytest.approx(
      float(np.mean(_smooth_l1(quality[0] - np.asarray(expected)))), abs=1e-6
  )


def test_selection_filter_switch_changes_the_conditioned_loss():
  """`loss.selection_filter=False` trains on the unfiltered selections (as inference sees them)."""
  from clipcrop_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from clipcrop_jax import model as model_lib  # pylint: disable=g-import-not-at-top

  config = model_lib.TINY
  model = model_lib.ClipCrop(config)
  params = model_lib.init_variables(config, seed=0)['params']  # jitted init: eager is ~15 s
  size = config.owlvit_config.image_size
  batch = input_pipeline.random_batch(2, size, 6, 3, seed=5)
  kw = clipcrop_task.loss_kwargs(default_config.get_default_config())
  rng = jax.random.PRNGKey(1)
  loss = jax.jit(
      lambda p, b, r, selection_filter: clipcrop_task.clipcrop_loss(  # eager: ~10x slower
          model, p, b, r, kw, selection_filter=selection_filter
      )[0],
      static_argnums=3,
  )
  filtered = loss(params, batch, rng, True)
  unfiltered = loss(params, batch, rng, False)
  # Random crops lie mostly away from random selections, so the filter changes the union boxes.
  assert float(filtered) != pytest.approx(float(unfiltered), rel=1e-4)
  again = loss(params, batch, rng, True)
  assert float(again) == float(filtered)
