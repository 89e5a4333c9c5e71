"""Reading and writing OWL-ViT checkpoints: Scenic msgpack files and Hugging Face safetensors.

Supported inputs (spec §7):

* Scenic single-file msgpack checkpoints written by `flax.training.checkpoints` /
  `flax.serialization`, in any of the three layouts:

  | layout  | params location                | resblock key    | block LayerNorms |
  |---------|--------------------------------|-----------------|------------------|
  | v1      | `restored['optimizer']['target']` | `resblocks.N` | `ln_1`, `ln_2`   |
  | v2      | `restored['params']`           | `resblocks.N`   | `ln_0`, `ln_1`   |
  | current | `{'params': ...}`              | `resblocks_N`   | `ln_0`, `ln_1`   |

  A bare params dict (top-level keys include `backbone`) is accepted too.
* Hugging Face `OwlViTForObjectDetection` / `Owlv2ForObjectDetection` checkpoints: a directory with
  `config.json` and `model.safetensors` (or a sharded `model.safetensors.index.json`), or the path
  of the `.safetensors` file itself. Read with `safetensors.numpy`; torch is not needed.

PyTorch pickles (`.bin`, `.pt`, `.pth`, ...) are refused and never unpickled.

`load_checkpoint` also takes names (`clipcrop_jax.owlvit.hub`): Hugging Face ids and Scenic release
names are downloaded once into a cache and read from there (a PyTorch-only HF repo is converted
with `torch.load(weights_only=True)`, never a general unpickler).

Every parameter is returned as float32 in Scenic's current tree (spec §1.2), so the result feeds
`TextZeroShotDetectionModule.apply` directly.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pathlib
import re
from typing import Any, Mapping, Optional, Union

from absl import logging
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from clipcrop_jax.owlvit.checkpoint_files import CheckpointError
from clipcrop_jax.owlvit.checkpoint_files import sniff as _sniff
from clipcrop_jax.owlvit.configs import CONFIGS, HEAD_DIM, OwlViTConfig, get_config
from clipcrop_jax.owlvit import fileio

PathLike = Union[str, os.PathLike]
Params = dict[str, Any]

# Top-level modules of the detector's `params` (spec §1.1). Anything else is dropped on load.
_KNOWN_TOP_LEVEL = ('backbone', 'class_head', 'obj_box_head', 'objectness_head')
# Old class-head keys Scenic pops on load (spec §7.2).
_OBSOLETE_CLASS_HEAD_KEYS = ('padding', 'padding_bias')
_PICKLE_SUFFIXES = ('.bin', '.pt', '.pth', '.pkl', '.pickle', '.ckpt')
_HF_WEIGHTS = 'model.safetensors'
_HF_INDEX = 'model.safetensors.index.json'
_HF_CONFIG = 'config.json'
_HF_PREFIXES = ('owlvit.', 'owlv2.')
# Non-parameter buffers some HF versions store in the state dict.
_HF_IGNORED_SUFFIXES = ('position_ids', 'box_bias', 'num_batches_tracked')


# --------------------------------------------------------------------------------------------
# Tree helpers.
# --------------------------------------------------------------------------------------------


def flatten_params(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """Nested dict -> {'a/b/c': leaf} in the tree's iteration order."""
  flat = {}
  for key, value in tree.items():
    path = f'{prefix}/{key}' if prefix else str(key)
    if isinstance(value, Mapping):
      flat.update(flatten_params(value, path))
    else:
      flat[path] = value
  return flat


def unflatten_params(flat: Mapping[str, Any]) -> Params:
  """{'a/b/c': leaf} -> nested dict."""
  tree: Params = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split('/')
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return tree


def param_count(params: Mapping[str, Any]) -> int:
  """Total number of scalars in a params tree (arrays or ShapeDtypeStructs)."""
  return sum(int(np.prod(np.shape(x))) for x in flatten_params(params).values())


def _unwrap_variables(variables_or_params: Mapping[str, Any]) -> Mapping[str, Any]:
  """{'params': tree} or a bare params tree -> the params tree."""
  if 'backbone' not in variables_or_params and isinstance(
      variables_or_params.get('params'), Mapping
  ):
    return variables_or_params['params']
  return variables_or_params


# --------------------------------------------------------------------------------------------
# File kinds.
# --------------------------------------------------------------------------------------------


def _pickle_error(path: PathLike) -> CheckpointError:
  return CheckpointError(
      f'checkpoint {path}: looks like a PyTorch pickle; pickles are never unpickled (they can run '
      'arbitrary code). Convert it to safetensors first, e.g. '
      '`model.save_pretrained(dir, safe_serialization=True)`, and load that directory.'
  )


