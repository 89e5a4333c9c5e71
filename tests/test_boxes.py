"""Tests for clipcrop_jax.boxes: hand values, raster / brute-force oracles, jit and grad."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipcrop_jax import boxes as box_lib


def _random_int_boxes(rng: np.random.Generator, n: int, size: int = 12) -> np.ndarray:
  """(n, 4) xyxy boxes with integer corners in [0, size], possibly degenerate."""
  xs = np.sort(rng.integers(0, size + 1, (n, 2)), axis=1)
  ys = np.sort(rng.integers(0, size + 1, (n, 2)), axis=1)
  return np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=1).astype(np.float64)


def _raster(box: np.ndarray, size: int = 12) -> np.ndarray:
  """Boolean (size, size) mask of an integer-corner xyxy box; pixel (i, j) = [j, j+1] x [i, i+1]."""
  ii, jj = np.mgrid[0:size, 0:size]
  return (jj >= box[0]) & (jj < box[2]) & (ii >= box[1]) & (ii < box[3])


def _raster_iou_giou(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
  """IoU and GIoU of integer boxes by counting pixels (the library's 1e-6 eps applied)."""
  ma, mb = _raster(a), _raster(b)
  inter, union = float(np.sum(ma & mb)), float(np.sum(ma | mb))
  hull_box = np.concatenate([np.minimum(a[:2], b[:2]), np.maximum(a[2:], b[2:])])
  hull = float(np.sum(_raster(hull_box)))
  iou = inter / (union + box_lib.IOU_EPS)
  return iou, iou - (hull - union) / (hull + box_lib.IOU_EPS)


# --------------------------------------------------------------------------------------------------
# Format conversions and IoU / GIoU.


def test_format_round_trip():
  rng = np.random.default_rng(0)
  xyxy = np.sort(rng.uniform(0, 1, (5, 3, 2, 2)), axis=-1).transpose(0, 1, 3, 2).reshape(5, 3, 4)
  cxcywh = box_lib.xyxy_to_cxcywh(xyxy)
  np.testing.assert_allclose(box_lib.cxcywh_to_xyxy(cxcywh), xyxy, atol=1e-6)
  np.testing.assert_allclose(
      box_lib.xyxy_to_cxcywh(box_lib.cxcywh_to_xyxy(cxcywh)), cxcywh, atol=1e-6
  )


def test_iou_giou_hand_values():
  a = jnp.array([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
  b = jnp.array([[1.0, 1.0, 3.0, 3.0], [2.0, 0.0, 3.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
  # Overlapping: inter 1, union 7, hull 9. Disjoint: union 2, hull 3. Identical: iou 1.
  expected_iou = [1 / 7, 0.0, 1.0]
  expected_giou = [1 / 7 - 2 / 9, -1 / 3, 1.0]
  np.testing.assert_allclose(box_lib.elementwise_iou_xyxy(a, b), expected_iou, atol=1e-6)
  np.testing.assert_allclose(box_lib.elementwise_giou_xyxy(a, b), expected_giou, atol=1e-6)
  np.testing.assert_allclose(jnp.diag(box_lib.pairwise_iou_xyxy(a, b)), expected_iou, atol=1e-6)
  np.testing.assert_allclose(jnp.diag(box_lib.pairwise_giou_xyxy(a, b)), expected_giou, atol=1e-6)


def test_iou_giou_against_pixel_count_oracle():
  rng = np.random.default_rng(1)
  a, b = _random_int_boxes(rng, 40), _random_int_boxes(rng, 40)
  oracle = np.array([_raster_iou_giou(x, y) for x, y in zip(a, b)])
  np.testing.assert_allclose(box_lib.elementwise_iou_xyxy(a, b), oracle[:, 0], atol=1e-5)
  np.testing.assert_allclose(box_lib.elementwise_giou_xyxy(a, b), oracle[:, 1], atol=1e-5)
  pair = np.array([[_raster_iou_giou(x, y)[1] for y in b[:7]] for x in a[:5]])
  np.testing.assert_allclose(box_lib.pairwise_giou_xyxy(a[:5], b[:7]), pair, atol=1e-5)


def test_elementwise_matches_pairwise_diagonal_and_broadcasts():
  rng = np.random.default_rng(2)
  a = box_lib.cxcywh_to_xyxy(rng.uniform(0.2, 0.5, (2, 6, 4)))
  b = box_lib.cxcywh_to_xyxy(rng.uniform(0.2, 0.5, (2, 6, 4)))
  got = box_lib.elementwise_giou_xyxy(a, b)
  assert got.shape == (2, 6)
  for i in range(2):
    np.testing.assert_allclose(got[i], jnp.diag(box_lib.pairwise_giou_xyxy(a[i], b[i])), atol=1e-6)
  # Broadcasting one box against many.
  one = box_lib.elementwise_iou_xyxy(a[0, :1], a[0])
  np.testing.assert_allclose(one, box_lib.pairwise_iou_xyxy(a[0, :1], a[0])[0], atol=1e-6)


def test_giou_grad_exists_and_is_finite():
  a = jnp.array([[0.1, 0.1, 0.5, 0.5], [0.0, 0.0, 0.2, 0.2], [0.3, 0.3, 0.6, 0.7]])
  b = jnp.array([[0.2, 0.3, 0.6, 0.9], [0.5, 0.5, 0.9, 0.9], [0.3, 0.3, 0.6, 0.7]])  # overlap,
  # disjoint, identical.
  loss = lambda x: jnp.sum(1.0 - box_lib.elementwise_giou_xyxy(x, b))
  grad = jax.jit(jax.grad(loss))(a)
  assert grad.shape == a.shape
  assert np.all(np.isfinite(grad))
  assert np.any(grad != 0)
  # Moving a disjoint box towards its target lowers the loss: gradient on x0 of row 1 is negative.
  assert grad[1, 0] < 0


# --------------------------------------------------------------------------------------------------
# Union and clipping.


def test_union_box_mask_and_empty():
  boxes = jnp.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.1, 0.6, 0.3], [0.0, 0.0, 0.05, 0.9]])
  union = jax.jit(box_lib.union_box_xyxy)
  np.testing.assert_allclose(union(boxes, jnp.array([True, True, False])), [0.1, 0.1, 0.6, 0.4])
  np.testing.assert_allclose(union(boxes, jnp.array([False, True, False])), boxes[1])
  np.testing.assert_allclose(box_lib.union_box_xyxy(boxes), [0.0, 0.0, 0.6, 0.9])
  np.testing.assert_allclose(union(boxes, jnp.zeros(3, bool)), [0.0, 0.0, 1.0, 1.0])
  np.testing.assert_allclose(box_lib.union_box_xyxy(jnp.zeros((0, 4))), [0.0, 0.0, 1.0, 1.0])


def test_union_box_batched_matches_loop():
  rng = np.random.default_rng(3)
  boxes = box_lib.cxcywh_to_xyxy(rng.uniform(0.1, 0.5, (4, 5, 4)))
  mask = rng.uniform(size=(4, 5)) < 0.5
  mask[0] = False
  got = jax.jit(box_lib.union_box_xyxy)(boxes, mask)
  assert got.shape == (4, 4)
  for i in range(4):
    sel = np.asarray(boxes[i])[mask[i]]
    want = [0, 0, 1, 1] if not len(sel) else np.concatenate([sel[:, :2].min(0), sel[:, 2:].max(0)])
    np.testing.assert_allclose(got[i], want, atol=1e-7)


def test_clip_boxes_sorts_corners_and_clips():
  boxes = jnp.array([[0.5, 1.2, -0.1, 0.3], [0.2, 0.2, 0.4, 0.4], [1.5, 1.5, 2.0, 2.0]])
  got = jax.jit(box_lib.clip_boxes_xyxy)(boxes)
  np.testing.assert_allclose(got, [[0.0, 0.3, 0.5, 1.0], [0.2, 0.2, 0.4, 0.4], [1, 1, 1, 1]])
  per_axis = box_lib.clip_boxes_xyxy(boxes, hi=(1.0, 0.75))
  np.testing.assert_allclose(per_axis[0], [0.0, 0.3, 0.5, 0.75])
  traced = jax.jit(lambda b, hi: box_lib.clip_boxes_xyxy(b, 0.0, hi))(boxes, jnp.array([0.3, 0.9]))
  np.testing.assert_allclose(traced[1], [0.2, 0.2, 0.3, 0.4])
  out = box_lib.clip_boxes_xyxy(np.random.default_rng(4).normal(size=(3, 7, 4)))
  assert out.shape == (3, 7, 4)
  assert np.all(out[..., 2] >= out[..., 0]) and np.all(out[..., 3] >= out[..., 1])
  assert np.all((out >= 0) & (out <= 1))
  with pytest.raises(ValueError, match='bound'):
    box_lib.clip_boxes_xyxy(boxes, hi=(1.0, 1.0, 1.0))


# --------------------------------------------------------------------------------------------------
# NumPy: validation, area, exact IoU, union, containment.


def test_as_boxes_np_shapes_and_one_line_errors():
  out = box_lib.as_boxes_xyxy_np([[0, 0, 1, 2]], 'crops')
  assert out.dtype == np.float64 and out.shape == (1, 4)
  assert box_lib.as_boxes_xyxy_np([], 'crops').shape == (0, 4)
  same = np.zeros((3, 4))
  assert box_lib.as_boxes_xyxy_np(same, 'crops') is same
  for bad, match in [
      ([0, 0, 1, 1], r'crops must have shape \(N, 4\)'),
      (np.zeros((2, 3)), r'crops must have shape \(N, 4\)'),
      (np.zeros((1, 2, 4)), r'crops must have shape \(N, 4\)'),
      ([[0, 0, np.nan, 1]], 'crops contains non-finite'),
      ([[0, 0, np.inf, 1]], 'crops contains non-finite'),
  ]:
    with pytest.raises(ValueError, match=match) as err:
      box_lib.as_boxes_xyxy_np(bad, 'crops')
    assert '\n' not in str(err.value)
  with pytest.raises(ValueError, match=r'refs must hold at least 1 box'):
    box_lib.as_boxes_xyxy_np(np.zeros((0, 4)), 'refs', min_count=1)
  kept = box_lib.as_boxes_xyxy_np([[0, 0, np.nan, 1]], 'crops', finite=False)
  assert np.isnan(kept[0, 2])
  np.testing.assert_array_equal(box_lib.as_box_xyxy_np((1, 2, 3, 4), 'target'), [1, 2, 3, 4])
  with pytest.raises(ValueError, match=r'target must be one box .* shape \(4,\); got \(1, 4\)'):
    box_lib.as_box_xyxy_np([[1, 2, 3, 4]], 'target')
  with pytest.raises(ValueError, match=r'target contains non-finite values: \[1.0, nan'):
    box_lib.as_box_xyxy_np([1, np.nan, 3, 4], 'target')
  assert np.isinf(box_lib.as_box_xyxy_np([1, np.inf, 3, 4], 'target', finite=False)[1])


def test_area_np_clips_inverted_boxes():
  boxes = np.array([[[0, 0, 2, 3], [2, 0, 1, 3]], [[0, 5, 4, 1], [1, 1, 1, 1]]], float)
  np.testing.assert_array_equal(box_lib.area_xyxy_np(boxes), [[6.0, 0.0], [0.0, 0.0]])


def test_pairwise_iou_np_hand_values():
  # (0,0,2,2) vs (1,1,3,3): inter 1, union 7. vs (0,0,1,2): inter 2, union 4. Two degenerate
  # boxes: empty union -> 0 (no eps anywhere: 1/7 and 1/2 are exact).
  a = [[0, 0, 2, 2], [0, 0, 0, 0]]
  b = [[1, 1, 3, 3], [0, 0, 1, 2], [0, 0, 0, 0]]
  iou = box_lib.pairwise_iou_xyxy_np(a, b)
  assert iou.dtype == np.float64 and iou.shape == (2, 3)
  np.testing.assert_array_equal(iou, [[1 / 7, 0.5, 0.0], [0.0, 0.0, 0.0]])
  np.testing.assert_array_equal(
      box_lib.pairwise_intersection_xyxy_np(a, b), [[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]]
  )
  # A NaN box overlaps nothing (IoU 0), it is not an error here.
  np.testing.assert_array_equal(box_lib.pairwise_iou_xyxy_np([[0, 0, np.nan, 2]], a), [[0, 0]])
  assert box_lib.pairwise_iou_xyxy_np(np.zeros((0, 4)), b).shape == (0, 3)
  with pytest.raises(ValueError, match=r'a must have shape \(N, 4\)'):
    box_lib.pairwise_iou_xyxy_np([0, 0, 2, 2], b)


def test_pairwise_iou_np_against_pixel_count_oracle():
  rng = np.random.default_rng(8)
  a = _random_int_boxes(rng, 30)  # many degenerate boxes
  b = np.concatenate([_random_int_boxes(rng, 17), a[:3]])  # and some identical ones
  inter = np.array([[np.sum(_raster(x) & _raster(y)) for y in b] for x in a], float)
  union = np.array([[np.sum(_raster(x) | _raster(y)) for y in b] for x in a], float)
  oracle = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
  assert (union == 0).any() and ((union > 0) & (inter == 0)).any() and (oracle == 1).any()
  iou = box_lib.pairwise_iou_xyxy_np(a, b)
  np.testing.assert_allclose(iou, oracle, rtol=1e-15, atol=0)
  np.testing.assert_array_equal(box_lib.pairwise_intersection_xyxy_np(a, b), inter)
  # Bitwise symmetric (greedy NMS relies on it) and equal to the JAX version up to its eps.
  assert box_lib.pairwise_iou_xyxy_np(b, a).T.tobytes() == iou.tobytes()
  np.testing.assert_allclose(box_lib.pairwise_iou_xyxy(a, b), iou, atol=1e-5)


def test_union_box_np_matches_jax_union_and_rejects_empty():
  boxes = np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.1, 0.6, 0.3], [0.0, 0.3, 0.05, 0.9]])
  np.testing.assert_array_equal(box_lib.union_box_xyxy_np(boxes), [0.0, 0.1, 0.6, 0.9])
  np.testing.assert_array_equal(box_lib.union_box_xyxy_np([(1, 2, 3, 4)]), [1, 2, 3, 4])
  np.testing.assert_allclose(
      box_lib.union_box_xyxy_np(boxes), box_lib.union_box_xyxy(boxes), atol=1e-7
  )
  with pytest.raises(ValueError, match='boxes must hold at least 1 box'):
    box_lib.union_box_xyxy_np(np.zeros((0, 4)))


