"""Session fixtures shared by test modules (built once per test run)."""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='session')
def synthetic_tiny_dir(tmp_path_factory) -> pathlib.Path:
  """A TFDS data dir holding `synthetic_crops/tiny`, built once with the real build command."""
  d = tmp_path_factory.mktemp('synthetic_tiny')
  subprocess.run([sys.executable, '-m', 'clipcrop_jax.build_dataset', 'datasets/synthetic',
                  '--config', 'tiny', '--data_dir', str(d)], cwd=REPO, check=True,
                 capture_output=True)
  return d


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
