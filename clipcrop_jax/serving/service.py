"""The crop service without a web framework: limits, admission, encoding cache, micro-batching.

`CropService.crop` serves one request (docs/service.md: admission up to `max_queue`, checks and
query embedding in a worker thread, the image encoding cached by SHA-256, one encoder forward per
micro-batch, a per-request timeout). Refusals are typed (`serving.errors`); the HTTP layer
(`serving.http`) maps them to statuses.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import logging
import math
import queue
import threading
import time
from typing import Any, Awaitable, Callable, Optional

import jax
import numpy as np

from clipcrop_jax import crop_request
from clipcrop_jax import cropper as cropper_lib
from clipcrop_jax.owlvit import preprocessing as pp
from clipcrop_jax.serving import errors

LOG = logging.getLogger('clipcrop_jax.serve')
MB = 1 << 20


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
    for name in (
        'max_batch',
        'max_queue',
        'max_upload_bytes',
        'max_pixels',
        'max_text_chars',
        'max_top_k',
        'max_output_side',
    ):
      crop_request.check_int(name, getattr(self, name))
    crop_request.check_int('cache_bytes', self.cache_bytes, minimum=0)
    crop_request.check_real('batch_wait_ms', self.batch_wait_ms)
    if crop_request.check_real('timeout_s', self.timeout_s) == 0:
      raise ValueError('timeout_s must be > 0')
    if self.token is not None and (not self.token or self.token != self.token.strip()):
      raise ValueError('token must be non-empty, without surrounding whitespace')


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
        collections.OrderedDict()
    )
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
  request: Any  # crop_request.CropRequest from check_request
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


def named_file(data: bytes, name: str) -> io.BytesIO:
  """`data` as a file object whose name (used in ImageError messages) is the form field."""
  f = io.BytesIO(data)
  f.name = name
  return f


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

  def __init__(
      self,
      cropper: cropper_lib.ClipCropper,
      config: ServeConfig = ServeConfig(),
      run_in_thread: Optional[Callable[..., Awaitable[Any]]] = None,
  ):
    """`run_in_thread(fn, *args)`: awaits `fn(*args)` run in a worker thread (default
    `asyncio.to_thread`; the HTTP layer passes its framework's thread pool)."""
    self.cropper = cropper
    self.run_in_thread = run_in_thread or asyncio.to_thread
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
    """Takes a place in the service or raises `errors.Busy` (with Retry-After)."""
    with self._lock:
      if self._admitted >= self.config.max_queue:
        waves = math.ceil(self._admitted / self.config.max_batch)
        retry = min(60, max(1, math.ceil(waves * self._batch_seconds)))
        raise errors.Busy(
            f'busy: {self._admitted} requests in progress (max_queue '
            f'{self.config.max_queue}); retry later',
            {'Retry-After': str(retry)},
        )
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
    top_k = crop_request.DEFAULT_TOP_K if fields.top_k is None else fields.top_k
    crop_request.check_crop_arguments(top_k, fields.aspect_ratio, fields.min_size)
    if top_k > self.config.max_top_k:
      raise ValueError(f'top_k must be <= {self.config.max_top_k}, got {top_k}')
    if fields.text is not None and len(fields.text) > self.config.max_text_chars:
      raise errors.TextTooLong(
          f'text has {len(fields.text)} characters; the limit is ' f'{self.config.max_text_chars}'
      )

  def make_job(self, image: bytes, query_image: Optional[bytes], fields: CropFields) -> Job:
    """Checks the request, embeds its query and looks the image up / decodes it (blocking: run
    it in a worker thread). Raises `errors.ServiceError`, `preprocessing.ImageError`, ValueError
    or TypeError."""
    self.check_fields(fields)
    top_k = crop_request.DEFAULT_TOP_K if fields.top_k is None else fields.top_k
    query = None
    if query_image is not None:
      query = pp.load_image(named_file(query_image, 'query_image'), self.config.max_pixels)
    request = self.cropper.check_request(
        text=fields.text,
        query_image=query,
        top_k=top_k,
        aspect_ratio=fields.aspect_ratio,
        min_size=fields.min_size,
        mode=fields.mode,
    )
    key = hashlib.sha256(image).hexdigest()
    encoding = self.cache.get(key) if self.config.cache_bytes else None
    if encoding is not None:
      return Job(key, encoding, request, cache_hit=True)
    size = self.cropper.config.owlvit_config.image_size
    pixels, image_hw = pp.load_for_model(
        named_file(image, 'image'), size, max_pixels=self.config.max_pixels
    )
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
    encoded = dict(
        zip(
            to_encode,
            self.cropper.encode_batch(list(to_encode.values()), batch_size=self.config.max_batch),
        )
    )
    self.images_encoded += len(encoded)
    for key, encoding in encoded.items():
      if self.config.cache_bytes:
        self.cache.put(key, encoding)
    for job in jobs:
      try:
        job.future.set_result(
            self.cropper.crop_checked(encoded.get(job.key, job.image), job.request)
        )
      except Exception as e:  # pylint: disable=broad-except  # this job's error, not the batch's
        job.future.set_exception(e)
    self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * (time.monotonic() - started)

  async def crop(
      self, image: bytes, query_image: Optional[bytes], fields: CropFields
  ) -> tuple[list[cropper_lib.Crop], Job]:
    """Admission, checks, batching, timeout: the crops (best first) and the finished job.

    Raises:
      errors.ServiceError: a typed refusal (busy, text too long, invalid field, timeout).
      preprocessing.ImageError: the image or example image cannot be decoded or is too large.
    """
    self.admit()
    try:

      async def run() -> tuple[list[cropper_lib.Crop], Job]:
        job = await self.run_in_thread(self.make_job, image, query_image, fields)
        return await asyncio.wrap_future(self.batcher.submit(job)), job

      return await asyncio.wait_for(run(), self.config.timeout_s)
    except asyncio.TimeoutError:
      raise errors.TimedOut(f'no answer within {self.config.timeout_s:g} s') from None
    except pp.ImageError:
      raise  # its own status (`errors.STATUS`)
    except (ValueError, TypeError) as e:
      raise errors.InvalidRequest(str(e)) from None
    finally:
      self.release()
