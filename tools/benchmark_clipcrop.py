"""Crops per second with `ClipCropper` (random weights), for 1 and 10 queries per image.

  python tools/benchmark_clipcrop.py                       # B/32 @ 768 px, paper-size decoder
  python tools/benchmark_clipcrop.py --owlvit tiny --rounds 3

"1 query": encode one image and crop it to one text. "10 queries": encode one image once and crop
it to 10 different texts (the encoding is reused, so only text encoder + decoder run per query).
The baseline measured in the same run is the naive use, re-encoding the image for every query;
the printed ratio is naive time / reuse time. Keyword extraction uses the rule-based extractor
(`--keywords spacy` for the spaCy pipeline). Timings exclude the first (compiling) call.
"""

from __future__ import annotations

import argparse
import statistics
import time

from clipcrop_jax import cropper as cropper_lib
from clipcrop_jax import model as model_lib
from clipcrop_jax import keywords as keywords_lib
from clipcrop_jax.owlvit import detect

TEXTS = ['a woman and three dogs on the boat', 'a red car', 'two people on a bench',
         'the lighthouse', 'a cat on a sofa', 'children playing football', 'a bowl of fruit',
         'the mountain at sunset', 'a man skiing on the mountainside', 'a cup of coffee']


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--owlvit', default='clip_b32')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--keywords', choices=['rules', 'spacy'], default='rules')
  args = parser.parse_args()

  config = model_lib.ClipCropConfig(owlvit=args.owlvit, mode='full')
  pipeline = keywords_lib.DEFAULT_PIPELINE if args.keywords == 'spacy' else keywords_lib.RULES
  cropper = cropper_lib.ClipCropper.init_random(config, keyword_pipeline=pipeline)
  image = detect.demo_image(600, 900)
  print(f'ClipCrop on {args.owlvit} ({config.owlvit_config.image_size} px), decoder '
        f'{config.decoder_layers}x{config.decoder_width}, {config.num_queries} queries')

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
  print(f"10 queries/image: {med['ten_reuse']:.2f} s/image ({10 / med['ten_reuse']:.2f} requests/s)"
        f" vs re-encoding {med['ten_naive']:.2f} s: {med['ten_naive'] / med['ten_reuse']:.2f}x")


if __name__ == '__main__':
  main()
