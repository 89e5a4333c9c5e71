r"""HTTP crop service and playground page (FastAPI + uvicorn; the `serve` extra).

  python -m clipcrop_jax.serve --checkpoint MODEL_DIR_OR_OWL_CHECKPOINT   # 127.0.0.1:8000
  python -m clipcrop_jax.serve --random-init tiny --port 8080              # demo, no weights

  curl -F image=@photo.jpg -F text="three white dogs" -F top_k=3 -F aspect_ratio=16:9 \
      http://127.0.0.1:8000/v1/crops
  curl -F image=@photo.jpg -F text="the boat" -F width=640 -F height=360 \
      http://127.0.0.1:8000/v1/crop.jpg -o boat.jpg

Endpoints: `POST /v1/crops` (JSON crops), `POST /v1/crop.jpg` (the best crop as a JPEG), `GET /`
(the playground page, `assets/`), `/healthz`, `/readyz`, `/openapi.json` (+ `/docs`).
Requests are multipart forms with an uploaded `image` file and `text` or a `query_image` file;
the service never fetches a URL and never opens a server-side path named in a request.

How a request is served (each step bounded, see `ServeConfig`):
1. `_Gate` (ASGI middleware): request id, bearer token, content type, upload bytes, access log.
2. Admission: at most `max_queue` requests are inside the service at once; more get 503 with
   `Retry-After` at once, so the queue never grows beyond its bound.
3. In a worker thread: the arguments are checked (`cropper.check_request`, the API's checks, plus
   the service's text and top-k limits) and the query embedded (cached); the image bytes are
   hashed (SHA-256) and looked up in the encoding cache (`EncodingCache`, LRU bounded in bytes);
   on a miss the image is decoded to the model's input (`preprocessing.load_for_model`: the pixel
   limit is checked on the header, before decoding).
4. `MicroBatcher`: one thread takes the first waiting job, waits up to `batch_wait_ms` for at most
   `max_batch` jobs, runs the image encoder once on the batch's cache misses
   (`ClipCropper.encode_batch`) and then each job's decoder (`ClipCropper.crop_checked`).
5. The answer, or 504 after `timeout_s`. Errors are 4xx/5xx with `{"error": "one line"}`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import dataclasses
import hashlib
import hmac
import io
import logging
import math
import pathlib
import queue
import re
import socket
import sys
import threading
import time
import urllib.request
from typing import Any, Callable, Optional, Sequence
import uuid

try:
  import fastapi
  import fastapi.exceptions
  from fastapi import responses as fastapi_responses
  from fastapi import staticfiles
  import pydantic
  from starlette import concurrency
  from starlette import exceptions as starlette_exceptions
  import uvicorn
except ImportError as e:  # pragma: no cover - depends on the installation
  raise ImportError(f'clipcrop_jax.serve needs the serve extra ({e}): '
                    "pip install 'clipcrop-jax[serve]'") from None
import jax
import numpy as np
from PIL import Image

from clipcrop_jax import cropper as cropper_lib
from clipcrop_jax.owlvit import preprocessing as pp

LOG = logging.getLogger('clipcrop_jax.serve')
ASSETS = pathlib.Path(__file__).parent / 'assets'
API_PREFIX = '/v1/'
MB = 1 << 20
_REQUEST_ID = re.compile(r'[A-Za-z0-9._-]{1,64}')


@dataclasses.dataclass(frozen=True)
class ServeConfig:
  """Service limits and tuning (every one a command-line flag of the same name, `-` for `_`).

  Attributes:
    max_batch: images per encoder forward (1 turns micro-batching off).
    batch_wait_ms: how long a batch's first request waits for others (0: take what is queued).
    max_queue: requests inside the service at once (decoding, waiting or running); more get 503.
    timeout_s: per request, from admission to answer; then 504.
    max_upload_bytes: the whole request body.
    max_pixels: decoded pixels (width x height from the header, checked before decoding).
    max_text_chars: characters of `text`.
    max_top_k: largest `top_k`.
    max_output_side: largest `width` / `height` of `/v1/crop.jpg`.
    cache_bytes: encoding cache size (bytes of the cached arrays; 0 disables it).
    token: when set, `/v1/*` needs `Authorization: Bearer <token>`.
    cors_origins: origins allowed by CORS (none: CORS off, the default).
    warmup: compile every batch shape before `/readyz` says ready.
  """

  max_batch: int = 8
  batch_wait_ms: float = 5.0
  max_queue: int = 64
  timeout_s: float = 30.0
  max_upload_bytes: int = 20 * MB
  max_pixels: int = 50_000_000
  max_text_chars: int = 500
  max_top_k: int = 50
  max_output_side: int = 4096
  cache_bytes: int = 256 * MB
  token: Optional[str] = None
  cors_origins: tuple[str, ...] = ()
  warmup: bool = True

  def __post_init__(self):
    for name in ('max_batch', 'max_queue', 'max_upload_bytes', 'max_pixels', 'max_text_chars',
                 'max_top_k', 'max_output_side'):
      cropper_lib.check_int(name, getattr(self, name))
    cropper_lib.check_int('cache_bytes', self.cache_bytes, minimum=0)
    cropper_lib.check_real('batch_wait_ms', self.batch_wait_ms)
    if cropper_lib.check_real('timeout_s', self.timeout_s) == 0:
      raise ValueError('timeout_s must be > 0')
    if self.token is not None and (not self.token or self.token != self.token.strip()):
      raise ValueError('token must be non-empty, without surrounding whitespace')


class ServiceError(Exception):
  """An answer other than 200: HTTP `status`, a one-line `message`, extra `headers`."""

  def __init__(self, status: int, message: str, headers: Optional[dict[str, str]] = None):
    super().__init__(message)
    self.status = status
    self.message = ' '.join(str(message).split())
    self.headers = headers or {}


def error_response(status: int, message: str, headers: Optional[dict[str, str]] = None
                   ) -> fastapi_responses.JSONResponse:
  return fastapi_responses.JSONResponse({'error': ' '.join(str(message).split())}, status,
                                        headers=headers)


# ------------------------------------------------------------------------------------------------
# Encoding cache and micro-batching.
# ------------------------------------------------------------------------------------------------


def encoding_nbytes(encoding: cropper_lib.Encoding) -> int:
  """Bytes held by an Encoding's arrays."""
  return sum(int(x.nbytes) for x in jax.tree.leaves(encoding.encoded))


