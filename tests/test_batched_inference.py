"""Batched inference (`ClipCropper.iter_crops`, `crop` / `encode` on lists): input order, per-file
errors, static batch buckets, bfloat16, and the batch split over 8 (fake CPU) devices."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from clipcrop_jax import cropper as cropper_lib
from clipcrop_jax import keywords
from clipcrop_jax import model as model_lib
from clipcrop_jax.owlvit import detect
from clipcrop_jax.owlvit import model as owl_model
from clipcrop_jax.owlvit import preprocessing as pp

TEXT = 'a red square'
BOX_ATOL_PX = 1e-2  # float32 rounding of a differently batched forward, in pixels (~1e-4 seen)
# bfloat16 vs float32 on the tiny model: boxes in [0, 1] of the padded square (~2e-3 seen).
BF16_BOX_ATOL = 0.02


@pytest.fixture(scope='module')
def variables():
  return model_lib.init_variables(model_lib.TINY, seed=3)


@pytest.fixture(scope='module')
def cropper(variables):
  return cropper_lib.ClipCropper(model_lib.TINY, variables, keyword_pipeline=keywords.RULES)


@pytest.fixture(scope='module')
def images():
  """Six differently shaped pictures (a wide one, a tall one, a small one ...)."""
  return [
      detect.demo_image(h, w)
      for h, w in ((360, 540), (300, 300), (500, 200), (90, 160), (240, 700), (410, 380))
  ]


def _boxes(crops):
  return np.array([c.box for c in crops], np.float64).reshape(-1, 4)


def _assert_same_crops(a, b, atol=BOX_ATOL_PX):
  assert len(a) == len(b)
  np.testing.assert_allclose(_boxes(a), _boxes(b), atol=atol)
  np.testing.assert_allclose([c.score for c in a], [c.score for c in b], atol=1e-4)


def test_bucket_sizes(cropper):
  assert cropper.num_devices == 1
  assert cropper.batch_size == cropper_lib.DEFAULT_BATCH_SIZE['cpu'] == 1  # CPU default
  assert [cropper.bucket_size(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]


def test_list_results_in_order_with_per_file_errors(cropper, images, tmp_path):
  """A missing and a corrupt file in the middle: their results carry an error naming the file;
  every other image gets exactly the crops it gets alone, in input order."""
  paths = []
  for i, image in enumerate(images):
    paths.append(tmp_path / f'im{i}.png')
    Image.fromarray(image).save(paths[-1])
  corrupt = tmp_path / 'corrupt.jpg'
  corrupt.write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
  items = paths[:2] + [tmp_path / 'missing.png', corrupt] + paths[2:] + [images[0]]
  alone = [cropper.crop(p, text=TEXT, top_k=3) for p in paths] + [
      cropper.crop(images[0], text=TEXT, top_k=3)
  ]
  results = list(cropper.iter_crops(items, text=TEXT, top_k=3, batch_size=4, num_workers=2))
  assert [r.index for r in results] == list(range(len(items)))
  assert [r.source for r in results] == [str(p) for p in items[:-1]] + [f'images[{len(items) - 1}]']
  failed = [r for r in results if r.error is not None]
  assert [r.index for r in failed] == [2, 3]
  assert 'missing.png' in failed[0].error and 'corrupt.jpg' in failed[1].error
  assert all(isinstance(r.exception, pp.ImageError) for r in failed)
  assert all('\n' not in r.error for r in failed)
  ok = [r for r in results if r.error is None]
  assert len(ok) == len(alone)
  for r, expected, image in zip(ok, alone, images + [images[0]]):
    _assert_same_crops(r.crops, expected)
    assert r.image_hw == image.shape[:2]
  # crop() on a list: 'return' keeps the failures in place, 'raise' raises the first one.
  out = cropper.crop(items, text=TEXT, top_k=3, errors='return', batch_size=4)
  assert isinstance(out[2], cropper_lib.BatchResult) and out[2].error == failed[0].error
  _assert_same_crops(out[4], alone[2])
  with pytest.raises(pp.ImageError, match='missing.png'):
    cropper.crop(items, text=TEXT)
  with pytest.raises(ValueError, match='errors'):
    cropper.crop(items, text=TEXT, errors='ignore')


def test_static_buckets_compile_once_per_bucket(variables, images):
  """Lists of 5, 6, 7 and 8 images (batch_size 8) all run in the 8-image bucket: one encoder
  compilation, not one per list length."""
  cropper = cropper_lib.ClipCropper(model_lib.TINY, variables, keyword_pipeline=keywords.RULES)
  many = (images * 2)[:8]
  cropper.crop(many, text=TEXT, batch_size=8)  # compiles the 8-bucket
  before = owl_model.encode_images._cache_size()  # pylint: disable=protected-access
  for n in (5, 6, 7):
    cropper.crop(many[:n], text=TEXT, batch_size=8)
  assert owl_model.encode_images._cache_size() == before  # pylint: disable=protected-access


def test_payload_prepare_and_encodings_pass_through(cropper, images):
  """`prepare` output comes back as the payload; Encodings in the list skip the encoder."""
  seen = []

  def prepare(item):
    seen.append(item)
    return cropper.prepare(images[item]), ('payload', item)

  results = list(cropper.iter_crops([0, 2, 1], text=TEXT, prepare=prepare, batch_size=2))
  assert sorted(seen) == [0, 1, 2]
  assert [r.payload for r in results] == [('payload', 0), ('payload', 2), ('payload', 1)]
  encoding = cropper.encode(images[1])
  mixed = cropper.crop([images[0], encoding], text=TEXT, top_k=2)
  _assert_same_crops(mixed[1], cropper.crop(images[1], text=TEXT, top_k=2))
  encodings = cropper.encode(images[:3])
  assert [e.image_hw for e in encodings] == [im.shape[:2] for im in images[:3]]
  _assert_same_crops(cropper.crop(encodings[2], text=TEXT), cropper.crop(images[2], text=TEXT))


def test_reading_is_bounded_and_stops_with_the_caller(cropper, images):
  """Reading runs at most two batches (+ workers) ahead, and stops when the caller stops."""
  seen = []

  def prepare(item):
    seen.append(item)
    return cropper.prepare(images[item % len(images)]), None

  results = cropper.iter_crops(range(200), text=TEXT, prepare=prepare, batch_size=2, num_workers=1)
  first = next(results)
  assert first.index == 0 and first.error is None
  assert len(seen) <= 2 * 2 + 1 + 2  # the look-ahead, plus the refill after the first batch
  results.close()
  assert len(seen) <= 2 * 2 + 1 + 2


def test_zero_shot_batched_equals_single(variables, images):
  owl_only = {'params': {'owlvit': variables['params']['owlvit']}}
  zs = cropper_lib.ClipCropper(
      model_lib.TINY, owl_only, zero_shot_mode=True, keyword_pipeline=keywords.RULES
  )
  batched = zs.crop(images[:5], text=TEXT, top_k=3, batch_size=4)
  for image, crops in zip(images[:5], batched):
    _assert_same_crops(crops, zs.crop(image, text=TEXT, top_k=3))


def test_bfloat16_boxes_close_to_float32(variables, images, cropper):
  """bfloat16 compute: every predicted box within BF16_BOX_ATOL (of the padded square) of the
  float32 one, qualities within 0.02, on the tiny model."""
  bf16 = cropper_lib.ClipCropper(
      model_lib.TINY, variables, keyword_pipeline=keywords.RULES, dtype='bfloat16'
  )
  assert bf16.dtype != cropper.dtype
  request = cropper.check_request(text=TEXT)
  inputs = [cropper.prepare(im) for im in images]
  ref = cropper._forward(inputs, request)  # pylint: disable=protected-access
  low = bf16._forward(inputs, bf16.check_request(text=TEXT))  # pylint: disable=protected-access
  n = len(images)
  assert low['pred_boxes'].dtype == np.float32 or low['pred_boxes'].dtype.itemsize == 2
  np.testing.assert_allclose(
      np.asarray(low['pred_boxes'][:n], np.float32), ref['pred_boxes'][:n], atol=BF16_BOX_ATOL
  )
  np.testing.assert_allclose(
      np.asarray(low['quality'][:n], np.float32), ref['quality'][:n], atol=0.02
  )
  assert not np.array_equal(np.asarray(low['pred_boxes'][:n], np.float32), ref['pred_boxes'][:n])
  with pytest.raises(ValueError, match='dtype'):
    cropper_lib.ClipCropper(model_lib.TINY, variables, dtype='float16')


_EIGHT_DEVICES = r"""
import json, sys
import jax, numpy as np
from clipcrop_jax import cropper as cropper_lib, keywords, model as model_lib
from clipcrop_jax.owlvit import detect
assert jax.local_device_count() == 8, jax.devices()
variables = model_lib.init_variables(model_lib.TINY, seed=3)
c = cropper_lib.ClipCropper(model_lib.TINY, variables, keyword_pipeline=keywords.RULES)
images = [detect.demo_image(h, w) for h, w in json.loads(sys.argv[1])]
encoded = c._encode_inputs([c.prepare(im) for im in images])
spec = encoded['image_features'].sharding.spec
shards = {s.device.id: s.data.shape[0] for s in encoded['image_features'].addressable_shards}
out = c.crop(images, text='a red square', top_k=3, batch_size=8)
print(json.dumps({'bucket': c.bucket_size(len(images)), 'spec': str(spec), 'shards': shards,
                  'boxes': [[list(x.box) for x in crops] for crops in out]}))
"""


def test_batch_split_over_eight_devices(cropper, images):
  """On 8 (fake CPU) devices a 6-image batch is padded to 8 and split one image per device on
  the 'data' axis; the crops equal the single-device ones."""
  env = dict(
      os.environ,
      JAX_PLATFORMS='cpu',
      TF_CPP_MIN_LOG_LEVEL='2',
      XLA_FLAGS='--xla_force_host_platform_device_count=8',
  )
  shapes = [list(im.shape[:2]) for im in images]
  out = subprocess.run(
      [sys.executable, '-c', _EIGHT_DEVICES, json.dumps(shapes)],
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  got = json.loads(out.stdout.strip().splitlines()[-1])
  assert got['bucket'] == 8
  assert "'data'" in got['spec']
  assert sorted(got['shards'].values()) == [1] * 8 and len(got['shards']) == 8
  for boxes, image in zip(got['boxes'], images):
    np.testing.assert_allclose(
        np.array(boxes).reshape(-1, 4),
        _boxes(cropper.crop(image, text=TEXT, top_k=3)),
        atol=BOX_ATOL_PX,
    )
