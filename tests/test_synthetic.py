"""Tests of the synthetic cropping scenes (clipcrop_jax.data.synthetic) and its TFDS builder."""

import hashlib
import pathlib
import sys

import numpy as np
import pytest
from PIL import Image

from clipcrop_jax import boxes as box_lib
from clipcrop_jax.data import synthetic as S
from clipcrop_jax import zero_shot

REPO = pathlib.Path(__file__).resolve().parents[1]
SEEDS = range(12)


def _scene(i, **kw):
  return S.generate_scene(S.rng_for(0, 'train', i), **kw)


def _amb(i, **kw):
  return S.generate_ambiguity_example(S.rng_for(0, 'ambiguity', i), **kw)


def _boxes_overlap(a, b):
  return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def test_import_does_not_need_tensorflow():
  import subprocess
  import sys

  code = (
      'import sys; import clipcrop_jax.data.synthetic; '
      'assert "tensorflow" not in sys.modules, "tensorflow imported"'
  )
  subprocess.run([sys.executable, '-c', code], check=True)


def test_deterministic_from_seed():
  a, b = _scene(3), _scene(3)
  assert a.image.tobytes() == b.image.tobytes()
  assert S.encode_jpeg(a.image) == S.encode_jpeg(b.image)
  assert a.caption == b.caption and a.objects == b.objects
  np.testing.assert_array_equal(a.scores, b.scores)
  c = S.generate_scene(S.rng_for(1, 'train', 3))
  assert c.image.tobytes() != a.image.tobytes()
  x, y = _amb(2), _amb(2)
  assert x.image.tobytes() == y.image.tobytes() and x.captions == y.captions
  np.testing.assert_array_equal(x.reference_crops, y.reference_crops)


def test_image_size_configurable_and_non_square():
  s = _scene(0, image_size=(200, 300))
  assert s.image.shape == (200, 300, 3) and s.image.dtype == np.uint8
  grid = zero_shot.gaic_grid_candidates((300, 200))
  np.testing.assert_array_equal(s.candidates[: len(grid)], grid)
  assert len(grid) < len(s.candidates) <= len(grid) + S.NUM_FREE_CROPS
  sizes = {_scene(i, base_size=160).image.shape[:2] for i in SEEDS}
  assert len(sizes) > 1 and any(h != w for h, w in sizes)
  for h, w in sizes:
    assert abs(np.sqrt(h * w) - 160) < 4


@pytest.mark.parametrize('i', SEEDS)
def test_objects_inside_and_non_overlapping(i):
  s = _scene(i)
  h, w = s.image.shape[:2]
  assert 3 <= len(s.objects) <= 6
  for o in s.objects:
    x0, y0, x1, y1 = o.box
    assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    assert o.colour in S.COLOURS and o.shape in S.SHAPES and o.size in S.SIZES
  for a in range(len(s.objects)):
    for b in range(a + 1, len(s.objects)):
      assert not _boxes_overlap(s.objects[a].box, s.objects[b].box)
  names = [o.name for o in s.objects]
  assert len(set(names)) == len(names)


def _strip_sizes(text):
  return text.replace('big ', '').replace('small ', '')


def _holds(word, a, b):
  """Whether `a` <word> `b` holds for the box centres (pixel xyxy objects)."""
  ca, cb = (np.array([(o.box[0] + o.box[2]) / 2, (o.box[1] + o.box[3]) / 2]) for o in (a, b))
  return {
      'to the left of': ca[0] < cb[0],
      'to the right of': ca[0] > cb[0],
      'above': ca[1] < cb[1],
      'below': ca[1] > cb[1],
      'next to': True,
  }[word]


def _near_two(objects, a):
  centres = np.array([[(o.box[0] + o.box[2]) / 2, (o.box[1] + o.box[3]) / 2] for o in objects])
  dist = np.linalg.norm(centres - centres[a], axis=1)
  dist[a] = np.inf
  return set(np.argsort(dist, kind='stable')[:2].tolist())


