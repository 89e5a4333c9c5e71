"""Weights by name (`clipcrop_jax.owlvit.hub`), without the internet.

Scenic names: a loopback HTTP server (127.0.0.1, random port, a daemon thread stopped by the
fixture, socket timeouts) serves a tiny Scenic checkpoint; `CLIPCROP_SCENIC_URL` points at it and
`CLIPCROP_CACHE` at a temporary folder. Hugging Face ids: a temporary `HF_HOME` pre-populated in
the hub cache layout (`models--org--name/{blobs,snapshots/<sha>,refs/main}`), read with
`HF_HUB_OFFLINE=1`.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import pathlib
import subprocess
import sys
import threading

import numpy as np
import pytest

import fake_hf_hub

from clipcrop_jax import config_validation
from clipcrop_jax import cropper as cropper_lib
from clipcrop_jax import default_config
from clipcrop_jax.owlvit import checkpoints as ck
from clipcrop_jax.owlvit import configs
from clipcrop_jax.owlvit import detect
from clipcrop_jax.owlvit import hub
from clipcrop_jax.owlvit import model as owl_model

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_NAME = 'owl-tiny-test_0123abc'
HF_REPO = 'test-org/owlvit-tiny'
HF_TORCH_REPO = 'test-org/owlvit-tiny-torch'
SHA = 'a' * 40


# ------------------------------------------------------------------------------------------------
# Fixtures.
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def tiny_variables():
  return owl_model.init_variables(configs.get_config('tiny'), seed=3)


@pytest.fixture(scope='module')
def tiny_bytes(tiny_variables, tmp_path_factory) -> bytes:
  path = tmp_path_factory.mktemp('scenic') / 'tiny.msgpack'
  return ck.save_scenic_checkpoint(tiny_variables, path).read_bytes()


class _Handler(http.server.BaseHTTPRequestHandler):
  """GET of `server.files[path]` = (body, content type); honours `Range: bytes=N-`; cuts the
  body after `server.cut[path]` bytes once (then forgets the cut); 404 for other paths."""

  timeout = 10  # seconds per socket operation: a stuck client never blocks the test run

  def do_GET(self):  # pylint: disable=invalid-name
    server = self.server
    server.log.append((self.path, self.headers.get('Range')))
    if self.path not in server.files:
      self.send_error(404, 'Not Found')
      return
    body, content_type = server.files[self.path]
    start = fake_hf_hub.send_ranged_headers(self, len(body), {'Content-Type': content_type})
    if start is None:
      return
    cut = server.cut.pop(self.path, None)
    self.wfile.write(body[start:cut] if cut is not None else body[start:])
    if cut is not None:
      self.close_connection = True

  def log_message(self, *args):  # quiet
    pass


@pytest.fixture
def server():
  """A loopback HTTP server on a random port; `.url`, `.files`, `.cut`, `.log`."""
  httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
  httpd.daemon_threads = True
  httpd.files, httpd.cut, httpd.log = {}, {}, []
  httpd.url = f'http://127.0.0.1:{httpd.server_address[1]}/owl_vit/checkpoints'
  thread = threading.Thread(
      target=httpd.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True
  )
  thread.start()
  try:
    yield httpd
  finally:
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


@pytest.fixture
def scenic_env(server, tmp_path, monkeypatch):
  """CLIPCROP_SCENIC_URL -> the server, CLIPCROP_CACHE -> tmp; the name table restored after."""
  monkeypatch.setenv('CLIPCROP_SCENIC_URL', server.url)
  monkeypatch.setenv('CLIPCROP_CACHE', str(tmp_path / 'cache'))
  monkeypatch.setattr(hub, 'SCENIC_RELEASES', dict(hub.SCENIC_RELEASES))
  return server


def _serve(server, name: str, body: bytes, content_type: str = 'application/octet-stream'):
  server.files[f'/owl_vit/checkpoints/{name}'] = (body, content_type)


def _assert_same_params(variables, expected):
  got = ck.flatten_params(variables['params'])
  want = ck.flatten_params(expected['params'])
  assert sorted(got) == sorted(want)
  for path, value in want.items():
    np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(value), err_msg=path)


def _write_hf_repo(
    hub_dir: pathlib.Path,
    repo_id: str,
    files: dict[str, bytes],
    commit: str = SHA,
    ref: str = 'main',
) -> pathlib.Path:
  """Writes `files` in the HF hub cache layout: blobs by SHA-256, relative symlinks in
  snapshots/<commit>/, and refs/<ref> holding the commit. Returns the snapshot folder."""
  repo_dir = hub_dir / f'models--{repo_id.replace("/", "--")}'
  snapshot = repo_dir / 'snapshots' / commit
  (repo_dir / 'blobs').mkdir(parents=True, exist_ok=True)
  snapshot.mkdir(parents=True, exist_ok=True)
  for name, data in files.items():
    blob = repo_dir / 'blobs' / hashlib.sha256(data).hexdigest()
    blob.write_bytes(data)
    (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
  (repo_dir / 'refs').mkdir(exist_ok=True)
  (repo_dir / 'refs' / ref).write_text(commit)
  return snapshot


def _tiny_hf_files(tiny_variables) -> dict[str, bytes]:
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  state = ck.scenic_to_hf_state_dict(tiny_variables)
  return {
      'config.json': json.dumps(ck.hf_config_dict(configs.get_config('tiny'))).encode(),
      'model.safetensors': safetensors.numpy.save(state),
  }


@pytest.fixture
def hf_env(tmp_path, monkeypatch, tiny_variables):
  """HF_HOME with `test-org/owlvit-tiny` (safetensors) cached; HF_HUB_OFFLINE=1."""
  home = tmp_path / 'hf_home'
  _write_hf_repo(home / 'hub', HF_REPO, _tiny_hf_files(tiny_variables))
  monkeypatch.setenv('HF_HOME', str(home))
  monkeypatch.delenv('HF_HUB_CACHE', raising=False)
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  monkeypatch.setenv('CLIPCROP_CACHE', str(tmp_path / 'cache'))
  return home


# ------------------------------------------------------------------------------------------------
# Names.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    'text,kind,name,revision',
    [
        ('google/owlv2-base-patch16-ensemble', 'hf', 'google/owlv2-base-patch16-ensemble', None),
        ('hf:google/owlvit-base-patch32@main', 'hf', 'google/owlvit-base-patch32', 'main'),
        ('hf:owlvit', 'hf', 'owlvit', None),
        ('org/model.v2@refs/pr/3', 'hf', 'org/model.v2', 'refs/pr/3'),
        ('clip_vit_b32_b0203fc', 'scenic', 'clip_vit_b32_b0203fc', None),
        ('owl2-b16-960-st-ngrams_c7e1b9a', 'scenic', 'owl2-b16-960-st-ngrams_c7e1b9a', None),
        ('scenic:any_file.msgpack', 'scenic', 'any_file.msgpack', None),
    ],
)
def test_parse_name(text, kind, name, revision):
  assert hub.parse_name(text) == hub.HubName(kind, name, revision)
  assert hub.is_name(text)


@pytest.mark.parametrize(
    'text',
    [
        'owl.msgpack',
        'runs/model.msgpack',
        'out/model.safetensors',
        'a/b/c',
        './x/y',
        '/abs/path',
        '~/x',
        'org/x--y',
        'bare_word',
        'org/name@',
        'hf:a/b/c',
        'scenic:../etc',
        'hf:',
    ],
)
def test_not_names(text):
  assert not hub.is_name(text)
  assert not hub.is_name(pathlib.Path('google/owlvit-base-patch32'))  # a Path is always a path


def test_malformed_prefixed_name_is_one_line_error():
  with pytest.raises(hub.HubError, match=r'^checkpoint hf:a/b/c: not a Hugging Face model id'):
    hub.parse_name('hf:a/b/c')
  with pytest.raises(ck.CheckpointError, match='not a Scenic file name'):
    ck.load_checkpoint('scenic:../etc')


def test_unknown_name_or_missing_path(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(
      ck.CheckpointError, match='no such file or directory, and not a checkpoint ' 'name'
  ) as e:
    ck.load_checkpoint('owl_b32_weights')
  assert '\n' not in str(e.value)


def test_register_validates():
  with pytest.raises(ValueError, match='sha256'):
    hub.register_scenic_release('x_test', sha256='abc')
  with pytest.raises(ValueError, match='letters, digits'):
    hub.register_scenic_release('../x')


# ------------------------------------------------------------------------------------------------
# Scenic names over HTTP.
# ------------------------------------------------------------------------------------------------


def test_scenic_download_then_cached(scenic_env, tiny_bytes, tiny_variables, tmp_path):
  _serve(scenic_env, TINY_NAME, tiny_bytes)
  hub.register_scenic_release(
      TINY_NAME, 'tiny', size=len(tiny_bytes), sha256=hashlib.sha256(tiny_bytes).hexdigest()
  )
  module, variables = ck.load_checkpoint(TINY_NAME, progress=False)
  assert module.config == configs.get_config('tiny')
  _assert_same_params(variables, tiny_variables)
  cached = tmp_path / 'cache' / 'scenic' / TINY_NAME
  assert cached.read_bytes() == tiny_bytes
  assert sorted(p.name for p in cached.parent.iterdir()) == ['.locks', TINY_NAME]  # no .part
  assert len(scenic_env.log) == 1
  ck.load_checkpoint(TINY_NAME)  # second time: from the cache, no request
  assert len(scenic_env.log) == 1


def test_release_config_is_enforced(scenic_env, tiny_bytes):
  _serve(scenic_env, TINY_NAME, tiny_bytes)
  hub.register_scenic_release(TINY_NAME, 'tiny_v2')  # the file has no objectness head
  with pytest.raises(ck.CheckpointError, match='objectness_head'):
    ck.load_checkpoint(TINY_NAME, progress=False)


def test_interrupted_download_resumes_with_range(scenic_env, tiny_bytes, tiny_variables, tmp_path):
  _serve(scenic_env, TINY_NAME, tiny_bytes)
  cut = len(tiny_bytes) // 3
  scenic_env.cut[f'/owl_vit/checkpoints/{TINY_NAME}'] = cut
  dest = tmp_path / 'cache' / 'scenic' / TINY_NAME
  with pytest.raises(hub.HubError, match=f'interrupted after {cut} bytes.*run again to resume'):
    hub.download(hub.scenic_url(TINY_NAME), dest, progress=False, retries=0)
  part = dest.with_name(dest.name + '.part')
  assert part.read_bytes() == tiny_bytes[:cut] and not dest.exists()
  _, variables = ck.load_checkpoint(f'scenic:{TINY_NAME}', progress=False)  # resumes
  _assert_same_params(variables, tiny_variables)
  assert dest.read_bytes() == tiny_bytes and not part.exists()
  assert [r for _, r in scenic_env.log] == [None, f'bytes={cut}-']


def test_interruption_is_retried_within_one_call(scenic_env, tiny_bytes, tmp_path):
  _serve(scenic_env, TINY_NAME, tiny_bytes)
  scenic_env.cut[f'/owl_vit/checkpoints/{TINY_NAME}'] = 1000
  dest = hub.download(hub.scenic_url(TINY_NAME), tmp_path / 'f', progress=False)
  assert dest.read_bytes() == tiny_bytes
  assert [r for _, r in scenic_env.log] == [None, 'bytes=1000-']


def test_complete_part_file_is_finished_without_a_body(scenic_env, tiny_bytes, tmp_path):
  """A `.part` holding the whole file (killed before the rename): the 416 answer completes it."""
  _serve(scenic_env, TINY_NAME, tiny_bytes)
  (tmp_path / 'f.part').write_bytes(tiny_bytes)
  assert hub.download(hub.scenic_url(TINY_NAME), tmp_path / 'f').read_bytes() == tiny_bytes
  assert [r for _, r in scenic_env.log] == [f'bytes={len(tiny_bytes)}-']


def test_truncated_file_fails_the_size_check(scenic_env, tiny_bytes, tmp_path):
  _serve(scenic_env, TINY_NAME, tiny_bytes[:-100])  # a mirror with a short file
  hub.register_scenic_release(TINY_NAME, 'tiny', size=len(tiny_bytes))
  with pytest.raises(
      hub.HubError,
      match=f'downloaded {len(tiny_bytes) - 100} bytes, expected ' f'{len(tiny_bytes)}',
  ):
    ck.load_checkpoint(TINY_NAME, progress=False)
  assert not [p for p in (tmp_path / 'cache' / 'scenic').iterdir() if p.name != '.locks']


def test_checksum_mismatch_is_refused(scenic_env, tiny_bytes, tmp_path):
  _serve(scenic_env, TINY_NAME, tiny_bytes)
  hub.register_scenic_release(TINY_NAME, 'tiny', sha256='0' * 64)
  with pytest.raises(hub.HubError, match='SHA-256 .* does not match'):
    ck.load_checkpoint(TINY_NAME, progress=False)
  assert not (tmp_path / 'cache' / 'scenic' / TINY_NAME).exists()


def test_404_is_one_line(scenic_env, tmp_path):
  with pytest.raises(hub.HubError) as e:
    ck.load_checkpoint('scenic:no_such_file', progress=False)
  message = str(e.value)
  assert message.startswith('Scenic checkpoint no_such_file: http://127.0.0.1:')
  assert 'HTTP 404 (not found)' in message and '\n' not in message
  assert not [p for p in (tmp_path / 'cache' / 'scenic').iterdir() if p.name != '.locks']


@pytest.mark.parametrize('content_type', ['text/html; charset=utf-8', 'application/octet-stream'])
def test_html_page_is_refused(scenic_env, tmp_path, content_type):
  _serve(scenic_env, TINY_NAME, b'<!DOCTYPE html><html><body>Sign in</body></html>', content_type)
  with pytest.raises(hub.HubError, match='HTML page, not a checkpoint'):
    ck.load_checkpoint(f'scenic:{TINY_NAME}', progress=False)
  assert not [p for p in (tmp_path / 'cache' / 'scenic').iterdir() if p.name != '.locks']


def test_no_server_is_one_line(tmp_path, monkeypatch):
  monkeypatch.setenv('CLIPCROP_SCENIC_URL', 'http://127.0.0.1:1/x')  # nothing listens there
  monkeypatch.setenv('CLIPCROP_CACHE', str(tmp_path))
  with pytest.raises(hub.HubError, match=r'cannot connect'):
    ck.load_checkpoint('scenic:abc', progress=False)


def test_existing_path_wins_over_a_name(scenic_env, tiny_bytes, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'clip_vit_b32_b0203fc').write_bytes(tiny_bytes)  # a release name, as a local file
  module, _ = ck.load_checkpoint('clip_vit_b32_b0203fc')
  assert module.config.name == 'tiny' and not scenic_env.log


def test_scenic_name_in_cropper_and_detect_cli(scenic_env, tiny_bytes, tmp_path, capsys):
  _serve(scenic_env, TINY_NAME, tiny_bytes)
  hub.register_scenic_release(TINY_NAME, 'tiny')
  cropper = cropper_lib.ClipCropper.load(TINY_NAME, keyword_pipeline='rules')
  assert cropper.zero_shot and TINY_NAME in cropper.model_id
  assert cropper.crop(detect.demo_image(), text='a red square', top_k=2)
  assert (
      detect.main(
          [
              '--checkpoint',
              TINY_NAME,
              '--query',
              'a red square',
              '--json',
              '--out',
              str(tmp_path / 'o.png'),
          ]
      )
      == 0
  )
  assert json.loads(capsys.readouterr().out)['model'] == TINY_NAME
  assert len(scenic_env.log) == 1  # downloaded once


# ------------------------------------------------------------------------------------------------
# Hugging Face ids from a pre-populated cache, offline.
# ------------------------------------------------------------------------------------------------


def test_hf_id_from_offline_cache(hf_env, tiny_variables):
  for name in (HF_REPO, f'hf:{HF_REPO}', f'{HF_REPO}@main', f'hf:{HF_REPO}@{SHA}'):
    module, variables = ck.load_checkpoint(name)
    assert module.config.name == 'tiny', name
    _assert_same_params(variables, tiny_variables)
  path, _ = hub.locate(HF_REPO)
  assert path == hf_env / 'hub' / 'models--test-org--owlvit-tiny' / 'snapshots' / SHA


def test_hf_cache_from_hf_hub_cache_variable(hf_env, monkeypatch):
  monkeypatch.delenv('HF_HOME')
  monkeypatch.setenv('HF_HUB_CACHE', str(hf_env / 'hub'))
  assert ck.load_checkpoint(HF_REPO)[0].config.name == 'tiny'


def test_hf_missing_offline_is_one_line(hf_env):
  for name in ('test-org/absent', f'{HF_REPO}@v9'):
    with pytest.raises(hub.HubError) as e:
      ck.load_checkpoint(name)
    message = str(e.value)
    assert message.startswith(f'checkpoint {name}: not in the Hugging Face cache ')
    assert 'HF_HUB_OFFLINE is set' in message and '\n' not in message


def test_hf_without_huggingface_hub_names_the_extra(hf_env, monkeypatch):
  monkeypatch.setitem(sys.modules, 'huggingface_hub', None)  # import -> ImportError
  with pytest.raises(
      hub.HubError, match=r"need huggingface_hub; pip install 'clipcrop-jax\[hub\]'"
  ):
    ck.load_checkpoint(HF_REPO)


def test_hf_transformers_model_from_cache(hf_env, tmp_path):
  """A tiny random transformers OWLv2, saved as HF saves it, loads by id like from its folder."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  torch.manual_seed(0)
  text = dict(
      hidden_size=64,
      num_attention_heads=1,
      num_hidden_layers=2,
      intermediate_size=256,
      max_position_embeddings=16,
  )
  vision = dict(
      hidden_size=64,
      num_attention_heads=1,
      num_hidden_layers=2,
      intermediate_size=256,
      patch_size=16,
      image_size=96,
  )
  model = transformers.Owlv2ForObjectDetection(
      transformers.Owlv2Config(text_config=text, vision_config=vision, projection_dim=64)
  )
  folder = tmp_path / 'saved'
  model.save_pretrained(folder)
  _write_hf_repo(
      hf_env / 'hub',
      'test-org/owlv2-hf',
      {f: (folder / f).read_bytes() for f in ('config.json', 'model.safetensors')},
      commit='b' * 40,
  )
  module, variables = ck.load_checkpoint('test-org/owlv2-hf')
  want_module, want = ck.load_checkpoint(folder)
  assert module.config == want_module.config and module.config.objectness
  _assert_same_params(variables, want)


