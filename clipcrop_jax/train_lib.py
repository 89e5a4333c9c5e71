"""Sharded training of ClipCrop: state, train step, checkpoints, logging, the training loop.

Lifecycle of `train(config, workdir)` (each step is a small top-level function a test can call):
  0. `default_config.validate_config(config, workdir)`: a bad config fails here, in one line;
  1. mesh ('data', 'model') over all devices of all processes (`sharding.make_mesh`);
  2. shapes of the train state by `jax.eval_shape`, shardings by the config's rules, then the
     state is created directly sharded under `jit(out_shardings=...)`;
  3. resume order: the newest checkpoint in `<workdir>/checkpoints` that restores (params,
     optimizer state, step, rng; the input position is the step) > `init_from.clipcrop` >
     `init_from.owlvit` (encoder weights) > random init. Step folders are tried newest first; an
     unusable one (empty, truncated, corrupt) is logged with the reason and moved to
     `<workdir>/checkpoints_unusable/<N>` (never deleted), so that Orbax neither skips the
     re-saved step nor garbage-collects a good step in its place (`restore_latest`). When step
     folders exist but none restores, `CheckpointRestoreError` lists them and nothing is moved.
     `<workdir>/metrics.jsonl` is rewritten (atomically) without the records of steps after the
     resumed one, so that it holds one record per (step, kind);
  4. `jit(train_step, donate_argnums=0)` on global batches (every process feeds its own part);
  5. every `log_every_steps`: a progress line (step, loss, steps/s, ETA), TensorBoard summaries
     (clu metric writers) and `<workdir>/metrics.jsonl`; every `checkpoint.every_steps` and at the
     end: an Orbax checkpoint (keep the last `checkpoint.keep`); a non-finite loss stops training
     with an error and is never checkpointed;
  6. at the end the trained model is exported as a `ClipCropper` directory `<workdir>/clipcrop`.

Errors a user can act on (no usable checkpoint, dataset not prepared, a non-finite loss) are
`RunError`s: the command lines print their message as one line, without a traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import inspect
import json
import logging as python_logging
import math
import os
import pathlib
import sys
import time
from typing import Any, Callable, Iterator, Optional

from absl import logging
import flax
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from clipcrop_jax import default_config
from clipcrop_jax import fileio
from clipcrop_jax import losses as losses_lib
from clipcrop_jax import model as model_lib
from clipcrop_jax import optim
from clipcrop_jax import sharding as sharding_lib

TRAIN_KEYS = ('image', 'crops', 'crop_scores', 'crop_mask', 'image_extent', 'text_queries')
CONFIG_FILE = 'config.json'
METRICS_FILE = 'metrics.jsonl'
EXPORT_DIR = 'clipcrop'
CHECKPOINT_DIR = 'checkpoints'
UNUSABLE_CHECKPOINT_DIR = 'checkpoints_unusable'
# After a failed restore, how long its abandoned reads get to end quietly (`_restore_step`).
ABANDONED_READS_SETTLE_S = 1.0


class RunError(Exception):
  """A run cannot start or go on for a reason the user can act on (not a bug in this code).

  The command lines print the message as one `error:` line (exit code 1), without a traceback.
  """


class NonFiniteLossError(RunError, FloatingPointError):
  """The training loss became NaN or Inf."""


class CheckpointRestoreError(RunError):
  """`<workdir>/checkpoints` has step folders but none of them restores."""


class NoCheckpointError(RunError, FileNotFoundError):
  """`<workdir>/checkpoints` has no step folder (evaluation of an untrained workdir)."""


class DatasetNotPreparedError(RunError, FileNotFoundError):
  """The TFDS dataset a config names is not prepared in its data_dir."""


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs. `step` counts optimizer updates (= batches consumed)."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


# ------------------------------------------------------------------------------------------------
# Config -> model, data, optimizer.
# ------------------------------------------------------------------------------------------------


def clipcrop_config(config: ml_collections.ConfigDict) -> model_lib.ClipCropConfig:
  """The `ClipCropConfig` described by `config.model`."""
  fields = {f.name for f in dataclasses.fields(model_lib.ClipCropConfig)}
  unknown = set(config.model.keys()) - fields
  if unknown:
    raise ValueError(f'config.model has unknown fields {sorted(unknown)}; expected {sorted(fields)}')
  return model_lib.ClipCropConfig(**config.model.to_dict())


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
  if config.dtype not in ('float32', 'bfloat16'):
    raise ValueError(f"config.dtype={config.dtype!r}; expected 'float32' or 'bfloat16'")
  return jnp.dtype(config.dtype)


def build_model(config: ml_collections.ConfigDict) -> model_lib.ClipCrop:
  return model_lib.ClipCrop(clipcrop_config(config), dtype=compute_dtype(config))


def dataset_builder(name: str, data_dir: str):
  """A prepared TFDS dataset `name` ('gaic/journal', 'synthetic_crops/default', ...) in `data_dir`.

  Reads the prepared files (`tfds.builder_from_directory`), so the builder code need not be
  importable; the newest version is used. A clear error names the build command when missing.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(os.path.expanduser(data_dir or tfds.core.constants.DATA_DIR)) / name
  versions = sorted((p for p in root.glob('*.*.*') if (p / 'dataset_info.json').is_file()),
                    key=lambda p: tuple(int(v) for v in p.name.split('.') if v.isdigit()))
  if not versions:
    folder = name.split('/')[0]
    folder = 'synthetic' if folder == 'synthetic_crops' else folder
    raise DatasetNotPreparedError(
        f'dataset {name!r} is not prepared in {root.parent}; build it with `python -m '
        f'clipcrop_jax.build_dataset datasets/{folder}'
        + (f' --config {name.split("/")[1]}' if '/' in name else '')
        + f' --data_dir {root.parent}` (add --manual_dir=<raw files> for real datasets)')
  return tfds.builder_from_directory(os.fspath(versions[-1]))


