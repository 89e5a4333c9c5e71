"""tools/export_tf.py: jax2tf SavedModels of ClipCrop and OWL-ViT, loaded back in TensorFlow.

The SavedModels are run for two batch sizes (and two query counts) and compared with the JAX
model (float32, highest matmul precision, atol 1e-4); the command line's argument and output
checks give one-line errors and never replace what is not a SavedModel.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipcrop_jax import boxes as box_lib
from clipcrop_jax.cropper import ClipCropper
from clipcrop_jax import keywords
from clipcrop_jax import model as model_lib
from clipcrop_jax import owlvit
from clipcrop_jax.owlvit import checkpoints as owl_checkpoints
from clipcrop_jax.owlvit import configs as owl_configs
from clipcrop_jax.owlvit import fileio
from clipcrop_jax.owlvit import model as owl_model
from clipcrop_jax.owlvit import tokenizer

tf = pytest.importorskip('tensorflow')

REPO = pathlib.Path(__file__).resolve().parents[1]
ATOL = 1e-4
SIZE = model_lib.TINY.owlvit_config.image_size


def _load_tool():
  spec = importlib.util.spec_from_file_location('export_tf', REPO / 'tools' / 'export_tf.py')
  module = importlib.util.module_from_spec(spec)
  sys.modules['export_tf'] = module  # dataclasses resolve their module by name
  spec.loader.exec_module(module)
  return module


tool = _load_tool()


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


@pytest.fixture(scope='module')
def cropper():
  return ClipCropper.init_random('tiny', seed=3, keyword_pipeline='rules')


@pytest.fixture(scope='module')
def model_dir(cropper, tmp_path_factory):
  return cropper.save(tmp_path_factory.mktemp('model') / 'tiny_model')


@pytest.fixture(scope='module')
def clipcrop_saved_model(model_dir, tmp_path_factory):
  """The ClipCrop model directory exported through the command line (CPU only: faster)."""
  out = tmp_path_factory.mktemp('tf') / 'clipcrop' / '1'
  with jax.default_matmul_precision('highest'):
    assert tool.main(['--model', str(model_dir), '--out', str(out), '--platforms', 'cpu']) == 0
  return out


def _inputs(batch: int, queries: int, seed: int):
  """Random pixels, uint8 images, tokens (the last query of example 0 is padding), extents."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (batch, SIZE, SIZE, 3), dtype=np.uint8)
  pixels = rng.random((batch, SIZE, SIZE, 3), dtype=np.float32)
  words = ['a dog', 'the boat', 'three cute white dogs', 'a red car', 'sky', 'a woman']
  tokens = np.stack(
      [
          tokenizer.tokenize([words[(b + q) % len(words)] for q in range(queries)])
          for b in range(batch)
      ]
  ).astype(np.int32)
  if queries > 1:
    tokens[0, -1] = 0
  extent = np.ones((batch, 2), np.float32)
  extent[1:, 0] = rng.uniform(0.4, 0.9, batch - 1)  # wide and tall images
  extent[1:, 1] = 1.0 / (1.0 + np.arange(1, batch))
  return pixels, images, tokens, extent


def _run(signature, **inputs):
  return {
      k: v.numpy() for k, v in signature(**{k: tf.constant(v) for k, v in inputs.items()}).items()
  }


@functools.lru_cache(maxsize=None)
def _jax_apply(config):
  """jit-compiled ClipCrop apply -> the SavedModel's outputs (the JAX reference)."""
  module = model_lib.ClipCrop(config)

  def apply(params, pixels, tokens, extent):
    out = module.apply({'params': params}, pixels, tokens, image_extent=extent)
    return {'boxes': out['pred_boxes'], 'scores': out['quality']}

  return jax.jit(apply)


def _jax_clipcrop(config, params, pixels, tokens, extent):
  out = _jax_apply(config)(
      params,
      jnp.asarray(pixels),
      None if tokens is None else jnp.asarray(tokens),
      jnp.asarray(extent),
  )
  return jax.tree_util.tree_map(np.asarray, out)


