"""Crops per second with `ClipCropper` (random weights): batched inference over a folder of JPEGs,
and 1 vs 10 queries per image.

  python tools/benchmark_clipcrop.py                       # B/32 @ 768 px, paper-size decoder
  python tools/benchmark_clipcrop.py --owlvit tiny --rounds 3
  python tools/benchmark_clipcrop.py --mode folder --owlvit tiny,clip_b32 --batch_size 8
  python tools/benchmark_clipcrop.py --mode folder --owlvit clip_b32 --batch_size 64,256 \
      --dtype bfloat16 --images 1024                       # on an accelerator (prints MFU)

`--mode folder` (batched inference): `--images` JPEGs (`--image_size` px, e.g. 4000x3000 for
12-megapixel photos; written once into a temporary folder) are cropped to one text, first one at
a time (`crop(path)` per file: the baseline, measured in the same run), then with
`ClipCropper.iter_crops` (decoding threads ahead of the device, batches of `--batch_size`).
Printed per model: images/s of both and their ratio; on a GPU/TPU also the model FLOP
utilisation (MFU: the encoder + decoder FLOPs of XLA's cost analysis per image times images/s,
over the device's peak, `--peak_tflops` or a table of known devices), and the batched rate from
images already decoded (device + post-processing only).

"1 query": encode one image and crop it to one text. "10 queries": encode one image once and crop
it to 10 different texts (the encoding is reused, so only text encoder + decoder run per query).
The baseline measured in the same run is the naive use, re-encoding the image for every query;
the printed ratio is naive time / reuse time. Keyword extraction uses the rule-based extractor
(`--keywords spacy` for the spaCy pipeline). Timings exclude the first (compiling) call.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import tempfile
import time

import jax
import numpy as np
from PIL import Image

from clipcrop_jax import cropper as cropper_lib
from clipcrop_jax import keywords as keywords_lib
from clipcrop_jax import model as model_lib
from clipcrop_jax.owlvit import detect

TEXTS = [
    'a woman and three dogs on the boat',
    'a red car',
    'two people on a bench',
    'the lighthouse',
    'a cat on a sofa',
    'children playing football',
    'a bowl of fruit',
    'the mountain at sunset',
    'a man skiing on the mountainside',
    'a cup of coffee',
]


# Dense peak TFLOP/s per device kind (bf16 / fp32-with-TF32), for MFU.
PEAK_TFLOPS = {
    'H200': (989.0, 494.0),
    'H100': (989.0, 494.0),
    'A100': (312.0, 156.0),
    'L4': (121.0, 60.0),
    'TPU v4': (275.0, 275.0),
    'TPU v5 lite': (197.0, 197.0),
    'TPU v5p': (459.0, 459.0),
}


def write_jpegs(folder: pathlib.Path, n: int, size: tuple[int, int]) -> list[pathlib.Path]:
  """`n` distinct JPEGs of `size` (W, H): the demo picture, resized and shifted per file."""
  base = Image.fromarray(detect.demo_image(600, 900)).resize(size)
  paths = []
  for i in range(n):
    img = np.roll(np.asarray(base), 37 * i, axis=1)
    paths.append(folder / f'img_{i:05d}.jpg')
    Image.fromarray(img).save(paths[-1], quality=90)
  return paths


def peak_flops(dtype: str, override: float) -> float | None:
  if override:
    return override * 1e12
  dev = jax.devices()[0]
  if dev.platform == 'cpu':
    return None
  for kind, (bf16, f32) in PEAK_TFLOPS.items():
    if kind.lower() in dev.device_kind.lower():
      return (bf16 if dtype == 'bfloat16' else f32) * 1e12
  return None


def model_flops_per_image(cropper, batch: int, text: str) -> float:
  """XLA's FLOP count of one batched encoder + decoder forward, per image."""
  size = cropper.config.owlvit_config.image_size
  pixels = jax.ShapeDtypeStruct((batch, size, size, 3), np.float32)
  enc_fn = lambda v, x: cropper.owl_module.apply(v, x, method=cropper.owl_module.encode_image)
  flops = jax.jit(enc_fn).lower(cropper._owl_variables, pixels).compile().cost_analysis()  # pylint: disable=protected-access
  flops = flops[0] if isinstance(flops, list) else flops
  total = float(flops.get('flops', 0.0))
  request = cropper.check_request(text=text)
  encoded = jax.eval_shape(enc_fn, cropper._owl_variables, pixels)  # pylint: disable=protected-access
  q = jax.ShapeDtypeStruct((batch,) + request.queries.shape[1:], request.queries.dtype)
  m = jax.ShapeDtypeStruct((batch,) + request.query_mask.shape[1:], bool)
  ext = jax.ShapeDtypeStruct((batch, 2), np.float32)
  dec = jax.jit(
      lambda v, e, q, m, x: cropper.module.apply(
          v, e, q, m, None, x, method=cropper.module.crop_from_encoding
      )
  )
  cost = dec.lower(cropper.variables, encoded, q, m, ext).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return (total + float(cost.get('flops', 0.0))) / batch


