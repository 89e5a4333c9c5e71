"""Tests for clipcrop_jax.zero_shot (GAIC grid candidates, composition score, ranking)."""

from __future__ import annotations

import dataclasses
from fractions import Fraction
import itertools

import numpy as np
import pytest

from clipcrop_jax import boxes as box_lib
from clipcrop_jax import zero_shot as zs

# (W, H) -> number of GAIC candidates with the default rule. The square, 4:3, 3:2, ~16:9 and 2:1
# counts are the crop counts seen in GAIC's annotation files (90, 87, 83, 72, 38).
EXPECTED_COUNTS = {
    (600, 600): 90,
    (800, 600): 87,
    (600, 800): 87,
    (900, 600): 83,
    (448, 256): 72,
    (1600, 900): 60,
    (1200, 600): 38,
}


def _brute_force_candidates(
    image_wh, bins=12, min_area_fraction=Fraction(1, 2), aspect_range=(Fraction(1, 2), Fraction(2))
):
  """All pairs of cell centres, filtered with exact rational geometry (no index arithmetic)."""
  w, h = (Fraction(v) for v in image_wh)
  xs = [w * (2 * i + 1) / (2 * bins) for i in range(bins)]
  ys = [h * (2 * i + 1) / (2 * bins) for i in range(bins)]
  third = bins // 3
  found = set()
  for (x0, y0), (x1, y1) in itertools.product(itertools.product(xs, ys), repeat=2):
    if not (x0 < w * third / bins and y0 < h * third / bins):
      continue  # Top-left corner must lie in the top-left corner region.
    if not (x1 > w * (bins - third) / bins and y1 > h * (bins - third) / bins):
      continue  # Bottom-right corner must lie in the bottom-right corner region.
    cw, ch = x1 - x0, y1 - y0
    if cw * ch < min_area_fraction * w * h:
      continue
    if not aspect_range[0] < cw / ch < aspect_range[1]:
      continue
    found.add((float(x0), float(y0), float(x1), float(y1)))
  return found


def _as_set(boxes):
  return {tuple(float(v) for v in np.round(b, 9)) for b in boxes}


def _rounded(found):
  return {tuple(round(v, 9) for v in b) for b in found}


# ------------------------------------------------------------------------------------------------
# Candidates.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("image_wh,count", sorted(EXPECTED_COUNTS.items()))
def test_candidate_count(image_wh, count):
  assert zs.gaic_grid_candidates(image_wh).shape == (count, 4)


@pytest.mark.parametrize("image_wh", sorted(EXPECTED_COUNTS) + [(333, 517), (1000, 290)])
def test_candidates_match_brute_force(image_wh):
  got = zs.gaic_grid_candidates(image_wh)
  assert len(_as_set(got)) == len(got), "duplicate candidates"
  assert _as_set(got) == _rounded(_brute_force_candidates(image_wh))


def test_candidates_match_brute_force_other_settings():
  got = zs.gaic_grid_candidates((640, 480), bins=9, min_area_fraction=0.6, aspect_range=(0.8, 1.6))
  want = _brute_force_candidates(
      (640, 480),
      bins=9,
      min_area_fraction=Fraction(6, 10),
      aspect_range=(Fraction(8, 10), Fraction(16, 10)),
  )
  assert len(got) > 0
  assert _as_set(got) == _rounded(want)


@pytest.mark.parametrize("image_wh", sorted(EXPECTED_COUNTS))
def test_candidate_properties(image_wh):
  w, h = image_wh
  boxes = zs.gaic_grid_candidates(image_wh)
  assert boxes.dtype == np.float64
  assert np.all(boxes[:, 0] > 0) and np.all(boxes[:, 1] > 0)
  assert np.all(boxes[:, 2] < w) and np.all(boxes[:, 3] < h)
  bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
  assert np.all(bw * bh >= 0.5 * w * h - 1e-6)
  assert np.all((bw / bh > 0.5) & (bw / bh < 2.0))
  # Deterministic, in GAIC's loop order: (y0, x0, y1, x1) ascending lexicographically.
  np.testing.assert_array_equal(boxes, zs.gaic_grid_candidates(image_wh))
  keys = [(b[1], b[0], b[3], b[2]) for b in boxes]
  assert keys == sorted(keys)


