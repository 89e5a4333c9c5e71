"""Exports a ClipCrop model or a plain OWL-ViT to a TensorFlow SavedModel (jax2tf), for TF Serving.

Usage:
  python tools/export_tf.py --model runs/gaic --out exported/clipcrop/1      # model dir / workdir
  python tools/export_tf.py --random-init tiny --out /tmp/tiny_clipcrop/1    # random weights
  python tools/export_tf.py --owlvit owl2-b16.msgpack --out exported/owlv2/1  # plain OWL-ViT

The whole model (image encoder, text encoder, query selection, crop decoder) becomes one XLA
computation inside the SavedModel (jax2tf native serialization, a `XlaCallModule` op); the
parameters are SavedModel variables. The batch size B and the query count Q are symbolic: one
SavedModel serves any batch.

Signatures (S = the model's image side, L = 16 tokens):
  serving_default  pixels        float32 (B, S, S, 3) in [0, 1], padded to a square and resized
                                 (`clipcrop_jax.owlvit.preprocess`)
  serving_uint8    images        uint8 (B, S, S, 3): the same pixels x 255, rounded
  and in both      text_queries  int32 (B, Q, L) (`clipcrop_jax.owlvit.tokenize`; an all-zero row
                                 is padding; absent for a ClipCrop model in 'base' mode)
                   query_roles   int32 (B, Q), ClipCrop with `selection_union` other than 'all'
                                 only: each query's role id (0 caption, 1 subject, 2 context;
                                 `keywords.build_query_roles`, `features.ROLE_IDS`)
                   image_extent  float32 (B, 2), ClipCrop only: the real image's (W, H) / max(H, W)
  ClipCrop outputs: boxes (B, M, 4) xyxy in [0, 1] of the padded square (inside the real image),
    scores (B, M) the decoder's crop quality (rank by it).
  OWL-ViT outputs: boxes (B, P, 4) xyxy in [0, 1] of the padded square, logits (B, P, Q),
    scores (B, P, Q) = sigmoid(logits) and, for OWLv2, objectness_logits (B, P).

`<out>/assets.extra/clipcrop_export.json` (EXPORT_INFO) records what was exported: kind, source,
config, mode and keyword pipeline (how a client builds text queries), signatures, platforms.

The SavedModel is written into a temporary sibling directory that then takes --out's place in
one step. An existing non-empty --out is replaced only with --overwrite, and only if it is a
SavedModel (never a folder holding anything else). Exit codes: 0 written, 1 the model cannot be
loaded or converted, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from clipcrop_jax import boxes as box_lib
from clipcrop_jax.cropper import ClipCropper
from clipcrop_jax.data import features
from clipcrop_jax import export
from clipcrop_jax import model as model_lib
from clipcrop_jax.owlvit import checkpoints as owl_checkpoints
from clipcrop_jax.owlvit import fileio
from clipcrop_jax.owlvit import model as owl_model

SIGNATURE_PIXELS = 'serving_default'
SIGNATURE_UINT8 = 'serving_uint8'
EXPORT_INFO = pathlib.PurePath('assets.extra', 'clipcrop_export.json')
EXPORT_FORMAT_VERSION = 1
TEXT_MODES = ('full', 'main', 'key')
EXPORT_MODES = TEXT_MODES + ('base',)  # 'image' needs an example image's embedding: not exported
PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')
DEFAULT_PLATFORMS = ('cpu', 'cuda')
SAVED_MODEL_FILES = ('saved_model.pb', 'saved_model.pbtxt')
QUERY_DIM = 'q'  # the symbolic query count in `InputSpec.dims`


@dataclasses.dataclass(frozen=True)
class InputSpec:
  """A signature input after the pixels: `name`, its shape after the batch dimension (`dims`;
  QUERY_DIM = any query count) and its dtype name."""

  name: str
  dims: tuple[Any, ...]
  dtype: str


@dataclasses.dataclass(frozen=True)
class ServingModel:
  """A model ready for conversion: a pure JAX function and its parameters.

  Attributes:
    kind: 'clipcrop' or 'owlvit'.
    fn: fn(params, pixels, *inputs) -> dict of output arrays; pixels float32 (B, S, S, 3) in
      [0, 1]; `inputs` in the order of `inputs`.
    params: the parameter tree `fn` takes (its 'params' collection).
    image_size: S.
    inputs: the inputs after the pixels.
    info: JSON-able description of the model (written to EXPORT_INFO).
  """

  kind: str
  fn: Callable[..., dict[str, jax.Array]]
  params: Any
  image_size: int
  inputs: tuple[InputSpec, ...]
  info: dict[str, Any]


def _text_input(max_query_length: int) -> InputSpec:
  return InputSpec('text_queries', (QUERY_DIM, max_query_length), 'int32')


EXTENT_INPUT = InputSpec('image_extent', (2,), 'float32')
ROLES_INPUT = InputSpec('query_roles', (QUERY_DIM,), 'int32')


def clipcrop_serving(
    config: model_lib.ClipCropConfig,
    params: Any,
    source: str,
    keyword_pipeline: str,
    mode: Optional[str] = None,
) -> ServingModel:
  """The ClipCrop serving function: pixels, text tokens, image extent -> boxes, scores.

  Args:
    config: the model's config.
    params: its 'params' tree {'owlvit': ..., 'decoder': ...}.
    source: where the weights came from (recorded).
    keyword_pipeline: the model's keyword extractor (recorded: clients build their queries with
      `keywords.build_query_roles(text, mode, keyword_pipeline)`).
    mode: overrides `config.mode`: a text mode (the queries a client sends; every non-padding row
      is used) or 'base' (no text input).

  Raises:
    ValueError: the mode is 'image' (or unknown).
  """
  mode = config.mode if mode is None else mode
  if mode not in EXPORT_MODES:
    raise ValueError(
        f'mode {mode!r}: the export takes text queries ({", ".join(TEXT_MODES)}) or '
        "none ('base'); an 'image'-mode model needs --mode with one of those"
    )
  config = config.replace(mode=mode)
  module = model_lib.ClipCrop(config)

  def outputs(out):
    return {'boxes': out['pred_boxes'], 'scores': out['quality']}

  if mode == 'base':
    inputs = (EXTENT_INPUT,)

    def fn(params, pixels, image_extent):
      return outputs(module.apply({'params': params}, pixels, image_extent=image_extent))

  elif config.selection_union == 'all':
    inputs = (_text_input(config.owlvit_config.max_query_length), EXTENT_INPUT)

    def fn(params, pixels, text_queries, image_extent):
      return outputs(
          module.apply({'params': params}, pixels, text_queries, image_extent=image_extent)
      )

  else:  # the union depends on the queries' roles
    inputs = (_text_input(config.owlvit_config.max_query_length), ROLES_INPUT, EXTENT_INPUT)

    def fn(params, pixels, text_queries, query_roles, image_extent):
      return outputs(
          module.apply(
              {'params': params},
              pixels,
              text_queries,
              image_extent=image_extent,
              query_roles=query_roles,
          )
      )

  info = {
      'kind': 'clipcrop',
      'source': source,
      'mode': mode,
      'keyword_pipeline': keyword_pipeline,
      'config': dataclasses.asdict(config),
      'owlvit_config': config.owlvit,
      'selection_union': config.selection_union,
      'role_ids': dict(features.ROLE_IDS),
  }
  return ServingModel('clipcrop', fn, params, config.owlvit_config.image_size, inputs, info)


def owlvit_serving(
    module: owl_model.TextZeroShotDetectionModule, params: Any, source: str
) -> ServingModel:
  """The OWL-ViT serving function: pixels, text tokens -> boxes, logits, scores (+ objectness)."""
  cfg = module.config

  def fn(params, pixels, text_queries):
    out = module.apply({'params': params}, pixels, text_queries)
    result = {
        'boxes': box_lib.cxcywh_to_xyxy(out['pred_boxes']),
        'logits': out['pred_logits'],
        'scores': jax.nn.sigmoid(out['pred_logits']),
    }
    if cfg.objectness:
      result['objectness_logits'] = out['objectness_logits']
    return result

  info = {
      'kind': 'owlvit',
      'source': source,
      'owlvit_config': cfg.name,
      'architecture': dataclasses.asdict(cfg),
  }
  return ServingModel(
      'owlvit', fn, params, cfg.image_size, (_text_input(cfg.max_query_length),), info
  )


def _import_tf():
  """(tensorflow, jax2tf), or a one-line RuntimeError naming what to install."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise RuntimeError(
        f'the TensorFlow export needs TensorFlow ({e}); install it with '
        "pip install 'clipcrop-jax[data]' (tensorflow-cpu)"
    ) from None
  return tf, jax2tf