def test_contains_np_with_tolerance():
  outer = (0.0, 0.0, 10.0, 10.0)
  assert box_lib.contains_xyxy_np(outer, (0, 0, 10, 10))
  assert box_lib.contains_xyxy_np(outer, (2, 3, 4, 5))
  assert box_lib.contains_xyxy_np(outer, (-1e-10, 0, 10, 10 + 1e-10))
  for inner in [(-1e-6, 0, 5, 5), (0, -1e-6, 5, 5), (0, 0, 10.001, 5), (0, 0, 5, 10.001)]:
    assert not box_lib.contains_xyxy_np(outer, inner), inner
  assert box_lib.contains_xyxy_np(outer, (-0.5, 0, 5, 5), tol=0.5)
  assert not box_lib.contains_xyxy_np(outer, (-0.5, 0, 5, 5), tol=0.4)


# --------------------------------------------------------------------------------------------------
# Aspect ratios.


def test_fuse_top_k_hand_values_and_errors():
  boxes = np.array([[0, 0, 10, 10], [2, 2, 12, 12], [100, 100, 110, 110], [4, 0, 8, 4]], float)
  scores = np.array([0.9, 0.8, 0.1, 0.8])  # tie between boxes 1 and 3: index order
  box, score = box_lib.fuse_top_k_xyxy(boxes, scores, 1)
  np.testing.assert_array_equal(box, boxes[0])
  assert score == pytest.approx(0.9)
  box, score = box_lib.fuse_top_k_xyxy(boxes, scores, 2)
  np.testing.assert_allclose(box, [1, 1, 11, 11])
  assert score == pytest.approx(0.85)
  box, score = box_lib.fuse_top_k_xyxy(boxes, scores, 3)
  np.testing.assert_allclose(box, [2, 2 / 3, 10, 26 / 3])
  box, _ = box_lib.fuse_top_k_xyxy(boxes, scores, 99)  # more than N: all of them
  np.testing.assert_allclose(box, boxes.mean(0))
  for bad in (0, -1, 1.5):
    with pytest.raises(ValueError, match='k must be'):
      box_lib.fuse_top_k_xyxy(boxes, scores, bad)
  with pytest.raises(ValueError, match='N >= 1'):
    box_lib.fuse_top_k_xyxy(np.zeros((0, 4)), np.zeros(0), 1)
  with pytest.raises(ValueError, match='N >= 1'):
    box_lib.fuse_top_k_xyxy(boxes, scores[:2], 1)
  # with_fused_first_xyxy: unchanged for k = 1, else the fused box and score prepended.
  same_boxes, same_scores = box_lib.with_fused_first_xyxy(boxes, scores, 1)
  assert same_boxes is boxes and same_scores is scores
  b32, s32 = boxes.astype(np.float32), scores.astype(np.float32)
  first_boxes, first_scores = box_lib.with_fused_first_xyxy(b32, s32, 2)
  assert first_boxes.dtype == np.float32 and first_scores.dtype == np.float32
  np.testing.assert_allclose(first_boxes, np.concatenate([[[1, 1, 11, 11]], boxes]))
  np.testing.assert_allclose(first_scores, np.concatenate([[0.85], scores]), rtol=1e-6)