def _assert_close(got, want):
  assert set(got) == set(want)
  for key in want:
    assert got[key].shape == want[key].shape, key
    np.testing.assert_allclose(got[key], want[key], atol=ATOL, rtol=0, err_msg=key)


# ------------------------------------------------------------------------------------------------
# ClipCrop
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_clipcrop_saved_model_matches_jax_for_two_batch_sizes(clipcrop_saved_model, cropper):
  loaded = tf.saved_model.load(str(clipcrop_saved_model))
  assert set(loaded.signatures) == {tool.SIGNATURE_PIXELS, tool.SIGNATURE_UINT8}
  params = cropper.variables['params']
  for batch, queries in ((1, 1), (3, 4)):
    pixels, _, tokens, extent = _inputs(batch, queries, seed=batch)
    got = _run(
        loaded.signatures['serving_default'],
        pixels=pixels,
        text_queries=tokens,
        image_extent=extent,
    )
    want = _jax_clipcrop(cropper.config, params, pixels, tokens, extent)
    _assert_close(got, want)
    # Crops stay inside the real image (its extent in the padded square).
    assert np.all(got['boxes'] <= np.tile(extent, 2)[:, None, :] + 1e-6)
  # The text is used: without it (the 'base' path) the crops differ, so the match is not vacuous.
  unconditioned = _jax_clipcrop(cropper.config.replace(mode='base'), params, pixels, None, extent)
  assert np.abs(got['boxes'] - unconditioned['boxes']).max() > 1e-3
  # serving_uint8 divides by 255 first (one more batch size).
  _, images, tokens, extent = _inputs(2, 2, seed=7)
  got_uint8 = _run(
      loaded.signatures['serving_uint8'], images=images, text_queries=tokens, image_extent=extent
  )
  _assert_close(
      got_uint8,
      _jax_clipcrop(cropper.config, params, images.astype(np.float32) / 255.0, tokens, extent),
  )


@pytest.mark.slow
def test_readme_client_recipe_gives_the_croppers_best_crop(clipcrop_saved_model, cropper):
  """The README's client steps (preprocess, uint8, queries, extent; best score -> pixels) give
  `ClipCropper.crop`'s first crop."""
  info = json.loads((clipcrop_saved_model / tool.EXPORT_INFO).read_text())
  image = np.random.default_rng(4).integers(0, 256, (60, 90, 3), dtype=np.uint8)  # wide
  text = 'a woman and three dogs on the boat'
  h, w = image.shape[:2]
  side = max(h, w)
  pixels = owlvit.preprocess(image, info['image_size'])
  images = np.round(pixels * 255).astype(np.uint8)[None]
  queries = keywords.build_queries(text, info['mode'], info['keyword_pipeline'])
  tokens = owlvit.tokenize(queries)[None].astype(np.int32)
  extent = np.array([[w / side, h / side]], np.float32)
  signature = tf.saved_model.load(str(clipcrop_saved_model)).signatures['serving_default']
  out = _run(signature, pixels=pixels[None], text_queries=tokens, image_extent=extent)
  best = out['boxes'][0, np.argmax(out['scores'][0])] * side
  crop = cropper.crop(image, text=text, top_k=1)[0]
  np.testing.assert_allclose(best, crop.box, atol=1e-2)
  assert np.max(out['scores']) == pytest.approx(crop.score, abs=ATOL)
  # The uint8 signature on the rounded pixels gives nearly the same best crop.
  out8 = _run(
      tf.saved_model.load(str(clipcrop_saved_model)).signatures['serving_uint8'],
      images=images,
      text_queries=tokens,
      image_extent=extent,
  )
  assert np.argmax(out8['scores'][0]) == np.argmax(out['scores'][0])


