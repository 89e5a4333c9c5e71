"""Optimizer and learning-rate schedule for ClipCrop training.

ClipCrop (Zhong et al. 2023) trains with AdamW, learning rate 1e-4 decayed by a cosine schedule to
1e-6. This module builds that optimizer with per-parameter-group learning-rate multipliers, so the
OWL-ViT encoder (params subtree 'owlvit') can be frozen or fine-tuned at a reduced rate while the
crop decoder (params subtree 'decoder') trains at the full rate.

Parameter groups are chosen by `lr_multipliers`: a sequence of `(regex, multiplier)` rules matched
with `re.search` against each parameter's '/'-joined path (e.g.
'owlvit/backbone/clip/visual/...' or 'decoder/query_embed'). `re.search` means an unanchored
pattern matches anywhere in the path, so 'owlvit/.*' matches both 'owlvit/...' and
'params/owlvit/...'; anchor with '^' / '$' for exact control. The first matching rule wins;
parameters no rule matches get multiplier 1.0. A multiplier of 0.0 freezes the parameters: their
updates are exactly zero (`optax.set_to_zero`) and no Adam moments are kept for them.

Weight decay (decoupled, AdamW-style) is applied only to parameters with `ndim >= 2` (dense /
attention kernels, and also 2-D embeddings such as the decoder's `query_embed`); biases and
LayerNorm scales / biases (`ndim < 2`) are not decayed.

Config fields read by `make_schedule` / `make_optimizer` (attribute access; an ml_collections
ConfigDict or any object with these attributes):
  learning_rate (required, >= 0): peak learning rate (paper: 1e-4).
  total_steps (required, int > 0): length of the schedule, warmup included.
  end_learning_rate (default 0.0; paper: 1e-6): learning rate at `total_steps` and after.
  warmup_steps (default 0): linear warmup from 0 to `learning_rate`, 0 <= warmup_steps <= total.
  weight_decay (default 0.0): AdamW decoupled weight decay coefficient.
  b1 (0.9), b2 (0.999), eps (1e-8): Adam hyper-parameters.
  grad_clip_norm (default None): clip gradients by global norm; None or <= 0 disables.
  lr_multipliers (default ()): sequence of (regex, multiplier) rules, see above.
"""

from __future__ import annotations

import collections
import re
from typing import Any, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
Rule = Tuple[str, float]

FROZEN_LABEL = 'frozen'
_MISSING = object()


def _get(config: Any, name: str, default: Any = _MISSING) -> Any:
  """Reads `config.name`, falling back to `default`; raises ValueError if required and missing."""
  try:
    value = getattr(config, name)
  except (AttributeError, KeyError):
    value = _MISSING
  if value is _MISSING:
    if default is _MISSING:
      raise ValueError(f'Optimizer config is missing required field {name!r}.')
    return default
  return value


def _path_str(path: Sequence[Any]) -> str:
  """Joins a jax key path into 'a/b/c'."""
  parts = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return '/'.join(parts)


def _compile_rules(rules: Optional[Sequence[Rule]]) -> list[tuple[re.Pattern, float]]:
  """Validates and compiles `(regex, multiplier)` rules."""
  compiled = []
  for i, rule in enumerate(rules or ()):
    try:
      pattern, multiplier = rule
    except (TypeError, ValueError):
      raise ValueError(f'lr_multipliers[{i}] must be a (regex, multiplier) pair, got {rule!r}.')
    try:
      regex = re.compile(pattern)
    except (re.error, TypeError) as e:
      raise ValueError(f'lr_multipliers[{i}]: invalid regex {pattern!r}: {e}') from e
    multiplier = float(multiplier)
    if not np.isfinite(multiplier) or multiplier < 0:
      raise ValueError(
          f'lr_multipliers[{i}]: multiplier must be finite and >= 0, '
          f'got {multiplier} for {pattern!r}.'
      )
    compiled.append((regex, multiplier))
  return compiled


def _label_for(multiplier: float) -> str:
  """Group label of a multiplier: 'frozen' for 0, else 'lr_x<multiplier>'."""
  return FROZEN_LABEL if multiplier == 0.0 else f'lr_x{multiplier:g}'


