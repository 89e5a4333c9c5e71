"""Validation of both tasks' configs and the command-line flag handling of the training commands.

`validate_config(config, workdir)` checks every field of `default_config` (types, ranges, known
names, existing paths) in milliseconds, before anything is built, and raises one `ConfigError`
listing every problem on one line; `parse_flags` turns a bad `--config.<field>` flag into one
`error:` line (exit code 2, `USAGE_EXIT_CODE`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import sys
from typing import Any, Callable, Optional, Sequence

from clipcrop_jax import default_config
from clipcrop_jax import keywords

USAGE_EXIT_CODE = 2  # bad command line or config (as argparse); 1 = the run itself failed


class ConfigError(ValueError):
  """The config (or the workdir given with it) is invalid; the message is one line."""


# ------------------------------------------------------------------------------------------------
# Validation (no data read, no model built: runs before anything is built).
# ------------------------------------------------------------------------------------------------

_MISSING = object()


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int_at_least(low: int) -> Callable[[Any], bool]:
  return lambda v: _is_int(v) and v >= low


def _number_at_least(low: float) -> Callable[[Any], bool]:
  return lambda v: _is_number(v) and v >= low


def _nonempty_str(v: Any) -> bool:
  return isinstance(v, str) and bool(v.strip())


def _regex_pairs(second_ok: Callable[[Any], bool]) -> Callable[[Any], bool]:
  """(regex, x) pairs whose regexes compile and whose x pass `second_ok`."""

  def ok(rules):
    for rule in rules:
      pattern, second = rule
      re.compile(pattern)
      if not second_ok(second):
        return False
    return isinstance(rules, (list, tuple))

  return ok


def _mesh_shape(v: Any) -> bool:
  return (
      len(v) == 2 and all(_is_int(s) and (s >= 1 or s == -1) for s in v) and list(v).count(-1) <= 1
  )


def _mosaic_probs(v: Any) -> bool:
  return (
      len(v) == 3 and all(_is_number(p) and 0.0 <= p <= 1.0 for p in v) and abs(sum(v) - 1.0) < 1e-6
  )


def _dataset_pairs(v: Any) -> bool:
  return all(len(pair) == 2 and all(_nonempty_str(s) for s in pair) for pair in v)


class _Checks:
  """Collects the problems of one config as one-line strings naming the field."""

  def __init__(self, config: Any, prefix: str = ''):
    self.config, self.prefix, self.problems = config, prefix, []

  def get(self, path: str) -> Any:
    node = self.config
    for part in path.split('.'):
      try:
        node = node[part]
      except (KeyError, TypeError, AttributeError):
        return _MISSING
    return node

  def add(self, path: str, message: str) -> None:
    self.problems.append(f'{self.prefix}{path}{message}')

  def check(self, path: str, ok: Callable[[Any], bool], expected: str) -> bool:
    """True when `path` exists and `ok(value)`; otherwise records the problem."""
    value = self.get(path)
    if value is _MISSING:
      self.add(path, ': missing field')
      return False
    try:
      good = bool(ok(value))
    except (TypeError, ValueError, re.error):
      good = False
    if not good:
      self.add(path, f'={value!r}: expected {expected}')
    return good

  def existing_path(self, path: str, kind: str = 'path') -> None:
    """`path` is '' or names an existing directory (kind 'dir') / file or directory."""
    if not self.check(path, lambda v: isinstance(v, str), 'a path or empty'):
      return
    value = self.get(path)
    if value:
      full = os.path.expanduser(value)
      if not (os.path.isdir(full) if kind == 'dir' else os.path.exists(full)):
        what = 'directory' if kind == 'dir' else 'file or directory'
        self.add(path, f'={value!r}: no such {what}')


def _check_common(c: _Checks, training: bool, data_dir_must_exist: bool) -> None:
  """Fields both tasks share: run length, optimizer, sharding, checkpoints, data location."""
  c.check('seed', _is_int, 'an integer')
  c.check('dtype', lambda v: v in default_config.DTYPES, f'one of {default_config.DTYPES}')
  c.check('batch_size', _int_at_least(1), 'an integer >= 1')
  steps_ok = c.check(
      'num_train_steps', _is_int, 'an integer (> 0: the training length; <= 0: use num_epochs)'
  )
  epochs_ok = c.check('num_epochs', _number_at_least(0), 'a number >= 0')
  if (
      training
      and steps_ok
      and epochs_ok
      and c.get('num_train_steps') <= 0
      and (c.get('num_epochs') <= 0)
  ):
    c.add(
        'num_train_steps',
        f'={c.get("num_train_steps")} and num_epochs='
        f'{c.get("num_epochs")}: no training length (set one of them > 0)',
    )
  o = 'optimizer.'
  c.check(o + 'learning_rate', _number_at_least(0), 'a finite number >= 0')
  c.check(o + 'end_learning_rate', _number_at_least(0), 'a finite number >= 0')
  if c.check(o + 'warmup_steps', _int_at_least(0), 'an integer >= 0') and steps_ok:
    if 0 < c.get('num_train_steps') < c.get(o + 'warmup_steps'):
      c.add(
          o + 'warmup_steps',
          f'={c.get(o + "warmup_steps")}: longer than num_train_steps='
          f'{c.get("num_train_steps")}',
      )
  c.check(o + 'weight_decay', _number_at_least(0), 'a finite number >= 0')
  for name in ('b1', 'b2'):
    c.check(o + name, lambda v: _is_number(v) and 0 <= v < 1, 'a number in [0, 1)')
  c.check(o + 'eps', _number_at_least(0), 'a finite number >= 0')
  c.check(
      o + 'grad_clip_norm', lambda v: v is None or _is_number(v), 'a number (<= 0: no clipping)'
  )
  c.check(
      o + 'lr_multipliers',
      _regex_pairs(lambda m: _is_number(m) and m >= 0),
      '(regex, multiplier >= 0) pairs',
  )
  c.check('sharding.mesh_shape', _mesh_shape, '(data, model) sizes >= 1, at most one of them -1')
  c.check(
      'sharding.rules',
      _regex_pairs(lambda k: k in default_config.SHARDING_KINDS),
      f'(regex, kind) pairs with kind one of {default_config.SHARDING_KINDS}',
  )
  if c.check('distributed.initialize', lambda v: isinstance(v, bool), 'True or False') and (
      c.get('distributed.initialize') and c.get('distributed.coordinator_address')
  ):
    if c.check(
        'distributed.num_processes',
        _int_at_least(1),
        'an integer >= 1 (with distributed.coordinator_address)',
    ):
      n = c.get('distributed.num_processes')
      c.check(
          'distributed.process_id', lambda v: _is_int(v) and 0 <= v < n, f'an integer in [0, {n})'
      )
  c.check('checkpoint.every_steps', _int_at_least(1), 'an integer >= 1')
  c.check('checkpoint.keep', _int_at_least(1), 'an integer >= 1')
  c.check(
      'checkpoint.data_resume',
      lambda v: v in default_config.DATA_RESUME,
      f'one of {default_config.DATA_RESUME}',
  )
  c.check('log_every_steps', _int_at_least(1), 'an integer >= 1')
  c.check('dataset.name', _nonempty_str, "a prepared TFDS dataset name such as 'gaic/journal'")
  c.check('dataset.train_split', _nonempty_str, 'a split name')
  c.check('dataset.shuffle_buffer', _int_at_least(0), 'an integer >= 0')
  c.check('dataset.flip', lambda v: isinstance(v, bool), 'True or False')
  if data_dir_must_exist:
    c.existing_path('dataset.data_dir', 'dir')
  else:
    c.check(
        'dataset.data_dir',
        lambda v: isinstance(v, str) and not os.path.isfile(os.path.expanduser(v)),
        'a directory path or empty',
    )
  # An existing path, or a checkpoint name (HF id, Scenic release) downloaded when loaded.
  from clipcrop_jax.owlvit import hub  # pylint: disable=g-import-not-at-top  # imports jax

  if not hub.is_name(c.get('init_from.owlvit')):
    c.existing_path('init_from.owlvit')


def _retired_field(name: str, value: Optional[str] = None) -> Optional[str]:
  """What replaced the top-level field `name` of older configs (None when `name` is current).

  Args:
    name: a top-level field name.
    value: its value on the command line (`--config.<name>=<value>`), for the replacement flag.
  """
  if name == 'mode':
    use = f'; use --config.run={value}' if value is not None else ''
    return f'config.mode was renamed to config.run ({" | ".join(default_config.RUNS)}){use}'
  if name == 'quick':
    return (
        'config.quick was replaced by the config argument: ' '--config=configs/synthetic.py:quick'
    )
  return None


def _check_clipcrop(c: _Checks) -> None:
  """ClipCrop fields (`get_default_config`)."""
  for name in ('mode', 'quick'):
    if c.get(name) is not _MISSING:
      c.problems.append(c.prefix + _retired_field(name))
  run = c.get('run')
  if run is not _MISSING or c.get('mode') is _MISSING:  # else the rename above says it
    c.check('run', lambda v: v in default_config.RUNS, f'one of {default_config.RUNS}')
  pipeline = run == 'synthetic_pipeline'
  _check_common(c, training=run != 'eval', data_dir_must_exist=not pipeline)
  model = c.get('model')
  if c.check('model', lambda v: hasattr(v, 'to_dict'), 'a ConfigDict of ClipCropConfig fields'):
    from clipcrop_jax import model as model_lib  # pylint: disable=g-import-not-at-top

    known = {f.name for f in dataclasses.fields(model_lib.ClipCropConfig)}
    unknown = sorted(set(model.keys()) - known)
    if unknown:
      c.add('model', f': unknown field(s) {", ".join(unknown)} (known: {", ".join(sorted(known))})')
    else:
      try:
        model_lib.ClipCropConfig(**model.to_dict())
      except (TypeError, ValueError) as e:
        c.add('model', f': {str(e).rstrip(".")}')
  c.existing_path('init_from.clipcrop', 'dir')
  c.check('dataset.max_crops', _int_at_least(1), 'an integer >= 1')
  c.check('dataset.max_queries', _int_at_least(1), 'an integer >= 1')
  c.check(
      'dataset.mosaic_probs',
      _mosaic_probs,
      '3 probabilities (1, 2x2, 3x3 mosaic) in [0, 1] summing to 1',
  )
  c.check('dataset.jitter', lambda v: isinstance(v, bool), 'True or False')
  c.check(
      'dataset.keyword_pipeline',
      _nonempty_str,
      f'a spaCy pipeline name, or {keywords.RULES!r} for the rule-based extractor',
  )
  for name in ('positive_threshold', 'score_min', 'score_max'):
    c.check(f'loss.{name}', _is_number, 'a finite number')
  if (
      _is_number(c.get('loss.score_min'))
      and _is_number(c.get('loss.score_max'))
      and (c.get('loss.score_min') >= c.get('loss.score_max'))
  ):
    c.add(
        'loss.score_min',
        f'={c.get("loss.score_min")}: must be < loss.score_max=' f'{c.get("loss.score_max")}',
    )
  c.check(
      'loss.smoothing_iou',
      lambda v: v is None or (_is_number(v) and v >= 0),
      'None or a number >= 0 (> 1: no smoothing)',
  )
  for name in (
      'cost_l1',
      'cost_giou',
      'cost_quality',
      'weight_l1',
      'weight_giou',
      'weight_quality',
  ):
    c.check(f'loss.{name}', _number_at_least(0), 'a finite number >= 0')
  c.check('loss.aux_loss', lambda v: isinstance(v, bool), 'True or False')
  c.check('loss.selection_filter', lambda v: isinstance(v, bool), 'True or False')
  c.check(
      'loss.quality_loss',
      lambda v: v in default_config.QUALITY_LOSSES,
      f'one of {default_config.QUALITY_LOSSES}',
  )
  c.check(
      'loss.quality_target',
      lambda v: v in default_config.QUALITY_TARGETS,
      f'one of {default_config.QUALITY_TARGETS}',
  )
  c.check('loss.quality_pointwise_weight', _number_at_least(0), 'a finite number >= 0')
  c.check('loss.quality_temperature', lambda v: _is_number(v) and v > 0, 'a number > 0')
  c.check('loss.quality_top_k', _int_at_least(1), 'an integer >= 1')
  c.check(
      'loss.matching_solver',
      lambda v: v in default_config.MATCHING_SOLVERS,
      f'one of {default_config.MATCHING_SOLVERS}',
  )
  needs_eval = run in ('eval', 'train_and_eval')
  c.check(
      'eval.datasets',
      lambda v: _dataset_pairs(v) and (len(v) > 0 or not needs_eval),
      '(tfds name, split) pairs' + (f', at least one for run={run!r}' if needs_eval else ''),
  )
  c.check('eval.batch_size', _int_at_least(1), 'an integer >= 1')
  c.check('eval.every_steps', _is_int, 'an integer (<= 0: only at the end)')
  c.check('eval.max_examples', _is_int, 'an integer (<= 0: all)')
  c.check(
      'eval.baselines',
      lambda v: all(b in default_config.BASELINES for b in v) and not isinstance(v, str),
      f'names from {default_config.BASELINES}',
  )
  c.existing_path('eval.base_workdir', 'dir')
  if pipeline:
    _check_pipeline(c)


def _check_pipeline(c: _Checks) -> None:
  """The embedded default's own fields (`pipeline.*` of configs/synthetic.py)."""
  c.check('pipeline.quick', lambda v: isinstance(v, bool), 'True or False')
  c.check('pipeline.num_seeds', _int_at_least(1), 'an integer >= 1')
  c.check(
      'pipeline.fuse_top_k_choices',
      lambda v: not isinstance(v, (str, int))
      and len(v) > 0
      and all(_int_at_least(1)(k) for k in v),
      'a non-empty tuple of integers >= 1',
  )
  c.check(
      'pipeline.selection_union_choices',
      lambda v: not isinstance(v, str)
      and len(v) > 0
      and len(set(v)) == len(v)
      and all(u in default_config.SELECTION_UNIONS for u in v),
      f'a non-empty tuple of distinct names from {default_config.SELECTION_UNIONS}',
  )
  c.check('pipeline.validation_split', _nonempty_str, 'a split name (e.g. ambiguity_validation)')
  c.check(
      'pipeline.validation_split',
      lambda v: all(v != entry[1] for entry in (c.get('eval.datasets') or ())),
      'a split other than the test split in eval.datasets (choices are made on it)',
  )
  owlvit = c.get('pipeline.owlvit')
  if c.check('pipeline.owlvit', lambda v: hasattr(v, 'keys'), 'a detection config'):
    sub = _Checks(owlvit, prefix=f'{c.prefix}pipeline.owlvit.')
    _check_detection(sub, data_dir_must_exist=False)
    c.problems += sub.problems
  # One dataset for every stage (`dataset.name`): the detector's training set and the evaluation.
  name = c.get('dataset.name')
  c.check('pipeline.owlvit.dataset.name', lambda v: v == name, f'the same as dataset.name={name!r}')
  c.check(
      'eval.datasets',
      lambda v: len(v) == 1 and v[0][0] == name,
      f"one pair ({name!r}, split) for the pipeline's evaluation",
  )