class EncodingCache:
  """Encodings by key (the image bytes' SHA-256), least recently used first out, bounded by the
  bytes of their arrays. Thread-safe; `hits` / `misses` count `get` calls."""

  def __init__(self, max_bytes: int):
    self.max_bytes = max_bytes
    self.bytes = 0
    self.hits = self.misses = 0
    self._items: collections.OrderedDict[str, tuple[cropper_lib.Encoding, int]] = (
        collections.OrderedDict())
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._items)

  def get(self, key: str) -> Optional[cropper_lib.Encoding]:
    with self._lock:
      item = self._items.get(key)
      if item is None:
        self.misses += 1
        return None
      self.hits += 1
      self._items.move_to_end(key)
      return item[0]

  def put(self, key: str, encoding: cropper_lib.Encoding) -> None:
    size = encoding_nbytes(encoding)
    with self._lock:
      if key in self._items or size > self.max_bytes:
        return
      self._items[key] = (encoding, size)
      self.bytes += size
      while self.bytes > self.max_bytes:
        _, (_, evicted) = self._items.popitem(last=False)
        self.bytes -= evicted


@dataclasses.dataclass
class Job:
  """One admitted request on its way through the batcher.

  `image` is the cached `Encoding` (a hit) or the `ModelInput` to encode; `key` the image bytes'
  SHA-256; `future` receives the list of `Crop` or the exception.
  """

  key: str
  image: Any
  request: Any  # cropper._Request from check_request
  cache_hit: bool
  future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)


_STOP = object()


class MicroBatcher:
  """One worker thread that runs jobs in batches.

  It takes the first waiting job, then waits up to `wait_s` (from that moment) for more, at most
  `max_batch` in all, and calls `run(jobs)`, which must settle every job's future. Jobs whose
  future was cancelled (timed out) before the batch started are skipped. `stop()` lets the jobs
  already submitted finish (graceful shutdown) and ends the thread.
  """

  def __init__(self, run: Callable[[list[Job]], None], max_batch: int, wait_s: float):
    self._run = run
    self.max_batch = max_batch
    self.wait_s = wait_s
    self._queue: queue.Queue = queue.Queue()
    self._thread = threading.Thread(target=self._loop, name='clipcrop-batcher', daemon=True)
    self.batch_sizes: collections.Counter[int] = collections.Counter()

  def start(self) -> None:
    self._thread.start()

  def submit(self, job: Job) -> concurrent.futures.Future:
    self._queue.put(job)
    return job.future

  def stop(self, timeout: Optional[float] = None) -> None:
    if self._thread.is_alive():
      self._queue.put(_STOP)
      self._thread.join(timeout)

  def _collect(self, first: Job) -> tuple[list[Job], bool]:
    """(the batch started by `first`, whether a stop request was met)."""
    jobs, deadline = [first], time.monotonic() + self.wait_s
    while len(jobs) < self.max_batch:
      remaining = deadline - time.monotonic()
      try:
        job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
      except queue.Empty:
        break
      if job is _STOP:
        return jobs, True
      jobs.append(job)
    return jobs, False

  def _loop(self) -> None:
    stopping = False
    while not stopping:
      first = self._queue.get()
      if first is _STOP:
        break
      jobs, stopping = self._collect(first)
      jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
      if not jobs:
        continue
      self.batch_sizes[len(jobs)] += 1
      try:
        self._run(jobs)
      except BaseException as e:  # pylint: disable=broad-except  # never leave a future unsettled
        for job in jobs:
          if not job.future.done():
            job.future.set_exception(e)


