"""The embedded default: the whole pipeline learns text-conditioned cropping on a CPU in minutes.

`python -m clipcrop_jax.main --config=configs/synthetic.py --workdir=WORK` runs, with no download,
for each seed s of `seed`, ..., `seed + pipeline.num_seeds - 1` (data seed = training seed = s;
one seed: everything in WORK, several: in WORK/seed_<s>/):
  1. build the synthetic TFDS dataset (`datasets/synthetic`, config `<dataset>` for s = 0 and
     `<dataset>_seed<s>` otherwise) in `dataset.data_dir` if missing;
  2. train a small OWL-ViT from scratch on its detection annotations (object boxes + names such as
     'red circle' and referring phrases; `clipcrop_jax.detection_train`) ->
     owlvit/owlvit_checkpoint.msgpack, and measure its grounding accuracy (top token of an
     object's name hits the object, IoU >= 0.5);
  3. train ClipCrop on the crop annotations with that (frozen) encoder in modes full, base, main
     and key (`clipcrop_jax.training.clipcrop_task`) -> clipcrop_<mode>/;
  4. choose, on the validation split `pipeline.validation_split` (`ambiguity_validation`, images
     disjoint from the test split), each variant's `fuse_top_k` among
     `pipeline.fuse_top_k_choices` (highest IoU-Mean, ties to the smaller k), record its
     quality<->IoU rank correlation there, and write the choice into its exported model;
  5. evaluate once on the test split (`eval.datasets`: `ambiguity`, two far-apart salient objects
     per image, one caption each) with the chosen settings: IoU-Mean / IoU-Max of full image,
     centre crop, OWL-ViT top box, union box, zero-shot crop and ClipCrop-base/main/key/full
     (`clipcrop_jax.evaluate`).
Then WORK/report.md (mean +- std over seeds, paired bootstrap 95 % intervals of ClipCrop (full)
minus every other row, the validation choices and correlations, grounding, timings),
WORK/summary.json and WORK/examples.png (first seed: legend, full captions, the first test images
and the worst failures of ClipCrop (full)).
Re-running resumes: finished stages are skipped (their checkpoints are in WORK).
`--config=configs/synthetic.py:quick` is the same with the `small` set and smaller budgets (tests).
"""

from __future__ import annotations

import copy
import io
import json
import math
import pathlib
import subprocess
import sys
import textwrap
import time
from typing import Any, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np

from clipcrop_jax.data import input_pipeline
from clipcrop_jax import evaluate
from clipcrop_jax import export
from clipcrop_jax import metrics as metrics_lib
from clipcrop_jax.owlvit import fileio
from clipcrop_jax import sharding as sharding_lib
from clipcrop_jax.training import clipcrop_task

REPORT_FILE = 'report.md'
BOOTSTRAP_RESAMPLES = 10000
# Caption classes of the test material (the dataset's `caption_kind`), in report order.
CAPTION_CLASSES = {'name': 'one name', 'relation': 'relation', 'pair': 'two targets'}
EXAMPLES_FILE = 'examples.png'
SUMMARY_FILE = 'summary.json'
ROW_ORDER = (
    'full_image',
    'centre_crop',
    'owlvit_top_box',
    'union_box',
    'zero_shot',
    'clipcrop_base',
    'clipcrop_main',
    'clipcrop_key',
    'clipcrop_full',
)
ROW_NAMES = {
    'full_image': 'Full image',
    'centre_crop': 'Centre crop (mean size)',
    'owlvit_top_box': 'OWL-ViT top box',
    'union_box': 'Union box',
    'zero_shot': 'Zero-shot crop',
    'clipcrop_base': 'ClipCrop-base',
    'clipcrop_main': 'ClipCrop-main',
    'clipcrop_key': 'ClipCrop-key',
    'clipcrop_full': 'ClipCrop (full)',
}


# ------------------------------------------------------------------------------------------------
# Stage 1: data.
# ------------------------------------------------------------------------------------------------


def ensure_dataset(name: str, data_dir: str) -> None:
  """Builds `synthetic_crops/<config>` into `data_dir` unless it is already prepared."""
  try:
    input_pipeline.dataset_builder(name, data_dir)
    logging.info('Dataset %s found in %s', name, data_dir)
    return
  except FileNotFoundError:
    pass
  folder = pathlib.Path(__file__).resolve().parents[2] / 'datasets' / 'synthetic'
  source = folder / 'synthetic.py'
  if not source.is_file():
    raise FileNotFoundError(
        f'{source} not found: the synthetic builder lives in the source '
        'checkout (pip install -e . from the repository)'
    )
  logging.info('Building %s into %s ...', name, data_dir)
  # The same command as `tfds build datasets/synthetic` (see clipcrop_jax.build_dataset).
  cmd = [
      sys.executable,
      '-m',
      'clipcrop_jax.build_dataset',
      str(folder),
      '--config',
      name.split('/')[1],
      '--data_dir',
      data_dir,
  ]
  result = subprocess.run(cmd, check=False, capture_output=True, text=True)
  if result.returncode:
    raise RuntimeError(f'building {name} failed ({" ".join(cmd)}):\n{result.stderr[-3000:]}')


