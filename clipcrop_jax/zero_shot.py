"""Zero-shot cropping: GAIC grid candidates ranked by a hand-written composition score.

For users who have OWL-ViT weights but no trained ClipCrop decoder. The detector finds the target
(the union box of the boxes selected for the text or image query) and, optionally, the other objects
in the picture; this module then proposes crops on GAIC's grid and ranks them without any learning:

  candidates (GAIC grid rule) -> keep those containing the target -> optional aspect-ratio filter
  -> composition score -> greedy NMS -> top-k.

Conventions (all arrays are numpy, float64, boxes on the last axis):

* Pixel boxes are (x0, y0, x1, y1) in continuous pixel units of the *original image*: a box covering
  the whole image is (0, 0, W, H) (the same convention as `owlvit.preprocessing`).
* Normalised boxes are (x0, y0, x1, y1) in [0, 1] of the *original image*, i.e. pixel boxes divided
  by (W, H, W, H). They are NOT relative to the padded square the detector sees: for a detector box
  `b` normalised to the padded square of side S = max(W, H), the caller passes
  `b * (S / W, S / H, S / W, S / H)`.
* `gaic_grid_candidates` returns pixel boxes; `composition_score` takes normalised boxes (its image
  is the unit square); `filter_containing` works in any frame as long as all its inputs share it;
  `rank_zero_shot_crops` takes normalised target/other boxes and returns pixel boxes.
* Aspect ratios are width / height in pixels.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clipcrop_jax import boxes as box_lib

# Which selections make the zero-shot target (`model.SELECTION_UNIONS`): the caption's and the
# subject keywords'; the context keywords' selections are objects not to cut through.
ZERO_SHOT_UNION = "subject"
# Tolerance on the area rule: GAIC keeps a crop if its area is > 0.4999 of the image, i.e. a crop of
# exactly half the image counts. We keep `fraction > min_area_fraction - _AREA_TOL`.
_AREA_TOL = 1e-4
# Relative tolerance of the aspect-ratio filter in `rank_zero_shot_crops` (5 %).
ASPECT_TOLERANCE = 0.05
# Below this (in normalised units) a target edge counts as touching the image border.
_BORDER_EPS = 1e-6


# ------------------------------------------------------------------------------------------------
# Target validation (box math: the NumPy section of `clipcrop_jax.boxes`).
# ------------------------------------------------------------------------------------------------


def _validated_target(target_xyxy: np.ndarray | Sequence[float], clip_to_unit: bool) -> np.ndarray:
  """Returns the target box (4,), clipped to [0, 1] if asked; ValueError if it has no area."""
  target = box_lib.as_box_xyxy_np(target_xyxy, "target_xyxy")
  clipped = np.clip(target, 0.0, 1.0) if clip_to_unit else target
  if box_lib.area_xyxy_np(clipped) <= 0:
    where = " after clipping to the image [0, 1]" if clip_to_unit else ""
    raise ValueError(
        f"target_xyxy {target.tolist()} has zero area{where}; expected (x0, y0, x1, y1) with "
        "x1 > x0 and y1 > y0"
        + (" overlapping the image (normalised image coordinates)" if clip_to_unit else "")
    )
  return clipped


# ------------------------------------------------------------------------------------------------
# 1. Candidates.
# ------------------------------------------------------------------------------------------------


def gaic_grid_candidates(
    image_wh: tuple[float, float],
    bins: int = 12,
    min_area_fraction: float = 0.5,
    aspect_range: tuple[float, float] = (0.5, 2.0),
) -> np.ndarray:
  """Candidate crops by GAIC's grid-anchor rule (Zeng et al., `generate_bboxes`).

  The image is divided into `bins` x `bins` cells; crop corners lie on cell *centres*, so grid line
  i sits at `(i + 0.5) * W / bins` horizontally (likewise vertically). The top-left corner takes
  indices 0 .. bins // 3 - 1 on each axis and the bottom-right corner indices
  bins - bins // 3 .. bins - 1 (for 12 bins: 0..3 and 8..11). A crop spanning dx x dy cells is
  kept if

  * its area fraction dx * dy / bins**2 is > min_area_fraction - 1e-4 (GAIC writes > 0.4999, so a
    crop of exactly half the image is kept), and
  * its pixel aspect ratio (dx * W) / (dy * H) lies strictly inside `aspect_range` (open interval).

  Because corners are cell centres, no candidate reaches the image border: the largest one is
  inset by half a cell on every side. Coordinates are not rounded (GAIC rounds to integer pixels).

  Count with the defaults: 90 for a square image (GAIC's "no more than ninety"), 87 for 4:3 and
  3:4, 83 for 3:2, 72 for GAIC's resized "16:9" images (448 x 256, aspect 1.75), 38 for 2:1 — the
  crop counts found in the GAIC annotation files. An exact 16:9 image gives 60: its twelve
  9 x 8-cell crops have aspect exactly 2, which the open interval excludes.

  Args:
    image_wh: (W, H) of the original image in pixels, both > 0.
    bins: grid size per axis (GAIC: 12); must be >= 3.
    min_area_fraction: minimum crop area relative to the image area.
    aspect_range: (low, high) bounds on the crop's width / height in pixels, exclusive.

  Returns:
    (N, 4) float64 pixel boxes (x0, y0, x1, y1). Deterministic order, the same as GAIC's loops:
    y0 index outermost, then x0, y1, x1 index innermost, each ascending.
  """
  w, h = (float(v) for v in image_wh)
  if not (np.isfinite(w) and np.isfinite(h) and w > 0 and h > 0):
    raise ValueError(f"image_wh must be two positive sizes (W, H), got {tuple(image_wh)}")
  if int(bins) != bins or bins < 3:
    raise ValueError(f"bins must be an integer >= 3, got {bins}")
  bins = int(bins)
  lo_aspect, hi_aspect = (float(v) for v in aspect_range)
  if not 0 < lo_aspect < hi_aspect:
    raise ValueError(f"aspect_range must be (low, high) with 0 < low < high, got {aspect_range}")

  n_side = bins // 3
  starts = range(0, n_side)
  ends = range(bins - n_side, bins)
  step_x, step_y = w / bins, h / bins
  boxes = []
  for iy0 in starts:
    for ix0 in starts:
      for iy1 in ends:
        for ix1 in ends:
          dx, dy = ix1 - ix0, iy1 - iy0
          if dx * dy / bins**2 <= min_area_fraction - _AREA_TOL:
            continue
          aspect = (dx * w) / (dy * h)
          if not lo_aspect < aspect < hi_aspect:
            continue
          boxes.append(
              (
                  step_x * (ix0 + 0.5),
                  step_y * (iy0 + 0.5),
                  step_x * (ix1 + 0.5),
                  step_y * (iy1 + 0.5),
              )
          )
  return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


# ------------------------------------------------------------------------------------------------
# 2. Containment filter.
# ------------------------------------------------------------------------------------------------


def target_coverage(candidates: np.ndarray, target_xyxy: np.ndarray) -> np.ndarray:
  """Fraction of the target inside each candidate: area(candidate ∩ target) / area(target).

  Args:
    candidates: (N, 4) xyxy boxes.
    target_xyxy: (4,) xyxy box with positive area, in the same frame as `candidates`.

  Returns:
    (N,) coverage in [0, 1]; 1 means the candidate contains the whole target.
  """
  candidates = box_lib.as_boxes_xyxy_np(candidates, "candidates")
  target = _validated_target(target_xyxy, clip_to_unit=False)
  return box_lib.pairwise_intersection_xyxy_np(candidates, target[None])[
      :, 0
  ] / box_lib.area_xyxy_np(target)


def filter_containing(
    candidates: np.ndarray, target_xyxy: np.ndarray, min_coverage: float = 1.0, fallback_k: int = 10
) -> tuple[np.ndarray, np.ndarray]:
  """Keeps the candidates that contain the target.

  A candidate qualifies if coverage = area(candidate ∩ target) / area(target) >= min_coverage.
  If none qualifies (the target is larger than every candidate, or it reaches into the half cell
  next to the image border that GAIC candidates never cover), this falls back to the best-covering
  candidates: those whose coverage is >= the coverage of the `fallback_k`-th best one (ties at that
  boundary are all kept). The result is never empty when `candidates` is not empty.

  Works in any coordinate frame (pixels or normalised) as long as both inputs share it.

  Args:
    candidates: (N, 4) xyxy boxes.
    target_xyxy: (4,) xyxy box; ValueError if it has zero area.
    min_coverage: required coverage in (0, 1].
    fallback_k: how many best-covering candidates (at least) the fallback keeps; >= 1.

  Returns:
    (kept (M, 4), indices (M,) int64 into `candidates`), in the original candidate order.
  """
  if not 0 < min_coverage <= 1:
    raise ValueError(f"min_coverage must be in (0, 1], got {min_coverage}")
  if fallback_k < 1:
    raise ValueError(f"fallback_k must be >= 1, got {fallback_k}")
  candidates = box_lib.as_boxes_xyxy_np(candidates, "candidates")
  coverage = target_coverage(candidates, target_xyxy)
  if candidates.shape[0] == 0:
    return candidates, np.zeros((0,), dtype=np.int64)
  keep = coverage >= min_coverage
  if not np.any(keep):
    k = min(int(fallback_k), coverage.shape[0])
    kth_best = np.sort(coverage)[::-1][k - 1]
    keep = coverage >= kth_best
  indices = np.flatnonzero(keep).astype(np.int64)
  return candidates[indices], indices


# ------------------------------------------------------------------------------------------------
# 3. Composition score.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CompositionWeights:
  """Weights and shape parameters of `composition_score`.

  Attributes:
    size: weight of the target-size term S.
    thirds: weight of the rule-of-thirds term T.
    margin: weight of the margin term M.
    content: weight of the content (crop area) term A; keep it small.
    cut: weight of the cut-through penalty C (subtracted).
    ideal_size: (low, high) range of target area / crop area that scores S = 1.
    size_softness: Gaussian width of S's fall-off outside `ideal_size`.
    ideal_margin: wanted gap between target and crop border, as a fraction of the crop's extent
      on that axis.
  """

  size: float = 1.0
  thirds: float = 0.5
  margin: float = 0.5
  content: float = 0.25
  cut: float = 1.0
  ideal_size: tuple[float, float] = (0.35, 0.6)
  size_softness: float = 0.15
  ideal_margin: float = 0.05

  def __post_init__(self):
    for name in ("size", "thirds", "margin", "content", "cut"):
      value = getattr(self, name)
      if not (np.isfinite(value) and value >= 0):
        raise ValueError(f"CompositionWeights.{name} must be finite and >= 0, got {value}")
    if self.size + self.thirds + self.margin + self.content <= 0:
      raise ValueError("CompositionWeights: size + thirds + margin + content must be > 0")
    lo, hi = self.ideal_size
    if not 0 <= lo <= hi <= 1:
      raise ValueError(
          f"CompositionWeights.ideal_size must satisfy 0 <= low <= high <= 1, "
          f"got {self.ideal_size}"
      )
    if not self.size_softness > 0:
      raise ValueError(f"CompositionWeights.size_softness must be > 0, got {self.size_softness}")
    if not 0 < self.ideal_margin < 0.5:
      raise ValueError(
          f"CompositionWeights.ideal_margin must be in (0, 0.5), " f"got {self.ideal_margin}"
      )


# The four rule-of-thirds intersections in the crop's own unit square.
_THIRDS_POINTS = np.array([[1 / 3, 1 / 3], [2 / 3, 1 / 3], [1 / 3, 2 / 3], [2 / 3, 2 / 3]])
# Largest possible distance from a point of the unit square to its nearest thirds intersection
# (reached at the corners): |(1/3, 1/3)| = sqrt(2) / 3, i.e. 1/3 of the square's diagonal.
_MAX_THIRDS_DISTANCE = 1 / 3


def composition_score(
    candidates: np.ndarray,
    target_xyxy: np.ndarray,
    other_boxes: np.ndarray | None = None,
    other_scores: np.ndarray | None = None,
    weights: CompositionWeights = CompositionWeights(),
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Scores crops by a documented, hand-written composition rule (higher is better).

  All boxes are normalised (x0, y0, x1, y1) in [0, 1] of the original image (the image is the unit
  square). The target is clipped to the image first; zero area after clipping is a ValueError.
  Other boxes are clipped too; empty ones are ignored. For a crop c with width w and height h and
  the clipped target t:

  * Size, S in [0, 1]. f = area(t ∩ c) / area(c), the part of the crop the target fills. With
    (lo, hi) = weights.ideal_size and s = weights.size_softness:
    S = 1 if lo <= f <= hi, exp(-((lo - f) / s)**2 / 2) if f < lo, exp(-((f - hi) / s)**2 / 2) if
    f > hi.
  * Rule of thirds, T in [0, 1]. Map the crop to its own unit square, u = ((tcx - x0) / w,
    (tcy - y0) / h) for the target centre (tcx, tcy); d = min_k |u - p_k| / sqrt(2) over the four
    thirds intersections p_k in {1/3, 2/3}**2, i.e. the distance divided by the (unit-square) crop
    diagonal. Measured this way it does not depend on the crop's aspect ratio or on the coordinate
    frame; for a square crop in pixels it equals pixel distance / pixel diagonal. d <= 1/3 for a
    centre inside the crop (1/6 for a centred target). T = clip(1 - 3 d, 0, 1).
  * Margin, M in [0, 1]. For each side, gap = distance from the target's edge to the crop's edge
    (negative if the crop cuts the target), room = distance from the target's edge to the image
    border, needed = min(weights.ideal_margin * crop extent on that axis, room). The side scores
    clip(gap / needed, 0, 1), or 1 if room is 0 (the target touches the image border there, so no
    crop can leave a margin). M = the minimum over the four sides.
  * Content, A in [0.5, 1] for GAIC candidates: A = area(c) (crop area / image area), a mild
    preference for keeping more of the picture.
  * Cut-through, C in [0, 1]. For each other object j with detector score s_j (default 1) and
    r_j = area(c ∩ b_j) / area(b_j), its cut is 2 min(r_j, 1 - r_j): 0 if it is fully inside or
    fully outside, 1 if the crop halves it. C = 1 - prod_j (1 - clip(s_j, 0, 1) * cut_j), a
    score-weighted "any object is cut" that one badly cut object cannot hide behind many intact
    ones. Pass only objects other than the target (not the boxes that formed the union box).

  score = (w_S S + w_T T + w_M M + w_A A - w_C C) / (w_S + w_T + w_M + w_A), which lies in
  [-w_C / (w_S + w_T + w_M + w_A), 1] — in [0, 1] when nothing is cut.

  Args:
    candidates: (N, 4) normalised xyxy crops.
    target_xyxy: (4,) normalised xyxy target (e.g. the union box of the selected detections).
    other_boxes: optional (M, 4) normalised xyxy boxes of other detected objects.
    other_scores: optional (M,) detector confidences in [0, 1] for `other_boxes` (default all 1).
    weights: term weights and shape parameters.

  Returns:
    (scores (N,), terms) where terms maps "size", "thirds", "margin", "content", "cut" to the (N,)
    term values above, plus the raw "size_fraction" (f) and "thirds_distance" (d).
  """
  crops = box_lib.as_boxes_xyxy_np(candidates, "candidates")
  target = _validated_target(target_xyxy, clip_to_unit=True)
  n = crops.shape[0]
  cw = crops[:, 2] - crops[:, 0]
  ch = crops[:, 3] - crops[:, 1]
  crop_area = box_lib.area_xyxy_np(crops)
  if n and np.any(crop_area <= 0):
    raise ValueError("candidates must all have positive width and height")

  # Size.
  inter = box_lib.pairwise_intersection_xyxy_np(crops, target[None])[:, 0]
  size_fraction = np.divide(inter, crop_area, out=np.zeros(n), where=crop_area > 0)
  lo, hi = weights.ideal_size
  below = np.clip(lo - size_fraction, 0, None)
  above = np.clip(size_fraction - hi, 0, None)
  size_term = np.exp(-0.5 * ((below + above) / weights.size_softness) ** 2)

  # Rule of thirds.
  centre = np.array([(target[0] + target[2]) / 2, (target[1] + target[3]) / 2])
  rel = np.stack([(centre[0] - crops[:, 0]) / cw, (centre[1] - crops[:, 1]) / ch], axis=-1)
  dist = np.linalg.norm(rel[:, None, :] - _THIRDS_POINTS[None], axis=-1).min(axis=-1)
  thirds_distance = dist / np.sqrt(2)
  thirds_term = np.clip(1 - thirds_distance / _MAX_THIRDS_DISTANCE, 0, 1)

  # Margin: sides in the order left, top, right, bottom.
  gaps = np.stack(
      [
          target[0] - crops[:, 0],
          target[1] - crops[:, 1],
          crops[:, 2] - target[2],
          crops[:, 3] - target[3],
      ],
      axis=-1,
  )
  room = np.array([target[0], target[1], 1 - target[2], 1 - target[3]])
  extent = np.stack([cw, ch, cw, ch], axis=-1)
  needed = np.minimum(weights.ideal_margin * extent, room[None])
  touching = room[None] <= _BORDER_EPS
  side = np.where(
      touching, 1.0, np.clip(np.divide(gaps, needed, out=np.ones_like(gaps), where=~touching), 0, 1)
  )
  margin_term = side.min(axis=-1) if n else np.zeros(0)

  # Content.
  content_term = np.clip(crop_area, 0, 1)

  # Cut-through.
  cut_term = np.zeros(n)
  if other_boxes is not None:
    others = np.clip(box_lib.as_boxes_xyxy_np(other_boxes, "other_boxes"), 0.0, 1.0)
    if other_scores is None:
      conf = np.ones(others.shape[0])
    else:
      conf = np.asarray(other_scores, dtype=np.float64).reshape(-1)
      if conf.shape[0] != others.shape[0]:
        raise ValueError(
            f"other_scores has {conf.shape[0]} entries for {others.shape[0]} " "other_boxes"
        )
    conf = np.clip(conf, 0, 1)
    other_area = box_lib.area_xyxy_np(others)
    valid = other_area > 0
    others, conf, other_area = others[valid], conf[valid], other_area[valid]
    if others.shape[0] and n:
      inside = box_lib.pairwise_intersection_xyxy_np(crops, others) / other_area[None]
      cut = 2 * np.minimum(inside, 1 - inside)
      cut_term = 1 - np.prod(1 - conf[None] * np.clip(cut, 0, 1), axis=-1)

  w = weights
  total = w.size + w.thirds + w.margin + w.content
  scores = (
      w.size * size_term
      + w.thirds * thirds_term
      + w.margin * margin_term
      + w.content * content_term
      - w.cut * cut_term
  ) / total
  terms = {
      "size": size_term,
      "thirds": thirds_term,
      "margin": margin_term,
      "content": content_term,
      "cut": cut_term,
      "size_fraction": size_fraction,
      "thirds_distance": thirds_distance,
  }
  return scores, terms


# ------------------------------------------------------------------------------------------------
# 4. Ranking.
# ------------------------------------------------------------------------------------------------


def rank_zero_shot_crops(
    image_wh: tuple[float, float],
    target_xyxy: np.ndarray | Sequence[float],
    other_boxes: np.ndarray | None = None,
    other_scores: np.ndarray | None = None,
    aspect_ratio: float | None = None,
    top_k: int | None = 5,
    nms_iou: float | None = 0.7,
    *,
    weights: CompositionWeights = CompositionWeights(),
    bins: int = 12,
    expand_to_target: bool = True,
) -> list[tuple[tuple[float, float, float, float], float]]:
  """Ranks GAIC grid crops around a target without a trained decoder.

  Steps:
    1. The target is clipped to the image (ValueError if nothing is left).
    2. `gaic_grid_candidates(image_wh, bins)`. For images too elongated for any grid crop to have
       an aspect ratio in (0.5, 2) (about 3.5:1 and beyond) the whole image (0, 0, W, H) is the
       only candidate.
    3. `filter_containing(..., min_coverage=1)`: crops containing the whole target, or, if there
       are none, the best-covering ones. With `expand_to_target` (default) each of those fallback
       crops is then grown to the smallest box holding both it and the target (duplicates
       dropped), so every returned crop contains the clipped target; such crops leave the grid
       and may break the area/aspect rule. This happens when the target is larger than every
       candidate or reaches within half a grid cell of the image border.
    4. If `aspect_ratio` (width / height in pixels) is given, keep crops whose aspect is within 5 %
       of it (|aspect / aspect_ratio - 1| <= 0.05). If none is, this filter is skipped and the
       caller is expected to fit the ratio afterwards (e.g. with a box aspect-ratio fit).
    5. `composition_score` with `weights`.
    6. Greedy NMS at IoU > `nms_iou` (None disables it), then the `top_k` best (None: all).

  Args:
    image_wh: (W, H) of the original image in pixels.
    target_xyxy: (4,) target box, normalised xyxy in [0, 1] of the original image.
    other_boxes: optional (M, 4) other detected objects, normalised like the target.
    other_scores: optional (M,) their detector confidences in [0, 1].
    aspect_ratio: optional wanted width / height of the crop in pixels (> 0).
    top_k: number of crops to return (>= 1), or None for all that survive NMS.
    nms_iou: IoU above which a lower-scored crop is suppressed, or None.
    weights: composition-score weights.
    bins: GAIC grid size.
    expand_to_target: grow fallback crops to contain the target (step 3).

  Returns:
    List of (box, score), best first, where box is (x0, y0, x1, y1) in pixels of the original
    image (floats) and score is the composition score. Ties keep candidate order, so the ranking
    is deterministic. Never empty.
  """
  if top_k is not None and top_k < 1:
    raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
  if aspect_ratio is not None and not (np.isfinite(aspect_ratio) and aspect_ratio > 0):
    raise ValueError(f"aspect_ratio must be a positive width / height, got {aspect_ratio}")
  target = _validated_target(target_xyxy, clip_to_unit=True)
  candidates_px = gaic_grid_candidates(image_wh, bins=bins)
  w, h = (float(v) for v in image_wh)
  if candidates_px.shape[0] == 0:
    candidates_px = np.array([[0.0, 0.0, w, h]])
  scale = np.array([w, h, w, h])
  target_px = target * scale

  crops_px, _ = filter_containing(candidates_px, target_px, min_coverage=1.0)
  if expand_to_target and np.any(target_coverage(crops_px, target_px) < 1.0):
    crops_px = np.concatenate(
        [np.minimum(crops_px[:, :2], target_px[:2]), np.maximum(crops_px[:, 2:], target_px[2:])],
        axis=-1,
    )
    _, first = np.unique(crops_px, axis=0, return_index=True)
    crops_px = crops_px[np.sort(first)]

  if aspect_ratio is not None:
    aspect = (crops_px[:, 2] - crops_px[:, 0]) / (crops_px[:, 3] - crops_px[:, 1])
    matches = np.abs(aspect / aspect_ratio - 1) <= ASPECT_TOLERANCE
    if np.any(matches):
      crops_px = crops_px[matches]

  scores, _ = composition_score(crops_px / scale, target, other_boxes, other_scores, weights)
  if nms_iou is None:
    order = np.argsort(-scores, kind="stable")
  else:
    order = box_lib.nms_xyxy(crops_px, scores, nms_iou)
  if top_k is not None:
    order = order[:top_k]
  return [(tuple(float(v) for v in crops_px[i]), float(scores[i])) for i in order]


def token_scores(logits: jax.Array, in_image: jax.Array, query_mask: jax.Array) -> jax.Array:
  """(..., P) each token's detection score: the sigmoid of its best real query's logit, 0 for a
  token outside the real image (padding). The zero-shot crops rank and weigh tokens by it.

  Args:
    logits: (..., P, Q) class logits of the P tokens for the Q queries.
    in_image: (..., P) bool, `owlvit.heads.token_in_image`.
    query_mask: (..., Q) bool, the real queries.
  """
  logits = jnp.where(query_mask[..., None, :], logits, -jnp.inf)
  return jnp.where(in_image, jax.nn.sigmoid(jnp.max(logits, axis=-1)), 0.0)


def crops_from_detections(
    token_boxes_xyxy: np.ndarray,
    token_scores: np.ndarray | None,
    picked: np.ndarray | None,
    image_wh: tuple[float, float],
    aspect_ratio: float | None = None,
    top_k: int | None = None,
    nms_iou: float | None = None,
    other_objects: int = 20,
    context: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Zero-shot crops from OWL-ViT detections: the union of the picked boxes is the target.

  Args:
    token_boxes_xyxy: (P, 4) every image token's box, normalised xyxy in [0, 1] of the original
      image (clipped to it).
    token_scores: (P,) detector confidences in [0, 1] (0 for tokens in the padding), or None.
    picked: indices of the tokens the queries selected for the target (the caption's and the
      subject keywords' selections, or every selection: `ClipCropConfig.selection_union`); None
      or empty = no query (the target is the whole image).
    image_wh: (W, H) of the original image in pixels.
    aspect_ratio, top_k, nms_iou: as `rank_zero_shot_crops`.
    other_objects: how many of the best other tokens feed the cut-through penalty.
    context: indices of the tokens the context keywords selected ("the bench" of "the dog next
      to the bench"): not part of the target, but objects the request names, so they enter the
      cut-through penalty with confidence 1 (a crop keeps them whole or leaves them out).

  Returns:
    (boxes (n, 4) xyxy pixels of the original image, scores (n,)), best first.
  """
  boxes = np.asarray(token_boxes_xyxy, np.float64)
  if picked is None or len(picked) == 0 or token_scores is None:
    target, others, other_scores = np.array([0.0, 0.0, 1.0, 1.0]), None, None
  else:
    picked = np.asarray(picked)
    target = box_lib.union_box_xyxy_np(boxes[picked])
    scores = np.asarray(token_scores, np.float64)
    chosen = set(picked.tolist())
    named = [int(i) for i in (context if context is not None else []) if int(i) not in chosen]
    keep = [
        i
        for i in np.argsort(-scores, kind="stable")[:other_objects]
        if i not in chosen and i not in named
    ]
    others = boxes[named + keep]
    other_scores = np.concatenate([np.ones(len(named)), scores[keep]])
  if np.prod(target[2:] - target[:2]) <= 0:  # selected boxes lie in the padding: whole image
    target = np.array([0.0, 0.0, 1.0, 1.0])
  ranked = rank_zero_shot_crops(
      image_wh,
      target,
      others,
      other_scores,
      aspect_ratio=aspect_ratio,
      top_k=top_k,
      nms_iou=nms_iou,
  )
  return np.array([b for b, _ in ranked]), np.array([s for _, s in ranked])
