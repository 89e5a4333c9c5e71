"""Tests for clipcrop_jax.decoder: shapes, init invariants, conditioning, dropout, NumPy oracle."""

from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipcrop_jax import decoder as decoder_lib

B, GRID, C, C_COND = 2, (6, 6), 64, 48
P = GRID[0] * GRID[1]
TINY = dict(num_layers=2, width=32, num_heads=2, mlp_dim=64, num_queries=7)
# Everything runs under jit (one compile per input structure is cheaper than eager dispatch on CPU),
# and dropout uses the 'rbg' PRNG, which compiles about 2x faster than threefry here.
_DROPOUT_RNG = lambda seed: {'dropout': jax.random.key(seed, impl='rbg')}


def _inputs(seed: int = 0) -> tuple[jax.Array, jax.Array]:
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  return jax.random.normal(k1, (B, P, C)), jax.random.normal(k2, (B, C_COND))


def _jit_apply(model: decoder_lib.CropDecoder):
  return jax.jit(model.apply, static_argnums=2, static_argnames='train')


@pytest.fixture(scope='module')
def tiny():
  """A tiny decoder initialised with a condition, its jitted apply, and its inputs."""
  model = decoder_lib.CropDecoder(**TINY)
  tokens, cond = _inputs()
  variables = jax.jit(model.init, static_argnums=2)(jax.random.PRNGKey(1), tokens, GRID, cond)
  return _jit_apply(model), variables, tokens, cond


# --------------------------------------------------------------------------------------------------
# Sine position embedding.


def _detr_sine_reference(h: int, w: int, dim: int) -> np.ndarray:
  """DETR / Scenic `InputPosEmbeddingSine` on an all-valid mask, written with cumsums."""
  mask = np.ones((1, h, w))
  y_embed, x_embed = np.cumsum(mask, 1), np.cumsum(mask, 2)
  y_embed = y_embed / (y_embed[:, -1:, :] + 1e-6) * 2 * np.pi
  x_embed = x_embed / (x_embed[:, :, -1:] + 1e-6) * 2 * np.pi
  n = dim // 2
  dim_t = 10000.0 ** (2 * (np.arange(n) // 2) / n)
  pos_x, pos_y = x_embed[..., None] / dim_t, y_embed[..., None] / dim_t
  pos_x = np.stack([np.sin(pos_x[..., 0::2]), np.cos(pos_x[..., 1::2])], axis=4).reshape(1, h, w, n)
  pos_y = np.stack([np.sin(pos_y[..., 0::2]), np.cos(pos_y[..., 1::2])], axis=4).reshape(1, h, w, n)
  return np.concatenate([pos_y, pos_x], axis=3).reshape(h * w, dim)


def test_sine_position_embedding_hand_values():
  emb = decoder_lib.sine_position_embedding_2d(2, 3, 8)
  assert emb.shape == (6, 8) and emb.dtype == np.float32
  # Cell (row 1, col 0) is row 1 * 3 + 0 = 3. n = 4 features per axis, periods (1, 1, 100, 100).
  y, x = 2 / (2 + 1e-6) * 2 * np.pi, 1 / (3 + 1e-6) * 2 * np.pi
  want = [
      np.sin(y),
      np.cos(y),
      np.sin(y / 100),
      np.cos(y / 100),
      np.sin(x),
      np.cos(x),
      np.sin(x / 100),
      np.cos(x / 100),
  ]
  np.testing.assert_allclose(emb[3], want, atol=1e-6)
  # Row-major: the y half depends on the row only, the x half on the column only.
  grid = emb.reshape(2, 3, 8)
  np.testing.assert_array_equal(grid[:, 0, :4], grid[:, 2, :4])
  np.testing.assert_array_equal(grid[0, :, 4:], grid[1, :, 4:])
  assert not np.allclose(grid[0, 0, :4], grid[1, 0, :4])


def test_sine_position_embedding_matches_detr_reference():
  for h, w, dim in [(6, 6, 32), (4, 7, 512), (1, 5, 12)]:
    np.testing.assert_allclose(
        decoder_lib.sine_position_embedding_2d(h, w, dim),
        _detr_sine_reference(h, w, dim),
        atol=1e-6,
    )
  with pytest.raises(ValueError, match='divisible by 4'):
    decoder_lib.sine_position_embedding_2d(2, 2, 6)


# --------------------------------------------------------------------------------------------------
# Shapes and parameters.


def _expected_num_params(
    c: int, c_cond: int, width: int, mlp: int, queries: int, layers: int
) -> int:
  """Hand count: every Dense is in * out + out; LayerNorm 2 * W; attention 4 Dense W -> W."""
  dense = lambda i, o: i * o + o
  attention = 4 * dense(width, width)
  layer = 2 * attention + dense(width, mlp) + dense(mlp, width) + 3 * 2 * width
  return (
      dense(c, width)
      + queries * width
      + dense(c_cond, width)
      + layers * layer
      + 2 * width
      + 2 * dense(width, width)
      + dense(width, 4)
      + dense(width, 1)
  )


@pytest.mark.parametrize('config', [TINY, {}], ids=['tiny', 'default'])
def test_shapes_with_eval_shape(config):
  model = decoder_lib.CropDecoder(**config)
  tokens = jax.ShapeDtypeStruct((B, P, C), jnp.float32)
  cond = jax.ShapeDtypeStruct((B, C_COND), jnp.float32)
  variables = jax.eval_shape(
      functools.partial(model.init, grid_hw=GRID), jax.random.PRNGKey(0), tokens, condition=cond
  )
  out = jax.eval_shape(
      functools.partial(model.apply, grid_hw=GRID), variables, tokens, condition=cond
  )
  layers, queries = model.num_layers, model.num_queries
  assert out['offsets'].shape == (layers, B, queries, 4)
  assert out['quality'].shape == out['quality_logits'].shape == (layers, B, queries)
  assert all(v.dtype == jnp.float32 for v in out.values())
  num = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables))
  assert num == _expected_num_params(C, C_COND, model.width, model.mlp_dim, queries, layers)
  if not config:  # Default: L=6, W=512, 8 heads, MLP 2048, M=90.
    assert (layers, queries) == (6, 90)
    assert num == 25_857_541  # 64->512 input, 48->512 condition; 25.2M of it in the 6 layers.


