"""Tests of the Horanyi-PR and TextCrop TFDS builders (datasets/horanyi_pr, datasets/textcrop).

Fixtures are generated in tmp_path: tiny non-square JPEGs (W=40, H=24) plus JSON annotations.
"""

import importlib
import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from clipcrop_jax.data import features
from clipcrop_jax.data import formats as data_formats

REPO = pathlib.Path(__file__).resolve().parents[1]
DATASETS = REPO / 'datasets'
W, H = 40, 24  # Non-square so that swapped x/y shows up.


def _builder_cls(name: str, cls_name: str):
  # Imported the way `tfds build datasets/<name>` does it: package <name>, module <name>.
  if str(DATASETS) not in sys.path:
    sys.path.insert(0, str(DATASETS))
  with tfds.core.registered.skip_registration():
    module = importlib.import_module(f'{name}.{name}')
  return getattr(module, cls_name)


@pytest.fixture(scope='module')
def horanyi_cls():
  return _builder_cls('horanyi_pr', 'HoranyiPr')


@pytest.fixture(scope='module')
def textcrop_cls():
  return _builder_cls('textcrop', 'TextCrop')


def _jpeg(path: pathlib.Path, w: int = W, h: int = H, **save_kw) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, 'JPEG', **save_kw)


def _simple(manual: pathlib.Path, entries, images=('a.jpg', 'b.jpg')) -> pathlib.Path:
  (manual / 'images').mkdir(parents=True, exist_ok=True)
  for name in images:
    _jpeg(manual / 'images' / name)
  (manual / 'annotations.json').write_text(json.dumps(entries))
  return manual


def _rect(label, p0, p1, shape_type='rectangle'):
  return {
      'label': label,
      'points': [list(p0), list(p1)],
      'group_id': None,
      'shape_type': shape_type,
      'flags': {},
  }


def _labelme(
    manual: pathlib.Path,
    stem: str,
    shapes,
    *,
    folder='annotations',
    height=H,
    width=W,
    image_path=None,
    make_image=True,
) -> pathlib.Path:
  if make_image:
    _jpeg(manual / 'images' / f'{stem}.jpg')
  ann_dir = manual / folder
  ann_dir.mkdir(parents=True, exist_ok=True)
  if image_path is None:
    image_path = f'{stem}.jpg' if folder == 'images' else f'../images/{stem}.jpg'
  doc = {
      'version': '5.4.1',
      'flags': {},
      'shapes': shapes,
      'imagePath': image_path,
      'imageData': None,
      'imageHeight': height,
      'imageWidth': width,
  }
  (ann_dir / f'{stem}.json').write_text(json.dumps(doc))
  return manual


def _build(cls, manual: pathlib.Path, tmp_path: pathlib.Path, **kwargs):
  builder = cls(data_dir=str(tmp_path / 'data'), **kwargs)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  return builder, list(tfds.as_numpy(builder.as_dataset(split='test')))


def _box(example, i=0):
  return example[features.CROPS][features.CROP_BBOX][i]


# ---------------------------------------------------------------------------------------------
# Class names and metadata.


def test_names_do_not_collide_with_catalogue(horanyi_cls, textcrop_cls):
  assert horanyi_cls.name == 'horanyi_pr' and textcrop_cls.name == 'textcrop'
  catalogue = set(tfds.list_builders(with_community_datasets=False))
  assert not {'horanyi_pr', 'textcrop'} & catalogue
  for cls in (horanyi_cls, textcrop_cls):
    assert str(cls.VERSION) in cls.RELEASE_NOTES
    assert 'manual_dir' in cls.MANUAL_DOWNLOAD_INSTRUCTIONS


# ---------------------------------------------------------------------------------------------
# Horanyi-PR.


def test_horanyi_builds_known_box(horanyi_cls, tmp_path):
  manual = _simple(
      tmp_path / 'raw',
      [
          {'image': 'a.jpg', 'caption': 'a dog', 'boxes': [[4, 6, 20, 18], [0, 0, W, H]]},
          {'image': 'b.jpg', 'caption': 'a cat', 'boxes': [[10, 2, 30, 22]]},
          {'image': 'a.jpg', 'caption': 'the sky', 'boxes': [[0, 0, 40, 12]]},
      ],
  )
  builder, examples = _build(horanyi_cls, manual, tmp_path)
  assert list(builder.info.splits.keys()) == ['test']
  assert builder.info.splits['test'].num_examples == 3 == len(examples)
  ex = examples[0]
  assert ex[features.TEXT] == b'a dog'
  assert ex[features.FILENAME] == b'a.jpg'
  assert (ex[features.HEIGHT], ex[features.WIDTH]) == (H, W)
  assert ex[features.IMAGE].shape == (H, W, 3)
  # (ymin, xmin, ymax, xmax) normalised: y / H, x / W.
  np.testing.assert_allclose(_box(ex, 0), [6 / H, 4 / W, 18 / H, 20 / W], rtol=1e-6)
  np.testing.assert_allclose(_box(ex, 1), [0, 0, 1, 1])
  np.testing.assert_allclose(ex[features.CROPS][features.CROP_SCORE], [1.0, 1.0])
  assert [e[features.TEXT] for e in examples] == [b'a dog', b'a cat', b'the sky']
  assert builder.skip_report.counts == {}


