"""The ClipCrop task on the training core (`training.trainer`): data, loss, init, export.

`train(config, workdir)` trains ClipCrop as `trainer.train` describes (validation, sharded
set-up, resume, loop, checkpoints, logs). What is ClipCrop's:
  data     the cropping pipeline (`input_pipeline.make_train_dataset`: pad / resize, mosaic,
           jitter, flip, [text, keywords] queries by `dataset.keyword_pipeline`) over
           `dataset.name`; batches hold `features.TRAIN_KEYS`;
  init     `init_from.clipcrop` (every parameter, from a model directory or a training workdir)
           > `init_from.owlvit` (encoder weights; only the decoder is initialised,
           `model.init_decoder_params`, with the values a full init would give it) > random;
  loss     `losses.decoder_losses` on every decoder layer's crops (Hungarian matching to the
           scored crops), the selection filter's target being the best-scored crop;
  eval     `eval_fn(state, step)` every `eval.every_steps` (`clipcrop_jax.main` passes
           `evaluate.evaluate`);
  export   at the end, the trained model as a model directory `<workdir>/clipcrop`
           (`export.save_model`, with the keyword pipeline used in training).
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any, Callable, Iterator, Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from clipcrop_jax.data import features as F
from clipcrop_jax import default_config
from clipcrop_jax import export
from clipcrop_jax import model as model_lib
from clipcrop_jax.training import losses as losses_lib
from clipcrop_jax.training import matching
from clipcrop_jax.training import trainer

TrainState = trainer.TrainState
EvalFn = Callable[[TrainState, int], None]


def loss_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Keyword arguments of `losses.decoder_losses` from `config.loss`."""
  l = config.loss
  return dict(
      weights={
          'loss_l1': l.weight_l1,
          'loss_giou': l.weight_giou,
          'loss_quality': l.weight_quality,
      },
      aux_loss=l.aux_loss,
      positive_threshold=l.positive_threshold,
      score_min=l.score_min,
      score_max=l.score_max,
      smoothing_iou=l.smoothing_iou,
      l1_weight=l.cost_l1,
      giou_weight=l.cost_giou,
      quality_weight=l.cost_quality,
      quality_loss=l.quality_loss,
      quality_target=l.quality_target,
      quality_pointwise_weight=l.quality_pointwise_weight,
      quality_temperature=l.quality_temperature,
      quality_top_k=l.quality_top_k,
      matching_solver=matching.resolve_solver(l.matching_solver),
  )


def best_crop_xyxy(crops: jax.Array, crop_scores: jax.Array, crop_mask: jax.Array) -> jax.Array:
  """(B, 4) the highest-scored real crop of each example (the target of the selection filter)."""
  best = jnp.argmax(jnp.where(crop_mask, crop_scores, -jnp.inf), axis=-1)
  return jnp.take_along_axis(crops, best[:, None, None], axis=1)[:, 0]


