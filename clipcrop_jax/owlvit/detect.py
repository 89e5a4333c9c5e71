r"""Open-vocabulary detection demo: boxes and scores for text queries, in original-image pixels.

  python -m clipcrop_jax.owlvit.detect --checkpoint owl2-b16.msgpack --image cats.jpg \
      --query "a cat" --query "a remote control" --out overlay.png
  python -m clipcrop_jax.owlvit.detect --random-init tiny --query "a red square"

`--checkpoint` accepts everything `load_checkpoint` reads (Scenic msgpack files, Hugging Face
directories with model.safetensors). `--random-init NAME` builds the named config with random
weights instead (boxes are then meaningless; it shows the pipeline runs). Without `--image` a
built-in synthetic picture is used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

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


def detect(module, variables, image: np.ndarray, queries: Sequence[str], top_k: int = 3,
           min_score: float = 0.0, recipe: str = 'colab') -> list[Detection]:
  """Runs the detector on one uint8 image and returns the top-k boxes per query.

  Args:
    module: `TextZeroShotDetectionModule`.
    variables: its variables.
    image: uint8 (H, W, 3).
    queries: text queries (at least one).
    top_k: boxes kept per query, best first.
    min_score: drop boxes whose sigmoid score is below this.
    recipe: preprocessing recipe ('colab' or 'evaluator').

  Returns:
    Detections sorted by query order, then score (descending).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.owlvit import preprocessing as pp  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.owlvit import tokenizer  # pylint: disable=g-import-not-at-top

  if not queries:
    raise ValueError('Give at least one --query.')
  size = module.config.image_size
  pixels = pp.preprocess(image, size, recipe=recipe)[None]
  tokens = tokenizer.tokenize(list(queries), max_len=module.config.max_query_length)[None]
  out = jax.jit(module.apply)(variables, pixels, tokens)
  logits = np.asarray(out['pred_logits'][0])  # (P, Q)
  boxes = pp.boxes_cxcywh_to_pixels_xyxy(np.asarray(out['pred_boxes'][0]), image.shape[:2])
  scores = 1.0 / (1.0 + np.exp(-logits))
  detections = []
  for q, query in enumerate(queries):
    for token in np.argsort(-scores[:, q])[:top_k]:
      if scores[token, q] >= min_score:
        detections.append(Detection(query, float(scores[token, q]),
                                    tuple(float(v) for v in boxes[token]), int(token)))
  return detections


def draw_overlay(image: np.ndarray, detections: Sequence[Detection],
                 queries: Sequence[str]) -> Image.Image:
  """Draws each detection's box and 'query score' label on a copy of the image."""
  img = Image.fromarray(image).convert('RGB')
  draw = ImageDraw.Draw(img)
  width = max(2, round(max(img.size) / 300))
  for det in detections:
    color = COLORS[list(queries).index(det.query) % len(COLORS)]
    draw.rectangle(det.box, outline=color, width=width)
    draw.text((det.box[0] + width + 1, det.box[1] + width), f'{det.query} {det.score:.2f}',
              fill=color)
  return img


def _build_model(args):
  from clipcrop_jax.owlvit import checkpoints  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.owlvit import configs  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.owlvit import model as model_lib  # pylint: disable=g-import-not-at-top

  if args.random_init:
    cfg = configs.get_config(args.random_init)
    return (model_lib.TextZeroShotDetectionModule(cfg),
            model_lib.init_variables(cfg, seed=args.seed), f'random-init {cfg.name}')
  module, variables = checkpoints.load_checkpoint(args.checkpoint)
  return module, variables, str(args.checkpoint)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m clipcrop_jax.owlvit.detect',
      description='OWL-ViT text-query detection; prints boxes in original-image pixels.')
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument('--checkpoint', help='Scenic msgpack file or Hugging Face directory.')
  src.add_argument('--random-init', metavar='CONFIG',
                   help='Random weights of this config (e.g. tiny, clip_b32) instead.')
  parser.add_argument('--image', help='Image file (default: a built-in synthetic picture).')
  parser.add_argument('--query', action='append', required=True,
                      help='Text query; repeat for several.')
  parser.add_argument('--top-k', type=int, default=3, help='Boxes per query (default 3).')
  parser.add_argument('--min-score', type=float, default=0.0, help='Score threshold.')
  parser.add_argument('--recipe', choices=['colab', 'evaluator'], default='colab',
                      help='Preprocessing: pad 0.5 + anti-aliased resize (colab) or resize + pad '
                      '0.0 (evaluator).')
  parser.add_argument('--out', default='detections.png', help='Overlay PNG path.')
  parser.add_argument('--json', action='store_true', help='Print JSON instead of a table.')
  parser.add_argument('--seed', type=int, default=0, help='Seed for --random-init.')
  args = parser.parse_args(argv)

  from clipcrop_jax.owlvit import preprocessing as pp  # pylint: disable=g-import-not-at-top
  try:
    image = pp.load_image(args.image) if args.image else demo_image()
    module, variables, model_id = _build_model(args)
    detections = detect(module, variables, image, args.query, args.top_k, args.min_score,
                        args.recipe)
  except (ValueError, OSError) as e:  # ImageError, CheckpointError, bad query: one line.
    print(f'error: {e}', file=sys.stderr)
    return 2

  draw_overlay(image, detections, args.query).save(args.out)
  if args.json:
    print(json.dumps({'model': model_id, 'image': args.image or '<demo>',
                      'image_size_hw': list(image.shape[:2]), 'overlay': args.out,
                      'detections': [dataclasses.asdict(d) for d in detections]}, indent=1))
  else:
    print(f'model: {model_id}; image: {args.image or "<demo>"} '
          f'({image.shape[1]}x{image.shape[0]} px); overlay: {args.out}')
    print(f'{"query":<24} {"score":>6}  box (x0, y0, x1, y1) px')
    for d in detections:
      box = ', '.join(f'{v:7.1f}' for v in d.box)
      print(f'{d.query[:24]:<24} {d.score:6.3f}  ({box})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
