"""Evaluation loop: ClipCrop and the baselines on text-conditioned sets and on GAIC.

Methods, all scored by the same code (`clipcrop_jax.metrics`) on the same batches:
  clipcrop        the trained model (its config's mode); crops ranked by predicted quality; with
                  `model.fuse_top_k` > 1 the mean of the k best (box voting) is ranked first.
  clipcrop_base   a trained ClipCrop-base (`eval.base_workdir`: a workdir or ClipCropper dir),
                  ranked the same way with its own `fuse_top_k`.
  full_image      the whole image.
  centre_crop     a box centred in the image whose size (as a fraction of the image's width and
                  height) is the dataset's mean reference-crop size: all reference crops of a
                  text-conditioned set, the best-scored crop of each GAIC image.
  owlvit_top_box  the box of the token the full text selects (OWL-ViT's top detection); the
                  whole image when the text is empty.
  union_box       the union of the boxes selected by the full text and its keywords (Eq. 3).
  zero_shot       GAIC-grid crops around the union box ranked by the composition score
                  (`zero_shot.crops_from_detections`, no trained decoder).
The baselines that read the text use OWL-ViT of the evaluated model (its encoder weights).

Dataset kinds: 'text' (Horanyi-PR, TextCrop, the synthetic `ambiguity` split): one (image, text)
example with reference crops; the top-1 crop gives IoU-Mean / IoU-Max. 'gaic' (GAIC and the other
synthetic splits): scored candidates; each method's ranked crops are mapped to candidates and give
Acc_K/N, wAcc_K/N and the (non-standard) SRCC / PCC. Boxes are compared in the padded-square
coordinates of the model (IoU does not change under the uniform scale back to pixels).

Results go to `<workdir>/eval_<dataset>.json` (dataset name with '/' -> '_', plus `_<split>`
unless the split is 'test') and to the log as a Markdown table.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Optional, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np

from clipcrop_jax import boxes as box_lib
from clipcrop_jax.data import features as F
from clipcrop_jax import default_config
from clipcrop_jax import export
from clipcrop_jax import metrics as metrics_lib
from clipcrop_jax import model as model_lib
from clipcrop_jax.owlvit import fileio
from clipcrop_jax.owlvit import heads as owl_heads
from clipcrop_jax import sharding as sharding_lib
from clipcrop_jax import zero_shot

TEXT_DATASETS = ('horanyi_pr', 'textcrop')
FUSE_PREFIX = 'clipcrop@fuse'  # methods 'clipcrop@fuse<k>' (`evaluate_dataset(fuse_choices=)`)


def dataset_kind(name: str, split: str) -> str:
  """'text' for text-conditioned sets (IoU-Mean/Max), 'gaic' for scored candidates (Acc_K/N)."""
  if name.split('/')[0] in TEXT_DATASETS or split.startswith('ambiguity'):
    return 'text'
  return 'gaic'


def results_filename(name: str, split: str) -> str:
  base = name.replace('/', '_')
  return f'eval_{base}.json' if split == 'test' else f'eval_{base}_{split}.json'


# ------------------------------------------------------------------------------------------------
# Device side.
# ------------------------------------------------------------------------------------------------


def _forward(
    mdl: model_lib.ClipCrop, images, text_queries, extent, query_roles
) -> dict[str, jax.Array]:
  """Model outputs + everything the baselines need, from one image encoding."""
  encoded = mdl.encode_image(images)
  q = mdl.embed_text(text_queries)
  real = text_queries[..., 0] > 0
  full = model_lib.select_and_union(encoded, q, real, None, extent)
  if mdl.config.mode == 'base':
    own = mdl.crop_from_encoding(encoded, None, None, None, extent)
  else:
    own = mdl.crop_from_encoding(
        encoded,
        q,
        model_lib.query_mask_for_mode(text_queries, mdl.config.mode),
        None,
        extent,
        query_roles=query_roles,
    )
  logits = owl_heads.logits_from_image_terms(encoded['class_terms'], q, real)  # (B, P, Q)
  in_image = owl_heads.token_in_image(encoded['pred_boxes'], extent)
  token_scores = zero_shot.token_scores(logits, in_image, real)
  return dict(
      pred_boxes=own['pred_boxes'],
      quality=own['quality'],
      top_box=full['selected_boxes'][:, 0],
      top_valid=full['selected_mask'][:, 0],
      union_box=full['union_box'],
      selected_tokens=full['selected_tokens'],
      selected_mask=full['selected_mask'],
      zero_shot_union=model_lib.union_selection_mask(
          full['selected_mask'], query_roles, zero_shot.ZERO_SHOT_UNION
      ),
      token_boxes=box_lib.cxcywh_to_xyxy(encoded['pred_boxes']),
      token_scores=token_scores,
  )


def _forward_base(mdl: model_lib.ClipCrop, images, extent) -> dict[str, jax.Array]:
  out = mdl.crop_from_encoding(mdl.encode_image(images), None, None, None, extent)
  return dict(base_boxes=out['pred_boxes'], base_quality=out['quality'])


def make_eval_step(model: model_lib.ClipCrop, mesh) -> Any:
  batch_sharding = sharding_lib.batch_sharding(mesh)
  return jax.jit(
      lambda params, b: model.apply(
          {'params': params},
          b[F.IMAGES],
          b[F.TEXT_QUERIES],
          b[F.IMAGE_EXTENT],
          b.get(F.QUERY_ROLES),
          method=_forward,
      ),
      out_shardings=batch_sharding,
  )


def make_base_step(model: model_lib.ClipCrop, mesh) -> Any:
  return jax.jit(
      lambda params, b: model.apply(
          {'params': params}, b[F.IMAGES], b[F.IMAGE_EXTENT], method=_forward_base
      ),
      out_shardings=sharding_lib.batch_sharding(mesh),
  )


# ------------------------------------------------------------------------------------------------
# Host side.
# ------------------------------------------------------------------------------------------------


def _to_host(tree: dict[str, Any]) -> dict[str, np.ndarray]:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  if jax.process_count() == 1:
    return {k: np.asarray(v) for k, v in tree.items()}
  return {k: np.asarray(v) for k, v in multihost_utils.process_allgather(tree, tiled=True).items()}


def _ranked(
    boxes: np.ndarray, scores: np.ndarray, fuse_top_k: int = 1
) -> tuple[np.ndarray, np.ndarray]:
  """Predictions by descending score; with `fuse_top_k` > 1 the fused box (box voting) first."""
  order = np.argsort(-scores, kind='stable')
  return box_lib.with_fused_first_xyxy(boxes[order], scores[order], fuse_top_k)


class _Collector:
  """Per-method ranked predictions of every example, then the dataset's metrics."""

  def __init__(self, kind: str, methods: list[str]):
    self.kind, self.methods = kind, methods
    self.examples: list[dict[str, Any]] = []

  def add(
      self,
      refs: np.ndarray,
      scores: np.ndarray,
      extent: np.ndarray,
      ranked: dict[str, tuple[np.ndarray, np.ndarray]],
      srcc: Optional[dict[str, float]] = None,
  ) -> None:
    """One example: reference crops / scores, extent, each method's ranked (boxes, scores) and,
    for text sets, each ClipCrop model's `metrics.quality_iou_srcc`."""
    self.examples.append(
        dict(refs=refs, scores=scores, extent=extent, ranked=ranked, srcc=srcc or {})
    )

  def _centre_size(self) -> np.ndarray:
    sizes = []
    for ex in self.examples:
      refs = ex['refs'] if self.kind == 'text' else ex['refs'][[int(np.argmax(ex['scores']))]]
      sizes.append((refs[:, 2:] - refs[:, :2]) / ex['extent'][None])
    return np.concatenate(sizes).mean(0)

  def results(self) -> dict[str, dict[str, Any]]:
    """{method: metrics}; text sets add 'per_example_iou_mean' (list, example order) and, for
    the ClipCrop models, 'quality_iou_srcc' (mean over examples where it is defined)."""
    if 'centre_crop' in self.methods and self.examples:
      rel = self._centre_size()
      for ex in self.examples:
        e = ex['extent']
        lo = (1 - rel) / 2 * e
        ex['ranked']['centre_crop'] = (np.concatenate([lo, lo + rel * e])[None], np.ones(1))
    out = {}
    for method in self.methods:
      acc = metrics_lib.TextCropMetrics() if self.kind == 'text' else metrics_lib.GaicMetrics()
      for ex in self.examples:
        boxes, conf = ex['ranked'][method]
        if self.kind == 'text':
          acc.add(boxes[0], ex['refs'])
        else:
          acc.add(boxes, conf, ex['refs'], ex['scores'])
      out[method] = acc.result()
      if self.kind == 'text':
        out[method]['per_example_iou_mean'] = acc.per_example_iou_mean
        srcc = [ex['srcc'][method] for ex in self.examples if method in ex['srcc']]
        defined = [v for v in srcc if not math.isnan(v)]
        if srcc:
          out[method]['quality_iou_srcc'] = float(np.mean(defined)) if defined else math.nan
    return out


