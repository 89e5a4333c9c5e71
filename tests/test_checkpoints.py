"""Tests for clipcrop_jax.owlvit.checkpoints and tools/convert_checkpoint.py (no network)."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import pickle
import re

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from clipcrop_jax.owlvit import checkpoints as ck
from clipcrop_jax.owlvit.configs import get_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _random_variables(name: str, seed: int = 0) -> dict:
  """Random float32 params for a named config, shaped by `jax.eval_shape` of the module init.

  Numpy sampling is much faster than a real `module.init` on CPU; every leaf is non-constant.
  """
  rng = np.random.default_rng(seed)
  flat = {}
  for path, shape in ck.expected_param_shapes(get_config(name)).items():
    noise = rng.standard_normal(shape).astype(np.float32)
    flat[path] = 1.0 + 0.1 * noise if path.endswith('/scale') else 0.05 * noise
  return {'params': ck.unflatten_params(flat)}


_APPLY = {}


def _apply(module, variables, images, ids):
  """Jitted `module.apply`, compiled once per config."""
  if module.config not in _APPLY:
    _APPLY[module.config] = jax.jit(module.apply)
  return _APPLY[module.config](variables, images, ids)


@pytest.fixture(scope='module')
def tiny_variables():
  return _random_variables('tiny')


@pytest.fixture(scope='module')
def tiny_v2_variables():
  return _random_variables('tiny_v2', seed=1)


def _inputs(config, batch: int = 2, seed: int = 0):
  rng = np.random.default_rng(seed)
  images = rng.uniform(size=(batch, config.image_size, config.image_size, 3)).astype(np.float32)
  ids = np.zeros((batch, 2, config.max_query_length), np.int32)
  ids[..., 0] = 49406
  ids[..., 1:4] = rng.integers(1, 49000, size=(batch, 2, 3))
  ids[..., 4] = 49407
  return images, ids


def _assert_same_params(a, b):
  fa, fb = ck.flatten_params(ck._unwrap_variables(a)), ck.flatten_params(ck._unwrap_variables(b))
  assert sorted(fa) == sorted(fb)
  for path in fa:
    np.testing.assert_array_equal(np.asarray(fa[path]), np.asarray(fb[path]), err_msg=path)


# --------------------------------------------------------------------------------------------
# Scenic msgpack layouts.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize('name', ['tiny', 'tiny_v2'])
def test_three_layouts_load_to_identical_variables_and_outputs(
    name, tiny_variables, tiny_v2_variables, tmp_path
):
  variables = tiny_variables if name == 'tiny' else tiny_v2_variables
  config = get_config(name)
  images, ids = _inputs(config)
  outputs = {}
  for layout in ('current', 'v2', 'v1'):
    path = ck.save_scenic_checkpoint(variables, tmp_path / f'{layout}.msgpack', layout=layout)
    module, loaded = ck.load_checkpoint(path)
    assert module.config == config
    _assert_same_params(loaded, variables)
    outputs[layout] = _apply(module, loaded, images, ids)
  reference = _apply(module, variables, images, ids)
  assert ('objectness_logits' in reference) == config.objectness
  for layout, out in outputs.items():
    assert sorted(out) == sorted(reference)
    for key in reference:
      np.testing.assert_array_equal(out[key], reference[key], err_msg=f'{layout}/{key}')


def test_saved_layouts_use_legacy_names(tiny_variables, tmp_path):
  """The writer reproduces the released families' raw key names (spec §7.2)."""
  for layout, root, ln in (
      ('v1', ('optimizer', 'target'), ('ln_1', 'ln_2')),
      ('v2', ('params',), ('ln_0', 'ln_1')),
      ('current', ('params',), ('ln_0', 'ln_1')),
  ):
    path = ck.save_scenic_checkpoint(tiny_variables, tmp_path / f'{layout}.msgpack', layout)
    raw = ck.read_msgpack(path)
    for key in root:
      raw = raw[key]
    blocks = raw['backbone']['clip']['visual']['transformer']
    block0 = 'resblocks_0' if layout == 'current' else 'resblocks.0'
    assert set(blocks) == {block0, block0[:-1] + '1'}
    assert set(blocks[block0]) == {ln[0], ln[1], 'attn', 'mlp'}
    assert 'resblocks.0' in raw['backbone']['clip']['text']['transformer'] or layout == 'current'


