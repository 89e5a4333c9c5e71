"""Session fixtures shared by test modules (built once per test run)."""

from __future__ import annotations

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='session')
def synthetic_tiny_dir(tmp_path_factory) -> pathlib.Path:
  """A TFDS data dir holding `synthetic_crops/tiny`, built once per session by TFDS's own build
  code (the builder `python -m clipcrop_jax.build_dataset datasets/synthetic` runs)."""
  pytest.importorskip('tensorflow_datasets')
  from tensorflow_datasets.scripts.cli import build  # pylint: disable=g-import-not-at-top
  builder_cls, _ = build._get_builder_cls_and_kwargs(  # pylint: disable=protected-access
      str(REPO / 'datasets' / 'synthetic'), has_imports=False)
  data_dir = tmp_path_factory.mktemp('synthetic_tiny')
  builder_cls(config='tiny', data_dir=str(data_dir)).download_and_prepare()
  return data_dir


@pytest.fixture(scope='session')
def load_config():
  """`load_config('configs/x.py[:arg]', **{'a.b': value})`: the file's get_config(arg) with
  overrides (`config_lib.load_config_file`)."""
  from clipcrop_jax import config_lib  # pylint: disable=g-import-not-at-top

  def load(path: str, **updates):
    file, _, arg = path.partition(':')
    config = config_lib.load_config_file(REPO / file, arg or None)
    for key, value in updates.items():
      node = config
      *parents, leaf = key.split('.')
      for p in parents:
        node = node[p]
      node[leaf] = value
    return config
  return load
