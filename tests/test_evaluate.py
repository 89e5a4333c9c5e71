"""Tests for the evaluation loop's host side, the baselines and the query helpers."""

from __future__ import annotations

import numpy as np
import pytest

from clipcrop_jax import evaluate
from clipcrop_jax import keywords
from clipcrop_jax import model as model_lib
from clipcrop_jax.owlvit import tokenizer


def _iou(a, b):
  lt, rb = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
  inter = np.prod(np.clip(rb - lt, 0, None))
  union = np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter
  return inter / union


def test_dataset_kind_and_filenames():
  assert evaluate.dataset_kind('horanyi_pr', 'test') == 'text'
  assert evaluate.dataset_kind('textcrop', 'test') == 'text'
  assert evaluate.dataset_kind('synthetic_crops/default', 'ambiguity') == 'text'
  assert evaluate.dataset_kind('synthetic_crops/default', 'test') == 'gaic'
  assert evaluate.dataset_kind('gaic/journal', 'test') == 'gaic'
  assert evaluate.results_filename('gaic/journal', 'test') == 'eval_gaic_journal.json'
  assert (
      evaluate.results_filename('synthetic_crops/default', 'ambiguity')
      == 'eval_synthetic_crops_default_ambiguity.json'
  )


def _host(extent=(1.0, 0.5), height=50, width=100):
  """One example in padded-square coordinates: a 100x50 image -> extent (1, 0.5)."""
  crops = np.zeros((1, 4, 4), np.float32)
  crops[0, 0] = [0.1, 0.1, 0.5, 0.4]
  crops[0, 1] = [0.2, 0.0, 0.6, 0.3]
  mask = np.array([[True, True, False, False]])
  pred = np.array([[[0.0, 0.0, 1.0, 0.5], [0.1, 0.1, 0.5, 0.4], [0.2, 0.0, 0.6, 0.3]]], np.float32)
  p = 6
  return dict(
      crops=crops,
      crop_scores=np.array([[5.0, 3.0, 0, 0]], np.float32),
      crop_mask=mask,
      image_extent=np.array([extent], np.float32),
      height=np.array([height]),
      width=np.array([width]),
      mask=np.array([True]),
      pred_boxes=pred,
      quality=np.array([[0.1, 0.9, 0.5]], np.float32),
      top_box=np.array([[0.2, 0.0, 0.6, 0.3]], np.float32),
      top_valid=np.array([True]),
      union_box=np.array([[0.1, 0.0, 0.6, 0.4]], np.float32),
      selected_tokens=np.array([[1, 2]]),
      selected_mask=np.array([[True, True]]),
      zero_shot_union=np.array([[True, True]]),
      token_boxes=np.tile(np.array([[0.1, 0.1, 0.5, 0.4]], np.float32), (1, p, 1)),
      token_scores=np.linspace(0.1, 0.6, p, dtype=np.float32)[None],
  )


def test_text_baselines_by_hand():
  host = _host()
  baselines = ['full_image', 'centre_crop', 'owlvit_top_box', 'union_box', 'zero_shot']
  col = evaluate._Collector('text', ['clipcrop'] + baselines)
  evaluate._add_example(col, host, 0, baselines)
  res = col.results()
  refs = host['crops'][0, :2].astype(np.float64)
  # clipcrop: top-1 by quality is pred[1] == refs[0].
  expected = [_iou(np.array([0.1, 0.1, 0.5, 0.4]), r) for r in refs]
  assert res['clipcrop']['iou_mean'] == pytest.approx(np.mean(expected), abs=1e-6)
  assert res['clipcrop']['iou_max'] == pytest.approx(1.0, abs=1e-6)
  # full image = the extent box (0, 0, 1, 0.5), not the padded square.
  full = [_iou(np.array([0, 0, 1, 0.5]), r) for r in refs]
  assert res['full_image']['iou_mean'] == pytest.approx(np.mean(full), abs=1e-6)
  # centre crop: mean reference size relative to the extent, centred in the image.
  rel = np.mean((refs[:, 2:] - refs[:, :2]) / np.array([1.0, 0.5]), axis=0)
  size = rel * np.array([1.0, 0.5])
  centre = np.array([0.5, 0.25])
  box = np.concatenate([centre - size / 2, centre + size / 2])
  assert res['centre_crop']['iou_mean'] == pytest.approx(
      np.mean([_iou(box, r) for r in refs]), abs=1e-6
  )
  top = [_iou(np.array([0.2, 0.0, 0.6, 0.3]), r) for r in refs]
  assert res['owlvit_top_box']['iou_max'] == pytest.approx(max(top), abs=1e-6)
  union = [_iou(np.array([0.1, 0.0, 0.6, 0.4]), r) for r in refs]
  assert res['union_box']['iou_mean'] == pytest.approx(np.mean(union), abs=1e-6)
  # zero-shot crops are in the image and contain the target token box.
  zs_box = col.examples[0]['ranked']['zero_shot'][0][0]
  assert np.all(zs_box[:2] <= np.array([0.1, 0.1]) + 1e-6)
  assert np.all(zs_box[2:] >= np.array([0.5, 0.4]) - 1e-6)
  assert np.all(zs_box[2:] <= np.array([1.0, 0.5]) + 1e-6)


