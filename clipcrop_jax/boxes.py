"""Pure box math. Formats are in the names: `cxcywh` (centre, size) and `xyxy` (corners).

Two sections:

* JAX (jit-able): coordinates are whatever the caller uses (normalised [0, 1] of the padded square
  inside the library); functions work on jnp or np arrays with boxes on the last axis (..., 4).
  IoU / GIoU divide by (union + 1e-6), as Scenic's `box_iou` (`IOU_EPS`).
* NumPy (host side: inference post-processing, evaluation metrics, zero-shot cropping, data
  generation): float64, any consistent units (pixels or normalised). IoU is exact (no eps) and 0
  where the union is empty. Validation, area, IoU, union and containment end in `_np`
  (`as_boxes_xyxy_np`, `pairwise_iou_xyxy_np`, ...); `nms_xyxy`, `parse_aspect_ratio`,
  `fit_aspect_ratio_xyxy`, `widen_to_min_side_xyxy` and the box fusion have no JAX twin.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from clipcrop_jax.owlvit import box_ops

# ------------------------------------------------------------------------------------------------
# JAX (jit-able).
# ------------------------------------------------------------------------------------------------

# Defined below OWL-ViT (which uses them), re-exported as this module's JAX box math.
IOU_EPS = box_ops.IOU_EPS
cxcywh_to_xyxy = box_ops.cxcywh_to_xyxy
xyxy_to_cxcywh = box_ops.xyxy_to_cxcywh
area_xyxy = box_ops.area_xyxy
pairwise_iou_and_union_xyxy = box_ops.pairwise_iou_and_union_xyxy
pairwise_iou_xyxy = box_ops.pairwise_iou_xyxy
pairwise_giou_xyxy = box_ops.pairwise_giou_xyxy


def _aligned_inter_union_hull_xyxy(
    a: jax.Array, b: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Intersection, union and enclosing-box areas of aligned pairs (..., 4) -> 3 x (...)."""
  a, b = jnp.asarray(a), jnp.asarray(b)
  inter_wh = jnp.clip(jnp.minimum(a[..., 2:], b[..., 2:]) - jnp.maximum(a[..., :2], b[..., :2]), 0)
  inter = inter_wh[..., 0] * inter_wh[..., 1]
  union = area_xyxy(a) + area_xyxy(b) - inter
  hull_wh = jnp.clip(jnp.maximum(a[..., 2:], b[..., 2:]) - jnp.minimum(a[..., :2], b[..., :2]), 0)
  return inter, union, hull_wh[..., 0] * hull_wh[..., 1]


def elementwise_iou_xyxy(a: jax.Array, b: jax.Array) -> jax.Array:
  """IoU of aligned pairs: a (..., 4), b (..., 4) (broadcastable) -> (...).

  Same rule as `pairwise_iou_xyxy`: intersection / (union + 1e-6).
  """
  inter, union, _ = _aligned_inter_union_hull_xyxy(a, b)
  return inter / (union + IOU_EPS)


def elementwise_giou_xyxy(a: jax.Array, b: jax.Array) -> jax.Array:
  """Generalised IoU of aligned pairs: a (..., 4), b (..., 4) (broadcastable) -> (...), in [-1, 1].

  Same rule as `pairwise_giou_xyxy`; differentiable everywhere the boxes are (losses use 1 - giou).
  """
  inter, union, hull = _aligned_inter_union_hull_xyxy(a, b)
  return inter / (union + IOU_EPS) - (hull - union) / (hull + IOU_EPS)