def test_parameter_tree_names(tiny):
  _, variables, _, _ = tiny
  params = variables['params']
  assert set(params) == {
      'input_proj',
      'query_embed',
      'condition_proj',
      'layers_0',
      'layers_1',
      'decoder_norm',
      'offset_head',
      'quality_head',
  }
  assert params['query_embed'].shape == (TINY['num_queries'], TINY['width'])
  assert set(params['layers_0']) == {
      'self_attention',
      'cross_attention',
      'mlp',
      'norm_1',
      'norm_2',
      'norm_3',
  }


# --------------------------------------------------------------------------------------------------
# Init invariants, conditioning, dropout, gradients.


def test_initial_offsets_are_zero_and_quality_in_unit_interval(tiny):
  apply, variables, tokens, cond = tiny
  for c in (cond, None):
    out = apply(variables, tokens, GRID, c)
    assert np.all(np.asarray(out['offsets']) == 0.0)
    quality = np.asarray(out['quality'])
    assert np.all((quality > 0) & (quality < 1))
    np.testing.assert_allclose(quality, jax.nn.sigmoid(out['quality_logits']), atol=1e-7)


def _with_random_offset_head(variables, seed: int = 0):
  params = flax.core.unfreeze(variables['params'])
  kernel = params['offset_head']['dense_2']['kernel']
  params['offset_head']['dense_2']['kernel'] = jax.random.normal(
      jax.random.PRNGKey(seed), kernel.shape
  )
  return {'params': params}


def test_condition_changes_outputs_and_none_path_runs(tiny):
  apply, variables, tokens, cond = tiny
  variables = _with_random_offset_head(variables)
  with_cond = apply(variables, tokens, GRID, cond)
  other_cond = apply(variables, tokens, GRID, cond + 1.0)
  base = apply(variables, tokens, GRID, None)
  for key in ('offsets', 'quality_logits'):
    assert not np.allclose(with_cond[key], base[key], atol=1e-4)
    assert not np.allclose(with_cond[key], other_cond[key], atol=1e-4)
  # Queries differ from each other (learned query embeddings) and images differ from each other.
  assert not np.allclose(base['offsets'][-1, 0, 0], base['offsets'][-1, 0, 1], atol=1e-4)
  assert not np.allclose(base['offsets'][-1, 0], base['offsets'][-1, 1], atol=1e-4)


def test_init_without_condition_has_no_condition_proj():
  model = decoder_lib.CropDecoder(**TINY)
  tokens, cond = _inputs()
  variables = jax.eval_shape(
      functools.partial(model.init, grid_hw=GRID), jax.random.PRNGKey(1), tokens
  )
  assert 'condition_proj' not in variables['params']
  out = jax.eval_shape(functools.partial(model.apply, grid_hw=GRID), variables, tokens)
  assert out['offsets'].shape == (2, B, 7, 4)
  with pytest.raises(flax.errors.ScopeParamNotFoundError):
    jax.eval_shape(functools.partial(model.apply, grid_hw=GRID), variables, tokens, condition=cond)


