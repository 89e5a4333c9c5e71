"""The package's layers: no module imports a module of a higher layer, and the imports are acyclic.

Imports are read from each module's AST, anywhere in the file (function-level imports included).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / 'clipcrop_jax'

# The package's layers, lowest first: (name, modules). A module may import modules of its own
# layer and of lower ones. 'pkg.*' names every module below the subpackage `pkg`.
LAYERS = (
    ('owlvit: the Scenic-exact OWL-ViT port, self-contained', ('owlvit', 'owlvit.*')),
    (
        'foundations: errors, config files, box math, sharding, feature names, scores, metrics',
        (
            'errors',
            'config_lib',
            'boxes',
            'sharding',
            'decoder',
            'crop_output',
            'data',
            'data.features',
            'zero_shot',
            'metrics',
            'crop_request',
        ),
    ),
    (
        'data: keywords, dataset formats, input pipeline, synthetic scenes',
        ('keywords', 'data.formats', 'data.input_pipeline', 'data.synthetic'),
    ),
    ('model: ClipCrop and its exported form', ('model', 'export')),
    ('config: defaults, model builders, validation', ('default_config', 'config_validation')),
    ('evaluation', ('evaluate',)),
    (
        'training: core and tasks (imports export; never serving or the cropper)',
        ('training', 'training.*'),
    ),
    ('inference: the cropper API and the Beam job library', ('cropper', 'beam')),
    (
        'applications: the service, the crop run log, experiments',
        ('serving', 'serving.*', 'crop_run_log', 'experiments', 'experiments.*'),
    ),
    (
        'commands and the package facade',
        ('', 'main', 'detection_train', 'build_dataset', 'crop', 'crop_beam', 'serve'),
    ),
)

MODEL_CODE = (
    'model',
    'decoder',
    'export',
    'cropper',
    'owlvit.model',
    'owlvit.clip',
    'owlvit.heads',
    'owlvit.image_query',
    'owlvit.checkpoints',
    'owlvit.detect',
)


def _name(path: pathlib.Path) -> str:
  """'clipcrop_jax/a/b.py' -> 'a.b'; a package's __init__ -> its name ('' for the package)."""
  parts = path.relative_to(PACKAGE).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _exists(name: str) -> bool:
  base = PACKAGE.joinpath(*name.split('.')) if name else PACKAGE
  return base.with_suffix('.py').is_file() or (base / '__init__.py').is_file()


def imports_of(path: pathlib.Path) -> list[tuple[int, str]]:
  """(line, module) of every clipcrop_jax module the file imports, anywhere in it."""
  found = []
  for node in ast.walk(ast.parse(path.read_text())):
    if (
        isinstance(node, ast.ImportFrom)
        and node.module
        and (node.module == 'clipcrop_jax' or node.module.startswith('clipcrop_jax.'))
    ):
      base = node.module[len('clipcrop_jax.') :] if '.' in node.module else ''
      for alias in node.names:
        sub = f'{base}.{alias.name}' if base else alias.name
        found.append((node.lineno, sub if _exists(sub) else base))
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name == 'clipcrop_jax' or alias.name.startswith('clipcrop_jax.'):
          found.append(
              (node.lineno, alias.name[len('clipcrop_jax.') :] if '.' in alias.name else '')
          )
  return found


def _graph() -> dict[str, list[tuple[int, str]]]:
  return {
      _name(p): [(line, m) for line, m in imports_of(p) if m != _name(p)]
      for p in sorted(PACKAGE.rglob('*.py'))
  }


def layer_of(module: str) -> int:
  for index, (_, patterns) in enumerate(LAYERS):
    for pattern in patterns:
      if module == pattern or (pattern.endswith('.*') and module.startswith(pattern[:-1])):
        return index
  raise KeyError(module)


def _where(module: str, line: int) -> str:
  return f'clipcrop_jax/{module.replace(".", "/") or "__init__"}:{line}'


