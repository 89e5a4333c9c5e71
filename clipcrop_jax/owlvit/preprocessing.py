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
"""

from __future__ import annotations

import io
import os
import struct
from typing import BinaryIO, Sequence
import warnings

import numpy as np
from PIL import Image
from PIL import ImageFile
from PIL import ImageOps
from PIL import UnidentifiedImageError
from scipy import ndimage

RECIPES = ("colab", "evaluator")
DEFAULT_PAD_VALUES = {"colab": 0.5, "evaluator": 0.0}

ImageSource = str | os.PathLike | BinaryIO
ImageInput = np.ndarray | str | os.PathLike


class ImageError(ValueError):
  """An image file could not be read or decoded (missing, not an image, truncated, empty)."""


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
        f"load_image expects a path or a binary file object, got {type(path_or_file).__name__}")
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


def load_image(path_or_file: ImageSource) -> np.ndarray:
  """Loads an image file as uint8 RGB, strictly (no silently truncated or empty images).

  * The file is fully decoded (`Image.load()`); truncated files are errors. `PIL.ImageFile.
    LOAD_TRUNCATED_IMAGES` is left untouched (it must be False, its default, for this check).
  * EXIF orientation is applied (`ImageOps.exif_transpose`), so H/W are those of the displayed
    image. A corrupt EXIF block only triggers a warning and the image is used as stored.
  * Modes: L / 1 -> grey replicated to RGB; LA / RGBA / P with transparency / PA -> alpha composited
    over **white**; P -> palette lookup; I;16 / I (16-bit grey) -> `>> 8` to 8 bit; F -> clipped to
    0..255; CMYK / YCbCr -> Pillow's RGB conversion. Multi-frame files give their first frame.

  Args:
    path_or_file: filesystem path or binary file object (read to its end).

  Returns:
    uint8 array of shape (H, W, 3), RGB.

  Raises:
    ImageError: (a ValueError) missing/unreadable file, empty file, not an image, truncated or
      corrupt data, zero-size image, unsupported mode. The one-line message starts with the file
      name.
    TypeError: `path_or_file` is neither a path nor a binary file object.
  """
  name = _source_name(path_or_file)
  data = _read_bytes(path_or_file, name)
  if not data:
    raise ImageError(f"{name}: file is empty (0 bytes)")
  if ImageFile.LOAD_TRUNCATED_IMAGES:
    warnings.warn(
        "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by other code); truncated images may be "
        "accepted silently", RuntimeWarning, stacklevel=2)
  try:
    with Image.open(io.BytesIO(data)) as img:
      img.load()
      if img.width == 0 or img.height == 0:
        raise ImageError(f"{name}: image has zero size ({img.width}x{img.height})")
      try:
        oriented = ImageOps.exif_transpose(img)
      except Exception as e:  # pylint: disable=broad-except
        warnings.warn(f"{name}: ignoring unreadable EXIF orientation ({e})", RuntimeWarning,
                      stacklevel=2)
        oriented = img
      oriented.load()
      array = _pil_to_uint8_rgb(oriented, name)
  except ImageError:
    raise
  except UnidentifiedImageError:
    raise ImageError(f"{name}: not a recognised image file") from None
  except Image.DecompressionBombError as e:
    raise ImageError(f"{name}: image too large ({e})") from e
  except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as e:
    cause = " ".join(str(e).split()) or type(e).__name__
    raise ImageError(f"{name}: corrupt or truncated image data ({cause})") from e
  if array.size == 0:
    raise ImageError(f"{name}: image has zero size ({array.shape[1]}x{array.shape[0]})")
  return array


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
    raise ValueError(f"image must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got "
                     f"shape {image.shape}")
  if image.ndim == 3 and image.shape[-1] not in (1, 3, 4):
    raise ValueError(f"image must have 1, 3 or 4 channels in the last axis; got shape "
                     f"{image.shape} (channels-first arrays must be transposed to (H, W, C))")
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
      raise ValueError(f"float image values must lie in [0, 1]; got range [{lo:g}, {hi:g}] "
                       "(divide uint8-range floats by 255)")
    img8 = np.rint(image.astype(np.float64) * 255.0).astype(np.uint8)
  else:
    raise ValueError(f"unsupported image dtype {image.dtype}; expected uint8, uint16, bool or "
                     "float in [0, 1]")

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

  Args:
    image: float32 (H, W, C).
    out_h: output height (>= 1).
    out_w: output width (>= 1).

  Returns:
    float32 (out_h, out_w, C).
  """
  y0, y1, ly = _tf_interpolation(image.shape[0], out_h)
  x0, x1, lx = _tf_interpolation(image.shape[1], out_w)
  lx = lx[None, :, None]
  ly = ly[:, None, None]
  rows0 = image[y0]
  rows1 = image[y1]
  top = rows0[:, x0] + (rows0[:, x1] - rows0[:, x0]) * lx
  bottom = rows1[:, x0] + (rows1[:, x1] - rows1[:, x0]) * lx
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