def run_folder(args) -> None:
  """Batch 1 (the baseline) vs batched `iter_crops` over a folder of JPEGs, per model."""
  dev = jax.devices()[0]
  w, h = (int(v) for v in args.image_size.split('x'))
  print(
      f'{jax.device_count()} x {dev.device_kind} ({dev.platform}), dtype {args.dtype}, '
      f'{args.images} JPEGs of {w}x{h} px, text {TEXTS[0]!r}',
      flush=True,
  )
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    paths = write_jpegs(pathlib.Path(tmp), args.images, (w, h))
    for name in args.owlvit.split(','):
      # 'tiny': the tiny test model (`model.TINY`); an OWL-ViT name: it + the paper's decoder.
      cropper = cropper_lib.ClipCropper.init_random(
          name, keyword_pipeline=keywords_lib.RULES, dtype=args.dtype
      )
      request = dict(text=TEXTS[0], top_k=3)
      cropper.crop(paths[0], **request)  # compile batch 1
      n1 = min(len(paths), args.baseline_images)
      t0 = time.perf_counter()
      for p in paths[:n1]:
        cropper.crop(p, **request)
      one = n1 / (time.perf_counter() - t0)
      for bs in (int(b) for b in args.batch_size.split(',')):
        list(cropper.iter_crops(paths[:bs], batch_size=bs, **request))  # compile
        t0 = time.perf_counter()
        done = sum(r.error is None for r in cropper.iter_crops(paths, batch_size=bs, **request))
        batched = len(paths) / (time.perf_counter() - t0)
        assert done == len(paths), f'{len(paths) - done} images failed'
        # The same, from images already decoded and preprocessed (`ModelInput`s): the device
        # and per-image post-processing alone.
        inputs = [cropper.prepare(p) for p in paths]
        t0 = time.perf_counter()
        list(cropper.iter_crops(inputs, batch_size=bs, **request))
        in_memory = len(paths) / (time.perf_counter() - t0)
        peak = peak_flops(args.dtype, args.peak_tflops)
        mfu = '-'
        if peak:
          flops = model_flops_per_image(cropper, cropper.bucket_size(bs), TEXTS[0])
          mfu = f'{100 * flops * batched / peak:.1f}%'
        rows.append(
            f'{name:10s} {bs:5d} {one:10.2f} {batched:12.2f} {batched / one:7.2f}x '
            f'{mfu:>6s} {in_memory:11.2f}'
        )
        print(rows[-1], flush=True)
        # One machine-readable line for tools/gpu_check.sh's table: RESULT|what|value|unit|baseline.
        print(
            f'RESULT|crops/s {name} {args.dtype} batch {bs}, {w}x{h} JPEGs|{batched:.1f}|img/s|'
            f'batch-1 {one:.1f} img/s ({batched / one:.2f}x), MFU {mfu}, pre-decoded '
            f'{in_memory:.1f} img/s',
            flush=True,
        )
  print(
      f'{"model":10s} {"batch":>5s} {"batch-1/s":>10s} {"batched/s":>12s} {"ratio":>8s} '
      f'{"MFU":>6s} {"decoded/s":>11s}'
  )
  print('\n'.join(rows))
  print(
      'images/s over the whole folder (decode + encoder + decoder + NMS); batch-1 = crop(path) '
      'per file, the baseline measured in the same run; decoded/s = batched from images '
      'already decoded and preprocessed (device + post-processing only).'
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--mode', choices=['queries', 'folder'], default='queries')
  parser.add_argument('--owlvit', default='clip_b32', help='comma-separated for --mode folder')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--keywords', choices=['rules', 'spacy'], default='rules')
  parser.add_argument('--batch_size', default='8', help='comma-separated (--mode folder)')
  parser.add_argument('--images', type=int, default=32, help='JPEGs in the folder')
  parser.add_argument(
      '--baseline_images',
      type=int,
      default=16,
      help='images the batch-1 baseline crops (its images/s is a rate)',
  )
  parser.add_argument('--image_size', default='4000x3000', help='WxH of the JPEGs (12 MP)')
  parser.add_argument('--dtype', choices=['float32', 'bfloat16'], default='float32')
  parser.add_argument(
      '--peak_tflops',
      type=float,
      default=0.0,
      help='device peak for MFU (default: known devices; none on CPU)',
  )
  args = parser.parse_args()
  if args.mode == 'folder':
    run_folder(args)
    return

  config = model_lib.ClipCropConfig(owlvit=args.owlvit, mode='full')
  pipeline = keywords_lib.DEFAULT_PIPELINE if args.keywords == 'spacy' else keywords_lib.RULES
  cropper = cropper_lib.ClipCropper.init_random(config, keyword_pipeline=pipeline)
  image = detect.demo_image(600, 900)
  print(
      f'ClipCrop on {args.owlvit} ({config.owlvit_config.image_size} px), decoder '
      f'{config.decoder_layers}x{config.decoder_width}, {config.num_queries} queries'
  )

  def one():
    cropper.crop(image, text=TEXTS[0])

  def ten_reuse():
    enc = cropper.encode(image)
    for t in TEXTS:
      cropper.crop(enc, text=t)

  def ten_naive():
    for t in TEXTS:
      cropper.crop(image, text=t)

  for t in TEXTS:  # compile every query-count shape once
    cropper.crop(image, text=t)
  times = {'one': [], 'ten_reuse': [], 'ten_naive': []}
  for r in range(args.rounds):
    for name, fn in [('one', one), ('ten_reuse', ten_reuse), ('ten_naive', ten_naive)]:
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
    print(f'round {r}: ' + ', '.join(f'{k} {v[-1]:.2f}s' for k, v in times.items()), flush=True)
  med = {k: statistics.median(v) for k, v in times.items()}
  print(f"1 query/image:   {med['one']:.2f} s/image  ({1 / med['one']:.2f} requests/s)")
  print(
      f"10 queries/image: {med['ten_reuse']:.2f} s/image ({10 / med['ten_reuse']:.2f} requests/s)"
      f" vs re-encoding {med['ten_naive']:.2f} s: {med['ten_naive'] / med['ten_reuse']:.2f}x"
  )


if __name__ == '__main__':
  main()