def read_msgpack(path: PathLike) -> dict[str, Any]:
  """Decodes a Flax msgpack file (ExtType arrays, scalars, chunked arrays) into a nested dict.

  Args:
    path: file written by `flax.training.checkpoints.save_checkpoint` or
      `flax.serialization.msgpack_serialize`.

  Returns:
    The restored nested dict with numpy leaves.

  Raises:
    CheckpointError: the file is not a msgpack map.
  """
  path = pathlib.Path(path)
  kind = _sniff(path)
  if kind == 'pickle':
    raise _pickle_error(path)
  if kind != 'msgpack':
    raise CheckpointError(
        f'checkpoint {path}: not a msgpack map (file kind: {kind}); expected '
        'a Scenic/Flax msgpack checkpoint or a Hugging Face safetensors model.'
    )
  try:
    restored = flax.serialization.msgpack_restore(path.read_bytes())
  except Exception as e:  # msgpack raises several unrelated types on corrupt input.
    raise CheckpointError(
        f'checkpoint {path}: corrupt or truncated msgpack ({type(e).__name__}: {e})'
    ) from e
  if not isinstance(restored, dict):
    raise CheckpointError(
        f'checkpoint {path}: not a msgpack map (decoded a ' f'{type(restored).__name__})'
    )
  return restored


# --------------------------------------------------------------------------------------------
# Scenic layout normalisation (spec §7.2).
# --------------------------------------------------------------------------------------------


def _locate_params(restored: Mapping[str, Any], source: str) -> tuple[Mapping[str, Any], str]:
  """Finds the params tree inside a restored checkpoint; returns (params, where)."""
  node, where = restored, ''
  for _ in range(4):  # Descend through {'params': {'params': ...}}-style wrappers.
    if 'backbone' in node:
      return node, where or '<root>'
    optimizer = node.get('optimizer')
    if isinstance(optimizer, Mapping) and isinstance(optimizer.get('target'), Mapping):
      node, where = optimizer['target'], f'{where}optimizer/target/'
    elif isinstance(node.get('params'), Mapping):
      node, where = node['params'], f'{where}params/'
    elif isinstance(node.get('target'), Mapping):
      node, where = node['target'], f'{where}target/'
    else:
      break
  keys = ', '.join(sorted(map(str, restored))[:8])
  raise CheckpointError(
      f'checkpoint {source}: no OWL-ViT parameters found (expected optimizer/target, params, or '
      f"a tree with 'backbone'; top-level keys: {keys})"
  )