def test_candidates_reject_bad_inputs():
  with pytest.raises(ValueError, match="image_wh"):
    zs.gaic_grid_candidates((0, 100))
  with pytest.raises(ValueError, match="bins"):
    zs.gaic_grid_candidates((100, 100), bins=2)
  with pytest.raises(ValueError, match="aspect_range"):
    zs.gaic_grid_candidates((100, 100), aspect_range=(2.0, 0.5))


# ------------------------------------------------------------------------------------------------
# Containment filter.
# ------------------------------------------------------------------------------------------------


def test_filter_containing_keeps_exactly_the_containing_crops():
  cands = zs.gaic_grid_candidates((600, 600))
  target = np.array([100.0, 220.0, 300.0, 480.0])
  kept, idx = zs.filter_containing(cands, target)
  expected = [i for i, c in enumerate(cands) if box_lib.contains_xyxy_np(c, target, tol=0)]
  assert idx.tolist() == expected
  np.testing.assert_array_equal(kept, cands[idx])
  assert 0 < len(kept) < len(cands)


def test_filter_containing_partial_coverage():
  cands = np.array([[0, 0, 10, 10], [0, 0, 5, 10], [0, 0, 2, 10]], dtype=float)
  target = [0, 0, 8, 10]
  _, idx = zs.filter_containing(cands, target, min_coverage=0.6)
  assert idx.tolist() == [0, 1]
  np.testing.assert_allclose(zs.target_coverage(cands, target), [1.0, 5 / 8, 2 / 8])


def test_filter_containing_fallback_never_empty():
  cands = np.array([[0, 0, 4, 4], [0, 0, 6, 6], [1, 1, 6, 6], [0, 0, 2, 2]], dtype=float)
  target = [0, 0, 10, 10]  # Larger than every candidate.
  kept, idx = zs.filter_containing(cands, target, fallback_k=1)
  assert idx.tolist() == [1]
  # Ties at the k-th best coverage are all kept, in candidate order.
  _, idx = zs.filter_containing(cands, target, fallback_k=2)
  assert idx.tolist() == [1, 2]
  _, idx = zs.filter_containing(cands, target, fallback_k=100)
  assert idx.tolist() == [0, 1, 2, 3]
  kept, idx = zs.filter_containing(np.zeros((0, 4)), target)
  assert kept.shape == (0, 4) and idx.shape == (0,)


def test_filter_containing_zero_area_target():
  with pytest.raises(ValueError, match="zero area"):
    zs.filter_containing(np.array([[0, 0, 1, 1]], dtype=float), [0.5, 0.5, 0.5, 0.9])


# ------------------------------------------------------------------------------------------------
# Composition score.
# ------------------------------------------------------------------------------------------------


def test_thirds_placement_beats_centred_only_through_the_thirds_term():
  target = np.array([0.3, 0.3, 0.5, 0.5])  # Centre (0.4, 0.4), 0.2 x 0.2.
  side = 0.8
  centred = [0.4 - side / 2, 0.4 - side / 2, 0.4 + side / 2, 0.4 + side / 2]
  on_thirds = [0.4 - side / 3, 0.4 - side / 3, 0.4 + 2 * side / 3, 0.4 + 2 * side / 3]
  crops = np.array([centred, on_thirds])
  scores, terms = zs.composition_score(crops, target)
  assert scores[1] > scores[0]
  np.testing.assert_allclose(terms["thirds"], [0.5, 1.0], atol=1e-9)
  np.testing.assert_allclose(terms["thirds_distance"], [1 / 6, 0.0], atol=1e-9)
  for name in ("size", "margin", "content", "cut", "size_fraction"):
    np.testing.assert_allclose(terms[name][0], terms[name][1], atol=1e-12, err_msg=name)
  no_thirds = dataclasses.replace(zs.CompositionWeights(), thirds=0.0)
  flat, _ = zs.composition_score(crops, target, weights=no_thirds)
  np.testing.assert_allclose(flat[0], flat[1], atol=1e-12)