# ------------------------------------------------------------------------------------------------
# Stage 2: OWL-ViT.
# ------------------------------------------------------------------------------------------------


def train_owlvit(c: ml_collections.ConfigDict, workdir: pathlib.Path) -> tuple[str, dict]:
  """Trains the detector; returns (checkpoint path, grounding results on val and ambiguity)."""
  from clipcrop_jax.owlvit import checkpoints as owl_ckpt  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.training import detection_task  # pylint: disable=g-import-not-at-top

  det = ml_collections.ConfigDict(c.pipeline.owlvit.to_dict())
  det.seed = c.seed
  det.dataset.data_dir = c.dataset.data_dir
  det.eval.split = ''  # evaluated below, on two splits
  out = workdir / 'owlvit'
  ckpt = out / 'owlvit_checkpoint.msgpack'
  if not ckpt.is_file():
    detection_task.train_detection(det, str(out))
  module, variables = owl_ckpt.load_checkpoint(ckpt, det.model.owlvit)
  builder = input_pipeline.dataset_builder(c.dataset.name, c.dataset.data_dir)
  grounding = {}
  for split in ('validation', 'ambiguity'):
    grounding[split] = detection_task.evaluate_grounding(
        module,
        variables,
        builder,
        split,
        batch_size=det.eval.batch_size,
        max_objects=det.dataset.max_objects,
        max_labels=det.dataset.max_labels,
        label_key=det.dataset.label_key,
    )
    logging.info('OWL-ViT grounding on %s: %s', split, grounding[split])
  return str(ckpt), grounding


# ------------------------------------------------------------------------------------------------
# Stage 3: ClipCrop variants.
# ------------------------------------------------------------------------------------------------


def variant_config(
    c: ml_collections.ConfigDict, mode: str, owlvit_ckpt: str, selection_union: str | None = None
) -> ml_collections.ConfigDict:
  """The training config of ClipCrop-`mode` (with `selection_union` when given)."""
  v = ml_collections.ConfigDict(c.to_dict())
  v.model.mode = mode
  if selection_union is not None:
    v.model.selection_union = selection_union
  v.init_from.owlvit = owlvit_ckpt
  v.num_train_steps = int(c.pipeline.variant_steps[mode])
  v.run = 'train'
  return v


def variant_dir(c: ml_collections.ConfigDict, mode: str, selection_union: str) -> str:
  """The run folder of a variant: clipcrop_<mode>, or clipcrop_full_<union> for each candidate
  of `pipeline.selection_union_choices` when there are several."""
  if mode == 'full' and len(c.pipeline.selection_union_choices) > 1:
    return f'clipcrop_full_{selection_union}'
  return f'clipcrop_{mode}'


Trained = dict[str, tuple[ml_collections.ConfigDict, Any, str]]  # mode: (config, state, folder)


def train_full_candidates(
    c: ml_collections.ConfigDict, workdir: pathlib.Path, owlvit_ckpt: str
) -> Trained:
  """Trains ClipCrop (full) once per `pipeline.selection_union_choices`; {union: (config,
  final state, run folder)}."""
  out = {}
  for union in c.pipeline.selection_union_choices:
    v = variant_config(c, 'full', owlvit_ckpt, union)
    folder = variant_dir(c, 'full', union)
    logging.info(
        'Training ClipCrop-full (selection_union=%s) for %d steps', union, v.num_train_steps
    )
    out[union] = (v, clipcrop_task.train(v, str(workdir / folder)), folder)
  return out


def train_variants(
    c: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    owlvit_ckpt: str,
    selection_union: str,
    modes: Sequence[str],
) -> Trained:
  """Trains the `modes` with `selection_union`; returns {mode: (config, final state, folder)}."""
  out = {}
  for mode in modes:
    v = variant_config(c, mode, owlvit_ckpt, selection_union)
    logging.info('Training ClipCrop-%s for %d steps', mode, v.num_train_steps)
    folder = variant_dir(c, mode, selection_union)
    out[mode] = (v, clipcrop_task.train(v, str(workdir / folder)), folder)
  return out


# ------------------------------------------------------------------------------------------------
# Stage 4: choices on the validation split.
# ------------------------------------------------------------------------------------------------


def _eval_config(
    v: ml_collections.ConfigDict, baselines: Sequence[str] = (), fuse_top_k: int | None = None
) -> ml_collections.ConfigDict:
  ve = ml_collections.ConfigDict(v.to_dict())
  ve.eval.baselines = tuple(baselines)
  if fuse_top_k is not None:
    ve.model.fuse_top_k = int(fuse_top_k)
  return ve