@pytest.mark.parametrize(
    'value, expected',
    [
        (None, None),
        (1.5, 1.5),
        (2, 2.0),
        ('16:9', 16 / 9),
        ('16/9', 16 / 9),
        (' 4 : 3 ', 4 / 3),
        ('1.5', 1.5),
        (np.float32(0.5), 0.5),
    ],
)
def test_parse_aspect_ratio_valid(value, expected):
  got = box_lib.parse_aspect_ratio(value)
  if expected is None:
    assert got is None
  else:
    assert isinstance(got, float) and got == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    'value',
    [
        0,
        -1.0,
        float('nan'),
        float('inf'),
        True,
        '',
        'wide',
        '16:0',
        '0:9',
        '1:2:3',
        '-4:3',
        'inf',
        [16, 9],
    ],
)
def test_parse_aspect_ratio_invalid_quotes_value(value):
  with pytest.raises(ValueError) as err:
    box_lib.parse_aspect_ratio(value)
  assert repr(value) in str(err.value)


def _check_ratio_box(out: np.ndarray, ratio: float, image_wh: tuple[float, float]) -> None:
  w, h = out[2] - out[0], out[3] - out[1]
  assert w > 0 and h > 0
  assert w / h == pytest.approx(ratio, rel=1e-6)
  tol = 1e-9 * max(image_wh)
  assert out[0] >= -tol and out[1] >= -tol
  assert out[2] <= image_wh[0] + tol and out[3] <= image_wh[1] + tol


