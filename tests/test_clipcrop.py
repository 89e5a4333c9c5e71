"""ClipCrop model, ClipCropper API and crop CLI on tiny random weights."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from clipcrop_jax import crop as crop_cli
from clipcrop_jax import cropper as cropper_lib
from clipcrop_jax import export
from clipcrop_jax import keywords
from clipcrop_jax import model as model_lib
from clipcrop_jax.owlvit import checkpoints as owl_checkpoints
from clipcrop_jax.owlvit import detect
from clipcrop_jax.owlvit import model as owl_model
from clipcrop_jax.owlvit import tokenizer

CFG = model_lib.TINY


@pytest.fixture(scope='module')
def variables():
  return model_lib.init_variables(CFG, seed=1)


@pytest.fixture(scope='module')
def cropper(variables):
  return cropper_lib.ClipCropper(CFG, variables, keyword_pipeline=keywords.RULES, model_id='test')


def _images(batch=2, seed=0):
  size = CFG.owlvit_config.image_size
  return jnp.asarray(np.random.default_rng(seed).random((batch, size, size, 3), np.float32))


def test_output_shapes(variables):
  module = model_lib.ClipCrop(CFG)
  text = jnp.asarray(np.stack([tokenizer.tokenize(['a dog on a boat', 'a dog', 'a boat'])] * 2))
  out = jax.eval_shape(module.apply, variables, _images(), text)
  m, layers = CFG.num_queries, CFG.decoder_layers
  assert out['pred_boxes'].shape == (2, m, 4)
  assert out['quality'].shape == (2, m)
  assert out['aux_boxes'].shape == (layers, 2, m, 4)
  assert out['union_box'].shape == (2, 4)
  assert out['selected_tokens'].shape == (2, 3)
  assert set(variables['params']) == {'owlvit', 'decoder'}


def test_initial_crops_equal_union_box_and_lie_in_frame(variables):
  module = model_lib.ClipCrop(CFG)
  text = jnp.asarray(np.stack([tokenizer.tokenize(['a dog', 'a boat'])] * 2))
  out = module.apply(variables, _images(), text)
  boxes = np.asarray(out['pred_boxes'])
  assert boxes.min() >= 0 and boxes.max() <= 1
  # The offset head's last layer starts at zero: every crop is the (clipped) union box.
  np.testing.assert_allclose(
      boxes, np.broadcast_to(np.asarray(out['union_box'])[:, None], boxes.shape), atol=1e-6
  )
  q = np.asarray(out['quality'])
  assert np.all((q > 0) & (q < 1))


def _hand_encoding(module, variables):
  """A real encoding whose boxes and class terms are replaced by hand-made ones."""
  enc = module.apply(variables, _images(1), method=module.encode_image)
  p = enc['pred_boxes'].shape[1]
  d = enc['class_terms']['class_embeddings'].shape[-1]
  boxes = np.tile(np.array([0.5, 0.5, 0.1, 0.1], np.float32), (1, p, 1))
  boxes[0, 3] = [0.2, 0.3, 0.2, 0.2]  # token 3: xyxy (0.1, 0.2, 0.3, 0.4)
  boxes[0, 7] = [0.7, 0.6, 0.2, 0.4]  # token 7: xyxy (0.6, 0.4, 0.8, 0.8)
  emb = np.zeros((1, p, d), np.float32)
  emb[0, :, 0] = 1.0  # background direction
  emb[0, 3] = np.eye(d)[1]
  emb[0, 7] = np.eye(d)[2]
  terms = dict(
      enc['class_terms'],
      class_embeddings=jnp.asarray(emb),
      logit_shift=jnp.zeros((1, p, 1)),
      logit_scale=jnp.ones((1, p, 1)),
  )
  return dict(enc, pred_boxes=jnp.asarray(boxes), class_terms=terms), d


def test_query_selection_and_union_box_by_hand(variables):
  module = model_lib.ClipCrop(CFG)
  enc, d = _hand_encoding(module, variables)
  queries = jnp.asarray(np.eye(d)[None, [1, 2, 1]], jnp.float32)  # picks tokens 3, 7, (3 padded)
  mask = jnp.asarray([[True, True, False]])
  out = module.apply(variables, enc, queries, mask, method=module.crop_from_encoding)
  assert np.asarray(out['selected_tokens'])[0, :2].tolist() == [3, 7]
  np.testing.assert_allclose(out['union_box'][0], [0.1, 0.2, 0.8, 0.8], atol=1e-6)
  # Only query 1: union = token 3's box.
  out1 = module.apply(variables, enc, queries[:, :1], mask[:, :1], method=module.crop_from_encoding)
  np.testing.assert_allclose(out1['union_box'][0], [0.1, 0.2, 0.3, 0.4], atol=1e-6)
  # Training-time filter: a target around token 7 drops token 3 (entirely outside it).
  out2 = module.apply(
      variables,
      enc,
      queries,
      mask,
      jnp.asarray([[0.5, 0.3, 0.9, 0.9]]),
      method=module.crop_from_encoding,
  )
  assert np.asarray(out2['selected_mask'])[0].tolist() == [False, True, False]
  np.testing.assert_allclose(out2['union_box'][0], [0.6, 0.4, 0.8, 0.8], atol=1e-6)


def test_selection_union_variants_by_hand():
  """Hand-made selections: caption -> token 3, subject -> token 3, context -> token 7."""
  variables = {
      cfg: model_lib.init_variables(CFG.replace(selection_union=cfg), seed=0)
      for cfg in model_lib.SELECTION_UNIONS
  }
  roles = jnp.asarray([[0, 1, 2, 0]])  # caption, subject, context, (padding)
  queries_idx = [1, 1, 2, 1]
  for union, want in (
      ('all', [0.1, 0.2, 0.8, 0.8]),
      ('subject', [0.1, 0.2, 0.3, 0.4]),
      ('caption', [0.1, 0.2, 0.3, 0.4]),
  ):
    module = model_lib.ClipCrop(CFG.replace(selection_union=union))
    enc, d = _hand_encoding(module, variables[union])
    queries = jnp.asarray(np.eye(d)[None, queries_idx], jnp.float32)
    mask = jnp.asarray([[True, True, True, False]])
    out = module.apply(
        variables[union], enc, queries, mask, query_roles=roles, method=module.crop_from_encoding
    )
    np.testing.assert_allclose(out['union_box'][0], want, atol=1e-6, err_msg=union)
    in_union = {
        'all': [True, True, True, False],
        'subject': [True, True, False, False],
        'caption': [True, False, False, False],
    }[union]
    assert np.asarray(out['union_mask'])[0].tolist() == in_union
    # The paper's union has no role parameters; the others have one embedding per role.
    assert ('role_embed' in variables[union]['params']['decoder']) == (union != 'all')
  # No selection of the union's roles (the subject query masked out): every selection counts.
  mask = jnp.asarray([[False, False, True, False]])
  out = model_lib.union_selection_mask(mask, roles, 'subject')
  assert np.asarray(out)[0].tolist() == [False, False, True, False]
  # Roles unknown (an example image): every query is the caption's.
  assert np.asarray(model_lib.union_selection_mask(mask, None, 'subject')).tolist() == [
      [False, False, True, False]
  ]
  with pytest.raises(ValueError, match='selection_union'):
    model_lib.ClipCropConfig(selection_union='nouns')


def test_subject_union_decoder_sees_context_tokens():
  """With 'subject', the context selection changes the crops (it reaches the decoder as a
  role-tagged memory token) but not the union box; with 'all' it changes the union."""
  config = CFG.replace(selection_union='subject')
  variables = model_lib.init_variables(config, seed=1)
  # A non-trivial role embedding (a fresh init's output head is zero: offsets would all be 0).
  decoder = variables['params']['decoder']
  rng = np.random.default_rng(0)
  decoder = jax.tree_util.tree_map(
      lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.3, x.dtype), decoder
  )
  variables = {'params': dict(variables['params'], decoder=decoder)}
  module = model_lib.ClipCrop(config)
  enc, d = _hand_encoding(module, variables)
  roles = jnp.asarray([[0, 1, 2]])
  with_context = module.apply(
      variables,
      enc,
      jnp.asarray(np.eye(d)[None, [1, 1, 2]], jnp.float32),
      jnp.asarray([[True, True, True]]),
      query_roles=roles,
      method=module.crop_from_encoding,
  )
  without = module.apply(
      variables,
      enc,
      jnp.asarray(np.eye(d)[None, [1, 1, 2]], jnp.float32),
      jnp.asarray([[True, True, False]]),
      query_roles=roles,
      method=module.crop_from_encoding,
  )
  np.testing.assert_allclose(with_context['union_box'], without['union_box'])
  assert not np.allclose(with_context['pred_boxes'], without['pred_boxes'])


def test_filter_selected_boxes_half_area_rule():
  sel = jnp.asarray(
      [
          [
              [0.0, 0.0, 0.3, 0.4],  # 1/3 of its area inside the target -> dropped
              [0.3, 0.1, 0.5, 0.3],  # fully inside -> kept
              [0.15, 0.1, 0.35, 0.3],  # 3/4 inside -> kept
              [0.3, 0.1, 0.5, 0.3],
          ]
      ]
  )  # inside, but masked out already
  target = jnp.asarray([[0.2, 0.0, 1.0, 1.0]])
  keep = model_lib.filter_selected_boxes(sel, jnp.asarray([[True, True, True, False]]), target)
  assert np.asarray(keep)[0].tolist() == [False, True, True, False]


def test_base_mode_ignores_text(variables):
  module = model_lib.ClipCrop(CFG.replace(mode='base'))
  images = _images(1)
  a = module.apply(variables, images, jnp.asarray(tokenizer.tokenize(['a dog'])[None]))
  b = module.apply(variables, images, jnp.asarray(tokenizer.tokenize(['the sky at night'])[None]))
  np.testing.assert_array_equal(a['pred_boxes'], b['pred_boxes'])
  np.testing.assert_allclose(a['union_box'][0], [0, 0, 1, 1])
  assert 'selected_tokens' not in a


# ---------------------------------------------------------------- ClipCropper


def test_crops_inside_image_sorted_and_in_pixels(cropper):
  image = detect.demo_image(120, 200)
  crops = cropper.crop(image, text='a red square and a blue disc', top_k=4)
  assert 1 <= len(crops) <= 4
  for c in crops:
    x0, y0, x1, y1 = c.box
    assert 0 <= x0 < x1 <= 200 and 0 <= y0 < y1 <= 120
    assert c.aspect_ratio == pytest.approx((x1 - x0) / (y1 - y0))
    assert c.focal_point == pytest.approx(((x0 + x1) / 2, (y0 + y1) / 2))
  scores = [c.score for c in crops]
  assert scores == sorted(scores, reverse=True)


def test_fused_top_crop(variables):
  # fuse_top_k=3: the first crop is the mean of the three highest-quality predictions (read off
  # a fuse_top_k=1 cropper without NMS), the rest are the usual NMS-ranked predictions.
  image = detect.demo_image(120, 200)
  text = 'a red square and a blue disc'
  plain = cropper_lib.ClipCropper(CFG, variables, keyword_pipeline=keywords.RULES, nms_iou=1.0)
  every = plain.crop(image, text=text, top_k=CFG.num_queries)
  assert len(every) == CFG.num_queries
  fused_cfg = CFG.replace(fuse_top_k=3)
  fused = cropper_lib.ClipCropper(
      fused_cfg, variables, keyword_pipeline=keywords.RULES, nms_iou=1.0
  )
  crops = fused.crop(image, text=text, top_k=4)
  expected = np.mean([c.box for c in every[:3]], axis=0)
  np.testing.assert_allclose(crops[0].box, expected, atol=1e-3)
  assert crops[0].score == pytest.approx(np.mean([c.score for c in every[:3]]), abs=1e-6)
  for got, want in zip(crops[1:], every[:3]):
    np.testing.assert_allclose(got.box, want.box, atol=1e-3)
  # The per-call override gives the same; 1 turns it off.
  np.testing.assert_allclose(
      plain.crop(image, text=text, fuse_top_k=3)[0].box, crops[0].box, atol=1e-4
  )
  np.testing.assert_allclose(
      fused.crop(image, text=text, fuse_top_k=1)[0].box, every[0].box, atol=1e-4
  )
  with pytest.raises(ValueError, match='fuse_top_k'):
    CFG.replace(fuse_top_k=0)
  with pytest.raises(ValueError, match='fuse_top_k'):
    plain.crop(image, text=text, fuse_top_k=0)


def test_second_query_reuses_the_encoding(cropper, monkeypatch):
  calls = []
  real = owl_model.encode_images
  monkeypatch.setattr(owl_model, 'encode_images', lambda *a: calls.append(1) or real(*a))
  enc = cropper.encode(detect.demo_image())
  cropper.crop(enc, text='a red square')
  cropper.crop(enc, text='a blue disc', mode='main')
  assert len(calls) == 1


@pytest.mark.parametrize('ratio,value', [('16:9', 16 / 9), ('1:1', 1.0), (0.5, 0.5)])
def test_aspect_ratio_honoured_to_one_pixel(cropper, ratio, value):
  crops = cropper.crop(
      detect.demo_image(150, 260), text='a red square', aspect_ratio=ratio, top_k=3
  )
  assert crops
  for c in crops:
    w, h = c.box[2] - c.box[0], c.box[3] - c.box[1]
    assert abs(w - value * h) <= 1.0
    assert c.box[0] >= -1e-6 and c.box[2] <= 260 + 1e-6 and c.box[3] <= 150 + 1e-6


def test_batched_images_and_bad_requests(cropper):
  out = cropper.crop([detect.demo_image(), detect.demo_image(90, 90)], text='a boat', top_k=2)
  assert len(out) == 2 and all(len(c) <= 2 for c in out)
  with pytest.raises(ValueError, match='non-empty text'):
    cropper.crop(detect.demo_image(), text='  ')
  with pytest.raises(ValueError, match='mode'):
    cropper.crop(detect.demo_image(), text='x', mode='nope')


def test_image_query_mode(cropper):
  crops = cropper.crop(detect.demo_image(), query_image=detect.demo_image(80, 80), top_k=2)
  assert crops and all(c.box[2] > c.box[0] for c in crops)


def test_save_load_round_trip(cropper, tmp_path):
  cropper.save(tmp_path / 'ckpt')
  loaded = cropper_lib.ClipCropper.load(tmp_path / 'ckpt')  # the recorded keyword pipeline
  image = detect.demo_image()
  a = cropper.crop(image, text='a red square')
  b = loaded.crop(image, text='a red square')
  np.testing.assert_allclose([c.box for c in a], [c.box for c in b], atol=1e-4)
  assert loaded.config == cropper.config and loaded.keyword_pipeline == keywords.RULES
  (tmp_path / 'ckpt' / export.PARAMS_FILE).write_bytes(b'\x81\xa1a')
  with pytest.raises(ValueError, match='params.msgpack'):
    cropper_lib.ClipCropper.load(tmp_path / 'ckpt')


def test_zero_shot_from_plain_owlvit_checkpoint(variables, tmp_path):
  path = tmp_path / 'owl.msgpack'
  owl_checkpoints.save_scenic_checkpoint({'params': variables['params']['owlvit']}, path)
  zs = cropper_lib.ClipCropper.load(path, keyword_pipeline=keywords.RULES)
  assert zs.zero_shot
  image = detect.demo_image(150, 260)
  crops = zs.crop(image, text='a red square', top_k=3)
  assert 1 <= len(crops) <= 3
  for c in crops:
    assert 0 <= c.box[0] < c.box[2] <= 260 and 0 <= c.box[1] < c.box[3] <= 150
    # GAIC rule: area > 1/2 of the image, aspect within [0.5, 2].
    assert (c.box[2] - c.box[0]) * (c.box[3] - c.box[1]) >= 0.5 * 260 * 150 - 1e-6
    assert 0.5 - 1e-6 <= c.aspect_ratio <= 2 + 1e-6
  with pytest.raises(ValueError, match='no decoder'):
    zs.save(tmp_path / 'x')


def test_crops_explain_their_queries(cropper):
  """Each crop lists the queries (text, role), what each selected (pixels of the image, the
  detector's confidence) and whether it is in the union; the fused crop says so."""
  image = detect.demo_image()
  text = 'the red square next to the blue disc'
  request = cropper.check_request(text=text, top_k=3, fuse_top_k=3)
  crops = cropper.crop(image, text=text, top_k=3, fuse_top_k=3)
  assert crops[0].fused and not any(c.fused for c in crops[1:])
  queries = crops[0].queries
  assert [(q.text, q.role) for q in queries] == [
      (text, 'caption'),
      ('the red square', 'subject'),
      ('the blue disc', 'context'),
  ]
  assert all(c.queries == queries for c in crops)
  # The boxes are what the model selected: the selected tokens' boxes, in image pixels.
  module = model_lib.ClipCrop(CFG)
  enc = cropper.encode(image)
  h, w = image.shape[:2]
  side = max(h, w)
  out = module.apply(
      cropper.variables,
      enc.encoded,
      request.queries,
      request.query_mask,
      None,
      jnp.asarray([[w / side, h / side]]),
      False,
      request.query_roles,
      method=module.crop_from_encoding,
  )
  for row, q in enumerate(queries):
    want = np.clip(np.asarray(out['selected_boxes'][0, row]) * side, 0, [w, h, w, h])
    np.testing.assert_allclose(q.box, want, rtol=1e-5, atol=1e-3)
    logit = float(out['selected_logits'][0, row])
    assert q.score == pytest.approx(1 / (1 + np.exp(-logit)), rel=1e-5)
    assert q.in_union  # 'all': every selection is in the union
  # Without box voting no crop is fused; a base-mode crop has no queries.
  assert not any(c.fused for c in cropper.crop(image, text=text, top_k=2, fuse_top_k=1))
  assert cropper.crop(image, text=text, mode='base')[0].queries == ()
  # An example image is one caption-role query.
  by_example = cropper.crop(image, query_image=detect.demo_image(80, 80))[0].queries
  assert [(q.text, q.role) for q in by_example] == [(cropper_lib.IMAGE_QUERY_TEXT, 'caption')]


def test_zero_shot_target_is_the_subject_union(variables):
  """Zero-shot: the target is the union of the caption's and subject's selections; a context
  selection is not in it (and counts as an object not to cut)."""
  owl = {'params': {'owlvit': variables['params']['owlvit']}}
  zs = cropper_lib.ClipCropper(
      CFG.replace(selection_union='subject'),
      owl,
      zero_shot_mode=True,
      keyword_pipeline=keywords.RULES,
  )
  crops = zs.crop(detect.demo_image(), text='the red square next to the blue disc', top_k=2)
  queries = crops[0].queries
  assert [(q.role, q.in_union) for q in queries] == [
      ('caption', True),
      ('subject', True),
      ('context', False),
  ]
  # Every zero-shot crop contains the subject union (GAIC candidates containing the target).
  union = np.array(
      [
          min(q.box[0] for q in queries if q.in_union),
          min(q.box[1] for q in queries if q.in_union),
          max(q.box[2] for q in queries if q.in_union),
          max(q.box[3] for q in queries if q.in_union),
      ]
  )
  for c in crops:
    assert c.box[0] <= union[0] + 1 and c.box[1] <= union[1] + 1
    assert c.box[2] >= union[2] - 1 and c.box[3] >= union[3] - 1


def test_crop_cli_json_lists_queries_and_fused(cropper, tmp_path):
  image = tmp_path / 'a.png'
  Image.fromarray(detect.demo_image()).save(image)
  ckpt = cropper.save(tmp_path / 'ckpt')
  rc = crop_cli.main(
      [
          '--checkpoint',
          str(ckpt),
          '--image',
          str(image),
          '--text',
          'a red square on a blue disc',
          '--top-k',
          '2',
          '--fuse-top-k',
          '3',
          '--out',
          str(tmp_path / 'out'),
      ]
  )
  assert rc == 0
  crops = json.loads((tmp_path / 'out' / 'crops.json').read_text())['results'][0]['crops']
  assert crops[0]['fused'] is True and all(c['fused'] is False for c in crops[1:])
  assert [(q['text'], q['role']) for q in crops[0]['queries']] == [
      ('a red square on a blue disc', 'caption'),
      ('a red square', 'subject'),
      ('a blue disc', 'context'),
  ]
  assert all(len(q['box']) == 4 and 0 <= q['score'] <= 1 for q in crops[0]['queries'])


# ---------------------------------------------------------------- CLI


def test_crop_cli_folder_with_corrupt_file(tmp_path, capsys, cropper):
  folder = tmp_path / 'imgs'
  folder.mkdir()
  Image.fromarray(detect.demo_image()).save(folder / 'a.png')
  Image.fromarray(detect.demo_image(100, 140)).save(folder / 'b.jpg')
  (folder / 'c.jpg').write_bytes(b'\xff\xd8\xff\xe0 corrupt')
  ckpt = cropper.save(tmp_path / 'ckpt')
  out = tmp_path / 'out'
  rc = crop_cli.main(
      [
          '--checkpoint',
          str(ckpt),
          '--image',
          str(folder),
          '--text',
          'a red square',
          '--top-k',
          '2',
          '--out',
          str(out),
      ]
  )
  assert rc == 1  # one file failed, the others were cropped
  report = json.loads((out / 'crops.json').read_text())
  assert len(report['results']) == 2 and [f['image'] for f in report['failed']] == [
      str(folder / 'c.jpg')
  ]
  assert 'c.jpg: corrupt or truncated' in report['failed'][0]['error']
  assert report['mode'] == 'full' and report['text'] == 'a red square'
  for name in ('a', 'b'):
    assert (out / f'{name}_overlay.png').exists() and (out / f'{name}_crop0.jpg').exists()
  assert 'c.jpg' in capsys.readouterr().err


def test_crop_cli_random_init_demo(tmp_path):
  rc = crop_cli.main(
      [
          '--random-init',
          'tiny',
          '--text',
          'a red square',
          '--out',
          str(tmp_path),
          '--aspect-ratio',
          '1:1',
      ]
  )
  assert rc == 0
  report = json.loads((tmp_path / 'crops.json').read_text())
  crop = report['results'][0]['crops'][0]
  x0, y0, x1, y1 = crop['box_xyxy']
  assert abs((x1 - x0) - (y1 - y0)) <= 1


def test_from_owlvit_checkpoint_keeps_encoder_weights(variables, tmp_path):
  path = tmp_path / 'owl.msgpack'
  owl = jax.tree_util.tree_map(lambda x: x + 0.5, variables['params']['owlvit'])
  owl_checkpoints.save_scenic_checkpoint({'params': owl}, path)
  c = cropper_lib.ClipCropper.from_owlvit(path, CFG, keyword_pipeline=keywords.RULES)
  np.testing.assert_allclose(
      c.variables['params']['owlvit']['class_head']['Dense_0']['kernel'],
      owl['class_head']['Dense_0']['kernel'],
  )
  assert not c.zero_shot and c.crop(detect.demo_image(), text='a dog')
  wrong = model_lib.ClipCropConfig(
      owlvit='tiny_v2',
      decoder_layers=1,
      decoder_width=32,
      decoder_heads=2,
      decoder_mlp_dim=32,
      num_queries=4,
  )
  with pytest.raises(ValueError, match='objectness_head'):
    model_lib.init_from_owlvit(wrong, {'params': owl})


def test_top_level_exports():
  import clipcrop_jax  # pylint: disable=g-import-not-at-top

  assert clipcrop_jax.ClipCropper is cropper_lib.ClipCropper
  assert clipcrop_jax.ClipCropConfig is model_lib.ClipCropConfig
  with pytest.raises(AttributeError):
    clipcrop_jax.nope  # pylint: disable=pointless-statement


def test_padded_queries_do_not_change_crops(variables):
  """Zero rows padding the query count are masked: same union box and crops as without them."""
  module = model_lib.ClipCrop(CFG)
  images = _images(1)
  tok = tokenizer.tokenize(['a dog on a boat', 'a dog', 'a boat'])
  a = module.apply(variables, images, jnp.asarray(tok[None]))
  b = module.apply(variables, images, jnp.asarray(np.pad(tok, ((0, 5), (0, 0)))[None]))
  np.testing.assert_allclose(a['union_box'], b['union_box'], atol=1e-6)
  np.testing.assert_allclose(a['pred_boxes'], b['pred_boxes'], atol=1e-5)
  np.testing.assert_allclose(a['quality'], b['quality'], atol=1e-5)


def test_crop_cli_zero_shot_with_plain_owlvit_checkpoint(variables, tmp_path):
  path = tmp_path / 'owl.msgpack'
  owl_checkpoints.save_scenic_checkpoint({'params': variables['params']['owlvit']}, path)
  rc = crop_cli.main(
      [
          '--checkpoint',
          str(path),
          '--text',
          'a red square',
          '--keyword-pipeline',
          'rules',
          '--out',
          str(tmp_path / 'o'),
      ]
  )
  assert rc == 0
  report = json.loads((tmp_path / 'o' / 'crops.json').read_text())
  assert report['model'].endswith('(zero-shot)') and report['results'][0]['crops']


def test_load_names_the_mis_shaped_parameter(cropper, tmp_path):
  ckpt = cropper.save(tmp_path / 'ckpt')
  meta = json.loads((ckpt / export.CONFIG_FILE).read_text())
  meta['config']['num_queries'] = CFG.num_queries + 1  # params no longer fit the config
  (ckpt / export.CONFIG_FILE).write_text(json.dumps(meta))
  with pytest.raises(
      ValueError,
      match=r'params\.msgpack: parameter params/decoder/query_embed '
      r'has shape \(12, 32\), expected \(13, 32\)',
  ):
    cropper_lib.ClipCropper.load(ckpt)


def test_apply_offsets_spaces():
  ref = jnp.array([[0.2, 0.2, 0.4, 0.6]])
  for space in model_lib.OFFSET_SPACES:  # zero offsets: the reference itself
    np.testing.assert_allclose(
        model_lib.apply_offsets(ref, jnp.zeros((1, 4)), space), ref, atol=1e-6
    )
  np.testing.assert_allclose(
      model_lib.apply_offsets(ref, jnp.array([[0.1, 0, 0, 0]]), 'additive_xyxy'),
      [[0.3, 0.2, 0.4, 0.6]],
      atol=1e-7,
  )
  # logit space: cx' = sigmoid(logit(0.3) + 1), w' = sigmoid(logit(0.2) + log 2) (odds doubled).
  out = np.asarray(
      model_lib.apply_offsets(ref, jnp.array([[1.0, 0, np.log(2.0), 0]]), 'logit_cxcywh')
  )[0]
  cx = 1 / (1 + np.exp(-(np.log(0.3 / 0.7) + 1)))
  w = 0.5 / (1 + 0.5) * 1.0  # odds 0.25 -> 0.5, w = 0.5 / 1.5
  np.testing.assert_allclose([(out[0] + out[2]) / 2, out[2] - out[0]], [cx, w], atol=1e-6)
  with pytest.raises(ValueError, match='offset_space'):
    model_lib.ClipCropConfig(offset_space='pixels')


def test_crop_cli_keyword_pipeline_defaults_to_the_recorded_one(
    cropper, tmp_path, monkeypatch, capsys
):
  used = []
  real = keywords.build_query_roles

  def spy(text, mode, pipeline):
    used.append(pipeline)
    return real(text, mode, pipeline=pipeline)

  monkeypatch.setattr(keywords, 'build_query_roles', spy)
  ckpt = cropper.save(tmp_path / 'ckpt')  # records keywords.RULES
  argv = ['--checkpoint', str(ckpt), '--text', 'a red square', '--top-k', '1']
  assert crop_cli.main(argv + ['--out', str(tmp_path / 'a')]) == 0
  assert used == [keywords.RULES]
  # The old spelling 'rule' is refused before the model is loaded, naming the new one.
  assert crop_cli.main(argv + ['--keyword-pipeline', 'rule', '--out', str(tmp_path / 'b')]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: --keyword-pipeline: keyword pipeline 'rule'") and "'rules'" in err
  assert '\n' not in err
  assert not (tmp_path / 'b').exists()