def choose_on_validation(
    c: ml_collections.ConfigDict, workdir: pathlib.Path, trained: Trained
) -> dict[str, dict[str, Any]]:
  """{name: {'fuse_top_k': chosen k, 'iou_mean': validation IoU-Mean at k, 'iou_mean_by_k',
  'quality_iou_srcc'}} for every entry of `trained` ({name: (config, state, folder)}): its
  `fuse_top_k` chosen on `pipeline.validation_split` (the highest IoU-Mean among
  `pipeline.fuse_top_k_choices`, ties to the smaller k), written into its exported model."""
  out = {}
  for name, (v, state, folder) in trained.items():
    out[name] = validation_choice(c, v, state, workdir / folder)
    logging.info(
        '%s on %s: IoU-Mean by fuse_top_k %s -> %d; quality<->IoU SRCC %.3f',
        folder,
        c.pipeline.validation_split,
        out[name]['iou_mean_by_k'],
        out[name]['fuse_top_k'],
        out[name]['quality_iou_srcc'],
    )
    _set_exported_fuse_top_k(workdir / folder / export.EXPORT_DIR, out[name]['fuse_top_k'])
  return out


def choose_selection_union(
    c: ml_collections.ConfigDict, validation: dict[str, dict[str, Any]]
) -> str:
  """The `pipeline.selection_union_choices` entry whose ClipCrop (full) has the highest IoU-Mean
  on the validation split (at its chosen fuse_top_k); ties go to the earlier choice."""
  choices = list(c.pipeline.selection_union_choices)
  return max(choices, key=lambda u: (validation[u]['iou_mean'], -choices.index(u)))


def validation_choice(
    c: ml_collections.ConfigDict, v: ml_collections.ConfigDict, state: Any, workdir: pathlib.Path
) -> dict[str, Any]:
  """One trained variant (config `v`, final `state`) on `pipeline.validation_split`:
  {'fuse_top_k': the k of `pipeline.fuse_top_k_choices` with the highest IoU-Mean (ties to the
  smaller k), 'iou_mean': its IoU-Mean, 'iou_mean_by_k', 'quality_iou_srcc'}; the eval file goes
  to `workdir`."""
  choices = sorted({int(k) for k in c.pipeline.fuse_top_k_choices})
  summary = evaluate.evaluate_dataset(
      _eval_config(v),
      state.params,
      sharding_lib.mesh_of(state.params),
      c.eval.datasets[0][0],
      c.pipeline.validation_split,
      str(workdir),
      int(jax.device_get(state.step)),
      fuse_choices=choices,
  )
  by_k = {k: summary['methods'][f'{evaluate.FUSE_PREFIX}{k}']['iou_mean'] for k in choices}
  best = max(choices, key=lambda k: (by_k[k], -k))
  return dict(
      fuse_top_k=best,
      iou_mean=by_k[best],
      iou_mean_by_k=by_k,
      quality_iou_srcc=summary['methods']['clipcrop']['quality_iou_srcc'],
  )


def _set_exported_fuse_top_k(model_dir: pathlib.Path, k: int) -> None:
  """Rewrites the run's own exported model with `fuse_top_k` = k (no-op when it already is)."""
  if not export.is_model_dir(model_dir):
    return
  loaded = export.load_model(model_dir)
  if loaded.config.fuse_top_k != k:
    export.save_model(
        model_dir, loaded.config.replace(fuse_top_k=k), loaded.params, loaded.keyword_pipeline
    )


# ------------------------------------------------------------------------------------------------
# Stage 5: the test split, once.
# ------------------------------------------------------------------------------------------------


def evaluate_all(
    c: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    trained: Trained,
    fuse_top_k: dict[str, int] | None = None,
) -> dict[str, dict]:
  """{row name: metrics (with 'per_example_iou_mean')} on the test split (`eval.datasets`):
  baselines (with the full model's encoder, which every variant shares) and every ClipCrop
  variant ({mode: (config, state, folder)}), each ranked with its chosen `fuse_top_k` (default:
  its config's)."""
  name, split = c.eval.datasets[0]
  fuse_top_k = fuse_top_k or {}
  rows: dict[str, dict] = {}
  for mode, (v, state, folder) in trained.items():
    baselines = (
        tuple(b for b in c.eval.baselines if b != 'clipcrop_base') if (mode == 'full') else ()
    )
    summary = evaluate.evaluate_dataset(
        _eval_config(v, baselines, fuse_top_k.get(mode)),
        state.params,
        sharding_lib.mesh_of(state.params),
        name,
        split,
        str(workdir / folder),
        int(jax.device_get(state.step)),
    )
    for method, result in summary['methods'].items():
      rows['clipcrop_' + mode if method == 'clipcrop' else method] = result
  return {k: rows[k] for k in ROW_ORDER if k in rows}