def _grid_oracle_best_iou(
    box: np.ndarray, ratio: float, image_wh: tuple[float, float], n_size: int = 300, n_pos: int = 41
) -> float:
  """Best IoU over a (size, x, y) grid of ratio boxes inside the image (no placement assumed)."""
  img_w, img_h = image_wh
  s_max = min(img_w, ratio * img_h)
  sizes = np.linspace(s_max / n_size, s_max, n_size)[:, None, None]
  t = np.linspace(0.0, 1.0, n_pos)
  x0 = t[None, :, None] * (img_w - sizes)
  y0 = t[None, None, :] * (img_h - sizes / ratio)
  x1, y1 = x0 + sizes, y0 + sizes / ratio
  iw = np.clip(np.minimum(x1, box[2]) - np.maximum(x0, box[0]), 0, None)
  ih = np.clip(np.minimum(y1, box[3]) - np.maximum(y0, box[1]), 0, None)
  inter = iw * ih
  union = sizes * sizes / ratio + (box[2] - box[0]) * (box[3] - box[1]) - inter
  return float(np.max(inter / union))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
  """Exact IoU of two (4,) boxes by the library (`pairwise_iou_xyxy_np` has its own oracle test)."""
  return float(box_lib.pairwise_iou_xyxy_np(np.asarray(a)[None], np.asarray(b)[None])[0, 0])


