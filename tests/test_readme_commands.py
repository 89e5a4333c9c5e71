"""Every command line the documentation shows (README.md and docs/*.md), run as written in a
clean child process.

The shell blocks are read from the files (so a changed or new command is tested as it is
written); each command is matched by the first rule of `RULES` that fits it, which says how it is
covered: run here, covered by a named test elsewhere, `--help` only (benchmarks: measurements of
minutes), or not run for a stated reason. A command no rule fits fails
`test_every_documented_command_has_a_rule`.

Commands run in a user's folder holding files of the names the documentation uses (`photo.jpg`,
`MODEL_DIR`, `owl2_b16.msgpack`, `RAW`, `DATA`, ...: tiny models and random images) with `tools`,
`configs` and `datasets` linked from the repository, one folder per file and block, the block's
commands in order (and a file's blocks in order), in a clean child process (`clean_process`: empty
HOME and caches, no project or `HF_*` variables). An optional `[...]` group is left out. A service
is started, asked by the block's `curl` lines once `/readyz` answers, and stopped; its port is a
free one instead of the documented 8000 / 8080. A block identical to an earlier one (the README's
quick starts repeat blocks of the docs pages) is run once, where it first appears.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import shlex
import signal
import socket
import subprocess
import time
import urllib.request
from typing import Optional

import numpy as np
import pytest
from PIL import Image

import clean_process

REPO = pathlib.Path(__file__).resolve().parents[1]
README = REPO / 'README.md'
# README first, then the docs pages in name order.
DOC_FILES = [README] + sorted((REPO / 'docs').glob('*.md'))

RUN, SERVE, WITH_SERVER, HELP, ELSEWHERE, NOT_RUN = (
    'run',
    'serve',
    'with_server',
    'help',
    'elsewhere',
    'not_run',
)


@dataclasses.dataclass(frozen=True)
class Rule:
  pattern: str  # re.search on the command text (continuations joined, comment removed)
  kind: str
  why: str = ''  # ELSEWHERE: 'tests/file.py::test_or_fixture_name'; NOT_RUN: the reason


RULES = [
    Rule(r'^pip install ', NOT_RUN, 'the installation itself: .ci/run performs it'),
    Rule(
        r'--checkpoint google/owlv2-base-patch16-ensemble',
        ELSEWHERE,
        'tests/test_hub_online.py::test_readme_command_downloads_crops_and_then_runs_from_the_'
        'cache',
    ),
    Rule(r'^python -m clipcrop_jax\.crop ', RUN),
    Rule(r'^python -m clipcrop_jax\.owlvit\.detect ', RUN),
    Rule(r'^python -m clipcrop_jax\.serve ', SERVE),
    Rule(r'^curl ', WITH_SERVER),
    Rule(r'^python tools/export_tf\.py ', RUN),
    Rule(
        r'^python -m clipcrop_jax\.crop_beam .*--runner DataflowRunner',
        NOT_RUN,
        'needs a Google Cloud project; the same pipeline runs locally on the lines above',
    ),
    Rule(r'^python -m clipcrop_jax\.crop_beam ', RUN),
    Rule(r'^python -m clipcrop_jax\.build_dataset ', RUN),
    Rule(r'^python -m clipcrop_jax\.detection_train ', RUN),
    Rule(
        r'^python tools/convert_checkpoint\.py --input clip_vit_b32_b0203fc ',
        NOT_RUN,
        "downloads Scenic's 583 MiB B/32 release; the converter runs on the line above",
    ),
    Rule(r'^python tools/convert_checkpoint\.py ', RUN),
    Rule(r'^python tools/launch_sweep\.py ', RUN),  # without --launch: prints the runs' commands
    Rule(
        r'^python -m clipcrop_jax\.main --config=configs/synthetic\.py',
        ELSEWHERE,
        'tests/test_synthetic_pipeline.py::quick_run',
    ),
    Rule(
        r'^python -m clipcrop_jax\.main --config=configs/tiny\.py',
        ELSEWHERE,
        'tests/test_train.py::main_command',
    ),
    Rule(
        r'^python -m clipcrop_jax\.main --config=configs/(gaic_b32|text_eval)\.py',
        NOT_RUN,
        'needs the GAIC / Horanyi-PR data and the B/32 release; every config file is loaded '
        'and validated by tests/test_configs.py',
    ),
    Rule(r'^python tools/benchmark_\w+\.py', HELP),
    Rule(r'^python tools/keyword_roles\.py ', HELP),  # reads GAIC's released caption files
    Rule(
        r'^(OUT=\S+ |GPU_CHECK_TINY=1 )?bash tools/gpu_check\.sh',
        NOT_RUN,
        'the GPU check: minutes on a lent GPU machine (its CPU dry run takes minutes too)',
    ),
    Rule(
        r'^tfds build ',
        NOT_RUN,
        'needs the tfds-cli extra (apache-beam, mlcroissant); the same builders run through '
        'python -m clipcrop_jax.build_dataset here and in the dataset tests',
    ),
    Rule(r'^docker run ', NOT_RUN, 'TF Serving in Docker: no Docker engine on CI machines'),
]

# Python blocks, by their first line.
PY_RULES = [
    Rule(r'^from clipcrop_jax import ClipCropper$', RUN),
    Rule(r'^results = cropper\.crop\(', NOT_RUN, 'a fragment with your own files and cropper'),
    Rule(
        r'^import jax$',
        NOT_RUN,
        "downloads Scenic's 583 MiB B/32 release (weights by name are "
        'tested in tests/test_hub*.py)',
    ),
    Rule(r'^from clipcrop_jax\.owlvit import heads, model$', NOT_RUN, 'continues the block above'),
    Rule(r'^import json, numpy as np, requests$', NOT_RUN, 'asks a TF Serving server'),
]


@dataclasses.dataclass(frozen=True)
class Command:
  line: int  # line of its file where the command starts
  text: str  # continuations joined, trailing comment removed
  rule: Rule


@dataclasses.dataclass(frozen=True)
class Block:
  file: str  # relative to the repository: README.md, docs/<page>.md
  line: int
  language: str
  body: str
  commands: tuple[Command, ...]

  @property
  def where(self) -> str:
    return f'{self.file} line {self.line}'


def _rule(text: str, rules: list[Rule]) -> Optional[Rule]:
  return next((r for r in rules if re.search(r.pattern, text)), None)


def _strip_comment(line: str) -> str:
  """The line without a trailing `# comment` (a '#' that starts a word outside quotes)."""
  quote, out = None, []
  for i, ch in enumerate(line):
    if quote:
      quote = None if ch == quote else quote
    elif ch in '"\'':
      quote = ch
    elif ch == '#' and (i == 0 or line[i - 1].isspace()):
      break
    out.append(ch)
  return ''.join(out).strip()


def readme_blocks(path: pathlib.Path = README) -> list[Block]:
  """The fenced code blocks of one Markdown file, with their shell commands."""
  text = path.read_text()
  name = path.relative_to(REPO).as_posix()
  blocks = []
  for m in re.finditer(r'^```(\w*)\n(.*?)^```', text, re.S | re.M):
    start = text[: m.start()].count('\n') + 2
    language, body = m.group(1), m.group(2)
    commands = []
    if language in ('', 'bash', 'sh', 'shell'):
      pending, first = '', None
      for offset, raw in enumerate(body.splitlines()):
        if first is None:
          first = start + offset
        pending += raw.rstrip()
        if pending.endswith('\\'):
          pending = pending[:-1] + ' '
          continue
        command = _strip_comment(' '.join(pending.split()))
        if command:
          commands.append(Command(first, command, _rule(command, RULES)))
        pending, first = '', None
    blocks.append(Block(name, start, language, body, tuple(commands)))
  return blocks


def doc_blocks() -> list[Block]:
  """The code blocks of README.md and of every docs page, file by file, in order."""
  return [b for path in DOC_FILES for b in readme_blocks(path)]


def _without_optional(text: str) -> str:
  return ' '.join(re.sub(r'\[[^\]]*\]', ' ', text).split())


# ------------------------------------------------------------------------------------------------
# Coverage of the documentation.
# ------------------------------------------------------------------------------------------------


def test_every_documented_command_has_a_rule():
  blocks = doc_blocks()
  assert {b.file for b in blocks} >= {'README.md', 'docs/cropping.md'}  # docs pages are read
  missing = [f'{b.file} line {c.line}: {c.text}' for b in blocks for c in b.commands if not c.rule]
  assert not missing, 'add a rule (how is this command tested?):\n' + '\n'.join(missing)
  python = [b for b in blocks if b.language == 'python']
  missing = [
      f'{b.where}: {b.body.splitlines()[0]}'
      for b in python
      if not _rule(b.body.splitlines()[0], PY_RULES)
  ]
  assert not missing, 'add a PY_RULE for this python block:\n' + '\n'.join(missing)
  kinds = {c.rule.kind for b in blocks for c in b.commands}
  assert {RUN, SERVE, WITH_SERVER} <= kinds  # the parser found the commands


def test_every_rule_is_used_and_every_elsewhere_test_exists():
  blocks = doc_blocks()
  used = {id(c.rule) for b in blocks for c in b.commands}
  used |= {id(_rule(b.body.splitlines()[0], PY_RULES)) for b in blocks if b.language == 'python'}
  unused = [r.pattern for r in RULES + PY_RULES if id(r) not in used]
  assert not unused, f'rules no documented command uses (remove them): {unused}'
  for rule in RULES:
    if rule.kind == ELSEWHERE:
      file, _, name = rule.why.partition('::')
      assert re.search(rf'^def {re.escape(name)}\(', (REPO / file).read_text(), re.M), rule.why
    if rule.kind == NOT_RUN:
      assert rule.why, rule.pattern


def test_readme_opens_with_the_two_commands_and_stays_short():
  """The README is the door: the install-and-run and install-and-test lines first, unchanged,
  and at most 250 lines; the rest lives in docs/."""
  text = README.read_text()
  assert text.startswith(
      '```\n'
      'pip install -e ".[train]" && python -m clipcrop_jax.main --config=configs/synthetic.py '
      '--workdir=synthetic_run\n'
      'pip install -e ".[test]" && python -m pytest -q\n'
      '```\n'
  )
  assert len(text.splitlines()) <= 250


def _anchor(heading: str) -> str:
  """GitHub's anchor of a Markdown heading."""
  heading = re.sub(r'[^\w\- ]', '', heading.strip().lower().replace('`', ''))
  return heading.replace(' ', '-')