def split_examples(c: ml_collections.ConfigDict, split: str) -> tuple[list[str], list[str]]:
  """(image file name, caption class) of every example of `split`, in evaluation order. The
  captions of one image share its name (the clusters of the bootstrap); the class is the
  dataset's `caption_kind` (`CAPTION_CLASSES`), '' when it has none."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = input_pipeline.dataset_builder(c.dataset.name, c.dataset.data_dir)
  ds = builder.as_dataset(
      split=split, shuffle_files=False, decoders={'image': tfds.decode.SkipDecoding()}
  )
  images, kinds = [], []
  for ex in tfds.as_numpy(ds):
    images.append(ex['image/filename'].decode('utf-8'))
    kinds.append(ex['caption_kind'].decode('utf-8') if 'caption_kind' in ex else '')
  return images, kinds


# ------------------------------------------------------------------------------------------------
# Seeds: aggregation and intervals.
# ------------------------------------------------------------------------------------------------


def seed_config(c: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
  """The config of one seed: training seed `seed` and the synthetic data of seed `seed`
  (builder config `<name>` for 0, `<name>_seed<seed>` otherwise)."""
  s = ml_collections.ConfigDict(copy.deepcopy(c.to_dict()))
  s.seed = int(seed)
  base = c.dataset.name
  name = base if seed == 0 else f'{base}_seed{int(seed)}'
  s.dataset.name = name
  s.pipeline.owlvit.dataset.name = name
  s.eval.datasets = tuple((name, split) for _, split in c.eval.datasets)
  return s


def aggregate(
    per_seed: list[dict[str, Any]], num_resamples: int = BOOTSTRAP_RESAMPLES
) -> dict[str, Any]:
  """Mean / std over seeds of every row and metric, and for ClipCrop (full) against every other
  row the paired bootstrap 95 % interval of the IoU-Mean difference (`metrics.
  paired_bootstrap_ci`: per-example differences pooled over seeds, the captions of an image
  resampled together)."""
  rows = [r for r in ROW_ORDER if all(r in s['rows'] for s in per_seed)]
  mean, std = {}, {}
  for r in rows:
    mean[r], std[r] = {}, {}
    for key in ('iou_mean', 'iou_max', 'num_examples'):
      values = np.array([s['rows'][r][key] for s in per_seed], np.float64)
      mean[r][key] = float(values.mean())
      std[r][key] = _std(values)
  clusters = np.array([f'{s["seed"]}/{img}' for s in per_seed for img in s['image_ids']])
  kinds = np.array(
      [k for s in per_seed for k in s.get('caption_kinds') or [''] * len(s['image_ids'])]
  )
  intervals = _intervals(per_seed, rows, clusters, np.ones(len(clusters), bool), num_resamples)
  by_class = {}
  for kind in CAPTION_CLASSES:
    if not np.any(kinds == kind):
      continue
    class_rows = {}
    for r in rows:
      values = np.array(
          [
              np.mean(
                  np.asarray(s['per_example'][r])[
                      np.asarray(s.get('caption_kinds') or [''] * len(s['image_ids'])) == kind
                  ]
              )
              for s in per_seed
          ]
      )
      class_rows[r] = dict(
          iou_mean=float(values.mean()),
          iou_mean_std=_std(values),
          num_examples=int(np.sum(kinds == kind)),
      )
    by_class[kind] = dict(
        rows=class_rows,
        intervals=_intervals(per_seed, rows, clusters, kinds == kind, num_resamples),
    )
  return dict(rows=mean, rows_std=std, intervals=intervals, by_class=by_class)


def _intervals(
    per_seed: list[dict[str, Any]],
    rows: Sequence[str],
    clusters: np.ndarray,
    selected: np.ndarray,
    num_resamples: int,
) -> dict[str, dict[str, float]]:
  """{row: paired bootstrap interval of full - row} over the pooled examples `selected`."""
  if 'clipcrop_full' not in rows or not np.any(selected):
    return {}
  full = np.concatenate([s['per_example']['clipcrop_full'] for s in per_seed])[selected]
  out = {}
  for r in rows:
    if r == 'clipcrop_full':
      continue
    other = np.concatenate([s['per_example'][r] for s in per_seed])[selected]
    d, lo, hi = metrics_lib.paired_bootstrap_ci(
        full - other, list(clusters[selected]), num_resamples=num_resamples
    )
    out[r] = dict(difference=d, low=lo, high=hi, num_examples=int(len(full)))
  return out


def claim(row: str, interval: dict[str, float]) -> str:
  """A sentence worded from the interval: 'full > base: +0.20 [0.18, 0.22]'."""
  d, lo, hi = interval['difference'], interval['low'], interval['high']
  short = ROW_NAMES[row]
  relation = '>' if lo > 0 else '<' if hi < 0 else '≈ (interval includes 0)'
  return f'ClipCrop (full) {relation} {short}: {d:+.4f} [{lo:+.4f}, {hi:+.4f}]'


# ------------------------------------------------------------------------------------------------
# Report.
# ------------------------------------------------------------------------------------------------

REFERENCE_COLOUR = (40, 200, 60)
FULL_COLOUR = (255, 30, 30)
BASE_COLOUR = (60, 90, 255)


def write_examples_png(
    c: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    per_example_full: Sequence[float] | None = None,
    num_first: int = 6,
    num_failures: int = 6,
    out: pathlib.Path | None = None,
    full_dir: str = 'clipcrop_full',
) -> pathlib.Path:
  """A contact sheet of test examples, one panel per (image, caption): the caption's reference
  crops (thin green), ClipCrop (full)'s top crop (red) and ClipCrop-base's (blue; the same for
  both captions of an image, since base ignores the text), the whole caption under the panel
  with full's IoU-Mean, and a legend at the top. First the first `num_first` examples of the test
  split (every caption of each image), then the `num_failures` examples where ClipCrop (full)'s
  IoU-Mean (`per_example_full`, in split order) is lowest; `full_dir`: the run folder of the
  chosen ClipCrop (full)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from PIL import Image, ImageDraw, ImageFont  # pylint: disable=g-import-not-at-top
  from clipcrop_jax import cropper as cropper_lib  # pylint: disable=g-import-not-at-top

  full = cropper_lib.ClipCropper.load(workdir / full_dir / export.EXPORT_DIR)
  base_dir = workdir / 'clipcrop_base' / export.EXPORT_DIR
  base = cropper_lib.ClipCropper.load(base_dir) if base_dir.is_dir() else None
  name, split = c.eval.datasets[0]
  builder = input_pipeline.dataset_builder(name, c.dataset.data_dir)
  examples = list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))
  # The first images with both captions, in order of first appearance.
  by_image: dict[bytes, list[int]] = {}
  for i, ex in enumerate(examples):
    by_image.setdefault(ex['image/filename'], []).append(i)
  first = [i for idx in by_image.values() for i in idx][:num_first]
  failures: list[int] = []
  if per_example_full is not None and len(per_example_full) == len(examples):
    failures = [
        int(i)
        for i in np.argsort(np.asarray(per_example_full), kind='stable')
        if int(i) not in first
    ][:num_failures]
  sections = [('First test examples (every caption of each image)', first)]
  if failures:
    sections.append(
        ('Failures: the lowest IoU-Mean of ClipCrop (full) on the test split', failures)
    )

  font = ImageFont.load_default(size=12)
  title_font = ImageFont.load_default(size=14)
  cell, cols, pad = 240, 3, 10
  wrap = 38
  caption_lines = 3
  line_h = 15
  panel_h = cell + 4 + line_h * (caption_lines + 1)
  legend_h = 50
  rows = sum(math.ceil(len(idx) / cols) for _, idx in sections)
  width = cols * (cell + pad) + pad
  height = legend_h + len(sections) * 24 + rows * (panel_h + pad) + pad
  sheet = Image.new('RGB', (width, height), 'white')
  draw = ImageDraw.Draw(sheet)
  legend = [
      (REFERENCE_COLOUR, 1, 'reference crops (4 annotators)'),
      (FULL_COLOUR, 3, 'ClipCrop (full), top crop'),
      (BASE_COLOUR, 3, 'ClipCrop-base, top crop (ignores the text)'),
  ]
  x = pad
  for colour, w, label in legend:
    draw.rectangle([x, 14, x + 26, 30], outline=colour, width=w)
    draw.text((x + 32, 15), label, fill=(0, 0, 0), font=font)
    x += 40 + int(draw.textlength(label, font=font))
  y = legend_h
  per_example = list(per_example_full) if per_example_full is not None else None
  for title, indices in sections:
    draw.text((pad, y), title, fill=(0, 0, 0), font=title_font)
    y += 24
    for k, i in enumerate(indices):
      row, col = divmod(k, cols)
      ex = examples[i]
      image = ex['image']
      h, w = image.shape[:2]
      scale = cell / max(h, w)
      panel = Image.fromarray(image).resize((max(1, round(w * scale)), max(1, round(h * scale))))
      pd = ImageDraw.Draw(panel)
      text = ex['text'].decode('utf-8')
      for y0, x0, y1, x1 in ex['crops']['bbox']:
        pd.rectangle(
            [x0 * w * scale, y0 * h * scale, x1 * w * scale, y1 * h * scale],
            outline=REFERENCE_COLOUR,
            width=1,
        )
      for model, colour in ((base, BASE_COLOUR), (full, FULL_COLOUR)):
        if model is not None:
          crop = model.crop(image, text, top_k=1)[0]
          pd.rectangle([v * scale for v in crop.box], outline=colour, width=3)
      px, py = pad + col * (cell + pad), y + row * (panel_h + pad)
      sheet.paste(panel, (px, py))
      lines = textwrap.wrap(f'"{text}"', wrap)[:caption_lines]
      if per_example is not None and i < len(per_example):
        lines.append(f'full IoU-Mean {per_example[i]:.2f}')
      for j, line in enumerate(lines):  # right under the panel (landscape panels are shorter)
        draw.text((px, py + panel.height + 4 + j * line_h), line, fill=(0, 0, 0), font=font)
    y += math.ceil(len(indices) / cols) * (panel_h + pad)
  path = out or workdir / EXAMPLES_FILE
  buf = io.BytesIO()
  sheet.save(buf, format='PNG')
  fileio.atomic_write_bytes(path, buf.getvalue())
  return path