def _eval_batches(config: ml_collections.ConfigDict, builder, split: str, mesh, batch_size: int):
  """Global eval batches; every process yields the same number (padding batches are masked)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.data import input_pipeline as ip  # pylint: disable=g-import-not-at-top

  per_process = sharding_lib.process_batch_size(batch_size, 'eval.batch_size')
  total = builder.info.splits[split].num_examples
  n_batches = math.ceil(math.ceil(total / jax.process_count()) / per_process)
  ds = builder.as_dataset(
      split=ip.split_for_process(split, drop_remainder=False),
      shuffle_files=False,
      decoders={F.IMAGE: tfds.decode.SkipDecoding()},
  )
  ds = ds.map(ip.input_features)
  ds = ip.make_eval_dataset(
      ds,
      image_size=default_config.clipcrop_config(config).owlvit_config.image_size,
      batch_size=per_process,
      max_crops=config.dataset.max_crops,
      max_queries=config.dataset.max_queries,
      keyword_pipeline=config.dataset.keyword_pipeline,
  )
  ds = ds.map(lambda b: {k: b[k] for k in F.EVAL_KEYS})
  count = 0
  for batch in ip.to_global_batches(ds, mesh):
    count += 1
    yield batch
  if count < n_batches:  # this process ran out: fully masked padding batches (the collectives
    # of every process must run the same number of steps)
    zeros = {
        k: np.zeros(spec.shape, spec.dtype.as_numpy_dtype) for k, spec in ds.element_spec.items()
    }
    padding = next(ip.to_global_batches(tf_from_numpy(zeros), mesh))
    for _ in range(count, n_batches):
      yield padding


def tf_from_numpy(batch: dict[str, np.ndarray]):
  """A one-element tf.data.Dataset holding `batch`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  return tf.data.Dataset.from_tensors(batch)