@pytest.mark.parametrize('umask', [0o022, 0o077])
def test_saved_checkpoint_has_normal_permissions_and_no_leftovers(tiny_variables, tmp_path, umask):
  """0666 & ~umask like any new file (mkstemp's 0600 made converted checkpoints unreadable to
  others), written atomically over an existing file, no temporary file left behind."""
  old = os.umask(umask)
  try:
    path = tmp_path / 'out' / 'tiny.msgpack'
    path.parent.mkdir()
    path.write_bytes(b'an older checkpoint')
    assert ck.save_scenic_checkpoint(tiny_variables, path) == path
  finally:
    os.umask(old)
  assert path.stat().st_mode & 0o777 == 0o666 & ~umask
  assert [p.name for p in path.parent.iterdir()] == ['tiny.msgpack']
  _assert_same_params(ck.load_checkpoint(path)[1], tiny_variables)


def test_legacy_layernorms_detected_by_ln2_not_by_key_style(tiny_variables, tmp_path):
  """`resblocks_N` keys with the old `ln_1/ln_2` names (Scenic's check would misfire)."""
  legacy = ck._to_legacy(tiny_variables['params'], legacy_ln=True)
  flat = {p.replace('resblocks.', 'resblocks_'): v for p, v in ck.flatten_params(legacy).items()}
  assert any('/resblocks_0/ln_2/' in p for p in flat)
  path = tmp_path / 'mixed.msgpack'
  path.write_bytes(flax.serialization.msgpack_serialize({'params': ck.unflatten_params(flat)}))
  _assert_same_params(ck.load_checkpoint(path)[1], tiny_variables)


def test_flax_checkpoint_directory_uses_latest_step(tiny_variables, tiny_v2_variables, tmp_path):
  ck.save_scenic_checkpoint(tiny_variables, tmp_path / 'checkpoint_12', layout='v2')
  ck.save_scenic_checkpoint(tiny_v2_variables, tmp_path / 'checkpoint_5', layout='v1')
  module, loaded = ck.load_checkpoint(tmp_path)
  assert module.config.name == 'tiny'
  _assert_same_params(loaded, tiny_variables)


def test_chunked_arrays_scalars_and_low_precision(tiny_variables, tmp_path, monkeypatch):
  """Chunked arrays, ExtType-3 numpy scalars and bfloat16 leaves all load as float32."""
  flat = ck.flatten_params(tiny_variables['params'])
  tree = dict(flat)
  tree['backbone/clip/logit_scale'] = np.float32(flat['backbone/clip/logit_scale'])  # ExtType 3
  tree['class_head/Dense_0/kernel'] = np.asarray(flat['class_head/Dense_0/kernel'], jnp.bfloat16)
  monkeypatch.setattr(flax.serialization, 'MAX_CHUNK_SIZE', 4096)  # chunk every big array
  data = flax.serialization.msgpack_serialize({'params': ck.unflatten_params(tree)})
  assert b'__msgpack_chunked_array__' in data
  path = tmp_path / 'chunked.msgpack'
  path.write_bytes(data)
  _, loaded = ck.load_checkpoint(path, 'tiny')
  got = ck.flatten_params(loaded['params'])
  for p, v in flat.items():
    assert got[p].dtype == jnp.float32
    want = np.asarray(tree[p], np.float32)
    np.testing.assert_array_equal(np.asarray(got[p]), want, err_msg=p)
  assert got['backbone/clip/logit_scale'].shape == ()


def test_obsolete_and_unknown_keys_are_dropped(tiny_variables, tmp_path):
  params = jax.tree.map(np.asarray, tiny_variables['params'])
  params['class_head'] = dict(
      params['class_head'],
      padding=np.zeros((1, 32), np.float32),
      padding_bias=np.zeros((1,), np.float32),
  )
  params['obj_mask_head'] = {'Dense_0': {'kernel': np.ones((2, 2), np.float32)}}
  params['objectness_head'] = {'Dense_0': {'kernel': np.ones((64, 64), np.float32)}}
  tree = {
      'optimizer': {'target': ck._to_legacy(params, legacy_ln=True), 'state': {'step': 7}},
      'rng': np.zeros((2,), np.uint32),
  }
  path = tmp_path / 'extra.msgpack'
  path.write_bytes(flax.serialization.msgpack_serialize(tree))
  module, loaded = ck.load_checkpoint(path, 'tiny')  # objectness params: extra, dropped
  assert module.config.name == 'tiny'
  assert set(loaded['params']) == {'backbone', 'class_head', 'obj_box_head'}
  assert set(loaded['params']['class_head']) == {'Dense_0', 'logit_shift', 'logit_scale'}
  _assert_same_params(loaded, tiny_variables)
  # Without a config, the partial objectness head makes the tree a (broken) v2 tree.
  with pytest.raises(ck.CheckpointError, match=r'objectness_head/Dense_0/bias is missing'):
    ck.load_checkpoint(path)


