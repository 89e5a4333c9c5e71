"""Hardening of OWL-ViT detection training (training.detection_task): resume past unusable
checkpoints, one metrics record per (step, kind), one-line command-line errors.

The ClipCrop trainer's equivalents are in tests/test_train.py (they share its fixtures).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import subprocess
import sys

import pytest

from clipcrop_jax.training import checkpointing
from clipcrop_jax.training import detection_task as dt
from clipcrop_jax.training import trainer

REPO = pathlib.Path(__file__).resolve().parents[1]


def records(workdir) -> list[tuple[int, str]]:
  text = (pathlib.Path(workdir) / trainer.METRICS_FILE).read_text()
  return [(r['step'], r['kind']) for r in map(json.loads, text.splitlines())]


def checkpoint_steps(workdir) -> list[int]:
  return checkpointing.checkpoint_steps(str(workdir))


def cli_env() -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  env['PYTHONPATH'] = os.pathsep.join([str(REPO), env.get('PYTHONPATH', '')]).rstrip(os.pathsep)
  return env


@pytest.fixture(scope='module')
def data_dir(synthetic_tiny_dir):
  return synthetic_tiny_dir


@pytest.fixture
def tiny_detection_config(load_config):
  """configs/owlvit_detection_tiny.py (3 steps) on the fixture data, with `updates`."""
  return lambda data_dir, **updates: load_config(
      'configs/owlvit_detection_tiny.py', **{'dataset.data_dir': str(data_dir), **updates}
  )


def test_detection_resume_skips_truncated_step_and_logs_once(
    data_dir, tiny_detection_config, tmp_path, caplog
):
  config = tiny_detection_config(data_dir, **{'checkpoint.every_steps': 1, 'checkpoint.keep': 5})
  work = tmp_path / 'det'
  dt.train_detection(config, str(work), max_steps_this_run=2)
  assert checkpoint_steps(work) == [1, 2]
  # Cut the step's OCDBT index in half (a torn write), as tests/test_train.py does.
  index = max(
      (work / trainer.CHECKPOINT_DIR / '2' / 'default' / 'd').iterdir(),
      key=lambda p: p.stat().st_size,
  )
  with index.open('r+b') as f:
    f.truncate(index.stat().st_size // 2)

  with caplog.at_level(logging.WARNING):
    state = dt.train_detection(config, str(work))
  assert int(state.step) == 3
  assert 'Checkpoint step 2 in' in caplog.text and 'is unusable' in caplog.text
  assert checkpoint_steps(work) == [1, 2, 3]
  assert (work / checkpointing.UNUSABLE_CHECKPOINT_DIR / '2').is_dir()
  assert records(work) == [(1, 'train'), (2, 'train'), (3, 'train'), (3, 'eval')]
  assert (work / dt.EXPORT_FILE).is_file() and (work / dt.EVAL_FILE).is_file()

  # A re-run of the finished run evaluates again: still one (3, 'eval') record.
  dt.train_detection(config, str(work))
  assert records(work) == [(1, 'train'), (2, 'train'), (3, 'train'), (3, 'eval')]
  assert (work / dt.EVAL_FILE).stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


@pytest.mark.parametrize(
    'flags,code,expected',
    [
        (
            ['--config.loss.focal_alpa=0.5'],
            2,
            "error: --config.loss.focal_alpa: config.loss has no field 'focal_alpa' (did you mean "
            'focal_alpha',
        ),
        (
            ['--config.batch_size=0'],
            2,
            'error: invalid config: batch_size=0: expected an integer >= 1',
        ),
        (['--config.model.owlvit=clip_b33'], 2, "error: invalid config: model.owlvit='clip_b33'"),
        (['--config.dataset.name=nope/x'], 1, "error: dataset 'nope/x' is not prepared in"),
    ],
)
def test_detection_command_line_errors_are_one_line(data_dir, tmp_path, flags, code, expected):
  proc = subprocess.run(
      [
          sys.executable,
          '-m',
          'clipcrop_jax.detection_train',
          '--config=configs/owlvit_detection_tiny.py',
          f'--workdir={tmp_path / "w"}',
          f'--config.dataset.data_dir={data_dir}',
          *flags,
      ],
      cwd=REPO,
      env=cli_env(),
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == code, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith(expected), proc.stderr[-3000:]