@pytest.mark.parametrize('i', SEEDS)
def test_caption_names_unique_target(i):
  s = _scene(i)
  names = [o.name for o in s.objects]
  stripped = _strip_sizes(s.caption)
  for t in s.mentioned_indices:
    assert names.count(s.objects[t].name) == 1
    assert s.objects[t].name in stripped
  # No other object is named, and the first name is the (first) target.
  for j, name in enumerate(names):
    if j not in s.mentioned_indices:
      assert name not in stripped
  assert stripped.find(s.objects[s.target_indices[0]].name) <= 4  # after 'the ' / 'a '
  named = np.array([s.objects[t].box for t in s.target_indices])
  np.testing.assert_allclose(s.target_xyxy, [*named[:, :2].min(0), *named[:, 2:].max(0)])


def test_caption_kinds_mix_and_grammar():
  scenes = [_scene(i) for i in range(200)]
  kinds = [s.kind for s in scenes]
  frac = {k: kinds.count(k) / len(kinds) for k in S.CAPTION_KINDS}
  assert frac['name'] == pytest.approx(0.5, abs=0.1)
  assert frac['pair'] == pytest.approx(0.2, abs=0.08)
  assert frac['relation'] == pytest.approx(0.3, abs=0.08)
  for s in scenes:
    if s.kind == 'name':
      assert s.target_indices == s.mentioned_indices and len(s.target_indices) == 1
      assert ' and ' not in s.caption and not any(w in s.caption for w in ('next to', 'above'))
    elif s.kind == 'pair':
      a, b = s.target_indices
      assert s.mentioned_indices == (a, b) and b in _near_two(s.objects, a)
      assert ' and ' in s.caption
    else:
      (a,), (a2, b) = s.target_indices, s.mentioned_indices
      assert a == a2 and b in _near_two(s.objects, a)
      np.testing.assert_allclose(s.target_xyxy, s.objects[a].box)  # A only, not the union
      word = next(w for w in ('next to',) + S.DIRECTIONS if f' {w} ' in s.caption)
      assert _holds(word, s.objects[a], s.objects[b]), (s.caption, word)
  # Generator arguments: only names, only pairs.
  assert {_scene(i, pair_prob=0.0, relation_prob=0.0).kind for i in range(10)} == {'name'}
  assert {_scene(i, pair_prob=1.0, relation_prob=0.0).kind for i in range(10)} == {'pair'}
  with pytest.raises(ValueError, match='pair_prob'):
    _scene(0, pair_prob=0.7, relation_prob=0.5)


def test_relation_caption_scores_treat_the_landmark_as_other():
  # The landmark B of a relation caption is a distractor: the scores equal the rule with target
  # A and every other object (B included) as "other".
  s = next(s for s in (_scene(i) for i in range(40)) if s.kind == 'relation')
  a = s.target_indices[0]
  others = np.array([o.box for j, o in enumerate(s.objects) if j != a])
  np.testing.assert_allclose(
      s.scores, S.score_candidates(s.candidates, s.objects[a].box, others, (s.height, s.width))
  )


@pytest.mark.parametrize('make', [_scene, _amb], ids=['scene', 'ambiguity'])
def test_referring_phrases(make):
  n = with_phrase = 0
  for i in range(30):
    ex = make(i)
    assert len(ex.phrases) == len(ex.objects)
    for a, (obj, phrase) in enumerate(zip(ex.objects, ex.phrases)):
      n += 1
      if not phrase:
        continue
      with_phrase += 1
      assert phrase.startswith(obj.name + ' ') and not phrase.startswith(('a ', 'the '))
      word = next(w for w in ('next to',) + S.DIRECTIONS if phrase.startswith(f'{obj.name} {w} '))
      rest = _strip_sizes(phrase[len(f'{obj.name} {word} ') :]).split(' ', 1)[1]
      b = next(j for j, o in enumerate(ex.objects) if o.name == rest)
      assert b in _near_two(ex.objects, a) and _holds(word, obj, ex.objects[b]), phrase
  assert 0.35 < with_phrase / n < 0.65