# --------------------------------------------------------------------------------------------
# Architecture inference and the B/32 tree from the spec.
# --------------------------------------------------------------------------------------------


def _spec_b32_table() -> dict[str, tuple[int, ...]]:
  """Spec §1.2: the full parameter tree of OWL-ViT v1 CLIP B/32 @ 768 px."""
  table = {
      'backbone/clip/logit_scale': (),
      'backbone/clip/visual/conv1/kernel': (32, 32, 3, 768),
      'backbone/clip/visual/class_embedding': (768,),
      'backbone/clip/visual/positional_embedding': (577, 768),
      'backbone/clip/visual/ln_pre/scale': (768,),
      'backbone/clip/visual/ln_pre/bias': (768,),
      'backbone/clip/visual/ln_post/scale': (768,),
      'backbone/clip/visual/ln_post/bias': (768,),
      'backbone/clip/text/token_embedding/embedding': (49408, 512),
      'backbone/clip/text/positional_embedding': (16, 512),
      'backbone/clip/text/ln_final/scale': (512,),
      'backbone/clip/text/ln_final/bias': (512,),
      'backbone/clip/text/text_projection/kernel': (512, 512),
      'backbone/merged_class_token/scale': (768,),
      'backbone/merged_class_token/bias': (768,),
      'class_head/Dense_0/kernel': (768, 512),
      'class_head/Dense_0/bias': (512,),
      'class_head/logit_shift/kernel': (768, 1),
      'class_head/logit_shift/bias': (1,),
      'class_head/logit_scale/kernel': (768, 1),
      'class_head/logit_scale/bias': (1,),
      'obj_box_head/Dense_0/kernel': (768, 768),
      'obj_box_head/Dense_0/bias': (768,),
      'obj_box_head/Dense_1/kernel': (768, 768),
      'obj_box_head/Dense_1/bias': (768,),
      'obj_box_head/Dense_2/kernel': (768, 4),
      'obj_box_head/Dense_2/bias': (4,),
  }
  for tower, width, heads in (('visual', 768, 12), ('text', 512, 8)):
    for i in range(12):
      block = f'backbone/clip/{tower}/transformer/resblocks_{i}'
      for ln in ('ln_0', 'ln_1'):
        table[f'{block}/{ln}/scale'] = (width,)
        table[f'{block}/{ln}/bias'] = (width,)
      for proj in ('query', 'key', 'value'):
        table[f'{block}/attn/{proj}/kernel'] = (width, heads, 64)
        table[f'{block}/attn/{proj}/bias'] = (heads, 64)
      table[f'{block}/attn/out/kernel'] = (heads, 64, width)
      table[f'{block}/attn/out/bias'] = (width,)
      table[f'{block}/mlp/c_fc/kernel'] = (width, 4 * width)
      table[f'{block}/mlp/c_fc/bias'] = (4 * width,)
      table[f'{block}/mlp/c_proj/kernel'] = (4 * width, width)
      table[f'{block}/mlp/c_proj/bias'] = (width,)
  return table


def test_b32_eval_shape_matches_spec_table():
  expected = _spec_b32_table()
  got = ck.expected_param_shapes(get_config('clip_b32'))
  assert len(expected) == 411
  assert got == expected
  assert len([p for p in got if p.startswith('class_head/')]) == 6
  assert sum(int(np.prod(s)) for s in got.values()) == 152_838_663


def test_owl2_b16_param_count_and_objectness():
  got = ck.expected_param_shapes(get_config('owl2_b16'))
  assert sum(int(np.prod(s)) for s in got.values()) == 154_573_576
  assert got['objectness_head/Dense_2/kernel'] == (768, 1)
  assert got['backbone/clip/visual/positional_embedding'] == (3601, 768)


@pytest.mark.parametrize('name', ['clip_b32', 'clip_b16', 'owl2_b16', 'tiny', 'tiny_v2'])
def test_infer_config_from_shapes(name):
  config = get_config(name)
  shapes = {
      p: jax.ShapeDtypeStruct(s, jnp.float32) for p, s in ck.expected_param_shapes(config).items()
  }
  assert ck.infer_config(ck.unflatten_params(shapes)) is config


