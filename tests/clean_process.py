"""Child processes that start as a new user's shell would: for testing documented commands.

A clean child has the test interpreter's `bin/` first on PATH (so `python` is the installed
package's interpreter), an empty HOME (so every cache under `~/.cache` — Hugging Face's,
clipcrop_jax's, spaCy's — starts empty), none of the parent's `HF_*`, `CLIPCROP_*`,
`PYTHONPATH` or other variables, and nothing imported beforehand. Only the persistent JAX
compilation cache the test session shares (conftest) is passed on, so that a program compiled
by one child is not compiled again by the next; it changes no result.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from typing import Mapping, Optional, Sequence, Union

# Passed on from the test session (conftest.subprocess_compilation_cache): speed only.
_SHARED = ('JAX_COMPILATION_CACHE_DIR', 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS')


def clean_env(
    home: Union[str, os.PathLike], extra: Optional[Mapping[str, str]] = None
) -> dict[str, str]:
  """The environment of a clean child process whose HOME is `home` (created), plus `extra`."""
  pathlib.Path(home).mkdir(parents=True, exist_ok=True)
  env = {
      'PATH': os.pathsep.join(
          [os.path.dirname(sys.executable), '/usr/local/bin', '/usr/bin', '/bin']
      ),
      'HOME': os.fspath(home),
      'LANG': 'C.UTF-8',
  }
  env.update({k: os.environ[k] for k in _SHARED if k in os.environ})
  env.update(extra or {})
  return env


def run(
    command: Union[str, Sequence[str]],
    *,
    env: Mapping[str, str],
    cwd: Union[str, os.PathLike],
    timeout: float = 300,
) -> subprocess.CompletedProcess:
  """Runs `command` (a shell line, run by bash as written, or an argv list) to completion."""
  if isinstance(command, str):
    command = ['bash', '-c', command]
  return subprocess.run(
      list(command),
      env=dict(env),
      cwd=os.fspath(cwd),
      capture_output=True,
      text=True,
      timeout=timeout,
      check=False,
  )


def describe(result: subprocess.CompletedProcess) -> str:
  """The exit code and the ends of both streams, for an assertion message."""
  return (
      f'exit {result.returncode}\n--- stdout ---\n{result.stdout[-3000:]}\n'
      f'--- stderr ---\n{result.stderr[-6000:]}'
  )


def error_line(result: subprocess.CompletedProcess) -> str:
  """The one `error: ...` line a failed command printed; AssertionError when it printed a
  traceback, no such line, or several."""
  assert result.returncode != 0, describe(result)
  assert 'Traceback' not in result.stderr, describe(result)
  lines = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert len(lines) == 1, describe(result)
  return lines[0]
