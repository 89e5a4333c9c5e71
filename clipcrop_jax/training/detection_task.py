"""The OWL-ViT detection task on the training core: fine-tuning (or training) on labelled boxes.

Data: a prepared TFDS dataset with `image` and `objects` = {bbox (TFDS BBoxFeature), <label_key>
(Text or ClassLabel), optionally <phrase_key> (Text referring phrases)}; per batch the distinct
labels are the text queries of every image (`make_dataset`, `make_train_iterator`). Loss:
`losses.detection_loss` after `matching.detection_match` (DETR / Scenic OWL-ViT). The export is
`<workdir>/owlvit_checkpoint.msgpack`, a Scenic checkpoint `owlvit.load_checkpoint` reads. The
command line is `clipcrop_jax.detection_train`; config fields `default_config.get_detection_config`;
docs/training.md.
"""

import functools
import json
import pathlib
from typing import Any, Iterator, Optional, Sequence
import warnings

from absl import logging
import jax
import ml_collections
import numpy as np

from clipcrop_jax import boxes as box_lib
from clipcrop_jax.data import features as F
from clipcrop_jax import default_config
from clipcrop_jax.owlvit import fileio
from clipcrop_jax.owlvit import model as owl_model
from clipcrop_jax.owlvit import tokenizer as owl_tokenizer
from clipcrop_jax import sharding as sharding_lib
from clipcrop_jax.training import losses
from clipcrop_jax.training import matching
from clipcrop_jax.training import trainer

TrainState = trainer.TrainState
EXPORT_FILE = 'owlvit_checkpoint.msgpack'
EVAL_FILE = 'eval_grounding.json'
LOSS_TERMS = ('loss_class', 'loss_l1', 'loss_giou')


# ------------------------------------------------------------------------------------------------
# Input pipeline.
# ------------------------------------------------------------------------------------------------


def _label_names(builder, label_key: str, phrase_key: str = '') -> Optional[list[str]]:
  """Class names when objects/<label_key> is a ClassLabel, None for Text.

  KeyError when objects/bbox or objects/<label_key> is absent, or when `phrase_key` ('' = phrase
  labels off) names no Text feature of `objects`.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  info_features = builder.info.features
  if F.OBJECTS not in info_features:
    raise KeyError(
        f'{builder.info.full_name}: no `objects` feature (need objects/bbox and '
        f'objects/{label_key})'
    )
  objects = info_features[F.OBJECTS].feature
  for key in (F.OBJECT_BBOX, label_key):
    if key not in objects:
      raise KeyError(
          f'{builder.info.full_name}: no `objects/{key}` feature; has '
          f'{sorted(objects.keys())} (set dataset.label_key)'
      )
  if phrase_key and (
      phrase_key not in objects or not isinstance(objects[phrase_key], tfds.features.Text)
  ):
    raise KeyError(
        f'{builder.info.full_name}: no Text feature `objects/{phrase_key}`; has '
        f"{sorted(objects.keys())} (set dataset.phrase_key, or '' for none)"
    )
  feature = objects[label_key]
  return list(feature.names) if isinstance(feature, tfds.features.ClassLabel) else None


def choose_phrase_labels(labels: Any, phrases: Any, seed: Any, prob: float) -> Any:
  """Per object, the phrase instead of the label with probability `prob` when it is non-empty.

  Args:
    labels: string (N,) object names.
    phrases: string (N,) referring phrases ('' = none).
    seed: stateless (2,) seed (one uniform draw per object).
    prob: probability in [0, 1].

  Returns:
    string (N,) labels.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  u = tf.random.stateless_uniform(tf.shape(labels), tf.cast(seed, tf.int64))
  use = (u < prob) & (tf.strings.length(phrases) > 0)
  return tf.where(use, phrases, labels)