# ------------------------------------------------------------------------------------------------
# The service (no HTTP in here).
# ------------------------------------------------------------------------------------------------


def _named_file(data: bytes, name: str) -> io.BytesIO:
  """`data` as a file object whose name (used in ImageError messages) is the form field."""
  f = io.BytesIO(data)
  f.name = name
  return f


def _image_error(e: pp.ImageError) -> ServiceError:
  """413 for the pixel limit, 415 for bytes that are no image, 400 for the rest (empty,
  truncated, corrupt)."""
  message = str(e)
  if 'above the decoding limit' in message:
    return ServiceError(413, message.split('; to decode it anyway')[0])
  if 'not a recognised image file' in message:
    return ServiceError(415, message)
  return ServiceError(400, message)


@dataclasses.dataclass
class CropFields:
  """The form fields of a crop request (None: the API default)."""

  text: Optional[str] = None
  top_k: Optional[int] = None
  aspect_ratio: Optional[str] = None
  min_size: Optional[float] = None
  mode: Optional[str] = None


class CropService:
  """The crop service behind the HTTP layer: admission, checks, cache, batching.

  Attributes:
    cropper: the `ClipCropper` answering every request.
    config: the `ServeConfig`.
    cache: the `EncodingCache`.
    batcher: the `MicroBatcher`.
    ready: set when the warm-up (compilation) is done.
    images_encoded: images that went through the image encoder.
  """

  def __init__(self, cropper: cropper_lib.ClipCropper, config: ServeConfig = ServeConfig()):
    self.cropper = cropper
    self.config = config
    self.cache = EncodingCache(config.cache_bytes)
    self.batcher = MicroBatcher(self._run_batch, config.max_batch, config.batch_wait_ms / 1000)
    self.ready = threading.Event()
    self.images_encoded = 0
    self._admitted = 0
    self._lock = threading.Lock()
    self._batch_seconds = 0.1  # moving average, for Retry-After

  # ---------------------------------------------------------------- life cycle

  def start(self) -> None:
    self.batcher.start()
    if self.config.warmup:
      threading.Thread(target=self._warm_up, name='clipcrop-warmup', daemon=True).start()
    else:
      self.ready.set()

  def stop(self) -> None:
    """Finishes the jobs already submitted, then stops the batcher."""
    self.batcher.stop()

  def _warm_up(self) -> None:
    """Compiles the encoder for every batch shape the batcher can make, and the decoder."""
    started = time.monotonic()
    size = self.cropper.config.owlvit_config.image_size
    blank = cropper_lib.ModelInput(np.full((size, size, 3), 0.5, np.float32), (size, size))
    batch = 1
    while True:
      encodings = self.cropper.encode_batch([blank] * batch, batch_size=batch)
      if batch >= self.config.max_batch:
        break
      batch *= 2
    request = self.cropper.check_request(text='a photo', mode='main')
    self.cropper.crop_checked(encodings[0], request)
    LOG.info('warm-up done in %.1f s; ready', time.monotonic() - started)
    self.ready.set()

  # ---------------------------------------------------------------- admission

  def admit(self) -> None:
    """Takes a place in the service or raises ServiceError 503 (with Retry-After)."""
    with self._lock:
      if self._admitted >= self.config.max_queue:
        waves = math.ceil(self._admitted / self.config.max_batch)
        retry = min(60, max(1, math.ceil(waves * self._batch_seconds)))
        raise ServiceError(503, f'busy: {self._admitted} requests in progress (max_queue '
                           f'{self.config.max_queue}); retry later', {'Retry-After': str(retry)})
      self._admitted += 1

  def release(self) -> None:
    with self._lock:
      self._admitted -= 1

  @property
  def in_progress(self) -> int:
    return self._admitted

  # ---------------------------------------------------------------- requests

  def check_fields(self, fields: CropFields) -> None:
    """The checks that need no image (the API's `check_crop_arguments` + the service's limits)."""
    top_k = 5 if fields.top_k is None else fields.top_k
    cropper_lib.check_crop_arguments(top_k, fields.aspect_ratio, fields.min_size)
    if top_k > self.config.max_top_k:
      raise ValueError(f'top_k must be <= {self.config.max_top_k}, got {top_k}')
    if fields.text is not None and len(fields.text) > self.config.max_text_chars:
      raise ServiceError(413, f'text has {len(fields.text)} characters; the limit is '
                         f'{self.config.max_text_chars}')

  def make_job(self, image: bytes, query_image: Optional[bytes], fields: CropFields) -> Job:
    """Checks the request, embeds its query and looks the image up / decodes it (blocking: run
    it in a worker thread). Raises ServiceError, ValueError or TypeError."""
    self.check_fields(fields)
    query = None
    if query_image is not None:
      try:
        query = pp.load_image(_named_file(query_image, 'query_image'), self.config.max_pixels)
      except pp.ImageError as e:
        raise _image_error(e) from None
    request = self.cropper.check_request(
        text=fields.text, query_image=query, top_k=5 if fields.top_k is None else fields.top_k,
        aspect_ratio=fields.aspect_ratio, min_size=fields.min_size, mode=fields.mode)
    key = hashlib.sha256(image).hexdigest()
    encoding = self.cache.get(key) if self.config.cache_bytes else None
    if encoding is not None:
      return Job(key, encoding, request, cache_hit=True)
    size = self.cropper.config.owlvit_config.image_size
    try:
      pixels, image_hw = pp.load_for_model(_named_file(image, 'image'), size,
                                           max_pixels=self.config.max_pixels)
    except pp.ImageError as e:
      raise _image_error(e) from None
    return Job(key, cropper_lib.ModelInput(pixels, image_hw), request, cache_hit=False)

  def _run_batch(self, jobs: list[Job]) -> None:
    """The batcher's work: one encoder forward for the batch's distinct uncached images, then
    each job's crops."""
    started = time.monotonic()
    to_encode: dict[str, cropper_lib.ModelInput] = {}
    for job in jobs:
      if isinstance(job.image, cropper_lib.ModelInput):
        cached = self.cache.get(job.key) if self.config.cache_bytes else None
        if cached is None:
          to_encode.setdefault(job.key, job.image)
        else:  # encoded by an earlier batch since the job was made
          job.image, job.cache_hit = cached, True
    encoded = dict(zip(to_encode, self.cropper.encode_batch(
        list(to_encode.values()), batch_size=self.config.max_batch)))
    self.images_encoded += len(encoded)
    for key, encoding in encoded.items():
      if self.config.cache_bytes:
        self.cache.put(key, encoding)
    for job in jobs:
      try:
        job.future.set_result(self.cropper.crop_checked(encoded.get(job.key, job.image),
                                                        job.request))
      except Exception as e:  # pylint: disable=broad-except  # this job's error, not the batch's
        job.future.set_exception(e)
    self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * (time.monotonic() - started)

  async def crop(self, image: bytes, query_image: Optional[bytes], fields: CropFields
                 ) -> tuple[list[cropper_lib.Crop], Job]:
    """Admission, checks, batching, timeout: the crops (best first) and the finished job."""
    self.admit()
    try:
      async def run() -> tuple[list[cropper_lib.Crop], Job]:
        job = await concurrency.run_in_threadpool(self.make_job, image, query_image, fields)
        return await asyncio.wrap_future(self.batcher.submit(job)), job
      return await asyncio.wait_for(run(), self.config.timeout_s)
    except asyncio.TimeoutError:
      raise ServiceError(504, f'no answer within {self.config.timeout_s:g} s') from None
    except (ValueError, TypeError) as e:
      raise ServiceError(422, str(e)) from None
    finally:
      self.release()


