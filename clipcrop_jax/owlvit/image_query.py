"""Image-conditioned ("one-shot") query embeddings: Scenic's `embed_image_query` rule (spec §5.1).

Given a query image and a box on it, the query embedding is the class embedding of one image token:
1. embed the query image; predict every token's box and (unnormalised) class embedding;
2. IoU of the user box with every predicted box; keep the tokens with IoU >= 0.8 * max IoU;
   if every IoU is exactly 0, use generalised IoU instead with threshold 1.2 * max(min(giou, 0));
3. among the kept tokens choose the one whose class embedding has the *lowest* dot product with the
   mean class embedding of all tokens (the foreground token most unlike the background).
With the default box (the whole image) this equals Hugging Face's `embed_image_query`.

`ImageQuery` (an example image and an optional pixel box on it) and `query_embeddings` (text and
example-image queries -> embeddings) are what the detection demo and `ClipCropper` ask with.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clipcrop_jax.owlvit import box_ops
from clipcrop_jax.owlvit import model as model_lib
from clipcrop_jax.owlvit import preprocessing as pp
from clipcrop_jax.owlvit import tokenizer

IOU_RELATIVE_THRESHOLD = 0.8
GIOU_RELATIVE_THRESHOLD = 1.2
WHOLE_IMAGE_XYXY = (0.0, 0.0, 1.0, 1.0)


def select_query_token(
    pred_boxes_cxcywh: jax.Array, class_embeddings: jax.Array, box_xyxy: Any = WHOLE_IMAGE_XYXY
) -> jax.Array:
  """Index of the query token chosen by Scenic's rule, for one image.

  Args:
    pred_boxes_cxcywh: (P, 4) predicted boxes, cxcywh in [0, 1] of the padded square.
    class_embeddings: (P, D) *unnormalised* class-head embeddings.
    box_xyxy: (4,) the user's box (x0, y0, x1, y1) in the same frame.

  Returns:
    int32 scalar token index. jit-compatible.
  """
  pred_xyxy = box_ops.cxcywh_to_xyxy(pred_boxes_cxcywh)
  box = jnp.asarray(box_xyxy, jnp.float32).reshape(1, 4)
  iou = box_ops.pairwise_iou_xyxy(box, pred_xyxy)[0]
  giou = box_ops.pairwise_giou_xyxy(box, pred_xyxy)[0]
  use_giou = jnp.all(iou == 0.0)
  iou_threshold = IOU_RELATIVE_THRESHOLD * jnp.max(iou)
  giou_threshold = GIOU_RELATIVE_THRESHOLD * jnp.max(jnp.minimum(giou, 0.0))
  selected = jnp.where(use_giou, giou >= giou_threshold, iou >= iou_threshold)
  mean_embedding = jnp.mean(class_embeddings, axis=0)
  similarity = class_embeddings @ mean_embedding
  return jnp.argmin(jnp.where(selected, similarity, jnp.inf)).astype(jnp.int32)


def embed_image_query(
    module, variables, query_image: Any, box_xyxy: Optional[Sequence[float]] = None
) -> tuple[jax.Array, int]:
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


@dataclasses.dataclass
class ImageQuery:
  """An example image used as a query (one-shot detection).

  Attributes:
    name: label used in the output.
    image: uint8 (H, W, 3).
    box: optional region (x0, y0, x1, y1) in pixels of `image`; default the whole image.
  """

  name: str
  image: np.ndarray
  box: Optional[tuple[float, float, float, float]] = None


def check_query_box(query: ImageQuery) -> None:
  """ValueError (in pixels of the query image) unless `query.box` is a box inside the image."""
  if query.box is None:
    return
  h, w = query.image.shape[:2]
  try:
    x0, y0, x1, y1 = (float(v) for v in query.box)
  except (TypeError, ValueError):
    raise ValueError(
        f'query box of {query.name}: expected (x0, y0, x1, y1) pixels, got ' f'{query.box!r}'
    ) from None
  if not all(np.isfinite([x0, y0, x1, y1])):
    raise ValueError(f'query box of {query.name}: ({x0:g}, {y0:g}, {x1:g}, {y1:g}) is not finite')
  if not (x1 > x0 and y1 > y0):
    raise ValueError(
        f'query box of {query.name}: ({x0:g}, {y0:g}, {x1:g}, {y1:g}) needs x1 > x0 ' 'and y1 > y0'
    )
  if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
    raise ValueError(
        f'query box of {query.name}: ({x0:g}, {y0:g}, {x1:g}, {y1:g}) px is not '
        f'inside the {w}x{h} px query image'
    )


def query_embeddings(
    module,
    variables,
    texts: Sequence[str] = (),
    image_queries: Sequence[ImageQuery] = (),
    recipe: str = 'colab',
) -> np.ndarray:
  """(Q, D) unnormalised query embeddings: text queries first, then image queries.

  Args:
    module: a `TextZeroShotDetectionModule`.
    variables: its variables.
    texts: text queries (tokenized to the module's `max_query_length`).
    image_queries: example images, each embedded by `embed_image_query` after preprocessing
      with `recipe`; a box is given in pixels of its image (checked by `check_query_box`).
    recipe: preprocessing recipe ('colab' or 'evaluator').
  """
  for q in image_queries:
    check_query_box(q)
  embeddings = []
  if texts:
    tokens = tokenizer.tokenize(list(texts), max_len=module.config.max_query_length)
    embeddings.append(np.asarray(model_lib.embed_texts(module, variables, tokens)))
  for q in image_queries:
    pixels = pp.preprocess(q.image, module.config.image_size, recipe=recipe)
    box = None
    if q.box is not None:  # pixels of the query image -> [0, 1] of its padded square
      side = pp.padded_size(*q.image.shape[:2])
      box = [v / side for v in q.box]
    emb, _ = embed_image_query(module, variables, pixels, box)
    embeddings.append(np.asarray(emb)[None])
  if not embeddings:
    raise ValueError('Give at least one --query or --query-image.')
  return np.concatenate(embeddings, axis=0)