def test_input_validation(tiny):
  apply, variables, tokens, cond = tiny
  with pytest.raises(ValueError, match='grid_hw'):
    jax.eval_shape(apply, variables, tokens, (5, 6), cond)
  with pytest.raises(ValueError, match='condition'):
    jax.eval_shape(apply, variables, tokens, GRID, cond[:1])


def test_dropout_only_in_train_mode(tiny):
  apply, variables, tokens, cond = tiny
  eval_1 = apply(variables, tokens, GRID, cond)
  eval_2 = apply(variables, tokens, GRID, cond, train=False, rngs=_DROPOUT_RNG(0))
  np.testing.assert_array_equal(eval_1['quality_logits'], eval_2['quality_logits'])
  train_1 = apply(variables, tokens, GRID, cond, train=True, rngs=_DROPOUT_RNG(0))
  train_1b = apply(variables, tokens, GRID, cond, train=True, rngs=_DROPOUT_RNG(0))
  train_2 = apply(variables, tokens, GRID, cond, train=True, rngs=_DROPOUT_RNG(1))
  assert not np.allclose(train_1['quality_logits'], eval_1['quality_logits'], atol=1e-4)
  assert not np.allclose(train_1['quality_logits'], train_2['quality_logits'], atol=1e-4)
  np.testing.assert_array_equal(train_1['quality_logits'], train_1b['quality_logits'])
  with pytest.raises(flax.errors.InvalidRngError):
    jax.eval_shape(apply, variables, tokens, GRID, cond, train=True)


def test_gradients_are_finite(tiny):
  _, variables, tokens, cond = tiny
  model = decoder_lib.CropDecoder(**TINY)

  def loss(params):
    out = model.apply({'params': params}, tokens, GRID, cond)
    target = jnp.full(out['offsets'].shape, 0.1)
    return jnp.mean((out['offsets'] - target) ** 2) + jnp.mean(out['quality_logits'] ** 2)

  grads = jax.jit(jax.grad(loss))(variables['params'])
  leaves = jax.tree_util.tree_leaves_with_path(grads)
  assert all(np.all(np.isfinite(g)) for _, g in leaves)
  assert np.any(grads['offset_head']['dense_2']['kernel'] != 0)
  for name in ('condition_proj', 'input_proj', 'query_embed', 'layers_0'):
    assert any(np.any(g != 0) for g in jax.tree_util.tree_leaves(grads[name])), name


def test_bfloat16_compute_gives_float32_outputs(tiny):
  _, variables, tokens, cond = tiny
  model = decoder_lib.CropDecoder(**TINY, dtype=jnp.bfloat16)
  out = jax.jit(model.apply, static_argnums=2)(variables, tokens, GRID, cond)
  assert out['offsets'].dtype == jnp.float32 and out['offsets'].shape == (2, B, 7, 4)
  reference = tiny[0](variables, tokens, GRID, cond)
  np.testing.assert_allclose(out['quality'], reference['quality'], atol=0.05)


# --------------------------------------------------------------------------------------------------
# A NumPy oracle of the whole forward pass (DETR's layer equations written out independently).


def _np_layer_norm(x, p):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-6) * p['scale'] + p['bias']


def _np_dense(x, p):
  return x @ p['kernel'] + p['bias']


def _np_attention(p, q_in, k_in, v_in):
  q = np.einsum('bnc,chd->bnhd', q_in, p['query']['kernel']) + p['query']['bias']
  k = np.einsum('bnc,chd->bnhd', k_in, p['key']['kernel']) + p['key']['bias']
  v = np.einsum('bnc,chd->bnhd', v_in, p['value']['kernel']) + p['value']['bias']
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  y = np.einsum('bhqk,bkhd->bqhd', weights, v)
  return np.einsum('bqhd,hdc->bqc', y, p['out']['kernel']) + p['out']['bias']