def test_relative_links_of_the_documentation_resolve():
  """Every relative link (and #anchor) of README.md and docs/*.md points at something."""
  broken = []
  for path in DOC_FILES:
    text = re.sub(r'^```.*?^```', '', path.read_text(), flags=re.S | re.M)
    for target in re.findall(r'\]\(([^)\s]+)\)', text):
      if re.match(r'[a-z]+:', target):
        continue
      file, _, anchor = target.partition('#')
      linked = (path.parent / file).resolve() if file else path
      if not linked.exists():
        broken.append(f'{path.relative_to(REPO)}: {target}')
      elif anchor and linked.suffix == '.md':
        headings = re.findall(r'^#+ (.+)$', linked.read_text(), re.M)
        if anchor not in {_anchor(h) for h in headings}:
          broken.append(f'{path.relative_to(REPO)}: {target} (no such heading)')
  assert not broken, '\n'.join(broken)


def test_readme_parser():
  assert _strip_comment('python -m x --a "b # c" # note') == 'python -m x --a "b # c"'
  assert _strip_comment('# only a comment') == ''
  assert _without_optional('a [--json] b [--x --y=2] c') == 'a b c'


# ------------------------------------------------------------------------------------------------
# A user's folder with the file names the documentation uses.
# ------------------------------------------------------------------------------------------------


