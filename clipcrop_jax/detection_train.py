r"""Fine-tuning (or training from scratch) the OWL-ViT detector on your own labelled boxes.

  python -m clipcrop_jax.build_dataset datasets/synthetic --config tiny --data_dir /tmp/data
  python -m clipcrop_jax.detection_train --config=configs/owlvit_detection_tiny.py \
      --workdir=/tmp/det --config.dataset.data_dir=/tmp/data

Data: any prepared TFDS dataset (`train_lib.dataset_builder`) whose examples have
  image                  Image (H, W, 3) uint8 (encoded or decoded);
  objects/bbox           Sequence of BBoxFeature: (N, 4) (ymin, xmin, ymax, xmax) normalised to
                         the image (the TFDS convention);
  objects/<label_key>    Sequence of Text (e.g. 'red square') or ClassLabel (its names are used);
                         `dataset.label_key`, default 'name'.
Each image is padded to a square (bottom/right, gray) and resized to the model's input size; the
boxes become xyxy normalised to that padded square. At most `dataset.max_objects` objects per
image are kept. Per batch, the distinct labels (sorted, at most `dataset.max_labels`; objects of
labels beyond that are dropped with a warning) are tokenized into the text queries, the same list
for every image of the batch, so the other labels of the batch are negatives for every image.

Loss (DETR / Scenic OWL-ViT style, `detection_loss`): Hungarian matching of the P image tokens to
the objects with cost = cost_class * focal class cost + cost_l1 * L1(cxcywh) - cost_giou * GIoU;
then a sigmoid focal loss over all (token, real query) logits with target 1 only for a matched
token and its object's label, plus L1 and 1 - GIoU on the matched pairs; every term is summed
and divided by the number of real objects in the global batch.

Outputs in the workdir: config.json, metrics.jsonl (+ TensorBoard), Orbax checkpoints (resumed
automatically from the newest step that restores; unusable newer steps are moved to
checkpoints_unusable/, as in `train_lib.restore_latest`), and at the end
`owlvit_checkpoint.msgpack`, a Scenic checkpoint that `clipcrop_jax.owlvit.load_checkpoint` reads.
The config is checked first (`default_config.validate_config(config, workdir, task='detection')`);
the command line prints a bad flag or config as one `error:` line (exit code 2) and a
`train_lib.RunError` as one line (exit code 1).

Config fields (`get_default_config`):
  seed, dtype ('float32' | 'bfloat16')
  model.owlvit          architecture name (`owlvit.configs`, e.g. 'clip_b32', 'tiny').
  init_from.owlvit      Scenic msgpack / HF checkpoint to fine-tune from; '' = random init.
  dataset.*             name, data_dir, train_split, label_key, max_objects, max_labels, flip
                        (random horizontal flip), shuffle_buffer, label_templates (format
                        strings such as 'a {}', one drawn per label and batch; () = the label).
  batch_size, num_epochs / num_train_steps (> 0 wins)
  optimizer.*           `clipcrop_jax.optim` (AdamW, cosine, warmup, clipping, lr_multipliers
                        with paths like 'backbone/clip/text/.*').
  loss.*                focal_alpha, focal_gamma; cost_class / cost_l1 / cost_giou (matching);
                        weight_class / weight_l1 / weight_giou (loss).
  sharding.*, checkpoint.* (every_steps, keep, data_resume), log_every_steps  (as train_lib)
  eval.*                split ('' = none), batch_size, every_steps (-1 = only at the end),
                        max_examples (-1 = all): `evaluate_grounding`, logged as kind 'eval'.
"""

from __future__ import annotations

import functools
import json
import pathlib
import sys
from typing import Any, Iterator, Optional, Sequence
import warnings

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from clipcrop_jax import boxes as box_lib
from clipcrop_jax import default_config
from clipcrop_jax import fileio
from clipcrop_jax import matching
from clipcrop_jax import optim
from clipcrop_jax import sharding as sharding_lib
from clipcrop_jax import train_lib
from clipcrop_jax.owlvit import configs as owl_configs
from clipcrop_jax.owlvit import model as owl_model
from clipcrop_jax.owlvit import tokenizer as owl_tokenizer