def test_fit_aspect_ratio_contains_when_possible():
  # 100x80 image, 40x20 box, square ratio: the largest square is 80x80 and can contain the box.
  out = box_lib.fit_aspect_ratio_xyxy(np.array([10.0, 10.0, 50.0, 30.0]), 1.0, (100, 80))
  np.testing.assert_allclose(out, [0.0, 0.0, 80.0, 80.0])  # centred at x=30 -> clamped to 0.
  # Centred on the box where the image allows it.
  out = box_lib.fit_aspect_ratio_xyxy(np.array([40.0, 30.0, 60.0, 50.0]), '1:1', (200, 80))
  np.testing.assert_allclose(out, [10.0, 0.0, 90.0, 80.0])
  rng = np.random.default_rng(5)
  for _ in range(50):
    image_wh = tuple(rng.uniform(50, 400, 2))
    ratio = float(np.exp(rng.uniform(-1.2, 1.2)))
    corners = np.sort(rng.uniform(0, 1, (2, 2)), axis=0) * np.array(image_wh)
    box = np.array([corners[0, 0], corners[0, 1], corners[1, 0], corners[1, 1]])
    out = box_lib.fit_aspect_ratio_xyxy(box, ratio, image_wh)
    _check_ratio_box(out, ratio, image_wh)
    s_max = min(image_wh[0], ratio * image_wh[1])
    if box[2] - box[0] <= s_max and box[3] - box[1] <= s_max / ratio:
      assert out[2] - out[0] == pytest.approx(s_max, rel=1e-9)  # Largest size.
      assert np.all(out[:2] <= box[:2] + 1e-9) and np.all(out[2:] >= box[2:] - 1e-9)