def param_multipliers(params: PyTree, rules: Optional[Sequence[Rule]]) -> PyTree:
  """Learning-rate multiplier of every parameter (first matching rule wins, default 1.0).

  Args:
    params: parameter pytree (nested dicts).
    rules: sequence of (regex, multiplier) pairs matched with `re.search` on '/'-joined paths.

  Returns:
    A pytree with the structure of `params` holding Python floats.
  """
  compiled = _compile_rules(rules)

  def lookup(path, _):
    name = _path_str(path)
    for regex, multiplier in compiled:
      if regex.search(name):
        return multiplier
    return 1.0

  return jax.tree_util.tree_map_with_path(lookup, params)


def param_labels(params: PyTree, rules: Optional[Sequence[Rule]]) -> PyTree:
  """Optimizer group label of every parameter: 'frozen' (multiplier 0) or 'lr_x<multiplier>'.

  Args:
    params: parameter pytree (nested dicts).
    rules: sequence of (regex, multiplier) pairs matched with `re.search` on '/'-joined paths;
      the first match wins, unmatched parameters get multiplier 1.0.

  Returns:
    A pytree with the structure of `params` holding string labels.
  """
  return jax.tree_util.tree_map(_label_for, param_multipliers(params, rules))


def _format_count(n: int) -> str:
  """Human-readable parameter count: 950, 12.3K, 1.2M, 3.4B."""
  for unit, scale in (('B', 1e9), ('M', 1e6), ('K', 1e3)):
    if n >= scale:
      return f'{n / scale:.1f}{unit}'
  return str(n)


def describe(params: PyTree, rules: Optional[Sequence[Rule]]) -> str:
  """One-line summary of the parameter groups per top-level subtree.

  Example: 'decoder: 1.2M params lr x1; owlvit: 150.3M params frozen'. A lone top-level 'params'
  collection is looked through.

  Args:
    params: parameter pytree (nested dicts).
    rules: (regex, multiplier) rules, as for `param_labels`.

  Returns:
    The summary string.
  """
  multipliers = param_multipliers(params, rules)
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  mults = jax.tree_util.tree_leaves(multipliers)
  counts: dict[str, dict[float, int]] = collections.OrderedDict()
  names = [_path_str(path).split('/') for path, _ in leaves]
  depth = 1 if names and all(len(n) > 1 and n[0] == 'params' for n in names) else 0
  for name, (_, leaf), mult in zip(names, leaves, mults):
    top = name[depth]
    group = counts.setdefault(top, collections.OrderedDict())
    group[mult] = group.get(mult, 0) + int(np.prod(np.shape(leaf)))
  parts = []
  for top, group in counts.items():
    items = []
    for mult, n in group.items():
      what = 'frozen' if mult == 0.0 else f'lr x{mult:g}'
      items.append(f'{_format_count(n)} params {what}')
    parts.append(f'{top}: ' + ', '.join(items))
  return '; '.join(parts)


def default_lr_multipliers(freeze_encoder: bool, encoder_multiplier: float = 0.1) -> list[Rule]:
  """Default rules for the OWL-ViT encoder (everything under 'owlvit').

  Args:
    freeze_encoder: freeze the whole 'owlvit' subtree (multiplier 0).
    encoder_multiplier: multiplier for 'owlvit' when it is fine-tuned.

  Returns:
    [('owlvit/.*', 0.0)] when frozen, else [('owlvit/.*', encoder_multiplier)].
  """
  return [('owlvit/.*', 0.0 if freeze_encoder else float(encoder_multiplier))]