INPUT_FEATURES = ('image', 'crops', 'text', 'height', 'width')


def random_batch(batch: int, image_size: int, max_crops: int, max_queries: int,
                 seed: int = 1234) -> dict[str, np.ndarray]:
  """A fixed random batch with the `TRAIN_KEYS` shapes (NumPy), for benchmarks and tests.

  Images uniform in [0, 1); 3..max_crops real crops per example (xyxy in [0, 1], scores 1..5,
  the rest zero padding); every other example has a non-square extent; example b has
  1 + b % max_queries non-empty text queries of random CLIP token ids between the start (49406)
  and end (49407) tokens, 16 tokens per query.
  """
  rng = np.random.default_rng(seed)
  image = rng.uniform(size=(batch, image_size, image_size, 3)).astype(np.float32)
  lo = rng.uniform(0.0, 0.5, size=(batch, max_crops, 2))
  hi = lo + rng.uniform(0.1, 0.5, size=(batch, max_crops, 2))
  crops = np.concatenate([lo, np.minimum(hi, 1.0)], axis=-1).astype(np.float32)
  crop_scores = rng.uniform(1.0, 5.0, size=(batch, max_crops)).astype(np.float32)
  n_real = rng.integers(3, max_crops + 1, size=(batch,))
  crop_mask = np.arange(max_crops)[None] < n_real[:, None]
  crops = np.where(crop_mask[..., None], crops, 0.0).astype(np.float32)
  crop_scores = np.where(crop_mask, crop_scores, 0.0).astype(np.float32)
  image_extent = rng.uniform(0.6, 1.0, size=(batch, 2)).astype(np.float32)
  image_extent[::2] = 1.0
  text_queries = np.zeros((batch, max_queries, 16), np.int32)
  for b in range(batch):
    for q in range(1 + b % max_queries):
      length = int(rng.integers(2, 8))
      text_queries[b, q, 0] = 49406
      text_queries[b, q, 1:length - 1] = rng.integers(1, 49000, size=length - 2)
      text_queries[b, q, length - 1] = 49407
  return dict(image=image, crops=crops, crop_scores=crop_scores, crop_mask=crop_mask,
              image_extent=image_extent, text_queries=text_queries)


def input_features(example: dict[str, Any]) -> dict[str, Any]:
  """The TFDS features the input pipeline reads (extras such as `objects` are dropped)."""
  return {k: v for k, v in example.items() if k in INPUT_FEATURES}


