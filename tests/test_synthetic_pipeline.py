"""End-to-end test of the embedded default (`--config=configs/synthetic.py:quick`).

The quick run builds the 'small' synthetic set, trains OWL-ViT from scratch, trains ClipCrop full
and base with it, chooses their `fuse_top_k` on the ambiguity_validation split and evaluates once on
the ambiguity split. The asserted margins come from quick runs with seeds 0, 1, 2 of the
validation-chosen settings (`--config.pipeline.num_seeds=3`, README "Embedded default"): about half
the smallest margin observed, so a pipeline that stops learning, stops using the text or whose
quality head stops ranking fails them.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil

import numpy as np
import pytest

pytest.importorskip('tensorflow_datasets')

from clipcrop_jax import config_lib  # pylint: disable=g-import-not-at-top
from clipcrop_jax import synthetic_pipeline  # pylint: disable=g-import-not-at-top

REPO = pathlib.Path(__file__).resolve().parents[1]
# Margins (IoU-Mean on the ambiguity split) the quick run must show; see the module docstring.
MARGIN_OVER_BASE = 0.04  # seeds 0 / 1 / 2: +0.125 / +0.148 / +0.078
MARGIN_OVER_CENTRE = 0.05  # +0.127 / +0.133 / +0.116
MARGIN_OVER_ZERO_SHOT = 0.015  # +0.052 / +0.053 / +0.039
GROUNDING_OVER_CHANCE = 5.0  # 23x / 27x / 17x
# ClipCrop (full)'s quality<->IoU rank correlation on ambiguity_validation: 0.73 / 0.77 / 0.61.
MIN_QUALITY_IOU_SRCC = 0.3


def _seed_result(seed, full, other, images):
  rows = {'clipcrop_full': {'iou_mean': float(np.mean(full)), 'iou_max': 1.0, 'num_examples': 4},
          'zero_shot': {'iou_mean': float(np.mean(other)), 'iou_max': 0.5, 'num_examples': 4}}
  return dict(seed=seed, rows=rows, image_ids=images,
              per_example={'clipcrop_full': list(full), 'zero_shot': list(other)})


def test_aggregate_mean_std_and_paired_intervals():
  images = ['a.jpg', 'a.jpg', 'b.jpg', 'b.jpg']
  per_seed = [_seed_result(0, [0.6, 0.5, 0.7, 0.4], [0.3, 0.4, 0.2, 0.3], images),
              _seed_result(1, [0.5, 0.5, 0.6, 0.6], [0.4, 0.3, 0.3, 0.2], images)]
  agg = synthetic_pipeline.aggregate(per_seed, num_resamples=2000)
  assert agg['rows']['clipcrop_full']['iou_mean'] == pytest.approx((0.55 + 0.55) / 2)
  assert agg['rows_std']['zero_shot']['iou_mean'] == pytest.approx(
      np.std([0.3, 0.3], ddof=1))
  iv = agg['intervals']['zero_shot']
  diffs = np.array([0.3, 0.1, 0.5, 0.1, 0.1, 0.2, 0.3, 0.4])
  assert iv['difference'] == pytest.approx(diffs.mean())
  assert iv['num_examples'] == 8
  assert 0 < iv['low'] < diffs.mean() < iv['high']
  # The clusters are the 4 (seed, image) pairs: their means bound the resampled means.
  cluster_means = [0.2, 0.3, 0.15, 0.35]
  assert min(cluster_means) <= iv['low'] and iv['high'] <= max(cluster_means)
  assert 'clipcrop_full' not in agg['intervals']
  one = synthetic_pipeline.aggregate(per_seed[:1], num_resamples=200)
  assert math.isnan(one['rows_std']['clipcrop_full']['iou_mean'])


def test_claims_are_worded_from_the_interval():
  above = dict(difference=0.2, low=0.18, high=0.22)
  straddles = dict(difference=0.01, low=-0.02, high=0.04)
  below = dict(difference=-0.05, low=-0.08, high=-0.01)
  assert synthetic_pipeline.claim('clipcrop_base', above) == (
      'ClipCrop (full) > ClipCrop-base: +0.2000 [+0.1800, +0.2200]')
  assert '≈ (interval includes 0)' in synthetic_pipeline.claim('clipcrop_key', straddles)
  assert synthetic_pipeline.claim('zero_shot', below).startswith('ClipCrop (full) < Zero-shot')


def test_seed_config_varies_data_and_training_seed():
  config = config_lib.load_config_file(REPO / 'configs' / 'synthetic.py', 'quick')
  s0 = synthetic_pipeline.seed_config(config, 0)
  s2 = synthetic_pipeline.seed_config(config, 2)
  assert s0.dataset.name == 'synthetic_crops/small' and s0.seed == 0
  assert s2.dataset.name == 'synthetic_crops/small_seed2' and s2.seed == 2
  assert s2.pipeline.owlvit.dataset.name == s2.dataset.name
  assert tuple(s2.eval.datasets) == (('synthetic_crops/small_seed2', 'ambiguity'),)
  assert config.dataset.name == 'synthetic_crops/small'  # not modified


def test_run_over_seeds_writes_per_seed_dirs_report_and_summary(tmp_path, monkeypatch):
  """The orchestration of `num_seeds` (the stages themselves are faked; the slow test below runs
  them): one workdir per seed, its seed's config, and a report worded from the intervals."""
  config = config_lib.load_config_file(REPO / 'configs' / 'synthetic.py', 'quick')
  config.seed = 3
  config.pipeline.num_seeds = 2
  seen = []
  images = ['a.jpg', 'a.jpg', 'b.jpg', 'b.jpg']

  def fake_run_seed(c, work, timings):
    seen.append((c.seed, c.dataset.name, work))
    timings['3. training'] = timings.get('3. training', 0.0) + 1.0
    result = _seed_result(c.seed, [0.6, 0.5, 0.7, 0.6], [0.3, 0.4, 0.3, 0.3], images)
    result['grounding'] = {'validation': dict(accuracy=0.5, chance=0.02, mean_top_iou=0.4,
                                              num_objects=10)}
    result['validation'] = {m: dict(fuse_top_k=3, iou_mean=0.5, quality_iou_srcc=0.4)
                            for m in config.pipeline.variants}
    return result, {}

  monkeypatch.setattr(synthetic_pipeline, 'run_seed', fake_run_seed)
  summary = synthetic_pipeline.run(config, str(tmp_path))
  assert [(s, n) for s, n, _ in seen] == [(3, 'synthetic_crops/small_seed3'),
                                          (4, 'synthetic_crops/small_seed4')]
  assert [w for _, _, w in seen] == [tmp_path / 'seed_3', tmp_path / 'seed_4']
  assert summary['seeds'] == [3, 4] and summary['timings']['3. training'] == 2.0
  report = (tmp_path / synthetic_pipeline.REPORT_FILE).read_text()
  assert '0.6000 ± 0.0000' in report  # mean ± std over the two seeds
  assert 'ClipCrop (full) > Zero-shot crop: +0.2750' in report
  assert 'ambiguity_validation' in report
  saved = json.loads((tmp_path / synthetic_pipeline.SUMMARY_FILE).read_text())
  assert saved['intervals']['zero_shot']['num_examples'] == 8
  assert config.seed == 3 and config.dataset.name == 'synthetic_crops/small'


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
               'Centre crop', 'Full image', 'Union box', 'grounding', '95 % interval',
               'ambiguity_validation', 'quality↔IoU'):
    assert name in report
  assert summary['per_seed'][0]['validation']['full']['quality_iou_srcc'] >= MIN_QUALITY_IOU_SRCC
  # fuse_top_k was chosen on the validation split, and the exported models carry the choice.
  from clipcrop_jax import export  # pylint: disable=g-import-not-at-top
  validation = summary['per_seed'][0]['validation']
  config = _config('')
  for mode in ('full', 'base'):
    chosen = validation[mode]['fuse_top_k']
    assert chosen in config.pipeline.fuse_top_k_choices
    by_k = {int(k): v for k, v in validation[mode]['iou_mean_by_k'].items()}
    assert validation[mode]['iou_mean'] == max(by_k.values())
    exported = export.load_model(workdir / f'clipcrop_{mode}' / export.EXPORT_DIR)
    assert exported.config.fuse_top_k == chosen
  # Intervals are paired on the same examples: full's interval against base brackets the
  # difference of the two rows' means.
  iv = summary['intervals']['clipcrop_base']
  assert iv['difference'] == pytest.approx(
      rows['clipcrop_full']['iou_mean'] - rows['clipcrop_base']['iou_mean'], abs=1e-9)
  assert iv['low'] <= iv['difference'] <= iv['high']
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