# ------------------------------------------------------------------------------------------------
# HTTP.
# ------------------------------------------------------------------------------------------------


class QueryOut(pydantic.BaseModel):
  text: str = pydantic.Field(description="the query: the caption, a keyword or '<example image>'")
  role: str = pydantic.Field(description="'caption', 'subject' or 'context'")
  box: Optional[list[float]] = pydantic.Field(
      description='x0, y0, x1, y1 (pixels) of what the query selected; null: nothing')
  score: float = pydantic.Field(description="the detector's confidence in it, 0..1")
  in_union: bool = pydantic.Field(description='part of the union box the crops start from')


class CropOut(pydantic.BaseModel):
  box: list[float] = pydantic.Field(description='x0, y0, x1, y1 in pixels of the uploaded image')
  score: float = pydantic.Field(description='quality score (higher is better)')
  focal_point: list[float] = pydantic.Field(description='x, y: the centre of the crop, pixels')
  fused: bool = pydantic.Field(
      False, description='the mean box of the fuse_top_k best predictions (box voting), ranked '
      'first whatever its score')
  queries: list[QueryOut] = pydantic.Field(
      [], description='the queries used and what each selected (the same for every crop)')


class CropsOut(pydantic.BaseModel):
  crops: list[CropOut] = pydantic.Field(description='best first')
  model: str = pydantic.Field(description='where the weights came from')
  image_size: list[int] = pydantic.Field(description='width, height of the uploaded image')


