"""Every config file in configs/ loads (locked, overridable), matches a schema and builds its model.

Also `clipcrop_jax.config_lib` (loading config files, parsing their argument), the model builders
of `clipcrop_jax.default_config`, the sweep library (`clipcrop_jax.experiments.sweeps`), the
sweep file configs/gaic_ablation_sweep.py and the runner tools/launch_sweep.py (printed commands;
`--launch` with a fake interpreter, nothing is trained).
"""

import functools
import inspect
import os
import pathlib
import subprocess
import sys

from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import ml_collections
import pytest

from clipcrop_jax import config_lib
from clipcrop_jax import config_validation
from clipcrop_jax import default_config
from clipcrop_jax.experiments import sweeps as sweep_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / 'configs'
SWEEP_TOOL = REPO / 'tools' / 'launch_sweep.py'
# Arguments to test per config file (files not listed here: their default only).
ARGS = {
    'gaic_b32.py': [
        None,
        'full',
        'main',
        'key',
        'base',
        'no_mosaic',
        'variant=key',
        'base,encoder=clip_b16',
    ],
    'synthetic.py': [None, 'quick'],
    'text_eval.py': [
        'horanyi_pr',
        'textcrop',
        'textcrop,variant=base',
        'dataset=horanyi_pr,variant=key',
        'horanyi_pr,variant=base,encoder=clip_b16',
    ],
}
GAIC_MODES = {
    None: 'full',
    'full': 'full',
    'main': 'main',
    'key': 'key',
    'base': 'base',
    'no_mosaic': 'full',
    'variant=key': 'key',
    'base,encoder=clip_b16': 'base',
}
# The paper's architecture: B/32 OWL-ViT + 6-layer decoder with 90 queries.
PAPER_MODEL = dict(
    owlvit='clip_b32',
    decoder_layers=6,
    decoder_width=512,
    decoder_heads=8,
    decoder_mlp_dim=2048,
    num_queries=90,
)


def _config_files():
  return [
      p for p in sorted(CONFIG_DIR.glob('*.py')) if hasattr(config_lib.load_module(p), 'get_config')
  ]


def _sweep_files():
  return [
      p for p in sorted(CONFIG_DIR.glob('*.py')) if hasattr(config_lib.load_module(p), 'get_hyper')
  ]


def _case_args():
  return [(path, arg) for path in _config_files() for arg in ARGS.get(path.name, [None])]


def _cases():
  return [
      pytest.param(path, arg, id=f'{path.name}:{arg}' if arg else path.name)
      for path, arg in _case_args()
  ]


