"""The task-agnostic training core: state, sharded set-up, resume, step, loop, logs.

A task (`clipcrop_task.ClipCropTask`, `detection_task.DetectionTask`) says what is trained and on
what (`Task`); `train(task, workdir)` does the rest the same way for every task: validates the
config (`config_validation`), writes `<workdir>/config.json`, builds the mesh and the sharded
state, resumes from the newest usable checkpoint (`checkpointing.restore_latest`) or the task's
pretrained weights or a random init, runs the jitted steps with progress lines and metrics
(`metric_log`), saves checkpoints, stops on a non-finite loss, evaluates every
`Task.eval_every_steps` and calls `Task.finish` (the export) at the end. Errors a user can act on
are `errors.RunError`s. docs/training.md.
"""

from __future__ import annotations

import dataclasses
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
import optax.tree_utils

from clipcrop_jax import config_validation

from clipcrop_jax import default_config
from clipcrop_jax import errors
from clipcrop_jax.owlvit import fileio
from clipcrop_jax import sharding as sharding_lib
from clipcrop_jax.training import checkpointing
from clipcrop_jax.training import metric_log
from clipcrop_jax.training import optim

CONFIG_FILE = 'config.json'
METRICS_FILE = metric_log.METRICS_FILE
CHECKPOINT_DIR = checkpointing.CHECKPOINT_DIR

