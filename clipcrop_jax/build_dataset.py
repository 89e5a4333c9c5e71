"""`python -m clipcrop_jax.build_dataset <tfds build arguments>`: TFDS's own `build` command.

  python -m clipcrop_jax.build_dataset datasets/gaic --config journal --manual_dir=RAW --data_dir=DATA
  python -m clipcrop_jax.build_dataset datasets/synthetic --data_dir=DATA

Same arguments and code path as `tfds build` (`tensorflow_datasets.scripts.cli.build`), without the
`tfds` entry point, which in tensorflow-datasets 4.9.x imports apache_beam and mlcroissant at
start-up and fails without them (neither is needed to build these datasets). With those two
packages installed, `tfds build datasets/<name> ...` works identically.

Errors print one `error: ...` line on stderr, without a traceback:
  exit code 1  bad raw data (`features.BadDataError`, naming the file and line; set
               CLIPCROP_SKIP_BAD_DATA=1 to skip and count bad items instead);
  exit code 2  a bad command line: `--manual_dir` missing, not a folder or empty, an unknown
               dataset folder or builder config, a bad CLIPCROP_SKIP_BAD_DATA value.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging as python_logging
import os
import sys

BAD_DATA_EXIT_CODE = 1
USAGE_EXIT_CODE = 2


def _fail(message: str, code: int) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(code)


def _manual_dir_problem(manual_dir) -> str | None:
  """Why `--manual_dir` cannot hold raw files (None when it can, or when not given)."""
  if not manual_dir:
    return None
  path = os.path.expanduser(os.fspath(manual_dir))
  hint = 'see the dataset README for its raw files'
  if not os.path.isdir(path):
    return f'--manual_dir={manual_dir}: no such folder ({hint})'
  if not os.listdir(path):
    return f'--manual_dir={manual_dir}: the folder is empty ({hint})'
  return None


def _dataset_problem(dataset: str) -> str | None:
  """A path-like dataset argument ('datasets/gaic') whose folder does not exist.

  ('gaic/journal' beside a builder folder gaic/gaic.py is TFDS's name/config form: left to TFDS.)
  """
  head = dataset.split('/')[0]
  if (
      '/' in dataset
      and os.path.isdir(head)
      and not os.path.exists(dataset)
      and not os.path.isfile(os.path.join(head, f'{head}.py'))
  ):
    return f'{dataset}: no such dataset folder (the builders are in datasets/)'
  return None


def execute(args) -> None:
  """Runs the parsed `tfds build` arguments; known failures exit with one `error:` line."""
  from tensorflow_datasets.core import registered  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.data import features  # pylint: disable=g-import-not-at-top

  problems = [_dataset_problem(d) for d in list(args.positional_datasets) + list(args.datasets)]
  problems.append(_manual_dir_problem(args.paths.manual_dir))
  for problem in problems:
    if problem:
      _fail(problem, USAGE_EXIT_CODE)
  try:
    args.execute()
  except features.BadDataError as e:
    _fail(str(e), BAD_DATA_EXIT_CODE)
  except (registered.DatasetNotFoundError, registered.DatasetCollectionNotFoundError) as e:
    _fail(str(e).splitlines()[0], USAGE_EXIT_CODE)
  except AssertionError as e:  # TFDS asserts that a manual dataset's manual_dir holds files
    first = str(e).splitlines()[0] if str(e) else ''
    if not first.startswith('Manual directory'):
      raise
    _fail(
        first.split(' Create it')[0] + ' (pass --manual_dir=<raw files>; see the dataset '
        'README)',
        USAGE_EXIT_CODE,
    )
  except ValueError as e:  # an unknown --config name, a bad CLIPCROP_SKIP_BAD_DATA value
    if 'BuilderConfig' not in str(e) and 'CLIPCROP_SKIP_BAD_DATA' not in str(e):
      raise
    message = ' '.join(str(e).split())
    _fail(
        message.removesuffix(' Here are 10 BuilderConfigs whose name closely match:'),
        USAGE_EXIT_CODE,
    )


def main() -> None:
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.scripts.cli import build  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.scripts.cli import cli_utils  # pylint: disable=g-import-not-at-top

  def run(args) -> None:
    logging.use_python_logging(quiet=True)  # the `tfds` CLI's log set-up
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().python_handler.setFormatter(
        python_logging.Formatter('{levelname}[{filename}]: {message}', style='{')
    )
    execute(args)

  app.run(
      run,
      flags_parser=cli_utils.make_flags_parser(
          build.Args, description='tfds build (clipcrop-jax entry point)'
      ),
  )


if __name__ == '__main__':
  main()
