"""The task-agnostic training core (clipcrop_jax.training.trainer)."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from clipcrop_jax import model as model_lib
from clipcrop_jax import sharding as sharding_lib
from clipcrop_jax.training import trainer

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / 'clipcrop_jax'


def _config(seed=3, data_resume='replay') -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(seed=seed, checkpoint=dict(data_resume=data_resume)))


def test_data_position_replays_or_reseeds():
  assert trainer.data_position(_config(), 0) == (3, 0)
  assert trainer.data_position(_config(data_resume='reseed'), 0) == (3, 0)
  assert trainer.data_position(_config(), 7) == (3, 7)
  seed, skip = trainer.data_position(_config(data_resume='reseed'), 7)
  expected = int(jax.random.randint(jax.random.fold_in(jax.random.PRNGKey(3), 7), (), 0, 2**30))
  assert (seed, skip) == (expected, 0)
  assert trainer.data_position(_config(data_resume='reseed'), 8)[0] != seed
  with pytest.raises(ValueError, match='data_resume'):
    trainer.data_position(_config(data_resume='rewind'), 1)


def test_process_batch_size(monkeypatch):
  assert sharding_lib.process_batch_size(12) == 12
  monkeypatch.setattr(jax, 'process_count', lambda: 3)
  assert sharding_lib.process_batch_size(12) == 4
  with pytest.raises(ValueError, match=r'eval.batch_size=8 is not divisible by the 3 processes'):
    sharding_lib.process_batch_size(8, 'eval.batch_size')


def test_make_train_step_is_one_optimizer_update():
  """Against a hand-written update of a quadratic loss with optax's AdamW."""
  target = jnp.asarray([1.0, -2.0, 0.5])

  def loss_fn(params, batch, rng):
    del rng
    err = params['w'] * batch['x'] - target
    return jnp.sum(err**2), {'loss_sq': jnp.sum(err**2)}

  schedule = optax.linear_schedule(0.1, 0.0, 10)
  optimizer = optax.adamw(schedule)
  params = {'w': jnp.asarray([0.3, 0.2, -0.1])}
  state = trainer.TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=optimizer.init(params),
      rng=jax.random.PRNGKey(0),
  )
  batch = {'x': jnp.asarray([1.0, 2.0, 3.0])}
  step = jax.jit(trainer.make_train_step(loss_fn, optimizer, schedule))
  new, metrics = step(state, batch)

  grads = jax.grad(lambda p: loss_fn(p, batch, None)[0])(params)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  np.testing.assert_allclose(new.params['w'], params['w'] + updates['w'], atol=1e-6)
  assert int(new.step) == 1
  np.testing.assert_allclose(metrics['grad_norm'], np.linalg.norm(grads['w']), rtol=1e-6)
  assert float(metrics['learning_rate']) == pytest.approx(0.1)
  assert float(metrics['loss']) == pytest.approx(float(metrics['loss_sq']))
  _, metrics2 = step(new, batch)
  assert float(metrics2['learning_rate']) == pytest.approx(0.09)


@pytest.mark.parametrize('mode', ['full', 'base', 'image'])
def test_decoder_only_init_equals_the_full_init(mode):
  """The decoder created without OWL-ViT is the decoder a full init creates (same rng)."""
  model = model_lib.ClipCrop(model_lib.TINY.replace(mode=mode))
  rng = jax.random.PRNGKey(11)
  full = model_lib.init_params(model, rng)['decoder']
  alone = model_lib.init_decoder_params(model, rng)
  assert jax.tree_util.tree_structure(full) == jax.tree_util.tree_structure(alone)
  for a, b in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(alone)):
    np.testing.assert_array_equal(a, b)
  other = model_lib.init_decoder_params(model, jax.random.PRNGKey(12))
  assert any(
      not np.array_equal(a, b)
      for a, b in zip(jax.tree_util.tree_leaves(other), jax.tree_util.tree_leaves(alone))
  )


def test_decoder_only_init_never_touches_owlvit_for_b32():
  """B/32: same decoder shapes as a full init, and the jaxpr has no OWL-ViT-sized array."""
  model = model_lib.ClipCrop(model_lib.ClipCropConfig())
  key = jax.random.PRNGKey(0)
  full = jax.eval_shape(lambda r: model_lib.init_params(model, r)['decoder'], key)
  alone = jax.eval_shape(lambda r: model_lib.init_decoder_params(model, r), key)
  shapes = lambda t: jax.tree_util.tree_map(lambda x: x.shape, t)
  assert shapes(full) == shapes(alone)
  jaxpr = jax.make_jaxpr(lambda r: model_lib.init_decoder_params(model, r))(key)
  sizes = [int(np.prod(v.aval.shape)) for eqn in jaxpr.eqns for v in eqn.outvars]
  owl = model.config.owlvit_config
  assert max(sizes) < owl.vision_width * owl.vision_width * 4  # no ViT MLP kernel is made


def test_clipcrop_fresh_state_from_owlvit_weights(load_config, tmp_path):
  """init_from.owlvit: the encoder is the file's, the decoder the full init's, no random ViT."""
  from clipcrop_jax.owlvit import checkpoints as ck  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.owlvit import model as owl_model  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.training import clipcrop_task  # pylint: disable=g-import-not-at-top

  owl = owl_model.init_variables(model_lib.TINY.owlvit_config, seed=5)
  path = ck.save_scenic_checkpoint(owl, tmp_path / 'owl.msgpack')
  config = load_config('configs/tiny.py', **{'init_from.owlvit': str(path)})
  task = clipcrop_task.ClipCropTask(config)
  mesh = sharding_lib.make_mesh((1, 1), jax.devices()[:1])
  setup = trainer.setup_state(task, mesh, 3)
  state = trainer.fresh_state(task, setup)
  loaded = ck.load_checkpoint(path)[1]['params']
  for a, b in zip(
      jax.tree_util.tree_leaves(state.params['owlvit']), jax.tree_util.tree_leaves(loaded)
  ):
    np.testing.assert_array_equal(a, b)
  params_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  expected = model_lib.init_params(task.model, params_rng)['decoder']
  for a, b in zip(
      jax.tree_util.tree_leaves(state.params['decoder']), jax.tree_util.tree_leaves(expected)
  ):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(state.rng, state_rng)
  assert int(state.step) == 0
  assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(setup.abstract)


def test_periodic_evaluation_runs_every_n_steps_but_not_at_the_end():
  """`Task.evaluate` at the multiples of `eval_every_steps` before the last step (the last one
  is the task's `finish`); never when `eval_every_steps` <= 0."""
  calls = []

  class Every2(trainer.Task):
    eval_every_steps = 2

    def evaluate(self, state, step, builder, logger):
      calls.append((state, step, builder, logger))

  task = Every2(ml_collections.ConfigDict())
  for step in range(1, 7):
    trainer._periodic_eval(task, 's', step, 6, 'builder', 'logger')  # pylint: disable=protected-access
  assert calls == [('s', 2, 'builder', 'logger'), ('s', 4, 'builder', 'logger')]
  calls.clear()
  never = trainer.Task(ml_collections.ConfigDict())
  for step in range(1, 7):
    trainer._periodic_eval(never, 's', step, 6, 'b', 'l')  # pylint: disable=protected-access
  assert calls == []
