"""Every submodule of another package that the code uses is imported explicitly.

`import pkg` and then `pkg.sub.f()` works only while `pkg/__init__.py` happens to import `sub`,
or while some other module (transformers, a test) imported it first; huggingface_hub 2.x stopped
exposing `constants` that way, which broke weights by name in a fresh process. The scan reads the
source (no imports of the scanned files) and reports `name.sub.attr` where `name` is an imported
package and `name.sub` is a submodule that no import statement of the file names.

Namespaces that their package always imports as its documented API (`jax.numpy`, `jax.random`,
`tf.data`, `os.path`, ...) are exempt: listed in EAGER_NAMESPACES.
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCANNED = ['clipcrop_jax', 'tools', 'datasets', 'configs']

# Packages whose submodules are part of the top-level API, imported by the package itself.
# (`tfds.core` is how TFDS's own builder template names its base classes.)
EAGER_NAMESPACES = (
    'os',
    'numpy',
    'jax',
    'tensorflow',
    'tensorflow_datasets',
    'flax.linen',
    'torch',
)


def _is_module(name: str, cache: dict[str, bool]) -> bool:
  if name not in cache:
    try:
      cache[name] = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError, AttributeError):
      cache[name] = False
  return cache[name]


def implicit_submodule_uses(source: str, cache: dict[str, bool]) -> list[tuple[int, str]]:
  """(line, 'pkg.sub') for each use of a submodule the source never imports by name."""
  tree = ast.parse(source)
  imported, names = set(), {}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        parts = a.name.split('.')
        imported.update('.'.join(parts[:i]) for i in range(1, len(parts) + 1))
        names[a.asname or parts[0]] = a.name if a.asname else parts[0]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      imported.add(node.module)
      for a in node.names:
        if _is_module(f'{node.module}.{a.name}', cache):
          imported.add(f'{node.module}.{a.name}')
          names[a.asname or a.name] = f'{node.module}.{a.name}'
  found = []
  for node in ast.walk(tree):
    if not isinstance(node, ast.Attribute):
      continue
    chain, base = [], node
    while isinstance(base, ast.Attribute):
      chain.append(base.attr)
      base = base.value
    if not isinstance(base, ast.Name) or base.id not in names:
      continue
    module = names[base.id]
    for attr in reversed(chain[1:]):  # every prefix but the full chain (its end is an attribute)
      candidate = f'{module}.{attr}'
      if not _is_module(candidate, cache):
        break
      if candidate not in imported:
        if not any(candidate.startswith(f'{p}.') for p in EAGER_NAMESPACES):
          found.append((node.lineno, candidate))
        break
      module = candidate
  return sorted(set(found))


def test_the_scan_finds_what_broke_weights_by_name():
  source = 'import huggingface_hub\nx = huggingface_hub.constants.HF_HUB_OFFLINE\n'
  cache = {}
  if not _is_module('huggingface_hub.constants', cache):
    pytest.skip('huggingface_hub is not installed')
  assert implicit_submodule_uses(source, cache) == [(2, 'huggingface_hub.constants')]
  fixed = 'import huggingface_hub\nimport huggingface_hub.constants\n' + source.split('\n', 1)[1]
  assert implicit_submodule_uses(fixed, cache) == []
  assert implicit_submodule_uses('import jax\njax.random.key(0)\n', cache) == []


def test_submodules_are_imported_explicitly():
  cache: dict[str, bool] = {}
  problems = []
  for folder in SCANNED:
    for path in sorted((REPO / folder).rglob('*.py')):
      for line, name in implicit_submodule_uses(path.read_text(), cache):
        problems.append(f'{path.relative_to(REPO)}:{line}: uses {name} without importing it')
  assert not problems, '\n'.join(problems)