def _check_detection(c: _Checks, data_dir_must_exist: bool = True) -> None:
  """OWL-ViT detection fields (`get_detection_config`)."""
  _check_common(c, training=True, data_dir_must_exist=data_dir_must_exist)
  from clipcrop_jax.owlvit import configs as owl_configs  # pylint: disable=g-import-not-at-top

  c.check(
      'model.owlvit',
      lambda v: owl_configs.get_config(v) is not None,
      f'an OWL-ViT architecture name ({", ".join(sorted(owl_configs.CONFIGS))})',
  )
  c.check('dataset.label_key', _nonempty_str, 'a feature name under objects/')
  c.check('dataset.max_objects', _int_at_least(1), 'an integer >= 1')
  c.check('dataset.max_labels', _int_at_least(1), 'an integer >= 1')
  c.check(
      'dataset.label_templates',
      lambda v: not isinstance(v, str) and all(isinstance(t, str) and '{}' in t for t in v),
      "format strings with '{}' (e.g. 'a {}')",
  )
  c.check(
      'dataset.phrase_key',
      lambda v: isinstance(v, str),
      "a Text feature name under objects/ ('' = no phrase labels)",
  )
  if (
      c.check('dataset.phrase_prob', lambda v: _is_number(v) and 0 <= v <= 1, 'a number in [0, 1]')
      and c.get('dataset.phrase_prob') > 0
      and not (c.get('dataset.phrase_key'))
  ):
    c.add('dataset.phrase_prob', f'={c.get("dataset.phrase_prob")}: needs dataset.phrase_key')
  c.check('loss.focal_alpha', lambda v: _is_number(v) and 0 <= v <= 1, 'a number in [0, 1]')
  for name in (
      'focal_gamma',
      'cost_class',
      'cost_l1',
      'cost_giou',
      'weight_class',
      'weight_l1',
      'weight_giou',
  ):
    c.check(f'loss.{name}', _number_at_least(0), 'a finite number >= 0')
  c.check(
      'loss.matching_solver',
      lambda v: v in default_config.MATCHING_SOLVERS,
      f'one of {default_config.MATCHING_SOLVERS}',
  )
  c.check('eval.split', lambda v: isinstance(v, str), "a split name ('' = no evaluation)")
  c.check('eval.batch_size', _int_at_least(1), 'an integer >= 1')
  c.check('eval.every_steps', _is_int, 'an integer (<= 0: only at the end)')
  c.check('eval.max_examples', _is_int, 'an integer (<= 0: all)')


