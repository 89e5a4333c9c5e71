"""Tests of the OWL-ViT detection trainer (clipcrop_jax.training.detection_task)."""

import itertools
import json

import jax
import numpy as np
import pytest

from clipcrop_jax import boxes as box_lib
from clipcrop_jax import config_validation
from clipcrop_jax.owlvit import model as owl_model
from clipcrop_jax.training import detection_task as dt
from clipcrop_jax.training import losses
from clipcrop_jax.training import matching
from clipcrop_jax.training import trainer

KW = dict(
    focal_alpha=0.25,
    focal_gamma=2.0,
    cost_class=2.0,
    cost_l1=5.0,
    cost_giou=2.0,
    weight_class=1.5,
    weight_l1=5.0,
    weight_giou=2.0,
)


@pytest.fixture(scope='module')
def data_dir(synthetic_tiny_dir):
  return synthetic_tiny_dir


# ---------------------------------------------------------------------------------- NumPy reference


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def _cxcywh_to_xyxy(b):
  cx, cy, w, h = b
  return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


def _xyxy_to_cxcywh(b):
  x0, y0, x1, y1 = b
  return np.array([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0])


def _giou(a, b):
  area = lambda r: max(r[2] - r[0], 0) * max(r[3] - r[1], 0)
  inter = max(min(a[2], b[2]) - max(a[0], b[0]), 0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0)
  union = area(a) + area(b) - inter
  hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
  return inter / (union + 1e-6) - (hull - union) / (hull + 1e-6)


def _focal_np(x, t, alpha, gamma):
  p = _sigmoid(x)
  ce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
  p_t = p * t + (1 - p) * (1 - t)
  return (alpha * t + (1 - alpha) * (1 - t)) * ce * (1 - p_t) ** gamma


def _reference_loss(logits, boxes, query_mask, tboxes, tlabels, tmask, k):
  """1 image; brute-force matching over all assignments of real objects to tokens."""
  num_tokens = logits.shape[0]
  real = [n for n in range(len(tmask)) if tmask[n]]

  def cost(p, n):
    prob = _sigmoid(logits[p, tlabels[n]])
    c_cls = k['focal_alpha'] * (1 - prob) ** 2 * -np.log(prob) - (
        1 - k['focal_alpha']
    ) * prob**2 * -np.log(1 - prob)
    l1 = np.abs(boxes[p] - _xyxy_to_cxcywh(tboxes[n])).sum()
    return (
        k['cost_class'] * c_cls
        + k['cost_l1'] * l1
        - k['cost_giou'] * _giou(_cxcywh_to_xyxy(boxes[p]), tboxes[n])
    )

  best = min(
      itertools.permutations(range(num_tokens), len(real)),
      key=lambda perm: sum(cost(p, n) for p, n in zip(perm, real)),
  )
  targets = np.zeros_like(logits)
  l1 = giou = 0.0
  for p, n in zip(best, real):
    targets[p, tlabels[n]] = 1.0
    l1 += np.abs(boxes[p] - _xyxy_to_cxcywh(tboxes[n])).sum()
    giou += 1 - _giou(_cxcywh_to_xyxy(boxes[p]), tboxes[n])
  cls = (_focal_np(logits, targets, k['focal_alpha'], k['focal_gamma']) * query_mask[None, :]).sum()
  norm = len(real)
  terms = {'loss_class': cls / norm, 'loss_l1': l1 / norm, 'loss_giou': giou / norm}
  terms['loss'] = (
      k['weight_class'] * terms['loss_class']
      + k['weight_l1'] * terms['loss_l1']
      + k['weight_giou'] * terms['loss_giou']
  )
  return terms, dict(zip(real, best))


