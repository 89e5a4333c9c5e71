"""Image loading, OWL-ViT input preprocessing and box coordinate helpers.

Conventions used throughout:

* Images are numpy arrays indexed (row, column, channel) = (y, x, c) with shape (H, W, 3). Loaded
  and validated images are uint8 RGB; model inputs are float32 RGB in [0, 1] (CLIP mean/std
  normalisation happens inside the model, as in Scenic).
* Padding is always added at the bottom and on the right, so the image keeps its top-left corner.
* Model boxes are (cx, cy, w, h), normalised to [0, 1] with respect to the *padded square* image.
  Pixel boxes are (x0, y0, x1, y1) in continuous pixel units of the original image: pixel (row r,
  column c) covers [c, c + 1) x [r, r + 1), so a box covering the whole image is (0, 0, W, H).

Two preprocessing recipes are provided:

* `"colab"` (Scenic notebooks `inference.Model.preprocess_image`, HF `Owlv2ImageProcessor`):
  /255, pad to a max(H, W) square with 0.5 grey, then anti-aliased bilinear resize exactly like
  `skimage.transform.resize(..., order=1, mode='reflect', anti_aliasing=True)`.
* `"evaluator"` (Scenic LVIS evaluator `ResizeWithPad(size, pad_value=0.0)`): /255,
  aspect-preserving bilinear resize without anti-aliasing (`tf.image.resize` semantics, half-pixel
  centres), then pad with 0.0 to size x size.

In both recipes the padded square corresponds to max(H, W) original pixels on each axis, so one box
helper (`boxes_cxcywh_to_pixels_xyxy`) maps model boxes back to original pixels for either recipe.

Neither recipe ever builds the max(H, W)^2 square. The "colab" resize is separable and linear, so it
is computed as two sparse matrix products over the real pixels only (the padding enters as a known
per-output weight); memory and time scale with the input pixels and the output size.

* `exact=True`: those matrices at full resolution. Equal to the padded reference recipe up to
  float32 rounding (tested <= 1e-5 against skimage and HF).
* `exact=False` (the default, "fast"): the image is first box-reduced by an integer factor k that
  keeps at least 2x the output resolution (`_MIN_OVERSAMPLING`), by JPEG DCT-domain scaling
  (`Image.draft`, in `load_for_model`) and/or `Image.reduce`; the matrices then hold the reference
  kernel's weights summed over each k x k cell. The result is exact for images that are constant on
  cells; on photographs it differs from the exact one by at most ~0.04 (mean <= 0.004) in [0, 1]
  units (tests/test_preprocess_limits.py). Images with max(H, W) < 4 * size are not reduced
  (k = 1): there the fast path is the exact one.

Decoding is limited to `max_pixels` (width x height read from the file header before any pixel is
decoded): `DEFAULT_MAX_PIXELS`, overridable per call or with $CLIPCROP_MAX_PIXELS. This limit, not
Pillow's decompression-bomb warning (which it silences), decides which files are decoded.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import struct
import threading
from typing import Any, BinaryIO, Callable, Iterator, Sequence
import warnings

import numpy as np
from PIL import Image
from PIL import ImageFile
from PIL import ImageOps
from PIL import UnidentifiedImageError
from scipy import ndimage
from scipy import sparse

RECIPES = ("colab", "evaluator")
DEFAULT_PAD_VALUES = {"colab": 0.5, "evaluator": 0.0}

# Decoded-pixel limit: 120 MP admits 100-108 MP camera files (11648 x 8736, 12000 x 9000) and
# refuses 12000 x 12000 (144 MP) and the classic decompression bombs.
DEFAULT_MAX_PIXELS = 120_000_000
MAX_PIXELS_ENV = "CLIPCROP_MAX_PIXELS"

# The fast "colab" path pre-reduces by k = floor(max(H, W) / (_MIN_OVERSAMPLING * size)), so the
# reduced image keeps >= 2 pixels per output pixel and the final filter still sees the detail it
# averages; 2 keeps a 12 MP JPEG under 0.1 s (see tools/benchmark_preprocess.py).
_MIN_OVERSAMPLING = 2
# Input rows are converted to float32 in chunks of about this many values (16 MB).
_CHUNK_VALUES = 1 << 22

ImageSource = str | os.PathLike | BinaryIO
ImageInput = np.ndarray | str | os.PathLike


class ImageError(ValueError):
  """An image file could not be read or decoded (missing, not an image, truncated, too large)."""


class NotAnImageError(ImageError):
  """The bytes are no image format Pillow recognises."""


class ImageTooLargeError(ImageError):
  """The image's width x height (read from its header) is above the decoding limit.

  `summary` is the message without the way to allow it; `allow` (default: the API's
  `max_pixels=N` / environment variable) is how a caller's users raise the limit.
  """

  def __init__(self, name: str, width: int, height: int, limit: int, allow: str | None = None):
    self.name, self.width, self.height, self.limit = name, width, height, limit
    self.pixels = width * height
    self.summary = (
        f"{name}: image is {width}x{height} = {self.pixels / 1e6:.1f} MP, above the "
        f"decoding limit of {limit / 1e6:.1f} MP ({limit} pixels)"
    )
    if allow is None:
      allow = f"pass max_pixels={self.pixels} or set {MAX_PIXELS_ENV}={self.pixels}"
    super().__init__(f"{self.summary}; to decode it anyway {allow}")

  def allowed_by(self, allow: str) -> ImageTooLargeError:
    """The same error telling how to allow it in the caller's terms (e.g. a command-line flag)."""
    return ImageTooLargeError(self.name, self.width, self.height, self.limit, allow)


# ------------------------------------------------------------------------------------------------
# Pixel limit.
# ------------------------------------------------------------------------------------------------