def test_cut_through_penalty():
  crop = np.array([[0.1, 0.1, 0.7, 0.7]])
  target = [0.3, 0.3, 0.5, 0.5]
  inside = [0.15, 0.15, 0.25, 0.25]
  halved = [0.65, 0.3, 0.75, 0.4]  # Half of it inside the crop.
  outside = [0.8, 0.8, 0.9, 0.9]
  results = {
      name: zs.composition_score(crop, target, other_boxes=[box])
      for name, box in (("inside", inside), ("halved", halved), ("outside", outside))
  }
  score = {name: r[0][0] for name, r in results.items()}
  cut = {name: r[1]["cut"][0] for name, r in results.items()}
  assert score["halved"] < score["inside"] and score["halved"] < score["outside"]
  assert score["inside"] == pytest.approx(score["outside"])
  assert cut == pytest.approx({"inside": 0.0, "halved": 1.0, "outside": 0.0})
  base, _ = zs.composition_score(crop, target)
  assert score["inside"] == pytest.approx(base[0])
  # A low-confidence detection is penalised less.
  weak, terms = zs.composition_score(crop, target, other_boxes=[halved], other_scores=[0.2])
  assert terms["cut"][0] == pytest.approx(0.2)
  assert score["halved"] < weak[0] < score["inside"]
  # Many intact objects do not dilute one badly cut object.
  _, terms = zs.composition_score(crop, target, other_boxes=[halved] + [inside] * 5)
  assert terms["cut"][0] == pytest.approx(1.0)


def test_cut_through_of_quarter_cut_object():
  crop = np.array([[0.0, 0.0, 0.5, 1.0]])
  other = [0.4, 0.0, 0.8, 0.1]  # A quarter of it inside.
  _, terms = zs.composition_score(crop, [0.1, 0.4, 0.3, 0.6], other_boxes=[other])
  assert terms["cut"][0] == pytest.approx(0.5)


def test_size_term_bump():
  target = [0.4, 0.4, 0.6, 0.6]  # Area 0.04.
  crops = np.array(
      [
          [0.3, 0.3, 0.6, 0.6],  # f = 0.04 / 0.09 = 0.44: inside the ideal range.
          [0.35, 0.4, 0.6, 0.6],  # f = 0.04 / 0.05 = 0.8: too tight.
          [0.0, 0.0, 1.0, 1.0],  # f = 0.04: too loose.
      ]
  )
  _, terms = zs.composition_score(crops, target)
  np.testing.assert_allclose(terms["size_fraction"], [0.04 / 0.09, 0.8, 0.04])
  assert terms["size"][0] == pytest.approx(1.0)
  assert terms["size"][1] == pytest.approx(np.exp(-0.5 * (0.2 / 0.15) ** 2))
  assert terms["size"][2] == pytest.approx(np.exp(-0.5 * (0.31 / 0.15) ** 2))


def test_margin_term():
  target = [0.0, 0.3, 0.4, 0.7]  # Touches the left image border.
  crops = np.array(
      [
          [0.0, 0.2, 0.6, 0.8],  # Flush with the image border on the left: fine.
          [0.0, 0.29, 0.6, 0.8],  # Top gap 0.01, below the wanted 0.05 * 0.51 (crop height).
          [0.0, 0.2, 0.35, 0.8],  # Cuts the target on the right.
      ]
  )
  _, terms = zs.composition_score(crops, target)
  assert terms["margin"][0] == pytest.approx(1.0)
  assert terms["margin"][1] == pytest.approx(0.01 / (0.05 * 0.51))
  assert terms["margin"][2] == 0.0
  # With little room to the image border, reaching the border is a full margin.
  _, terms = zs.composition_score(np.array([[0.0, 0.0, 1.0, 1.0]]), [0.01, 0.01, 0.99, 0.99])
  assert terms["margin"][0] == pytest.approx(1.0)


def test_score_range_and_shapes():
  rng = np.random.default_rng(0)
  cands = zs.gaic_grid_candidates((640, 480)) / np.array([640, 480, 640, 480])
  scores, terms = zs.composition_score(cands, [0.3, 0.2, 0.6, 0.7])
  assert scores.shape == (len(cands),)
  assert np.all((scores >= 0) & (scores <= 1))
  for name, value in terms.items():
    assert value.shape == (len(cands),), name
  for name in ("size", "thirds", "margin", "content", "cut"):
    assert np.all((terms[name] >= 0) & (terms[name] <= 1)), name
  others = rng.uniform(0, 1, size=(6, 2))
  others = np.concatenate([others, others + 0.2], axis=-1)
  scores_cut, _ = zs.composition_score(cands, [0.3, 0.2, 0.6, 0.7], others, rng.uniform(size=6))
  assert np.all(scores_cut <= scores + 1e-12)
  assert np.all(scores_cut >= -1.0 / 2.25 - 1e-12)


