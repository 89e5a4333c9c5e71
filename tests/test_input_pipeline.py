"""Tests for clipcrop_jax.data.input_pipeline (tiny in-memory datasets, no TFDS builder)."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip('tensorflow')

from clipcrop_jax.data import features as F  # pylint: disable=g-import-not-at-top
from clipcrop_jax.data import input_pipeline as ip  # pylint: disable=g-import-not-at-top
from clipcrop_jax import keywords  # pylint: disable=g-import-not-at-top

COLOURS = np.array(
    [
        [255, 0, 0],
        [0, 255, 0],
        [0, 0, 255],
        [255, 255, 0],
        [255, 0, 255],
        [0, 255, 255],
        [255, 255, 255],
        [255, 128, 0],
        [128, 0, 255],
    ],
    np.uint8,
)

SIGNATURE = {
    'image': tf.TensorSpec((None, None, 3), tf.uint8),
    'image/filename': tf.TensorSpec((), tf.string),
    'height': tf.TensorSpec((), tf.int32),
    'width': tf.TensorSpec((), tf.int32),
    'text': tf.TensorSpec((), tf.string),
    'crops': {
        'bbox': tf.TensorSpec((None, 4), tf.float32),
        'score': tf.TensorSpec((None,), tf.float32),
    },
}


def _marker_example(h, w, box_px, colour, text='', extra_crops=0):
  """Black (h, w) image with a `colour` rectangle at pixel box (y0, x0, y1, x1); crop = marker."""
  image = np.zeros((h, w, 3), np.uint8)
  y0, x0, y1, x1 = box_px
  image[y0:y1, x0:x1] = colour
  bbox = np.array([[y0 / h, x0 / w, y1 / h, x1 / w]], np.float32)
  whole = np.tile([[0.0, 0.0, 1.0, 1.0]], (extra_crops, 1))
  bbox = np.concatenate([bbox, whole]).astype(np.float32)
  return {
      'image': image,
      'image/filename': f'{text}.jpg',
      'height': np.int32(h),
      'width': np.int32(w),
      'text': text,
      'crops': {'bbox': bbox, 'score': np.arange(len(bbox), dtype=np.float32) + 1},
  }


def _dataset(n=12):
  def gen():
    rng = np.random.default_rng(0)
    for i in range(n):
      h, w = [(60, 90), (90, 60), (50, 50)][i % 3]
      ex = _marker_example(h, w, (10, 10, 40, 40), COLOURS[i % 9], text=f't{i}', extra_crops=i % 5)
      ex['image'] = np.maximum(ex['image'], rng.integers(0, 50, (h, w, 3), dtype=np.uint8))
      yield ex

  return tf.data.Dataset.from_generator(gen, output_signature=SIGNATURE)


def _colour_bbox(image, colour, tol=0.2):
  """Pixel bbox (x0, y0, x1, y1) of the pixels within `tol` of `colour` (float image)."""
  hit = np.all(np.abs(image - colour / 255.0) < tol, axis=-1)
  ys, xs = np.nonzero(hit)
  assert len(ys), 'colour not found'
  return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)


def test_pad_and_resize_geometry():
  # Non-square 60 x 100 image; marker rows 12..36, cols 20..70; S = 50 -> scale 0.5.
  ex = _marker_example(60, 100, (12, 20, 36, 70), COLOURS[0])
  out = ip.preprocess_example(
      {
          k: tf.constant(v) if k != 'crops' else {kk: tf.constant(vv) for kk, vv in v.items()}
          for k, v in ex.items()
      },
      size=50,
      max_crops=4,
  )
  image = out['image'].numpy()
  np.testing.assert_allclose(out['crops'].numpy()[0], [0.2, 0.12, 0.7, 0.36], atol=1e-6)
  np.testing.assert_allclose(out['image_extent'].numpy(), [1.0, 0.6], atol=1e-6)
  np.testing.assert_array_equal(out['crop_mask'].numpy(), [True, False, False, False])
  # The marker lands where the box says (pixels 10..35 x 6..18), within 1 px.
  np.testing.assert_allclose(
      _colour_bbox(image, COLOURS[0]), out['crops'].numpy()[0] * 50, atol=1.0
  )
  # Padding is 0.5 grey at the bottom; the content starts at the top-left.
  np.testing.assert_allclose(image[31:], 0.5, atol=1e-6)
  assert image.min() >= 0.0 and image.max() <= 1.0


def test_matches_owlvit_colab_preprocess_up_to_resize_kernel():
  from clipcrop_jax.owlvit import preprocessing as pp  # pylint: disable=g-import-not-at-top

  image = np.random.default_rng(0).integers(0, 256, (90, 140, 3), dtype=np.uint8)
  ref = pp.preprocess(image, 64)
  ours, _ = ip.pad_to_square_and_resize(tf.image.convert_image_dtype(image, tf.float32), 64)
  diff = np.abs(ours.numpy() - ref)
  assert diff.mean() < 0.03  # different anti-aliasing kernels; same geometry


def test_flip_mirrors_boxes_and_image():
  ex = _marker_example(40, 80, (5, 10, 25, 30), COLOURS[1])
  image = tf.image.convert_image_dtype(ex['image'], tf.float32)
  boxes = ip.yxyx_to_xyxy(tf.constant(ex['crops']['bbox']))
  flipped = 0
  for s in range(8):
    out_img, out_boxes, _ = ip.random_flip_with_text(
        image, boxes, tf.constant(''), tf.constant([s, 0])
    )
    out_img, out_boxes = out_img.numpy(), out_boxes.numpy()
    if np.array_equal(out_img, image.numpy()):
      np.testing.assert_allclose(out_boxes, boxes.numpy())
    else:
      flipped += 1
      np.testing.assert_array_equal(out_img, image.numpy()[:, ::-1])
      np.testing.assert_allclose(
          out_boxes[0], [1 - 30 / 80, 5 / 40, 1 - 10 / 80, 25 / 40], atol=1e-6
      )
      px = _colour_bbox(out_img, COLOURS[1])
      np.testing.assert_allclose(px, out_boxes[0] * [80, 40, 80, 40], atol=1e-4)
  assert 0 < flipped < 8


def test_mirror_text_swaps_whole_words_only():
  texts = tf.constant(
      [
          'the star to the left of the square',
          'Right of the Left one',
          'left right left',
          'leftover bright Leftist righteous LEFT',
          '',
          'left-handed, right.',
      ]
  )
  got = [t.decode() for t in ip.mirror_text(texts).numpy()]
  assert got == [
      'the star to the right of the square',
      'Left of the Right one',
      'right left right',
      'leftover bright Leftist righteous LEFT',
      '',
      'right-handed, left.',
  ]
  # Scalar in, scalar out; mirroring twice is the identity.
  assert ip.mirror_text('a left b').numpy() == b'a right b'
  np.testing.assert_array_equal(ip.mirror_text(ip.mirror_text(texts)).numpy(), texts.numpy())


def test_flip_with_text_mirrors_the_caption_with_the_image():
  ex = _marker_example(
      40, 80, (5, 10, 25, 30), COLOURS[1], text='the green box to the left of nothing'
  )
  tensors = {
      k: (tf.constant(v) if k != 'crops' else {kk: tf.constant(vv) for kk, vv in v.items()})
      for k, v in ex.items()
  }
  seen = set()
  for s in range(10):
    out = ip.preprocess_example(tensors, 32, 4, seed=tf.constant([s, 0]), jitter=False)
    x0 = float(out['crops'][0, 0])
    text = out['text'].numpy().decode()
    # Unflipped the marker starts at x = 10 / 80 of the image (width extent 1): left of centre.
    flipped = x0 > 0.5
    seen.add(flipped)
    assert text == ('the green box to the right of nothing' if flipped else ex['text'])
    # The same decision as random_flip_with_text with the same seed.
    seeds = tf.random.experimental.stateless_split(tf.constant([s, 0], tf.int64), 2)
    assert bool(ip.flip_coin(seeds[1])) == flipped
  assert seen == {True, False}
  # flip=False keeps the text.
  out = ip.preprocess_example(tensors, 32, 4, seed=tf.constant([0, 0]), jitter=False, flip=False)
  assert out['text'].numpy().decode() == ex['text']


def test_color_jitter_keeps_boxes_and_range():
  ex = _marker_example(40, 60, (5, 10, 25, 30), COLOURS[2], extra_crops=2)
  tensors = {
      k: (tf.constant(v) if k != 'crops' else {kk: tf.constant(vv) for kk, vv in v.items()})
      for k, v in ex.items()
  }
  plain = ip.preprocess_example(tensors, 32, 4)
  for s in range(4):
    jit = ip.preprocess_example(tensors, 32, 4, seed=tf.constant([s, 1]), flip=False)
    np.testing.assert_array_equal(jit['crops'].numpy(), plain['crops'].numpy())
    img = jit['image'].numpy()
    assert img.min() >= 0.0 and img.max() <= 1.0
    assert not np.allclose(img, plain['image'].numpy())
  img = ip.color_jitter(tf.random.stateless_uniform((8, 8, 3), [1, 2]), tf.constant([3, 4]))
  assert float(tf.reduce_min(img)) >= 0.0 and float(tf.reduce_max(img)) <= 1.0


@pytest.mark.parametrize('k', [2, 3])
def test_mosaic_remaps_target_crop_onto_its_tile(k):
  size = 96
  tiles = []
  for i in range(k * k):
    h, w = [(120, 180), (180, 120), (150, 150)][i % 3]
    box = [(30, 45, 90, 135), (40, 20, 150, 90), (20, 60, 110, 130)][i % 3]
    ex = _marker_example(h, w, box, COLOURS[i], text=f'tile{i}', extra_crops=1)
    tensors = {
        kk: (tf.constant(v) if kk != 'crops' else {a: tf.constant(b) for a, b in v.items()})
        for kk, v in ex.items()
    }
    tiles.append(ip.preprocess_example(tensors, size, 4))
  stacked = {key: tf.stack([t[key] for t in tiles]) for key in tiles[0]}
  seen = set()
  for s in range(6):
    out = ip.mosaic(stacked, tf.constant([s, 7]))
    target = int(out['text'].numpy().decode()[4:])
    seen.add(target)
    assert int(out['mosaic_grid']) == k
    np.testing.assert_array_equal(out['crop_mask'].numpy(), [True, True, False, False])
    crop = out['crops'].numpy()[0] * size
    image = out['image'].numpy()
    # The remapped crop sits exactly over the target's marker (edges within 1.5 px) ...
    np.testing.assert_allclose(_colour_bbox(image, COLOURS[target]), crop, atol=1.5)
    x0, y0, x1, y1 = np.round(crop).astype(int)
    inner = image[y0 + 2 : y1 - 2, x0 + 2 : x1 - 2]
    np.testing.assert_allclose(
        inner, np.broadcast_to(COLOURS[target] / 255.0, inner.shape), atol=0.05
    )
    # ... and the whole-image crop of the target covers exactly its cell's content.
    cell = size // k
    row, col = divmod(target, k)
    whole = out['crops'].numpy()[1]
    ext = tiles[target]['image_extent'].numpy()
    np.testing.assert_allclose(
        whole,
        [
            col * cell / size,
            row * cell / size,
            (col + ext[0]) * cell / size,
            (row + ext[1]) * cell / size,
        ],
        atol=1e-6,
    )
    np.testing.assert_allclose(out['image_extent'].numpy(), [k * cell / size] * 2, atol=1e-6)
  assert len(seen) > 1


def test_train_batches_static_shapes_mask_and_grids():
  ds = ip.make_train_dataset(
      _dataset(), image_size=48, batch_size=4, max_crops=8, seed=3, shuffle_buffer=16
  )
  spec = ds.element_spec
  assert spec['image'].shape == (4, 48, 48, 3)
  assert spec['crops'].shape == (4, 8, 4)
  assert spec['crop_mask'].shape == (4, 8)
  assert spec['image_extent'].shape == (4, 2)
  grids = set()
  for batch in ds.take(6).as_numpy_iterator():
    grids.update(batch['mosaic_grid'].tolist())
    for b in range(4):
      n = int(batch['text'][b].decode()[1:]) % 5 + 1  # crops of source example t<i>
      assert batch['crop_mask'][b].sum() == n
      np.testing.assert_array_equal(batch['crop_mask'][b], np.arange(8) < n)
      assert np.all(batch['crops'][b][n:] == 0) and np.all(batch['crop_scores'][b][n:] == 0)
      valid = batch['crops'][b][:n]
      assert np.all(valid[:, 2:] >= valid[:, :2]) and valid.min() >= 0 and valid.max() <= 1
    assert batch['image'].min() >= 0 and batch['image'].max() <= 1
  assert grids == {1, 2, 3}


def test_single_image_only_and_bad_probs():
  ds = ip.make_train_dataset(
      _dataset(),
      image_size=32,
      batch_size=2,
      max_crops=8,
      seed=0,
      mosaic_probs=(1, 0, 0),
      shuffle_buffer=4,
  )
  for batch in ds.take(3).as_numpy_iterator():
    assert batch['mosaic_grid'].tolist() == [1, 1]
  with pytest.raises(ValueError):
    ip.make_train_dataset(_dataset(), image_size=32, batch_size=2, seed=0, mosaic_probs=(0, 0))


def test_train_pipeline_is_deterministic():
  def run(seed):
    ds = ip.make_train_dataset(
        _dataset(), image_size=32, batch_size=3, max_crops=8, seed=seed, shuffle_buffer=8
    )
    return list(ds.take(4).as_numpy_iterator())

  a, b, c = run(5), run(5), run(6)
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert any(not np.array_equal(x['image'], y['image']) for x, y in zip(a, c))


def test_truncates_to_best_crops_in_training():
  ex = _marker_example(20, 20, (2, 2, 10, 10), COLOURS[0], extra_crops=5)
  tensors = {
      k: (tf.constant(v) if k != 'crops' else {kk: tf.constant(vv) for kk, vv in v.items()})
      for k, v in ex.items()
  }
  out = ip.preprocess_example(tensors, 16, 3)
  np.testing.assert_array_equal(out['crop_scores'].numpy(), [4, 5, 6])
  with pytest.raises(tf.errors.InvalidArgumentError):
    ip.preprocess_example(tensors, 16, 3, truncate=False)


def test_eval_keeps_all_candidates_and_sizes():
  ds = ip.make_eval_dataset(_dataset(7), image_size=32, batch_size=3, max_crops=6)
  batches = list(ds.as_numpy_iterator())
  assert len(batches) == 3
  mask = np.concatenate([b['mask'] for b in batches])
  np.testing.assert_array_equal(mask, [True] * 7 + [False] * 2)
  heights = np.concatenate([b['height'] for b in batches])[:7]
  widths = np.concatenate([b['width'] for b in batches])[:7]
  np.testing.assert_array_equal(heights, [[60, 90, 50][i % 3] for i in range(7)])
  np.testing.assert_array_equal(widths, [[90, 60, 50][i % 3] for i in range(7)])
  counts = np.concatenate([b['crop_mask'].sum(1) for b in batches])[:7]
  np.testing.assert_array_equal(counts, [i % 5 + 1 for i in range(7)])
  first = batches[0]
  # Crop 0 is the marker (10, 10, 40, 40) px -> padded square of side max(H, W); no augmentation.
  m = max(60, 90)
  np.testing.assert_allclose(first['crops'][0, 0], np.array([10, 10, 40, 40]) / m, atol=1e-6)
  assert [t.decode() for t in first['text']] == ['t0', 't1', 't2']
  assert all(b['image'].shape == (3, 32, 32, 3) for b in batches)


def test_eval_rejects_too_many_candidates():
  ds = ip.make_eval_dataset(_dataset(5), image_size=16, batch_size=2, max_crops=3)
  with pytest.raises(tf.errors.InvalidArgumentError):
    list(ds.as_numpy_iterator())


def test_encoded_images_are_decoded():
  ex = _marker_example(30, 40, (5, 5, 20, 20), COLOURS[0])
  encoded = tf.io.encode_png(ex['image'])
  tensors = {
      k: (tf.constant(v) if k != 'crops' else {kk: tf.constant(vv) for kk, vv in v.items()})
      for k, v in ex.items()
  }
  out_raw = ip.preprocess_example(tensors, 16, 2)
  out_enc = ip.preprocess_example({**tensors, 'image': encoded}, 16, 2)
  np.testing.assert_allclose(out_enc['image'].numpy(), out_raw['image'].numpy(), atol=1e-6)


def test_split_for_process():
  tfds = pytest.importorskip('tensorflow_datasets')
  assert ip.split_for_process('train', 1, 4) == tfds.even_splits('train', 4, drop_remainder=True)[1]


def test_to_global_batches_one_cpu_device():
  jax = pytest.importorskip('jax')
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  ds = ip.make_eval_dataset(_dataset(3), image_size=16, batch_size=2, max_crops=6)
  batches = list(ip.to_global_batches(ds, mesh))
  assert len(batches) == 2
  b = batches[0]
  assert isinstance(b['image'], jax.Array) and b['image'].shape == (2, 16, 16, 3)
  assert b['image'].sharding.spec == jax.sharding.PartitionSpec('data')
  assert isinstance(b['text'], np.ndarray)


def test_text_tokens():
  from clipcrop_jax.owlvit import tokenizer  # pylint: disable=g-import-not-at-top

  ds = ip.make_train_dataset(
      _dataset(),
      image_size=32,
      batch_size=2,
      max_crops=8,
      seed=0,
      shuffle_buffer=4,
      tokenize_text=True,
  )
  batch = next(ds.as_numpy_iterator())
  assert batch['text_tokens'].shape == (2, 1, F.MAX_QUERY_LENGTH)
  assert batch['text_tokens'].dtype == np.int32
  for b in range(2):
    np.testing.assert_array_equal(
        batch['text_tokens'][b], tokenizer.tokenize([batch['text'][b].decode()])
    )
  empty = ip._tokenize(tf.constant(''))  # pylint: disable=protected-access
  np.testing.assert_array_equal(empty.numpy(), np.zeros((1, F.MAX_QUERY_LENGTH)))


def test_add_text_queries_rules_and_refused_legacy_spellings():
  from clipcrop_jax.owlvit import tokenizer  # pylint: disable=g-import-not-at-top

  text = 'a red car and a blue boat'
  ds = tf.data.Dataset.from_tensor_slices({F.TEXT: [text, '']})
  out = list(
      ip.add_text_queries(ds, max_queries=3, keyword_pipeline=keywords.RULES).as_numpy_iterator()
  )
  expected = keywords.build_queries(text, 'full', pipeline=keywords.RULES)
  assert expected == [text, 'a red car', 'a blue boat']
  assert out[0][F.TEXT_QUERIES].shape == (3, F.MAX_QUERY_LENGTH)
  np.testing.assert_array_equal(out[0][F.TEXT_QUERIES], tokenizer.tokenize(expected))
  assert not out[1][F.TEXT_QUERIES].any()
  for legacy in (None, '', 'rule'):  # refused when the dataset is built, not mid-iteration
    with pytest.raises(ValueError, match="use 'rules'"):
      ip.add_text_queries(ds, keyword_pipeline=legacy)
    with pytest.raises(ValueError, match="use 'rules'"):
      ip.make_eval_dataset(
          _dataset(2),
          image_size=16,
          batch_size=2,
          max_crops=6,
          max_queries=2,
          keyword_pipeline=legacy,
      )


def test_batches_carry_the_features_batch_keys():
  train = ip.make_train_dataset(
      _dataset(),
      image_size=32,
      batch_size=2,
      max_crops=8,
      seed=0,
      shuffle_buffer=4,
      max_queries=2,
      keyword_pipeline=keywords.RULES,
  )
  batch = next(train.as_numpy_iterator())
  assert set(F.TRAIN_KEYS) <= set(batch)
  assert batch[F.TEXT_QUERIES].shape == (2, 2, F.MAX_QUERY_LENGTH)
  evaluation = ip.make_eval_dataset(
      _dataset(3),
      image_size=16,
      batch_size=2,
      max_crops=6,
      max_queries=2,
      keyword_pipeline=keywords.RULES,
  )
  batches = list(evaluation.as_numpy_iterator())
  assert all(set(F.EVAL_KEYS) <= set(b) for b in batches)
  assert batches[1][F.EXAMPLE_MASK].tolist() == [True, False]


def test_train_pipeline_end_to_end_markers_and_grey_padding():
  def gen():
    for i in range(18):
      h, w = [(60, 90), (90, 60), (72, 72)][i % 3]
      box = [(10, 20, 40, 70), (30, 5, 80, 35), (8, 8, 30, 60)][i % 3]
      yield _marker_example(h, w, box, COLOURS[i % 9], text=f't{i}', extra_crops=1)

  ds = tf.data.Dataset.from_generator(gen, output_signature=SIGNATURE)
  size = 90
  ds = ip.make_train_dataset(
      ds, image_size=size, batch_size=3, max_crops=4, seed=11, shuffle_buffer=18, jitter=False
  )
  grids = set()
  for batch in ds.take(6).as_numpy_iterator():
    grids.update(batch['mosaic_grid'].tolist())
    for b in range(3):
      i = int(batch['text'][b].decode()[1:])
      crop = batch['crops'][b, 0] * size
      # Look only inside the target tile (crop 1 = the whole source image): colours repeat.
      x0, y0, x1, y1 = np.round(batch['crops'][b, 1] * size).astype(int)
      found = _colour_bbox(batch['image'][b, y0:y1, x0:x1], COLOURS[i % 9]) + [x0, y0, x0, y0]
      np.testing.assert_allclose(found, crop, atol=1.5)
      # The content never extends past image_extent; beyond it everything is 0.5 grey.
      ext = np.ceil(batch['image_extent'][b] * size).astype(int) + 1
      np.testing.assert_allclose(batch['image'][b, ext[1] :], 0.5, atol=1e-6)
      np.testing.assert_allclose(batch['image'][b, :, ext[0] :], 0.5, atol=1e-6)
  assert len(grids) > 1


def test_jitter_keeps_padding_grey():
  ex = _marker_example(30, 60, (5, 10, 25, 30), COLOURS[3])
  tensors = {
      k: (tf.constant(v) if k != 'crops' else {kk: tf.constant(vv) for kk, vv in v.items()})
      for k, v in ex.items()
  }
  out = ip.preprocess_example(tensors, 40, 2, seed=tf.constant([1, 2]))
  np.testing.assert_allclose(out['image'].numpy()[20:], 0.5, atol=1e-6)
