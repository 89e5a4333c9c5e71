r"""Training throughput: the jitted train step alone vs. the step fed by the real input pipeline.

  python tools/benchmark_train.py --data_dir /tmp/data                      # tiny + B/32 (CPU)
  python tools/benchmark_train.py --data_dir /tmp/data --models b32 --batch_size 32 \
      --steps 20 --dtype bfloat16                                           # on an accelerator
  python tools/benchmark_train.py --synthetic --models b32 --batch_size 8,32 --steps 20
                                      # step only, no tf.data / TensorFlow / dataset needed
  python tools/benchmark_train.py --setup --models b32   # set-up time from OWL-ViT weights

Models: `tiny` (configs/tiny.py) and `b32` (configs/gaic_b32.py, the paper's B/32 + 6-layer
decoder; random weights). Both read the synthetic dataset `synthetic_crops/<--dataset>` prepared in
`--data_dir` (built there with `python -m clipcrop_jax.build_dataset datasets/synthetic` when
missing; the pipeline resizes the images to the model's input size), through
`train_lib.make_train_iterator` (augmentation, mosaics, keywords) exactly as in training.

Per model, after compiling, three timings of `--steps` steps each:
  step only      `train_step` on one cached batch (the baseline);
  step + input   `next(iterator)` then the step, as the training loop does (dispatch is
                 asynchronous, so input preparation overlaps the previous step);
  input only     `next(iterator)` alone.
Printed: examples/s of each, the ratio to the step-only baseline of the same run, and the
input-wait fraction (time blocked in `next` / wall time of step + input). On CPU the input
pipeline and the step share the cores, so the wait is pessimistic for an accelerator run.

`--setup`: the set-up time of a run that starts from pretrained OWL-ViT weights (a random
checkpoint of the model's OWL-ViT written first, untimed), from the config to the first usable
train state, two ways in the same process: "full init" (the way before issue 12: a random init
of the whole model, OWL-ViT included, then the loaded encoder put in its place) and
"decoder only" (`trainer.fresh_state`: the loaded encoder and a decoder initialised alone, with
the values the full init gives it). Prints both and their ratio; checks that both states have
identical parameters.

`--synthetic`: the step-only timing alone, on a fixed random batch of the training shapes (no
dataset, tf.data or TensorFlow import), per model and per `--batch_size` (comma-separated list);
prints steps/s, examples/s, compile time, the loss of the first and last step, and the device's
peak memory (`memory_stats()['peak_bytes_in_use']`, process-wide so far: run batch sizes in
ascending order; '-' where the backend has no stats). `--trainable_encoder` fine-tunes OWL-ViT
(model.freeze_encoder=False, encoder lr x0.1) instead of freezing it.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CONFIGS = {'tiny': ('tiny.py', None), 'b32': ('gaic_b32.py', 'full')}


def load_config(name: str):
  from clipcrop_jax import config_lib  # pylint: disable=g-import-not-at-top
  file, arg = CONFIGS[name]
  return config_lib.load_config_file(REPO / 'configs' / file, arg)


def ensure_dataset(data_dir: str, dataset: str) -> None:
  """Builds `synthetic_crops/<dataset>` in data_dir unless it is already prepared."""
  root = pathlib.Path(data_dir) / 'synthetic_crops' / dataset
  if any((p / 'dataset_info.json').is_file() for p in root.glob('*.*.*')):
    return
  print(f'building synthetic_crops/{dataset} in {data_dir} ...', flush=True)
  out = subprocess.run([sys.executable, '-m', 'clipcrop_jax.build_dataset', 'datasets/synthetic',
                        '--config', dataset, '--data_dir', data_dir], cwd=REPO,
                       capture_output=True, text=True, check=False)
  if out.returncode:
    sys.exit(f'building synthetic_crops/{dataset} failed:\n{out.stdout}\n{out.stderr}')


def _peak_memory_gib() -> float | None:
  import jax  # pylint: disable=g-import-not-at-top
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  if not stats or 'peak_bytes_in_use' not in stats:
    return None
  return stats['peak_bytes_in_use'] / 2**30


def benchmark_synthetic(name: str, batch_size: int, args) -> dict[str, float]:
  """Step-only timing of one model on a fixed random batch (no input pipeline, no TensorFlow)."""
  import jax  # pylint: disable=g-import-not-at-top
  from clipcrop_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from clipcrop_jax import optim  # pylint: disable=g-import-not-at-top
  from clipcrop_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from clipcrop_jax import train_lib  # pylint: disable=g-import-not-at-top
  from clipcrop_jax import trainer  # pylint: disable=g-import-not-at-top

  t_setup = time.perf_counter()
  config = load_config(name)
  config.batch_size = batch_size
  config.dtype = args.dtype
  config.num_train_steps = 10_000
  if args.trainable_encoder:
    config.model.freeze_encoder = False
    config.optimizer.lr_multipliers = tuple(optim.default_lr_multipliers(False))
  mesh = sharding_lib.make_mesh(config.sharding.mesh_shape)
  task = train_lib.ClipCropTask(config)
  setup = trainer.setup_state(task, mesh, config.num_train_steps)
  groups = optim.describe(setup.abstract.params, config.optimizer.lr_multipliers)
  state = trainer.fresh_state(task, setup)
  step_fn = trainer.make_step_fn(task, setup, mesh)
  size = task.model.config.owlvit_config.image_size
  host = input_pipeline.random_batch(batch_size, size, config.dataset.max_crops,
                                     config.dataset.max_queries)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  batch = {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in host.items()}
  print(f'  {name} batch {batch_size}: set-up {time.perf_counter() - t_setup:.1f} s', flush=True)

  t0 = time.perf_counter()
  state, metrics = step_fn(state, batch)
  first_loss = float(jax.device_get(metrics['loss']))
  compile_s = time.perf_counter() - t0
  print(f'  {name} batch {batch_size}: first step (compile + run) {compile_s:.1f} s', flush=True)
  for _ in range(max(0, args.warmup - 1)):
    t1 = time.perf_counter()
    state, metrics = step_fn(state, batch)
    _block((state.step, metrics))
    print(f'  {name} batch {batch_size}: warm-up step {time.perf_counter() - t1:.2f} s', flush=True)

  n = args.steps
  state, metrics, step_s = _timed_steps(step_fn, state, batch, n)
  metrics = jax.device_get(metrics)
  return dict(batch=batch_size, image_size=size, steps=n, compile_s=compile_s,
              steps_per_s=n / step_s, step=n * batch_size / step_s, first_loss=first_loss,
              loss=float(metrics['loss']), grad_norm=float(metrics['grad_norm']),
              peak_gib=_peak_memory_gib(), groups=groups)


def run_synthetic(models: list[str], batch_sizes: list[int], args) -> None:
  import math  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  print(f'{jax.device_count()} x {dev.device_kind} ({dev.platform}), dtype {args.dtype}, '
        f'{args.steps} timed steps, synthetic batch (step only), encoder '
        f'{"trainable" if args.trainable_encoder else "frozen"}', flush=True)
  header = (f'{"model":6s} {"batch":>5s} {"px":>4s} {"steps/s":>8s} {"ex/s":>9s} '
            f'{"compile s":>9s} {"peak GiB":>8s} {"loss[0]":>8s} {"loss[-1]":>8s}')
  rows, finite = [], True
  for m in models:
    for bs in batch_sizes:
      r = benchmark_synthetic(m, bs, args)
      finite &= all(math.isfinite(r[k]) for k in ('first_loss', 'loss', 'grad_norm'))
      peak = '-' if r['peak_gib'] is None else f'{r["peak_gib"]:.2f}'
      rows.append(f'{m:6s} {bs:5d} {r["image_size"]:4d} {r["steps_per_s"]:8.3f} {r["step"]:9.2f} '
                  f'{r["compile_s"]:9.1f} {peak:>8s} {r["first_loss"]:8.4f} {r["loss"]:8.4f}')
      print(f'  {m} batch {bs}: {r["groups"]}; grad_norm {r["grad_norm"]:.4g}', flush=True)
      print(header + '\n' + rows[-1], flush=True)
  print(header)
  print('\n'.join(rows))
  print(f'all losses and grad norms finite: {finite}')
  if not finite:
    sys.exit(1)


def _timed_steps(step_fn, state, batch, n: int):
  """Runs `n` steps on the same batch; returns (state, last metrics, seconds until all done)."""
  t0 = time.perf_counter()
  metrics = None
  for _ in range(n):
    state, metrics = step_fn(state, batch)
  _block((state.step, metrics))
  return state, metrics, time.perf_counter() - t0


def _block(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.block_until_ready(tree)


def benchmark(name: str, args) -> dict[str, float]:
  """{'step', 'step_input', 'input': examples/s, 'wait': input-wait fraction, ...} of one model."""
  import jax  # pylint: disable=g-import-not-at-top
  from clipcrop_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from clipcrop_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from clipcrop_jax import train_lib  # pylint: disable=g-import-not-at-top
  from clipcrop_jax import trainer  # pylint: disable=g-import-not-at-top

  config = load_config(name)
  config.dataset.update(name=f'synthetic_crops/{args.dataset}', data_dir=args.data_dir,
                        train_split='train')
  if args.batch_size:
    config.batch_size = args.batch_size
  elif name == 'b32':
    config.batch_size = 2  # the paper's 32 is ~1 min per step on 2 CPU cores
  if args.keyword_pipeline is not None:
    config.dataset.keyword_pipeline = args.keyword_pipeline
  config.dtype = args.dtype
  config.num_train_steps = 10_000
  bs = config.batch_size

  mesh = sharding_lib.make_mesh(config.sharding.mesh_shape)
  builder = input_pipeline.dataset_builder(config.dataset.name, config.dataset.data_dir)
  task = train_lib.ClipCropTask(config)
  model = task.model
  setup = trainer.setup_state(task, mesh, config.num_train_steps)
  state = trainer.fresh_state(task, setup)
  step_fn = trainer.make_step_fn(task, setup, mesh)
  batches = train_lib.make_train_iterator(config, builder, mesh)

  t0 = time.perf_counter()
  cached = _block(next(batches))
  first_batch = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(max(1, args.warmup)):
    state, metrics = step_fn(state, cached)
    _block(metrics)
  compile_s = time.perf_counter() - t0
  for _ in range(args.warmup):  # warm the pipeline (tf.data threads, prefetch buffers)
    _block(next(batches))

  n = args.steps
  state, metrics, step_s = _timed_steps(step_fn, state, cached, n)

  wait = 0.0
  t0 = time.perf_counter()
  for _ in range(n):
    t1 = time.perf_counter()
    batch = next(batches)
    wait += time.perf_counter() - t1
    state, metrics = step_fn(state, batch)
  _block((state.step, metrics))
  step_input_s = time.perf_counter() - t0

  t0 = time.perf_counter()
  for _ in range(n):
    batch = next(batches)
  _block(batch)
  input_s = time.perf_counter() - t0

  loss = float(jax.device_get(metrics['loss']))
  return dict(batch=bs, image_size=model.config.owlvit_config.image_size, steps=n,
              first_batch_s=first_batch, compile_s=compile_s,
              step=n * bs / step_s, step_input=n * bs / step_input_s, input=n * bs / input_s,
              wait=wait / step_input_s, loss=loss)


def benchmark_setup(name: str, args) -> dict[str, float]:
  """Set-up seconds from pretrained OWL-ViT weights: full random init vs. decoder-only init."""
  import tempfile  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from clipcrop_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from clipcrop_jax import train_lib  # pylint: disable=g-import-not-at-top
  from clipcrop_jax import trainer  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.owlvit import checkpoints as owl_ckpt  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.owlvit import model as owl_model  # pylint: disable=g-import-not-at-top

  config = load_config(name)
  config.dtype = args.dtype
  config.num_train_steps = 10_000
  with tempfile.TemporaryDirectory() as tmp:
    owl = owl_model.init_variables(train_lib.ClipCropTask(config).model.config.owlvit_config, 1)
    config.init_from.owlvit = str(owl_ckpt.save_scenic_checkpoint(
        jax.device_get(owl), pathlib.Path(tmp) / 'owlvit.msgpack'))
    del owl
    mesh = sharding_lib.make_mesh(config.sharding.mesh_shape)

    def decoder_only():
      task = train_lib.ClipCropTask(config)
      setup = trainer.setup_state(task, mesh, config.num_train_steps)
      return trainer.fresh_state(task, setup)

    def full_init():  # before issue 12: random OWL-ViT + decoder, then the encoder replaced
      task = train_lib.ClipCropTask(config)
      setup = trainer.setup_state(task, mesh, config.num_train_steps)
      state = setup.init(jax.random.PRNGKey(config.seed), {})
      owl = task.pretrained_params(setup.abstract.params)['owlvit']
      return state.replace(params={**state.params, 'owlvit': trainer.place(
          owl, setup.shardings.params['owlvit'])})

    times, states = {}, {}
    for label, fn in (('decoder_only', decoder_only), ('full_init', full_init)):
      t0 = time.perf_counter()
      states[label] = _block(fn())
      times[label] = time.perf_counter() - t0
      print(f'  {name}: set-up ({label.replace("_", " ")}) {times[label]:.1f} s', flush=True)
  same = all(np.array_equal(a, b) for a, b in zip(
      jax.tree_util.tree_leaves(jax.device_get(states['decoder_only'].params)),
      jax.tree_util.tree_leaves(jax.device_get(states['full_init'].params))))
  return dict(times, same=same)


def run_setup(models: list[str], args) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  print(f'{jax.device_count()} x {dev.device_kind} ({dev.platform}), dtype {args.dtype}: set-up '
        'from pretrained OWL-ViT weights to the first train state', flush=True)
  rows = []
  for m in models:
    r = benchmark_setup(m, args)
    rows.append(f'{m:6s} {r["full_init"]:15.1f} {r["decoder_only"]:15.1f} '
                f'{r["full_init"] / r["decoder_only"]:8.2f}x {str(r["same"]):>16s}')
  print(f'{"model":6s} {"full init s":>15s} {"decoder only s":>15s} {"speed-up":>9s} '
        f'{"same parameters":>16s}')
  print('\n'.join(rows))
  print('full init = the baseline (a random init of the whole model, then the loaded encoder '
        'put in place), measured in the same run.')


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--models', default='tiny,b32', help='comma-separated: tiny, b32')
  parser.add_argument('--data_dir', default='',
                      help='synthetic_crops/<dataset> lives here (required without --synthetic)')
  parser.add_argument('--dataset', choices=['tiny', 'default'], default='tiny')
  parser.add_argument('--batch_size', default='0',
                      help='0: the config batch for tiny (8), 2 for b32; a comma-separated list '
                      'runs each in turn')
  parser.add_argument('--steps', type=int, default=5, help='timed steps per measurement')
  parser.add_argument('--warmup', type=int, default=1, help='untimed steps/batches first')
  parser.add_argument('--dtype', choices=['float32', 'bfloat16'], default='float32')
  parser.add_argument('--keyword_pipeline', default=None,
                      help="spaCy pipeline for keywords ('rules' = rule-based); default: the config's")
  parser.add_argument('--synthetic', action='store_true',
                      help='step only on a fixed random batch: no dataset, no TensorFlow')
  parser.add_argument('--setup', action='store_true',
                      help='set-up time from pretrained OWL-ViT weights: full vs decoder-only init')
  parser.add_argument('--trainable_encoder', action='store_true',
                      help='--synthetic: fine-tune OWL-ViT (freeze_encoder=False) instead')
  args = parser.parse_args(argv)
  models = [m.strip() for m in args.models.split(',') if m.strip()]
  unknown = [m for m in models if m not in CONFIGS]
  if unknown:
    parser.error(f'unknown model(s) {unknown}; expected {sorted(CONFIGS)}')
  try:
    batch_sizes = [int(b) for b in str(args.batch_size).split(',') if b.strip()] or [0]
  except ValueError:
    parser.error(f'--batch_size {args.batch_size!r}: expected integers, comma-separated')
  if args.setup:
    run_setup(models, args)
    return
  if args.synthetic:
    if 0 in batch_sizes:
      batch_sizes = [8]
    run_synthetic(models, batch_sizes, args)
    return
  if not args.data_dir:
    parser.error('--data_dir is required (or pass --synthetic)')
  if args.trainable_encoder:
    parser.error('--trainable_encoder needs --synthetic')

  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  import jax  # pylint: disable=g-import-not-at-top
  ensure_dataset(args.data_dir, args.dataset)
  print(f'{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.devices()[0].platform}), '
        f'dtype {args.dtype}, {args.steps} timed steps, synthetic_crops/{args.dataset}')
  header = (f'{"model":6s} {"batch":>5s} {"px":>4s} {"step ex/s":>10s} {"step+input":>11s} '
            f'{"(ratio)":>8s} {"input ex/s":>11s} {"(ratio)":>8s} {"input wait":>10s} '
            f'{"compile s":>9s}')
  rows = []
  for m in models:
    for bs in batch_sizes:
      args.batch_size = bs
      r = benchmark(m, args)
      rows.append(
          f'{m:6s} {r["batch"]:5d} {r["image_size"]:4d} {r["step"]:10.3f} '
          f'{r["step_input"]:11.3f} {r["step_input"] / r["step"]:7.2f}x {r["input"]:11.2f} '
          f'{r["input"] / r["step"]:7.2f}x {100 * r["wait"]:9.1f}% {r["compile_s"]:9.1f}')
      print(f'  {m}: loss {r["loss"]:.4f}, first batch {r["first_batch_s"]:.1f} s', flush=True)
  print(header)
  print('\n'.join(rows))
  print('ratios: against "step ex/s" (jitted train_step on a cached batch) of the same run; '
        'input wait = time in next(iterator) / step+input wall time.')


if __name__ == '__main__':
  main()
