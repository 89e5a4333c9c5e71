"""Raw annotation formats of the text-guided cropping test sets (Horanyi-PR, TextCrop).

Two formats, both with pixel coordinates of the image *as displayed* (EXIF orientation applied,
as labelme and image viewers show it):

* Simple JSON (Horanyi-PR, and TextCrop's fallback): `manual_dir/annotations.json` is a list of
  `{"image": "file.jpg", "caption": "...", "boxes": [[x0, y0, x1, y1], ...]}`; images live in
  `manual_dir/images/` (`image` is relative to it). One example per entry, boxes in pixel xyxy
  with x0 < x1 and y0 < y1.
* labelme JSON (TextCrop): one file per image with `imagePath`, `imageHeight`, `imageWidth` and
  `shapes` [{`label`, `points` [[x, y], [x, y]], `shape_type` 'rectangle'}]. The two points are
  opposite corners in any order. Shapes are grouped by label (the text): one example per
  (image, text) with all its boxes.

Bad data raises `features.BadDataError` naming the file and the entry / shape index. With
skipping enabled (`skip_bad_data=True`, or env `CLIPCROP_SKIP_BAD_DATA=1`) the bad item is
skipped and counted in a `features.SkipReport` instead. Skipping granularity: a bad box / shape
drops only that box; a bad image, entry or file drops all its examples; an example left without
any valid box is dropped too (reason `no_valid_boxes`). Coordinates are never guessed: a box
more than `TOLERANCE_PX` outside the image is an error, within it the box is clipped.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import math
import os
import pathlib
from typing import Any, Iterator

from clipcrop_jax.data import features

SKIP_ENV = 'CLIPCROP_SKIP_BAD_DATA'
_SKIP_TRUE = ('1', 'true', 'yes', 'on')
_SKIP_FALSE = ('', '0', 'false', 'no', 'off')
TOLERANCE_PX = 1.0
SIMPLE_ANNOTATIONS = 'annotations.json'
LABELME_DIR = 'annotations'
IMAGES_DIR = 'images'
_EXIF_ORIENTATION = 0x0112

# SkipReport reasons.
MISSING_IMAGE = 'missing_image'
UNREADABLE_IMAGE = 'unreadable_image'
MALFORMED_JSON = 'malformed_json'
MALFORMED_ENTRY = 'malformed_entry'
MALFORMED_BOX = 'malformed_box'
NON_RECTANGLE = 'non_rectangle_shape'
OUT_OF_BOUNDS = 'out_of_bounds_box'
ZERO_AREA = 'zero_area_box'
SIZE_MISMATCH = 'size_mismatch'
NO_VALID_BOXES = 'no_valid_boxes'


class ReferenceCropsBuilderMixin:
  """Shared part of the reference-crop builders (horanyi_pr, textcrop): the `skip_bad_data` flag,
  the common features, a single `test` split from the manual dir, and the skip summary log.

  A builder mixes this in before `tfds.core.GeneratorBasedBuilder` and implements
  `_info()` (via `_reference_info`) and `_reference_examples(manual_dir, skip) -> (key, example)`.
  """

  def __init__(self, *, skip_bad_data: bool | None = None, **kwargs):
    """`skip_bad_data`: None reads env CLIPCROP_SKIP_BAD_DATA (default: raise on bad data)."""
    super().__init__(**kwargs)
    self._skip_bad_data = skip_bad_data
    self.skip_report = features.SkipReport()

  def _reference_info(self, description: str, homepage: str, citation: str):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    import tensorflow_datasets.core  # pylint: disable=g-import-not-at-top,unused-import

    return tfds.core.DatasetInfo(
        builder=self,
        description=description,
        features=tfds.features.FeaturesDict(features.common_features()),
        homepage=homepage,
        citation=citation,
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    return {'test': self._generate_examples(dl_manager.manual_dir)}

  def _generate_examples(self, manual_dir):
    from absl import logging  # pylint: disable=g-import-not-at-top

    skip = skip_bad_data_from_env() if self._skip_bad_data is None else self._skip_bad_data
    self.skip_report = features.SkipReport()
    yield from self._reference_examples(manual_dir, skip)
    logging.info('%s: %s', self.name, self.skip_report.summary())
    if self.skip_report.counts:
      logging.warning(
          '%s: %s; first messages:\n  %s',
          self.name,
          self.skip_report.summary(),
          '\n  '.join(self.skip_report.examples),
      )

  def _reference_examples(self, manual_dir, skip: bool):
    raise NotImplementedError


def skip_bad_data_from_env() -> bool:
  """The builders' skip-bad-data switch from env `CLIPCROP_SKIP_BAD_DATA` (the only reader of it).

  1/true/yes/on -> True; unset, empty or 0/false/no/off -> False (case and surrounding spaces
  ignored). Anything else (a typo) is a one-line ValueError naming the variable and its value,
  never a silent False.
  """
  raw = os.environ.get(SKIP_ENV, '')
  value = raw.strip().lower()
  if value in _SKIP_FALSE:
    return False
  if value in _SKIP_TRUE:
    return True
  raise ValueError(
      f'{SKIP_ENV}={raw!r}: expected one of {"/".join(_SKIP_TRUE)} (skip bad data) '
      f'or {"/".join(_SKIP_FALSE[1:])} (raise), or unset.'
  )


class _Skipped(Exception):
  """Internal: the item was bad and skipping is on (already counted)."""


@dataclasses.dataclass
class _Ctx:
  report: features.SkipReport
  skip: bool

  def bad(self, reason: str, message: str) -> _Skipped:
    """Raises BadDataError, or counts it and returns `_Skipped` for the caller to raise."""
    self.report.handle(features.BadDataError(message), self.skip, reason)
    return _Skipped(message)


@dataclasses.dataclass(frozen=True)
class LoadedImage:
  jpeg: bytes  # JPEG bytes of the image as displayed (EXIF orientation applied), RGB.
  height: int
  width: int


def load_image(path: pathlib.Path, where: str) -> LoadedImage:
  """Reads an image; raises BadDataError (reason in `.reason`) naming `where` and the file."""
  from PIL import Image, ImageOps  # pylint: disable=g-import-not-at-top

  if not path.is_file():
    err = features.BadDataError(f'{where}: image file not found: {path}')
    err.reason = MISSING_IMAGE
    raise err
  try:
    with Image.open(path) as im:
      im.load()  # Full decode: catches truncated / corrupt files.
      orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
      passthrough = im.format == 'JPEG' and im.mode == 'RGB' and orientation in (1, None)
      if orientation not in (1, None):
        im = ImageOps.exif_transpose(im)
      width, height = im.size
      if passthrough:
        data = path.read_bytes()
      else:
        buf = io.BytesIO()
        im.convert('RGB').save(buf, format='JPEG', quality=95)
        data = buf.getvalue()
  except (
      Exception
  ) as e:  # PIL raises OSError, SyntaxError, ValueError, ... pylint: disable=broad-except
    err = features.BadDataError(f'{where}: cannot read image {path}: {e}')
    err.reason = UNREADABLE_IMAGE
    raise err from e
  return LoadedImage(jpeg=data, height=height, width=width)


def _number(value: Any) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise TypeError(f'not a finite number: {value!r}')
  return float(value)


def pixel_box_to_bbox(box, height: int, width: int, where: str, ctx: _Ctx):
  """Pixel (x0, y0, x1, y1), x0 <= x1, y0 <= y1 -> `tfds.features.BBox` normalised to the image."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  x0, y0, x1, y1 = box
  t = TOLERANCE_PX
  if x0 < -t or y0 < -t or x1 > width + t or y1 > height + t:
    raise ctx.bad(
        OUT_OF_BOUNDS,
        f'{where}: box (x0, y0, x1, y1) = {tuple(box)} lies outside '
        f'the {width}x{height} (w x h) image by more than {t} px',
    )
  x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
  y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
  if x1 <= x0 or y1 <= y0:
    raise ctx.bad(ZERO_AREA, f'{where}: box (x0, y0, x1, y1) = {tuple(box)} has zero area')
  return tfds.features.BBox(ymin=y0 / height, xmin=x0 / width, ymax=y1 / height, xmax=x1 / width)


