"""CPU/GPU benchmark: our jit-compiled OWL-ViT forward vs Hugging Face transformers, same run.

  python tools/benchmark_owlvit.py                      # B/32 @ 768, 5 interleaved rounds
  python tools/benchmark_owlvit.py --config tiny --rounds 3

Both models get random weights of the same architecture. Two measurements, interleaved A/B so that a
noisy machine hits both equally; medians and their ratio (HF time / our time, > 1 = we are faster):
  1. per image: one image + one text query, full detector forward;
  2. "10 queries asked in 10 separate calls" on one image: we encode the image once and then run
     only the text encoder + class head per call; HF runs its full forward per call.
Needs the `test` extra (torch, transformers). Threads: torch uses --threads (default: all cores);
XLA's CPU backend uses all cores too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

# torch's OpenMP workers busy-wait after every op by default and then steal the two cores that XLA's
# threads need, slowing *both* libraries in an interleaved run (measured: ours 0.71 -> 0.63 s, HF
# 0.79 -> 0.72 s with PASSIVE). Set before torch is imported; an explicit setting is respected.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import jax
import jax.numpy as jnp
import numpy as np

from clipcrop_jax.owlvit import configs
from clipcrop_jax.owlvit import heads
from clipcrop_jax.owlvit import model as model_lib
from clipcrop_jax.owlvit import tokenizer as tokenizer_lib

QUERIES = ['a cat', 'a dog', 'a remote control', 'a sofa', 'a person', 'a photo of a bird',
           'a red car', 'the sky', 'a tree', 'a lamp']


def _hf_model(cfg: configs.OwlViTConfig, threads: int):
  """Random-weight HF OwlViTForObjectDetection with the same architecture."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  hf_cls, cfg_cls = ((transformers.Owlv2ForObjectDetection, transformers.Owlv2Config)
                     if cfg.objectness else
                     (transformers.OwlViTForObjectDetection, transformers.OwlViTConfig))
  hf_cfg = cfg_cls(
      text_config=dict(hidden_size=cfg.text_width, num_attention_heads=cfg.text_heads,
                       num_hidden_layers=cfg.text_layers, intermediate_size=4 * cfg.text_width,
                       max_position_embeddings=cfg.max_query_length),
      vision_config=dict(hidden_size=cfg.vision_width, num_attention_heads=cfg.vision_heads,
                         num_hidden_layers=cfg.vision_layers,
                         intermediate_size=4 * cfg.vision_width, patch_size=cfg.patch_size,
                         image_size=cfg.image_size),
      projection_dim=cfg.embed_dim)
  return hf_cls(hf_cfg).eval()


def _time(fn, *args) -> float:
  t0 = time.perf_counter()
  fn(*args)
  return time.perf_counter() - t0


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='clip_b32')
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--threads', type=int, default=os.cpu_count())
  args = parser.parse_args()

  import torch  # pylint: disable=g-import-not-at-top
  cfg = configs.get_config(args.config)
  print(f'config {cfg.name}: {cfg.image_size} px, patch {cfg.patch_size}, backend '
        f'{jax.default_backend()}, {jax.device_count()} device(s), torch threads {args.threads}, '
        f'OMP_WAIT_POLICY={os.environ["OMP_WAIT_POLICY"]}, XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')

  module = model_lib.TextZeroShotDetectionModule(cfg)
  variables = model_lib.init_variables(cfg, seed=0)
  hf = _hf_model(cfg, args.threads)

  rng = np.random.default_rng(0)
  image = rng.random((1, cfg.image_size, cfg.image_size, 3), dtype=np.float32)
  tokens = tokenizer_lib.tokenize(QUERIES)  # (10, 16)
  pixel_values = torch.from_numpy(
      ((image - np.array(configs.IMAGE_MEAN)) / np.array(configs.IMAGE_STD))
      .astype(np.float32).transpose(0, 3, 1, 2))

  # --- ours ---
  forward = jax.jit(module.apply)

  @jax.jit
  def score_query(v, class_terms, q):
    """Per query: the text encoder and a (P, D) x (D,) product."""
    emb = model_lib.embed_texts(module, v, q)
    return heads.logits_from_image_terms(class_terms, emb, q[..., 0] > 0)

  x = jnp.asarray(image)
  q1 = jnp.asarray(tokens[None, :1])

  def ours_one():
    jax.block_until_ready(forward(variables, x, q1))

  def ours_ten():
    encoded = model_lib.encode_images(module, variables, x)  # once per image
    boxes = encoded['pred_boxes']
    outs = [score_query(variables, encoded['class_terms'], jnp.asarray(tokens[None, i:i + 1]))
            for i in range(10)]
    jax.block_until_ready((boxes, outs))

  # --- HF ---
  def hf_call(i):
    ids = torch.from_numpy(tokens[i:i + 1].astype(np.int64))
    with torch.inference_mode():
      hf(input_ids=ids, attention_mask=(ids > 0).long(), pixel_values=pixel_values)

  def hf_one():
    hf_call(0)

  def hf_ten():
    for i in range(10):
      hf_call(i)

  t0 = time.perf_counter()
  ours_one(), ours_ten()  # compile
  print(f'compile + first run (ours): {time.perf_counter() - t0:.1f} s')
  hf_one()  # warm-up

  res = {'ours_one': [], 'hf_one': [], 'ours_ten': [], 'hf_ten': []}
  for r in range(args.rounds):
    order = [('ours_one', ours_one), ('hf_one', hf_one)]
    order = order if r % 2 == 0 else order[::-1]
    for name, fn in order:
      res[name].append(_time(fn))
    order = [('ours_ten', ours_ten), ('hf_ten', hf_ten)]
    order = order if r % 2 == 0 else order[::-1]
    for name, fn in order:
      res[name].append(_time(fn))
    print(f'round {r}: ' + ', '.join(f'{k} {v[-1]:.3f}s' for k, v in res.items()), flush=True)

  med = {k: statistics.median(v) for k, v in res.items()}
  ratio_one = [h / o for h, o in zip(res['hf_one'], res['ours_one'])]
  ratio_ten = [h / o for h, o in zip(res['hf_ten'], res['ours_ten'])]
  print(f"per image:      ours {med['ours_one']:.3f} s ({1 / med['ours_one']:.2f} img/s), "
        f"HF {med['hf_one']:.3f} s ({1 / med['hf_one']:.2f} img/s), "
        f'median ratio HF/ours {statistics.median(ratio_one):.2f}x')
  print(f"10 calls/image: ours {med['ours_ten']:.3f} s, HF {med['hf_ten']:.3f} s, "
        f'median ratio HF/ours {statistics.median(ratio_ten):.2f}x')


if __name__ == '__main__':
  main()
