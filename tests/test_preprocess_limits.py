"""Bounded preprocessing: pixel limit, path loader (JPEG draft, EXIF), fast-vs-exact tolerance on
pixels and on model outputs, and peak memory measured in a fresh subprocess.

Tolerances of the fast "colab" path (default) against the exact one, measured on the real photos
bundled with scikit-image (and stated in README "Preprocessing"):

* pixels (values in [0, 1]), outputs of 64 and 96: max |diff| 0.042, mean 0.0042 (asserted:
  0.06 / 0.006); JPEG files through `load_for_model` (DCT-scaled decoding): 0.030 / 0.0013;
* tiny random OWL-ViT (S = 96; its zero-initialised box head randomised): pred_boxes max |diff|
  0.0069 of the padded square side (asserted: 0.015), pred_logits max |diff| 0.075 (asserted:
  0.15). For scale: re-encoding the same photos as JPEG q95 moves boxes by 0.0002-0.006 and
  logits by up to 0.024.
"""

# pylint: disable=protected-access

from __future__ import annotations

import json
import os
import pathlib
import struct
import subprocess
import sys
import warnings
import zlib

import numpy as np
from PIL import Image
from PIL import ImageFile
from PIL import JpegImagePlugin
import pytest

from clipcrop_jax.owlvit import preprocessing as pp

PREPROCESSING_PY = pathlib.Path(pp.__file__)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
  return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _write_bilevel_png(path: pathlib.Path, width: int, height: int) -> None:
  """An all-black 1-bit PNG written row by row (a 12000 x 12000 one is ~17 KB, 144 MP decoded)."""
  row = b"\x00" * (1 + (width + 7) // 8)  # Filter byte 0, then packed bits.
  packer = zlib.compressobj(9)
  idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
  ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
  path.write_bytes(
      b"\x89PNG\r\n\x1a\n"
      + _png_chunk(b"IHDR", ihdr)
      + _png_chunk(b"IDAT", idat)
      + _png_chunk(b"IEND", b"")
  )


def _photo(name: str) -> np.ndarray:
  """A real photo bundled with scikit-image (astronaut 512x512, coffee 400x600, ...)."""
  skimage = pytest.importorskip("skimage")
  return pp.load_image(pathlib.Path(skimage.__file__).parent / "data" / name)


def _save(array: np.ndarray, path: pathlib.Path, orientation: int = 1, **kwargs) -> pathlib.Path:
  exif = Image.Exif()
  if orientation != 1:
    exif[0x0112] = orientation
  Image.fromarray(array).save(path, exif=exif, **kwargs)
  return path


# ------------------------------------------------------------------------------------------------
# Pixel limit.
# ------------------------------------------------------------------------------------------------


def test_max_pixels_default_env_and_argument(monkeypatch):
  monkeypatch.delenv(pp.MAX_PIXELS_ENV, raising=False)
  assert pp.max_pixels_limit() == pp.DEFAULT_MAX_PIXELS == 120_000_000
  for raw, value in [
      ("200000000", 200_000_000),
      ("2e8", 200_000_000),
      (" 1_000 ", 1000),
      ("", pp.DEFAULT_MAX_PIXELS),
  ]:
    monkeypatch.setenv(pp.MAX_PIXELS_ENV, raw)
    assert pp.max_pixels_limit() == value
  assert pp.max_pixels_limit(5) == 5  # The argument wins over the environment.


@pytest.mark.parametrize("raw", ["lots", "0", "-3", "1.5", "nan", "1e400"])
def test_max_pixels_malformed_env(monkeypatch, tmp_path, raw):
  monkeypatch.setenv(pp.MAX_PIXELS_ENV, raw)
  with pytest.raises(ValueError, match=pp.MAX_PIXELS_ENV):
    pp.max_pixels_limit()
  path = _save(np.zeros((4, 4, 3), np.uint8), tmp_path / "a.png")
  with pytest.raises(ValueError, match=pp.MAX_PIXELS_ENV):
    pp.load_image(path)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "100"])
def test_max_pixels_bad_argument(bad):
  with pytest.raises(ValueError, match="max_pixels"):
    pp.max_pixels_limit(bad)