def make_schedule(config: Any) -> optax.Schedule:
  """Cosine decay from `learning_rate` to `end_learning_rate` over `total_steps`.

  With `warmup_steps > 0` the rate rises linearly from 0 to `learning_rate` over the first
  `warmup_steps` steps, then follows the cosine over the remaining `total_steps - warmup_steps`:
  lr(t) = end + (peak - end) * (1 + cos(pi * (t - warmup) / (total - warmup))) / 2, held at
  `end_learning_rate` after `total_steps`.

  Args:
    config: object with `learning_rate`, `total_steps` and optionally `end_learning_rate`,
      `warmup_steps` (see the module docstring).

  Returns:
    An optax schedule mapping step -> learning rate.

  Raises:
    ValueError: on missing or invalid fields.
  """
  total_steps = _get(config, 'total_steps')
  if (
      isinstance(total_steps, bool)
      or not isinstance(total_steps, (int, np.integer))
      or total_steps <= 0
  ):
    raise ValueError(f'total_steps must be an int > 0, got {total_steps!r}.')
  total_steps = int(total_steps)
  warmup_steps = _get(config, 'warmup_steps', 0) or 0
  if (
      isinstance(warmup_steps, bool)
      or not isinstance(warmup_steps, (int, np.integer))
      or not 0 <= warmup_steps <= total_steps
  ):
    raise ValueError(
        f'warmup_steps must be an int in [0, total_steps={total_steps}], ' f'got {warmup_steps!r}.'
    )
  warmup_steps = int(warmup_steps)
  peak = float(_get(config, 'learning_rate'))
  end = float(_get(config, 'end_learning_rate', 0.0) or 0.0)
  if not (np.isfinite(peak) and peak >= 0):
    raise ValueError(f'learning_rate must be finite and >= 0, got {peak!r}.')
  if not (np.isfinite(end) and end >= 0):
    raise ValueError(f'end_learning_rate must be finite and >= 0, got {end!r}.')

  if warmup_steps == total_steps:
    return optax.linear_schedule(0.0, peak, warmup_steps)
  if warmup_steps > 0:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=end,
    )
  if peak == 0.0:
    return optax.constant_schedule(end)
  return optax.cosine_decay_schedule(peak, total_steps, alpha=end / peak)


def _scaled(schedule: optax.Schedule, multiplier: float) -> optax.Schedule:
  """`schedule` times a constant multiplier."""
  if multiplier == 1.0:
    return schedule
  return lambda step: schedule(step) * multiplier


def _decay_mask(params: PyTree) -> PyTree:
  """True for parameters that get weight decay: those with ndim >= 2."""
  return jax.tree_util.tree_map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(
    config: Any, params: PyTree
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with cosine schedule, global-norm clipping and per-group learning-rate multipliers.

  The chain is: zero the gradients of frozen parameters, clip by global norm (so the norm is
  computed over trainable gradients only), then `optax.multi_transform` with one AdamW per distinct
  non-zero multiplier (learning rate = schedule * multiplier; weight decay on ndim >= 2 only) and
  `optax.set_to_zero` for frozen parameters, which therefore keep no Adam moments.

  Args:
    config: optimizer config, see the module docstring for the fields.
    params: the parameter pytree the optimizer will update (used to derive group labels).

  Returns:
    (optimizer, schedule); `schedule` is the unscaled base schedule, handy for logging.

  Raises:
    ValueError: on missing or invalid config fields or rules.
  """
  schedule = make_schedule(config)
  weight_decay = float(_get(config, 'weight_decay', 0.0) or 0.0)
  if not (np.isfinite(weight_decay) and weight_decay >= 0):
    raise ValueError(f'weight_decay must be finite and >= 0, got {weight_decay!r}.')
  b1 = float(_get(config, 'b1', 0.9))
  b2 = float(_get(config, 'b2', 0.999))
  eps = float(_get(config, 'eps', 1e-8))
  if not (0 <= b1 < 1 and 0 <= b2 < 1):
    raise ValueError(f'b1 and b2 must be in [0, 1), got b1={b1}, b2={b2}.')
  if not eps >= 0:
    raise ValueError(f'eps must be >= 0, got {eps}.')
  clip = _get(config, 'grad_clip_norm', None)
  clip = None if clip is None or float(clip) <= 0 else float(clip)
  rules = _get(config, 'lr_multipliers', None) or ()

  multipliers = param_multipliers(params, rules)
  labels = jax.tree_util.tree_map(_label_for, multipliers)
  transforms: dict[str, optax.GradientTransformation] = {}
  for mult in sorted(set(jax.tree_util.tree_leaves(multipliers))):
    label = _label_for(mult)
    if mult == 0.0:
      transforms[label] = optax.set_to_zero()
    else:
      transforms[label] = optax.adamw(
          learning_rate=_scaled(schedule, mult),
          b1=b1,
          b2=b2,
          eps=eps,
          weight_decay=weight_decay,
          mask=_decay_mask,
      )

  steps = []
  if FROZEN_LABEL in transforms:
    frozen_mask = jax.tree_util.tree_map(lambda label: label == FROZEN_LABEL, labels)
    steps.append(optax.masked(optax.set_to_zero(), frozen_mask))
  if clip is not None:
    steps.append(optax.clip_by_global_norm(clip))
  steps.append(optax.multi_transform(transforms, labels))
  return optax.chain(*steps), schedule