class ErrorOut(pydantic.BaseModel):
  error: str = pydantic.Field(description='what is wrong, in one line')


ERROR_RESPONSES = {status: {'model': ErrorOut, 'description': text} for status, text in (
    (400, 'unreadable image (empty, truncated, corrupt)'), (401, 'missing or wrong bearer token'),
    (413, 'upload, image pixels or text above the limit'),
    (415, 'not multipart/form-data, or the upload is not an image'),
    (422, 'a bad or missing field'), (503, 'busy: retry after Retry-After seconds'),
    (504, 'no answer within the per-request timeout'))}


class _Gate:
  """ASGI middleware in front of everything: request id, access log with latency, and for the
  `/v1/` endpoints the bearer token, the multipart content type and the upload-byte limit (a
  declared Content-Length is refused before reading; a chunked body when it passes the limit)."""

  def __init__(self, app, config: ServeConfig):
    self.app = app
    self.config = config

  async def __call__(self, scope, receive, send):
    if scope['type'] != 'http':
      return await self.app(scope, receive, send)
    started = time.perf_counter()
    headers = {k.decode('latin-1').lower(): v.decode('latin-1') for k, v in scope['headers']}
    rid = headers.get('x-request-id', '')
    rid = rid if _REQUEST_ID.fullmatch(rid) else uuid.uuid4().hex[:16]
    status = [0]

    async def send_with_id(message):
      if message['type'] == 'http.response.start':
        status[0] = message['status']
        message['headers'] = list(message.get('headers', [])) + [(b'x-request-id', rid.encode())]
      await send(message)

    try:
      error = self._refusal(scope, headers)
      if error is not None:
        await error(scope, receive, send_with_id)
      else:
        await self.app(scope, self._limited(receive, scope), send_with_id)
    finally:
      LOG.info('%s %s %s %d %.1f ms', rid, scope['method'], scope['path'], status[0],
               (time.perf_counter() - started) * 1000)

  def _refusal(self, scope, headers) -> Optional[fastapi_responses.JSONResponse]:
    if not scope['path'].startswith(API_PREFIX):
      return None
    if self.config.token is not None:
      given = headers.get('authorization', '')
      if not given.startswith('Bearer '):
        return error_response(401, 'missing bearer token (Authorization: Bearer <token>)',
                              {'WWW-Authenticate': 'Bearer'})
      if not hmac.compare_digest(given[len('Bearer '):].encode(), self.config.token.encode()):
        return error_response(401, 'wrong bearer token', {'WWW-Authenticate': 'Bearer'})
    if scope['method'] == 'POST' and not headers.get('content-type', '').startswith(
        'multipart/form-data'):
      return error_response(415, f"content type {headers.get('content-type', '(none)')!r}; "
                            'expected multipart/form-data with an image file field')
    length = headers.get('content-length')
    if length is not None and (not length.isdigit() or int(length) > self.config.max_upload_bytes):
      return error_response(413, f'request body of {length} bytes is above the limit of '
                            f'{self.config.max_upload_bytes} bytes')
    return None

  def _limited(self, receive, scope):
    if not scope['path'].startswith(API_PREFIX):
      return receive
    received = 0

    async def limited_receive():
      nonlocal received
      message = await receive()
      received += len(message.get('body', b''))
      if received > self.config.max_upload_bytes:
        raise starlette_exceptions.HTTPException(
            413, f'request body is above the limit of {self.config.max_upload_bytes} bytes')
      return message
    return limited_receive