def _example(image: LoadedImage, filename: str, text: str, bboxes) -> dict[str, Any]:
  return {
      features.IMAGE: image.jpeg,
      features.FILENAME: filename,
      features.HEIGHT: image.height,
      features.WIDTH: image.width,
      features.TEXT: text,
      features.CROPS: [{features.CROP_BBOX: b, features.CROP_SCORE: 1.0} for b in bboxes],
  }


def _read_json(path: pathlib.Path) -> Any:
  try:
    return json.loads(path.read_text(encoding='utf-8'))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise features.BadDataError(f'{path}: not a readable JSON file: {e}') from e


def _load_image_ctx(path: pathlib.Path, where: str, ctx: _Ctx) -> LoadedImage:
  try:
    return load_image(path, where)
  except features.BadDataError as e:
    raise ctx.bad(e.reason, str(e)) from e


class _LastImage:
  """Caches the last decoded image (consecutive entries often share an image)."""

  def __init__(self):
    self._path, self._image = None, None

  def get(self, path: pathlib.Path, where: str, ctx: _Ctx) -> LoadedImage:
    if path != self._path:
      self._path, self._image = None, None
      self._image = _load_image_ctx(path, where, ctx)
      self._path = path
    return self._image


# ---------------------------------------------------------------------------------------------
# Simple JSON format.