@pytest.mark.slow
def test_clipcrop_export_info_and_signatures(clipcrop_saved_model, cropper, model_dir):
  info = json.loads((clipcrop_saved_model / tool.EXPORT_INFO).read_text())
  assert info['kind'] == 'clipcrop' and info['source'] == str(model_dir)
  assert info['mode'] == cropper.config.mode == 'full'
  assert info['keyword_pipeline'] == cropper.keyword_pipeline
  assert model_lib.ClipCropConfig.from_dict(info['config']) == cropper.config
  assert info['image_size'] == SIZE and info['platforms'] == ['cpu']
  m = cropper.config.num_queries
  assert info['signatures']['serving_default'] == {
      'inputs': {
          'pixels': [[None, SIZE, SIZE, 3], 'float32'],
          'text_queries': [[None, None, 16], 'int32'],
          'image_extent': [[None, 2], 'float32'],
      },
      'outputs': {'boxes': [[None, m, 4], 'float32'], 'scores': [[None, m], 'float32']},
  }
  assert info['signatures']['serving_uint8']['inputs']['images'] == [[None, SIZE, SIZE, 3], 'uint8']
  # TF Serving reads the same signature (input names, polymorphic batch) from the SavedModel.
  loaded = tf.saved_model.load(str(clipcrop_saved_model))
  spec = loaded.signatures['serving_default'].structured_input_signature[1]
  assert sorted(spec) == ['image_extent', 'pixels', 'text_queries']
  assert spec['pixels'].shape.as_list() == [None, SIZE, SIZE, 3]


@pytest.mark.slow
def test_clipcrop_base_mode_takes_no_text(cropper, tmp_path):
  serving = tool.clipcrop_serving(
      cropper.config, cropper.variables['params'], 'test', cropper.keyword_pipeline, mode='base'
  )
  out = tool.save(serving, tmp_path / 'base', platforms=('cpu',))
  signature = tf.saved_model.load(str(out)).signatures['serving_default']
  assert sorted(signature.structured_input_signature[1]) == ['image_extent', 'pixels']
  base = cropper.config.replace(mode='base')
  for batch in (1, 2):
    pixels, _, _, extent = _inputs(batch, 1, seed=10 + batch)
    _assert_close(
        _run(signature, pixels=pixels, image_extent=extent),
        _jax_clipcrop(base, cropper.variables['params'], pixels, None, extent),
    )
  assert json.loads((out / tool.EXPORT_INFO).read_text())['mode'] == 'base'


@pytest.mark.slow
def test_subject_union_model_takes_query_roles(tmp_path):
  """A model whose union depends on roles gets a `query_roles` input; the README client recipe
  (`keywords.build_query_roles`) gives `ClipCropper.crop`'s best crop."""
  config = model_lib.TINY.replace(selection_union='subject')
  cropper = ClipCropper.init_random(config, seed=5, keyword_pipeline='rules')
  serving = tool.clipcrop_serving(
      cropper.config, cropper.variables['params'], 'test', cropper.keyword_pipeline
  )
  with jax.default_matmul_precision('highest'):
    out = tool.save(serving, tmp_path / 'subject', platforms=('cpu',))
  info = json.loads((out / tool.EXPORT_INFO).read_text())
  assert info['selection_union'] == 'subject' and info['role_ids'] == {
      'caption': 0,
      'subject': 1,
      'context': 2,
  }
  signature = tf.saved_model.load(str(out)).signatures['serving_default']
  assert sorted(signature.structured_input_signature[1]) == [
      'image_extent',
      'pixels',
      'query_roles',
      'text_queries',
  ]
  image = np.random.default_rng(6).integers(0, 256, (70, 50, 3), dtype=np.uint8)  # tall
  text = 'the dog next to the bench'
  h, w = image.shape[:2]
  side = max(h, w)
  queries = keywords.build_query_roles(text, info['mode'], info['keyword_pipeline'])
  tokens = owlvit.tokenize([q.text for q in queries])[None].astype(np.int32)
  roles = np.array([[info['role_ids'][q.role] for q in queries]], np.int32)
  got = _run(
      signature,
      pixels=owlvit.preprocess(image, info['image_size'])[None],
      text_queries=tokens,
      query_roles=roles,
      image_extent=np.array([[w / side, h / side]], np.float32),
  )
  crop = cropper.crop(image, text=text, top_k=1)[0]
  np.testing.assert_allclose(
      got['boxes'][0, np.argmax(got['scores'][0])] * side, crop.box, atol=1e-2
  )