def preprocess_example(
    example: dict[str, Any],
    *,
    image_size: int,
    max_objects: int,
    label_key: str = 'name',
    names: Optional[Sequence[str]] = None,
    flip_seed: Any = None,
    phrase_key: str = '',
    phrase_prob: float = 0.0,
    phrase_seed: Any = None,
) -> dict[str, Any]:
  """One TFDS example -> image (S, S, 3) float32 [0, 1], boxes (N, 4) xyxy in the padded square,
  box_mask (N,) bool, labels (N,) string; N = max_objects (the first ones are kept).

  `flip_seed`: a stateless (2,) seed for a random horizontal flip (None = no flip); a flip also
  swaps 'left' / 'right' in the labels (`input_pipeline.mirror_text`). With `phrase_key` and a
  `phrase_seed`, each object's label is its objects/<phrase_key> with probability `phrase_prob`
  when that is non-empty (`choose_phrase_labels`).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.data import input_pipeline as ip  # pylint: disable=g-import-not-at-top

  image = tf.image.convert_image_dtype(ip.decode_image(example[F.IMAGE]), tf.float32)
  objects = example[F.OBJECTS]
  boxes = ip.yxyx_to_xyxy(tf.reshape(tf.cast(objects[F.OBJECT_BBOX], tf.float32), (-1, 4)))
  labels = tf.reshape(objects[label_key], (-1,))
  if names is not None:
    labels = tf.gather(tf.constant(list(names)), tf.cast(labels, tf.int32))
  if phrase_key and phrase_seed is not None and phrase_prob > 0:
    labels = choose_phrase_labels(
        labels, tf.reshape(objects[phrase_key], (-1,)), phrase_seed, phrase_prob
    )
  if flip_seed is not None:
    image, boxes, labels = ip.random_flip_with_text(image, boxes, labels, flip_seed)
  image, extent = ip.pad_to_square_and_resize(image, image_size)
  boxes = boxes * tf.concat([extent, extent], axis=0)[None, :]
  n = tf.minimum(tf.shape(boxes)[0], max_objects)
  pad = max_objects - n
  boxes = tf.pad(boxes[:n], [[0, pad], [0, 0]])
  labels = tf.pad(labels[:n], [[0, pad]], constant_values='')
  mask = tf.range(max_objects) < n
  return {
      F.IMAGES: tf.ensure_shape(image, (image_size, image_size, 3)),
      F.BOXES: tf.ensure_shape(boxes, (max_objects, 4)),
      F.BOX_MASK: mask,
      F.LABELS: tf.ensure_shape(labels, (max_objects,)),
  }


def make_dataset(
    builder,
    split: Any,
    *,
    image_size: int,
    batch_size: int,
    max_objects: int,
    label_key: str = 'name',
    flip: bool = False,
    seed: int = 0,
    shuffle_buffer: int = 0,
    repeat: bool = False,
    drop_remainder: bool = True,
    skip_batches: int = 0,
    phrase_key: str = '',
    phrase_prob: float = 0.0,
):
  """tf.data batches of `preprocess_example` outputs (host-local, no queries yet).

  The flip and the phrase-label choice of example `i` (in the shuffled, repeated order) are keyed
  by (seed, i), so a replay (`skip_batches`) gives the same labels.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  if not 0.0 <= phrase_prob <= 1.0:
    raise ValueError(f'dataset.phrase_prob={phrase_prob}: expected a number in [0, 1]')
  names = _label_names(builder, label_key, phrase_key)
  ds = builder.as_dataset(
      split=split, shuffle_files=False, decoders={F.IMAGE: tfds.decode.SkipDecoding()}
  )
  ds = ds.map(lambda ex: {F.IMAGE: ex[F.IMAGE], F.OBJECTS: ex[F.OBJECTS]})
  if repeat:
    ds = ds.repeat()
  if shuffle_buffer > 0:
    ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
  ds = ds.enumerate()

  def prep(index, ex):
    example_seed = tf.stack([tf.cast(seed, tf.int64), index])
    return preprocess_example(
        ex,
        image_size=image_size,
        max_objects=max_objects,
        label_key=label_key,
        names=names,
        flip_seed=example_seed if flip else None,
        phrase_key=phrase_key,
        phrase_prob=phrase_prob,
        phrase_seed=tf.random.experimental.stateless_fold_in(example_seed, 1),
    )

  ds = ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  if skip_batches:
    ds = ds.skip(skip_batches)
  return ds.prefetch(tf.data.AUTOTUNE)


@functools.lru_cache(maxsize=65536)
def _tokens(label: str, max_len: int) -> np.ndarray:
  return owl_tokenizer.tokenize([label], max_len=max_len)[0].astype(np.int32)