def union_box_xyxy(boxes: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
  """Smallest box enclosing the selected boxes: boxes (..., N, 4), mask (..., N) bool -> (..., 4).

  mask=None selects every box. Where the mask selects nothing (or N = 0) the result is the whole
  normalised frame (0, 0, 1, 1). Jit-able: unselected boxes are replaced by +inf / -inf corners.
  """
  boxes = jnp.asarray(boxes)
  boxes = boxes.astype(jnp.promote_types(boxes.dtype, jnp.float32))
  if mask is None:
    mask = jnp.ones(boxes.shape[:-1], dtype=bool)
  mask = jnp.asarray(mask, dtype=bool)[..., None]  # (..., N, 1)
  lo = jnp.min(jnp.where(mask, boxes[..., :2], jnp.inf), axis=-2, initial=jnp.inf)
  hi = jnp.max(jnp.where(mask, boxes[..., 2:], -jnp.inf), axis=-2, initial=-jnp.inf)
  union = jnp.concatenate([lo, hi], axis=-1)
  frame = jnp.asarray([0.0, 0.0, 1.0, 1.0], dtype=union.dtype)
  return jnp.where(jnp.any(mask, axis=(-2, -1))[..., None], union, frame)


def _per_coordinate(bound: Union[float, Sequence[float], jax.Array]) -> jax.Array:
  """Scalar or per-axis (bx, by) bound -> broadcastable to (..., 4) as (bx, by, bx, by)."""
  bound = jnp.asarray(bound, dtype=jnp.float32)
  if bound.ndim == 0:
    return bound
  if bound.shape != (2,):
    raise ValueError(f'A bound must be a scalar or a pair (x, y); got shape {bound.shape}.')
  return jnp.concatenate([bound, bound])


def clip_boxes_xyxy(
    boxes: jax.Array,
    lo: Union[float, Sequence[float], jax.Array] = 0.0,
    hi: Union[float, Sequence[float], jax.Array] = 1.0,
) -> jax.Array:
  """Orders corners and clips (..., 4) xyxy boxes to [lo, hi]; returns (..., 4).

  Corners are sorted first (x0 <= x1, y0 <= y1 afterwards), so a box whose corners were swapped
  (e.g. by a large predicted offset) becomes the box they span. `lo` and `hi` are scalars or
  per-axis pairs (x, y): hi=(1.0, 0.75) clips to the valid (unpadded) part of a padded-square frame
  whose image is wider than tall. Jit-able.
  """
  boxes = jnp.asarray(boxes)
  x0, x1 = jnp.minimum(boxes[..., 0], boxes[..., 2]), jnp.maximum(boxes[..., 0], boxes[..., 2])
  y0, y1 = jnp.minimum(boxes[..., 1], boxes[..., 3]), jnp.maximum(boxes[..., 1], boxes[..., 3])
  ordered = jnp.stack([x0, y0, x1, y1], axis=-1)
  lo_, hi_ = _per_coordinate(lo), _per_coordinate(hi)
  return jnp.clip(ordered, lo_.astype(ordered.dtype), hi_.astype(ordered.dtype))


# ------------------------------------------------------------------------------------------------
# NumPy (host side). float64; a box with x1 <= x0 or y1 <= y0 has area 0; IoU is exact
# (intersection / union, no eps) and 0 where the union is empty.
# ------------------------------------------------------------------------------------------------


def as_boxes_xyxy_np(
    boxes: Any, name: str, *, min_count: int = 0, finite: bool = True
) -> np.ndarray:
  """Validated boxes: an array-like of shape (N, 4) xyxy -> float64 (N, 4).

  An empty 1-D input (e.g. `[]`) is read as (0, 4). Every failure is a one-line ValueError that
  names the argument `name`.

  Args:
    boxes: (N, 4) boxes (x0, y0, x1, y1).
    name: the argument's name, for the error message.
    min_count: the smallest N allowed.
    finite: reject NaN / inf coordinates (False lets them through: they then give IoU 0).

  Returns:
    float64 (N, 4); `boxes` itself when it already is one.
  """
  arr = np.asarray(boxes, dtype=np.float64)
  if arr.ndim == 1 and arr.shape[0] == 0:
    arr = arr.reshape(0, 4)
  if arr.ndim != 2 or arr.shape[1] != 4:
    raise ValueError(f'{name} must have shape (N, 4) (x0, y0, x1, y1); got {arr.shape}')
  if arr.shape[0] < min_count:
    raise ValueError(
        f'{name} must hold at least {min_count} box(es) (N >= {min_count}); got '
        f'shape {arr.shape}'
    )
  if finite and not np.all(np.isfinite(arr)):
    raise ValueError(f'{name} contains non-finite values')
  return arr


def as_box_xyxy_np(box: Any, name: str, *, finite: bool = True) -> np.ndarray:
  """Validated single box: an array-like of shape (4,) xyxy -> float64 (4,).

  Like `as_boxes_xyxy_np`: a one-line ValueError naming `name` for any other shape, or (with
  `finite`) for NaN / inf coordinates.
  """
  arr = np.asarray(box, dtype=np.float64)
  if arr.shape != (4,):
    raise ValueError(f'{name} must be one box (x0, y0, x1, y1) of shape (4,); got {arr.shape}')
  if finite and not np.all(np.isfinite(arr)):
    raise ValueError(f'{name} contains non-finite values: {arr.tolist()}')
  return arr


def area_xyxy_np(boxes: np.ndarray) -> np.ndarray:
  """(..., 4) xyxy -> (...) area; negative widths / heights are clipped to 0 (area 0)."""
  return np.clip(boxes[..., 2] - boxes[..., 0], 0, None) * np.clip(
      boxes[..., 3] - boxes[..., 1], 0, None
  )


def pairwise_intersection_xyxy_np(a: Any, b: Any) -> np.ndarray:
  """Intersection area of every pair: a (N, 4), b (M, 4) xyxy -> float64 (N, M), >= 0."""
  a = as_boxes_xyxy_np(a, 'a', finite=False)
  b = as_boxes_xyxy_np(b, 'b', finite=False)
  lo = np.maximum(a[:, None, :2], b[None, :, :2])
  hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
  wh = np.clip(hi - lo, 0, None)
  return wh[..., 0] * wh[..., 1]


def pairwise_iou_xyxy_np(a: Any, b: Any) -> np.ndarray:
  """Exact IoU of every pair: a (N, 4), b (M, 4) xyxy -> float64 (N, M).

  IoU = intersection / union with no eps (unlike the JAX `pairwise_iou_xyxy`), and 0 where the
  union is empty (both boxes degenerate). Bitwise symmetric: IoU(a, b) == IoU(b, a). Non-finite
  coordinates are not rejected; a NaN box has IoU 0 with everything.
  """
  a = as_boxes_xyxy_np(a, 'a', finite=False)
  b = as_boxes_xyxy_np(b, 'b', finite=False)
  inter = pairwise_intersection_xyxy_np(a, b)
  union = area_xyxy_np(a)[:, None] + area_xyxy_np(b)[None, :] - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def union_box_xyxy_np(boxes: Any) -> np.ndarray:
  """Smallest box enclosing all boxes: (N, 4) xyxy, N >= 1 -> float64 (4,).

  (min x0, min y0, max x1, max y1); the JAX `union_box_xyxy` adds a mask and an empty-set rule.
  """
  boxes = as_boxes_xyxy_np(boxes, 'boxes', min_count=1, finite=False)
  return np.concatenate([boxes[:, :2].min(axis=0), boxes[:, 2:].max(axis=0)])


def contains_xyxy_np(outer: Any, inner: Any, tol: float = 1e-9) -> bool:
  """Whether box `outer` (4,) contains box `inner` (4,) (xyxy), each edge up to `tol`."""
  return bool(
      outer[0] <= inner[0] + tol
      and outer[1] <= inner[1] + tol
      and outer[2] >= inner[2] - tol
      and outer[3] >= inner[3] - tol
  )


def nms_xyxy(
    boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, max_outputs: Optional[int] = None
) -> np.ndarray:
  """Greedy non-maximum suppression; returns int64 indices of kept boxes, best first.

  Boxes are visited by descending score, ties in index order (stable sort). A box is kept unless
  its `pairwise_iou_xyxy_np` with an already kept box is strictly > iou_threshold (exact IoU, no
  eps). A box of area 0 has IoU 0 with every box, so (for thresholds >= 0) it neither suppresses
  nor is suppressed.

  Args:
    boxes: (N, 4) xyxy, any consistent units.
    scores: (N,).
    iou_threshold: suppression threshold in [0, 1].
    max_outputs: stop after this many kept boxes (None: no limit).

  Returns:
    (K,) int64 indices into `boxes`, in the order they were kept (descending score).
  """
  boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
  scores = np.asarray(scores, dtype=np.float64).reshape(-1)
  if boxes.shape[0] != scores.shape[0]:
    raise ValueError(f'boxes {boxes.shape} and scores {scores.shape} disagree in length.')
  limit = boxes.shape[0] if max_outputs is None else max(int(max_outputs), 0)
  order = np.argsort(-scores, kind='stable')
  suppressed = np.zeros(boxes.shape[0], dtype=bool)
  keep = []
  for i in order:
    if len(keep) >= limit:
      break
    if suppressed[i]:
      continue
    keep.append(i)
    suppressed |= pairwise_iou_xyxy_np(boxes, boxes[i][None])[:, 0] > iou_threshold
  return np.asarray(keep, dtype=np.int64)


def parse_aspect_ratio(value: Union[None, float, int, str]) -> Optional[float]:
  """Aspect ratio (width / height) from None, a positive number, or 'W:H', 'W/H', '1.5'.

  Returns None for None (free aspect ratio). Raises ValueError, quoting the value, for anything
  else: non-positive, non-finite, booleans, empty or malformed strings.
  """
  if value is None:
    return None
  if isinstance(value, (bool, np.bool_)):
    raise ValueError(f'Invalid aspect ratio {value!r}: expected a positive number or "W:H".')
  if isinstance(value, (int, float, np.integer, np.floating)):
    ratio = float(value)
  elif isinstance(value, str):
    text = value.strip()
    parts = re.split(r'[:/]', text)
    try:
      if len(parts) == 1:
        ratio = float(parts[0])
      elif len(parts) == 2:
        num, den = float(parts[0]), float(parts[1])
        if not (np.isfinite(num) and np.isfinite(den) and num > 0 and den > 0):
          raise ValueError
        ratio = num / den
      else:
        raise ValueError
    except ValueError:
      raise ValueError(
          f'Invalid aspect ratio {value!r}: expected a positive number, "W:H" or '
          '"W/H" (e.g. "16:9").'
      ) from None
  else:
    raise ValueError(f'Invalid aspect ratio {value!r}: expected a positive number or "W:H".')
  if not (np.isfinite(ratio) and ratio > 0):
    raise ValueError(f'Invalid aspect ratio {value!r}: must be finite and > 0.')
  return ratio


def _best_offset(centre: float, size: float, extent: float) -> float:
  """Start of a segment of `size` inside [0, extent], centred on `centre` as far as allowed."""
  return float(np.clip(centre - size / 2, 0.0, extent - size))


def fit_aspect_ratio_xyxy(
    box: np.ndarray, ratio: Union[float, str], image_wh: tuple[float, float]
) -> np.ndarray:
  """Box of exactly `ratio` (w / h) inside the image that contains `box`, else best covers it.

  NumPy only; pixel coordinates. The image is [0, W] x [0, H].

  1. The largest box of that ratio inside the image has a unique size (s, s / ratio) with
     s = min(W, ratio * H). If some placement of it inside the image contains `box`, the result is
     that size, placed as centred on `box` as the image allows (clamping the centred position keeps
     the containment, since the set of containing positions is an interval that holds the centre).
  2. Otherwise no box of that ratio inside the image contains `box` (a smaller one cannot either),
     and the result is the ratio box inside the image with maximal IoU with `box`. For a fixed width
     s, the centred-then-clamped position maximises the overlap in each axis separately (the
     overlap is a trapezoid in the position, its plateau holds the centred position), so only s
     varies. Overlaps are then piecewise linear in s, the IoU piecewise rational; each piece's
     maximum is at an end or at a real root of a cubic, all of which are evaluated exactly.
     Ties go to the larger box. If `box` lies entirely outside the image (IoU 0 for all), the
     largest ratio box placed as near to `box` as possible is returned.

  Args:
    box: (4,) (x0, y0, x1, y1) in pixels; corners are sorted first.
    ratio: width / height, anything `parse_aspect_ratio` accepts except None.
    image_wh: (W, H) of the image in pixels, both > 0.

  Returns:
    float64 (4,) (x0, y0, x1, y1) with (x1 - x0) / (y1 - y0) == ratio (to rounding) and
    0 <= x0 < x1 <= W, 0 <= y0 < y1 <= H.
  """
  r = parse_aspect_ratio(ratio)
  if r is None:
    raise ValueError('fit_aspect_ratio_xyxy needs an aspect ratio, got None.')
  img_w, img_h = float(image_wh[0]), float(image_wh[1])
  if not (img_w > 0 and img_h > 0):
    raise ValueError(f'image_wh must be positive, got {image_wh!r}.')
  box = np.asarray(box, dtype=np.float64).reshape(4)
  bx0, bx1 = min(box[0], box[2]), max(box[0], box[2])
  by0, by1 = min(box[1], box[3]), max(box[1], box[3])
  cx, cy = (bx0 + bx1) / 2, (by0 + by1) / 2
  target = np.array([bx0, by0, bx1, by1])

  def placed(s: float) -> np.ndarray:  # the ratio box of width s at its best position
    s, h = min(s, img_w), min(s / r, img_h)  # min() only absorbs rounding at the largest size.
    x0, y0 = _best_offset(cx, s, img_w), _best_offset(cy, h, img_h)
    return np.array([x0, y0, x0 + s, y0 + h])

  s_max = min(img_w, r * img_h)
  h_max = min(s_max / r, img_h)
  # Case 1: containment at the largest size.
  x_lo, x_hi = max(bx1 - s_max, 0.0), min(bx0, img_w - s_max)
  y_lo, y_hi = max(by1 - h_max, 0.0), min(by0, img_h - h_max)
  if x_lo <= x_hi and y_lo <= y_hi:
    x0 = float(np.clip(cx - s_max / 2, x_lo, x_hi))
    y0 = float(np.clip(cy - h_max / 2, y_lo, y_hi))
    return np.array([x0, y0, x0 + s_max, y0 + h_max])

  # Case 2: maximal IoU over the width s in (0, s_max]. Breakpoints of the per-axis overlaps:
  bw, bh = bx1 - bx0, by1 - by0
  x_breaks = [bw, 2 * cx, 2 * (img_w - cx), bx0, bx1, img_w - bx0, img_w - bx1]
  y_breaks = [bh, 2 * cy, 2 * (img_h - cy), by0, by1, img_h - by0, img_h - by1]
  breaks = np.array(x_breaks + [r * b for b in y_breaks])
  breaks = np.unique(np.concatenate([[0.0, s_max], breaks[(breaks > 0) & (breaks < s_max)]]))
  area_b = bw * bh

  def overlaps(s: float) -> tuple[float, float]:
    c = placed(s)
    return (max(0.0, min(c[2], bx1) - max(c[0], bx0)), max(0.0, min(c[3], by1) - max(c[1], by0)))

  candidates = [s_max]
  for lo, hi in zip(breaks[:-1], breaks[1:]):
    candidates.append(hi)
    if hi - lo <= 1e-12 * s_max:
      continue
    # Overlaps are linear on the piece: fit Ix = ax·s + kx, Iy = ay·s + ky from two inner points.
    s1, s2 = lo + (hi - lo) / 3, lo + 2 * (hi - lo) / 3
    (ix1, iy1), (ix2, iy2) = overlaps(s1), overlaps(s2)
    ax, ay = (ix2 - ix1) / (s2 - s1), (iy2 - iy1) / (s2 - s1)
    kx, ky = ix1 - ax * s1, iy1 - ay * s1
    # I(s) = (ax s + kx)(ay s + ky); d IoU / ds = 0  <=>  I'(s)(A + s^2 / r) - 2 s I(s) / r = 0.
    inter = np.poly1d([ax * ay, ax * ky + ay * kx, kx * ky])
    cubic = np.polyder(inter) * np.poly1d([1 / r, 0.0, area_b]) - np.poly1d([2 / r, 0.0]) * inter
    if np.all(np.abs(cubic.coeffs) == 0):
      continue
    for root in np.roots(cubic.coeffs):
      if abs(root.imag) <= 1e-9 * max(1.0, abs(root.real)) and lo < root.real < hi:
        candidates.append(float(root.real))
  candidates = np.array(sorted(set(candidates), reverse=True))  # Larger first: ties -> larger.
  boxes = np.stack([placed(s) for s in candidates])
  ious = pairwise_iou_xyxy_np(boxes, target[None])[:, 0]
  return boxes[int(np.argmax(ious))]


def widen_to_min_side_xyxy(
    boxes: np.ndarray, image_wh: tuple[float, float], min_side: float = 1.0
) -> np.ndarray:
  """Widens every side shorter than `min_side` to it, about the box centre, inside the image.

  NumPy only; pixel coordinates, the image is [0, W] x [0, H]. A side of the image shorter than
  `min_side` bounds the result (the box then spans the whole image on that axis).

  Args:
    boxes: (N, 4) xyxy with x0 <= x1, y0 <= y1.
    image_wh: (W, H) of the image, both > 0.
    min_side: the smallest side allowed.

  Returns:
    float64 (N, 4) xyxy; boxes whose sides are already long enough are unchanged.
  """
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4).copy()
  for axis, extent in enumerate(image_wh):
    lo, hi = boxes[:, axis], boxes[:, axis + 2]
    need = min(float(min_side), float(extent))
    short = hi - lo < need
    start = np.clip((lo + hi) / 2 - need / 2, 0.0, extent - need)
    boxes[:, axis] = np.where(short, start, lo)
    boxes[:, axis + 2] = np.where(short, start + need, hi)
  return boxes