def simple_format_examples(
    manual_dir, report: features.SkipReport, skip_bad_data: bool
) -> Iterator[tuple[str, dict[str, Any]]]:
  """Yields (key, example) from `manual_dir/annotations.json` (one example per entry)."""
  manual_dir = pathlib.Path(manual_dir)
  ann_path = manual_dir / SIMPLE_ANNOTATIONS
  images_dir = manual_dir / IMAGES_DIR
  if not ann_path.is_file():
    raise features.BadDataError(f'{ann_path}: annotation file not found (see the dataset README).')
  entries = _read_json(ann_path)
  if not isinstance(entries, list):
    raise features.BadDataError(
        f'{ann_path}: expected a JSON list of entries, got ' f'{type(entries).__name__}'
    )
  ctx = _Ctx(report, skip_bad_data)
  cache = _LastImage()
  for index, entry in enumerate(entries):
    where = f'{ann_path} entry {index}'
    try:
      yield f'{index:06d}', _simple_entry(entry, where, images_dir, ctx, cache)
    except _Skipped:
      continue


def _simple_entry(entry, where, images_dir, ctx, cache) -> dict[str, Any]:
  """Validates one simple-format entry and returns its example."""
  if not isinstance(entry, dict):
    raise ctx.bad(MALFORMED_ENTRY, f'{where}: expected an object, got {type(entry).__name__}')
  missing = [k for k in ('image', 'caption', 'boxes') if k not in entry]
  if missing:
    raise ctx.bad(MALFORMED_ENTRY, f'{where}: missing key(s) {missing}')
  image_name, caption, boxes = entry['image'], entry['caption'], entry['boxes']
  if not isinstance(image_name, str) or not image_name:
    raise ctx.bad(MALFORMED_ENTRY, f'{where}: "image" must be a non-empty string')
  if not isinstance(caption, str):
    raise ctx.bad(MALFORMED_ENTRY, f'{where} ({image_name}): "caption" must be a string')
  if not isinstance(boxes, list) or not boxes:
    raise ctx.bad(MALFORMED_ENTRY, f'{where} ({image_name}): "boxes" must be a non-empty list')
  image = cache.get(images_dir / image_name, f'{where} ({image_name})', ctx)
  bboxes = []
  for b, box in enumerate(boxes):
    box_where = f'{where} ({image_name}) box {b}'
    try:
      try:
        if not isinstance(box, list) or len(box) != 4:
          raise TypeError(f'expected [x0, y0, x1, y1], got {box!r}')
        x0, y0, x1, y1 = (_number(v) for v in box)
      except TypeError as e:
        raise ctx.bad(MALFORMED_BOX, f'{box_where}: {e}') from e
      if x1 < x0 or y1 < y0:
        raise ctx.bad(
            MALFORMED_BOX,
            f'{box_where}: expected x0 <= x1 and y0 <= y1 ' f'(pixel x0, y0, x1, y1), got {box}',
        )
      bboxes.append(pixel_box_to_bbox((x0, y0, x1, y1), image.height, image.width, box_where, ctx))
    except _Skipped:
      continue
  if not bboxes:
    raise ctx.bad(NO_VALID_BOXES, f'{where} ({image_name}): no valid box left')
  return _example(image, image_name, caption, bboxes)


# ---------------------------------------------------------------------------------------------
# labelme format.


def labelme_files(manual_dir) -> list[pathlib.Path]:
  """labelme JSON files: `manual_dir/annotations/*.json`, else `manual_dir/images/*.json`."""
  manual_dir = pathlib.Path(manual_dir)
  for folder in (manual_dir / LABELME_DIR, manual_dir / IMAGES_DIR):
    if folder.is_dir():
      files = sorted(folder.glob('*.json'))
      if files:
        return files
  return []


def _labelme_image_path(
    json_path: pathlib.Path, image_path: str, images_dir: pathlib.Path
) -> pathlib.Path:
  """labelme's imagePath is relative to the JSON file; fall back to images/<basename>."""
  image_path = image_path.replace('\\', '/')  # labelme on Windows writes backslashes.
  candidate = json_path.parent / image_path
  if candidate.is_file():
    return candidate
  fallback = images_dir / pathlib.PurePosixPath(image_path).name
  return fallback if fallback.is_file() else candidate


def labelme_examples(
    manual_dir, report: features.SkipReport, skip_bad_data: bool
) -> Iterator[tuple[str, dict[str, Any]]]:
  """Yields (key, example) per (image, label) from the labelme files of `manual_dir`."""
  manual_dir = pathlib.Path(manual_dir)
  files = labelme_files(manual_dir)
  if not files:
    raise features.BadDataError(
        f'{manual_dir}: no labelme *.json in {LABELME_DIR}/ or {IMAGES_DIR}/ and no '
        f'{SIMPLE_ANNOTATIONS} (see the dataset README).'
    )
  ctx = _Ctx(report, skip_bad_data)
  for json_path in files:
    try:
      yield from _labelme_file(json_path, manual_dir, ctx)
    except _Skipped:
      continue