def _as_str(x: Any) -> str:
  return x.decode('utf-8') if isinstance(x, bytes) else str(x)


def add_label_queries(
    batch: dict[str, np.ndarray],
    max_labels: int,
    max_query_length: int = F.MAX_QUERY_LENGTH,
    templates: Sequence[str] = (),
    rng: Optional[np.random.Generator] = None,
) -> dict[str, Any]:
  """Host numpy: the batch's distinct labels as shared text queries.

  With `templates` (format strings such as 'a {}', 'the big {}'), each distinct label's query is
  one of them drawn with `rng` (a training augmentation: the detector learns to ground the
  name inside longer phrases, as ClipCrop's captions are); without, the query is the label.

  Adds text_queries int32 (B, max_labels, L) (all-zero rows = padding, masked by the model),
  label_ids int32 (B, N) (index of each object's label in the query list; 0 for padding) and
  query_texts (the label strings, a list). Objects whose label is past `max_labels` (sorted
  order) are dropped from box_mask with a warning.
  """
  labels = np.vectorize(_as_str, otypes=[object])(batch[F.LABELS])
  mask = np.asarray(batch[F.BOX_MASK], bool).copy()
  distinct = sorted({l for l, m in zip(labels.ravel(), mask.ravel()) if m and l.strip()})
  if len(distinct) > max_labels:
    warnings.warn(
        f'{len(distinct)} distinct labels in a batch > max_labels={max_labels}; the '
        'objects of the last ones are ignored (raise dataset.max_labels)'
    )
    distinct = distinct[:max_labels]
  index = {l: i for i, l in enumerate(distinct)}
  label_ids = np.zeros(labels.shape, np.int32)
  for pos, l in np.ndenumerate(labels):
    if mask[pos]:
      if l in index:
        label_ids[pos] = index[l]
      else:
        mask[pos] = False
  queries = np.zeros((max_labels, max_query_length), np.int32)
  for i, l in enumerate(distinct):
    if templates:
      l = templates[int((rng or np.random.default_rng(0)).integers(len(templates)))].format(l)
    queries[i] = _tokens(l, max_query_length)
  b = labels.shape[0]
  out = dict(batch)
  out.update(
      {
          F.BOX_MASK: mask,
          F.LABEL_IDS: label_ids,
          'query_texts': distinct,
          F.TEXT_QUERIES: np.broadcast_to(queries, (b,) + queries.shape).copy(),
      }
  )
  return out


def make_train_iterator(
    config: ml_collections.ConfigDict, builder, mesh, start_step: int = 0
) -> Iterator[dict[str, jax.Array]]:
  """Global training batches (`features.DETECTION_TRAIN_KEYS`, sharded on 'data') after
  `start_step` batches (`trainer.data_position`: replay or reseed)."""
  from clipcrop_jax.data import input_pipeline as ip  # pylint: disable=g-import-not-at-top

  d = config.dataset
  per_process = sharding_lib.process_batch_size(config.batch_size)
  seed, skip = trainer.data_position(config, start_step)
  ds = make_dataset(
      builder,
      ip.split_for_process(d.train_split),
      image_size=default_config.owlvit_config(config).image_size,
      batch_size=per_process,
      max_objects=d.max_objects,
      label_key=d.label_key,
      flip=d.flip,
      seed=seed,
      shuffle_buffer=d.shuffle_buffer,
      repeat=True,
      skip_batches=skip,
      phrase_key=d.get('phrase_key', ''),
      phrase_prob=d.get('phrase_prob', 0.0),
  )
  sharding = sharding_lib.batch_sharding(mesh)
  templates = tuple(d.get('label_templates', ()))
  for step, batch in enumerate(ds.as_numpy_iterator(), start=skip):
    rng = np.random.default_rng([seed, jax.process_index(), step])
    batch = add_label_queries(batch, d.max_labels, templates=templates, rng=rng)
    yield {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k]))
        for k in F.DETECTION_TRAIN_KEYS
    }


# ------------------------------------------------------------------------------------------------
# The task.
# ------------------------------------------------------------------------------------------------


