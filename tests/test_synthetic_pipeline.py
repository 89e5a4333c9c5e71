"""End-to-end test of the embedded default (`--config=configs/synthetic.py:quick`).

The quick run builds the 'small' synthetic set, trains OWL-ViT from scratch, trains ClipCrop full
(once per selection_union choice) and base with it, chooses full's selection_union and their
`fuse_top_k` on the ambiguity_validation split and evaluates once on the ambiguity split. The asserted margins come from quick runs with seeds 0, 1, 2 of the
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
from clipcrop_jax.experiments import synthetic_pipeline  # pylint: disable=g-import-not-at-top

REPO = pathlib.Path(__file__).resolve().parents[1]
# Margins (IoU-Mean on the ambiguity split, dataset 1.3.0) the quick run must show, per caption
# class and overall: ClipCrop (full) minus the row, about half the smallest of quick seeds 0 / 1 / 2
# (README "Embedded default"; every seed chose selection_union='subject' on validation).
CLASS_MARGINS = {
    'name': {'clipcrop_base': 0.07, 'centre_crop': 0.06, 'zero_shot': 0.035},
    # seeds 0 / 1 / 2: base +0.149 / +0.150 / +0.139, centre +0.146 / +0.143 / +0.119,
    # zero-shot +0.104 / +0.101 / +0.075
    'relation': {'clipcrop_base': 0.05, 'centre_crop': 0.05, 'zero_shot': 0.025},
    # base +0.114 / +0.153 / +0.109, centre +0.102 / +0.139 / +0.110, zero-shot +0.068 / +0.101 /
    # +0.054
    'pair': {'union_box': 0.17, 'centre_crop': 0.02},
    # union box +0.353 / +0.404 / +0.450, centre +0.047 / +0.124 / +0.133 (base, zero-shot and
    # the full image are better on two far-apart targets: their references are nearly the image)
}
OVERALL_MARGINS = {'clipcrop_base': 0.015, 'centre_crop': 0.05}  # +0.032 / +0.057 / +0.041;
# +0.099 / +0.135 / +0.120
GROUNDING_OVER_CHANCE = 5.0  # 24x / 25x / 16x
# ClipCrop (full)'s quality<->IoU rank correlation on ambiguity_validation: 0.86 / 0.67 / 0.85.
MIN_QUALITY_IOU_SRCC = 0.3


def _seed_result(seed, full, other, images):
  rows = {
      'clipcrop_full': {'iou_mean': float(np.mean(full)), 'iou_max': 1.0, 'num_examples': 4},
      'zero_shot': {'iou_mean': float(np.mean(other)), 'iou_max': 0.5, 'num_examples': 4},
  }
  return dict(
      seed=seed,
      rows=rows,
      image_ids=images,
      per_example={'clipcrop_full': list(full), 'zero_shot': list(other)},
  )


def test_aggregate_mean_std_and_paired_intervals():
  images = ['a.jpg', 'a.jpg', 'b.jpg', 'b.jpg']
  per_seed = [
      _seed_result(0, [0.6, 0.5, 0.7, 0.4], [0.3, 0.4, 0.2, 0.3], images),
      _seed_result(1, [0.5, 0.5, 0.6, 0.6], [0.4, 0.3, 0.3, 0.2], images),
  ]
  agg = synthetic_pipeline.aggregate(per_seed, num_resamples=2000)
  assert agg['rows']['clipcrop_full']['iou_mean'] == pytest.approx((0.55 + 0.55) / 2)
  assert agg['rows_std']['zero_shot']['iou_mean'] == pytest.approx(np.std([0.3, 0.3], ddof=1))
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


def test_aggregate_per_caption_class():
  """Per class: the class's mean per seed, then mean ± std over seeds, and intervals over that
  class's examples only (its images as clusters)."""
  images = ['a.jpg', 'a.jpg', 'a.jpg', 'b.jpg', 'b.jpg', 'b.jpg']
  kinds = ['name', 'relation', 'pair'] * 2
  full0, other0 = [0.6, 0.5, 0.7, 0.4, 0.3, 0.9], [0.3, 0.5, 0.2, 0.3, 0.4, 0.1]
  full1, other1 = [0.5, 0.4, 0.6, 0.6, 0.2, 0.8], [0.4, 0.4, 0.3, 0.2, 0.3, 0.2]
  per_seed = [
      dict(_seed_result(0, full0, other0, images), caption_kinds=kinds),
      dict(_seed_result(1, full1, other1, images), caption_kinds=kinds),
  ]
  agg = synthetic_pipeline.aggregate(per_seed, num_resamples=2000)
  assert list(agg['by_class']) == ['name', 'relation', 'pair']  # report order
  pair = agg['by_class']['pair']
  per_seed_means = [np.mean([0.7, 0.9]), np.mean([0.6, 0.8])]
  assert pair['rows']['clipcrop_full']['iou_mean'] == pytest.approx(np.mean(per_seed_means))
  assert pair['rows']['clipcrop_full']['iou_mean_std'] == pytest.approx(
      np.std(per_seed_means, ddof=1)
  )
  assert pair['rows']['zero_shot']['num_examples'] == 4
  iv = pair['intervals']['zero_shot']
  diffs = np.array([0.5, 0.8, 0.3, 0.6])  # full - zero-shot on the four pair examples
  assert iv['difference'] == pytest.approx(diffs.mean()) and iv['num_examples'] == 4
  # Relation: full - other = 0.0, -0.1, 0.0, -0.1 -> an interval below or at 0.
  rel = agg['by_class']['relation']['intervals']['zero_shot']
  assert rel['difference'] == pytest.approx(-0.05) and rel['high'] <= 0.0
  # The overall interval pools every class.
  assert agg['intervals']['zero_shot']['num_examples'] == 12
  # Results of an older dataset (no caption classes) have no per-class part.
  plain = synthetic_pipeline.aggregate(
      [_seed_result(0, [0.5] * 4, [0.4] * 4, images[:4])], num_resamples=100
  )
  assert plain['by_class'] == {}


