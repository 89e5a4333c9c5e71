"""Checks of a crop request's arguments (the Python API, the command lines and the service).

`check_arguments` validates everything a request says without an image or a model (errors are
ValueError / TypeError naming the argument); `ClipCropper.check_request` adds the embedded query
and returns a `CropRequest`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import numpy as np

from clipcrop_jax import boxes as box_lib
from clipcrop_jax.data import features

DEFAULT_TOP_K = 5  # crops per request when a caller of the API or the service gives none
MAX_ASPECT_RATIO = 100.0  # aspect ratios outside [1/100, 100] are refused


def check_int(name: str, value: Any, minimum: int = 1) -> int:
  """`value` as an int >= `minimum`; TypeError (not an integer) / ValueError naming `name`."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise TypeError(f'{name} must be an integer, got {value!r} ({type(value).__name__})')
  if value < minimum:
    raise ValueError(f'{name} must be >= {minimum}, got {value}')
  return int(value)


def check_real(name: str, value: Any, minimum: float = 0.0) -> float:
  """`value` as a finite float >= `minimum`; TypeError / ValueError naming `name`."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (int, float, np.integer, np.floating)
  ):
    raise TypeError(f'{name} must be a number, got {value!r} ({type(value).__name__})')
  value = float(value)
  if not math.isfinite(value) or value < minimum:
    raise ValueError(f'{name} must be a finite number >= {minimum:g}, got {value}')
  return value


def parse_crop_aspect_ratio(value: Any) -> Optional[float]:
  """`boxes.parse_aspect_ratio`, limited to [1 / MAX_ASPECT_RATIO, MAX_ASPECT_RATIO]."""
  ratio = box_lib.parse_aspect_ratio(value)
  if ratio is not None and not 1 / MAX_ASPECT_RATIO <= ratio <= MAX_ASPECT_RATIO:
    raise ValueError(
        f'aspect ratio {value!r} (= {ratio:g}) is outside [1/{MAX_ASPECT_RATIO:g}, '
        f'{MAX_ASPECT_RATIO:g}]'
    )
  return ratio


def check_crop_arguments(
    top_k: Any,
    aspect_ratio: Any = None,
    min_size: Any = None,
    fuse_top_k: Any = None,
    name=lambda arg: arg,
) -> tuple[int, Optional[float], float, Optional[int]]:
  """The image-independent numbers of a crop request, checked (`crop`, and command lines before
  they load a model).

  Returns:
    (top_k, aspect ratio or None, min_size (0 when None), fuse_top_k or None). Errors name the
    argument as `name(argument)` (e.g. a command line's flag).
  """
  top_k = check_int(name('top_k'), top_k)
  fuse_top_k = None if fuse_top_k is None else check_int(name('fuse_top_k'), fuse_top_k)
  min_size = 0.0 if min_size is None else check_real(name('min_size'), min_size)
  try:
    ratio = parse_crop_aspect_ratio(aspect_ratio)
  except ValueError as e:
    raise ValueError(f'{name("aspect_ratio")}: {e}') from None
  return top_k, ratio, min_size, fuse_top_k


@dataclasses.dataclass(frozen=True)
class CropRequest:
  """A checked crop request with its query embedded (`ClipCropper.check_request`), shared by
  every image of a call."""

  mode: str
  queries: Any  # (1, Q, D) query embeddings, None in base mode
  query_mask: Any  # (1, Q) bool, None in base mode
  top_k: int
  ratio: Optional[float]
  min_size: float
  fuse_top_k: int
  query_roles: Any = None  # (1, Q) int32 role ids (`features.ROLE_IDS`), None in base mode
  query_texts: tuple[tuple[str, str], ...] = ()  # (text, role) of each real query


@dataclasses.dataclass(frozen=True)
class CheckedArguments:
  """The image-independent part of a request, checked and resolved (`check_arguments`)."""

  mode: str
  top_k: int
  ratio: Optional[float]
  min_size: float
  fuse_top_k: int


def check_arguments(
    text: Optional[str] = None,
    query_image: Any = None,
    top_k: Any = DEFAULT_TOP_K,
    aspect_ratio: Any = None,
    min_size: Any = None,
    mode: Optional[str] = None,
    query_box: Any = None,
    fuse_top_k: Any = None,
    *,
    default_mode: str,
    default_fuse_top_k: int,
) -> CheckedArguments:
  """Checks `ClipCropper.crop`'s arguments and resolves the mode ('image' with an example image,
  unless 'base') and `fuse_top_k` (the model's default when None)."""
  top_k, ratio, min_size, fuse_top_k = check_crop_arguments(
      top_k, aspect_ratio, min_size, fuse_top_k
  )
  fuse_top_k = default_fuse_top_k if fuse_top_k is None else fuse_top_k
  if mode is not None and mode not in features.QUERY_MODES:
    raise ValueError(f'mode {mode!r}; expected one of {features.QUERY_MODES}')
  if text is not None and not isinstance(text, str):
    raise TypeError(f'text must be a string, got {type(text).__name__}')
  if text is not None and query_image is not None:
    raise ValueError('give text or query_image, not both (a crop follows one condition)')
  if query_box is not None and query_image is None:
    raise ValueError('query_box needs query_image (it is a region of the example image)')
  mode = mode or default_mode
  if query_image is not None and mode != 'base':
    mode = 'image'
  if mode == 'image' and query_image is None:
    raise ValueError("mode 'image' needs query_image")
  if mode not in ('image', 'base') and (text is None or not text.strip()):
    raise ValueError(f'mode {mode!r} needs a non-empty text (or pass query_image)')
  return CheckedArguments(mode, top_k, ratio, min_size, fuse_top_k)
