"""Image-conditioned ("one-shot") query embeddings: Scenic's `embed_image_query` rule (spec §5.1).

Given a query image and a box on it, the query embedding is the class embedding of one image token:
1. embed the query image; predict every token's box and (unnormalised) class embedding;
2. IoU of the user box with every predicted box; keep the tokens with IoU >= 0.8 * max IoU;
   if every IoU is exactly 0, use generalised IoU instead with threshold 1.2 * max(min(giou, 0));
3. among the kept tokens choose the one whose class embedding has the *lowest* dot product with the
   mean class embedding of all tokens (the foreground token most unlike the background).
With the default box (the whole image) this equals Hugging Face's `embed_image_query`.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clipcrop_jax import boxes as box_lib
from clipcrop_jax.owlvit import model as model_lib

IOU_RELATIVE_THRESHOLD = 0.8
GIOU_RELATIVE_THRESHOLD = 1.2
WHOLE_IMAGE_XYXY = (0.0, 0.0, 1.0, 1.0)


def select_query_token(pred_boxes_cxcywh: jax.Array, class_embeddings: jax.Array,
                       box_xyxy: Any = WHOLE_IMAGE_XYXY) -> jax.Array:
  """Index of the query token chosen by Scenic's rule, for one image.

  Args:
    pred_boxes_cxcywh: (P, 4) predicted boxes, cxcywh in [0, 1] of the padded square.
    class_embeddings: (P, D) *unnormalised* class-head embeddings.
    box_xyxy: (4,) the user's box (x0, y0, x1, y1) in the same frame.

  Returns:
    int32 scalar token index. jit-compatible.
  """
  pred_xyxy = box_lib.cxcywh_to_xyxy(pred_boxes_cxcywh)
  box = jnp.asarray(box_xyxy, jnp.float32).reshape(1, 4)
  iou = box_lib.pairwise_iou_xyxy(box, pred_xyxy)[0]
  giou = box_lib.pairwise_giou_xyxy(box, pred_xyxy)[0]
  use_giou = jnp.all(iou == 0.0)
  iou_threshold = IOU_RELATIVE_THRESHOLD * jnp.max(iou)
  giou_threshold = GIOU_RELATIVE_THRESHOLD * jnp.max(jnp.minimum(giou, 0.0))
  selected = jnp.where(use_giou, giou >= giou_threshold, iou >= iou_threshold)
  mean_embedding = jnp.mean(class_embeddings, axis=0)
  similarity = class_embeddings @ mean_embedding
  return jnp.argmin(jnp.where(selected, similarity, jnp.inf)).astype(jnp.int32)


def embed_image_query(module, variables, query_image: Any,
                      box_xyxy: Optional[Sequence[float]] = None) -> tuple[jax.Array, int]:
  """Query embedding from an example image (Scenic's one-shot rule).

  Args:
    module: a `TextZeroShotDetectionModule`.
    variables: its variables.
    query_image: float32 (S, S, 3) or (1, S, S, 3) in [0, 1], already preprocessed
      (`clipcrop_jax.owlvit.preprocess`).
    box_xyxy: the region of interest (x0, y0, x1, y1) in [0, 1] of the *preprocessed* (padded
      square) query image; default the whole image.

  Returns:
    (embedding (D,) unnormalised class embedding usable as a query, token index).
  """
  images = jnp.asarray(query_image, jnp.float32)
  if images.ndim == 3:
    images = images[None]
  if images.ndim != 4 or images.shape[0] != 1 or images.shape[-1] != 3:
    raise ValueError(f'query_image must be (S, S, 3) or (1, S, S, 3); got {images.shape}.')
  box = WHOLE_IMAGE_XYXY if box_xyxy is None else tuple(float(v) for v in box_xyxy)
  if len(box) != 4 or not (box[2] > box[0] and box[3] > box[1]):
    raise ValueError(f'box_xyxy must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0; got {box}.')
  encoded = model_lib.encode_images(module, variables, images)
  pred_boxes = encoded['pred_boxes']
  class_embeddings = encoded['class_terms']['raw_class_embeddings']
  index = select_query_token(pred_boxes[0], class_embeddings[0], np.asarray(box, np.float32))
  return class_embeddings[0, index], int(index)
