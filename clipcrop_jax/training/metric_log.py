"""Training metrics: TensorBoard summaries (clu) and `<workdir>/metrics.jsonl`, one record per
(step, kind); a resumed run drops the records of steps after the one it resumes from.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Callable, Optional

from absl import logging
import jax

from clipcrop_jax.owlvit import fileio

METRICS_FILE = 'metrics.jsonl'


def _rewrite_jsonl(path: pathlib.Path, keep: Callable[[dict[str, Any]], bool]) -> int:
  """Atomically rewrites a JSONL file with the records `keep` accepts; returns how many it dropped.

  A line that does not parse (torn by a killed process) is dropped too.
  """
  if not path.is_file():
    return 0
  text = path.read_text(encoding='utf-8')
  kept, dropped = [], 0
  for line in text.splitlines():
    if not line.strip():
      continue
    try:
      ok = bool(keep(json.loads(line)))
    except (ValueError, KeyError, TypeError):
      ok = False
    if ok:
      kept.append(line + '\n')
    else:
      dropped += 1
  if dropped or (text and not text.endswith('\n')):
    fileio.atomic_write_text(path, ''.join(kept))
  return dropped


class MetricLogger:
  """TensorBoard (clu metric writers) + `<workdir>/metrics.jsonl`; only process 0 writes files.

  `resume_step`: the step training goes on from. Records of later steps in metrics.jsonl (written
  by an interrupted run after its last usable checkpoint; this run writes them again) are dropped,
  so that the file holds one record per (step, kind). TensorBoard event files are append-only:
  they keep both (TensorBoard shows the newest).
  """

  def __init__(self, workdir: str, resume_step: Optional[int] = None):
    self.is_main = jax.process_index() == 0
    self.jsonl = pathlib.Path(workdir) / METRICS_FILE if self.is_main else None
    if self.jsonl is not None and resume_step is not None:
      dropped = _rewrite_jsonl(self.jsonl, lambda r: int(r['step']) <= resume_step)
      if dropped:
        logging.info(
            '%s: dropped %d record(s) after step %d (the interrupted run wrote them '
            'after its last usable checkpoint; they are written again)',
            self.jsonl,
            dropped,
            resume_step,
        )
    try:
      from clu import metric_writers  # pylint: disable=g-import-not-at-top

      self.writer = metric_writers.create_default_writer(
          workdir, just_logging=not self.is_main, asynchronous=False
      )
    except ImportError:  # clu / tensorboard not installed: JSONL only
      logging.warning(
          'clu is not installed: no TensorBoard summaries (pip install ' '"clipcrop-jax[train]")'
      )
      self.writer = None

  def write(
      self, step: int, scalars: dict[str, float], kind: str = 'train', replace: bool = False
  ) -> None:
    """Logs `scalars` at `step`; `replace` first drops an earlier (step, kind) record."""
    scalars = {k: float(v) for k, v in scalars.items()}
    if self.writer is not None:
      self.writer.write_scalars(step, {f'{kind}/{k}': v for k, v in scalars.items()})
    if self.jsonl is not None:
      if replace:
        _rewrite_jsonl(self.jsonl, lambda r: (r['step'], r['kind']) != (step, kind))
      with self.jsonl.open('a') as f:
        f.write(json.dumps({'step': step, 'kind': kind, **scalars}) + '\n')

  def close(self) -> None:
    if self.writer is not None:
      self.writer.flush()
      self.writer.close()
