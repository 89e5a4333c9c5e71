"""The crop service (clipcrop_jax.serving): API contract, bad inputs, cache, micro-batching,
overload, timeout, token, CORS, log, graceful shutdown. Tiny random model, 127.0.0.1 only."""

from __future__ import annotations

import concurrent.futures
import io
import logging
import os
import pathlib
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import httpx
import numpy as np
from PIL import Image
import pytest

pytest.importorskip('fastapi', reason='the serve extra (fastapi, uvicorn, python-multipart)')
from fastapi import testclient  # pylint: disable=g-import-not-at-top

from clipcrop_jax import cropper as cropper_lib  # pylint: disable=g-import-not-at-top
from clipcrop_jax.owlvit import detect  # pylint: disable=g-import-not-at-top
from clipcrop_jax.owlvit import preprocessing as pp  # pylint: disable=g-import-not-at-top
from clipcrop_jax.serving import errors as serve_errors  # pylint: disable=g-import-not-at-top
from clipcrop_jax.serving import http as serve_http  # pylint: disable=g-import-not-at-top
from clipcrop_jax.serving import service as serve_service  # pylint: disable=g-import-not-at-top
from clipcrop_jax.serving import testing as serve_testing  # pylint: disable=g-import-not-at-top

REPO = pathlib.Path(__file__).resolve().parents[1]
TEXT = 'a red square'
FAST = dict(warmup=False, batch_wait_ms=0.0)


def _png(array: np.ndarray) -> bytes:
  out = io.BytesIO()
  Image.fromarray(array).save(out, 'PNG')
  return out.getvalue()


def _image(i: int) -> np.ndarray:
  """Distinct pictures: the demo scene, shifted and recoloured by `i`."""
  img = detect.demo_image(120 + 8 * i, 180 - 6 * i).copy()
  img[..., i % 3] = (img[..., i % 3].astype(int) + 37 * i) % 256
  return img


def _bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
  """A valid PNG header claiming width x height pixels (10 GP) followed by a tiny IDAT."""

  def chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack('>I', len(data))
        + kind
        + data
        + struct.pack('>I', zlib.crc32(kind + data) & 0xFFFFFFFF)
    )

  ihdr = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
  return (
      b'\x89PNG\r\n\x1a\n'
      + chunk(b'IHDR', ihdr)
      + chunk(b'IDAT', zlib.compress(b'\0' * 64))
      + chunk(b'IEND', b'')
  )


@pytest.fixture(scope='module')
def cropper():
  return cropper_lib.ClipCropper.init_random('tiny', keyword_pipeline='rules')


@pytest.fixture(scope='module')
def images(tmp_path_factory):
  """[(png bytes, path)] of six distinct pictures."""
  folder = tmp_path_factory.mktemp('serve_images')
  out = []
  for i in range(6):
    data = _png(_image(i))
    path = folder / f'img{i}.png'
    path.write_bytes(data)
    out.append((data, path))
  return out


@pytest.fixture(scope='module')
def client(cropper):
  app = serve_http.create_app(
      cropper,
      serve_service.ServeConfig(max_upload_bytes=300_000, max_text_chars=200, max_top_k=20, **FAST),
  )
  with testclient.TestClient(app) as c:
    yield c


def _post(client, data: bytes, path: str = '/v1/crops', **fields):
  files = {'image': ('photo.png', data, 'image/png')}
  if 'query_image' in fields:
    files['query_image'] = ('example.png', fields.pop('query_image'), 'image/png')
  return client.post(path, files=files, data={k: str(v) for k, v in fields.items()})


def _assert_same_crops(answer: list[dict], expected: list[cropper_lib.Crop], atol: float = 1e-3):
  """Same ranked crops (boxes and focal points in pixels, scores) up to float32 rounding."""
  assert len(answer) == len(expected)
  for got, want in zip(answer, expected):
    np.testing.assert_allclose(got['box'], want.box, atol=atol)
    np.testing.assert_allclose(got['focal_point'], want.focal_point, atol=atol)
    np.testing.assert_allclose(got['score'], want.score, atol=1e-5)


def _assert_error(response, status: int) -> str:
  assert response.status_code == status, response.text
  body = response.json()
  assert list(body) == ['error'] and body['error'] and '\n' not in body['error']
  return body['error']


