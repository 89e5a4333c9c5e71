"""Horanyi-PR: caption-guided cropping test set (Horanyi et al., Pattern Recognition 2022).

Build (test split only; raw files are not public, see MANUAL_DOWNLOAD_INSTRUCTIONS / README.md):

  tfds build datasets/horanyi_pr --manual_dir=/path/to/horanyi_pr_raw [--data_dir=...]

Bad raw data raises `clipcrop_jax.data.features.BadDataError`; set `CLIPCROP_SKIP_BAD_DATA=1` (or pass
`skip_bad_data=True` to the builder) to skip and count it instead.
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from clipcrop_jax.data import formats as data_formats

_CITATION = r"""
@article{horanyi2022repurposing,
  title={Repurposing existing deep networks for caption and aesthetic-guided image cropping},
  author={Horanyi, Nora and Xia, Kedi and Yi, Kwang Moo and Bojja, Abhishake Kumar and
          Leonardis, Ales and Chang, Hyung Jin},
  journal={Pattern Recognition},
  volume={126},
  pages={108485},
  year={2022},
  doi={10.1016/j.patcog.2021.108485}
}
"""


class HoranyiPr(data_formats.ReferenceCropsBuilderMixin, tfds.core.GeneratorBasedBuilder):
  """Horanyi-PR: images, a caption each and reference crops (all score 1.0)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {
      '1.0.0': 'Initial release: test split from the simple JSON manual format.',
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  The Horanyi-PR data is not publicly released; ask the authors (h.j.chang@bham.ac.uk).
  Convert it to this layout and pass the folder as --manual_dir:

    manual_dir/annotations.json   [{"image": "file.jpg", "caption": "...",
                                    "boxes": [[x0, y0, x1, y1], ...]}, ...]
    manual_dir/images/file.jpg    ("image" is relative to images/)

  Boxes are pixel x0, y0, x1, y1 (x right, y down, x0 < x1, y0 < y1) of the image as displayed
  (EXIF orientation applied). One example per entry; every box is a reference crop (score 1.0).
  Set CLIPCROP_SKIP_BAD_DATA=1 to skip (and count) bad entries/boxes instead of failing.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return self._reference_info(
        description='Caption-guided cropping test set of Horanyi et al. (PR 2022): one example '
        'per (image, caption) with all reference crops (score 1.0).',
        homepage='https://arxiv.org/abs/2201.02280',
        citation=_CITATION,
    )

  def _reference_examples(self, manual_dir, skip: bool):
    yield from data_formats.simple_format_examples(manual_dir, self.skip_report, skip)
