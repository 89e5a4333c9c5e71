"""Session fixtures shared by test modules (built once per test run)."""

from __future__ import annotations

import importlib.util
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
  """`load_config('configs/x.py', **{'a.b': value})`: the file's get_config() with overrides."""

  def load(path: str, **updates):
    spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for key, value in updates.items():
      node = config
      *parents, leaf = key.split('.')
      for p in parents:
        node = node[p]
      node[leaf] = value
    return config
  return load
