"""The embedded default: the whole pipeline learns text-conditioned cropping on a CPU in minutes.

`python -m clipcrop_jax.main --config=configs/synthetic.py --workdir=WORK` runs, with no download:
  1. build the synthetic TFDS dataset (`datasets/synthetic`) in `dataset.data_dir` if missing;
  2. train a small OWL-ViT from scratch on its detection annotations (object boxes + names such as
     'red circle'; `clipcrop_jax.detection_train`) -> WORK/owlvit/owlvit_checkpoint.msgpack, and
     measure its grounding accuracy (top token of an object's name hits the object, IoU >= 0.5);
  3. train ClipCrop on the crop annotations with that (frozen) encoder in modes full, base, main
     and key (`clipcrop_jax.train_lib`) -> WORK/clipcrop_<mode>/;
  4. evaluate on the ambiguity split (two far-apart salient objects per image, one caption each):
     IoU-Mean / IoU-Max of full image, centre crop, OWL-ViT top box, union box, zero-shot crop and
     ClipCrop-base/main/key/full (`clipcrop_jax.evaluate`);
  5. write WORK/report.md (tables, grounding, timings) and WORK/examples.png (test images with
     both texts, reference crops and predicted crops).
Re-running resumes: finished stages are skipped (their checkpoints are in WORK).
`--config=configs/synthetic.py:quick` is the same with the `small` set and smaller budgets (tests).
"""

from __future__ import annotations

import copy
import io
import json
import pathlib
import subprocess
import sys
import time
from typing import Any

from absl import logging
import jax
import ml_collections

from clipcrop_jax import evaluate
from clipcrop_jax import export
from clipcrop_jax import fileio
from clipcrop_jax import input_pipeline
from clipcrop_jax import metrics as metrics_lib
from clipcrop_jax import sharding as sharding_lib
from clipcrop_jax import train_lib

REPORT_FILE = 'report.md'
EXAMPLES_FILE = 'examples.png'
SUMMARY_FILE = 'summary.json'
ROW_ORDER = ('full_image', 'centre_crop', 'owlvit_top_box', 'union_box', 'zero_shot',
             'clipcrop_base', 'clipcrop_main', 'clipcrop_key', 'clipcrop_full')
ROW_NAMES = {
    'full_image': 'Full image', 'centre_crop': 'Centre crop (mean size)',
    'owlvit_top_box': 'OWL-ViT top box', 'union_box': 'Union box', 'zero_shot': 'Zero-shot crop',
    'clipcrop_base': 'ClipCrop-base', 'clipcrop_main': 'ClipCrop-main',
    'clipcrop_key': 'ClipCrop-key', 'clipcrop_full': 'ClipCrop (full)'}


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
  folder = pathlib.Path(__file__).resolve().parents[1] / 'datasets' / 'synthetic'
  source = folder / 'synthetic.py'
  if not source.is_file():
    raise FileNotFoundError(f'{source} not found: the synthetic builder lives in the source '
                            'checkout (pip install -e . from the repository)')
  logging.info('Building %s into %s ...', name, data_dir)
  # The same command as `tfds build datasets/synthetic` (see clipcrop_jax.build_dataset).
  cmd = [sys.executable, '-m', 'clipcrop_jax.build_dataset', str(folder), '--config',
         name.split('/')[1], '--data_dir', data_dir]
  result = subprocess.run(cmd, check=False, capture_output=True, text=True)
  if result.returncode:
    raise RuntimeError(f'building {name} failed ({" ".join(cmd)}):\n{result.stderr[-3000:]}')


# ------------------------------------------------------------------------------------------------
# Stage 2: OWL-ViT.
# ------------------------------------------------------------------------------------------------


def train_owlvit(c: ml_collections.ConfigDict, workdir: pathlib.Path) -> tuple[str, dict]:
  """Trains the detector; returns (checkpoint path, grounding results on val and ambiguity)."""
  from clipcrop_jax import detection_train  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.owlvit import checkpoints as owl_ckpt  # pylint: disable=g-import-not-at-top
  det = ml_collections.ConfigDict(c.pipeline.owlvit.to_dict())
  det.seed = c.seed
  det.dataset.data_dir = c.dataset.data_dir
  det.eval.split = ''  # evaluated below, on two splits
  out = workdir / 'owlvit'
  ckpt = out / 'owlvit_checkpoint.msgpack'
  if not ckpt.is_file():
    detection_train.train_detection(det, str(out))
  module, variables = owl_ckpt.load_checkpoint(ckpt, det.model.owlvit)
  builder = input_pipeline.dataset_builder(c.dataset.name, c.dataset.data_dir)
  grounding = {}
  for split in ('validation', 'ambiguity'):
    grounding[split] = detection_train.evaluate_grounding(
        module, variables, builder, split, batch_size=det.eval.batch_size,
        max_objects=det.dataset.max_objects, max_labels=det.dataset.max_labels,
        label_key=det.dataset.label_key)
    logging.info('OWL-ViT grounding on %s: %s', split, grounding[split])
  return str(ckpt), grounding


