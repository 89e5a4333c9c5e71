"""Tests for clipcrop_jax.metrics: hand-computed values, scipy parity and a brute-force GAIC oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from clipcrop_jax import metrics


def _unit_boxes(n: int) -> np.ndarray:
  """(n, 4) disjoint unit squares; box i = (i, 0, i + 1, 1)."""
  x = np.arange(n, dtype=np.float64)
  return np.stack([x, np.zeros(n), x + 1, np.ones(n)], axis=1)


# ------------------------------------------------------------------ text-conditioned metrics


def test_iou_mean_max_hand_values():
  # (0,0,2,2) vs itself: IoU 1. vs (1,1,3,3): inter 1, union 4 + 4 - 1 = 7 -> 1/7.
  iou_mean, iou_max = metrics.iou_mean_max([0, 0, 2, 2], [[0, 0, 2, 2], [1, 1, 3, 3]])
  assert iou_mean == pytest.approx(4 / 7)
  assert iou_max == pytest.approx(1.0)
  # Disjoint reference and a degenerate one: both IoU 0.
  assert metrics.iou_mean_max([0, 0, 1, 1], [[5, 5, 6, 6], [2, 2, 2, 2]]) == (0.0, 0.0)


def test_iou_mean_max_rejects_empty_references_and_bad_shapes():
  with pytest.raises(ValueError, match='reference'):
    metrics.iou_mean_max([0, 0, 1, 1], np.zeros((0, 4)))
  with pytest.raises(ValueError, match='pred_box'):
    metrics.iou_mean_max([[0, 0, 1, 1]] * 2, [[0, 0, 1, 1]])


def test_text_crop_metrics_averages_over_examples():
  acc = metrics.TextCropMetrics()
  assert acc.result()['num_examples'] == 0 and math.isnan(acc.result()['iou_mean'])
  acc.add([0, 0, 2, 2], [[0, 0, 2, 2], [1, 1, 3, 3]])  # mean 4/7, max 1
  acc.add([0, 0, 1, 1], [[0, 0, 2, 1]])  # inter 1, union 2 -> mean = max = 1/2
  result = acc.result()
  assert result['num_examples'] == 2
  assert result['iou_mean'] == pytest.approx((4 / 7 + 0.5) / 2)
  assert result['iou_max'] == pytest.approx((1 + 0.5) / 2)


def test_non_finite_boxes_score_zero_instead_of_raising():
  # A diverged model's NaN box is scored (IoU 0), not an error; shapes are still checked.
  assert metrics.iou_mean_max([0, 0, np.nan, 1], [[0, 0, 1, 1], [0, 0, 2, 2]]) == (0.0, 0.0)
  idx, ious = metrics.map_to_candidates([[np.nan, 0, 1, 1], [1, 0, 2, 1]], _unit_boxes(3))
  assert idx.tolist() == [0, 1] and ious.tolist() == [0.0, 1.0]
  with pytest.raises(ValueError, match=r'candidates_xyxy must have shape \(N, 4\)'):
    metrics.map_to_candidates(_unit_boxes(2), [0, 0, 1, 1])
  with pytest.raises(ValueError, match=r'candidates_xyxy must hold at least 1 box'):
    metrics.candidate_scores_from_predictions(_unit_boxes(2), [0.5, 0.5], np.zeros((0, 4)))


# ------------------------------------------------------------------ map_to_candidates


def test_map_to_candidates_dedupe_order_max_outputs_and_tie():
  cands = _unit_boxes(5)
  preds = np.array(
      [
          [2.0, 0, 3, 1],  # -> 2, IoU 1
          [2.1, 0, 3.1, 1],  # -> 2 again (IoU 0.9/1.1): duplicate, dropped
          [0.0, 0, 1, 0.5],  # -> 0, IoU 0.5
          [3.5, 0, 4.5, 1],  # IoU 1/3 with both 3 and 4: tie -> lowest index 3
          [1.0, 0, 2, 1],  # -> 1, IoU 1
      ]
  )
  idx, ious = metrics.map_to_candidates(preds, cands)
  assert idx.tolist() == [2, 0, 3, 1]
  assert idx.dtype == np.int64
  np.testing.assert_allclose(ious, [1.0, 0.5, 1 / 3, 1.0])
  idx2, ious2 = metrics.map_to_candidates(preds, cands, max_outputs=2)
  assert idx2.tolist() == [2, 0]  # counts distinct candidates, not predictions
  np.testing.assert_allclose(ious2, [1.0, 0.5])
  assert metrics.map_to_candidates(preds, cands, max_outputs=0)[0].tolist() == []
  empty_idx, empty_ious = metrics.map_to_candidates(np.zeros((0, 4)), cands)
  assert empty_idx.shape == (0,) and empty_ious.shape == (0,)
  with pytest.raises(ValueError):
    metrics.map_to_candidates(preds, np.zeros((0, 4)))


# ------------------------------------------------------------------ Acc / wAcc

# 12 candidates. Sorted by MOS, descending (stable: equal MOS keep index order):
#   rank: 0    1    2    3    4    5    6    7    8    9    10   11
#   idx:  1    7    3    10   4    5    8    0    9    2    11   6
#   MOS:  4.5  4.2  4.0  3.8  3.5  3.5  3.5  3.0  2.5  2.0  1.5  1.0
# t_5 = 3.5 (three-way tie at 5th place: idx 4, 5, 8), t_10 = 2.0.
_MOS12 = np.array([3.0, 4.5, 2.0, 4.0, 3.5, 3.5, 1.0, 4.2, 3.5, 2.5, 3.8, 1.5])


def test_gt_ranks_stable_on_ties():
  assert metrics.gt_ranks(_MOS12).tolist() == [7, 0, 9, 2, 4, 5, 11, 1, 6, 8, 3, 10]


def test_gaic_image_metrics_hand_values_with_tie_at_fifth():
  # Selection [8, 0, 1, 6]: MOS 3.5, 3.0, 4.5, 1.0; GT ranks 6, 7, 0, 11.
  # Acc/5 (MOS >= 3.5): hit, miss, hit, miss -> 1, 1/2, 2/3, 2/4. idx 8 is a hit only via the tie.
  # Acc/10 (MOS >= 2.0): hit, hit, hit, miss -> 1, 1, 1, 3/4.
  # wAcc/5 (rank <= 4, sorted ranks): K=1 [6] -> 0; K=2 [6,7] -> 0; K=3 [0,6,7] -> 1/3;
  #   K=4 [0,6,7,11] -> 1/4.
  # wAcc/10 (rank <= 9): K=1 [6] -> e^-.6; K=2 [6,7] -> (e^-.6 + e^-(7-1)/10)/2 = e^-.6;
  #   K=3 [0,6,7] -> (1 + e^-(6-1)/10 + e^-(7-2)/10)/3 = (1 + 2e^-.5)/3; K=4 -> (1 + 2e^-.5)/4.
  got = metrics.gaic_image_metrics([8, 0, 1, 6], _MOS12)
  e5, e6 = math.exp(-0.5), math.exp(-0.6)
  expected = {
      'acc1_5': 1,
      'acc2_5': 1 / 2,
      'acc3_5': 2 / 3,
      'acc4_5': 1 / 2,
      'acc1_10': 1,
      'acc2_10': 1,
      'acc3_10': 1,
      'acc4_10': 3 / 4,
      'wacc1_5': 0,
      'wacc2_5': 0,
      'wacc3_5': 1 / 3,
      'wacc4_5': 1 / 4,
      'wacc1_10': e6,
      'wacc2_10': e6,
      'wacc3_10': (1 + 2 * e5) / 3,
      'wacc4_10': (1 + 2 * e5) / 4,
  }
  assert set(got) == set(expected)
  for key, value in expected.items():
    assert got[key] == pytest.approx(value), key


def test_gaic_tied_candidates_differ_only_in_wacc():
  # idx 4 and 5 have the same MOS (3.5) but ranks 4 and 5: both Acc_{1/5} hits, only idx 4 is a
  # wAcc_{1/5} hit, with weight exp(-(4 - 0)/5).
  at4 = metrics.gaic_image_metrics([4], _MOS12)
  at5 = metrics.gaic_image_metrics([5], _MOS12)
  assert at4['acc1_5'] == at5['acc1_5'] == 1.0
  assert at4['wacc1_5'] == pytest.approx(math.exp(-0.8))
  assert at5['wacc1_5'] == 0.0


def test_gaic_fewer_selections_count_as_misses():
  got = metrics.gaic_image_metrics([1], _MOS12)  # best crop, rank 0
  for k in (1, 2, 3, 4):
    assert got[f'acc{k}_5'] == pytest.approx(1 / k)
    assert got[f'wacc{k}_10'] == pytest.approx(1 / k)
  none = metrics.gaic_image_metrics(np.zeros((0,), np.int64), _MOS12)
  assert all(v == 0.0 for v in none.values())


def test_gaic_fewer_candidates_than_n():
  # C = 3 < 5: threshold is the worst MOS (1.0), so even the worst crop is an Acc hit.
  got = metrics.gaic_image_metrics([0], [1.0, 2.0, 3.0])
  assert got['acc1_5'] == 1.0 and got['acc1_10'] == 1.0
  assert got['wacc1_5'] == pytest.approx(math.exp(-2 / 5))  # rank 2


def test_gaic_image_metrics_validates_selection():
  with pytest.raises(ValueError):
    metrics.gaic_image_metrics([0, 0], _MOS12)
  with pytest.raises(ValueError):
    metrics.gaic_image_metrics([12], _MOS12)


def _oracle(selection: list[int], mos: np.ndarray, k: int, n: int) -> tuple[float, float]:
  """Acc_{K/N}, wAcc_{K/N} by plain loops, official-code style (Python sorted, list.index)."""
  desc = np.sort(mos)[::-1]
  threshold = desc[n - 1] if len(mos) >= n else desc[-1]
  id_mos = sorted(range(len(mos)), key=lambda i: mos[i], reverse=True)
  acc = 0.0
  for j in range(k):
    if j < len(selection) and mos[selection[j]] >= threshold:
      acc += 1.0
  ranks = sorted(id_mos.index(c) for c in selection[:k])
  wacc = 0.0
  for j, r in enumerate(ranks):
    if r <= n - 1:
      wacc += math.exp(-(r - j) / n)
  return acc / k, wacc / k


def test_gaic_image_metrics_matches_brute_force_oracle():
  rng = np.random.default_rng(0)
  for trial in range(300):
    c = int(rng.integers(1, 25))
    # Coarse MOS values so that ties (including at the 5th / 10th place) are frequent.
    mos = rng.integers(2, 10, size=c) / 2.0 if trial % 2 else rng.uniform(1, 5, size=c)
    selection = rng.permutation(c)[: int(rng.integers(0, min(c, 6) + 1))].tolist()
    got = metrics.gaic_image_metrics(selection, mos)
    for k in (1, 2, 3, 4):
      for n in (5, 10):
        acc, wacc = _oracle(selection, mos, k, n)
        assert got[f'acc{k}_{n}'] == pytest.approx(acc), (trial, k, n)
        assert got[f'wacc{k}_{n}'] == pytest.approx(wacc), (trial, k, n)


# ------------------------------------------------------------------ SRCC / PCC


def test_srcc_pcc_matches_scipy_and_handles_constant_input():
  rng = np.random.default_rng(1)
  for _ in range(5):
    pred, mos = rng.normal(size=20), rng.normal(size=20)
    srcc, pcc = metrics.srcc_pcc(pred, mos)
    assert srcc == pytest.approx(stats.spearmanr(pred, mos)[0])
    assert pcc == pytest.approx(stats.pearsonr(pred, mos)[0])
  tied = np.array([0.0, 0.0, 0.5, 0.9, 0.0])
  mos = np.array([2.0, 3.0, 3.5, 4.0, 1.0])
  assert metrics.srcc_pcc(tied, mos)[0] == pytest.approx(stats.spearmanr(tied, mos)[0])
  assert all(math.isnan(v) for v in metrics.srcc_pcc(np.zeros(5), mos))
  assert all(math.isnan(v) for v in metrics.srcc_pcc(mos, np.full(5, 3.0)))
  assert all(math.isnan(v) for v in metrics.srcc_pcc([1.0], [2.0]))


def test_candidate_scores_from_predictions_hand_case():
  cands = np.array([[0, 0, 2, 2], [1, 1, 3, 3], [0, 0, 4, 4]], np.float64)
  preds = np.array(
      [
          [0, 0, 2, 2],  # cand 0, IoU 1, conf 0.3
          [0, 0, 2, 2],  # cand 0, IoU 1, conf 0.8 -> cand 0 keeps the max, 0.8
          [0, 0, 3, 3],  # IoU 4/9, 4/9, 9/16 -> cand 2 (0.5625), conf 0.9
          [1, 1, 3, 3.5],  # cand 1: inter 4, union 5 -> 0.8; cand 2: 5/16. conf 0.4
          [3, 3, 5, 5],  # best cand 2 with IoU 1/19 < 0.5: ignored, conf 1.0
      ],
      np.float64,
  )
  conf = np.array([0.3, 0.8, 0.9, 0.4, 1.0])
  np.testing.assert_allclose(
      metrics.candidate_scores_from_predictions(preds, conf, cands), [0.8, 0.4, 0.9]
  )
  np.testing.assert_allclose(
      metrics.candidate_scores_from_predictions(preds, conf, cands, iou_threshold=0.6),
      [0.8, 0.4, 0.0],
  )
  np.testing.assert_allclose(
      metrics.candidate_scores_from_predictions(np.zeros((0, 4)), np.zeros(0), cands), [0, 0, 0]
  )


# ------------------------------------------------------------------ GaicMetrics


def test_gaic_metrics_accumulates_over_images_in_percent():
  cands = _unit_boxes(12)
  acc = metrics.GaicMetrics()
  # Image A: the hand case above, selection [8, 0, 1, 6] after dropping a near-duplicate of 8.
  preds_a = np.concatenate([cands[[8]], [[8.1, 0, 9.1, 1]], cands[[0, 1, 6, 2]]])
  conf_a = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
  acc.add(preds_a, conf_a, cands, _MOS12)
  # Image B: one prediction half-way between candidates 1 and 2 (IoU 1/3 each; tie -> 1, the best
  # crop). Its IoU < 0.5, so every candidate score is 0 and SRCC / PCC are undefined (excluded).
  image_b = acc.add([[1.5, 0, 2.5, 1]], [0.9], cands, _MOS12)
  assert math.isnan(image_b['srcc']) and image_b['top1_iou'] == pytest.approx(1 / 3)
  result = acc.result()
  assert list(result) == metrics.gaic_result_keys()
  assert result['num_images'] == 2
  # acc{K}_5 per image: A = 1, 1/2, 2/3, 1/2 (5th candidate 2 ignored: only 4 kept); B = 1/K.
  a5, b = [1, 1 / 2, 2 / 3, 1 / 2], [1, 1 / 2, 1 / 3, 1 / 4]
  for k in range(4):
    assert result[f'acc{k + 1}_5'] == pytest.approx(100 * (a5[k] + b[k]) / 2)
  a10 = [1, 1, 1, 3 / 4]
  assert result['acc4_10'] == pytest.approx(100 * (3 / 4 + 1 / 4) / 2)
  assert result['acc5'] == pytest.approx(np.mean([100 * (a5[k] + b[k]) / 2 for k in range(4)]))
  assert result['acc10'] == pytest.approx(np.mean([100 * (a10[k] + b[k]) / 2 for k in range(4)]))
  assert result['wacc3_5'] == pytest.approx(100 * (1 / 3 + 1 / 3) / 2)
  assert result['wacc1_10'] == pytest.approx(100 * (math.exp(-0.6) + 1) / 2)
  # SRCC / PCC from image A only. Scores: cand 8 -> 0.9 (max over it and its duplicate), 0 -> 0.7,
  # 1 -> 0.6, 6 -> 0.5, 2 -> 0.4 (the 5th distinct candidate is unused by Acc but scored), rest 0.
  scores = np.zeros(12)
  scores[[8, 0, 1, 6, 2]] = [0.9, 0.7, 0.6, 0.5, 0.4]
  assert result['num_srcc_images'] == 1 and result['num_pcc_images'] == 1
  assert result['srcc'] == pytest.approx(stats.spearmanr(scores, _MOS12)[0])
  assert result['pcc'] == pytest.approx(stats.pearsonr(scores, _MOS12)[0])
  assert result['mapped_iou_mean'] == pytest.approx((1 + 1 / 3) / 2)


def test_gaic_metrics_empty_and_no_predictions():
  assert math.isnan(metrics.GaicMetrics().result()['acc1_5'])
  acc = metrics.GaicMetrics()
  acc.add(np.zeros((0, 4)), np.zeros(0), _unit_boxes(12), _MOS12)
  result = acc.result()
  assert result['acc1_5'] == 0.0 and result['num_images'] == 1
  assert math.isnan(result['mapped_iou_mean']) and result['num_srcc_images'] == 0


# ------------------------------------------------------------------ Markdown


def test_format_markdown_table():
  rows = {
      'ours': {'iou_mean': 0.55512, 'num_examples': 120},
      'baseline': {'iou_mean': 1 / 3, 'iou_max': np.float32(0.5)},
  }
  text = metrics.format_markdown_table(rows, title='TextCrop')
  assert text.split('\n') == [
      '### TextCrop',
      '',
      '| method | iou_mean | num_examples | iou_max |',
      '|---|---:|---:|---:|',
      '| ours | 0.5551 | 120 | — |',
      '| baseline | 0.3333 | — | 0.5000 |',
  ]
  text = metrics.format_markdown_table(rows, columns=['num_examples'])
  assert text.split('\n')[2:] == ['| ours | 120 |', '| baseline | — |']


def test_quality_iou_srcc_matches_scipy_and_is_nan_when_undefined():
  refs = np.array([[0, 0, 10, 10], [2, 2, 12, 12]], np.float64)
  boxes = np.array([[0, 0, 10, 10], [5, 5, 15, 15], [20, 20, 30, 30], [1, 1, 11, 11]], np.float64)
  quality = np.array([0.9, 0.2, 0.5, 0.7])
  ious = []
  for b in boxes:
    per_ref = []
    for r in refs:
      lt, rb = np.maximum(b[:2], r[:2]), np.minimum(b[2:], r[2:])
      inter = np.prod(np.clip(rb - lt, 0, None))
      per_ref.append(inter / (100 + 100 - inter))
    ious.append(np.mean(per_ref))
  assert metrics.quality_iou_srcc(boxes, quality, refs) == pytest.approx(
      stats.spearmanr(quality, ious)[0]
  )
  # A head that ranks exactly by IoU scores 1; the reverse -1.
  assert metrics.quality_iou_srcc(boxes, np.array(ious), refs) == pytest.approx(1.0)
  assert metrics.quality_iou_srcc(boxes, -np.array(ious), refs) == pytest.approx(-1.0)
  assert math.isnan(metrics.quality_iou_srcc(boxes, np.ones(4), refs))  # constant quality
  assert math.isnan(metrics.quality_iou_srcc(boxes[:1], quality[:1], refs))
  with pytest.raises(ValueError, match='quality has 3 values for 4 boxes'):
    metrics.quality_iou_srcc(boxes, quality[:3], refs)


def test_paired_bootstrap_ci_oracle_and_clusters():
  rng = np.random.default_rng(3)
  d = rng.normal(0.2, 0.1, size=400)
  mean, lo, hi = metrics.paired_bootstrap_ci(d, num_resamples=4000, seed=1)
  assert mean == pytest.approx(d.mean())
  # Normal-theory interval of the mean as the oracle (n = 400: the bootstrap agrees closely).
  se = d.std(ddof=1) / np.sqrt(len(d))
  assert lo == pytest.approx(d.mean() - 1.96 * se, abs=0.25 * se)
  assert hi == pytest.approx(d.mean() + 1.96 * se, abs=0.25 * se)
  assert (lo, hi) == metrics.paired_bootstrap_ci(d, num_resamples=4000, seed=1)[1:]
  # Duplicated examples in one cluster are not independent evidence: the cluster bootstrap of
  # the doubled data is as wide as the plain bootstrap of the original (not sqrt(2) narrower).
  doubled = np.repeat(d, 2)
  clusters = np.repeat(np.arange(len(d)), 2)
  _, clo, chi = metrics.paired_bootstrap_ci(doubled, clusters, num_resamples=4000, seed=1)
  _, nlo, nhi = metrics.paired_bootstrap_ci(doubled, num_resamples=4000, seed=1)
  assert (chi - clo) == pytest.approx(hi - lo, rel=0.15)
  assert (nhi - nlo) < 0.85 * (chi - clo)
  # A constant difference has a zero-width interval; an empty input is refused.
  assert metrics.paired_bootstrap_ci(np.full(5, 0.3), num_resamples=100)[1:] == pytest.approx(
      (0.3, 0.3)
  )
  with pytest.raises(ValueError, match='at least one'):
    metrics.paired_bootstrap_ci([])
  with pytest.raises(ValueError, match='3 cluster labels for 2'):
    metrics.paired_bootstrap_ci([0.1, 0.2], ['a', 'b', 'c'])