def _torch_repo(hf_env, tiny_variables, state) -> None:
  torch = pytest.importorskip('torch')
  buffer = io.BytesIO()
  torch.save(state, buffer)
  _write_hf_repo(
      hf_env / 'hub',
      HF_TORCH_REPO,
      {
          'config.json': _tiny_hf_files(tiny_variables)['config.json'],
          'pytorch_model.bin': buffer.getvalue(),
      },
      commit='c' * 40,
  )


def test_hf_pytorch_only_repo_loads_with_weights_only(hf_env, tiny_variables, tmp_path):
  torch = pytest.importorskip('torch')
  state = {
      k: torch.from_numpy(np.array(v))
      for k, v in ck.scenic_to_hf_state_dict(tiny_variables).items()
  }
  _torch_repo(hf_env, tiny_variables, state)
  module, variables = ck.load_checkpoint(HF_TORCH_REPO)
  assert module.config.name == 'tiny'
  _assert_same_params(variables, tiny_variables)
  converted = tmp_path / 'cache' / 'hf-safetensors' / 'test-org--owlvit-tiny-torch' / ('c' * 40)
  assert sorted(p.name for p in converted.iterdir()) == ['config.json', 'model.safetensors']


class _NotAllowed:  # pickled by reference: torch's weights_only unpickler refuses it

  def __reduce__(self):
    return (print, ('this would run',))