def test_horanyi_clips_within_tolerance(horanyi_cls, tmp_path):
  manual = _simple(
      tmp_path / 'raw',
      [{'image': 'a.jpg', 'caption': 'x', 'boxes': [[-0.9, -1.0, W + 0.5, H + 1.0]]}],
  )
  _, (ex,) = _build(horanyi_cls, manual, tmp_path)
  np.testing.assert_allclose(_box(ex), [0, 0, 1, 1])


_A = 'a.jpg'
BAD_SIMPLE = {
    'missing_image': (
        {'image': 'nope.jpg', 'caption': 'x', 'boxes': [[1, 1, 5, 5]]},
        r'entry 1 \(nope\.jpg\).*not found',
        'missing_image',
    ),
    'missing_key': (
        {'image': _A, 'boxes': [[1, 1, 5, 5]]},
        r'entry 1: missing key.*caption',
        'malformed_entry',
    ),
    'wrong_count': (
        {'image': _A, 'caption': 'x', 'boxes': [[1, 1, 5]]},
        r'entry 1 \(a\.jpg\) box 0',
        'malformed_box',
    ),
    'non_numeric': (
        {'image': _A, 'caption': 'x', 'boxes': [[1, '1', 5, 5]]},
        r'entry 1 \(a\.jpg\) box 0.*not a finite number',
        'malformed_box',
    ),
    'inverted': (
        {'image': _A, 'caption': 'x', 'boxes': [[5, 1, 1, 5]]},
        r'entry 1 \(a\.jpg\) box 0.*x0 <= x1',
        'malformed_box',
    ),
    'out_of_bounds': (
        {'image': _A, 'caption': 'x', 'boxes': [[1, 1, W + 1.5, 5]]},
        r'entry 1 \(a\.jpg\) box 0.*outside the 40x24',
        'out_of_bounds_box',
    ),
    'out_of_bounds_y': (
        {'image': _A, 'caption': 'x', 'boxes': [[1, 1, 30, 30]]},  # 30 < W.
        r'entry 1 \(a\.jpg\) box 0.*outside',
        'out_of_bounds_box',
    ),
    'zero_area': (
        {'image': _A, 'caption': 'x', 'boxes': [[3, 1, 3, 5]]},
        r'entry 1 \(a\.jpg\) box 0.*zero area',
        'zero_area_box',
    ),
    'no_boxes': (
        {'image': _A, 'caption': 'x', 'boxes': []},
        r'entry 1 \(a\.jpg\).*non-empty',
        'malformed_entry',
    ),
}


@pytest.mark.parametrize('case', sorted(BAD_SIMPLE))
def test_horanyi_bad_data_raises_naming_file_and_index(horanyi_cls, tmp_path, case):
  bad, pattern, _ = BAD_SIMPLE[case]
  good = {'image': 'a.jpg', 'caption': 'ok', 'boxes': [[1, 1, 5, 5]]}
  manual = _simple(tmp_path / 'raw', [good, bad])
  with pytest.raises(features.BadDataError, match=r'annotations\.json ' + pattern):
    _build(horanyi_cls, manual, tmp_path, skip_bad_data=False)


def test_horanyi_unreadable_image(horanyi_cls, tmp_path):
  manual = _simple(
      tmp_path / 'raw',
      [
          {'image': 'a.jpg', 'caption': 'x', 'boxes': [[1, 1, 5, 5]]},
          {'image': 'b.jpg', 'caption': 'x', 'boxes': [[1, 1, 5, 5]]},
      ],
  )
  (manual / 'images' / 'b.jpg').write_bytes(b'not a jpeg')
  with pytest.raises(features.BadDataError, match=r'entry 1 \(b\.jpg\): cannot read image'):
    _build(horanyi_cls, manual, tmp_path)