TrainState = train_lib.TrainState
TRAIN_KEYS = ('image', 'boxes', 'box_mask', 'label_ids', 'text_queries')
EXPORT_FILE = 'owlvit_checkpoint.msgpack'
EVAL_FILE = 'eval_grounding.json'
LOSS_TERMS = ('loss_class', 'loss_l1', 'loss_giou')


def get_default_config() -> ml_collections.ConfigDict:
  """Fine-tuning OWL-ViT B/32 on a detection dataset (edit name / init_from for your data)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.dtype = 'float32'
  c.model = ml_collections.ConfigDict(dict(owlvit='clip_b32'))
  c.init_from = ml_collections.ConfigDict(dict(owlvit=''))
  c.dataset = ml_collections.ConfigDict(dict(
      name='synthetic_crops/default', data_dir='', train_split='train', label_key='name',
      max_objects=16, max_labels=16, flip=True, shuffle_buffer=1000, label_templates=()))
  c.batch_size = 16
  c.num_epochs = 10
  c.num_train_steps = -1
  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=2e-5, end_learning_rate=0.0, warmup_steps=0, weight_decay=1e-4,
      b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=1.0, lr_multipliers=()))
  c.loss = ml_collections.ConfigDict(dict(
      focal_alpha=0.25, focal_gamma=2.0, cost_class=2.0, cost_l1=5.0, cost_giou=2.0,
      weight_class=2.0, weight_l1=5.0, weight_giou=2.0))
  c.sharding = ml_collections.ConfigDict(dict(mesh_shape=(-1, 1), rules=(('.*', 'replicate'),)))
  c.distributed = ml_collections.ConfigDict(dict(
      initialize=False, coordinator_address='', num_processes=-1, process_id=-1))
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=3, data_resume='replay'))
  c.log_every_steps = 50
  c.eval = ml_collections.ConfigDict(dict(split='validation', batch_size=16, every_steps=-1,
                                          max_examples=-1))
  return c


# ------------------------------------------------------------------------------------------------
# Input pipeline.
# ------------------------------------------------------------------------------------------------


def _label_names(builder, label_key: str) -> Optional[list[str]]:
  """Class names when objects/<label_key> is a ClassLabel, None for Text; KeyError if absent."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  features = builder.info.features
  if 'objects' not in features:
    raise KeyError(f'{builder.info.full_name}: no `objects` feature (need objects/bbox and '
                   f'objects/{label_key})')
  objects = features['objects'].feature
  for key in ('bbox', label_key):
    if key not in objects:
      raise KeyError(f'{builder.info.full_name}: no `objects/{key}` feature; has '
                     f'{sorted(objects.keys())} (set dataset.label_key)')
  feature = objects[label_key]
  return list(feature.names) if isinstance(feature, tfds.features.ClassLabel) else None


