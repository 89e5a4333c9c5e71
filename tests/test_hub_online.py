"""Weights by Hugging Face id, online, as a new user meets them: clean child processes against a
fake Hub (`fake_hf_hub.FakeHub` on 127.0.0.1, reached through `HF_ENDPOINT`).

Every child starts clean (`clean_process`): no `HF_*` variable but `HF_ENDPOINT`, an empty HOME
(so an empty Hugging Face cache), nothing imported beforehand and no transformers. The README's
first real-use command runs as written on an id of a released architecture (OWLv2 B/16, random
weights); the other cases use a tiny OWL-ViT in the Hugging Face format.
"""

from __future__ import annotations

import json
import pathlib
import re
import shlex

import numpy as np
import pytest
from PIL import Image

import clean_process
import fake_hf_hub
from clipcrop_jax.owlvit import checkpoints as ck
from clipcrop_jax.owlvit import configs
from clipcrop_jax.owlvit import model as owl_model

safetensors_numpy = pytest.importorskip('safetensors.numpy')
pytest.importorskip('huggingface_hub')

REPO = pathlib.Path(__file__).resolve().parents[1]
README_ID = 'google/owlv2-base-patch16-ensemble'
TINY = 'test-org/owlvit-tiny'
NOT_OWLVIT = 'test-org/not-an-owlvit'
TINY_SEEDS = {'main': 3, 'v1': 4}

# Prints, per checkpoint name given, the sum of the image encoder's first kernel (a fingerprint of
# the weights), and whether any module of transformers was ever imported.
LOAD_SCRIPT = """
import json, sys
from clipcrop_jax import ClipCropper
out = {}
for name in sys.argv[1:]:
  cropper = ClipCropper.load(name)
  kernel = cropper.variables['params']['owlvit']['backbone']['clip']['visual']['conv1']['kernel']
  out[name] = [cropper.zero_shot, cropper.config.owlvit, float(abs(kernel).sum())]
out['transformers imported'] = any(m.split('.')[0] == 'transformers' for m in sys.modules)
print(json.dumps(out))
"""


def _fingerprint(variables) -> float:
  return float(
      np.abs(np.asarray(variables['params']['backbone']['clip']['visual']['conv1']['kernel'])).sum()
  )


def _hf_files(params, config) -> dict[str, bytes]:
  return {
      'config.json': json.dumps(ck.hf_config_dict(config)).encode(),
      'model.safetensors': safetensors_numpy.save(ck.scenic_to_hf_state_dict(params)),
  }


@pytest.fixture(scope='module')
def tiny_weights():
  config = configs.get_config('tiny')
  return {rev: owl_model.init_variables(config, seed=seed) for rev, seed in TINY_SEEDS.items()}


@pytest.fixture(scope='module')
def hub(tiny_weights):
  """The fake Hub: the tiny model (branches main and v1) and a repository without config.json."""
  config = configs.get_config('tiny')
  with fake_hf_hub.FakeHub() as server:
    for revision, variables in tiny_weights.items():
      server.add_repo(TINY, _hf_files(variables, config), revision=revision)
    server.add_repo(NOT_OWLVIT, {'README.md': b'# a model card and nothing else\n'})
    yield server


@pytest.fixture(scope='module')
def user_dir(tmp_path_factory) -> pathlib.Path:
  """A user's folder with photo.jpg (a real photo's size and aspect)."""
  folder = tmp_path_factory.mktemp('user')
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(folder / 'photo.jpg')
  return folder


def _env(tmp_path, hub, name='home'):
  return clean_process.clean_env(tmp_path / name, {'HF_ENDPOINT': hub.endpoint})


def _readme_command(needle: str) -> str:
  """The README's shell command (continuation lines joined) that contains `needle`."""
  text = (REPO / 'README.md').read_text()
  for block in re.findall(r'^```\n(.*?)^```', text, re.S | re.M):
    for command in block.replace('\\\n', ' ').splitlines():
      if needle in command and command.lstrip().startswith('python'):
        return command.split('  #')[0].strip()
  raise AssertionError(f'no README command contains {needle!r}')


# ------------------------------------------------------------------------------------------------
# The README's command, on an id of a released architecture (OWLv2 B/16 at 960 px, random weights).
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def b16_repo(hub, tmp_path_factory):
  """README_ID on the fake Hub: OWLv2 B/16 (155 M parameters, random) in HF's format."""
  config = configs.get_config('owl2_b16')
  rng = np.random.default_rng(0)
  flat = {
      path: rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
      for path, shape in ck.expected_param_shapes(config).items()
  }
  folder = tmp_path_factory.mktemp('b16')
  safetensors_numpy.save_file(
      ck.scenic_to_hf_state_dict(ck.unflatten_params(flat)), str(folder / 'model.safetensors')
  )
  del flat
  hub.add_repo(
      README_ID,
      {
          'config.json': json.dumps(ck.hf_config_dict(config)).encode(),
          'model.safetensors': folder / 'model.safetensors',
      },
  )
  return README_ID


@pytest.mark.slow
def test_readme_command_downloads_crops_and_then_runs_from_the_cache(
    hub, b16_repo, user_dir, tmp_path
):
  command = _readme_command(f'--checkpoint {b16_repo}')
  env = _env(tmp_path, hub)
  out = user_dir / shlex.split(command)[shlex.split(command).index('--out') + 1]
  before = hub.count()
  first = clean_process.run(command, env=env, cwd=user_dir, timeout=480)
  assert first.returncode == 0, clean_process.describe(first)
  asked = [path for _, path in hub.requests[before:]]
  assert f'/{b16_repo}/resolve/main/config.json' in asked
  assert f'/{b16_repo}/resolve/main/model.safetensors' in asked
  summary = json.loads((out / 'crops.json').read_text())
  assert summary['results'][0]['crops'], summary
  assert (
      tmp_path / 'home/.cache/huggingface/hub' / f'models--{b16_repo.replace("/", "--")}'
  ).is_dir()

  # The Hub goes down (every request would get 503): the second run uses the cache, asks nothing.
  for child in out.iterdir():
    child.unlink()
  out.rmdir()
  hub.down, before = True, hub.count()
  try:
    second = clean_process.run(command, env=env, cwd=user_dir, timeout=480)
  finally:
    hub.down = False
  assert second.returncode == 0, clean_process.describe(second)
  assert hub.count() == before, hub.requests[before:]
  again = json.loads((out / 'crops.json').read_text())
  assert again['results'][0]['crops'] == summary['results'][0]['crops']


