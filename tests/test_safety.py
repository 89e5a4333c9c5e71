"""Nothing a user owns is overwritten or lost; bad input gets one line, before any model work.

Crop and detect command lines, the ClipCropper API and its model directory, on tiny random
weights. Hard interruptions are real: a subprocess is SIGKILLed mid-save / mid-folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from clipcrop_jax import boxes as box_lib
from clipcrop_jax import crop as crop_cli
from clipcrop_jax import crop_run_log
from clipcrop_jax import cropper as cropper_lib
from clipcrop_jax import export
from clipcrop_jax import keywords
from clipcrop_jax import model as model_lib
from clipcrop_jax.owlvit import configs as owl_configs
from clipcrop_jax.owlvit import detect
from clipcrop_jax.owlvit import fileio
from clipcrop_jax.owlvit import model as owl_model

CFG = model_lib.TINY
REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def cropper():
  return cropper_lib.ClipCropper(
      CFG, model_lib.init_variables(CFG, seed=3), keyword_pipeline=keywords.RULES, model_id='test'
  )


@pytest.fixture
def cli(monkeypatch, cropper):
  """Runs the crop CLI with the shared tiny cropper; `cli.loads` counts model loads."""
  loads = []

  def fake_init(cls, *args, **kwargs):
    del cls, args, kwargs
    loads.append(1)
    return cropper

  monkeypatch.setattr(cropper_lib.ClipCropper, 'init_random', classmethod(fake_init))

  def run(*argv):
    return crop_cli.main(['--random-init', 'tiny', *map(str, argv)])

  run.loads = loads
  return run


def _save(path, h=120, w=180, seed=0):
  rng = np.random.default_rng(seed)
  image = (
      detect.demo_image(h, w)
      if h >= 60 and w >= 60
      else rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
  )
  Image.fromarray(image).save(path)
  return path


def _snapshot(folder):
  return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


def _report(out):
  return json.loads((out / crop_cli.SUMMARY_FILE).read_text())


# ---------------------------------------------------------------- fileio


def test_atomic_writes_have_normal_permissions_and_no_clobber(tmp_path):
  old = os.umask(0o022)
  try:
    a = fileio.atomic_write_text(tmp_path / 'a.json', '{}')
    b = fileio.create_new_bytes(tmp_path / 'b.bin', b'x')
  finally:
    os.umask(old)
  assert a.stat().st_mode & 0o777 == 0o644 and b.stat().st_mode & 0o777 == 0o644
  with pytest.raises(FileExistsError, match='b.bin'):
    fileio.create_new_bytes(tmp_path / 'b.bin', b'other')
  assert b.read_bytes() == b'x'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['a.json', 'b.bin']  # no temp left


def test_replace_directory_keeps_old_contents_on_error(tmp_path):
  dest = tmp_path / 'model'
  with fileio.replace_directory(dest) as tmp:
    (tmp / 'f').write_text('old')
  with pytest.raises(RuntimeError):
    with fileio.replace_directory(dest) as tmp:
      (tmp / 'f').write_text('new')
      raise RuntimeError('interrupted')
  assert (dest / 'f').read_text() == 'old'
  with fileio.replace_directory(dest) as tmp:
    (tmp / 'g').write_text('new')
  assert sorted(p.name for p in dest.iterdir()) == ['g']
  assert sorted(p.name for p in tmp_path.iterdir()) == ['model']


# ---------------------------------------------------------------- ClipCropper.save / load

_SAVE_SCRIPT = textwrap.dedent("""
    import os, pathlib, signal, sys
    import numpy as np
    from clipcrop_jax import cropper as cropper_lib, model as model_lib
    from clipcrop_jax.owlvit import fileio
    target, kill_at = pathlib.Path(sys.argv[1]), int(sys.argv[2])
    current = cropper_lib.ClipCropper.load(target).config
    config = current.replace(num_queries=current.num_queries + 1)  # other config, other shapes
    c = cropper_lib.ClipCropper(config, model_lib.init_variables(config, seed=kill_at))
    np.save(sys.argv[3], np.asarray(c.variables['params']['decoder']['query_embed']))
    events = [0]
    def killing(fn):
      def wrapped(*a, **k):
        events[0] += 1
        if events[0] == kill_at:
          os.kill(os.getpid(), signal.SIGKILL)
        return fn(*a, **k)
      return wrapped
    for mod, name in [(pathlib.Path, 'write_bytes'), (pathlib.Path, 'write_text'),
                      (os, 'replace'), (os, 'rename'), (os, 'fsync'), (fileio, '_exchange')]:
      setattr(mod, name, killing(getattr(mod, name)))
    c.save(target)
