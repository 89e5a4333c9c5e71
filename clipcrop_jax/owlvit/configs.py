"""OWL-ViT architecture configurations (Scenic's `clip_b32`, `clip_b16`, `clip_l14`, OWLv2 B/16, L/14).

The numbers follow Scenic's `clip/model.py` CONFIGS and the OWL-ViT config files. Head width is always
64 (heads = width // 64) as in CLIP. A `tiny` and a `tiny_v2` variant exist for tests.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

# CLIP pixel statistics; normalisation happens *inside* the model, as in Scenic.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

VOCAB_SIZE = 49408
MAX_QUERY_LENGTH = 16  # CLIP tokens per text query (the text positional embedding rows)
HEAD_DIM = 64


@dataclasses.dataclass(frozen=True)
class OwlViTConfig:
  """Architecture of one OWL-ViT (v1) or OWLv2 detector.

  Attributes:
    name: config name (e.g. 'clip_b32').
    image_size: native input side in pixels (square, already padded+resized).
    patch_size: ViT patch side.
    vision_width: ViT width W (heads = W // 64).
    vision_layers: number of ViT residual blocks.
    text_width: text transformer width T (heads = T // 64).
    text_layers: number of text residual blocks.
    embed_dim: shared query space D (class head output, text projection output).
    objectness: OWLv2 objectness head present.
    vocab_size: CLIP vocabulary size.
    max_query_length: text length L (positional embedding rows).
    native_image_grid_size: if set, the position embedding has this native grid and smaller square
      inputs use its top-left part (Scenic's truncation rule).
  """

  name: str
  image_size: int
  patch_size: int
  vision_width: int
  vision_layers: int
  text_width: int
  text_layers: int
  embed_dim: int
  objectness: bool = False
  vocab_size: int = VOCAB_SIZE
  max_query_length: int = MAX_QUERY_LENGTH
  native_image_grid_size: Optional[int] = None

  @property
  def vision_heads(self) -> int:
    return self.vision_width // HEAD_DIM

  @property
  def text_heads(self) -> int:
    return self.text_width // HEAD_DIM

  @property
  def grid_size(self) -> int:
    """Feature-map side g for the native input size."""
    return -(-self.image_size // self.patch_size)

  @property
  def num_tokens(self) -> int:
    """Number of image tokens P = g² (class token excluded)."""
    return self.grid_size**2

  def replace(self, **changes) -> 'OwlViTConfig':
    return dataclasses.replace(self, **changes)


CONFIGS: dict[str, OwlViTConfig] = {
    c.name: c
    for c in [
        OwlViTConfig(
            'clip_b32',
            image_size=768,
            patch_size=32,
            vision_width=768,
            vision_layers=12,
            text_width=512,
            text_layers=12,
            embed_dim=512,
        ),
        OwlViTConfig(
            'clip_b16',
            image_size=768,
            patch_size=16,
            vision_width=768,
            vision_layers=12,
            text_width=512,
            text_layers=12,
            embed_dim=512,
        ),
        OwlViTConfig(
            'clip_l14',
            image_size=840,
            patch_size=14,
            vision_width=1024,
            vision_layers=24,
            text_width=768,
            text_layers=12,
            embed_dim=768,
        ),
        OwlViTConfig(
            'owl2_b16',
            image_size=960,
            patch_size=16,
            vision_width=768,
            vision_layers=12,
            text_width=512,
            text_layers=12,
            embed_dim=512,
            objectness=True,
        ),
        OwlViTConfig(
            'owl2_l14',
            image_size=1008,
            patch_size=14,
            vision_width=1024,
            vision_layers=24,
            text_width=768,
            text_layers=12,
            embed_dim=768,
            objectness=True,
        ),
        # Tiny variants for tests and the random-init demo: 96 px, 16 px patches -> 6x6 grid.
        OwlViTConfig(
            'tiny',
            image_size=96,
            patch_size=16,
            vision_width=64,
            vision_layers=2,
            text_width=64,
            text_layers=2,
            embed_dim=32,
        ),
        OwlViTConfig(
            'tiny_v2',
            image_size=96,
            patch_size=16,
            vision_width=64,
            vision_layers=2,
            text_width=64,
            text_layers=2,
            embed_dim=32,
            objectness=True,
        ),
    ]
}

# Friendly aliases (Scenic config file names).
ALIASES = {
    'owl_v2_clip_b16': 'owl2_b16',
    'owl_v2_clip_l14': 'owl2_l14',
    'b32': 'clip_b32',
    'b16': 'clip_b16',
    'l14': 'clip_l14',
}


def get_config(name: str) -> OwlViTConfig:
  """Returns the named OWL-ViT config; raises ValueError listing the known names."""
  key = ALIASES.get(name, name)
  if key not in CONFIGS:
    raise ValueError(f'Unknown OWL-ViT config {name!r}; known: {", ".join(sorted(CONFIGS))}.')
  return CONFIGS[key]
