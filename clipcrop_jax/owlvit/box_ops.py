"""OWL-ViT's box math (jit-able): format conversion, IoU and GIoU, as Scenic's `box_utils`.

Boxes are on the last axis (..., 4): `cxcywh` (centre, size) or `xyxy` (corners), any units.
IoU / GIoU divide by (union + 1e-6), as Scenic's `box_iou` (`IOU_EPS`). `clipcrop_jax.boxes`
re-exports these next to the rest of the package's box math.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IOU_EPS = 1e-6


def cxcywh_to_xyxy(boxes: jax.Array) -> jax.Array:
  """(..., 4) (cx, cy, w, h) -> (..., 4) (x0, y0, x1, y1)."""
  cx, cy, w, h = jnp.moveaxis(jnp.asarray(boxes), -1, 0)
  return jnp.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def xyxy_to_cxcywh(boxes: jax.Array) -> jax.Array:
  """(..., 4) (x0, y0, x1, y1) -> (..., 4) (cx, cy, w, h)."""
  x0, y0, x1, y1 = jnp.moveaxis(jnp.asarray(boxes), -1, 0)
  return jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def area_xyxy(boxes: jax.Array) -> jax.Array:
  """(..., 4) -> (...,); degenerate boxes have area 0."""
  boxes = jnp.asarray(boxes)
  return jnp.clip(boxes[..., 2] - boxes[..., 0], 0) * jnp.clip(boxes[..., 3] - boxes[..., 1], 0)


def pairwise_iou_and_union_xyxy(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """IoU and union area for all pairs: a (N, 4), b (M, 4) -> ((N, M), (N, M)).

  IoU = intersection / (union + 1e-6), as Scenic's `box_iou`.
  """
  a, b = jnp.asarray(a), jnp.asarray(b)
  lt = jnp.maximum(a[:, None, :2], b[None, :, :2])
  rb = jnp.minimum(a[:, None, 2:], b[None, :, 2:])
  wh = jnp.clip(rb - lt, 0)
  inter = wh[..., 0] * wh[..., 1]
  union = area_xyxy(a)[:, None] + area_xyxy(b)[None, :] - inter
  return inter / (union + IOU_EPS), union


def pairwise_iou_xyxy(a: jax.Array, b: jax.Array) -> jax.Array:
  """IoU for all pairs: a (N, 4), b (M, 4) -> (N, M)."""
  return pairwise_iou_and_union_xyxy(a, b)[0]


def pairwise_giou_xyxy(a: jax.Array, b: jax.Array) -> jax.Array:
  """Generalised IoU for all pairs: a (N, 4), b (M, 4) -> (N, M), in [-1, 1].

  giou = iou - (hull - union) / (hull + 1e-6), hull = area of the smallest enclosing box.
  """
  a, b = jnp.asarray(a), jnp.asarray(b)
  iou, union = pairwise_iou_and_union_xyxy(a, b)
  lt = jnp.minimum(a[:, None, :2], b[None, :, :2])
  rb = jnp.maximum(a[:, None, 2:], b[None, :, 2:])
  wh = jnp.clip(rb - lt, 0)
  hull = wh[..., 0] * wh[..., 1]
  return iou - (hull - union) / (hull + IOU_EPS)
