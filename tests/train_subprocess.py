"""Sharding equivalence of the train step, run by tests/test_train.py in its own process.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
      python tests/train_subprocess.py <output.npz>

Builds the tiny ClipCrop train state on three meshes (1 device; 8 devices data-parallel; a (4, 2)
mesh whose OWL-ViT kernels are sharded over 'model'), runs 2 train steps (jitted exactly as
`trainer.train` does) on the same deterministic batch and writes the losses and the params
(initial, after each step) of every mesh to the .npz file.
"""

from __future__ import annotations

import pathlib
import sys
import time

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
BATCH = 8
NUM_STEPS = 2


def tiny_config():
  """configs/tiny.py with an optimizer whose update is a smooth function of the gradient.

  Adam's first updates are ~lr * sign(g): a gradient at rounding-noise level (~1e-9) would flip
  sign between meshes and move its parameter by 2 lr. With eps=1 and no clipping the update is
  ~lr * g, so parameters differ by ~lr * (gradient rounding) and a real mismatch (wrong batch
  split, wrong reduction, wrong sharded update) still shows up far above the tolerance.
  """
  from clipcrop_jax import config_lib  # pylint: disable=g-import-not-at-top

  config = config_lib.load_config_file(REPO / 'configs' / 'tiny.py')
  config.optimizer.update(learning_rate=1e-2, end_learning_rate=1e-2, eps=1.0, grad_clip_norm=0.0)
  # A random decoder predicts near-duplicate boxes: their matching costs then tie up to the
  # quality term, and 1e-7 of quality noise would swap which of them is matched (a discontinuity,
  # not a sharding effect). Without the quality cost the tie breaks by index on every mesh.
  config.loss.cost_quality = 0.0
  return config


def make_batch(image_size: int, max_crops: int, max_queries: int, seed: int = 0):
  """A deterministic, valid TRAIN_KEYS batch of numpy arrays."""
  rng = np.random.default_rng(seed)
  image = rng.uniform(-1, 1, (BATCH, image_size, image_size, 3)).astype(np.float32)
  extent = np.ones((BATCH, 2), np.float32)
  extent[np.arange(BATCH), rng.integers(0, 2, BATCH)] = rng.uniform(0.5, 1.0, BATCH)
  lo = rng.uniform(0.0, 0.5, (BATCH, max_crops, 2)) * extent[:, None]
  hi = lo + rng.uniform(0.1, 0.5, (BATCH, max_crops, 2)) * extent[:, None]
  crops = np.concatenate([lo, np.minimum(hi, extent[:, None])], -1).astype(np.float32)
  scores = rng.uniform(1.0, 5.0, (BATCH, max_crops)).astype(np.float32)
  num_real = rng.integers(4, max_crops + 1, BATCH)
  mask = np.arange(max_crops)[None] < num_real[:, None]
  crops = np.where(mask[..., None], crops, 0.0).astype(np.float32)
  scores = np.where(mask, scores, 0.0).astype(np.float32)
  text = np.zeros((BATCH, max_queries, 16), np.int32)
  for b in range(BATCH):
    for q in range(int(rng.integers(1, max_queries + 1))):
      n = int(rng.integers(2, 8))
      text[b, q, :n] = rng.integers(1, 49000, n)
      text[b, q, n - 1] = 49407  # end of text
  return dict(
      image=image,
      crops=crops,
      crop_scores=scores,
      crop_mask=mask,
      image_extent=extent,
      text_queries=text,
  )


def run_on_mesh(config, mesh, batch_np):
  from clipcrop_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.training import clipcrop_task  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.training import trainer  # pylint: disable=g-import-not-at-top

  task = clipcrop_task.ClipCropTask(config)
  setup = trainer.setup_state(task, mesh, 4)
  state = trainer.fresh_state(task, setup)
  init_params = jax.device_get(state.params)
  step_fn = trainer.make_step_fn(task, setup, mesh)
  batch = {k: jax.device_put(v, sharding_lib.batch_sharding(mesh)) for k, v in batch_np.items()}
  losses, after = [], []
  for _ in range(NUM_STEPS):
    t = time.time()
    state, metrics = step_fn(state, batch)
    losses.append(float(metrics['loss']))
    after.append(jax.device_get(state.params))
    print(f'step {len(losses)}: {time.time() - t:.1f} s', flush=True)
  specs = {
      sharding_lib.path_str(p): str(leaf.sharding.spec)
      for p, leaf in jax.tree_util.tree_leaves_with_path(state.params)
  }
  return init_params, after, np.asarray(losses), specs


def main(out_path: str) -> None:
  jax.config.update('jax_default_matmul_precision', 'highest')
  from clipcrop_jax import default_config  # pylint: disable=g-import-not-at-top
  from clipcrop_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top

  assert jax.device_count() == 8, jax.devices()
  config = tiny_config()
  owl = default_config.clipcrop_config(config).owlvit_config
  batch = make_batch(owl.image_size, 12, config.dataset.max_queries)
  sharded = tiny_config()
  sharded.sharding.update(
      mesh_shape=(4, 2), rules=(('owlvit/.*kernel', 'shard_largest'), ('.*', 'replicate'))
  )
  runs = {
      'one': (config, sharding_lib.make_mesh((1, 1), jax.devices()[:1])),
      'data8': (config, sharding_lib.make_mesh((-1, 1))),
      'model2': (sharded, sharding_lib.make_mesh(sharded.sharding.mesh_shape)),
  }
  out = {}
  for name, (cfg, mesh) in runs.items():
    init_params, after, losses, specs = run_on_mesh(cfg, mesh, batch)
    out[f'{name}/losses'] = losses
    out[f'{name}/num_model_sharded'] = np.asarray(sum('model' in s for s in specs.values()))
    for i, params in enumerate(after):
      out.update(
          {
              f'{name}/step{i + 1}/{sharding_lib.path_str(p)}': np.asarray(v)
              for p, v in jax.tree_util.tree_leaves_with_path(params)
          }
      )
    flat0 = {
        sharding_lib.path_str(p): np.asarray(v)
        for p, v in jax.tree_util.tree_leaves_with_path(init_params)
    }
    out.update({f'{name}/init/{k}': v for k, v in flat0.items()})
    print(name, dict(mesh.shape), losses, flush=True)
  np.savez(out_path, **out)


if __name__ == '__main__':
  main(sys.argv[1])