def max_pixels_limit(max_pixels: int | None = None) -> int:
  """Resolves the decoded-pixel limit: `max_pixels`, else $CLIPCROP_MAX_PIXELS, else the default.

  Args:
    max_pixels: positive int, or None for $CLIPCROP_MAX_PIXELS (a positive integer such as
      `200000000`, `200_000_000` or `2e8`) or, when that is unset or empty, `DEFAULT_MAX_PIXELS`.

  Returns:
    The limit on width x height, in pixels.

  Raises:
    ValueError: `max_pixels` or the environment variable is not a positive integer.
  """
  if max_pixels is None:
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
      return DEFAULT_MAX_PIXELS
    try:
      value = int(raw.replace("_", ""))
    except ValueError:
      try:
        as_float = float(raw)
      except ValueError:
        as_float = float("nan")
      value = int(as_float) if np.isfinite(as_float) and as_float.is_integer() else 0
    if value < 1:
      raise ValueError(
          f"${MAX_PIXELS_ENV}={raw!r} is not a valid pixel limit; expected a positive "
          "integer number of pixels such as 200000000"
      )
    return value
  if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)):
    raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
  if max_pixels < 1:
    raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
  return int(max_pixels)


# Pillow's own check reads the process-wide `Image.MAX_IMAGE_PIXELS`; this lock serialises our
# temporary changes to it (other threads' Pillow calls may see them while one is held).
_PILLOW_LIMIT_LOCK = threading.Lock()


@contextlib.contextmanager
def _pillow_bomb_check_off() -> Iterator[None]:
  """Disables Pillow's decompression-bomb error while held (our own limit has been checked)."""
  with _PILLOW_LIMIT_LOCK:
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
      yield
    finally:
      Image.MAX_IMAGE_PIXELS = saved


# ------------------------------------------------------------------------------------------------
# Loading.
# ------------------------------------------------------------------------------------------------


def _source_name(path_or_file: ImageSource) -> str:
  """Returns a printable name for a path or file object."""
  if isinstance(path_or_file, (str, os.PathLike)):
    return os.fsdecode(path_or_file)
  name = getattr(path_or_file, "name", None)
  return str(name) if name is not None else f"<{type(path_or_file).__name__}>"


def _read_bytes(path_or_file: ImageSource, name: str) -> bytes:
  """Reads the whole encoded file; raises ImageError for missing/unreadable sources."""
  if isinstance(path_or_file, (str, os.PathLike)):
    try:
      with open(path_or_file, "rb") as f:
        return f.read()
    except FileNotFoundError:
      raise ImageError(f"{name}: file not found") from None
    except IsADirectoryError:
      raise ImageError(f"{name}: is a directory, not an image file") from None
    except OSError as e:
      raise ImageError(f"{name}: cannot read file ({e.strerror or e})") from e
  if not hasattr(path_or_file, "read"):
    raise TypeError(
        f"load_image expects a path or a binary file object, got {type(path_or_file).__name__}"
    )
  try:
    data = path_or_file.read()
  except OSError as e:
    raise ImageError(f"{name}: cannot read file ({e})") from e
  if not isinstance(data, (bytes, bytearray)):
    raise TypeError(f"{name}: file object must be opened in binary mode")
  return bytes(data)


def _composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
  """Composites uint8 RGB (H, W, 3) with uint8 alpha (H, W) over white; returns uint8 (H, W, 3)."""
  a = alpha.astype(np.uint32)[..., None]
  out = (rgb.astype(np.uint32) * a + 255 * (255 - a) + 127) // 255
  return out.astype(np.uint8)


def _pil_to_uint8_rgb(img: Image.Image, name: str) -> np.ndarray:
  """Converts a loaded PIL image of any common mode to a uint8 (H, W, 3) RGB array."""
  mode = img.mode
  if mode == "RGB" and "transparency" not in img.info:
    return np.asarray(img, dtype=np.uint8).copy()
  if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
    # 16-bit grey (PNG/TIFF). Mode "I" is read as 16-bit data too (that is how Pillow may load
    # 16-bit PNGs). Scale 0..65535 -> 0..255 by dropping the low byte instead of clipping at 255.
    grey = np.asarray(img).astype(np.int64)
    grey = (np.clip(grey, 0, 65535) >> 8).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)
  if mode == "F":
    # 32-bit float grey: Pillow's convention is the 0..255 range of mode "L".
    grey = np.asarray(img, dtype=np.float64)
    grey = np.clip(np.rint(np.nan_to_num(grey)), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)
  if mode == "P":
    img = img.convert("RGBA" if "transparency" in img.info else "RGB")
  elif mode in ("LA", "La", "PA", "RGBa", "RGBA") or "transparency" in img.info:
    img = img.convert("RGBA")
  else:
    try:
      img = img.convert("RGB")  # L, 1, CMYK, YCbCr, ...
    except (ValueError, OSError) as e:
      raise ImageError(f"{name}: unsupported image mode {mode!r} ({e})") from e
  if img.mode == "RGBA":
    rgba = np.asarray(img, dtype=np.uint8)
    return _composite_on_white(rgba[..., :3], rgba[..., 3])
  return np.asarray(img, dtype=np.uint8).copy()


def _decode(
    path_or_file: ImageSource, max_pixels: int | None, decode_fn: Callable[[Image.Image, str], Any]
) -> Any:
  """Opens an image file, enforces the pixel limit, and runs `decode_fn(img, name)` on it.

  The limit is checked on the header size, before anything is decoded. Pillow's decompression-bomb
  warning is silenced and its error (above 2 * `Image.MAX_IMAGE_PIXELS`) is replaced by our limit.
  Every decoding failure becomes a one-line `ImageError` that starts with the file name.

  Args:
    path_or_file: filesystem path or binary file object (read to its end).
    max_pixels: see `max_pixels_limit`.
    decode_fn: called with the opened (not yet loaded) image and the file name.

  Returns:
    What `decode_fn` returns.
  """
  name = _source_name(path_or_file)
  limit = max_pixels_limit(max_pixels)
  data = _read_bytes(path_or_file, name)
  if not data:
    raise ImageError(f"{name}: file is empty (0 bytes)")
  if ImageFile.LOAD_TRUNCATED_IMAGES:
    warnings.warn(
        "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by other code); truncated images may be "
        "accepted silently",
        RuntimeWarning,
        stacklevel=3,
    )
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      try:
        img = Image.open(io.BytesIO(data))
        pillow_refuses = False
      except Image.DecompressionBombError:
        with _pillow_bomb_check_off():  # Header only: nothing is decoded here.
          img = Image.open(io.BytesIO(data))
        pillow_refuses = True
      with img:
        width, height = img.size
        if width * height > limit:
          raise ImageTooLargeError(name, width, height, limit)
        if width == 0 or height == 0:
          raise ImageError(f"{name}: image has zero size ({width}x{height})")
        if pillow_refuses:  # Our limit admits what Pillow would refuse: decode without its check.
          with _pillow_bomb_check_off():
            return decode_fn(img, name)
        return decode_fn(img, name)
  except ImageError:
    raise
  except UnidentifiedImageError:
    raise NotAnImageError(f"{name}: not a recognised image file") from None
  except Image.DecompressionBombError as e:
    raise ImageError(f"{name}: image too large ({e})") from e
  except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as e:
    cause = " ".join(str(e).split()) or type(e).__name__
    raise ImageError(f"{name}: corrupt or truncated image data ({cause})") from e


