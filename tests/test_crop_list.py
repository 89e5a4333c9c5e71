"""Cropping a list of images, resumably (`python -m clipcrop_jax.crop --image-list`).

List parsing, the run log (torn lines, unfinished images, the settings that refuse another run),
the removed multi-process flags (they point to the Beam job); and a real process on ~40 tiny
images, SIGKILLed mid-way and rerun, whose result equals an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from PIL import Image

from clipcrop_jax import crop as crop_cli
from clipcrop_jax import crop_run_log
from clipcrop_jax import cropper as cropper_lib
from clipcrop_jax import keywords
from clipcrop_jax.owlvit import fileio

REPO = pathlib.Path(__file__).resolve().parents[1]
TEXT = 'a red square'


@pytest.fixture(scope='module')
def cropper():
  """The cropper `--random-init tiny --keyword-pipeline rules` builds (seed 0)."""
  return cropper_lib.ClipCropper.init_random('tiny', keyword_pipeline=keywords.RULES)


@pytest.fixture
def cli(monkeypatch, cropper):
  """The crop CLI on the shared tiny cropper (`--random-init tiny` as the subprocesses)."""
  monkeypatch.setattr(
      cropper_lib.ClipCropper, 'init_random', classmethod(lambda cls, *a, **kw: cropper)
  )

  def run(*argv):
    return crop_cli.main(
        ['--random-init', 'tiny', '--keyword-pipeline', 'rules', '--text', TEXT, *map(str, argv)]
    )

  return run


def _photos(folder: pathlib.Path, n: int, corrupt=()) -> list[pathlib.Path]:
  """`n` small pictures (PNG / JPEG, sizes vary; numbers in `corrupt` are broken files) in two
  sub-folders, with repeated stems so that output names depend on the whole list."""
  rng = np.random.default_rng(0)
  paths = []
  for i in range(n):
    path = folder / ('a' if i % 2 else 'b') / f'{i // 2}.{"jpg" if i % 3 else "png"}'
    path.parent.mkdir(parents=True, exist_ok=True)
    if i in corrupt:
      path.write_bytes(b'\xff\xd8\xff\xe0 not an image')
    else:
      h, w = int(rng.integers(24, 72)), int(rng.integers(24, 72))
      image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
      image[h // 4 : h // 2, w // 4 : w // 2] = (220, 30, 40)
      Image.fromarray(image).save(path)
    paths.append(path)
  return paths


def _list_file(path: pathlib.Path, images) -> pathlib.Path:
  lines = ['# a collection', '']
  lines += [os.path.relpath(p, path.parent) for p in images]
  path.write_text('\n'.join(lines) + '\n')
  return path


def _summary(out: pathlib.Path) -> dict:
  return json.loads((out / crop_cli.SUMMARY_FILE).read_text())


# ---------------------------------------------------------------- the list and its split


def test_list_file_comments_relative_paths_and_duplicates(tmp_path):
  images = _photos(tmp_path / 'photos', 3)
  lists = tmp_path / 'lists'
  lists.mkdir()
  listed = [
      '# header',
      '',
      f'../photos/{images[1].relative_to(tmp_path / "photos")}',
      '   ',
      str(images[0]),
      '  # indented comment',
      'missing.jpg',
  ]
  (lists / 'l.txt').write_text('\n'.join(listed))
  paths = crop_cli.read_image_list(str(lists / 'l.txt'))
  assert paths == [images[1], images[0], lists / 'missing.jpg']  # list order, absolute
  (lists / 'dup.txt').write_text(
      f'{images[0]}\n# x\n../photos/b/../{images[0].parent.name}/' f'{images[0].name}\n'
  )
  with pytest.raises(ValueError, match=r'dup\.txt:3: .* is listed twice \(first on line 1\)'):
    crop_cli.read_image_list(str(lists / 'dup.txt'))
  (lists / 'empty.txt').write_text('# nothing\n\n')
  with pytest.raises(ValueError, match='lists no image'):
    crop_cli.read_image_list(str(lists / 'empty.txt'))
  with pytest.raises(ValueError, match='no such file'):
    crop_cli.read_image_list(str(lists / 'nope.txt'))


def test_glob_is_recursive_and_sorted(tmp_path):
  images = _photos(tmp_path / 'photos', 6)
  assert crop_cli.read_image_list(str(tmp_path / 'photos' / '**' / '*.jpg')) == sorted(
      p for p in images if p.suffix == '.jpg'
  )
  assert crop_cli.read_image_list(str(tmp_path / 'photos' / '*' / '*')) == sorted(images)
  with pytest.raises(ValueError, match='no files match'):
    crop_cli.read_image_list(str(tmp_path / '*.webp'))


# ---------------------------------------------------------------- the log, resuming


def test_torn_line_and_unfinished_image_are_redone(tmp_path):
  out = tmp_path / 'out'
  out.mkdir()
  log_path = out / crop_cli.LOG_FILE
  done = {'index': 0, 'image': '/p/a.jpg', 'name': 'a', 'error': 'corrupt'}
  log_path.write_text(
      json.dumps(done)
      + '\n'
      + json.dumps({'index': 2, 'image': '/p/c.jpg', 'writing': ['c_crop0.jpg', 'c_overlay.png']})
      + '\n'
      + '{"index": 4, "image": "/p/e.jpg", "na'
  )  # SIGKILL mid-line
  (out / 'c_crop0.jpg').write_bytes(b'partial')
  (out / f'{fileio.TMP_PREFIX}c_overlay.png.x1y2').write_bytes(b'half')
  (out / 'other_crop0.jpg').write_bytes(b'not announced')
  records = crop_run_log.read_jsonl(log_path)
  assert crop_run_log.resume(records, out) == {0: done}
  assert sorted(p.name for p in out.iterdir()) == [log_path.name, 'other_crop0.jpg']
  log = crop_run_log.RunLog(log_path, append=True)
  log.write({'index': 2, 'image': '/p/c.jpg', 'name': 'c', 'error': 'again'})
  log.close()
  text = log_path.read_text().splitlines()
  assert text[2] == '{"index": 4, "image": "/p/e.jpg", "na' and json.loads(text[3])['index'] == 2
  # One process per run: a second writer is refused while the first holds the log.
  first = crop_run_log.RunLog(log_path, append=True)
  with pytest.raises(ValueError, match='another process is writing this run'):
    crop_run_log.RunLog(log_path, append=True)
  first.close()


def test_other_settings_are_refused_and_a_rerun_does_nothing_twice(cli, tmp_path, capsys):
  images = _photos(tmp_path / 'photos', 5, corrupt={3})
  listed = _list_file(tmp_path / 'list.txt', images)
  out = tmp_path / 'out'
  assert cli('--image-list', listed, '--out', out) == 1  # one corrupt file
  summary = _summary(out)
  assert [r['index'] for r in summary['results']] == [0, 1, 2, 4]
  assert [f['index'] for f in summary['failed']] == [3]
  assert summary['images'] == 5 and summary['interrupted'] is False
  log = out / crop_cli.LOG_FILE
  before = {p.name: p.read_bytes() for p in out.iterdir()}
  capsys.readouterr()
  for other in (['--top-k', '2'], ['--aspect-ratio', '1:1'], ['--dtype', 'bfloat16']):
    assert cli('--image-list', listed, '--out', out, *other) == 2, other
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: --out') and 'another list run' in err and '\n' not in err
  assert cli('--image-list', tmp_path / 'photos' / '*' / '*.png', '--out', out) == 2
  assert 'image list' in capsys.readouterr().err
  assert cli('--image-list', listed, '--out', out, '--overwrite') == 2
  assert cli('--image', images[0], '--out', out, '--overwrite') == 2  # not a folder run's
  assert 'holds a list run' in capsys.readouterr().err
  assert {p.name: p.read_bytes() for p in out.iterdir()} == before
  # The same command again: every image has its result line, nothing is done twice.
  assert cli('--image-list', listed, '--out', out) == 1
  assert log.read_bytes() == before[log.name]
  assert _summary(out) == summary


@pytest.mark.parametrize(
    'flag',
    ['--process-index', '--process-count', '--distributed', '--coordinator-address', '--merge'],
)
def test_removed_multi_process_flags_point_to_beam(tmp_path, capsys, monkeypatch, flag):
  monkeypatch.setattr(
      cropper_lib.ClipCropper,
      'init_random',
      classmethod(lambda *a, **kw: pytest.fail('model loaded')),
  )
  argv = ['--random-init', 'tiny', '--text', TEXT, '--out', str(tmp_path / 'o'), flag]
  if flag != '--distributed':
    argv.append('1')
  assert crop_cli.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f'error: {flag} was removed') and 'clipcrop_jax.crop_beam' in err
  assert '\n' not in err and not (tmp_path / 'o').exists()


def test_list_arguments_are_checked_before_the_model(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(
      cropper_lib.ClipCropper,
      'init_random',
      classmethod(lambda *a, **kw: pytest.fail('model loaded')),
  )
  images = _photos(tmp_path / 'photos', 2)
  listed = _list_file(tmp_path / 'list.txt', images)
  base = ['--random-init', 'tiny', '--text', TEXT, '--image-list', str(listed)]
  bad = [
      ['--out', str(images[0].parent)],  # an input folder
      ['--out', str(tmp_path)],  # not empty, no list run
      ['--out', str(tmp_path / 'o'), '--batch-size', '0'],
      ['--out', str(tmp_path / 'o'), '--overwrite'],
  ]
  for extra in bad:
    assert crop_cli.main(base + extra) == 2, extra
    err = capsys.readouterr().err.strip()
    assert err.startswith('error:') and '\n' not in err, err
  assert not (tmp_path / 'o').exists()


# ---------------------------------------------------------------- a SIGKILL and a rerun

_SLOW_WRITES = textwrap.dedent("""
    import sys, time
    from clipcrop_jax import crop
    from clipcrop_jax.owlvit import fileio
    real = fileio.create_new_bytes
    def slow(path, data):  # slow disk: the test can kill this process mid-image
      made = real(path, data)
      time.sleep(0.1)
      return made
    fileio.create_new_bytes = slow
    sys.exit(crop.main(sys.argv[1:]))
