"""Tests for clipcrop_jax.owlvit.preprocessing (loading, recipes, box geometry)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from PIL import ImageFile
import pytest

from clipcrop_jax.owlvit import preprocessing as pp

RNG_SEED = 1234


def _random_uint8(h: int, w: int, seed: int = RNG_SEED) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _scenic_colab_reference(image: np.ndarray, size: int, pad_value: float) -> np.ndarray:
  """Scenic notebook preprocessing with skimage (the reference implementation)."""
  transform = pytest.importorskip("skimage.transform")
  h, w = image.shape[:2]
  m = max(h, w)
  padded = np.full((m, m, 3), pad_value, dtype=np.float32)
  padded[:h, :w] = image.astype(np.float32) / 255.0
  return transform.resize(padded, (size, size), anti_aliasing=True)


# ------------------------------------------------------------------------------------------------
# "colab" recipe vs skimage / HF.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "h, w, size, pad_value",
    [
        (150, 230, 64, 0.5),  # Downsample (anti-aliasing active), landscape.
        (211, 97, 96, 0.5),  # Downsample, portrait.
        (37, 53, 96, 0.5),  # Upsample (no blur).
        (128, 128, 128, 0.5),  # Identity size.
        (90, 61, 48, 0.0),  # Evaluator-style black pad.
        (300, 200, 160, 0.25),
    ],
)
def test_colab_matches_skimage(h, w, size, pad_value):
  image = _random_uint8(h, w, seed=h * w)
  ours = pp.preprocess(image, size, recipe="colab", pad_value=pad_value, exact=True)
  ref = _scenic_colab_reference(image, size, pad_value)
  assert ours.shape == (size, size, 3)
  assert ours.dtype == np.float32
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


def test_colab_default_pad_is_grey():
  image = _random_uint8(40, 100)
  out = pp.preprocess(image, 50, exact=True)
  np.testing.assert_allclose(out, _scenic_colab_reference(image, 50, 0.5), atol=1e-5)
  np.testing.assert_allclose(out[-5:], 0.5, atol=1e-6)  # Bottom rows are padding.


def _hf_owlv2_processor_cls():
  module = pytest.importorskip("transformers.models.owlv2.image_processing_pil_owlv2")
  return module.Owlv2ImageProcessorPil


@pytest.mark.parametrize("h, w, size", [(150, 230, 64), (97, 211, 96), (37, 53, 80)])
def test_colab_matches_hf_owlv2_processor(h, w, size):
  """HF Owlv2ImageProcessor (numpy/PIL backend, pads with 0.0 since HF PR #41938)."""
  cls = _hf_owlv2_processor_cls()
  proc = cls(do_normalize=False, do_rescale=True, size={"height": size, "width": size})
  image = _random_uint8(h, w, seed=h + w)
  hf = proc(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  ours = pp.preprocess(image, size, recipe="colab", pad_value=0.0, exact=True)
  np.testing.assert_allclose(ours, hf, rtol=0, atol=1e-5)


def test_colab_matches_hf_owlv2_processor_grey_pad():
  cls = _hf_owlv2_processor_cls()

  class GreyPad(cls):

    def pad(self, image, constant_value=0.0):
      del constant_value
      return super().pad(image, constant_value=0.5)

  proc = GreyPad(do_normalize=False, size={"height": 72, "width": 72})
  image = _random_uint8(120, 70)
  hf = proc(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  np.testing.assert_allclose(pp.preprocess(image, 72, exact=True), hf, rtol=0, atol=1e-5)


@pytest.mark.parametrize("h, w, size", [(700, 300, 64), (40, 900, 48), (301, 1207, 96)])
def test_colab_exact_matches_skimage_strong_downscale(h, w, size):
  """max(H, W) >= 4 * size: wide Gaussians, several taps per output; the exact path is unchanged."""
  image = _random_uint8(h, w, seed=h + 7 * w)
  ours = pp.preprocess(image, size, exact=True)
  np.testing.assert_allclose(ours, _scenic_colab_reference(image, size, 0.5), rtol=0, atol=1e-5)


def test_colab_exact_matches_padded_reference_edge_cases():
  """The separable operator vs the literal padded recipe, incl. 1-pixel images, sizes 1-2,
  upsampling and kernels wider than the image (several mirror reflections)."""
  rng = np.random.default_rng(0)
  cases = [
      (1, 1, 1),
      (1, 1, 5),
      (2, 1, 1),
      (1, 7, 1),
      (3, 2, 1),
      (5, 9, 2),
      (13, 4, 3),
      (1, 300, 7),
      (300, 1, 7),
      (65, 3, 16),
      (2, 2, 9),
      (9, 1, 2),
      (120, 80, 3),
  ]
  cases += [
      tuple(int(v) for v in rng.integers(1, 200, 2)) + (int(rng.integers(1, 90)),)
      for _ in range(12)
  ]
  for h, w, size in cases:
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    for pad_value in (0.5, 0.0, 0.9):
      ours = pp.preprocess(image, size, pad_value=pad_value, exact=True)
      ref = pp._colab_padded_reference(image, size, pad_value)  # pylint: disable=protected-access
      np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5, err_msg=f"{h}x{w} -> {size}")


@pytest.mark.parametrize(
    "h, w, size", [(150, 230, 64), (211, 97, 96), (383, 100, 96), (37, 53, 96)]
)
def test_colab_fast_equals_exact_below_4x(h, w, size):
  """No pre-reduction while max(H, W) < 4 * size: the default path is the exact one."""
  assert pp._colab_cell_size(max(h, w), size) == 1  # pylint: disable=protected-access
  image = _random_uint8(h, w, seed=3)
  np.testing.assert_array_equal(pp.preprocess(image, size), pp.preprocess(image, size, exact=True))


@pytest.mark.parametrize("cell", [2, 3, 5])
@pytest.mark.parametrize(
    "partial_first", [(False, False), (True, False), (False, True), (True, True)]
)
def test_colab_cells_exact_for_cell_constant_images(cell, partial_first):
  """Summing the reference weights over each cell is exact when the image is constant on cells,
  including an incomplete first or last cell and padding on either axis."""
  rng = np.random.default_rng(cell)
  for h, w, size in [(97, 61, 9), (23, 160, 13), (200, 199, 20)]:
    offsets = [(-n) % cell if first else 0 for n, first in zip((h, w), partial_first)]
    n_cells = [-(-(n + off) // cell) for n, off in zip((h, w), offsets)]
    cells = rng.integers(0, 256, (*n_cells, 3), dtype=np.uint8)
    rows = (np.arange(h) + offsets[0]) // cell
    cols = (np.arange(w) + offsets[1]) // cell
    full = cells[rows][:, cols]
    ours = pp._colab_resize(  # pylint: disable=protected-access
        cells, (h, w), size, 0.5, cell, partial_first
    )
    ref = pp._colab_padded_reference(full, size, 0.5)  # pylint: disable=protected-access
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5, err_msg=f"{h}x{w} -> {size}")


def test_colab_fast_close_to_exact_on_noise():
  """Worst case for cells (independent random pixels); measured max 0.021, mean 0.0028."""
  image = _random_uint8(600, 410, seed=11)
  fast = pp.preprocess(image, 64)
  assert pp._colab_cell_size(600, 64) == 4  # pylint: disable=protected-access
  diff = np.abs(fast - pp.preprocess(image, 64, exact=True))
  assert diff.max() < 0.05 and diff.mean() < 0.006, (diff.max(), diff.mean())


# ------------------------------------------------------------------------------------------------
# "evaluator" recipe.
# ------------------------------------------------------------------------------------------------


def test_tf_bilinear_hand_computed():
  # Half-pixel centres: sources -0.25, 0.25, 0.75, 1.25 -> 0, 0.25, 0.75, 1 (edges clamp).
  row = np.array([[[0.0], [1.0]]], dtype=np.float32)
  out = pp._resize_tf_bilinear(row, 1, 4)  # pylint: disable=protected-access
  np.testing.assert_allclose(out[0, :, 0], [0.0, 0.25, 0.75, 1.0], atol=1e-7)


@pytest.mark.parametrize(
    "in_hw, out_hw", [((50, 80), (31, 49)), ((20, 30), (64, 96)), ((33, 17), (40, 10))]
)
def test_tf_bilinear_matches_torch(in_hw, out_hw):
  """torch bilinear (align_corners=False, no antialias) uses the same half-pixel rule as TF."""
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(0).random(in_hw + (3,), dtype=np.float32)
  ours = pp._resize_tf_bilinear(x, *out_hw)  # pylint: disable=protected-access
  ref = (
      torch.nn.functional.interpolate(
          torch.from_numpy(x).permute(2, 0, 1)[None],
          size=out_hw,
          mode="bilinear",
          align_corners=False,
          antialias=False,
      )[0]
      .permute(1, 2, 0)
      .numpy()
  )
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "h, w, size, expected",
    [
        (120, 200, 768, (460, 768)),
        (200, 120, 768, (768, 460)),
        (480, 640, 768, (576, 768)),
        (500, 500, 768, (768, 768)),
        (120, 200, 160, (96, 160)),
        (1, 5000, 768, (1, 768)),  # Clamped to 1 instead of a zero-size resize.
    ],
)
def test_evaluator_fit_size(h, w, size, expected):
  assert pp.evaluator_fit_size(h, w, size) == expected


def test_evaluator_layout_and_values():
  image = _random_uint8(60, 100)
  out = pp.preprocess(image, 50, recipe="evaluator")
  assert out.shape == (50, 50, 3) and out.dtype == np.float32
  assert (out[30:] == 0.0).all()  # Black padding below the 30x50 resized image.
  x = image.astype(np.float32) / 255.0
  resized = pp._resize_tf_bilinear(x, 30, 50)  # pylint: disable=protected-access
  np.testing.assert_allclose(out[:30], resized)
  grey = pp.preprocess(image, 50, recipe="evaluator", pad_value=0.5)
  assert (grey[30:] == 0.5).all()
  np.testing.assert_array_equal(grey[:30], out[:30])


@pytest.mark.parametrize(
    "h, w, size", [(60, 100, 50), (1000, 31, 96), (31, 1000, 96), (37, 53, 96)]
)
def test_evaluator_uint8_gather_is_bit_identical(h, w, size):
  """Gathering uint8 pixels before the float conversion changes nothing (and bounds memory)."""
  image = _random_uint8(h, w, seed=h)
  fit_h, fit_w = pp.evaluator_fit_size(h, w, size)
  as_float = image.astype(np.float32) / np.float32(255.0)
  expected = pp._resize_tf_bilinear(as_float, fit_h, fit_w)  # pylint: disable=protected-access
  out = pp.preprocess(image, size, recipe="evaluator")
  np.testing.assert_array_equal(out[:fit_h, :fit_w], expected)
  np.testing.assert_array_equal(pp.preprocess(image, size, recipe="evaluator", exact=True), out)


def test_evaluator_same_size_is_identity():
  image = _random_uint8(32, 32)
  out = pp.preprocess(image, 32, recipe="evaluator")
  np.testing.assert_array_equal(out, image.astype(np.float32) / 255.0)


def test_preprocess_argument_errors():
  image = _random_uint8(10, 10)
  with pytest.raises(ValueError, match="recipe"):
    pp.preprocess(image, 32, recipe="stretch")
  with pytest.raises(ValueError, match="size"):
    pp.preprocess(image, 0)
  with pytest.raises(ValueError, match="pad_value"):
    pp.preprocess(image, 32, pad_value=float("nan"))
  with pytest.raises(ValueError, match="empty"):
    pp.preprocess(np.zeros((0, 5, 3), np.uint8), 32)


def test_preprocess_batch_and_path(tmp_path):
  a, b = _random_uint8(30, 50), _random_uint8(70, 20, seed=5)
  path = tmp_path / "b.png"
  Image.fromarray(b).save(path)
  batch = pp.preprocess_batch([a, str(path)], 40, recipe="evaluator")
  assert batch.shape == (2, 40, 40, 3) and batch.dtype == np.float32
  np.testing.assert_array_equal(batch[0], pp.preprocess(a, 40, recipe="evaluator"))
  np.testing.assert_array_equal(batch[1], pp.preprocess(b, 40, recipe="evaluator"))
  stacked = pp.preprocess_batch(np.stack([a, a]), 40)
  assert stacked.shape == (2, 40, 40, 3)
  assert pp.preprocess_batch([], 40).shape == (0, 40, 40, 3)


# ------------------------------------------------------------------------------------------------
# Geometry: a drawn box survives preprocessing + box mapping.
# ------------------------------------------------------------------------------------------------


def _find_box_normalized(out: np.ndarray, threshold: float = 0.75) -> np.ndarray:
  """Returns the (cx, cy, w, h) of the bright region of `out`, normalised to its side."""
  mask = out.mean(axis=-1) > threshold
  rows = np.nonzero(mask.any(axis=1))[0]
  cols = np.nonzero(mask.any(axis=0))[0]
  size = out.shape[0]
  x0, x1 = cols[0], cols[-1] + 1
  y0, y1 = rows[0], rows[-1] + 1
  return np.array([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]) / size


@pytest.mark.parametrize("recipe", ["colab", "evaluator"])
@pytest.mark.parametrize(
    "h, w, box_xyxy, size",
    [
        (120, 200, (50, 30, 150, 70), 256),  # Upsampling.
        (120, 200, (50, 30, 150, 70), 160),  # Downsampling.
        (200, 120, (10, 120, 100, 190), 96),  # Portrait, box near the bottom.
    ],
)
def test_box_roundtrip_geometry(recipe, h, w, box_xyxy, size):
  image = np.zeros((h, w, 3), np.uint8)
  x0, y0, x1, y1 = box_xyxy
  image[y0:y1, x0:x1] = 255
  out = pp.preprocess(image, size, recipe=recipe)
  found = _find_box_normalized(out)
  mapped = pp.boxes_cxcywh_to_pixels_xyxy(found, (h, w))
  # One output pixel spans max(h, w) / size original pixels; allow that plus 1 px.
  tol = 1.0 + pp.padded_size(h, w) / size
  np.testing.assert_allclose(mapped, box_xyxy, atol=tol)


def test_recipes_agree_geometrically():
  """Resize-then-pad (evaluator) and pad-then-resize (colab) put the box at the same place."""
  image = np.zeros((120, 200, 3), np.uint8)
  image[30:70, 50:150] = 255
  colab = _find_box_normalized(pp.preprocess(image, 400, recipe="colab"))
  evaluator = _find_box_normalized(pp.preprocess(image, 400, recipe="evaluator"))
  np.testing.assert_allclose(colab, evaluator, atol=2.0 / 400)


# ------------------------------------------------------------------------------------------------
# Box helpers.
# ------------------------------------------------------------------------------------------------


def test_boxes_to_pixels_known_values():
  # Image 100 high x 200 wide -> padded square of 200 px.
  boxes = np.array(
      [
          [0.5, 0.25, 1.0, 0.5],  # The whole real image.
          [0.25, 0.25, 0.1, 0.1],
          [0.5, 0.75, 0.2, 0.2],
      ],  # Entirely in the padding (y >= 100).
      dtype=np.float32,
  )
  px = pp.boxes_cxcywh_to_pixels_xyxy(boxes, (100, 200))
  assert px.dtype == np.float32
  np.testing.assert_allclose(px[0], [0, 0, 200, 100], atol=1e-4)
  np.testing.assert_allclose(px[1], [40, 40, 60, 60], atol=1e-4)
  np.testing.assert_allclose(px[2], [80, 100, 120, 100], atol=1e-4)  # Clipped to y = H.


def test_boxes_clip_and_roundtrip():
  rng = np.random.default_rng(3)
  hw = (90, 130)
  x0 = rng.uniform(0, 100, 20)
  y0 = rng.uniform(0, 60, 20)
  xyxy = np.stack([x0, y0, x0 + rng.uniform(1, 30, 20), y0 + rng.uniform(1, 30, 20)], -1)
  cxcywh = pp.pixels_xyxy_to_boxes_cxcywh(xyxy, hw)
  assert cxcywh.dtype == np.float64
  np.testing.assert_allclose(pp.boxes_cxcywh_to_pixels_xyxy(cxcywh, hw), xyxy, atol=1e-9)
  outside = pp.boxes_cxcywh_to_pixels_xyxy(np.array([0.0, 0.0, 4.0, 4.0]), hw)
  np.testing.assert_allclose(outside, [0, 0, 130, 90])


def test_boxes_batched_image_sizes():
  boxes = np.tile(np.array([0.5, 0.5, 0.2, 0.2]), (2, 3, 1))  # (B=2, N=3, 4).
  hw = np.array([[100, 200], [300, 150]])[:, None, :]  # (B, 1, 2).
  px = pp.boxes_cxcywh_to_pixels_xyxy(boxes, hw)
  assert px.shape == (2, 3, 4)
  np.testing.assert_allclose(px[0, 0], [80, 80, 120, 100])  # Scale 200, y clipped to 100.
  np.testing.assert_allclose(px[1, 0], [120, 120, 150, 180])  # Scale 300, x clipped to 150.
  with pytest.raises(ValueError, match="4"):
    pp.boxes_cxcywh_to_pixels_xyxy(np.zeros((3, 5)), (10, 10))
  with pytest.raises(ValueError, match="image_hw"):
    pp.boxes_cxcywh_to_pixels_xyxy(np.zeros((3, 4)), (10, 10, 3))


def test_padded_size():
  assert pp.padded_size(120, 200) == 200
  assert pp.padded_size(300, 7) == 300
  with pytest.raises(ValueError):
    pp.padded_size(0, 5)


# ------------------------------------------------------------------------------------------------
# Image files.
# ------------------------------------------------------------------------------------------------


def test_load_rgb_png_exact(tmp_path):
  image = _random_uint8(31, 47)
  Image.fromarray(image).save(tmp_path / "rgb.png")
  out = pp.load_image(tmp_path / "rgb.png")
  assert out.dtype == np.uint8 and out.shape == (31, 47, 3)
  np.testing.assert_array_equal(out, image)
  with open(tmp_path / "rgb.png", "rb") as f:  # File object input.
    np.testing.assert_array_equal(pp.load_image(f), image)
  data = (tmp_path / "rgb.png").read_bytes()
  np.testing.assert_array_equal(pp.load_image(io.BytesIO(data)), image)


def test_load_grayscale(tmp_path):
  grey = np.random.default_rng(1).integers(0, 256, (20, 30), dtype=np.uint8)
  Image.fromarray(grey, mode="L").save(tmp_path / "grey.png")
  out = pp.load_image(tmp_path / "grey.png")
  assert out.shape == (20, 30, 3)
  for c in range(3):
    np.testing.assert_array_equal(out[..., c], grey)


def test_load_bilevel(tmp_path):
  bits = np.zeros((8, 8), bool)
  bits[:, 4:] = True
  Image.fromarray(bits).save(tmp_path / "bits.png")
  out = pp.load_image(tmp_path / "bits.png")
  assert (out[:, :4] == 0).all() and (out[:, 4:] == 255).all()


def test_load_rgba_composites_on_white(tmp_path):
  rgba = np.zeros((4, 4, 4), np.uint8)
  rgba[0, 0] = (10, 20, 30, 255)  # Opaque: unchanged.
  rgba[0, 1] = (10, 20, 30, 0)  # Transparent: white.
  rgba[0, 2] = (0, 0, 0, 128)  # Half transparent black: mid grey.
  Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
  out = pp.load_image(tmp_path / "rgba.png")
  np.testing.assert_array_equal(out[0, 0], [10, 20, 30])
  np.testing.assert_array_equal(out[0, 1], [255, 255, 255])
  np.testing.assert_array_equal(out[0, 2], [127, 127, 127])


def test_load_rgb_colour_key_transparency(tmp_path):
  rgb = np.zeros((4, 4, 3), np.uint8)
  rgb[:2] = (1, 2, 3)  # The transparent colour key.
  rgb[2:] = (50, 60, 70)
  Image.fromarray(rgb).save(tmp_path / "key.png", transparency=(1, 2, 3))
  out = pp.load_image(tmp_path / "key.png")
  assert (out[:2] == 255).all()
  np.testing.assert_array_equal(out[2:], rgb[2:])


def test_load_la(tmp_path):
  la = np.zeros((3, 3, 2), np.uint8)
  la[..., 0] = 40
  la[0, 0, 1] = 255
  Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
  out = pp.load_image(tmp_path / "la.png")
  np.testing.assert_array_equal(out[0, 0], [40, 40, 40])
  np.testing.assert_array_equal(out[1, 1], [255, 255, 255])


def test_load_palette(tmp_path):
  image = np.zeros((10, 10, 3), np.uint8)
  image[:, :5] = (200, 10, 10)
  image[:, 5:] = (10, 10, 200)
  pal = Image.fromarray(image).quantize(colors=4)
  assert pal.mode == "P"
  pal.save(tmp_path / "pal.png")
  np.testing.assert_array_equal(pp.load_image(tmp_path / "pal.png"), image)
  # Palette with a transparent index: that colour becomes white.
  pal.info["transparency"] = int(np.asarray(pal)[0, 0])
  pal.save(tmp_path / "pal_t.png", transparency=pal.info["transparency"])
  out = pp.load_image(tmp_path / "pal_t.png")
  assert (out[:, :5] == 255).all()
  np.testing.assert_array_equal(out[:, 5:], image[:, 5:])


def test_load_16bit_grey(tmp_path):
  grey16 = np.array([[0, 1000, 0x1234], [0x80FF, 0xFF00, 65535]], dtype=np.uint16)
  Image.fromarray(grey16).save(tmp_path / "g16.png")
  out = pp.load_image(tmp_path / "g16.png")
  np.testing.assert_array_equal(out[..., 0], grey16 >> 8)  # Not clipped at 255.
  np.testing.assert_array_equal(out[..., 0], [[0, 3, 0x12], [0x80, 0xFF, 0xFF]])
  # 32-bit integer ("I") TIFF holding 16-bit data.
  Image.fromarray(grey16.astype(np.int32)).save(tmp_path / "gi.tif")
  np.testing.assert_array_equal(pp.load_image(tmp_path / "gi.tif")[..., 1], grey16 >> 8)


def test_load_cmyk_jpeg(tmp_path):
  cmyk = np.zeros((16, 24, 4), np.uint8)
  cmyk[:, 8:16, 0] = 255  # Cyan.
  cmyk[:, 16:, 3] = 255  # Black.
  Image.frombytes("CMYK", (24, 16), cmyk.tobytes()).save(tmp_path / "cmyk.jpg", quality=95)
  out = pp.load_image(tmp_path / "cmyk.jpg").astype(int)
  assert out.shape == (16, 24, 3)
  np.testing.assert_allclose(out[4, 3], [255, 255, 255], atol=12)
  np.testing.assert_allclose(out[4, 12], [0, 255, 255], atol=12)
  np.testing.assert_allclose(out[4, 20], [0, 0, 0], atol=12)


def test_load_exif_rotated_jpeg(tmp_path):
  stored = np.zeros((40, 64, 3), np.uint8)
  stored[:, :] = (0, 0, 255)  # Blue.
  stored[:16, :] = (255, 0, 0)  # Red band at the top of the stored pixels.
  exif = Image.Exif()
  exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display.
  Image.fromarray(stored).save(tmp_path / "rot.jpg", exif=exif, quality=95, subsampling=0)
  out = pp.load_image(tmp_path / "rot.jpg")
  assert out.shape == (64, 40, 3)  # H and W swapped.
  expected = np.rot90(stored, k=-1)  # Clockwise: the stored top edge becomes the right edge.
  np.testing.assert_allclose(out.astype(int), expected.astype(int), atol=40)
  assert out[32, 35, 0] > 200 and out[32, 35, 2] < 60  # Right side is red.
  assert out[32, 5, 2] > 200 and out[32, 5, 0] < 60  # Left side is blue.


# ------------------------------------------------------------------------------------------------
# Bad inputs.
# ------------------------------------------------------------------------------------------------


def _assert_image_error(path, match):
  with pytest.raises(pp.ImageError, match=match) as info:
    pp.load_image(path)
  message = str(info.value)
  assert path.name in message
  assert "\n" not in message
  assert isinstance(info.value, ValueError)


def test_truncated_jpeg(tmp_path):
  Image.fromarray(_random_uint8(64, 80)).save(tmp_path / "full.jpg", quality=90)
  data = (tmp_path / "full.jpg").read_bytes()
  (tmp_path / "half.jpg").write_bytes(data[: len(data) // 2])
  _assert_image_error(tmp_path / "half.jpg", "truncated")
  assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_png(tmp_path):
  Image.fromarray(_random_uint8(64, 80)).save(tmp_path / "full.png")
  data = (tmp_path / "full.png").read_bytes()
  (tmp_path / "half.png").write_bytes(data[: len(data) // 2])
  _assert_image_error(tmp_path / "half.png", "truncated")


def test_empty_file(tmp_path):
  (tmp_path / "empty.jpg").write_bytes(b"")
  _assert_image_error(tmp_path / "empty.jpg", "empty")


def test_text_file_named_jpg(tmp_path):
  (tmp_path / "notes.jpg").write_text("this is not an image\n")
  _assert_image_error(tmp_path / "notes.jpg", "not a recognised image")


def test_missing_file(tmp_path):
  _assert_image_error(tmp_path / "missing.jpg", "not found")


def test_directory(tmp_path):
  (tmp_path / "folder.png").mkdir()
  _assert_image_error(tmp_path / "folder.png", "directory")


def test_load_image_type_error():
  with pytest.raises(TypeError):
    pp.load_image(12345)


# ------------------------------------------------------------------------------------------------
# Array validation.
# ------------------------------------------------------------------------------------------------


def test_to_uint8_rgb_layouts():
  grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
  np.testing.assert_array_equal(pp.to_uint8_rgb(grey), np.repeat(grey[..., None], 3, -1))
  np.testing.assert_array_equal(pp.to_uint8_rgb(grey[..., None]), np.repeat(grey[..., None], 3, -1))
  rgb = _random_uint8(3, 4)
  assert pp.to_uint8_rgb(rgb) is rgb
  rgba = np.concatenate([rgb, np.full((3, 4, 1), 255, np.uint8)], -1)
  np.testing.assert_array_equal(pp.to_uint8_rgb(rgba), rgb)
  rgba[..., 3] = 0
  assert (pp.to_uint8_rgb(rgba) == 255).all()


def test_to_uint8_rgb_dtypes():
  u16 = np.array([[0, 1000, 0xABCD, 65535]], dtype=np.uint16)
  np.testing.assert_array_equal(pp.to_uint8_rgb(u16)[..., 0], [[0, 3, 0xAB, 255]])
  f = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
  np.testing.assert_array_equal(pp.to_uint8_rgb(f)[..., 2], [[0, 128, 255]])
  np.testing.assert_array_equal(pp.to_uint8_rgb(np.array([[True, False]]))[..., 0], [[255, 0]])
  rgb = _random_uint8(5, 6)
  np.testing.assert_array_equal(pp.to_uint8_rgb(rgb.astype(np.float64) / 255.0), rgb)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((0, 4, 3), np.uint8), "empty"),
        (np.zeros((4, 0), np.uint8), "empty"),
        (np.zeros((4,), np.uint8), "shape"),
        (np.zeros((2, 4, 4, 3), np.uint8), "shape"),
        (np.zeros((4, 4, 2), np.uint8), "channels"),
        (np.zeros((3, 4, 4), np.uint8)[:, :, :2], "channels"),
        (np.full((4, 4, 3), 255.0, np.float32), r"\[0, 1\]"),
        (np.full((4, 4, 3), -0.1, np.float32), r"\[0, 1\]"),
        (np.full((4, 4, 3), np.nan, np.float32), "NaN"),
        (np.zeros((4, 4, 3), np.int64), "dtype"),
    ],
)
def test_to_uint8_rgb_errors(bad, match):
  with pytest.raises(ValueError, match=match):
    pp.to_uint8_rgb(bad)