def load_config(path, arg=None, overrides=()):
  """The config as `clipcrop_jax.main` sees it (config_flags, lock_config=True)."""
  spec = f'{path}:{arg}' if arg else str(path)
  argv = ['test', f'--config={spec}', *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file(
      'config', None, 'config', flag_values=fv, lock_config=True, sys_argv=argv
  )
  fv(argv)
  return fv.config


def _schema(d, prefix=''):
  """Set of dotted field paths of a (nested) ConfigDict."""
  out = set()
  for k, v in d.items():
    key = f'{prefix}{k}'
    if hasattr(v, 'items') and not isinstance(v, dict):
      out |= _schema(v, key + '.')
    else:
      out.add(key)
  return out


@functools.lru_cache(maxsize=None)
def _abstract_params(model_key):
  """Parameter shapes (jax.eval_shape, no weights) of one architecture, shared between configs."""
  config = default_config.get_default_config()
  config.model.update(dict(model_key))
  model = default_config.build_model(config)
  size = model.config.owlvit_config.image_size
  return jax.eval_shape(
      lambda r: model.init(r, jnp.zeros((1, size, size, 3)), jnp.ones((1, 1, 16), jnp.int32))[
          'params'
      ],
      jax.random.PRNGKey(0),
  )


def _architecture_key(config):
  # The query mode, dropout and freezing do not change the parameter shapes.
  return tuple(
      sorted(
          (k, v)
          for k, v in config.model.to_dict().items()
          if k not in ('mode', 'dropout_rate', 'freeze_encoder')
      )
  )


def _families():
  """{entry point: default config}: every config file extends exactly one of them."""
  return {
      'clipcrop_jax.main': default_config.get_default_config(),
      'clipcrop_jax.detection_train': default_config.get_detection_config(),
  }


@pytest.mark.parametrize('path,arg', _cases())
def test_config_loads_and_builds(path, arg):
  config = load_config(path, arg)
  config.lock()
  with pytest.raises(AttributeError):
    config.not_a_field = 1  # locked: a misspelt override is an error
  schemas = {k: _schema(v) for k, v in _families().items()}
  if config.get('run') == 'synthetic_pipeline':  # ClipCrop fields + the pipeline's own
    own = {k for k in _schema(config) if not k.startswith('pipeline.')}
    assert own == schemas['clipcrop_jax.main']
    assert _schema(config.pipeline.owlvit) == schemas['clipcrop_jax.detection_train']
    assert set(config.pipeline.variants) <= set(config.pipeline.variant_steps.keys())
    config = ml_collections.ConfigDict(
        {k: v for k, v in config.to_dict().items() if k != 'pipeline'}
    )
  family = [k for k, v in schemas.items() if v == _schema(config)]
  if not family:  # report the differences to the ClipCrop schema
    expected = schemas['clipcrop_jax.main']
    pytest.fail(
        f'{path.name}: fields differ from every default config; vs ClipCrop: missing '
        f'{sorted(expected - _schema(config))}, extra {sorted(_schema(config) - expected)}'
    )
  if family[0] != 'clipcrop_jax.main':
    assert config.batch_size > 0
    default_config.build_detection_module(config)  # a known OWL-ViT architecture
    return
  assert config.run in ('train', 'eval', 'train_and_eval', 'synthetic_pipeline')
  assert config.dtype in ('float32', 'bfloat16')
  assert config.batch_size > 0
  assert config.num_train_steps > 0 or config.num_epochs > 0
  assert all(b in default_config.BASELINES for b in config.eval.baselines)
  assert len(config.dataset.mosaic_probs) == 3
  assert abs(sum(config.dataset.mosaic_probs) - 1.0) < 1e-6
  assert config.eval.datasets and all(len(e) == 2 for e in config.eval.datasets)
  model = default_config.build_model(config)  # validates config.model (mode, OWL-ViT name, ...)
  params = _abstract_params(_architecture_key(config))
  assert {'owlvit', 'decoder'} <= set(params)
  assert sum(l.size for l in jax.tree_util.tree_leaves(params['decoder'])) > 0
  assert model.config.mode == config.model.mode


@pytest.mark.parametrize('arg', ARGS['gaic_b32.py'])
def test_gaic_b32_is_the_paper_run(arg):
  config = load_config(CONFIG_DIR / 'gaic_b32.py', arg)
  model = {k: config.model[k] for k in PAPER_MODEL}
  if arg and 'encoder=clip_b16' in arg:
    assert model.pop('owlvit') == 'clip_b16'
    assert model == {k: v for k, v in PAPER_MODEL.items() if k != 'owlvit'}
  else:
    assert model == PAPER_MODEL
  assert config.model.mode == GAIC_MODES[arg]
  assert config.run == 'train_and_eval'
  assert (config.dataset.name, config.dataset.train_split) == ('gaic/journal', 'train')
  assert (config.batch_size, config.num_epochs, config.num_train_steps) == (32, 180, -1)
  assert (config.optimizer.learning_rate, config.optimizer.end_learning_rate) == (1e-4, 1e-6)
  assert tuple(tuple(e) for e in config.eval.datasets) == (('gaic/journal', 'test'),)
  no_mosaic = arg == 'no_mosaic'
  assert tuple(config.dataset.mosaic_probs) == (
      (1.0, 0.0, 0.0) if no_mosaic else (1 / 3, 1 / 3, 1 / 3)
  )
  assert ('clipcrop_base' in config.eval.baselines) == (config.model.mode != 'base')


@pytest.mark.parametrize(
    'bad,expected',
    [
        ('nope', "gaic_b32.py: variant='nope'; expected one of"),
        ('variant=nope', "gaic_b32.py: variant='nope'; expected one of"),
        ('full,owl=clip_b16', "gaic_b32.py: unknown option 'owl'='clip_b16'"),
        ('full,main', "gaic_b32.py: unknown option 'main'"),
        ('full,variant=key', 'gaic_b32.py: variant given twice'),
    ],
)
def test_gaic_b32_rejects_bad_arguments(bad, expected):
  with pytest.raises(ValueError) as err:
    config_lib.load_config_file(CONFIG_DIR / 'gaic_b32.py', bad)
  assert str(err.value).startswith(expected) and '\n' not in str(err.value), str(err.value)


@pytest.mark.parametrize('dataset', ['horanyi_pr', 'textcrop'])
def test_text_eval_config(dataset):
  for variant in (None, 'base', 'key'):
    arg = dataset + (f',variant={variant}' if variant else '')
    config = load_config(CONFIG_DIR / 'text_eval.py', arg)
    train = load_config(CONFIG_DIR / 'gaic_b32.py', variant)
    assert config.run == 'eval'
    assert tuple(tuple(e) for e in config.eval.datasets) == ((dataset, 'test'),)
    assert config.model.to_dict() == train.model.to_dict()  # restores the training checkpoints
    assert config.eval.base_workdir == ''
    # Apart from what an evaluation changes, the training run's config.
    config.run, config.eval.datasets = train.run, train.eval.datasets
    assert config.to_dict() == train.to_dict()
  config = load_config(
      CONFIG_DIR / 'text_eval.py',
      f'dataset={dataset},encoder=clip_b16',
      ['--config.eval.base_workdir=/w/base'],
  )
  assert config.model.owlvit == 'clip_b16'
  assert config.eval.base_workdir == '/w/base'
  assert 'eval.base_workdir' in config_lib.load_module(CONFIG_DIR / 'text_eval.py').__doc__


@pytest.mark.parametrize(
    'bad,expected',
    [
        (None, "text_eval.py: dataset=''; expected one of ('horanyi_pr', 'textcrop')"),
        ('gaic', "text_eval.py: dataset='gaic'; expected one of"),
        ('textcrop,variant=nope', "gaic_b32.py: variant='nope'"),
        ('textcrop,seed=1', "text_eval.py: unknown option 'seed'='1'"),
    ],
)
def test_text_eval_rejects_bad_arguments(bad, expected):
  with pytest.raises(ValueError) as err:
    config_lib.load_config_file(CONFIG_DIR / 'text_eval.py', bad)
  assert str(err.value).startswith(expected), str(err.value)


def test_synthetic_quick_is_its_own_config():
  full, quick = load_config(CONFIG_DIR / 'synthetic.py'), load_config(
      CONFIG_DIR / 'synthetic.py', 'quick'
  )
  assert load_config(CONFIG_DIR / 'synthetic.py', '').to_dict() == full.to_dict()
  assert (full.pipeline.quick, quick.pipeline.quick) == (False, True)
  for config, name in ((full, 'synthetic_crops/default'), (quick, 'synthetic_crops/small')):
    assert config.run == 'synthetic_pipeline'
    assert config.dataset.name == config.pipeline.owlvit.dataset.name == name
    assert tuple(tuple(e) for e in config.eval.datasets) == ((name, 'ambiguity'),)
  assert tuple(full.pipeline.variants) == ('full', 'base', 'main', 'key')
  assert full.pipeline.variant_steps.to_dict() == dict(full=1500, base=600, main=600, key=600)
  assert full.pipeline.owlvit.num_train_steps == 1000
  assert tuple(quick.pipeline.variants) == ('full', 'base')
  assert quick.pipeline.variant_steps.to_dict() == dict(full=300, base=200, main=200, key=200)
  assert quick.pipeline.owlvit.num_train_steps == 220
  # Nothing else differs.
  for config in (full, quick):
    config.dataset.name = config.pipeline.owlvit.dataset.name = 'x'
    config.eval.datasets = ()
    config.pipeline.quick, config.pipeline.variants = None, ()
    config.pipeline.variant_steps, config.pipeline.owlvit.num_train_steps = {}, 0
  assert full.to_dict() == quick.to_dict()


# ------------------------------------------------------------------------------------------------
# config_lib.
# ------------------------------------------------------------------------------------------------


def _parse(arg, **spec):
  return config_lib.parse_arg(arg, **spec).to_dict()


def test_parse_arg_fields_and_types():
  spec = dict(variant='full', encoder='clip_b32', steps=10, lr=0.5, quick=False)
  assert _parse(None, **spec) == spec
  assert _parse('', **spec) == spec
  assert _parse(' , ', **spec) == spec
  assert _parse('base', **spec) == dict(spec, variant='base')  # leading bare value: first field
  assert _parse('base,encoder=clip_b16', **spec) == dict(spec, variant='base', encoder='clip_b16')
  assert _parse('variant=key', **spec) == dict(spec, variant='key')
  assert _parse('quick', **spec) == dict(spec, quick=True)  # bare bool field: True
  assert _parse('key,quick,steps=3,lr=1e-3', **spec) == dict(
      spec, variant='key', quick=True, steps=3, lr=1e-3
  )
  for word, value in (
      ('true', True),
      ('Yes', True),
      ('1', True),
      ('FALSE', False),
      ('no', False),
      ('0', False),
  ):
    got = config_lib.parse_arg(f'quick={word}', **spec).quick
    assert got is value, word
  assert isinstance(config_lib.parse_arg('steps=3', **spec).steps, int)
  assert isinstance(config_lib.parse_arg('lr=1', **spec).lr, float)
  assert isinstance(config_lib.parse_arg('x', **spec), ml_collections.ConfigDict)


@pytest.mark.parametrize(
    'arg,expected',
    [
        ('steps=ten', "test_configs.py: steps='ten': expected an int"),
        ('lr=fast', "test_configs.py: lr='fast': expected a float"),
        (
            'quick=maybe',
            "test_configs.py: quick='maybe': expected a bool (true/false, yes/no, 1/0)",
        ),
        (
            'speed=3',
            "test_configs.py: unknown option 'speed'='3' in 'speed=3' (options: variant, "
            'steps, quick, lr)',
        ),
        ('full,fast', "test_configs.py: unknown option 'fast' in 'full,fast'"),
        ('steps', 'test_configs.py: steps needs a value'),
        ('quick,quick=no', 'test_configs.py: quick given twice'),
    ],
)
def test_parse_arg_errors_name_the_key_value_and_config(arg, expected):
  with pytest.raises(ValueError) as err:
    config_lib.parse_arg(arg, variant='full', steps=10, quick=False, lr=0.1)
  assert str(err.value).startswith(expected) and '\n' not in str(err.value), str(err.value)


def test_parse_arg_first_bool_field_takes_no_bare_value():
  with pytest.raises(ValueError, match="unknown option 'quikc'"):
    config_lib.parse_arg('quikc', quick=False, dataset='')
  with pytest.raises(TypeError, match='tuple'):
    config_lib.parse_arg('', sizes=(1, 2))


def test_parse_arg_lazy():
  got = _parse('full,steps=3,lr=0.5,name=abc,on=true,flag', lazy=True, variant='x')
  assert got == dict(variant='full', steps=3, lr=0.5, name='abc', on=True, flag=True)
  assert type(got['steps']) is int and type(got['lr']) is float
  with pytest.raises(ValueError, match='unknown option'):
    config_lib.parse_arg('steps=3', variant='x')


def test_load_config_file(tmp_path):
  (tmp_path / 'plain.py').write_text(
      'import ml_collections\nSTATE = []\n'
      'def get_config():\n  STATE.append(1)\n'
      '  return ml_collections.ConfigDict(dict(n=len(STATE)))\n'
  )
  (tmp_path / 'witharg.py').write_text(
      'import ml_collections\ndef get_config(arg):\n'
      '  return ml_collections.ConfigDict(dict(arg=arg))\n'
  )
  (tmp_path / 'none.py').write_text('def get_config():\n  pass\n')
  assert config_lib.load_config_file(tmp_path / 'plain.py').n == 1
  assert config_lib.load_config_file(str(tmp_path / 'plain.py'), '').n == 1  # a fresh module
  assert config_lib.load_config_file(tmp_path / 'witharg.py', 'a=1').arg == 'a=1'
  assert config_lib.load_config_file(tmp_path / 'witharg.py').arg is None
  with pytest.raises(ValueError, match=r'plain\.py: get_config\(\) takes no argument'):
    config_lib.load_config_file(tmp_path / 'plain.py', 'quick')
  with pytest.raises(ValueError, match='returned None'):
    config_lib.load_config_file(tmp_path / 'none.py')
  with pytest.raises(FileNotFoundError):
    config_lib.load_config_file(tmp_path / 'missing.py')
  with pytest.raises(AttributeError, match='defines no get_config'):
    config_lib.load_config_file(CONFIG_DIR / 'gaic_ablation_sweep.py')
  a = config_lib.load_module(tmp_path / 'plain.py')
  b = config_lib.load_module(tmp_path / 'plain.py')
  assert a is not b and a.__name__ == b.__name__ and a.__name__ not in sys.modules


@pytest.mark.parametrize('path,arg', _cases())
def test_load_config_file_matches_config_flags(path, arg):
  assert config_lib.load_config_file(path, arg).to_dict() == load_config(path, arg).to_dict()


def test_loading_configs_imports_no_jax():
  code = (
      'import sys\nfrom clipcrop_jax import config_lib, default_config\n'
      f'for path, arg in {[(str(p), a) for p, a in _case_args()]!r}:\n'
      '  config_lib.load_config_file(path, arg)\n'
      "print(sorted(m for m in ('jax', 'flax', 'tensorflow') if m in sys.modules))\n"
  )
  out = subprocess.run(
      [sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, check=True
  )
  assert out.stdout.strip() == '[]', out.stdout + out.stderr


# ------------------------------------------------------------------------------------------------
# Config -> model builders.
# ------------------------------------------------------------------------------------------------


def test_builders():
  config = _tiny()
  cc = default_config.clipcrop_config(config)
  assert (cc.owlvit, cc.decoder_layers, cc.num_queries) == ('tiny', 2, 12)
  assert default_config.compute_dtype(config) == jnp.float32
  config.dtype = 'bfloat16'
  model = default_config.build_model(config)
  assert model.dtype == jnp.bfloat16 and model.config == cc
  config.dtype = 'float16'
  with pytest.raises(ValueError, match="config.dtype='float16'"):
    default_config.compute_dtype(config)
  config.dtype = 'float32'
  config.model.unlock()
  config.model.decoder_depth = 3
  with pytest.raises(ValueError, match=r"config.model has unknown fields \['decoder_depth'\]"):
    default_config.clipcrop_config(config)
  det = load_config(CONFIG_DIR / 'owlvit_detection_tiny.py')
  from clipcrop_jax.owlvit import configs as owl_configs  # pylint: disable=g-import-not-at-top

  assert default_config.owlvit_config(det) == owl_configs.get_config('tiny')
  det.dtype = 'bfloat16'
  module = default_config.build_detection_module(det)
  assert module.config == owl_configs.get_config('tiny') and module.dtype == jnp.bfloat16


# ------------------------------------------------------------------------------------------------
# Sweeps.
# ------------------------------------------------------------------------------------------------


def test_hyper_helpers():
  h = sweep_lib.Hyper()
  assert h.fixed('config.a', 1) == [{'config.a': 1}]
  runs = h.product([h.sweep('config.a', [1, 2]), h.sweep('config.b', ['x', 'y'])])
  assert runs == [
      {'config.a': 1, 'config.b': 'x'},
      {'config.a': 1, 'config.b': 'y'},
      {'config.a': 2, 'config.b': 'x'},
      {'config.a': 2, 'config.b': 'y'},
  ]
  assert h.zipit([h.sweep('config.a', [1, 2]), h.sweep('config.b', [3, 4])]) == [
      {'config.a': 1, 'config.b': 3},
      {'config.a': 2, 'config.b': 4},
  ]
  assert len(h.chainit([runs, h.fixed('config.a', 3)])) == 5
  with pytest.raises(ValueError):
    h.zipit([h.sweep('config.a', [1, 2]), h.sweep('config.b', [3])])
  with pytest.raises(ValueError):
    h.product([h.fixed('config.a', 1), h.fixed('config.a', 2)])
  assert sweep_lib.format_value((1.0, 0.0, 0.0)) == '(1.0,0.0,0.0)'
  assert sweep_lib.format_value(True) == 'true'
  assert sweep_lib.run_name({'config.model.mode': 'base', 'config.seed': 1}) == 'mode=base,seed=1'


def test_paper_sweep():
  base, runs = sweep_lib.load_sweep(str(CONFIG_DIR / 'gaic_ablation_sweep.py'))
  assert pathlib.Path(base).resolve() == (CONFIG_DIR / 'gaic_b32.py').resolve()
  assert len(runs) == 4 * 2 + 1
  names = [sweep_lib.run_name(r) for r in runs]
  assert len(set(names)) == len(names)
  modes = sorted(
      (r['config.model.mode'], r['config.seed'])
      for r in runs
      if 'config.dataset.mosaic_probs' not in r
  )
  assert modes == sorted((m, s) for m in ('base', 'main', 'key', 'full') for s in (0, 1))
  no_mosaic = [r for r in runs if 'config.dataset.mosaic_probs' in r]
  assert len(no_mosaic) == 1 and tuple(no_mosaic[0]['config.dataset.mosaic_probs']) == (1, 0, 0)


@pytest.mark.parametrize('path', _sweep_files(), ids=lambda p: p.name)
def test_sweep_overrides_exist_and_parse(path):
  base, runs = sweep_lib.load_sweep(str(path))
  assert runs
  assert len({sweep_lib.run_name(r) for r in runs}) == len(runs)
  schema = _schema(load_config(base))
  for run in runs:
    for key in run:
      assert key.removeprefix('config.') in schema, f'{path.name}: unknown field {key}'
    # Exactly the flags the runner passes, through config_flags on the locked config.
    flags_ = [f'--{k}={sweep_lib.format_value(v)}' for k, v in run.items()]
    config = load_config(base, None, flags_)
    for key, value in run.items():
      got = config
      for part in key.split('.')[1:]:
        got = got[part]
      assert (tuple(got) if isinstance(value, tuple) else got) == value, key


def _sweep_tool():
  return config_lib.load_module(SWEEP_TOOL)


def test_sweep_tool_prints_commands(tmp_path):
  out = subprocess.run(
      [
          sys.executable,
          str(SWEEP_TOOL),
          'configs/gaic_ablation_sweep.py',
          f'--workdir_root={tmp_path}',
          '--',
          '--config.dataset.data_dir=/data',
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      check=True,
  )
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 9
  for line in lines:
    assert line.startswith(
        'python -m clipcrop_jax.main --config=configs/gaic_b32.py ' f'--workdir={tmp_path}/'
    )
    assert line.endswith('--config.dataset.data_dir=/data')
  assert any("'--config.dataset.mosaic_probs=(1.0,0.0,0.0)'" in l for l in lines)
  assert not list(tmp_path.iterdir())  # printing launches nothing


def test_sweep_tool_launch(tmp_path, capsys):
  # A fake interpreter: the seed=1 runs fail, the others succeed; nothing is trained.
  fake = tmp_path / 'fake_python'
  fake.write_text('#!/bin/sh\necho "$@"\ncase "$*" in *config.seed=1*) exit 3;; esac\nexit 0\n')
  fake.chmod(0o755)
  root = tmp_path / 'runs'
  tool = _sweep_tool()
  cwd = os.getcwd()
  os.chdir(REPO)
  try:
    code = tool.main(
        [
            'configs/gaic_ablation_sweep.py',
            f'--workdir_root={root}',
            '--launch',
            '--parallel=3',
            f'--python={fake}',
        ]
    )
  finally:
    os.chdir(cwd)
  assert code == 1
  out = capsys.readouterr().out
  assert '5/9 runs succeeded' in out
  assert out.count('FAILED (exit 3)') == 4
  runs = sorted(p.name for p in root.iterdir())
  assert len(runs) == 9
  log = (root / 'mode=key,seed=0' / 'sweep.log').read_text()
  assert '-m clipcrop_jax.main' in log and '--config.model.mode=key' in log

  codes = tool.launch(
      [('a', [sys.executable, '-c', 'pass']), ('b', [str(tmp_path / 'nope')])],
      str(tmp_path / 'more'),
      2,
  )
  assert codes == {'a': 0, 'b': 127}


def test_sweep_signature():
  # get_hyper(h) only takes the helper.
  for path in _sweep_files():
    assert list(inspect.signature(config_lib.load_module(path).get_hyper).parameters) == ['h']


# ------------------------------------------------------------------------------------------------
# validate_config and the command-line flag errors.
# ------------------------------------------------------------------------------------------------


def _task(config):
  return 'clipcrop' if 'run' in config else 'detection'


@pytest.mark.parametrize('path,arg', _cases())
def test_every_config_file_validates(path, arg, tmp_path):
  config = load_config(path, arg)
  config_validation.validate_config(config, str(tmp_path / 'new' / 'workdir'), task=_task(config))


def _tiny():
  return load_config(CONFIG_DIR / 'tiny.py')


@pytest.mark.parametrize(
    'field,value,expected',
    [
        ('run', 'trian', "run='trian': expected one of"),
        ('batch_size', -1, 'batch_size=-1: expected an integer >= 1'),
        ('batch_size', 0, 'batch_size=0: expected an integer >= 1'),
        ('num_train_steps', -1, 'no training length'),  # with num_epochs = 0 below
        ('checkpoint.every_steps', 0, 'checkpoint.every_steps=0'),
        ('checkpoint.keep', 0, 'checkpoint.keep=0'),
        ('checkpoint.data_resume', 'rewind', "checkpoint.data_resume='rewind'"),
        ('log_every_steps', 0, 'log_every_steps=0'),
        ('dtype', 'float16', "dtype='float16'"),
        ('optimizer.b2', 1.0, 'optimizer.b2=1.0: expected a number in [0, 1)'),
        ('optimizer.warmup_steps', 50, 'optimizer.warmup_steps=50: longer than num_train_steps=2'),
        ('optimizer.lr_multipliers', (('owlvit/(', 0.0),), 'optimizer.lr_multipliers='),
        ('dataset.mosaic_probs', (0.5, 0.6, 0.0), 'dataset.mosaic_probs='),
        ('dataset.max_crops', 0, 'dataset.max_crops=0'),
        ('dataset.data_dir', '/no/such/dir', "dataset.data_dir='/no/such/dir': no such directory"),
        ('init_from.clipcrop', '/no/such/run', "init_from.clipcrop='/no/such/run'"),
        ('loss.score_min', 5.0, 'loss.score_min=5.0: must be < loss.score_max=5.0'),
        (
            'loss.quality_loss',
            'ranknet',
            "loss.quality_loss='ranknet': expected one of ('smooth_l1', " "'pairwise', 'listwise')",
        ),
        (
            'loss.quality_target',
            'best',
            "loss.quality_target='best': expected one of ('matched', " "'iou', 'top_iou')",
        ),
        ('loss.quality_top_k', 0, 'loss.quality_top_k=0: expected an integer >= 1'),
        ('loss.quality_pointwise_weight', -0.1, 'loss.quality_pointwise_weight=-0.1: expected'),
        ('loss.quality_temperature', 0.0, 'loss.quality_temperature=0.0: expected a number > 0'),
        (
            'loss.matching_solver',
            'gpu',
            "loss.matching_solver='gpu': expected one of ('auto', " "'device', 'host')",
        ),
        ('sharding.mesh_shape', (-1, -1), 'sharding.mesh_shape=(-1, -1)'),
        ('sharding.rules', (('.*', 'shard_all'),), 'sharding.rules='),
        ('model.mode', 'fulll', "model: ClipCropConfig.mode='fulll'"),
        ('eval.baselines', ('full_image', 'oracle'), 'eval.baselines='),
        (
            'eval.datasets',
            (),
            'eval.datasets=(): expected (tfds name, split) pairs, at least one '
            "for run='train_and_eval'",
        ),
        (
            'dataset.keyword_pipeline',
            '',
            "dataset.keyword_pipeline='': expected a spaCy pipeline "
            "name, or 'rules' for the rule-based extractor",
        ),
    ],
)
def test_validate_config_names_the_bad_field(field, value, expected):
  config = _tiny()
  if field == 'num_train_steps':
    config.num_epochs = 0
  node = config
  *parents, leaf = field.split('.')
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(config_validation.ConfigError) as err:
    config_validation.validate_config(config)
  message = str(err.value)
  assert '\n' not in message and message.startswith('invalid config: ')
  assert expected in message


def test_validate_config_lists_every_problem_and_checks_detection():
  config = _tiny()
  config.batch_size, config.log_every_steps = -2, 0
  with pytest.raises(config_validation.ConfigError, match='batch_size=-2.*; log_every_steps=0'):
    config_validation.validate_config(config)
  det = default_config.get_detection_config()
  config_validation.validate_config(det, task='detection')
  det.loss.focal_alpha, det.dataset.label_templates = 1.5, ('a cat',)
  with pytest.raises(
      config_validation.ConfigError, match=r'label_templates=.*; loss.focal_alpha=1.5'
  ):
    config_validation.validate_config(det, task='detection')
  synthetic = load_config(CONFIG_DIR / 'synthetic.py')
  synthetic.pipeline.owlvit.batch_size = 0
  with pytest.raises(config_validation.ConfigError, match=r'pipeline\.owlvit\.batch_size=0'):
    config_validation.validate_config(synthetic)


def test_validate_config_synthetic_pipeline_uses_one_dataset():
  synthetic = load_config(CONFIG_DIR / 'synthetic.py', 'quick')
  synthetic.dataset.name = 'synthetic_crops/default'
  with pytest.raises(config_validation.ConfigError) as err:
    config_validation.validate_config(synthetic)
  assert str(err.value) == (
      "invalid config: pipeline.owlvit.dataset.name='synthetic_crops/small': expected the same "
      "as dataset.name='synthetic_crops/default'; eval.datasets=(('synthetic_crops/small', "
      "'ambiguity'),): expected one pair ('synthetic_crops/default', split) for the pipeline's "
      'evaluation'
  )


def test_validate_config_names_retired_fields():
  """Configs of older versions: `mode` (now `run`) and the embedded default's `quick`."""
  config = _tiny().to_dict()
  config['mode'] = config.pop('run')
  with pytest.raises(config_validation.ConfigError) as err:
    config_validation.validate_config(ml_collections.ConfigDict(config))
  assert str(err.value) == (
      'invalid config: config.mode was renamed to config.run (train | eval '
      '| train_and_eval | synthetic_pipeline)'
  )
  config = load_config(CONFIG_DIR / 'synthetic.py').to_dict()
  config['quick'] = True
  with pytest.raises(config_validation.ConfigError) as err:
    config_validation.validate_config(ml_collections.ConfigDict(config))
  assert str(err.value) == (
      'invalid config: config.quick was replaced by the config argument: '
      '--config=configs/synthetic.py:quick'
  )


def test_validate_config_workdir(tmp_path):
  config = _tiny()
  config_validation.validate_config(config, str(tmp_path))  # exists
  config_validation.validate_config(config, str(tmp_path / 'a' / 'b'))  # creatable
  (tmp_path / 'file').write_text('x')
  with pytest.raises(config_validation.ConfigError, match='exists and is not a directory'):
    config_validation.validate_config(config, str(tmp_path / 'file'))
  with pytest.raises(config_validation.ConfigError, match='cannot be created, .*file is a file'):
    config_validation.validate_config(config, str(tmp_path / 'file' / 'sub'))
  if os.geteuid() != 0:  # root may write anywhere
    locked = tmp_path / 'locked'
    locked.mkdir(mode=0o500)
    with pytest.raises(config_validation.ConfigError, match='is not writable'):
      config_validation.validate_config(config, str(locked / 'run'))


@pytest.mark.parametrize(
    'override,expected',
    [
        ('--config.foo=1', "--config.foo: the config has no field 'foo' (fields of the config: "),
        (
            '--config.optimizer.learning_rat=1.0',
            '--config.optimizer.learning_rat: config.optimizer '
            "has no field 'learning_rat' (did you mean learning_rate, end_learning_rate?)",
        ),
        ('--config.batch_size=abc', 'flag --config.batch_size=abc: invalid literal for int()'),
        (
            '--config.mode=eval',
            '--config.mode: config.mode was renamed to config.run (train | eval | '
            'train_and_eval | synthetic_pipeline); use --config.run=eval',
        ),
        (
            '--config.mode',
            '--config.mode: config.mode was renamed to config.run (train | eval | '
            'train_and_eval | synthetic_pipeline)',
        ),
        (
            '--config.quick=True',
            '--config.quick: config.quick was replaced by the config argument: '
            '--config=configs/synthetic.py:quick',
        ),
    ],
)
def test_flag_error_message_names_the_field(override, expected):
  config_file = 'synthetic.py' if 'quick' in override else 'tiny.py'
  argv = ['main', f'--config={CONFIG_DIR / config_file}', override]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file(
      'config', None, 'config', flag_values=fv, lock_config=True, sys_argv=argv
  )
  with pytest.raises(Exception) as err:  # pylint: disable=broad-except
    fv(argv)
  message = config_validation.flag_error_message(err.value, argv, fv)
  assert '\n' not in message and message.startswith(expected), message


def test_validation_names_match_the_modules_that_use_them():
  from clipcrop_jax import main  # pylint: disable=g-import-not-at-top
  from clipcrop_jax import sharding  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.training import matching  # pylint: disable=g-import-not-at-top

  assert default_config.SHARDING_KINDS == sharding.RULE_KINDS
  assert default_config.MATCHING_SOLVERS == matching.SOLVERS
  from clipcrop_jax import model  # pylint: disable=g-import-not-at-top

  assert default_config.SELECTION_UNIONS == tuple(model.SELECTION_UNIONS)
  assert main.RUNS == default_config.RUNS