def _crop_fields(
    text: Optional[str] = fastapi.Form(None, description='what to crop to'),
    top_k: Optional[int] = fastapi.Form(None, description='number of crops (default 5)'),
    aspect_ratio: Optional[str] = fastapi.Form(None, description="'16:9', '4/3', 1.5"),
    min_size: Optional[float] = fastapi.Form(None, description='min crop side, pixels'),
    mode: Optional[str] = fastapi.Form(None, description='full, main, key, base or image'),
) -> CropFields:
  return CropFields(text or None, top_k, aspect_ratio or None, min_size, mode or None)


async def _read_upload(upload: Any, name: str) -> Optional[bytes]:
  """The bytes of an uploaded file field; a plain text field is refused (never opened as a
  path)."""
  if upload is None or upload == '':
    return None
  if not hasattr(upload, 'read'):
    raise ServiceError(422, f'{name} must be an uploaded file (multipart file field), not text')
  return await upload.read()


def _crops_json(crops: Sequence[cropper_lib.Crop]) -> list[dict[str, Any]]:
  return [{'box': list(c.box), 'score': c.score, 'focal_point': list(c.focal_point),
           'fused': c.fused, 'queries': [q.to_json() for q in c.queries]} for c in crops]


def _resized_jpeg(image: bytes, box: Sequence[float], width: Optional[int],
                  height: Optional[int], max_pixels: int) -> bytes:
  """The box cut from the full-resolution image (EXIF-oriented, as the model saw it), resized to
  width x height (one of them: the other keeps the crop's aspect ratio), as JPEG bytes."""
  try:
    rgb = pp.load_image(_named_file(image, 'image'), max_pixels)
  except pp.ImageError as e:
    raise _image_error(e) from None
  x0, y0, x1, y1 = (int(round(v)) for v in box)
  x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
  crop = Image.fromarray(rgb[y0:y1, x0:x1])
  if width or height:
    w = width or max(1, round(height * crop.width / crop.height))
    h = height or max(1, round(width * crop.height / crop.width))
    crop = crop.resize((w, h), Image.LANCZOS)
  out = io.BytesIO()
  crop.save(out, 'JPEG', quality=90)
  return out.getvalue()


