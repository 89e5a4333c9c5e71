"""Set-prediction losses of ClipCrop (Zhong et al. 2023, §3.3 and appendix B).

The recipe follows Jia et al., "Rethinking Image Cropping" (CVPR 2022): annotated crops whose
mean-opinion score is >= a threshold (4 of 1..5 on GAIC) are the positives; if an image has none,
its best-scored crops are. Predictions are Hungarian-matched to the positives (DETR-style, see
`matching`), matched boxes get L1 (cxcywh) and GIoU losses, and every prediction's
quality gets a Smooth-L1 loss towards its target: the matched crop's normalised score, else the
score of an annotated crop it overlaps with IoU >= 0.9 (local-redundancy label smoothing), else 0.

Shapes: B = batch, M = predictions, C = annotated crop slots (real + padding, `crop_mask`),
L = decoder layers. Boxes are xyxy (x0, y0, x1, y1) normalised to [0, 1]. Everything is jit-able
with static shapes.

Quality objectives (`quality_loss`, `quality_target`; the defaults are the paper's recipe above):
  targets  'matched' (`quality_targets`, the paper), 'iou' (`iou_quality_targets`: every
           prediction's best IoU with a real crop times that crop's normalised score, so an
           unmatched prediction close to a good crop gets a high target too) or 'top_iou'
           (`top_iou_targets`: every prediction's mean IoU with the image's `quality_top_k`
           best-scored crops, the IoU-Mean that text-conditioned benchmarks score against their
           few reference crops).
  loss     'smooth_l1' (the paper: Smooth-L1 of sigmoid(quality) to the target), 'pairwise'
           (`pairwise_ranking_loss`, RankNet-style logistic loss over the ordered pairs of one
           image's predictions) or 'listwise' (`listwise_ranking_loss`, ListNet). The two ranking
           losses work on the logits and add `quality_pointwise_weight` x the Smooth-L1 term, the
           only term that fixes the logits' level (both ranking losses ignore a shift of one
           image's logits). See `quality_objective`.
Whichever is used, its value is 'loss_quality' (weights and logging are keyed on the name).

Normalisation: box terms are sums over matched pairs divided by `num_positives`; Smooth-L1 quality
is a sum over predictions divided by `num_predictions`; a ranking loss is a sum over images of each
image's mean over its pairs (pairwise) or its cross-entropy (listwise), divided by `num_images`,
the number of images with at least one real crop (`count_ranked_images`; images without one add
0). All default to this batch's counts; passing the global counts (over all devices) makes each
shard's terms partial sums of the global loss.

`detection_loss` is the other task's criterion (OWL-ViT fine-tuning, `detection_train`): DETR /
Scenic OWL-ViT's sigmoid focal class loss plus L1 and GIoU on Hungarian-matched tokens
(`matching.detection_match`).
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import optax
import optax.losses

from clipcrop_jax import boxes as box_lib
from clipcrop_jax import default_config
from clipcrop_jax.training import matching

LOSS_NAMES = ('loss_l1', 'loss_giou', 'loss_quality')
QUALITY_LOSSES = default_config.QUALITY_LOSSES
QUALITY_TARGETS = default_config.QUALITY_TARGETS
# A pair (i, j) of the pairwise loss needs target_i > target_j + PAIRWISE_MARGIN: targets are
# normalised scores (0.05 = 0.2 on GAIC's 1..5 scale), so nearly tied crops, whose order is mostly
# annotation noise, are not forced apart.
PAIRWISE_MARGIN = 0.05
DIAGNOSTIC_NAMES = ('matched_iou_mean',)
DEFAULT_WEIGHTS = {'loss_l1': 5.0, 'loss_giou': 2.0, 'loss_quality': 1.0}


def normalise_scores(
    scores: jax.Array, score_min: float = 1.0, score_max: float = 5.0
) -> jax.Array:
  """Maps scores linearly so score_min -> 0 and score_max -> 1, without clipping; same shape."""
  return (jnp.asarray(scores, jnp.float32) - score_min) / (score_max - score_min)


def select_positives(
    crop_scores: jax.Array, crop_mask: jax.Array, threshold: float = 4.0
) -> jax.Array:
  """Positive crops: score >= threshold, else (if an example has none) those tied at its max.

  Args:
    crop_scores: (B, C) raw scores.
    crop_mask: (B, C) bool, True for real crops.
    threshold: positive threshold on the raw score.

  Returns:
    (B, C) bool. Padding is never positive; an example without real crops has no positive.
  """
  crop_scores = jnp.asarray(crop_scores, jnp.float32)
  real = jnp.asarray(crop_mask, bool)
  above = real & (crop_scores >= threshold)
  best = jnp.max(jnp.where(real, crop_scores, -jnp.inf), axis=1, keepdims=True)  # (B, 1)
  at_best = real & (crop_scores == best)
  return jnp.where(jnp.any(above, axis=1, keepdims=True), above, at_best)


def quality_targets(
    pred_boxes_xyxy: jax.Array,
    matched: jax.Array,
    matched_score: jax.Array,
    crop_boxes_xyxy: jax.Array,
    crop_scores_norm: jax.Array,
    crop_mask: jax.Array,
    smoothing_iou: Optional[float] = 0.9,
) -> jax.Array:
  """Quality target of every prediction (no gradient).

  Args:
    pred_boxes_xyxy: (B, M, 4) predicted boxes.
    matched: (B, M) bool, True for predictions matched to a positive.
    matched_score: (B, M) normalised score of the matched crop (ignored where not matched).
    crop_boxes_xyxy: (B, C, 4) all annotated crops.
    crop_scores_norm: (B, C) their normalised scores.
    crop_mask: (B, C) bool, True for real crops.
    smoothing_iou: an unmatched prediction whose best IoU with a real crop is >= this gets that
      crop's score; None or > 1 disables the smoothing.

  Returns:
    (B, M) float32: matched_score where matched, else the smoothed score, else 0.
  """
  matched = jnp.asarray(matched, bool)
  smoothed = jnp.zeros(matched.shape, jnp.float32)
  if smoothing_iou is not None:  # A traced value works too: the > 1 test is in jnp.
    iou = jax.vmap(box_lib.pairwise_iou_xyxy)(pred_boxes_xyxy, crop_boxes_xyxy)  # (B, M, C)
    iou = jnp.where(jnp.asarray(crop_mask, bool)[:, None, :], iou, -1.0)
    best = jnp.argmax(iou, axis=-1)  # (B, M)
    best_iou = jnp.take_along_axis(iou, best[..., None], axis=-1)[..., 0]  # (B, M)
    best_score = jnp.take_along_axis(jnp.asarray(crop_scores_norm, jnp.float32), best, axis=1)
    smooth = (best_iou >= smoothing_iou) & (jnp.asarray(smoothing_iou) <= 1.0)  # (B, M)
    smoothed = jnp.where(smooth, best_score, 0.0)
  targets = jnp.where(matched, jnp.asarray(matched_score, jnp.float32), smoothed)
  return jax.lax.stop_gradient(targets)


def count_positives(
    crop_scores: jax.Array, crop_mask: jax.Array, threshold: float = 4.0
) -> jax.Array:
  """Number of positives in the batch as a float32 scalar (not clamped; psum it across shards)."""
  return jnp.sum(select_positives(crop_scores, crop_mask, threshold).astype(jnp.float32))


def count_ranked_images(crop_mask: jax.Array) -> jax.Array:
  """Images with at least one real crop, float32 scalar: the ranking losses' `num_images`."""
  return jnp.sum(jnp.any(jnp.asarray(crop_mask, bool), axis=1).astype(jnp.float32))