def loss_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Keyword arguments of `losses.detection_loss` from `config.loss` (numbers as floats; the
  matching solver resolved, `matching.resolve_solver`)."""
  kwargs = {k: v for k, v in config.loss.to_dict().items() if k != 'matching_solver'}
  kwargs = {k: float(v) for k, v in kwargs.items()}
  kwargs['matching_solver'] = matching.resolve_solver(config.loss.get('matching_solver', 'auto'))
  return kwargs


def detection_loss_fn(
    module: owl_model.TextZeroShotDetectionModule,
    params: Any,
    batch: dict[str, jax.Array],
    loss_kw: dict[str, Any],
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss, terms) of the detector on a batch of `features.DETECTION_TRAIN_KEYS`."""
  queries = batch[F.TEXT_QUERIES]
  out = module.apply({'params': params}, batch[F.IMAGES], queries)
  return losses.detection_loss(
      out['pred_logits'],
      out['pred_boxes'],
      queries[..., 0] > 0,
      batch[F.BOXES],
      batch[F.LABEL_IDS],
      batch[F.BOX_MASK],
      **loss_kw,
  )


class DetectionTask(trainer.Task):
  """OWL-ViT detection fine-tuning on labelled boxes (see the module docstring).

  Attributes:
    module: the detector (`default_config.build_detection_module`).
  """

  name = 'detection'
  log_terms = LOSS_TERMS

  @functools.cached_property
  def module(self) -> owl_model.TextZeroShotDetectionModule:  # after `validate_config`
    return default_config.build_detection_module(self.config)

  def dataset_builder(self):
    builder = super().dataset_builder()
    _label_names(
        builder,
        self.config.dataset.label_key,  # fail early on missing features
        self.config.dataset.get('phrase_key', ''),
    )
    return builder

  def init_params(self, rng: jax.Array, pretrained: dict[str, Any]) -> Any:
    if pretrained:  # `init_from.owlvit`: every parameter
      return pretrained
    return self.module.init(rng, *owl_model.dummy_inputs(self.module.config))['params']

  def pretrained_params(self, abstract_params: Any) -> dict[str, Any]:
    """`init_from.owlvit` (checked against `model.owlvit`), or {} for a random init."""
    if not self.config.init_from.owlvit:
      return {}
    from clipcrop_jax.owlvit import checkpoints as owl_ckpt  # pylint: disable=g-import-not-at-top

    _, variables = owl_ckpt.load_checkpoint(
        self.config.init_from.owlvit, default_config.owlvit_config(self.config)
    )
    logging.info('Initialising the detector from %s', self.config.init_from.owlvit)
    return dict(variables['params'])

  def train_batches(self, builder, mesh, start_step: int) -> Iterator[dict[str, jax.Array]]:
    return make_train_iterator(self.config, builder, mesh, start_step)

  def loss_fn(self, params, batch, rng):
    del rng  # deterministic
    return detection_loss_fn(self.module, params, batch, loss_kwargs(self.config))

  def _evaluate(self, params: Any, builder) -> dict[str, float]:
    c = self.config
    return evaluate_grounding(
        self.module,
        {'params': params},
        builder,
        c.eval.split,
        batch_size=c.eval.batch_size,
        max_objects=c.dataset.max_objects,
        max_labels=c.dataset.max_labels,
        label_key=c.dataset.label_key,
        max_examples=c.eval.max_examples,
    )

  @property
  def eval_every_steps(self) -> int:
    return self.config.eval.every_steps if self.config.eval.split else -1

  def evaluate(self, state, step, builder, logger) -> None:
    params = trainer.host_params(state)
    if jax.process_index() == 0:
      logger.write(step, self._evaluate(params, builder), kind='eval')

  def finish(self, state, workdir, builder, logger) -> None:
    """Writes `<workdir>/owlvit_checkpoint.msgpack` (Scenic layout) and, with `eval.split`,
    evaluates grounding into `<workdir>/eval_grounding.json` (again on a re-run)."""
    from clipcrop_jax.owlvit import checkpoints as owl_ckpt  # pylint: disable=g-import-not-at-top

    params = trainer.host_params(state)
    if jax.process_index() != 0:
      return
    path = owl_ckpt.save_scenic_checkpoint({'params': params}, pathlib.Path(workdir) / EXPORT_FILE)
    logging.info('Wrote the detector checkpoint %s (clipcrop_jax.owlvit.load_checkpoint)', path)
    if self.config.eval.split:
      results = self._evaluate(params, builder)
      total = int(jax.device_get(state.step))
      logger.write(total, results, kind='eval', replace=True)  # a re-run evaluates again
      fileio.atomic_write_text(pathlib.Path(workdir) / EVAL_FILE, json.dumps(results, indent=1))
      logging.info(
          'Grounding on %s: accuracy %.3f (chance %.3f) over %d objects',
          self.config.eval.split,
          results['accuracy'],
          results['chance'],
          results['num_objects'],
      )


