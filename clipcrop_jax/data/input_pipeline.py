"""tf.data input pipeline: from TFDS cropping examples to (global) training / evaluation batches.

Input examples follow `clipcrop_jax.data.features`: `image` (uint8 (H, W, 3), or the encoded
bytes, which are decoded here), `image/filename`, `height`, `width`, `text` and `crops` =
{`bbox`: (N, 4) float32 (ymin, xmin, ymax, xmax) normalised to the original image, `score`: (N,)}
(the flat keys `crops/bbox`, `crops/score` are accepted too).

Output convention (what the model consumes), per example:

  image         float32 (S, S, 3) in [0, 1]: /255, padded bottom/right to a max(H, W) square with
                0.5 grey, then resized to S x S with `tf.image.resize(bilinear, antialias=True)`.
                This is the geometry of `owlvit.preprocessing.preprocess` ("colab" recipe); pixel
                values differ from its skimage resize (skimage: Gaussian prefilter + bilinear; TF:
                scaled triangle kernel), measured at 600x900 -> 768: mean abs 8e-4, max 0.04 on
                smooth photo-like images; mean 0.02, max 0.3 on white noise. Box geometry is
                identical.
  crops         float32 (M, 4) xyxy normalised to the padded square (model convention), zero rows
                for padding. M = `max_crops`.
  crop_scores   float32 (M,), 0 for padding.
  crop_mask     bool (M,).
  text          string scalar ('' when the dataset has none).
  image_extent  float32 (2,) = (W / max(H, W), H / max(H, W)): where the real content ends in the
                padded square (`image_extent` of `ClipCrop`).
  height, width int32 original size (evaluation; kept in training too).
  filename      string, when the input has `image/filename`.
  text_tokens   int32 (1, L) CLIP tokens of `text` (`owlvit.tokenize`, L = `MAX_QUERY_LENGTH`; all
                zeros for ''), only with `tokenize_text=True`.
  text_queries  int32 (Q, L) tokens of [full text, keyword 1, ...], only with `max_queries` = Q
                (`add_text_queries`).

Training (`make_train_dataset`): shuffle, repeat, per-example augmentation, mosaic, batch with
drop_remainder, prefetch. Augmentations never move the 0.5 padding, which stays grey and at the
bottom/right (flip acts on the original image, jitter on the resized content only):
  * `color_jitter`: SSD-style photometric distortion as in Jia et al. (brightness +-32/255,
    contrast and saturation in [0.5, 1.5], hue +-18 degrees), random order fixed; boxes unchanged.
  * `random_flip_with_text`: horizontal flip with probability 1/2; boxes mirrored (x -> 1 - x)
    and the words 'left' / 'right' of the text swapped (`mirror_text`), before the text queries
    and keywords are built, so "the star to the left of the square" stays true.
  * `mosaic` (paper 3.3): a k x k grid, k in {1, 2, 3} with `mosaic_probs` per *output* example.
    Whole tiles only: each tile is its example's padded square, resized to a cell of c = S // k
    pixels, so each image fits its cell keeping its aspect ratio, grey-padded inside the cell
    (bottom/right). A remainder S - k*c is grey. One tile, chosen at random, is the target: its
    text and crops are remapped by (scale c / S, offset (col, row) * c / S); the other tiles are
    distractors and their crops are dropped. (The pipeline draws k per input example, with
    probabilities making the output fractions `mosaic_probs`, groups k*k examples of equal k with
    `group_by_window`, and preprocesses each straight to the cell side, so nothing is resized
    twice.) `image_extent` is the target tile's extent for k = 1,
    and the grid's extent (k*c/S, k*c/S) for k > 1.

All randomness is stateless (`tf.random.stateless_*`) keyed by (seed, element index), so the same
seed and input order give the same batches (maps run with deterministic ordering).

Evaluation (`make_eval_dataset`): no augmentation, all candidates kept (an error if an example has
more than `max_crops`), original `height`/`width` and `filename` kept for mapping the predictions
back to pixels (`crops * max(H, W)`), batches padded to `batch_size` with an example `mask`.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import tensorflow as tf

from clipcrop_jax.data import features as F
from clipcrop_jax import keywords

PAD_VALUE = 0.5
GRIDS = (1, 2, 3)


# ------------------------------------------------------------------------------------------------
# Per-example ops.
# ------------------------------------------------------------------------------------------------


def _crops(example: dict[str, Any]) -> tuple[tf.Tensor, tf.Tensor]:
  """(N, 4) yxyx boxes and (N,) scores from a nested (`crops`: {...}) or flat example."""
  if F.CROPS in example and isinstance(example[F.CROPS], dict):
    crops = example[F.CROPS]
    boxes, scores = crops[F.CROP_BBOX], crops[F.CROP_SCORE]
  else:
    boxes = example[f'{F.CROPS}/{F.CROP_BBOX}']
    scores = example[f'{F.CROPS}/{F.CROP_SCORE}']
  return (
      tf.reshape(tf.cast(boxes, tf.float32), (-1, 4)),
      tf.reshape(tf.cast(scores, tf.float32), (-1,)),
  )


def decode_image(image: tf.Tensor) -> tf.Tensor:
  """uint8 (H, W, 3): decodes encoded bytes, passes decoded images through."""
  if image.dtype == tf.string:
    image = tf.io.decode_image(image, channels=3, expand_animations=False)
  return tf.ensure_shape(tf.cast(image, tf.uint8), (None, None, 3))


def yxyx_to_xyxy(boxes: tf.Tensor) -> tf.Tensor:
  return tf.gather(boxes, [1, 0, 3, 2], axis=-1)


def color_jitter(
    image: tf.Tensor,
    seed: tf.Tensor,
    brightness: float = 32 / 255,
    contrast: tuple[float, float] = (0.5, 1.5),
    saturation: tuple[float, float] = (0.5, 1.5),
    hue: float = 18 / 360,
) -> tf.Tensor:
  """Photometric distortion of a float [0, 1] RGB image (any shape (..., 3)); output in [0, 1].

  Boxes are unaffected. `seed`: int32/int64 (2,) stateless seed.
  """
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 4)
  image = tf.image.stateless_random_brightness(image, brightness, seeds[0])
  image = tf.clip_by_value(image, 0.0, 1.0)
  image = tf.image.stateless_random_contrast(image, contrast[0], contrast[1], seeds[1])
  image = tf.clip_by_value(image, 0.0, 1.0)
  image = tf.image.stateless_random_saturation(image, saturation[0], saturation[1], seeds[2])
  image = tf.image.stateless_random_hue(image, hue, seeds[3])
  return tf.clip_by_value(image, 0.0, 1.0)


def flip_left_right(image: tf.Tensor, boxes_xyxy: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Mirrors an (H, W, C) image and its xyxy boxes normalised to that image."""
  x0, y0, x1, y1 = tf.unstack(boxes_xyxy, axis=-1)
  return tf.image.flip_left_right(image), tf.stack([1.0 - x1, y0, 1.0 - x0, y1], axis=-1)