def test_infer_config_custom_and_real_params(tiny_variables):
  assert ck.infer_config(tiny_variables).name == 'tiny'
  config = get_config('tiny').replace(vision_layers=3, image_size=64)
  shapes = {
      p: jax.ShapeDtypeStruct(s, jnp.float32) for p, s in ck.expected_param_shapes(config).items()
  }
  inferred = ck.infer_config(ck.unflatten_params(shapes))
  assert inferred.name == 'custom'
  assert inferred == config.replace(name='custom')


# --------------------------------------------------------------------------------------------
# Errors.
# --------------------------------------------------------------------------------------------


def test_wrong_architecture_names_the_parameter(tiny_variables, tmp_path):
  path = ck.save_scenic_checkpoint(tiny_variables, tmp_path / 'tiny.msgpack')
  with pytest.raises(ck.CheckpointError) as e:
    ck.load_checkpoint(path, 'tiny_v2')
  msg = str(e.value)
  assert str(path) in msg and 'objectness_head/Dense_0/' in msg and 'missing' in msg
  assert 'tiny_v2' in msg and '\n' not in msg
  with pytest.raises(
      ck.CheckpointError,
      match=r'conv1/kernel has shape \(16, 16, 3, 64\), expected '
      r'\(32, 32, 3, 768\) for config clip_b32',
  ):
    ck.load_checkpoint(path, get_config('clip_b32'))


def test_mis_shaped_tree_names_the_parameter(tiny_variables, tmp_path):
  flat = ck.flatten_params(jax.tree.map(np.asarray, tiny_variables['params']))
  flat['obj_box_head/Dense_1/kernel'] = np.zeros((64, 65), np.float32)
  path = ck.save_scenic_checkpoint(ck.unflatten_params(flat), tmp_path / 'bad.msgpack', 'v2')
  with pytest.raises(
      ck.CheckpointError,
      match=r'obj_box_head/Dense_1/kernel has shape \(64, 65\), expected '
      r'\(64, 64\) for config tiny',
  ):
    ck.load_checkpoint(path)
  del flat['obj_box_head/Dense_1/kernel']
  with pytest.raises(ck.CheckpointError, match=r'obj_box_head/Dense_1/kernel is missing'):
    ck.validate_params(ck.unflatten_params(flat), get_config('tiny'), 'x')


def test_unreadable_inputs(tmp_path):
  (tmp_path / 'model.bin').write_bytes(b'\x80\x02}q\x00.')
  with pytest.raises(ck.CheckpointError, match='never unpickled.*save_pretrained'):
    ck.load_checkpoint(tmp_path / 'model.bin')
  disguised = tmp_path / 'disguised.msgpack'
  disguised.write_bytes(pickle.dumps({'a': 1}))
  with pytest.raises(ck.CheckpointError, match='never unpickled'):
    ck.load_checkpoint(disguised)
  zipped = tmp_path / 'zipped'
  zipped.write_bytes(b'PK\x03\x04' + bytes(60))
  with pytest.raises(ck.CheckpointError, match='PyTorch pickle'):
    ck.load_checkpoint(zipped)
  noise = tmp_path / 'noise.msgpack'
  noise.write_bytes(bytes([0x01]) + np.random.default_rng(0).bytes(4000))
  with pytest.raises(ck.CheckpointError, match=re.escape(f'checkpoint {noise}: not a msgpack map')):
    ck.load_checkpoint(noise)
  truncated = tmp_path / 'truncated.msgpack'
  truncated.write_bytes(
      flax.serialization.msgpack_serialize({'params': {'x': np.ones(100, np.float32)}})[:200]
  )
  with pytest.raises(ck.CheckpointError, match='corrupt or truncated'):
    ck.load_checkpoint(truncated)
  listed = tmp_path / 'list.msgpack'
  listed.write_bytes(flax.serialization.msgpack_serialize([np.ones(3)]))
  with pytest.raises(ck.CheckpointError, match='not a msgpack map'):
    ck.load_checkpoint(listed)
  other = tmp_path / 'other.msgpack'
  other.write_bytes(flax.serialization.msgpack_serialize({'step': 3, 'weights': np.ones(3)}))
  with pytest.raises(ck.CheckpointError, match='no OWL-ViT parameters found'):
    ck.load_checkpoint(other)
  with pytest.raises(ck.CheckpointError, match='no such file or directory'):
    ck.load_checkpoint(tmp_path / 'missing.msgpack')
  torch_dir = tmp_path / 'torch_dir'
  torch_dir.mkdir()
  (torch_dir / 'pytorch_model.bin').write_bytes(b'PK\x03\x04')
  with pytest.raises(ck.CheckpointError, match='never unpickled'):
    ck.load_checkpoint(torch_dir)
  (tmp_path / 'empty_dir').mkdir()
  with pytest.raises(ck.CheckpointError, match='neither model.safetensors'):
    ck.load_checkpoint(tmp_path / 'empty_dir')