def workdir_problem(workdir: str) -> Optional[str]:
  """Why `workdir` cannot hold a run's outputs (None when it can): a file, or not creatable."""
  path = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(path):
    if not os.path.isdir(path):
      return f'workdir={workdir}: exists and is not a directory'
    if not os.access(path, os.W_OK | os.X_OK):
      return f'workdir={workdir}: not writable'
    return None
  parent = path
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    return f'workdir={workdir}: cannot be created, {parent} is a file'
  if not os.access(parent, os.W_OK | os.X_OK):
    return f'workdir={workdir}: cannot be created, {parent} is not writable'
  return None


def validate_config(config: Any, workdir: Optional[str] = None, *, task: str = 'clipcrop') -> None:
  """Checks a run config before anything is built; `ConfigError` lists every problem.

  Checks known runs and names, types, positive sizes and step counts, fractions and
  probabilities in range, regexes that compile, that `dataset.data_dir`, `init_from.*` and
  `eval.base_workdir` exist when given, and that `workdir` (when given) is, or can be created as,
  a writable directory. Only looks at whether paths exist; reads no data and builds no model
  (`config.model` is checked by constructing its `ClipCropConfig`).

  Args:
    config: a ClipCrop config (`get_default_config`) or, with task='detection', an OWL-ViT
      detection config (`get_detection_config`).
    workdir: the run's output folder, or None to skip that check.
    task: 'clipcrop' or 'detection'.

  Raises:
    ConfigError: one line, the problems joined by '; ', each naming its field and value.
  """
  if task not in ('clipcrop', 'detection'):
    raise ValueError(f"task={task!r}; expected 'clipcrop' or 'detection'")
  c = _Checks(config)
  if task == 'clipcrop':
    _check_clipcrop(c)
  else:
    _check_detection(c)
  if workdir is not None:
    problem = workdir_problem(workdir) if workdir else 'workdir is empty'
    if problem:
      c.problems.append(problem)
  if c.problems:
    raise ConfigError('invalid config: ' + '; '.join(c.problems))