def create_app(cropper: cropper_lib.ClipCropper, config: ServeConfig = ServeConfig()
               ) -> fastapi.FastAPI:
  """The FastAPI application serving `cropper` (the `CropService` is `app.state.service`)."""
  service = CropService(cropper, config)

  async def lifespan(_):
    service.start()
    yield
    LOG.info('shutting down: finishing queued work')
    service.stop()

  app = fastapi.FastAPI(
      title='clipcrop-jax crop service', version='1',
      description='ClipCrop: crops photos to a text or an example image. Multipart uploads only; '
      'URLs and server paths are never read.', lifespan=lifespan)
  app.state.service = service
  if config.cors_origins:
    from fastapi.middleware import cors  # pylint: disable=g-import-not-at-top
    app.add_middleware(cors.CORSMiddleware, allow_origins=list(config.cors_origins),
                       allow_methods=['GET', 'POST'], allow_headers=['Authorization'])
  app.add_middleware(_Gate, config=config)

  @app.exception_handler(ServiceError)
  async def _service_error(_, e: ServiceError):
    return error_response(e.status, e.message, e.headers)

  @app.exception_handler(starlette_exceptions.HTTPException)
  async def _http_error(_, e):
    return error_response(e.status_code, e.detail, getattr(e, 'headers', None))

  @app.exception_handler(fastapi.exceptions.RequestValidationError)
  async def _validation_error(_, e):
    first = e.errors()[0]
    field = '.'.join(str(part) for part in first.get('loc', ())[1:]) or 'request'
    return error_response(422, f"{field}: {first.get('msg', 'invalid')}")

  @app.exception_handler(Exception)
  async def _internal_error(request, e):
    LOG.exception('internal error on %s', request.url.path)
    return error_response(500, f'internal error ({type(e).__name__}); see the service log')

  async def answer(image, query_image, fields: CropFields):
    image_bytes = await _read_upload(image, 'image')
    if image_bytes is None:
      raise ServiceError(422, 'image: an uploaded image file is required')
    crops, job = await service.crop(image_bytes, await _read_upload(query_image, 'query_image'),
                                    fields)
    h, w = job.image.image_hw
    return image_bytes, crops, (w, h), {'X-Encoding-Cache': 'hit' if job.cache_hit else 'miss'}

  @app.post('/v1/crops', response_model=CropsOut, responses=ERROR_RESPONSES,
            summary='Ranked crops of an image, for a text or an example image')
  async def crops_endpoint(
      image: fastapi.UploadFile = fastapi.File(description='the photo to crop'),
      query_image: Optional[fastapi.UploadFile] = fastapi.File(
          None, description='an example image (instead of text)'),
      fields: CropFields = fastapi.Depends(_crop_fields)):
    _, crops, image_wh, headers = await answer(image, query_image, fields)
    return fastapi_responses.JSONResponse(
        {'crops': _crops_json(crops), 'model': cropper.model_id, 'image_size': list(image_wh)},
        headers=headers)

  @app.post('/v1/crop.jpg', response_class=fastapi_responses.Response,
            responses={200: {'content': {'image/jpeg': {}}, 'description': 'the best crop'},
                       **ERROR_RESPONSES},
            summary='The best crop as a JPEG, resized to width x height')
  async def crop_jpg_endpoint(
      image: fastapi.UploadFile = fastapi.File(description='the photo to crop'),
      query_image: Optional[fastapi.UploadFile] = fastapi.File(
          None, description='an example image (instead of text)'),
      width: Optional[int] = fastapi.Form(None, description='output width, pixels'),
      height: Optional[int] = fastapi.Form(None, description='output height, pixels'),
      fields: CropFields = fastapi.Depends(_crop_fields)):
    for name, value in (('width', width), ('height', height)):
      if value is not None and not 1 <= value <= config.max_output_side:
        raise ServiceError(422, f'{name} must be in [1, {config.max_output_side}], got {value}')
    if width and height and fields.aspect_ratio is None:
      fields.aspect_ratio = f'{width}:{height}'  # the crop has the output's shape: no stretching
    fields.top_k = 1
    image_bytes, crops, _, headers = await answer(image, query_image, fields)
    if not crops:
      raise ServiceError(422, 'no crop satisfies min_size / aspect_ratio on this image')
    jpeg = await concurrency.run_in_threadpool(_resized_jpeg, image_bytes, crops[0].box, width,
                                               height, config.max_pixels)
    headers.update({'X-Crop-Box': ','.join(f'{v:.2f}' for v in crops[0].box),
                    'X-Crop-Score': f'{crops[0].score:.6g}'})
    return fastapi_responses.Response(jpeg, media_type='image/jpeg', headers=headers)

  @app.get('/healthz', summary='The process is up')
  async def healthz():
    return {'status': 'ok', 'in_progress': service.in_progress, 'cached_images': len(service.cache),
            'cache_bytes': service.cache.bytes}

  @app.get('/readyz', summary='The model is loaded and compiled',
           responses={503: {'model': ErrorOut}})
  async def readyz():
    if not service.ready.is_set():
      return error_response(503, 'warming up (compiling the model)')
    return {'status': 'ready', 'model': cropper.model_id}

  @app.get('/', include_in_schema=False)
  async def playground():
    return fastapi_responses.FileResponse(ASSETS / 'playground.html')

  app.mount('/assets', staticfiles.StaticFiles(directory=ASSETS), name='assets')
  return app


# ------------------------------------------------------------------------------------------------
# Running it.
# ------------------------------------------------------------------------------------------------


def uvicorn_config(app, host: str, port: int, config: ServeConfig, **kwargs) -> uvicorn.Config:
  """uvicorn settings of the service: our access log instead of uvicorn's, and a graceful
  shutdown that waits up to one request timeout (+ 5 s) for the requests in flight."""
  return uvicorn.Config(app, host=host, port=port, access_log=False, log_config=None,
                        timeout_graceful_shutdown=int(config.timeout_s) + 5, **kwargs)


class BackgroundServer:
  """The app on 127.0.0.1 (a free port unless given) in a daemon thread, for tests and tools.

    with BackgroundServer(create_app(cropper)) as server:
      httpx.get(server.url + '/healthz')
  """

  def __init__(self, app, config: ServeConfig = ServeConfig(), port: int = 0):
    self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    self._socket.bind(('127.0.0.1', port))
    self.port = self._socket.getsockname()[1]
    self.url = f'http://127.0.0.1:{self.port}'
    self.server = uvicorn.Server(uvicorn_config(app, '127.0.0.1', self.port, config,
                                                log_level='warning'))
    self._thread = threading.Thread(target=self.server.run, kwargs={'sockets': [self._socket]},
                                    name='clipcrop-uvicorn', daemon=True)

  def __enter__(self) -> 'BackgroundServer':
    self._thread.start()
    deadline = time.monotonic() + 60
    while not self.server.started:
      if not self._thread.is_alive() or time.monotonic() > deadline:
        raise RuntimeError('the background server did not start')
      time.sleep(0.02)
    return self

  def __exit__(self, *exc) -> None:
    self.server.should_exit = True
    self._thread.join(60)
    self._socket.close()