def test_unknown_config_name(tiny_variables, tmp_path):
  path = ck.save_scenic_checkpoint(tiny_variables, tmp_path / 'tiny.msgpack')
  with pytest.raises(ck.CheckpointError, match='Unknown OWL-ViT config'):
    ck.load_checkpoint(path, 'clip_b99')


# --------------------------------------------------------------------------------------------
# HF safetensors without torch (names from scenic_to_hf_state_dict).
# --------------------------------------------------------------------------------------------


def _write_hf_dir(variables, config, directory: pathlib.Path) -> pathlib.Path:
  directory.mkdir(parents=True, exist_ok=True)
  state = ck.scenic_to_hf_state_dict(variables)
  state[
      'owlv2.visual_projection.weight' if config.objectness else 'owlvit.visual_projection.weight'
  ] = np.zeros((config.embed_dim, config.vision_width), np.float32)
  safetensors.numpy.save_file(state, str(directory / 'model.safetensors'))
  (directory / 'config.json').write_text(json.dumps(ck.hf_config_dict(config)))
  return directory


@pytest.mark.parametrize('name', ['tiny', 'tiny_v2'])
def test_hf_safetensors_round_trip(name, tiny_variables, tiny_v2_variables, tmp_path):
  variables = tiny_variables if name == 'tiny' else tiny_v2_variables
  config = get_config(name)
  directory = _write_hf_dir(variables, config, tmp_path / 'hf')
  module, loaded = ck.load_checkpoint(directory)
  assert module.config is config
  _assert_same_params(loaded, variables)
  _, loaded_file = ck.load_checkpoint(directory / 'model.safetensors', name)
  _assert_same_params(loaded_file, variables)


def test_hf_config_mismatch_is_reported(tiny_variables, tmp_path):
  directory = _write_hf_dir(tiny_variables, get_config('tiny'), tmp_path / 'hf')
  hf = json.loads((directory / 'config.json').read_text())
  hf['vision_config']['image_size'] = 768
  (directory / 'config.json').write_text(json.dumps(hf))
  with pytest.raises(ck.CheckpointError, match=r'vision_config.image_size=768'):
    ck.load_checkpoint(directory)


# --------------------------------------------------------------------------------------------
# Converter tool.
# --------------------------------------------------------------------------------------------


def _converter():
  spec = importlib.util.spec_from_file_location(
      'convert_checkpoint', ROOT / 'tools' / 'convert_checkpoint.py'
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_converter_round_trip(tiny_v2_variables, tmp_path, capsys):
  converter = _converter()
  src = ck.save_scenic_checkpoint(tiny_v2_variables, tmp_path / 'v1.msgpack', layout='v1')
  out = tmp_path / 'out' / 'current.msgpack'
  assert converter.main(['--input', str(src), '--output', str(out)]) == 0
  printed = capsys.readouterr().out
  count = ck.param_count(tiny_v2_variables['params'])
  assert 'config: tiny_v2' in printed and f'{count:,}' in printed
  raw = ck.read_msgpack(out)
  assert set(raw) == {'params'}
  assert 'resblocks_0' in raw['params']['backbone']['clip']['text']['transformer']
  _, loaded = ck.load_checkpoint(out, 'tiny_v2')
  _assert_same_params(loaded, tiny_v2_variables)
  # From an HF directory, and a wrong --config gives exit code 1 with the parameter path.
  hf = _write_hf_dir(tiny_v2_variables, get_config('tiny_v2'), tmp_path / 'hf')
  assert converter.main(['--input', str(hf), '--output', str(tmp_path / 'hf.msgpack')]) == 0
  _assert_same_params(ck.load_checkpoint(tmp_path / 'hf.msgpack')[1], tiny_v2_variables)
  assert (
      converter.main(
          ['--input', str(src), '--output', str(tmp_path / 'x.msgpack'), '--config', 'clip_b32']
      )
      == 1
  )
  assert 'backbone/clip/' in capsys.readouterr().err
  assert not (tmp_path / 'x.msgpack').exists()