def iou_quality_targets(
    pred_boxes_xyxy: jax.Array,
    crop_boxes_xyxy: jax.Array,
    crop_scores_norm: jax.Array,
    crop_mask: jax.Array,
) -> jax.Array:
  """Score/IoU-aware quality target of every prediction, matched or not (no gradient).

  target_i = max over real crops c of IoU(pred_i, crop_c) * crop_scores_norm_c: a prediction is
  worth the best annotated crop it approximates, discounted by how well it approximates it.

  Args:
    pred_boxes_xyxy: (B, M, 4) predicted boxes.
    crop_boxes_xyxy: (B, C, 4) annotated crops.
    crop_scores_norm: (B, C) their normalised scores (`normalise_scores`).
    crop_mask: (B, C) bool, True for real crops; padding never contributes.

  Returns:
    (B, M) float32; 0 for every prediction of an image without real crops.
  """
  real = jnp.asarray(crop_mask, bool)
  iou = jax.vmap(box_lib.pairwise_iou_xyxy)(pred_boxes_xyxy, crop_boxes_xyxy)  # (B, M, C)
  value = iou * jnp.asarray(crop_scores_norm, jnp.float32)[:, None, :]  # (B, M, C)
  best = jnp.max(jnp.where(real[:, None, :], value, -jnp.inf), axis=-1)  # (B, M)
  targets = jnp.where(jnp.any(real, axis=1, keepdims=True), best, 0.0)
  return jax.lax.stop_gradient(targets)