def _std(values: np.ndarray) -> float:
  """Sample standard deviation over seeds; NaN for a single seed."""
  return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def _pm(mean: float, std: float) -> str:
  return f'{mean:.4f}' if math.isnan(std) else f'{mean:.4f} ± {std:.4f}'


def _class_size(agg: dict[str, Any], kind: str) -> int:
  """Pooled examples of caption class `kind`."""
  return next(iter(agg['by_class'][kind]['rows'].values()))['num_examples']


def _interval_text(iv: dict[str, float] | None) -> str:
  if not iv:
    return ''
  return f'{iv["difference"]:+.3f} [{iv["low"]:+.3f}, {iv["high"]:+.3f}]'


def write_report(
    c: ml_collections.ConfigDict, workdir: pathlib.Path, result: dict[str, Any]
) -> pathlib.Path:
  """WORK/report.md from `result` (see `run`)."""
  name, split = c.eval.datasets[0]
  seeds = result['seeds']
  per_seed = result['per_seed']
  agg = result
  n = int(agg['rows'][next(iter(agg['rows']))]['num_examples'])
  val = c.pipeline.validation_split
  lines = [
      '# ClipCrop on the synthetic set (embedded default)',
      '',
      f'Dataset `{name}` (data seed = training seed; seeds {", ".join(map(str, seeds))}'
      f'{", quick budgets" if c.pipeline.quick else ""}). Test split `{split}`: {n} (image, '
      'text) examples per seed: two far-apart salient objects per image and a caption for each '
      "('one name' \"the red circle\" or 'relation' \"the red circle to the left of the blue "
      'square", which names the other target too), plus one naming both (\'two targets\' "the '
      'red circle and the blue square"); four reference crops per caption. Every choice was '
      f'made on `{val}` (disjoint images, same generator); `{split}` was evaluated once, at the '
      'end, with the chosen settings.',
      '',
      f'## Test split: top-1 crop vs the reference crops ({len(seeds)} seed'
      f'{"s" if len(seeds) > 1 else ""}' + (', mean ± std over seeds)' if len(seeds) > 1 else ')'),
      '',
      '| method | IoU-Mean | IoU-Max |',
      '|---|---:|---:|',
  ]
  for r, m in agg['rows'].items():
    s = agg['rows_std'][r]
    lines.append(
        f'| {ROW_NAMES[r]} | {_pm(m["iou_mean"], s["iou_mean"])} | '
        f'{_pm(m["iou_max"], s["iou_max"])} |'
    )
  if agg['intervals']:
    pooled = next(iter(agg['intervals'].values()))['num_examples']
    lines += [
        '',
        '## ClipCrop (full) against every other row',
        '',
        f'IoU-Mean difference, full minus row, with a paired bootstrap 95 % interval '
        f'({BOOTSTRAP_RESAMPLES} resamples; the {pooled} per-example differences pooled '
        'over seeds, the captions of an image resampled together). A claim is made '
        'only where the interval excludes 0.',
        '',
        '| row | full − row | 95 % interval |',
        '|---|---:|---:|',
    ]
    for r, iv in agg['intervals'].items():
      lines.append(
          f'| {ROW_NAMES[r]} | {iv["difference"]:+.4f} | '
          f'[{iv["low"]:+.4f}, {iv["high"]:+.4f}] |'
      )
    lines += [''] + [f'- {claim(r, iv)}' for r, iv in agg['intervals'].items()]
  if agg.get('by_class'):
    classes = list(agg['by_class'])
    lines += [
        '',
        '## Per caption class',
        '',
        'IoU-Mean per class (mean ± std over seeds) and, for ClipCrop (full) against each '
        'row, the paired bootstrap 95 % interval of the difference within the class.',
        '',
        '| method | '
        + ' | '.join(f'{CAPTION_CLASSES[k]} ({_class_size(agg, k)})' for k in classes)
        + ' | overall |',
        '|---|' + '---:|' * (len(classes) + 1),
    ]
    for r in agg['rows']:
      cells = [
          _pm(
              agg['by_class'][k]['rows'][r]['iou_mean'],
              agg['by_class'][k]['rows'][r]['iou_mean_std'],
          )
          for k in classes
      ]
      lines.append(
          f'| {ROW_NAMES[r]} | '
          + ' | '.join(cells)
          + f' | {_pm(agg["rows"][r]["iou_mean"], agg["rows_std"][r]["iou_mean"])} |'
      )
    lines += [
        '',
        '| full − row | ' + ' | '.join(CAPTION_CLASSES[k] for k in classes) + ' | overall |',
        '|---|' + '---:|' * (len(classes) + 1),
    ]
    for r, iv in agg['intervals'].items():
      cells = [_interval_text(agg['by_class'][k]['intervals'].get(r)) for k in classes]
      lines.append(f'| {ROW_NAMES[r]} | ' + ' | '.join(cells) + f' | {_interval_text(iv)} |')
  lines += [
      '',
      f'## Chosen on the validation split `{val}`',
      '',
      f'`fuse_top_k` (box voting over the k highest-quality crops) per variant and seed, '
      f'chosen among {tuple(sorted(c.pipeline.fuse_top_k_choices))} by IoU-Mean on `{val}`; '
      'quality↔IoU: mean over examples of the Spearman correlation between the predicted '
      'quality of every crop and its IoU-Mean with the references (how well the quality '
      'head ranks its own crops).',
      '',
      '| variant | fuse_top_k (per seed) | IoU-Mean (validation, chosen k) | quality↔IoU '
      'rank correlation |',
      '|---|---|---:|---:|',
  ]
  for mode in c.pipeline.variants:
    ks = [str(s['validation'][mode]['fuse_top_k']) for s in per_seed]
    if mode == 'full' and per_seed[0].get('union_validation'):
      for union in c.pipeline.selection_union_choices:
        uv = [s['union_validation'][union] for s in per_seed]
        um = np.array([u['iou_mean'] for u in uv])
        uc = np.array([u['quality_iou_srcc'] for u in uv])
        lines.append(
            f'| ClipCrop-full, selection_union={union!r} | '
            f'{", ".join(str(u["fuse_top_k"]) for u in uv)} | '
            f'{_pm(float(um.mean()), _std(um))} | {_pm(float(uc.mean()), _std(uc))} |'
        )
    vm = np.array([s['validation'][mode]['iou_mean'] for s in per_seed])
    vc = np.array([s['validation'][mode]['quality_iou_srcc'] for s in per_seed])
    lines.append(
        f'| ClipCrop-{mode} | {", ".join(ks)} | {_pm(float(vm.mean()), _std(vm))} | '
        f'{_pm(float(vc.mean()), _std(vc))} |'
    )
  if per_seed[0].get('union_validation'):
    lines += [
        '',
        f'`selection_union` (which selections make the union box the crops start from: '
        "'all' is the paper's Eq. 3, 'subject' the caption and its subject keywords, the "
        'context keywords reaching the decoder as role-tagged tokens), chosen per seed among '
        f"{tuple(c.pipeline.selection_union_choices)} by ClipCrop (full)'s IoU-Mean on "
        f'`{val}`: '
        + ', '.join(f'seed {s["seed"]}: {s["selection_union"]!r}' for s in per_seed)
        + '. Every other variant of a seed is '
        'trained with its choice.',
    ]
  lines += [
      '',
      f'Fixed in `configs/synthetic.py`, chosen on `{val}` (`docs/embedded_benchmark.md`; '
      '`tools/select_on_validation.py`): the quality objective '
      f'(`loss.quality_loss={c.loss.quality_loss!r}`, '
      f'`loss.quality_target={c.loss.quality_target!r}`), the positives '
      f'(`loss.positive_threshold={c.loss.positive_threshold}`) and the selection filter '
      f'(`loss.selection_filter={c.loss.selection_filter}`). Step budgets and loss weights '
      'were not re-tuned.',
      '',
      '## OWL-ViT grounding (trained from scratch on the synthetic detection boxes)',
      '',
      '| seed | split | accuracy | chance | mean top-box IoU | objects |',
      '|---|---|---:|---:|---:|---:|',
  ]
  for s in per_seed:
    for split_name, g in s['grounding'].items():
      lines.append(
          f'| {s["seed"]} | {split_name} | {g["accuracy"]:.4f} | {g["chance"]:.4f} | '
          f'{g["mean_top_iou"]:.4f} | {int(g["num_objects"])} |'
      )
  lines += [
      '',
      "Accuracy: the top-scoring token for an object's name has IoU >= 0.5 with that "
      'object; chance: a uniformly random token.',
      '',
      '## Time per stage (s, all seeds)',
      '',
      '| stage | seconds |',
      '|---|---:|',
  ]
  lines += [f'| {k} | {v:.1f} |' for k, v in result['timings'].items()]
  lines += ['', f'![examples]({EXAMPLES_FILE})', '']
  path = workdir / REPORT_FILE
  fileio.atomic_write_text(path, '\n'.join(lines))
  return path


