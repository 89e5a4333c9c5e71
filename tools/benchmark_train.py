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
`clipcrop_task.make_train_iterator` (augmentation, mosaics, keywords) exactly as in training.

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
train state, two ways in the same process: "full init" (the former way: a random init
of the whole model, OWL-ViT included, then the loaded encoder put in its place) and
"decoder only" (`trainer.fresh_state`: the loaded encoder and a decoder initialised alone, with
the values the full init gives it). Prints both and their ratio; checks that both states have
identical parameters.

`--phases`, `--matching_solver`, `--max_batch`, `--remat`: see docs/performance.md, "Training
throughput".

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
  out = subprocess.run(
      [
          sys.executable,
          '-m',
          'clipcrop_jax.build_dataset',
          'datasets/synthetic',
          '--config',
          dataset,
          '--data_dir',
          data_dir,
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      check=False,
  )
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


def synthetic_setup(
    name: str,
    batch_size: int,
    args,
    solver: str = 'auto',
    trainable: bool = False,
    remat: bool = False,
):
  """(task, state, step_fn, batch, optimizer groups) of one model on a fixed random batch."""
  import jax  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from clipcrop_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.training import clipcrop_task  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.training import optim  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.training import trainer  # pylint: disable=g-import-not-at-top

  config = load_config(name)
  config.batch_size = batch_size
  config.dtype = args.dtype
  config.num_train_steps = 10_000
  config.loss.matching_solver = solver
  config.model.remat_encoder = remat
  if trainable:
    config.model.freeze_encoder = False
    config.optimizer.lr_multipliers = tuple(optim.default_lr_multipliers(False))
  mesh = sharding_lib.make_mesh(config.sharding.mesh_shape)
  task = clipcrop_task.ClipCropTask(config)
  setup = trainer.setup_state(task, mesh, config.num_train_steps)
  groups = optim.describe(setup.abstract.params, config.optimizer.lr_multipliers)
  state = trainer.fresh_state(task, setup)
  step_fn = trainer.make_step_fn(task, setup, mesh)
  size = task.model.config.owlvit_config.image_size
  host = input_pipeline.random_batch(
      batch_size, size, config.dataset.max_crops, config.dataset.max_queries
  )
  batch_sharding = sharding_lib.batch_sharding(mesh)
  batch = {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in host.items()}
  return task, setup, state, step_fn, batch, groups


def benchmark_synthetic(name: str, batch_size: int, args, solver: str = 'auto') -> dict[str, float]:
  """Step-only timing of one model on a fixed random batch (no input pipeline, no TensorFlow)."""
  import jax  # pylint: disable=g-import-not-at-top

  t_setup = time.perf_counter()
  task, _, state, step_fn, batch, groups = synthetic_setup(
      name, batch_size, args, solver, args.trainable_encoder, args.remat
  )
  size = task.model.config.owlvit_config.image_size
  setup_s = time.perf_counter() - t_setup
  print(f'  {name} batch {batch_size}: set-up {setup_s:.1f} s', flush=True)

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
  return dict(
      batch=batch_size,
      image_size=size,
      steps=n,
      compile_s=compile_s,
      setup_s=setup_s,
      steps_per_s=n / step_s,
      step=n * batch_size / step_s,
      first_loss=first_loss,
      loss=float(metrics['loss']),
      grad_norm=float(metrics['grad_norm']),
      peak_gib=_peak_memory_gib(),
      groups=groups,
  )


def run_synthetic(models: list[str], batch_sizes: list[int], args) -> None:
  import math  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  dev = jax.devices()[0]
  print(
      f'{jax.device_count()} x {dev.device_kind} ({dev.platform}), dtype {args.dtype}, '
      f'{args.steps} timed steps, synthetic batch (step only), encoder '
      f'{"trainable" if args.trainable_encoder else "frozen"}'
      f'{" + remat" if args.remat else ""}',
      flush=True,
  )
  header = (
      f'{"model":6s} {"batch":>5s} {"px":>4s} {"solver":>6s} {"steps/s":>8s} {"ex/s":>9s} '
      f'{"compile s":>9s} {"peak GiB":>8s} {"loss[0]":>8s} {"loss[-1]":>8s}'
  )
  rows, finite = [], True
  for m in models:
    for bs in batch_sizes:
      for solver in args.solvers:
        r = benchmark_synthetic(m, bs, args, solver)
        finite &= all(math.isfinite(r[k]) for k in ('first_loss', 'loss', 'grad_norm'))
        peak = '-' if r['peak_gib'] is None else f'{r["peak_gib"]:.2f}'
        rows.append(
            f'{m:6s} {bs:5d} {r["image_size"]:4d} {solver:>6s} {r["steps_per_s"]:8.3f} '
            f'{r["step"]:9.2f} {r["compile_s"]:9.1f} {peak:>8s} {r["first_loss"]:8.4f} '
            f'{r["loss"]:8.4f}'
        )
        print(f'  {m} batch {bs}: {r["groups"]}; grad_norm {r["grad_norm"]:.4g}', flush=True)
        print(header + '\n' + rows[-1], flush=True)
        encoder = 'trainable' if args.trainable_encoder else 'frozen'
        print(
            f'RESULT|train step {m} {encoder}{" remat" if args.remat else ""} {args.dtype} '
            f'batch {bs}, {solver} matching|{r["step"]:.1f}|examples/s|set-up {r["setup_s"]:.1f} '
            f's (random init), first step {r["compile_s"]:.1f} s, peak {peak} GiB',
            flush=True,
        )
  print(header)
  print('\n'.join(rows))
  print(f'all losses and grad norms finite: {finite}')
  if not finite:
    sys.exit(1)


def _time_fn(fn, *fn_args, n: int) -> float:
  """Seconds per call of a jitted `fn` after one compiling call."""
  _block(fn(*fn_args))
  t0 = time.perf_counter()
  for _ in range(n):
    out = fn(*fn_args)
  _block(out)
  return (time.perf_counter() - t0) / n


def benchmark_phases(name: str, batch_size: int, args, solver: str) -> dict[str, float]:
  """ms per step of each phase of the train step, each its own jitted function (see --phases)."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.data import features as F  # pylint: disable=g-import-not-at-top
  from clipcrop_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.training import clipcrop_task  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.training import losses  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.training import matching  # pylint: disable=g-import-not-at-top

  task, setup, state, step_fn, batch, _ = synthetic_setup(
      name, batch_size, args, solver, args.trainable_encoder, args.remat
  )
  model, n = task.model, args.steps
  loss_kw = clipcrop_task.loss_kwargs(task.config)
  rng = jax.random.PRNGKey(0)
  variables = {'params': state.params}

  @jax.jit
  def encoder(variables, batch):
    encoded = model.apply(variables, batch[F.IMAGES], method=model.encode_image)
    return encoded, model.apply(variables, batch[F.TEXT_QUERIES], method=model.embed_text)

  @jax.jit
  def decoder(variables, encoded, embeddings, batch):
    queries = batch[F.TEXT_QUERIES]
    mask = (queries[..., 0] > 0) & model_lib.query_mask_for_mode(queries, model.config.mode)
    target = clipcrop_task.best_crop_xyxy(
        batch[F.CROP_BOXES], batch[F.CROP_SCORES], batch[F.CROP_MASK]
    )
    return model.apply(
        variables,
        encoded,
        embeddings,
        mask,
        target,
        batch[F.IMAGE_EXTENT],
        True,
        method=model.crop_from_encoding,
        rngs={'dropout': rng},
    )

  @jax.jit
  def match_all_layers(out, batch):
    positives = losses.select_positives(
        batch[F.CROP_SCORES], batch[F.CROP_MASK], loss_kw['positive_threshold']
    )
    return jax.vmap(
        lambda b, q: matching.match(
            b,
            jax.nn.sigmoid(q),
            batch[F.CROP_BOXES],
            positives,
            loss_kw['matching_solver'],
            l1_weight=loss_kw['l1_weight'],
            giou_weight=loss_kw['giou_weight'],
            quality_weight=loss_kw['quality_weight'],
        )
    )(out['aux_boxes'], out['aux_quality_logits'])

  @jax.jit
  def loss_terms(out, batch):
    return losses.decoder_losses(
        out['aux_boxes'],
        out['aux_quality_logits'],
        batch[F.CROP_BOXES],
        batch[F.CROP_SCORES],
        batch[F.CROP_MASK],
        **loss_kw,
    )

  grad_fn = jax.jit(jax.value_and_grad(task.loss_fn, has_aux=True))

  @jax.jit
  def update(grads, opt_state, params):
    updates, opt_state = setup.optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  encoded, embeddings = encoder(variables, batch)
  out = decoder(variables, encoded, embeddings, batch)
  (_, _), grads = grad_fn(state.params, batch, rng)
  times = {
      'encoder forward': _time_fn(encoder, variables, batch, n=n),
      'decoder forward': _time_fn(decoder, variables, encoded, embeddings, batch, n=n),
      'matching (all layers)': _time_fn(match_all_layers, out, batch, n=n),
      'losses (incl. matching)': _time_fn(loss_terms, out, batch, n=n),
      'loss forward + backward': _time_fn(grad_fn, state.params, batch, rng, n=n),
      'optimizer update': _time_fn(update, grads, state.opt_state, state.params, n=n),
  }
  state, metrics = step_fn(state, batch)  # compile (the state is donated: keep the new one)
  _block(metrics)
  _, _, full_s = _timed_steps(step_fn, state, batch, n)
  times['full train step'] = full_s / n
  return times


def run_phases(models: list[str], batch_sizes: list[int], args) -> None:
  import jax  # pylint: disable=g-import-not-at-top

  dev = jax.devices()[0]
  print(
      f'{jax.device_count()} x {dev.device_kind} ({dev.platform}), dtype {args.dtype}, '
      f'{args.steps} timed calls per phase, synthetic batch, encoder '
      f'{"trainable" if args.trainable_encoder else "frozen"}',
      flush=True,
  )
  lines = [
      f'{"model":6s} {"batch":>5s} {"solver":>6s} {"phase":26s} {"ms/step":>9s} '
      f'{"% of step":>9s}'
  ]
  for m in models:
    for bs in batch_sizes:
      for solver in args.solvers:
        times = benchmark_phases(m, bs, args, solver)
        full = times['full train step']
        for phase, sec in times.items():
          lines.append(
              f'{m:6s} {bs:5d} {solver:>6s} {phase:26s} {1e3 * sec:9.2f} '
              f'{100 * sec / full:8.1f}%'
          )
        print('\n'.join(lines[-len(times) :]), flush=True)
        print(
            f'RESULT|train step phases {m} batch {bs} {args.dtype}, {solver} matching|'
            f'{1e3 * full:.1f}|ms/step|'
            + ', '.join(
                f'{phase} {100 * sec / full:.0f}%'
                for phase, sec in times.items()
                if phase != 'full train step'
            ),
            flush=True,
        )
  print('\n'.join(lines))
  print(
      'phases are separate jitted functions (XLA fuses across them inside the full step, so they '
      'need not add up); "loss forward + backward" is the whole model and loss differentiated.'
  )


def _device_memory_bytes() -> tuple[int, str]:
  """(bytes one device may use, where that number came from): the allocator's limit on
  accelerators; on CPU the machine's RAM (all devices share it)."""
  import jax  # pylint: disable=g-import-not-at-top

  try:
    stats = jax.local_devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    stats = {}
  if stats.get('bytes_limit'):
    return int(stats['bytes_limit']), 'allocator limit'
  ram = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  return ram // max(1, jax.local_device_count()), 'RAM / local devices'


def _step_memory_bytes(step_fn, state, batch_size: int, like: dict) -> int:
  """Device bytes one compiled train step at `batch_size` needs (XLA's memory analysis:
  arguments + outputs + temporaries - donated aliases, per device), without running it."""
  import jax  # pylint: disable=g-import-not-at-top

  batch = {
      k: jax.ShapeDtypeStruct((batch_size,) + v.shape[1:], v.dtype, sharding=v.sharding)
      for k, v in like.items()
  }
  stats = step_fn.lower(state, batch).compile().memory_analysis()
  return int(
      stats.argument_size_in_bytes
      + stats.output_size_in_bytes
      + stats.temp_size_in_bytes
      - stats.alias_size_in_bytes
  )


def estimate_max_batch(name: str, args, trainable: bool, remat: bool) -> dict[str, float]:
  """Largest batch whose step fits in device memory, from the compiled steps' memory analysis at
  two batch sizes b0 and 2 b0 (`--max_batch_probe`): need(b) = fixed + b * per_example, solved
  for 95% of the device's memory and rounded down to a multiple of the device count. Compiling is
  enough (no step runs, so an out-of-memory never happens); `--max_batch_verify` then runs one
  step at the estimate."""
  import jax  # pylint: disable=g-import-not-at-top

  b0 = max(int(args.max_batch_probe), jax.device_count())
  b0 -= b0 % jax.device_count()
  _, _, state, step_fn, batch, _ = synthetic_setup(
      name, b0, args, args.solvers[0], trainable, remat
  )
  need0 = _step_memory_bytes(step_fn, state, b0, batch)
  need1 = _step_memory_bytes(step_fn, state, 2 * b0, batch)
  per_example = max(1, (need1 - need0) / b0)
  fixed = need0 - b0 * per_example
  limit, source = _device_memory_bytes()
  largest = int((0.95 * limit - fixed) // per_example)
  largest -= largest % jax.device_count()
  result = dict(
      largest=largest,
      per_example_mib=per_example / 2**20,
      fixed_gib=fixed / 2**30,
      limit_gib=limit / 2**30,
      source=source,
      verified=None,
  )
  if args.max_batch_verify and largest > 0:
    try:
      _, _, state, step_fn, batch, _ = synthetic_setup(
          name, largest, args, args.solvers[0], trainable, remat
      )
      _block(step_fn(state, batch))
      result['verified'] = True
    except Exception as e:  # pylint: disable=broad-except
      if 'RESOURCE_EXHAUSTED' not in str(e) and 'out of memory' not in str(e).lower():
        raise
      result['verified'] = False
    finally:
      jax.clear_caches()
  return result


def run_max_batch(models: list[str], args) -> None:
  import jax  # pylint: disable=g-import-not-at-top

  dev = jax.devices()[0]
  print(
      f'{jax.device_count()} x {dev.device_kind} ({dev.platform}), dtype {args.dtype}: largest '
      f'train batch that fits, estimated from XLA memory analysis at batch '
      f'{args.max_batch_probe} and twice that',
      flush=True,
  )
  modes = {'frozen': (False, False), 'trainable': (True, False), 'trainable+remat': (True, True)}
  lines = [
      f'{"model":6s} {"encoder":16s} {"largest batch":>13s} {"MiB/example":>11s} '
      f'{"fixed GiB":>9s} {"limit GiB":>9s} {"ran":>5s}'
  ]
  for m in models:
    for label in args.max_batch_modes.split(','):
      trainable, remat = modes[label]
      r = estimate_max_batch(m, args, trainable, remat)
      ran = '-' if r['verified'] is None else ('yes' if r['verified'] else 'OOM')
      lines.append(
          f'{m:6s} {label:16s} {r["largest"]:13d} {r["per_example_mib"]:11.1f} '
          f'{r["fixed_gib"]:9.2f} {r["limit_gib"]:9.1f} {ran:>5s}'
      )
      print(lines[-1], flush=True)
      print(
          f'RESULT|largest train batch {m} {label} {args.dtype}|{r["largest"]}|examples|'
          f'{r["per_example_mib"]:.1f} MiB/example, limit {r["limit_gib"]:.0f} GiB '
          f'({r["source"]}), run at it: {ran}',
          flush=True,
      )
  print('\n'.join(lines))


def benchmark_matching(args) -> None:
  """The matching of one B/32-size train step (`--batch_size` images, 90 predictions, 128 crop
  slots of which 3..90 real, the 6 decoder layers vmapped as in the step): device vs host."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.training import matching  # pylint: disable=g-import-not-at-top

  dev = jax.devices()[0]
  rng = np.random.default_rng(0)
  layers, preds, slots = 6, 90, 128
  rows = []
  for bs in [8 if b == 0 else b for b in args.batch_sizes]:
    centres = rng.uniform(0.2, 0.8, (layers, bs, preds, 2))
    sizes = rng.uniform(0.1, 0.4, (layers, bs, preds, 2))
    boxes = jnp.asarray(np.concatenate([centres - sizes, centres + sizes], -1), jnp.float32)
    quality = jnp.asarray(rng.uniform(size=(layers, bs, preds)), jnp.float32)
    t_centres = rng.uniform(0.2, 0.8, (bs, slots, 2))
    t_sizes = rng.uniform(0.1, 0.4, (bs, slots, 2))
    targets = jnp.asarray(
        np.concatenate([t_centres - t_sizes, t_centres + t_sizes], -1), jnp.float32
    )
    mask = jnp.asarray(np.arange(slots)[None] < rng.integers(3, 91, (bs, 1)))
    times = {}
    for solver in ('device', 'host'):
      fn = jax.jit(jax.vmap(lambda b, q, s=solver: matching.match(b, q, targets, mask, s)))
      times[solver] = _time_fn(fn, boxes, quality, n=args.steps)
    rows.append(
        f'{bs:5d} {1e3 * times["device"]:10.2f} {1e3 * times["host"]:10.2f} '
        f'{times["device"] / times["host"]:8.2f}x'
    )
    print(rows[-1], flush=True)
    print(
        f'RESULT|matching {bs}x{preds}x{slots}, {layers} layers ({dev.platform})|'
        f'{1e3 * times["host"]:.2f}|ms host|device {1e3 * times["device"]:.2f} ms '
        f'({times["device"] / times["host"]:.2f}x); auto = {matching.default_solver()}',
        flush=True,
    )
  print(f'{jax.device_count()} x {dev.device_kind} ({dev.platform}): {args.steps} calls each')
  print(f'{"batch":>5s} {"device ms":>10s} {"host ms":>10s} {"dev/host":>9s}')
  print('\n'.join(rows))


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
  from clipcrop_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from clipcrop_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.training import clipcrop_task  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.training import trainer  # pylint: disable=g-import-not-at-top

  config = load_config(name)
  config.dataset.update(
      name=f'synthetic_crops/{args.dataset}', data_dir=args.data_dir, train_split='train'
  )
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
  task = clipcrop_task.ClipCropTask(config)
  model = task.model
  setup = trainer.setup_state(task, mesh, config.num_train_steps)
  state = trainer.fresh_state(task, setup)
  step_fn = trainer.make_step_fn(task, setup, mesh)
  batches = clipcrop_task.make_train_iterator(config, builder, mesh)

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
  return dict(
      batch=bs,
      image_size=model.config.owlvit_config.image_size,
      steps=n,
      first_batch_s=first_batch,
      compile_s=compile_s,
      step=n * bs / step_s,
      step_input=n * bs / step_input_s,
      input=n * bs / input_s,
      wait=wait / step_input_s,
      loss=loss,
  )


def benchmark_setup(name: str, args) -> dict[str, float]:
  """Set-up seconds from pretrained OWL-ViT weights: full random init vs. decoder-only init."""
  import tempfile  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.owlvit import checkpoints as owl_ckpt  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.owlvit import model as owl_model  # pylint: disable=g-import-not-at-top
  from clipcrop_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.training import clipcrop_task  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.training import trainer  # pylint: disable=g-import-not-at-top

  config = load_config(name)
  config.dtype = args.dtype
  config.num_train_steps = 10_000
  with tempfile.TemporaryDirectory() as tmp:
    owl = owl_model.init_variables(clipcrop_task.ClipCropTask(config).model.config.owlvit_config, 1)
    config.init_from.owlvit = str(
        owl_ckpt.save_scenic_checkpoint(jax.device_get(owl), pathlib.Path(tmp) / 'owlvit.msgpack')
    )
    del owl
    mesh = sharding_lib.make_mesh(config.sharding.mesh_shape)

    def decoder_only():
      task = clipcrop_task.ClipCropTask(config)
      setup = trainer.setup_state(task, mesh, config.num_train_steps)
      return trainer.fresh_state(task, setup)

    def full_init():  # the former way: random OWL-ViT + decoder, then the encoder replaced
      task = clipcrop_task.ClipCropTask(config)
      setup = trainer.setup_state(task, mesh, config.num_train_steps)
      state = setup.init(jax.random.PRNGKey(config.seed), {})
      owl = task.pretrained_params(setup.abstract.params)['owlvit']
      return state.replace(
          params={**state.params, 'owlvit': trainer.place(owl, setup.shardings.params['owlvit'])}
      )

    times, states = {}, {}
    ways = (('decoder_only', decoder_only), ('full_init', full_init))
    for label, fn in ways[:1] if args.no_setup_baseline else ways:
      t0 = time.perf_counter()
      states[label] = _block(fn())
      times[label] = time.perf_counter() - t0
      print(f'  {name}: set-up ({label.replace("_", " ")}) {times[label]:.1f} s', flush=True)
  if args.no_setup_baseline:
    return dict(times, full_init=float('nan'), same=None)
  same = all(
      np.array_equal(a, b)
      for a, b in zip(
          jax.tree_util.tree_leaves(jax.device_get(states['decoder_only'].params)),
          jax.tree_util.tree_leaves(jax.device_get(states['full_init'].params)),
      )
  )
  return dict(times, same=same)


def run_setup(models: list[str], args) -> None:
  import jax  # pylint: disable=g-import-not-at-top

  dev = jax.devices()[0]
  print(
      f'{jax.device_count()} x {dev.device_kind} ({dev.platform}), dtype {args.dtype}: set-up '
      'from pretrained OWL-ViT weights to the first train state',
      flush=True,
  )
  rows = []
  for m in models:
    r = benchmark_setup(m, args)
    print(
        f'RESULT|train set-up {m} from OWL-ViT weights (decoder-only init)|'
        f'{r["decoder_only"]:.1f}|s|full init {r["full_init"]:.1f} s',
        flush=True,
    )
    rows.append(
        f'{m:6s} {r["full_init"]:15.1f} {r["decoder_only"]:15.1f} '
        f'{r["full_init"] / r["decoder_only"]:8.2f}x {str(r["same"]):>16s}'
    )
  print(
      f'{"model":6s} {"full init s":>15s} {"decoder only s":>15s} {"speed-up":>9s} '
      f'{"same parameters":>16s}'
  )
  print('\n'.join(rows))
  print(
      'full init = the baseline (a random init of the whole model, then the loaded encoder '
      'put in place), measured in the same run.'
  )


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--models', default='tiny,b32', help='comma-separated: tiny, b32')
  parser.add_argument(
      '--data_dir',
      default='',
      help='synthetic_crops/<dataset> lives here (required without --synthetic)',
  )
  parser.add_argument('--dataset', choices=['tiny', 'default'], default='tiny')
  parser.add_argument(
      '--batch_size',
      default='0',
      help='0: the config batch for tiny (8), 2 for b32; a comma-separated list '
      'runs each in turn',
  )
  parser.add_argument('--steps', type=int, default=5, help='timed steps per measurement')
  parser.add_argument('--warmup', type=int, default=1, help='untimed steps/batches first')
  parser.add_argument('--dtype', choices=['float32', 'bfloat16'], default='float32')
  parser.add_argument(
      '--keyword_pipeline',
      default=None,
      help="spaCy pipeline for keywords ('rules' = rule-based); default: the config's",
  )
  parser.add_argument(
      '--synthetic',
      action='store_true',
      help='step only on a fixed random batch: no dataset, no TensorFlow',
  )
  parser.add_argument(
      '--setup',
      action='store_true',
      help='set-up time from pretrained OWL-ViT weights: full vs decoder-only init',
  )
  parser.add_argument(
      '--no_setup_baseline',
      action='store_true',
      help='--setup: time the decoder-only set-up alone (no full-init baseline)',
  )
  parser.add_argument(
      '--trainable_encoder',
      action='store_true',
      help='--synthetic: fine-tune OWL-ViT (freeze_encoder=False) instead',
  )
  parser.add_argument(
      '--remat', action='store_true', help='--synthetic / --phases: model.remat_encoder=True'
  )
  parser.add_argument(
      '--matching_solver',
      default='auto',
      help='--synthetic / --phases: loss.matching_solver, a comma-separated list '
      'of auto, device, host runs each in turn (e.g. device,host)',
  )
  parser.add_argument(
      '--phases',
      action='store_true',
      help='ms per step of encoder, decoder, matching, losses, optimizer and the '
      'full step on a fixed random batch',
  )
  parser.add_argument(
      '--max_batch',
      action='store_true',
      help='largest batch that fits (estimated from XLA memory analysis), per '
      'encoder mode of --max_batch_modes',
  )
  parser.add_argument('--max_batch_modes', default='frozen,trainable,trainable+remat')
  parser.add_argument(
      '--max_batch_probe',
      type=int,
      default=8,
      help='--max_batch: compile the step at this batch and twice it',
  )
  parser.add_argument(
      '--max_batch_verify',
      action='store_true',
      help='--max_batch: then run one step at the estimate',
  )
  parser.add_argument(
      '--matching',
      action='store_true',
      help='time the matching of one B/32-size step, device vs host solver',
  )
  args = parser.parse_args(argv)
  args.solvers = [s.strip() for s in args.matching_solver.split(',') if s.strip()]
  if not args.solvers or any(s not in ('auto', 'device', 'host') for s in args.solvers):
    parser.error(f'--matching_solver {args.matching_solver!r}: expected auto, device, host')
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
  if args.max_batch:
    if any(
        m not in ('frozen', 'trainable', 'trainable+remat') for m in args.max_batch_modes.split(',')
    ):
      parser.error(
          f'--max_batch_modes {args.max_batch_modes!r}: expected frozen, trainable, '
          'trainable+remat'
      )
    run_max_batch(models, args)
    return
  if args.matching:
    args.batch_sizes = batch_sizes
    benchmark_matching(args)
    return
  if args.phases:
    run_phases(models, [8 if b == 0 else b for b in batch_sizes], args)
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
  print(
      f'{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.devices()[0].platform}), '
      f'dtype {args.dtype}, {args.steps} timed steps, synthetic_crops/{args.dataset}'
  )
  header = (
      f'{"model":6s} {"batch":>5s} {"px":>4s} {"step ex/s":>10s} {"step+input":>11s} '
      f'{"(ratio)":>8s} {"input ex/s":>11s} {"(ratio)":>8s} {"input wait":>10s} '
      f'{"compile s":>9s}'
  )
  rows = []
  for m in models:
    for bs in batch_sizes:
      args.batch_size = bs
      r = benchmark(m, args)
      rows.append(
          f'{m:6s} {r["batch"]:5d} {r["image_size"]:4d} {r["step"]:10.3f} '
          f'{r["step_input"]:11.3f} {r["step_input"] / r["step"]:7.2f}x {r["input"]:11.2f} '
          f'{r["input"] / r["step"]:7.2f}x {100 * r["wait"]:9.1f}% {r["compile_s"]:9.1f}'
      )
      print(f'  {m}: loss {r["loss"]:.4f}, first batch {r["first_batch_s"]:.1f} s', flush=True)
  print(header)
  print('\n'.join(rows))
  print(
      'ratios: against "step ex/s" (jitted train_step on a cached batch) of the same run; '
      'input wait = time in next(iterator) / step+input wall time.'
  )


if __name__ == '__main__':
  main()