def top_crops_mask(crop_scores: jax.Array, crop_mask: jax.Array, k: int) -> jax.Array:
  """(B, C) bool: each image's `k` highest-scored real crops (all of them when it has fewer;
  ties broken by position, first wins)."""
  real = jnp.asarray(crop_mask, bool)
  k = min(int(k), real.shape[1])
  scores = jnp.where(real, jnp.asarray(crop_scores, jnp.float32), -jnp.inf)
  _, idx = jax.lax.top_k(scores, k)  # (B, k)
  picked = jnp.any(jax.nn.one_hot(idx, real.shape[1], dtype=bool), axis=1)  # (B, C)
  return picked & real


def top_iou_targets(
    pred_boxes_xyxy: jax.Array, crop_boxes_xyxy: jax.Array, references: jax.Array
) -> jax.Array:
  """Quality target of every prediction: its mean IoU with the image's reference crops (no grad).

  The same quantity as IoU-Mean (Horanyi-PR / TextCrop score a crop against an example's few
  reference crops), with the image's best-scored crops (`top_crops_mask`) as the references, so
  the head learns to rank its crops the way those benchmarks judge them.

  Args:
    pred_boxes_xyxy: (B, M, 4) predicted boxes.
    crop_boxes_xyxy: (B, C, 4) annotated crops.
    references: (B, C) bool, the reference crops (padding never one).

  Returns:
    (B, M) float32 in [0, 1]; 0 for every prediction of an image without references.
  """
  references = jnp.asarray(references, bool)
  iou = jax.vmap(box_lib.pairwise_iou_xyxy)(pred_boxes_xyxy, crop_boxes_xyxy)  # (B, M, C)
  weight = references.astype(jnp.float32)[:, None, :]  # (B, 1, C)
  mean = jnp.sum(iou * weight, axis=-1) / jnp.maximum(jnp.sum(weight, axis=-1), 1.0)
  return jax.lax.stop_gradient(mean)


