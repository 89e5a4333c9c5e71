r"""Command line: crop a collection of any size on Apache Beam (`clipcrop_jax.beam`).

  python -m clipcrop_jax.crop_beam --checkpoint MODEL_DIR --input 'photos/**/*.jpg' \
      --text "the dog" --output out/run1                         # local (Beam's DirectRunner)
  python -m clipcrop_jax.crop_beam --checkpoint MODEL_DIR --requests requests.jsonl \
      --output gs://bucket/crops --runner DataflowRunner --project P --region R \
      --temp_location gs://bucket/tmp --sdk_container_image IMAGE     # each image its own text
  python -m clipcrop_jax.crop_beam ... --skip_done                 # crop only what is missing

`--input` is a glob on any Beam file system (local, gs://, s3:// with Beam's extras), cropped to
one `--text` / `--query_image`; `--requests` a JSONL file of {"image": uri, "text": ...} or
{"image": uri, "query_image": uri} lines. Results: OUTPUT/results/<run_id>-*.jsonl (one JSON line
per image), OUTPUT/dead_letters/<run_id>-*.jsonl (images that failed, with a one-line reason)
and the crop files in OUTPUT/crops/. Every flag this command does not know is a Beam pipeline
option (`--runner`, `--num_workers`, `--machine_type`, `--direct_num_workers`, ...).

Exit codes: 0 every image cropped, 1 some images are in the dead letters, 2 bad arguments
(checked before the pipeline is built, one line). The crop command line's own multi-process
flags are gone: this is the way to run on more than one machine.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from typing import Optional, Sequence

from clipcrop_jax import default_config

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m clipcrop_jax.crop_beam',
      description='Crop a collection on Apache Beam (other flags are Beam pipeline options).',
  )
  model = parser.add_mutually_exclusive_group(required=True)
  model.add_argument(
      '--checkpoint',
      help='ClipCrop model dir (or training workdir) or an '
      'OWL-ViT checkpoint: a path the workers can read, a Hugging Face id or a '
      'Scenic release name (downloaded by each worker).',
  )
  model.add_argument('--random_init', metavar='CONFIG', help="Random weights ('tiny', ...).")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument('--input', help='A glob of images on any Beam file system (quote it).')
  source.add_argument(
      '--requests',
      help='A JSONL file of {"image": uri, "text": ...} or '
      '{"image": uri, "query_image": uri} lines.',
  )
  query = parser.add_mutually_exclusive_group()
  query.add_argument('--text', help='What to crop every --input image to.')
  query.add_argument('--query_image', help='An example image (URI) for every --input image.')
  parser.add_argument('--output', required=True, help='Output folder (any Beam file system).')
  parser.add_argument('--top_k', type=int, default=3, help='Crops per image (>= 1).')
  parser.add_argument('--aspect_ratio', default=None, help="e.g. '16:9', 1.5")
  parser.add_argument('--min_size', type=float, default=None, help='Min crop side in pixels.')
  parser.add_argument('--mode', default=None, help="Query mode (default: the model's).")
  parser.add_argument(
      '--fuse_top_k',
      type=int,
      default=None,
      help="First crop = mean of the k best predictions (default: the model's).",
  )
  parser.add_argument(
      '--keyword_pipeline',
      default=None,
      help="Keyword extractor: a spaCy pipeline or 'rules' (default: the model's).",
  )
  parser.add_argument('--dtype', default='float32', choices=default_config.DTYPES)
  parser.add_argument(
      '--max_pixels',
      type=int,
      default=None,
      help='Images with more decoded pixels go to the dead letters.',
  )
  parser.add_argument(
      '--batch_size',
      type=int,
      default=8,
      help='Images per forward (the largest batch RunInference forms).',
  )
  parser.add_argument(
      '--model_copies',
      type=int,
      default=None,
      help='Models per worker machine, shared by its SDK processes (GPU workers: '
      '1, one JAX process owning the GPU).',
  )
  parser.add_argument(
      '--large_model',
      action='store_true',
      help="Share one model across the worker's processes (= --model_copies 1).",
  )
  parser.add_argument(
      '--no_images',
      action='store_true',
      help='Write only the JSON results, no crop or overlay files.',
  )
  parser.add_argument(
      '--skip_done',
      action='store_true',
      help='Crop only the images no earlier run of --output has results for.',
  )
  parser.add_argument(
      '--run_id', default=None, help="Name of this run's result files (default: run-<UTC time>)."
  )
  return parser


def _check(args) -> None:
  """Every argument, before anything is built (ValueError / TypeError with one line)."""
  from clipcrop_jax import crop_request  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.data import features  # pylint: disable=g-import-not-at-top
  from clipcrop_jax import keywords  # pylint: disable=g-import-not-at-top

  crop_request.check_crop_arguments(
      args.top_k, args.aspect_ratio, args.min_size, args.fuse_top_k, name=lambda arg: '--' + arg
  )
  for flag in ('max_pixels', 'batch_size', 'model_copies'):
    if getattr(args, flag) is not None:
      crop_request.check_int('--' + flag, getattr(args, flag))
  if args.mode is not None and args.mode not in features.QUERY_MODES:
    raise ValueError(f'--mode {args.mode!r}; expected one of {", ".join(features.QUERY_MODES)}')
  if args.keyword_pipeline is not None:
    try:
      keywords.check_pipeline(args.keyword_pipeline)
    except ValueError as e:
      raise ValueError(f'--keyword_pipeline: {e}') from None
  if args.requests is not None and (args.text is not None or args.query_image is not None):
    raise ValueError(
        '--text / --query_image go with --input; with --requests each line has ' 'its own'
    )
  if args.text is not None and not args.text.strip():
    raise ValueError('--text is empty (only whitespace)')
  if args.run_id is not None and (not args.run_id or '/' in args.run_id):
    raise ValueError(f'--run_id {args.run_id!r}: a file name prefix, without "/"')


def _count_lines(pattern: str) -> int:
  from apache_beam.io import filesystems  # pylint: disable=g-import-not-at-top

  fs = filesystems.FileSystems
  count = 0
  for match in fs.match([pattern])[0].metadata_list:
    with fs.open(match.path, compression_type='uncompressed') as f:
      count += sum(1 for line in io.TextIOWrapper(f, encoding='utf-8') if line.strip())
  return count


def main(argv: Optional[Sequence[str]] = None) -> int:
  args, beam_args = _parser().parse_known_args(argv)
  try:
    _check(args)
    import apache_beam as beam  # pylint: disable=g-import-not-at-top
    from apache_beam.options import pipeline_options  # pylint: disable=g-import-not-at-top
    from clipcrop_jax import beam as cb  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    print(
        f'error: the Beam job needs Apache Beam ({e}); pip install "clipcrop-jax[beam]"',
        file=sys.stderr,
    )
    return EXIT_USAGE
  except (ValueError, TypeError) as e:
    print(f'error: {e}', file=sys.stderr)
    return EXIT_USAGE
  settings = cb.CropSettings(
      checkpoint=args.checkpoint,
      random_init=args.random_init,
      keyword_pipeline=args.keyword_pipeline,
      top_k=args.top_k,
      aspect_ratio=args.aspect_ratio,
      min_size=args.min_size,
      mode=args.mode,
      fuse_top_k=args.fuse_top_k,
      dtype=args.dtype,
      max_pixels=args.max_pixels,
      write_images=not args.no_images,
  )
  shared = args.large_model or args.model_copies is not None
  handler = cb.ClipCropModelHandler(
      settings,
      batch_size=args.batch_size,
      model_copies=args.model_copies,
      large_model=args.large_model,
      env_vars=cb.GPU_ENV if shared else None,
  )
  run_id = args.run_id or cb.default_run_id()
  try:
    options = pipeline_options.PipelineOptions(beam_args)
  except Exception as e:  # pylint: disable=broad-except  # Beam's own option errors
    print(f'error: pipeline options {beam_args}: {e}', file=sys.stderr)
    return EXIT_USAGE
  pipeline = beam.Pipeline(options=options)
  try:
    cb.build_pipeline(
        pipeline,
        handler=handler,
        output=args.output,
        input_glob=args.input,
        input_jsonl=args.requests,
        text=args.text,
        query_image=args.query_image,
        skip_done=args.skip_done,
        run_id=run_id,
    )
  except (ValueError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return EXIT_USAGE
  result = pipeline.run()
  result.wait_until_finish()
  try:
    done = _count_lines(f'{args.output.rstrip("/")}/{cb.RESULTS_DIR}/{run_id}-*.jsonl')
    dead = _count_lines(f'{args.output.rstrip("/")}/{cb.DEAD_LETTERS_DIR}/{run_id}-*.jsonl')
  except Exception:  # pylint: disable=broad-except  # e.g. a remote runner still writing
    print(json.dumps({'run_id': run_id, 'state': str(result.state)}))
    return 0
  print(
      f'{run_id}: {done} image(s) cropped, {dead} in the dead letters; results in '
      f'{args.output.rstrip("/")}/{cb.RESULTS_DIR}/'
  )
  return 1 if dead else 0


if __name__ == '__main__':
  sys.exit(main())
