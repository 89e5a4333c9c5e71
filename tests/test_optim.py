"""Tests for training.optim: schedule values, groups, freezing, AdamW steps, clipping."""

from __future__ import annotations

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clipcrop_jax.training import optim

LR, END_LR, WD = 1e-4, 1e-6, 0.05


def _config(**overrides) -> types.SimpleNamespace:
  """Optimizer config with ClipCrop's defaults, overridable per test."""
  fields = dict(
      learning_rate=LR,
      end_learning_rate=END_LR,
      warmup_steps=0,
      total_steps=100,
      weight_decay=0.0,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      grad_clip_norm=None,
      lr_multipliers=(),
  )
  fields.update(overrides)
  return types.SimpleNamespace(**fields)


def _params() -> dict:
  """Small param tree shaped like ClipCrop's: an OWL-ViT encoder and a decoder."""
  rng = np.random.default_rng(0)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {
      'owlvit': {
          'backbone': {
              'clip': {
                  'visual': {'conv1': {'kernel': f(3, 4)}, 'ln_pre': {'scale': f(4), 'bias': f(4)}},
                  'text': {'token_embedding': {'embedding': f(5, 4)}},
              }
          },
          'class_head': {'Dense_0': {'kernel': f(4, 2), 'bias': f(2)}},
      },
      'decoder': {'input_proj': {'kernel': f(4, 3), 'bias': f(3)}, 'query_embed': f(2, 3)},
  }


def _ones_like(tree, value=1.0):
  return jax.tree_util.tree_map(lambda x: jnp.full_like(x, value), tree)


def _expected_lr(step, peak, end, warmup, total):
  """Closed-form warmup + cosine decay."""
  if step < warmup:
    return peak * step / warmup
  t = min(step - warmup, total - warmup) / (total - warmup)
  return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * t))


@pytest.mark.parametrize('warmup', [0, 10])
def test_schedule_values(warmup):
  total = 100
  schedule = optim.make_schedule(_config(warmup_steps=warmup, total_steps=total))
  mid = warmup + (total - warmup) // 2
  for step in [0, warmup, mid, total - 1, total, total + 50]:
    np.testing.assert_allclose(
        float(schedule(step)), _expected_lr(step, LR, END_LR, warmup, total), rtol=1e-5, atol=1e-12
    )
  np.testing.assert_allclose(float(schedule(0)), 0.0 if warmup else LR, atol=1e-12)
  np.testing.assert_allclose(float(schedule(warmup)), LR, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(mid)), (LR + END_LR) / 2, rtol=1e-5)
  np.testing.assert_allclose(float(schedule(total)), END_LR, rtol=1e-5)


def test_schedule_accepts_config_dict():
  ml_collections = pytest.importorskip('ml_collections')
  cfg = ml_collections.ConfigDict(
      dict(learning_rate=LR, end_learning_rate=END_LR, warmup_steps=0, total_steps=10)
  )
  np.testing.assert_allclose(float(optim.make_schedule(cfg)(10)), END_LR, rtol=1e-5)
  cfg = ml_collections.ConfigDict(dict(learning_rate=LR, total_steps=10, weight_decay=0.0))
  opt, _ = optim.make_optimizer(cfg, _params())  # Optional fields fall back to defaults.
  opt.init(_params())


@pytest.mark.parametrize(
    'overrides, match',
    [
        (dict(total_steps=0), 'total_steps'),
        (dict(total_steps=-5), 'total_steps'),
        (dict(total_steps=10.5), 'total_steps'),
        (dict(warmup_steps=200), 'warmup_steps'),
        (dict(learning_rate=-1.0), 'learning_rate'),
        (dict(weight_decay=-0.1), 'weight_decay'),
        (dict(lr_multipliers=[('owlvit/.*', -1.0)]), 'multiplier'),
        (dict(lr_multipliers=[('owlvit/(', 1.0)]), 'regex'),
    ],
)
def test_invalid_config_raises(overrides, match):
  with pytest.raises(ValueError, match=match):
    optim.make_optimizer(_config(**overrides), _params())