# ------------------------------------------------------------------------------------------------
# The API, a revision, the detect CLI.
# ------------------------------------------------------------------------------------------------


def test_cropper_load_by_id_and_revision_in_a_clean_process(hub, tiny_weights, tmp_path):
  main_commit = hub.commit_of(TINY, 'main')
  names = [TINY, f'{TINY}@v1', f'hf:{TINY}@{main_commit}']
  result = clean_process.run(
      ['python', '-c', LOAD_SCRIPT, *names], env=_env(tmp_path, hub), cwd=tmp_path
  )
  assert result.returncode == 0, clean_process.describe(result)
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out.pop('transformers imported') is False
  want = {
      TINY: tiny_weights['main'],
      f'{TINY}@v1': tiny_weights['v1'],
      f'hf:{TINY}@{main_commit}': tiny_weights['main'],
  }
  for name, variables in want.items():
    zero_shot, owlvit, fingerprint = out[name]
    assert zero_shot and owlvit == 'tiny', out
    assert fingerprint == pytest.approx(_fingerprint(variables), rel=1e-6), name
  assert _fingerprint(tiny_weights['main']) != pytest.approx(_fingerprint(tiny_weights['v1']))


def test_detect_cli_by_id(hub, user_dir, tmp_path):
  result = clean_process.run(
      [
          'python',
          '-m',
          'clipcrop_jax.owlvit.detect',
          '--checkpoint',
          TINY,
          '--image',
          str(user_dir / 'photo.jpg'),
          '--query',
          'a cat',
          '--top-k',
          '2',
          '--json',
          '--out',
          str(tmp_path / 'overlay.png'),
      ],
      env=_env(tmp_path, hub),
      cwd=tmp_path,
  )
  assert result.returncode == 0, clean_process.describe(result)
  assert (tmp_path / 'overlay.png').stat().st_size > 0
  assert 'a cat' in result.stdout


# ------------------------------------------------------------------------------------------------
# Failures: one line that says what was tried, exit code 2, never a traceback.
# ------------------------------------------------------------------------------------------------

FAILURES = [
    (
        'nobody/nothing',
        'checkpoint nobody/nothing: no such file or directory, and no model of that name on the '
        'Hugging Face Hub (404)',
    ),
    (
        'some/missing-path',  # a mistyped path that looks like an id
        'checkpoint some/missing-path: no such file or directory, and no model of that name on the '
        'Hugging Face Hub (404)',
    ),
    (
        'hf:nobody/nothing',
        'checkpoint nobody/nothing: no model of that name on the Hugging Face '
        'Hub (404; a private model needs a token',
    ),
    (
        f'{TINY}@v9',
        f"checkpoint {TINY}@v9: the Hugging Face model {TINY} has no revision 'v9' " '(404)',
    ),
    (
        NOT_OWLVIT,
        f'checkpoint {NOT_OWLVIT}: the repository has no config.json; not a Hugging Face '
        'OWL-ViT / OWLv2 model',
    ),
]


@pytest.mark.parametrize('name,message', FAILURES, ids=[n for n, _ in FAILURES])
def test_crop_cli_failure_is_one_line(hub, user_dir, tmp_path, name, message):
  result = clean_process.run(
      [
          'python',
          '-m',
          'clipcrop_jax.crop',
          '--checkpoint',
          name,
          '--image',
          str(user_dir / 'photo.jpg'),
          '--text',
          'a dog',
          '--out',
          str(tmp_path / 'crops'),
      ],
      env=_env(tmp_path, hub),
      cwd=tmp_path,
  )
  assert result.returncode == 2, clean_process.describe(result)
  assert message in clean_process.error_line(result)
  assert not (tmp_path / 'crops').exists() or not any((tmp_path / 'crops').iterdir())


def test_hub_down_without_cache_is_one_line(hub, user_dir, tmp_path):
  hub.down = True
  try:
    result = clean_process.run(
        [
            'python',
            '-m',
            'clipcrop_jax.owlvit.detect',
            '--checkpoint',
            TINY,
            '--image',
            str(user_dir / 'photo.jpg'),
            '--query',
            'a cat',
        ],
        env=_env(tmp_path, hub),
        cwd=tmp_path,
    )
  finally:
    hub.down = False
  assert result.returncode == 2, clean_process.describe(result)
  line = clean_process.error_line(result)
  assert (
      f'checkpoint {TINY}: cannot reach the Hugging Face Hub at {hub.endpoint} (HTTP 503)' in line
  )
  assert 'not in the cache' in line


def test_fake_hub_is_bounded():
  with fake_hf_hub.FakeHub(max_requests=2) as server:
    import urllib.error  # pylint: disable=g-import-not-at-top
    import urllib.request  # pylint: disable=g-import-not-at-top

    codes = []
    for _ in range(3):
      try:
        urllib.request.urlopen(f'{server.endpoint}/a/b/resolve/main/x', timeout=5)
      except urllib.error.HTTPError as e:
        codes.append(e.code)
    assert codes == [404, 404, 429] and server.overflowed