# The words a horizontal flip makes false, swapped by `mirror_text` (lower-case, capitalised).
MIRROR_WORDS = (('left', 'right'), ('Left', 'Right'))
_MIRROR_PLACEHOLDER = '\x1f'  # ASCII unit separator: never in a caption


def mirror_text(text: tf.Tensor) -> tf.Tensor:
  """Swaps the whole words 'left' <-> 'right' and 'Left' <-> 'Right' in a string tensor.

  Any shape, elementwise: the text of a horizontally flipped image ('the star to the left of the
  square' -> 'the star to the right of the square'). Whole words only (RE2 `\\b`): 'leftover',
  'bright', 'LEFT' stay. Three `regex_replace` steps per pair through a placeholder character
  (U+001F, which a text must not contain).
  """
  text = tf.convert_to_tensor(text, tf.string)
  for a, b in MIRROR_WORDS:
    text = tf.strings.regex_replace(text, rf'\b{a}\b', _MIRROR_PLACEHOLDER)
    text = tf.strings.regex_replace(text, rf'\b{b}\b', a)
    text = tf.strings.regex_replace(text, _MIRROR_PLACEHOLDER, b)
  return text


def flip_coin(seed: tf.Tensor, prob: float = 0.5) -> tf.Tensor:
  """bool scalar: whether `random_flip_with_text` flips with this (2,) seed."""
  return tf.random.stateless_uniform((), tf.cast(seed, tf.int64)) < prob