def preprocess_example(example: dict[str, Any], *, image_size: int, max_objects: int,
                       label_key: str = 'name', names: Optional[Sequence[str]] = None,
                       flip_seed: Any = None) -> dict[str, Any]:
  """One TFDS example -> image (S, S, 3) float32 [0, 1], boxes (N, 4) xyxy in the padded square,
  box_mask (N,) bool, labels (N,) string; N = max_objects (the first ones are kept).

  `flip_seed`: a stateless (2,) seed for a random horizontal flip (None = no flip).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from clipcrop_jax import input_pipeline as ip  # pylint: disable=g-import-not-at-top
  image = tf.image.convert_image_dtype(ip.decode_image(example['image']), tf.float32)
  objects = example['objects']
  boxes = ip.yxyx_to_xyxy(tf.reshape(tf.cast(objects['bbox'], tf.float32), (-1, 4)))
  labels = tf.reshape(objects[label_key], (-1,))
  if names is not None:
    labels = tf.gather(tf.constant(list(names)), tf.cast(labels, tf.int32))
  if flip_seed is not None:
    image, boxes = ip.random_flip(image, boxes, flip_seed)
  image, extent = ip.pad_to_square_and_resize(image, image_size)
  boxes = boxes * tf.concat([extent, extent], axis=0)[None, :]
  n = tf.minimum(tf.shape(boxes)[0], max_objects)
  pad = max_objects - n
  boxes = tf.pad(boxes[:n], [[0, pad], [0, 0]])
  labels = tf.pad(labels[:n], [[0, pad]], constant_values='')
  mask = tf.range(max_objects) < n
  return {'image': tf.ensure_shape(image, (image_size, image_size, 3)),
          'boxes': tf.ensure_shape(boxes, (max_objects, 4)),
          'box_mask': mask, 'labels': tf.ensure_shape(labels, (max_objects,))}


def make_dataset(builder, split: Any, *, image_size: int, batch_size: int, max_objects: int,
                 label_key: str = 'name', flip: bool = False, seed: int = 0,
                 shuffle_buffer: int = 0, repeat: bool = False, drop_remainder: bool = True,
                 skip_batches: int = 0):
  """tf.data batches of `preprocess_example` outputs (host-local, no queries yet)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  names = _label_names(builder, label_key)
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={'image': tfds.decode.SkipDecoding()})
  ds = ds.map(lambda ex: {'image': ex['image'], 'objects': ex['objects']})
  if repeat:
    ds = ds.repeat()
  if shuffle_buffer > 0:
    ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
  ds = ds.enumerate()

  def prep(index, ex):
    flip_seed = tf.stack([tf.cast(seed, tf.int64), index]) if flip else None
    return preprocess_example(ex, image_size=image_size, max_objects=max_objects,
                              label_key=label_key, names=names, flip_seed=flip_seed)

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


def add_label_queries(batch: dict[str, np.ndarray], max_labels: int,
                      max_query_length: int = owl_configs.MAX_QUERY_LENGTH,
                      templates: Sequence[str] = (),
                      rng: Optional[np.random.Generator] = None) -> dict[str, Any]:
  """Host numpy: the batch's distinct labels as shared text queries.

  With `templates` (format strings such as 'a {}', 'the big {}'), each distinct label's query is
  one of them drawn with `rng` (a training augmentation: the detector learns to ground the
  name inside longer phrases, as ClipCrop's captions are); without, the query is the label.

  Adds text_queries int32 (B, max_labels, L) (all-zero rows = padding, masked by the model),
  label_ids int32 (B, N) (index of each object's label in the query list; 0 for padding) and
  query_texts (the label strings, a list). Objects whose label is past `max_labels` (sorted
  order) are dropped from box_mask with a warning.
  """
  labels = np.vectorize(_as_str, otypes=[object])(batch['labels'])
  mask = np.asarray(batch['box_mask'], bool).copy()
  distinct = sorted({l for l, m in zip(labels.ravel(), mask.ravel()) if m and l.strip()})
  if len(distinct) > max_labels:
    warnings.warn(f'{len(distinct)} distinct labels in a batch > max_labels={max_labels}; the '
                  'objects of the last ones are ignored (raise dataset.max_labels)')
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
  out.update(box_mask=mask, label_ids=label_ids, query_texts=distinct,
             text_queries=np.broadcast_to(queries, (b,) + queries.shape).copy())
  return out