def evaluate_dataset(
    config: ml_collections.ConfigDict,
    params: Any,
    mesh,
    name: str,
    split: str,
    workdir: Optional[str] = None,
    step: Optional[int] = None,
    base: Optional[tuple[model_lib.ClipCrop, Any]] = None,
    fuse_choices: Sequence[int] = (),
) -> dict[str, Any]:
  """Evaluates the model (and the configured baselines) on one dataset split.

  Args:
    config: the run config.
    params: the model's parameters (sharded or host arrays).
    mesh: the device mesh.
    name, split: the TFDS dataset (prepared in `config.dataset.data_dir`) and split.
    workdir: where `eval_<dataset>.json` is written (process 0); None = not written.
    step: training step, recorded in the results.
    base: (ClipCrop-base module, params) for the 'clipcrop_base' baseline, or None.
    fuse_choices: extra methods 'clipcrop@fuse<k>': the model's crops ranked with
      `fuse_top_k` = k instead of its config's (from the same forward pass), to choose k on a
      validation split.

  Returns:
    {'dataset', 'split', 'kind', 'step', 'num_examples', 'methods': {method: metrics}, 'table'}.
    For text sets every method's metrics hold 'per_example_iou_mean' (in the split's order) and
    the ClipCrop models' 'quality_iou_srcc' (see `_Collector.results`); the JSON file omits the
    per-example lists.
  """
  from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top

  kind = dataset_kind(name, split)
  from clipcrop_jax.data import input_pipeline as ip  # pylint: disable=g-import-not-at-top

  model = default_config.build_model(config)
  baselines = [b for b in config.eval.baselines if b != 'clipcrop_base' or base is not None]
  fused = [f'{FUSE_PREFIX}{int(k)}' for k in fuse_choices]
  methods = ['clipcrop'] + fused + baselines
  builder = ip.dataset_builder(name, config.dataset.data_dir)
  if config.eval.max_examples > 0:
    split = f'{split}[:{min(config.eval.max_examples, builder.info.splits[split].num_examples)}]'
  step_fn = make_eval_step(model, mesh)
  base_fn = make_base_step(base[0], mesh) if base is not None else None
  fuse = {
      'clipcrop': model.config.fuse_top_k,
      'clipcrop_base': base[0].config.fuse_top_k if base is not None else 1,
      **{name: int(name[len(FUSE_PREFIX) :]) for name in fused},
  }
  collector = _Collector(kind, methods)
  n = 0
  bar = tqdm.tqdm(
      desc=f'eval {name}:{split}', unit='ex', disable=jax.process_index() != 0, mininterval=2.0
  )
  for batch in _eval_batches(config, builder, split, mesh, config.eval.batch_size):
    out = step_fn(params, batch)
    if base_fn is not None:
      out = {**out, **base_fn(base[1], batch)}
    host = _to_host(
        {**{k: batch[k] for k in F.EVAL_KEYS if k not in (F.IMAGES, F.TEXT_QUERIES)}, **out}
    )
    for i in np.nonzero(host[F.EXAMPLE_MASK])[0]:
      n += 1
      _add_example(collector, host, i, baselines, fuse)
    bar.update(int(host[F.EXAMPLE_MASK].sum()))
  bar.close()
  results = collector.results()
  table = metrics_lib.format_markdown_table(
      results,
      _columns(kind) + (['quality_iou_srcc'] if kind == 'text' else []),
      title=f'{name} [{split}] ({n} examples' + (f', step {step})' if step is not None else ')'),
  )
  logging.info('\n%s', table)
  summary = dict(
      dataset=name, split=split, kind=kind, step=step, num_examples=n, methods=results, table=table
  )
  if workdir is not None and jax.process_index() == 0:
    path = pathlib.Path(workdir) / results_filename(name, split.split('[')[0])
    compact = dict(
        summary,
        methods={
            m: {k: v for k, v in r.items() if k != 'per_example_iou_mean'}
            for m, r in results.items()
        },
    )
    fileio.atomic_write_text(path, json.dumps(compact, indent=1, default=float))
  return summary