def test_fused_top_crop_is_the_mean_of_the_best_k():
  host = _host()
  boxes, quality = host['pred_boxes'][0].astype(np.float64), host['quality'][0]
  assert len(quality) >= 3
  best = np.argsort(-quality, kind='stable')
  for k in (1, 2, 3):
    col = evaluate._Collector('text', ['clipcrop'])
    evaluate._add_example(col, host, 0, [], {'clipcrop': k})
    ranked, scores = col.examples[0]['ranked']['clipcrop']
    np.testing.assert_allclose(ranked[0], boxes[best[:k]].mean(0), atol=1e-6)
    # The rest follow by quality; with k > 1 the fused box is prepended.
    np.testing.assert_allclose(ranked[int(k > 1) :], boxes[best], atol=1e-6)
    refs = host['crops'][0, :2].astype(np.float64)
    assert col.results()['clipcrop']['iou_mean'] == pytest.approx(
        np.mean([_iou(boxes[best[:k]].mean(0), r) for r in refs]), abs=1e-6
    )


def test_fuse_choices_rerank_the_same_predictions_and_srcc_is_reported():
  host = _host()
  fuse = {'clipcrop': 1, **{f'{evaluate.FUSE_PREFIX}{k}': k for k in (1, 2, 3)}}
  methods = ['clipcrop'] + [m for m in fuse if m != 'clipcrop']
  col = evaluate._Collector('text', methods)
  evaluate._add_example(col, host, 0, [], fuse)
  res = col.results()
  boxes, quality = host['pred_boxes'][0].astype(np.float64), host['quality'][0]
  refs = host['crops'][0, :2].astype(np.float64)
  best = np.argsort(-quality, kind='stable')
  for k in (1, 2, 3):
    expected = np.mean([_iou(boxes[best[:k]].mean(0), r) for r in refs])
    assert res[f'{evaluate.FUSE_PREFIX}{k}']['iou_mean'] == pytest.approx(expected, abs=1e-6)
    assert res[f'{evaluate.FUSE_PREFIX}{k}']['per_example_iou_mean'] == [
        pytest.approx(expected, abs=1e-6)
    ]
  assert res['clipcrop']['iou_mean'] == res[f'{evaluate.FUSE_PREFIX}1']['iou_mean']
  # Quality (0.1, 0.9, 0.5) vs IoU-Mean of the three boxes with the two references.
  ious = [np.mean([_iou(b, r) for r in refs]) for b in boxes]
  from scipy import stats  # pylint: disable=g-import-not-at-top

  assert res['clipcrop']['quality_iou_srcc'] == pytest.approx(
      stats.spearmanr(quality, ious)[0], abs=1e-9
  )


def test_top_box_falls_back_to_whole_image_without_text():
  host = _host()
  host['top_valid'] = np.array([False])
  col = evaluate._Collector('text', ['clipcrop', 'owlvit_top_box'])
  evaluate._add_example(col, host, 0, ['owlvit_top_box'])
  np.testing.assert_allclose(col.examples[0]['ranked']['owlvit_top_box'][0][0], [0, 0, 1, 0.5])


def test_gaic_ranking_uses_quality_order():
  host = _host()
  col = evaluate._Collector('gaic', ['clipcrop'])
  evaluate._add_example(col, host, 0, [])
  res = col.results()['clipcrop']
  # Best quality = pred[1] = candidate 0 (MOS 5, the best) -> Acc1/5 = 100.
  assert res['acc1_5'] == pytest.approx(100.0)
  assert res['num_images'] == 1


@pytest.mark.parametrize('text', ['a red square next to a blue disc', 'dog', 'two cats'])
def test_query_mask_for_mode_matches_build_queries(text):
  """Rows kept by each mode on 'full' queries == the mode's own `build_queries` list."""
  full = keywords.build_queries(text, 'full', pipeline=keywords.RULES)
  tokens = np.zeros((1, 6, 16), np.int32)
  tokens[0, : len(full)] = tokenizer.tokenize(full)
  for mode in ('full', 'main', 'key'):
    mask = np.asarray(model_lib.query_mask_for_mode(tokens, mode))[0]
    kept = [full[i] for i in np.nonzero(mask)[0]]
    assert kept == keywords.build_queries(text, mode, pipeline=keywords.RULES), mode
  assert model_lib.query_mask_for_mode(tokens, 'base') is None


def test_add_text_queries():
  tf = pytest.importorskip('tensorflow')
  from clipcrop_jax.data import input_pipeline as ip  # pylint: disable=g-import-not-at-top

  ds = tf.data.Dataset.from_tensor_slices({'text': ['a red square and a blue disc', '']})
  out = list(
      ip.add_text_queries(ds, max_queries=3, keyword_pipeline=keywords.RULES).as_numpy_iterator()
  )
  expected = keywords.build_queries(
      'a red square and a blue disc', 'full', pipeline=keywords.RULES
  )[:3]
  np.testing.assert_array_equal(
      out[0]['text_queries'][: len(expected)], tokenizer.tokenize(expected)
  )
  assert out[0]['text_queries'].shape == (3, 16)
  assert not out[1]['text_queries'].any()