def test_composition_weights_validation():
  weights = zs.CompositionWeights()
  with pytest.raises(dataclasses.FrozenInstanceError):
    weights.size = 2.0  # type: ignore[misc]
  with pytest.raises(ValueError, match="thirds"):
    zs.CompositionWeights(thirds=-1.0)
  with pytest.raises(ValueError, match="ideal_size"):
    zs.CompositionWeights(ideal_size=(0.7, 0.3))
  with pytest.raises(ValueError, match="> 0"):
    zs.CompositionWeights(size=0, thirds=0, margin=0, content=0)


def test_composition_score_input_errors():
  crops = np.array([[0.0, 0.0, 1.0, 1.0]])
  with pytest.raises(ValueError, match="other_scores"):
    zs.composition_score(crops, [0.2, 0.2, 0.4, 0.4], [[0, 0, 0.1, 0.1]], [0.5, 0.5])
  with pytest.raises(ValueError, match=r"\(N, 4\)"):
    zs.composition_score(np.zeros((3, 3)), [0.2, 0.2, 0.4, 0.4])


# ------------------------------------------------------------------------------------------------
# Ranking.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("image_wh", [(640, 480), (480, 640), (500, 500)])
def test_ranked_crops_contain_target(image_wh):
  w, h = image_wh
  scale = np.array([w, h, w, h])
  rng = np.random.default_rng(1)
  targets = [[0.0, 0.3, 0.2, 0.7], [0.7, 0.8, 1.0, 1.0], [0.45, 0.45, 0.55, 0.55]]
  for _ in range(10):
    lo = rng.uniform(0, 0.7, size=2)
    targets.append(np.concatenate([lo, lo + rng.uniform(0.05, 0.3, size=2)]).tolist())
  for target in targets:
    ranked = zs.rank_zero_shot_crops(image_wh, target, top_k=5)
    assert 1 <= len(ranked) <= 5
    target_px = np.clip(np.asarray(target), 0, 1) * scale
    for box, score in ranked:
      assert isinstance(score, float)
      assert box_lib.contains_xyxy_np(box, target_px, tol=1e-6), (target, box)
      assert box[0] >= -1e-9 and box[1] >= -1e-9 and box[2] <= w + 1e-9 and box[3] <= h + 1e-9
    scores = [s for _, s in ranked]
    assert scores == sorted(scores, reverse=True)


def test_ranking_is_deterministic():
  target = [0.35, 0.25, 0.6, 0.75]
  others = np.array([[0.05, 0.1, 0.3, 0.5], [0.6, 0.6, 0.95, 0.9], [0.4, 0.8, 0.5, 0.95]])
  conf = np.array([0.9, 0.4, 0.7])
  first = zs.rank_zero_shot_crops((800, 600), target, others, conf, top_k=10)
  second = zs.rank_zero_shot_crops((800, 600), target, others, conf, top_k=10)
  assert first == second
  perm = [2, 0, 1]
  permuted = zs.rank_zero_shot_crops((800, 600), target, others[perm], conf[perm], top_k=10)
  assert [b for b, _ in permuted] == [b for b, _ in first]
  np.testing.assert_allclose([s for _, s in permuted], [s for _, s in first], atol=1e-12)


def test_ranking_ties_keep_candidate_order():
  # A centred target with no other objects: mirror-image crops score exactly the same.
  ranked = zs.rank_zero_shot_crops((800, 600), [0.4, 0.3, 0.6, 0.7], top_k=None, nms_iou=None)
  cands = zs.gaic_grid_candidates((800, 600))
  position = {tuple(float(v) for v in c): i for i, c in enumerate(cands)}
  ties = 0
  for (box_a, s_a), (box_b, s_b) in zip(ranked, ranked[1:]):
    if s_a == s_b:
      ties += 1
      assert position[box_a] < position[box_b]
  assert ties > 0


