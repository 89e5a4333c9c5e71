r"""The paper's ablations on GAIC, a sweep over configs/gaic_b32.py: 4 modes x 2 seeds + no-mosaic.

  python tools/launch_sweep.py configs/gaic_ablation_sweep.py --workdir_root=WORK  # 9 commands
  python tools/launch_sweep.py configs/gaic_ablation_sweep.py --workdir_root=WORK \
      --launch --parallel=1 -- \
      --config.init_from.owlvit=/path/clip_vit_b32_b0203fc8 --config.dataset.data_dir=DATA

Runs (workdir WORK/<name>): mode=<base|main|key|full>,seed=<0|1> and
mode=full,mosaic_probs=1-0-0,seed=0 (no mosaic augmentation). `h` is
`clipcrop_jax.experiments.sweeps.Hyper`.
"""

BASE_CONFIG = 'gaic_b32.py'
MODES = ('base', 'main', 'key', 'full')
SEEDS = (0, 1)


def get_hyper(h):
  return h.chainit(
      [
          h.product(
              [h.sweep('config.model.mode', list(MODES)), h.sweep('config.seed', list(SEEDS))]
          ),
          h.product(
              [
                  h.fixed('config.model.mode', 'full'),
                  h.fixed('config.dataset.mosaic_probs', (1.0, 0.0, 0.0)),
                  h.fixed('config.seed', 0),
              ]
          ),
      ]
  )