def test_report_has_a_per_class_table(tmp_path):
  config = config_lib.load_config_file(REPO / 'configs' / 'synthetic.py', 'quick')
  images = ['a.jpg'] * 3 + ['b.jpg'] * 3
  kinds = ['name', 'relation', 'pair'] * 2
  result = dict(
      _seed_result(0, [0.6, 0.5, 0.7, 0.4, 0.3, 0.9], [0.3] * 6, images), caption_kinds=kinds
  )
  result['grounding'] = {}
  result['validation'] = {
      m: dict(fuse_top_k=1, iou_mean=0.5, quality_iou_srcc=0.4) for m in config.pipeline.variants
  }
  result['union_validation'] = {
      u: dict(fuse_top_k=2, iou_mean=0.4 + 0.1 * (u == 'subject'), quality_iou_srcc=0.3)
      for u in config.pipeline.selection_union_choices
  }
  result['selection_union'] = 'subject'
  summary = dict(
      synthetic_pipeline.aggregate([result], num_resamples=200),
      seeds=[0],
      per_seed=[result],
      timings={'total': 1.0},
  )
  report = synthetic_pipeline.write_report(config, tmp_path, summary).read_text()
  assert '## Per caption class' in report
  assert '| method | one name (2) | relation (2) | two targets (2) | overall |' in report
  assert "| ClipCrop-full, selection_union='subject' | 2 | 0.5000 |" in report
  assert "seed 0: 'subject'" in report


def test_claims_are_worded_from_the_interval():
  above = dict(difference=0.2, low=0.18, high=0.22)
  straddles = dict(difference=0.01, low=-0.02, high=0.04)
  below = dict(difference=-0.05, low=-0.08, high=-0.01)
  assert synthetic_pipeline.claim('clipcrop_base', above) == (
      'ClipCrop (full) > ClipCrop-base: +0.2000 [+0.1800, +0.2200]'
  )
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
    result['grounding'] = {
        'validation': dict(accuracy=0.5, chance=0.02, mean_top_iou=0.4, num_objects=10)
    }
    result['validation'] = {
        m: dict(fuse_top_k=3, iou_mean=0.5, quality_iou_srcc=0.4) for m in config.pipeline.variants
    }
    return result, {}

  monkeypatch.setattr(synthetic_pipeline, 'run_seed', fake_run_seed)
  summary = synthetic_pipeline.run(config, str(tmp_path))
  assert [(s, n) for s, n, _ in seen] == [
      (3, 'synthetic_crops/small_seed3'),
      (4, 'synthetic_crops/small_seed4'),
  ]
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
  for row, margin in OVERALL_MARGINS.items():
    assert full >= rows[row]['iou_mean'] + margin, (row, rows)
  for kind, margins in CLASS_MARGINS.items():
    by_class = summary['by_class'][kind]['rows']
    for row, margin in margins.items():
      assert by_class['clipcrop_full']['iou_mean'] >= by_class[row]['iou_mean'] + margin, (
          kind,
          row,
          by_class,
      )
  g = summary['grounding']['validation']
  assert g['accuracy'] >= GROUNDING_OVER_CHANCE * g['chance'], g
  report = (workdir / synthetic_pipeline.REPORT_FILE).read_text()
  for name in (
      'ClipCrop (full)',
      'ClipCrop-base',
      'Zero-shot crop',
      'OWL-ViT top box',
      'Centre crop',
      'Full image',
      'Union box',
      'grounding',
      '95 % interval',
      'ambiguity_validation',
      'quality↔IoU',
      'Per caption class',
      'two targets',
  ):
    assert name in report
  assert summary['per_seed'][0]['validation']['full']['quality_iou_srcc'] >= MIN_QUALITY_IOU_SRCC
  # fuse_top_k was chosen on the validation split, and the exported models carry the choice.
  from clipcrop_jax import export  # pylint: disable=g-import-not-at-top

  validation = summary['per_seed'][0]['validation']
  config = _config('')
  folders = summary['per_seed'][0]['folders']
  union = summary['per_seed'][0]['selection_union']
  for mode in ('full', 'base'):
    chosen = validation[mode]['fuse_top_k']
    assert chosen in config.pipeline.fuse_top_k_choices
    by_k = {int(k): v for k, v in validation[mode]['iou_mean_by_k'].items()}
    assert validation[mode]['iou_mean'] == max(by_k.values())
    exported = export.load_model(workdir / folders[mode] / export.EXPORT_DIR)
    assert exported.config.fuse_top_k == chosen
    assert exported.config.selection_union == union  # every variant uses full's choice
  # selection_union was chosen on the validation split: the best full candidate there.
  candidates = summary['per_seed'][0]['union_validation']
  assert set(candidates) == set(config.pipeline.selection_union_choices)
  assert candidates[union]['iou_mean'] == max(c['iou_mean'] for c in candidates.values())
  assert folders['full'] == f'clipcrop_full_{union}'
  assert validation['full'] == candidates[union]
  # Intervals are paired on the same examples: full's interval against base brackets the
  # difference of the two rows' means.
  iv = summary['intervals']['clipcrop_base']
  assert iv['difference'] == pytest.approx(
      rows['clipcrop_full']['iou_mean'] - rows['clipcrop_base']['iou_mean'], abs=1e-9
  )
  assert iv['low'] <= iv['difference'] <= iv['high']
  from PIL import Image  # pylint: disable=g-import-not-at-top

  with Image.open(workdir / synthetic_pipeline.EXAMPLES_FILE) as im:
    assert im.size[0] > 200 and im.size[1] > 200
  assert json.loads((workdir / synthetic_pipeline.SUMMARY_FILE).read_text())['quick'] is True