def test_fit_aspect_ratio_hand_max_iou():
  # 100x20 box in a 100x80 image, square: IoU(s) = 20s / (2000 + s^2 - 20s), maximal at s^2 = 2000.
  out = box_lib.fit_aspect_ratio_xyxy(np.array([0.0, 10.0, 100.0, 30.0]), 1.0, (100, 80))
  s = np.sqrt(2000.0)
  np.testing.assert_allclose(out, [50 - s / 2, 0.0, 50 + s / 2, s], atol=1e-9)


def test_fit_aspect_ratio_max_iou_matches_grid_oracle():
  rng = np.random.default_rng(6)
  n_checked = 0
  while n_checked < 25:
    image_wh = tuple(rng.uniform(50, 300, 2))
    ratio = float(np.exp(rng.uniform(-1.5, 1.5)))
    # Boxes that may stick out of the image and are often too big to contain.
    corners = np.sort(rng.uniform(-0.2, 1.2, (2, 2)), axis=0) * np.array(image_wh)
    box = np.array([corners[0, 0], corners[0, 1], corners[1, 0], corners[1, 1]])
    out = box_lib.fit_aspect_ratio_xyxy(box, ratio, image_wh)
    _check_ratio_box(out, ratio, image_wh)
    contained = np.all(out[:2] <= box[:2] + 1e-9) and np.all(out[2:] >= box[2:] - 1e-9)
    if contained:
      continue
    oracle = _grid_oracle_best_iou(box, ratio, image_wh)
    assert _iou(out, box) >= oracle - 1e-9, (box, ratio, image_wh)
    n_checked += 1


def test_fit_aspect_ratio_edge_cases():
  # Box larger than the image in both directions: the best box is the largest, centred.
  out = box_lib.fit_aspect_ratio_xyxy(np.array([-50.0, -50.0, 150.0, 130.0]), 2.0, (100, 80))
  _check_ratio_box(out, 2.0, (100, 80))
  np.testing.assert_allclose(out, [0.0, 15.0, 100.0, 65.0])
  # Entirely outside the image: the largest ratio box, as near the box as possible.
  out = box_lib.fit_aspect_ratio_xyxy(np.array([200.0, 10.0, 220.0, 20.0]), 1.0, (100, 80))
  np.testing.assert_allclose(out, [20.0, 0.0, 100.0, 80.0])
  # Swapped corners are accepted; degenerate box inside the image is contained.
  out = box_lib.fit_aspect_ratio_xyxy(np.array([30.0, 30.0, 30.0, 30.0]), 0.5, (100, 80))
  _check_ratio_box(out, 0.5, (100, 80))
  # Exact full-frame ratio returns the whole image.
  np.testing.assert_allclose(
      box_lib.fit_aspect_ratio_xyxy(np.array([10.0, 10.0, 20.0, 20.0]), '4:3', (640, 480)),
      [0.0, 0.0, 640.0, 480.0],
  )
  with pytest.raises(ValueError):
    box_lib.fit_aspect_ratio_xyxy(np.array([0.0, 0.0, 1.0, 1.0]), None, (10, 10))
  with pytest.raises(ValueError, match='image_wh'):
    box_lib.fit_aspect_ratio_xyxy(np.array([0.0, 0.0, 1.0, 1.0]), 1.0, (0, 10))