def _decode_full(img: Image.Image, name: str) -> np.ndarray:
  """`decode_fn` of `load_image`: full decode, EXIF orientation, uint8 RGB."""
  img.load()
  oriented = img
  if _exif_orientation(img, name) != 1:  # exif_transpose would copy even an upright image.
    try:
      oriented = ImageOps.exif_transpose(img)
    except Exception as e:  # pylint: disable=broad-except
      warnings.warn(
          f"{name}: ignoring unreadable EXIF orientation ({e})", RuntimeWarning, stacklevel=4
      )
    oriented.load()
  array = _pil_to_uint8_rgb(oriented, name)
  if array.size == 0:
    raise ImageError(f"{name}: image has zero size ({array.shape[1]}x{array.shape[0]})")
  return array


def load_image(path_or_file: ImageSource, max_pixels: int | None = None) -> np.ndarray:
  """Loads an image file as uint8 RGB, strictly (no silently truncated, empty or huge images).

  * The header size is checked against `max_pixels` before decoding (see `max_pixels_limit`).
  * The file is fully decoded (`Image.load()`); truncated files are errors. `PIL.ImageFile.
    LOAD_TRUNCATED_IMAGES` is left untouched (it must be False, its default, for this check).
  * EXIF orientation is applied (`ImageOps.exif_transpose`), so H/W are those of the displayed
    image. A corrupt EXIF block only triggers a warning and the image is used as stored.
  * Modes: L / 1 -> grey replicated to RGB; LA / RGBA / P with transparency / PA -> alpha composited
    over **white**; P -> palette lookup; I;16 / I (16-bit grey) -> `>> 8` to 8 bit; F -> clipped to
    0..255; CMYK / YCbCr -> Pillow's RGB conversion. Multi-frame files give their first frame.

  Args:
    path_or_file: filesystem path or binary file object (read to its end).
    max_pixels: limit on width x height; None for $CLIPCROP_MAX_PIXELS or `DEFAULT_MAX_PIXELS`.

  Returns:
    uint8 array of shape (H, W, 3), RGB.

  Raises:
    ImageError: (a ValueError) missing/unreadable file, empty file, not an image, truncated or
      corrupt data, zero-size image, unsupported mode, more than `max_pixels` pixels. The one-line
      message starts with the file name.
    ValueError: invalid `max_pixels` or $CLIPCROP_MAX_PIXELS.
    TypeError: `path_or_file` is neither a path nor a binary file object.
  """
  return _decode(path_or_file, max_pixels, _decode_full)


# EXIF orientation -> (swap axes, then flip rows, then flip columns) turning stored pixels into
# displayed ones; the same transforms as `ImageOps.exif_transpose`.
_ORIENTATIONS = {
    1: (False, False, False),
    2: (False, False, True),  # FLIP_LEFT_RIGHT.
    3: (False, True, True),  # ROTATE_180.
    4: (False, True, False),  # FLIP_TOP_BOTTOM.
    5: (True, False, False),  # TRANSPOSE.
    6: (True, False, True),  # ROTATE_270 (90 degrees clockwise).
    7: (True, True, True),  # TRANSVERSE.
    8: (True, True, False),  # ROTATE_90 (90 degrees counter-clockwise).
}


def _exif_orientation(img: Image.Image, name: str) -> int:
  """The EXIF/XMP orientation (1..8) `ImageOps.exif_transpose` would apply; 1 if none or corrupt."""
  try:
    orientation = int(img.getexif().get(0x0112, 1))
  except Exception as e:  # pylint: disable=broad-except
    warnings.warn(
        f"{name}: ignoring unreadable EXIF orientation ({e})", RuntimeWarning, stacklevel=5
    )
    return 1
  return orientation if orientation in _ORIENTATIONS else 1


def _reduce_to_rgb(img: Image.Image, factor: int, name: str) -> np.ndarray:
  """Loaded image -> uint8 RGB reduced by `factor` (box average of factor x factor cells).

  Cells are aligned with the top-left corner; the last row/column of cells averages whatever
  pixels remain (`Image.reduce`). Grey and plain RGB images are reduced before the (linear) mode
  conversion; others (alpha compositing, CMYK, 16-bit) are converted first.
  """
  if factor > 1 and img.mode in ("RGB", "L") and "transparency" not in img.info:
    img = img.reduce(factor)
    factor = 1
  rgb = _pil_to_uint8_rgb(img, name)
  if factor > 1:
    rgb = np.asarray(Image.fromarray(rgb).reduce(factor))
  return rgb