def test_loss_terms_match_numpy_hand_computation():
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 2, (4, 3)).astype(np.float32)  # 4 tokens, 3 queries (last = padding)
  boxes = np.array(
      [[0.3, 0.3, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2], [0.5, 0.5, 0.6, 0.6], [0.2, 0.8, 0.1, 0.1]],
      np.float32,
  )
  query_mask = np.array([1.0, 1.0, 0.0])
  tboxes = np.array([[0.6, 0.45, 0.85, 0.7], [0.15, 0.1, 0.4, 0.5], [0, 0, 1, 1]], np.float32)
  tlabels = np.array([1, 0, 0])
  tmask = np.array([True, True, False])
  expected, _ = _reference_loss(
      logits.astype(np.float64),
      boxes.astype(np.float64),
      query_mask,
      tboxes.astype(np.float64),
      tlabels,
      tmask,
      KW,
  )
  loss, terms = jax.jit(lambda *a: losses.detection_loss(*a, **KW))(
      logits[None], boxes[None], query_mask[None] > 0, tboxes[None], tlabels[None], tmask[None]
  )
  for name, value in expected.items():
    np.testing.assert_allclose(float(terms[name]), value, rtol=1e-4, atol=1e-5, err_msg=name)
  np.testing.assert_allclose(float(loss), expected['loss'], rtol=1e-4)
  assert float(terms['num_objects']) == 2.0


def test_matching_picks_the_obvious_tokens():
  tboxes = np.array([[[0.1, 0.1, 0.3, 0.4], [0.6, 0.5, 0.9, 0.9], [0, 0, 0, 0]]], np.float32)
  tlabels = np.array([[0, 1, 0]])
  tmask = np.array([[True, True, False]])
  boxes = np.tile(np.array([0.5, 0.5, 0.05, 0.05], np.float32), (1, 6, 1))
  logits = np.full((1, 6, 2), -5.0, np.float32)
  boxes[0, 4] = np.asarray(box_lib.xyxy_to_cxcywh(tboxes[0, 0]))
  boxes[0, 1] = np.asarray(box_lib.xyxy_to_cxcywh(tboxes[0, 1]))
  logits[0, 4, 0] = logits[0, 1, 1] = 5.0
  pred_idx, target_idx, valid = jax.jit(matching.detection_match)(
      logits, boxes, tboxes, tlabels, tmask
  )
  pairs = {int(t): int(p) for p, t, v in zip(pred_idx[0], target_idx[0], valid[0]) if v}
  assert pairs == {0: 4, 1: 1}


def test_label_queries_are_shared_and_indexed():
  batch = {
      'labels': np.array([[b'red square', b'blue star', b''], [b'blue star', b'', b'']]),
      'box_mask': np.array([[True, True, False], [True, False, False]]),
  }
  out = dt.add_label_queries(batch, max_labels=4)
  assert out['query_texts'] == ['blue star', 'red square']
  assert out['text_queries'].shape == (2, 4, 16)
  np.testing.assert_array_equal(out['text_queries'][0], out['text_queries'][1])
  assert (out['text_queries'][:, 2:] == 0).all() and (out['text_queries'][:, :2, 0] > 0).all()
  np.testing.assert_array_equal(out['label_ids'][out['box_mask']], [1, 0, 0])


# ------------------------------------------------------------------------- phrase labels and flip


