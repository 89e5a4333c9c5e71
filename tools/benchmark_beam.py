r"""Per-image time of the Beam crop job (local runner) against the single-process crop CLI.

  python tools/benchmark_beam.py                       # tiny and clip_b32, random weights
  python tools/benchmark_beam.py --models clip_b32 --images 16,48 --batch_size 8

Both commands run as fresh processes on the same JPEGs (`--image_size` pixels, made here), each
twice with different image counts; per-image time is the slope (t(N2) - t(N1)) / (N2 - N1), which
cancels what a run pays once (process start, model set-up, compilation, Beam's pipeline
construction). The table also gives the wall time of the larger run. `RESULT|...` lines are
machine-readable.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]


def make_images(folder: pathlib.Path, count: int, size: tuple[int, int], seed: int = 0) -> None:
  rng = np.random.default_rng(seed)
  folder.mkdir(parents=True, exist_ok=True)
  w, h = size
  for i in range(count):
    image = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
    Image.fromarray(image).resize((w, h)).save(folder / f'img{i:04d}.jpg', quality=90)


def timed(argv: list[str], env: dict[str, str]) -> float:
  start = time.perf_counter()
  result = subprocess.run(
      [sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, check=False
  )
  elapsed = time.perf_counter() - start
  if result.returncode != 0:
    raise RuntimeError(
        f'{" ".join(argv[:3])} failed ({result.returncode}): ' f'{result.stderr[-2000:]}'
    )
  return elapsed


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--models', default='tiny,clip_b32')
  parser.add_argument('--images', default='16,48', help='N1,N2: the two image counts')
  parser.add_argument('--image_size', default='1024x768', help='WxH of the JPEGs')
  parser.add_argument('--batch_size', type=int, default=8)
  args = parser.parse_args()
  n1, n2 = (int(v) for v in args.images.split(','))
  w, h = (int(v) for v in args.image_size.split('x'))
  env = dict(os.environ)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    for n in (n1, n2):
      make_images(root / f'images{n}', n, (w, h))
    for model in args.models.split(','):
      times = {}
      for n in (n1, n2):
        folder = root / f'images{n}'
        cli = [
            '-m',
            'clipcrop_jax.crop',
            '--random-init',
            model,
            '--keyword-pipeline',
            'rules',
            '--image',
            str(folder),
            '--text',
            'a red square',
            '--batch-size',
            str(args.batch_size),
            '--out',
            str(root / f'cli_{model}_{n}'),
        ]
        beam = [
            '-m',
            'clipcrop_jax.crop_beam',
            '--random_init',
            model,
            '--keyword_pipeline',
            'rules',
            '--input',
            str(folder / '*.jpg'),
            '--text',
            'a red square',
            '--batch_size',
            str(args.batch_size),
            '--output',
            str(root / f'beam_{model}_{n}'),
            '--runner',
            'DirectRunner',
        ]
        times[('cli', n)] = timed(cli, env)
        times[('beam', n)] = timed(beam, env)
        print(
            f'{model} N={n}: cli {times[("cli", n)]:.1f} s, beam {times[("beam", n)]:.1f} s',
            flush=True,
        )
      per = {k: (times[(k, n2)] - times[(k, n1)]) / (n2 - n1) for k in ('cli', 'beam')}
      rows.append(
          (
              model,
              per['cli'],
              per['beam'],
              per['beam'] / per['cli'],
              times[('cli', n2)],
              times[('beam', n2)],
          )
      )
  print(f'\n{w}x{h} JPEGs, batch {args.batch_size}, N = {n1} and {n2} images, random weights\n')
  print('| model | CLI s/image | Beam s/image | Beam / CLI | CLI wall, N2 | Beam wall, N2 |')
  print('|---|---:|---:|---:|---:|---:|')
  for model, cli, beam, ratio, wc, wb in rows:
    print(f'| {model} | {cli:.3f} | {beam:.3f} | {ratio:.2f}x | {wc:.1f} s | {wb:.1f} s |')
  for model, cli, beam, ratio, wc, wb in rows:
    print(
        f'RESULT|beam_vs_cli|{model}|cli_s_per_image={cli:.4f}|beam_s_per_image={beam:.4f}|'
        f'ratio={ratio:.3f}|cli_wall={wc:.1f}|beam_wall={wb:.1f}'
    )
  return 0


if __name__ == '__main__':
  sys.exit(main())