def test_missing_required_field_raises():
  with pytest.raises(ValueError, match='total_steps'):
    optim.make_schedule(types.SimpleNamespace(learning_rate=LR))


def test_labels_first_match_wins_and_default():
  params = _params()
  rules = [('owlvit/class_head/.*', 0.5), ('owlvit/.*', 0.0), ('class_head', 2.0)]
  labels = optim.param_labels(params, rules)
  assert labels['owlvit']['class_head']['Dense_0']['kernel'] == 'lr_x0.5'
  assert labels['owlvit']['backbone']['clip']['visual']['conv1']['kernel'] == 'frozen'
  assert labels['owlvit']['backbone']['clip']['text']['token_embedding']['embedding'] == 'frozen'
  assert labels['decoder']['input_proj']['kernel'] == 'lr_x1'
  assert labels['decoder']['query_embed'] == 'lr_x1'
  # Reordering changes the winner.
  labels = optim.param_labels(params, rules[1:])
  assert labels['owlvit']['class_head']['Dense_0']['kernel'] == 'frozen'
  # re.search: an unanchored rule also matches under a 'params/' prefix.
  wrapped = optim.param_labels({'params': params}, optim.default_lr_multipliers(True))
  assert wrapped['params']['owlvit']['class_head']['Dense_0']['bias'] == 'frozen'
  assert wrapped['params']['decoder']['input_proj']['bias'] == 'lr_x1'


def test_default_lr_multipliers_and_describe():
  assert optim.default_lr_multipliers(True) == [('owlvit/.*', 0.0)]
  assert optim.default_lr_multipliers(False) == [('owlvit/.*', 0.1)]
  assert optim.default_lr_multipliers(False, 0.5) == [('owlvit/.*', 0.5)]
  text = optim.describe(_params(), optim.default_lr_multipliers(True))
  assert text == 'decoder: 21 params lr x1; owlvit: 50 params frozen', text
  text = optim.describe({'params': _params()}, [('class_head', 0.1), ('owlvit', 0.0)])
  assert text == 'decoder: 21 params lr x1; owlvit: 40 params frozen, 10 params lr x0.1', text


def _array_leaves(tree):
  return [x for x in jax.tree_util.tree_leaves(tree) if hasattr(x, 'shape')]


def test_frozen_params_unchanged_and_no_moments():
  params = _params()
  cfg = _config(
      weight_decay=WD, grad_clip_norm=1.0, lr_multipliers=optim.default_lr_multipliers(True)
  )
  opt, _ = optim.make_optimizer(cfg, params)
  state = opt.init(params)
  new = params
  rng = np.random.default_rng(1)

  @jax.jit
  def step(p, s, g):
    updates, s = opt.update(g, s, p)
    return optax.apply_updates(p, updates), s, updates

  for _ in range(5):
    grads = jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params
    )
    new, state, updates = step(new, state, grads)
    for u in jax.tree_util.tree_leaves(updates['owlvit']):
      assert np.all(np.asarray(u) == 0.0)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_array_equal(a, b), params['owlvit'], new['owlvit']
  )
  assert not np.allclose(
      new['decoder']['input_proj']['kernel'], params['decoder']['input_proj']['kernel']
  )

  # Only the decoder's parameters have Adam moments: 2 x decoder size, plus scalar counts.
  n_decoder = sum(x.size for x in jax.tree_util.tree_leaves(params['decoder']))
  big = [x.size for x in _array_leaves(state) if x.ndim > 0]
  assert sum(big) == 2 * n_decoder
  multi_state = state[-1]
  assert not _array_leaves(multi_state.inner_states['frozen'])
  for tree_name in ('mu', 'nu'):
    adam = multi_state.inner_states['lr_x1'].inner_state[0]
    moments = getattr(adam, tree_name)
    assert not _array_leaves(moments['owlvit'])


