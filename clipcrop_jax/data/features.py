"""Names the data and the model agree on (like Scenic's `modalities.py`): the TFDS feature keys
and shared feature spec of every cropping dataset (GAIC, Horanyi-PR, TextCrop, synthetic), the
batch keys the model eats, the query modes and the query length, plus the bad-data policy the
builders share.

Every builder emits at least these features (box convention: TFDS `BBoxFeature`, i.e.
(ymin, xmin, ymax, xmax) normalised to [0, 1] of the *original image*):

  image            JPEG-encoded RGB image (H, W, 3) uint8
  image/filename   str, the file name inside the dataset's image folder
  height, width    int32 original size in pixels
  text             str, the caption / request ('' when the dataset has none)
  crops            Sequence of {bbox: BBoxFeature, score: float32}

Builders import this module (the package is installed), so the features stay identical.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from clipcrop_jax.owlvit import configs as _owl_configs

MAX_QUERY_LENGTH = _owl_configs.MAX_QUERY_LENGTH  # CLIP tokens per text query (OWL-ViT's)

# ------------------------------------------------------------------------------------------------
# TFDS feature keys (what the builders write).
# ------------------------------------------------------------------------------------------------

IMAGE = 'image'
FILENAME = 'image/filename'
HEIGHT = 'height'
WIDTH = 'width'
TEXT = 'text'
CROPS = 'crops'
CROP_BBOX = 'bbox'
CROP_SCORE = 'score'
OBJECTS = 'objects'  # detection annotations (synthetic set): objects/bbox, objects/<label_key>
OBJECT_BBOX = 'bbox'

# ------------------------------------------------------------------------------------------------
# Batch keys (what `input_pipeline` yields and the train / eval steps read). Boxes are xyxy in
# [0, 1] of the padded square the model sees.
# ------------------------------------------------------------------------------------------------

# ClipCrop batches.
IMAGES = 'image'  # float32 (B, S, S, 3) in [0, 1], padded + resized
CROP_BOXES = 'crops'  # float32 (B, N, 4) reference / candidate crops
CROP_SCORES = 'crop_scores'  # float32 (B, N) their scores (GAIC MOS; 1 for reference crops)
CROP_MASK = 'crop_mask'  # bool (B, N) real (not padding) crops
IMAGE_EXTENT = 'image_extent'  # float32 (B, 2) (w, h) of the real image in the padded square
TEXT_QUERIES = 'text_queries'  # int32 (B, Q, MAX_QUERY_LENGTH) [full text, keywords...], 0 = pad
QUERY_ROLES = 'query_roles'  # int32 (B, Q) each text query's role (ROLE_IDS; 0 on padding)
EXAMPLE_MASK = 'mask'  # bool (B,) real (not padding) examples of an eval batch
TRAIN_KEYS = (IMAGES, CROP_BOXES, CROP_SCORES, CROP_MASK, IMAGE_EXTENT, TEXT_QUERIES, QUERY_ROLES)
EVAL_KEYS = TRAIN_KEYS + (HEIGHT, WIDTH, EXAMPLE_MASK)
INPUT_FEATURES = (IMAGE, CROPS, TEXT, HEIGHT, WIDTH)  # the TFDS features the pipeline reads

# Detection batches (`detection_train`).
BOXES = 'boxes'  # float32 (B, N, 4) object boxes
BOX_MASK = 'box_mask'  # bool (B, N) real objects
LABELS = 'labels'  # str (B, N) object labels (host side only)
LABEL_IDS = 'label_ids'  # int32 (B, N) index of each object's label among the queries
DETECTION_TRAIN_KEYS = (IMAGES, BOXES, BOX_MASK, LABEL_IDS, TEXT_QUERIES)

# ------------------------------------------------------------------------------------------------
# Query modes of a ClipCrop model: which queries condition the decoder.
# ------------------------------------------------------------------------------------------------

# 'full' (text + keywords), 'main' (the text), 'key' (the keywords), 'base' (no condition),
# 'image' (an example image's one-shot embedding).
QUERY_MODES = ('full', 'main', 'key', 'base', 'image')
TEXT_QUERY_MODES = ('full', 'main', 'key')

# The role of a query (`keywords.build_query_roles`): 'caption' (the whole request: the full
# text, or an example image), 'subject' (a keyword naming what the crop is of: the caption's head
# noun phrase and its conjuncts) or 'context' (a keyword naming where or beside what: objects of
# prepositions and relations). ROLE_IDS are the model's integer codes.
ROLES = ('caption', 'subject', 'context')
ROLE_IDS = {role: i for i, role in enumerate(ROLES)}


def common_features(**extras: Any):
  """The shared `tfds.features.FeaturesDict` content (a dict), with dataset-specific extras."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  features = {
      IMAGE: tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
      FILENAME: tfds.features.Text(),
      HEIGHT: tf.int32,
      WIDTH: tf.int32,
      TEXT: tfds.features.Text(),
      CROPS: tfds.features.Sequence(
          {
              CROP_BBOX: tfds.features.BBoxFeature(),
              CROP_SCORE: tf.float32,
          }
      ),
  }
  features.update(extras)
  return features


class BadDataError(ValueError):
  """Raised by a builder for bad raw data; the message names the file (and line)."""


@dataclasses.dataclass
class SkipReport:
  """Counts of skipped items when a builder runs with skipping enabled (`skip_bad_data`)."""

  counts: dict[str, int] = dataclasses.field(default_factory=dict)
  examples: list[str] = dataclasses.field(default_factory=list)

  def skip(self, reason: str, message: str) -> None:
    self.counts[reason] = self.counts.get(reason, 0) + 1
    if len(self.examples) < 20:
      self.examples.append(message)

  def handle(self, error: BadDataError, skip_bad_data: bool, reason: str) -> None:
    """Re-raises `error` unless skipping is enabled, in which case it is counted."""
    if not skip_bad_data:
      raise error
    self.skip(reason, str(error))

  def summary(self) -> str:
    if not self.counts:
      return 'no items skipped'
    return 'skipped ' + ', '.join(f'{n} ({r})' for r, n in sorted(self.counts.items()))