def test_horanyi_skip_mode_counts(horanyi_cls, tmp_path, monkeypatch):
  entries = [{'image': 'a.jpg', 'caption': 'ok', 'boxes': [[1, 1, 5, 5]]}]
  entries += [bad for bad, _, _ in BAD_SIMPLE.values()]
  # One bad box next to a good one: only the bad box is dropped.
  entries.append({'image': 'b.jpg', 'caption': 'two', 'boxes': [[1, 1, 5, 5], [0, 0, 99, 5]]})
  manual = _simple(tmp_path / 'raw', entries)
  monkeypatch.setenv(data_formats.SKIP_ENV, '1')
  builder, examples = _build(horanyi_cls, manual, tmp_path)
  assert [e[features.TEXT] for e in examples] == [b'ok', b'two']
  assert len(examples[1][features.CROPS][features.CROP_SCORE]) == 1
  assert builder.skip_report.counts == {
      'missing_image': 1,
      'malformed_entry': 2,
      'malformed_box': 3,
      'out_of_bounds_box': 3,
      'zero_area_box': 1,
      'no_valid_boxes': 6,
  }
  assert 'skipped' in builder.skip_report.summary()


def test_horanyi_non_jpeg_image_is_reencoded(horanyi_cls, tmp_path):
  manual = _simple(
      tmp_path / 'raw', [{'image': 'g.png', 'caption': 'x', 'boxes': [[4, 6, 20, 18]]}], images=()
  )
  Image.new('L', (W, H), 128).save(manual / 'images' / 'g.png')
  _, (ex,) = _build(horanyi_cls, manual, tmp_path)
  assert ex[features.IMAGE].shape == (H, W, 3) and ex[features.FILENAME] == b'g.png'
  np.testing.assert_allclose(_box(ex), [6 / H, 4 / W, 18 / H, 20 / W], rtol=1e-6)


def test_skip_env_values(monkeypatch):
  for value, expected in [
      ('1', True),
      (' Yes ', True),
      ('on', True),
      ('TRUE', True),
      ('0', False),
      ('', False),
      ('off', False),
      ('No', False),
  ]:
    monkeypatch.setenv(data_formats.SKIP_ENV, value)
    assert data_formats.skip_bad_data_from_env() is expected, value
  monkeypatch.delenv(data_formats.SKIP_ENV)
  assert data_formats.skip_bad_data_from_env() is False
  for typo in ('maybe', 'ture', '2', 'y es'):
    monkeypatch.setenv(data_formats.SKIP_ENV, typo)
    with pytest.raises(ValueError, match=f"^CLIPCROP_SKIP_BAD_DATA='{typo}': expected") as e:
      data_formats.skip_bad_data_from_env()
    assert '\n' not in str(e.value)


def test_reference_builders_refuse_a_skip_env_typo(
    horanyi_cls, textcrop_cls, tmp_path, monkeypatch
):
  manual = _simple(tmp_path / 'raw', [{'image': 'a.jpg', 'caption': 'ok', 'boxes': [[1, 1, 5, 5]]}])
  monkeypatch.setenv(data_formats.SKIP_ENV, 'ture')
  for cls in (horanyi_cls, textcrop_cls):
    with pytest.raises(ValueError, match="CLIPCROP_SKIP_BAD_DATA='ture'"):
      _build(cls, manual, tmp_path / cls.__name__)
  # An explicit skip_bad_data does not read the variable.
  _, examples = _build(horanyi_cls, manual, tmp_path / 'explicit', skip_bad_data=False)
  assert [e[features.TEXT] for e in examples] == [b'ok']


def test_exif_orientation_applied(tmp_path):
  # Stored 40x24 with orientation 6 (rotate 90 CW on display): displayed 24 wide, 40 high.
  path = tmp_path / 'r.jpg'
  exif = Image.Exif()
  exif[0x0112] = 6
  _jpeg(path, exif=exif.tobytes())
  image = data_formats.load_image(path, 'test')
  assert (image.height, image.width) == (W, H)
  assert Image.open(io.BytesIO(image.jpeg)).size == (H, W)


# ---------------------------------------------------------------------------------------------
# TextCrop.


def _two_texts_four_boxes():
  # Corners in all four orders: (tl, br), (br, tl), (tr, bl), (bl, tr).
  return [
      _rect('a dog', (4, 6), (20, 18)),
      _rect('a boat', (30, 20), (10, 2)),
      _rect('a dog', (20, 18), (4, 6)),
      _rect('a boat', (10, 2), (30, 20)),
      _rect('a dog', (20, 6), (4, 18)),
      _rect('a boat', (30, 2), (10, 20)),
      _rect('a dog', (4, 18), (20, 6)),
      _rect('a boat', (10, 20), (30, 2)),
  ]


