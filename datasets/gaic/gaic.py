"""GAIC (Grid-Anchor-based Image Cropping) with ClipCrop's per-image captions, as a TFDS builder.

Build with the TFDS CLI (see datasets/gaic/README.md):

  tfds build datasets/gaic --config journal --manual_dir=/path/to/raw

Each example is one GAIC image with all of its annotated candidate crops (the `-2` "ignore"
crops dropped) and their mean opinion scores, plus the ClipCrop caption of the image when the
GAIC-Text-Annotations are present (`text` is '' otherwise).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Iterator

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from clipcrop_jax.data import features as F
from clipcrop_jax.data import formats as data_formats

# A box coordinate may lie at most this many pixels outside the image; it is then clipped.
# Anything further out is bad data.
BOUNDS_TOLERANCE_PX = 1.0
# GAIC's sentinel score for "ignore this crop".
IGNORE_SCORE = -2.0
# Every other score is a mean opinion score on GAIC's 1..5 scale; anything else is bad data
# (training maps a score s to (s - 1) / 4 without clipping).
SCORE_MIN, SCORE_MAX = 1.0, 5.0
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
TEXT_DIR = 'GAIC-Text-Annotations'
# ClipCrop caption file -> split of the journal version ("valid" is GAIC's "val").
TEXT_FILES = {'train': 'train.json', 'val': 'valid.json', 'test': 'test.json'}

_DESCRIPTION = """\
GAIC (Zeng et al., CVPR 2019 / TPAMI 2020): images with densely annotated grid-anchor candidate
crops, each with a mean opinion score (MOS, 1-5). Joined with the per-image captions that ClipCrop
(Zhong et al., ICCVW 2023) released as GAIC-Text-Annotations. Boxes are TFDS BBoxFeature
(ymin, xmin, ymax, xmax) normalised by the original image size; GAIC's txt lines are
`y1 x1 y2 x2 score` in pixels (row first). Crops with score -2 ("ignore") are dropped.
"""

_CITATION = """\
@article{zeng2020gaic,
  title={Grid Anchor based Image Cropping: A New Benchmark and An Efficient Model},
  author={Zeng, Hui and Li, Lida and Cao, Zisheng and Zhang, Lei},
  journal={IEEE Transactions on Pattern Analysis and Machine Intelligence},
  year={2020}
}
@inproceedings{zhong2023clipcrop,
  title={ClipCrop: Conditioned Cropping Driven by Vision-Language Model},
  author={Zhong, Zhihang and Cheng, Mingxi and Wu, Zhirong and Yuan, Yuhui and Zheng, Yinqiang
          and Li, Ji and Hu, Han and Lin, Stephen and Sato, Yoichi and Sato, Imari},
  booktitle={Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)
             Workshops},
  pages={294--304},
  year={2023}
}
"""


@dataclasses.dataclass(eq=False)
class GaicConfig(tfds.core.BuilderConfig):
  """`layout`: 'journal' (GAICD-3336) or 'conference' (GAICD-1236)."""

  layout: str = 'journal'


def _is_image(name: str) -> bool:
  return not name.startswith('.') and name.lower().endswith(IMAGE_EXTENSIONS)


def _list_images(folder: str) -> dict[str, list[str]]:
  """{stem: [filenames]} of the image files directly inside `folder` (sorted).

  An annotation `<stem>.txt` belongs to the image `<stem>.<ext>`: two images with one stem
  (`x.jpg` and `x.png`) make that match ambiguous (`_split_clashes`).
  """
  out = {}
  for name in sorted(os.listdir(folder)):
    if _is_image(name) and os.path.isfile(os.path.join(folder, name)):
      out.setdefault(os.path.splitext(name)[0], []).append(name)
  return out


def _list_txt(folder: str) -> dict[str, list[str]]:
  """{stem: [paths]} of the *.txt files directly inside `folder` (`x.txt` and `x.TXT` clash)."""
  out = {}
  for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    if not name.startswith('.') and name.lower().endswith('.txt') and os.path.isfile(path):
      out.setdefault(os.path.splitext(name)[0], []).append(path)
  return out


def _split_clashes(files: dict[str, list[str]]) -> tuple[dict[str, str], dict[str, list[str]]]:
  """({stem: file} of the stems with one file, {stem: files} of the stems with several)."""
  unique = {stem: names[0] for stem, names in files.items() if len(names) == 1}
  return unique, {stem: names for stem, names in files.items() if len(names) > 1}


def parse_annotation_file(
    path: str, height: int, width: int, report: F.SkipReport, skip_bad_data: bool
) -> list[dict[str, Any]]:
  """Parses one GAIC annotation txt into `crops` entries (bbox normalised, score float32).

  Lines are `y1 x1 y2 x2 score` in pixels of the original image (row first). Blank lines and
  extra whitespace are tolerated; score -2 lines are dropped. A bad line raises `BadDataError`
  naming the file and the 1-based line number, or is counted and dropped when skipping.
  """
  crops = []
  with open(path, encoding='utf-8', errors='replace') as f:
    lines = f.read().splitlines()
  for lineno, raw in enumerate(lines, start=1):
    line = raw.strip()
    if not line:
      continue
    where = f'{path}:{lineno}'
    fields = line.split()
    if len(fields) != 5:
      report.handle(
          F.BadDataError(
              f'{where}: expected 5 fields "y1 x1 y2 x2 score", got {len(fields)}: {line!r}'
          ),
          skip_bad_data,
          'malformed_line',
      )
      continue
    try:
      values = [float(v) for v in fields]
    except ValueError:
      values = None
    if values is None or not all(math.isfinite(v) for v in values):
      report.handle(
          F.BadDataError(f'{where}: non-numeric value in {line!r}'), skip_bad_data, 'malformed_line'
      )
      continue
    y1, x1, y2, x2, score = values
    if score == IGNORE_SCORE:
      continue
    if not SCORE_MIN <= score <= SCORE_MAX:
      report.handle(
          F.BadDataError(
              f'{where}: score {score:g} is outside [{SCORE_MIN:g}, {SCORE_MAX:g}] (GAIC mean '
              f'opinion scores; {IGNORE_SCORE:g} = ignore)'
          ),
          skip_bad_data,
          'score_out_of_range',
      )
      continue
    tol = BOUNDS_TOLERANCE_PX
    if min(y1, x1, y2, x2) < -tol or max(y1, y2) > height + tol or max(x1, x2) > width + tol:
      report.handle(
          F.BadDataError(
              f'{where}: box y1 x1 y2 x2 = {y1:g} {x1:g} {y2:g} {x2:g} lies outside the '
              f'{height}x{width} (HxW) image by more than {tol:g} px'
          ),
          skip_bad_data,
          'out_of_bounds',
      )
      continue
    y1, y2 = (min(max(v, 0.0), float(height)) for v in (y1, y2))
    x1, x2 = (min(max(v, 0.0), float(width)) for v in (x1, x2))
    if y2 <= y1 or x2 <= x1:
      report.handle(
          F.BadDataError(
              f'{where}: empty box y1 x1 y2 x2 = {y1:g} {x1:g} {y2:g} {x2:g} '
              '(needs y2 > y1 and x2 > x1)'
          ),
          skip_bad_data,
          'empty_box',
      )
      continue
    crops.append(
        {
            F.CROP_BBOX: tfds.features.BBox(
                ymin=y1 / height, xmin=x1 / width, ymax=y2 / height, xmax=x2 / width
            ),
            F.CROP_SCORE: np.float32(score),
        }
    )
  return crops


def _read_image(path: str):
  """Returns (encodable image, height, width); raises BadDataError when unreadable."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  try:
    with Image.open(path) as img:
      img.load()  # Decodes the pixels: catches truncated / corrupt files.
      width, height = img.size
      if img.format == 'JPEG' and img.mode in ('RGB', 'L'):
        with open(path, 'rb') as f:
          return f.read(), height, width  # Keep the original JPEG bytes.
      return img.convert('RGB'), height, width  # Re-encoded as JPEG by the feature.
  except Exception as e:  # pylint: disable=broad-except
    raise F.BadDataError(f'{path}: unreadable image ({type(e).__name__}: {e})') from e


