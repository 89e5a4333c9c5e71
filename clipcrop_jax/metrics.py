"""Host-side evaluation metrics: text-conditioned IoU metrics and the GAIC ranking metrics.

Everything here is NumPy / SciPy on the host (evaluation does not run under jit). Boxes are
(x0, y0, x1, y1) corners (`xyxy`) in any consistent units (pixels or normalised); a box with
x1 <= x0 or y1 <= y0 has area 0. IoU is `boxes.pairwise_iou_xyxy_np`: exact (intersection / union,
no epsilon) and 0 where the union is empty. Non-finite predicted or reference boxes are not
rejected: they score IoU 0 (a diverged model is scored, not a crash).

Text-conditioned benchmarks (Horanyi-PR, TextCrop, the synthetic ambiguity split): one predicted
(top-1) crop per (image, text) example is scored against the example's R reference crops:
IoU-Mean = mean over references, IoU-Max = max over references, each then averaged over examples.

GAIC (Zeng et al.): each image has C annotated candidate crops with a mean opinion score (MOS).
A set-prediction model returns free boxes, so they are first mapped to candidates
(`map_to_candidates`, largest IoU, duplicates dropped), and Acc_{K/N} / wAcc_{K/N} are then computed
exactly as in the official GAIC evaluation code (`gaic_image_metrics`). SRCC / PCC need a score for
every candidate; `candidate_scores_from_predictions` provides one, which is NON-STANDARD (there is
no official mapping for set-prediction models).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
from scipy import stats

from clipcrop_jax import boxes as box_lib

GAIC_KS = (1, 2, 3, 4)
GAIC_NS = (5, 10)


# ----------------------------------------------------------------------------------------------
# Text-conditioned metrics (Horanyi-PR, TextCrop, synthetic ambiguity split).
# ----------------------------------------------------------------------------------------------


def iou_mean_max(pred_box_xyxy: Any, reference_boxes_xyxy: Any) -> tuple[float, float]:
  """IoU-Mean and IoU-Max of one predicted crop against an example's reference crops.

  Args:
    pred_box_xyxy: (4,) the top-1 predicted crop (x0, y0, x1, y1).
    reference_boxes_xyxy: (R, 4) the example's reference crops, R >= 1, same units.

  Returns:
    (iou_mean, iou_max): mean and max over the R references of IoU(pred, reference).

  Raises:
    ValueError: if the prediction is not a single box or there are no reference boxes (R = 0).
  """
  pred = box_lib.as_box_xyxy_np(pred_box_xyxy, 'pred_box_xyxy', finite=False)
  refs = box_lib.as_boxes_xyxy_np(
      reference_boxes_xyxy, 'reference_boxes_xyxy', min_count=1, finite=False
  )
  ious = box_lib.pairwise_iou_xyxy_np(pred[None], refs)[0]
  return float(ious.mean()), float(ious.max())


class TextCropMetrics:
  """Accumulates IoU-Mean / IoU-Max over (image, text) examples.

  Usage: call `add` once per (image, text) example, then `result()`. Each example has equal weight
  (the per-example mean and max are averaged over examples).
  """

  def __init__(self) -> None:
    self._means: list[float] = []
    self._maxes: list[float] = []

  def __len__(self) -> int:
    return len(self._means)

  def add(self, pred_box: Any, reference_boxes: Any) -> tuple[float, float]:
    """Adds one example.

    Args:
      pred_box: (4,) top-1 predicted crop, xyxy.
      reference_boxes: (R, 4) reference crops, xyxy, R >= 1.

    Returns:
      The example's (iou_mean, iou_max).
    """
    iou_mean, iou_max = iou_mean_max(pred_box, reference_boxes)
    self._means.append(iou_mean)
    self._maxes.append(iou_max)
    return iou_mean, iou_max

  @property
  def per_example_iou_mean(self) -> list[float]:
    """The IoU-Mean of every added example, in the order added (paired comparisons)."""
    return list(self._means)

  def result(self) -> dict[str, Any]:
    """{'iou_mean': float, 'iou_max': float, 'num_examples': int}; NaN means with 0 examples."""
    n = len(self._means)
    if n == 0:
      return {'iou_mean': math.nan, 'iou_max': math.nan, 'num_examples': 0}
    return {
        'iou_mean': float(np.mean(self._means)),
        'iou_max': float(np.mean(self._maxes)),
        'num_examples': n,
    }


def quality_iou_srcc(pred_boxes_xyxy: Any, quality: Any, reference_boxes_xyxy: Any) -> float:
  """Spearman rank correlation, over one example's predictions, of quality and IoU-Mean.

  How well a model's quality head ranks its own crops: each of the M predicted crops gets its
  IoU-Mean against the example's reference crops (`iou_mean_max`), and the M qualities are
  rank-correlated with those M values.

  Args:
    pred_boxes_xyxy: (M, 4) predicted crops, xyxy.
    quality: (M,) their predicted quality (any monotone score).
    reference_boxes_xyxy: (R, 4) reference crops, R >= 1, same units.

  Returns:
    The coefficient in [-1, 1]; NaN when M < 2 or either side is constant (undefined).
  """
  boxes = box_lib.as_boxes_xyxy_np(pred_boxes_xyxy, 'pred_boxes_xyxy', finite=False)
  refs = box_lib.as_boxes_xyxy_np(
      reference_boxes_xyxy, 'reference_boxes_xyxy', min_count=1, finite=False
  )
  quality = np.asarray(quality, np.float64).reshape(-1)
  if len(quality) != len(boxes):
    raise ValueError(f'quality has {len(quality)} values for {len(boxes)} boxes')
  ious = box_lib.pairwise_iou_xyxy_np(boxes, refs).mean(axis=1)
  if len(boxes) < 2 or np.ptp(ious) == 0 or np.ptp(quality) == 0:
    return math.nan
  return float(stats.spearmanr(quality, ious)[0])


def paired_bootstrap_ci(
    differences: Any,
    clusters: Optional[Any] = None,
    *,
    num_resamples: int = 10000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
  """Mean of paired per-example differences and its percentile bootstrap interval.

  Args:
    differences: (N,) per-example differences of two methods on the same examples (e.g.
      IoU-Mean of A minus IoU-Mean of B).
    clusters: optional (N,) hashable labels; examples of one cluster (e.g. the two captions of
      one image, of one seed) are resampled together (a cluster bootstrap), which keeps the
      interval honest when examples within a cluster are correlated. None = every example is
      its own cluster.
    num_resamples: bootstrap resamples.
    level: coverage of the interval.
    seed: NumPy seed of the resampling (the interval is deterministic).

  Returns:
    (mean difference, lower, upper): lower / upper are the (1 - level) / 2 and (1 + level) / 2
    percentiles of the resampled means (each resample draws as many clusters as there are,
    with replacement, and averages their examples).
  """
  d = np.asarray(differences, np.float64).reshape(-1)
  if d.size == 0:
    raise ValueError('paired_bootstrap_ci needs at least one difference')
  if clusters is None:
    ids = np.arange(d.size)
  else:
    _, ids = np.unique(np.asarray(clusters, dtype=object).astype(str), return_inverse=True)
    if len(ids) != d.size:
      raise ValueError(f'{len(ids)} cluster labels for {d.size} differences')
  num = int(ids.max()) + 1
  sums = np.bincount(ids, weights=d, minlength=num)
  counts = np.bincount(ids, minlength=num).astype(np.float64)
  rng = np.random.default_rng(seed)
  draws = rng.integers(0, num, size=(num_resamples, num))
  means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
  alpha = (1.0 - level) / 2
  lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
  return float(d.mean()), float(lo), float(hi)


# ----------------------------------------------------------------------------------------------
# GAIC.
# ----------------------------------------------------------------------------------------------


def map_to_candidates(
    ranked_pred_xyxy: Any, candidates_xyxy: Any, max_outputs: Optional[int] = None
) -> tuple[np.ndarray, np.ndarray]:
  """Maps ranked predicted crops to distinct GAIC candidates (the §1.8 protocol).

  Each prediction, in rank order, is mapped to the candidate with the largest IoU (exact ties go to
  the lowest candidate index). A prediction whose candidate was already taken by a better-ranked
  prediction is dropped. Stops once `max_outputs` distinct candidates are collected. A prediction
  that overlaps no candidate still maps to candidate 0 with IoU 0 (the IoU is returned so callers
  can see it).

  Args:
    ranked_pred_xyxy: (K, 4) predicted crops, best first (K may be 0).
    candidates_xyxy: (C, 4) the image's candidate crops, C >= 1, same units as the predictions.
    max_outputs: stop after this many distinct candidates; None keeps all.

  Returns:
    (cand_idx, ious): (k,) int64 distinct candidate indices in rank order and (k,) float64 IoU of
    each kept prediction with its candidate; k <= min(K, C, max_outputs).

  Raises:
    ValueError: on bad shapes, C = 0 or a negative max_outputs.
  """
  cands = box_lib.as_boxes_xyxy_np(candidates_xyxy, 'candidates_xyxy', min_count=1, finite=False)
  preds = np.asarray(ranked_pred_xyxy, dtype=np.float64).reshape(-1, 4)
  if max_outputs is not None and max_outputs < 0:
    raise ValueError(f'max_outputs must be >= 0 or None; got {max_outputs}')
  limit = len(preds) if max_outputs is None else max_outputs
  chosen: list[int] = []
  chosen_ious: list[float] = []
  if len(preds) and limit > 0:
    iou = box_lib.pairwise_iou_xyxy_np(preds, cands)  # (K, C)
    best = np.argmax(iou, axis=1)  # first maximum = lowest index on ties
    seen: set[int] = set()
    for row, cand in enumerate(best):
      cand = int(cand)
      if cand in seen:
        continue
      seen.add(cand)
      chosen.append(cand)
      chosen_ious.append(float(iou[row, cand]))
      if len(chosen) >= limit:
        break
  return np.asarray(chosen, dtype=np.int64), np.asarray(chosen_ious, dtype=np.float64)


def gt_ranks(candidate_mos: Any) -> np.ndarray:
  """0-based GT rank of each candidate: (C,) MOS -> (C,) int64.

  Candidates are ranked by MOS descending with a STABLE sort, so equal MOS keep index order (the
  lower index gets the better rank). This matches the official GAIC code, which ranks with Python's
  `sorted(range(C), key=MOS.__getitem__, reverse=True)` (stable, ties in original order).
  """
  mos = np.asarray(candidate_mos, dtype=np.float64).reshape(-1)
  order = np.argsort(-mos, kind='stable')
  ranks = np.empty(len(mos), dtype=np.int64)
  ranks[order] = np.arange(len(mos))
  return ranks


def gaic_image_metrics(
    selected_candidate_idx: Any,
    candidate_scores: Any,
    ks: Sequence[int] = GAIC_KS,
    ns: Sequence[int] = GAIC_NS,
) -> dict[str, float]:
  """Acc_{K/N} and wAcc_{K/N} of one GAIC image, as fractions in [0, 1].

  Definitions (official GAIC `TestAccuracy.py` / `test.py`):
    * Acc_{K/N} = (1/K) sum_{j<K} 1[MOS(out_j) >= t_N], where t_N is the MOS of the N-th best
      candidate (ties with t_N count as hits).
    * wAcc_{K/N}: let r_0 <= ... <= r_{K-1} be the 0-based GT ranks (`gt_ranks`: MOS descending,
      stable sort, lower index first on ties) of the K returned crops, sorted ascending. Then
      wAcc = (1/K) sum_j 1[r_j <= N-1] exp(-(r_j - j) / N). Note that wAcc uses the rank, not the
      MOS: a crop tied with the N-th best MOS but ranked after it is an Acc hit but not a wAcc hit.

  Conventions for a set-prediction model (not covered by the official code, which always has a
  score for every candidate):
    * If fewer than K distinct selections exist (k < K), the missing ones count as misses: the sums
      run over the k available crops and are still divided by K.
    * If the image has fewer than N candidates (C < N), t_N is the MOS of the last (worst)
      candidate, i.e. every selection is an Acc hit, and every rank satisfies r_j <= N-1.

  Args:
    selected_candidate_idx: (k,) distinct candidate indices, best first (e.g. from
      `map_to_candidates`); only the first max(ks) are used.
    candidate_scores: (C,) MOS of every candidate of the image.
    ks: the K values.
    ns: the N values.

  Returns:
    {'acc{K}_{N}': float, 'wacc{K}_{N}': float} for every K in ks, N in ns.

  Raises:
    ValueError: if there are no candidates, or indices are out of range or repeated.
  """
  mos = np.asarray(candidate_scores, dtype=np.float64).reshape(-1)
  num_cands = len(mos)
  if num_cands == 0:
    raise ValueError('candidate_scores is empty: need at least one candidate')
  sel = np.asarray(selected_candidate_idx, dtype=np.int64).reshape(-1)
  if sel.size and (sel.min() < 0 or sel.max() >= num_cands):
    raise ValueError(f'selected_candidate_idx out of range [0, {num_cands}): {sel.tolist()}')
  if len(np.unique(sel)) != len(sel):
    raise ValueError(f'selected_candidate_idx must be distinct; got {sel.tolist()}')
  sorted_mos = np.sort(mos)[::-1]
  ranks = gt_ranks(mos)
  out: dict[str, float] = {}
  for n in ns:
    threshold = sorted_mos[min(n, num_cands) - 1]
    for k in ks:
      top = sel[:k]
      hits = float(np.sum(mos[top] >= threshold))
      out[f'acc{k}_{n}'] = hits / k
      r = np.sort(ranks[top])
      j = np.arange(len(r))
      weights = np.where(r <= n - 1, np.exp(-(r - j) / n), 0.0)
      out[f'wacc{k}_{n}'] = float(weights.sum()) / k
  return out


def srcc_pcc(candidate_pred_scores: Any, candidate_mos: Any) -> tuple[float, float]:
  """Spearman (SRCC) and Pearson (PCC) correlation of predicted scores with MOS over candidates.

  Args:
    candidate_pred_scores: (C,) a predicted score for every candidate.
    candidate_mos: (C,) the candidates' MOS.

  Returns:
    (srcc, pcc) as floats; NaN where undefined (C < 2 or either input constant).
  """
  pred = np.asarray(candidate_pred_scores, dtype=np.float64).reshape(-1)
  mos = np.asarray(candidate_mos, dtype=np.float64).reshape(-1)
  if pred.shape != mos.shape:
    raise ValueError(f'shape mismatch: scores {pred.shape} vs MOS {mos.shape}')
  if len(pred) < 2 or np.ptp(pred) == 0 or np.ptp(mos) == 0:
    return math.nan, math.nan
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    srcc = float(stats.spearmanr(pred, mos)[0])
    pcc = float(stats.pearsonr(pred, mos)[0])
  return srcc, pcc


def candidate_scores_from_predictions(
    pred_xyxy: Any, pred_conf: Any, candidates_xyxy: Any, iou_threshold: float = 0.5
) -> np.ndarray:
  """Scores every GAIC candidate from a set of predicted crops (NON-STANDARD, for SRCC / PCC).

  GAIC's SRCC / PCC need a score for every candidate, which a set-prediction model does not give.
  This mapping (not from the GAIC papers; §1.8 of the project notes) assigns each prediction to its
  largest-IoU candidate (ties: lowest index); a candidate's score is the maximum confidence of the
  predictions assigned to it with IoU >= iou_threshold, and 0 if there is none. Numbers computed
  with it are not comparable with SRCC / PCC of models that score candidates directly.

  Args:
    pred_xyxy: (M, 4) predicted crops (any order), M may be 0.
    pred_conf: (M,) their confidences, expected in [0, 1] (e.g. sigmoid scores).
    candidates_xyxy: (C, 4) the image's candidates, C >= 1, same units.
    iou_threshold: minimum IoU for a prediction to score its candidate.

  Returns:
    (C,) float64 candidate scores.
  """
  cands = box_lib.as_boxes_xyxy_np(candidates_xyxy, 'candidates_xyxy', min_count=1, finite=False)
  preds = np.asarray(pred_xyxy, dtype=np.float64).reshape(-1, 4)
  conf = np.asarray(pred_conf, dtype=np.float64).reshape(-1)
  if len(conf) != len(preds):
    raise ValueError(f'{len(preds)} predictions but {len(conf)} confidences')
  scores = np.zeros(len(cands), dtype=np.float64)
  if len(preds) == 0:
    return scores
  iou = box_lib.pairwise_iou_xyxy_np(preds, cands)
  best = np.argmax(iou, axis=1)
  best_iou = iou[np.arange(len(preds)), best]
  keep = best_iou >= iou_threshold
  np.maximum.at(scores, best[keep], conf[keep])
  return scores


def gaic_result_keys(ks: Iterable[int] = GAIC_KS, ns: Iterable[int] = GAIC_NS) -> list[str]:
  """Ordered keys of `GaicMetrics.result()` for the given K and N values."""
  ks, ns = list(ks), list(ns)
  keys = [f'acc{k}_{n}' for n in ns for k in ks] + [f'acc{n}' for n in ns]
  keys += [f'wacc{k}_{n}' for n in ns for k in ks]
  return keys + [
      'srcc',
      'pcc',
      'num_srcc_images',
      'num_pcc_images',
      'mapped_iou_mean',
      'num_images',
  ]


class GaicMetrics:
  """Accumulates the GAIC metrics of a set-prediction model over test images.

  Per image, the ranked predictions are mapped to distinct candidates (`map_to_candidates`, at most
  max(ks) of them), and `gaic_image_metrics` is computed from their MOS. SRCC / PCC use the
  NON-STANDARD `candidate_scores_from_predictions`.

  `result()` keys (see `gaic_result_keys`):
    * 'acc{K}_{N}' for K in 1..4, N in 5, 10: mean over images, in percent (0-100, as papers).
    * 'acc5', 'acc10': mean of 'acc{K}_{N}' over K (the papers' \\bar{Acc}_N), percent.
    * 'wacc{K}_{N}': mean over images, percent.
    * 'srcc', 'pcc': mean over the images where the value is defined (NaN otherwise, e.g. when all
      candidate scores are 0); 'num_srcc_images', 'num_pcc_images' count those images.
    * 'mapped_iou_mean': mean IoU of the top-1 prediction with its candidate, over images with at
      least one prediction (images without predictions are all misses in Acc / wAcc).
    * 'num_images': number of images added.
  """

  def __init__(
      self,
      ks: Sequence[int] = GAIC_KS,
      ns: Sequence[int] = GAIC_NS,
      srcc_iou_threshold: float = 0.5,
  ) -> None:
    self.ks = tuple(ks)
    self.ns = tuple(ns)
    self.srcc_iou_threshold = srcc_iou_threshold
    self._per_image: list[dict[str, float]] = []
    self._srcc: list[float] = []
    self._pcc: list[float] = []
    self._top1_iou: list[float] = []

  def __len__(self) -> int:
    return len(self._per_image)

  def add(
      self,
      ranked_pred_xyxy: Any,
      pred_conf: Optional[Any],
      candidates_xyxy: Any,
      candidate_mos: Any,
  ) -> dict[str, float]:
    """Adds one image.

    Args:
      ranked_pred_xyxy: (M, 4) predicted crops, best first (the order used for Acc / wAcc; it is
        not re-sorted by pred_conf).
      pred_conf: (M,) confidences, used only for SRCC / PCC; None skips SRCC / PCC for this image.
      candidates_xyxy: (C, 4) the image's GAIC candidates, same units as the predictions.
      candidate_mos: (C,) their MOS.

    Returns:
      The image's `gaic_image_metrics` (fractions) plus 'srcc', 'pcc' and 'top1_iou' (NaN when
      undefined).
    """
    mos = np.asarray(candidate_mos, dtype=np.float64).reshape(-1)
    cands = np.asarray(candidates_xyxy, dtype=np.float64)
    if cands.ndim != 2 or len(cands) != len(mos):
      raise ValueError(f'{np.shape(candidates_xyxy)} candidates vs {mos.shape} MOS values')
    idx, ious = map_to_candidates(ranked_pred_xyxy, cands, max_outputs=max(self.ks))
    image = gaic_image_metrics(idx, mos, self.ks, self.ns)
    self._per_image.append(image)
    top1 = float(ious[0]) if len(ious) else math.nan
    if len(ious):
      self._top1_iou.append(top1)
    srcc = pcc = math.nan
    if pred_conf is not None:
      scores = candidate_scores_from_predictions(
          ranked_pred_xyxy, pred_conf, cands, self.srcc_iou_threshold
      )
      srcc, pcc = srcc_pcc(scores, mos)
      if not math.isnan(srcc):
        self._srcc.append(srcc)
      if not math.isnan(pcc):
        self._pcc.append(pcc)
    return {**image, 'srcc': srcc, 'pcc': pcc, 'top1_iou': top1}

  def result(self) -> dict[str, Any]:
    """The aggregated metrics; see the class docstring for the keys."""
    num = len(self._per_image)
    out: dict[str, Any] = {}

    def mean(values: list[float]) -> float:
      return float(np.mean(values)) if values else math.nan

    for prefix in ('acc', 'wacc'):
      for n in self.ns:
        for k in self.ks:
          key = f'{prefix}{k}_{n}'
          out[key] = 100.0 * mean([image[key] for image in self._per_image])
    for n in self.ns:
      out[f'acc{n}'] = mean([out[f'acc{k}_{n}'] for k in self.ks]) if num else math.nan
    out['srcc'] = mean(self._srcc)
    out['pcc'] = mean(self._pcc)
    out['num_srcc_images'] = len(self._srcc)
    out['num_pcc_images'] = len(self._pcc)
    out['mapped_iou_mean'] = mean(self._top1_iou)
    out['num_images'] = num
    return {key: out[key] for key in gaic_result_keys(self.ks, self.ns)}


# ----------------------------------------------------------------------------------------------
# Reporting.
# ----------------------------------------------------------------------------------------------


def _format_cell(value: Any) -> str:
  """Markdown cell text: floats with 4 decimals, ints as ints, None / missing as an em dash."""
  if value is None:
    return '—'
  if isinstance(value, (bool, np.bool_)):
    return str(bool(value))
  if isinstance(value, (int, np.integer)):
    return str(int(value))
  if isinstance(value, (float, np.floating)):
    return f'{float(value):.4f}'
  return str(value).replace('|', '\\|')


def format_markdown_table(
    rows: Mapping[str, Mapping[str, Any]],
    columns: Optional[list[str]] = None,
    title: Optional[str] = None,
) -> str:
  """Renders method -> metrics as a Markdown table.

  Args:
    rows: {method name: {metric name: value}}, one table row per method in insertion order.
    columns: metric columns in order; None uses every metric name, in order of first appearance.
    title: optional heading, written as '### title' and a blank line above the table.

  Returns:
    The table text (no trailing newline): a header '| method | col ... |', an alignment line and
    one line per method. Floats have 4 decimals, ints are written as ints, a metric missing from a
    row (or None) is '—'.
  """
  if columns is None:
    columns = []
    for metrics in rows.values():
      for name in metrics:
        if name not in columns:
          columns.append(name)
  lines = []
  if title:
    lines += [f'### {title}', '']
  lines.append('| ' + ' | '.join(['method', *columns]) + ' |')
  lines.append('|' + '|'.join(['---'] + ['---:'] * len(columns)) + '|')
  for method, metrics in rows.items():
    cells = [_format_cell(method)] + [_format_cell(metrics.get(c)) for c in columns]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)
