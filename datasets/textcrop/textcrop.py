"""TextCrop: the text-guided cropping test set introduced by ClipCrop (arXiv 2211.11492).

Build (test split only; raw files are not public, see MANUAL_DOWNLOAD_INSTRUCTIONS / README.md):

  tfds build datasets/textcrop --manual_dir=/path/to/textcrop_raw [--data_dir=...]

Reads labelme JSON (one file per image; shapes grouped by label = text, one example per
(image, text)) or, when `manual_dir/annotations.json` exists, the simple JSON format shared with
Horanyi-PR. Bad raw data raises `clipcrop_jax.data.features.BadDataError`; set
`CLIPCROP_SKIP_BAD_DATA=1` (or pass `skip_bad_data=True`) to skip and count it instead.
"""

from __future__ import annotations

from absl import logging
import tensorflow_datasets as tfds

from clipcrop_jax.data import formats as data_formats

_CITATION = r"""
@inproceedings{zhong2023clipcrop,
  title={ClipCrop: Conditioned Cropping Driven by Vision-Language Model},
  author={Zhong, Zhihang and Cheng, Mingxi and Wu, Zhirong and Yuan, Yuhui and Zheng, Yinqiang
          and Li, Ji and Hu, Han and Lin, Stephen and Sato, Yoichi and Sato, Imari},
  booktitle={ICCV Workshops},
  year={2023}
}
"""


class TextCrop(data_formats.ReferenceCropsBuilderMixin, tfds.core.GeneratorBasedBuilder):
  """TextCrop: images with (typically) 2 texts x 4 reference crops (score 1.0) each."""

  name = 'textcrop'  # Not 'text_crop': matches the folder; not in the TFDS catalogue.
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {
      '1.0.0': 'Initial release: test split from labelme JSON or the simple JSON format.',
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  TextCrop is not publicly released. Put the raw files in --manual_dir in one of two layouts:

  A) labelme (as annotated): manual_dir/images/<image files> and one labelme JSON per image in
     manual_dir/annotations/*.json (or, if annotations/ has none, next to the images as
     manual_dir/images/*.json). Each rectangle shape's label is its text; the two points are
     opposite corners in any order. imagePath is resolved relative to the JSON file, then as
     images/<basename>. One example per (image, text) with all its rectangles.
  B) simple JSON (as for Horanyi-PR), used whenever manual_dir/annotations.json exists:
     [{"image": "file.jpg", "caption": "...", "boxes": [[x0, y0, x1, y1], ...]}, ...]
     with images in manual_dir/images/. One example per entry.

  Pixel coordinates of the image as displayed (EXIF orientation applied). Every box is a
  reference crop (score 1.0). Set CLIPCROP_SKIP_BAD_DATA=1 to skip (and count) bad items.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return self._reference_info(
        description='Text-guided cropping test set compiled for ClipCrop: one example per '
        '(image, text) with all reference crops (score 1.0).',
        homepage='https://arxiv.org/abs/2211.11492',
        citation=_CITATION,
    )

  def _reference_examples(self, manual_dir, skip: bool):
    if (manual_dir / data_formats.SIMPLE_ANNOTATIONS).exists():
      if data_formats.labelme_files(manual_dir):
        logging.warning(
            'textcrop: %s exists, so the labelme *.json files are ignored.',
            manual_dir / data_formats.SIMPLE_ANNOTATIONS,
        )
      yield from data_formats.simple_format_examples(manual_dir, self.skip_report, skip)
    else:
      yield from data_formats.labelme_examples(manual_dir, self.skip_report, skip)