def _labelme_file(json_path, manual_dir, ctx) -> Iterator[tuple[str, dict[str, Any]]]:
  """Examples of one labelme file, one per label, in order of first appearance."""
  where = str(json_path)
  try:
    data = _read_json(json_path)
  except features.BadDataError as e:
    raise ctx.bad(MALFORMED_JSON, str(e)) from e
  if not isinstance(data, dict):
    raise ctx.bad(MALFORMED_ENTRY, f'{where}: expected a labelme JSON object')
  missing = [k for k in ('imagePath', 'imageHeight', 'imageWidth', 'shapes') if k not in data]
  if missing:
    raise ctx.bad(MALFORMED_ENTRY, f'{where}: missing labelme key(s) {missing}')
  if not isinstance(data['imagePath'], str) or not data['imagePath']:
    raise ctx.bad(MALFORMED_ENTRY, f'{where}: "imagePath" must be a non-empty string')
  if not isinstance(data['shapes'], list):
    raise ctx.bad(MALFORMED_ENTRY, f'{where}: "shapes" must be a list')
  try:
    ann_h, ann_w = _number(data['imageHeight']), _number(data['imageWidth'])
  except TypeError as e:
    raise ctx.bad(MALFORMED_ENTRY, f'{where}: imageHeight/imageWidth: {e}') from e

  images_dir = manual_dir / IMAGES_DIR
  image_path = _labelme_image_path(json_path, data['imagePath'], images_dir)
  image = _load_image_ctx(image_path, f'{where} (imagePath {data["imagePath"]!r})', ctx)
  if (ann_h, ann_w) != (image.height, image.width):
    raise ctx.bad(
        SIZE_MISMATCH,
        f'{where}: imageHeight x imageWidth = {ann_h:g} x {ann_w:g} '
        f'but {image_path} is {image.height} x {image.width} (h x w, EXIF-oriented)',
    )
  try:
    filename = image_path.resolve().relative_to(images_dir.resolve()).as_posix()
  except ValueError:
    filename = image_path.name

  labels = [
      s['label'].strip()
      for s in data['shapes']
      if isinstance(s, dict) and isinstance(s.get('label'), str) and s['label'].strip()
  ]
  groups: dict[str, list] = collections.OrderedDict()
  for s, shape in enumerate(data['shapes']):
    try:
      text, bbox = _labelme_shape(shape, f'{where} shape {s}', image, ctx)
      groups.setdefault(text, []).append(bbox)
    except _Skipped:
      continue
  lost = [text for text in dict.fromkeys(labels) if text not in groups]
  if not groups and not lost:
    raise ctx.bad(NO_VALID_BOXES, f'{where}: no valid rectangle shape')
  for text in lost:  # Only reached in skip mode: count each text that lost all its boxes.
    ctx.bad(NO_VALID_BOXES, f'{where}: text {text!r} has no valid box left')
  for t, (text, bboxes) in enumerate(groups.items()):
    yield f'{json_path.name}#{t}', _example(image, filename, text, bboxes)


def _labelme_shape(shape, where, image: LoadedImage, ctx):
  """One labelme rectangle -> (label, BBox). Any corner order."""
  if not isinstance(shape, dict):
    raise ctx.bad(MALFORMED_BOX, f'{where}: expected an object')
  label, points = shape.get('label'), shape.get('points')
  shape_type = shape.get('shape_type')  # Absent in old labelme files = polygon.
  if shape_type != 'rectangle':
    raise ctx.bad(
        NON_RECTANGLE,
        f'{where} (label {label!r}): shape_type {shape_type!r}, only ' "'rectangle' is supported",
    )
  if not isinstance(label, str) or not label.strip():
    raise ctx.bad(MALFORMED_BOX, f'{where}: "label" (the text) must be a non-empty string')
  try:
    if not isinstance(points, list) or len(points) != 2:
      raise TypeError(f'expected 2 points [[x, y], [x, y]], got {points!r}')
    coords = []
    for p in points:
      if not isinstance(p, list) or len(p) != 2:
        raise TypeError(f'expected a point [x, y], got {p!r}')
      coords.append((_number(p[0]), _number(p[1])))
  except TypeError as e:
    raise ctx.bad(MALFORMED_BOX, f'{where} (label {label!r}): {e}') from e
  (xa, ya), (xb, yb) = coords
  box = (min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb))
  return label.strip(), pixel_box_to_bbox(box, image.height, image.width, where, ctx)