def fuse_top_k_xyxy(boxes: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, float]:
  """Box voting: the mean of the `k` best-scored boxes (NumPy) and the mean of their scores.

  Ties keep index order (stable sort); `k` larger than N uses every box.

  Args:
    boxes: (N, 4) xyxy, N >= 1, any consistent units.
    scores: (N,).
    k: number of boxes averaged, >= 1 (1 = the best box itself).

  Returns:
    ((4,) float64 fused box, float mean score of the fused boxes).
  """
  boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
  scores = np.asarray(scores, dtype=np.float64).reshape(-1)
  if boxes.shape[0] != scores.shape[0] or boxes.shape[0] == 0:
    raise ValueError(
        f'need N >= 1 boxes and N scores, got boxes {boxes.shape} and scores ' f'{scores.shape}.'
    )
  if int(k) != k or k < 1:
    raise ValueError(f'k must be an integer >= 1, got {k}')
  top = np.argsort(-scores, kind='stable')[: int(k)]
  return boxes[top].mean(axis=0), float(scores[top].mean())


def with_fused_first_xyxy(
    boxes: np.ndarray, scores: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
  """(boxes, scores) with the `fuse_top_k_xyxy` box and score prepended when k > 1 (N + 1 rows,
  dtypes kept); unchanged for k == 1."""
  if k <= 1:
    return boxes, scores
  fused, fused_score = fuse_top_k_xyxy(boxes, scores, k)
  boxes = np.asarray(boxes)
  scores = np.asarray(scores)
  return (
      np.concatenate([fused[None].astype(boxes.dtype), boxes]),
      np.concatenate([[fused_score], scores]).astype(scores.dtype),
  )
