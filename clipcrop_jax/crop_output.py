"""What a crop job writes per image: crop JPEGs, the overlay picture and the JSON of its crops.

Shared by the crop command line (`clipcrop_jax.crop`) and the Beam job (`clipcrop_jax.beam`),
so both write the same files and the same JSON.
"""

from __future__ import annotations

import io
import math
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

RANK_COLORS = ['#e6194b', '#f58231', '#ffe119', '#3cb44b', '#4363d8', '#911eb4']


def pixel_box(box: Sequence[float], image_wh: tuple[int, int]) -> tuple[int, int, int, int]:
  """Integer (x0, y0, x1, y1) of a crop box, inside the image, at least one pixel per side."""
  w, h = image_wh
  x0, y0 = (min(max(int(round(v)), 0), m - 1) for v, m in zip(box[:2], (w, h)))
  x1, y1 = (min(max(int(round(v)), lo + 1), m) for v, lo, m in zip(box[2:], (x0, y0), (w, h)))
  return x0, y0, x1, y1


def draw_crops(
    image: np.ndarray, boxes: Sequence[Sequence[float]], scores: Sequence[float]
) -> Image.Image:
  """The image (uint8 (H, W, 3)) with the ranked crop boxes (x0, y0, x1, y1 pixels) drawn, rank
  1 thickest, each labelled '#rank score'."""
  img = Image.fromarray(image).convert('RGB')
  draw = ImageDraw.Draw(img)
  base = max(2, round(max(img.size) / 250))
  for rank, (box, score) in reversed(list(enumerate(zip(boxes, scores)))):
    color = RANK_COLORS[rank % len(RANK_COLORS)]
    box = tuple(float(v) for v in box)
    draw.rectangle(box, outline=color, width=base + (2 if rank == 0 else 0))
    label = (
        f'#{rank + 1} {score:.2f}'
        if score is not None and math.isfinite(score)
        else (f'#{rank + 1}')
    )
    draw.text((box[0] + base + 2, box[1] + base + 1), label, fill=color)
  return img


def encode_image(img: Image.Image, fmt: str, **kwargs) -> bytes:
  """`img` encoded in format `fmt` ('JPEG', 'PNG', ...)."""
  buf = io.BytesIO()
  img.save(buf, format=fmt, **kwargs)
  return buf.getvalue()


def crop_files(
    image: np.ndarray, boxes: Sequence[Sequence[float]], scores: Sequence[float], name: str
) -> list[tuple[str, bytes]]:
  """(file name, bytes) of an image's outputs: `<name>_crop<i>.jpg` (best first) cut from the
  full-resolution `image`, and `<name>_overlay.png`."""
  h, w = image.shape[:2]
  files = []
  for i, box in enumerate(boxes):
    x0, y0, x1, y1 = pixel_box(box, (w, h))
    files.append(
        (
            f'{name}_crop{i}.jpg',
            encode_image(Image.fromarray(image[y0:y1, x0:x1]), 'JPEG', quality=95),
        )
    )
  files.append((f'{name}_overlay.png', encode_image(draw_crops(image, boxes, scores), 'PNG')))
  return files


def crop_json(crop: Any, rank: int) -> dict[str, Any]:
  """A `cropper.Crop` as the JSON of `crops.json` / the Beam results (JSON has no NaN: a
  non-finite score is null)."""
  score = crop.score if math.isfinite(crop.score) else None
  return {
      'rank': rank,
      'box_xyxy': list(crop.box),
      'score': score,
      'aspect_ratio': crop.aspect_ratio,
      'focal_point': list(crop.focal_point),
      'fused': crop.fused,
      'queries': [q.to_json() for q in crop.queries],
  }