def preprocess(image: ImageInput,
               size: int,
               recipe: str = "colab",
               pad_value: float | None = None) -> np.ndarray:
  """Turns one image into an OWL-ViT input (padded to a square and resized, values in [0, 1]).

  Recipes:
    `"colab"`: x = uint8 / 255 (float32); pad bottom/right to (M, M), M = max(H, W), with
      `pad_value` (default 0.5); resize (M, M) -> (size, size) like
      `skimage.transform.resize(order=1, mode='reflect', anti_aliasing=True)`.
    `"evaluator"`: x = uint8 / 255 (float32); resize to `evaluator_fit_size(H, W, size)` with TF
      bilinear (half-pixel centres, no anti-aliasing); pad bottom/right to (size, size) with
      `pad_value` (default 0.0).

  Args:
    image: uint8 RGB (H, W, 3) array, anything `to_uint8_rgb` accepts, or a path for `load_image`.
    size: output side S (the model's input size, e.g. 768 or 960).
    recipe: "colab" or "evaluator".
    pad_value: padding value in [0, 1] units; None for the recipe default.

  Returns:
    float32 array of shape (size, size, 3), RGB. The real image occupies the top-left
    (H * size / M, W * size / M) region (up to rounding); the rest is padding.

  Raises:
    ValueError: unknown recipe, invalid size/pad_value, or an invalid image (see `to_uint8_rgb`).
    ImageError: `image` is a path that cannot be loaded.
  """
  if recipe not in RECIPES:
    raise ValueError(f"unknown recipe {recipe!r}; expected one of {', '.join(RECIPES)}")
  if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
    raise ValueError(f"size must be a positive integer, got {size!r}")
  size = int(size)
  if pad_value is None:
    pad_value = DEFAULT_PAD_VALUES[recipe]
  pad_value = float(pad_value)
  if not np.isfinite(pad_value):
    raise ValueError(f"pad_value must be finite, got {pad_value}")

  if isinstance(image, (str, os.PathLike)):
    rgb = load_image(image)
  else:
    rgb = to_uint8_rgb(image)
  x = rgb.astype(np.float32) / np.float32(255.0)
  h, w = x.shape[:2]

  if recipe == "colab":
    m = padded_size(h, w)
    padded = np.full((m, m, 3), pad_value, dtype=np.float32)
    padded[:h, :w] = x
    return _resize_skimage_like(padded, size, size)

  fit_h, fit_w = evaluator_fit_size(h, w, size)
  out = np.full((size, size, 3), pad_value, dtype=np.float32)
  out[:fit_h, :fit_w] = _resize_tf_bilinear(x, fit_h, fit_w)
  return out


def preprocess_batch(images: Sequence[ImageInput],
                     size: int,
                     recipe: str = "colab",
                     pad_value: float | None = None) -> np.ndarray:
  """Applies `preprocess` to each image and stacks the results.

  Args:
    images: sequence of B images (arrays or paths, see `preprocess`); sizes may differ.
    size: output side S.
    recipe: "colab" or "evaluator".
    pad_value: padding value; None for the recipe default.

  Returns:
    float32 array of shape (B, size, size, 3).
  """
  if isinstance(images, np.ndarray) and images.ndim == 4:
    images = list(images)
  outs = [preprocess(im, size, recipe=recipe, pad_value=pad_value) for im in images]
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
        f"boxes must have a last axis of size 4 (x0, y0, x1, y1), got {boxes_xyxy.shape}")
  h, w = _hw_arrays(image_hw, dtype)
  scale = np.maximum(h, w)
  x0, y0, x1, y1 = np.moveaxis(boxes_xyxy, -1, 0)
  out = np.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)
  return (out / scale[..., None]).astype(dtype, copy=False)