def test_pixel_limit_is_configurable(tmp_path, monkeypatch):
  monkeypatch.delenv(pp.MAX_PIXELS_ENV, raising=False)
  path = _save(np.full((20, 30, 3), 9, np.uint8), tmp_path / "small.png")  # 600 pixels.
  assert pp.load_image(path, max_pixels=600).shape == (20, 30, 3)
  for load in (pp.load_image, lambda p, **kw: pp.load_for_model(p, 8, **kw)):
    with pytest.raises(pp.ImageError, match="30x20") as info:
      load(path, max_pixels=599)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)
  monkeypatch.setenv(pp.MAX_PIXELS_ENV, "599")
  with pytest.raises(pp.ImageError, match="above the decoding limit"):
    pp.preprocess(path, 8)
  assert pp.load_for_model(path, 8, max_pixels=600)[1] == (20, 30)


@pytest.fixture(scope="module")
def huge_bilevel_png(tmp_path_factory):
  path = tmp_path_factory.mktemp("bomb") / "huge_1bit.png"
  _write_bilevel_png(path, 12000, 12000)
  return path


def test_huge_image_refused_from_header(huge_bilevel_png, monkeypatch):
  """12000 x 12000 (144 MP, a 17 KB file) is refused by default, before anything is decoded."""
  monkeypatch.delenv(pp.MAX_PIXELS_ENV, raising=False)
  assert huge_bilevel_png.stat().st_size < 40_000

  def no_decoding(self):
    raise AssertionError("the image was decoded")

  monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
  calls = [
      pp.load_image,
      lambda p: pp.load_for_model(p, 768),
      lambda p: pp.preprocess(p, 768),
      lambda p: pp.preprocess(p, 768, exact=True),
      lambda p: pp.preprocess(p, 768, recipe="evaluator"),
  ]
  for call in calls:
    with pytest.raises(pp.ImageError) as info:
      call(huge_bilevel_png)
    message = str(info.value)
    assert message.startswith(str(huge_bilevel_png)) and "\n" not in message
    for part in (
        "12000x12000",
        "144.0 MP",
        "120.0 MP",
        "max_pixels=144000000",
        f"{pp.MAX_PIXELS_ENV}=144000000",
    ):
      assert part in message, (part, message)


def test_our_limit_decides_not_pillows(tmp_path, monkeypatch):
  """Pillow's bomb warning is silenced and its error replaced: only `max_pixels` decides."""
  monkeypatch.delenv(pp.MAX_PIXELS_ENV, raising=False)
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow: warn > 100, error > 200 pixels.
  image = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
  big = _save(image, tmp_path / "big.png")  # 1200 pixels: Pillow alone would refuse it.
  medium = _save(image[:10, :12], tmp_path / "medium.png")  # 120 pixels: Pillow alone would warn.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    np.testing.assert_array_equal(pp.load_image(big), image)
    np.testing.assert_array_equal(pp.load_image(medium), image[:10, :12])
    pixels, hw = pp.load_for_model(big, 16)
    assert hw == (30, 40) and pixels.shape == (16, 16, 3)
  assert Image.MAX_IMAGE_PIXELS == 100  # Restored.
  with pytest.raises(pp.ImageError, match=r"40x30 = 0\.0 MP, above the decoding limit"):
    pp.load_image(big, max_pixels=1000)