# --------------------------------------------------------------------------------------------------
# Non-maximum suppression.


def _nms_reference(boxes: np.ndarray, scores: np.ndarray, thr: float) -> list[int]:
  """Fixed-point definition: a box is kept iff no kept box ranked before it overlaps it > thr."""
  n = len(boxes)
  rank = sorted(range(n), key=lambda i: (-scores[i], i))
  kept = []
  for pos, i in enumerate(rank):
    earlier_kept = [j for j in rank[:pos] if j in kept]
    if all(_iou(boxes[i], boxes[j]) <= thr for j in earlier_kept):
      kept.append(i)
  return kept


def test_nms_hand_cases():
  boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 10, 10.5]], float)
  scores = np.array([0.9, 0.8, 0.7, 0.95])
  np.testing.assert_array_equal(box_lib.nms_xyxy(boxes, scores, 0.5), [3, 2])
  np.testing.assert_array_equal(box_lib.nms_xyxy(boxes, scores, 0.99), [3, 0, 1, 2])
  np.testing.assert_array_equal(box_lib.nms_xyxy(boxes, scores, 0.5, max_outputs=1), [3])
  np.testing.assert_array_equal(box_lib.nms_xyxy(boxes, scores, 0.5, max_outputs=0), [])
  # Ties keep index order; identical boxes (IoU 1) suppress each other even at threshold 0.99.
  tied = box_lib.nms_xyxy(np.tile(boxes[:1], (3, 1)), np.ones(3), 0.99)
  np.testing.assert_array_equal(tied, [0])
  np.testing.assert_array_equal(box_lib.nms_xyxy(boxes[[2, 0]], np.ones(2), 0.5), [0, 1])
  empty = box_lib.nms_xyxy(np.zeros((0, 4)), np.zeros(0), 0.5)
  assert empty.dtype == np.int64 and empty.shape == (0,)
  # Near duplicates (the zero-shot ranking's case): IoU 10/10.5 and 9.8/10 exceed 0.7, not 0.99.
  boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10.5], [20, 20, 30, 30], [0.2, 0, 10, 10]], float)
  scores = np.array([0.5, 0.9, 0.3, 0.5])
  np.testing.assert_array_equal(box_lib.nms_xyxy(boxes, scores, 0.7), [1, 2])
  np.testing.assert_array_equal(box_lib.nms_xyxy(boxes, scores, 0.99), [1, 0, 3, 2])
  # Strict '>': IoU exactly at the threshold (0.5) does not suppress.
  half = np.array([[0, 0, 2, 1], [0, 0, 1, 1]], float)
  np.testing.assert_array_equal(box_lib.nms_xyxy(half, [1.0, 0.5], 0.5), [0, 1])
  np.testing.assert_array_equal(box_lib.nms_xyxy(half, [1.0, 0.5], 0.49), [0])
  # Boxes of area 0 (IoU 0 with everything) neither suppress nor are suppressed.
  flat = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 2, 2]], float)
  np.testing.assert_array_equal(box_lib.nms_xyxy(flat, [3.0, 2.0, 1.0], 0.0), [0, 1, 2])


def test_nms_matches_reference():
  rng = np.random.default_rng(7)
  for trial in range(30):
    n = int(rng.integers(1, 25))
    boxes = _random_int_boxes(rng, n, size=10)
    scores = rng.integers(0, 4, n).astype(float)  # Many ties.
    thr = float(rng.choice([0.0, 0.3, 0.5, 0.7]))
    got = box_lib.nms_xyxy(boxes, scores, thr)
    assert got.tolist() == _nms_reference(boxes, scores, thr), trial
    # Kept boxes never overlap each other above the threshold.
    for i, j in itertools.combinations(got, 2):
      assert _iou(boxes[i], boxes[j]) <= thr