def _colab_cell_size(m: int, size: int) -> int:
  """Pre-reduction factor of the fast "colab" path for a max(H, W) = m image (1 = none)."""
  return max(1, m // (_MIN_OVERSAMPLING * size))


def _decode_cells(
    img: Image.Image, name: str, size: int
) -> tuple[np.ndarray, tuple[int, int], int, tuple[bool, bool]]:
  """`decode_fn` of the fast path: decode at reduced resolution, then orient.

  Returns:
    cells: uint8 (ceil(H / cell), ceil(W / cell), 3), displayed orientation; each value is the
      mean of a cell x cell block of original pixels.
    hw: original (H, W) after EXIF orientation.
    cell: cell side in original pixels (the JPEG draft scale times the `Image.reduce` factor).
    partial_first: per displayed axis (y, x), whether the incomplete cell (when H or W is not a
      multiple of `cell`) is the first one rather than the last one (flipped by the orientation).
  """
  width, height = img.size
  target = _colab_cell_size(max(width, height), size)
  scale = 1
  for draft in (8, 4, 2):  # JPEG DCT scaling: decodes 1/2, 1/4 or 1/8 of each side directly.
    if draft <= target and draft <= min(width, height):
      result = img.draft(None, (width // draft, height // draft))
      if result is not None:
        scale = int(round(width / result[1][2]))
      break
  img.load()
  if img.size != (-(-width // scale), -(-height // scale)):
    raise AssertionError(
        f"{name}: draft gave {img.size}, expected scale 1/{scale} of " f"{(width, height)}"
    )
  orientation = _exif_orientation(img, name)
  factor = max(1, target // scale)
  cells = _reduce_to_rgb(img, factor, name)
  swap, flip_y, flip_x = _ORIENTATIONS[orientation]
  hw = (height, width)
  if swap:
    cells = cells.transpose(1, 0, 2)
    hw = (width, height)
  if flip_y:
    cells = cells[::-1]
  if flip_x:
    cells = cells[:, ::-1]
  return np.ascontiguousarray(cells), hw, scale * factor, (flip_y, flip_x)


def load_for_model(
    path_or_file: ImageSource,
    size: int,
    recipe: str = "colab",
    pad_value: float | None = None,
    *,
    exact: bool = False,
    max_pixels: int | None = None,
) -> tuple[np.ndarray, tuple[int, int]]:
  """Loads an image file straight into an OWL-ViT input, decoding no more pixels than needed.

  For the default fast "colab" path a JPEG is decoded with DCT scaling (`Image.draft`) to the
  smallest 1/2, 1/4 or 1/8 scale that keeps >= 2 pixels per output pixel, other formats are
  decoded fully, then box-reduced to that resolution (`Image.reduce`), EXIF-oriented, and resized
  by `preprocess`'s cell-aware fast path. Peak memory is a few times the reduced image (< 4 * size
  pixels per side), plus the compressed file and, for non-JPEG files, the decoded image. With
  `exact=True` or the "evaluator" recipe (point sampling needs every pixel) this is
  `preprocess(load_image(path_or_file, max_pixels), ...)`.

  Args:
    path_or_file: filesystem path or binary file object.
    size: output side S (the model's input size, e.g. 768 or 960).
    recipe: "colab" or "evaluator".
    pad_value: padding value in [0, 1] units; None for the recipe default.
    exact: decode fully and use the exact resize (see `preprocess`).
    max_pixels: limit on the header's width x height; None for $CLIPCROP_MAX_PIXELS or
      `DEFAULT_MAX_PIXELS`.

  Returns:
    pixels: float32 (size, size, 3) in [0, 1], as `preprocess`.
    hw: (H, W) of the full-resolution image after EXIF orientation, for
      `boxes_cxcywh_to_pixels_xyxy`.

  Raises:
    ImageError: as `load_image` (including the pixel limit).
    ValueError: invalid recipe, size, pad_value or max_pixels.
  """
  size, pad_value = _check_preprocess_args(recipe, size, pad_value)
  if exact or recipe != "colab":
    rgb = load_image(path_or_file, max_pixels=max_pixels)
    return preprocess(rgb, size, recipe, pad_value, exact=exact), rgb.shape[:2]
  cells, hw, cell, partial_first = _decode(
      path_or_file, max_pixels, lambda img, name: _decode_cells(img, name, size)
  )
  return _colab_resize(cells, hw, size, pad_value, cell, partial_first), hw


# ------------------------------------------------------------------------------------------------
# Array validation.
# ------------------------------------------------------------------------------------------------


def to_uint8_rgb(image: np.ndarray) -> np.ndarray:
  """Validates an image array and converts it to uint8 RGB.

  Accepted layouts: (H, W) grey, (H, W, 1) grey, (H, W, 3) RGB, (H, W, 4) RGBA (alpha composited
  over white, as in `load_image`). Accepted dtypes: uint8 (unchanged), uint16 (`>> 8`), bool
  (0/255) and floating point in [0, 1] (`rint(x * 255)`).

  Args:
    image: array (or array-like) as above.

  Returns:
    uint8 array of shape (H, W, 3); a new array unless the input already is uint8 (H, W, 3).

  Raises:
    ValueError: wrong rank or channel count, zero-size, unsupported dtype, float values outside
      [0, 1] or non-finite.
  """
  image = np.asarray(image)
  if image.ndim not in (2, 3):
    raise ValueError(
        f"image must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got "
        f"shape {image.shape}"
    )
  if image.ndim == 3 and image.shape[-1] not in (1, 3, 4):
    raise ValueError(
        f"image must have 1, 3 or 4 channels in the last axis; got shape "
        f"{image.shape} (channels-first arrays must be transposed to (H, W, C))"
    )
  if image.size == 0:
    raise ValueError(f"image is empty (shape {image.shape})")

  if image.dtype == np.uint8:
    img8 = image
  elif image.dtype == np.uint16:
    img8 = (image >> 8).astype(np.uint8)
  elif image.dtype == np.bool_:
    img8 = image.astype(np.uint8) * 255
  elif np.issubdtype(image.dtype, np.floating):
    if not np.all(np.isfinite(image)):
      raise ValueError("float image contains NaN or infinite values")
    lo, hi = float(image.min()), float(image.max())
    if lo < 0.0 or hi > 1.0:
      raise ValueError(
          f"float image values must lie in [0, 1]; got range [{lo:g}, {hi:g}] "
          "(divide uint8-range floats by 255)"
      )
    img8 = np.rint(image.astype(np.float64) * 255.0).astype(np.uint8)
  else:
    raise ValueError(
        f"unsupported image dtype {image.dtype}; expected uint8, uint16, bool or " "float in [0, 1]"
    )

  if img8.ndim == 2:
    img8 = img8[..., None]
  channels = img8.shape[-1]
  if channels == 1:
    return np.repeat(img8, 3, axis=-1)
  if channels == 4:
    return _composite_on_white(img8[..., :3], img8[..., 3])
  return img8


# ------------------------------------------------------------------------------------------------
# Resizing kernels.
# ------------------------------------------------------------------------------------------------


def _mirror(index: np.ndarray, n: int) -> np.ndarray:
  """scipy.ndimage 'mirror' boundary (d c b | a b c d | c b a): any integer index -> [0, n)."""
  if n == 1:
    return np.zeros_like(index)
  period = 2 * (n - 1)
  index = np.mod(index, period)
  return np.where(index > n - 1, period - index, index)


# Memoised: a folder of photos has a few sizes, and building the operator took ~60% of the time
# of a 1600x1200 JPEG's `load_for_model` at S = 96. The cached arrays are shared, so read-only.
@functools.lru_cache(maxsize=256)
def _colab_axis_weights(
    n: int, m: int, size: int, cell: int = 1, partial_first: bool = False
) -> tuple[sparse.csr_matrix, np.ndarray]:
  """`_colab_axis_weights_uncached`, memoised; the returned arrays are read-only."""
  weights, real_sum = _colab_axis_weights_uncached(n, m, size, cell, partial_first)
  for array in (weights.data, weights.indices, weights.indptr, real_sum):
    array.flags.writeable = False
  return weights, real_sum


def _colab_axis_weights_uncached(
    n: int, m: int, size: int, cell: int = 1, partial_first: bool = False
) -> tuple[sparse.csr_matrix, np.ndarray]:
  """One axis of the "colab" resize as a sparse matrix over cells of real pixels.

  The reference, along one axis of the padded square: a line of m = max(H, W) values (n real
  pixels, then padding); a Gaussian filter (sigma = max(0, (m / size - 1) / 2), truncated at
  4 sigma, weights normalised, 'mirror' boundary), then linear interpolation at
  c_i = (i + 0.5) * m / size - 0.5 ('mirror' boundary), i = 0..size-1. Output i is thus a weighted
  sum of line pixels. The real pixels are grouped into cells of `cell` consecutive pixels; cell j's
  weight is the sum of its pixels' weights, computed with the Gaussian's cumulative sum over every
  mirror image of the cell (any number of reflections), so the cost does not grow with m.

  Args:
    n: real pixels on this axis (H or W), >= 1.
    m: side of the padded square, max(H, W) >= n.
    size: output side S.
    cell: cell side in pixels (1 = the exact per-pixel operator).
    partial_first: when n is not a multiple of `cell`, whether the incomplete cell comes first
      (cells [0, r), [r, r + cell), ...) instead of last.

  Returns:
    weights: float32 CSR (rows, ceil(n / cell)); rows <= size is the number of leading outputs that
      see any real pixel (later outputs are pure padding).
    real_sum: float64 (rows,), each row's total weight on real pixels; the padding gets the rest.
  """
  scale = m / size
  sigma = max(0.0, (scale - 1.0) / 2.0)
  if sigma > 1e-15:  # scipy.ndimage.gaussian_filter skips axes with sigma <= 1e-15.
    radius = int(4.0 * sigma + 0.5)
    taps = np.arange(-radius, radius + 1, dtype=np.float64)
    gauss = np.exp(-0.5 / (sigma * sigma) * taps**2)
    gauss /= gauss.sum()
  else:
    radius, gauss = 0, np.ones(1)
  cdf = np.concatenate([[0.0], np.cumsum(gauss)])

  def mass_upto(t):  # Total Gaussian weight of taps <= t (t may be any integer).
    return cdf[np.clip(t + radius + 1, 0, 2 * radius + 1)]

  centre = (np.arange(size) + 0.5) * scale - 0.5
  q0 = np.floor(centre)
  frac = centre - q0
  q = _mirror(np.stack([q0, q0 + 1], axis=-1).astype(np.int64), m)  # (size, 2) line indices.
  lin = np.stack([1.0 - frac, frac], axis=-1)  # (size, 2) interpolation weights.

  offset = (-n) % cell if partial_first else 0  # Cell of pixel p: (p + offset) // cell.
  n_cells = (n + offset + cell - 1) // cell
  if m == 1:
    return sparse.csr_matrix(np.ones((size, 1), np.float32)), np.ones(size)

  # Window of cells a row can touch: with at most one reflection (radius <= m - 1) every mirror
  # image of the kernel support [q - radius, q + radius] lands inside that interval clipped to
  # [0, m - 1]; otherwise take all cells.
  if radius <= m - 1:
    lo = np.maximum(q.min(axis=-1) - radius, 0)
    hi = np.minimum(q.max(axis=-1) + radius, n - 1)
  else:
    lo = np.zeros(size, np.int64)
    hi = np.full(size, n - 1, np.int64)
  has_real = lo <= hi
  rows = int(np.nonzero(has_real)[0].max()) + 1 if has_real.any() else 0
  lo, hi, q, lin = lo[:rows], hi[:rows], q[:rows], lin[:rows]
  if rows == 0:
    return sparse.csr_matrix((0, n_cells), dtype=np.float32), np.zeros(0)
  j_lo = (lo + offset) // cell
  j_hi = (np.maximum(hi, lo) + offset) // cell
  width = int((j_hi - j_lo).max()) + 1
  j = j_lo[:, None] + np.arange(width)[None, :]  # (rows, width) candidate cells.
  valid = (j <= j_hi[:, None]) & (hi >= lo)[:, None]
  j = np.minimum(j, n_cells - 1)
  a = np.maximum(j * cell - offset, 0)  # First and last pixel of each cell (inclusive).
  b = np.minimum((j + 1) * cell - offset, n) - 1

  # Extended-line intervals that mirror onto [a, b]: direct copies [a + kP, b + kP] and, for the
  # pixels other than 0 and m - 1 (which are not repeated by 'mirror'), reversed copies
  # [kP - b', kP - a'], with period P = 2 (m - 1).
  period = 2 * (m - 1)
  reps = radius // period + 1
  a_in, b_in = np.maximum(a, 1), np.minimum(b, m - 2)
  starts, ends = [], []
  for k in range(-reps, reps + 1):
    starts += [a + k * period, np.where(a_in <= b_in, k * period - b_in, 1)]
    ends += [b + k * period, np.where(a_in <= b_in, k * period - a_in, 0)]
  starts = np.stack(starts, axis=-1)[:, None]  # (rows, 1, width, intervals).
  ends = np.stack(ends, axis=-1)[:, None]
  qq = q[:, :, None, None]  # (rows, 2, 1, 1).
  mass = np.where(ends >= starts, mass_upto(ends - qq) - mass_upto(starts - 1 - qq), 0.0)
  weights = (lin[:, :, None] * mass.sum(axis=-1)).sum(axis=1)  # (rows, width).
  weights = np.where(valid, np.maximum(weights, 0.0), 0.0)

  keep = weights > 0
  row_index = np.broadcast_to(np.arange(rows)[:, None], j.shape)
  matrix = sparse.csr_matrix(
      (weights[keep].astype(np.float32), (row_index[keep], j[keep])), shape=(rows, n_cells)
  )
  return matrix, weights.sum(axis=-1)


def _separable_apply(
    image: np.ndarray, rows_op: sparse.csr_matrix, cols_op: sparse.csr_matrix
) -> np.ndarray:
  """out[i, j, c] = sum_{y, x} rows_op[i, y] * image[y, x, c] * cols_op[j, x], in float32.

  The rows pass runs over bands of input rows converted to float32 a chunk at a time, so memory is
  O(rows_op.shape[0] * W) plus one chunk, whatever the input dtype and height.

  Args:
    image: (H, W, C) array (uint8 or float).
    rows_op: (Ho, H) sparse.
    cols_op: (Wo, W) sparse.

  Returns:
    float32 (Ho, Wo, C).
  """
  h, w, c = image.shape
  ho, wo = rows_op.shape[0], cols_op.shape[0]
  if ho == 0 or wo == 0:
    return np.zeros((ho, wo, c), np.float32)
  flat = image.reshape(h, w * c)
  rows = np.empty((ho, w * c), np.float32)
  block = max(1, _CHUNK_VALUES // (w * c) * ho // h)  # Output rows per chunk.
  for i0 in range(0, ho, block):
    i1 = min(ho, i0 + block)
    band = rows_op.indices[rows_op.indptr[i0] : rows_op.indptr[i1]]
    if band.size == 0:
      rows[i0:i1] = 0.0
      continue
    y0, y1 = int(band.min()), int(band.max()) + 1
    rows[i0:i1] = rows_op[i0:i1, y0:y1] @ flat[y0:y1].astype(np.float32)
  by_column = rows.reshape(ho, w, c).transpose(1, 0, 2).reshape(w, ho * c)
  out = cols_op @ by_column  # (Wo, Ho * C).
  return np.ascontiguousarray(out.reshape(wo, ho, c).transpose(1, 0, 2))


def _colab_resize(
    cells: np.ndarray,
    hw: tuple[int, int],
    size: int,
    pad_value: float,
    cell: int = 1,
    partial_first: tuple[bool, bool] = (False, False),
) -> np.ndarray:
  """The "colab" recipe from uint8 RGB cells, without building the padded square.

  With P the (m, m) padded square (m = max(H, W)) and A_y, A_x the per-axis operators of
  `_colab_axis_weights`, the reference output is A_y P A_x^T = A_y X A_x^T + pad * (1 - r_y r_x^T)
  (X the real pixels, r the rows' real weights), clipped to P's value range. With cell = 1 this is
  the reference up to float32 rounding; with larger cells X is replaced by its cell means.

  Args:
    cells: uint8 (ceil(H / cell), ceil(W / cell), 3) cell means (the image itself when cell = 1).
    hw: original (H, W) the cells cover.
    size: output side S.
    pad_value: padding value in [0, 1].
    cell: cell side in original pixels.
    partial_first: per axis (y, x), whether the incomplete cell is the first one.

  Returns:
    float32 (size, size, 3).
  """
  h, w = hw
  m = max(h, w)
  rows_op, rows_real = _colab_axis_weights(h, m, size, cell, partial_first[0])
  cols_op, cols_real = _colab_axis_weights(w, m, size, cell, partial_first[1])
  if cells.shape[:2] != (rows_op.shape[1], cols_op.shape[1]):
    raise AssertionError(f"cells {cells.shape} do not cover {hw} with cell {cell}")
  core = _separable_apply(cells, rows_op, cols_op)
  core *= np.float32(1.0 / 255.0)
  pad_weight = 1.0 - rows_real[:, None] * cols_real[None, :]  # (Ho, Wo) weight on the padding.
  core += (pad_value * pad_weight)[..., None].astype(np.float32)
  lo, hi = float(cells.min()) / 255.0, float(cells.max()) / 255.0
  if h < m or w < m:
    lo, hi = min(lo, pad_value), max(hi, pad_value)
  np.clip(core, np.float32(lo), np.float32(hi), out=core)
  out = np.full((size, size, 3), pad_value, dtype=np.float32)
  out[: core.shape[0], : core.shape[1]] = core
  return out


def _resize_skimage_like(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """`skimage.transform.resize(image, (out_h, out_w), order=1, mode='reflect', anti_aliasing=True)`.

  Re-implemented with scipy.ndimage (same calls as skimage / HF `Owlv2ImageProcessor`):
  Gaussian pre-filter with sigma = max(0, (in/out - 1) / 2) per spatial axis (0 for channels and for
  upsampling; scipy skips zero-sigma axes), mode 'mirror'; `ndimage.zoom` order 1, mode 'mirror',
  grid_mode=True; output clipped to the input's [min, max].

  Args:
    image: float32 (H, W, C).
    out_h: output height.
    out_w: output width.

  Returns:
    float32 (out_h, out_w, C).
  """
  factors = np.divide(image.shape, (out_h, out_w, image.shape[2]))
  sigma = np.maximum(0.0, (factors - 1.0) / 2.0)
  filtered = ndimage.gaussian_filter(image, sigma, cval=0.0, mode="mirror")
  zoom = [1.0 / f for f in factors]
  out = ndimage.zoom(filtered, zoom, order=1, mode="mirror", cval=0.0, grid_mode=True)
  if out.shape[:2] != (out_h, out_w):  # Guard against rounding in zoom's output shape.
    raise AssertionError(f"zoom produced {out.shape}, expected {(out_h, out_w)}")
  return np.clip(out, image.min(), image.max()).astype(np.float32, copy=False)


def _colab_padded_reference(rgb: np.ndarray, size: int, pad_value: float) -> np.ndarray:
  """The literal "colab" recipe: float32 (M, M) padded square, then `_resize_skimage_like`.

  Memory and time grow with max(H, W)^2 (a 10000 x 20 image needs ~3 GB); kept as the readable
  reference for tests and tools/benchmark_preprocess.py ("before"), not used by `preprocess`.
  """
  h, w = rgb.shape[:2]
  m = padded_size(h, w)
  padded = np.full((m, m, 3), pad_value, dtype=np.float32)
  padded[:h, :w] = rgb.astype(np.float32) / np.float32(255.0)
  return _resize_skimage_like(padded, size, size)


def _tf_interpolation(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Source indices and weights of TF's bilinear resize with half-pixel centres (float32 math).

  Mirrors TensorFlow's `compute_interpolation_weights` with `HalfPixelScaler`: scale = in / out,
  src = (i + 0.5) * scale - 0.5, lower = max(floor(src), 0), upper = min(ceil(src), in - 1),
  lerp = src - floor(src).

  Returns:
    lower (out_size,) int64, upper (out_size,) int64, lerp (out_size,) float32.
  """
  scale = np.float32(in_size) / np.float32(out_size)
  src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
  src_floor = np.floor(src)
  lower = np.maximum(src_floor.astype(np.int64), 0)
  upper = np.minimum(np.ceil(src).astype(np.int64), in_size - 1)
  lerp = (src - src_floor).astype(np.float32)
  return lower, upper, lerp


def _resize_tf_bilinear(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """`tf.image.resize(image, (out_h, out_w), 'bilinear', antialias=False)` in numpy.

  Only the 4 source pixels of each output pixel are gathered before any float conversion, so memory
  is O(out_h * W + out_h * out_w) whatever the input size.

  Args:
    image: float32 (H, W, C) in [0, 1], or uint8 (H, W, C) (then values are x / 255 in float32,
      bit-identical to converting the whole image first).
    out_h: output height (>= 1).
    out_w: output width (>= 1).

  Returns:
    float32 (out_h, out_w, C).
  """
  y0, y1, ly = _tf_interpolation(image.shape[0], out_h)
  x0, x1, lx = _tf_interpolation(image.shape[1], out_w)
  lx = lx[None, :, None]
  ly = ly[:, None, None]

  def gather(rows, cols):
    values = image[rows][:, cols]
    if values.dtype == np.uint8:
      return values.astype(np.float32) / np.float32(255.0)
    return values.astype(np.float32, copy=False)

  v00, v01, v10, v11 = gather(y0, x0), gather(y0, x1), gather(y1, x0), gather(y1, x1)
  top = v00 + (v01 - v00) * lx
  bottom = v10 + (v11 - v10) * lx
  return (top + (bottom - top) * ly).astype(np.float32, copy=False)


def evaluator_fit_size(h: int, w: int, size: int) -> tuple[int, int]:
  """Resized (height, width) before padding in Scenic's `ResizeWithPad` (float32 arithmetic).

  ratio = max(h / size, w / size); fit = trunc(min(h / ratio, size)) (same for w). Clamped to >= 1
  (TF would fail on a zero-size resize of extremely thin images).

  Args:
    h: original height in pixels.
    w: original width in pixels.
    size: target square side S.

  Returns:
    (fit_h, fit_w) ints, each in [1, size].
  """
  h32, w32, s32 = np.float32(h), np.float32(w), np.float32(size)
  ratio = np.maximum(h32 / s32, w32 / s32)
  fit_h = int(np.minimum(h32 / ratio, s32))
  fit_w = int(np.minimum(w32 / ratio, s32))
  return max(fit_h, 1), max(fit_w, 1)


# ------------------------------------------------------------------------------------------------
# Public preprocessing.
# ------------------------------------------------------------------------------------------------


def padded_size(h: int, w: int) -> int:
  """Side, in original pixels, of the bottom/right-padded square the model sees: max(h, w)."""
  if h <= 0 or w <= 0:
    raise ValueError(f"image size must be positive, got h={h}, w={w}")
  return max(int(h), int(w))


def _check_preprocess_args(recipe: str, size: int, pad_value: float | None) -> tuple[int, float]:
  """Validates recipe/size/pad_value; returns (size, pad_value) with the recipe default filled."""
  if recipe not in RECIPES:
    raise ValueError(f"unknown recipe {recipe!r}; expected one of {', '.join(RECIPES)}")
  if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
    raise ValueError(f"size must be a positive integer, got {size!r}")
  if pad_value is None:
    pad_value = DEFAULT_PAD_VALUES[recipe]
  pad_value = float(pad_value)
  if not np.isfinite(pad_value):
    raise ValueError(f"pad_value must be finite, got {pad_value}")
  return int(size), pad_value


def preprocess(
    image: ImageInput,
    size: int,
    recipe: str = "colab",
    pad_value: float | None = None,
    *,
    exact: bool = False,
    max_pixels: int | None = None,
) -> np.ndarray:
  """Turns one image into an OWL-ViT input (padded to a square and resized, values in [0, 1]).

  Recipes:
    `"colab"`: x = uint8 / 255 (float32); pad bottom/right to (M, M), M = max(H, W), with
      `pad_value` (default 0.5); resize (M, M) -> (size, size) like
      `skimage.transform.resize(order=1, mode='reflect', anti_aliasing=True)`.
    `"evaluator"`: x = uint8 / 255 (float32); resize to `evaluator_fit_size(H, W, size)` with TF
      bilinear (half-pixel centres, no anti-aliasing); pad bottom/right to (size, size) with
      `pad_value` (default 0.0). Always exact (it samples 4 pixels per output pixel).

  Neither builds the (M, M) square: memory is O(H * W) for the input plus O(size * W) floats.
  `exact=False` (default) pre-reduces big "colab" inputs by an integer factor k (k x k box means,
  `Image.reduce`; JPEG DCT scaling for paths) while keeping >= 2 pixels per output pixel, and
  integrates the reference kernel over each cell: identical to `exact=True` when
  max(H, W) < 4 * size, otherwise within a few grey levels (see the module docstring).

  Args:
    image: uint8 RGB (H, W, 3) array, anything `to_uint8_rgb` accepts, or a path (the fast "colab"
      path then goes through `load_for_model`, the others through `load_image`).
    size: output side S (the model's input size, e.g. 768 or 960).
    recipe: "colab" or "evaluator".
    pad_value: padding value in [0, 1] units; None for the recipe default.
    exact: "colab" only: resize at full resolution, equal to the padded reference (skimage / HF)
      up to float32 rounding. Slower for big images (~1 s at 100 MP), still never O(M^2).
    max_pixels: decoding limit for path inputs (see `load_image`); ignored for arrays.

  Returns:
    float32 array of shape (size, size, 3), RGB. The real image occupies the top-left
    (H * size / M, W * size / M) region (up to rounding); the rest is padding.

  Raises:
    ValueError: unknown recipe, invalid size/pad_value, or an invalid image (see `to_uint8_rgb`).
    ImageError: `image` is a path that cannot be loaded.
  """
  size, pad_value = _check_preprocess_args(recipe, size, pad_value)
  if isinstance(image, (str, os.PathLike)):
    if recipe == "colab" and not exact:
      return load_for_model(image, size, recipe, pad_value, max_pixels=max_pixels)[0]
    rgb = load_image(image, max_pixels=max_pixels)
  else:
    rgb = to_uint8_rgb(image)
  h, w = rgb.shape[:2]

  if recipe == "colab":
    cell = 1 if exact else _colab_cell_size(max(h, w), size)
    if cell > 1:
      rgb = np.asarray(Image.fromarray(rgb).reduce(cell))
    return _colab_resize(rgb, (h, w), size, pad_value, cell)

  fit_h, fit_w = evaluator_fit_size(h, w, size)
  out = np.full((size, size, 3), pad_value, dtype=np.float32)
  out[:fit_h, :fit_w] = _resize_tf_bilinear(rgb, fit_h, fit_w)
  return out


def preprocess_batch(
    images: Sequence[ImageInput],
    size: int,
    recipe: str = "colab",
    pad_value: float | None = None,
    *,
    exact: bool = False,
    max_pixels: int | None = None,
) -> np.ndarray:
  """Applies `preprocess` to each image and stacks the results.

  Args:
    images: sequence of B images (arrays or paths, see `preprocess`); sizes may differ.
    size: output side S.
    recipe: "colab" or "evaluator".
    pad_value: padding value; None for the recipe default.
    exact: see `preprocess`.
    max_pixels: decoding limit for paths; see `load_image`.

  Returns:
    float32 array of shape (B, size, size, 3).
  """
  if isinstance(images, np.ndarray) and images.ndim == 4:
    images = list(images)
  outs = [
      preprocess(im, size, recipe=recipe, pad_value=pad_value, exact=exact, max_pixels=max_pixels)
      for im in images
  ]
  if not outs:
    return np.zeros((0, size, size, 3), dtype=np.float32)
  return np.stack(outs, axis=0)


# ------------------------------------------------------------------------------------------------
# Boxes.
# ------------------------------------------------------------------------------------------------


def _hw_arrays(image_hw, dtype) -> tuple[np.ndarray, np.ndarray]:
  """Splits `image_hw` (..., 2) into broadcastable height and width arrays."""
  hw = np.asarray(image_hw, dtype=dtype)
  if hw.shape[-1:] != (2,):
    raise ValueError(f"image_hw must have a last axis of size 2 (height, width), got {hw.shape}")
  if np.any(hw <= 0):
    raise ValueError(f"image_hw must be positive, got {image_hw}")
  return hw[..., 0], hw[..., 1]


def boxes_cxcywh_to_pixels_xyxy(boxes: np.ndarray, image_hw) -> np.ndarray:
  """Maps model boxes to corner boxes in original-image pixels, clipped to the image.

  Model boxes are normalised to the padded square, whose side is max(H, W) original pixels for both
  the "colab" and the "evaluator" recipe (padding is bottom/right), so every coordinate is scaled by
  max(H, W), converted to corners and clipped to x in [0, W], y in [0, H].

  Args:
    boxes: (..., 4) float array of (cx, cy, w, h) in [0, 1] of the padded square.
    image_hw: original (H, W), or an array (..., 2) broadcastable against `boxes.shape[:-1]` for
      per-image sizes (e.g. shape (B, 1, 2) for boxes (B, N, 4)).

  Returns:
    (..., 4) float array (float32 for float32 input, else float64) of (x0, y0, x1, y1) pixels.
  """
  boxes = np.asarray(boxes)
  dtype = np.result_type(boxes.dtype, np.float32)
  boxes = boxes.astype(dtype, copy=False)
  if boxes.shape[-1:] != (4,):
    raise ValueError(f"boxes must have a last axis of size 4 (cx, cy, w, h), got {boxes.shape}")
  h, w = _hw_arrays(image_hw, dtype)
  scale = np.maximum(h, w)[..., None]
  cx, cy, bw, bh = np.moveaxis(boxes * scale, -1, 0)
  x0 = np.clip(cx - 0.5 * bw, 0, w)
  x1 = np.clip(cx + 0.5 * bw, 0, w)
  y0 = np.clip(cy - 0.5 * bh, 0, h)
  y1 = np.clip(cy + 0.5 * bh, 0, h)
  return np.stack([x0, y0, x1, y1], axis=-1).astype(dtype, copy=False)


def pixels_xyxy_to_boxes_cxcywh(boxes_xyxy: np.ndarray, image_hw) -> np.ndarray:
  """Inverse of `boxes_cxcywh_to_pixels_xyxy` (without clipping).

  Args:
    boxes_xyxy: (..., 4) float array of (x0, y0, x1, y1) in original-image pixels.
    image_hw: original (H, W), or an array (..., 2) broadcastable against `boxes_xyxy.shape[:-1]`.

  Returns:
    (..., 4) float array of (cx, cy, w, h) normalised to the max(H, W) padded square.
  """
  boxes_xyxy = np.asarray(boxes_xyxy)
  dtype = np.result_type(boxes_xyxy.dtype, np.float32)
  boxes_xyxy = boxes_xyxy.astype(dtype, copy=False)
  if boxes_xyxy.shape[-1:] != (4,):
    raise ValueError(
        f"boxes must have a last axis of size 4 (x0, y0, x1, y1), got {boxes_xyxy.shape}"
    )
  h, w = _hw_arrays(image_hw, dtype)
  scale = np.maximum(h, w)
  x0, y0, x1, y1 = np.moveaxis(boxes_xyxy, -1, 0)
  out = np.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)
  return (out / scale[..., None]).astype(dtype, copy=False)
