"""`python -m clipcrop_jax.build_dataset <tfds build arguments>`: TFDS's own `build` command.

  python -m clipcrop_jax.build_dataset datasets/gaic --config journal --manual_dir=RAW --data_dir=DATA
  python -m clipcrop_jax.build_dataset datasets/synthetic --data_dir=DATA

Same arguments and code path as `tfds build` (`tensorflow_datasets.scripts.cli.build`), without the
`tfds` entry point, which in tensorflow-datasets 4.9.x imports apache_beam and mlcroissant at
start-up and fails without them (neither is needed to build these datasets). With those two
packages installed, `tfds build datasets/<name> ...` works identically.
"""

from __future__ import annotations

import logging as python_logging


def main() -> None:
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.scripts.cli import build  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.scripts.cli import cli_utils  # pylint: disable=g-import-not-at-top

  def run(args) -> None:
    logging.use_python_logging(quiet=True)  # the `tfds` CLI's log set-up
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().python_handler.setFormatter(
        python_logging.Formatter('{levelname}[{filename}]: {message}', style='{'))
    args.execute()

  app.run(run, flags_parser=cli_utils.make_flags_parser(
      build.Args, description='tfds build (clipcrop-jax entry point)'))


if __name__ == '__main__':
  main()