def test_every_module_has_a_layer():
  missing = [
      m
      for m in _graph()
      if not any(
          m == p or (p.endswith('.*') and m.startswith(p[:-1])) for _, ps in LAYERS for p in ps
      )
  ]
  assert not missing, f'modules without a layer in LAYERS: {missing}'


def test_no_module_imports_a_higher_layer():
  problems = []
  for module, imports in _graph().items():
    for line, imported in imports:
      if layer_of(imported) > layer_of(module):
        problems.append(
            f'{_where(module, line)} imports clipcrop_jax.{imported} '
            f'({LAYERS[layer_of(imported)][0].split(":")[0]}) from the lower layer '
            f'{LAYERS[layer_of(module)][0].split(":")[0]}'
        )
  assert not problems, '\n'.join(problems)


def _offending(prefixes: tuple[str, ...], forbidden) -> list[str]:
  return [
      f'{_where(m, line)} imports clipcrop_jax.{i}'
      for m, imports in _graph().items()
      if any(m == p or m.startswith(p + '.') for p in prefixes)
      for line, i in imports
      if forbidden(i)
  ]


def test_owlvit_imports_nothing_else_of_the_package():
  bad = _offending(('owlvit',), lambda i: not (i == 'owlvit' or i.startswith('owlvit.')))
  assert not bad, '\n'.join(bad)


def test_data_imports_no_model_code():
  bad = _offending(('data', 'keywords'), lambda i: i in MODEL_CODE)
  assert not bad, '\n'.join(bad)


def test_training_never_imports_serving_or_the_cropper():
  bad = _offending(
      ('training',),
      lambda i: i in ('cropper', 'beam', 'serve', 'crop')
      or i == 'serving'
      or i.startswith('serving.'),
  )
  assert not bad, '\n'.join(bad)


def test_evaluation_and_the_detection_task_stay_apart():
  """Evaluation imports no training module; the detection task nothing of ClipCrop."""
  bad = _offending(('evaluate',), lambda i: i == 'training' or i.startswith('training.'))
  clipcrop_only = (
      'model',
      'decoder',
      'training.clipcrop_task',
      'evaluate',
      'export',
      'cropper',
      'keywords',
  )
  bad += _offending(('training.detection_task',), lambda i: i in clipcrop_only)
  bad += _offending(
      ('training.trainer', 'training.checkpointing', 'training.metric_log'),
      lambda i: i in clipcrop_only + ('training.detection_task',),
  )
  assert not bad, '\n'.join(bad)


def test_import_graph_is_acyclic():
  graph = {m: sorted({i for _, i in imports}) for m, imports in _graph().items()}
  state: dict[str, int] = {}

  def visit(node, stack):
    state[node] = 1
    for dep in graph.get(node, ()):
      if state.get(dep) == 1:
        cycle = stack[stack.index(dep) :] + [dep]
        raise AssertionError('import cycle: ' + ' -> '.join(f'clipcrop_jax.{m}' for m in cycle))
      if dep not in state:
        visit(dep, stack + [dep])
    state[node] = 2

  for node in sorted(graph):
    if node not in state:
      visit(node, [node])


def test_the_check_names_the_offending_import(tmp_path, monkeypatch):
  """A module importing upwards fails with its file, line and the imported module."""
  fake = tmp_path / 'clipcrop_jax'
  (fake / 'training').mkdir(parents=True)
  (fake / 'boxes.py').write_text('def f():\n  from clipcrop_jax.training import trainer\n')
  (fake / 'training' / 'trainer.py').write_text('from clipcrop_jax import cropper\n')
  (fake / 'cropper.py').write_text('')
  monkeypatch.setitem(globals(), 'PACKAGE', fake)
  with pytest.raises(
      AssertionError, match=r'clipcrop_jax/boxes:2 imports clipcrop_jax\.training' r'\.trainer'
  ):
    test_no_module_imports_a_higher_layer()
  with pytest.raises(AssertionError, match=r'training/trainer:1 imports clipcrop_jax\.cropper'):
    test_training_never_imports_serving_or_the_cropper()