# ------------------------------------------------------------------------------------------------
# The run.
# ------------------------------------------------------------------------------------------------


def run_seed(
    c: ml_collections.ConfigDict, work: pathlib.Path, timings: dict[str, float]
) -> tuple[dict[str, Any], dict[str, tuple[ml_collections.ConfigDict, Any]]]:
  """The five stages for one seed's config (`seed_config`) in `work`; adds to `timings`."""
  work.mkdir(parents=True, exist_ok=True)

  def timed(stage, fn, *args):
    t = time.time()
    value = fn(*args)
    timings[stage] = timings.get(stage, 0.0) + time.time() - t
    return value

  val = c.pipeline.validation_split
  timed('1. build dataset', ensure_dataset, c.dataset.name, c.dataset.data_dir)
  owlvit_ckpt, grounding = timed(
      '2. OWL-ViT detection training + grounding eval', train_owlvit, c, work
  )
  trained: Trained = {}
  union_validation: dict[str, dict[str, Any]] = {}
  union = c.pipeline.selection_union_choices[0]
  if 'full' in c.pipeline.variants:  # full once per union choice; the best on validation wins
    candidates = timed(
        '3a. ClipCrop (full) training per selection_union',
        train_full_candidates,
        c,
        work,
        owlvit_ckpt,
    )
    union_validation = timed(
        f'4a. choices on {val} (fuse_top_k, selection_union)',
        choose_on_validation,
        c,
        work,
        candidates,
    )
    union = choose_selection_union(c, union_validation)
    trained['full'] = candidates[union]
  others = [m for m in c.pipeline.variants if m != 'full']
  trained.update(
      timed(
          '3b. ClipCrop training (' + ', '.join(others) + ')',
          train_variants,
          c,
          work,
          owlvit_ckpt,
          union,
          others,
      )
  )
  validation = timed(
      f'4b. choices on {val} (fuse_top_k)',
      choose_on_validation,
      c,
      work,
      {m: t for m, t in trained.items() if m != 'full'},
  )
  if 'full' in trained:
    validation['full'] = union_validation[union]
  validation = {m: validation[m] for m in c.pipeline.variants}
  rows = timed(
      f'5. evaluation on {c.eval.datasets[0][1]}',
      evaluate_all,
      c,
      work,
      trained,
      {m: v['fuse_top_k'] for m, v in validation.items()},
  )
  image_ids, caption_kinds = split_examples(c, c.eval.datasets[0][1])
  per_example = {r: m.pop('per_example_iou_mean') for r, m in rows.items()}
  for m in rows.values():
    m.pop('quality_iou_srcc', None)  # reported on validation, not on the test split
  result = dict(
      seed=c.seed,
      rows=rows,
      grounding=grounding,
      validation=validation,
      selection_union=union,
      union_validation=union_validation,
      folders={m: t[2] for m, t in trained.items()},
      per_example=per_example,
      image_ids=image_ids,
      caption_kinds=caption_kinds,
  )
  return result, trained


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs every seed's stages and writes the report; returns the summary (WORK/summary.json).

  `config` (configs/synthetic.py) is not modified.
  """
  c = ml_collections.ConfigDict(copy.deepcopy(config.to_dict()))
  work = pathlib.Path(workdir)
  work.mkdir(parents=True, exist_ok=True)
  if not c.dataset.data_dir:
    c.dataset.data_dir = str(work / 'data')
  seeds = [c.seed + i for i in range(int(c.pipeline.num_seeds))]
  timings: dict[str, float] = {}
  per_seed = []
  for i, seed in enumerate(seeds):
    sc = seed_config(c, seed)
    seed_work = work if len(seeds) == 1 else work / f'seed_{seed}'
    logging.info(
        'Seed %d (%d of %d): dataset %s, workdir %s',
        seed,
        i + 1,
        len(seeds),
        sc.dataset.name,
        seed_work,
    )
    result, trained = run_seed(sc, seed_work, timings)
    per_seed.append(result)
    if i == 0 and 'full' in trained:
      t = time.time()
      write_examples_png(
          sc,
          seed_work,
          result['per_example'].get('clipcrop_full'),
          out=work / EXAMPLES_FILE,
          full_dir=trained['full'][2],
      )
      timings['6. examples.png'] = time.time() - t
  timings['total'] = sum(timings.values())
  summary = dict(
      aggregate(per_seed),
      seeds=seeds,
      per_seed=per_seed,
      timings=timings,
      grounding=per_seed[0]['grounding'],
      seed=c.seed,
      quick=c.pipeline.quick,
  )
  report = write_report(c, work, summary)
  fileio.atomic_write_text(work / SUMMARY_FILE, json.dumps(summary, indent=1, default=float))
  logging.info('Report: %s\n%s', report, report.read_text())
  print(report.read_text())
  return summary