def pairwise_ranking_loss(
    logits: jax.Array, targets: jax.Array, image_mask: jax.Array, margin: float = PAIRWISE_MARGIN
) -> jax.Array:
  """Per-image pairwise ranking loss of the quality logits (RankNet form).

  For every ordered pair (i, j) of one image's predictions with targets_i > targets_j + margin,
  softplus(-(logits_i - logits_j)) = -log sigmoid(logits_i - logits_j), averaged over the image's
  pairs. Only the order of one image's crops matters at inference, and it is what GAIC's metrics
  (Zeng et al., CVPR 2019 / TPAMI 2020: SRCC, Acc_K/N over one image's candidates) judge; ranking
  cropping models train on it directly, e.g. VFN (Chen et al., ACM MM 2017) with a hinge
  max(0, m - (s_better - s_worse)). Such a hinge on the sigmoid qualities stops learning once a
  pair is m apart and vanishes where the sigmoid saturates; the logistic form on the logits
  (RankNet, Burges et al., ICML 2005) is its smooth counterpart with no scale m to choose in logit
  space (the `margin` here only selects the pairs).

  Args:
    logits: (B, M) quality logits.
    targets: (B, M) quality targets (no gradient).
    image_mask: (B,) bool; False images (no real crop) add 0.
    margin: minimum target difference of a pair.

  Returns:
    (B,) float32: each image's mean over its pairs, 0 for an image without pairs.
  """
  logits = jnp.asarray(logits, jnp.float32)
  targets = jnp.asarray(targets, jnp.float32)
  pairs = targets[:, :, None] > targets[:, None, :] + margin  # (B, M, M) i above j
  pairs = pairs & jnp.asarray(image_mask, bool)[:, None, None]
  per_pair = jax.nn.softplus(logits[:, None, :] - logits[:, :, None])  # (B, M, M) -(l_i - l_j)
  num_pairs = jnp.sum(pairs.astype(jnp.float32), axis=(1, 2))  # (B,)
  return jnp.sum(jnp.where(pairs, per_pair, 0.0), axis=(1, 2)) / jnp.maximum(num_pairs, 1.0)


def listwise_ranking_loss(
    logits: jax.Array, targets: jax.Array, image_mask: jax.Array, temperature: float
) -> jax.Array:
  """Per-image ListNet loss: cross-entropy of softmax(logits) under softmax(targets / temperature).

  ListNet: Cao et al., "Learning to Rank: From Pairwise Approach to Listwise Approach", ICML 2007.

  Args:
    logits: (B, M) quality logits.
    targets: (B, M) quality targets (no gradient).
    image_mask: (B,) bool; False images (no real crop) add 0.
    temperature: > 0; smaller puts the target distribution's mass on the best predictions.

  Returns:
    (B,) float32 cross-entropies (>= the target distribution's entropy, not 0, at the optimum).
  """
  target_dist = jax.nn.softmax(jnp.asarray(targets, jnp.float32) / temperature, axis=-1)
  log_pred = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  cross_entropy = -jnp.sum(target_dist * log_pred, axis=-1)  # (B,)
  return jnp.where(jnp.asarray(image_mask, bool), cross_entropy, 0.0)


def quality_objective(
    pred_quality: jax.Array,
    quality_logits: Optional[jax.Array],
    targets: jax.Array,
    crop_mask: jax.Array,
    *,
    quality_loss: str = 'smooth_l1',
    quality_pointwise_weight: float = 0.1,
    quality_temperature: float = 0.2,
    num_predictions: Optional[jax.Array] = None,
    num_images: Optional[jax.Array] = None,
) -> jax.Array:
  """The 'loss_quality' term: one of `QUALITY_LOSSES` towards `targets`.

  Args:
    pred_quality: (B, M) sigmoid of the quality logits.
    quality_logits: (B, M) the logits; needed by the ranking losses (None: 'smooth_l1' only).
    targets: (B, M) quality targets (`quality_targets` or `iou_quality_targets`).
    crop_mask: (B, C) bool, True for real crops (images without one are not ranked).
    quality_loss: 'smooth_l1' = sum of Smooth-L1 (beta 1) / num_predictions; 'pairwise' /
      'listwise' = sum over images of `pairwise_ranking_loss` / `listwise_ranking_loss` /
      num_images + quality_pointwise_weight x the 'smooth_l1' value.
    quality_pointwise_weight: weight of the Smooth-L1 term added to a ranking loss.
    quality_temperature: the listwise targets' softmax temperature. 0.2 roughly agrees with a
      calibrated head: logit(0.9) - logit(0.4) = 2.6 ~ (0.9 - 0.4) / 0.2.
    num_predictions: normaliser of the Smooth-L1 term; default B * M.
    num_images: normaliser of a ranking loss; default `count_ranked_images(crop_mask)`. Clamped
      to >= 1.

  Returns:
    float32 scalar.
  """
  if quality_loss not in QUALITY_LOSSES:
    raise ValueError(f'quality_loss={quality_loss!r}: expected one of {QUALITY_LOSSES}')
  if quality_loss != 'smooth_l1' and quality_logits is None:
    raise ValueError(f'quality_loss={quality_loss!r} needs quality_logits (it ranks the logits)')
  pred_quality = jnp.asarray(pred_quality, jnp.float32)
  if num_predictions is None:
    num_predictions = pred_quality.size
  num_predictions = jnp.maximum(jnp.asarray(num_predictions, jnp.float32), 1.0)
  smooth_l1 = optax.losses.huber_loss(pred_quality, targets, delta=1.0)  # (B, M)
  pointwise = jnp.sum(smooth_l1) / num_predictions
  if quality_loss == 'smooth_l1':
    return pointwise

  image_mask = jnp.any(jnp.asarray(crop_mask, bool), axis=1)  # (B,)
  if num_images is None:
    num_images = count_ranked_images(crop_mask)
  num_images = jnp.maximum(jax.lax.stop_gradient(jnp.asarray(num_images, jnp.float32)), 1.0)
  if quality_loss == 'pairwise':
    per_image = pairwise_ranking_loss(quality_logits, targets, image_mask)
  else:
    per_image = listwise_ranking_loss(quality_logits, targets, image_mask, quality_temperature)
  return jnp.sum(per_image) / num_images + quality_pointwise_weight * pointwise