# ------------------------------------------------------------------------------------------------
# Contract.
# ------------------------------------------------------------------------------------------------


def test_crops_contract_equals_the_python_api(client, cropper, images):
  data, path = images[0]
  r = _post(client, data, text=TEXT, top_k=4, aspect_ratio='4:3')
  assert r.status_code == 200, r.text
  body = r.json()
  assert set(body) == {'crops', 'model', 'image_size'}
  assert body['model'] == cropper.model_id
  assert body['image_size'] == [180, 120]  # width, height of the upload
  assert 1 <= len(body['crops']) <= 4
  for crop in body['crops']:
    x0, y0, x1, y1 = crop['box']
    assert 0 <= x0 < x1 <= 180 and 0 <= y0 < y1 <= 120
    assert (x1 - x0) / (y1 - y0) == pytest.approx(4 / 3, rel=1e-6)
  _assert_same_crops(body['crops'], cropper.crop(path, text=TEXT, top_k=4, aspect_ratio='4:3'))
  assert r.headers['x-request-id']


def test_query_image_and_base_mode(client, cropper, images):
  data, path = images[1]
  example = _image(3)[20:80, 30:90]
  r = _post(client, data, query_image=_png(example), top_k=2)
  assert r.status_code == 200, r.text
  _assert_same_crops(r.json()['crops'], cropper.crop(path, query_image=example, top_k=2))
  r = _post(client, data, mode='base', top_k=2)
  assert r.status_code == 200, r.text
  _assert_same_crops(r.json()['crops'], cropper.crop(path, mode='base', top_k=2))


def test_crop_jpg_is_the_best_crop_resized(client, cropper, images):
  data, _ = images[2]
  r = _post(client, data, '/v1/crop.jpg', text=TEXT, width=64, height=48)
  assert r.status_code == 200, r.text
  assert r.headers['content-type'] == 'image/jpeg'
  assert Image.open(io.BytesIO(r.content)).size == (64, 48)
  best = _post(client, data, text=TEXT, top_k=1, aspect_ratio='64:48').json()['crops'][0]
  np.testing.assert_allclose(
      [float(v) for v in r.headers['x-crop-box'].split(',')], best['box'], atol=0.01
  )
  # Only a width: the height follows the crop's own aspect ratio.
  r = _post(client, data, '/v1/crop.jpg', text=TEXT, width=50, aspect_ratio='1:2')
  assert r.status_code == 200, r.text
  assert Image.open(io.BytesIO(r.content)).size == (50, 100)
  # The pixels are the box's pixels of the upload.
  x0, y0, x1, y1 = (round(float(v)) for v in r.headers['x-crop-box'].split(','))
  r = _post(client, data, '/v1/crop.jpg', text=TEXT, aspect_ratio='1:2')
  got = np.asarray(Image.open(io.BytesIO(r.content)), np.float64)
  want = _image(2)[y0:y1, x0:x1].astype(np.float64)
  assert got.shape == want.shape and np.abs(got - want).mean() < 6  # JPEG loss only


def test_openapi_schema_and_pages(client):
  schema = client.get('/openapi.json').json()
  assert {'/v1/crops', '/v1/crop.jpg', '/healthz', '/readyz'} <= set(schema['paths'])
  body = schema['paths']['/v1/crops']['post']['requestBody']['content']
  ref = body['multipart/form-data']['schema']['$ref'].split('/')[-1]
  fields = set(schema['components']['schemas'][ref]['properties'])
  assert {'image', 'text', 'query_image', 'top_k', 'aspect_ratio', 'min_size', 'mode'} <= fields
  jpg = schema['paths']['/v1/crop.jpg']['post']['requestBody']['content']
  ref = jpg['multipart/form-data']['schema']['$ref'].split('/')[-1]
  assert {'width', 'height'} <= set(schema['components']['schemas'][ref]['properties'])
  page = client.get('/')
  assert page.status_code == 200 and 'playground.js' in page.text
  assert client.get('/assets/playground.js').status_code == 200
  assert client.get('/healthz').json()['status'] == 'ok'


def test_readyz_follows_the_warm_up(client):
  service = client.app.state.service
  assert client.get('/readyz').json()['status'] == 'ready'  # warmup=False: ready at start
  service.ready.clear()
  try:
    _assert_error(client.get('/readyz'), 503)
  finally:
    service.ready.set()