def num_train_steps(config: ml_collections.ConfigDict, num_examples: int) -> int:
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  steps = int(config.num_epochs * num_examples // config.batch_size)
  if steps <= 0:
    raise ValueError(f'num_epochs={config.num_epochs} x {num_examples} examples / batch_size='
                     f'{config.batch_size} gives no training step; set num_train_steps')
  return steps


def make_train_iterator(config: ml_collections.ConfigDict, builder, mesh, start_step: int = 0
                        ) -> Iterator[dict[str, jax.Array]]:
  """Global training batches (`TRAIN_KEYS`) for this process, starting after `start_step` batches.

  `checkpoint.data_resume='replay'` skips the first `start_step` batches of the deterministic
  stream (exact resume; the skipped examples are preprocessed again), 'reseed' folds the step
  into the data seed instead (no replay; a different but deterministic order).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from clipcrop_jax import input_pipeline as ip  # pylint: disable=g-import-not-at-top
  d = config.dataset
  per_process = config.batch_size // jax.process_count()
  if per_process * jax.process_count() != config.batch_size:
    raise ValueError(f'batch_size={config.batch_size} is not divisible by the '
                     f'{jax.process_count()} processes')
  seed = config.seed
  if start_step and config.checkpoint.data_resume == 'reseed':
    seed = int(jax.random.randint(jax.random.fold_in(jax.random.PRNGKey(seed), start_step), (),
                                  0, 2**30))
  elif config.checkpoint.data_resume not in ('replay', 'reseed'):
    raise ValueError(f"checkpoint.data_resume={config.checkpoint.data_resume!r}; expected "
                     "'replay' or 'reseed'")
  split = ip.split_for_process(d.train_split)
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={'image': tfds.decode.SkipDecoding()},
                          read_config=tfds.ReadConfig(shuffle_seed=seed))
  ds = ds.map(input_features)
  ds = ip.make_train_dataset(
      ds, image_size=clipcrop_config(config).owlvit_config.image_size, batch_size=per_process,
      max_crops=d.max_crops, seed=seed, mosaic_probs=tuple(d.mosaic_probs),
      shuffle_buffer=d.shuffle_buffer, jitter=d.jitter, flip=d.flip,
      max_queries=d.max_queries, keyword_pipeline=d.keyword_pipeline or None, prefetch=0)
  ds = ds.map(lambda b: {k: b[k] for k in TRAIN_KEYS})
  if start_step and config.checkpoint.data_resume == 'replay':
    ds = ds.skip(start_step)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  return ip.to_global_batches(ds, mesh)


# ------------------------------------------------------------------------------------------------
# State, step.
# ------------------------------------------------------------------------------------------------


def optimizer_config(config: ml_collections.ConfigDict, total_steps: int
                     ) -> ml_collections.ConfigDict:
  opt = ml_collections.ConfigDict(config.optimizer.to_dict())
  opt.total_steps = total_steps
  return opt


def make_init_fn(config: ml_collections.ConfigDict, model: model_lib.ClipCrop,
                 optimizer: optax.GradientTransformation) -> Callable[[jax.Array], TrainState]:
  """rng -> a fresh TrainState (random parameters); jit it with `out_shardings`."""
  size = model.config.owlvit_config.image_size

  def init(rng):
    params_rng, state_rng = jax.random.split(rng)
    images = jnp.zeros((1, size, size, 3), jnp.float32)
    text = jnp.zeros((1, 1, 16), jnp.int32).at[..., 0].set(1)
    params = model.init(params_rng, images, text)['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params), rng=state_rng)
  del config
  return init


def loss_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Keyword arguments of `losses.decoder_losses` from `config.loss`."""
  l = config.loss
  return dict(
      weights={'loss_l1': l.weight_l1, 'loss_giou': l.weight_giou,
               'loss_quality': l.weight_quality},
      aux_loss=l.aux_loss, positive_threshold=l.positive_threshold, score_min=l.score_min,
      score_max=l.score_max, smoothing_iou=l.smoothing_iou, l1_weight=l.cost_l1,
      giou_weight=l.cost_giou, quality_weight=l.cost_quality)


def best_crop_xyxy(crops: jax.Array, crop_scores: jax.Array, crop_mask: jax.Array) -> jax.Array:
  """(B, 4) the highest-scored real crop of each example (the target of the selection filter)."""
  best = jnp.argmax(jnp.where(crop_mask, crop_scores, -jnp.inf), axis=-1)
  return jnp.take_along_axis(crops, best[:, None, None], axis=1)[:, 0]


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: model_lib.ClipCrop,
               optimizer: optax.GradientTransformation, schedule: optax.Schedule,
               loss_kw: dict[str, Any]) -> tuple[TrainState, dict[str, jax.Array]]:
  """One AdamW update on a global batch; returns the new state and scalar metrics."""
  dropout_rng = jax.random.fold_in(state.rng, state.step)
  query_mask = model_lib.query_mask_for_mode(batch['text_queries'], model.config.mode)
  target = best_crop_xyxy(batch['crops'], batch['crop_scores'], batch['crop_mask'])

  def loss_fn(params):
    out = model.apply({'params': params}, batch['image'], text_queries=batch['text_queries'],
                      target_xyxy=target, image_extent=batch['image_extent'], train=True,
                      query_mask=query_mask, rngs={'dropout': dropout_rng})
    loss, terms = losses_lib.decoder_losses(out['aux_boxes'], out['aux_quality_logits'],
                                            batch['crops'], batch['crop_scores'],
                                            batch['crop_mask'], **loss_kw)
    return loss, terms

  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {**terms, 'loss': loss, 'grad_norm': optax.tree_utils.tree_norm(grads),
             'learning_rate': schedule(state.step)}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def make_step_fn(config: ml_collections.ConfigDict, model: model_lib.ClipCrop,
                 optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                 shardings: TrainState, mesh) -> Callable[[TrainState, dict[str, jax.Array]],
                                                         tuple[TrainState, dict[str, jax.Array]]]:
  """`train_step` jitted as training runs it: state sharded by `shardings` (and donated), batch
  on 'data', scalar metrics replicated."""
  return jax.jit(
      lambda s, b: train_step(s, b, model=model, optimizer=optimizer, schedule=schedule,
                              loss_kw=loss_kwargs(config)),
      in_shardings=(shardings, sharding_lib.batch_sharding(mesh)),
      out_shardings=(shardings, sharding_lib.replicated(mesh)), donate_argnums=0)