def to_tf_module(serving: ServingModel, platforms: Sequence[str] = DEFAULT_PLATFORMS):
  """Converts `serving` with jax2tf; returns (tf.Module holding the variables, signatures dict).

  Both signatures call one converted function, polymorphic in the batch size ('b') and the query
  count ('q'); `serving_uint8` divides its images by 255 first.
  """
  tf, jax2tf = _import_tf()
  s = serving.image_size

  def poly(dims):
    return '(b, ' + ', '.join(str(d) for d in dims) + ')'

  converted = jax2tf.convert(
      serving.fn,
      with_gradient=False,
      native_serialization_platforms=tuple(platforms),
      polymorphic_shapes=[None, poly((s, s, 3))] + [poly(i.dims) for i in serving.inputs],
  )
  module = tf.Module()
  module.params = tf.nest.map_structure(
      lambda p: tf.Variable(np.asarray(p), trainable=False), serving.params
  )
  extra = [
      tf.TensorSpec(
          [None] + [None if d == QUERY_DIM else d for d in i.dims],
          tf.as_dtype(i.dtype),
          name=i.name,
      )
      for i in serving.inputs
  ]

  def from_pixels(pixels, *inputs):
    return converted(module.params, pixels, *inputs)

  def from_uint8(images, *inputs):
    return converted(module.params, tf.cast(images, tf.float32) / 255.0, *inputs)

  image_shape = [None, s, s, 3]
  module.serve_pixels = tf.function(
      from_pixels,
      autograph=False,
      input_signature=[tf.TensorSpec(image_shape, tf.float32, name='pixels')] + extra,
  )
  module.serve_uint8 = tf.function(
      from_uint8,
      autograph=False,
      input_signature=[tf.TensorSpec(image_shape, tf.uint8, name='images')] + extra,
  )
  signatures = {
      SIGNATURE_PIXELS: module.serve_pixels.get_concrete_function(),
      SIGNATURE_UINT8: module.serve_uint8.get_concrete_function(),
  }
  return module, signatures


