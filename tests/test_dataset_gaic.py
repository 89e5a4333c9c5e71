"""Tests of the GAIC TFDS builder (datasets/gaic/gaic.py) on tiny fixtures in the real layouts."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

tf = pytest.importorskip('tensorflow')
tfds = pytest.importorskip('tensorflow_datasets')
Image = pytest.importorskip('PIL.Image')

from clipcrop_jax.data import features as F  # pylint: disable=g-import-not-at-top
from clipcrop_jax.data import formats as data_formats  # pylint: disable=g-import-not-at-top

REPO = pathlib.Path(__file__).resolve().parents[1]
DATASETS_DIR = REPO / 'datasets'


def _import_gaic():
  # Same module name as `tfds build datasets/gaic` uses; not registered in TFDS's registry so
  # that other imports of the file cannot collide.
  if str(DATASETS_DIR) not in sys.path:
    sys.path.insert(0, str(DATASETS_DIR))
  with tfds.core.registered.skip_registration():
    import gaic.gaic as module  # pylint: disable=g-import-not-at-top
  return module


gaic = _import_gaic()

# (H, W) per image; non-square, both orientations, so an x/y mix-up fails.
SIZES = {
    '100001': (40, 64),
    '100002': (48, 32),
    '100003': (30, 50),
    '200001': (40, 64),
    '200002': (36, 54),
    '300001': (40, 64),
    '300002': (60, 40),
}
JOURNAL_SPLITS = {
    'train': ['100001', '100002', '100003'],
    'val': ['200001', '200002'],
    'test': ['300001', '300002'],
}
# y1 x1 y2 x2 score, for a 40x64 image: a known box, a -2 crop, a second kept crop; extra
# whitespace and a blank line.
LINES_40x64 = '  4 8   20 48 3.75\n\n0 0 40 64 -2\n 10 16 40 64  2.5 \n'


def _lines(stem):
  h, w = SIZES[stem]
  if (h, w) == (40, 64):
    return LINES_40x64
  return f'0 0 {h} {w} 4.0\n2 3 {h - 2} {w - 3} 1.5\n5 5 {h} {w} -2\n'


def _write_jpeg(path, h, w, seed=0):
  path.parent.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, 'JPEG')


def _captions(splits):
  return {
      s: {f'{stem}.jpg': f'caption of {stem} ({s})' for stem in stems}
      for s, stems in splits.items()
  }


def _write_captions(manual, splits):
  text = manual / 'GAIC-Text-Annotations'
  text.mkdir(parents=True)
  caps = _captions(splits)
  for split, name in (('train', 'train.json'), ('val', 'valid.json'), ('test', 'test.json')):
    (text / name).write_text(json.dumps(caps.get(split, {})))


def make_journal(manual, top='GAIC_journal', captions=True):
  root = manual / top if top else manual
  for split, stems in JOURNAL_SPLITS.items():
    for i, stem in enumerate(stems):
      _write_jpeg(root / 'images' / split / f'{stem}.jpg', *SIZES[stem], seed=i)
      ann = root / 'annotations' / split / f'{stem}.txt'
      ann.parent.mkdir(parents=True, exist_ok=True)
      ann.write_text(_lines(stem))
  if captions:
    _write_captions(manual, JOURNAL_SPLITS)
  return root


CONF_SPLITS = {'train': ['100001', '100002'], 'test': ['200001', '300002']}


def make_conference(manual, captions=True):
  root = manual  # No top folder: the layout sits directly in manual_dir.
  for split, stems in CONF_SPLITS.items():
    for i, stem in enumerate(stems):
      _write_jpeg(root / 'images' / split / f'{stem}.jpg', *SIZES[stem], seed=i)
      ann = root / 'annotations' / f'{stem}.txt'
      ann.parent.mkdir(parents=True, exist_ok=True)
      ann.write_text(_lines(stem))
  if captions:  # ClipCrop's captions follow the journal split (200001 is in valid.json).
    _write_captions(manual, JOURNAL_SPLITS)
  return root


def build(tmp_path, manual, config='journal', **kwargs):
  builder = gaic.Gaic(data_dir=tmp_path / 'data', config=config, **kwargs)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual))
  )
  return builder


def examples(builder, split):
  return {
      ex['image/id'].decode(): ex
      for ex in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))
  }


@pytest.fixture(scope='module')
def journal(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('journal')
  make_journal(tmp / 'raw')
  return build(tmp, tmp / 'raw')


def test_names_and_features():
  assert gaic.Gaic.name == 'gaic'
  assert [c.name for c in gaic.Gaic.BUILDER_CONFIGS] == ['journal', 'conference']
  assert str(gaic.Gaic.VERSION) in gaic.Gaic.RELEASE_NOTES
  instructions = gaic.Gaic.MANUAL_DOWNLOAD_INSTRUCTIONS
  for needle in (
      '1tDdQqDe8dMoMIVi9Z0WWI5vtRViy01nR',
      'zzh-tech/ClipCrop',
      'valid.json',
      'annotations/{train,val,test}',
  ):
    assert needle in instructions
  feats = gaic.Gaic(data_dir='/nonexistent-unused', config='journal').info.features
  for key in (F.IMAGE, F.FILENAME, F.HEIGHT, F.WIDTH, F.TEXT, F.CROPS, 'image/id', 'split_name'):
    assert key in feats


def test_journal_split_counts(journal):
  splits = journal.info.splits
  assert {s: splits[s].num_examples for s in splits} == {'train': 3, 'val': 2, 'test': 2}


def test_journal_known_box_row_first_and_scores(journal):
  ex = examples(journal, 'train')['100001']
  h, w = 40, 64
  assert (ex[F.HEIGHT], ex[F.WIDTH]) == (h, w)
  assert ex[F.IMAGE].shape == (h, w, 3)
  assert ex[F.FILENAME] == b'100001.jpg'
  assert ex['split_name'] == b'train'
  bbox, score = ex[F.CROPS][F.CROP_BBOX], ex[F.CROPS][F.CROP_SCORE]
  # Line "4 8 20 48 3.75" = y1 x1 y2 x2: bbox (ymin, xmin, ymax, xmax) = (4/H, 8/W, 20/H, 48/W).
  # The -2 crop is dropped; the other scores are kept in file order.
  assert bbox.shape == (2, 4)
  np.testing.assert_allclose(bbox[0], [4 / h, 8 / w, 20 / h, 48 / w], rtol=1e-6)
  np.testing.assert_allclose(bbox[1], [10 / h, 16 / w, 1.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(score, [3.75, 2.5])
  assert score.dtype == np.float32


def test_journal_portrait_image(journal):
  ex = examples(journal, 'train')['100002']
  assert (ex[F.HEIGHT], ex[F.WIDTH]) == (48, 32)
  assert ex[F.IMAGE].shape == (48, 32, 3)
  np.testing.assert_allclose(
      ex[F.CROPS][F.CROP_BBOX], [[0, 0, 1, 1], [2 / 48, 3 / 32, 46 / 48, 29 / 32]], rtol=1e-6
  )
  np.testing.assert_allclose(ex[F.CROPS][F.CROP_SCORE], [4.0, 1.5])


def test_journal_captions_per_split_valid_is_val(journal):
  for split, stems in JOURNAL_SPLITS.items():
    exs = examples(journal, split)
    assert sorted(exs) == sorted(stems)
    for stem, ex in exs.items():
      # The val captions come from valid.json (written with split name 'val').
      assert ex[F.TEXT].decode() == f'caption of {stem} ({split})'
      assert ex['split_name'].decode() == split


def test_without_captions_text_is_empty(tmp_path):
  make_journal(tmp_path / 'raw', top=None, captions=False)  # Also: no top folder.
  builder = build(tmp_path, tmp_path / 'raw')
  for split in ('train', 'val', 'test'):
    assert all(ex[F.TEXT] == b'' for ex in examples(builder, split).values())


def test_conference_config(tmp_path):
  make_conference(tmp_path / 'raw')
  builder = build(tmp_path, tmp_path / 'raw', config='conference')
  splits = builder.info.splits
  assert {s: splits[s].num_examples for s in splits} == {'train': 2, 'test': 2}
  test = examples(builder, 'test')
  # Conference test images carry the caption from journal valid.json or test.json.
  assert test['200001'][F.TEXT] == b'caption of 200001 (val)'
  assert test['300002'][F.TEXT] == b'caption of 300002 (test)'
  ex = examples(builder, 'train')['100001']
  np.testing.assert_allclose(
      ex[F.CROPS][F.CROP_BBOX][0], [4 / 40, 8 / 64, 20 / 40, 48 / 64], rtol=1e-6
  )


def test_journal_config_rejects_conference_layout(tmp_path):
  make_conference(tmp_path / 'raw', captions=False)
  with pytest.raises(F.BadDataError, match='journal layout'):
    build(tmp_path, tmp_path / 'raw', config='journal')


# --- annotation lines ------------------------------------------------------------------------


def _parse(tmp_path, text, h=40, w=64, skip=False):
  path = tmp_path / '123.txt'
  path.write_text(text)
  report = F.SkipReport()
  return gaic.parse_annotation_file(os.fspath(path), h, w, report, skip), report


@pytest.mark.parametrize(
    'bad_line, reason',
    [
        ('4 8 20 48', 'expected 5 fields'),
        ('4 8 20 48 3.0 1.0', 'expected 5 fields'),
        ('4 8 20 abc 3.0', 'non-numeric'),
        ('4 8 20 48 nan', 'non-numeric'),
        ('4 8 42 48 3.0', 'outside'),  # y2 = H + 2 (x-limit 64 would have accepted it).
        ('4 8 20 66 3.0', 'outside'),  # x2 = W + 2.
        ('-2 8 20 48 3.0', 'outside'),
        ('4 8 4 48 3.0', 'empty box'),
        ('4 48 20 8 3.0', 'empty box'),
        ('4 8 20 48 99', r'score 99 is outside \[1, 5\]'),  # would train as (99 - 1) / 4 = 24.5
        ('4 8 20 48 0.5', r'score 0.5 is outside \[1, 5\]'),
        ('4 8 20 48 5.01', r'score 5.01 is outside \[1, 5\]'),
        ('4 8 20 48 -1', r'score -1 is outside \[1, 5\]'),  # only -2 means "ignore"
    ],
)
def test_bad_line_names_file_and_line(tmp_path, bad_line, reason):
  with pytest.raises(F.BadDataError, match=reason) as e:
    _parse(tmp_path, f'0 0 40 64 3.0\n\n{bad_line}\n')
  assert '123.txt:3' in str(e.value)


def test_box_within_tolerance_is_clipped(tmp_path):
  crops, _ = _parse(tmp_path, '-1 0 41 65 3.0\n0.5 0 40 64.5 2.0\n')
  np.testing.assert_allclose(crops[0][F.CROP_BBOX], [0, 0, 1, 1])
  np.testing.assert_allclose(crops[1][F.CROP_BBOX], [0.5 / 40, 0, 1, 1])


def test_bad_lines_skipped_and_counted(tmp_path):
  crops, report = _parse(
      tmp_path,
      '4 8 20 48 3.0\n1 2 3\n4 8 90 48 3.0\n4 8 4 48 3.0\nx 1 2 3 4\n0 0 40 64 -2\n',
      skip=True,
  )
  assert len(crops) == 1
  assert report.counts == {'malformed_line': 2, 'out_of_bounds': 1, 'empty_box': 1}


def test_score_range_is_closed_and_minus_two_ignored(tmp_path):
  crops, report = _parse(
      tmp_path, '0 0 40 64 1\n0 0 40 64 5\n0 0 40 64 -2\n0 0 40 64 7\n', skip=True
  )
  np.testing.assert_allclose([c[F.CROP_SCORE] for c in crops], [1.0, 5.0])
  assert report.counts == {'score_out_of_range': 1}
  assert '123.txt:4: score 7 is outside [1, 5]' in report.examples[0]


# --- bad data end to end ---------------------------------------------------------------------


def _break(root, manual, kind):
  if kind == 'malformed_line':
    (root / 'annotations/train/100002.txt').write_text('0 0 48 32 4.0\n0 0 48 3.0\n')
    return '100002.txt:2'
  if kind == 'missing_image':
    os.remove(root / 'images/val/200002.jpg')
    return '200002.txt'
  if kind == 'unreadable_image':
    (root / 'images/test/300002.jpg').write_bytes(b'not a jpeg at all')
    return '300002.jpg'
  if kind == 'missing_annotation':
    os.remove(root / 'annotations/train/100003.txt')
    return '100003.jpg'
  if kind == 'caption_without_image':
    path = manual / 'GAIC-Text-Annotations/valid.json'
    caps = json.loads(path.read_text())
    caps['999999.jpg'] = 'an orphan caption'
    path.write_text(json.dumps(caps))
    return "valid.json: caption key '999999.jpg'"
  raise AssertionError(kind)


BAD_KINDS = [
    'malformed_line',
    'missing_image',
    'unreadable_image',
    'missing_annotation',
    'caption_without_image',
]


@pytest.mark.parametrize('kind', BAD_KINDS)
def test_bad_data_raises_naming_the_file(tmp_path, kind):
  root = make_journal(tmp_path / 'raw')
  needle = _break(root, tmp_path / 'raw', kind)
  with pytest.raises(F.BadDataError) as e:
    build(tmp_path, tmp_path / 'raw')
  assert needle in str(e.value)


def test_skip_mode_counts(tmp_path):
  root = make_journal(tmp_path / 'raw')
  for kind in BAD_KINDS:
    _break(root, tmp_path / 'raw', kind)
  builder = build(tmp_path, tmp_path / 'raw', skip_bad_data=True)
  splits = builder.info.splits
  # train loses 100003 (no annotation); 100002 keeps its good line. test loses 300002.
  assert {s: splits[s].num_examples for s in splits} == {'train': 2, 'val': 1, 'test': 1}
  reports = builder.skip_reports
  assert reports['train'].counts == {'malformed_line': 1, 'missing_annotation': 1}
  # 200002.jpg's own caption is orphaned too.
  assert reports['val'].counts == {'missing_image': 1, 'caption_without_image': 2}
  assert reports['test'].counts == {'unreadable_image': 1}
  assert 'skipped 1 (unreadable_image)' == reports['test'].summary()
  assert len(examples(builder, 'train')['100002'][F.CROPS][F.CROP_SCORE]) == 1


# --- one stem, one image: annotations are matched unambiguously ------------------------------


def test_image_stem_clash_names_both_files(tmp_path):
  root = make_journal(tmp_path / 'raw')
  # x.jpg and x.png: which one does x.txt annotate? Before, the last one silently won.
  _write_jpeg(root / 'images/train/100001.png', 64, 40)
  with pytest.raises(F.BadDataError, match='share the stem') as e:
    build(tmp_path, tmp_path / 'raw')
  assert '100001.jpg and 100001.png' in str(e.value)


def test_stem_clashes_skipped_and_counted(tmp_path):
  root = make_journal(tmp_path / 'raw')
  _write_jpeg(root / 'images/train/100001.png', 64, 40)
  (root / 'annotations/val/200002.TXT').write_text('0 0 36 54 2.0\n')  # beside 200002.txt
  builder = build(tmp_path, tmp_path / 'raw', skip_bad_data=True)
  assert builder.skip_reports['train'].counts == {'ambiguous_image': 1}
  assert builder.skip_reports['val'].counts == {'ambiguous_annotation': 1}
  assert builder.skip_reports['test'].counts == {}
  assert sorted(examples(builder, 'train')) == ['100002', '100003']
  assert sorted(examples(builder, 'val')) == ['200001']


def test_annotation_stem_clash_raises(tmp_path):
  root = make_journal(tmp_path / 'raw')
  (root / 'annotations/val/200002.TXT').write_text('0 0 36 54 2.0\n')
  with pytest.raises(F.BadDataError, match='two annotation files') as e:
    build(tmp_path, tmp_path / 'raw')
  assert '200002.TXT' in str(e.value) and '200002.txt' in str(e.value)


def test_conference_stem_in_two_splits_is_ambiguous(tmp_path):
  root = make_conference(tmp_path / 'raw', captions=False)
  # The flat annotations/100001.txt would annotate both images.
  _write_jpeg(root / 'images/test/100001.jpg', 40, 64)
  with pytest.raises(F.BadDataError, match='matches .*train/100001.jpg and .*test/100001.jpg'):
    build(tmp_path, tmp_path / 'raw', config='conference')
  builder = build(tmp_path / 'skip', tmp_path / 'raw', config='conference', skip_bad_data=True)
  assert builder.skip_reports['train'].counts == {'ambiguous_image': 1}
  assert builder.skip_reports['test'].counts == {'ambiguous_image': 1}
  assert sorted(examples(builder, 'train')) == ['100002']
  assert sorted(examples(builder, 'test')) == ['200001', '300002']


def _gaic_skip(**kwargs):
  return gaic.Gaic(data_dir='/nonexistent-unused', config='journal', **kwargs).skip_bad_data


def test_skip_mode_from_env(monkeypatch):
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
    assert _gaic_skip() is expected, value
  monkeypatch.delenv(data_formats.SKIP_ENV)
  assert _gaic_skip() is False
  assert _gaic_skip(skip_bad_data=True) is True


def test_skip_env_typo_is_a_one_line_error(monkeypatch):
  # A typo used to read as False (raise on bad data) without a word; now it is refused.
  monkeypatch.setenv(data_formats.SKIP_ENV, 'ture')
  with pytest.raises(ValueError, match=r"^CLIPCROP_SKIP_BAD_DATA='ture': expected one of") as e:
    _gaic_skip()
  assert '\n' not in str(e.value)
  assert _gaic_skip(skip_bad_data=False) is False  # an explicit value does not read the variable


# --- the real CLI ----------------------------------------------------------------------------


def _run_build(cmd, tmp_path, data_dir, extra_env=None):
  env = dict(os.environ, CUDA_VISIBLE_DEVICES='', TF_CPP_MIN_LOG_LEVEL='2')
  env.pop(data_formats.SKIP_ENV, None)
  env.update(extra_env or {})
  return subprocess.run(
      cmd
      + [
          'datasets/gaic',
          '--config',
          'journal',
          f'--manual_dir={tmp_path / "raw"}',
          f'--data_dir={data_dir}',
      ],
      cwd=REPO,
      env=env,
      check=True,
      capture_output=True,
      text=True,
      timeout=300,
  )


def _check_built(data_dir, counts):
  builder = tfds.builder_from_directory(os.fspath(data_dir / 'gaic/journal/1.0.0'))
  splits = builder.info.splits
  assert {s: splits[s].num_examples for s in splits} == counts
  ex = examples(builder, 'val')['200001']
  assert ex[F.TEXT] == b'caption of 200001 (val)'
  np.testing.assert_allclose(
      ex[F.CROPS][F.CROP_BBOX][0], [4 / 40, 8 / 64, 20 / 40, 48 / 64], rtol=1e-6
  )


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec('apache_beam') is None
    or importlib.util.find_spec('mlcroissant') is None,
    reason='the `tfds` CLI of tensorflow-datasets 4.9.x imports apache_beam and mlcroissant '
    'at start-up; `python datasets/gaic/gaic.py` is the same build command without them',
)
def test_tfds_build_cli(tmp_path):
  make_journal(tmp_path / 'raw', top='GAIC')
  tfds_bin = pathlib.Path(sys.executable).parent / 'tfds'
  cmd = (
      [os.fspath(tfds_bin)]
      if tfds_bin.exists()
      else [sys.executable, '-m', 'tensorflow_datasets.scripts.cli.main']
  )
  _run_build(cmd + ['build'], tmp_path, tmp_path / 'data')
  _check_built(tmp_path / 'data', {'train': 3, 'val': 2, 'test': 2})


def test_build_command_errors_are_one_line(tmp_path):
  """Bad data: `error: <file:line: why>`, exit 1; a missing --manual_dir: exit 2; no traceback."""
  root = make_journal(tmp_path / 'raw')
  (root / 'annotations/train/100002.txt').write_text('0 0 48 32 4.0\n0 0 48 32 99\n')
  env = dict(os.environ, CUDA_VISIBLE_DEVICES='', TF_CPP_MIN_LOG_LEVEL='2')
  env.pop(data_formats.SKIP_ENV, None)
  cmd = [
      sys.executable,
      '-m',
      'clipcrop_jax.build_dataset',
      'datasets/gaic',
      '--config',
      'journal',
      f'--data_dir={tmp_path / "data"}',
  ]
  bad = subprocess.run(
      cmd + [f'--manual_dir={tmp_path / "raw"}'],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert bad.returncode == 1, bad.stderr[-3000:]
  assert 'Traceback' not in bad.stderr
  last = bad.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and '100002.txt:2: score 99 is outside [1, 5]' in last
  missing = subprocess.run(
      cmd + [f'--manual_dir={tmp_path / "nope"}'],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert missing.returncode == 2 and 'Traceback' not in missing.stderr
  assert missing.stderr.strip().splitlines()[-1] == (
      f'error: --manual_dir={tmp_path / "nope"}: no such folder (see the dataset README for its '
      'raw files)'
  )
  typo = subprocess.run(
      cmd + [f'--manual_dir={tmp_path / "raw"}'],
      cwd=REPO,
      env=dict(env, **{data_formats.SKIP_ENV: 'ture'}),
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert typo.returncode == 2 and 'Traceback' not in typo.stderr, typo.stderr[-3000:]
  assert (
      typo.stderr.strip()
      .splitlines()[-1]
      .startswith("error: CLIPCROP_SKIP_BAD_DATA='ture': expected one of")
  )


@pytest.mark.slow
def test_build_script_runs_tfds_build_command(tmp_path):
  """`python datasets/gaic/gaic.py ARGS` = TFDS's `build` command (`tfds build ARGS`)."""
  root = make_journal(tmp_path / 'raw', top='GAIC')
  cmd = [sys.executable, 'datasets/gaic/gaic.py']
  _run_build(cmd, tmp_path, tmp_path / 'data')
  _check_built(tmp_path / 'data', {'train': 3, 'val': 2, 'test': 2})
  # Skip mode from the environment variable.
  (root / 'images/test/300002.jpg').write_bytes(b'broken')
  with pytest.raises(subprocess.CalledProcessError) as e:
    _run_build(cmd, tmp_path, tmp_path / 'data_bad')
  assert '300002.jpg: unreadable image' in e.value.stderr
  proc = _run_build(cmd, tmp_path, tmp_path / 'data_skip', {data_formats.SKIP_ENV: '1'})
  assert 'skipped 1 (unreadable_image)' in proc.stderr
  _check_built(tmp_path / 'data_skip', {'train': 3, 'val': 2, 'test': 1})
