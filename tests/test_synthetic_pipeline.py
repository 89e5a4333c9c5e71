"""End-to-end test of the embedded default (`--config=configs/synthetic.py:quick`).

The quick run builds the 'small' synthetic set, trains OWL-ViT from scratch, trains ClipCrop full
and base with it and evaluates on the ambiguity split. The asserted margins come from repeated
quick runs with different seeds (README, "Embedded default"): they are well below the smallest
margin observed, so a pipeline that stops learning (or stops using the text) fails them.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest

pytest.importorskip('tensorflow_datasets')

from clipcrop_jax import config_lib  # pylint: disable=g-import-not-at-top
from clipcrop_jax import synthetic_pipeline  # pylint: disable=g-import-not-at-top

REPO = pathlib.Path(__file__).resolve().parents[1]
# Margins (IoU-Mean on the ambiguity split) the quick run must show; see the module docstring.
MARGIN_OVER_BASE = 0.05
MARGIN_OVER_CENTRE = 0.05
MARGIN_OVER_ZERO_SHOT = 0.01
GROUNDING_OVER_CHANCE = 5.0


def _config(data_dir: str, seed: int = 0):
  config = config_lib.load_config_file(REPO / 'configs' / 'synthetic.py', 'quick')
  config.seed = seed
  config.dataset.data_dir = data_dir
  return config


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('data'))
  workdir = tmp_path_factory.mktemp('quick')
  summary = synthetic_pipeline.run(_config(data_dir), str(workdir))
  return data_dir, workdir, summary


@pytest.mark.slow
def test_quick_run_learns_text_conditioned_cropping(quick_run):
  _, workdir, summary = quick_run
  rows = summary['rows']
  full = rows['clipcrop_full']['iou_mean']
  assert full >= rows['clipcrop_base']['iou_mean'] + MARGIN_OVER_BASE, rows
  assert full >= rows['centre_crop']['iou_mean'] + MARGIN_OVER_CENTRE, rows
  assert full >= rows['zero_shot']['iou_mean'] + MARGIN_OVER_ZERO_SHOT, rows
  g = summary['grounding']['validation']
  assert g['accuracy'] >= GROUNDING_OVER_CHANCE * g['chance'], g
  report = (workdir / synthetic_pipeline.REPORT_FILE).read_text()
  for name in ('ClipCrop (full)', 'ClipCrop-base', 'Zero-shot crop', 'OWL-ViT top box',
               'Centre crop', 'Full image', 'Union box', 'grounding'):
    assert name in report
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(workdir / synthetic_pipeline.EXAMPLES_FILE) as im:
    assert im.size[0] > 200 and im.size[1] > 200
  assert json.loads((workdir / synthetic_pipeline.SUMMARY_FILE).read_text())['quick'] is True


@pytest.mark.slow
def test_same_seed_same_numbers(quick_run, tmp_path):
  """A second run with the same seed (and the first run's OWL-ViT checkpoint, which the pipeline
  then reuses) reproduces the ClipCrop and baseline numbers exactly."""
  data_dir, workdir, summary = quick_run
  (tmp_path / 'owlvit').mkdir()
  shutil.copy(workdir / 'owlvit' / 'owlvit_checkpoint.msgpack', tmp_path / 'owlvit')
  again = synthetic_pipeline.run(_config(data_dir), str(tmp_path))
  assert again['rows'] == summary['rows']
  assert again['grounding'] == summary['grounding']