Params = Any
Batch = dict[str, jax.Array]
LossFn = Callable[[Params, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs. `step` counts optimizer updates (= batches consumed)."""

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


# ------------------------------------------------------------------------------------------------
# What a task supplies.
# ------------------------------------------------------------------------------------------------


class Task:
  """One training task on the core: what is trained, on which data, with which loss.

  `train(task, workdir)` calls, in order: `dataset_builder()`; `init_params(rng, {})` under
  `jax.eval_shape` (shapes only); on a fresh start `pretrained_params(abstract_params)` and
  `init_params(rng, pretrained)` under jit; `train_batches(...)`; `loss_fn` inside the jitted
  step; `evaluate(...)` every `eval_every_steps` steps; `finish(...)` once all steps are done.

  Attributes:
    config: the run config (`default_config.get_default_config` or `get_detection_config`).
    name: the `config_validation.validate_config` task ('clipcrop' | 'detection'); also the
      progress bar's label.
    log_terms: loss terms (keys of `loss_fn`'s terms) shown in the progress line.
  """

  name: str = ''
  log_terms: tuple[str, ...] = ()

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  def dataset_builder(self):
    """The prepared TFDS dataset `config.dataset.name` (fails early on missing features)."""
    from clipcrop_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top

    return input_pipeline.dataset_builder(self.config.dataset.name, self.config.dataset.data_dir)

  def init_params(self, rng: jax.Array, pretrained: dict[str, Params]) -> Params:
    """The parameters of a fresh run (traced under jit): `pretrained` top-level subtrees as
    given, the others initialised from `rng`. `pretrained` is {} for a random init."""
    raise NotImplementedError

  def pretrained_params(self, abstract_params: Params) -> dict[str, Params]:
    """Top-level parameter subtrees to start from (host arrays, shapes checked against
    `abstract_params`, e.g. from `config.init_from`); {} = none."""
    del abstract_params
    return {}

  def train_batches(self, builder, mesh: jax.sharding.Mesh, start_step: int) -> Iterator[Batch]:
    """Global training batches after `start_step` consumed ones (`data_position`)."""
    raise NotImplementedError

  def loss_fn(
      self, params: Params, batch: Batch, rng: jax.Array
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, scalar terms) of a global batch; `rng` is this step's (dropout) key."""
    raise NotImplementedError

  @property
  def eval_every_steps(self) -> int:
    """`evaluate` runs every this many steps during training (<= 0: never; the final step is
    the task's `finish`)."""
    return -1

  def evaluate(
      self, state: TrainState, step: int, builder, logger: metric_log.MetricLogger
  ) -> None:
    """An evaluation during training, at `step` (a multiple of `eval_every_steps`)."""

  def finish(
      self, state: TrainState, workdir: str, builder, logger: metric_log.MetricLogger
  ) -> None:
    """Once all steps are done (also on a re-run of a finished workdir): the export."""


# ------------------------------------------------------------------------------------------------
# Distributed start-up, run length, input position.
# ------------------------------------------------------------------------------------------------


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """`jax.distributed.initialize` for multi-host runs (`config.distributed.initialize`)."""
  d = config.distributed
  if not d.initialize:
    return
  kwargs = {}
  if d.coordinator_address:
    kwargs = dict(
        coordinator_address=d.coordinator_address,
        num_processes=d.num_processes,
        process_id=d.process_id,
    )
  # Cross-process collectives on CPU need gloo (the default from some jax version on; older
  # versions default to none). Only the CPU client reads it, so GPU / TPU runs are unaffected.
  if getattr(jax.config, 'jax_cpu_collectives_implementation', 'gloo') in (None, 'none'):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(**kwargs)  # without arguments: cluster auto-detection (TPU, SLURM)


_QUIET_PACKAGES = ('orbax', 'tensorflow_datasets')


class _QuietLibraries(python_logging.Filter):
  """Drops INFO lines of Orbax / TFDS internals (one per checkpoint file, dataset read, ...)."""

  def filter(self, record: python_logging.LogRecord) -> bool:
    if record.levelno >= python_logging.WARNING:
      return True
    path = record.pathname.replace(os.sep, '/')
    return not any(f'/{p}/' in path for p in _QUIET_PACKAGES)


def run_command(
    config: Optional[ml_collections.ConfigDict],
    workdir: Optional[str],
    run: Callable[[], Any],
    task: str = 'clipcrop',
) -> None:
  """The frame of the training command lines (`clipcrop_jax.main`, `detection_train`).

  Checks `config` and `workdir` (`config_validation.validate_config`; a problem is one `error:`
  line, exit code 2), quiets Orbax / TFDS INFO logs, keeps TensorFlow (tf.data) off the
  accelerators, starts multi-host JAX (`initialize_distributed`) and calls `run()`; an
  `errors.RunError` is printed as one `error:` line (exit code 1), without a traceback.
  """
  if config is None or not workdir:
    config_validation.usage_exit('--config and --workdir are required')
  try:
    config_validation.validate_config(config, workdir, task=task)
  except config_validation.ConfigError as e:
    config_validation.usage_exit(str(e))
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  tf.config.set_visible_devices([], 'GPU')  # tf.data only: keep the accelerators for JAX
  initialize_distributed(config)
  try:
    run()
  except errors.RunError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


def num_train_steps(config: ml_collections.ConfigDict, num_examples: int) -> int:
  """`num_train_steps` when > 0, else `num_epochs` over `num_examples` at `batch_size`."""
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  steps = int(config.num_epochs * num_examples // config.batch_size)
  if steps <= 0:
    raise ValueError(
        f'num_epochs={config.num_epochs} x {num_examples} examples / batch_size='
        f'{config.batch_size} gives no training step; set num_train_steps'
    )
  return steps


def data_position(config: ml_collections.ConfigDict, start_step: int) -> tuple[int, int]:
  """(data seed, batches to skip) for an input stream that resumes after `start_step` batches.

  `checkpoint.data_resume='replay'`: the config's seed, skipping the first `start_step` batches
  of the deterministic stream (exact resume; the skipped examples are preprocessed again).
  'reseed': no skip, the step folded into the seed instead (a different but deterministic
  order). A fresh run (`start_step` 0) is (seed, 0) either way.
  """
  seed, mode = int(config.seed), config.checkpoint.data_resume
  if mode not in default_config.DATA_RESUME:
    raise ValueError(
        f'checkpoint.data_resume={mode!r}; expected one of ' f'{default_config.DATA_RESUME}'
    )
  if not start_step:
    return seed, 0
  if mode == 'replay':
    return seed, int(start_step)
  key = jax.random.fold_in(jax.random.PRNGKey(seed), start_step)
  return int(jax.random.randint(key, (), 0, 2**30)), 0


def optimizer_config(
    config: ml_collections.ConfigDict, total_steps: int
) -> ml_collections.ConfigDict:
  """`config.optimizer` with `total_steps` (the schedule's length) set."""
  opt = ml_collections.ConfigDict(config.optimizer.to_dict())
  opt.total_steps = total_steps
  return opt


# ------------------------------------------------------------------------------------------------
# State, step.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Setup:
  """The train state's structure and how to create it (`setup_state`).

  Attributes:
    abstract: the TrainState as ShapeDtypeStructs carrying their shardings (restore target).
    shardings: the TrainState's shardings (NamedSharding leaves).
    init: jitted (rng, pretrained) -> a fresh, sharded TrainState; `pretrained` as returned by
      `Task.pretrained_params` after `place` ({} = random init). Donates `pretrained`.
    optimizer, schedule: from `optim.make_optimizer`.
  """

  abstract: TrainState
  shardings: TrainState
  init: Callable[[jax.Array, dict[str, Params]], TrainState]
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule


def setup_state(task: Task, mesh: jax.sharding.Mesh, total_steps: int) -> Setup:
  """Shapes (by `jax.eval_shape`, nothing is computed), shardings and the jitted init."""
  config = task.config
  abstract_params = jax.eval_shape(lambda r: task.init_params(r, {}), jax.random.PRNGKey(0))
  optimizer, schedule = optim.make_optimizer(optimizer_config(config, total_steps), abstract_params)

  def init(rng, pretrained):
    params_rng, state_rng = jax.random.split(rng)
    params = task.init_params(params_rng, pretrained)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=state_rng,
    )

  abstract = jax.eval_shape(lambda r: init(r, {}), jax.random.PRNGKey(0))
  shardings = sharding_lib.tree_shardings(abstract, mesh, config.sharding.rules)
  abstract = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )
  return Setup(
      abstract=abstract,
      shardings=shardings,
      init=jax.jit(init, out_shardings=shardings, donate_argnums=1),
      optimizer=optimizer,
      schedule=schedule,
  )


def place(tree: Any, shardings: Any) -> Any:
  """Host arrays -> global arrays with `shardings` (a tree of the same structure)."""
  return jax.tree_util.tree_map(lambda x, s: jax.device_put(np.asarray(x), s), tree, shardings)


def fresh_state(task: Task, setup: Setup) -> TrainState:
  """A new TrainState: the task's pretrained parameters, the rest initialised from
  `config.seed` (the same seed gives the same state)."""
  pretrained = task.pretrained_params(setup.abstract.params)
  pretrained = {k: place(v, setup.shardings.params[k]) for k, v in pretrained.items()}
  return setup.init(jax.random.PRNGKey(task.config.seed), pretrained)


def make_train_step(
    loss_fn: LossFn, optimizer: optax.GradientTransformation, schedule: optax.Schedule
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """(state, global batch) -> (next state, scalar metrics): one optimizer update of `loss_fn`.

  The metrics are `loss_fn`'s terms plus 'loss', 'grad_norm' and 'learning_rate' (of this step).
  `loss_fn` gets the step's rng, `fold_in(state.rng, state.step)` (dropout).
  """

  def train_step(state: TrainState, batch: Batch):
    rng = jax.random.fold_in(state.rng, state.step)
    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        **terms,
        'loss': loss,
        'grad_norm': optax.tree_utils.tree_norm(grads),
        'learning_rate': schedule(state.step),
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def jit_train_step(
    train_step: Callable[[TrainState, Batch], Any], shardings: TrainState, mesh: jax.sharding.Mesh
) -> Callable[[TrainState, Batch], Any]:
  """`train_step` jitted as training runs it: state sharded by `shardings` (and donated),
  batch on 'data', scalar metrics replicated."""
  return jax.jit(
      train_step,
      in_shardings=(shardings, sharding_lib.batch_sharding(mesh)),
      out_shardings=(shardings, sharding_lib.replicated(mesh)),
      donate_argnums=0,
  )


def make_step_fn(
    task: Task, setup: Setup, mesh: jax.sharding.Mesh
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """The task's train step as `train` runs it (`make_train_step` + `jit_train_step`)."""
  return jit_train_step(
      make_train_step(task.loss_fn, setup.optimizer, setup.schedule), setup.shardings, mesh
  )


def host_params(state: TrainState) -> Params:
  """The parameters as host NumPy arrays on every process (gathered across processes)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  if jax.process_count() > 1:
    return multihost_utils.process_allgather(state.params, tiled=True)
  return jax.device_get(state.params)


# ------------------------------------------------------------------------------------------------
# Logging.
# ------------------------------------------------------------------------------------------------


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """`<workdir>/config.json` (atomically: a reader never sees half of it), process 0."""
  if jax.process_index() == 0:
    pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
    fileio.atomic_write_text(
        pathlib.Path(workdir) / CONFIG_FILE, config.to_json_best_effort(indent=1)
    )


def format_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s'


def check_finite(
    history: list[dict[str, float]], first_step: int, last_good: Optional[int], workdir: str
) -> None:
  for i, m in enumerate(history):
    if not math.isfinite(m['loss']):
      where = (
          f'the last good checkpoint (step {last_good}) is kept in '
          f'{os.path.join(workdir, CHECKPOINT_DIR)}'
          if last_good is not None
          else 'no checkpoint was written'
      )
      raise errors.NonFiniteLossError(
          f'loss is {m["loss"]} at step {first_step + i + 1}; training '
          f'stopped ({where}). Lower optimizer.learning_rate or check the '
          'data.'
      )


# ------------------------------------------------------------------------------------------------
# The loop.
# ------------------------------------------------------------------------------------------------


def run_steps(
    step_fn: Callable[[Any, Any], tuple[Any, dict[str, jax.Array]]],
    state: Any,
    batches: Iterator[Any],
    *,
    config: ml_collections.ConfigDict,
    workdir: str,
    manager,
    logger: metric_log.MetricLogger,
    start: int,
    end: int,
    total: int,
    last_good: Optional[int],
    desc: str = 'train',
    log_terms: tuple[str, ...] = (),
    on_step: Optional[Callable[[Any, int], None]] = None,
) -> Any:
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
  bar = tqdm.tqdm(
      total=total,
      initial=start,
      desc=desc,
      unit='step',
      disable=jax.process_index() != 0,
      dynamic_ncols=True,
      mininterval=2.0,
  )
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
        mean.update(
            steps_per_sec=rate,
            examples_per_sec=rate * config.batch_size,
            input_wait_fraction=wait / elapsed,
        )
        logger.write(step, mean)
        terms = ''.join(f', {k.replace("loss_", "")} {mean[k]:.4f}' for k in log_terms if k in mean)
        logging.info(
            'step %d/%d | loss %.4f%s | %.2f steps/s | input wait %.0f%% | ETA %s',
            step,
            total,
            mean['loss'],
            terms,
            rate,
            100 * mean['input_wait_fraction'],
            format_eta((total - step) / max(rate, 1e-9)),
        )
        bar.set_postfix(loss=f'{mean["loss"]:.4f}')
        history, t_log, step_log, wait = [], time.time(), step, 0.0
      if save_now:
        checkpointing.save_checkpoint(manager, state)
        last_good = step
      if on_step is not None:
        on_step(state, step)
  finally:
    bar.close()
  return state


# ------------------------------------------------------------------------------------------------
# The run.
# ------------------------------------------------------------------------------------------------


def train(task: Task, workdir: str, max_steps_this_run: Optional[int] = None) -> TrainState:
  """Trains `task` in `workdir` (resuming from its checkpoints); returns the final state.

  Args:
    task: the task (its `config` is the run config).
    workdir: config.json, checkpoints, metrics and the task's export go here.
    max_steps_this_run: stop (after checkpointing) when this many steps ran in this call; the
      schedule still spans the whole run (used to test interrupted runs).

  Raises:
    config_validation.ConfigError: invalid config or workdir (before anything is built).
    errors.CheckpointRestoreError: checkpoints exist but none restores.
    errors.NonFiniteLossError: the loss became NaN / Inf (the last good checkpoint is kept).
    errors.DatasetNotPreparedError: the dataset is not prepared.
  """
  config = task.config
  config_validation.validate_config(config, workdir, task=task.name)
  write_config(config, workdir)
  mesh = sharding_lib.make_mesh(config.sharding.mesh_shape)
  builder = task.dataset_builder()
  total = num_train_steps(config, builder.info.splits[config.dataset.train_split].num_examples)
  setup = setup_state(task, mesh, total)
  logging.info(
      'Mesh %s; %s',
      dict(mesh.shape),
      optim.describe(setup.abstract.params, config.optimizer.lr_multipliers),
  )

  state, last_good = checkpointing.restore_latest(workdir, setup.abstract, set_aside=True)
  if state is not None:
    logging.info('Resumed from %s at step %d', os.path.join(workdir, CHECKPOINT_DIR), last_good)
  else:
    state = fresh_state(task, setup)
  start = int(jax.device_get(state.step))
  end = total if max_steps_this_run is None else min(total, start + max_steps_this_run)
  if start >= total:
    logging.info('Training already finished (step %d of %d)', start, total)

  manager = checkpointing.checkpoint_manager(workdir, config)
  logger = metric_log.MetricLogger(workdir, resume_step=start)
  try:
    if start < end:
      state = run_steps(
          make_step_fn(task, setup, mesh),
          state,
          task.train_batches(builder, mesh, start),
          config=config,
          workdir=workdir,
          manager=manager,
          logger=logger,
          start=start,
          end=end,
          total=total,
          last_good=last_good,
          desc=task.name,
          log_terms=task.log_terms,
          on_step=lambda s, step: _periodic_eval(task, s, step, total, builder, logger),
      )
    if int(jax.device_get(state.step)) >= total:
      task.finish(state, workdir, builder, logger)
  finally:
    logger.close()
    manager.close()
  return state


def _periodic_eval(
    task: Task, state: TrainState, step: int, total: int, builder, logger: metric_log.MetricLogger
) -> None:
  every = task.eval_every_steps
  if every > 0 and step % every == 0 and step != total:
    task.evaluate(state, step, builder, logger)


def restore_for_eval(task: Task, workdir: str) -> tuple[TrainState, jax.sharding.Mesh]:
  """(state of the newest usable checkpoint in workdir, mesh) for evaluation-only runs.

  Unusable newer steps are logged and skipped, never moved (`restore_latest`).

  Raises:
    errors.NoCheckpointError: the workdir has no checkpoint.
  """
  config = task.config
  config_validation.validate_config(config, workdir, task=task.name)
  mesh = sharding_lib.make_mesh(config.sharding.mesh_shape)
  setup = setup_state(task, mesh, max(1, config.num_train_steps))
  state, step = checkpointing.restore_latest(workdir, setup.abstract, set_aside=False)
  if state is None:
    raise errors.NoCheckpointError(
        f'no checkpoint in {os.path.join(workdir, CHECKPOINT_DIR)} '
        '(train first, or point --workdir at a trained run)'
    )
  logging.info('Restored %s at step %d', os.path.join(workdir, CHECKPOINT_DIR), step)
  return state, mesh