def _objects_example(names, phrases):
  """A (20, 40) image with len(names) objects side by side (left to right), as TFDS gives them."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  n = len(names)
  bbox = np.array([[0.2, i / n, 0.8, (i + 0.5) / n] for i in range(n)], np.float32)  # yxyx
  return {
      'image': tf.zeros((20, 40, 3), tf.uint8),
      'objects': {
          'bbox': tf.constant(bbox),
          'name': tf.constant(names),
          'phrase': tf.constant(phrases),
      },
  }


NAMES = ['red circle', 'blue square', 'green star']
PHRASES = [
    'red circle to the left of the blue square',
    '',
    'green star to the right of a big ' 'blue square',
]


def _labels(out):
  return [l.decode() for l, m in zip(out['labels'].numpy(), out['box_mask'].numpy()) if m]


@pytest.mark.parametrize('prob, want', [(1.0, [PHRASES[0], NAMES[1], PHRASES[2]]), (0.0, NAMES)])
def test_phrase_labels(prob, want):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  ex = _objects_example(NAMES, PHRASES)
  for s in range(3):
    out = dt.preprocess_example(
        ex,
        image_size=16,
        max_objects=4,
        phrase_key='phrase',
        phrase_prob=prob,
        phrase_seed=tf.constant([s, 1]),
    )
    assert _labels(out) == want
  # Off without a key or a seed.
  out = dt.preprocess_example(
      ex, image_size=16, max_objects=4, phrase_prob=1.0, phrase_seed=tf.constant([0, 1])
  )
  assert _labels(out) == NAMES


def test_phrase_labels_are_drawn_per_object_and_deterministic():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  names = [f'n{i}' for i in range(64)]
  ex = _objects_example(names, [f'p{i}' for i in range(64)])
  draw = lambda seed: _labels(
      dt.preprocess_example(
          ex,
          image_size=16,
          max_objects=64,
          phrase_key='phrase',
          phrase_prob=0.5,
          phrase_seed=tf.constant(seed),
      )
  )
  a = draw([3, 7])
  assert a == draw([3, 7]) and a != draw([3, 8])
  assert 16 < sum(l.startswith('p') for l in a) < 48
  assert all(l[1:] == str(i) for i, l in enumerate(a))


def test_flip_swaps_left_and_right_in_labels():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.data import input_pipeline as ip  # pylint: disable=g-import-not-at-top

  ex = _objects_example(NAMES, PHRASES)
  flips = {}
  for s in range(8):
    seed = tf.constant([s, 0], tf.int64)
    out = dt.preprocess_example(
        ex,
        image_size=16,
        max_objects=4,
        flip_seed=seed,
        phrase_key='phrase',
        phrase_prob=1.0,
        phrase_seed=seed + 1,
    )
    flipped = bool(ip.flip_coin(seed))
    flips[flipped] = _labels(out)
    first_x0 = float(out['boxes'][0, 0])
    assert (first_x0 > 0.4) == flipped  # the first object moved to the right
  assert flips[False] == [PHRASES[0], NAMES[1], PHRASES[2]]
  assert flips[True] == [
      'red circle to the right of the blue square',
      NAMES[1],
      'green star to the left of a big blue square',
  ]


def test_make_dataset_phrase_labels_on_the_synthetic_set(data_dir):
  from clipcrop_jax.data import input_pipeline as ip  # pylint: disable=g-import-not-at-top

  builder = ip.dataset_builder('synthetic_crops/tiny', str(data_dir))
  kw = dict(image_size=16, batch_size=8, max_objects=8, drop_remainder=False)

  def labels(**more):
    batch = next(make(**more))
    return [l.decode() for l in batch['labels'][batch['box_mask']]]

  make = lambda **more: dt.make_dataset(builder, 'train', **kw, **more).as_numpy_iterator()
  names = labels()
  phrases = labels(phrase_key='phrase', phrase_prob=1.0)
  assert len(names) == len(phrases) and names != phrases
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  raw = [ex['objects'] for ex in tfds.as_numpy(builder.as_dataset(split='train'))]
  want = [(p or n).decode() for o in raw for n, p in zip(o['name'][:8], o['phrase'][:8])]
  assert phrases == want
  assert labels(phrase_key='phrase', phrase_prob=0.0) == names
  with pytest.raises(KeyError, match='objects/caption'):
    dt.make_dataset(builder, 'train', **kw, phrase_key='caption', phrase_prob=0.5)
  with pytest.raises(ValueError, match='phrase_prob=1.5'):
    dt.make_dataset(builder, 'train', **kw, phrase_key='phrase', phrase_prob=1.5)


def test_phrase_config_validation(load_config):
  from clipcrop_jax import config_validation  # pylint: disable=g-import-not-at-top

  config = load_config('configs/owlvit_detection_tiny.py')
  assert config.dataset.phrase_key == '' and config.dataset.phrase_prob == 0.0
  config.dataset.phrase_prob = 0.5
  with pytest.raises(
      config_validation.ConfigError, match='dataset.phrase_prob=0.5: needs dataset.phrase_key'
  ):
    config_validation.validate_config(config, task='detection')
  config.dataset.update(phrase_key='phrase', phrase_prob=1.2)
  with pytest.raises(
      config_validation.ConfigError, match=r'dataset.phrase_prob=1.2: expected a number in'
  ):
    config_validation.validate_config(config, task='detection')
  config.dataset.phrase_prob = 0.5
  config_validation.validate_config(config, task='detection')


def test_matching_solver_config(load_config):
  """`loss.matching_solver` reaches the detection loss resolved ('auto' -> the platform's
  solver); an unknown solver is refused naming the field. Both solvers give the same
  assignment (`tests/test_matching.py`)."""
  config = load_config('configs/owlvit_detection_tiny.py')
  assert config.loss.matching_solver == 'auto'
  kw = dt.loss_kwargs(config)
  assert kw['matching_solver'] == matching.default_solver() and kw['weight_l1'] == 5.0
  config.loss.matching_solver = 'device'
  assert dt.loss_kwargs(config)['matching_solver'] == 'device'
  config.loss.matching_solver = 'gpu'
  with pytest.raises(config_validation.ConfigError, match="loss.matching_solver='gpu'"):
    config_validation.validate_config(config, task='detection')


@pytest.fixture(scope='module')
def trained(data_dir, load_config, tmp_path_factory):
  """One run of the tiny config overfitting one fixed batch (4 images, no flip / shuffle)."""
  config = load_config('configs/owlvit_detection_tiny.py', **{'dataset.data_dir': str(data_dir)})
  config.dataset.update(train_split='train[:4]', flip=False, shuffle_buffer=0)
  config.batch_size = 4
  config.num_train_steps = 30
  config.optimizer.update(learning_rate=3e-3, end_learning_rate=3e-3)
  config.checkpoint.every_steps = 30
  workdir = tmp_path_factory.mktemp('work')
  state = dt.train_detection(config, str(workdir))
  return config, workdir, state


def test_train_writes_loadable_checkpoint(trained):
  from clipcrop_jax.owlvit import checkpoints as owl_ckpt

  config, workdir, state = trained
  assert int(state.step) == config.num_train_steps
  module, variables = owl_ckpt.load_checkpoint(workdir / dt.EXPORT_FILE, 'tiny')
  assert module.config.name == 'tiny'
  module = dt.DetectionTask(config).module
  init = module.init(
      jax.random.split(jax.random.PRNGKey(config.seed))[0], *owl_model.dummy_inputs(module.config)
  )['params']
  flat_init = owl_ckpt.flatten_params(jax.device_get(init))
  flat = owl_ckpt.flatten_params(variables['params'])
  assert flat.keys() == flat_init.keys()
  changed = [k for k in flat if not np.allclose(flat[k], flat_init[k])]
  assert len(changed) > len(flat) // 2
  assert (workdir / trainer.CHECKPOINT_DIR / str(config.num_train_steps)).is_dir()
  results = json.loads((workdir / dt.EVAL_FILE).read_text())
  assert results['num_objects'] > 0 and results['num_images'] == 4
  assert 0 <= results['chance'] <= 1 and 0 <= results['accuracy'] <= 1


def test_overfitting_one_batch_lowers_the_loss(trained):
  config, workdir, _ = trained
  lines = [json.loads(l) for l in (workdir / trainer.METRICS_FILE).read_text().splitlines()]
  train = [l for l in lines if l['kind'] == 'train']
  assert [l['step'] for l in train] == list(range(1, config.num_train_steps + 1))
  for key in ('loss',) + dt.LOSS_TERMS:
    assert all(np.isfinite(l[key]) for l in train), key
  losses = [l['loss'] for l in train]
  assert np.mean(losses[-3:]) < 0.6 * losses[0], losses
  assert train[-1]['loss_giou'] < train[0]['loss_giou']