def wait_until_ready(url: str, alive: Callable[[], bool], timeout_s: float = 600) -> None:
  """Polls `url + '/readyz'` until it answers 200 (a server started as a subprocess, for tests
  and tools); RuntimeError when `alive()` turns False or after `timeout_s`."""
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with urllib.request.urlopen(url + '/readyz', timeout=5) as response:
        if response.status == 200:
          return
    except OSError:  # refused (not listening yet), 503 (warming up), timeout
      pass
    if not alive() or time.monotonic() > deadline:
      raise RuntimeError(f'the service at {url} did not become ready')
    time.sleep(0.2)


def _parser() -> argparse.ArgumentParser:
  defaults = ServeConfig()
  parser = argparse.ArgumentParser(prog='python -m clipcrop_jax.serve',
                                   description='HTTP crop service with a playground page at /.')
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument('--checkpoint', help='ClipCrop model dir (or training workdir), or an OWL-ViT '
                   'checkpoint (zero-shot mode).')
  src.add_argument('--random-init', metavar='CONFIG',
                   help="Random weights ('tiny', or an OWL-ViT config name) for tests and demos.")
  parser.add_argument('--host', default='127.0.0.1')
  parser.add_argument('--port', type=int, default=8000)
  parser.add_argument('--keyword-pipeline', default=None,
                      help="Keyword extractor (a spaCy pipeline or 'rules'); default: the model's.")
  for field in dataclasses.fields(ServeConfig):
    if field.name in ('token', 'cors_origins', 'warmup'):
      continue
    default = getattr(defaults, field.name)
    parser.add_argument('--' + field.name.replace('_', '-'), type=type(default), default=default,
                        help=f'(default {default})')
  parser.add_argument('--dtype', choices=sorted(cropper_lib.DTYPES), default='float32',
                      help='Compute dtype (bfloat16 on accelerators; parameters stay float32).')
  parser.add_argument('--token-file', help='Require "Authorization: Bearer <the file\'s text>".')
  parser.add_argument('--cors-origin', action='append', default=[],
                      help='Allow this origin (repeat for more); default: CORS off.')
  parser.add_argument('--no-warmup', action='store_true',
                      help='Ready at once; each batch shape compiles on first use.')
  parser.add_argument('--log-level', default='info', choices=['debug', 'info', 'warning', 'error'])
  return parser


def _read_token(path: str) -> str:
  try:
    token = pathlib.Path(path).read_text(encoding='utf-8').strip()
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f'--token-file {path}: cannot read it ({e})') from None
  if not token or any(c.isspace() for c in token):
    raise ValueError(f'--token-file {path}: expected one token without spaces')
  return token


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = _parser().parse_args(argv)
  logging.basicConfig(level=args.log_level.upper(),
                      format='%(asctime)s %(levelname)s %(name)s: %(message)s')
  from clipcrop_jax import keywords  # pylint: disable=g-import-not-at-top
  try:  # every argument before the model is loaded
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig)
              if f.name not in ('token', 'cors_origins', 'warmup')}
    config = ServeConfig(**values, cors_origins=tuple(args.cors_origin),
                         token=_read_token(args.token_file) if args.token_file else None,
                         warmup=not args.no_warmup)
    cropper_lib.check_int('--port', args.port, minimum=0)
    if args.keyword_pipeline is not None:
      keywords.check_pipeline(args.keyword_pipeline)
    if args.random_init:
      cropper = cropper_lib.ClipCropper.init_random(
          args.random_init, keyword_pipeline=args.keyword_pipeline or keywords.DEFAULT_PIPELINE,
          dtype=args.dtype)
    else:
      cropper = cropper_lib.ClipCropper.load(args.checkpoint,
                                             keyword_pipeline=args.keyword_pipeline,
                                             dtype=args.dtype)
  except (ValueError, TypeError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  LOG.info('serving %s on http://%s:%d', cropper.model_id, args.host, args.port)
  try:
    uvicorn.Server(uvicorn_config(create_app(cropper, config), args.host, args.port, config,
                                  log_level=args.log_level)).run()
  except KeyboardInterrupt:  # Ctrl-C: uvicorn has shut down gracefully, then re-raises it
    return 130
  return 0


if __name__ == '__main__':
  sys.exit(main())