def test_hf_pytorch_pickle_with_code_is_refused(hf_env, tiny_variables, capsys):
  torch = pytest.importorskip('torch')
  _torch_repo(hf_env, tiny_variables, {'w': torch.zeros(2), 'x': _NotAllowed()})
  with pytest.raises(hub.HubError, match=r'cannot be read with torch.load\(weights_only=True\)'):
    ck.load_checkpoint(HF_TORCH_REPO)
  assert 'this would run' not in capsys.readouterr().out


def test_hf_pytorch_only_without_torch_says_what_to_install(hf_env, tiny_variables, monkeypatch):
  pytest.importorskip('torch')
  _torch_repo(hf_env, tiny_variables, {})
  monkeypatch.setitem(sys.modules, 'torch', None)
  with pytest.raises(hub.HubError, match=r'only pytorch_model.bin.*pip install torch'):
    ck.load_checkpoint(HF_TORCH_REPO)


def test_hf_id_in_cropper(hf_env):
  cropper = cropper_lib.ClipCropper.load(HF_REPO, keyword_pipeline='rules')
  assert cropper.zero_shot and cropper.model_id == f'{HF_REPO} (zero-shot)'
  crops = cropper.crop(detect.demo_image(), text='a red square', top_k=2)
  assert 1 <= len(crops) <= 2


