"""Training input pipeline throughput vs. the ClipCrop forward pass (random weights, CPU or device).

  python tools/benchmark_input_pipeline.py                    # 768 px, batch 8, B/32 forward
  python tools/benchmark_input_pipeline.py --threads 2 --batches 10 --owlvit tiny

The pipeline reads synthetic in-memory examples: random 600 x 900 JPEG-encoded images (smooth noise,
so they compress like photos) with ~90 crops each, decoded inside the pipeline, then the full
training path (colour jitter, flip, pad + resize, mosaic 1/2x2/3x3, batch). Throughput is measured
after `--warmup` batches. The model side is a jit-compiled `ClipCrop.__call__` forward at batch
`--model-batch` (1 on CPU; the per-example time is assumed to scale linearly). The printed ratio
(pipeline examples/s / model examples/s) should be >= 2 for the real training step; the forward pass
alone underestimates the step time (no backward, no optimizer), so the ratio printed is a lower
bound on the true headroom when both run on the same host CPU.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import tensorflow as tf

from clipcrop_jax.data import input_pipeline as ip


def synthetic_dataset(
    num: int, height: int, width: int, num_crops: int, seed: int = 0
) -> tf.data.Dataset:
  rng = np.random.default_rng(seed)
  images, boxes, scores = [], [], []
  for _ in range(num):
    small = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
    image = tf.image.resize(small, (height, width), method='bilinear').numpy().astype(np.uint8)
    images.append(tf.io.encode_jpeg(image, quality=90).numpy())
    y0, x0 = rng.uniform(0, 0.4, (2, num_crops))
    y1, x1 = y0 + rng.uniform(0.5, 0.6, num_crops), x0 + rng.uniform(0.5, 0.6, num_crops)
    boxes.append(np.stack([y0, x0, y1, x1], -1).astype(np.float32))
    scores.append(rng.uniform(1, 5, num_crops).astype(np.float32))
  return tf.data.Dataset.from_tensor_slices(
      {
          'image': images,
          'image/filename': [f'{i}.jpg' for i in range(num)],
          'height': np.full(num, height, np.int32),
          'width': np.full(num, width, np.int32),
          'text': ['a woman and three dogs on the boat'] * num,
          'crops': {'bbox': np.stack(boxes), 'score': np.stack(scores)},
      }
  )


def bench_pipeline(args) -> float:
  ds = synthetic_dataset(args.num_images, 600, 900, args.crops)
  ds = ip.make_train_dataset(
      ds,
      image_size=args.size,
      batch_size=args.batch,
      max_crops=96,
      seed=0,
      shuffle_buffer=args.num_images,
      mosaic_probs=tuple(float(p) for p in args.mosaic_probs.split(',')),
  )
  options = tf.data.Options()
  options.threading.private_threadpool_size = args.threads
  ds = ds.with_options(options)
  it = iter(ds)
  for _ in range(args.warmup):
    next(it)
  t0 = time.perf_counter()
  for _ in range(args.batches):
    next(it)
  dt = time.perf_counter() - t0
  return args.batches * args.batch / dt


def bench_model(args) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from clipcrop_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.owlvit import tokenizer  # pylint: disable=g-import-not-at-top

  config = model_lib.ClipCropConfig(owlvit=args.owlvit, mode='main')
  size = config.owlvit_config.image_size
  variables = model_lib.init_variables(config, seed=0)
  module = model_lib.ClipCrop(config)
  images = jnp.full((args.model_batch, size, size, 3), 0.5, jnp.float32)
  text = jnp.asarray(
      np.tile(
          tokenizer.tokenize(['a woman and three dogs on the boat'])[None], (args.model_batch, 1, 1)
      )
  )
  extent = jnp.ones((args.model_batch, 2), jnp.float32)
  forward = jax.jit(lambda v, x, t, e: module.apply(v, x, t, image_extent=e)['pred_boxes'])
  forward(variables, images, text, extent).block_until_ready()  # compile
  times = []
  for _ in range(args.model_rounds):
    t0 = time.perf_counter()
    forward(variables, images, text, extent).block_until_ready()
    times.append(time.perf_counter() - t0)
  print(
      f'model: ClipCrop {args.owlvit} ({size} px) forward, batch {args.model_batch}: '
      f'{np.median(times) * 1e3:.0f} ms on {jax.devices()[0].platform}'
  )
  return args.model_batch / float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--size', type=int, default=768)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--threads', type=int, default=2, help='tf.data private thread pool')
  parser.add_argument('--num-images', type=int, default=32)
  parser.add_argument('--crops', type=int, default=90)
  parser.add_argument(
      '--mosaic-probs',
      default='0.3333,0.3333,0.3333',
      help='1x1,2x2,3x3 weights ("1,0,0": single images, the slowest case)',
  )
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--batches', type=int, default=10)
  parser.add_argument('--owlvit', default='clip_b32')
  parser.add_argument('--model-batch', type=int, default=1)
  parser.add_argument('--model-rounds', type=int, default=3)
  parser.add_argument('--skip-model', action='store_true')
  args = parser.parse_args()

  pipe = bench_pipeline(args)
  print(
      f'pipeline: {pipe:.1f} examples/s ({args.size} px, batch {args.batch}, '
      f'{args.threads} tf.data threads, 600x900 JPEG, {args.crops} crops, mosaic probs '
      f'{args.mosaic_probs})'
  )
  if args.skip_model:
    return
  model = bench_model(args)
  print(
      f'model forward: {model:.2f} examples/s (batch {args.model_batch}, linear scaling '
      f'assumed)'
  )
  print(
      f'ratio pipeline / model forward = {pipe / model:.1f} (target >= 2 for the training step; '
      f'forward-only underestimates the step time, so the real ratio is higher)'
  )


if __name__ == '__main__':
  main()