def clipcrop_loss(
    model: model_lib.ClipCrop,
    params: Any,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    loss_kw: dict[str, Any],
    selection_filter: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss, terms) of ClipCrop on a batch of `features.TRAIN_KEYS` (dropout from `rng`).

  `selection_filter` (`loss.selection_filter`): filter the selected boxes against the
  best-scored crop (`model.filter_selected_boxes`, paper §3.3), or use them all as inference does.
  """
  queries = batch[F.TEXT_QUERIES]
  crops, scores, mask = batch[F.CROP_BOXES], batch[F.CROP_SCORES], batch[F.CROP_MASK]
  out = model.apply(
      {'params': params},
      batch[F.IMAGES],
      text_queries=queries,
      target_xyxy=best_crop_xyxy(crops, scores, mask) if selection_filter else None,
      image_extent=batch[F.IMAGE_EXTENT],
      train=True,
      query_mask=model_lib.query_mask_for_mode(queries, model.config.mode),
      query_roles=batch.get(F.QUERY_ROLES),
      rngs={'dropout': rng},
  )
  return losses_lib.decoder_losses(
      out['aux_boxes'], out['aux_quality_logits'], crops, scores, mask, **loss_kw
  )


class ClipCropTask(trainer.Task):
  """ClipCrop on a cropping dataset (see the module docstring).

  Attributes:
    model: the `model.ClipCrop` module (`default_config.build_model`).
    eval_fn: called as eval_fn(state, step) every `eval.every_steps` (> 0) before the end.
  """

  name = 'clipcrop'

  def __init__(self, config: ml_collections.ConfigDict, eval_fn: Optional[EvalFn] = None):
    super().__init__(config)
    self.eval_fn = eval_fn

  @functools.cached_property
  def model(self) -> model_lib.ClipCrop:  # built on first use: after `validate_config`
    return default_config.build_model(self.config)

  def init_params(self, rng: jax.Array, pretrained: dict[str, Any]) -> Any:
    if {'owlvit', 'decoder'} <= set(pretrained):
      return pretrained
    if 'owlvit' in pretrained:  # the decoder alone: no random OWL-ViT init
      return {
          'owlvit': pretrained['owlvit'],
          'decoder': model_lib.init_decoder_params(self.model, rng),
      }
    return model_lib.init_params(self.model, rng)

  def pretrained_params(self, abstract_params: Any) -> dict[str, Any]:
    init_from = self.config.init_from
    if init_from.clipcrop:
      loaded = export.load_model(init_from.clipcrop).params
      model_lib.check_param_shapes(abstract_params, loaded, init_from.clipcrop)
      logging.info('Initialising all parameters from %s', init_from.clipcrop)
      return {k: loaded[k] for k in abstract_params}
    if init_from.owlvit:
      from clipcrop_jax.owlvit import checkpoints as owl_ckpt  # pylint: disable=g-import-not-at-top

      _, owl_vars = owl_ckpt.load_checkpoint(init_from.owlvit)
      owl = owl_vars.get('params', owl_vars)
      model_lib.check_param_shapes(
          abstract_params['owlvit'], owl, f'OWL-ViT weights {init_from.owlvit}'
      )
      logging.info('Initialising the OWL-ViT encoder from %s', init_from.owlvit)
      return {'owlvit': jax.tree_util.tree_map(lambda ref, x: x, abstract_params['owlvit'], owl)}
    return {}

  def train_batches(self, builder, mesh, start_step: int) -> Iterator[dict[str, jax.Array]]:
    return make_train_iterator(self.config, builder, mesh, start_step)

  def loss_fn(self, params, batch, rng):
    return clipcrop_loss(
        self.model, params, batch, rng, loss_kwargs(self.config), self.config.loss.selection_filter
    )

  @property
  def eval_every_steps(self) -> int:
    return self.config.eval.every_steps if self.eval_fn is not None else -1

  def evaluate(self, state, step, builder, logger) -> None:
    self.eval_fn(state, step)

  def finish(self, state, workdir, builder, logger) -> None:
    path = export_model(state, self.model.config, workdir, self.config.dataset.keyword_pipeline)
    if path is not None:
      logging.info(
          'Exported the trained model to %s (python -m clipcrop_jax.crop --checkpoint ' '%s ...)',
          path,
          path,
      )


def make_train_iterator(
    config: ml_collections.ConfigDict, builder, mesh, start_step: int = 0
) -> Iterator[dict[str, jax.Array]]:
  """Global training batches (`features.TRAIN_KEYS`) for this process after `start_step`
  batches (`trainer.data_position`: replay or reseed)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.data import input_pipeline as ip  # pylint: disable=g-import-not-at-top
  from clipcrop_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top

  d = config.dataset
  per_process = sharding_lib.process_batch_size(config.batch_size)
  seed, skip = trainer.data_position(config, start_step)
  ds = builder.as_dataset(
      split=ip.split_for_process(d.train_split),
      shuffle_files=False,
      decoders={F.IMAGE: tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(shuffle_seed=seed),
  )
  ds = ds.map(ip.input_features)
  ds = ip.make_train_dataset(
      ds,
      image_size=default_config.clipcrop_config(config).owlvit_config.image_size,
      batch_size=per_process,
      max_crops=d.max_crops,
      seed=seed,
      mosaic_probs=tuple(d.mosaic_probs),
      shuffle_buffer=d.shuffle_buffer,
      jitter=d.jitter,
      flip=d.flip,
      max_queries=d.max_queries,
      keyword_pipeline=d.keyword_pipeline,
      prefetch=0,
  )
  ds = ds.map(lambda b: {k: b[k] for k in F.TRAIN_KEYS})
  if skip:
    ds = ds.skip(skip)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  return ip.to_global_batches(ds, mesh)


def export_model(
    state: TrainState, config: model_lib.ClipCropConfig, workdir: str, keyword_pipeline: str
) -> Optional[pathlib.Path]:
  """Saves the trained parameters as the model directory `<workdir>/clipcrop` (process 0)."""
  params = trainer.host_params(state)
  if jax.process_index() != 0:
    return None
  return export.save_model(
      pathlib.Path(workdir) / export.EXPORT_DIR, config, params, keyword_pipeline
  )


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    eval_fn: Optional[EvalFn] = None,
    max_steps_this_run: Optional[int] = None,
) -> TrainState:
  """Trains ClipCrop in `workdir` (resuming from its checkpoints); returns the final state.

  See `trainer.train` for the steps, `max_steps_this_run` and the errors raised.
  """
  return trainer.train(ClipCropTask(config, eval_fn), workdir, max_steps_this_run)


def final_state(
    config: ml_collections.ConfigDict, workdir: str
) -> tuple[TrainState, jax.sharding.Mesh]:
  """(state of the newest usable checkpoint in workdir, mesh) for evaluation-only runs."""
  return trainer.restore_for_eval(ClipCropTask(config), workdir)