def _jpeg(path: pathlib.Path, h: int, w: int, seed: int) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
  Image.fromarray(image).resize((w, h), Image.NEAREST).save(path, 'JPEG')


def _gaic_journal(manual: pathlib.Path) -> None:
  """GAIC's journal layout (GAIC_journal/{images,annotations}/{train,val,test}/) in small."""
  for i, split in enumerate(('train', 'val', 'test')):
    for j in range(2):
      stem = f'{i + 1}0000{j + 1}'
      _jpeg(manual / 'GAIC_journal/images' / split / f'{stem}.jpg', 48, 64, seed=10 * i + j)
      ann = manual / 'GAIC_journal/annotations' / split / f'{stem}.txt'
      ann.parent.mkdir(parents=True, exist_ok=True)
      ann.write_text('0 0 48 64 4.0\n4 8 40 56 2.5\n0 0 24 32 -2\n')


@pytest.fixture(scope='module')
def user_files(tmp_path_factory, synthetic_tiny_dir) -> pathlib.Path:
  """Inputs under the documented names: images, a tiny ClipCrop model directory, a tiny OWL-ViT as
  a Scenic msgpack and as a Hugging Face folder, GAIC's raw layout, TFDS data."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  from clipcrop_jax import ClipCropper  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.owlvit import checkpoints as ck  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.owlvit import configs  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.owlvit import model as owl_model  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.mktemp('readme_user')
  for i, name in enumerate(
      (
          'photo.jpg',
          'dog.jpg',
          'cats.jpg',
          'shelf.jpg',
          'boat.jpg',
          'photos/a.jpg',
          'photos/b.jpg',
          'photos/more/c.jpg',
      )
  ):
    _jpeg(root / name, 360, 480, seed=i)
  _jpeg(root / 'example_mug.jpg', 300, 280, seed=20)  # holds --query-box 40,30,220,260
  ClipCropper.init_random('tiny', seed=0).save(root / 'MODEL_DIR')
  variables = owl_model.init_variables(configs.get_config('tiny'), seed=1)
  ck.save_scenic_checkpoint(variables, root / 'owl2_b16.msgpack')
  hf = root / 'google-owlv2-base-patch16-ensemble'
  hf.mkdir()
  safetensors.numpy.save_file(ck.scenic_to_hf_state_dict(variables), str(hf / 'model.safetensors'))
  (hf / 'config.json').write_text(json.dumps(ck.hf_config_dict(configs.get_config('tiny'))))
  (root / 'requests.jsonl').write_text(
      '{"image": "photos/a.jpg", "text": "the dog"}\n'
      '{"image": "photos/more/c.jpg", "text": "a cat on a sofa"}\n'
  )
  _gaic_journal(root / 'RAW')
  (root / 'DATA').mkdir()
  (root / 'DATA' / 'synthetic_crops').symlink_to(synthetic_tiny_dir / 'synthetic_crops')
  return root


def _folder(user_files: pathlib.Path, where: pathlib.Path) -> pathlib.Path:
  """A fresh folder whose entries link to the user's files (DATA is a real folder: builds write
  into it), plus `tools`, `configs`, `datasets` from the repository and the documented aliases."""
  where.mkdir()
  for entry in user_files.iterdir():
    if entry.name == 'DATA':
      (where / 'DATA').mkdir()
      for item in entry.iterdir():
        (where / 'DATA' / item.name).symlink_to(item.resolve())
    else:
      (where / entry.name).symlink_to(entry)
  for name in ('tools', 'configs', 'datasets'):
    (where / name).symlink_to(REPO / name)
  aliases = {
      'MODEL_DIR_OR_OWL_CHECKPOINT': 'MODEL_DIR',
      'owl2-b16.msgpack': 'owl2_b16.msgpack',
      # the embedded default's ClipCrop (full) model (README quick start)
      'synthetic_run/clipcrop_full_subject/clipcrop': 'MODEL_DIR',
  }
  for alias, target in aliases.items():
    (where / alias).parent.mkdir(parents=True, exist_ok=True)
    (where / alias).symlink_to(user_files / target)
  (where / 'runs').mkdir()
  (where / 'runs' / 'gaic').symlink_to(user_files / 'MODEL_DIR')
  return where


# ------------------------------------------------------------------------------------------------
# Running the blocks.
# ------------------------------------------------------------------------------------------------


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _expand(text: str) -> list[list[str]]:
  """The argv lists a documented line stands for: `[...]` dropped; a line using `$k` (one per
  process k) once per k = 0 .. --process-count - 1."""
  argv = shlex.split(_without_optional(text))
  if '$k' not in argv:
    return [argv]
  count = int(argv[argv.index('--process-count') + 1])
  return [[str(k) if a == '$k' else a for a in argv] for k in range(count)]


def _outputs(argv: list[str]) -> list[str]:
  """What a command writes: the values of its --out / --output / -o / --data_dir."""
  out = []
  for i, arg in enumerate(argv):
    flag, eq, value = arg.partition('=')
    if not eq and flag in ('--out', '--output', '-o') and i + 1 < len(argv):
      out.append(argv[i + 1])
    elif eq and flag == '--data_dir':
      out.append(value)
  return out


def _check_outputs(argv: list[str], cwd: pathlib.Path) -> None:
  """A successful command left its outputs behind (a folder not empty)."""
  for value in _outputs(argv):
    target = cwd / value
    assert target.exists(), f'{" ".join(argv)}: no {value} was written'
    if target.is_dir():
      assert any(target.iterdir()), f'{" ".join(argv)}: {value} is empty'


def _run_serve(command: Command, curls: list[Command], env, cwd) -> None:
  port = _free_port()
  argv = shlex.split(_without_optional(command.text))
  if '--port' in argv:
    argv[argv.index('--port') + 1] = str(port)
  else:
    argv += ['--port', str(port)]
  log = open(cwd / f'serve-{port}.log', 'w+')  # pylint: disable=consider-using-with
  server = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)  # pylint: disable=consider-using-with
  try:
    deadline, ready = time.monotonic() + 240, False
    while time.monotonic() < deadline and server.poll() is None:
      try:
        with urllib.request.urlopen(f'http://127.0.0.1:{port}/readyz', timeout=5) as response:
          ready = response.status == 200
      except OSError:
        pass
      if ready:
        break
      time.sleep(0.5)
    log.seek(0)
    assert ready, f'line {command.line}: {command.text}: not ready\n{log.read()[-4000:]}'
    for curl in curls:
      text = _without_optional(curl.text).replace('127.0.0.1:8000', f'127.0.0.1:{port}')
      argv_curl = shlex.split(text) + ['--silent', '--show-error', '--write-out', '\n%{http_code}']
      result = clean_process.run(argv_curl, env=env, cwd=cwd, timeout=120)
      assert result.returncode == 0, clean_process.describe(result)
      *body, code = result.stdout.rsplit('\n', 1)
      assert code == '200', f'line {curl.line}: HTTP {code}: {body}'
      if '-o' in argv_curl:
        with Image.open(cwd / argv_curl[argv_curl.index('-o') + 1]) as image:
          assert image.format == 'JPEG'
      else:
        assert json.loads(body[0])['crops'], body
  finally:
    server.send_signal(signal.SIGINT)
    try:
      server.wait(timeout=30)
    except subprocess.TimeoutExpired:
      server.kill()
      server.wait()
    log.close()
  output = (cwd / f'serve-{port}.log').read_text()
  # Ctrl-C: a graceful shutdown without a traceback (uvicorn re-raises the interrupt after its
  # shutdown only when it arrives at some points: exit code 130 then, else 0).
  assert server.returncode in (0, 130) and 'Traceback' not in output, output[-4000:]


def _runnable_blocks() -> list[Block]:
  """The blocks with something to run, README first, then the docs pages, each file in order;
  a block identical to an earlier runnable block (same language and text) is left out: it was
  run where it first appears."""
  runnable = (RUN, SERVE, HELP)
  out, seen = [], set()
  for block in doc_blocks():
    if block.language == 'python':
      rule = _rule(block.body.splitlines()[0], PY_RULES)
      if rule is None or rule.kind != RUN:
        continue
    elif not any(c.rule is not None and c.rule.kind in runnable for c in block.commands):
      continue
    if (block.language, block.body) not in seen:
      seen.add((block.language, block.body))
      out.append(block)
  return out


def test_repeated_blocks_are_run_once():
  """The README's quick starts repeat blocks of the docs pages word for word; those run once."""
  runnable = _runnable_blocks()
  assert len({(b.language, b.body) for b in runnable}) == len(runnable)
  assert {b.file for b in runnable} > {'README.md'}