def test_rank_applies_nms():
  target = [0.45, 0.4, 0.55, 0.6]
  no_nms = zs.rank_zero_shot_crops((800, 600), target, top_k=None, nms_iou=None)
  with_nms = zs.rank_zero_shot_crops((800, 600), target, top_k=None, nms_iou=0.7)
  assert len(with_nms) < len(no_nms)
  boxes = np.array([b for b, _ in with_nms])
  iou = box_lib.pairwise_iou_xyxy_np(boxes, boxes)
  np.fill_diagonal(iou, 0)
  assert iou.max() <= 0.7
  # It is `boxes.nms_xyxy` on the score-ranked crops.
  all_boxes = np.array([b for b, _ in no_nms])
  kept = box_lib.nms_xyxy(all_boxes, np.array([s for _, s in no_nms]), 0.7)
  assert [no_nms[i] for i in kept] == with_nms
  # NMS keeps the best crop and only removes crops.
  assert with_nms[0] == no_nms[0]
  assert {b for b, _ in with_nms} <= {b for b, _ in no_nms}


def test_rank_aspect_filter():
  target = [0.4, 0.35, 0.6, 0.65]
  ranked = zs.rank_zero_shot_crops((800, 600), target, aspect_ratio=1.0, top_k=None, nms_iou=None)
  aspects = [(b[2] - b[0]) / (b[3] - b[1]) for b, _ in ranked]
  assert ranked and all(abs(a - 1.0) <= 0.05 + 1e-12 for a in aspects)
  unfiltered = zs.rank_zero_shot_crops((800, 600), target, top_k=None, nms_iou=None)
  assert len(ranked) < len(unfiltered)
  # No square-image candidate is within 5 % of 16:9: the filter is skipped, nothing is lost.
  square = zs.rank_zero_shot_crops((600, 600), target, aspect_ratio=16 / 9, top_k=None)
  assert square == zs.rank_zero_shot_crops((600, 600), target, top_k=None)
  with pytest.raises(ValueError, match="aspect_ratio"):
    zs.rank_zero_shot_crops((600, 600), target, aspect_ratio=0.0)


def test_rank_target_larger_than_any_candidate():
  target = [0.02, 0.02, 0.98, 0.98]
  ranked = zs.rank_zero_shot_crops((640, 480), target)
  target_px = np.array(target) * [640, 480, 640, 480]
  assert ranked and all(box_lib.contains_xyxy_np(b, target_px, tol=1e-6) for b, _ in ranked)
  # Without expansion: the best-covering grid crops (which cannot contain it).
  plain = zs.rank_zero_shot_crops(
      (640, 480), target, expand_to_target=False, top_k=None, nms_iou=None
  )
  cands = zs.gaic_grid_candidates((640, 480))
  best = zs.target_coverage(cands, target_px).max()
  boxes = np.array([b for b, _ in plain])
  assert not any(box_lib.contains_xyxy_np(b, target_px) for b in boxes)
  assert zs.target_coverage(boxes, target_px).max() == pytest.approx(best)


def test_rank_target_outside_image_is_clipped():
  target = [-0.2, 0.3, 0.4, 0.7]
  clipped = [0.0, 0.3, 0.4, 0.7]
  assert zs.rank_zero_shot_crops((640, 480), target) == zs.rank_zero_shot_crops((640, 480), clipped)


@pytest.mark.parametrize(
    "target", [[0.3, 0.3, 0.3, 0.6], [0.5, 0.5, 0.4, 0.6], [1.2, 0.2, 1.5, 0.6]]
)
def test_rank_zero_area_target_raises(target):
  with pytest.raises(ValueError, match="zero area"):
    zs.rank_zero_shot_crops((640, 480), target)


def test_rank_rejects_bad_arguments():
  with pytest.raises(ValueError, match="top_k"):
    zs.rank_zero_shot_crops((640, 480), [0.2, 0.2, 0.4, 0.4], top_k=0)
  with pytest.raises(ValueError, match="target_xyxy"):
    zs.rank_zero_shot_crops((640, 480), [0.2, 0.2, 0.4])


def test_rank_panorama_falls_back_to_whole_image():
  assert zs.gaic_grid_candidates((4000, 800)).shape == (0, 4)
  ranked = zs.rank_zero_shot_crops((4000, 800), [0.4, 0.2, 0.5, 0.8])
  assert [box for box, _ in ranked] == [(0.0, 0.0, 4000.0, 800.0)]


def test_composition_score_empty_candidates():
  scores, terms = zs.composition_score(np.zeros((0, 4)), [0.1, 0.1, 0.2, 0.2], [[0, 0, 0.5, 0.5]])
  assert scores.shape == (0,)
  assert all(v.shape == (0,) for v in terms.values())
