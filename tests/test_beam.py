"""The Apache Beam crop job (`clipcrop_jax.beam`, `python -m clipcrop_jax.crop_beam`).

On Beam's Python FnApiRunner, offline (no runner binary is downloaded): results equal
`ClipCropper.crop` on the same images and per-image texts; corrupt, missing and over-limit
images land in the dead letters with their reasons and the job finishes; a model that fails
once is retried with no duplicated or partial outputs; `--skip_done` after a partial run crops
exactly the rest; a 2-worker multi-processing run gives the results of one worker.
"""

from __future__ import annotations

import glob
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

beam = pytest.importorskip('apache_beam', reason='the beam extra (apache-beam)')
from apache_beam.options import pipeline_options  # pylint: disable=g-import-not-at-top
from apache_beam.runners.portability.fn_api_runner import fn_runner  # pylint: disable=g-import-not-at-top

from clipcrop_jax import beam as cb  # pylint: disable=g-import-not-at-top
from clipcrop_jax import crop_beam  # pylint: disable=g-import-not-at-top
from clipcrop_jax import cropper as cropper_lib  # pylint: disable=g-import-not-at-top
from clipcrop_jax import keywords  # pylint: disable=g-import-not-at-top

SETTINGS = cb.CropSettings(random_init='tiny', keyword_pipeline=keywords.RULES, top_k=3)
TEXTS = ['a red square', 'the blue disc next to a red square', 'a green circle']


def _image(path: pathlib.Path, h: int, w: int, seed: int) -> pathlib.Path:
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
  image[h // 4 : h // 2, w // 4 : w // 2] = (220, 30, 40)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(image).save(path)
  return path


@pytest.fixture(scope='module')
def photos(tmp_path_factory) -> list[pathlib.Path]:
  """Six small pictures (JPEG and PNG, portrait and landscape)."""
  root = tmp_path_factory.mktemp('photos')
  return [
      _image(root / f'p{i}.{"jpg" if i % 2 else "png"}', 40 + 7 * i, 70 - 5 * i, i)
      for i in range(6)
  ]


@pytest.fixture(scope='module')
def cropper():
  return cropper_lib.ClipCropper.init_random('tiny', keyword_pipeline=keywords.RULES)


def _requests(path: pathlib.Path, items) -> pathlib.Path:
  path.write_text(''.join(json.dumps(item) + '\n' for item in items))
  return path


def _run(output, *, handler=None, options=(), **kwargs) -> None:
  handler = handler or cb.ClipCropModelHandler(SETTINGS, batch_size=4)
  with beam.Pipeline(
      runner=fn_runner.FnApiRunner(), options=pipeline_options.PipelineOptions(list(options))
  ) as p:
    cb.build_pipeline(p, handler=handler, output=str(output), **kwargs)


def _lines(output, kind: str) -> list[dict]:
  return [
      json.loads(l)
      for f in sorted(glob.glob(f'{output}/{kind}/*.jsonl'))
      for l in pathlib.Path(f).read_text().splitlines()
      if l.strip()
  ]


def _assert_same_crops(got: list[dict], want: list) -> None:
  assert len(got) == len(want)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g['box_xyxy'], w.box, atol=1e-3)
    np.testing.assert_allclose(g['score'], w.score, atol=1e-5)
    assert [(q['text'], q['role']) for q in g['queries']] == [(q.text, q.role) for q in w.queries]