@pytest.mark.slow
def test_same_seed_same_numbers(quick_run, tmp_path):
  """A second run with the same seed (and the first run's OWL-ViT checkpoint, which the pipeline
  then reuses; only the union the first run chose, to save time) reproduces the ClipCrop and
  baseline numbers exactly."""
  data_dir, workdir, summary = quick_run
  (tmp_path / 'owlvit').mkdir()
  shutil.copy(workdir / 'owlvit' / 'owlvit_checkpoint.msgpack', tmp_path / 'owlvit')
  config = _config(data_dir)
  config.pipeline.selection_union_choices = (summary['per_seed'][0]['selection_union'],)
  again = synthetic_pipeline.run(config, str(tmp_path))
  assert again['rows'] == summary['rows']
  assert again['grounding'] == summary['grounding']


def test_select_on_validation_candidates_parse_and_apply():
  tool = config_lib.load_module(REPO / 'tools' / 'select_on_validation.py')
  name, overrides = tool.parse_candidate(
      'rank:loss.quality_loss=pairwise,loss.positive_threshold=5.0,loss.selection_filter=False'
  )
  assert name == 'rank'
  assert overrides == {
      'loss.quality_loss': 'pairwise',
      'loss.positive_threshold': 5.0,
      'loss.selection_filter': False,
  }
  assert tool.parse_candidate('paper:') == ('paper', {})
  config = config_lib.load_config_file(REPO / 'configs' / 'synthetic.py', 'quick')
  changed = tool.apply_overrides(config, {'loss.quality_loss': 'listwise', 'loss.quality_top_k': 2})
  assert changed.loss.quality_loss == 'listwise' and changed.loss.quality_top_k == 2
  assert config.loss.quality_loss == 'pairwise' and config.loss.quality_top_k == 4  # a copy
  assert (
      tool.apply_overrides(config, {'pipeline.variant_steps.full': 10}).pipeline.variant_steps[
          'full'
      ]
      == 10
  )
  with pytest.raises(KeyError, match='loss.nope'):
    tool.apply_overrides(config, {'loss.nope': 1})
  with pytest.raises(ValueError, match='NAME:key=value'):
    tool.parse_candidate('no-colon')
  with pytest.raises(ValueError, match='is not key=value'):
    tool.parse_candidate('x:loss.quality_loss')


def test_selection_union_is_chosen_on_validation_ties_to_the_first():
  config = config_lib.load_config_file(REPO / 'configs' / 'synthetic.py', 'quick')
  assert tuple(config.pipeline.selection_union_choices) == ('all', 'subject')
  pick = synthetic_pipeline.choose_selection_union
  assert pick(config, {'all': dict(iou_mean=0.4), 'subject': dict(iou_mean=0.5)}) == 'subject'
  assert pick(config, {'all': dict(iou_mean=0.5), 'subject': dict(iou_mean=0.4)}) == 'all'
  assert pick(config, {'all': dict(iou_mean=0.5), 'subject': dict(iou_mean=0.5)}) == 'all'
  # One full run per choice, in its own folder; one choice keeps the usual folder name.
  assert synthetic_pipeline.variant_dir(config, 'full', 'subject') == 'clipcrop_full_subject'
  assert synthetic_pipeline.variant_dir(config, 'base', 'subject') == 'clipcrop_base'
  config.pipeline.selection_union_choices = ('subject',)
  assert synthetic_pipeline.variant_dir(config, 'full', 'subject') == 'clipcrop_full'