# ------------------------------------------------------------------------------------------------
# Stage 3: ClipCrop variants.
# ------------------------------------------------------------------------------------------------


def variant_config(c: ml_collections.ConfigDict, mode: str, owlvit_ckpt: str
                   ) -> ml_collections.ConfigDict:
  v = ml_collections.ConfigDict(c.to_dict())
  v.model.mode = mode
  v.init_from.owlvit = owlvit_ckpt
  v.num_train_steps = int(c.pipeline.variant_steps[mode])
  v.run = 'train'
  return v


def train_variants(c: ml_collections.ConfigDict, workdir: pathlib.Path, owlvit_ckpt: str
                   ) -> dict[str, tuple[ml_collections.ConfigDict, Any]]:
  """Trains every `pipeline.variants` mode; returns {mode: (config, final state)}."""
  out = {}
  for mode in c.pipeline.variants:
    v = variant_config(c, mode, owlvit_ckpt)
    logging.info('Training ClipCrop-%s for %d steps', mode, v.num_train_steps)
    out[mode] = (v, train_lib.train(v, str(workdir / f'clipcrop_{mode}')))
  return out


# ------------------------------------------------------------------------------------------------
# Stage 4: evaluation.
# ------------------------------------------------------------------------------------------------


def evaluate_all(c: ml_collections.ConfigDict, workdir: pathlib.Path,
                 trained: dict[str, tuple[ml_collections.ConfigDict, Any]]) -> dict[str, dict]:
  """{row name: metrics} on the ambiguity split: baselines (with the full model's encoder, which
  every variant shares) and every ClipCrop variant."""
  name, split = c.eval.datasets[0]
  rows: dict[str, dict] = {}
  for mode, (v, state) in trained.items():
    ve = ml_collections.ConfigDict(v.to_dict())
    ve.eval.baselines = tuple(b for b in c.eval.baselines if b != 'clipcrop_base') if (
        mode == 'full') else ()
    mesh = sharding_lib.mesh_of(state.params)
    summary = evaluate.evaluate_dataset(ve, state.params, mesh, name, split,
                                        str(workdir / f'clipcrop_{mode}'),
                                        int(jax.device_get(state.step)))
    for method, result in summary['methods'].items():
      rows['clipcrop_' + mode if method == 'clipcrop' else method] = result
  return {k: rows[k] for k in ROW_ORDER if k in rows}


# ------------------------------------------------------------------------------------------------
# Stage 5: report.
# ------------------------------------------------------------------------------------------------