# ------------------------------------------------------------------------------------------------
# Checkpoints.
# ------------------------------------------------------------------------------------------------


def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  options = ocp.CheckpointManagerOptions(max_to_keep=max(1, int(config.checkpoint.keep)),
                                         create=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)),
                               options=options)


def save_checkpoint(manager, state: TrainState) -> None:
  """Saves `state` at its step; raises if Orbax skips it (it does when a step >= it exists)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  step = int(jax.device_get(state.step))
  if manager.save(step, args=ocp.args.StandardSave(state)) is False:
    raise RuntimeError(f'Orbax did not save step {step} in {manager.directory}: it already holds '
                       f'step {manager.latest_step()}')
  manager.wait_until_finished()


def restore_checkpoint(manager, abstract_state: TrainState, step: Optional[int] = None
                       ) -> TrainState:
  """The checkpoint at `step` (default: latest), restored with `abstract_state`'s shardings."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  step = manager.latest_step() if step is None else step
  return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))


def checkpoint_steps(workdir: str) -> list[int]:
  """The step folders `<workdir>/checkpoints/<N>` on disk, ascending (usable or not)."""
  directory = pathlib.Path(workdir) / CHECKPOINT_DIR
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def _error_summary(error: BaseException) -> str:
  """'Type: first line' of the innermost cause of `error` (Orbax wraps TensorStore's errors)."""
  seen = set()
  while (error.__cause__ or error.__context__) is not None and id(error) not in seen:
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  lines = str(error).strip().splitlines()
  text = f'{type(error).__name__}: {lines[0].strip()}' if lines else type(error).__name__
  return text if len(text) <= 300 else text[:297] + '...'


def _abandoned_read(report: Any) -> bool:
  """An "Exception ignored" report left by a read of a failed Orbax restore."""
  return inspect.iscoroutine(report.object) or (
      isinstance(report.exc_value, RuntimeError) and 'Event loop is closed' in str(
          report.exc_value))


def _unretrieved_read_error(record: python_logging.LogRecord) -> bool:
  """asyncio's log line for a failed read whose error nobody awaited (a failed Orbax restore)."""
  return record.getMessage().split('\n', 1)[0].endswith('exception was never retrieved')


@contextlib.contextmanager
def _quiet_abandoned_reads() -> Iterator[Callable[[], None]]:
  """Silences the reads a failed Orbax restore abandons, then frees them.

  When one read of a step fails, Orbax closes its event loop with the other reads pending. Left
  alone, they print tracebacks at random later times: "Exception ignored" reports (TensorStore
  callbacks finding the loop closed; the coroutines when garbage-collected) and asyncio's
  "exception was never retrieved" log lines. Within this block those are dropped (any other
  report or log line passes). The block yields `settle`, which gives the stragglers
  `ABANDONED_READS_SETTLE_S` to end and collects them; one that ends later still prints.
  """
  hook = sys.unraisablehook
  sys.unraisablehook = lambda report: None if _abandoned_read(report) else hook(report)
  asyncio_logger = python_logging.getLogger('asyncio')
  log_filter = lambda record: not _unretrieved_read_error(record)
  asyncio_logger.addFilter(log_filter)

  def settle():
    time.sleep(ABANDONED_READS_SETTLE_S)
    gc.collect()

  try:
    yield settle
  finally:
    asyncio_logger.removeFilter(log_filter)
    sys.unraisablehook = hook