def _columns(kind: str) -> list[str]:
  if kind == 'text':
    return ['iou_mean', 'iou_max', 'num_examples']
  return [
      'acc1_5',
      'acc4_5',
      'acc1_10',
      'acc4_10',
      'acc5',
      'acc10',
      'srcc',
      'pcc',
      'mapped_iou_mean',
      'num_images',
  ]


def _add_example(
    collector: _Collector,
    host: dict[str, np.ndarray],
    i: int,
    baselines: list[str],
    fuse: Optional[dict[str, int]] = None,
) -> None:
  """Ranked crops of every method for example `i`; `fuse`: fuse_top_k of the ClipCrop models
  ('clipcrop', 'clipcrop_base', and 'clipcrop@fuse<k>' re-rankings of 'clipcrop'; default 1)."""
  fuse = fuse or {}
  real = host[F.CROP_MASK][i]
  refs = host[F.CROP_BOXES][i][real].astype(np.float64)
  scores = host[F.CROP_SCORES][i][real]
  extent = host[F.IMAGE_EXTENT][i].astype(np.float64)
  whole = np.concatenate([[0.0, 0.0], extent])[None]
  models = {'clipcrop': ('pred_boxes', 'quality')}
  models.update({name: ('pred_boxes', 'quality') for name in fuse if name.startswith(FUSE_PREFIX)})
  if 'clipcrop_base' in baselines:
    models['clipcrop_base'] = ('base_boxes', 'base_quality')
  ranked, srcc = {}, {}
  for name, (box_key, quality_key) in models.items():
    ranked[name] = _ranked(host[box_key][i], host[quality_key][i], fuse.get(name, 1))
    if collector.kind == 'text':
      srcc[name] = metrics_lib.quality_iou_srcc(host[box_key][i], host[quality_key][i], refs)
  if 'full_image' in baselines:
    ranked['full_image'] = (whole, np.ones(1))
  if 'owlvit_top_box' in baselines:
    top = host['top_box'][i][None] if host['top_valid'][i] else whole
    ranked['owlvit_top_box'] = (np.clip(top, 0, np.tile(extent, 2)), np.ones(1))
  if 'union_box' in baselines:
    ranked['union_box'] = (host['union_box'][i][None], np.ones(1))
  if 'zero_shot' in baselines:
    side = float(max(host[F.HEIGHT][i], host[F.WIDTH][i]))
    wh = (float(host[F.WIDTH][i]), float(host[F.HEIGHT][i]))
    selected, in_union = host['selected_mask'][i], host['zero_shot_union'][i]
    picked = host['selected_tokens'][i][in_union]
    context = host['selected_tokens'][i][selected & ~in_union]
    token_boxes = np.clip(host['token_boxes'][i] / np.tile(extent, 2), 0, 1)
    boxes_px, conf = zero_shot.crops_from_detections(
        token_boxes, host['token_scores'][i], picked, wh, context=context
    )
    ranked['zero_shot'] = (boxes_px / side, conf)
  collector.add(refs, scores, extent, ranked, srcc)


