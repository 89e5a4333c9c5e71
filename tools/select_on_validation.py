r"""Compares training settings of one ClipCrop variant on the validation split (never the test split).

  python tools/select_on_validation.py --workdir=WORK --config=configs/synthetic.py:quick \
      --candidate paper: \
      --candidate pairwise_iou:loss.quality_loss=pairwise,loss.quality_target=iou \
      --candidate listwise_iou:loss.quality_loss=listwise,loss.quality_target=iou

Runs (or resumes) the embedded default's stages 1-2 in WORK (dataset, OWL-ViT), then for every
`--candidate NAME:key=value,...` (config overrides, values as Python literals or plain text)
trains ClipCrop-<--mode> in WORK/select/NAME/ and evaluates it on `pipeline.validation_split`
(`ambiguity_validation`), printing one Markdown row per candidate: IoU-Mean with
`fuse_top_k` = 1, the best `fuse_top_k` of `pipeline.fuse_top_k_choices` and its IoU-Mean, and
the quality<->IoU rank correlation. The table also goes to WORK/select/selection.md, the numbers
to WORK/select/selection.json. Re-running resumes every candidate's training.

This is how the embedded default's quality objective and budgets were chosen (docs/embedded_benchmark.md); the test split is evaluated only by the pipeline itself.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import pathlib
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from clipcrop_jax import config_lib
from clipcrop_jax.owlvit import fileio


def parse_candidate(text: str) -> tuple[str, dict[str, object]]:
  """'NAME:a.b=1,c=x' -> ('NAME', {'a.b': 1, 'c': 'x'}) (values: Python literal, else text)."""
  name, sep, rest = text.partition(':')
  if not sep or not name.strip():
    raise ValueError(f'--candidate {text!r}: expected NAME:key=value,... (NAME: for none)')
  overrides = {}
  for item in (p.strip() for p in rest.split(',') if p.strip()):
    key, eq, value = (p.strip() for p in item.partition('='))
    if not eq or not key:
      raise ValueError(f'--candidate {text!r}: {item!r} is not key=value')
    try:
      overrides[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[key] = value
  return name.strip(), overrides


def apply_overrides(config, overrides: dict[str, object]):
  """A copy of `config` with the dotted `overrides` set (each key must exist)."""
  import ml_collections

  c = ml_collections.ConfigDict(config.to_dict())
  for key, value in overrides.items():
    *parents, leaf = key.split('.')
    node = c
    for part in parents:
      if part not in node:
        raise KeyError(f'unknown config field {key!r}')
      node = node[part]
    if leaf not in node:
      raise KeyError(f'unknown config field {key!r}')
    node[leaf] = tuple(value) if isinstance(value, list) else value
  return c


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--config', default='configs/synthetic.py:quick')
  parser.add_argument('--mode', default='full')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--candidate', action='append', required=True)
  args = parser.parse_args(argv)
  candidates = [parse_candidate(t) for t in args.candidate]

  from clipcrop_jax import config_validation
  from clipcrop_jax.experiments import synthetic_pipeline as sp
  from clipcrop_jax.training import clipcrop_task

  path, _, arg = args.config.partition(':')
  base = config_lib.load_config_file(path, arg or None)
  work = pathlib.Path(args.workdir)
  if not base.dataset.data_dir:
    base.dataset.data_dir = str(work / 'data')
  c = sp.seed_config(base, args.seed)
  sp.ensure_dataset(c.dataset.name, c.dataset.data_dir)
  owlvit_ckpt, _ = sp.train_owlvit(c, work)
  name = c.eval.datasets[0][0]
  split = c.pipeline.validation_split
  results = {}
  for cand, overrides in candidates:
    cc = apply_overrides(c, overrides)
    config_validation.validate_config(cc)
    v = sp.variant_config(cc, args.mode, owlvit_ckpt)
    out = work / 'select' / cand / f'clipcrop_{args.mode}'
    state = clipcrop_task.train(v, str(out))
    chosen = sp.validation_choice(cc, v, state, out)
    results[cand] = dict(
        overrides=overrides,
        iou_mean_by_k=chosen['iou_mean_by_k'],
        best_k=chosen['fuse_top_k'],
        quality_iou_srcc=chosen['quality_iou_srcc'],
    )
  lines = [
      f'ClipCrop-{args.mode} on `{name}` [{split}], seed {args.seed}',
      '',
      '| candidate | overrides | IoU-Mean (k=1) | best k | IoU-Mean (best k) | '
      'quality↔IoU SRCC |',
      '|---|---|---:|---:|---:|---:|',
  ]
  for cand, r in results.items():
    ov = ', '.join(f'{k}={v}' for k, v in r['overrides'].items()) or '(config)'
    lines.append(
        f'| {cand} | {ov} | {r["iou_mean_by_k"][min(r["iou_mean_by_k"])]:.4f} | {r["best_k"]} | '
        f'{r["iou_mean_by_k"][r["best_k"]]:.4f} | {r["quality_iou_srcc"]:.3f} |'
    )
  table = '\n'.join(lines) + '\n'
  fileio.atomic_write_text(work / 'select' / 'selection.md', table)
  fileio.atomic_write_text(
      work / 'select' / 'selection.json', json.dumps(results, indent=1, default=float)
  )
  print(table)
  return 0


if __name__ == '__main__':
  sys.exit(main())