def _restore_step(checkpointer, step_dir: pathlib.Path, abstract_state: TrainState
                  ) -> tuple[Optional[TrainState], Optional[str]]:
  """(state, None) from one step folder, restored as `CheckpointManager` does, or (None, why)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  if not any(step_dir.iterdir()):
    return None, 'empty folder'
  reason = None
  with _quiet_abandoned_reads() as settle:
    try:
      restored = checkpointer.restore(
          step_dir, args=ocp.args.Composite(default=ocp.args.StandardRestore(abstract_state)))
    except Exception as e:  # pylint: disable=broad-except
      reason = _error_summary(e)
    if reason is not None:  # outside the `except`: its traceback no longer holds the reads
      settle()
  if reason is not None:
    return None, reason
  state = restored['default']
  found = int(jax.device_get(state.step))
  if found != int(step_dir.name):
    return None, f'holds step {found}'
  return state, None


def _set_aside(workdir: str, failed: list[tuple[int, str]]) -> None:
  """Moves unusable step folders to `<workdir>/checkpoints_unusable/<N>[.k]` (process 0)."""
  if jax.process_index() == 0:
    root = pathlib.Path(workdir) / UNUSABLE_CHECKPOINT_DIR
    root.mkdir(exist_ok=True)
    for step, reason in failed:
      target, k = root / str(step), 1
      while target.exists():
        target, k = root / f'{step}.{k}', k + 1
      os.rename(pathlib.Path(workdir) / CHECKPOINT_DIR / str(step), target)
      logging.warning('Moved the unusable checkpoint step %d (%s) to %s; nothing was deleted. '
                      'Training goes on and saves step %d again.', step, reason, target, step)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices('clipcrop_set_aside_checkpoints')


def restore_latest(workdir: str, abstract_state: TrainState, *, set_aside: bool
                   ) -> tuple[Optional[TrainState], Optional[int]]:
  """The newest checkpoint of `<workdir>/checkpoints` that restores, as (state, step).

  Step folders are listed here (not by Orbax's CheckpointManager, which an empty or corrupt step
  folder confuses) and tried newest first. A folder that does not restore (empty, truncated or
  corrupt files, other shapes, a different step inside) is logged with the reason and the
  previous step is tried.

  Args:
    workdir: the run's workdir.
    abstract_state: shapes, dtypes and shardings to restore into.
    set_aside: True when the caller will save checkpoints again (training): the unusable folders
      newer than the restored step are then moved to `<workdir>/checkpoints_unusable/<N>` (never
      deleted), since Orbax would otherwise skip saving any step up to theirs and, with
      `checkpoint.keep`, garbage-collect good steps while keeping them. False (evaluation)
      changes nothing on disk.

  Returns:
    (state, step), or (None, None) when there is no step folder at all.

  Raises:
    CheckpointRestoreError: step folders exist but none restores (one line listing every step
      and why; nothing is moved).
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = pathlib.Path(workdir) / CHECKPOINT_DIR
  failed: list[tuple[int, str]] = []
  state, restored_step = None, None
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  try:
    for step in reversed(checkpoint_steps(workdir)):
      state, reason = _restore_step(checkpointer, directory / str(step), abstract_state)
      if state is not None:
        restored_step = step
        break
      failed.append((step, reason))
      logging.warning('Checkpoint step %d in %s is unusable (%s); trying the previous step.',
                      step, directory, reason)
  finally:
    checkpointer.close()
  if state is None and failed:
    raise CheckpointRestoreError(
        f'no usable checkpoint in {directory}: '
        + '; '.join(f'step {s}: {r}' for s, r in failed)
        + ' (nothing was moved or deleted; repair or remove these step folders, or use a new '
        'workdir)')
  if failed and set_aside:
    _set_aside(workdir, failed)
  return state, restored_step


def _place(tree: Any, shardings: Any) -> Any:
  return jax.tree_util.tree_map(lambda x, s: jax.device_put(np.asarray(x), s), tree, shardings)


def load_params_into(state: TrainState, shardings: TrainState, config: ml_collections.ConfigDict
                     ) -> TrainState:
  """`init_from.clipcrop` (all params) or `init_from.owlvit` (encoder params) into a fresh state.

  The optimizer state is rebuilt for the new parameters (Adam moments start at zero either way).
  """
  params = state.params
  if config.init_from.clipcrop:
    loaded = load_trained_params(config.init_from.clipcrop)[1]
    model_lib.check_param_shapes(params, loaded, config.init_from.clipcrop)
    params = _place(loaded, shardings.params)
    logging.info('Initialised all parameters from %s', config.init_from.clipcrop)
  elif config.init_from.owlvit:
    from clipcrop_jax.owlvit import checkpoints as owl_ckpt  # pylint: disable=g-import-not-at-top
    _, owl_vars = owl_ckpt.load_checkpoint(config.init_from.owlvit)
    owl = owl_vars.get('params', owl_vars)
    model_lib.check_param_shapes(params['owlvit'], owl,
                                 f'OWL-ViT weights {config.init_from.owlvit}')
    params = {**params, 'owlvit': _place(
        jax.tree_util.tree_map(lambda ref, x: x, params['owlvit'], owl), shardings.params['owlvit'])}
    logging.info('Initialised the OWL-ViT encoder from %s', config.init_from.owlvit)
  else:
    return state
  return state.replace(params=params)


