"""Procedurally generated text-conditioned cropping scenes (pure numpy + Pillow, no TF).

The data of the `synthetic` TFDS builder (`datasets/synthetic`, whose README describes the
scenes, captions, candidate crops and their scores). A scene is a few coloured shapes on a
textured background, every (colour, shape) pair at most once; a caption names a target (one
object, two, or one by its relation to another); GAIC grid and free-form candidate crops are
scored 1..5 by `score_candidates` (`ANNOTATOR_WEIGHTS`, `zero_shot.composition_score`).
Ambiguity examples (`generate_ambiguity_example`) hold two equally salient targets, one caption
and four reference crops per target.

Conventions: pixel boxes are (x0, y0, x1, y1) in continuous pixel units (as `zero_shot`), image
sizes (H, W); `tfds_bbox` converts to TFDS's normalised (ymin, xmin, ymax, xmax). Everything is
drawn from the `np.random.Generator` given; `rng_for(seed, split, index)` is an example's own.
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from clipcrop_jax import boxes as box_lib
from clipcrop_jax import zero_shot

COLOURS: dict[str, tuple[int, int, int]] = {
    'red': (220, 30, 35),
    'orange': (250, 140, 20),
    'yellow': (245, 225, 30),
    'green': (35, 175, 60),
    'blue': (35, 75, 225),
    'purple': (140, 45, 190),
    'white': (250, 250, 250),
    'black': (15, 15, 15),
}
SHAPES: tuple[str, ...] = ('circle', 'square', 'triangle', 'star', 'hexagon', 'diamond')
# Size classes: the object's nominal extent (diameter of its circumscribed circle) as a fraction
# of min(H, W).
SIZES: dict[str, tuple[float, float]] = {'small': (0.10, 0.15), 'large': (0.19, 0.27)}
SIZE_WORDS = {'small': 'small', 'large': 'big'}
SPLIT_IDS = {'train': 0, 'validation': 1, 'test': 2, 'ambiguity': 3, 'ambiguity_validation': 4}
# Splits of `generate_ambiguity_example` (two captions per image); the others are scenes.
AMBIGUITY_SPLITS: tuple[str, ...] = ('ambiguity', 'ambiguity_validation')
CAPTION_KINDS: tuple[str, ...] = ('name', 'pair', 'relation')
DIRECTIONS: tuple[str, ...] = ('to the left of', 'to the right of', 'above', 'below')
DEFAULT_ASPECTS: tuple[float, ...] = (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3)

# The simulated annotators' taste: the composition weights that score the training candidates and
# rank the ambiguity split's reference crops (ideal target size suited to these small objects).
ANNOTATOR_WEIGHTS = zero_shot.CompositionWeights(
    size=1.0,
    thirds=0.5,
    margin=1.0,
    content=0.1,
    cut=1.0,
    ideal_size=(0.1, 0.35),
    size_softness=0.1,
    ideal_margin=0.08,
)
# Free-form candidates per training scene, besides the GAIC grid (`scene_candidates`).
NUM_FREE_CROPS = 32
# Area (fraction of the image) and aspect (width / height) ranges of free-form crops.
FREE_CROP_AREA = (0.12, 0.5)
FREE_CROP_ASPECT = (0.6, 1.7)


@dataclasses.dataclass(frozen=True)
class SceneObject:
  colour: str
  shape: str
  size: str  # 'small' | 'large'
  box: tuple[float, float, float, float]  # pixel (x0, y0, x1, y1), tight

  @property
  def name(self) -> str:
    return f'{self.colour} {self.shape}'


@dataclasses.dataclass
class Scene:
  """One image with a caption and scored GAIC candidates (train / validation / test)."""

  image: np.ndarray  # (H, W, 3) uint8
  objects: list[SceneObject]
  caption: str
  kind: str  # one of CAPTION_KINDS
  target_indices: tuple[int, ...]  # indices into `objects` of the caption's target(s)
  mentioned_indices: tuple[int, ...]  # every object the caption names (targets, then landmark)
  target_xyxy: np.ndarray  # (4,) pixel union box of the target objects
  candidates: np.ndarray  # (N, 4) pixel xyxy (GAIC grid, then free-form crops)
  scores: np.ndarray  # (N,) float32 in [1, 5]
  phrases: tuple[str, ...]  # per object: a referring phrase or ''

  @property
  def height(self) -> int:
    return int(self.image.shape[0])

  @property
  def width(self) -> int:
    return int(self.image.shape[1])


@dataclasses.dataclass
class AmbiguityExample:
  """One image, two captions naming different far-apart targets, four reference crops each."""

  image: np.ndarray  # (H, W, 3) uint8
  objects: list[SceneObject]
  captions: tuple[str, str]
  caption_kinds: tuple[str, str]  # 'name' (<T>) or 'relation' (<T> <dir> <other target>)
  target_indices: tuple[int, int]
  target_xyxy: np.ndarray  # (2, 4) pixel
  reference_crops: np.ndarray  # (2, 4, 4) pixel xyxy
  phrases: tuple[str, ...]  # per object: a referring phrase or ''
  # The two-target caption '<A> and <B>' (both targets, in random order; '' when not drawn),
  # its target (the union of both, pixel xyxy) and its four reference crops (4, 4) pixel xyxy.
  pair_caption: str = ''
  pair_target_xyxy: np.ndarray | None = None
  pair_reference_crops: np.ndarray | None = None

  @property
  def height(self) -> int:
    return int(self.image.shape[0])

  @property
  def width(self) -> int:
    return int(self.image.shape[1])


# ------------------------------------------------------------------------------------------------
# Small helpers.
# ------------------------------------------------------------------------------------------------


def rng_for(seed: int, split: str, index: int) -> np.random.Generator:
  """The generator of example `index` of `split` (independent of every other example)."""
  return np.random.default_rng(np.random.SeedSequence([int(seed), SPLIT_IDS[split], int(index)]))


def sample_image_size(
    rng: np.random.Generator, base_size: int = 256, aspects: Sequence[float] = DEFAULT_ASPECTS
) -> tuple[int, int]:
  """(H, W) with H * W ~ base_size**2 and W / H drawn from `aspects` (keep them in [1/2, 2))."""
  aspect = float(aspects[int(rng.integers(len(aspects)))])
  w = int(round(base_size * math.sqrt(aspect)))
  h = int(round(base_size / math.sqrt(aspect)))
  return h, w


def tfds_bbox(box_xyxy: Sequence[float], image_hw: tuple[int, int]) -> tuple[float, ...]:
  """Pixel (x0, y0, x1, y1) -> TFDS (ymin, xmin, ymax, xmax) normalised and clipped to [0, 1]."""
  h, w = image_hw
  x0, y0, x1, y1 = (float(v) for v in box_xyxy)
  out = (y0 / h, x0 / w, y1 / h, x1 / w)
  return tuple(float(min(max(v, 0.0), 1.0)) for v in out)


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
  """Deterministic JPEG bytes of an (H, W, 3) uint8 image (Pillow)."""
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format='JPEG', quality=quality)
  return buf.getvalue()


def _safe_region(image_hw: tuple[int, int]) -> tuple[float, float, float, float]:
  """Pixel box inside the largest GAIC candidate (half a 12-bin cell + 2 px from the border)."""
  h, w = image_hw
  mx, my = w / 24 + 2, h / 24 + 2
  return mx, my, w - mx, h - my


# ------------------------------------------------------------------------------------------------
# Rendering.
# ------------------------------------------------------------------------------------------------


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
  grey = rng.uniform(70, 185)
  return np.clip(grey + rng.uniform(-25, 25, size=3), 0, 255)


def render_background(rng: np.random.Generator, image_hw: tuple[int, int]) -> np.ndarray:
  """A textured, muted background: gradient, stripes, checker or blobs, plus grain. (H, W, 3) u8."""
  h, w = image_hw
  c1, c2 = _muted_colour(rng), _muted_colour(rng)
  kind = ('gradient', 'stripes', 'checker', 'blobs')[int(rng.integers(4))]
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  angle = rng.uniform(0, np.pi)
  proj = xx * np.cos(angle) + yy * np.sin(angle)
  if kind == 'gradient':
    t = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1e-6)
  elif kind == 'stripes':
    period = rng.uniform(8, 40)
    t = 0.5 + 0.5 * np.sin(2 * np.pi * proj / period)
  elif kind == 'checker':
    cell = rng.uniform(10, 40)
    t = ((np.floor(xx / cell) + np.floor(yy / cell)) % 2).astype(np.float32)
    t = 0.25 + 0.5 * t
  else:
    gh, gw = int(rng.integers(3, 9)), int(rng.integers(3, 9))
    grid = Image.fromarray((rng.random((gh, gw)) * 255).astype(np.uint8))
    t = np.asarray(grid.resize((w, h), Image.BICUBIC), dtype=np.float32) / 255.0
  img = c1[None, None] * (1 - t[..., None]) + c2[None, None] * t[..., None]
  img = img + rng.normal(0, rng.uniform(2, 9), size=(h, w, 1)) + rng.normal(0, 2, size=(h, w, 3))
  return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _shape_polygon(shape: str, radius: float, rotation: float) -> list[tuple[float, float]] | None:
  """Vertices relative to the centre (None for a circle); all within `radius`."""
  if shape == 'circle':
    return None
  if shape == 'square':
    angles = np.deg2rad(45 + 90 * np.arange(4)) + rotation
    radii = np.full(4, radius)
  elif shape == 'triangle':
    angles = np.deg2rad(-90 + 120 * np.arange(3)) + rotation
    radii = np.full(3, radius)
  elif shape == 'star':
    angles = np.deg2rad(-90 + 36 * np.arange(10)) + rotation
    radii = np.where(np.arange(10) % 2 == 0, radius, 0.45 * radius)
  elif shape == 'hexagon':
    angles = np.deg2rad(60 * np.arange(6)) + rotation
    radii = np.full(6, radius)
  elif shape == 'diamond':
    angles = np.deg2rad(90 * np.arange(4)) + rotation
    radii = np.array([0.65, 1.0, 0.65, 1.0]) * radius
  else:
    raise ValueError(f'unknown shape {shape!r}; expected one of {SHAPES}')
  return [(float(r * np.cos(a)), float(r * np.sin(a))) for r, a in zip(radii, angles)]


def draw_object(
    canvas: Image.Image,
    colour: str,
    shape: str,
    centre: tuple[float, float],
    extent: float,
    rotation: float = 0.0,
) -> tuple[float, float, float, float]:
  """Draws a shape of nominal diameter `extent` at `centre`; returns its tight pixel box."""
  r = extent / 2
  pad = 2
  ox, oy = int(math.floor(centre[0] - r)) - pad, int(math.floor(centre[1] - r)) - pad
  size = int(math.ceil(extent)) + 2 * pad + 2
  mask = Image.new('L', (size, size), 0)
  draw = ImageDraw.Draw(mask)
  cx, cy = centre[0] - ox, centre[1] - oy
  poly = _shape_polygon(shape, r, rotation)
  if poly is None:
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
  else:
    draw.polygon([(cx + px, cy + py) for px, py in poly], fill=255)
  canvas.paste(COLOURS[colour], (ox, oy), mask)
  ys, xs = np.nonzero(np.asarray(mask))
  return (
      float(ox + xs.min()),
      float(oy + ys.min()),
      float(ox + xs.max() + 1),
      float(oy + ys.max() + 1),
  )


@dataclasses.dataclass(frozen=True)
class _Placement:
  colour: str
  shape: str
  size: str
  centre: tuple[float, float]
  extent: float
  rotation: float

  @property
  def nominal(self) -> tuple[float, float, float, float]:
    r = self.extent / 2
    return (self.centre[0] - r, self.centre[1] - r, self.centre[0] + r, self.centre[1] + r)


def _overlaps(a, b, gap: float) -> bool:
  return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _sample_attributes(rng: np.random.Generator, used: set[tuple[str, str]]) -> tuple[str, str]:
  colours = list(COLOURS)
  while True:
    pair = (colours[int(rng.integers(len(colours)))], SHAPES[int(rng.integers(len(SHAPES)))])
    if pair not in used:
      used.add(pair)
      return pair


def _place(
    rng: np.random.Generator,
    image_hw,
    placed: list[_Placement],
    used,
    size: str,
    region: tuple[float, float, float, float] | None = None,
    attempts: int = 200,
) -> _Placement | None:
  """Rejection-samples one non-overlapping object inside `region` (default: the safe region)."""
  h, w = image_hw
  sx0, sy0, sx1, sy1 = _safe_region(image_hw)
  if region is not None:
    sx0, sy0, sx1, sy1 = (
        max(sx0, region[0]),
        max(sy0, region[1]),
        min(sx1, region[2]),
        min(sy1, region[3]),
    )
  gap = 0.03 * min(h, w)
  lo, hi = SIZES[size]
  for _ in range(attempts):
    extent = rng.uniform(lo, hi) * min(h, w)
    r = extent / 2
    if sx1 - sx0 < extent or sy1 - sy0 < extent:
      continue
    centre = (rng.uniform(sx0 + r, sx1 - r), rng.uniform(sy0 + r, sy1 - r))
    cand = _Placement('', '', size, centre, extent, 0.0)
    if any(_overlaps(cand.nominal, p.nominal, gap) for p in placed):
      continue
    colour, shape = _sample_attributes(rng, used)
    limit = np.deg2rad(12)
    rotation = float(rng.uniform(-limit, limit))
    return _Placement(colour, shape, size, centre, extent, rotation)
  return None


def _render(rng: np.random.Generator, image_hw, placements: list[_Placement]):
  canvas = Image.fromarray(render_background(rng, image_hw))
  objects = []
  for p in placements:
    box = draw_object(canvas, p.colour, p.shape, p.centre, p.extent, p.rotation)
    objects.append(SceneObject(p.colour, p.shape, p.size, box))
  return np.asarray(canvas, dtype=np.uint8).copy(), objects


# ------------------------------------------------------------------------------------------------
# Captions and scores.
# ------------------------------------------------------------------------------------------------


def describe(
    obj: SceneObject, rng: np.random.Generator, article: bool = True, size_word_prob: float = 0.3
) -> str:
  """'[a | an | the] [big | small] <colour> <shape>': size word with `size_word_prob`, 'the' or
  'a' / 'an' 50/50 with `article`."""
  words = [obj.colour, obj.shape]
  if rng.random() < size_word_prob:
    words.insert(0, SIZE_WORDS[obj.size])
  text = ' '.join(words)
  if article:
    text = ('the ' if rng.random() < 0.5 else 'an ' if text[0] in 'aeiou' else 'a ') + text
  return text


def _centre(obj: SceneObject) -> np.ndarray:
  return np.array([(obj.box[0] + obj.box[2]) / 2, (obj.box[1] + obj.box[3]) / 2])


def direction_word(a: SceneObject, b: SceneObject) -> str:
  """Where `a` is relative to `b` along the dominant axis of their box centres (`DIRECTIONS`).

  'to the left of' means centre_x(a) < centre_x(b) (image x grows to the right), 'above' means
  centre_y(a) < centre_y(b) (y grows downwards); ties go to the horizontal words.
  """
  dx, dy = _centre(b) - _centre(a)
  if abs(dx) >= abs(dy):
    return 'to the left of' if dx > 0 else 'to the right of'
  return 'above' if dy > 0 else 'below'


def relation_word(a: SceneObject, b: SceneObject, rng: np.random.Generator) -> str:
  """A true relation of `a` to `b`: 'next to' (40 %) or `direction_word(a, b)`."""
  if rng.random() < 0.4:
    return 'next to'
  return direction_word(a, b)


def _near_neighbour(objects: Sequence[SceneObject], a: int, rng: np.random.Generator) -> int:
  """One of the two objects nearest to `objects[a]` (box centres), drawn uniformly; needs >= 2."""
  centres = np.array([_centre(o) for o in objects])
  dist = np.linalg.norm(centres - centres[a], axis=1)
  dist[a] = np.inf
  nearest = np.argsort(dist, kind='stable')[: min(2, len(objects) - 1)]
  return int(nearest[int(rng.integers(len(nearest)))]) if len(nearest) > 1 else int(nearest[0])


def referring_phrases(
    objects: Sequence[SceneObject], rng: np.random.Generator, prob: float = 0.5
) -> tuple[str, ...]:
  """Per object, with probability `prob`: '<colour> <shape> <relation_word> <describe(N)>' for N
  one of its two nearest objects (e.g. 'red circle to the left of the big blue square'; no leading
  article), else ''. All '' for a scene of one object."""
  phrases = []
  for a, obj in enumerate(objects):
    if len(objects) < 2 or rng.random() >= prob:
      phrases.append('')
      continue
    b = _near_neighbour(objects, a, rng)
    phrases.append(f'{obj.name} {relation_word(obj, objects[b], rng)} {describe(objects[b], rng)}')
  return tuple(phrases)


def scene_caption(
    objects: Sequence[SceneObject],
    rng: np.random.Generator,
    pair_prob: float = 0.2,
    relation_prob: float = 0.3,
) -> tuple[str, str, tuple[int, ...], tuple[int, ...]]:
  """A training caption (grammar in the module docstring).

  Returns:
    (caption, kind, target_indices, mentioned_indices): kind in `CAPTION_KINDS`; the targets are
    (A,) for 'name' and 'relation', (A, B) for 'pair'; mentioned = targets plus a relation's B.
  """
  if not (pair_prob >= 0 and relation_prob >= 0 and pair_prob + relation_prob <= 1):
    raise ValueError(
        f'pair_prob={pair_prob}, relation_prob={relation_prob}: need two '
        'probabilities >= 0 with a sum <= 1'
    )
  u = rng.random()
  a = int(rng.integers(len(objects)))
  if len(objects) < 2 or u >= pair_prob + relation_prob:
    return describe(objects[a], rng, article=rng.random() < 0.7), 'name', (a,), (a,)
  b = _near_neighbour(objects, a, rng)
  if u < pair_prob:
    return (f'{describe(objects[a], rng)} and {describe(objects[b], rng)}', 'pair', (a, b), (a, b))
  return (
      f'{describe(objects[a], rng)} {relation_word(objects[a], objects[b], rng)} '
      f'{describe(objects[b], rng)}',
      'relation',
      (a,),
      (a, b),
  )


def score_candidates(
    candidates: np.ndarray,
    target_xyxy: np.ndarray,
    other_boxes: np.ndarray,
    image_hw: tuple[int, int],
) -> np.ndarray:
  """Scores pixel candidates 1..5 by the rule in the module docstring; (N,) float32."""
  h, w = image_hw
  scale = np.array([w, h, w, h], dtype=np.float64)
  cn = np.asarray(candidates, np.float64) / scale
  tn = np.asarray(target_xyxy, np.float64) / scale
  on = np.asarray(other_boxes, np.float64).reshape(-1, 4) / scale
  q, _ = zero_shot.composition_score(cn, tn, on if len(on) else None, weights=ANNOTATOR_WEIGHTS)
  cov = zero_shot.target_coverage(cn, tn)
  inside = cov >= 1 - 1e-9
  scores = np.where(inside, 2 + 3 * np.clip(q, 0, 1), 1 + np.clip(cov, 0, 1 - 1e-6))
  return scores.astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Public generators.
# ------------------------------------------------------------------------------------------------


def generate_scene(
    rng: np.random.Generator,
    image_size: tuple[int, int] | None = None,
    num_objects: tuple[int, int] = (3, 6),
    pair_prob: float = 0.2,
    relation_prob: float = 0.3,
    phrase_prob: float = 0.5,
    base_size: int = 256,
    aspects: Sequence[float] = DEFAULT_ASPECTS,
) -> Scene:
  """A scene with a caption, ~120 scored candidates (`scene_candidates`) and object phrases.

  Args:
    rng: the only source of randomness.
    image_size: (H, W); None draws it with `sample_image_size(rng, base_size, aspects)`.
    num_objects: inclusive (min, max) number of objects (min >= 2 for two-object captions).
    pair_prob: probability of a 'pair' caption '<A> and <B>' (target: the union of A and B).
    relation_prob: probability of a 'relation' caption '<A> <relation> <B>' (target: A only);
      the rest are 'name' captions (module docstring: the caption grammar).
    phrase_prob: probability that an object has a referring phrase (`referring_phrases`).
    base_size, aspects: see `sample_image_size`.
    pair: also draw the two-target caption '<A> and <B>' and its references (`pair_*`; drawn
      after everything else, so the two one-target captions are the same with or without it).
  """
  image_hw = (
      tuple(image_size) if image_size is not None else sample_image_size(rng, base_size, aspects)
  )
  lo, hi = num_objects
  for _ in range(100):
    n = int(rng.integers(lo, hi + 1))
    used: set[tuple[str, str]] = set()
    placed: list[_Placement] = []
    for _ in range(n):
      size = 'large' if rng.random() < 0.5 else 'small'
      p = _place(rng, image_hw, placed, used, size)
      if p is None:
        p = _place(rng, image_hw, placed, used, 'small')
      if p is None:
        break
      placed.append(p)
    if len(placed) >= max(lo, 1):
      break
  else:
    raise RuntimeError(f'could not place {lo} objects in an image of size {image_hw}')
  image, objects = _render(rng, image_hw, placed)
  caption, kind, target_indices, mentioned = scene_caption(objects, rng, pair_prob, relation_prob)
  target = box_lib.union_box_xyxy_np([objects[i].box for i in target_indices])
  others = np.array(
      [o.box for i, o in enumerate(objects) if i not in target_indices], dtype=np.float64
  ).reshape(-1, 4)
  candidates = scene_candidates(rng, image_hw, target)
  scores = score_candidates(candidates, target, others, image_hw)
  phrases = referring_phrases(objects, rng, phrase_prob)
  return Scene(
      image, objects, caption, kind, target_indices, mentioned, target, candidates, scores, phrases
  )


def sample_crops_around(
    rng: np.random.Generator,
    image_hw: tuple[int, int],
    target: Sequence[float],
    samples: int,
    margin: float = 0.0,
    area_range: tuple[float, float] = FREE_CROP_AREA,
) -> np.ndarray:
  """Free-form crops containing `target`, as the simulated annotators draw them.

  Draws `samples` crops with area uniform in `area_range` (fraction of H * W) and log-uniform
  aspect (width / height) in `FREE_CROP_ASPECT`, each placed uniformly among the positions inside
  the image that contain `target` with a gap of `margin` times the crop's extent on each side;
  draws with no such position are dropped.

  Args:
    rng: the only source of randomness.
    image_hw: (H, W) in pixels.
    target: (4,) pixel box (x0, y0, x1, y1).
    samples: number of draws.
    margin: wanted gap around the target, as a fraction of the crop's width / height.
    area_range: the crops' area, as fractions of the image (default `FREE_CROP_AREA`).

  Returns:
    (n, 4) float64 pixel boxes (x0, y0, x1, y1), n <= samples, in draw order.
  """
  h, w = image_hw
  area = rng.uniform(*area_range, samples) * h * w
  aspect = np.exp(rng.uniform(np.log(FREE_CROP_ASPECT[0]), np.log(FREE_CROP_ASPECT[1]), samples))
  cw = np.minimum(np.sqrt(area * aspect), w)
  ch = np.minimum(cw / aspect, h)
  tw, th = target[2] - target[0], target[3] - target[1]
  mx, my = margin * cw, margin * ch
  x_lo = np.maximum(0, target[2] + mx - cw)
  x_hi = np.minimum(w - cw, target[0] - mx)
  y_lo = np.maximum(0, target[3] + my - ch)
  y_hi = np.minimum(h - ch, target[1] - my)
  ok = (x_hi >= x_lo) & (y_hi >= y_lo) & (cw > tw + 2 * mx) & (ch > th + 2 * my)
  x0 = x_lo + rng.random(samples) * np.clip(x_hi - x_lo, 0, None)
  y0 = y_lo + rng.random(samples) * np.clip(y_hi - y_lo, 0, None)
  return np.stack([x0, y0, x0 + cw, y0 + ch], axis=1)[ok]


def scene_candidates(
    rng: np.random.Generator,
    image_hw: tuple[int, int],
    target: Sequence[float],
    num_free: int = NUM_FREE_CROPS,
) -> np.ndarray:
  """A training scene's candidate crops: the GAIC grid, then up to `num_free` free-form crops.

  The free-form crops are the first `num_free` that fit of `4 * num_free` draws of
  `sample_crops_around` (no margin), so each contains the target; fewer (possibly none) when the
  target is too large for the crop sizes. (N, 4) float64 pixel xyxy.
  """
  h, w = image_hw
  grid = zero_shot.gaic_grid_candidates((w, h))
  free = sample_crops_around(rng, image_hw, target, samples=4 * num_free)[:num_free]
  return np.concatenate([grid, free], axis=0)


def _reference_crops(
    rng: np.random.Generator,
    image_hw,
    target,
    other_target,
    others,
    n: int = 4,
    samples: int = 400,
    margin: float = 0.04,
    area_range: tuple[float, float] = FREE_CROP_AREA,
    iou_steps: Sequence[float] = (0.7, 0.8, 0.9),
) -> np.ndarray | None:
  """`n` diverse, well-composed crops containing `target` (with a margin) and < half of
  `other_target` (None: no such object), ranked by `composition_score` with ANNOTATOR_WEIGHTS;
  picked greedily with pairwise IoU below the first of `iou_steps` that allows `n`; None if
  too few."""
  h, w = image_hw
  crops = sample_crops_around(rng, image_hw, target, samples, margin=margin, area_range=area_range)
  if len(crops) < n:
    return None
  scale = np.array([w, h, w, h], dtype=np.float64)
  if other_target is not None:
    cov_other = zero_shot.target_coverage(crops / scale, np.asarray(other_target) / scale)
    crops = crops[cov_other < 0.5]
  if len(crops) < n:
    return None
  q, _ = zero_shot.composition_score(
      crops / scale,
      np.asarray(target) / scale,
      np.asarray(others).reshape(-1, 4) / scale,
      weights=ANNOTATOR_WEIGHTS,
  )
  order = np.argsort(-q, kind='stable')
  for iou_max in iou_steps:
    picked: list[int] = []
    for i in order:
      if all(
          box_lib.pairwise_iou_xyxy_np(crops[i : i + 1], crops[j : j + 1])[0, 0] < iou_max
          for j in picked
      ):
        picked.append(int(i))
        if len(picked) == n:
          return crops[picked]
  return None


def generate_ambiguity_example(
    rng: np.random.Generator,
    image_size: tuple[int, int] | None = None,
    num_distractors: tuple[int, int] = (1, 3),
    relation_prob: float = 0.5,
    phrase_prob: float = 0.5,
    base_size: int = 256,
    aspects: Sequence[float] = DEFAULT_ASPECTS,
    pair: bool = True,
) -> AmbiguityExample:
  """Two equally salient targets far apart, two captions, four reference crops per caption.

  Args:
    rng: the only source of randomness.
    image_size: (H, W); None draws it with `sample_image_size(rng, base_size, aspects)`.
    num_distractors: inclusive (min, max) number of small distractors.
    relation_prob: per caption, the probability of '<T> <direction_word> <other target>' instead
      of '<T>' (both name the other target, so only the full text tells the target).
    phrase_prob: probability that an object has a referring phrase (`referring_phrases`).
    base_size, aspects: see `sample_image_size`.
    pair: also draw the two-target caption '<A> and <B>' and its references (`pair_*`; drawn
      after everything else, so the two one-target captions are the same with or without it).
  """
  image_hw = (
      tuple(image_size) if image_size is not None else sample_image_size(rng, base_size, aspects)
  )
  h, w = image_hw
  for _ in range(100):
    horizontal = w > h or (w == h and rng.random() < 0.5)
    if horizontal:
      halves = [(0, 0, 0.4 * w, h), (0.6 * w, 0, w, h)]
    else:
      halves = [(0, 0, w, 0.4 * h), (0, 0.6 * h, w, h)]
    if rng.random() < 0.5:
      halves = halves[::-1]
    used: set[tuple[str, str]] = set()
    placed: list[_Placement] = []
    for region in halves:
      p = _place(rng, image_hw, placed, used, 'large', region=region)
      if p is None:
        break
      placed.append(p)
    if len(placed) < 2:
      continue
    k = int(rng.integers(num_distractors[0], num_distractors[1] + 1))
    for _ in range(k):
      p = _place(rng, image_hw, placed, used, 'small')
      if p is not None:
        placed.append(p)
    image, objects = _render(rng, image_hw, placed)
    boxes = np.array([o.box for o in objects], dtype=np.float64)
    refs = []
    for t, o in ((0, 1), (1, 0)):
      others = np.delete(boxes, t, axis=0)
      crops = _reference_crops(rng, image_hw, boxes[t], boxes[o], others)
      if crops is None:
        break
      refs.append(crops)
    if len(refs) < 2:
      continue
    # Drawn after everything that decides the image and the references (they stay as in 1.1.0).
    names = (describe(objects[0], rng), describe(objects[1], rng))
    captions, kinds = [], []
    for t, o in ((0, 1), (1, 0)):
      if rng.random() < relation_prob:
        captions.append(f'{names[t]} {direction_word(objects[t], objects[o])} {names[o]}')
        kinds.append('relation')
      else:
        captions.append(names[t])
        kinds.append('name')
    phrases = referring_phrases(objects, rng, phrase_prob)
    example = AmbiguityExample(
        image,
        objects,
        tuple(captions),
        tuple(kinds),
        (0, 1),
        boxes[:2].copy(),
        np.stack(refs),
        phrases,
    )
    if pair:  # drawn last: the examples above are those of version 1.2.0
      example = _with_pair_caption(rng, example, boxes)
    return example
  raise RuntimeError(f'could not build an ambiguity example of size {image_hw}')


def _with_pair_caption(
    rng: np.random.Generator, example: AmbiguityExample, boxes: np.ndarray
) -> AmbiguityExample:
  """`example` with its two-target caption '<A> and <B>' (random order) and four reference crops
  that contain both targets with a margin, well composed for their union (ANNOTATOR_WEIGHTS,
  the distractors as objects not to cut); the whole image when no such crops exist."""
  h, w = example.height, example.width
  first = int(rng.integers(2))
  names = [describe(example.objects[t], rng) for t in (first, 1 - first)]
  union = box_lib.union_box_xyxy_np(boxes[:2])
  fraction = float((union[2] - union[0]) * (union[3] - union[1]) / (h * w))
  area_range = (max(FREE_CROP_AREA[0], min(fraction, 1.0)), 1.0)
  refs = None
  for margin in (0.04, 0.0):
    refs = _reference_crops(
        rng,
        (h, w),
        union,
        None,
        boxes[2:],
        margin=margin,
        area_range=area_range,
        iou_steps=(0.7, 0.8, 0.9, 0.95, 0.99),
    )
    if refs is not None:
      break
  if refs is None:
    refs = np.tile(np.array([0.0, 0.0, w, h]), (4, 1))
  return dataclasses.replace(
      example,
      pair_caption=f'{names[0]} and {names[1]}',
      pair_target_xyxy=union,
      pair_reference_crops=refs,
  )