def make_train_iterator(config: ml_collections.ConfigDict, builder, mesh,
                        start_step: int = 0) -> Iterator[dict[str, jax.Array]]:
  """Global training batches (`TRAIN_KEYS`, sharded on 'data') after `start_step` batches."""
  from clipcrop_jax import input_pipeline as ip  # pylint: disable=g-import-not-at-top
  d = config.dataset
  per_process = config.batch_size // jax.process_count()
  if per_process * jax.process_count() != config.batch_size:
    raise ValueError(f'batch_size={config.batch_size} is not divisible by the '
                     f'{jax.process_count()} processes')
  seed, skip = int(config.seed), 0
  if start_step:
    if config.checkpoint.data_resume == 'replay':
      skip = start_step
    elif config.checkpoint.data_resume == 'reseed':
      seed = int(jax.random.randint(jax.random.fold_in(jax.random.PRNGKey(seed), start_step),
                                    (), 0, 2**30))
    else:
      raise ValueError(f"checkpoint.data_resume={config.checkpoint.data_resume!r}; expected "
                       "'replay' or 'reseed'")
  ds = make_dataset(builder, ip.split_for_process(d.train_split),
                    image_size=owlvit_config(config).image_size, batch_size=per_process,
                    max_objects=d.max_objects, label_key=d.label_key, flip=d.flip, seed=seed,
                    shuffle_buffer=d.shuffle_buffer, repeat=True, skip_batches=skip)
  sharding = sharding_lib.batch_sharding(mesh)
  templates = tuple(d.get('label_templates', ()))
  for step, batch in enumerate(ds.as_numpy_iterator(), start=skip):
    rng = np.random.default_rng([seed, jax.process_index(), step])
    batch = add_label_queries(batch, d.max_labels, templates=templates, rng=rng)
    yield {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k]))
           for k in TRAIN_KEYS}


# ------------------------------------------------------------------------------------------------
# Matching and loss (jit-able).
# ------------------------------------------------------------------------------------------------


def _target_logits(pred_logits: jax.Array, target_labels: jax.Array) -> jax.Array:
  """(B, P, Q) logits, (B, N) label ids -> (B, P, N): each token's logit for each object's label."""
  idx = jnp.broadcast_to(target_labels[:, None, :], pred_logits.shape[:2] + target_labels.shape[1:])
  return jnp.take_along_axis(pred_logits, idx.astype(jnp.int32), axis=2)


def focal_class_cost(logits: jax.Array, alpha: float = 0.25, gamma: float = 2.0) -> jax.Array:
  """DETR / Scenic focal matching cost of a logit for the positive class (lower = better):
  alpha (1-p)^g (-log p) - (1-alpha) p^g (-log(1-p)), p = sigmoid(logit)."""
  p = jax.nn.sigmoid(logits)
  pos = alpha * (1 - p)**gamma * -jax.nn.log_sigmoid(logits)
  neg = (1 - alpha) * p**gamma * -jax.nn.log_sigmoid(-logits)
  return pos - neg


def detection_match_cost(pred_logits: jax.Array, pred_boxes_cxcywh: jax.Array,
                         target_boxes_xyxy: jax.Array, target_labels: jax.Array,
                         target_mask: jax.Array, *, focal_alpha: float = 0.25,
                         focal_gamma: float = 2.0, cost_class: float = 2.0,
                         cost_l1: float = 5.0, cost_giou: float = 2.0) -> jax.Array:
  """(B, P, N) cost: cost_class * focal cost + cost_l1 * L1(cxcywh) - cost_giou * GIoU."""
  pred_xyxy = box_lib.cxcywh_to_xyxy(pred_boxes_cxcywh)
  box_cost = matching.match_cost(
      pred_xyxy, jnp.zeros(pred_xyxy.shape[:2], jnp.float32), target_boxes_xyxy, target_mask,
      l1_weight=cost_l1, giou_weight=cost_giou, quality_weight=0.0)
  class_cost = focal_class_cost(_target_logits(pred_logits, target_labels).astype(jnp.float32),
                                focal_alpha, focal_gamma)
  cost = jnp.where(jnp.asarray(target_mask, bool)[:, None, :], box_cost + cost_class * class_cost,
                   box_cost)
  return jnp.nan_to_num(cost, nan=matching.COST_UPPER_BOUND, posinf=matching.COST_UPPER_BOUND,
                        neginf=-matching.COST_UPPER_BOUND)


