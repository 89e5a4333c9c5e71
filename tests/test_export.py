"""The ClipCrop model directory (clipcrop_jax.export): round trip, format 1, newer formats,
training workdirs.

ClipCropper.save / load delegate here; their atomic-save and refusal tests live in
tests/test_safety.py, the crop CLI's in tests/test_clipcrop.py.
"""

from __future__ import annotations

import dataclasses
import json

import flax.serialization
import jax
import numpy as np
import pytest

from clipcrop_jax import cropper as cropper_lib
from clipcrop_jax import export
from clipcrop_jax import keywords
from clipcrop_jax import model as model_lib

CFG = model_lib.TINY


@pytest.fixture(scope='module')
def params():
  return model_lib.init_variables(CFG, seed=2)['params']


def _assert_same_params(got, want):
  got_flat = jax.tree_util.tree_flatten_with_path(got)[0]
  want_flat = jax.tree_util.tree_flatten_with_path(want)[0]
  assert [p for p, _ in got_flat] == [p for p, _ in want_flat]
  for (_, a), (_, b) in zip(got_flat, want_flat):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _write_old_format(directory, params, version=1, config=CFG):
  """A model directory exactly as format 1 (no keyword_pipeline entry) or 2 (no
  config.selection_union) wrote it."""
  directory.mkdir()
  data = flax.serialization.msgpack_serialize(
      jax.tree_util.tree_map(np.asarray, {'params': params})
  )
  (directory / 'params.msgpack').write_bytes(data)
  fields = dataclasses.asdict(config)
  del fields['selection_union']
  meta = {'format_version': version, 'config': fields}
  if version == 2:
    meta['keyword_pipeline'] = keywords.RULES
  (directory / 'clipcrop_config.json').write_text(json.dumps(meta, indent=1))
  return directory


def _edit_meta(directory, **entries):
  meta = json.loads((directory / export.CONFIG_FILE).read_text())
  meta.update(entries)
  (directory / export.CONFIG_FILE).write_text(json.dumps(meta))


def test_round_trip_records_the_keyword_pipeline(params, tmp_path):
  path = export.save_model(tmp_path / 'model', CFG, params, keywords.RULES)
  assert path == tmp_path / 'model' and export.is_model_dir(path)
  assert sorted(p.name for p in path.iterdir()) == ['clipcrop_config.json', 'params.msgpack']
  meta = json.loads((path / 'clipcrop_config.json').read_text())
  assert meta['format_version'] == export.FORMAT_VERSION == 3
  assert meta['keyword_pipeline'] == 'rules' and meta['config']['selection_union'] == 'all'
  model = export.load_model(path)
  assert model.config == CFG and model.keyword_pipeline == keywords.RULES
  assert model.format_version == 3
  _assert_same_params(model.params, params)
  export.save_model(path, CFG, params, 'my_spacy_pipeline')  # a model directory is replaced
  assert export.load_model(path).keyword_pipeline == 'my_spacy_pipeline'


def test_training_only_fields_are_not_written(params, tmp_path):
  """`remat_encoder` says how a model was trained: the directory does not record it (it loads
  as the default), and a directory that does (older versions) still loads."""
  path = export.save_model(
      tmp_path / 'model', CFG.replace(remat_encoder=True), params, keywords.RULES
  )
  meta = json.loads((path / export.CONFIG_FILE).read_text())
  assert 'remat_encoder' not in meta['config']
  assert export.load_model(path).config == CFG
  _edit_meta(path, config={**meta['config'], 'remat_encoder': True})
  assert export.load_model(path).config.remat_encoder


def test_cropper_uses_the_recorded_pipeline_unless_told(params, tmp_path):
  c = cropper_lib.ClipCropper(CFG, {'params': params}, keyword_pipeline=keywords.RULES)
  path = c.save(tmp_path / 'model')
  assert export.load_model(path).keyword_pipeline == keywords.RULES
  assert cropper_lib.ClipCropper.load(path).keyword_pipeline == keywords.RULES
  assert cropper_lib.ClipCropper.load(path, keyword_pipeline='other').keyword_pipeline == 'other'
  with pytest.raises(ValueError, match="use 'rules'"):  # None no longer names the rule extractor
    cropper_lib.ClipCropper(CFG, {'params': params}, keyword_pipeline=None)


@pytest.mark.parametrize(
    'pipeline,error', [(None, ValueError), ('', ValueError), ('rule', ValueError), (3, TypeError)]
)
def test_save_refuses_old_spellings_of_the_rule_based_extractor(params, tmp_path, pipeline, error):
  with pytest.raises(error, match="'rules'"):
    export.save_model(tmp_path / 'model', CFG, params, pipeline)
  assert not (tmp_path / 'model').exists()


