"""Tests of the synthetic cropping scenes (clipcrop_jax.synthetic) and its TFDS builder."""

import pathlib

import numpy as np
import pytest
from PIL import Image

from clipcrop_jax import boxes as box_lib
from clipcrop_jax import synthetic as S
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
  code = ('import sys; import clipcrop_jax.synthetic; '
          'assert "tensorflow" not in sys.modules, "tensorflow imported"')
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
  np.testing.assert_array_equal(s.candidates[:len(grid)], grid)
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


@pytest.mark.parametrize('i', SEEDS)
def test_caption_names_unique_target(i):
  s = _scene(i)
  names = [o.name for o in s.objects]
  for t in s.target_indices:
    name = s.objects[t].name
    assert names.count(name) == 1
    assert name in s.caption.replace('big ', '').replace('small ', '')
  # No other object is named.
  stripped = s.caption.replace('big ', '').replace('small ', '')
  for j, name in enumerate(names):
    if j not in s.target_indices:
      assert name not in stripped
  named = np.array([s.objects[t].box for t in s.target_indices])
  np.testing.assert_allclose(s.target_xyxy, [*named[:, :2].min(0), *named[:, 2:].max(0)])
  if len(s.target_indices) == 2:
    assert any(r in s.caption for r in ('next to', 'left of', 'right of', 'above', 'below'))


def test_relation_words_are_true():
  n_rel = 0
  for i in range(40):
    s = _scene(i)
    if len(s.target_indices) != 2:
      continue
    n_rel += 1
    a, b = (s.objects[t] for t in s.target_indices)
    ca, cb = (np.array([(o.box[0] + o.box[2]) / 2, (o.box[1] + o.box[3]) / 2]) for o in (a, b))
    if 'left of' in s.caption:
      assert ca[0] < cb[0]
    elif 'right of' in s.caption:
      assert ca[0] > cb[0]
    elif 'above' in s.caption:
      assert ca[1] < cb[1]
    elif 'below' in s.caption:
      assert ca[1] > cb[1]
  assert n_rel >= 5


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
  free = s.candidates[len(zero_shot.gaic_grid_candidates((w, h))):]
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
      grid = S.score_candidates(zero_shot.gaic_grid_candidates((ex.width, ex.height)), boxes[t],
                                others, hw)
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
    assert ex.objects[ex.target_indices[k]].name in ex.captions[k].replace('big ', '').replace(
        'small ', '')
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
  assert (ymin, xmin, ymax, xmax) == pytest.approx(
      (box[1] / h, box[0] / w, box[3] / h, box[2] / w))
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
      str(REPO / 'datasets' / 'synthetic'), has_imports=False)
  assert builder_cls.__name__ == 'SyntheticCrops' and not kwargs
  builder = builder_cls(config='tiny', data_dir=str(tmp_path_factory.mktemp('tfds')))
  builder.download_and_prepare()
  return builder


def test_builder_counts_and_features(tiny_builder):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from clipcrop_jax import features as F  # pylint: disable=g-import-not-at-top
  assert tiny_builder.name == 'synthetic_crops'
  splits = tiny_builder.info.splits
  assert {k: splits[k].num_examples for k in splits} == {
      'train': 8, 'validation': 4, 'test': 4, 'ambiguity': 8}
  keys = set(tiny_builder.info.features.keys())
  assert {F.IMAGE, F.FILENAME, F.HEIGHT, F.WIDTH, F.TEXT, F.CROPS, 'objects',
          'target/bbox'} <= keys
  for ex in tfds.as_numpy(tiny_builder.as_dataset(split='train')):
    assert ex[F.IMAGE].shape == (ex[F.HEIGHT], ex[F.WIDTH], 3)
    n = len(ex[F.CROPS][F.CROP_SCORE])
    assert 72 <= n <= 90 + S.NUM_FREE_CROPS
    assert ex[F.TEXT]
    assert np.all((ex[F.CROPS][F.CROP_SCORE] >= 1) & (ex[F.CROPS][F.CROP_SCORE] <= 5))
  amb = list(tfds.as_numpy(tiny_builder.as_dataset(split='ambiguity')))
  by_file = {}
  for ex in amb:
    np.testing.assert_array_equal(ex[F.CROPS][F.CROP_SCORE], np.ones(4, np.float32))
    by_file.setdefault(ex[F.FILENAME], set()).add(ex[F.TEXT])
  assert len(by_file) == 4 and all(len(t) == 2 for t in by_file.values())


def test_builder_matches_generator_and_bbox_convention(tiny_builder):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from clipcrop_jax import features as F  # pylint: disable=g-import-not-at-top
  config = tiny_builder.builder_config
  checked_non_square = False
  for ex in tfds.as_numpy(tiny_builder.as_dataset(split='train')):
    index = int(ex[F.FILENAME].decode().split('_')[1].split('.')[0])
    scene = S.generate_scene(S.rng_for(config.seed, 'train', index), base_size=config.base_size,
                             aspects=config.aspects)
    h, w = scene.image.shape[:2]
    assert (ex[F.HEIGHT], ex[F.WIDTH]) == (h, w)
    assert ex[F.TEXT].decode() == scene.caption
    got = ex['objects']['bbox']
    want = np.array([[o.box[1] / h, o.box[0] / w, o.box[3] / h, o.box[2] / w]
                     for o in scene.objects])
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert [n.decode() for n in ex['objects']['name']] == [o.name for o in scene.objects]
    np.testing.assert_allclose(
        ex['target/bbox'], S.tfds_bbox(scene.target_xyxy, (h, w)), atol=1e-6)
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
  from clipcrop_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  train = input_pipeline.make_train_dataset(
      tiny_builder.as_dataset(split='train', shuffle_files=False), image_size=96, batch_size=2,
      max_crops=128, seed=0, shuffle_buffer=8)
  batch = next(iter(tfds.as_numpy(train)))
  assert batch['image'].shape == (2, 96, 96, 3) and batch['crops'].shape == (2, 128, 4)
  assert batch['crop_mask'].any(axis=1).all()
  boxes = batch['crops'][batch['crop_mask']]
  assert (boxes[:, 2] > boxes[:, 0]).all() and boxes.min() >= 0 and boxes.max() <= 1
  ev = input_pipeline.make_eval_dataset(tiny_builder.as_dataset(split='test', shuffle_files=False),
                                        image_size=96, batch_size=3, max_crops=128)
  batches = list(tfds.as_numpy(ev))
  assert sum(int(b['mask'].sum()) for b in batches) == 4
  # Eval boxes map back to the stored pixels: crops * max(H, W) equals bbox * (W, H).
  ref = next(iter(tfds.as_numpy(tiny_builder.as_dataset(split='test', shuffle_files=False))))
  first = batches[0]
  n = len(ref['crops']['score'])
  side = max(ref['height'], ref['width'])
  y0, x0, y1, x1 = ref['crops']['bbox'][0]
  np.testing.assert_allclose(first['crops'][0, 0] * side,
                             [x0 * ref['width'], y0 * ref['height'], x1 * ref['width'],
                              y1 * ref['height']], atol=1e-3)
  assert int(first['crop_mask'][0].sum()) == n
