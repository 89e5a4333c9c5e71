"""OWL-ViT module tests: box bias reference values, shapes, masking, methods, one-shot rule, demo."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from clipcrop_jax.owlvit import clip as clip_lib
from clipcrop_jax.owlvit import configs
from clipcrop_jax.owlvit import detect
from clipcrop_jax.owlvit import heads
from clipcrop_jax.owlvit import image_query
from clipcrop_jax.owlvit import model as model_lib
from clipcrop_jax.owlvit import tokenizer


@pytest.fixture(scope='module')
def tiny():
  cfg = configs.get_config('tiny_v2')
  return model_lib.TextZeroShotDetectionModule(cfg), model_lib.init_variables(cfg, seed=3)


def _images(cfg, batch=2, seed=0):
  return jnp.asarray(
      np.random.default_rng(seed).random(
          (batch, cfg.image_size, cfg.image_size, 3), dtype=np.float32
      )
  )


# ---------------------------------------------------------------- box bias (spec §3.3 numbers)


def test_box_bias_3x3_matches_scenic_unit_test():
  bias = np.asarray(heads.compute_box_bias(3, 3)).reshape(3, 3, 4)
  np.testing.assert_allclose(bias[0, :, 0], [-0.69299614, 0.69299626, 9.210265], atol=1e-5)
  np.testing.assert_allclose(bias[:, 0, 1], [-0.69299614, 0.69299626, 9.210265], atol=1e-5)
  np.testing.assert_allclose(bias[..., 2:], -0.692997, atol=1e-5)


def test_box_bias_24x24_matches_hf_reference():
  bias = np.asarray(heads.compute_box_bias(24, 24))
  np.testing.assert_allclose(bias[:3, 0], [-3.1332, -2.3968, -1.9452], atol=1e-4)
  np.testing.assert_allclose(bias[:3, 1:], -3.1332, atol=1e-4)
  assert bias[-1, 0] == pytest.approx(9.2103, abs=1e-4)  # float32 (float64 would give 9.21044)
  for g, size_bias in [(48, -3.84546), (60, -4.07166), (72, -4.25561)]:
    assert np.asarray(heads.compute_box_bias(g, g))[0, 2] == pytest.approx(size_bias, abs=1e-4)


def test_box_bias_row_major_token_order():
  bias = np.asarray(heads.compute_box_bias(2, 3))  # h=2 rows, w=3 cols
  x = 1 / (1 + np.exp(-bias[:, 0]))
  y = 1 / (1 + np.exp(-bias[:, 1]))
  np.testing.assert_allclose(x, [1 / 3, 2 / 3, 1, 1 / 3, 2 / 3, 1], atol=2e-4)
  np.testing.assert_allclose(y, [0.5, 0.5, 0.5, 1, 1, 1], atol=2e-4)


# ---------------------------------------------------------------- parameter tree and shapes


@pytest.mark.parametrize(
    'name,count', [('clip_b16', 152_396_295), ('clip_l14', 433_102_087), ('owl2_l14', 436_824_328)]
)
def test_parameter_counts_match_released_checkpoints(name, count):
  shapes = model_lib.param_shapes(configs.get_config(name))
  leaves = jax.tree_util.tree_leaves(shapes)
  assert sum(int(np.prod(x.shape)) for x in leaves) == count


def test_outputs_shapes_and_dtypes(tiny):
  module, variables = tiny
  cfg = module.config
  text = jnp.asarray(np.stack([tokenizer.tokenize(['a cat', 'a dog', 'the sky'])] * 2))
  out = jax.eval_shape(module.apply, variables, _images(cfg), text)
  g, p = cfg.grid_size, cfg.num_tokens
  assert out['feature_map'].shape == (2, g, g, cfg.vision_width)
  assert out['pred_boxes'].shape == (2, p, 4)
  assert out['pred_logits'].shape == (2, p, 3)
  assert out['class_embeddings'].shape == (2, p, cfg.embed_dim)
  assert out['query_embeddings'].shape == (2, 3, cfg.embed_dim)
  assert out['objectness_logits'].shape == (2, p)
  assert all(v.dtype == jnp.float32 for v in out.values())


def test_padding_queries_masked_and_embeddings_normalised(tiny):
  module, variables = tiny
  text = np.zeros((2, 3, 16), np.int32)
  text[:, :2] = tokenizer.tokenize(['a cat', 'a dog'])
  out = module.apply(variables, _images(module.config), jnp.asarray(text))
  logits = np.asarray(out['pred_logits'])
  assert np.all(logits[..., 2] == heads.PADDING_QUERY_LOGIT)
  assert np.all(np.abs(logits[..., :2]) < 1e3)
  norms = np.linalg.norm(np.asarray(out['class_embeddings']), axis=-1)
  np.testing.assert_allclose(norms, 1.0, atol=1e-4)
  assert np.all(np.asarray(out['pred_boxes']) >= 0) and np.all(np.asarray(out['pred_boxes']) <= 1)


def test_methods_compose_to_call(tiny):
  """image_embedder + text_embedder + heads, applied separately, reproduce __call__."""
  module, variables = tiny
  images = _images(module.config)
  text = jnp.asarray(np.stack([tokenizer.tokenize(['a cat', 'a dog'])] * 2))
  full = module.apply(variables, images, text)
  fmap = module.apply(variables, images, method=module.image_embedder)
  feats = fmap.reshape(2, -1, fmap.shape[-1])
  q = module.apply(variables, text, method=module.text_embedder)
  cls = module.apply(variables, feats, q, text[..., 0] > 0, method=module.class_predictor)
  box = module.apply(variables, feats, fmap, method=module.box_predictor)
  obj = module.apply(variables, feats, method=module.objectness_predictor)
  np.testing.assert_allclose(cls['pred_logits'], full['pred_logits'], atol=1e-5)
  np.testing.assert_allclose(box['pred_boxes'], full['pred_boxes'], atol=1e-6)
  np.testing.assert_allclose(obj['objectness_logits'], full['objectness_logits'], atol=1e-5)
  # Without queries the class embeddings are the raw Dense_0 outputs (not unit length).
  raw = module.apply(variables, feats, method=module.class_predictor)['class_embeddings']
  assert not np.allclose(np.linalg.norm(raw, axis=-1), 1.0, atol=1e-2)


def test_objectness_predictor_absent_for_v1():
  cfg = configs.get_config('tiny')
  module = model_lib.TextZeroShotDetectionModule(cfg)
  shapes = model_lib.param_shapes(cfg)['params']
  assert 'objectness_head' not in shapes
  variables = model_lib.init_variables(cfg)
  with pytest.raises(ValueError, match='no objectness head'):
    module.apply(variables, jnp.zeros((1, 4, 64)), method=module.objectness_predictor)


def test_text_pooling_uses_eot_and_ignores_padding(tiny):
  module, variables = tiny
  a = tokenizer.tokenize(['a photo of a cat'])
  emb = lambda t: np.asarray(module.apply(variables, jnp.asarray(t), method=module.text_embedder))
  # Changing only positions after EOT (padding) must not change the embedding.
  b = a.copy()
  b[0, -1] = 320
  b_emb = emb(b[None])
  np.testing.assert_allclose(emb(a[None]), b_emb, atol=0)  # argmax is still the EOT position
  # A different word before EOT changes it.
  c = tokenizer.tokenize(['a photo of a dog'])
  assert not np.allclose(emb(a[None]), emb(c[None]), atol=1e-4)


# ---------------------------------------------------------------- patch embedding, resolution


@pytest.mark.parametrize('hw', [(32, 48), (40, 56)])  # divisible by 8, and not (SAME padding)
def test_patch_embedding_equals_flax_conv(hw):
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, *hw, 3), dtype=np.float32))
  ours = clip_lib.PatchEmbedding(8, 16)
  params = ours.init(jax.random.PRNGKey(0), x)
  ref = jax.lax.conv_general_dilated(
      x,
      params['params']['kernel'],
      (8, 8),
      'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision='highest',
  )
  with jax.default_matmul_precision('highest'):
    got = ours.apply(params, x)
  assert got.shape == (2, -(-hw[0] // 8), -(-hw[1] // 8), 16)
  np.testing.assert_allclose(got, ref, atol=1e-5)


def test_smaller_input_truncates_position_embedding(tiny):
  module, variables = tiny
  small = jnp.zeros((1, 64, 64, 3))  # 4x4 grid < native 6x6
  fmap = module.apply(variables, small, method=module.image_embedder)
  assert fmap.shape[1:3] == (4, 4)
  posemb = np.arange(37 * 2, dtype=np.float32).reshape(37, 2)
  cut = np.asarray(clip_lib.truncate_positional_embedding(jnp.asarray(posemb), (4, 4)))
  np.testing.assert_array_equal(cut[0], posemb[0])
  np.testing.assert_array_equal(cut[1:5], posemb[1:5])  # first row, top-left 4 columns
  np.testing.assert_array_equal(cut[5:9], posemb[7:11])  # second row
  with pytest.raises(ValueError, match='larger than the checkpoint'):
    module.apply(variables, jnp.zeros((1, 128, 128, 3)), method=module.image_embedder)


# ---------------------------------------------------------------- one-shot query rule


def _boxes_and_embeddings():
  pred = np.array(
      [
          [0.5, 0.5, 1.0, 1.0],  # whole image
          [0.5, 0.5, 0.9, 0.9],  # nearly whole image
          [0.2, 0.2, 0.2, 0.2],  # small
          [0.5, 0.5, 0.95, 0.95],
      ],
      np.float32,
  )
  emb = np.array([[1, 0], [0.2, 0.1], [1, 1], [-1, 0.5]], np.float32)
  return pred, emb


def test_select_query_token_whole_image_box():
  pred, emb = _boxes_and_embeddings()
  # IoU with [0,0,1,1]: 1, 0.81, 0.04, 0.9025 -> selected {0, 1, 3} (>= 0.8).
  # mean embedding = (0.3, 0.4); dot: 0.3, 0.1, 0.7, -0.1 -> lowest among selected is token 3.
  assert int(image_query.select_query_token(pred, emb)) == 3


def test_select_query_token_small_box_and_giou_fallback():
  pred, emb = _boxes_and_embeddings()
  assert int(image_query.select_query_token(pred, emb, (0.1, 0.1, 0.3, 0.3))) == 2
  # A box overlapping nothing: IoU all 0 -> gIoU rule picks the least-negative gIoU tokens.
  far = np.array([[0.05, 0.05, 0.1, 0.1], [0.8, 0.8, 0.1, 0.1]], np.float32)
  emb2 = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
  assert int(image_query.select_query_token(far, emb2, (0.0, 0.85, 0.2, 1.0))) == 0


def test_embed_image_query_returns_that_tokens_class_embedding(tiny):
  module, variables = tiny
  image = _images(module.config, batch=1)
  emb, index = image_query.embed_image_query(module, variables, image[0])
  raw = module.apply(
      variables,
      image,
      method=lambda m, x: m.class_predictor(
          m.image_embedder(x).reshape(1, -1, m.config.vision_width)
      )['class_embeddings'],
  )
  np.testing.assert_allclose(emb, raw[0, index], atol=1e-6)
  with pytest.raises(ValueError, match='box_xyxy'):
    image_query.embed_image_query(module, variables, image[0], (0.5, 0.5, 0.2, 0.9))


# ---------------------------------------------------------------- demo CLI


def test_detect_cli_random_init(tmp_path, capsys):
  out = tmp_path / 'overlay.png'
  rc = detect.main(
      [
          '--random-init',
          'tiny',
          '--query',
          'a red square',
          '--query',
          'a blue disc',
          '--top-k',
          '2',
          '--out',
          str(out),
      ]
  )
  assert rc == 0
  text = capsys.readouterr().out
  assert out.exists() and out.stat().st_size > 0
  assert text.count('a red square') == 2 and text.count('a blue disc') == 2


def test_detect_boxes_are_in_original_pixels(tiny):
  module, variables = tiny
  image = detect.demo_image(120, 200)
  dets = detect.detect(module, variables, image, ['a cat'], top_k=36)
  boxes = np.array([d.box for d in dets])
  assert 12 <= len(dets) < 36  # tokens of the bottom padding are no detections
  assert boxes[:, [0, 2]].max() <= 200 and boxes[:, [1, 3]].max() <= 120 and boxes.min() >= 0
  assert [d.score for d in dets] == sorted((d.score for d in dets), reverse=True)


def test_detect_cli_bad_image_is_one_line_error(tmp_path, capsys):
  bad = tmp_path / 'bad.jpg'
  bad.write_text('not an image')
  rc = detect.main(
      [
          '--random-init',
          'tiny',
          '--query',
          'x',
          '--image',
          str(bad),
          '--out',
          str(tmp_path / 'o.png'),
      ]
  )
  err = capsys.readouterr().err.strip()
  assert rc == 2 and 'bad.jpg' in err and '\n' not in err


def test_class_head_terms_reused_across_queries_match_class_predictor(tiny):
  """Precomputed image-side terms + a new query give the same logits as the full class head."""
  module, variables = tiny
  images = _images(module.config)
  fmap = module.apply(variables, images, method=module.image_embedder)
  feats = fmap.reshape(2, -1, fmap.shape[-1])
  terms = module.apply(variables, feats, method=module.class_head_terms)
  for texts in (['a cat'], ['a dog', 'the sky']):
    text = jnp.asarray(np.stack([tokenizer.tokenize(texts)] * 2))
    q = module.apply(variables, text, method=module.text_embedder)
    want = module.apply(variables, feats, q, text[..., 0] > 0, method=module.class_predictor)
    got = heads.logits_from_image_terms(terms, q, text[..., 0] > 0)
    np.testing.assert_allclose(got, want['pred_logits'], atol=1e-5)


def test_per_head_attention_equals_batched_with_mask():
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 3, 5, 64), dtype=np.float32)) for _ in range(3))
  mask = jnp.asarray(rng.random((2, 1, 5, 5)) > 0.3)
  with jax.default_matmul_precision('highest'):
    a = clip_lib.dot_product_attention(q, k, v, mask, per_head=False)
    b = clip_lib.dot_product_attention(q, k, v, mask, per_head=True)
  np.testing.assert_allclose(a, b, atol=1e-6)
  # Oracle: plain numpy softmax attention.
  logits = np.einsum('bhqd,bhkd->bhqk', np.asarray(q), np.asarray(k))
  logits = np.where(np.asarray(mask), logits, np.finfo(np.float32).min)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  np.testing.assert_allclose(a, np.einsum('bhqk,bhkd->bhqd', w, np.asarray(v)), atol=1e-5)


def test_package_exports():
  from clipcrop_jax import owlvit  # pylint: disable=g-import-not-at-top

  assert owlvit.tokenize('a photo of a cat')[0, :7].tolist() == [
      49406,
      320,
      1125,
      539,
      320,
      2368,
      49407,
  ]
  assert owlvit.get_config('clip_b32').grid_size == 24
  assert callable(owlvit.load_checkpoint) and callable(owlvit.preprocess)


def test_encode_images_matches_full_forward(tiny):
  module, variables = tiny
  images = _images(module.config)
  text = jnp.asarray(np.stack([tokenizer.tokenize(['a cat', 'a dog'])] * 2))
  full = module.apply(variables, images, text)
  enc = model_lib.encode_images(module, variables, images)
  q = model_lib.embed_texts(module, variables, text)
  np.testing.assert_allclose(enc['pred_boxes'], full['pred_boxes'], atol=1e-6)
  np.testing.assert_allclose(enc['objectness_logits'], full['objectness_logits'], atol=1e-5)
  np.testing.assert_allclose(q, full['query_embeddings'], atol=1e-5)
  logits = heads.logits_from_image_terms(enc['class_terms'], q, text[..., 0] > 0)
  np.testing.assert_allclose(logits, full['pred_logits'], atol=1e-5)


def test_detect_with_image_query_uses_one_shot_embedding(tiny, tmp_path):
  """An image query scores the target with the embedding chosen by Scenic's one-shot rule."""
  module, variables = tiny
  image = detect.demo_image(96, 96)
  query = image_query.ImageQuery('self', image)
  dets = detect.detect(module, variables, image, [], top_k=2, image_queries=[query])
  emb = image_query.query_embeddings(module, variables, image_queries=[query])
  pixels = image.astype(np.float32)[None] / 255  # square 96 px: preprocessing is the identity
  want_emb, _ = image_query.embed_image_query(module, variables, pixels[0])
  np.testing.assert_allclose(emb[0], want_emb, atol=1e-6)
  fmap = module.apply(variables, jnp.asarray(pixels), method=module.image_embedder)
  logits = module.apply(
      variables, fmap.reshape(1, -1, fmap.shape[-1]), emb[None], method=module.class_predictor
  )['pred_logits'][0, :, 0]
  order = np.argsort(-np.asarray(logits))
  assert [d.token for d in dets] == order[:2].tolist() and dets[0].query == 'self'
  assert dets[0].score == pytest.approx(float(jax.nn.sigmoid(logits[order[0]])), abs=1e-5)
  # CLI: text and image queries together; a box on the example image.
  path = tmp_path / 'example.png'
  from PIL import Image  # pylint: disable=g-import-not-at-top

  Image.fromarray(image).save(path)
  rc = detect.main(
      [
          '--random-init',
          'tiny',
          '--query',
          'a red square',
          '--query-image',
          str(path),
          '--query-box',
          '10,10,60,60',
          '--top-k',
          '1',
          '--out',
          str(tmp_path / 'o.png'),
      ]
  )
  assert rc == 0
  rc = detect.main(
      [
          '--random-init',
          'tiny',
          '--query-image',
          str(path),
          '--query-box',
          '5,5,1,1',
          '--out',
          str(tmp_path / 'o2.png'),
      ]
  )
  assert rc == 2 and not (tmp_path / 'o2.png').exists()