def test_format_1_directory_loads_with_the_default_pipeline(params, tmp_path):
  path = _write_old_format(tmp_path / 'old', params)
  model = export.load_model(path)
  assert model.format_version == 1 and model.keyword_pipeline == keywords.DEFAULT_PIPELINE
  assert model.config == CFG
  _assert_same_params(model.params, params)
  assert cropper_lib.ClipCropper.load(path).keyword_pipeline == keywords.DEFAULT_PIPELINE
  new = export.save_model(tmp_path / 'new', CFG, params, keywords.RULES)
  assert (new / 'params.msgpack').read_bytes() == (path / 'params.msgpack').read_bytes()


@pytest.mark.parametrize('recorded', [None, '', 'rule'])
def test_old_spellings_in_a_directory_read_as_rules(params, tmp_path, recorded):
  path = export.save_model(tmp_path / 'model', CFG, params, keywords.RULES)
  _edit_meta(path, keyword_pipeline=recorded)
  assert export.load_model(path).keyword_pipeline == keywords.RULES


@pytest.mark.parametrize(
    'entries,match',
    [
        ({'format_version': 4}, r'format_version 4 was written by a newer clipcrop-jax'),
        ({'format_version': 'two'}, r"format_version='two'; expected an integer"),
        ({'keyword_pipeline': 7}, r'keyword pipeline must be a str'),
    ],
)
def test_bad_or_newer_format_is_one_line(params, tmp_path, entries, match):
  path = export.save_model(tmp_path / 'model', CFG, params, keywords.RULES)
  _edit_meta(path, **entries)
  with pytest.raises(ValueError, match=match) as info:
    export.load_model(path)
  assert export.CONFIG_FILE in str(info.value) and '\n' not in str(info.value)


def test_format_2_directory_loads_as_the_papers_union(params, tmp_path):
  path = _write_old_format(tmp_path / 'old', params, version=2)
  model = export.load_model(path)
  assert model.format_version == 2 and model.config.selection_union == 'all'
  assert model.config == CFG and model.keyword_pipeline == keywords.RULES
  _assert_same_params(model.params, params)


def test_format_3_needs_the_selection_union(params, tmp_path):
  path = export.save_model(tmp_path / 'model', CFG, params, keywords.RULES)
  meta = json.loads((path / export.CONFIG_FILE).read_text())
  del meta['config']['selection_union']
  (path / export.CONFIG_FILE).write_text(json.dumps(meta))
  with pytest.raises(ValueError, match=r'no "config.selection_union" entry \(required by format 3'):
    export.load_model(path)


def test_subject_union_model_round_trip(tmp_path):
  config = CFG.replace(selection_union='subject')
  params = model_lib.init_variables(config, seed=1)['params']
  assert params['decoder']['role_embed'].shape == (3, config.decoder_width)
  model = export.load_model(export.save_model(tmp_path / 'm', config, params, keywords.RULES))
  assert model.config.selection_union == 'subject'
  _assert_same_params(model.params, params)
  # A paper-union directory's parameters do not fit a subject-union config: named, one line.
  meta = json.loads((tmp_path / 'm' / export.CONFIG_FILE).read_text())
  export.save_model(tmp_path / 'all', CFG, model_lib.init_variables(CFG)['params'], 'rules')
  broken = json.loads((tmp_path / 'all' / export.CONFIG_FILE).read_text())
  broken['config'] = meta['config']
  (tmp_path / 'all' / export.CONFIG_FILE).write_text(json.dumps(broken))
  with pytest.raises(ValueError, match='parameter params/decoder/role_embed missing'):
    export.load_model(tmp_path / 'all')


def test_format_2_without_a_pipeline_is_refused(params, tmp_path):
  path = export.save_model(tmp_path / 'model', CFG, params, keywords.RULES)
  meta = json.loads((path / export.CONFIG_FILE).read_text())
  del meta['keyword_pipeline']
  (path / export.CONFIG_FILE).write_text(json.dumps(meta))
  with pytest.raises(ValueError, match='no "keyword_pipeline" entry'):
    export.load_model(path)


def test_training_workdir_is_looked_up(params, tmp_path):
  workdir = tmp_path / 'run'
  export.save_model(workdir / export.EXPORT_DIR, CFG, params, 'pipe')
  (workdir / 'config.json').write_text('{}')  # a workdir holds more than the export
  assert not export.is_model_dir(workdir) and export.is_model_dir(workdir / 'clipcrop')
  model = export.load_model(workdir)
  assert model.keyword_pipeline == 'pipe'
  _assert_same_params(model.params, params)
  assert cropper_lib.ClipCropper.load(workdir).keyword_pipeline == 'pipe'
  (tmp_path / 'empty').mkdir()
  with pytest.raises(
      FileNotFoundError,
      match=r'neither a ClipCrop model directory '
      r'\(clipcrop_config\.json\) nor a training workdir '
      r'with clipcrop/',
  ):
    export.load_model(tmp_path / 'empty')
