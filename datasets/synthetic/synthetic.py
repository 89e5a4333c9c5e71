"""TFDS builder `synthetic_crops`: procedurally generated text-conditioned cropping data.

No download and no manual dir: every example is drawn by `clipcrop_jax.data.synthetic` from a seed.

  tfds build datasets/synthetic                      # config `default`
  tfds build datasets/synthetic --config=tiny        # a few images, for tests
  tfds build datasets/synthetic --config=small_seed2 # the `small` sizes drawn with data seed 2

Splits: train / validation / test (one example per image: caption, target, ~90 GAIC grid-anchor
plus up to 32 free-form candidates scored 1..5) and ambiguity / ambiguity_validation (TextCrop-like:
three examples per image, one per caption: each of the two far-apart targets alone, then both
('<A> and <B>'), each with four reference crops of score 1.0; the same generator on disjoint
images: choose settings on ambiguity_validation, report on ambiguity). Every example has a
`caption_kind`: 'name', 'pair' (two targets) or 'relation'.
See README.md for the features, the caption grammar and the score rule.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from clipcrop_jax.data import features as F
from clipcrop_jax.data import synthetic as S

OBJECTS = 'objects'
OBJECT_BBOX = 'bbox'
OBJECT_NAME = 'name'
OBJECT_PHRASE = 'phrase'
TARGET_BBOX = 'target/bbox'
CAPTION_KIND = 'caption_kind'  # 'name' | 'pair' | 'relation' (`synthetic.CAPTION_KINDS`)


@dataclasses.dataclass
class SyntheticCropsConfig(tfds.core.BuilderConfig):
  """Sizes of the generated splits (images; the ambiguity splits yield three examples per image;
  ambiguity_validation has `num_ambiguity` images too)."""

  num_train: int = 1000
  num_validation: int = 200
  num_test: int = 200
  num_ambiguity: int = 100
  base_size: int = 256  # sqrt(H * W) of the images, in pixels
  aspects: tuple[float, ...] = S.DEFAULT_ASPECTS  # W / H choices, within [1/2, 2)
  seed: int = 0
  jpeg_quality: int = 95


DEFAULT_DESCRIPTION = (
    '1000/200/200 images + 100 ambiguity and 100 ambiguity_validation images '
    '(300 examples each), ~256x256 px.'
)
SMALL_DESCRIPTION = (
    '400/50/50 images + 50 ambiguity and 50 ambiguity_validation images (150 '
    'examples each), ~256x256 px: the quick embedded-default run.'
)
SMALL_SIZES = dict(num_train=400, num_validation=50, num_test=50, num_ambiguity=50)
SEEDS = range(1, 10)  # data seeds of the `default_seed<s>` / `small_seed<s>` configs


class SyntheticCrops(tfds.core.GeneratorBasedBuilder):
  """Procedurally generated cropping scenes of coloured shapes (needs no download)."""

  VERSION = tfds.core.Version('1.3.0')
  RELEASE_NOTES = {
      '1.0.0': 'Initial release.',
      '1.1.0': 'Training candidates: the GAIC grid plus up to 32 free-form crops around the '
      'target, scored with the same annotator taste as the ambiguity references.',
      '1.2.0': 'New split ambiguity_validation (same generator and size as ambiguity, disjoint '
      'images) for choosing settings. Caption grammar with relation phrases: training '
      "captions are 'name' / 'pair' ('<A> and <B>') / 'relation' ('<A> <relation> <B>', "
      'target A only); half of the ambiguity captions name the other target too '
      "('<T> <direction> <other>'). New feature objects/phrase (a referring phrase or "
      "''). Configs default_seed<s> / small_seed<s> (s = 1..9). The ambiguity split's "
      'images and reference crops are unchanged; its captions are not.',
      '1.3.0': 'Two-target captions: a third example per ambiguity / ambiguity_validation image, '
      "'<A> and <B>' naming both targets, with four reference crops containing both "
      "(key <index>_2). New feature caption_kind ('name' / 'pair' / 'relation') on "
      'every example. The examples of 1.2.0 are unchanged (pinned by hash in '
      'tests/test_synthetic.py).',
  }
  BUILDER_CONFIGS = (
      [
          SyntheticCropsConfig(name='default', description=DEFAULT_DESCRIPTION),
          SyntheticCropsConfig(name='small', description=SMALL_DESCRIPTION, **SMALL_SIZES),
          SyntheticCropsConfig(
              name='tiny',
              description='8/4/4 images + 4 + 4 ambiguity images, ' 'for tests.',
              num_train=8,
              num_validation=4,
              num_test=4,
              num_ambiguity=4,
              base_size=128,
          ),
      ]
      + [
          SyntheticCropsConfig(
              name=f'default_seed{s}', seed=s, description=f'{DEFAULT_DESCRIPTION} Data seed {s}.'
          )
          for s in SEEDS
      ]
      + [
          SyntheticCropsConfig(
              name=f'small_seed{s}',
              seed=s,
              description=f'{SMALL_DESCRIPTION} Data seed {s}.',
              **SMALL_SIZES,
          )
          for s in SEEDS
      ]
  )
  DEFAULT_CONFIG_NAME = 'default'

  def _info(self) -> tfds.core.DatasetInfo:
    extras = {
        OBJECTS: tfds.features.Sequence(
            {
                OBJECT_BBOX: tfds.features.BBoxFeature(),
                OBJECT_NAME: tfds.features.Text(),
                OBJECT_PHRASE: tfds.features.Text(),
            }
        ),
        TARGET_BBOX: tfds.features.BBoxFeature(),
        CAPTION_KIND: tfds.features.Text(),
    }
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(F.common_features(**extras)),
        supervised_keys=None,
        homepage='https://github.com/zzh-tech/ClipCrop',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing to download.
    c = self.builder_config
    return {
        'train': self._generate_examples('train', c.num_train),
        'validation': self._generate_examples('validation', c.num_validation),
        'test': self._generate_examples('test', c.num_test),
        'ambiguity': self._generate_examples('ambiguity', c.num_ambiguity),
        'ambiguity_validation': self._generate_examples('ambiguity_validation', c.num_ambiguity),
    }

  def _generate_examples(self, split: str, num_images: int):
    for index in range(num_images):
      yield from generate_split_examples(self.builder_config, split, index)


def _bbox(box, hw):
  return tfds.features.BBox(*S.tfds_bbox(box, hw))


def _objects(objects, phrases, hw):
  return [
      {OBJECT_BBOX: _bbox(o.box, hw), OBJECT_NAME: o.name, OBJECT_PHRASE: p}
      for o, p in zip(objects, phrases, strict=True)
  ]


def generate_split_examples(config: SyntheticCropsConfig, split: str, index: int):
  """The (key, example) pairs of image `index` of `split` (three for the ambiguity splits)."""
  rng = S.rng_for(config.seed, split, index)
  if split in S.AMBIGUITY_SPLITS:
    ex = S.generate_ambiguity_example(rng, base_size=config.base_size, aspects=config.aspects)
    hw = (ex.height, ex.width)
    jpeg = S.encode_jpeg(ex.image, config.jpeg_quality)
    objects = _objects(ex.objects, ex.phrases, hw)
    captions = [
        (ex.captions[k], ex.caption_kinds[k], ex.reference_crops[k], ex.target_xyxy[k])
        for k in range(2)
    ]
    captions.append((ex.pair_caption, 'pair', ex.pair_reference_crops, ex.pair_target_xyxy))
    for k, (caption, kind, refs, target) in enumerate(captions):
      yield f'{index:06d}_{k}', {
          F.IMAGE: jpeg,
          F.FILENAME: f'{split}_{index:06d}.jpg',
          F.HEIGHT: np.int32(hw[0]),
          F.WIDTH: np.int32(hw[1]),
          F.TEXT: caption,
          F.CROPS: [{F.CROP_BBOX: _bbox(b, hw), F.CROP_SCORE: np.float32(1.0)} for b in refs],
          OBJECTS: objects,
          TARGET_BBOX: _bbox(target, hw),
          CAPTION_KIND: kind,
      }
    return
  scene = S.generate_scene(rng, base_size=config.base_size, aspects=config.aspects)
  hw = (scene.height, scene.width)
  yield f'{index:06d}', {
      F.IMAGE: S.encode_jpeg(scene.image, config.jpeg_quality),
      F.FILENAME: f'{split}_{index:06d}.jpg',
      F.HEIGHT: np.int32(hw[0]),
      F.WIDTH: np.int32(hw[1]),
      F.TEXT: scene.caption,
      F.CROPS: [
          {F.CROP_BBOX: _bbox(b, hw), F.CROP_SCORE: np.float32(s)}
          for b, s in zip(scene.candidates, scene.scores)
      ],
      OBJECTS: _objects(scene.objects, scene.phrases, hw),
      TARGET_BBOX: _bbox(scene.target_xyxy, hw),
      CAPTION_KIND: scene.kind,
  }