@pytest.fixture(scope='module')
def per_image_texts(photos, tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
  """(requests JSONL with a text per image, the output of one in-process run over it)."""
  tmp = tmp_path_factory.mktemp('per_image_texts')
  items = [{'image': str(p), 'text': TEXTS[i % 3]} for i, p in enumerate(photos)]
  requests = _requests(tmp / 'r.jsonl', items)
  _run(tmp / 'out', input_jsonl=str(requests), run_id='one')
  return requests, tmp / 'out'


def test_results_equal_the_api_with_per_image_texts_and_files_once(
    photos, cropper, per_image_texts
):
  _, out = per_image_texts
  results = {r['image']: r for r in _lines(out, cb.RESULTS_DIR)}
  assert sorted(results) == sorted(map(str, photos))
  assert _lines(out, cb.DEAD_LETTERS_DIR) == []
  for i, path in enumerate(photos):
    r = results[str(path)]
    assert r['text'] == TEXTS[i % 3] and r['model'] == cropper.model_id
    with Image.open(path) as im:
      assert r['image_size_wh'] == list(im.size)
    _assert_same_crops(r['crops'], cropper.crop(str(path), text=TEXTS[i % 3], top_k=3))
    name = cb.output_name(str(path))
    assert [pathlib.Path(f).name for f in r['files']] == [
        f'{name}_crop{k}.jpg' for k in range(len(r['crops']))
    ] + [f'{name}_overlay.png']
    with Image.open(r['files'][0]) as crop:  # the crop's pixels, from the full image
      x0, y0, x1, y1 = (round(v) for v in r['crops'][0]['box_xyxy'])
      assert crop.size == (x1 - x0, y1 - y0)
  files = sorted(pathlib.Path(out / cb.CROPS_DIR).iterdir())
  assert [f.name for f in files] == sorted(
      pathlib.Path(f).name for r in results.values() for f in r['files']
  )  # no temporary files left


def test_bad_images_go_to_the_dead_letters_and_the_job_finishes(photos, tmp_path):
  corrupt = tmp_path / 'corrupt.jpg'
  corrupt.write_bytes(b'\xff\xd8\xff\xe0 not a jpeg')
  big = _image(tmp_path / 'big.png', 120, 100, 9)  # 12 000 pixels > the job's limit
  items = [
      {'image': str(photos[0]), 'text': 'a dog'},
      {'image': str(corrupt), 'text': 'a dog'},
      {'image': str(tmp_path / 'missing.jpg'), 'text': 'a dog'},
      {'image': str(big), 'text': 'a dog'},
      {'image': str(photos[1]), 'text': '   '},
      {'text': 'no image'},
      'not json',
  ]
  requests = tmp_path / 'r.jsonl'
  requests.write_text('\n'.join(i if isinstance(i, str) else json.dumps(i) for i in items) + '\n')
  handler = cb.ClipCropModelHandler(
      cb.CropSettings(random_init='tiny', keyword_pipeline=keywords.RULES, max_pixels=10_000)
  )
  _run(tmp_path / 'out', handler=handler, input_jsonl=str(requests))
  assert [r['image'] for r in _lines(tmp_path / 'out', cb.RESULTS_DIR)] == [str(photos[0])]
  dead = {d['image']: d for d in _lines(tmp_path / 'out', cb.DEAD_LETTERS_DIR)}
  assert dead[str(corrupt)]['stage'] == 'read'
  assert 'corrupt or truncated' in dead[str(corrupt)]['error']
  assert 'missing.jpg' in dead[str(tmp_path / 'missing.jpg')]['error']
  assert 'pixels' in dead[str(big)]['error'] and '10000' in dead[str(big)]['error'].replace(
      ',', ''
  ).replace(' ', '')
  assert dead[str(photos[1])]['stage'] == 'inference' and 'text' in dead[str(photos[1])]['error']
  requests_dead = [d for d in dead.values() if d['stage'] == 'request']
  assert len(requests_dead) == 2 and all('\n' not in d['error'] for d in dead.values())
  assert len(dead) == 6


class _FailsOnce(cb.ClipCropModelHandler):
  """A handler whose model's first batched encoding fails (a transient device error)."""

  def __init__(self, flag: pathlib.Path, **kwargs):
    super().__init__(SETTINGS, **kwargs)
    self.flag = str(flag)

  def load_model(self):
    model = super().load_model()
    real, flag = model.encode_batch, pathlib.Path(self.flag)

    def encode_batch(inputs, **kw):
      if not flag.exists():
        flag.write_text('failed once')
        raise RuntimeError('transient device error')
      return real(inputs, **kw)

    model.encode_batch = encode_batch
    return model


def test_a_transient_failure_is_retried_with_no_duplicates(photos, tmp_path):
  flag = tmp_path / 'flag'
  _run(
      tmp_path / 'out',
      handler=_FailsOnce(flag, batch_size=8),
      input_glob=str(photos[0].parent / '*'),
      text='a red square',
  )
  assert flag.exists()  # it did fail once
  results = _lines(tmp_path / 'out', cb.RESULTS_DIR)
  assert sorted(r['image'] for r in results) == sorted(map(str, photos))  # each exactly once
  assert _lines(tmp_path / 'out', cb.DEAD_LETTERS_DIR) == []
  made = sorted(p.name for p in (tmp_path / 'out' / cb.CROPS_DIR).iterdir())
  assert made == sorted(pathlib.Path(f).name for r in results for f in r['files'])


def test_skip_done_after_a_partial_run_crops_exactly_the_rest(photos, tmp_path):
  out = tmp_path / 'out'
  first = [{'image': str(p), 'text': 'a red square'} for p in photos[:2]]
  # --skip_done with no earlier results: everything is to do.
  _run(out, input_jsonl=str(_requests(tmp_path / 'a.jsonl', first)), skip_done=True, run_id='first')
  every = [{'image': str(p), 'text': 'a red square'} for p in photos]
  _run(
      out, input_jsonl=str(_requests(tmp_path / 'b.jsonl', every)), skip_done=True, run_id='second'
  )
  second = [
      json.loads(l)
      for f in glob.glob(f'{out}/{cb.RESULTS_DIR}/second-*.jsonl')
      for l in pathlib.Path(f).read_text().splitlines()
  ]
  assert sorted(r['image'] for r in second) == sorted(map(str, photos[2:]))
  assert sorted(cb.done_images(str(out))) == sorted(map(str, photos))


@pytest.mark.slow  # two SDK worker processes, each loading JAX and the model
def test_two_worker_processes_give_the_results_of_one(photos, per_image_texts, tmp_path):
  requests, one_worker = per_image_texts
  _run(
      tmp_path / 'two',
      input_jsonl=str(requests),
      options=['--direct_num_workers=2', '--direct_running_mode=multi_processing'],
  )
  one = {r['image']: r for r in _lines(one_worker, cb.RESULTS_DIR)}
  two = {r['image']: r for r in _lines(tmp_path / 'two', cb.RESULTS_DIR)}
  assert sorted(one) == sorted(two) == sorted(map(str, photos))
  for image, r in one.items():
    for a, b in zip(r['crops'], two[image]['crops'], strict=True):
      np.testing.assert_allclose(a['box_xyxy'], b['box_xyxy'], atol=1e-3)
      np.testing.assert_allclose(a['score'], b['score'], atol=1e-5)


def test_request_lines_and_names():
  assert cb.parse_request_line('{"image": "gs://b/x.jpg", "text": "a dog"}') == cb.ImageRequest(
      'gs://b/x.jpg', 'a dog'
  )
  for bad, match in (
      ('{"image": 3}', 'needs "image"'),
      ('[1]', 'needs "image"'),
      ('{"image": "a", "text": "x", "query_image": "b"}', 'not both'),
      ('{"image": "a", "txt": "x"}', 'unknown field'),
      ('{', 'not a JSON'),
  ):
    with pytest.raises(ValueError, match=match):
      cb.parse_request_line(bad)
  a, b = cb.output_name('gs://bucket/a/photo.jpg'), cb.output_name('gs://bucket/b/photo.jpg')
  assert a.startswith('photo-') and b.startswith('photo-') and a != b
  assert cb.output_name('gs://bucket/a/photo.jpg') == a


@pytest.mark.parametrize(
    'argv,message',
    [
        (['--random_init', 'tiny', '--input', 'x/*', '--output', 'o', '--top_k', '0'], '--top_k'),
        (
            ['--random_init', 'tiny', '--requests', 'r.jsonl', '--text', 'a', '--output', 'o'],
            '--text / --query_image go with --input',
        ),
        (['--random_init', 'tiny', '--input', 'x/*', '--output', 'o', '--text', ' '], 'empty'),
        (
            [
                '--random_init',
                'tiny',
                '--input',
                'x/*',
                '--output',
                'o',
                '--keyword_pipeline',
                'rule',
            ],
            "'rules'",
        ),
    ],
)
def test_command_line_errors_are_one_line(argv, message, capsys):
  assert crop_beam.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith('error:') and message in err and '\n' not in err


def test_command_line_crops_a_glob(photos, tmp_path, capsys):
  argv = [
      '--random_init',
      'tiny',
      '--keyword_pipeline',
      'rules',
      '--input',
      str(photos[0].parent / '*'),
      '--text',
      'a red square',
      '--output',
      str(tmp_path / 'out'),
      '--run_id',
      'cli',
      '--runner',
      'DirectRunner',
  ]
  assert crop_beam.main(argv) == 0
  assert 'cli: 6 image(s) cropped, 0 in the dead letters' in capsys.readouterr().out
  assert len(_lines(tmp_path / 'out', cb.RESULTS_DIR)) == 6