class Gaic(tfds.core.GeneratorBasedBuilder):
  """GAIC candidate crops + MOS, with ClipCrop captions (TFDS name 'gaic')."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {
      '1.0.0': 'Initial release: journal (GAICD-3336) and conference (GAICD-1236) configs, '
      'ClipCrop GAIC-Text-Annotations captions.',
  }
  BUILDER_CONFIGS = [
      GaicConfig(
          name='journal',
          layout='journal',
          description='GAICD-3336 (TPAMI journal version): train 2636 / val 200 / test 500.',
      ),
      GaicConfig(
          name='conference',
          layout='conference',
          description='GAICD-1236 (CVPR conference version): train 1036 / test 200.',
      ),
  ]
  DEFAULT_CONFIG_NAME = 'journal'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  GAIC cannot be downloaded automatically (Google Drive). Put the files in `manual_dir`:

  1. GAIC images + annotations, from the links in the README of
     https://github.com/HuiZeng/Grid-Anchor-based-Image-Cropping-Pytorch :
       journal version (GAICD-3336):    Google Drive id 1tDdQqDe8dMoMIVi9Z0WWI5vtRViy01nR
       conference version (GAICD-1236): Google Drive id 1KhmyjoimsQVXqPnLjKZiU4iXNKNyyxqW
     (https://drive.google.com/file/d/<id>/view). Unpack into `manual_dir`, either directly or
     inside one or two top folders (e.g. `GAIC/`, `GAIC_journal/`); the builder looks for
       journal:    images/{train,val,test}/<id>.jpg  and  annotations/{train,val,test}/<id>.txt
       conference: images/{train,test}/<id>.jpg      and  annotations/<id>.txt (flat folder)
     Both versions may sit side by side under `manual_dir` (one top folder each).
  2. Optional captions: `GAIC-Text-Annotations/{train,valid,test}.json` from
     https://github.com/zzh-tech/ClipCrop (e.g. `git clone https://github.com/zzh-tech/ClipCrop`
     and copy or link its GAIC-Text-Annotations/ folder to `manual_dir/GAIC-Text-Annotations`;
     `manual_dir/ClipCrop/GAIC-Text-Annotations` is found too). `valid.json` is the val split.
     Without them every `text` is '' (a model trained on that is ClipCrop-base, no text).
  """

  def __init__(self, *, skip_bad_data: bool | None = None, **kwargs):
    """`skip_bad_data`: skip and count bad raw data instead of raising `BadDataError`.

    None (default) reads the environment variable CLIPCROP_SKIP_BAD_DATA
    (`data_formats.skip_bad_data_from_env`: 1/true/yes/on or 0/false/no/off; anything else is a
    ValueError).
    """
    if skip_bad_data is None:
      skip_bad_data = data_formats.skip_bad_data_from_env()
    self.skip_bad_data = bool(skip_bad_data)
    # split name -> SkipReport of the last generation (for logs and tests).
    self.skip_reports: dict[str, F.SkipReport] = {}
    super().__init__(**kwargs)
    self._original_state['skip_bad_data'] = self.skip_bad_data  # Survives pickling.

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict(
            F.common_features(
                **{
                    'image/id': tfds.features.Text(),  # File stem, e.g. '235093'.
                    'split_name': tfds.features.Text(),  # GAIC folder: 'train', 'val' or 'test'.
                }
            )
        ),
        supervised_keys=None,
        homepage='https://github.com/HuiZeng/Grid-Anchor-based-Image-Cropping-Pytorch',
        citation=_CITATION,
    )

  # ---------------------------------------------------------------------------------------
  # Locating the raw files.

  @property
  def _split_names(self) -> tuple[str, ...]:
    if self.builder_config.layout == 'journal':
      return ('train', 'val', 'test')
    return ('train', 'test')

  def _matches_layout(self, root: str) -> bool:
    images, annotations = os.path.join(root, 'images'), os.path.join(root, 'annotations')
    if not all(os.path.isdir(os.path.join(images, s)) for s in self._split_names):
      return False
    if not os.path.isdir(annotations):
      return False
    if self.builder_config.layout == 'journal':
      return all(os.path.isdir(os.path.join(annotations, s)) for s in self._split_names)
    # Conference: flat annotations folder (and no journal val split).
    return bool(_list_txt(annotations)) and not os.path.isdir(os.path.join(images, 'val'))

  def _find_root(self, manual_dir: str) -> str:
    """The folder holding images/ and annotations/ in this config's layout (depth <= 2)."""
    # Breadth-first over manual_dir, its sub-folders and their sub-folders.
    level, found = [manual_dir], []
    for _ in range(3):
      nxt = []
      for folder in level:
        if self._matches_layout(folder):
          found.append(folder)
          continue
        try:
          names = sorted(os.listdir(folder))
        except OSError:
          continue
        nxt += [
            os.path.join(folder, n)
            for n in names
            if not n.startswith('.')
            and n not in ('images', 'annotations', TEXT_DIR)
            and os.path.isdir(os.path.join(folder, n))
        ]
      if found:
        break
      level = nxt
    layout = self.builder_config.layout
    if len(found) > 1:
      raise F.BadDataError(
          f'{manual_dir}: several folders match the GAIC {layout} layout: '
          f'{found}; point --manual_dir at one of them.'
      )
    if not found:
      want = (
          'images/{train,val,test}/ and annotations/{train,val,test}/'
          if layout == 'journal'
          else 'images/{train,test}/ and a flat annotations/'
      )
      raise F.BadDataError(
          f'{manual_dir}: no folder (up to two levels down) has the GAIC {layout} layout '
          f'({want}); see datasets/gaic/README.md (Gaic.MANUAL_DOWNLOAD_INSTRUCTIONS)'
      )
    return found[0]

  def _find_text_dir(self, manual_dir: str, root: str) -> str | None:
    for folder in (
        os.path.join(manual_dir, TEXT_DIR),
        os.path.join(manual_dir, 'ClipCrop', TEXT_DIR),
        os.path.join(root, TEXT_DIR),
    ):
      if os.path.isdir(folder):
        return folder
    return None

  def _load_captions(self, text_dir: str | None) -> dict[str, tuple[dict[str, str], str]]:
    """split -> ({filename: caption}, json path); {} when there is no caption folder."""
    if text_dir is None:
      return {}
    out = {}
    for split, name in TEXT_FILES.items():
      path = os.path.join(text_dir, name)
      if not os.path.isfile(path):
        raise F.BadDataError(
            f'{path}: missing ({text_dir} must hold train.json, valid.json '
            'and test.json from zzh-tech/ClipCrop)'
        )
      try:
        with open(path, encoding='utf-8') as f:
          data = json.load(f)
      except (ValueError, UnicodeDecodeError) as e:
        raise F.BadDataError(f'{path}: not valid JSON ({e})') from e
      if not isinstance(data, dict) or not all(
          isinstance(k, str) and isinstance(v, str) for k, v in data.items()
      ):
        raise F.BadDataError(f'{path}: expected a flat {{"<file>.jpg": "<caption>"}} object')
      out[split] = (data, path)
    return out

  # ---------------------------------------------------------------------------------------
  # Generation.

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    root = self._find_root(manual_dir)
    text_dir = self._find_text_dir(manual_dir, root)
    captions = self._load_captions(text_dir)
    logging.info(
        'GAIC %s: raw files in %s, captions: %s',
        self.builder_config.name,
        root,
        text_dir or "none (text='')",
    )
    # Caption lookup: for the journal version each split has its own file; the conference
    # images are a subset of the journal ones (train -> train, test -> val + test), so they
    # look up the union.
    if self.builder_config.layout == 'journal':
      split_captions = {s: captions.get(s, ({}, None)) for s in self._split_names}
    else:
      union = {}
      for data, _ in captions.values():
        union.update(data)
      split_captions = {s: (union, None) for s in self._split_names}
    ann = os.path.join(root, 'annotations')
    return {
        split: self._generate_examples(
            split=split,
            image_dir=os.path.join(root, 'images', split),
            annotation_dir=(
                os.path.join(ann, split) if self.builder_config.layout == 'journal' else ann
            ),
            captions=split_captions[split][0],
            caption_path=split_captions[split][1],
            has_captions=bool(captions),
        )
        for split in self._split_names
    }

  def _match_files(
      self, split: str, image_dir: str, annotation_dir: str, report: F.SkipReport
  ) -> tuple[dict[str, list[str]], dict[str, str], dict[str, str], set[str]]:
    """Pairs images and annotation files by stem; every ambiguous stem is reported.

    Annotations are matched to images by file stem, so a stem must name one image and one
    annotation file (and, with the flat conference annotation folder, one split): a clash is bad
    data. The image is skipped in skip mode, never guessed.

    Returns:
      (all image files {stem: [names]}, unambiguous images {stem: name}, annotations
      {stem: path}, the stems already reported).
    """
    skip = self.skip_bad_data
    all_files = _list_images(image_dir)
    images, clashes = _split_clashes(all_files)
    annotations, ann_clashes = _split_clashes(_list_txt(annotation_dir))
    conference = self.builder_config.layout != 'journal'
    images_root = os.path.dirname(image_dir)
    other_splits = {
        s: _list_images(os.path.join(images_root, s))
        for s in self._split_names
        if conference and s != split
    }
    for stem, names in sorted(clashes.items()):
      report.handle(
          F.BadDataError(
              f'{image_dir}: {" and ".join(names)} share the stem {stem!r}, so {stem}.txt cannot be '
              'matched to one image; rename or remove one of them'
          ),
          skip,
          'ambiguous_image',
      )
    known_stems = set(all_files).union(*other_splits.values())
    for stem, paths in sorted(ann_clashes.items()):
      # Reported in the split of its image (conference: in the first split when it has none).
      if stem in all_files or (stem not in known_stems and split == self._split_names[0]):
        report.handle(
            F.BadDataError(
                f'{" and ".join(paths)}: two annotation files for the image stem {stem!r}; remove '
                'one of them'
            ),
            skip,
            'ambiguous_annotation',
        )
    for other, files in other_splits.items():
      for stem in sorted(set(images) & set(files)):
        report.handle(
            F.BadDataError(
                f'{annotations.get(stem, stem + ".txt")}: matches {images_root}/{split}/'
                f'{images[stem]} and {images_root}/{other}/{files[stem][0]}; the flat conference '
                'annotation folder needs a distinct stem per image'
            ),
            skip,
            'ambiguous_image',
        )
    images = {
        stem: name
        for stem, name in images.items()
        if stem not in ann_clashes and not any(stem in f for f in other_splits.values())
    }
    return all_files, images, annotations, set(clashes) | set(ann_clashes)

  def _generate_examples(
      self,
      *,
      split: str,
      image_dir: str,
      annotation_dir: str,
      captions: dict[str, str],
      caption_path: str | None,
      has_captions: bool,
  ) -> Iterator[tuple[str, dict[str, Any]]]:
    report = F.SkipReport()
    self.skip_reports[split] = report
    skip = self.skip_bad_data
    all_files, images, annotations, consumed = self._match_files(
        split, image_dir, annotation_dir, report
    )
    conference = self.builder_config.layout != 'journal'

    if not conference:
      # Annotation txt without an image (the flat conference folder mixes train and test, so
      # that check is done on both splits together, below).
      for stem in sorted(set(annotations) - set(images) - consumed):
        report.handle(
            F.BadDataError(
                f'{annotations[stem]}: annotation without image (no {stem}.jpg in {image_dir})'
            ),
            skip,
            'missing_image',
        )
      # Caption without an image.
      if caption_path is not None:
        filenames = {name for names in all_files.values() for name in names}
        for key in sorted(captions):
          if key not in filenames:
            report.handle(
                F.BadDataError(f'{caption_path}: caption key {key!r} has no image in {image_dir}'),
                skip,
                'caption_without_image',
            )
    else:
      all_images = set()
      for s in self._split_names:
        all_images |= set(_list_images(os.path.join(os.path.dirname(image_dir), s)))
      if split == self._split_names[0]:
        for stem in sorted(set(annotations) - all_images - consumed):
          report.handle(
              F.BadDataError(
                  f'{annotations[stem]}: annotation without image (no {stem}.jpg in '
                  f'{os.path.dirname(image_dir)}/{{train,test}})'
              ),
              skip,
              'missing_image',
          )

    n_ok = n_no_caption = 0
    for stem, filename in images.items():
      image_path = os.path.join(image_dir, filename)
      if stem not in annotations:
        report.handle(
            F.BadDataError(f'{image_path}: no annotation file {stem}.txt in {annotation_dir}'),
            skip,
            'missing_annotation',
        )
        continue
      try:
        image, height, width = _read_image(image_path)
      except F.BadDataError as e:
        report.handle(e, skip, 'unreadable_image')
        continue
      crops = parse_annotation_file(annotations[stem], height, width, report, skip)
      if not crops:
        report.handle(
            F.BadDataError(
                f'{annotations[stem]}: no usable crop (every line empty, -2 or skipped)'
            ),
            skip,
            'no_crops',
        )
        continue
      text = captions.get(filename, '')
      if has_captions and filename not in captions:
        n_no_caption += 1
      n_ok += 1
      yield stem, {
          F.IMAGE: image,
          F.FILENAME: filename,
          F.HEIGHT: np.int32(height),
          F.WIDTH: np.int32(width),
          F.TEXT: text,
          F.CROPS: crops,
          'image/id': stem,
          'split_name': split,
      }
    if n_no_caption:
      logging.warning(
          "GAIC %s/%s: %d images without a caption (text='')",
          self.builder_config.name,
          split,
          n_no_caption,
      )
    logging.info(
        'GAIC %s/%s: %d examples; %s', self.builder_config.name, split, n_ok, report.summary()
    )


if __name__ == '__main__':  # same as `python -m clipcrop_jax.build_dataset`
  from clipcrop_jax import build_dataset  # pylint: disable=g-import-not-at-top

  build_dataset.main()