@pytest.mark.parametrize('folder', ['annotations', 'images'])
def test_textcrop_labelme_groups_by_text(textcrop_cls, tmp_path, folder):
  manual = _labelme(tmp_path / 'raw', 'img1', _two_texts_four_boxes(), folder=folder)
  builder, examples = _build(textcrop_cls, manual, tmp_path)
  assert builder.info.splits['test'].num_examples == 2
  assert [e[features.TEXT] for e in examples] == [b'a dog', b'a boat']
  for ex in examples:
    assert ex[features.FILENAME] == b'img1.jpg'
    assert (ex[features.HEIGHT], ex[features.WIDTH]) == (H, W)
    np.testing.assert_allclose(ex[features.CROPS][features.CROP_SCORE], [1.0] * 4)
  # Every corner order gives the same box.
  np.testing.assert_allclose(
      examples[0][features.CROPS][features.CROP_BBOX],
      [[6 / H, 4 / W, 18 / H, 20 / W]] * 4,
      rtol=1e-6,
  )
  np.testing.assert_allclose(
      examples[1][features.CROPS][features.CROP_BBOX],
      [[2 / H, 10 / W, 20 / H, 30 / W]] * 4,
      rtol=1e-6,
  )


def test_textcrop_several_images(textcrop_cls, tmp_path):
  manual = _labelme(tmp_path / 'raw', 'img1', _two_texts_four_boxes())
  _labelme(manual, 'img2', [_rect('sky', (0, 0), (40, 10))], image_path='C:\\x\\img2.jpg')
  _, examples = _build(textcrop_cls, manual, tmp_path)
  assert [(e[features.FILENAME], e[features.TEXT]) for e in examples] == [
      (b'img1.jpg', b'a dog'),
      (b'img1.jpg', b'a boat'),
      (b'img2.jpg', b'sky'),
  ]


def test_textcrop_simple_format_fallback(textcrop_cls, tmp_path):
  manual = _simple(
      tmp_path / 'raw',
      [
          {'image': 'a.jpg', 'caption': 'a dog', 'boxes': [[4, 6, 20, 18]] * 4},
          {'image': 'a.jpg', 'caption': 'a boat', 'boxes': [[10, 2, 30, 20]] * 4},
      ],
  )
  _, examples = _build(textcrop_cls, manual, tmp_path)
  assert [e[features.TEXT] for e in examples] == [b'a dog', b'a boat']
  np.testing.assert_allclose(_box(examples[0]), [6 / H, 4 / W, 18 / H, 20 / W], rtol=1e-6)


def test_textcrop_no_annotations(textcrop_cls, tmp_path):
  _jpeg(tmp_path / 'raw' / 'images' / 'a.jpg')  # Images but no annotations.
  with pytest.raises(features.BadDataError, match='no labelme'):
    _build(textcrop_cls, tmp_path / 'raw', tmp_path)


BAD_LABELME = {
    'missing_image': (dict(image_path='../images/gone.jpg'), 'not found', 'missing_image'),
    'size_mismatch': (
        dict(height=W, width=H),
        r'imageHeight x imageWidth = 40 x 24',
        'size_mismatch',
    ),
    'polygon': (
        dict(shapes=[_rect('t', (1, 1), (5, 5), 'polygon')]),
        r'shape 0.*polygon',
        'non_rectangle_shape',
    ),
    'three_points': (
        dict(
            shapes=[{'label': 't', 'points': [[1, 1], [5, 5], [6, 6]], 'shape_type': 'rectangle'}]
        ),
        r'shape 0.*2 points',
        'malformed_box',
    ),
    'non_numeric': (
        dict(shapes=[_rect('t', ('1', 1), (5, 5))]),
        r'shape 0.*finite number',
        'malformed_box',
    ),
    'out_of_bounds': (
        dict(shapes=[_rect('t', (1, 1), (5, H + 2))]),
        r'shape 0.*outside',
        'out_of_bounds_box',
    ),
    'zero_area': (
        dict(shapes=[_rect('t', (1, 3), (5, 3))]),
        r'shape 0.*zero area',
        'zero_area_box',
    ),
    'empty_label': (dict(shapes=[_rect(' ', (1, 1), (5, 5))]), r'shape 0.*label', 'malformed_box'),
}