def detection_match(pred_logits, pred_boxes_cxcywh, target_boxes_xyxy, target_labels,
                    target_mask, **cost_kw):
  """Hungarian matching -> (pred_idx, target_idx, valid), each (B, min(P, N))."""
  cost = detection_match_cost(pred_logits, pred_boxes_cxcywh, target_boxes_xyxy, target_labels,
                              target_mask, **cost_kw)
  return matching.hungarian_matching(cost, target_mask)


def detection_loss(pred_logits: jax.Array, pred_boxes_cxcywh: jax.Array, query_mask: jax.Array,
                   target_boxes_xyxy: jax.Array, target_labels: jax.Array,
                   target_mask: jax.Array, *, focal_alpha: float = 0.25,
                   focal_gamma: float = 2.0, cost_class: float = 2.0, cost_l1: float = 5.0,
                   cost_giou: float = 2.0, weight_class: float = 2.0, weight_l1: float = 5.0,
                   weight_giou: float = 2.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Set-prediction detection loss.

  Args:
    pred_logits: (B, P, Q) token x query logits (`pred_logits` of the model).
    pred_boxes_cxcywh: (B, P, 4) predicted boxes, cxcywh in [0, 1].
    query_mask: (B, Q) bool, True for real queries (padded ones add no loss).
    target_boxes_xyxy: (B, N, 4) object boxes, xyxy in [0, 1].
    target_labels: (B, N) int, each object's query index.
    target_mask: (B, N) bool, True for real objects.
    focal_alpha, focal_gamma, cost_*: matching / focal parameters; weight_*: loss weights.

  Returns:
    (loss, terms) with terms loss_class, loss_l1, loss_giou (unweighted, each summed and divided
    by the number of real objects in the whole batch, at least 1), loss and num_objects.
  """
  target_mask = jnp.asarray(target_mask, bool)
  query_mask = jnp.asarray(query_mask, bool)
  b, p, q = pred_logits.shape
  pred_idx, target_idx, valid = detection_match(
      pred_logits, pred_boxes_cxcywh, target_boxes_xyxy, target_labels, target_mask,
      focal_alpha=focal_alpha, focal_gamma=focal_gamma, cost_class=cost_class,
      cost_l1=cost_l1, cost_giou=cost_giou)
  num_objects = jnp.sum(target_mask.astype(jnp.float32))
  norm = jnp.maximum(num_objects, 1.0)

  # Class targets: 1 at (matched token, its object's label), 0 elsewhere.
  matched_labels = matching.gather_matched(target_labels, target_idx)  # (B, K)
  pair_token = jax.nn.one_hot(pred_idx, p) * valid[..., None]  # (B, K, P)
  pair_label = jax.nn.one_hot(matched_labels, q)  # (B, K, Q)
  targets = jnp.minimum(jnp.einsum('bkp,bkq->bpq', pair_token, pair_label), 1.0)
  focal = optax.sigmoid_focal_loss(pred_logits.astype(jnp.float32), targets, alpha=focal_alpha,
                                   gamma=focal_gamma)
  loss_class = jnp.sum(jnp.where(query_mask[:, None, :], focal, 0.0)) / norm

  # Box terms on the matched pairs.
  pred_m = matching.gather_matched(pred_boxes_cxcywh.astype(jnp.float32), pred_idx)  # (B, K, 4)
  tgt_m = matching.gather_matched(target_boxes_xyxy.astype(jnp.float32), target_idx)
  l1 = jnp.sum(jnp.abs(pred_m - box_lib.xyxy_to_cxcywh(tgt_m)), axis=-1)
  giou = box_lib.elementwise_giou_xyxy(box_lib.cxcywh_to_xyxy(pred_m), tgt_m)
  loss_l1 = jnp.sum(jnp.where(valid, l1, 0.0)) / norm
  loss_giou = jnp.sum(jnp.where(valid, 1.0 - giou, 0.0)) / norm

  loss = weight_class * loss_class + weight_l1 * loss_l1 + weight_giou * loss_giou
  return loss, {'loss': loss, 'loss_class': loss_class, 'loss_l1': loss_l1,
                'loss_giou': loss_giou, 'num_objects': num_objects}


# ------------------------------------------------------------------------------------------------
# Model, state, train step.
# ------------------------------------------------------------------------------------------------


def owlvit_config(config: ml_collections.ConfigDict) -> owl_configs.OwlViTConfig:
  return owl_configs.get_config(config.model.owlvit)


def build_module(config: ml_collections.ConfigDict) -> owl_model.TextZeroShotDetectionModule:
  return owl_model.TextZeroShotDetectionModule(owlvit_config(config),
                                               dtype=train_lib.compute_dtype(config))


def loss_kwargs(config: ml_collections.ConfigDict) -> dict[str, float]:
  return {k: float(v) for k, v in config.loss.to_dict().items()}


def _dummy_inputs(module) -> tuple[jax.Array, jax.Array]:
  c = module.config
  images = jnp.zeros((1, c.image_size, c.image_size, 3), jnp.float32)
  text = jnp.zeros((1, 1, c.max_query_length), jnp.int32).at[..., 0].set(1)
  return images, text


def make_init_fn(module, optimizer: optax.GradientTransformation):
  """rng -> a fresh TrainState with random parameters (jit it with out_shardings)."""
  def init(rng):
    params_rng, state_rng = jax.random.split(rng)
    params = module.init(params_rng, *_dummy_inputs(module))['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params), rng=state_rng)
  return init


def setup_state(config: ml_collections.ConfigDict, module, mesh, total_steps: int):
  """(abstract_state, shardings, jitted init, optimizer, schedule)."""
  abstract_params = jax.eval_shape(
      lambda r: module.init(r, *_dummy_inputs(module))['params'], jax.random.PRNGKey(0))
  optimizer, schedule = optim.make_optimizer(train_lib.optimizer_config(config, total_steps),
                                             abstract_params)
  init = make_init_fn(module, optimizer)
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  shardings = sharding_lib.tree_shardings(abstract, mesh, config.sharding.rules)
  abstract = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return abstract, shardings, jax.jit(init, out_shardings=shardings), optimizer, schedule


def load_owlvit_into(state: TrainState, shardings: TrainState, config: ml_collections.ConfigDict
                     ) -> TrainState:
  """`init_from.owlvit` weights (checked against `model.owlvit`) into a fresh state."""
  if not config.init_from.owlvit:
    return state
  from clipcrop_jax.owlvit import checkpoints as owl_ckpt  # pylint: disable=g-import-not-at-top
  _, variables = owl_ckpt.load_checkpoint(config.init_from.owlvit, owlvit_config(config))
  params = jax.tree_util.tree_map(lambda s, x: jax.device_put(np.asarray(x), s),
                                  shardings.params, variables['params'])
  logging.info('Initialised the detector from %s', config.init_from.owlvit)
  # Adam moments of zeros fit any params; only the params change.
  return state.replace(params=params)


def loss_fn(params, batch: dict[str, jax.Array], *, module, loss_kw: dict[str, float]):
  out = module.apply({'params': params}, batch['image'], batch['text_queries'])
  return detection_loss(out['pred_logits'], out['pred_boxes'], batch['text_queries'][..., 0] > 0,
                        batch['boxes'], batch['label_ids'], batch['box_mask'], **loss_kw)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, module,
               optimizer: optax.GradientTransformation, schedule: optax.Schedule,
               loss_kw: dict[str, float]) -> tuple[TrainState, dict[str, jax.Array]]:
  """One AdamW update on a global batch; returns (new state, scalar metrics)."""
  grad_fn = jax.value_and_grad(functools.partial(loss_fn, module=module, loss_kw=loss_kw),
                               has_aux=True)
  (_, terms), grads = grad_fn(state.params, batch)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(terms, learning_rate=schedule(state.step), grad_norm=optax.tree_utils.tree_norm(grads))
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


# ------------------------------------------------------------------------------------------------
# Evaluation: grounding accuracy.
# ------------------------------------------------------------------------------------------------


def evaluate_grounding(module, variables: Any, builder, split: str, *, batch_size: int = 8,
                       max_objects: int = 16, max_labels: int = 16, label_key: str = 'name',
                       max_examples: int = -1, iou_threshold: float = 0.5) -> dict[str, float]:
  """Grounding accuracy of `module` on `split` (this process, whole split; no sharding).

  For every object, its label is the query (among the distinct labels of its batch) and the hit
  is: the top-scoring token's box has IoU >= `iou_threshold` with that object's box (another
  object with the same label does not count). `chance` is the expected accuracy of a uniformly
  random token (the fraction of tokens whose box hits), averaged over objects.

  Returns:
    {'accuracy', 'chance', 'mean_top_iou', 'num_objects', 'num_images'}.
  """
  split_arg = split if max_examples is None or max_examples < 0 else f'{split}[:{max_examples}]'
  ds = make_dataset(builder, split_arg, image_size=module.config.image_size,
                    batch_size=batch_size, max_objects=max_objects, label_key=label_key,
                    drop_remainder=False)
  apply = jax.jit(module.apply)
  hits, chance, top_iou, images = [], [], [], 0
  for batch in ds.as_numpy_iterator():
    n = batch['image'].shape[0]
    images += n
    if n < batch_size:  # pad the last batch so that one compiled shape serves all
      batch = {k: np.concatenate([v, np.repeat(v[-1:] if k != 'box_mask' else
                                               np.zeros_like(v[-1:]), batch_size - n, axis=0)])
               for k, v in batch.items()}
    batch = add_label_queries(batch, max_labels)
    out = jax.device_get(apply(variables, batch['image'], batch['text_queries']))
    logits, pred_xyxy = out['pred_logits'], np.asarray(box_lib.cxcywh_to_xyxy(out['pred_boxes']))
    for i, j in zip(*np.nonzero(batch['box_mask'][:n])):
      iou = np.asarray(box_lib.pairwise_iou_xyxy(pred_xyxy[i], batch['boxes'][i, j][None]))[:, 0]
      top = int(np.argmax(logits[i, :, batch['label_ids'][i, j]]))
      hits.append(iou[top] >= iou_threshold)
      chance.append(np.mean(iou >= iou_threshold))
      top_iou.append(iou[top])
  mean = lambda x: float(np.mean(x)) if x else float('nan')
  return {'accuracy': mean(hits), 'chance': mean(chance), 'mean_top_iou': mean(top_iou),
          'num_objects': float(len(hits)), 'num_images': float(images)}


def _evaluate(config: ml_collections.ConfigDict, module, params: Any, builder
              ) -> dict[str, float]:
  d = config.dataset
  return evaluate_grounding(module, {'params': params}, builder, config.eval.split,
                            batch_size=config.eval.batch_size, max_objects=d.max_objects,
                            max_labels=d.max_labels, label_key=d.label_key,
                            max_examples=config.eval.max_examples)


# ------------------------------------------------------------------------------------------------
# Training loop.
# ------------------------------------------------------------------------------------------------


def _host_params(state: TrainState) -> Any:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(state.params, tiled=True)
  return jax.device_get(state.params)


def train_detection(config: ml_collections.ConfigDict, workdir: str,
                    max_steps_this_run: Optional[int] = None) -> TrainState:
  """Trains the detector (resuming from `<workdir>/checkpoints`); returns the final state.

  At the end (all steps done) writes `<workdir>/owlvit_checkpoint.msgpack` (Scenic layout) and,
  with `eval.split` set, `<workdir>/eval_grounding.json`. Stops with
  `train_lib.NonFiniteLossError` on a NaN / Inf loss (that step is never checkpointed).
  """
  from clipcrop_jax.owlvit import checkpoints as owl_ckpt  # pylint: disable=g-import-not-at-top
  default_config.validate_config(config, workdir, task='detection')
  train_lib.write_config(config, workdir)
  mesh = sharding_lib.make_mesh(config.sharding.mesh_shape)
  builder = train_lib.dataset_builder(config.dataset.name, config.dataset.data_dir)
  _label_names(builder, config.dataset.label_key)  # fail early on missing features
  total = train_lib.num_train_steps(
      config, builder.info.splits[config.dataset.train_split].num_examples)
  module = build_module(config)
  abstract, shardings, init, optimizer, schedule = setup_state(config, module, mesh, total)
  logging.info('Mesh %s; %s', dict(mesh.shape),
               optim.describe(abstract.params, config.optimizer.lr_multipliers))

  state, last_good = train_lib.restore_latest(workdir, abstract, set_aside=True)
  if state is not None:
    logging.info('Resumed from %s at step %d', pathlib.Path(workdir) / train_lib.CHECKPOINT_DIR,
                 last_good)
  else:
    state = load_owlvit_into(init(jax.random.PRNGKey(config.seed)), shardings, config)
  manager = train_lib.checkpoint_manager(workdir, config)
  start = int(jax.device_get(state.step))
  end = total if max_steps_this_run is None else min(total, start + max_steps_this_run)

  step_fn = jax.jit(
      functools.partial(train_step, module=module, optimizer=optimizer, schedule=schedule,
                        loss_kw=loss_kwargs(config)),
      in_shardings=(shardings, sharding_lib.batch_sharding(mesh)),
      out_shardings=(shardings, sharding_lib.replicated(mesh)), donate_argnums=0)
  logger = train_lib.MetricLogger(workdir, resume_step=start)
  eval_every = config.eval.every_steps if config.eval.split else -1

  def on_step(state, step):
    if eval_every > 0 and step % eval_every == 0 and step != total:
      params = _host_params(state)
      if jax.process_index() == 0:
        logger.write(step, _evaluate(config, module, params, builder), kind='eval')

  try:
    batches = make_train_iterator(config, builder, mesh, start) if start < end else iter(())
    state = train_lib.run_steps(
        step_fn, state, batches, config=config, workdir=workdir, manager=manager, logger=logger,
        start=start, end=end, total=total, last_good=last_good, desc='detection',
        log_terms=('loss_class', 'loss_l1', 'loss_giou'), on_step=on_step)
  finally:
    manager.close()
    if int(jax.device_get(state.step)) < total:
      logger.close()

  if int(jax.device_get(state.step)) >= total:
    params = _host_params(state)
    if jax.process_index() == 0:
      path = owl_ckpt.save_scenic_checkpoint({'params': params},
                                             pathlib.Path(workdir) / EXPORT_FILE)
      logging.info('Wrote the detector checkpoint %s (clipcrop_jax.owlvit.load_checkpoint)',
                   path)
      if config.eval.split:
        results = _evaluate(config, module, params, builder)
        logger.write(total, results, kind='eval', replace=True)  # a re-run evaluates again
        fileio.atomic_write_text(pathlib.Path(workdir) / EVAL_FILE, json.dumps(results, indent=1))
        logging.info('Grounding on %s: accuracy %.3f (chance %.3f) over %d objects',
                     config.eval.split, results['accuracy'], results['chance'],
                     results['num_objects'])
    logger.close()
  return state


def main(argv) -> None:
  """The command line: one `error:` line for a bad config (exit 2) or a `RunError` (exit 1)."""
  if len(argv) > 1:
    default_config.usage_exit(f'unexpected arguments {argv[1:]}')
  config, workdir = default_config.config_or_exit(_CONFIG), _WORKDIR.value
  try:
    default_config.validate_config(config, workdir, task='detection')
  except default_config.ConfigError as e:
    default_config.usage_exit(str(e))
  d = config.distributed
  if d.initialize:  # multi-host, as clipcrop_jax.main
    kwargs = {}
    if d.coordinator_address:
      kwargs = dict(coordinator_address=d.coordinator_address, num_processes=d.num_processes,
                    process_id=d.process_id)
    jax.distributed.initialize(**kwargs)
  try:
    train_detection(config, workdir)
  except train_lib.RunError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
  _WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and the export go here.')
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main, flags_parser=default_config.parse_flags)