@pytest.mark.parametrize('i', SEEDS)
def test_candidates_and_scores(i):
  s = _scene(i)
  grid = zero_shot.gaic_grid_candidates((s.width, s.height))
  assert len(grid) <= len(s.candidates) <= len(grid) + S.NUM_FREE_CROPS
  assert s.scores.shape == (len(s.candidates),)
  assert np.all(s.scores >= 1) and np.all(s.scores <= 5)
  best = s.candidates[int(np.argmax(s.scores))]
  assert box_lib.contains_xyxy_np(best, s.target_xyxy)
  inside = np.array([box_lib.contains_xyxy_np(c, s.target_xyxy) for c in s.candidates])
  assert inside.any()
  assert np.all(s.scores[inside] >= 2) and np.all(s.scores[~inside] < 2)
  assert s.scores.max() > 3  # some candidate is well composed


@pytest.mark.parametrize('i', SEEDS)
def test_free_form_candidates(i):
  # After the GAIC grid: crops of 12-50 % of the image, aspect 0.6-1.7, inside the image, each
  # containing the caption's target; some of them are smaller than any grid crop can be.
  s = _scene(i)
  h, w = s.height, s.width
  free = s.candidates[len(zero_shot.gaic_grid_candidates((w, h))) :]
  t = s.target_xyxy
  # All of them, unless the (union) target is big (seeds 0-11 all get 32; 11 and 16 get ~20).
  assert len(free) == S.NUM_FREE_CROPS or (t[2] - t[0]) * (t[3] - t[1]) > 0.1 * h * w
  cw, ch = free[:, 2] - free[:, 0], free[:, 3] - free[:, 1]
  area = cw * ch / (h * w)
  assert np.all(area > 0.12 - 1e-9) and np.all(area < 0.5 + 1e-9)
  assert np.all(cw / ch > 0.6 - 1e-9) and np.all(cw / ch < 1.7 + 1e-9)
  assert np.all(free[:, :2] >= -1e-9) and np.all(free[:, 2] <= w + 1e-9)
  assert np.all(free[:, 3] <= h + 1e-9)
  assert all(box_lib.contains_xyxy_np(c, s.target_xyxy) for c in free)
  assert area.min() < 0.45  # below the grid's minimum of one half


def test_sample_crops_around_margin():
  rng = np.random.default_rng(0)
  target = np.array([100.0, 80.0, 140.0, 120.0])
  crops = S.sample_crops_around(rng, (240, 320), target, samples=200, margin=0.05)
  assert len(crops) > 50
  cw, ch = crops[:, 2] - crops[:, 0], crops[:, 3] - crops[:, 1]
  assert np.all(target[0] - crops[:, 0] >= 0.05 * cw - 1e-9)
  assert np.all(crops[:, 2] - target[2] >= 0.05 * cw - 1e-9)
  assert np.all(target[1] - crops[:, 1] >= 0.05 * ch - 1e-9)
  assert np.all(crops[:, 3] - target[3] >= 0.05 * ch - 1e-9)
  # Positions are spread, not pinned to one side of the target.
  assert np.std((crops[:, 0] + crops[:, 2]) / 2) > 10


def test_references_outscore_most_training_candidates_of_the_same_target():
  # One annotator taste: the ambiguity split's reference crops, scored by the training rule
  # (target, distractors and the other target as "other"), beat the median grid candidate.
  for i in range(6):
    ex = _amb(i)
    boxes = np.array([o.box for o in ex.objects])
    hw = (ex.height, ex.width)
    for t in range(2):
      others = np.delete(boxes, t, axis=0)
      ref = S.score_candidates(ex.reference_crops[t], boxes[t], others, hw)
      grid = S.score_candidates(
          zero_shot.gaic_grid_candidates((ex.width, ex.height)), boxes[t], others, hw
      )
      assert np.all(ref >= 2) and ref.mean() > np.median(grid)