def load_base(config: ml_collections.ConfigDict) -> Optional[tuple[model_lib.ClipCrop, Any]]:
  """The ClipCrop-base baseline from `eval.base_workdir`; None when not configured (or when the
  evaluated model is itself a base model)."""
  if (
      'clipcrop_base' not in config.eval.baselines
      or not config.eval.base_workdir
      or config.model.mode == 'base'
  ):
    return None
  loaded = export.load_model(config.eval.base_workdir)
  base_config, params = loaded.config, loaded.params
  if base_config.mode != 'base':
    raise ValueError(
        f'eval.base_workdir={config.eval.base_workdir} holds a {base_config.mode!r}'
        " model; the clipcrop_base baseline needs mode 'base'"
    )
  return model_lib.ClipCrop(base_config, dtype=default_config.compute_dtype(config)), params


def evaluate(
    config: ml_collections.ConfigDict,
    params: Any,
    mesh,
    workdir: Optional[str],
    step: Optional[int] = None,
) -> dict[str, dict[str, Any]]:
  """Every `config.eval.datasets` entry ((name, split) pairs); returns {name:split: summary}."""
  base = load_base(config)
  out = {}
  for entry in config.eval.datasets:
    name, split = entry[0], entry[1]
    out[f'{name}:{split}'] = evaluate_dataset(
        config, params, mesh, name, split, workdir, step, base
    )
  return out