def load_trained_params(path: str) -> tuple[model_lib.ClipCropConfig, Any]:
  """(ClipCropConfig, params) from a ClipCropper directory or a training workdir."""
  from clipcrop_jax import cropper as cropper_lib  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  if (path / EXPORT_DIR / cropper_lib.CONFIG_FILE).is_file():
    path = path / EXPORT_DIR
  if not (path / cropper_lib.CONFIG_FILE).is_file():
    raise FileNotFoundError(f'{path}: neither a ClipCropper directory ({cropper_lib.CONFIG_FILE})'
                            f' nor a training workdir with {EXPORT_DIR}/')
  c = cropper_lib.ClipCropper.load(path)
  return c.config, c.variables['params']


# ------------------------------------------------------------------------------------------------
# Logging.
# ------------------------------------------------------------------------------------------------


def _rewrite_jsonl(path: pathlib.Path, keep: Callable[[dict[str, Any]], bool]) -> int:
  """Atomically rewrites a JSONL file with the records `keep` accepts; returns how many it dropped.

  A line that does not parse (torn by a killed process) is dropped too.
  """
  if not path.is_file():
    return 0
  text = path.read_text(encoding='utf-8')
  kept, dropped = [], 0
  for line in text.splitlines():
    if not line.strip():
      continue
    try:
      ok = bool(keep(json.loads(line)))
    except (ValueError, KeyError, TypeError):
      ok = False
    if ok:
      kept.append(line + '\n')
    else:
      dropped += 1
  if dropped or (text and not text.endswith('\n')):
    fileio.atomic_write_text(path, ''.join(kept))
  return dropped


class MetricLogger:
  """TensorBoard (clu metric writers) + `<workdir>/metrics.jsonl`; only process 0 writes files.

  `resume_step`: the step training goes on from. Records of later steps in metrics.jsonl (written
  by an interrupted run after its last usable checkpoint; this run writes them again) are dropped,
  so that the file holds one record per (step, kind). TensorBoard event files are append-only:
  they keep both (TensorBoard shows the newest).
  """

  def __init__(self, workdir: str, resume_step: Optional[int] = None):
    self.is_main = jax.process_index() == 0
    self.jsonl = pathlib.Path(workdir) / METRICS_FILE if self.is_main else None
    if self.jsonl is not None and resume_step is not None:
      dropped = _rewrite_jsonl(self.jsonl, lambda r: int(r['step']) <= resume_step)
      if dropped:
        logging.info('%s: dropped %d record(s) after step %d (the interrupted run wrote them '
                     'after its last usable checkpoint; they are written again)', self.jsonl,
                     dropped, resume_step)
    try:
      from clu import metric_writers  # pylint: disable=g-import-not-at-top
      self.writer = metric_writers.create_default_writer(
          workdir, just_logging=not self.is_main, asynchronous=False)
    except ImportError:  # clu / tensorboard not installed: JSONL only
      logging.warning('clu is not installed: no TensorBoard summaries (pip install '
                      '"clipcrop-jax[train]")')
      self.writer = None

  def write(self, step: int, scalars: dict[str, float], kind: str = 'train',
            replace: bool = False) -> None:
    """Logs `scalars` at `step`; `replace` first drops an earlier (step, kind) record."""
    scalars = {k: float(v) for k, v in scalars.items()}
    if self.writer is not None:
      self.writer.write_scalars(step, {f'{kind}/{k}': v for k, v in scalars.items()})
    if self.jsonl is not None:
      if replace:
        _rewrite_jsonl(self.jsonl, lambda r: (r['step'], r['kind']) != (step, kind))
      with self.jsonl.open('a') as f:
        f.write(json.dumps({'step': step, 'kind': kind, **scalars}) + '\n')

  def close(self) -> None:
    if self.writer is not None:
      self.writer.flush()
      self.writer.close()


def format_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s'


