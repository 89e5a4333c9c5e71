"""Session fixtures shared by test modules (built once per test run)."""

from __future__ import annotations

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='session', autouse=True)
def subprocess_compilation_cache(tmp_path_factory):
  """One persistent JAX compilation cache for every JAX subprocess a test starts (crop / train /
  serve command lines, killed and restarted runs, multi-process runs): a program compiled by one
  process is loaded by the next instead of compiled again. Set in the environment only, so the
  test process itself (already importing JAX) is unaffected; a test's own value wins."""
  names = ('JAX_COMPILATION_CACHE_DIR', 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS')
  old = {k: os.environ.get(k) for k in names}
  os.environ.setdefault(names[0], str(tmp_path_factory.mktemp('jax_subprocess_cache')))
  os.environ.setdefault(names[1], '0')
  yield
  for key, value in old.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value


@pytest.fixture(scope='session')
def synthetic_tiny_dir(tmp_path_factory) -> pathlib.Path:
  """A TFDS data dir holding `synthetic_crops/tiny`, built once per session by TFDS's own build
  code (the builder `python -m clipcrop_jax.build_dataset datasets/synthetic` runs)."""
  pytest.importorskip('tensorflow_datasets')
  from tensorflow_datasets.scripts.cli import build  # pylint: disable=g-import-not-at-top

  builder_cls, _ = build._get_builder_cls_and_kwargs(  # pylint: disable=protected-access
      str(REPO / 'datasets' / 'synthetic'), has_imports=False
  )
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
