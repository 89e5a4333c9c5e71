"""Feature keys and the shared TFDS feature spec of every cropping dataset (GAIC, Horanyi-PR,
TextCrop, synthetic), plus the bad-data policy the builders share.

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

IMAGE = 'image'
FILENAME = 'image/filename'
HEIGHT = 'height'
WIDTH = 'width'
TEXT = 'text'
CROPS = 'crops'
CROP_BBOX = 'bbox'
CROP_SCORE = 'score'


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
      CROPS: tfds.features.Sequence({
          CROP_BBOX: tfds.features.BBoxFeature(),
          CROP_SCORE: tf.float32,
      }),
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
