"""The four TFDS builders under TFDS's own builder test facility (DatasetBuilderTestCase).

Each class writes a tiny fixture tree in the real manual_dir layout (with the helpers of
tests/test_dataset_gaic.py and tests/test_dataset_horanyi_textcrop.py) into a temporary folder,
points EXAMPLE_DIR at it, and lets `tfds.testing.DatasetBuilderTestCase` build every split,
check the split sizes against SPLITS, the example keys, the features and the dataset info.
"""

import pathlib
import shutil
import sys
import tempfile

import pytest

tfds = pytest.importorskip('tensorflow_datasets')
pytest.importorskip('tensorflow')
# tfds.testing imports dill (an extra of tensorflow-datasets[tests], not a core dependency).
pytest.importorskip('dill')

# tests/ has no __init__.py: pytest (rootdir-relative "prepend" import mode) puts tests/ on
# sys.path, so the sibling test modules import as top-level modules. Make it explicit anyway.
_TESTS = pathlib.Path(__file__).resolve().parent
if str(_TESTS) not in sys.path:
  sys.path.insert(0, str(_TESTS))

import test_dataset_gaic as gaic_fixtures  # pylint: disable=g-import-not-at-top
import test_dataset_horanyi_textcrop as ht_fixtures  # pylint: disable=g-import-not-at-top

# The builder modules, loaded as `<name>.<name>` with registration disabled (as the other tests).
Gaic = gaic_fixtures.gaic.Gaic
HoranyiPr = ht_fixtures._builder_cls('horanyi_pr', 'HoranyiPr')  # pylint: disable=protected-access
TextCrop = ht_fixtures._builder_cls('textcrop', 'TextCrop')  # pylint: disable=protected-access
SyntheticCrops = ht_fixtures._builder_cls('synthetic', 'SyntheticCrops')  # pylint: disable=protected-access


class _ManualDirMixin:
  """Writes the fixture tree (make_fixture(path)) into a fresh EXAMPLE_DIR per class.

  A mixin, not a TestCase, so that pytest does not collect it on its own.
  """

  SKIP_CHECKSUMS = True  # Nothing is downloaded (manual_dir or generated data).
  # The builders use `os.path`/`os.fspath` on local manual_dir paths on purpose.
  MOCK_OUT_FORBIDDEN_OS_FUNCTIONS = False

  @classmethod
  def make_fixture(cls, path: pathlib.Path) -> None:
    del path

  @classmethod
  def setUpClass(cls):
    example_dir = pathlib.Path(tempfile.mkdtemp(prefix=f'{cls.__name__}_'))
    cls.addClassCleanup(shutil.rmtree, example_dir, ignore_errors=True)
    cls.make_fixture(example_dir)
    cls.EXAMPLE_DIR = str(example_dir)
    super().setUpClass()

  def test_registered(self):
    # The builders are deliberately imported with registration disabled (see the other dataset
    # tests), so TFDS's "name is in the registry" check does not apply; check the name instead
    # and that it does not shadow a catalogue dataset.
    self.assertEqual(self.builder.name, self.EXPECTED_NAME)
    self.assertNotIn(self.builder.name, tfds.list_builders(with_community_datasets=False))


class GaicJournalTest(_ManualDirMixin, tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = Gaic
  EXPECTED_NAME = 'gaic'
  BUILDER_CONFIG_NAMES_TO_TEST = ['journal']
  SPLITS = {'train': 3, 'val': 2, 'test': 2}

  @classmethod
  def make_fixture(cls, path):
    gaic_fixtures.make_journal(path)  # manual_dir/GAIC_journal/... + GAIC-Text-Annotations/


class HoranyiPrTest(_ManualDirMixin, tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = HoranyiPr
  EXPECTED_NAME = 'horanyi_pr'
  SPLITS = {'test': 3}

  @classmethod
  def make_fixture(cls, path):
    w, h = ht_fixtures.W, ht_fixtures.H
    ht_fixtures._simple(
        path,
        [  # pylint: disable=protected-access
            {'image': 'a.jpg', 'caption': 'a dog', 'boxes': [[4, 6, 20, 18], [0, 0, w, h]]},
            {'image': 'b.jpg', 'caption': 'a cat', 'boxes': [[10, 2, 30, 22]]},
            {'image': 'a.jpg', 'caption': 'the sky', 'boxes': [[0, 0, 40, 12]]},
        ],
    )


class TextCropTest(_ManualDirMixin, tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = TextCrop
  EXPECTED_NAME = 'textcrop'
  SPLITS = {'test': 3}  # img1: two texts (four boxes each); img2: one text.

  @classmethod
  def make_fixture(cls, path):
    rect = ht_fixtures._rect  # pylint: disable=protected-access
    boxes_dog = [((4, 6), (20, 18)), ((20, 18), (4, 6)), ((4, 18), (20, 6)), ((20, 6), (4, 18))]
    boxes_boat = [((10, 2), (30, 20))] * 4
    shapes = [rect('a dog', *b) for b in boxes_dog] + [rect('a boat', *b) for b in boxes_boat]
    ht_fixtures._labelme(path, 'img1', shapes)  # pylint: disable=protected-access
    ht_fixtures._labelme(path, 'img2', [rect('sky', (0, 0), (40, 10))])  # pylint: disable=protected-access


class SyntheticCropsTinyTest(_ManualDirMixin, tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = SyntheticCrops
  EXPECTED_NAME = 'synthetic_crops'
  BUILDER_CONFIG_NAMES_TO_TEST = ['tiny']
  # 8/4/4 images; the two ambiguity splits have three examples (captions) per image.
  SPLITS = {'train': 8, 'validation': 4, 'test': 4, 'ambiguity': 12, 'ambiguity_validation': 12}
  # No manual_dir (nothing to download); EXAMPLE_DIR is an empty folder that DatasetBuilderTestCase
  # requires to exist (it is passed as the mocked download_dir).
