"""A crop run's output folder and log: the folder checks, output names, and `crops.jsonl`.

The rules (a new or empty `--out`, `--overwrite` of an earlier run's own outputs only, no name
shared or written over, list runs resumed from their log) are the crop command's
(`clipcrop_jax.crop`, docs/safety.md); this module applies them. Errors are ValueError with one
line naming the flag.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import pathlib
from typing import Any, Optional, Sequence

from clipcrop_jax.owlvit import fileio

SUMMARY_FILE = 'crops.json'
LOG_FILE = 'crops.jsonl'


def output_names(paths: Sequence[Optional[pathlib.Path]]) -> list[str]:
  """A distinct output name per input (case-insensitively distinct, for any file system).

  The stem when it is free, else stem + '_' + extension (`x.png` -> `x_png`), else that + '_<n>'
  (n = 2, 3, ...); `None` (the built-in demo picture) is 'demo'.
  """
  used, names = set(), []
  for path in paths:
    stem = path.stem if path is not None else 'demo'
    base = f'{stem}_{path.suffix[1:]}' if path is not None and path.suffix else stem
    candidates = itertools.chain([stem, base], (f'{base}_{n}' for n in itertools.count(2)))
    name = next(c for c in candidates if c.casefold() not in used)
    used.add(name.casefold())
    names.append(name)
  return names


def earlier_run_outputs(out_dir: pathlib.Path) -> Optional[list[pathlib.Path]]:
  """The files an earlier crop run made in `out_dir` (log, summary, crops, overlays), or None.

  Read from `crops.jsonl` (a run announces every file in a `writing` line before it creates it,
  so even a killed run's partial files are known) and `crops.json` (also the summaries of
  versions without the log, whose files follow `<stem>_crop<i>.jpg` / `<stem>_overlay.png`).
  Unreadable lines are skipped. Only files that exist are returned.
  """
  log, summary = out_dir / LOG_FILE, out_dir / SUMMARY_FILE
  records = read_jsonl(log)
  if summary.is_file():
    try:
      data = json.loads(summary.read_text(errors='replace'))
      records.extend(data.get('results', []) + data.get('failed', []))
    except (ValueError, AttributeError, TypeError):
      pass
  if not records and not log.is_file() and not summary.is_file():
    return None
  names = {LOG_FILE, SUMMARY_FILE}
  for r in records:
    if not isinstance(r, dict):
      continue
    listed = r.get('writing', r.get('files'))
    if isinstance(listed, list):
      names.update(f for f in listed if isinstance(f, str))
    elif isinstance(r.get('crops'), list) and isinstance(r.get('image'), str):  # older summary
      stem = pathlib.Path(r['image']).stem if r['image'] != '<demo>' else 'demo'
      names.update(f'{stem}_crop{i}.jpg' for i in range(len(r['crops'])))
      names.add(f'{stem}_overlay.png')
  return sorted(out_dir / n for n in names if pathlib.Path(n).name == n and (out_dir / n).is_file())


def prepare_out_dir(
    out_dir: pathlib.Path, input_dirs: Sequence[pathlib.Path], overwrite: bool
) -> list[pathlib.Path]:
  """Checks (and creates) the output folder before any work; ValueError with one line otherwise.

  Returns the files of an earlier crop run that `--overwrite` will remove (not yet removed).
  """
  if out_dir.exists() and not out_dir.is_dir():
    raise ValueError(f'--out {out_dir}: exists and is not a folder')
  for folder in input_dirs:
    if out_dir.exists() and out_dir.resolve() == folder.resolve():
      raise ValueError(
          f'--out {out_dir} is the input folder; write the crops elsewhere (e.g. '
          f'--out {out_dir / "crops"})'
      )
  if run_settings(read_jsonl(out_dir / LOG_FILE)) is not None:
    raise ValueError(
        f'--out {out_dir} holds a list run ({LOG_FILE}); resume it with its '
        '--image-list command, or choose a new or empty folder'
    )
  stale = []
  if out_dir.is_dir() and any(out_dir.iterdir()):
    if not overwrite:
      raise ValueError(
          f'--out {out_dir} is not empty; use a new or empty folder, or --overwrite '
          'to replace the outputs of an earlier crop run there'
      )
    stale = earlier_run_outputs(out_dir)
    if stale is None:
      raise ValueError(
          f'--out {out_dir} holds no earlier crop run ({LOG_FILE} / {SUMMARY_FILE});'
          " --overwrite only replaces a crop run's own outputs, so nothing there "
          'is touched: choose a new or empty folder'
      )
  try:
    fileio.make_writable_dir(out_dir)
  except OSError as e:
    raise ValueError(f'--out {out_dir}: cannot write there ({e.strerror or e})') from None
  return stale


def absolute(path: Any) -> pathlib.Path:
  """An absolute, normalised path (symbolic links kept: the listed name is the image's name)."""
  return pathlib.Path(os.path.normpath(os.path.abspath(path)))


def read_jsonl(path: pathlib.Path) -> list[dict[str, Any]]:
  """The JSON objects of a log; a torn or unreadable line (a killed writer) is skipped."""
  records = []
  if path.is_file():
    for line in path.read_text(encoding='utf-8', errors='replace').splitlines():
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if isinstance(record, dict):
        records.append(record)
  return records


def is_result(record: dict[str, Any]) -> bool:
  return isinstance(record.get('index'), int) and ('crops' in record or 'error' in record)


def run_settings(records: Sequence[dict[str, Any]]) -> Optional[dict[str, Any]]:
  """The settings of a list run's log (its `run` line), None for a folder run or no log."""
  for record in records:
    run = record.get('run')
    if isinstance(run, dict):
      return run.get('settings') if isinstance(run.get('settings'), dict) else None
  return None


def prepare_list_dir(
    out_dir: pathlib.Path, paths: Sequence[pathlib.Path], settings: dict[str, Any]
) -> list[dict[str, Any]]:
  """Checks `--out` of a list run before any model work (the rules: `clipcrop_jax.crop`);
  ValueError with one line otherwise. Returns the earlier run's log records ([] for a new run).
  """
  if out_dir.exists() and not out_dir.is_dir():
    raise ValueError(f'--out {out_dir}: exists and is not a folder')
  records: list[dict[str, Any]] = []
  if out_dir.is_dir():
    here = absolute(out_dir)
    if any(p.parent == here for p in paths):
      raise ValueError(
          f'--out {out_dir} is an input folder (images of the list lie there); '
          'write the crops elsewhere'
      )
    records = read_jsonl(out_dir / LOG_FILE)
    theirs = run_settings(records)
    if theirs is not None:
      for key, value in settings.items():
        if theirs.get(key) != value:
          what = 'image list' if key in ('images', 'list_sha256') else key
          raise ValueError(
              f'--out {out_dir} holds another list run ({LOG_FILE}: {what} '
              f'{theirs.get(key)!r}, this run: {value!r}); rerun with its settings '
              'to resume it, or choose a new folder'
          )
    elif any(out_dir.iterdir()):
      raise ValueError(
          f'--out {out_dir} is not empty and holds no list run ({LOG_FILE}); use a '
          'new or empty folder'
      )
  try:
    fileio.make_writable_dir(out_dir)
  except OSError as e:
    raise ValueError(f'--out {out_dir}: cannot write there ({e.strerror or e})') from None
  return records


class RunLog:
  """`crops.jsonl`: one fsynced JSON line per record, locked (`flock`) while open, so a second
  process on the same folder is refused. `append` (a resumed list run) continues on a fresh line
  after a torn last line (a writer killed mid-line); otherwise the log is created exclusively."""

  def __init__(self, path: pathlib.Path, append: bool = False):
    self._f = open(
        path, 'a' if append else 'x', encoding='utf-8'  # pylint: disable=consider-using-with
    )
    try:
      fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self._f.close()
      raise ValueError(f'{path}: another process is writing this run (locked)') from None
    if append and path.stat().st_size:
      with open(path, 'rb') as f:
        f.seek(-1, os.SEEK_END)
        torn = f.read(1) != b'\n'
      if torn:
        self._f.write('\n')
        self._f.flush()

  def write(self, record: dict[str, Any]) -> None:
    self._f.write(json.dumps(record) + '\n')
    self._f.flush()
    os.fsync(self._f.fileno())

  def close(self) -> None:
    self._f.close()


def resume(records: Sequence[dict[str, Any]], out_dir: pathlib.Path) -> dict[int, dict[str, Any]]:
  """The finished images of a list run's log (index -> result line); the files announced for an
  unfinished image (a `writing` line without a result: killed mid-image) are removed, with any
  temporary file of theirs, so the image can be redone."""
  done = {r['index']: r for r in records if is_result(r)}
  announced = set()
  for r in records:
    if 'writing' in r and r.get('index') not in done and isinstance(r['writing'], list):
      announced.update(f for f in r['writing'] if isinstance(f, str) and pathlib.Path(f).name == f)
  if announced:
    prefixes = tuple(f'{fileio.TMP_PREFIX}{f}.' for f in announced)
    for path in out_dir.iterdir():
      if path.name in announced or path.name.startswith(prefixes):
        path.unlink(missing_ok=True)
  return done