def write_examples_png(c: ml_collections.ConfigDict, workdir: pathlib.Path,
                       num_images: int = 6) -> pathlib.Path:
  """A grid: one row per ambiguity image, one panel per caption, with the caption's reference
  crops (thin green), ClipCrop (full)'s top crop (red) and ClipCrop-base's (blue; the same for
  both captions, since base ignores the text)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  from clipcrop_jax import cropper as cropper_lib  # pylint: disable=g-import-not-at-top
  full = cropper_lib.ClipCropper.load(workdir / 'clipcrop_full' / export.EXPORT_DIR)
  base_dir = workdir / 'clipcrop_base' / export.EXPORT_DIR
  base = cropper_lib.ClipCropper.load(base_dir) if base_dir.is_dir() else None
  builder = input_pipeline.dataset_builder(c.dataset.name, c.dataset.data_dir)
  pairs: dict[bytes, list] = {}  # one row per image: its two captions side by side
  for ex in tfds.as_numpy(builder.as_dataset(split='ambiguity', shuffle_files=False)):
    pairs.setdefault(ex['image/filename'], []).append(ex)
    if sum(len(v) == 2 for v in pairs.values()) == num_images:
      break
  examples = [ex for v in pairs.values() if len(v) == 2 for ex in v][:2 * num_images]
  num_images = len(examples) // 2
  cell = 220
  sheet = Image.new('RGB', (2 * cell + 30, num_images * (cell + 28) + 10), 'white')
  draw = ImageDraw.Draw(sheet)
  for k, ex in enumerate(examples):
    row, col = divmod(k, 2)
    image = ex['image']
    h, w = image.shape[:2]
    scale = cell / max(h, w)
    panel = Image.fromarray(image).resize((max(1, round(w * scale)), max(1, round(h * scale))))
    pd = ImageDraw.Draw(panel)
    text = ex['text'].decode('utf-8')
    for y0, x0, y1, x1 in ex['crops']['bbox']:
      pd.rectangle([x0 * w * scale, y0 * h * scale, x1 * w * scale, y1 * h * scale],
                   outline=(40, 200, 60), width=1)
    for model, colour in ((base, (60, 90, 255)), (full, (255, 30, 30))):
      if model is None:
        continue
      crop = model.crop(image, text, top_k=1)[0]
      pd.rectangle([v * scale for v in crop.box], outline=colour, width=3)
    x, y = 10 + col * (cell + 10), 10 + row * (cell + 28)
    sheet.paste(panel, (x, y + 18))
    draw.text((x, y), text[:40], fill=(0, 0, 0))
  path = workdir / EXAMPLES_FILE
  buf = io.BytesIO()
  sheet.save(buf, format='PNG')
  fileio.atomic_write_bytes(path, buf.getvalue())
  return path


def write_report(c: ml_collections.ConfigDict, workdir: pathlib.Path, rows: dict[str, dict],
                 grounding: dict[str, dict], timings: dict[str, float]) -> pathlib.Path:
  name, split = c.eval.datasets[0]
  table_rows = {ROW_NAMES[k]: {'IoU-Mean': v['iou_mean'], 'IoU-Max': v['iou_max']}
                for k, v in rows.items()}
  n = next(iter(rows.values()))['num_examples']
  full = rows.get('clipcrop_full', {}).get('iou_mean', float('nan'))
  others = {k: v['iou_mean'] for k, v in rows.items() if k != 'clipcrop_full'}
  best_other = max(others, key=others.get) if others else None
  lines = [
      '# ClipCrop on the synthetic set (embedded default)', '',
      f'Dataset `{name}`, split `{split}` ({int(n)} (image, text) examples: two far-apart '
      'salient objects per image, one caption each, four reference crops per caption). '
      f'Seed {c.seed}{", quick budgets" if c.pipeline.quick else ""}.', '',
      metrics_lib.format_markdown_table(table_rows, ['IoU-Mean', 'IoU-Max'],
                                        title='Top-1 crop vs the reference crops'), '']
  if best_other is not None:
    lines += [f'ClipCrop (full) IoU-Mean {full:.4f}; best other row: {ROW_NAMES[best_other]} '
              f'{others[best_other]:.4f} (margin {full - others[best_other]:+.4f}).', '']
  lines += ['## OWL-ViT grounding (trained from scratch on the synthetic detection boxes)', '',
            '| split | accuracy | chance | mean top-box IoU | objects |', '|---|---:|---:|---:|---:|']
  for split_name, g in grounding.items():
    lines.append(f'| {split_name} | {g["accuracy"]:.4f} | {g["chance"]:.4f} | '
                 f'{g["mean_top_iou"]:.4f} | {int(g["num_objects"])} |')
  lines += ['', 'Accuracy: the top-scoring token for an object\'s name has IoU >= 0.5 with that '
            'object; chance: a uniformly random token.', '', '## Time per stage (s)', '',
            '| stage | seconds |', '|---|---:|']
  lines += [f'| {k} | {v:.1f} |' for k, v in timings.items()]
  lines += ['', f'![examples]({EXAMPLES_FILE})', '']
  path = workdir / REPORT_FILE
  fileio.atomic_write_text(path, '\n'.join(lines))
  return path


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the five stages; returns the summary also written to WORK/summary.json.

  `config` (configs/synthetic.py) is not modified.
  """
  c = ml_collections.ConfigDict(copy.deepcopy(config.to_dict()))
  work = pathlib.Path(workdir)
  work.mkdir(parents=True, exist_ok=True)
  if not c.dataset.data_dir:
    c.dataset.data_dir = str(work / 'data')
  timings: dict[str, float] = {}
  t = time.time()
  ensure_dataset(c.dataset.name, c.dataset.data_dir)
  timings['1. build dataset'] = time.time() - t
  t = time.time()
  owlvit_ckpt, grounding = train_owlvit(c, work)
  timings['2. OWL-ViT detection training + grounding eval'] = time.time() - t
  t = time.time()
  trained = train_variants(c, work, owlvit_ckpt)
  timings['3. ClipCrop training (' + ', '.join(c.pipeline.variants) + ')'] = time.time() - t
  t = time.time()
  rows = evaluate_all(c, work, trained)
  timings['4. evaluation'] = time.time() - t
  t = time.time()
  if 'full' in trained:
    write_examples_png(c, work)
  timings['5. examples.png'] = time.time() - t
  timings['total'] = sum(timings.values())
  report = write_report(c, work, rows, grounding, timings)
  summary = dict(rows=rows, grounding=grounding, timings=timings, seed=c.seed,
                 quick=c.pipeline.quick)
  fileio.atomic_write_text(work / SUMMARY_FILE, json.dumps(summary, indent=1, default=float))
  logging.info('Report: %s\n%s', report, report.read_text())
  print(report.read_text())
  return summary