def _signature_info(signatures) -> dict[str, Any]:
  """{signature: {'inputs': {name: [shape, dtype]}, 'outputs': {...}}}; None = any size."""

  def describe(name, spec):
    return name, [spec.shape.as_list(), spec.dtype.name]

  return {
      name: {
          'inputs': dict(describe(s.name, s) for s in fn.structured_input_signature[0]),
          'outputs': dict(describe(k, t) for k, t in fn.structured_outputs.items()),
      }
      for name, fn in signatures.items()
  }


def is_saved_model(path: pathlib.Path) -> bool:
  """True when `path` is a directory holding a SavedModel (saved_model.pb or .pbtxt)."""
  return any((path / name).is_file() for name in SAVED_MODEL_FILES)


def check_out_dir(out: Any, overwrite: bool) -> pathlib.Path:
  """Checks, before any work, that the export may create (or replace) `out`.

  Raises ValueError (one line naming --out) when `out` is a file, is a non-empty directory that
  is not a SavedModel (refused even with `overwrite`), is a SavedModel and `overwrite` is False,
  or its parent folder cannot be written. A missing parent folder is created.
  """
  out = pathlib.Path(out)
  if out.exists() and not out.is_dir():
    raise ValueError(f'--out {out}: exists and is not a directory')
  if out.is_dir() and any(out.iterdir()):
    if not is_saved_model(out):
      raise ValueError(
          f'--out {out}: a non-empty directory that is not a SavedModel; never '
          'replacing it, choose a new or empty directory'
      )
    if not overwrite:
      raise ValueError(
          f'--out {out}: a SavedModel exists there; choose another directory or ' 'pass --overwrite'
      )
  try:
    fileio.make_writable_dir(out.parent)
  except OSError as e:
    raise ValueError(f'--out {out}: cannot write in {out.parent} ({e.strerror or e})') from None
  return out


def save(
    serving: ServingModel,
    out: Any,
    overwrite: bool = False,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
) -> pathlib.Path:
  """Converts `serving` and writes the SavedModel (plus EXPORT_INFO) to `out`, atomically.

  Raises:
    ValueError: `out` may not be written (`check_out_dir`).
  """
  tf, _ = _import_tf()
  out = check_out_dir(out, overwrite)
  module, signatures = to_tf_module(serving, platforms)
  info = dict(
      serving.info,
      format_version=EXPORT_FORMAT_VERSION,
      platforms=list(platforms),
      image_size=serving.image_size,
      jax_version=jax.__version__,
      tensorflow_version=tf.__version__,
      signatures=_signature_info(signatures),
  )
  with fileio.replace_directory(out) as tmp:
    tf.saved_model.save(module, str(tmp), signatures=signatures)
    (tmp / EXPORT_INFO).parent.mkdir()
    (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=1))
  return out


