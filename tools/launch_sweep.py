r"""Prints (and with --launch runs) one `python -m clipcrop_jax.main` command per run of a sweep.

  python tools/launch_sweep.py configs/gaic_ablation_sweep.py --workdir_root=WORK
  python tools/launch_sweep.py configs/gaic_ablation_sweep.py --workdir_root=WORK \
      --launch --parallel=2 -- \
      --config.dataset.data_dir=DATA

Everything after `--` is appended to every command. Each run's workdir is WORK/<run name> (the
overrides, e.g. `mode=base,seed=1`); a launched run logs to WORK/<run name>/sweep.log. The exit code
is nonzero when any launched run fails.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clipcrop_jax.experiments import sweeps as sweep_lib  # pylint: disable=g-import-not-at-top,wrong-import-position


def launch(
    cmds: list[tuple[str, list[str]]], workdir_root: str, parallel: int, popen=subprocess.Popen
) -> dict[str, int]:
  """Runs the commands, at most `parallel` at a time; returns {run name: exit code}."""
  pending, running, codes = list(cmds), {}, {}
  while pending or running:
    while pending and len(running) < max(1, parallel):
      name, argv = pending.pop(0)
      os.makedirs(os.path.join(workdir_root, name), exist_ok=True)
      log = open(os.path.join(workdir_root, name, 'sweep.log'), 'ab')  # pylint: disable=consider-using-with
      print(f'[sweep] start {name}', flush=True)
      try:
        running[name] = (popen(argv, stdout=log, stderr=subprocess.STDOUT), log)
      except OSError as e:  # e.g. the interpreter does not exist
        log.close()
        codes[name] = 127
        print(f'[sweep] FAILED to start {name}: {e}', flush=True)
    for name, (proc, log) in list(running.items()):
      code = proc.poll()
      if code is not None:
        log.close()
        codes[name] = code
        del running[name]
        print(f'[sweep] {"done" if code == 0 else f"FAILED (exit {code})"} {name}', flush=True)
    if running:
      time.sleep(0.2)
  return codes


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  extra = []
  if '--' in argv:
    i = argv.index('--')
    argv, extra = argv[:i], argv[i + 1 :]
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('sweep_file')
  parser.add_argument('--workdir_root', required=True)
  parser.add_argument('--launch', action='store_true', help='run the commands')
  parser.add_argument('--parallel', type=int, default=1, help='runs at a time with --launch')
  parser.add_argument(
      '--python',
      default=sys.executable if '--launch' in argv else 'python',
      help='interpreter in the commands',
  )
  args = parser.parse_args(argv)
  cmds = sweep_lib.commands(args.sweep_file, args.workdir_root, extra, python=args.python)
  for _, c in cmds:
    print(shlex.join(c))
  if not args.launch:
    return 0
  codes = launch(cmds, args.workdir_root, args.parallel)
  failed = sorted(n for n, c in codes.items() if c != 0)
  print(
      f'[sweep] {len(codes) - len(failed)}/{len(codes)} runs succeeded'
      + (f'; failed: {", ".join(failed)}' if failed else '')
  )
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
