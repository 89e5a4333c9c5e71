"""One process of the multi-host training test (`tests/test_multihost.py`).

  python tests/multihost_worker.py --out DIR [--port P --num_processes N --process_id I]
      [--devices_per_process D] [--steps 3] [--batch 8]

Without --port the run is single-process (the reference). With it, the process joins a
`jax.distributed` job on localhost:P (CPU collectives over gloo) and feeds only its part of the
fixed global batch through `jax.make_array_from_process_local_data`. The tiny ClipCrop state is
built and stepped exactly as `trainer.train` does (same shardings, jit, donation). Process 0
writes `DIR/result.npz` (final params, flattened by path, and per-step losses); every process
writes `DIR/done_<i>.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--out', required=True)
  parser.add_argument('--port', type=int, default=0)
  parser.add_argument('--num_processes', type=int, default=1)
  parser.add_argument('--process_id', type=int, default=0)
  parser.add_argument('--devices_per_process', type=int, default=1)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--batch', type=int, default=8)
  args = parser.parse_args()

  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_num_cpu_devices', args.devices_per_process)
  jax.config.update('jax_default_matmul_precision', 'highest')
  if args.port:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(
        coordinator_address=f'localhost:{args.port}',
        num_processes=args.num_processes,
        process_id=args.process_id,
        initialization_timeout=120,
    )
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from clipcrop_jax import config_lib  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from clipcrop_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.training import clipcrop_task  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.training import trainer  # pylint: disable=g-import-not-at-top

  pid, nproc = jax.process_index(), jax.process_count()
  assert nproc == args.num_processes, (nproc, args.num_processes)
  assert jax.local_device_count() == args.devices_per_process
  assert jax.device_count() == args.num_processes * args.devices_per_process

  config = config_lib.load_config_file(ROOT / 'configs' / 'tiny.py')
  config.batch_size = args.batch
  config.num_train_steps = args.steps
  task = clipcrop_task.ClipCropTask(config)
  mesh = sharding_lib.make_mesh(config.sharding.mesh_shape)
  setup = trainer.setup_state(task, mesh, args.steps)
  state = trainer.fresh_state(task, setup)
  step_fn = trainer.make_step_fn(task, setup, mesh)

  size = task.model.config.owlvit_config.image_size
  full = input_pipeline.random_batch(
      args.batch, size, config.dataset.max_crops, config.dataset.max_queries
  )
  per = args.batch // nproc
  local = {k: v[pid * per : (pid + 1) * per] for k, v in full.items()}
  batch_sharding = sharding_lib.batch_sharding(mesh)
  batch = {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local.items()}
  # Process i's rows must land at rows [i*per, (i+1)*per) of the global array (mesh order).
  gathered = multihost_utils.process_allgather(batch, tiled=True) if nproc > 1 else batch
  for k, v in full.items():
    np.testing.assert_array_equal(np.asarray(gathered[k]), v, err_msg=k)

  losses = []
  for _ in range(args.steps):
    state, metrics = step_fn(state, batch)
    losses.append(float(jax.device_get(metrics['loss'])))
  params = (
      multihost_utils.process_allgather(state.params, tiled=True)
      if nproc > 1
      else (jax.device_get(state.params))
  )
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  if pid == 0:
    flat = {
        sharding_lib.path_str(p): np.asarray(v)
        for p, v in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    np.savez(out / 'result.npz', losses=np.asarray(losses, np.float64), **flat)
  (out / f'done_{pid}.json').write_text(
      json.dumps(
          dict(
              process=pid,
              processes=nproc,
              devices=jax.device_count(),
              step=int(jax.device_get(state.step)),
              losses=losses,
          )
      )
  )
  if args.port:
    jax.distributed.shutdown()


if __name__ == '__main__':
  main()
