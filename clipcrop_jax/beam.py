"""Cropping a collection on Apache Beam: `RunInference` with a ClipCrop model handler.

  python -m clipcrop_jax.crop_beam --checkpoint MODEL --input 'gs://bucket/photos/*.jpg' \
      --text "the dog" --output gs://bucket/crops/run1 [--runner DataflowRunner ...]

One way to scale out beyond one machine: Beam schedules the workers, retries failed bundles,
autoscales and reads any Beam file system (local, `gs://`, `s3://` with Beam's extras); one
worker process uses every local accelerator (`ClipCropper` splits a batch over its devices).

The pipeline (`build_pipeline`), per image, keyed by its URI:

  requests  a glob's files with one `--text` / `--query_image`, or a JSONL of
            {"image": uri, "text": ... | "query_image": uri} (each image its own request)
  -> (`--skip_done`: drop the images an earlier run of the same output has results for)
  -> Reshuffle -> `ReadImage` (bytes through `FileSystems`, decoded for the model; the bytes ride
     along for writing the crops) -> `RunInference(KeyedModelHandler(ClipCropModelHandler))`
     (batches of `--batch_size`, padded to the cropper's fixed sizes, so a varying batch never
     recompiles) -> `WriteOutputs` (crop JPEGs + overlay PNG, written to a temporary name and
     renamed: a retried bundle rewrites the same files, never a partial one)
  -> OUTPUT/results/<run_id>-SSSSS-of-NNNNN.jsonl (`WriteToText`), one JSON line per image
  -> OUTPUT/dead_letters/<run_id>-SSSSS-of-NNNNN.jsonl: every image that could not be cropped
     ({"image", "stage", "error"}: a one-line reason), never failing the job.

Crop files are OUTPUT/crops/<stem>-<8 hex of sha1(uri)>_crop<i>.jpg and ..._overlay.png: the
name depends only on the URI, so reruns and retries write the same names.

Nothing here imports training code; JAX and the model load in `load_model`, once per worker
process (the handler itself is pickled with the pipeline and holds only settings). Results are
plain Python (JSON-able dicts), which `share_model_across_processes` needs.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime
import functools
import hashlib
import io
import json
import logging
import os
import pathlib
import re
import uuid
from typing import Any, Iterable, Iterator, Optional, Sequence

import apache_beam as beam
import apache_beam.io.filesystems
import apache_beam.io.fileio
import apache_beam.ml.inference.base
import numpy as np

from clipcrop_jax import crop_output
from clipcrop_jax import errors

FileSystems = apache_beam.io.filesystems.FileSystems
ModelHandler = apache_beam.ml.inference.base.ModelHandler
KeyedModelHandler = apache_beam.ml.inference.base.KeyedModelHandler
RunInference = apache_beam.ml.inference.base.RunInference
PredictionResult = apache_beam.ml.inference.base.PredictionResult

RESULTS_DIR = 'results'
DEAD_LETTERS_DIR = 'dead_letters'
CROPS_DIR = 'crops'
METRICS_NAMESPACE = 'clipcrop'
# One JAX process owns an accelerator: on GPU workers the handler is shared across the SDK
# processes of a worker (`share_model_across_processes`), and XLA must not grab all GPU memory
# at start-up (several processes may start it before one owns it).
GPU_ENV = {'XLA_PYTHON_CLIENT_PREALLOCATE': 'false'}


@dataclasses.dataclass(frozen=True)
class ImageRequest:
  """One image to crop: its URI and what to crop it to (a text, an example image's URI, or
  neither for a 'base' model)."""

  image: str
  text: Optional[str] = None
  query_image: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class CropSettings:
  """What every image of a job is cropped with (the crop CLI's flags)."""

  checkpoint: Optional[str] = None
  random_init: Optional[str] = None
  keyword_pipeline: Optional[str] = None
  top_k: int = 3
  aspect_ratio: Optional[str] = None
  min_size: Optional[float] = None
  mode: Optional[str] = None
  fuse_top_k: Optional[int] = None
  dtype: str = 'float32'
  max_pixels: Optional[int] = None
  write_images: bool = True


@dataclasses.dataclass
class CropExample:
  """What the model handler gets for one image: the request, the model input (`ModelInput`),
  the decoded example image (uint8, or None) and the file's bytes (to write the crops from)."""

  request: ImageRequest
  model_input: Any
  query_image: Optional[np.ndarray]
  data: bytes


# ------------------------------------------------------------------------------------------------
# Requests.
# ------------------------------------------------------------------------------------------------


def parse_request_line(line: str) -> ImageRequest:
  """A JSONL line {"image": uri, "text": str | "query_image": uri} -> ImageRequest.

  Raises:
    ValueError: (one line) not JSON, not an object, no "image", a non-string field, both a text
      and a query image.
  """
  try:
    record = json.loads(line)
  except ValueError as e:
    raise ValueError(f'not a JSON line ({e}): {line[:120]!r}') from None
  if (
      not isinstance(record, dict)
      or not isinstance(record.get('image'), str)
      or (not record['image'].strip())
  ):
    raise ValueError(f'a request needs "image": a URI string: {line[:120]!r}')
  for field in ('text', 'query_image'):
    if record.get(field) is not None and not isinstance(record[field], str):
      raise ValueError(f'"{field}" must be a string: {line[:120]!r}')
  if record.get('text') is not None and record.get('query_image') is not None:
    raise ValueError(f'give "text" or "query_image", not both: {line[:120]!r}')
  unknown = sorted(set(record) - {'image', 'text', 'query_image'})
  if unknown:
    raise ValueError(f'unknown field(s) {", ".join(unknown)}: {line[:120]!r}')
  return ImageRequest(record['image'], record.get('text'), record.get('query_image'))


def output_name(uri: str) -> str:
  """The crop files' base name of an image: its stem and 8 hex digits of its URI's SHA-1
  (distinct images never share a name, a retried or rerun image always gets the same)."""
  stem = pathlib.PurePosixPath(uri.rstrip('/')).stem or 'image'
  stem = ''.join(c if c.isalnum() or c in '-_.' else '_' for c in stem)[:80]
  return f'{stem}-{hashlib.sha1(uri.encode("utf-8")).hexdigest()[:8]}'


def _read_bytes(uri: str) -> bytes:
  with FileSystems.open(uri, compression_type='uncompressed') as f:
    return f.read()


# ------------------------------------------------------------------------------------------------
# The model handler.
# ------------------------------------------------------------------------------------------------


class ClipCropModelHandler(ModelHandler):
  """RunInference's model handler: `CropExample`s in, a `PredictionResult` per image out (its
  `inference` a JSON-able result dict, its `example` the input, whose bytes the writer uses).

  The cropper is built in `load_model`, once per worker process (or once per machine with
  `model_copies` / `large_model`: Beam then shares it across the worker's processes, and the
  results, plain dicts, cross the process boundary). `run_inference` encodes a batch at once
  (padded to the cropper's fixed batch sizes, split over its devices), then runs each image's
  request (its own text or example image: embedded once per distinct request, cached); a batch
  whose encoder fails is retried `max_retries` times (a transient device error), then each
  image alone, so that only an image at fault fails. A failed image's result is
  {"image", "stage": "inference", "error"} instead of crops, for the dead letters.
  """

  def __init__(
      self,
      settings: CropSettings,
      *,
      batch_size: int = 8,
      model_copies: Optional[int] = None,
      large_model: bool = False,
      max_retries: int = 2,
      env_vars: Optional[dict[str, str]] = None,
  ):
    super().__init__(
        min_batch_size=1,
        max_batch_size=batch_size,
        model_copies=model_copies,
        large_model=large_model,
        env_vars=dict(env_vars or {}),
    )
    if (settings.checkpoint is None) == (settings.random_init is None):
      raise ValueError('give a checkpoint or random_init (one of them)')
    self.settings = settings
    self.batch_size = batch_size
    self.max_retries = max_retries

  def load_model(self) -> Any:
    for key, value in self._env_vars.items():
      os.environ.setdefault(key, value)
    from clipcrop_jax import cropper as cropper_lib  # pylint: disable=g-import-not-at-top

    s = self.settings
    kwargs = dict(dtype=s.dtype, batch_size=self.batch_size)
    if s.max_pixels is not None:
      kwargs['max_pixels'] = s.max_pixels
    if s.random_init is not None:
      return cropper_lib.ClipCropper.init_random(
          s.random_init, keyword_pipeline=s.keyword_pipeline, **kwargs
      )
    return cropper_lib.ClipCropper.load(s.checkpoint, keyword_pipeline=s.keyword_pipeline, **kwargs)

  def run_inference(
      self,
      batch: Sequence[CropExample],
      model: Any,
      inference_args: Optional[dict[str, Any]] = None,
  ) -> Iterable[dict[str, Any]]:
    del inference_args
    encodings = self._encode(model, [ex.model_input for ex in batch])
    for example, encoding in zip(batch, encodings):
      yield PredictionResult(example, self._crop(model, example, encoding), model.model_id)

  def _encode(self, model: Any, inputs: list[Any]) -> list[Any]:
    """Encodings of `inputs` (an exception per input that failed even alone)."""
    for attempt in range(self.max_retries + 1):
      try:
        return model.encode_batch(inputs, batch_size=len(inputs))
      except Exception as e:  # pylint: disable=broad-except  # retried, then per image
        logging.warning(
            'clipcrop: encoding a batch of %d failed (attempt %d of %d): %s',
            len(inputs),
            attempt + 1,
            self.max_retries + 1,
            errors.one_line(e),
        )
    out = []
    for model_input in inputs:
      try:
        out.append(model.encode_batch([model_input], batch_size=1)[0])
      except Exception as e:  # pylint: disable=broad-except
        out.append(e)
    return out

  def _crop(self, model: Any, example: CropExample, encoding: Any) -> dict[str, Any]:
    s, request = self.settings, example.request
    try:
      if isinstance(encoding, Exception):
        raise encoding
      checked = model.check_request(
          text=request.text,
          query_image=example.query_image,
          top_k=s.top_k,
          aspect_ratio=s.aspect_ratio,
          min_size=s.min_size,
          mode=s.mode,
          fuse_top_k=s.fuse_top_k,
      )
      crops = model.crop_checked(encoding, checked)
    except Exception as e:  # pylint: disable=broad-except  # this image only
      return {'image': request.image, 'stage': 'inference', 'error': errors.one_line(e)}
    return {
        'image': request.image,
        'text': request.text,
        'query_image': request.query_image,
        'model': model.model_id,
        'image_size_wh': list(encoding.image_hw[::-1]),
        'crops': [crop_output.crop_json(c, rank) for rank, c in enumerate(crops, 1)],
    }

  def get_num_bytes(self, batch: Sequence[CropExample]) -> int:
    return sum(int(ex.model_input.pixels.nbytes) + len(ex.data) for ex in batch)

  def get_metrics_namespace(self) -> str:
    return METRICS_NAMESPACE


# ------------------------------------------------------------------------------------------------
# DoFns.
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def model_image_size(settings: CropSettings) -> int:
  """The input side of the model `settings` name, from its config alone where possible (a
  random init, a ClipCrop model directory); an OWL-ViT checkpoint is read to infer it."""
  from clipcrop_jax import export  # pylint: disable=g-import-not-at-top
  from clipcrop_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.owlvit import checkpoints  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.owlvit import configs  # pylint: disable=g-import-not-at-top

  if settings.random_init is not None:
    name = model_lib.TINY.owlvit if settings.random_init == 'tiny' else settings.random_init
    return configs.get_config(name).image_size
  path = pathlib.Path(settings.checkpoint)
  if export.is_model_dir(path) or export.is_model_dir(path / export.EXPORT_DIR):
    return export.load_config(path).owlvit_config.image_size
  module, _ = checkpoints.load_checkpoint(settings.checkpoint)
  return module.config.image_size


class ReadImage(beam.DoFn):
  """(uri, ImageRequest) -> (uri, CropExample): reads the bytes (any Beam file system), checks
  the pixel limit on the header and decodes for the model (`preprocessing.load_for_model`, as
  `ClipCropper.crop` does for a path); reads and decodes the example image of an image request.
  Errors name the URI (the dead letters' reason)."""

  def __init__(self, settings: CropSettings):
    self.settings = settings
    self.max_pixels = settings.max_pixels
    self.image_size = None

  def setup(self):
    self.image_size = model_image_size(self.settings)

  def process(self, element: tuple[str, ImageRequest]) -> Iterator[tuple[str, CropExample]]:
    from clipcrop_jax import cropper as cropper_lib  # pylint: disable=g-import-not-at-top
    from clipcrop_jax.owlvit import preprocessing as pp  # pylint: disable=g-import-not-at-top

    uri, request = element
    try:
      data = _read_bytes(uri)
      f = io.BytesIO(data)
      f.name = uri
      pixels, image_hw = pp.load_for_model(f, self.image_size, max_pixels=self.max_pixels)
      query = None
      if request.query_image is not None:
        q = io.BytesIO(_read_bytes(request.query_image))
        q.name = request.query_image
        query = pp.load_image(q, max_pixels=self.max_pixels)
    except Exception as e:  # pylint: disable=broad-except
      raise ImageReadError(
          f'{uri}: {errors.one_line(e)}' if uri not in str(e) else errors.one_line(e)
      ) from None
    yield uri, CropExample(request, cropper_lib.ModelInput(pixels, tuple(image_hw)), query, data)


class ImageReadError(ValueError):
  """An image (or its example image) cannot be read or decoded."""


class WriteOutputs(beam.DoFn):
  """(uri, PredictionResult) -> a result line: writes the crop JPEGs and the overlay PNG (with
  `write_images`) from the full-resolution decode of the image's bytes, each to a temporary
  name then renamed into place, so a retried bundle rewrites the same files and a reader never
  sees a partial one. An image the model could not crop raises (-> dead letters)."""

  def __init__(self, output: str, write_images: bool, max_pixels: Optional[int]):
    self.output = output
    self.write_images = write_images
    self.max_pixels = max_pixels

  def process(self, element: tuple[str, Any]) -> Iterator[str]:
    uri, prediction = element
    result = dict(prediction.inference)
    if 'error' in result:
      raise InferenceError(result['error'])
    if self.write_images:
      result['files'] = self._write(uri, prediction.example.data, result['crops'])
    yield json.dumps(result)

  def _write(self, uri: str, data: bytes, crops: list[dict[str, Any]]) -> list[str]:
    from clipcrop_jax.owlvit import preprocessing as pp  # pylint: disable=g-import-not-at-top

    f = io.BytesIO(data)
    f.name = uri
    image = pp.load_image(f, max_pixels=self.max_pixels)
    outputs = crop_output.crop_files(
        image, [c['box_xyxy'] for c in crops], [c['score'] for c in crops], output_name(uri)
    )
    folder = FileSystems.join(self.output, CROPS_DIR)
    return [self._put(folder, name, content) for name, content in outputs]

  @staticmethod
  def _put(folder: str, name: str, data: bytes) -> str:
    """Writes `data` to folder/name through a temporary name in the same folder; returns the
    final path."""
    final = FileSystems.join(folder, name)
    tmp = FileSystems.join(folder, f'.tmp-{uuid.uuid4().hex}-{name}')
    with FileSystems.create(tmp) as f:
      f.write(data)
    try:
      FileSystems.rename([tmp], [final])
    except Exception:  # pylint: disable=broad-except  # e.g. the destination exists (retry)
      FileSystems.delete([final])
      FileSystems.rename([tmp], [final])
    return final


class InferenceError(ValueError):
  """The model could not crop an image (reason from the model handler)."""


# ------------------------------------------------------------------------------------------------
# The pipeline.
# ------------------------------------------------------------------------------------------------


def _exception_message(exc_type: Any, exc_value: Any) -> str:
  """One line from what `with_exception_handling` reports: the exception or its repr."""
  kind = getattr(exc_type, '__name__', str(exc_type))
  if isinstance(exc_value, BaseException):
    message = errors.one_line(exc_value)
  else:
    text = str(exc_value)
    match = re.fullmatch(r'\w+\((.*)\)', text, re.S)
    try:  # "ImageReadError('a.jpg: truncated')" -> "a.jpg: truncated"
      message = str(ast.literal_eval(match.group(1))) if match else text
    except (ValueError, SyntaxError):
      message = text
    message = ' '.join(message.split())
  if kind in (ImageReadError.__name__, InferenceError.__name__):
    return message
  return f'{kind}: {message}'


def _dead_letter(stage: str):
  """A bad-records element of `with_exception_handling` -> a dead-letter JSON line."""

  def to_line(bad: tuple[Any, tuple[Any, Any, Any]]) -> str:
    element, (exc_type, exc_value, _) = bad
    if isinstance(element, tuple):
      element = element[0]
    uri = element.image if isinstance(element, ImageRequest) else str(element)
    kind = getattr(exc_type, '__name__', str(exc_type))
    return json.dumps(
        {
            'image': uri,
            'stage': 'inference' if kind == InferenceError.__name__ else stage,
            'error': _exception_message(exc_type, exc_value),
        }
    )

  return to_line


def _failed_batch_lines(failed: tuple[Sequence[tuple[str, Any]], Any]) -> Iterator[str]:
  """RunInference's failed batch -> one dead-letter line per image of it."""
  batch, exc = failed
  reason = errors.one_line(exc) if isinstance(exc, BaseException) else ' '.join(str(exc).split())
  for uri, _ in batch:
    yield json.dumps({'image': uri, 'stage': 'inference', 'error': reason})


def _result_images(readable: Any) -> Iterator[str]:
  """The image URIs of a results file (`ReadMatches` element); unreadable lines skipped."""
  with readable.open() as f:
    for line in io.TextIOWrapper(f, encoding='utf-8', errors='replace'):
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if isinstance(record, dict) and isinstance(record.get('image'), str):
        yield record['image']


def done_images(output: str) -> set[str]:
  """The image URIs an earlier run of `output` has result lines for (torn lines skipped)."""
  pattern = FileSystems.join(output, RESULTS_DIR, '*.jsonl')
  done = set()
  for match in FileSystems.match([pattern])[0].metadata_list:
    done.update(_result_images(_Readable(match.path)))
  return done


class _Readable:
  """A path with `open()` like `fileio.ReadableFile`."""

  def __init__(self, path: str):
    self.path = path

  def open(self):
    return FileSystems.open(self.path, compression_type='uncompressed')


def default_run_id() -> str:
  """The run's name in its output files: the UTC time it was built."""
  return datetime.datetime.now(datetime.timezone.utc).strftime('run-%Y%m%dT%H%M%SZ')


def build_pipeline(
    pipeline: beam.Pipeline,
    *,
    handler: ClipCropModelHandler,
    output: str,
    input_glob: Optional[str] = None,
    input_jsonl: Optional[str] = None,
    text: Optional[str] = None,
    query_image: Optional[str] = None,
    skip_done: bool = False,
    run_id: Optional[str] = None,
) -> dict[str, beam.PCollection]:
  """Adds the crop job to `pipeline` (module docstring); returns {'results', 'dead_letters'}
  (PCollections of JSON lines, also written under `output`).

  Args:
    pipeline: the Beam pipeline (any runner).
    handler: the model handler (settings, batch size, model sharing).
    output: the output folder (any Beam file system).
    input_glob / input_jsonl: the images (a glob, with `text` / `query_image` for all) or a
      JSONL of requests; exactly one.
    skip_done: crop only the images no earlier run of `output` has a result line for (an
      anti-join on the URI inside the pipeline, so any number of earlier results works).
    run_id: names this run's result and dead-letter shards (default: `default_run_id()`).
  """
  if (input_glob is None) == (input_jsonl is None):
    raise ValueError('give input_glob or input_jsonl (one of them)')
  run_id = run_id or default_run_id()
  max_pixels = handler.settings.max_pixels
  if input_glob is not None:
    requests = (
        pipeline
        | 'Match' >> apache_beam.io.fileio.MatchFiles(input_glob)
        | 'Request' >> beam.Map(lambda m: ImageRequest(m.path, text, query_image))
    )
    bad_requests = None
  else:
    lines = pipeline | 'ReadRequests' >> beam.io.ReadFromText(input_jsonl)
    requests, bad_requests = (
        lines | 'ParseRequests' >> beam.Map(parse_request_line).with_exception_handling()
    )
  keyed = requests | 'Key' >> beam.Map(lambda r: (r.image, r))
  if skip_done:  # an anti-join on the URI with the earlier runs' results (scales like the input)
    done = (
        pipeline
        | 'MatchDone'
        >> apache_beam.io.fileio.MatchFiles(
            FileSystems.join(output, RESULTS_DIR, '*.jsonl'),
            empty_match_treatment=apache_beam.io.fileio.EmptyMatchTreatment.ALLOW,
        )
        | 'OpenDone' >> apache_beam.io.fileio.ReadMatches()
        | 'DoneImages' >> beam.FlatMap(_result_images)
        | 'KeyDone' >> beam.Map(lambda uri: (uri, None))
    )
    keyed = (
        {'request': keyed, 'done': done}
        | 'JoinDone' >> beam.CoGroupByKey()
        | 'SkipDone'
        >> beam.FlatMap(lambda kv: [] if kv[1]['done'] else [(kv[0], r) for r in kv[1]['request']])
    )
  keyed = keyed | 'Spread' >> beam.Reshuffle()
  examples, bad_reads = (
      keyed | 'Read' >> beam.ParDo(ReadImage(handler.settings)).with_exception_handling()
  )
  predictions, failed = (
      examples | 'Crop' >> RunInference(KeyedModelHandler(handler)).with_exception_handling()
  )
  results, bad_writes = (
      predictions
      | 'Write'
      >> beam.ParDo(
          WriteOutputs(output, handler.settings.write_images, max_pixels)
      ).with_exception_handling()
  )
  dead = [
      bad_reads | 'DeadReads' >> beam.Map(_dead_letter('read')),
      failed.failed_inferences | 'DeadBatches' >> beam.FlatMap(_failed_batch_lines),
      bad_writes | 'DeadWrites' >> beam.Map(_dead_letter('write')),
  ]
  if bad_requests is not None:
    dead.append(bad_requests | 'DeadRequests' >> beam.Map(_dead_letter('request')))
  dead_letters = tuple(dead) | 'DeadLetters' >> beam.Flatten()
  results | 'WriteResults' >> beam.io.WriteToText(
      FileSystems.join(output, RESULTS_DIR, run_id), file_name_suffix='.jsonl'
  )
  dead_letters | 'WriteDeadLetters' >> beam.io.WriteToText(
      FileSystems.join(output, DEAD_LETTERS_DIR, run_id), file_name_suffix='.jsonl'
  )
  return {'results': results, 'dead_letters': dead_letters}