@pytest.mark.parametrize('case', sorted(BAD_LABELME))
def test_textcrop_bad_data_raises_naming_file(textcrop_cls, tmp_path, case):
  kwargs, pattern, _ = BAD_LABELME[case]
  kwargs = dict(kwargs)
  shapes = kwargs.pop('shapes', [_rect('t', (1, 1), (5, 5))])
  manual = _labelme(tmp_path / 'raw', 'good', [_rect('t', (1, 1), (5, 5))])
  _labelme(manual, 'bad', shapes, **kwargs)
  with pytest.raises(features.BadDataError, match=r'bad\.json.*' + pattern):
    _build(textcrop_cls, manual, tmp_path)


def test_textcrop_empty_shapes_raises(textcrop_cls, tmp_path):
  manual = _labelme(tmp_path / 'raw', 'empty', [])
  with pytest.raises(features.BadDataError, match=r'empty\.json: no valid rectangle shape'):
    _build(textcrop_cls, manual, tmp_path)


def test_textcrop_malformed_files(textcrop_cls, tmp_path):
  manual = _labelme(tmp_path / 'raw', 'good', [_rect('t', (1, 1), (5, 5))])
  (manual / 'annotations' / 'broken.json').write_text('{"imagePath": ')
  with pytest.raises(features.BadDataError, match=r'broken\.json: not a readable JSON'):
    _build(textcrop_cls, manual, tmp_path)
  (manual / 'annotations' / 'broken.json').write_text('{"imagePath": "good.jpg"}')
  with pytest.raises(features.BadDataError, match=r'broken\.json: missing labelme key'):
    _build(textcrop_cls, manual, tmp_path / 'second')


def test_textcrop_skip_mode_counts(textcrop_cls, tmp_path):
  manual = _labelme(tmp_path / 'raw', 'a_good', [_rect('t', (1, 1), (5, 5))])
  for case, (kwargs, _, _) in BAD_LABELME.items():
    kwargs = dict(kwargs)
    _labelme(manual, f'bad_{case}', kwargs.pop('shapes', [_rect('t', (1, 1), (5, 5))]), **kwargs)
  # A bad shape next to good ones only drops that shape.
  _labelme(
      manual,
      'z_mixed',
      [
          _rect('u', (1, 1), (5, 5)),
          _rect('u', (1, 1), (99, 5)),
          _rect('v', (0, 0), (3, 3), 'circle'),
      ],
  )
  builder, examples = _build(textcrop_cls, manual, tmp_path, skip_bad_data=True)
  assert [(e[features.FILENAME], e[features.TEXT]) for e in examples] == [
      (b'a_good.jpg', b't'),
      (b'z_mixed.jpg', b'u'),
  ]
  assert len(examples[1][features.CROPS][features.CROP_SCORE]) == 1
  assert builder.skip_report.counts == {
      'missing_image': 1,
      'size_mismatch': 1,
      'non_rectangle_shape': 2,
      'malformed_box': 3,
      'out_of_bounds_box': 2,
      'zero_area_box': 1,
      'no_valid_boxes': 7,
  }


# ---------------------------------------------------------------------------------------------
# The real `tfds build` command line.


def test_tfds_build_cli_textcrop(tmp_path):
  manual = _labelme(tmp_path / 'raw', 'img1', _two_texts_four_boxes())
  data_dir = tmp_path / 'data'
  env = dict(os.environ, CUDA_VISIBLE_DEVICES='', TF_CPP_MIN_LOG_LEVEL='2')
  env.pop(data_formats.SKIP_ENV, None)
  args = [str(DATASETS / 'textcrop'), f'--manual_dir={manual}', f'--data_dir={data_dir}']
  run = lambda cmd: subprocess.run(
      cmd + args,
      cwd=str(tmp_path),
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  proc = run([str(pathlib.Path(sys.executable).parent / 'tfds'), 'build'])
  # tensorflow-datasets 4.9.x's console script imports apache_beam and mlcroissant at start-up
  # (the tfds-cli extra); without either, the README's equivalent build command.
  missing = ("No module named 'apache_beam'", "No module named 'mlcroissant'")
  if proc.returncode != 0 and any(m in proc.stderr for m in missing):
    proc = run([sys.executable, '-m', 'clipcrop_jax.build_dataset'])  # same build command
  assert proc.returncode == 0, proc.stderr[-3000:]
  builder = tfds.builder_from_directory(str(data_dir / 'textcrop' / '1.0.0'))
  assert builder.info.splits['test'].num_examples == 2
  examples = list(tfds.as_numpy(builder.as_dataset(split='test')))
  assert [e[features.TEXT] for e in examples] == [b'a dog', b'a boat']