def set_prediction_losses(
    pred_boxes_xyxy: jax.Array,
    pred_quality: jax.Array,
    crops_xyxy: jax.Array,
    crop_scores: jax.Array,
    crop_mask: jax.Array,
    *,
    positive_threshold: float = 4.0,
    score_min: float = 1.0,
    score_max: float = 5.0,
    smoothing_iou: Optional[float] = 0.9,
    l1_weight: float = 5.0,
    giou_weight: float = 2.0,
    quality_weight: float = 1.0,
    quality_logits: Optional[jax.Array] = None,
    quality_loss: str = 'smooth_l1',
    quality_target: str = 'matched',
    quality_pointwise_weight: float = 0.1,
    quality_temperature: float = 0.2,
    quality_top_k: int = 4,
    matching_solver: str = 'device',
    num_positives: Optional[jax.Array] = None,
    num_predictions: Optional[jax.Array] = None,
    num_images: Optional[jax.Array] = None,
) -> dict[str, jax.Array]:
  """Losses of one decoder layer's predictions.

  Args:
    pred_boxes_xyxy: (B, M, 4) predicted boxes.
    pred_quality: (B, M) predicted quality in [0, 1] (sigmoid of the logits).
    crops_xyxy: (B, C, 4) annotated crops.
    crop_scores: (B, C) raw scores (score_min..score_max).
    crop_mask: (B, C) bool, True for real crops.
    positive_threshold: raw score of a positive (see `select_positives`).
    score_min: raw score mapped to 0.
    score_max: raw score mapped to 1.
    smoothing_iou: see `quality_targets` ('matched' targets only).
    l1_weight: matching-cost weight of the L1 term (the loss weights are in `total_loss`).
    giou_weight: matching-cost weight of the GIoU term.
    quality_weight: matching-cost weight of the predicted quality.
    quality_logits: (B, M) logits of `pred_quality`; needed by the ranking quality losses.
    quality_loss: one of `QUALITY_LOSSES` (see `quality_objective`).
    quality_target: 'matched' (`quality_targets`), 'iou' (`iou_quality_targets`) or
      'top_iou' (`top_iou_targets` with the `quality_top_k` best crops).
    quality_top_k: the number of best-scored crops of 'top_iou' (4: as many as TextCrop's and
      the synthetic ambiguity split's reference crops).
    quality_pointwise_weight: Smooth-L1 weight added to a ranking loss.
    quality_temperature: the listwise loss's target temperature.
    matching_solver: one of `matching.SOLVERS` (same assignment either way; speed differs).
    num_positives: normaliser of the box terms; default this batch's positive count. Clamped to
      >= 1. Pass the global count when the batch is sharded.
    num_predictions: normaliser of the Smooth-L1 quality term; default B * M.
    num_images: normaliser of a ranking quality loss; default `count_ranked_images(crop_mask)`.

  Returns:
    Dict of scalars: 'loss_l1' (sum over matched pairs of the L1 distance of the cxcywh forms,
    4 coords summed, / num_positives), 'loss_giou' (sum of (1 - GIoU) / num_positives),
    'loss_quality' (`quality_objective`; by default the sum over predictions of Smooth-L1 (beta 1)
    to `quality_targets` / num_predictions) and diagnostics without gradient: 'num_positives'
    (the normaliser used), 'matched_iou_mean' (mean IoU of matched pairs in this batch, 0 if none).
  """
  pred_boxes_xyxy = jnp.asarray(pred_boxes_xyxy, jnp.float32)
  pred_quality = jnp.asarray(pred_quality, jnp.float32)
  crops_xyxy = jnp.asarray(crops_xyxy, jnp.float32)
  if quality_target not in QUALITY_TARGETS:
    raise ValueError(f'quality_target={quality_target!r}: expected one of {QUALITY_TARGETS}')
  num_preds = pred_quality.shape[1]
  positives = select_positives(crop_scores, crop_mask, positive_threshold)  # (B, C)
  scores_norm = normalise_scores(crop_scores, score_min, score_max)  # (B, C)

  pred_idx, crop_idx, valid = matching.match(
      pred_boxes_xyxy,
      pred_quality,
      crops_xyxy,
      positives,
      matching_solver,
      l1_weight=l1_weight,
      giou_weight=giou_weight,
      quality_weight=quality_weight,
  )  # (B, K) each
  src = matching.gather_matched(pred_boxes_xyxy, pred_idx)  # (B, K, 4)
  tgt = matching.gather_matched(crops_xyxy, crop_idx)  # (B, K, 4)
  weight = valid.astype(jnp.float32)  # (B, K)

  if num_positives is None:
    num_positives = jnp.sum(positives.astype(jnp.float32))
  num_positives = jnp.maximum(jax.lax.stop_gradient(jnp.asarray(num_positives, jnp.float32)), 1.0)

  l1 = jnp.sum(jnp.abs(box_lib.xyxy_to_cxcywh(src) - box_lib.xyxy_to_cxcywh(tgt)), axis=-1)
  giou = box_lib.elementwise_giou_xyxy(src, tgt)  # (B, K)
  loss_l1 = jnp.sum(l1 * weight) / num_positives
  loss_giou = jnp.sum((1.0 - giou) * weight) / num_positives

  if quality_target == 'matched':
    matched = matching.matched_mask(pred_idx, valid, num_preds)  # (B, M)
    matched_score = matching.scatter_to_preds(
        matching.gather_matched(scores_norm, crop_idx), pred_idx, valid, num_preds
    )  # (B, M)
    targets = quality_targets(
        pred_boxes_xyxy, matched, matched_score, crops_xyxy, scores_norm, crop_mask, smoothing_iou
    )  # (B, M)
  elif quality_target == 'iou':
    targets = iou_quality_targets(pred_boxes_xyxy, crops_xyxy, scores_norm, crop_mask)  # (B, M)
  else:
    references = top_crops_mask(crop_scores, crop_mask, quality_top_k)
    targets = top_iou_targets(pred_boxes_xyxy, crops_xyxy, references)  # (B, M)
  loss_quality = quality_objective(
      pred_quality,
      quality_logits,
      targets,
      crop_mask,
      quality_loss=quality_loss,
      quality_pointwise_weight=quality_pointwise_weight,
      quality_temperature=quality_temperature,
      num_predictions=num_predictions,
      num_images=num_images,
  )

  iou = box_lib.elementwise_iou_xyxy(src, tgt)  # (B, K)
  matched_iou_mean = jnp.sum(iou * weight) / jnp.maximum(jnp.sum(weight), 1.0)
  return {
      'loss_l1': loss_l1,
      'loss_giou': loss_giou,
      'loss_quality': loss_quality,
      'num_positives': num_positives,
      'matched_iou_mean': jax.lax.stop_gradient(matched_iou_mean),
  }