def test_warm_up_compiles_then_ready(cropper):
  app = serve_http.create_app(cropper, serve_service.ServeConfig(max_batch=2))
  with testclient.TestClient(app) as c:
    deadline = time.monotonic() + 120
    while c.get('/readyz').status_code != 200:
      assert time.monotonic() < deadline
      time.sleep(0.05)
    assert c.get('/readyz').json() == {'status': 'ready', 'model': cropper.model_id}


# ------------------------------------------------------------------------------------------------
# Bad inputs: a 4xx with one line of JSON, and the server stays up.
# ------------------------------------------------------------------------------------------------


def _good_png():
  return _png(_image(0))


def _truncated_png():
  data = _good_png()
  return data[: len(data) // 2]


BAD_REQUESTS = {
    'truncated': (400, lambda c: _post(c, _truncated_png(), text=TEXT)),
    'zero_bytes': (400, lambda c: _post(c, b'', text=TEXT)),
    'not_an_image': (415, lambda c: _post(c, b'%PDF-1.4 this is no picture' * 10, text=TEXT)),
    'decompression_bomb': (413, lambda c: _post(c, _bomb_png(), text=TEXT)),
    'json_body': (415, lambda c: c.post('/v1/crops', json={'image': 'x', 'text': TEXT})),
    'urlencoded_body': (415, lambda c: c.post('/v1/crops', data={'text': TEXT})),
    'huge_text': (413, lambda c: _post(c, _good_png(), text='dog ' * 1000)),
    'bad_aspect_ratio': (422, lambda c: _post(c, _good_png(), text=TEXT, aspect_ratio='1000:1')),
    'unparsable_aspect_ratio': (
        422,
        lambda c: _post(c, _good_png(), text=TEXT, aspect_ratio='wide'),
    ),
    'top_k_zero': (422, lambda c: _post(c, _good_png(), text=TEXT, top_k=0)),
    'top_k_above_limit': (422, lambda c: _post(c, _good_png(), text=TEXT, top_k=21)),
    'top_k_not_a_number': (422, lambda c: _post(c, _good_png(), text=TEXT, top_k='three')),
    'min_size_nan': (422, lambda c: _post(c, _good_png(), text=TEXT, min_size='nan')),
    'unknown_mode': (422, lambda c: _post(c, _good_png(), text=TEXT, mode='fancy')),
    'whitespace_text': (422, lambda c: _post(c, _good_png(), text='   ')),
    'no_text_no_example': (422, lambda c: _post(c, _good_png())),
    'text_and_example': (422, lambda c: _post(c, _good_png(), text=TEXT, query_image=_good_png())),
    'bad_example_image': (400, lambda c: _post(c, _good_png(), query_image=_truncated_png())),
    'missing_image': (422, lambda c: c.post('/v1/crops', files={'text': (None, TEXT)})),
    'server_path_as_image': (
        422,
        lambda c: c.post(
            '/v1/crops', files={'image': (None, str(REPO / 'README.md')), 'text': (None, TEXT)}
        ),
    ),
    'upload_too_large': (413, lambda c: _post(c, os.urandom(400_000), text=TEXT)),
    'chunked_upload_too_large': (
        413,
        lambda c: c.post(
            '/v1/crops',
            content=(b'x' * 100_000 for _ in range(5)),
            headers={'content-type': 'multipart/form-data; boundary=b'},
        ),
    ),
    'jpg_width_too_large': (
        422,
        lambda c: _post(c, _good_png(), '/v1/crop.jpg', text=TEXT, width=5000),
    ),
    'jpg_no_crop_fits': (
        422,
        lambda c: _post(c, _good_png(), '/v1/crop.jpg', text=TEXT, min_size=10_000),
    ),
    'unknown_path': (404, lambda c: c.get('/v1/nothing')),
}


@pytest.mark.parametrize('name', sorted(BAD_REQUESTS))
def test_bad_input_is_a_4xx_with_one_line_and_the_server_stays_up(client, name):
  status, send = BAD_REQUESTS[name]
  message = _assert_error(send(client), status)
  if name == 'decompression_bomb':
    assert '100000x100000' in message and 'limit' in message
  if name == 'server_path_as_image':
    assert 'README' not in message  # the path was never opened
  assert _post(client, _good_png(), text=TEXT, top_k=1).status_code == 200


def test_bomb_is_refused_before_decoding(client, monkeypatch):
  """The pixel limit is checked on the header: no decoder runs for a bomb."""
  from PIL import ImageFile  # pylint: disable=g-import-not-at-top

  loads = []
  original = ImageFile.ImageFile.load
  monkeypatch.setattr(
      ImageFile.ImageFile, 'load', lambda self, *a: loads.append(self.size) or original(self, *a)
  )
  _assert_error(_post(client, _bomb_png(), text=TEXT), 413)
  assert loads == []


def test_bearer_token(cropper, images):
  app = serve_http.create_app(cropper, serve_service.ServeConfig(token='s3cret-token', **FAST))
  data, _ = images[0]
  with testclient.TestClient(app) as c:
    r = _post(c, data, text=TEXT)
    assert 'missing' in _assert_error(r, 401) and r.headers['www-authenticate'] == 'Bearer'
    r = c.post(
        '/v1/crops',
        files={'image': ('p.png', data)},
        data={'text': TEXT},
        headers={'Authorization': 'Bearer wrong'},
    )
    assert 'wrong' in _assert_error(r, 401)
    r = c.post(
        '/v1/crops',
        files={'image': ('p.png', data)},
        data={'text': TEXT},
        headers={'Authorization': 'Bearer s3cret-token'},
    )
    assert r.status_code == 200, r.text
    assert c.get('/healthz').status_code == 200  # probes stay open


def test_cors_is_off_by_default_and_opt_in(client, cropper):
  preflight = {'Origin': 'https://cms.example', 'Access-Control-Request-Method': 'POST'}
  assert 'access-control-allow-origin' not in client.options('/v1/crops', headers=preflight).headers
  assert 'access-control-allow-origin' not in client.get('/healthz', headers=preflight).headers
  app = serve_http.create_app(
      cropper, serve_service.ServeConfig(cors_origins=('https://cms.example',), **FAST)
  )
  with testclient.TestClient(app) as c:
    r = c.options('/v1/crops', headers=preflight)
    assert r.headers['access-control-allow-origin'] == 'https://cms.example'
    r = c.options('/v1/crops', headers={**preflight, 'Origin': 'https://evil.example'})
    assert 'access-control-allow-origin' not in r.headers


def test_request_log_has_status_and_latency(client, caplog):
  with caplog.at_level(logging.INFO, logger='clipcrop_jax.serve'):
    client.get('/healthz', headers={'X-Request-Id': 'req-42'})
  lines = [r.getMessage() for r in caplog.records if r.name == 'clipcrop_jax.serve']
  assert any(line.startswith('req-42 GET /healthz 200 ') and line.endswith(' ms') for line in lines)


# ------------------------------------------------------------------------------------------------
# Encoding cache and micro-batching.
# ------------------------------------------------------------------------------------------------


def test_cache_hit_equals_cold_and_skips_the_encoder(cropper, images):
  app = serve_http.create_app(cropper, serve_service.ServeConfig(**FAST))
  service = app.state.service
  (a, a_path), (b, _) = images[3], images[4]
  with testclient.TestClient(app) as c:
    first = _post(c, a, text='the blue disc', top_k=3)
    assert first.headers['x-encoding-cache'] == 'miss'
    assert service.images_encoded == 1
    second = _post(c, a, text=TEXT, top_k=3)  # another text, same image
    assert second.headers['x-encoding-cache'] == 'hit'
    assert service.images_encoded == 1  # the image encoder did not run again
    _assert_same_crops(second.json()['crops'], cropper.crop(a_path, text=TEXT, top_k=3))
    assert _post(c, b, text=TEXT).headers['x-encoding-cache'] == 'miss'
    assert service.images_encoded == 2


def test_cache_is_bounded_in_bytes(cropper, images):
  one = serve_service.encoding_nbytes(cropper.encode(_image(0)))
  app = serve_http.create_app(
      cropper, serve_service.ServeConfig(cache_bytes=one + one // 2, **FAST)
  )
  service = app.state.service
  (a, _), (b, _) = images[0], images[1]
  with testclient.TestClient(app) as c:
    assert _post(c, a, text=TEXT).headers['x-encoding-cache'] == 'miss'
    assert _post(c, b, text=TEXT).headers['x-encoding-cache'] == 'miss'  # evicts a
    assert len(service.cache) == 1 and service.cache.bytes == one
    assert _post(c, b, text=TEXT).headers['x-encoding-cache'] == 'hit'
    assert _post(c, a, text=TEXT).headers['x-encoding-cache'] == 'miss'


def test_encoding_cache_lru_order():
  enc = cropper_lib.Encoding((2, 2), {'x': np.zeros(10, np.float32)})  # 40 bytes
  cache = serve_service.EncodingCache(100)
  cache.put('a', enc)
  cache.put('b', enc)
  assert cache.get('a') is enc  # a is now the most recent
  cache.put('c', enc)  # evicts b
  assert cache.get('b') is None and cache.get('a') is enc and cache.get('c') is enc
  assert cache.bytes == 80 and (cache.hits, cache.misses) == (3, 1)
  serve_service.EncodingCache(39).put('big', enc)  # larger than the cache: not stored


def test_micro_batcher_batches_and_drains_on_stop():
  batches = []

  def run(jobs):
    batches.append([job.key for job in jobs])
    for job in jobs:
      job.future.set_result(job.key)

  batcher = serve_service.MicroBatcher(run, max_batch=3, wait_s=0.3)
  jobs = [serve_service.Job(str(i), None, None, False) for i in range(7)]
  for job in jobs:
    batcher.submit(job)
  jobs[6].future.cancel()  # timed out before its batch: skipped
  batcher.start()
  batcher.stop(timeout=10)
  assert batches == [['0', '1', '2'], ['3', '4', '5']]
  assert [job.future.result() for job in jobs[:6]] == [str(i) for i in range(6)]


def _concurrently(fn, args: list) -> list:
  barrier = threading.Barrier(len(args))

  def call(arg):
    barrier.wait()
    return fn(arg)

  with concurrent.futures.ThreadPoolExecutor(len(args)) as pool:
    return list(pool.map(call, args))


def test_micro_batched_answers_equal_one_at_a_time(cropper, images):
  config = serve_service.ServeConfig(max_batch=4, batch_wait_ms=1500, warmup=False)
  app = serve_http.create_app(cropper, config)
  with serve_testing.BackgroundServer(app, config) as server, httpx.Client(timeout=60) as http:

    def ask(i):
      data, _ = images[i]
      return http.post(
          server.url + '/v1/crops',
          files={'image': ('p.png', data)},
          data={'text': TEXT, 'top_k': '3'},
      )

    answers = _concurrently(ask, [0, 1, 2, 3])
  assert app.state.service.batcher.batch_sizes == {4: 1}  # one forward for all four
  for i, r in enumerate(answers):
    assert r.status_code == 200, r.text
    _assert_same_crops(r.json()['crops'], cropper.crop(images[i][1], text=TEXT, top_k=3))


def test_overload_gets_503_and_no_lost_or_duplicated_answers(cropper, images):
  config = serve_service.ServeConfig(max_queue=3, max_batch=2, batch_wait_ms=400, warmup=False)
  app = serve_http.create_app(cropper, config)
  expected = {i: cropper.crop(images[i % 6][1], text=TEXT, top_k=2) for i in range(6)}
  with serve_testing.BackgroundServer(app, config) as server, httpx.Client(timeout=60) as http:

    def ask(i):
      data, _ = images[i % 6]
      return i, http.post(
          server.url + '/v1/crops',
          files={'image': ('p.png', data)},
          data={'text': TEXT, 'top_k': '2'},
          headers={'X-Request-Id': f'r{i}'},
      )

    answers = _concurrently(ask, list(range(18)))
    after = http.post(
        server.url + '/v1/crops', files={'image': ('p.png', images[0][0])}, data={'text': TEXT}
    )
  statuses = [r.status_code for _, r in answers]
  assert set(statuses) == {200, 503} and statuses.count(200) >= 3
  for i, r in answers:
    assert r.headers['x-request-id'] == f'r{i}'  # each answer belongs to its own request
    if r.status_code == 503:
      assert 'busy' in _assert_error(r, 503) and int(r.headers['retry-after']) >= 1
    else:
      _assert_same_crops(r.json()['crops'], expected[i % 6])
  assert after.status_code == 200
  assert app.state.service.in_progress == 0


def test_timeout_is_504_and_the_job_is_dropped(cropper, images):
  app = serve_http.create_app(
      cropper,
      serve_service.ServeConfig(timeout_s=0.3, max_batch=2, batch_wait_ms=1500, warmup=False),
  )
  service = app.state.service
  with testclient.TestClient(app) as c:
    assert 'within 0.3 s' in _assert_error(_post(c, images[5][0], text=TEXT), 504)
    time.sleep(1.6)  # the batcher wakes up: the cancelled job is skipped
    assert service.images_encoded == 0 and service.in_progress == 0


# ------------------------------------------------------------------------------------------------
# Command line: bad flags, graceful shutdown.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    'argv, message',
    [
        (['--max-batch', '0'], 'max_batch must be >= 1'),
        (['--timeout-s', '0'], 'timeout_s must be > 0'),
        (['--token-file', '/nonexistent/token'], '--token-file /nonexistent/token'),
        (['--keyword-pipeline', ''], 'keyword'),
    ],
)
def test_cli_refuses_bad_flags_before_loading(argv, message, capsys, tmp_path):
  assert serve_http.main(['--random-init', 'no-such-config'] + argv) == 2
  assert message in capsys.readouterr().err


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_cli_serves_and_shuts_down_gracefully(images, tmp_path):
  """SIGTERM while a request waits in the batcher: the request is answered, the exit is clean."""
  port = _free_port()
  token = tmp_path / 'token'
  token.write_text('tok-123\n')
  proc = subprocess.Popen(
      [
          sys.executable,
          '-m',
          'clipcrop_jax.serve',
          '--random-init',
          'tiny',
          '--port',
          str(port),
          '--keyword-pipeline',
          'rules',
          '--max-batch',
          '2',
          '--batch-wait-ms',
          '2000',
          '--token-file',
          str(token),
      ],
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
  )
  url = f'http://127.0.0.1:{port}'
  try:
    serve_testing.wait_until_ready(url, lambda: proc.poll() is None, timeout_s=120)
    with httpx.Client(timeout=60) as http:
      with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(
            http.post,
            url + '/v1/crops',
            files={'image': ('p.png', images[0][0])},
            data={'text': TEXT},
            headers={'Authorization': 'Bearer tok-123'},
        )
        time.sleep(0.7)  # admitted, waiting for a batch partner
        proc.send_signal(signal.SIGTERM)
        answer = pending.result()
    assert answer.status_code == 200 and answer.json()['crops'], answer.text
    # uvicorn re-raises the SIGTERM it caught once the shutdown is done: a supervisor sees the
    # usual 'terminated by SIGTERM'.
    assert proc.wait(60) in (0, -signal.SIGTERM)
  finally:
    if proc.poll() is None:
      proc.kill()
  log = proc.stdout.read()
  assert ' POST /v1/crops 200 ' in log and 'finishing queued work' in log


def test_one_status_table_over_typed_refusals():
  """`serving.errors.STATUS` maps types (never message words) to statuses; the pixel-limit answer
  drops the API's way round the limit."""
  too_large = pp.ImageTooLargeError('image', 300, 200, 1000)
  cases = [
      (too_large, 413),
      (pp.NotAnImageError('image: not a recognised image file'), 415),
      (pp.ImageError('image: corrupt or truncated image data (x)'), 400),
      (serve_errors.Busy('busy', {'Retry-After': '2'}), 503),
      (serve_errors.TextTooLong('text has 9 characters'), 413),
      (serve_errors.InvalidRequest('top_k must be >= 1, got 0'), 422),
      (serve_errors.TimedOut('no answer within 1 s'), 504),
      (RuntimeError('bug'), 500),
  ]
  for error, status in cases:
    assert serve_errors.status_of(error) == status, error
  assert serve_errors.message_of(too_large) == too_large.summary
  assert 'max_pixels=60000' in str(too_large) and 'max_pixels' not in too_large.summary
  assert serve_errors.headers_of(cases[3][0]) == {'Retry-After': '2'}
  assert 'pass --max-pixels 60000' in str(too_large.allowed_by('pass --max-pixels 60000'))