def test_score_rule_penalises_cutting_distractors():
  # Target on the left; a distractor straddles the right edge of some candidates.
  hw = (240, 240)
  cands = np.array([[10, 10, 200, 200], [10, 10, 230, 230]], dtype=np.float64)
  target = np.array([40, 40, 100, 100])
  other = np.array([[180, 100, 220, 140]])
  scores = S.score_candidates(cands, target, other, hw)
  scores_free = S.score_candidates(cands, target, np.zeros((0, 4)), hw)
  assert scores[0] < scores_free[0]  # cuts the distractor in half
  assert scores[1] == pytest.approx(scores_free[1])  # keeps it whole
  cut_target = S.score_candidates(np.array([[70, 10, 230, 230]]), target, other, hw)
  assert 1 <= cut_target[0] < 2


# sha256 of image bytes + float64 reference crops of `_amb(i)`, recorded from dataset version
# 1.1.0 (before the caption grammar and objects/phrase): the ambiguity split's images and
# references must not move.
AMBIGUITY_PIN = {
    0: ((296, 222, 3), 'c58f7f9a832361e76adf2099f0f6bf6bb9a15ee0680f8eac622d4c25b0f34e65'),
    1: ((314, 209, 3), '0c7bd0eb2432b8042e3129043d6ef60d166fe1d974cae947b64283655572498d'),
    2: ((296, 222, 3), 'e050f9c4b1196a9cb7087094552da7961632181571835692549b25dd438f1fa4'),
    3: ((209, 314, 3), '5624619c99ae48eb994a75f7cacf94cd8090e4e1c14494c755d473449e7af743'),
}


def _pixels_and_refs_hash(ex):
  h = hashlib.sha256()
  h.update(ex.image.tobytes())
  h.update(np.asarray(ex.reference_crops, np.float64).tobytes())
  return h.hexdigest()


@pytest.mark.parametrize('i', sorted(AMBIGUITY_PIN))
def test_ambiguity_images_and_references_unchanged(i):
  ex = _amb(i)
  assert (ex.image.shape, _pixels_and_refs_hash(ex)) == AMBIGUITY_PIN[i]


def test_ambiguity_validation_split_is_disjoint():
  assert S.SPLIT_IDS['ambiguity_validation'] not in {
      v for k, v in S.SPLIT_IDS.items() if k != 'ambiguity_validation'
  }
  test = {_pixels_and_refs_hash(_amb(i)) for i in range(6)}
  val = [S.generate_ambiguity_example(S.rng_for(0, 'ambiguity_validation', i)) for i in range(6)]
  assert not test & {_pixels_and_refs_hash(ex) for ex in val}
  assert all(ex.reference_crops.shape == (2, 4, 4) for ex in val)


def test_ambiguity_captions_grammar():
  kinds = []
  for i in range(40):
    ex = _amb(i)
    for k, (t, o) in enumerate(((0, 1), (1, 0))):
      caption, target, other = ex.captions[k], ex.objects[t], ex.objects[o]
      kinds.append(ex.caption_kinds[k])
      stripped = _strip_sizes(caption)
      assert stripped.find(target.name) <= 4  # the target comes first
      if ex.caption_kinds[k] == 'name':
        assert other.name not in stripped and len(stripped.split()) <= 3
        continue
      # '<T> <direction> <other target>': both names, so keywords alone are ambiguous.
      assert other.name in stripped and 'next to' not in caption
      word = next(w for w in S.DIRECTIONS if f' {w} ' in caption)
      assert word == S.direction_word(target, other) and _holds(word, target, other)
  assert 0.3 < kinds.count('relation') / len(kinds) < 0.7