def test_crop_cli_with_hf_id_offline(hf_env, tmp_path):
  """`python -m clipcrop_jax.crop --checkpoint ORG/NAME` in a fresh process (HF_HUB_OFFLINE and
  HF_HOME are then read by huggingface_hub at import, as for a user)."""
  out = tmp_path / 'crops'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  result = subprocess.run(
      [
          sys.executable,
          '-m',
          'clipcrop_jax.crop',
          '--checkpoint',
          HF_REPO,
          '--text',
          'a red square',
          '--top-k',
          '2',
          '--keyword-pipeline',
          'rules',
          '--out',
          str(out),
      ],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  summary = json.loads((out / 'crops.json').read_text())
  assert summary['model'] == f'{HF_REPO} (zero-shot)' and summary['results'][0]['crops']
  missing = subprocess.run(
      [
          sys.executable,
          '-m',
          'clipcrop_jax.crop',
          '--checkpoint',
          'test-org/absent',
          '--text',
          'x',
          '--out',
          str(tmp_path / 'none'),
      ],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert missing.returncode == 2
  assert (
      missing.stderr.strip()
      .splitlines()[-1]
      .startswith('error: checkpoint test-org/absent: not in the Hugging Face cache')
  )


def test_config_accepts_names_for_init_from_owlvit(tmp_path):
  def problems(value):
    config = default_config.get_default_config()
    config.init_from.owlvit = value
    try:
      config_validation.validate_config(config)
    except config_validation.ConfigError as e:
      return str(e)
    return ''

  assert 'init_from.owlvit' not in problems('google/owlv2-base-patch16-ensemble')
  assert 'init_from.owlvit' not in problems('clip_vit_b32_b0203fc')
  assert "init_from.owlvit='runs/missing.msgpack': no such file" in problems('runs/missing.msgpack')
  existing = tmp_path / 'b32.msgpack'
  existing.write_bytes(b'x')
  assert 'init_from.owlvit' not in problems(str(existing))
