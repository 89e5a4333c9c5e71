"""The ClipCrop model directory: one trained model on disk (`ClipCropper.save` / `load`).

A model directory holds exactly two files:

  clipcrop_config.json   {"format_version": 3,
                          "config": {<the `model.ClipCropConfig` fields but the
                                     TRAINING_ONLY_FIELDS>},
                          "keyword_pipeline": "<spaCy pipeline name or path, or 'rules'>"}
  params.msgpack         flax msgpack of {'params': {'owlvit': ..., 'decoder': ...}}

`keyword_pipeline` is the keyword extractor the model was trained with (`keywords.RULES` = the
rule-based one); a cropper uses it unless told otherwise. Old spellings of the rule-based
extractor (None, '', 'rule') are read as 'rules' (`keywords.legacy_pipeline_name`). A
`format_version` newer than FORMAT_VERSION is refused.

Release notes of the format:
  3  `config.selection_union` (which query roles make the union box; a model with 'subject' /
     'caption' has a `decoder/role_embed` parameter) is required. Format 1 and 2 directories
     load as 'all', the paper's union of every selection, which is what they were trained with.
  2  the training keyword pipeline is recorded. Format 1 directories load with
     `keywords.DEFAULT_PIPELINE` (what ClipCropper used for them).

A training run exports its model to `<workdir>/clipcrop` (EXPORT_DIR); `load_model` takes either
the model directory or such a workdir.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Union

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from clipcrop_jax import keywords
from clipcrop_jax import model as model_lib
from clipcrop_jax.owlvit import fileio

CONFIG_FILE = 'clipcrop_config.json'
PARAMS_FILE = 'params.msgpack'
FORMAT_VERSION = 3  # 2: + the training keyword pipeline; 3: + config.selection_union (above)
EXPORT_DIR = 'clipcrop'  # the subfolder of a training workdir that holds its exported model
# `ClipCropConfig` fields that only say how a model is trained: never written (they load as the
# defaults).
TRAINING_ONLY_FIELDS = ('remat_encoder',)

PathLike = Union[str, pathlib.Path]


@dataclasses.dataclass(frozen=True)
class ExportedModel:
  """A loaded model directory.

  Attributes:
    config: the model's `ClipCropConfig`.
    params: the 'params' tree {'owlvit': ..., 'decoder': ...} of jnp arrays, shapes checked
      against `config`.
    keyword_pipeline: the keyword extractor recorded with the model (a spaCy pipeline name or
      path, or `keywords.RULES`); `keywords.DEFAULT_PIPELINE` for format-1 directories.
    format_version: the directory's format (1 or FORMAT_VERSION).
  """

  config: model_lib.ClipCropConfig
  params: Any
  keyword_pipeline: str
  format_version: int


def is_model_dir(path: PathLike) -> bool:
  """True when `path` is a model directory (it holds `clipcrop_config.json`)."""
  return (pathlib.Path(path) / CONFIG_FILE).is_file()


def save_model(
    directory: PathLike, config: model_lib.ClipCropConfig, params: Any, keyword_pipeline: str
) -> pathlib.Path:
  """Writes a model directory (current FORMAT_VERSION) and returns its path.

  Atomic: the files are written into a temporary sibling directory that then takes
  `directory`'s place in one step, so an interruption leaves the old model (or nothing), never
  a mix. An existing `directory` is replaced only if it is empty or a model directory (holds
  nothing but the two model files); anything else is refused with a ValueError.

  Args:
    directory: where the model goes.
    config: the model's config.
    params: its 'params' tree (arrays of any kind; written as NumPy).
    keyword_pipeline: the keyword extractor it was trained with: a spaCy pipeline name or path,
      or `keywords.RULES` (`keywords.check_pipeline` refuses old spellings such as None or '').
  """
  keywords.check_pipeline(keyword_pipeline)
  directory = pathlib.Path(directory)
  if directory.exists():
    if not directory.is_dir():
      raise ValueError(f'{directory}: exists and is not a directory')
    foreign = sorted(
        p.name for p in directory.iterdir() if p.name not in (CONFIG_FILE, PARAMS_FILE)
    )
    if foreign:
      raise ValueError(
          f'{directory}: not a ClipCrop model directory (it holds '
          f'{", ".join(foreign[:3])}{", ..." if len(foreign) > 3 else ""}); '
          'refusing to replace it, save into a new or empty directory'
      )
  data = flax.serialization.msgpack_serialize(
      jax.tree_util.tree_map(np.asarray, {'params': params})
  )
  fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in TRAINING_ONLY_FIELDS}
  meta = {'format_version': FORMAT_VERSION, 'config': fields, 'keyword_pipeline': keyword_pipeline}
  with fileio.replace_directory(directory) as tmp:
    (tmp / PARAMS_FILE).write_bytes(data)
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=1))
  return directory


def load_config(path: PathLike) -> model_lib.ClipCropConfig:
  """The `ClipCropConfig` of a model directory (or of the one a training workdir exported),
  without reading its parameters. Raises as `load_model`."""
  config, _, _ = _read_meta(pathlib.Path(path))
  return config


def _read_meta(path: pathlib.Path) -> tuple[model_lib.ClipCropConfig, dict[str, Any], pathlib.Path]:
  """(config, meta, model directory) of a model directory or a training workdir."""
  if is_model_dir(path / EXPORT_DIR):
    path = path / EXPORT_DIR
  if not is_model_dir(path):
    raise FileNotFoundError(
        f'{path}: neither a ClipCrop model directory ({CONFIG_FILE}) nor a '
        f'training workdir with {EXPORT_DIR}/'
    )
  config_path = path / CONFIG_FILE
  try:
    meta = json.loads(config_path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f'{config_path}: not valid JSON ({e})') from None
  if not isinstance(meta, dict) or 'config' not in meta:
    raise ValueError(f'{config_path}: not a ClipCrop config (no "config" entry)')
  version = _format_version(meta, config_path)
  if version >= 3 and isinstance(meta['config'], dict) and 'selection_union' not in meta['config']:
    raise ValueError(
        f'{config_path}: no "config.selection_union" entry (required by format ' f'{version})'
    )
  return model_lib.ClipCropConfig.from_dict(meta['config'], str(config_path)), meta, path


def load_model(path: PathLike) -> ExportedModel:
  """Reads a model directory, or the one a training workdir exported (`<path>/clipcrop`).

  Returns:
    the `ExportedModel` (parameters as jnp arrays, shapes checked against the config).

  Raises:
    FileNotFoundError: `path` is neither.
    ValueError: (one line naming the file) invalid JSON, a bad config field, a format newer than
      this code's, a missing / corrupt / mis-shaped parameter file.
  """
  config, meta, path = _read_meta(pathlib.Path(path))
  config_path, params_path = path / CONFIG_FILE, path / PARAMS_FILE
  version = _format_version(meta, config_path)
  pipeline = _keyword_pipeline(meta, version, config_path)
  if not params_path.is_file():
    raise ValueError(f'{params_path}: missing (ClipCrop checkpoint without parameters)')
  try:
    restored = flax.serialization.msgpack_restore(params_path.read_bytes())
  except Exception as e:  # msgpack raises assorted types on corrupt input
    raise ValueError(f'{params_path}: corrupt checkpoint ({type(e).__name__}: {e})') from e
  model_lib.check_param_shapes(
      jax.eval_shape(lambda: model_lib.init_variables(config)), restored, str(params_path)
  )
  params = jax.tree_util.tree_map(jnp.asarray, restored['params'])
  return ExportedModel(config, params, pipeline, version)


def _format_version(meta: dict[str, Any], source: pathlib.Path) -> int:
  """The directory's format version (1 when absent); newer than FORMAT_VERSION is an error."""
  version = meta.get('format_version', 1)
  if isinstance(version, bool) or not isinstance(version, int) or version < 1:
    raise ValueError(f'{source}: format_version={version!r}; expected an integer >= 1')
  if version > FORMAT_VERSION:
    raise ValueError(
        f'{source}: format_version {version} was written by a newer clipcrop-jax '
        f'(this one reads up to {FORMAT_VERSION}); upgrade clipcrop-jax to load it'
    )
  return version


def _keyword_pipeline(meta: dict[str, Any], version: int, source: pathlib.Path) -> str:
  """The recorded keyword pipeline; `keywords.DEFAULT_PIPELINE` for format 1 (none recorded)."""
  if 'keyword_pipeline' not in meta:
    if version == 1:
      return keywords.DEFAULT_PIPELINE
    raise ValueError(f'{source}: no "keyword_pipeline" entry (required by format {version})')
  try:
    return keywords.check_pipeline(keywords.legacy_pipeline_name(meta['keyword_pipeline']))
  except (TypeError, ValueError) as e:
    raise ValueError(f'{source}: {e}') from None
