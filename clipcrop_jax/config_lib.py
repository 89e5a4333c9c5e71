"""Loading config files by path and parsing their `get_config` argument (big_vision style).

A config file (configs/*.py) defines `get_config()` or `get_config(arg)`; `--config=file.py:arg`
passes the text after ':' as `arg`. `parse_arg` turns that text into typed fields:

  def get_config(arg=None):
    arg = config_lib.parse_arg(arg, variant='full', encoder='clip_b32', quick=False)

  file.py                        variant='full', encoder='clip_b32', quick=False (the defaults)
  file.py:base                   variant='base' (a leading bare value sets the first field)
  file.py:base,encoder=clip_b16  and encoder='clip_b16'
  file.py:quick                  quick=True (a bare bool field name means True)
  file.py:variant=key,quick=no   explicit values; bools accept true/false, yes/no, 1/0

No jax is imported here: configs load and validate in milliseconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import sys
import types
from typing import Any, Optional

import ml_collections

_TRUE = ('true', 'yes', '1')
_FALSE = ('false', 'no', '0')


def load_module(path: str | os.PathLike[str]) -> types.ModuleType:
  """Imports the Python file `path` under a module name unique to its absolute path.

  The module is not added to `sys.modules`, so two files with the same stem (or the same file
  loaded twice) never share state.
  """
  full = os.path.abspath(os.fspath(path))
  if not os.path.isfile(full):
    raise FileNotFoundError(f'config file {path} not found')
  stem = os.path.splitext(os.path.basename(full))[0]
  digest = hashlib.sha1(full.encode('utf-8')).hexdigest()[:10]
  spec = importlib.util.spec_from_file_location(f'_clipcrop_config_{stem}_{digest}', full)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config_file(
    path: str | os.PathLike[str], arg: Optional[str] = None
) -> ml_collections.ConfigDict:
  """`get_config(arg)` of the config file `path`, as `--config=path:arg` builds it.

  Args:
    path: a config file defining `get_config`.
    arg: the text after ':' on the command line; None (or '') for none. A `get_config` that takes
      no argument is called without one.

  Returns:
    The file's config.

  Raises:
    ValueError: `arg` was given to a `get_config` that takes none, or the file returned no config.
    AttributeError: the file defines no `get_config`.
  """
  module = load_module(path)
  get_config = getattr(module, 'get_config', None)
  if get_config is None:
    raise AttributeError(f'{path}: defines no get_config()')
  if inspect.signature(get_config).parameters:
    config = get_config(arg)
  elif arg:
    raise ValueError(f'{path}: get_config() takes no argument, got {arg!r}')
  else:
    config = get_config()
  if config is None:
    raise ValueError(f'{path}: get_config() returned None')
  return config


def _caller_name() -> str:
  """The file name of the config that called `parse_arg` (for error messages)."""
  frame = sys._getframe(2)  # pylint: disable=protected-access
  return os.path.basename(frame.f_globals.get('__file__') or 'get_config')


def _convert(text: str, default: Any, key: str, where: str) -> Any:
  """`text` as the type of `default` (bool: true/false, yes/no, 1/0, any case)."""
  if isinstance(default, bool):
    word = text.lower()
    if word in _TRUE + _FALSE:
      return word in _TRUE
    raise ValueError(f'{where}: {key}={text!r}: expected a bool (true/false, yes/no, 1/0)')
  try:
    return type(default)(text)
  except ValueError:
    kind = {int: 'an int', float: 'a float'}[type(default)]
    raise ValueError(f'{where}: {key}={text!r}: expected {kind}') from None


def _guess(text: str) -> Any:
  """An int, float or bool when `text` spells one, else the text (`lazy` fields)."""
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  word = text.lower()
  if word in ('true', 'false'):
    return word == 'true'
  return text


def parse_arg(arg: Optional[str], *, lazy: bool = False, **spec: Any) -> ml_collections.ConfigDict:
  """Parses a config file's `get_config` argument into typed fields.

  `arg` is the text after ':' in `--config=file.py:arg` (None or '' for none): comma-separated
  items, each `key=value` or a bare word. A bare word that names a bool field sets it to True.
  The first item may instead be a bare value for the first field of `spec` when that field is not
  a bool and the word names no field: `file.py:base` means `variant=base` with `variant` first in
  `spec`.

  Each `spec` value is the field's default, and its type converts the text: str, int, float, or
  bool (true/false, yes/no, 1/0, any case). Sequence defaults are not supported (',' separates
  items): take a str and split it in the config.

  Args:
    arg: the argument text.
    lazy: also accept keys not in `spec`; their values become an int, a float or a bool when the
      text spells one, else the text; a bare unknown word (not taken as the first field's value)
      is True.
    **spec: field name -> default.

  Returns:
    A ConfigDict with every field of `spec` (default or given) and, when `lazy`, the extra keys.

  Raises:
    ValueError: one line naming the config file, the key and the value, for an unknown key, a
      value of the wrong type, a field given twice or a non-bool field without a value.
    TypeError: a default of an unsupported type in `spec`.
  """
  where = _caller_name()
  for key, default in spec.items():
    if not isinstance(default, (str, int, float, bool)):
      raise TypeError(
          f'parse_arg: default of {key!r} is a {type(default).__name__}; '
          'expected str, int, float or bool'
      )
  out = dict(spec)
  given = set()
  items = [part.strip() for part in (arg or '').split(',') if part.strip()]
  for i, item in enumerate(items):
    key, equals, text = (part.strip() for part in item.partition('='))
    if not equals:
      first = next(iter(spec), None)
      if isinstance(spec.get(key), bool):
        text = 'true'
      elif key in spec:
        raise ValueError(f'{where}: {key} needs a value ({key}=...) in {arg!r}')
      elif i == 0 and first is not None and not isinstance(spec[first], bool):
        key, text = first, item
      elif lazy:
        text = 'true'
      else:
        raise ValueError(
            f'{where}: unknown option {key!r} in {arg!r} ' f'(options: {", ".join(spec) or "none"})'
        )
    if key in given:
      raise ValueError(f'{where}: {key} given twice in {arg!r}')
    given.add(key)
    if key in spec:
      out[key] = _convert(text, spec[key], key, where)
    elif lazy:
      out[key] = _guess(text)
    else:
      raise ValueError(
          f'{where}: unknown option {key!r}={text!r} in {arg!r} '
          f'(options: {", ".join(spec) or "none"})'
      )
  return ml_collections.ConfigDict(out)