""")


@pytest.mark.slow
def test_save_killed_at_any_point_leaves_old_or_new_model(cropper, tmp_path):
  """SIGKILL before each file-system step of `save` over an existing model (of another config):
  `load` gives the old model or the new one, never a mix or an unloadable directory."""
  target = cropper.save(tmp_path / 'model')
  leaf = lambda c: np.asarray(c.variables['params']['decoder']['query_embed'])
  old, outcomes = leaf(cropper), []
  for kill_at in range(1, 10):
    ref = tmp_path / f'new_{kill_at}.npy'
    proc = subprocess.run(
        [sys.executable, '-c', _SAVE_SCRIPT, str(target), str(kill_at), str(ref)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        check=False,
    )
    killed = proc.returncode == -signal.SIGKILL
    assert killed or proc.returncode == 0, proc.stderr[-2000:]
    loaded = leaf(cropper_lib.ClipCropper.load(target))
    if loaded.shape == old.shape:
      np.testing.assert_array_equal(loaded, old)
      outcomes.append('old')
    else:
      np.testing.assert_array_equal(loaded, np.load(ref))
      outcomes.append('new')
      old = loaded
    if not killed:
      break
  assert 'old' in outcomes and outcomes[-1] == 'new', outcomes  # killed mid-way, then done
  assert sorted(p.name for p in target.iterdir()) == [export.CONFIG_FILE, export.PARAMS_FILE]


def test_save_refuses_a_directory_that_is_not_a_model(cropper, tmp_path):
  folder = tmp_path / 'photos'
  folder.mkdir()
  (folder / 'holiday.jpg').write_bytes(b'precious')
  with pytest.raises(ValueError, match='not a ClipCrop model directory'):
    cropper.save(folder)
  assert (folder / 'holiday.jpg').read_bytes() == b'precious'
  (tmp_path / 'file').write_text('x')
  with pytest.raises(ValueError, match='not a directory'):
    cropper.save(tmp_path / 'file')


@pytest.mark.parametrize(
    'field,value,match',
    [
        ('decoder_width', '32', r'decoder_width=\'32\' has type str; expected int'),
        ('num_queries', 12.5, 'num_queries=12.5 has type float'),
        ('freeze_encoder', 'yes', 'freeze_encoder'),
        ('decoder_heads', 0, 'decoder_heads=0; expected >= 1'),
        ('decoder_heads', 5, 'not divisible by decoder_heads=5'),
        ('dropout_rate', 1.5, r'dropout_rate=1.5; expected \[0, 1\)'),
        ('no_such_field', 1, 'unknown ClipCropConfig field'),
    ],
)
def test_load_type_checks_the_config(cropper, tmp_path, field, value, match):
  ckpt = cropper.save(tmp_path / 'ckpt')
  meta = json.loads((ckpt / export.CONFIG_FILE).read_text())
  meta['config'][field] = value
  (ckpt / export.CONFIG_FILE).write_text(json.dumps(meta))
  with pytest.raises(ValueError, match=match) as info:
    cropper_lib.ClipCropper.load(ckpt)
  assert export.CONFIG_FILE in str(info.value) and '\n' not in str(info.value)


def test_init_random_names_known_configs():
  with pytest.raises(ValueError, match="unknown config 'huge'.*tiny.*clip_b32"):
    cropper_lib.ClipCropper.init_random('huge')


# ---------------------------------------------------------------- API arguments


def test_api_arguments_are_checked_before_any_image_is_encoded(cropper, monkeypatch):
  calls = []
  real = owl_model.encode_images
  monkeypatch.setattr(owl_model, 'encode_images', lambda *a: calls.append(1) or real(*a))
  images = [detect.demo_image(), detect.demo_image(90, 90)]
  bad = [
      (dict(top_k='3'), TypeError, 'top_k must be an integer'),
      (dict(top_k=0), ValueError, 'top_k must be >= 1'),
      (dict(min_size='10'), TypeError, 'min_size must be a number'),
      (dict(min_size=float('nan')), ValueError, 'min_size'),
      (dict(fuse_top_k=0), ValueError, 'fuse_top_k'),
      (dict(aspect_ratio=1e9), ValueError, r'outside \[1/100, 100\]'),
      (dict(text=' '), ValueError, 'non-empty text'),
      (dict(query_image=detect.demo_image(50, 50)), ValueError, 'not both'),
      (dict(query_box=(0, 0, 5, 5)), ValueError, 'query_box needs query_image'),
  ]
  for kwargs, error, match in bad:
    with pytest.raises(error, match=match):
      cropper.crop(images, **{'text': 'a red square', **kwargs})
  assert not calls


def test_query_box_is_checked_in_query_image_pixels(cropper):
  q = detect.demo_image(50, 80)
  for box in [(0, 0, 81, 50), (-1, 0, 10, 10), (0, 0, float('inf'), 10), (10, 10, 5, 20)]:
    with pytest.raises(ValueError, match=r'query box of .*px|query box of .*finite|x1 > x0'):
      cropper.crop(detect.demo_image(), query_image=q, query_box=box)
  assert cropper.crop(detect.demo_image(), query_image=q, query_box=(0, 0, 80, 50))


def test_encoding_of_another_model_is_refused(cropper):
  other = cropper_lib.ClipCropper(
      CFG, model_lib.init_variables(CFG, seed=4), keyword_pipeline=keywords.RULES
  )
  enc = other.encode(detect.demo_image())
  with pytest.raises(ValueError, match='another ClipCropper'):
    cropper.crop(enc, text='a red square')
  assert other.crop(enc, text='a red square')


@pytest.mark.parametrize('hw', [(1, 1), (20, 3000), (3000, 20), (2, 7)])
def test_crops_are_never_below_one_pixel(cropper, hw):
  image = np.random.default_rng(0).integers(0, 255, (*hw, 3), dtype=np.uint8)
  for ratio in (None, '1:1', '16:9'):
    crops = cropper.crop(image, text='a red square', top_k=5, aspect_ratio=ratio)
    for c in crops:
      assert c.box[2] - c.box[0] >= 1 - 1e-9 and c.box[3] - c.box[1] >= 1 - 1e-9
      assert 0 <= c.box[0] and c.box[2] <= hw[1] + 1e-9 and c.box[3] <= hw[0] + 1e-9
    if ratio is None:
      assert crops  # widened to a pixel, not dropped
  # A ratio that cannot be one pixel wide inside a 20 px tall image gives no crop, not a 0.2 px one.
  assert cropper.crop(np.zeros((20, 3000, 3), np.uint8), text='x', aspect_ratio=0.01) == []


def test_widen_to_min_side_by_hand():
  got = box_lib.widen_to_min_side_xyxy(
      np.array([[0.2, 0.1, 0.3, 5.0], [9.9, 0, 10, 0.2], [0, 0, 4, 4]]), (10, 20)
  )
  np.testing.assert_allclose(got, [[0, 0.1, 1, 5], [9, 0, 10, 1], [0, 0, 4, 4]])
  np.testing.assert_allclose(
      box_lib.widen_to_min_side_xyxy(np.array([[0.2, 0.1, 0.3, 0.1]]), (0.5, 20)), [[0, 0, 0.5, 1]]
  )


# ---------------------------------------------------------------- crop CLI


def test_out_equal_to_the_input_folder_is_refused(cli, tmp_path, capsys):
  photos = tmp_path / 'photos'
  photos.mkdir()
  _save(photos / 'a.jpg')
  before = _snapshot(photos)
  assert cli('--image', photos, '--text', 'a red square', '--out', photos) == 2
  assert cli('--image', photos, '--text', 'a red square', '--out', photos, '--overwrite') == 2
  assert cli('--image', photos / 'a.jpg', '--text', 'a red square', '--out', photos) == 2
  assert _snapshot(photos) == before and not cli.loads
  assert 'input folder' in capsys.readouterr().err


def test_second_run_needs_overwrite_and_leaves_no_stale_files(cli, tmp_path, cropper, monkeypatch):
  photos, out = tmp_path / 'photos', tmp_path / 'out'
  photos.mkdir()
  _save(photos / 'a.jpg')
  _save(photos / 'b.png', 90, 140, seed=1)
  # Three distinct crops per image whatever the tiny model predicts.
  three = [cropper_lib.Crop((0, 0, 10 + i, 10 + i), 1.0 - i / 10, 1.0, (5, 5)) for i in range(3)]
  real = cropper.iter_crops_checked

  def three_crops(items, request, **kw):
    for r in real(items, request, **kw):
      yield r if r.crops is None else dataclasses.replace(r, crops=three[: request.top_k])

  monkeypatch.setattr(cropper, 'iter_crops_checked', three_crops)
  assert cli('--image', photos, '--text', 'x', '--top-k', 3, '--out', out) == 0
  assert (out / 'a_crop2.jpg').exists() and (out / 'b_crop2.jpg').exists()
  (out / 'my_notes.txt').write_text('mine')
  first = _snapshot(out)
  assert cli('--image', photos, '--text', 'x', '--top-k', 1, '--out', out) == 2  # not empty
  assert _snapshot(out) == first
  assert cli('--image', photos, '--text', 'x', '--top-k', 1, '--out', out, '--overwrite') == 0
  names = sorted(p.name for p in out.iterdir())
  assert names == [
      'a_crop0.jpg',
      'a_overlay.png',
      'b_crop0.jpg',
      'b_overlay.png',
      'crops.json',
      'crops.jsonl',
      'my_notes.txt',
  ]
  assert (out / 'my_notes.txt').read_text() == 'mine'
  assert [len(r['crops']) for r in _report(out)['results']] == [1, 1]
  # A folder of other things is never taken over, even with --overwrite.
  other = tmp_path / 'other'
  other.mkdir()
  (other / 'x_crop0.jpg').write_bytes(b'not ours')
  assert cli('--image', photos, '--text', 'x', '--out', other, '--overwrite') == 2
  assert (other / 'x_crop0.jpg').read_bytes() == b'not ours'


def test_same_stem_inputs_get_distinct_outputs(cli, tmp_path):
  photos, out = tmp_path / 'photos', tmp_path / 'out'
  photos.mkdir()
  _save(photos / 'x.jpg')
  _save(photos / 'x.png', 90, 140, seed=1)
  _save(photos / 'X.gif', 100, 100, seed=2)
  assert cli('--image', photos, '--text', 'a red square', '--out', out) == 0
  report = _report(out)
  names = [r['name'] for r in report['results']]
  assert len({n.casefold() for n in names}) == 3
  for r in report['results']:
    w, h = r['image_size_wh']
    overlay = Image.open(out / f'{r["name"]}_overlay.png')
    assert overlay.size == (w, h)  # each image's own overlay, none overwritten
  assert crop_run_log.output_names(
      [pathlib.Path('a/x.jpg'), pathlib.Path('b/x.jpg'), pathlib.Path('x_jpg.png'), None]
  ) == ['x', 'x_jpg', 'x_jpg_png', 'demo']


def test_one_bad_image_never_ends_the_folder(cli, tmp_path, cropper, monkeypatch):
  photos, out = tmp_path / 'photos', tmp_path / 'out'
  photos.mkdir()
  for i, hw in enumerate([(120, 180), (1, 1), (20, 10000), (10000, 20), (90, 90)]):
    _save(photos / f'{i}.png', *hw, seed=i)
  (photos / '5.jpg').write_bytes(b'\xff\xd8\xff\xe0 not a jpeg')
  real = cropper._forward

  def flaky(inputs, request):  # the whole batch holding 4.png fails: it alone must fail
    if any(i.image_hw == (90, 90) for i in inputs):
      raise RuntimeError('device fell over')
    return real(inputs, request)

  monkeypatch.setattr(cropper, '_forward', flaky)
  assert cli('--image', photos, '--text', 'a red square', '--top-k', 2, '--out', out) == 1
  report = _report(out)
  assert [r['image'] for r in report['results']] == [str(photos / f'{i}.png') for i in range(4)]
  errors = {pathlib.Path(f['image']).name: f['error'] for f in report['failed']}
  assert set(errors) == {'4.png', '5.jpg'}
  assert errors['4.png'] == 'RuntimeError: device fell over' and '5.jpg: corrupt' in errors['5.jpg']
  for r in report['results']:
    for f in r['files'][:-1]:
      with Image.open(out / f) as im:
        assert min(im.size) >= 1
  lines = [json.loads(l) for l in (out / crop_cli.LOG_FILE).read_text().splitlines()]
  assert sum('crops' in l or 'error' in l for l in lines) == 6


def test_arguments_are_checked_before_the_model_loads(cli, tmp_path, capsys):
  photo = _save(tmp_path / 'a.jpg')
  (tmp_path / 'afile').write_text('x')
  bad_runs = [
      ['--top-k', '-3'],
      ['--top-k', '0'],
      ['--fuse-top-k', '0'],
      ['--aspect-ratio', '1e9'],
      ['--aspect-ratio', 'wide'],
      ['--min-size', 'nan'],
      ['--min-size', '-1'],
      ['--text', '   '],
      ['--query-image', tmp_path / 'missing.png'],
      ['--out', tmp_path / 'afile'],
      ['--out', tmp_path / 'afile' / 'sub'],
      ['--image', tmp_path / 'nothing_here.jpg'],
      ['--max-pixels', '0'],
  ]
  for extra in bad_runs:
    argv = dict(zip(['--image', '--text', '--out'], [photo, 'a red square', tmp_path / 'o']))
    pairs = list(zip(extra[::2], extra[1::2]))
    if ('--query-image', tmp_path / 'missing.png') in pairs:
      argv.pop('--text')
    argv.update(pairs)
    rc = cli(*[v for kv in argv.items() for v in kv])
    err = capsys.readouterr().err.strip()
    assert rc == 2, extra
    assert err.startswith('error:') and '\n' not in err, err
  assert not cli.loads and not (tmp_path / 'o').exists()


def test_min_size_larger_than_the_image_is_reported(cli, tmp_path):
  photo = _save(tmp_path / 'a.jpg', 100, 150)
  assert (
      cli('--image', photo, '--text', 'a red square', '--min-size', 500, '--out', tmp_path / 'o')
      == 1
  )
  (failed,) = _report(tmp_path / 'o')['failed']
  assert '--min-size 500' in failed['error'] and '150x100' in failed['error']


def test_ctrl_c_keeps_the_images_done(cli, tmp_path, cropper, monkeypatch):
  photos, out = tmp_path / 'photos', tmp_path / 'out'
  photos.mkdir()
  for i in range(3):
    _save(photos / f'{i}.jpg', seed=i)
  real, calls = cropper._forward, []

  def interrupted(inputs, request):  # Ctrl-C during the second forward (one image per batch)
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt
    return real(inputs, request)

  monkeypatch.setattr(cropper, '_forward', interrupted)
  assert cli('--image', photos, '--text', 'a red square', '--batch-size', 1, '--out', out) == 130
  report = _report(out)
  assert report['interrupted'] and [r['name'] for r in report['results']] == ['0']


_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from clipcrop_jax import crop
    from clipcrop_jax import crop_run_log
    real = crop_run_log.RunLog.write
    def write_or_die(self, record):  # killed once the third image announced its files
      real(self, record)
      if record.get('writing') and record['image'].endswith('2.jpg'):
        os.kill(os.getpid(), signal.SIGKILL)
    crop_run_log.RunLog.write = write_or_die
    sys.exit(crop.main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_killed_folder_run_keeps_results_and_overwrite_cleans_up(tmp_path):
  photos, out = tmp_path / 'photos', tmp_path / 'out'
  photos.mkdir()
  for i in range(4):
    _save(photos / f'{i}.jpg', seed=i)
  argv = [
      '--random-init',
      'tiny',
      '--keyword-pipeline',
      'rules',
      '--image',
      str(photos),
      '--text',
      'a red square',
      '--out',
      str(out),
  ]
  proc = subprocess.run(
      [sys.executable, '-c', _KILL_SCRIPT, *argv],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=600,
      check=False,
  )
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  lines = [json.loads(l) for l in (out / crop_cli.LOG_FILE).read_text().splitlines()]
  done = [l for l in lines if 'crops' in l]
  assert [pathlib.Path(l['image']).name for l in done] == ['0.jpg', '1.jpg']
  assert not (out / crop_cli.SUMMARY_FILE).exists()
  for l in done:
    assert all((out / f).is_file() for f in l['files'])
  # A re-run into the same folder removes exactly that run's outputs and completes.
  (out / 'keep.txt').write_text('mine')
  proc = subprocess.run(
      [sys.executable, '-m', 'clipcrop_jax.crop', *argv, '--overwrite'],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=600,
      check=False,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert len(_report(out)['results']) == 4 and (out / 'keep.txt').read_text() == 'mine'


# ---------------------------------------------------------------- detect CLI


@pytest.fixture
def detect_cli(monkeypatch):
  cfg = owl_configs.get_config('tiny')
  built = []
  model = (
      owl_model.TextZeroShotDetectionModule(cfg),
      owl_model.init_variables(cfg, seed=0),
      'tiny',
  )

  def build(args):
    del args
    built.append(1)
    return model

  monkeypatch.setattr(detect, '_build_model', build)

  def run(*argv):
    return detect.main(['--random-init', 'tiny', *map(str, argv)])

  run.built = built
  return run


def test_detect_never_overwrites_an_input_or_an_existing_file(detect_cli, tmp_path, capsys):
  photo = _save(tmp_path / 'photo.png')
  before = photo.read_bytes()
  assert detect_cli('--image', photo, '--query', 'x', '--out', photo) == 2
  assert detect_cli('--image', photo, '--query', 'x', '--out', photo, '--overwrite') == 2
  assert photo.read_bytes() == before
  out = tmp_path / 'o.png'
  assert detect_cli('--image', photo, '--query', 'x', '--out', out) == 0
  first = out.read_bytes()
  assert detect_cli('--image', photo, '--query', 'y', '--out', out) == 2
  assert out.read_bytes() == first
  assert detect_cli('--image', photo, '--query', 'y', '--out', out, '--overwrite') == 0
  assert 'input file' in capsys.readouterr().err


def test_detect_out_problems_are_found_before_the_model(detect_cli, tmp_path, capsys):
  photo = _save(tmp_path / 'photo.png')
  (tmp_path / 'afile').write_text('x')
  for out in [
      tmp_path / 'noext',
      tmp_path,
      tmp_path / 'afile' / 'o.png',
      tmp_path / 'afile' / 'sub' / 'o.png',
  ]:
    assert detect_cli('--image', photo, '--query', 'x', '--out', out) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: --out') and '\n' not in err
  for box in ['0,0,500,10', '-5,0,10,10', '0,0,inf,10']:
    assert (
        detect_cli(
            '--image',
            photo,
            '--query-image',
            photo,
            f'--query-box={box}',
            '--out',
            tmp_path / 'o.png',
        )
        == 2
    )
    assert 'px' in capsys.readouterr().err or box.endswith('inf,10')
  assert not detect_cli.built


@pytest.mark.parametrize(
    'flag,value',
    [
        ('--top-k', '-3'),
        ('--top-k', '0'),
        ('--min-score', 'nan'),
        ('--min-score', '2'),
        ('--query', ' '),
    ],
)
def test_detect_refuses_silent_wrong_arguments(detect_cli, tmp_path, flag, value):
  argv = ['--query', 'x', '--out', tmp_path / 'o.png', flag, value]
  with pytest.raises(SystemExit) as info:
    detect_cli(*argv)
  assert info.value.code == 2 and not detect_cli.built


def test_detect_lists_no_padding_or_zero_area_boxes():
  cfg = owl_configs.get_config('tiny')
  module, variables = owl_model.TextZeroShotDetectionModule(cfg), owl_model.init_variables(cfg)
  for hw in [(80, 400), (400, 80), (120, 200)]:  # thin, but a token row fits in the image
    image = np.random.default_rng(0).integers(0, 255, (*hw, 3), dtype=np.uint8)
    dets = detect.detect(module, variables, image, ['a cat'], top_k=36)
    assert dets
    for d in dets:
      x0, y0, x1, y1 = d.box
      assert x1 > x0 and y1 > y0 and (x0 + x1) / 2 <= hw[1] and (y0 + y1) / 2 <= hw[0]


def test_converter_never_overwrites_its_input_and_asks_before_replacing(tmp_path, capsys):
  import importlib.util  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.owlvit import checkpoints  # pylint: disable=g-import-not-at-top

  spec = importlib.util.spec_from_file_location(
      'convert_checkpoint', REPO / 'tools' / 'convert_checkpoint.py'
  )
  converter = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(converter)
  cfg = owl_configs.get_config('tiny')
  src = checkpoints.save_scenic_checkpoint(
      owl_model.init_variables(cfg), tmp_path / 'v1.msgpack', layout='v1'
  )
  before = src.read_bytes()
  for argv in (['--output', src], ['--output', src, '--overwrite']):
    assert converter.main(['--input', str(src), *map(str, argv)]) == 2
  assert src.read_bytes() == before and 'input file' in capsys.readouterr().err
  out = tmp_path / 'new' / 'current.msgpack'  # a missing folder is created
  assert converter.main(['--input', str(src), '--output', str(out)]) == 0
  assert converter.main(['--input', str(src), '--output', str(out)]) == 2
  assert 'exists' in capsys.readouterr().err
  assert converter.main(['--input', str(src), '--output', str(out), '--overwrite']) == 0


def test_unloadable_checkpoint_is_one_line_and_leaves_no_output_folder(tmp_path, capsys):
  photo = _save(tmp_path / 'a.jpg')
  (tmp_path / 'junk.msgpack').write_bytes(b'\x00\x01 not msgpack')
  for ckpt in [tmp_path / 'missing', tmp_path / 'junk.msgpack']:
    rc = crop_cli.main(
        [
            '--checkpoint',
            str(ckpt),
            '--image',
            str(photo),
            '--text',
            'x',
            '--out',
            str(tmp_path / 'o'),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith('error:') and '\n' not in err
    assert not (tmp_path / 'o').exists()


def test_pixel_limit_fails_only_that_image(cli, tmp_path):
  photos = tmp_path / 'photos'
  photos.mkdir()
  _save(photos / 'big.png', 120, 180)  # 21600 px
  _save(photos / 'small.png', 60, 80)  # 4800 px
  assert (
      cli(
          '--image',
          photos,
          '--text',
          'a red square',
          '--max-pixels',
          10000,
          '--out',
          tmp_path / 'o',
      )
      == 1
  )
  report = _report(tmp_path / 'o')
  assert [r['name'] for r in report['results']] == ['small']
  error = report['failed'][0]['error']
  assert 'above the decoding limit' in error and 'pass --max-pixels 21600' in error, error


def test_encode_from_a_path_matches_the_array_and_honours_the_limit(cropper, tmp_path):
  path = _save(tmp_path / 'a.png', 100, 150)
  by_path, by_array = cropper.encode(path), cropper.encode(np.asarray(Image.open(path)))
  assert by_path.image_hw == by_array.image_hw == (100, 150)
  np.testing.assert_allclose(
      by_path.encoded['pred_boxes'], by_array.encoded['pred_boxes'], atol=1e-6
  )
  limited = cropper_lib.ClipCropper(
      CFG, cropper.variables, keyword_pipeline=keywords.RULES, max_pixels=1000
  )
  with pytest.raises(ValueError, match='a.png.*above the decoding limit'):
    limited.encode(path)