def _np_forward(params, tokens, cond, grid_hw, pre_norm):
  memory = _np_dense(tokens, params['input_proj'])
  width = memory.shape[-1]
  memory_pos = _detr_sine_reference(*grid_hw, width)[None]
  query_pos = params['query_embed'][None]
  t = np.zeros((tokens.shape[0],) + params['query_embed'].shape)
  if cond is not None:
    t = t + _np_dense(cond, params['condition_proj'])[:, None]
  hidden = []
  for i in range(TINY['num_layers']):
    p = params[f'layers_{i}']
    mlp = lambda x: _np_dense(np.maximum(_np_dense(x, p['mlp']['fc1']), 0), p['mlp']['fc2'])
    if pre_norm:
      x = _np_layer_norm(t, p['norm_1'])
      t = t + _np_attention(p['self_attention'], x + query_pos, x + query_pos, x)
      x = _np_layer_norm(t, p['norm_2'])
      t = t + _np_attention(p['cross_attention'], x + query_pos, memory + memory_pos, memory)
      t = t + mlp(_np_layer_norm(t, p['norm_3']))
    else:
      t = _np_layer_norm(
          t + _np_attention(p['self_attention'], t + query_pos, t + query_pos, t), p['norm_1']
      )
      t = _np_layer_norm(
          t + _np_attention(p['cross_attention'], t + query_pos, memory + memory_pos, memory),
          p['norm_2'],
      )
      t = _np_layer_norm(t + mlp(t), p['norm_3'])
    hidden.append(_np_layer_norm(t, params['decoder_norm']))
  hidden = np.stack(hidden)
  head = params['offset_head']
  x = np.maximum(_np_dense(hidden, head['dense_0']), 0)
  x = np.maximum(_np_dense(x, head['dense_1']), 0)
  return _np_dense(x, head['dense_2']), _np_dense(hidden, params['quality_head'])[..., 0]


@pytest.mark.parametrize('pre_norm, use_condition', [(False, True), (True, False)])
def test_forward_matches_numpy_oracle(pre_norm, use_condition):
  model = decoder_lib.CropDecoder(**TINY, pre_norm=pre_norm)
  tokens, cond = _inputs(3)
  shapes = jax.eval_shape(
      functools.partial(model.init, grid_hw=GRID), jax.random.PRNGKey(4), tokens, condition=cond
  )['params']
  # Random values everywhere (LayerNorm scales and the zero-initialised head included).
  rng = np.random.default_rng(5)
  np_params = jax.tree_util.tree_map(
      lambda x: 0.5 * rng.normal(size=x.shape) + (len(x.shape) == 1) * 0.5, shapes
  )
  c = cond if use_condition else None
  params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), np_params)
  out = _jit_apply(model)({'params': params}, tokens, GRID, c)  # XLA:CPU f32 dots are full f32.
  offsets, logits = _np_forward(
      np_params,
      np.asarray(tokens, np.float64),
      None if c is None else np.asarray(c, np.float64),
      GRID,
      pre_norm,
  )
  np.testing.assert_allclose(out['offsets'], offsets, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out['quality_logits'], logits, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# Reference-box embedding (ClipCrop's union box given to the decoder).


def test_sine_box_embedding_hand_values():
  box = jnp.array([[0.2, 0.4, 0.6, 0.6]])  # cx 0.4, cy 0.5, w 0.4, h 0.2
  emb = np.asarray(decoder_lib.sine_box_embedding(box, 8))[0]
  # n = 2 features per value: d = (1, 1) -> [sin(2 pi v), cos(2 pi v)] for each of cx, cy, w, h.
  expected = []
  for v in (0.4, 0.5, 0.4, 0.2):
    expected += [np.sin(2 * np.pi * v), np.cos(2 * np.pi * v)]
  np.testing.assert_allclose(emb, expected, atol=1e-6)
  with pytest.raises(ValueError, match='divisible by 8'):
    decoder_lib.sine_box_embedding(box, 12)


def test_reference_changes_outputs_and_is_lazy():
  model = decoder_lib.CropDecoder(**TINY)
  tokens, _ = _inputs()
  ref = jnp.array([[0.1, 0.1, 0.5, 0.5], [0.3, 0.2, 0.9, 0.7]])
  init = jax.jit(lambda r, t, b: model.init(r, t, GRID, reference_xyxy=b))
  variables = init(jax.random.PRNGKey(0), tokens, ref)
  assert 'reference_proj' in variables['params']
  apply = jax.jit(lambda v, t, b: model.apply(v, t, GRID, reference_xyxy=b))
  a = apply(variables, tokens, ref)['quality_logits']
  b = apply(variables, tokens, ref[::-1])['quality_logits']
  assert not np.allclose(a, b)
  plain = jax.jit(lambda r, t: model.init(r, t, GRID))(jax.random.PRNGKey(0), tokens)
  assert 'reference_proj' not in plain['params']