def test_image_mode_is_refused_without_a_text_mode(cropper):
  config = cropper.config.replace(mode='image')
  with pytest.raises(ValueError, match="'image'-mode model needs --mode"):
    tool.clipcrop_serving(config, cropper.variables['params'], 'x', 'rules')
  serving = tool.clipcrop_serving(config, cropper.variables['params'], 'x', 'rules', mode='key')
  assert serving.info['mode'] == 'key'
  assert [i.name for i in serving.inputs] == ['text_queries', 'image_extent']


# ------------------------------------------------------------------------------------------------
# Plain OWL-ViT
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_owlvit_v2_saved_model_matches_jax(tmp_path):
  config = owl_configs.get_config('tiny_v2')
  variables = owl_model.init_variables(config, seed=5)
  checkpoint = owl_checkpoints.save_scenic_checkpoint(variables, tmp_path / 'tiny_v2.msgpack')
  out = tmp_path / 'owl' / '7'
  assert tool.main(['--owlvit', str(checkpoint), '--out', str(out), '--platforms', 'cpu']) == 0
  info = json.loads((out / tool.EXPORT_INFO).read_text())
  assert info['kind'] == 'owlvit' and info['owlvit_config'] == 'tiny_v2'
  signature = tf.saved_model.load(str(out)).signatures['serving_uint8']
  apply = jax.jit(owl_model.TextZeroShotDetectionModule(config).apply)
  for batch, queries in ((2, 3), (1, 1)):
    _, images, tokens, _ = _inputs(batch, queries, seed=20 + batch)
    got = _run(signature, images=images, text_queries=tokens)
    ref = apply(variables, jnp.asarray(images, jnp.float32) / 255.0, jnp.asarray(tokens))
    _assert_close(
        got,
        {
            'boxes': np.asarray(box_lib.cxcywh_to_xyxy(ref['pred_boxes'])),
            'logits': np.asarray(ref['pred_logits']),
            'scores': np.asarray(jax.nn.sigmoid(ref['pred_logits'])),
            'objectness_logits': np.asarray(ref['objectness_logits']),
        },
    )
  assert got['boxes'].shape == (1, config.num_tokens, 4)


def test_owlvit_v1_outputs_have_no_objectness():
  config = owl_configs.get_config('tiny')
  module = owl_model.TextZeroShotDetectionModule(config)
  params = owl_model.param_shapes(config)['params']
  serving = tool.owlvit_serving(module, params, 'test')
  pixels, tokens = owl_model.dummy_inputs(config, batch_size=2, num_queries=3)
  out = jax.eval_shape(serving.fn, params, pixels, tokens)
  assert {k: v.shape for k, v in out.items()} == {
      'boxes': (2, config.num_tokens, 4),
      'logits': (2, config.num_tokens, 3),
      'scores': (2, config.num_tokens, 3),
  }
  assert [(i.name, i.dims, i.dtype) for i in serving.inputs] == [
      ('text_queries', (tool.QUERY_DIM, 16), 'int32')
  ]


# ------------------------------------------------------------------------------------------------
# Command line: arguments and the output directory
# ------------------------------------------------------------------------------------------------


def _error_line(capsys) -> str:
  err = capsys.readouterr().err.strip()
  assert err.startswith('error: ') and '\n' not in err, err
  return err


@pytest.mark.parametrize(
    'argv, code, message',
    [
        (['--random-init', 'huge'], 2, "unknown config 'huge'"),
        (['--random-init', 'tiny', '--platforms', 'cpu,gpu'], 2, "--platforms 'cpu,gpu'"),
        (['--random-init', 'tiny', '--platforms', 'cpu,cpu'], 2, '--platforms'),
        (['--owlvit', 'x.msgpack', '--mode', 'base'], 2, '--mode applies to ClipCrop'),
        (['--model', '{tmp}/missing'], 1, 'neither a ClipCrop model directory'),
        (['--owlvit', '{tmp}/junk.msgpack'], 1, 'junk.msgpack'),
    ],
)
def test_bad_arguments_give_one_line_errors(argv, code, message, tmp_path, capsys):
  (tmp_path / 'junk.msgpack').write_bytes(b'not a checkpoint')
  argv = [a.format(tmp=tmp_path) for a in argv] + ['--out', str(tmp_path / 'out')]
  assert tool.main(argv) == code
  assert message in _error_line(capsys)
  assert not (tmp_path / 'out').exists()