def check_finite(history: list[dict[str, float]], first_step: int, last_good: Optional[int],
                  workdir: str) -> None:
  for i, m in enumerate(history):
    if not math.isfinite(m['loss']):
      where = (f'the last good checkpoint (step {last_good}) is kept in '
               f'{os.path.join(workdir, CHECKPOINT_DIR)}' if last_good is not None
               else 'no checkpoint was written')
      raise NonFiniteLossError(f'loss is {m["loss"]} at step {first_step + i + 1}; training '
                               f'stopped ({where}). Lower optimizer.learning_rate or check the '
                               'data.')


# ------------------------------------------------------------------------------------------------
# Training loop.
# ------------------------------------------------------------------------------------------------


def setup_state(config: ml_collections.ConfigDict, model: model_lib.ClipCrop, mesh,
                total_steps: int):
  """(abstract_state, shardings, init_fn jitted, optimizer, schedule)."""
  size = model.config.owlvit_config.image_size
  abstract_params = jax.eval_shape(
      lambda r: model.init(r, jnp.zeros((1, size, size, 3)),
                           jnp.ones((1, 1, 16), jnp.int32))['params'], jax.random.PRNGKey(0))
  optimizer, schedule = optim.make_optimizer(optimizer_config(config, total_steps),
                                             abstract_params)
  init = make_init_fn(config, model, optimizer)
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  shardings = sharding_lib.tree_shardings(abstract, mesh, config.sharding.rules)
  abstract = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return abstract, shardings, jax.jit(init, out_shardings=shardings), optimizer, schedule


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """`<workdir>/config.json` (atomically: a reader never sees half of it), process 0."""
  if jax.process_index() == 0:
    pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
    fileio.atomic_write_text(pathlib.Path(workdir) / CONFIG_FILE,
                             config.to_json_best_effort(indent=1))