@pytest.mark.parametrize('i', range(8))
def test_ambiguity_example(i):
  ex = _amb(i)
  h, w = ex.image.shape[:2]
  assert ex.reference_crops.shape == (2, 4, 4)
  assert ex.captions[0] != ex.captions[1]
  t0, t1 = ex.target_xyxy
  names = [o.name for o in ex.objects]
  assert len(set(names)) == len(names)
  for k in range(2):
    assert ex.objects[ex.target_indices[k]].name in _strip_sizes(ex.captions[k])
  # Far apart: a gap of >= 20 % of the image extent along one axis between the two boxes.
  gap_x = max(t1[0] - t0[2], t0[0] - t1[2]) / w
  gap_y = max(t1[1] - t0[3], t0[1] - t1[3]) / h
  assert max(gap_x, gap_y) >= 0.2 - 1e-9
  # Equally salient: same size class.
  assert ex.objects[0].size == ex.objects[1].size == 'large'
  for k, (mine, other) in enumerate(((t0, t1), (t1, t0))):
    for crop in ex.reference_crops[k]:
      assert 0 <= crop[0] < crop[2] <= w + 1e-6 and 0 <= crop[1] < crop[3] <= h + 1e-6
      assert box_lib.contains_xyxy_np(crop, mine)
      assert not box_lib.contains_xyxy_np(crop, other)
  # The two captions' crops differ: no crop of one set matches one of the other.
  iou = box_lib.pairwise_iou_xyxy_np(ex.reference_crops[0], ex.reference_crops[1])
  assert iou.max() < 0.5


def test_bbox_convention_on_known_object():
  h, w = 200, 300  # non-square
  canvas = Image.new('RGB', (w, h), (128, 128, 128))
  box = S.draw_object(canvas, 'red', 'circle', centre=(120.5, 60.5), extent=41)
  pixels = np.all(np.asarray(canvas) == S.COLOURS['red'], axis=-1)
  ys, xs = np.nonzero(pixels)
  assert box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
  assert box[0] == pytest.approx(100, abs=1) and box[2] == pytest.approx(141, abs=1)
  assert box[1] == pytest.approx(40, abs=1) and box[3] == pytest.approx(81, abs=1)
  ymin, xmin, ymax, xmax = S.tfds_bbox(box, (h, w))
  assert (ymin, xmin, ymax, xmax) == pytest.approx((box[1] / h, box[0] / w, box[3] / h, box[2] / w))
  assert ymin == pytest.approx(40 / 200, abs=0.01) and xmin == pytest.approx(100 / 300, abs=0.01)


@pytest.mark.parametrize('i', range(4))
def test_object_boxes_are_tight(i):
  s = _scene(i, image_size=(180, 260))
  for o in s.objects:
    x0, y0, x1, y1 = (int(v) for v in o.box)
    patch = np.all(s.image[y0:y1, x0:x1] == S.COLOURS[o.colour], axis=-1)
    assert patch[0].any() and patch[-1].any() and patch[:, 0].any() and patch[:, -1].any()


# ------------------------------------------------------------------------------------------------
# TFDS builder.
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def tiny_builder(tmp_path_factory):
  pytest.importorskip('tensorflow_datasets')
  from tensorflow_datasets.scripts.cli import build  # pylint: disable=g-import-not-at-top
  # The same lookup `tfds build datasets/synthetic` does.
  builder_cls, kwargs = build._get_builder_cls_and_kwargs(  # pylint: disable=protected-access
      str(REPO / 'datasets' / 'synthetic'), has_imports=False
  )
  assert builder_cls.__name__ == 'SyntheticCrops' and not kwargs
  builder = builder_cls(config='tiny', data_dir=str(tmp_path_factory.mktemp('tfds')))
  builder.download_and_prepare()
  return builder