def total_loss(
    per_layer_terms: Sequence[Mapping[str, jax.Array]],
    weights: Optional[Mapping[str, float]] = None,
    aux: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted sum of the loss terms of the decoder layers, and a flat dict of all terms.

  Args:
    per_layer_terms: one `set_prediction_losses` dict per layer, first layer first.
    weights: weight per loss name (default `DEFAULT_WEIGHTS`); names missing here weigh 0.
    aux: sum every layer's losses; False: only the last layer's.

  Returns:
    (scalar loss, dict). The dict names the last layer's terms 'loss_l1', 'loss_giou',
    'loss_quality', 'matched_iou_mean' and layer i's (earlier layers) 'loss_l1_{i}', ...;
    'num_positives' once (from the last layer) and 'loss' (the scalar).
  """
  weights = DEFAULT_WEIGHTS if weights is None else weights
  layers = list(per_layer_terms) if aux else list(per_layer_terms)[-1:]
  if not layers:
    raise ValueError('total_loss needs the terms of at least one layer.')
  num_layers = len(per_layer_terms)
  first = num_layers - len(layers)
  loss = jnp.zeros((), jnp.float32)
  flat = {}
  for layer, terms in enumerate(layers, start=first):
    suffix = '' if layer == num_layers - 1 else f'_{layer}'
    for name in LOSS_NAMES + DIAGNOSTIC_NAMES:
      flat[name + suffix] = terms[name]
    loss = loss + sum(weights.get(name, 0.0) * terms[name] for name in LOSS_NAMES)
  flat['num_positives'] = layers[-1]['num_positives']
  flat['loss'] = loss
  return loss, flat


def decoder_losses(
    aux_boxes_xyxy: jax.Array,
    aux_quality_logits: jax.Array,
    crops_xyxy: jax.Array,
    crop_scores: jax.Array,
    crop_mask: jax.Array,
    *,
    weights: Optional[Mapping[str, float]] = None,
    aux_loss: bool = True,
    **loss_kwargs,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Losses of every decoder layer (each re-matched, as DETR) combined by `total_loss`.

  Args:
    aux_boxes_xyxy: (L, B, M, 4) predicted boxes of each layer, last layer last.
    aux_quality_logits: (L, B, M) quality logits (sigmoid is applied here; the ranking quality
      losses use the logits themselves).
    crops_xyxy: (B, C, 4) annotated crops.
    crop_scores: (B, C) raw scores.
    crop_mask: (B, C) bool.
    weights: loss weights (default `DEFAULT_WEIGHTS`).
    aux_loss: include the earlier layers; False computes and returns the last layer only.
    **loss_kwargs: keyword arguments of `set_prediction_losses` (thresholds, matching weights,
      quality objective, num_positives, num_predictions, num_images).

  Returns:
    (scalar loss, flat dict of terms), see `total_loss`.
  """
  aux_boxes_xyxy = jnp.asarray(aux_boxes_xyxy)
  aux_logits = jnp.asarray(aux_quality_logits, jnp.float32)  # (L, B, M)
  num_layers = aux_boxes_xyxy.shape[0]
  if not aux_loss:
    aux_boxes_xyxy, aux_logits = aux_boxes_xyxy[-1:], aux_logits[-1:]

  def one_layer(boxes, logits):
    return set_prediction_losses(
        boxes,
        jax.nn.sigmoid(logits),
        crops_xyxy,
        crop_scores,
        crop_mask,
        quality_logits=logits,
        **loss_kwargs,
    )

  stacked = jax.vmap(one_layer)(aux_boxes_xyxy, aux_logits)  # dict of (L',) arrays
  computed = [{k: v[i] for k, v in stacked.items()} for i in range(aux_boxes_xyxy.shape[0])]
  # Layers that were skipped (aux_loss=False) are only placeholders for the naming.
  per_layer = [{}] * (num_layers - len(computed)) + computed
  return total_loss(per_layer, weights, aux=aux_loss)


# ------------------------------------------------------------------------------------------------
# Detection (OWL-ViT fine-tuning, `detection_train`).
# ------------------------------------------------------------------------------------------------


def detection_loss(
    pred_logits: jax.Array,
    pred_boxes_cxcywh: jax.Array,
    query_mask: jax.Array,
    target_boxes_xyxy: jax.Array,
    target_labels: jax.Array,
    target_mask: jax.Array,
    *,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    cost_class: float = 2.0,
    cost_l1: float = 5.0,
    cost_giou: float = 2.0,
    weight_class: float = 2.0,
    weight_l1: float = 5.0,
    weight_giou: float = 2.0,
    matching_solver: str = 'device',
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Set-prediction detection loss.

  Args:
    pred_logits: (B, P, Q) token x query logits (`pred_logits` of the model).
    pred_boxes_cxcywh: (B, P, 4) predicted boxes, cxcywh in [0, 1].
    query_mask: (B, Q) bool, True for real queries (padded ones add no loss).
    target_boxes_xyxy: (B, N, 4) object boxes, xyxy in [0, 1].
    target_labels: (B, N) int, each object's query index.
    target_mask: (B, N) bool, True for real objects.
    focal_alpha, focal_gamma, cost_*: matching / focal parameters; weight_*: loss weights.
    matching_solver: one of `matching.SOLVERS`.

  Returns:
    (loss, terms) with terms loss_class, loss_l1, loss_giou (unweighted, each summed and divided
    by the number of real objects in the whole batch, at least 1), loss and num_objects.
  """
  target_mask = jnp.asarray(target_mask, bool)
  query_mask = jnp.asarray(query_mask, bool)
  b, p, q = pred_logits.shape
  pred_idx, target_idx, valid = matching.detection_match(
      pred_logits,
      pred_boxes_cxcywh,
      target_boxes_xyxy,
      target_labels,
      target_mask,
      focal_alpha=focal_alpha,
      focal_gamma=focal_gamma,
      cost_class=cost_class,
      cost_l1=cost_l1,
      cost_giou=cost_giou,
  )
  num_objects = jnp.sum(target_mask.astype(jnp.float32))
  norm = jnp.maximum(num_objects, 1.0)

  # Class targets: 1 at (matched token, its object's label), 0 elsewhere.
  matched_labels = matching.gather_matched(target_labels, target_idx)  # (B, K)
  pair_token = jax.nn.one_hot(pred_idx, p) * valid[..., None]  # (B, K, P)
  pair_label = jax.nn.one_hot(matched_labels, q)  # (B, K, Q)
  targets = jnp.minimum(jnp.einsum('bkp,bkq->bpq', pair_token, pair_label), 1.0)
  focal = optax.sigmoid_focal_loss(
      pred_logits.astype(jnp.float32), targets, alpha=focal_alpha, gamma=focal_gamma
  )
  loss_class = jnp.sum(jnp.where(query_mask[:, None, :], focal, 0.0)) / norm

  # Box terms on the matched pairs.
  pred_m = matching.gather_matched(pred_boxes_cxcywh.astype(jnp.float32), pred_idx)  # (B, K, 4)
  tgt_m = matching.gather_matched(target_boxes_xyxy.astype(jnp.float32), target_idx)
  l1 = jnp.sum(jnp.abs(pred_m - box_lib.xyxy_to_cxcywh(tgt_m)), axis=-1)
  giou = box_lib.elementwise_giou_xyxy(box_lib.cxcywh_to_xyxy(pred_m), tgt_m)
  loss_l1 = jnp.sum(jnp.where(valid, l1, 0.0)) / norm
  loss_giou = jnp.sum(jnp.where(valid, 1.0 - giou, 0.0)) / norm

  loss = weight_class * loss_class + weight_l1 * loss_l1 + weight_giou * loss_giou
  return loss, {
      'loss': loss,
      'loss_class': loss_class,
      'loss_l1': loss_l1,
      'loss_giou': loss_giou,
      'num_objects': num_objects,
  }