def random_flip_with_text(
    image: tf.Tensor, boxes_xyxy: tf.Tensor, text: tf.Tensor, seed: tf.Tensor, prob: float = 0.5
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """Horizontal flip with probability `prob` (`flip_coin(seed)`): xyxy boxes normalised to the
  image are mirrored and so is `text` (a string tensor of any shape: a caption, or per-object
  labels; `mirror_text`)."""
  flipped = flip_coin(seed, prob)
  image, boxes_xyxy = tf.cond(
      flipped, lambda: flip_left_right(image, boxes_xyxy), lambda: (image, boxes_xyxy)
  )
  text = tf.convert_to_tensor(text, tf.string)
  return image, boxes_xyxy, tf.cond(flipped, lambda: mirror_text(text), lambda: text)


def pad_to_square_and_resize(image: tf.Tensor, size) -> tuple[tf.Tensor, tf.Tensor]:
  """float [0, 1] (H, W, 3) -> ((size, size, 3), extent (2,) = (W/m, H/m)), m = max(H, W).

  Equal (to float rounding) to padding bottom/right with 0.5 to (m, m) and then
  `tf.image.resize((size, size), 'bilinear', antialias=True)`, but only the content plus a gray
  margin covering the kernel support is resized (`ScaleAndTranslate` with the same scale), and the
  rest is filled with 0.5: about 2x faster for 2:3 images.
  """
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  m = tf.maximum(h, w)
  scale = tf.cast(size, tf.float32) / tf.cast(m, tf.float32)
  margin = tf.cast(tf.math.ceil(2.0 / scale), tf.int32) + 2  # input pixels of kernel support
  in_h, in_w = tf.minimum(h + margin, m), tf.minimum(w + margin, m)
  padded = tf.image.pad_to_bounding_box(image - PAD_VALUE, 0, 0, in_h, in_w)
  out_h = tf.minimum(tf.cast(tf.math.ceil(tf.cast(h, tf.float32) * scale), tf.int32) + 2, size)
  out_w = tf.minimum(tf.cast(tf.math.ceil(tf.cast(w, tf.float32) * scale), tf.int32) + 2, size)
  resized = tf.raw_ops.ScaleAndTranslate(
      images=padded[None],
      size=tf.stack([out_h, out_w]),
      scale=tf.stack([scale, scale]),
      translation=tf.zeros([2], tf.float32),
      kernel_type='triangle',
      antialias=True,
  )[0]
  resized = tf.image.pad_to_bounding_box(resized, 0, 0, size, size) + PAD_VALUE
  extent = tf.cast(tf.stack([w, h]), tf.float32) / tf.cast(m, tf.float32)
  return tf.clip_by_value(resized, 0.0, 1.0), extent


def _content_mask(size, extent: tf.Tensor) -> tf.Tensor:
  """(size, size, 1) bool: pixels whose centre lies inside the real content of the square."""
  centres = (tf.cast(tf.range(size), tf.float32) + 0.5) / tf.cast(size, tf.float32)
  return (centres[:, None, None] < extent[1]) & (centres[None, :, None] < extent[0])


def pad_crops(
    boxes: tf.Tensor, scores: tf.Tensor, max_crops: int, truncate: bool = True
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """Pads (N, 4) boxes / (N,) scores to `max_crops` rows; returns (boxes, scores, mask).

  With `truncate`, more than `max_crops` crops keep the `max_crops` best-scoring ones (in their
  original order); otherwise that case is an error.
  """
  n = tf.shape(scores)[0]
  if truncate:
    k = tf.minimum(n, max_crops)
    keep = tf.sort(tf.math.top_k(scores, k=k, sorted=False).indices)
    boxes, scores = tf.gather(boxes, keep), tf.gather(scores, keep)
  else:
    with tf.control_dependencies(
        [
            tf.debugging.assert_less_equal(
                n, max_crops, message='example has more crops than max_crops'
            )
        ]
    ):
      boxes = tf.identity(boxes)
  n = tf.shape(scores)[0]
  pad = max_crops - n
  mask = tf.ensure_shape(tf.range(max_crops) < n, (max_crops,))
  boxes = tf.ensure_shape(tf.pad(boxes, [[0, pad], [0, 0]]), (max_crops, 4))
  scores = tf.ensure_shape(tf.pad(scores, [[0, pad]]), (max_crops,))
  return boxes, scores, mask


def preprocess_example(
    example: dict[str, Any],
    size: int,
    max_crops: int,
    seed: Optional[tf.Tensor] = None,
    truncate: bool = True,
    jitter: bool = True,
    flip: bool = True,
) -> dict[str, tf.Tensor]:
  """One example -> padded square, xyxy crops in the square, mask and extent (see module doc).

  Args:
    example: a `clipcrop_jax.data.features` example (image decoded or encoded).
    size: output side S (int, or a scalar tensor giving a dynamic image shape).
    max_crops: M, crops padded (and truncated, with `truncate`) to this many.
    seed: stateless (2,) seed; None = no augmentation. With a seed, `jitter` / `flip` select the
      augmentations (flip on the original image, with the text mirrored; jitter after the resize,
      on the content only).
    truncate: keep the best `max_crops` crops if there are more (else raise).
  """
  image = tf.image.convert_image_dtype(decode_image(example[F.IMAGE]), tf.float32)
  boxes, scores = _crops(example)
  boxes = yxyx_to_xyxy(boxes)
  text = tf.cast(example.get(F.TEXT, ''), tf.string)
  shape = tf.shape(image)
  if seed is not None:
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2)
    if flip:  # the text's 'left' / 'right' are swapped with the image (`mirror_text`)
      image, boxes, text = random_flip_with_text(image, boxes, text, seeds[1])
  image, extent = pad_to_square_and_resize(image, size)
  if seed is not None and jitter:  # after the resize (cheaper), keeping the padding grey
    image = tf.where(_content_mask(size, extent), color_jitter(image, seeds[0]), PAD_VALUE)
  boxes = boxes * tf.tile(extent, [2])[None]  # image-normalised -> padded-square-normalised
  boxes, scores, mask = pad_crops(boxes, scores, max_crops, truncate)
  static = size if isinstance(size, int) else None
  out = {
      F.IMAGES: tf.ensure_shape(image, (static, static, 3)),
      F.CROP_BOXES: boxes,
      F.CROP_SCORES: scores,
      F.CROP_MASK: mask,
      F.TEXT: text,
      F.IMAGE_EXTENT: tf.ensure_shape(extent, (2,)),
      F.HEIGHT: tf.cast(example.get(F.HEIGHT, shape[0]), tf.int32),
      F.WIDTH: tf.cast(example.get(F.WIDTH, shape[1]), tf.int32),
  }
  if F.FILENAME in example:
    out['filename'] = tf.cast(example[F.FILENAME], tf.string)
  return out


def mosaic(
    tiles: dict[str, tf.Tensor], seed: tf.Tensor, size: Optional[int] = None
) -> dict[str, tf.Tensor]:
  """A k x k mosaic of k*k preprocessed examples (stacked on a leading axis, k = sqrt(count)).

  Args:
    tiles: outputs of `preprocess_example` stacked: image (k*k, T, T, 3), crops (k*k, M, 4), ...
      Tiles already at the cell side T = size // k are used as they are (the training pipeline
      preprocesses them at that size); other sizes are resized to it.
    seed: stateless (2,) seed choosing the target tile.
    size: canvas side S; default: the tiles' side T.

  Returns:
    One example in the `preprocess_example` format: image (S, S, 3) with tile i at row i // k,
    column i % k (cell side c = S // k, grey remainder), the target tile's text, its crops remapped
    to the canvas, its scores/mask, and the extent (see module doc).
  """
  images = tiles[F.IMAGES]
  size = size or images.shape[1]
  n = tf.shape(images)[0]
  k = tf.cast(tf.round(tf.sqrt(tf.cast(n, tf.float32))), tf.int32)
  with tf.control_dependencies([tf.debugging.assert_equal(k * k, n, message='not k*k tiles')]):
    cell = size // k
  target = tf.random.stateless_uniform((), tf.cast(seed, tf.int64), 0, n, dtype=tf.int32)

  def grid():
    small = tf.cond(
        tf.shape(images)[1] == cell,
        lambda: images,
        lambda: tf.image.resize(images, tf.stack([cell, cell]), method='bilinear', antialias=True),
    )
    small = tf.reshape(small, tf.stack([k, k, cell, cell, 3]))
    canvas = tf.reshape(tf.transpose(small, [0, 2, 1, 3, 4]), tf.stack([k * cell, k * cell, 3]))
    canvas = tf.image.pad_to_bounding_box(canvas - PAD_VALUE, 0, 0, size, size) + PAD_VALUE
    return tf.clip_by_value(canvas, 0.0, 1.0)

  image = tf.reshape(grid(), (size, size, 3))
  scale = tf.cast(cell, tf.float32) / size
  offset = tf.cast(tf.stack([target % k, target // k]), tf.float32) * scale  # (x, y)
  crops = tiles[F.CROP_BOXES][target] * scale + tf.tile(offset, [2])[None]
  mask = tiles[F.CROP_MASK][target]
  crops = tf.where(mask[:, None], crops, 0.0)
  grid_extent = tf.fill([2], tf.cast(k * cell, tf.float32) / size)
  extent = tf.cond(k > 1, lambda: grid_extent, lambda: tiles[F.IMAGE_EXTENT][0])
  out = {key: value[target] for key, value in tiles.items()}
  out.update(
      {
          F.IMAGES: image,
          F.CROP_BOXES: crops,
          F.IMAGE_EXTENT: tf.ensure_shape(extent, (2,)),
          'mosaic_grid': k,
      }
  )
  return out


# ------------------------------------------------------------------------------------------------
# Datasets.
# ------------------------------------------------------------------------------------------------


def split_for_process(
    split: str,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
    drop_remainder: bool = True,
) -> Any:
  """This host's part of a TFDS split (a `tfds.even_splits` item, usable as `split=`).

  Defaults to jax's process index and count: `tfds.split_for_jax_process(split)` with
  `drop_remainder=True`, so every host sees the same number of examples.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    process_index, process_count = jax.process_index(), jax.process_count()
  return tfds.even_splits(split, n=process_count, drop_remainder=drop_remainder)[process_index]


def _tokenize(text: tf.Tensor, max_len: int = F.MAX_QUERY_LENGTH) -> tf.Tensor:
  """int32 (1, max_len) CLIP tokens of a string scalar (zeros for an empty text)."""

  def tok(t):
    from clipcrop_jax.owlvit import tokenizer  # pylint: disable=g-import-not-at-top

    t = t.item() if isinstance(t, np.ndarray) else t
    t = t.decode('utf-8') if isinstance(t, bytes) else str(t)
    if not t.strip():
      return np.zeros((1, max_len), np.int32)
    return tokenizer.tokenize([t], max_len=max_len).astype(np.int32)

  tokens = tf.numpy_function(tok, [text], tf.int32, stateful=False)
  return tf.ensure_shape(tokens, (1, max_len))


def add_text_queries(
    ds: tf.data.Dataset,
    max_queries: int = 8,
    keyword_pipeline: str = keywords.DEFAULT_PIPELINE,
    num_parallel_calls: int = tf.data.AUTOTUNE,
) -> tf.data.Dataset:
  """Adds `text_queries` int32 (max_queries, L): CLIP tokens of [full text, keyword 1, ...], and
  `query_roles` int32 (max_queries,): each query's role (`features.ROLE_IDS`: the full text is
  'caption', keywords 'subject' or 'context').

  The queries are built in ClipCrop's 'full' mode (`keywords.build_query_roles`), whatever the
  model's mode: the model keeps the rows its mode needs (`model.query_mask_for_mode`), and the
  text-based baselines use the full text (row 0). Keywords beyond `max_queries - 1` are dropped;
  unused rows and the rows of an empty text are zeros (padding). Keyword extraction (spaCy) runs
  once per distinct text (cached), so later epochs cost nothing. L = `MAX_QUERY_LENGTH`;
  `keyword_pipeline` is a spaCy pipeline name or path, or `keywords.RULES` (checked here).
  """
  keywords.check_pipeline(keyword_pipeline)
  cache: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}

  def queries(text):
    text = text.item() if isinstance(text, np.ndarray) else text
    if text not in cache:
      from clipcrop_jax.owlvit import tokenizer  # pylint: disable=g-import-not-at-top

      decoded = text.decode('utf-8') if isinstance(text, bytes) else str(text)
      out = np.zeros((max_queries, F.MAX_QUERY_LENGTH), np.int32)
      roles = np.zeros((max_queries,), np.int32)
      if decoded.strip():
        found = keywords.build_query_roles(decoded, 'full', pipeline=keyword_pipeline)
        found = found[:max_queries]
        out[: len(found)] = tokenizer.tokenize([q.text for q in found], max_len=F.MAX_QUERY_LENGTH)
        roles[: len(found)] = [F.ROLE_IDS[q.role] for q in found]
      cache[text] = (out, roles)
    return cache[text]

  def add(ex):
    q, roles = tf.numpy_function(queries, [ex[F.TEXT]], (tf.int32, tf.int32), stateful=False)
    return {
        **ex,
        F.TEXT_QUERIES: tf.ensure_shape(q, (max_queries, F.MAX_QUERY_LENGTH)),
        F.QUERY_ROLES: tf.ensure_shape(roles, (max_queries,)),
    }

  return ds.map(add, num_parallel_calls=num_parallel_calls, deterministic=True)


def _seed_for(seed: int, index: tf.Tensor, stream: int) -> tf.Tensor:
  base = tf.constant([seed, stream], tf.int64)
  return tf.random.experimental.stateless_fold_in(base, tf.cast(index, tf.int64))


def _grid_key_weights(mosaic_probs: Sequence[float]) -> np.ndarray:
  """Per-*input* probabilities of k so that output mosaics have probabilities `mosaic_probs`."""
  probs = np.asarray(mosaic_probs, np.float64)
  if probs.shape != (3,) or (probs < 0).any() or probs.sum() <= 0:
    raise ValueError(
        f'mosaic_probs must be 3 non-negative weights (1x1, 2x2, 3x3), got ' f'{mosaic_probs}'
    )
  w = probs / probs.sum() * np.array(GRIDS, np.float64) ** 2
  return w / w.sum()


def _add_text_features(
    ds: tf.data.Dataset,
    tokenize_text: bool,
    max_queries: Optional[int],
    keyword_pipeline: str,
    num_parallel_calls: int,
) -> tf.data.Dataset:
  """`text_tokens` (with `tokenize_text`) and `text_queries` (with `max_queries`) per example."""
  if tokenize_text:
    ds = ds.map(
        lambda ex: {**ex, 'text_tokens': _tokenize(ex[F.TEXT])},
        num_parallel_calls=num_parallel_calls,
        deterministic=True,
    )
  if max_queries:
    ds = add_text_queries(ds, max_queries, keyword_pipeline, num_parallel_calls)
  return ds


def make_train_dataset(
    ds: tf.data.Dataset,
    *,
    image_size: int,
    batch_size: int,
    max_crops: int = 96,
    seed: int = 0,
    mosaic_probs: Sequence[float] = (1 / 3, 1 / 3, 1 / 3),
    shuffle_buffer: int = 1000,
    num_epochs: Optional[int] = None,
    jitter: bool = True,
    flip: bool = True,
    tokenize_text: bool = False,
    max_queries: Optional[int] = None,
    keyword_pipeline: str = keywords.DEFAULT_PIPELINE,
    num_parallel_calls: int = tf.data.AUTOTUNE,
    prefetch: int = 2,
) -> tf.data.Dataset:
  """Training batches (per host) from a dataset of `clipcrop_jax.data.features` examples.

  `ds` should already be this host's part (`split_for_process`); decode the images here (TFDS
  `decoders={'image': tfds.decode.SkipDecoding()}`) or before. Returns batches of the module-doc
  format with a leading `batch_size` axis (drop_remainder) plus `mosaic_grid` (k per example).
  `jitter` / `flip` switch those augmentations; `tokenize_text` adds `text_tokens`; `max_queries`
  adds `text_queries` (`add_text_queries`, after the mosaic so they belong to the target tile).
  """
  cum = np.cumsum(_grid_key_weights(mosaic_probs)).astype(np.float32)
  ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
  ds = ds.repeat(num_epochs)
  ds = ds.enumerate()

  def tile(index, example):
    # k is drawn first, so each tile is preprocessed straight to its mosaic cell side S // k.
    u = tf.random.stateless_uniform((), _seed_for(seed, index, 1))
    grid = 1 + tf.reduce_sum(tf.cast(u >= cum[:2], tf.int32))
    out = preprocess_example(
        example,
        image_size // grid,
        max_crops,
        seed=_seed_for(seed, index, 0),
        jitter=jitter,
        flip=flip,
    )
    out['_grid'] = tf.cast(grid, tf.int64)
    return out

  ds = ds.map(tile, num_parallel_calls=num_parallel_calls, deterministic=True)
  if cum[0] >= 1.0:  # single images only
    ds = ds.map(
        lambda ex: {
            **{k: v for k, v in ex.items() if k != '_grid'},
            F.IMAGES: tf.ensure_shape(ex[F.IMAGES], (image_size, image_size, 3)),
            'mosaic_grid': tf.constant(1, tf.int32),
        }
    )
  else:
    ds = ds.group_by_window(
        key_func=lambda ex: ex['_grid'],
        reduce_func=lambda key, window: window.batch(key * key, drop_remainder=True),
        window_size_func=lambda key: key * key,
    )
    ds = ds.enumerate().map(
        lambda i, tiles: mosaic(
            {k: v for k, v in tiles.items() if k != '_grid'}, _seed_for(seed, i, 2), image_size
        ),
        num_parallel_calls=num_parallel_calls,
        deterministic=True,
    )
  ds = _add_text_features(ds, tokenize_text, max_queries, keyword_pipeline, num_parallel_calls)
  ds = ds.batch(batch_size, drop_remainder=True)
  return ds.prefetch(prefetch) if prefetch else ds


def make_eval_dataset(
    ds: tf.data.Dataset,
    *,
    image_size: int,
    batch_size: int,
    max_crops: int = 96,
    tokenize_text: bool = False,
    max_queries: Optional[int] = None,
    keyword_pipeline: str = keywords.DEFAULT_PIPELINE,
    num_parallel_calls: int = tf.data.AUTOTUNE,
) -> tf.data.Dataset:
  """Evaluation batches: no augmentation, every candidate kept, padded final batch.

  Each batch has the module-doc keys plus `mask` (bool (B,), False for padding examples); string
  keys of padding rows are ''. An example with more than `max_crops` candidates is an error.
  `max_queries` adds `text_queries` (`add_text_queries`).
  """
  ds = ds.map(
      lambda ex: preprocess_example(ex, image_size, max_crops, seed=None, truncate=False),
      num_parallel_calls=num_parallel_calls,
      deterministic=True,
  )
  ds = _add_text_features(ds, tokenize_text, max_queries, keyword_pipeline, num_parallel_calls)
  ds = ds.map(lambda ex: {**ex, F.EXAMPLE_MASK: tf.constant(True)})
  ds = ds.batch(batch_size)

  def pad_batch(batch):
    pad = batch_size - tf.shape(batch[F.EXAMPLE_MASK])[0]
    out = {}
    for key, value in batch.items():
      padding = [[0, pad]] + [[0, 0]] * (value.shape.rank - 1)
      out[key] = tf.ensure_shape(tf.pad(value, padding), [batch_size] + value.shape.as_list()[1:])
    return out

  return ds.map(pad_batch).prefetch(2)


# ------------------------------------------------------------------------------------------------
# Host batches -> global jax.Arrays.
# ------------------------------------------------------------------------------------------------


def to_global_batches(dataset: tf.data.Dataset, sharding: Any) -> Iterator[dict[str, Any]]:
  """Yields batches as global `jax.Array`s sharded on the batch axis.

  Args:
    dataset: per-host batches (leading axis = this host's batch).
    sharding: a `jax.sharding.Mesh` (batch sharded on its 'data' axis) or a `jax.sharding.Sharding`
      for the batch axis.

  String features (text, filename) stay host-local numpy arrays of bytes.
  """
  import jax  # pylint: disable=g-import-not-at-top

  if isinstance(sharding, jax.sharding.Mesh):
    sharding = jax.sharding.NamedSharding(sharding, jax.sharding.PartitionSpec('data'))
  for batch in dataset.as_numpy_iterator():
    yield {
        key: (
            value
            if value.dtype.kind in 'OSU'
            else jax.make_array_from_process_local_data(sharding, value)
        )
        for key, value in batch.items()
    }


# ------------------------------------------------------------------------------------------------
# Prepared datasets.
# ------------------------------------------------------------------------------------------------

# TFDS dataset name -> the folder of its builder under datasets/ (when they differ).
BUILDER_FOLDERS = {'synthetic_crops': 'synthetic'}


def dataset_builder(name: str, data_dir: str):
  """A prepared TFDS dataset `name` ('gaic/journal', 'synthetic_crops/default', ...) in `data_dir`.

  Reads the prepared files (`tfds.builder_from_directory`), so the builder code need not be
  importable; the newest version is used.

  Raises:
    errors.DatasetNotPreparedError: not prepared; the message gives the build command.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets.core.constants  # pylint: disable=g-import-not-at-top,unused-import
  from clipcrop_jax import errors  # pylint: disable=g-import-not-at-top

  root = pathlib.Path(os.path.expanduser(data_dir or tfds.core.constants.DATA_DIR)) / name
  versions = sorted(
      (p for p in root.glob('*.*.*') if (p / 'dataset_info.json').is_file()),
      key=lambda p: tuple(int(v) for v in p.name.split('.') if v.isdigit()),
  )
  if not versions:
    family, _, config = name.partition('/')
    folder = BUILDER_FOLDERS.get(family, family)
    raise errors.DatasetNotPreparedError(
        f'dataset {name!r} is not prepared in {root.parent}; build it with `python -m '
        f'clipcrop_jax.build_dataset datasets/{folder}'
        + (f' --config {config}' if config else '')
        + f' --data_dir {root.parent}` (add --manual_dir=<raw files> for real datasets)'
    )
  return tfds.builder_from_directory(os.fspath(versions[-1]))


def input_features(example: dict[str, Any]) -> dict[str, Any]:
  """The TFDS features the cropping pipelines read (extras such as `objects` are dropped)."""
  return {k: v for k, v in example.items() if k in F.INPUT_FEATURES}


def random_batch(
    batch: int, image_size: int, max_crops: int, max_queries: int, seed: int = 1234
) -> dict[str, np.ndarray]:
  """A fixed random batch with the `F.TRAIN_KEYS` shapes (NumPy), for benchmarks / tests.

  Images uniform in [0, 1); 3..max_crops real crops per example (xyxy in [0, 1], scores 1..5,
  the rest zero padding); every other example has a non-square extent; example b has
  1 + b % max_queries non-empty text queries of random CLIP token ids between the start (49406)
  and end (49407) tokens, `F.MAX_QUERY_LENGTH` tokens per query; query roles: the first is the
  caption, then subject and context keywords in turn.
  """
  rng = np.random.default_rng(seed)
  image = rng.uniform(size=(batch, image_size, image_size, 3)).astype(np.float32)
  lo = rng.uniform(0.0, 0.5, size=(batch, max_crops, 2))
  hi = lo + rng.uniform(0.1, 0.5, size=(batch, max_crops, 2))
  crops = np.concatenate([lo, np.minimum(hi, 1.0)], axis=-1).astype(np.float32)
  crop_scores = rng.uniform(1.0, 5.0, size=(batch, max_crops)).astype(np.float32)
  n_real = rng.integers(3, max_crops + 1, size=(batch,))
  crop_mask = np.arange(max_crops)[None] < n_real[:, None]
  crops = np.where(crop_mask[..., None], crops, 0.0).astype(np.float32)
  crop_scores = np.where(crop_mask, crop_scores, 0.0).astype(np.float32)
  image_extent = rng.uniform(0.6, 1.0, size=(batch, 2)).astype(np.float32)
  image_extent[::2] = 1.0
  text_queries = np.zeros((batch, max_queries, F.MAX_QUERY_LENGTH), np.int32)
  for b in range(batch):
    for q in range(1 + b % max_queries):
      length = int(rng.integers(2, 8))
      text_queries[b, q, 0] = 49406
      text_queries[b, q, 1 : length - 1] = rng.integers(1, 49000, size=length - 2)
      text_queries[b, q, length - 1] = 49407
  roles = np.where(
      np.arange(max_queries) == 0,
      F.ROLE_IDS['caption'],
      np.where(np.arange(max_queries) % 2 == 1, F.ROLE_IDS['subject'], F.ROLE_IDS['context']),
  )
  query_roles = np.where(text_queries[..., 0] > 0, roles[None], 0).astype(np.int32)
  return {
      F.IMAGES: image,
      F.CROP_BOXES: crops,
      F.CROP_SCORES: crop_scores,
      F.CROP_MASK: crop_mask,
      F.IMAGE_EXTENT: image_extent,
      F.TEXT_QUERIES: text_queries,
      F.QUERY_ROLES: query_roles,
  }