def test_builder_counts_and_features(tiny_builder):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.data import features as F  # pylint: disable=g-import-not-at-top

  assert tiny_builder.name == 'synthetic_crops'
  splits = tiny_builder.info.splits
  assert str(tiny_builder.info.version) == '1.3.0'
  assert {k: splits[k].num_examples for k in splits} == {
      'train': 8,
      'validation': 4,
      'test': 4,
      'ambiguity': 12,
      'ambiguity_validation': 12,
  }
  keys = set(tiny_builder.info.features.keys())
  assert {
      F.IMAGE,
      F.FILENAME,
      F.HEIGHT,
      F.WIDTH,
      F.TEXT,
      F.CROPS,
      'objects',
      'target/bbox',
      'caption_kind',
  } <= keys
  assert set(tiny_builder.info.features['objects'].keys()) == {'bbox', 'name', 'phrase'}
  for ex in tfds.as_numpy(tiny_builder.as_dataset(split='train')):
    assert ex[F.IMAGE].shape == (ex[F.HEIGHT], ex[F.WIDTH], 3)
    n = len(ex[F.CROPS][F.CROP_SCORE])
    assert 72 <= n <= 90 + S.NUM_FREE_CROPS
    assert ex[F.TEXT]
    assert np.all((ex[F.CROPS][F.CROP_SCORE] >= 1) & (ex[F.CROPS][F.CROP_SCORE] <= 5))
  images = {}
  for split in S.AMBIGUITY_SPLITS:
    by_file = {}
    for ex in tfds.as_numpy(tiny_builder.as_dataset(split=split)):
      np.testing.assert_array_equal(ex[F.CROPS][F.CROP_SCORE], np.ones(4, np.float32))
      by_file.setdefault(ex[F.FILENAME].decode(), []).append(ex['caption_kind'].decode())
      images.setdefault(split, set()).add(ex[F.IMAGE].tobytes())
    assert sorted(by_file) == [f'{split}_{i:06d}.jpg' for i in range(4)]
    # Three captions per image: each target alone ('name' / 'relation') and both ('pair').
    assert all(len(k) == 3 and k.count('pair') == 1 for k in by_file.values()), by_file
  assert not images['ambiguity'] & images['ambiguity_validation']


def test_builder_configs(tiny_builder):
  configs = {c.name: c for c in type(tiny_builder).BUILDER_CONFIGS}
  assert set(configs) == {'default', 'small', 'tiny'} | {
      f'{size}_seed{s}' for size in ('default', 'small') for s in range(1, 10)
  }
  sizes = lambda c: (c.num_train, c.num_validation, c.num_test, c.num_ambiguity, c.base_size)
  for s in range(1, 10):
    for size in ('default', 'small'):
      config = configs[f'{size}_seed{s}']
      assert config.seed == s and sizes(config) == sizes(configs[size])
  assert configs['default'].seed == configs['small'].seed == 0
  assert sizes(configs['small']) == (400, 50, 50, 50, 256)


def test_builder_matches_generator_and_bbox_convention(tiny_builder):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.data import features as F  # pylint: disable=g-import-not-at-top

  config = tiny_builder.builder_config
  checked_non_square = False
  for ex in tfds.as_numpy(tiny_builder.as_dataset(split='train')):
    index = int(ex[F.FILENAME].decode().split('_')[1].split('.')[0])
    scene = S.generate_scene(
        S.rng_for(config.seed, 'train', index), base_size=config.base_size, aspects=config.aspects
    )
    h, w = scene.image.shape[:2]
    assert (ex[F.HEIGHT], ex[F.WIDTH]) == (h, w)
    assert ex[F.TEXT].decode() == scene.caption
    got = ex['objects']['bbox']
    want = np.array(
        [[o.box[1] / h, o.box[0] / w, o.box[3] / h, o.box[2] / w] for o in scene.objects]
    )
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert [n.decode() for n in ex['objects']['name']] == [o.name for o in scene.objects]
    assert tuple(p.decode() for p in ex['objects']['phrase']) == scene.phrases
    np.testing.assert_allclose(ex['target/bbox'], S.tfds_bbox(scene.target_xyxy, (h, w)), atol=1e-6)
    np.testing.assert_allclose(ex[F.CROPS][F.CROP_SCORE], scene.scores, atol=1e-6)
    # The decoded image has the object's colour at the centre of its (ymin, xmin, ymax, xmax) box.
    if h != w:
      checked_non_square = True
      for (ymin, xmin, ymax, xmax), o in zip(got, scene.objects):
        cy, cx = int((ymin + ymax) / 2 * h), int((xmin + xmax) / 2 * w)
        colour = ex[F.IMAGE][cy, cx].astype(int)
        assert np.abs(colour - np.array(S.COLOURS[o.colour])).max() < 40, (o, colour)
  assert checked_non_square