@pytest.mark.slow
@pytest.mark.parametrize(
    'block', _runnable_blocks(), ids=lambda b: f'{b.file}-line-{b.line}'.replace('/', '-')
)
def test_readme_block_runs_as_written(block, user_files, tmp_path):
  cwd = _folder(user_files, tmp_path / 'user')  # one folder per file and block
  env = clean_process.clean_env(tmp_path / 'home')
  if block.language == 'python':
    result = clean_process.run(['python', '-c', block.body], env=env, cwd=cwd)
    assert result.returncode == 0, clean_process.describe(result)
    return
  curls = [c for c in block.commands if c.rule.kind == WITH_SERVER]
  for command in block.commands:
    kind = command.rule.kind
    if kind == SERVE:  # the block's curl lines ask the first service started
      _run_serve(command, curls, env, cwd)
      curls = []
    elif kind == HELP:
      argv = shlex.split(command.text)
      script = argv[:2] if argv[1] != '-m' else argv[:3]
      result = clean_process.run(script + ['--help'], env=env, cwd=cwd)
      assert (
          result.returncode == 0
      ), f'{block.where}, line {command.line}\n' + clean_process.describe(result)
    elif kind == RUN:
      for argv in _expand(command.text):
        for value in _outputs(argv):  # the user has no such file yet: this command makes it
          if (cwd / value).is_symlink():
            (cwd / value).unlink()
        result = clean_process.run(argv, env=env, cwd=cwd, timeout=400)
        assert (
            result.returncode == 0
        ), f'{block.file} line {command.line}: {" ".join(argv)}\n' + clean_process.describe(result)
        _check_outputs(argv, cwd)