def test_select_on_validation_candidates_parse_and_apply():
  tool = config_lib.load_module(REPO / 'tools' / 'select_on_validation.py')
  name, overrides = tool.parse_candidate(
      'rank:loss.quality_loss=pairwise,loss.positive_threshold=5.0,loss.selection_filter=False')
  assert name == 'rank'
  assert overrides == {'loss.quality_loss': 'pairwise', 'loss.positive_threshold': 5.0,
                       'loss.selection_filter': False}
  assert tool.parse_candidate('paper:') == ('paper', {})
  config = config_lib.load_config_file(REPO / 'configs' / 'synthetic.py', 'quick')
  changed = tool.apply_overrides(config, {'loss.quality_loss': 'listwise', 'loss.quality_top_k': 2})
  assert changed.loss.quality_loss == 'listwise' and changed.loss.quality_top_k == 2
  assert config.loss.quality_loss == 'pairwise' and config.loss.quality_top_k == 4  # a copy
  assert tool.apply_overrides(config, {'pipeline.variant_steps.full': 10}).pipeline.variant_steps[
      'full'] == 10
  with pytest.raises(KeyError, match='loss.nope'):
    tool.apply_overrides(config, {'loss.nope': 1})
  with pytest.raises(ValueError, match='NAME:key=value'):
    tool.parse_candidate('no-colon')
  with pytest.raises(ValueError, match='is not key=value'):
    tool.parse_candidate('x:loss.quality_loss')