def test_remat_keeps_parameters_outputs_and_gradients(tiny):
  """remat=True: the same parameter tree (Scenic names), outputs and gradients; the blocks are
  really rematerialised (a `remat` primitive in the forward jaxpr, and the gradient's jaxpr recomputes
  the blocks' quick_gelu sigmoids)."""
  module, variables = tiny
  cfg = module.config
  remat = model_lib.TextZeroShotDetectionModule(cfg, remat=True)
  rematted_init = jax.eval_shape(remat.init, jax.random.PRNGKey(3), *model_lib.dummy_inputs(cfg))
  assert jax.tree_util.tree_structure(rematted_init) == jax.tree_util.tree_structure(variables)
  assert 'resblocks_1' in rematted_init['params']['backbone']['clip']['visual']['transformer']
  images = _images(cfg, batch=1)
  queries = jnp.asarray(tokenizer.tokenize(['a cat', 'a dog']))[None]

  def loss(params, m):
    out = m.apply({'params': params}, images, queries)
    return jnp.sum(out['pred_logits']) + jnp.sum(out['pred_boxes'] ** 2), out

  grad_fn = jax.value_and_grad(loss, has_aux=True)
  results = {
      r: jax.jit(grad_fn, static_argnums=1)(variables['params'], m)
      for r, m in ((False, module), (True, remat))
  }
  (_, outs_plain), grads_plain = results[False]
  (_, outs_remat), grads_remat = results[True]
  for key in ('pred_logits', 'pred_boxes', 'feature_map'):
    np.testing.assert_allclose(outs_remat[key], outs_plain[key], rtol=1e-5, atol=1e-5)
  flat_plain = traverse_util.flatten_dict(grads_plain, sep='/')
  flat_remat = traverse_util.flatten_dict(grads_remat, sep='/')
  assert flat_plain.keys() == flat_remat.keys()
  kernel = 'backbone/clip/visual/transformer/resblocks_0/mlp/c_fc/kernel'
  assert np.any(np.asarray(flat_plain[kernel]) != 0)
  for name, g in flat_plain.items():
    np.testing.assert_allclose(flat_remat[name], g, rtol=1e-4, atol=1e-5, err_msg=name)
  forward = {
      r: str(jax.make_jaxpr(loss, static_argnums=1)(variables['params'], m))
      for r, m in ((False, module), (True, remat))
  }
  assert 'remat' in forward[True] and 'remat' not in forward[False]
  backward = {
      r: str(jax.make_jaxpr(grad_fn, static_argnums=1)(variables['params'], m))
      for r, m in ((False, module), (True, remat))
  }
  assert backward[True].count('logistic') > backward[False].count('logistic')
