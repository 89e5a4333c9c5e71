"""A tiny hyper-parameter sweep library (Scenic / big_vision style) and the sweep-file loader.

A sweep file (e.g. configs/gaic_ablation_sweep.py) defines

  BASE_CONFIG = 'gaic_b32.py'      # config file the runs start from (relative to the sweep file)
  def get_hyper(h):
    return h.chainit([
        h.product([h.sweep('config.model.mode', ['base', 'full']), h.sweep('config.seed', [0, 1])]),
        h.fixed('config.dataset.mosaic_probs', (1.0, 0.0, 0.0)),
    ])

Every helper returns a list of dicts {'config.a.b': value}, one dict per run:
  fixed(key, v)       [{key: v}]
  sweep(key, values)  [{key: v} for v in values]
  product(lists)      cartesian product (later lists vary fastest), dicts merged
  zipit(lists)        element-wise merge of equally long lists
  chainit(lists)      concatenation (runs of several sub-sweeps)
"""

from __future__ import annotations

import itertools
import os
import re
from typing import Any, Sequence

from clipcrop_jax import config_lib

Run = dict[str, Any]


def fixed(key: str, value: Any) -> list[Run]:
  return [{key: value}]


def sweep(key: str, values: Sequence[Any]) -> list[Run]:
  return [{key: v} for v in values]


def _merge(runs: Sequence[Run]) -> Run:
  out: Run = {}
  for r in runs:
    clash = set(out) & set(r)
    if clash:
      raise ValueError(f'sweep: key(s) {sorted(clash)} set twice in one run')
    out.update(r)
  return out


def product(lists: Sequence[list[Run]]) -> list[Run]:
  return [_merge(combo) for combo in itertools.product(*lists)]


def zipit(lists: Sequence[list[Run]]) -> list[Run]:
  lengths = {len(l) for l in lists}
  if len(lengths) > 1:
    raise ValueError(f'sweep.zipit: lists of different lengths {sorted(lengths)}')
  return [_merge(combo) for combo in zip(*lists)]


def chainit(lists: Sequence[list[Run]]) -> list[Run]:
  return [dict(r) for l in lists for r in l]


class Hyper:
  """The `h` handed to `get_hyper(h)`."""

  fixed = staticmethod(fixed)
  sweep = staticmethod(sweep)
  product = staticmethod(product)
  zipit = staticmethod(zipit)
  chainit = staticmethod(chainit)


def format_value(value: Any) -> str:
  """A value as `--config.x=<here>` accepts it (tuples as '(a, b)', bools as true/false)."""
  if isinstance(value, bool):
    return 'true' if value else 'false'
  if isinstance(value, (tuple, list)):
    return '(' + ','.join(format_value(v) for v in value) + (',)' if len(value) == 1 else ')')
  return str(value)


def _short(value: Any) -> str:
  if isinstance(value, (tuple, list)):
    return '-'.join(_short(v) for v in value)
  if isinstance(value, float):
    value = f'{value:g}'
  return re.sub(r'[^A-Za-z0-9.+-]+', '_', str(value)).strip('_') or 'x'


def run_name(run: Run) -> str:
  """'mode=base,seed=1' style directory name: last key component = value, in key order."""
  parts = [f'{k.split(".")[-1]}={_short(v)}' for k, v in run.items()]
  return ','.join(parts) or 'default'


def load_sweep(path: str) -> tuple[str, list[Run]]:
  """(base config path, runs) of a sweep file."""
  module = config_lib.load_module(path)
  base = os.path.join(os.path.dirname(path), module.BASE_CONFIG)
  runs = module.get_hyper(Hyper())
  for r in runs:
    bad = [k for k in r if not k.startswith('config.')]
    if bad:
      raise ValueError(f'{path}: override keys must start with "config.": {bad}')
  names = [run_name(r) for r in runs]
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise ValueError(f'{path}: runs with the same name {dupes}')
  return base, runs


def commands(
    path: str, workdir_root: str, extra: Sequence[str] = (), python: str = 'python'
) -> list[tuple[str, list[str]]]:
  """[(run name, argv)] of `python -m clipcrop_jax.main` for every run of the sweep file."""
  base, runs = load_sweep(path)
  out = []
  for r in runs:
    name = run_name(r)
    argv = [
        python,
        '-m',
        'clipcrop_jax.main',
        f'--config={base}',
        f'--workdir={os.path.join(workdir_root, name)}',
    ]
    argv += [f'--{k}={format_value(v)}' for k, v in r.items()]
    out.append((name, argv + list(extra)))
  return out
