r"""Keyword roles on a set of captions: counts and a sample table (markdown), for the docs.

  python tools/keyword_roles.py CAPTIONS.json [MORE.json ...] [--sample 30] [--seed 0] \
      [--pipeline rules]

Each file is a JSON object {image file: caption} (the layout of the released ClipCrop GAIC
captions, GAIC-Text-Annotations/{train,valid,test}.json) or a list of captions. Prints how many
captions have a subject, a context keyword, several subjects, a framing phrase dropped, ...;
the role counts; and `--sample` random captions with their queries and roles.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clipcrop_jax import keywords  # pylint: disable=g-import-not-at-top,wrong-import-position


def read_captions(paths: list[str]) -> list[str]:
  captions = []
  for path in paths:
    with open(path, encoding='utf-8') as f:
      data = json.load(f)
    values = data.values() if isinstance(data, dict) else data
    captions.extend(v for v in values if isinstance(v, str) and v.strip())
  return captions


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('files', nargs='+')
  parser.add_argument('--sample', type=int, default=30)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--pipeline', default=keywords.DEFAULT_PIPELINE)
  args = parser.parse_args(argv)
  captions = read_captions(args.files)
  roles = [keywords.extract_keyword_roles(c, args.pipeline) for c in captions]
  count = collections.Counter()
  for caption, found in zip(captions, roles):
    subjects = sum(k.role == 'subject' for k in found)
    contexts = sum(k.role == 'context' for k in found)
    count['captions'] += 1
    count['keywords: subject'] += subjects
    count['keywords: context'] += contexts
    count['captions with no keyword'] += not found
    count['captions with one subject'] += subjects == 1
    count['captions with several subjects'] += subjects > 1
    count['captions with context'] += contexts > 0
  print(f'pipeline: {args.pipeline}; {len(captions)} captions from {len(args.files)} file(s)\n')
  print('| count | value |\n|---|---|')
  for key, value in count.items():
    print(f'| {key} | {value} |')
  rng = random.Random(args.seed)
  picked = sorted(rng.sample(range(len(captions)), min(args.sample, len(captions))))
  print('\n| caption | subject | context |\n|---|---|---|')
  for i in picked:
    subject = '; '.join(k.text for k in roles[i] if k.role == 'subject')
    context = '; '.join(k.text for k in roles[i] if k.role == 'context')
    print(f'| {captions[i]} | {subject} | {context} |')
  return 0


if __name__ == '__main__':
  sys.exit(main())