def load_serving(args: argparse.Namespace) -> ServingModel:
  """The ServingModel the command line names (--model, --random-init or --owlvit).

  Raises ValueError / FileNotFoundError / CheckpointError with a one-line message.
  """
  if args.owlvit is not None:
    module, variables = owl_checkpoints.load_checkpoint(args.owlvit)
    return owlvit_serving(module, variables['params'], str(args.owlvit))
  if args.model is not None:
    exported = export.load_model(args.model)
    return clipcrop_serving(
        exported.config, exported.params, str(args.model), exported.keyword_pipeline, args.mode
    )
  cropper = ClipCropper.init_random(args.random_init, seed=args.seed)
  return clipcrop_serving(
      cropper.config,
      cropper.variables['params'],
      cropper.model_id,
      cropper.keyword_pipeline,
      args.mode,
  )


def parse_platforms(value: str) -> tuple[str, ...]:
  """'cpu,cuda' -> ('cpu', 'cuda'); ValueError naming --platforms otherwise."""
  names = tuple(p.strip().lower() for p in value.split(','))
  bad = [p for p in names if p not in PLATFORMS]
  if bad or not names or len(set(names)) != len(names):
    raise ValueError(
        f'--platforms {value!r}: expected distinct names among '
        f'{", ".join(PLATFORMS)}, comma-separated'
    )
  return names


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  """Parses the command line (argparse exits with code 2 on a malformed one)."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument('--model', help='ClipCrop model directory (or a training workdir).')
  source.add_argument(
      '--random-init',
      metavar='CONFIG',
      help="ClipCrop with random weights: 'tiny' or an OWL-ViT config name.",
  )
  source.add_argument(
      '--owlvit',
      metavar='CHECKPOINT',
      help='Plain OWL-ViT: any checkpoint clipcrop_jax.owlvit.load_checkpoint ' 'reads.',
  )
  parser.add_argument(
      '--out',
      required=True,
      help='SavedModel directory (TF Serving: <base>/<model name>/<version>).',
  )
  parser.add_argument(
      '--mode',
      choices=EXPORT_MODES,
      default=None,
      help="ClipCrop query mode (default: the model's); 'base' takes no text.",
  )
  parser.add_argument('--seed', type=int, default=0, help='--random-init seed (default 0).')
  parser.add_argument(
      '--platforms',
      default=','.join(DEFAULT_PLATFORMS),
      help='Platforms the SavedModel runs on, comma-separated among '
      f'{", ".join(PLATFORMS)} (default: %(default)s).',
  )
  parser.add_argument(
      '--overwrite',
      action='store_true',
      help='Replace an existing SavedModel at --out (nothing else is replaced).',
  )
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the export; returns a process exit code (0 written, 1 load/convert error, 2 usage)."""
  args = parse_args(argv)
  try:  # Arguments and the output are checked before the (possibly long) load.
    platforms = parse_platforms(args.platforms)
    if args.owlvit is not None and args.mode is not None:
      raise ValueError('--mode applies to ClipCrop models (--model, --random-init), not --owlvit')
    check_out_dir(args.out, args.overwrite)
    _import_tf()
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except RuntimeError as e:  # TensorFlow missing
    print(f'error: {e}', file=sys.stderr)
    return 1
  try:
    serving = load_serving(args)
  except (ValueError, FileNotFoundError) as e:  # CheckpointError is a ValueError
    print(f'error: {e}', file=sys.stderr)
    return 2 if args.random_init is not None else 1
  try:
    out = save(serving, args.out, args.overwrite, platforms)
  except Exception as e:  # pylint: disable=broad-except
    first = (str(e).splitlines() or [''])[0]  # jax2tf errors run to many lines
    print(f'error: conversion failed ({type(e).__name__}: {first})', file=sys.stderr)
    return 1
  print(
      f'exported: {serving.kind} ({serving.info["owlvit_config"]}, image size '
      f'{serving.image_size}, platforms {",".join(platforms)})'
  )
  print(
      f'signatures: {SIGNATURE_PIXELS} (float32 pixels), {SIGNATURE_UINT8} (uint8 images); '
      f'inputs after the image: {", ".join(i.name for i in serving.inputs)}'
  )
  print(f'wrote: {out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
