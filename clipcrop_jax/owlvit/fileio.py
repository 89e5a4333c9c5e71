"""Safe file output: atomic writes, no-clobber creation and atomic directory replacement.

Every file this package writes for a user goes through here, so that an interruption (Ctrl-C, a
killed process, a full disk) never leaves a half-written or mixed result, and a file that a run
did not create is never written over:

* `atomic_write_bytes` / `atomic_write_text`: write a sibling temporary file, fsync, then
  `os.replace` it over the destination (readers see the old or the new file, never a mix).
  Permissions are those of a normal new file (0666 & ~umask), not `mkstemp`'s 0600.
* `create_new_bytes`: the same, but the final step is `os.link`, which fails when the name exists:
  an existing file is never replaced (`FileExistsError` naming it).
* `replace_directory(dest)`: a context manager yielding an empty temporary sibling directory; on
  success it takes `dest`'s place in one step (Linux `renameat2(RENAME_EXCHANGE)`, else two
  renames), so `dest` always holds either the complete old or the complete new contents.

Temporary names start with `.clipcrop-tmp-` so that leftovers of a killed process are easy to
recognise; they are removed on any Python-level exception or interrupt.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import pathlib
import shutil
import tempfile
from typing import Iterator, Sequence, Union

PathLike = Union[str, os.PathLike]
TMP_PREFIX = '.clipcrop-tmp-'
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _write_temp(path: pathlib.Path, data: bytes) -> str:
  """Writes `data` to a new temporary file beside `path` (fsynced, normal permissions)."""
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'{TMP_PREFIX}{path.name}.')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise
  return tmp


def _publish(path: PathLike, data: bytes, place) -> pathlib.Path:
  """Writes `data` to a temporary sibling, then `place(tmp, path)` makes it visible at once."""
  path = pathlib.Path(path)
  tmp = _write_temp(path, data)
  try:
    place(tmp, path)
  finally:
    with contextlib.suppress(OSError):  # gone already after os.replace
      os.unlink(tmp)
  return path


def atomic_write_bytes(path: PathLike, data: bytes) -> pathlib.Path:
  """Writes `data` to `path` atomically (replacing it if it exists); returns the path."""
  return _publish(path, data, os.replace)


def atomic_write_text(path: PathLike, text: str) -> pathlib.Path:
  """`atomic_write_bytes` for UTF-8 text."""
  return atomic_write_bytes(path, text.encode('utf-8'))


def create_new_bytes(path: PathLike, data: bytes) -> pathlib.Path:
  """Creates `path` with `data` atomically; `FileExistsError` if the name is already taken.

  The content is complete before the name appears (temporary file + hard link), and an existing
  file, whoever made it, is never replaced.
  """
  try:
    return _publish(path, data, os.link)
  except FileExistsError:
    raise FileExistsError(f'{path}: already exists; not overwriting it') from None


def make_writable_dir(folder: PathLike) -> None:
  """Creates `folder` (and its parents) if missing and proves a file can be created in it.

  Raises OSError (e.g. a parent is a file, a read-only file system) otherwise.
  """
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryFile(dir=folder):
    pass


def check_output_file(
    path: PathLike,
    *,
    suffixes: Sequence[str] = (),
    inputs: Sequence[PathLike] = (),
    overwrite: bool = False,
    flag: str = '--out',
) -> pathlib.Path:
  """Checks, before any work, that a run may create (or, with `overwrite`, replace) `path`.

  Raises ValueError with one line naming `flag` when: the name lacks one of `suffixes`, is a
  folder, is one of the run's `inputs` (never replaced, even with `overwrite`), exists and
  `overwrite` is False, or its folder cannot be created or written. A missing folder is created.
  """
  path = pathlib.Path(path)
  if suffixes and path.suffix.lower() not in suffixes:
    raise ValueError(f'{flag} {path}: expected a file name ending in {" / ".join(suffixes)}')
  if path.is_dir():
    raise ValueError(f'{flag} {path}: is a folder; give a file name')
  for source in inputs:
    if path.exists() and pathlib.Path(source).exists() and os.path.samefile(path, source):
      raise ValueError(f'{flag} {path} is an input file of this run; never overwriting it')
  if path.exists() and not overwrite:
    raise ValueError(f'{flag} {path}: exists; choose another name or pass --overwrite')
  try:
    make_writable_dir(path.parent)
  except OSError as e:
    raise ValueError(f'{flag} {path}: cannot write in {path.parent} ({e.strerror or e})') from None
  return path


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
  """Atomically swaps two paths with Linux renameat2(RENAME_EXCHANGE); False if unsupported."""
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or None, use_errno=True)
    renameat2 = libc.renameat2
  except (OSError, AttributeError):
    return False
  renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
  renameat2.restype = ctypes.c_int
  if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
    return True
  err = ctypes.get_errno()
  if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: the file system cannot exchange.
    return False
  raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def replace_directory(dest: PathLike) -> Iterator[pathlib.Path]:
  """Builds a directory's new contents aside, then puts them in `dest`'s place in one step.

    with replace_directory('model') as tmp:
      (tmp / 'a.json').write_text(...)      # write everything into tmp
    # now 'model' holds exactly what was written; the old contents are gone

  If the block raises (or the process dies), `dest` is unchanged. The caller decides beforehand
  whether `dest` may be replaced at all (this function replaces whatever is there).

  Args:
    dest: the directory to create or replace. Its parent is created if missing.

  Yields:
    an empty temporary directory on the same file system as `dest`.
  """
  dest = pathlib.Path(dest)
  if dest.exists() and not dest.is_dir():
    raise NotADirectoryError(f'{dest}: exists and is not a directory')
  dest.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(dir=dest.parent, prefix=f'{TMP_PREFIX}{dest.name}.'))
  try:
    os.chmod(tmp, 0o777 & ~_umask())
    yield tmp
    for child in tmp.iterdir():  # contents on disk before the switch
      if child.is_file():
        with open(child, 'rb') as f:
          os.fsync(f.fileno())
    if not dest.exists():
      os.rename(tmp, dest)
    elif _exchange(tmp, dest):
      shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old contents
    else:  # Two renames: a crash in between leaves the old contents in `<tmp>.old`.
      old = tmp.with_name(tmp.name + '.old')
      os.rename(dest, old)
      os.rename(tmp, dest)
      shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