def test_multiplier_scales_first_adam_step():
  params = _params()
  grads = jax.tree_util.tree_map(
      lambda x: jnp.asarray(np.random.default_rng(2).normal(size=x.shape), jnp.float32), params
  )
  cfg = _config(lr_multipliers=[('owlvit/.*', 0.1)])
  opt, schedule = optim.make_optimizer(cfg, params)
  updates, _ = opt.update(grads, opt.init(params), params)
  lr0 = float(schedule(0))
  eps = cfg.eps
  for name, mult in (('owlvit', 0.1), ('decoder', 1.0)):
    expected = jax.tree_util.tree_map(lambda g: -lr0 * mult * g / (jnp.abs(g) + eps), grads[name])
    jax.tree_util.tree_map(
        lambda u, e: np.testing.assert_allclose(u, e, rtol=1e-5, atol=1e-12),
        updates[name],
        expected,
    )
  # Same gradients under multiplier 1 everywhere: the encoder's step is exactly 0.1x.
  opt_full, _ = optim.make_optimizer(_config(), params)
  full, _ = opt_full.update(grads, opt_full.init(params), params)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, 0.1 * b, rtol=1e-6),
      updates['owlvit'],
      full['owlvit'],
  )


def test_weight_decay_on_kernels_not_biases():
  params = _params()
  opt, schedule = optim.make_optimizer(_config(weight_decay=WD), params)
  zeros = _ones_like(params, 0.0)
  updates, _ = opt.update(zeros, opt.init(params), params)
  lr0 = float(schedule(0))
  kernel = params['decoder']['input_proj']['kernel']
  np.testing.assert_allclose(
      updates['decoder']['input_proj']['kernel'], -lr0 * WD * kernel, rtol=1e-5
  )
  np.testing.assert_allclose(
      updates['decoder']['query_embed'], -lr0 * WD * params['decoder']['query_embed'], rtol=1e-5
  )
  np.testing.assert_array_equal(updates['decoder']['input_proj']['bias'], 0.0)
  ln = updates['owlvit']['backbone']['clip']['visual']['ln_pre']
  np.testing.assert_array_equal(ln['scale'], 0.0)
  np.testing.assert_array_equal(ln['bias'], 0.0)


def test_clipping_by_global_norm():
  params = _params()
  rules = [('owlvit/backbone/.*', 0.0)]
  clip = 1.0
  rng = np.random.default_rng(3)
  huge = jax.tree_util.tree_map(
      lambda x: jnp.asarray(1e3 * rng.normal(size=x.shape), jnp.float32), params
  )
  # The frozen backbone's gradients must not count towards the norm.
  trainable = {'owlvit': {'class_head': huge['owlvit']['class_head']}, 'decoder': huge['decoder']}
  norm = float(optax.tree.norm(trainable))
  assert norm > clip
  clipped = jax.tree_util.tree_map(lambda g: g * clip / norm, huge)

  opt_clip, _ = optim.make_optimizer(
      _config(grad_clip_norm=clip, b1=0.5, lr_multipliers=rules), params
  )
  opt_plain, _ = optim.make_optimizer(
      _config(grad_clip_norm=None, b1=0.5, lr_multipliers=rules), params
  )
  # Two steps with different gradients, so the result depends on the gradients' scale.
  s_clip, s_plain = opt_clip.init(params), opt_plain.init(params)
  u_clip, s_clip = opt_clip.update(huge, s_clip, params)
  u_plain, s_plain = opt_plain.update(clipped, s_plain, params)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-12), u_clip, u_plain
  )
  small = _ones_like(params, 1e-3)  # Norm below clip: passes through unchanged.
  u_clip, _ = opt_clip.update(small, s_clip, params)
  u_plain, _ = opt_plain.update(small, s_plain, params)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-12), u_clip, u_plain
  )
  # Clipping disabled by a non-positive norm.
  opt_zero, _ = optim.make_optimizer(_config(grad_clip_norm=0.0, lr_multipliers=rules), params)
  assert len(opt_zero.init(params)) == 2  # Only the frozen zeroing and multi_transform.
