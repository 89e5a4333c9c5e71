"""Multi-host (multi-process) training on localhost: 2 jax processes over gloo CPU collectives.

1. `tests/multihost_worker.py` in 2 processes (each feeding its half of a fixed global batch)
   ends 3 train steps with the same params and losses as a single-process reference run.
2. The full `python -m clipcrop_jax.main` path (train_and_eval on a tiny synthetic dataset) in
   2 processes sharing one workdir: both finish; checkpoints, eval results and the exported model
   are written once.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / 'tests' / 'multihost_worker.py'
TIMEOUT_S = 300


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _env() -> dict[str, str]:
  env = dict(os.environ)
  env.update(
      TF_CPP_MIN_LOG_LEVEL='2',
      JAX_PLATFORMS='cpu',
      CUDA_VISIBLE_DEVICES='',
      # Keep each process's TF / XLA from claiming every core (several run side by side).
      TF_NUM_INTRAOP_THREADS='1',
      TF_NUM_INTEROP_THREADS='2',
      PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [env.get('PYTHONPATH')] if p]),
  )
  env.pop('XLA_FLAGS', None)  # no inherited --xla_force_host_platform_device_count
  return env


def _tail(path: pathlib.Path, n: int = 4000) -> str:
  text = path.read_text(errors='replace') if path.exists() else '<no output>'
  return text[-n:]


def _run_all(
    commands: list[list[str]],
    logdir: pathlib.Path,
    timeout: float = TIMEOUT_S,
    cwd: pathlib.Path = ROOT,
) -> None:
  """Runs the commands concurrently; on any failure or timeout kills all and shows their logs."""
  logdir.mkdir(parents=True, exist_ok=True)
  procs, logs = [], []
  for i, cmd in enumerate(commands):
    log = logdir / f'proc{i}.log'
    logs.append(log)
    with log.open('wb') as f:
      procs.append(subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=f, stderr=subprocess.STDOUT))
  deadline = time.monotonic() + timeout
  failed = None
  try:
    while any(p.poll() is None for p in procs):
      bad = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
      if bad:
        failed = f'process {bad[0]} exited with {procs[bad[0]].returncode}'
        break
      if time.monotonic() > deadline:
        failed = f'timeout after {timeout:.0f} s'
        break
      time.sleep(0.2)
    if failed is None:
      bad = [i for i, p in enumerate(procs) if p.returncode != 0]
      if bad:
        failed = f'process {bad[0]} exited with {procs[bad[0]].returncode}'
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    for p in procs:
      p.wait()
  if failed is not None:
    details = '\n'.join(
        f'--- process {i} (rc={p.returncode}) {logs[i]} ---\n{_tail(logs[i])}'
        for i, p in enumerate(procs)
    )
    pytest.fail(f'{failed}\n{details}', pytrace=False)


def _worker(out: pathlib.Path, *extra: str) -> list[str]:
  return [sys.executable, str(WORKER), '--out', str(out), *extra]


@pytest.mark.slow
def test_two_processes_match_single_process(tmp_path):
  port = _free_port()
  common = ['--steps', '3', '--batch', '8', '--devices_per_process', '1']
  _run_all(
      [
          _worker(
              tmp_path / 'multi',
              '--port',
              str(port),
              '--num_processes',
              '2',
              '--process_id',
              str(i),
              *common,
          )
          for i in range(2)
      ]
      + [
          # Reference: one process with the same global device count (same reduction layout).
          _worker(tmp_path / 'single', *[c if c != '1' else '2' for c in common]),
      ],
      tmp_path / 'logs',
  )
  for i in range(2):
    done = json.loads((tmp_path / 'multi' / f'done_{i}.json').read_text())
    assert (done['processes'], done['devices'], done['step']) == (2, 2, 3)
  multi = np.load(tmp_path / 'multi' / 'result.npz')
  single = np.load(tmp_path / 'single' / 'result.npz')
  assert json.loads((tmp_path / 'single' / 'done_0.json').read_text())['processes'] == 1
  assert set(multi.files) == set(single.files)
  assert multi['losses'].shape == (3,) and np.isfinite(multi['losses']).all()
  np.testing.assert_allclose(multi['losses'], single['losses'], rtol=0, atol=1e-5)
  diffs = {k: float(np.max(np.abs(multi[k] - single[k]))) for k in multi.files if k != 'losses'}
  worst = max(diffs, key=diffs.get)
  print(
      f'losses {multi["losses"]} vs {single["losses"]}; max param diff {diffs[worst]:.3g} '
      f'({worst})'
  )
  assert diffs[worst] <= 1e-5, (worst, diffs[worst])
  assert len(set(multi['losses'].tolist())) > 1  # the parameters changed between steps


@pytest.mark.slow
def test_main_train_and_eval_two_processes(synthetic_tiny_dir, tmp_path):
  data = synthetic_tiny_dir
  workdir = tmp_path / 'workdir'
  port = _free_port()
  _run_all(
      [
          [
              sys.executable,
              '-m',
              'clipcrop_jax.main',
              '--config=configs/tiny.py',
              f'--workdir={workdir}',
              f'--config.dataset.data_dir={data}',
              '--config.run=train_and_eval',
              '--config.distributed.initialize=True',
              f'--config.distributed.coordinator_address=localhost:{port}',
              '--config.distributed.num_processes=2',
              f'--config.distributed.process_id={i}',
          ]
          for i in range(2)
      ],
      tmp_path / 'logs',
      timeout=1.5 * TIMEOUT_S,
  )
  steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert steps == [1, 2]  # tiny: 2 steps, a checkpoint every step, keep 2
  assert not [p for p in (workdir / 'checkpoints').iterdir() if 'tmp' in p.name]
  from clipcrop_jax import evaluate  # pylint: disable=g-import-not-at-top

  info = json.loads(
      next((data / 'synthetic_crops' / 'tiny').glob('*/dataset_info.json')).read_text()
  )
  sizes = {s['name']: sum(int(n) for n in s['shardLengths']) for s in info['splits']}
  multi = {}
  for split in ('ambiguity', 'test'):
    path = workdir / evaluate.results_filename('synthetic_crops/tiny', split)
    assert path.is_file(), (split, sorted(p.name for p in workdir.iterdir()))
    multi[split] = json.loads(path.read_text())
    # Every example evaluated exactly once across the 2 processes (padding masked out).
    assert multi[split]['step'] == 2 and multi[split]['num_examples'] == sizes[split]
  assert (workdir / 'clipcrop').is_dir() and any((workdir / 'clipcrop').iterdir())
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records if r['kind'] == 'train'] == [1, 2]  # written once (process 0)

  # The 2-process checkpoint restores in 1 process, whose evaluation gives the same metrics.
  _run_all(
      [
          [
              sys.executable,
              '-m',
              'clipcrop_jax.main',
              '--config=configs/tiny.py',
              f'--workdir={workdir}',
              f'--config.dataset.data_dir={data}',
              '--config.run=eval',
          ]
      ],
      tmp_path / 'logs_eval',
  )
  for split in ('ambiguity', 'test'):
    single = json.loads(
        (workdir / evaluate.results_filename('synthetic_crops/tiny', split)).read_text()
    )
    assert single['num_examples'] == multi[split]['num_examples']
    assert single['methods'].keys() == multi[split]['methods'].keys()
    for method, values in multi[split]['methods'].items():
      for key, value in values.items():
        assert single['methods'][method][key] == pytest.approx(
            value, rel=1e-4, abs=1e-5, nan_ok=True
        ), (split, method, key)