def test_command_line_needs_exactly_one_source(tmp_path):
  for argv in ([], ['--random-init', 'tiny', '--owlvit', 'x']):
    with pytest.raises(SystemExit) as e:
      tool.parse_args(argv + ['--out', str(tmp_path)])
    assert e.value.code == 2


def test_output_directory_policy(tmp_path, capsys):
  a_file = tmp_path / 'file'
  a_file.write_text('keep')
  foreign = tmp_path / 'photos'
  foreign.mkdir()
  (foreign / 'cat.jpg').write_bytes(b'keep')
  saved = tmp_path / 'saved'
  saved.mkdir()
  (saved / 'saved_model.pb').write_bytes(b'old')
  (tmp_path / 'empty').mkdir()
  for out, overwrite, message in (
      (a_file, True, 'not a directory'),
      (foreign, True, 'not a SavedModel'),
      (saved, False, 'pass --overwrite'),
  ):
    with pytest.raises(ValueError, match=message):
      tool.check_out_dir(out, overwrite)
    # The command line refuses before loading anything (the source does not even exist).
    argv = ['--model', str(tmp_path / 'missing'), '--out', str(out)]
    assert tool.main(argv + ['--overwrite'] * overwrite) == 2
    assert message in _error_line(capsys)
  assert tool.check_out_dir(saved, overwrite=True) == saved
  assert tool.check_out_dir(tmp_path / 'empty', overwrite=False) == tmp_path / 'empty'
  assert tool.check_out_dir(tmp_path / 'new' / 'dir', overwrite=False).parent.is_dir()
  assert a_file.read_text() == 'keep' and (foreign / 'cat.jpg').read_bytes() == b'keep'
  assert (saved / 'saved_model.pb').read_bytes() == b'old'


@pytest.mark.slow
def test_overwrite_replaces_a_saved_model_atomically(
    cropper, model_dir, tmp_path, monkeypatch, capsys
):
  out = tmp_path / 'model'
  fileio.make_writable_dir(out)
  (out / 'saved_model.pb').write_bytes(b'old')
  (out / 'stale.txt').write_text('old')
  serving = tool.clipcrop_serving(cropper.config, cropper.variables['params'], 'test', 'rules')

  def broken_save(module, path, signatures):  # dies after writing part of the SavedModel
    del module, signatures
    (pathlib.Path(path) / 'saved_model.pb').write_bytes(b'partial')
    raise OSError('disk full')

  monkeypatch.setattr(tf.saved_model, 'save', broken_save)
  with pytest.raises(OSError, match='disk full'):
    tool.save(serving, out, overwrite=True, platforms=('cpu',))
  assert (out / 'saved_model.pb').read_bytes() == b'old' and (out / 'stale.txt').exists()
  assert [p.name for p in tmp_path.iterdir()] == ['model']  # no temporary directory left
  monkeypatch.undo()
  tool.save(serving, out, overwrite=True, platforms=('cpu',))
  assert not (out / 'stale.txt').exists() and tool.is_saved_model(out)
  assert json.loads((out / tool.EXPORT_INFO).read_text())['keyword_pipeline'] == 'rules'
  # The command line reports a conversion failure in one line (exit code 1), --out untouched.
  monkeypatch.setattr(
      tool,
      'to_tf_module',
      lambda *a: (_ for _ in ()).throw(NotImplementedError('no lowering for op foo\nlong details')),
  )
  before = sorted(p.name for p in out.iterdir())
  assert tool.main(['--model', str(model_dir), '--out', str(out), '--overwrite']) == 1
  assert 'conversion failed (NotImplementedError: no lowering for op foo)' in _error_line(capsys)
  assert sorted(p.name for p in out.iterdir()) == before