def train_detection(
    config: ml_collections.ConfigDict, workdir: str, max_steps_this_run: Optional[int] = None
) -> TrainState:
  """Trains the detector (resuming from `<workdir>/checkpoints`); returns the final state.

  At the end (all steps done) writes `<workdir>/owlvit_checkpoint.msgpack` (Scenic layout) and,
  with `eval.split` set, `<workdir>/eval_grounding.json`. See `trainer.train` for the errors
  (`errors.NonFiniteLossError` on a NaN / Inf loss: that step is never checkpointed).
  """
  return trainer.train(DetectionTask(config), workdir, max_steps_this_run)


# ------------------------------------------------------------------------------------------------
# Evaluation: grounding accuracy.
# ------------------------------------------------------------------------------------------------


def evaluate_grounding(
    module,
    variables: Any,
    builder,
    split: str,
    *,
    batch_size: int = 8,
    max_objects: int = 16,
    max_labels: int = 16,
    label_key: str = 'name',
    max_examples: int = -1,
    iou_threshold: float = 0.5,
) -> dict[str, float]:
  """Grounding accuracy of `module` on `split` (this process, whole split; no sharding).

  For every object, its label is the query (among the distinct labels of its batch) and the hit
  is: the top-scoring token's box has IoU >= `iou_threshold` with that object's box (another
  object with the same label does not count). `chance` is the expected accuracy of a uniformly
  random token (the fraction of tokens whose box hits), averaged over objects.

  Returns:
    {'accuracy', 'chance', 'mean_top_iou', 'num_objects', 'num_images'}.
  """
  split_arg = split if max_examples is None or max_examples < 0 else f'{split}[:{max_examples}]'
  ds = make_dataset(
      builder,
      split_arg,
      image_size=module.config.image_size,
      batch_size=batch_size,
      max_objects=max_objects,
      label_key=label_key,
      drop_remainder=False,
  )
  apply = jax.jit(module.apply)
  hits, chance, top_iou, images = [], [], [], 0
  for batch in ds.as_numpy_iterator():
    n = batch[F.IMAGES].shape[0]
    images += n
    if n < batch_size:  # pad the last batch so that one compiled shape serves all
      batch = {
          k: np.concatenate(
              [
                  v,
                  np.repeat(
                      v[-1:] if k != F.BOX_MASK else np.zeros_like(v[-1:]), batch_size - n, axis=0
                  ),
              ]
          )
          for k, v in batch.items()
      }
    batch = add_label_queries(batch, max_labels)
    out = jax.device_get(apply(variables, batch[F.IMAGES], batch[F.TEXT_QUERIES]))
    logits, pred_xyxy = out['pred_logits'], np.asarray(box_lib.cxcywh_to_xyxy(out['pred_boxes']))
    for i, j in zip(*np.nonzero(batch[F.BOX_MASK][:n])):
      iou = np.asarray(box_lib.pairwise_iou_xyxy(pred_xyxy[i], batch[F.BOXES][i, j][None]))[:, 0]
      top = int(np.argmax(logits[i, :, batch[F.LABEL_IDS][i, j]]))
      hits.append(iou[top] >= iou_threshold)
      chance.append(np.mean(iou >= iou_threshold))
      top_iou.append(iou[top])
  mean = lambda x: float(np.mean(x)) if x else float('nan')
  return {
      'accuracy': mean(hits),
      'chance': mean(chance),
      'mean_top_iou': mean(top_iou),
      'num_objects': float(len(hits)),
      'num_images': float(images),
  }