def export_cropper(state: TrainState, model: model_lib.ClipCrop, workdir: str,
                   keyword_pipeline: str) -> Optional[pathlib.Path]:
  """Saves the trained parameters as a ClipCropper directory `<workdir>/clipcrop` (process 0)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from clipcrop_jax import cropper as cropper_lib  # pylint: disable=g-import-not-at-top
  params = multihost_utils.process_allgather(state.params, tiled=True)
  if jax.process_index() != 0:
    return None
  c = cropper_lib.ClipCropper(model.config, {'params': params},
                              keyword_pipeline=keyword_pipeline or None)
  return c.save(pathlib.Path(workdir) / EXPORT_DIR)


def run_steps(step_fn: Callable[[Any, Any], tuple[Any, dict[str, jax.Array]]], state: Any,
              batches: Iterator[Any], *, config: ml_collections.ConfigDict, workdir: str,
              manager, logger: MetricLogger, start: int, end: int, total: int,
              last_good: Optional[int], desc: str = 'train',
              log_terms: tuple[str, ...] = (),
              on_step: Optional[Callable[[Any, int], None]] = None) -> Any:
  """The training loop shared by ClipCrop and OWL-ViT detection training.

  Runs steps start+1 .. end: fetches a batch (timing the wait for input), applies `step_fn`,
  and every `config.log_every_steps` (and before each save) checks the losses are finite
  (`check_finite`), writes their means with steps/s, examples/s and the input-wait share, and
  logs a progress line (loss, `log_terms`, steps/s, input wait, ETA); every
  `config.checkpoint.every_steps` and at `end` it saves a checkpoint; `on_step(state, step)` runs
  after every step (evaluation hooks). A progress bar shows on process 0. Returns the state.
  """
  from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
  history: list[Any] = []
  t_log, step_log, wait = time.time(), start, 0.0
  bar = tqdm.tqdm(total=total, initial=start, desc=desc, unit='step',
                  disable=jax.process_index() != 0, dynamic_ncols=True, mininterval=2.0)
  try:
    for step in range(start + 1, end + 1):
      t0 = time.time()
      batch = next(batches)
      wait += time.time() - t0
      state, metrics = step_fn(state, batch)
      history.append(metrics)
      bar.update(1)
      save_now = step % config.checkpoint.every_steps == 0 or step == end
      if step % config.log_every_steps == 0 or save_now:
        host = [{k: float(v) for k, v in m.items()} for m in jax.device_get(history)]
        check_finite(host, step - len(host), last_good, workdir)
        mean = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        elapsed = max(time.time() - t_log, 1e-9)
        rate = (step - step_log) / elapsed
        mean.update(steps_per_sec=rate, examples_per_sec=rate * config.batch_size,
                    input_wait_fraction=wait / elapsed)
        logger.write(step, mean)
        terms = ''.join(f', {k.replace("loss_", "")} {mean[k]:.4f}' for k in log_terms if k in mean)
        logging.info('step %d/%d | loss %.4f%s | %.2f steps/s | input wait %.0f%% | ETA %s',
                     step, total, mean['loss'], terms, rate, 100 * mean['input_wait_fraction'],
                     format_eta((total - step) / max(rate, 1e-9)))
        bar.set_postfix(loss=f'{mean["loss"]:.4f}')
        history, t_log, step_log, wait = [], time.time(), step, 0.0
      if save_now:
        save_checkpoint(manager, state)
        last_good = step
      if on_step is not None:
        on_step(state, step)
  finally:
    bar.close()
  return state


def train(config: ml_collections.ConfigDict, workdir: str,
          eval_fn: Optional[Callable[[TrainState, int], None]] = None,
          max_steps_this_run: Optional[int] = None) -> TrainState:
  """Trains (resuming from `<workdir>/checkpoints` if present); returns the final state.

  Args:
    config: the run config (`clipcrop_jax.default_config`).
    workdir: checkpoints, metrics, config and the exported model go here.
    eval_fn: called as eval_fn(state, step) every `eval.every_steps` (> 0).
    max_steps_this_run: stop (after checkpointing) when this many steps ran in this call; the
      schedule still spans the whole run (used to test interrupted runs).

  Raises:
    default_config.ConfigError: invalid config or workdir (before anything is built).
    CheckpointRestoreError: checkpoints exist but none restores.
    NonFiniteLossError: the loss became NaN / Inf (the last good checkpoint is kept).
  """
  default_config.validate_config(config, workdir)
  write_config(config, workdir)
  mesh = sharding_lib.make_mesh(config.sharding.mesh_shape)
  builder = dataset_builder(config.dataset.name, config.dataset.data_dir)
  total = num_train_steps(config, builder.info.splits[config.dataset.train_split].num_examples)
  model = build_model(config)
  abstract, shardings, init, optimizer, schedule = setup_state(config, model, mesh, total)
  logging.info('Mesh %s; %s', dict(mesh.shape), optim.describe(abstract.params,
                                                                config.optimizer.lr_multipliers))

  state, last_good = restore_latest(workdir, abstract, set_aside=True)
  if state is not None:
    logging.info('Resumed from %s at step %d', os.path.join(workdir, CHECKPOINT_DIR), last_good)
  else:
    state = init(jax.random.PRNGKey(config.seed))
    state = load_params_into(state, shardings, config)
  start = int(jax.device_get(state.step))
  if start >= total:
    logging.info('Training already finished (step %d of %d)', start, total)
    return state

  manager = checkpoint_manager(workdir, config)
  step_fn = make_step_fn(config, model, optimizer, schedule, shardings, mesh)
  batches = make_train_iterator(config, builder, mesh, start)
  logger = MetricLogger(workdir, resume_step=start)
  end = total if max_steps_this_run is None else min(total, start + max_steps_this_run)

  def on_step(state, step):
    if eval_fn is not None and config.eval.every_steps > 0 and (
        step % config.eval.every_steps == 0) and step != total:
      eval_fn(state, step)

  try:
    state = run_steps(step_fn, state, batches, config=config, workdir=workdir, manager=manager,
                      logger=logger, start=start, end=end, total=total, last_good=last_good,
                      on_step=on_step)
  finally:
    logger.close()
    manager.close()
  if int(jax.device_get(state.step)) >= total:
    path = export_cropper(state, model, workdir, config.dataset.keyword_pipeline)
    if path is not None:
      logging.info('Exported the trained model to %s (python -m clipcrop_jax.crop --checkpoint '
                   '%s ...)', path, path)
  return state


def final_state(config: ml_collections.ConfigDict, workdir: str) -> tuple[TrainState, Any]:
  """(state of the newest usable checkpoint in workdir, mesh) for evaluation-only runs.

  Unusable newer steps are logged and skipped, never moved (`restore_latest`).
  """
  default_config.validate_config(config, workdir)
  mesh = sharding_lib.make_mesh(config.sharding.mesh_shape)
  model = build_model(config)
  abstract, *_ = setup_state(config, model, mesh, max(1, config.num_train_steps))
  state, step = restore_latest(workdir, abstract, set_aside=False)
  if state is None:
    raise NoCheckpointError(f'no checkpoint in {os.path.join(workdir, CHECKPOINT_DIR)} (train '
                            'first, or point --workdir at a trained run)')
  logging.info('Restored %s at step %d', os.path.join(workdir, CHECKPOINT_DIR), step)
  return state, mesh
