r"""The crop service over HTTP (FastAPI + uvicorn; the `serve` extra) and its command line.

  python -m clipcrop_jax.serve --checkpoint MODEL_DIR_OR_OWL_CHECKPOINT   # 127.0.0.1:8000
  python -m clipcrop_jax.serve --random-init tiny --port 8080              # demo, no weights

Endpoints: `POST /v1/crops` (JSON crops), `POST /v1/crop.jpg` (the best crop as a JPEG), `GET /`
(the playground page, `assets/`), `/healthz`, `/readyz`, `/openapi.json` (+ `/docs`); see
docs/service.md. Multipart uploads only: the service never fetches a URL and never opens a
server-side path named in a request. `_Gate` (ASGI middleware) handles the request id, bearer
token, content type, upload bytes and access log; `serving.service.CropService` does the rest;
refusals are `{"error": "one line"}` with the status of `serving.errors.STATUS`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hmac
import io
import logging
import pathlib
import re
import sys
import time
from typing import Any, Optional, Sequence
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
  raise ImportError(
      f'clipcrop_jax.serve needs the serve extra ({e}): ' "pip install 'clipcrop-jax[serve]'"
  ) from None
from PIL import Image

from clipcrop_jax import crop_request
from clipcrop_jax import cropper as cropper_lib
from clipcrop_jax import default_config
from clipcrop_jax.owlvit import preprocessing as pp
from clipcrop_jax.serving import errors
from clipcrop_jax.serving import service as service_lib

LOG = logging.getLogger('clipcrop_jax.serve')
ASSETS = pathlib.Path(__file__).resolve().parents[1] / 'assets'
API_PREFIX = '/v1/'
_REQUEST_ID = re.compile(r'[A-Za-z0-9._-]{1,64}')


def error_response(
    status: int, message: str, headers: Optional[dict[str, str]] = None
) -> fastapi_responses.JSONResponse:
  return fastapi_responses.JSONResponse(
      {'error': ' '.join(str(message).split())}, status, headers=headers
  )


class QueryOut(pydantic.BaseModel):
  text: str = pydantic.Field(description="the query: the caption, a keyword or '<example image>'")
  role: str = pydantic.Field(description="'caption', 'subject' or 'context'")
  box: Optional[list[float]] = pydantic.Field(
      description='x0, y0, x1, y1 (pixels) of what the query selected; null: nothing'
  )
  score: float = pydantic.Field(description="the detector's confidence in it, 0..1")
  in_union: bool = pydantic.Field(description='part of the union box the crops start from')


class CropOut(pydantic.BaseModel):
  box: list[float] = pydantic.Field(description='x0, y0, x1, y1 in pixels of the uploaded image')
  score: float = pydantic.Field(description='quality score (higher is better)')
  focal_point: list[float] = pydantic.Field(description='x, y: the centre of the crop, pixels')
  fused: bool = pydantic.Field(
      False,
      description='the mean box of the fuse_top_k best predictions (box voting), ranked '
      'first whatever its score',
  )
  queries: list[QueryOut] = pydantic.Field(
      [], description='the queries used and what each selected (the same for every crop)'
  )


class CropsOut(pydantic.BaseModel):
  crops: list[CropOut] = pydantic.Field(description='best first')
  model: str = pydantic.Field(description='where the weights came from')
  image_size: list[int] = pydantic.Field(description='width, height of the uploaded image')


class ErrorOut(pydantic.BaseModel):
  error: str = pydantic.Field(description='what is wrong, in one line')


ERROR_RESPONSES = {
    status: {'model': ErrorOut, 'description': text}
    for status, text in (
        (400, 'unreadable image (empty, truncated, corrupt)'),
        (401, 'missing or wrong bearer token'),
        (413, 'upload, image pixels or text above the limit'),
        (415, 'not multipart/form-data, or the upload is not an image'),
        (422, 'a bad or missing field'),
        (503, 'busy: retry after Retry-After seconds'),
        (504, 'no answer within the per-request timeout'),
    )
}


class _Gate:
  """ASGI middleware in front of everything: request id, access log with latency, and for the
  `/v1/` endpoints the bearer token, the multipart content type and the upload-byte limit (a
  declared Content-Length is refused before reading; a chunked body when it passes the limit)."""

  def __init__(self, app, config: service_lib.ServeConfig):
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
      LOG.info(
          '%s %s %s %d %.1f ms',
          rid,
          scope['method'],
          scope['path'],
          status[0],
          (time.perf_counter() - started) * 1000,
      )

  def _refusal(self, scope, headers) -> Optional[fastapi_responses.JSONResponse]:
    if not scope['path'].startswith(API_PREFIX):
      return None
    if self.config.token is not None:
      given = headers.get('authorization', '')
      if not given.startswith('Bearer '):
        return error_response(
            401,
            'missing bearer token (Authorization: Bearer <token>)',
            {'WWW-Authenticate': 'Bearer'},
        )
      if not hmac.compare_digest(given[len('Bearer ') :].encode(), self.config.token.encode()):
        return error_response(401, 'wrong bearer token', {'WWW-Authenticate': 'Bearer'})
    if scope['method'] == 'POST' and not headers.get('content-type', '').startswith(
        'multipart/form-data'
    ):
      return error_response(
          415,
          f"content type {headers.get('content-type', '(none)')!r}; "
          'expected multipart/form-data with an image file field',
      )
    length = headers.get('content-length')
    if length is not None and (not length.isdigit() or int(length) > self.config.max_upload_bytes):
      return error_response(
          413,
          f'request body of {length} bytes is above the limit of '
          f'{self.config.max_upload_bytes} bytes',
      )
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
            413, f'request body is above the limit of {self.config.max_upload_bytes} bytes'
        )
      return message

    return limited_receive


def _crop_fields(
    text: Optional[str] = fastapi.Form(None, description='what to crop to'),
    top_k: Optional[int] = fastapi.Form(
        None, description=f'number of crops (default {crop_request.DEFAULT_TOP_K})'
    ),
    aspect_ratio: Optional[str] = fastapi.Form(None, description="'16:9', '4/3', 1.5"),
    min_size: Optional[float] = fastapi.Form(None, description='min crop side, pixels'),
    mode: Optional[str] = fastapi.Form(None, description='full, main, key, base or image'),
) -> service_lib.CropFields:
  return service_lib.CropFields(text or None, top_k, aspect_ratio or None, min_size, mode or None)


async def _read_upload(upload: Any, name: str) -> Optional[bytes]:
  """The bytes of an uploaded file field; a plain text field is refused (never opened as a
  path)."""
  if upload is None or upload == '':
    return None
  if not hasattr(upload, 'read'):
    raise errors.InvalidRequest(f'{name} must be an uploaded file (multipart file field), not text')
  return await upload.read()


def _crops_json(crops: Sequence[cropper_lib.Crop]) -> list[dict[str, Any]]:
  return [
      {
          'box': list(c.box),
          'score': c.score,
          'focal_point': list(c.focal_point),
          'fused': c.fused,
          'queries': [q.to_json() for q in c.queries],
      }
      for c in crops
  ]


def _resized_jpeg(
    image: bytes, box: Sequence[float], width: Optional[int], height: Optional[int], max_pixels: int
) -> bytes:
  """The box cut from the full-resolution image (EXIF-oriented, as the model saw it), resized to
  width x height (one of them: the other keeps the crop's aspect ratio), as JPEG bytes."""
  rgb = pp.load_image(service_lib.named_file(image, 'image'), max_pixels)
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


def create_app(
    cropper: cropper_lib.ClipCropper, config: service_lib.ServeConfig = service_lib.ServeConfig()
) -> fastapi.FastAPI:
  """The FastAPI application serving `cropper` (the `CropService` is `app.state.service`)."""
  service = service_lib.CropService(cropper, config, run_in_thread=concurrency.run_in_threadpool)

  async def lifespan(_):
    service.start()
    yield
    LOG.info('shutting down: finishing queued work')
    service.stop()

  app = fastapi.FastAPI(
      title='clipcrop-jax crop service',
      version='1',
      description='ClipCrop: crops photos to a text or an example image. Multipart uploads only; '
      'URLs and server paths are never read.',
      lifespan=lifespan,
  )
  app.state.service = service
  if config.cors_origins:
    from fastapi.middleware import cors  # pylint: disable=g-import-not-at-top

    app.add_middleware(
        cors.CORSMiddleware,
        allow_origins=list(config.cors_origins),
        allow_methods=['GET', 'POST'],
        allow_headers=['Authorization'],
    )
  app.add_middleware(_Gate, config=config)

  @app.exception_handler(errors.ServiceError)
  @app.exception_handler(pp.ImageError)
  async def _refused(_, e: Exception):
    return error_response(errors.status_of(e), errors.message_of(e), errors.headers_of(e))

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

  async def answer(image, query_image, fields: service_lib.CropFields):
    image_bytes = await _read_upload(image, 'image')
    if image_bytes is None:
      raise errors.InvalidRequest('image: an uploaded image file is required')
    crops, job = await service.crop(
        image_bytes, await _read_upload(query_image, 'query_image'), fields
    )
    h, w = job.image.image_hw
    return image_bytes, crops, (w, h), {'X-Encoding-Cache': 'hit' if job.cache_hit else 'miss'}

  @app.post(
      '/v1/crops',
      response_model=CropsOut,
      responses=ERROR_RESPONSES,
      summary='Ranked crops of an image, for a text or an example image',
  )
  async def crops_endpoint(
      image: fastapi.UploadFile = fastapi.File(description='the photo to crop'),
      query_image: Optional[fastapi.UploadFile] = fastapi.File(
          None, description='an example image (instead of text)'
      ),
      fields: service_lib.CropFields = fastapi.Depends(_crop_fields),
  ):
    _, crops, image_wh, headers = await answer(image, query_image, fields)
    return fastapi_responses.JSONResponse(
        {'crops': _crops_json(crops), 'model': cropper.model_id, 'image_size': list(image_wh)},
        headers=headers,
    )

  @app.post(
      '/v1/crop.jpg',
      response_class=fastapi_responses.Response,
      responses={
          200: {'content': {'image/jpeg': {}}, 'description': 'the best crop'},
          **ERROR_RESPONSES,
      },
      summary='The best crop as a JPEG, resized to width x height',
  )
  async def crop_jpg_endpoint(
      image: fastapi.UploadFile = fastapi.File(description='the photo to crop'),
      query_image: Optional[fastapi.UploadFile] = fastapi.File(
          None, description='an example image (instead of text)'
      ),
      width: Optional[int] = fastapi.Form(None, description='output width, pixels'),
      height: Optional[int] = fastapi.Form(None, description='output height, pixels'),
      fields: service_lib.CropFields = fastapi.Depends(_crop_fields),
  ):
    for name, value in (('width', width), ('height', height)):
      if value is not None and not 1 <= value <= config.max_output_side:
        raise errors.InvalidRequest(f'{name} must be in [1, {config.max_output_side}], got {value}')
    if width and height and fields.aspect_ratio is None:
      fields.aspect_ratio = f'{width}:{height}'  # the crop has the output's shape: no stretching
    fields.top_k = 1
    image_bytes, crops, _, headers = await answer(image, query_image, fields)
    if not crops:
      raise errors.InvalidRequest('no crop satisfies min_size / aspect_ratio on this image')
    jpeg = await concurrency.run_in_threadpool(
        _resized_jpeg, image_bytes, crops[0].box, width, height, config.max_pixels
    )
    headers.update(
        {
            'X-Crop-Box': ','.join(f'{v:.2f}' for v in crops[0].box),
            'X-Crop-Score': f'{crops[0].score:.6g}',
        }
    )
    return fastapi_responses.Response(jpeg, media_type='image/jpeg', headers=headers)

  @app.get('/healthz', summary='The process is up')
  async def healthz():
    return {
        'status': 'ok',
        'in_progress': service.in_progress,
        'cached_images': len(service.cache),
        'cache_bytes': service.cache.bytes,
    }

  @app.get(
      '/readyz', summary='The model is loaded and compiled', responses={503: {'model': ErrorOut}}
  )
  async def readyz():
    if not service.ready.is_set():
      return error_response(503, 'warming up (compiling the model)')
    return {'status': 'ready', 'model': cropper.model_id}

  @app.get('/', include_in_schema=False)
  async def playground():
    return fastapi_responses.FileResponse(ASSETS / 'playground.html')

  app.mount('/assets', staticfiles.StaticFiles(directory=ASSETS), name='assets')
  return app


def uvicorn_config(
    app, host: str, port: int, config: service_lib.ServeConfig, **kwargs
) -> uvicorn.Config:
  """uvicorn settings of the service: our access log instead of uvicorn's, and a graceful
  shutdown that waits up to one request timeout (+ 5 s) for the requests in flight."""
  return uvicorn.Config(
      app,
      host=host,
      port=port,
      access_log=False,
      log_config=None,
      timeout_graceful_shutdown=int(config.timeout_s) + 5,
      **kwargs,
  )


def _parser() -> argparse.ArgumentParser:
  defaults = service_lib.ServeConfig()
  parser = argparse.ArgumentParser(
      prog='python -m clipcrop_jax.serve',
      description='HTTP crop service with a playground page at /.',
  )
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument(
      '--checkpoint',
      help='ClipCrop model dir (or training workdir), or an OWL-ViT '
      'checkpoint (zero-shot mode).',
  )
  src.add_argument(
      '--random-init',
      metavar='CONFIG',
      help="Random weights ('tiny', or an OWL-ViT config name) for tests and demos.",
  )
  parser.add_argument('--host', default='127.0.0.1')
  parser.add_argument('--port', type=int, default=8000)
  parser.add_argument(
      '--keyword-pipeline',
      default=None,
      help="Keyword extractor (a spaCy pipeline or 'rules'); default: the model's.",
  )
  for field in dataclasses.fields(service_lib.ServeConfig):
    if field.name in ('token', 'cors_origins', 'warmup'):
      continue
    default = getattr(defaults, field.name)
    parser.add_argument(
        '--' + field.name.replace('_', '-'),
        type=type(default),
        default=default,
        help=f'(default {default})',
    )
  parser.add_argument(
      '--dtype',
      choices=sorted(default_config.DTYPES),
      default='float32',
      help='Compute dtype (bfloat16 on accelerators; parameters stay float32).',
  )
  parser.add_argument('--token-file', help='Require "Authorization: Bearer <the file\'s text>".')
  parser.add_argument(
      '--cors-origin',
      action='append',
      default=[],
      help='Allow this origin (repeat for more); default: CORS off.',
  )
  parser.add_argument(
      '--no-warmup',
      action='store_true',
      help='Ready at once; each batch shape compiles on first use.',
  )
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
  logging.basicConfig(
      level=args.log_level.upper(), format='%(asctime)s %(levelname)s %(name)s: %(message)s'
  )
  from clipcrop_jax import keywords  # pylint: disable=g-import-not-at-top

  try:  # every argument before the model is loaded
    values = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(service_lib.ServeConfig)
        if f.name not in ('token', 'cors_origins', 'warmup')
    }
    config = service_lib.ServeConfig(
        **values,
        cors_origins=tuple(args.cors_origin),
        token=_read_token(args.token_file) if args.token_file else None,
        warmup=not args.no_warmup,
    )
    crop_request.check_int('--port', args.port, minimum=0)
    if args.keyword_pipeline is not None:
      keywords.check_pipeline(args.keyword_pipeline)
    if args.random_init:
      cropper = cropper_lib.ClipCropper.init_random(
          args.random_init, keyword_pipeline=args.keyword_pipeline, dtype=args.dtype
      )
    else:
      cropper = cropper_lib.ClipCropper.load(
          args.checkpoint, keyword_pipeline=args.keyword_pipeline, dtype=args.dtype
      )
  except (ValueError, TypeError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  LOG.info('serving %s on http://%s:%d', cropper.model_id, args.host, args.port)
  try:
    uvicorn.Server(
        uvicorn_config(
            create_app(cropper, config), args.host, args.port, config, log_level=args.log_level
        )
    ).run()
  except KeyboardInterrupt:  # Ctrl-C: uvicorn has shut down gracefully, then re-raises it
    return 130
  return 0


if __name__ == '__main__':
  sys.exit(main())
