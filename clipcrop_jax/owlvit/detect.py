r"""Open-vocabulary detection demo: boxes and scores for text queries, in original-image pixels.

  python -m clipcrop_jax.owlvit.detect --checkpoint owl2-b16.msgpack --image cats.jpg \
      --query "a cat" --query "a remote control" --out overlay.png
  python -m clipcrop_jax.owlvit.detect --random-init tiny --query "a red square"

`--checkpoint` accepts everything `load_checkpoint` reads (Scenic msgpack files, Hugging Face
directories with model.safetensors, and names: HF ids such as google/owlv2-base-patch16-ensemble,
Scenic release names such as clip_vit_b32_b0203fc; `clipcrop_jax.owlvit.hub`).
`--random-init NAME` builds the named config with random weights instead (boxes are then
meaningless; it shows the pipeline runs). Without `--image` a built-in synthetic picture is used.
`--query-image EXAMPLE.jpg [--query-box X0,Y0,X1,Y1]` adds an example image as a query (Scenic's
one-shot rule; the box is in the example's pixels).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import pathlib
import sys
from typing import Optional, Sequence, TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:  # imported where used: the command line checks its arguments before jax loads
  from clipcrop_jax.owlvit.image_query import ImageQuery

OVERLAY_SUFFIXES = {'.png': 'PNG', '.jpg': 'JPEG', '.jpeg': 'JPEG', '.webp': 'WEBP'}
COLORS = ['#e6194b', '#3cb44b', '#4363d8', '#f58231', '#911eb4', '#42d4f4', '#f032e6', '#bfef45']


@dataclasses.dataclass
class Detection:
  """One detected box. `box` is (x0, y0, x1, y1) in original-image pixels."""

  query: str
  score: float
  box: tuple[float, float, float, float]
  token: int


def demo_image(height: int = 360, width: int = 540) -> np.ndarray:
  """A synthetic non-square picture (uint8 (H, W, 3)): sky, grass, a red square, a blue disc."""
  img = Image.new('RGB', (width, height), (135, 190, 235))
  draw = ImageDraw.Draw(img)
  draw.rectangle([0, int(height * 0.65), width, height], fill=(70, 150, 60))
  draw.rectangle([60, 120, 200, 260], fill=(210, 30, 40))
  draw.ellipse([320, 90, 470, 240], fill=(30, 60, 200))
  return np.asarray(img)


def detect(
    module,
    variables,
    image: np.ndarray,
    queries: Sequence[str] = (),
    top_k: int = 3,
    min_score: float = 0.0,
    recipe: str = 'colab',
    image_queries: Sequence[ImageQuery] = (),
) -> list[Detection]:
  """Runs the detector on one uint8 image and returns the top-k boxes per query.

  Args:
    module: `TextZeroShotDetectionModule`.
    variables: its variables.
    image: uint8 (H, W, 3).
    queries: text queries.
    top_k: boxes kept per query, best first.
    min_score: drop boxes whose sigmoid score is below this.
    recipe: preprocessing recipe ('colab' or 'evaluator').
    image_queries: example images used as queries (Scenic's one-shot rule).

  Returns:
    Detections sorted by query order (texts, then image queries), then score (descending).
  """
  from clipcrop_jax.owlvit import heads  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.owlvit import image_query  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.owlvit import model as model_lib  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.owlvit import preprocessing as pp  # pylint: disable=g-import-not-at-top

  if isinstance(top_k, (bool, np.bool_)) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
    raise ValueError(f'top_k must be an integer >= 1, got {top_k!r}')
  if isinstance(min_score, (bool, np.bool_)) or not 0.0 <= float(min_score) <= 1.0:
    raise ValueError(f'min_score must be a number in [0, 1], got {min_score!r}')
  labels = list(queries) + [q.name for q in image_queries]
  embeddings = image_query.query_embeddings(module, variables, queries, image_queries, recipe)
  pixels = pp.preprocess(image, module.config.image_size, recipe=recipe)[None]
  encoded = model_lib.encode_images(module, variables, pixels)
  logits = np.asarray(heads.logits_from_image_terms(encoded['class_terms'], embeddings[None])[0])
  pred_boxes = np.asarray(encoded['pred_boxes'][0])
  h, w = image.shape[:2]
  boxes = pp.boxes_cxcywh_to_pixels_xyxy(pred_boxes, (h, w))
  # Tokens of the padding, and boxes with no area once clipped to the image, are no detections.
  extent = (w / max(h, w), h / max(h, w))  # the real image in [0, 1] of the padded square
  valid = (
      np.asarray(heads.token_in_image(pred_boxes, extent))
      & (boxes[:, 2] > boxes[:, 0])
      & (boxes[:, 3] > boxes[:, 1])
  )
  scores = np.where(valid[:, None], 1.0 / (1.0 + np.exp(-logits)), -1.0)  # < any min_score
  detections = []
  for q, label in enumerate(labels):
    for token in np.argsort(-scores[:, q], kind='stable')[:top_k]:
      if scores[token, q] >= min_score:
        detections.append(
            Detection(
                label, float(scores[token, q]), tuple(float(v) for v in boxes[token]), int(token)
            )
        )
  return detections


def draw_overlay(
    image: np.ndarray, detections: Sequence[Detection], queries: Sequence[str]
) -> Image.Image:
  """Draws each detection's box and 'query score' label on a copy of the image."""
  img = Image.fromarray(image).convert('RGB')
  draw = ImageDraw.Draw(img)
  width = max(2, round(max(img.size) / 300))
  for det in detections:
    color = COLORS[list(queries).index(det.query) % len(COLORS)]
    draw.rectangle(det.box, outline=color, width=width)
    draw.text(
        (det.box[0] + width + 1, det.box[1] + width), f'{det.query} {det.score:.2f}', fill=color
    )
  return img


def _build_model(args):
  from clipcrop_jax.owlvit import checkpoints  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.owlvit import configs  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.owlvit import model as model_lib  # pylint: disable=g-import-not-at-top

  if args.random_init:
    cfg = configs.get_config(args.random_init)
    return (
        model_lib.TextZeroShotDetectionModule(cfg),
        model_lib.init_variables(cfg, seed=args.seed),
        f'random-init {cfg.name}',
    )
  module, variables = checkpoints.load_checkpoint(args.checkpoint)
  return module, variables, str(args.checkpoint)


def _parse_box(text: str) -> tuple[float, float, float, float]:
  """'x0,y0,x1,y1' -> floats; ValueError naming the flag otherwise."""
  try:
    box = tuple(float(v) for v in text.split(','))
  except ValueError:
    box = ()
  if len(box) != 4 or not (box[2] > box[0] and box[3] > box[1]):
    raise ValueError(f'--query-box {text!r}: expected X0,Y0,X1,Y1 pixels with X1>X0 and Y1>Y0')
  return box


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m clipcrop_jax.owlvit.detect',
      description='OWL-ViT text-query detection; prints boxes in original-image pixels.',
  )
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument(
      '--checkpoint',
      help='Scenic msgpack file or Hugging Face directory, or a name: a Hugging Face '
      'id (google/owlvit-base-patch32, hf:ID@REV) or a Scenic release '
      '(clip_vit_b32_b0203fc, scenic:NAME), downloaded once into a cache.',
  )
  src.add_argument(
      '--random-init',
      metavar='CONFIG',
      help='Random weights of this config (e.g. tiny, clip_b32) instead.',
  )
  parser.add_argument('--image', help='Image file (default: a built-in synthetic picture).')
  parser.add_argument(
      '--query', action='append', default=[], help='Text query; repeat for several.'
  )
  parser.add_argument(
      '--query-image',
      action='append',
      default=[],
      help='Example image used as a query (one-shot); repeat for several.',
  )
  parser.add_argument(
      '--query-box',
      action='append',
      default=[],
      metavar='X0,Y0,X1,Y1',
      help='Region of the n-th --query-image in its pixels (default: whole image).',
  )
  parser.add_argument('--top-k', type=int, default=3, help='Boxes per query (default 3).')
  parser.add_argument('--min-score', type=float, default=0.0, help='Score threshold.')
  parser.add_argument(
      '--recipe',
      choices=['colab', 'evaluator'],
      default='colab',
      help='Preprocessing: pad 0.5 + anti-aliased resize (colab) or resize + pad '
      '0.0 (evaluator).',
  )
  parser.add_argument(
      '--out',
      default='detections.png',
      help='Overlay image path (.png/.jpg; must not exist unless --overwrite).',
  )
  parser.add_argument(
      '--overwrite',
      action='store_true',
      help='Replace an existing --out file (never one of the input images).',
  )
  parser.add_argument('--json', action='store_true', help='Print JSON instead of a table.')
  parser.add_argument('--seed', type=int, default=0, help='Seed for --random-init.')
  args = parser.parse_args(argv)

  from clipcrop_jax.owlvit import fileio  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.owlvit import image_query  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.owlvit import preprocessing as pp  # pylint: disable=g-import-not-at-top

  if not args.query and not args.query_image:
    parser.error('give at least one --query or --query-image')
  if len(args.query_box) > len(args.query_image):
    parser.error('more --query-box than --query-image')
  if args.top_k < 1:
    parser.error(f'--top-k must be >= 1, got {args.top_k}')
  if not 0.0 <= args.min_score <= 1.0:  # also refuses nan
    parser.error(f'--min-score must be in [0, 1], got {args.min_score}')
  if any(not q.strip() for q in args.query):
    parser.error('--query is empty (only whitespace)')
  try:  # Arguments and inputs first, the model last: nothing is computed for a bad command.
    fileio.check_output_file(
        args.out,
        suffixes=OVERLAY_SUFFIXES,
        overwrite=args.overwrite,
        inputs=[p for p in [args.image] + args.query_image if p],
    )
    image = pp.load_image(args.image) if args.image else demo_image()
    image_queries = [
        image_query.ImageQuery(
            f'image:{pathlib.Path(path).name}',
            pp.load_image(path),
            _parse_box(args.query_box[i]) if i < len(args.query_box) else None,
        )
        for i, path in enumerate(args.query_image)
    ]
    for q in image_queries:
      image_query.check_query_box(q)
    module, variables, model_id = _build_model(args)
    detections = detect(
        module, variables, image, args.query, args.top_k, args.min_score, args.recipe, image_queries
    )
  except (ValueError, OSError) as e:  # ImageError, CheckpointError, bad query: one line.
    print(f'error: {e}', file=sys.stderr)
    return 2

  labels = args.query + [q.name for q in image_queries]
  overlay = io.BytesIO()
  draw_overlay(image, detections, labels).convert('RGB').save(
      overlay, format=OVERLAY_SUFFIXES[pathlib.Path(args.out).suffix.lower()]
  )
  write = fileio.atomic_write_bytes if args.overwrite else fileio.create_new_bytes
  try:
    write(args.out, overlay.getvalue())
  except OSError as e:
    print(f'error: --out {args.out}: {e}', file=sys.stderr)
    return 1
  if args.json:
    print(
        json.dumps(
            {
                'model': model_id,
                'image': args.image or '<demo>',
                'image_size_hw': list(image.shape[:2]),
                'overlay': args.out,
                'detections': [dataclasses.asdict(d) for d in detections],
            },
            indent=1,
        )
    )
  else:
    print(
        f'model: {model_id}; image: {args.image or "<demo>"} '
        f'({image.shape[1]}x{image.shape[0]} px); overlay: {args.out}'
    )
    print(f'{"query":<24} {"score":>6}  box (x0, y0, x1, y1) px')
    for d in detections:
      box = ', '.join(f'{v:7.1f}' for v in d.box)
      print(f'{d.query[:24]:<24} {d.score:6.3f}  ({box})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