""")


def _process(listed: pathlib.Path, out: pathlib.Path, script=None):
  argv = [
      '--random-init',
      'tiny',
      '--keyword-pipeline',
      'rules',
      '--text',
      TEXT,
      '--image-list',
      str(listed),
      '--out',
      str(out),
      '--batch-size',
      '4',
  ]
  command = ['-c', script] if script else ['-m', 'clipcrop_jax.crop']
  return subprocess.Popen(
      [sys.executable, *command, *argv],
      cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS='cpu'),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )


@pytest.mark.slow  # two JAX processes
def test_killed_and_rerun_equals_one_uninterrupted_run(cli, tmp_path):
  images = _photos(tmp_path / 'photos', 40, corrupt={5, 18, 31})
  images.append(tmp_path / 'photos' / 'gone.jpg')  # listed, missing: fails as an image
  listed = _list_file(tmp_path / 'list.txt', images)
  single, resumed = tmp_path / 'single', tmp_path / 'resumed'
  assert cli('--image-list', listed, '--out', single, '--batch-size', 8) == 1
  expected = _summary(single)
  assert len(expected['results']) == 37 and len(expected['failed']) == 4

  victim = _process(listed, resumed, _SLOW_WRITES)
  log = resumed / crop_cli.LOG_FILE
  deadline = time.monotonic() + 240
  while time.monotonic() < deadline and victim.poll() is None:
    if log.is_file() and sum('name' in l for l in log.read_text().splitlines()) >= 5:
      victim.send_signal(signal.SIGKILL)
      break
    time.sleep(0.05)
  assert victim.wait(60) == -signal.SIGKILL, victim.stderr.read()[-2000:]
  assert not (resumed / crop_cli.SUMMARY_FILE).exists()
  again = _process(listed, resumed)
  assert again.wait(240) == 1, again.stderr.read()[-2000:]  # the corrupt and missing files
  assert 'resuming:' in again.stderr.read()
  merged = _summary(resumed)

  # Same images, names, errors and files; boxes and scores equal up to float32 rounding of
  # different batch compositions (measured on tiny, batch 1 vs 4 vs 8: boxes identical, scores
  # within 3e-7; allowed: 1e-3 px, 1e-5 in score).
  assert merged['failed'] == expected['failed']
  assert len(merged['results']) == len(expected['results'])
  for got, want in zip(merged['results'], expected['results']):
    assert {k: v for k, v in got.items() if k != 'crops'} == {
        k: v for k, v in want.items() if k != 'crops'
    }
    assert len(got['crops']) == len(want['crops'])
    for a, b in zip(got['crops'], want['crops']):
      np.testing.assert_allclose(a['box_xyxy'], b['box_xyxy'], atol=1e-3)
      np.testing.assert_allclose(a['score'], b['score'], atol=1e-5)
  # Every image has exactly one result line; every file exists once, no orphans.
  results = [l['index'] for l in crop_run_log.read_jsonl(log) if 'name' in l]
  assert sorted(results) == list(range(len(images)))
  made = {f for r in merged['results'] for f in r['files']}
  assert sum(len(r['files']) for r in merged['results']) == len(made)
  assert {p.name for p in resumed.iterdir()} == made | {crop_cli.SUMMARY_FILE, log.name}