def _fix_block_names(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Renames `resblocks.N` -> `resblocks_N`, then legacy block LNs `ln_1/ln_2` -> `ln_0/ln_1`.

  The legacy LayerNorm naming is detected per tower by `ln_2` in block 0 (not, as Scenic does, by
  the literal key `resblocks.0`, which misfires on already-renamed trees).
  """
  fixed = {re.sub(r'/resblocks\.(\d+)/', r'/resblocks_\1/', p): v for p, v in flat.items()}
  for tower in ('visual', 'text'):
    base = f'backbone/clip/{tower}/transformer/'
    if any(p.startswith(f'{base}resblocks_0/ln_2/') for p in fixed):
      pattern = re.compile(f'^({re.escape(base)}resblocks_\\d+/)ln_([12])/')
      fixed = {
          pattern.sub(lambda m: f'{m.group(1)}ln_{int(m.group(2)) - 1}/', p): v
          for p, v in fixed.items()
      }
  return fixed


def _to_float32(leaf: Any, path: str, source: str) -> np.ndarray:
  """Converts one leaf to a float32 numpy array (bfloat16/float16 are upcast)."""
  arr = np.asarray(leaf)
  if not jnp.issubdtype(arr.dtype, jnp.floating):
    raise CheckpointError(f'checkpoint {source}: parameter {path} has non-float dtype {arr.dtype}')
  return arr.astype(np.float32, copy=False)


def normalize_scenic_params(restored: Mapping[str, Any], source: str = '<memory>') -> Params:
  """Restored Scenic checkpoint (any layout) -> params in the current naming, float32 numpy.

  Applies the fix-ups of spec §7.2: locates the params (`optimizer/target`, `params` or bare),
  renames `resblocks.N` to `resblocks_N`, renames the legacy block LayerNorms `ln_1/ln_2` to
  `ln_0/ln_1` (detected by `ln_2` in block 0 of each tower), drops `class_head/padding*`, the
  `obj_mask_head` of the L/14+masks model, and any other unknown top-level key.

  Args:
    restored: the nested dict from `read_msgpack` (or an in-memory tree).
    source: name used in error and log messages.

  Returns:
    A new nested dict; the input is not modified.
  """
  params, where = _locate_params(restored, source)
  logging.info('checkpoint %s: parameters found at %s', source, where)
  out: Params = {}
  for key, value in params.items():
    if key == 'obj_mask_head':
      logging.info('checkpoint %s: dropping obj_mask_head (mask head is not supported).', source)
    elif key not in _KNOWN_TOP_LEVEL:
      logging.warning('checkpoint %s: ignoring unknown top-level key %r.', source, key)
    else:
      out[key] = value
  if isinstance(out.get('class_head'), Mapping):
    dropped = [k for k in _OBSOLETE_CLASS_HEAD_KEYS if k in out['class_head']]
    if dropped:
      logging.info('checkpoint %s: dropping obsolete class_head keys %s.', source, dropped)
      out['class_head'] = {
          k: v for k, v in out['class_head'].items() if k not in _OBSOLETE_CLASS_HEAD_KEYS
      }
  flat = _fix_block_names(flatten_params(out))
  flat = {p: _to_float32(v, p, source) for p, v in flat.items()}
  return unflatten_params(flat)


# --------------------------------------------------------------------------------------------
# Architecture inference and validation.
# --------------------------------------------------------------------------------------------


def _get(flat: Mapping[str, Any], path: str, source: str) -> tuple[int, ...]:
  if path not in flat:
    raise CheckpointError(
        f'checkpoint {source}: parameter {path} is missing; cannot infer the ' 'architecture'
    )
  return tuple(np.shape(flat[path]))


def _count_blocks(flat: Mapping[str, Any], tower: str) -> int:
  prefix = f'backbone/clip/{tower}/transformer/resblocks_'
  return len({p[len(prefix) :].split('/')[0] for p in flat if p.startswith(prefix)})


def infer_config(params: Mapping[str, Any], source: str = '<memory>') -> OwlViTConfig:
  """Infers the architecture from parameter shapes (current naming).

  Args:
    params: params tree (or {'params': tree}) in Scenic's current naming; leaves may be arrays or
      `jax.ShapeDtypeStruct`s.
    source: name used in error messages.

  Returns:
    The matching named config from `CONFIGS` (e.g. 'clip_b32') when every field agrees, otherwise
    an `OwlViTConfig` named 'custom'.

  Raises:
    CheckpointError: a parameter needed for the inference is missing or has an impossible shape.
  """
  flat = flatten_params(_unwrap_variables(params))
  patch, patch_w, channels, vision_width = _get(flat, 'backbone/clip/visual/conv1/kernel', source)
  if patch != patch_w or channels != 3:
    raise CheckpointError(
        f'checkpoint {source}: backbone/clip/visual/conv1/kernel has shape '
        f'{(patch, patch_w, channels, vision_width)}; expected (p, p, 3, W)'
    )
  rows = _get(flat, 'backbone/clip/visual/positional_embedding', source)[0]
  grid = math.isqrt(max(rows - 1, 0))
  if grid * grid != rows - 1 or grid == 0:
    raise CheckpointError(
        f'checkpoint {source}: backbone/clip/visual/positional_embedding has '
        f'{rows} rows; expected 1 + g*g'
    )
  vocab, text_width = _get(flat, 'backbone/clip/text/token_embedding/embedding', source)
  max_len = _get(flat, 'backbone/clip/text/positional_embedding', source)[0]
  embed_dim = _get(flat, 'class_head/Dense_0/kernel', source)[-1]
  fields = dict(
      image_size=grid * patch,
      patch_size=patch,
      vision_width=vision_width,
      vision_layers=_count_blocks(flat, 'visual'),
      text_width=text_width,
      text_layers=_count_blocks(flat, 'text'),
      embed_dim=embed_dim,
      objectness=any(p.startswith('objectness_head/') for p in flat),
      vocab_size=vocab,
      max_query_length=max_len,
      native_image_grid_size=None,
  )
  for width, what in ((vision_width, 'vision'), (text_width, 'text')):
    if width % HEAD_DIM:
      raise CheckpointError(
          f'checkpoint {source}: {what} width {width} is not a multiple of the '
          f'head width {HEAD_DIM}'
      )
  for config in CONFIGS.values():
    if all(getattr(config, k) == v for k, v in fields.items()):
      return config
  return OwlViTConfig(name='custom', **fields)


def _detector_class() -> type[Any]:
  """`TextZeroShotDetectionModule`, imported lazily (model code may import this module)."""
  from clipcrop_jax.owlvit import model  # pylint: disable=g-import-not-at-top

  return model.TextZeroShotDetectionModule


@functools.lru_cache(maxsize=16)
def _expected_shapes_cached(config: OwlViTConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
  module = _detector_class()(config=config)
  images = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
  queries = jax.ShapeDtypeStruct((1, 1, config.max_query_length), jnp.int32)
  variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), images, queries)
  return tuple((p, tuple(x.shape)) for p, x in flatten_params(variables['params']).items())


# Order in which `validate_params` reports problems: the most telling parameters first.
_CHECK_ORDER = (
    'backbone/clip/visual/conv1',
    'backbone/clip/visual/positional_embedding',
    'backbone/clip/visual',
    'backbone/clip/text/token_embedding',
    'backbone/clip/text/positional_embedding',
    'backbone/clip/text',
    'backbone',
    'class_head',
    'obj_box_head',
    'objectness_head',
    '',
)


def _check_order_key(path: str) -> tuple[int, list[Any]]:
  rank = next(i for i, p in enumerate(_CHECK_ORDER) if path.startswith(p))
  natural = [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', path)]
  return rank, natural


def expected_param_shapes(config: OwlViTConfig) -> dict[str, tuple[int, ...]]:
  """{'path': shape} of the module's params for `config`, from `jax.eval_shape` (no memory).

  Paths are ordered for diagnostics: vision tower (conv1 first), text tower, then the heads;
  block numbers in numeric order.
  """
  return dict(sorted(_expected_shapes_cached(config), key=lambda kv: _check_order_key(kv[0])))


def validate_params(
    params: Mapping[str, Any], config: OwlViTConfig, source: str = '<memory>'
) -> None:
  """Checks that `params` has every parameter of the module for `config` with the right shape.

  Extra parameters are allowed (logged); `load_checkpoint` drops them.

  Args:
    params: params tree (or {'params': tree}) in Scenic's current naming.
    config: the architecture to check against.
    source: name used in error messages (normally the checkpoint path).

  Raises:
    CheckpointError: naming the first missing or mis-shaped parameter path.
  """
  flat = flatten_params(_unwrap_variables(params))
  expected = expected_param_shapes(config)
  for path, shape in expected.items():
    if path not in flat:
      raise CheckpointError(
          f'checkpoint {source}: parameter {path} is missing (expected shape '
          f'{shape} for config {config.name})'
      )
    got = tuple(np.shape(flat[path]))
    if got != shape:
      raise CheckpointError(
          f'checkpoint {source}: parameter {path} has shape {got}, expected '
          f'{shape} for config {config.name}'
      )
  extra = [p for p in flat if p not in expected]
  if extra:
    logging.warning(
        'checkpoint %s: ignoring %d unexpected parameter(s) for config %s, e.g. %s',
        source,
        len(extra),
        config.name,
        extra[:3],
    )


# --------------------------------------------------------------------------------------------
# Hugging Face <-> Scenic names (spec §1.4).
# --------------------------------------------------------------------------------------------

_TOWERS = {'vision_model': 'visual', 'text_model': 'text'}
_LN = {'weight': 'scale', 'bias': 'bias'}
_BLOCK_LN = {'layer_norm1': 'ln_0', 'layer_norm2': 'ln_1'}
_ATTN = {'q_proj': 'query', 'k_proj': 'key', 'v_proj': 'value'}
_MLP = {'fc1': 'c_fc', 'fc2': 'c_proj'}
_HEADS = {'box_head': 'obj_box_head', 'objectness_head': 'objectness_head'}
_INV_TOWERS = {v: k for k, v in _TOWERS.items()}
_INV_LN = {v: k for k, v in _LN.items()}
_INV_BLOCK_LN = {v: k for k, v in _BLOCK_LN.items()}
_INV_ATTN = {v: k for k, v in _ATTN.items()}
_INV_MLP = {v: k for k, v in _MLP.items()}
_INV_HEADS = {v: k for k, v in _HEADS.items()}
# Exact-name rules (after stripping the 'owlvit.'/'owlv2.' prefix): hf name -> (scenic, kind).
_FIXED = {
    'logit_scale': ('backbone/clip/logit_scale', 'scalar'),
    'vision_model.embeddings.class_embedding': ('backbone/clip/visual/class_embedding', 'id'),
    'vision_model.embeddings.patch_embedding.weight': ('backbone/clip/visual/conv1/kernel', 'conv'),
    'vision_model.embeddings.position_embedding.weight': (
        'backbone/clip/visual/positional_embedding',
        'id',
    ),
    'text_model.embeddings.token_embedding.weight': (
        'backbone/clip/text/token_embedding/embedding',
        'id',
    ),
    'text_model.embeddings.position_embedding.weight': (
        'backbone/clip/text/positional_embedding',
        'id',
    ),
    'text_projection.weight': ('backbone/clip/text/text_projection/kernel', 'linear'),
}
_FIXED_LN = {
    'vision_model.pre_layernorm': 'backbone/clip/visual/ln_pre',
    'vision_model.post_layernorm': 'backbone/clip/visual/ln_post',
    'text_model.final_layer_norm': 'backbone/clip/text/ln_final',
    'layer_norm': 'backbone/merged_class_token',
}
_BLOCK_RE = re.compile(r'^(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)$')
_HEAD_RE = re.compile(r'^(box_head|objectness_head)\.dense(\d+)\.(weight|bias)$')
_CLASS_RE = re.compile(r'^class_head\.(dense0|logit_shift|logit_scale)\.(weight|bias)$')


def _hf_block_rule(rest: str) -> Optional[tuple[str, str]]:
  """Maps a per-layer HF name suffix to (scenic suffix, kind), or None."""
  module, _, leaf = rest.rpartition('.')
  if module in _BLOCK_LN and leaf in _LN:
    return f'{_BLOCK_LN[module]}/{_LN[leaf]}', 'id'
  if module.startswith('mlp.') and module[4:] in _MLP and leaf in _LN:
    kind = 'linear' if leaf == 'weight' else 'id'
    return f'mlp/{_MLP[module[4:]]}/{"kernel" if leaf == "weight" else "bias"}', kind
  if module.startswith('self_attn.'):
    proj = module[len('self_attn.') :]
    if proj in _ATTN:
      return f'attn/{_ATTN[proj]}/{"kernel" if leaf == "weight" else "bias"}', f'qkv_{leaf}'
    if proj == 'out_proj':
      return f'attn/out/{"kernel" if leaf == "weight" else "bias"}', f'out_{leaf}'
  return None


def _hf_rule(name: str) -> Optional[tuple[str, str]]:
  """HF state-dict name (prefix stripped) -> (scenic path, conversion kind), or None."""
  if name in _FIXED:
    return _FIXED[name]
  module, _, leaf = name.rpartition('.')
  if module in _FIXED_LN and leaf in _LN:
    return f'{_FIXED_LN[module]}/{_LN[leaf]}', 'id'
  if m := _BLOCK_RE.match(name):
    rule = _hf_block_rule(m.group(3))
    if rule:
      base = f'backbone/clip/{_TOWERS[m.group(1)]}/transformer/resblocks_{m.group(2)}'
      return f'{base}/{rule[0]}', rule[1]
  if m := _HEAD_RE.match(name):
    leaf = 'kernel' if m.group(3) == 'weight' else 'bias'
    return f'{_HEADS[m.group(1)]}/Dense_{m.group(2)}/{leaf}', 'linear' if leaf == 'kernel' else 'id'
  if m := _CLASS_RE.match(name):
    module = 'Dense_0' if m.group(1) == 'dense0' else m.group(1)
    leaf = 'kernel' if m.group(2) == 'weight' else 'bias'
    return f'class_head/{module}/{leaf}', 'linear' if leaf == 'kernel' else 'id'
  return None


def _hf_to_scenic_array(x: np.ndarray, kind: str) -> np.ndarray:
  """Converts one HF tensor to its Scenic layout (head width fixed at 64)."""
  if kind == 'id':
    return x
  if kind == 'scalar':  # Some HF versions store logit_scale as (1,).
    return x.reshape(())
  if kind == 'conv':  # (O, I, H, W) -> (H, W, I, O)
    return x.transpose(2, 3, 1, 0)
  if kind == 'linear':  # (out, in) -> (in, out)
    return x.T
  if kind == 'qkv_weight':  # (heads*64, in) -> (in, heads, 64)
    return x.T.reshape(x.shape[1], -1, HEAD_DIM)
  if kind == 'qkv_bias':  # (heads*64,) -> (heads, 64)
    return x.reshape(-1, HEAD_DIM)
  if kind == 'out_weight':  # (out, heads*64) -> (heads, 64, out)
    return x.T.reshape(-1, HEAD_DIM, x.shape[0])
  if kind == 'out_bias':
    return x
  raise AssertionError(kind)


def _scenic_to_hf_array(x: np.ndarray, kind: str) -> np.ndarray:
  """Inverse of `_hf_to_scenic_array`."""
  if kind in ('id', 'out_bias', 'scalar'):
    return x
  if kind == 'conv':
    return x.transpose(3, 2, 0, 1)
  if kind == 'linear':
    return x.T
  if kind == 'qkv_weight':
    return x.reshape(x.shape[0], -1).T
  if kind == 'qkv_bias':
    return x.reshape(-1)
  if kind == 'out_weight':
    return x.reshape(-1, x.shape[-1]).T
  raise AssertionError(kind)


def hf_to_scenic_params(state_dict: Mapping[str, np.ndarray], source: str = '<memory>') -> Params:
  """Maps an HF OwlViT/Owlv2ForObjectDetection state dict to Scenic's params tree (float32).

  `visual_projection` (no Scenic counterpart) and non-parameter buffers are dropped; other
  unknown keys are logged and ignored.

  Args:
    state_dict: HF name -> numpy array (e.g. from `safetensors.numpy.load_file`).
    source: name used in error and log messages.

  Returns:
    Nested params dict in Scenic's current naming.
  """
  flat: dict[str, np.ndarray] = {}
  unknown = []
  for name, value in state_dict.items():
    stripped = name
    for prefix in _HF_PREFIXES:
      if name.startswith(prefix):
        stripped = name[len(prefix) :]
        break
    if stripped.endswith(_HF_IGNORED_SUFFIXES) or stripped == 'visual_projection.weight':
      continue
    rule = _hf_rule(stripped)
    if rule is None:
      unknown.append(name)
      continue
    path, kind = rule
    arr = _to_float32(value, name, source)
    if kind.startswith(('qkv', 'out')) and arr.shape[0 if kind != 'out_weight' else 1] % HEAD_DIM:
      raise CheckpointError(
          f'checkpoint {source}: {name} has shape {arr.shape}; attention width '
          f'must be a multiple of the head width {HEAD_DIM}'
      )
    flat[path] = np.asarray(_hf_to_scenic_array(arr, kind), order='C')
  if unknown:
    logging.warning(
        'checkpoint %s: ignoring %d unknown HF tensor(s), e.g. %s',
        source,
        len(unknown),
        unknown[:3],
    )
  if not flat:
    raise CheckpointError(f'checkpoint {source}: no OWL-ViT tensors found in the safetensors file')
  return unflatten_params(flat)


def scenic_to_hf_state_dict(
    params: Mapping[str, Any], model_type: Optional[str] = None
) -> dict[str, np.ndarray]:
  """Scenic params -> HF OwlViT/Owlv2ForObjectDetection state dict (float32, contiguous).

  HF's `visual_projection.weight` has no Scenic counterpart and is not emitted.

  Args:
    params: params tree (or {'params': tree}) in Scenic's current naming.
    model_type: 'owlvit' or 'owlv2' (sets the key prefix); default 'owlv2' when the tree has an
      objectness head, else 'owlvit'.

  Returns:
    HF name -> numpy array.
  """
  flat = flatten_params(_unwrap_variables(params))
  if model_type is None:
    model_type = 'owlv2' if any(p.startswith('objectness_head/') for p in flat) else 'owlvit'
  out = {}
  for path, value in flat.items():
    name, kind = _scenic_path_to_hf(path, model_type)
    if name is None:
      continue
    arr = np.asarray(value, np.float32)
    out[name] = np.asarray(_scenic_to_hf_array(arr, kind), order='C')
  return out


def _scenic_path_to_hf(path: str, model_type: str) -> tuple[Optional[str], str]:
  """Scenic path -> (HF name or None, kind); the inverse of `_hf_rule`."""
  for name, (scenic, kind) in _FIXED.items():
    if scenic == path:
      return f'{model_type}.{name}', kind
  module, _, leaf = path.rpartition('/')
  for hf_module, scenic_module in _FIXED_LN.items():
    if module == scenic_module and leaf in _INV_LN:
      prefix = '' if hf_module == 'layer_norm' else f'{model_type}.'
      return f'{prefix}{hf_module}.{_INV_LN[leaf]}', 'id'
  m = re.match(r'^backbone/clip/(visual|text)/transformer/resblocks_(\d+)/(.+)$', path)
  if m:
    base = f'{model_type}.{_INV_TOWERS[m.group(1)]}.encoder.layers.{m.group(2)}'
    parts = m.group(3).split('/')
    hf_leaf = 'weight' if parts[-1] in ('kernel', 'scale') else 'bias'
    if parts[0] in ('ln_0', 'ln_1'):
      return f'{base}.{_INV_BLOCK_LN[parts[0]]}.{hf_leaf}', 'id'
    if parts[0] == 'mlp':
      return f'{base}.mlp.{_INV_MLP[parts[1]]}.{hf_leaf}', 'linear' if hf_leaf == 'weight' else 'id'
    if parts[0] == 'attn':
      if parts[1] == 'out':
        return f'{base}.self_attn.out_proj.{hf_leaf}', f'out_{hf_leaf}'
      return f'{base}.self_attn.{_INV_ATTN[parts[1]]}.{hf_leaf}', f'qkv_{hf_leaf}'
  m = re.match(r'^(obj_box_head|objectness_head)/Dense_(\d+)/(kernel|bias)$', path)
  if m:
    kernel = m.group(3) == 'kernel'
    name = f'{_INV_HEADS[m.group(1)]}.dense{m.group(2)}.{"weight" if kernel else "bias"}'
    return name, 'linear' if kernel else 'id'
  m = re.match(r'^class_head/(Dense_0|logit_shift|logit_scale)/(kernel|bias)$', path)
  if m:
    module = 'dense0' if m.group(1) == 'Dense_0' else m.group(1)
    kernel = m.group(2) == 'kernel'
    return f'class_head.{module}.{"weight" if kernel else "bias"}', 'linear' if kernel else 'id'
  logging.warning('scenic_to_hf_state_dict: no HF name for %s; skipped.', path)
  return None, 'id'


def hf_config_dict(config: OwlViTConfig) -> dict[str, Any]:
  """A minimal HF `config.json` dict describing `config` (for `scenic_to_hf_state_dict` output)."""
  model_type = 'owlv2' if config.objectness else 'owlvit'
  arch = 'Owlv2ForObjectDetection' if config.objectness else 'OwlViTForObjectDetection'
  common = dict(hidden_act='quick_gelu', layer_norm_eps=1e-5)
  return {
      'architectures': [arch],
      'model_type': model_type,
      'projection_dim': config.embed_dim,
      'text_config': dict(
          common,
          hidden_size=config.text_width,
          num_hidden_layers=config.text_layers,
          num_attention_heads=config.text_heads,
          intermediate_size=4 * config.text_width,
          max_position_embeddings=config.max_query_length,
          vocab_size=config.vocab_size,
      ),
      'vision_config': dict(
          common,
          hidden_size=config.vision_width,
          num_hidden_layers=config.vision_layers,
          num_attention_heads=config.vision_heads,
          intermediate_size=4 * config.vision_width,
          image_size=config.image_size,
          patch_size=config.patch_size,
          num_channels=3,
      ),
  }


def _check_hf_config(hf: Mapping[str, Any], config: OwlViTConfig, source: str) -> None:
  """Cross-checks the fields present in an HF config.json against `config`."""
  text = hf.get('text_config') or hf.get('text_config_dict') or {}
  vision = hf.get('vision_config') or hf.get('vision_config_dict') or {}
  checks = [
      ('vision_config.hidden_size', vision.get('hidden_size'), config.vision_width),
      ('vision_config.num_hidden_layers', vision.get('num_hidden_layers'), config.vision_layers),
      ('vision_config.num_attention_heads', vision.get('num_attention_heads'), config.vision_heads),
      ('vision_config.intermediate_size', vision.get('intermediate_size'), 4 * config.vision_width),
      ('vision_config.patch_size', vision.get('patch_size'), config.patch_size),
      ('vision_config.image_size', vision.get('image_size'), config.image_size),
      ('text_config.hidden_size', text.get('hidden_size'), config.text_width),
      ('text_config.num_hidden_layers', text.get('num_hidden_layers'), config.text_layers),
      ('text_config.num_attention_heads', text.get('num_attention_heads'), config.text_heads),
      ('text_config.intermediate_size', text.get('intermediate_size'), 4 * config.text_width),
      (
          'text_config.max_position_embeddings',
          text.get('max_position_embeddings'),
          config.max_query_length,
      ),
      ('text_config.vocab_size', text.get('vocab_size'), config.vocab_size),
      ('projection_dim', hf.get('projection_dim'), config.embed_dim),
  ]
  for field, value, expected in checks:
    if value is not None and value != expected:
      raise CheckpointError(
          f'checkpoint {source}: config.json {field}={value} does not match '
          f'the weights / config {config.name} ({expected})'
      )
  for name, sub in (('vision_config', vision), ('text_config', text)):
    act = sub.get('hidden_act')
    if act is not None and act != 'quick_gelu':
      raise CheckpointError(
          f'checkpoint {source}: config.json {name}.hidden_act={act!r}; '
          "only 'quick_gelu' (CLIP) is supported"
      )
    eps = sub.get('layer_norm_eps')
    if eps is not None and abs(eps - 1e-5) > 1e-12:
      logging.warning(
          'checkpoint %s: %s.layer_norm_eps=%g ignored (Scenic uses 1e-5).', source, name, eps
      )
  model_type = hf.get('model_type')
  if model_type in ('owlvit', 'owlv2') and (model_type == 'owlv2') != config.objectness:
    raise CheckpointError(
        f'checkpoint {source}: config.json model_type={model_type!r} but config '
        f'{config.name} has objectness={config.objectness}'
    )


def read_hf_checkpoint(path: PathLike) -> tuple[Params, Optional[dict[str, Any]]]:
  """Reads an HF safetensors checkpoint -> (Scenic params, parsed config.json or None).

  Args:
    path: directory with config.json + model.safetensors (or a sharded
      model.safetensors.index.json), or the path of a .safetensors file (config.json is then read
      from the same directory when present).
  """
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  path = pathlib.Path(path)
  directory = path if path.is_dir() else path.parent
  if path.is_dir():
    if (path / _HF_WEIGHTS).is_file():
      files = [path / _HF_WEIGHTS]
    else:
      index = json.loads((path / _HF_INDEX).read_text())
      files = [path / f for f in sorted(set(index['weight_map'].values()))]
  else:
    files = [path]
  state_dict: dict[str, np.ndarray] = {}
  for f in files:
    try:
      state_dict.update(safetensors.numpy.load_file(str(f)))
    except Exception as e:  # safetensors raises its own error types.
      raise CheckpointError(
          f'checkpoint {f}: cannot read safetensors ({type(e).__name__}: ' f'{e})'
      ) from e
  hf_config = None
  if (directory / _HF_CONFIG).is_file():
    try:
      hf_config = json.loads((directory / _HF_CONFIG).read_text())
    except json.JSONDecodeError as e:
      raise CheckpointError(f'checkpoint {directory / _HF_CONFIG}: invalid JSON ({e})') from e
  return hf_to_scenic_params(state_dict, str(path)), hf_config


# --------------------------------------------------------------------------------------------
# Public loading / saving.
# --------------------------------------------------------------------------------------------


def _latest_flax_checkpoint(directory: pathlib.Path) -> Optional[pathlib.Path]:
  """`checkpoint_<step>` file with the largest step in a flax.training checkpoint dir."""
  steps = []
  for f in directory.iterdir():
    m = re.fullmatch(r'checkpoint_(\d+)', f.name)
    if m and f.is_file():
      steps.append((int(m.group(1)), f))
  return max(steps)[1] if steps else None


def read_checkpoint_params(path: PathLike) -> tuple[Params, Optional[dict[str, Any]]]:
  """Reads any supported checkpoint -> (params in Scenic's current naming, HF config or None).

  No architecture check is done here; see `load_checkpoint`.

  Raises:
    CheckpointError: missing path, unsupported kind (PyTorch pickles), or unreadable file.
  """
  path = pathlib.Path(path).expanduser()
  if not path.exists():
    raise CheckpointError(f'checkpoint {path}: no such file or directory')
  if path.is_dir():
    if (path / _HF_WEIGHTS).is_file() or (path / _HF_INDEX).is_file():
      return read_hf_checkpoint(path)
    latest = _latest_flax_checkpoint(path)
    if latest is not None:
      return normalize_scenic_params(read_msgpack(latest), str(latest)), None
    if any(f.suffix in _PICKLE_SUFFIXES for f in path.iterdir()):
      raise _pickle_error(path)
    raise CheckpointError(
        f'checkpoint {path}: directory has neither {_HF_WEIGHTS} (+ '
        f'{_HF_CONFIG}) nor a flax checkpoint_<step> file'
    )
  if path.suffix.lower() in _PICKLE_SUFFIXES:
    raise _pickle_error(path)
  if path.suffix.lower() == '.safetensors' or _sniff(path) == 'safetensors':
    return read_hf_checkpoint(path)
  return normalize_scenic_params(read_msgpack(path), str(path)), None


def load_checkpoint(
    path: PathLike,
    config: Union[OwlViTConfig, str, None] = None,
    *,
    progress: Optional[bool] = None,
) -> tuple[Any, dict[str, Any]]:
  """Loads an OWL-ViT / OWLv2 checkpoint into a ready-to-apply module and variables.

  Args:
    path: Scenic msgpack file (v1, v2 or current layout), HF directory (config.json +
      model.safetensors) or the .safetensors file inside one; or a name (`hub`): a Hugging Face
      id (`google/owlv2-base-patch16-ensemble`, `hf:ID[@REV]`) or a Scenic release
      (`clip_vit_b32_b0203fc`, `scenic:NAME`), downloaded once into a cache. An existing path
      always wins over a name.
    config: architecture to check against (an `OwlViTConfig` or a name for `get_config`); by
      default that of a known Scenic release, else inferred from the parameter shapes.
    progress: download progress bar for names (None: only on a terminal).

  Returns:
    (module, variables): a `TextZeroShotDetectionModule` and {'params': tree of float32 jax
    arrays} holding exactly the module's parameters.

  Raises:
    CheckpointError: unreadable or unsupported file, unknown name or failed download
      (`hub.HubError`), or parameters that do not fit the architecture (the message names the
      first missing / mis-shaped parameter path).
  """
  from clipcrop_jax.owlvit import hub  # pylint: disable=g-import-not-at-top

  path, release_config = hub.locate(path, progress=progress)
  config = release_config if config is None else config
  source = str(path)
  params, hf_config = read_checkpoint_params(path)
  if isinstance(config, str):
    try:
      config = get_config(config)
    except ValueError as e:
      raise CheckpointError(f'checkpoint {source}: {e}') from e
  if config is None:
    config = infer_config(params, source)
    logging.info('checkpoint %s: inferred config %s', source, config.name)
  validate_params(params, config, source)
  if hf_config is not None:
    _check_hf_config(hf_config, config, source)
  flat = flatten_params(params)
  kept = {p: jnp.asarray(flat[p]) for p in expected_param_shapes(config)}
  return _detector_class()(config=config), {'params': unflatten_params(kept)}


def _to_legacy(params: Mapping[str, Any], legacy_ln: bool) -> Params:
  """Current naming -> `resblocks.N` keys (and `ln_1/ln_2` block LayerNorms when legacy_ln)."""
  renames = {'ln_0': 'ln_1', 'ln_1': 'ln_2'} if legacy_ln else {}
  flat = {}
  for path, value in flatten_params(params).items():
    parts = path.split('/')
    for i, part in enumerate(parts):
      if part.startswith('resblocks_'):
        parts[i] = 'resblocks.' + part[len('resblocks_') :]
        if i + 1 < len(parts):
          parts[i + 1] = renames.get(parts[i + 1], parts[i + 1])
    flat['/'.join(parts)] = value
  return unflatten_params(flat)


def save_scenic_checkpoint(
    variables_or_params: Mapping[str, Any], path: PathLike, layout: str = 'current'
) -> pathlib.Path:
  """Writes params as a single-file Flax msgpack checkpoint, atomically.

  Args:
    variables_or_params: {'params': tree} or a bare params tree in Scenic's current naming.
    path: output file.
    layout: 'current' ({'params': ...}, `resblocks_N`, `ln_0/ln_1`), 'v2' ({'params': ...},
      `resblocks.N`, `ln_0/ln_1`) or 'v1' ({'optimizer': {'target': ...}}, `resblocks.N`,
      `ln_1/ln_2`), mirroring the released checkpoint families (spec §7.2).

  Returns:
    The written path.
  """
  params = _unwrap_variables(variables_or_params)
  params = {p: np.asarray(v) for p, v in flatten_params(params).items()}
  params = unflatten_params(params)
  if layout == 'current':
    tree = {'params': params}
  elif layout == 'v2':
    tree = {'params': _to_legacy(params, legacy_ln=False)}
  elif layout == 'v1':
    tree = {'optimizer': {'target': _to_legacy(params, legacy_ln=True), 'state': {'step': 0}}}
  else:
    raise ValueError(f"Unknown layout {layout!r}; expected 'current', 'v2' or 'v1'.")
  data = flax.serialization.msgpack_serialize(tree)
  path = pathlib.Path(path).expanduser()
  path.parent.mkdir(parents=True, exist_ok=True)
  # Atomic, with a normal new file's permissions (0666 & ~umask; mkstemp alone gives 0600).
  return fileio.atomic_write_bytes(path, data)
