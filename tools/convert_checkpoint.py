"""Converts any supported OWL-ViT checkpoint to a Scenic msgpack file in the current layout.

Inputs: a Scenic msgpack file (v1 `optimizer/target`, v2 `params` or current layout), a Hugging
Face OWL-ViT / OWLv2 directory (config.json + model.safetensors) or the .safetensors file itself.
The output is a single-file Flax msgpack with `{'params': ...}`, `resblocks_N` and `ln_0/ln_1`.

Usage:
  python tools/convert_checkpoint.py --input google-owlv2-base-patch16/ --output owl2_b16.msgpack
  python tools/convert_checkpoint.py --input clip_vit_b32_b0203fc --output b32.msgpack \
      --config clip_b32

An existing --output is replaced only with --overwrite (atomically), and never when it is the
--input itself.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from clipcrop_jax.owlvit import checkpoints
from clipcrop_jax.owlvit import fileio


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  """Parses the command line."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      '--input', required=True, help='Scenic msgpack file, HF directory or .safetensors file.'
  )
  parser.add_argument('--output', required=True, help='Output .msgpack file.')
  parser.add_argument(
      '--config', default=None, help='Expected config name (e.g. clip_b32); default: inferred.'
  )
  parser.add_argument(
      '--layout',
      default='current',
      choices=('current', 'v2', 'v1'),
      help='Layout of the written file (default: current).',
  )
  parser.add_argument(
      '--overwrite',
      action='store_true',
      help='Replace an existing --output file (never the --input).',
  )
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the conversion; returns a process exit code (0 ok, 1 checkpoint error, 2 usage)."""
  args = parse_args(argv)
  try:  # The output is checked before the (possibly long) load.
    fileio.check_output_file(
        args.output, inputs=[args.input], overwrite=args.overwrite, flag='--output'
    )
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  try:
    module, variables = checkpoints.load_checkpoint(args.input, args.config)
  except checkpoints.CheckpointError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  out = checkpoints.save_scenic_checkpoint(variables, args.output, layout=args.layout)
  count = checkpoints.param_count(variables['params'])
  print(f'config: {module.config.name}')
  if module.config.name == 'custom':
    print(f'architecture: {module.config}')
  print(f'parameters: {count:,}')
  print(f'wrote: {out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