# ------------------------------------------------------------------------------------------------
# load_for_model.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_load_for_model_exif_orientation(tmp_path, orientation):
  rng = np.random.default_rng(orientation)
  # k = 1 (max side < 4 * size): must equal the exact path on the EXIF-transposed image.
  path = _save(
      rng.integers(0, 256, (45, 70, 3), dtype=np.uint8), tmp_path / "small.png", orientation
  )
  loaded = pp.load_image(path)
  assert loaded.shape[:2] == ((70, 45) if orientation >= 5 else (45, 70))
  pixels, hw = pp.load_for_model(path, 24)
  assert hw == loaded.shape[:2]
  np.testing.assert_allclose(pixels, pp.preprocess(loaded, 24, exact=True), rtol=0, atol=1e-6)
  # Cells of 4 x 4 stored pixels (50 x 37: the last row and column of cells are incomplete, and the
  # orientation may move them first): exact for content that is constant on those cells.
  cells = rng.integers(0, 256, (13, 10, 3), dtype=np.uint8)
  stored = cells[np.arange(50) // 4][:, np.arange(37) // 4]
  path = _save(stored, tmp_path / "cells.png", orientation)
  assert pp._colab_cell_size(50, 6) == 4
  pixels, hw = pp.load_for_model(path, 6)
  loaded = pp.load_image(path)
  assert hw == loaded.shape[:2]
  np.testing.assert_allclose(pixels, pp.preprocess(loaded, 6, exact=True), rtol=0, atol=1e-5)


def _record_drafts(monkeypatch) -> list:
  scales = []
  original = JpegImagePlugin.JpegImageFile.draft

  def draft(self, mode, size):
    result = original(self, mode, size)
    scales.append(None if result is None else self.decoderconfig[0])
    return result

  monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", draft)
  return scales


@pytest.mark.parametrize("orientation", [1, 6])
def test_load_for_model_jpeg_draft(tmp_path, monkeypatch, orientation):
  photo = _photo("coffee.png")  # 400 x 600.
  path = _save(photo, tmp_path / "coffee.jpg", orientation, quality=92)
  scales = _record_drafts(monkeypatch)
  pixels, hw = pp.load_for_model(path, 64)  # 600 / 64 = 9.4 -> cells of 4 -> DCT scale 1/4.
  assert scales == [4]
  loaded = pp.load_image(path)
  assert hw == loaded.shape[:2] == ((600, 400) if orientation == 6 else (400, 600))
  diff = np.abs(pixels - pp.preprocess(loaded, 64, exact=True))
  assert diff.max() < 0.06 and diff.mean() < 0.003, (diff.max(), diff.mean())
  np.testing.assert_array_equal(pp.preprocess(path, 64), pixels)


def test_load_for_model_recipes_and_exact(tmp_path):
  path = _save(_photo("rocket.jpg"), tmp_path / "rocket.png")
  loaded = pp.load_image(path)
  pixels, hw = pp.load_for_model(path, 96, recipe="evaluator")
  assert hw == (427, 640)
  np.testing.assert_array_equal(pixels, pp.preprocess(loaded, 96, recipe="evaluator"))
  pixels, _ = pp.load_for_model(path, 96, exact=True, pad_value=0.0)
  np.testing.assert_array_equal(pixels, pp.preprocess(loaded, 96, pad_value=0.0, exact=True))
  # Default fast path on a PNG: full decode, then the same cells as for the array.
  np.testing.assert_array_equal(pp.load_for_model(path, 96)[0], pp.preprocess(loaded, 96))


@pytest.mark.parametrize("mode", ["RGBA", "L", "LA", "I;16", "P", "1"])
def test_load_for_model_modes(tmp_path, mode):
  """Modes are converted like `load_image` (alpha over white, 16-bit >> 8) before reduction."""
  photo = _photo("astronaut.png")
  image = Image.fromarray(photo)
  if mode == "RGBA":
    alpha = np.tile(np.linspace(0, 255, 512).astype(np.uint8), (512, 1))
    image = Image.fromarray(np.dstack([photo, alpha]))
  elif mode == "I;16":
    image = Image.fromarray(photo[..., 1].astype(np.uint16) * 257)
  else:
    image = image.convert(mode)
  path = tmp_path / "mode.png"
  image.save(path)
  pixels, hw = pp.load_for_model(path, 96)
  assert hw == (512, 512)
  diff = np.abs(pixels - pp.preprocess(pp.load_image(path), 96, exact=True))
  # Measured max 0.021-0.026, mean <= 0.0025; dithered 1-bit data (all edges) 0.051 / 0.0087.
  max_bound, mean_bound = (0.1, 0.015) if mode == "1" else (0.06, 0.004)
  assert diff.max() < max_bound and diff.mean() < mean_bound, (diff.max(), diff.mean())
  if mode in ("L", "LA", "I;16", "1"):
    np.testing.assert_array_equal(pixels[..., 0], pixels[..., 2])


def test_load_for_model_grey_jpeg_draft(tmp_path, monkeypatch):
  path = tmp_path / "grey.jpg"
  Image.fromarray(_photo("coffee.png")).convert("L").save(path, quality=92)
  scales = _record_drafts(monkeypatch)
  pixels, _ = pp.load_for_model(path, 64)
  assert scales == [4]
  diff = np.abs(pixels - pp.preprocess(pp.load_image(path), 64, exact=True))
  assert diff.max() < 0.06 and diff.mean() < 0.003, (diff.max(), diff.mean())


def test_load_for_model_errors(tmp_path):
  Image.fromarray(_photo("astronaut.png")).save(tmp_path / "full.jpg", quality=90)
  data = (tmp_path / "full.jpg").read_bytes()
  (tmp_path / "half.jpg").write_bytes(data[: len(data) // 2])
  (tmp_path / "notes.jpg").write_text("not an image")
  for name, match in [
      ("half.jpg", "truncated"),
      ("notes.jpg", "not a recognised image"),
      ("missing.jpg", "not found"),
  ]:
    with pytest.raises(pp.ImageError, match=match) as info:
      pp.load_for_model(tmp_path / name, 64)
    assert str(info.value).startswith(str(tmp_path / name)) and "\n" not in str(info.value)
  with pytest.raises(ValueError, match="recipe"):
    pp.load_for_model(tmp_path / "full.jpg", 64, recipe="stretch")
  with pytest.raises(ValueError, match="size"):
    pp.load_for_model(tmp_path / "full.jpg", 0)


# ------------------------------------------------------------------------------------------------
# Fast vs exact: pixels and model outputs.
# ------------------------------------------------------------------------------------------------


def _tolerance_images() -> dict[str, np.ndarray]:
  coffee = _photo("coffee.png")
  rocket = _photo("rocket.jpg")
  return {
      "square 512x512": _photo("astronaut.png"),
      "landscape 400x600": coffee,
      "portrait 600x400": np.ascontiguousarray(coffee.transpose(1, 0, 2)),
      "landscape 500x741": _photo("motorcycle_left.png"),
      "square 1411x1411": _photo("retina.jpg"),
      "thin 40x600": coffee[100:140],
      "thin 427x60": np.ascontiguousarray(rocket[:, 200:260]),
  }


def test_fast_vs_exact_pixels_on_photos():
  for size in (64, 96):
    for name, image in _tolerance_images().items():
      assert pp._colab_cell_size(max(image.shape), size) >= 2, name
      diff = np.abs(pp.preprocess(image, size) - pp.preprocess(image, size, exact=True))
      assert diff.max() < 0.06 and diff.mean() < 0.006, (name, size, diff.max(), diff.mean())


@pytest.mark.slow
def test_fast_vs_exact_model_outputs():
  """Tiny random OWL-ViT on fast vs exact inputs; the zero-initialised box head is randomised so
  that boxes depend on the image. Measured max: boxes 0.0069 of the square side, logits 0.075."""
  jax = pytest.importorskip("jax")
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.owlvit import configs  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.owlvit import model as model_lib  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.owlvit import tokenizer  # pylint: disable=g-import-not-at-top

  config = configs.get_config("tiny")
  module = model_lib.TextZeroShotDetectionModule(config)
  params = traverse_util.flatten_dict(model_lib.init_variables(config, seed=0)["params"])
  key = ("obj_box_head", "Dense_2", "kernel")
  fan_in = params[key].shape[0]
  noise = np.random.default_rng(0).normal(0, fan_in**-0.5, params[key].shape)
  params[key] = noise.astype(np.float32)
  variables = {"params": traverse_util.unflatten_dict(params)}
  images = _tolerance_images()
  size = config.image_size
  fast = np.stack([pp.preprocess(x, size) for x in images.values()])
  exact = np.stack([pp.preprocess(x, size, exact=True) for x in images.values()])
  text = np.stack([tokenizer.tokenize(["a cat", "a cup of coffee", "sky"])] * len(images))
  apply = jax.jit(module.apply)
  out_fast = jax.device_get(apply(variables, fast, text))
  out_exact = jax.device_get(apply(variables, exact, text))
  box_diff = np.abs(out_fast["pred_boxes"] - out_exact["pred_boxes"]).max(axis=(1, 2))
  logit_diff = np.abs(out_fast["pred_logits"] - out_exact["pred_logits"]).max(axis=(1, 2))
  report = dict(zip(images, zip(box_diff.round(4), logit_diff.round(3))))
  assert box_diff.max() < 0.015 and logit_diff.max() < 0.15, report
  assert np.ptp(out_exact["pred_boxes"][..., 0]) > 0.5  # Boxes do depend on the input.


# ------------------------------------------------------------------------------------------------
# Peak memory, in a fresh interpreter that imports only preprocessing.py (not jax): the peak RSS
# increase over the post-import baseline.
# ------------------------------------------------------------------------------------------------

_MEMORY_SCRIPT = """
import importlib.util, json, resource, sys
spec = importlib.util.spec_from_file_location("preprocessing", sys.argv[1])
pp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pp)
import numpy as np
from PIL import Image
Image.init()  # Register all plugins now, so their imports count in the baseline.
def rss_kib(field):
  # Linux: VmHWM is this process's own peak RSS. ru_maxrss is not usable here: after fork + exec
  # it starts at the parent's peak (e.g. pytest with jax loaded), hiding everything below it.
  try:
    with open("/proc/self/status") as f:
      return float(next(l.split()[1] for l in f if l.startswith(field + ":")))
  except (OSError, StopIteration):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform == "darwin" else peak
base = rss_kib("VmRSS")
call, path = sys.argv[2], sys.argv[3]
result = {}
try:
  if call == "fast":
    pixels, hw = pp.load_for_model(path, 768)
    result["hw"] = list(hw)
  elif call == "exact":
    pixels = pp.preprocess(pp.load_image(path), 768, exact=True)
  elif call == "evaluator":
    pixels = pp.preprocess(path, 768, recipe="evaluator")
  result["shape"] = list(pixels.shape)
except pp.ImageError as e:
  result["error"] = str(e)
result["delta_mib"] = (rss_kib("VmHWM") - base) / 1024
print(json.dumps(result))
"""


def _peak_memory(call: str, path: pathlib.Path) -> dict:
  env = dict(os.environ)
  env.pop(pp.MAX_PIXELS_ENV, None)
  proc = subprocess.run(
      [sys.executable, "-c", _MEMORY_SCRIPT, str(PREPROCESSING_PY), call, str(path)],
      capture_output=True,
      text=True,
      timeout=120,
      env=env,
      check=False,
  )
  assert proc.returncode == 0, proc.stderr
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def thin_pngs(tmp_path_factory):
  folder = tmp_path_factory.mktemp("thin")
  rng = np.random.default_rng(0)
  wide = rng.integers(0, 256, (20, 10000, 3), dtype=np.uint8)
  return (
      _save(wide, folder / "wide_10000x20.png"),
      _save(np.ascontiguousarray(wide.transpose(1, 0, 2)), folder / "tall_20x10000.png"),
  )


@pytest.mark.parametrize("call", ["fast", "exact", "evaluator"])
def test_thin_images_bounded_memory(thin_pngs, call):
  """The old padded square made these 10000 x 10000 float32 x 3 (1.2 GB, 2.9 GB peak)."""
  for path in thin_pngs:
    result = _peak_memory(call, path)
    assert result["shape"] == [768, 768, 3], result
    assert result["delta_mib"] < 100, (path.name, result)


def test_huge_bilevel_png_refused_without_decoding_memory(huge_bilevel_png):
  result = _peak_memory("fast", huge_bilevel_png)
  assert "above the decoding limit" in result["error"], result
  assert result["delta_mib"] < 20, result


def test_12mp_jpeg_bounded_memory(tmp_path):
  rng = np.random.default_rng(0)
  rows = np.linspace(0, 200, 3000, dtype=np.float32)[:, None, None]
  cols = np.linspace(0, 50, 4000, dtype=np.float32)[None, :, None]
  noise = rng.integers(0, 6, (3000, 4000, 3), dtype=np.uint8)
  photo = (rows + cols + np.float32([0, 20, 40])).astype(np.uint8) + noise
  path = _save(photo, tmp_path / "photo_12mp.jpg", quality=90)
  del photo, noise
  result = _peak_memory("fast", path)
  assert result["hw"] == [3000, 4000] and result["shape"] == [768, 768, 3], result
  assert result["delta_mib"] < 150, result  # Measured ~50 MiB (decoded at 1/2 scale: 2000x1500).