def test_input_pipeline_on_built_dataset(tiny_builder):
  """Builder output -> training (mosaic) and eval pipelines -> batches the model can take."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top

  train = input_pipeline.make_train_dataset(
      tiny_builder.as_dataset(split='train', shuffle_files=False),
      image_size=96,
      batch_size=2,
      max_crops=128,
      seed=0,
      shuffle_buffer=8,
  )
  batch = next(iter(tfds.as_numpy(train)))
  assert batch['image'].shape == (2, 96, 96, 3) and batch['crops'].shape == (2, 128, 4)
  assert batch['crop_mask'].any(axis=1).all()
  boxes = batch['crops'][batch['crop_mask']]
  assert (boxes[:, 2] > boxes[:, 0]).all() and boxes.min() >= 0 and boxes.max() <= 1
  ev = input_pipeline.make_eval_dataset(
      tiny_builder.as_dataset(split='test', shuffle_files=False),
      image_size=96,
      batch_size=3,
      max_crops=128,
  )
  batches = list(tfds.as_numpy(ev))
  assert sum(int(b['mask'].sum()) for b in batches) == 4
  # Eval boxes map back to the stored pixels: crops * max(H, W) equals bbox * (W, H).
  ref = next(iter(tfds.as_numpy(tiny_builder.as_dataset(split='test', shuffle_files=False))))
  first = batches[0]
  n = len(ref['crops']['score'])
  side = max(ref['height'], ref['width'])
  y0, x0, y1, x1 = ref['crops']['bbox'][0]
  np.testing.assert_allclose(
      first['crops'][0, 0] * side,
      [x0 * ref['width'], y0 * ref['height'], x1 * ref['width'], y1 * ref['height']],
      atol=1e-3,
  )
  assert int(first['crop_mask'][0].sum()) == n


# sha256 (`_example_hash`) of the TFDS examples of version 1.2.0, computed before 1.3.0 added the
# two-target captions: the one-target examples of both ambiguity splits must not move.
EXAMPLES_1_2_0 = {
    'ambiguity/000000_0': '92907804f21c7b30e4cabc7f2f1c067de70a07d1cacf74289b7a8aa4fe00af22',
    'ambiguity/000000_1': '1b2610d781c17d6c39ab26bdc33736d1a8d74ccc3fd998e4abb30e143954c5a0',
    'ambiguity/000001_0': '86140ec775aa5079491504cd5d7e1f2308b861adc77d9fd56b6cba0382cda62a',
    'ambiguity/000001_1': '97d089aab9538befb98f65b213945c591a8a897175fad814b109b5dde32681d5',
    'ambiguity/000002_0': 'd0fb902a73557496f85f3ee0a496eb805f061680a4726a4473af3f024ac2cf47',
    'ambiguity/000002_1': 'a01b02d26ac3f609cb9f4227cac96b7494f3fc3671b7c81bb29a7679d533e148',
    'ambiguity/000007_0': '077febb1ba75bd0e85926b620a3231efd1209320a7cee7f00352f3c15ecf711b',
    'ambiguity/000007_1': 'b951fdb1fdf5269e9c9a9040694a16c0b9edc5356ca712d1d89e138c7121220f',
    'ambiguity_validation/000000_0': 'fd19638ea187a166d75d7d90f5dbb75a3f22f8a6915c6bb2604a2e0f7297ab30',
    'ambiguity_validation/000000_1': '30fea9d8892da252e8e94633d8e2aff70651a19366e60c6ccbbfd7699e929c34',
    'ambiguity_validation/000001_0': 'a0fe901ec7e2cf949c828475ed20ee4d178f1d3e3306317bc0b957afe03d8ec4',
    'ambiguity_validation/000001_1': '209d0ed4d4fa7cccd95e0da014a736f553bbf1945f5d0f6aba7149877711578f',
    'ambiguity_validation/000002_0': '836a6f5a5f17dc92f365fec6fe63052c1113e9742bc42eed7de00d20f93293f9',
    'ambiguity_validation/000002_1': 'dadae271e8efe5df0448046ee3aa36760bed1627cda28c9bf8ff5d04afdaa928',
    'ambiguity_validation/000007_0': '81ef0997d646caa49347fa512f210847e3bc4c8071acba97156946ad09d2d43e',
    'ambiguity_validation/000007_1': '565fa667ef3ba5d32b307cb8101a24b67c146068512d65bee46dca1ee8a1f131',
}


def _example_hash(ex) -> str:
  h = hashlib.sha256()

  def put(v):
    h.update(bytes(v) if isinstance(v, (bytes, bytearray)) else repr(v).encode())

  for key in sorted(ex):
    h.update(key.encode())
    v = ex[key]
    if key == 'crops':
      for c in v:
        put(tuple(c['bbox']))
        put(float(c['score']))
    elif key == 'objects':
      for o in v:
        put(tuple(o['bbox']))
        put(o['name'])
        put(o['phrase'])
    elif hasattr(v, 'ymin'):
      put(tuple(v))
    else:
      put(v if isinstance(v, (bytes, str)) else repr(v))
  return h.hexdigest()


def test_version_1_2_0_examples_are_unchanged(tiny_builder):
  builder = sys.modules[type(tiny_builder).__module__]  # datasets/synthetic/synthetic.py
  config = builder.SyntheticCropsConfig(name='pin')  # the default sizes, data seed 0
  got = {}
  images = {(k.split('/')[0], int(k.split('/')[1][:6])) for k in EXAMPLES_1_2_0}
  for split, index in sorted(images):
    for key, ex in builder.generate_split_examples(config, split, index):
      kind = ex.pop(builder.CAPTION_KIND)
      if kind != 'pair':
        got[f'{split}/{key}'] = _example_hash(ex)
  assert got == EXAMPLES_1_2_0


def test_two_target_captions_and_references():
  for i in range(12):
    ex = _amb(i)
    a, b = ex.objects[0], ex.objects[1]
    stripped = _strip_sizes(ex.pair_caption)
    assert ' and ' in ex.pair_caption and a.name in stripped and b.name in stripped
    union = np.array(
        [
            min(a.box[0], b.box[0]),
            min(a.box[1], b.box[1]),
            max(a.box[2], b.box[2]),
            max(a.box[3], b.box[3]),
        ]
    )
    np.testing.assert_allclose(ex.pair_target_xyxy, union)
    refs = ex.pair_reference_crops
    assert refs.shape == (4, 4)
    # Every reference contains both targets, inside the image.
    assert np.all(refs[:, :2] <= union[:2] + 1e-9) and np.all(refs[:, 2:] >= union[2:] - 1e-9)
    assert np.all(refs >= -1e-9) and np.all(refs[:, 2] <= ex.width + 1e-9)
    assert np.all(refs[:, 3] <= ex.height + 1e-9)
  # Without the pair, the one-target part of an example is the same.
  plain = S.generate_ambiguity_example(S.rng_for(0, 'ambiguity', 3), pair=False)
  assert plain.captions == _amb(3).captions and plain.pair_caption == ''