# ------------------------------------------------------------------------------------------------
# Command-line helpers shared by clipcrop_jax.main and clipcrop_jax.detection_train.
# ------------------------------------------------------------------------------------------------


def usage_exit(message: str) -> None:
  """Prints `error: <message>` to stderr and exits with `USAGE_EXIT_CODE` (2)."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(USAGE_EXIT_CODE)


def _unknown_field(config: Any, path: str, value: Optional[str] = None) -> Optional[str]:
  """A message when the dotted `path` (of a `--config.<path>=<value>` flag) is not a field of
  `config`; a field of older configs names its replacement."""
  retired = _retired_field(path, value)
  if retired and path not in config:
    return f'--config.{path}: {retired}'
  node, done = config, []
  for part in path.split('.'):
    name = part.split('[')[0]
    if not hasattr(node, 'keys'):
      return None
    keys = sorted(node.keys())
    if name not in keys:
      close = difflib.get_close_matches(name, keys, n=3)
      parent = 'config.' + '.'.join(done) if done else 'the config'
      hint = (
          f'did you mean {", ".join(close)}?' if close else f'fields of {parent}: {", ".join(keys)}'
      )
      return f'--config.{path}: {parent} has no field {name!r} ({hint})'
    node, done = node[name], done + [name]
    if '[' in part:
      return None
  return None


def _config_of_argv(argv: Sequence[str], flag_values: Any) -> Any:
  """The config `--config=<file>` of `argv` names, without overrides (None if it fails to load).

  `config_flags` applies the `--config.<field>` overrides while it parses `--config`, so after a
  failed override the flag holds no value yet: the file is loaded again by the flag's parser.
  """
  if 'config' not in flag_values:
    return None
  flag = flag_values['config']
  specs = [a.split('=', 1)[1] for a in argv[1:] if re.match(r'--?config=', a)]
  try:
    return (
        flag.value if flag.value is not None else (flag.parser.parse(specs[-1]) if specs else None)
    )
  except Exception:  # pylint: disable=broad-except
    return None  # the config file itself fails to load: reported as such


def flag_error_message(error: BaseException, argv: Sequence[str], flag_values: Any) -> str:
  """One line for a flag-parsing failure; a misspelt `--config.<field>` is named as such."""
  config = _config_of_argv(argv, flag_values)
  if config is not None:
    for arg in argv[1:]:
      match = re.match(r'--?config\.([^=\s]+)(?:=(.*))?', arg)
      message = match and _unknown_field(config, match.group(1), match.group(2))
      if message:
        return message
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if not lines:
    return type(error).__name__
  return lines[0] if len(lines) == 1 else f'{lines[0]} ... {lines[-1]}'


def config_or_exit(config_flag: Any) -> Any:
  """`config_flag.value`, or exit 2 with one line when the config file failed to load.

  (`config_flags` defers a missing or broken config file's error to the first use of the value.)
  """
  try:
    config = config_flag.value
    if config is not None:
      config.get('seed')  # a placeholder for a file that failed to load raises here
    return config
  except Exception as e:  # pylint: disable=broad-except
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    usage_exit(f'--config: {lines[-1] if lines else type(e).__name__}')
    raise  # not reached


def parse_flags(argv: Sequence[str]) -> list[str]:
  """`flags_parser` for `absl.app.run`: a bad flag gives one `error:` line and exit code 2.

  Covers unknown flags, a misspelt `--config.<field>` (named, with the closest known fields),
  values of the wrong type and config files that fail to load (their last error line).
  """
  from absl import flags  # pylint: disable=g-import-not-at-top

  try:
    return flags.FLAGS(list(argv))
  except Exception as e:  # pylint: disable=broad-except
    usage_exit(flag_error_message(e, argv, flags.FLAGS))
    raise  # not reached
