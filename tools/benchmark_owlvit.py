"""CPU/GPU benchmark: our jit-compiled OWL-ViT forward vs Hugging Face transformers, same run.

  python tools/benchmark_owlvit.py                      # B/32 @ 768, 5 interleaved rounds
  python tools/benchmark_owlvit.py --config tiny --rounds 3
  python tools/benchmark_owlvit.py --device cuda --repeats 20            # GPU (HF on CUDA)
  python tools/benchmark_owlvit.py --device cuda --repeats 20 --dtype bfloat16

Both models get random weights of the same architecture. Two measurements, interleaved A/B so that a
noisy machine hits both equally; medians and their ratio (HF time / our time, > 1 = we are faster):
  1. per image: one image + one text query, full detector forward;
  2. "10 queries asked in 10 separate calls" on one image: we encode the image once and then run
     only the text encoder + class head per call; HF runs its full forward per call.
Needs the `test` extra (torch, transformers). Threads: torch uses --threads (default: all cores);
XLA's CPU backend uses all cores too.

GPU (`--device cuda`, the default when torch sees a CUDA device): HF runs on torch's CUDA device
and every timed HF call ends with `torch.cuda.synchronize()`; ours ends with
`jax.block_until_ready` as on CPU. `--repeats N` times N back-to-back calls per sample (reported
per call), useful when one call takes milliseconds. float32 matmuls: JAX on a recent GPU uses TF32
by default, so HF gets TF32 too (`--f32_matmul tf32`, default); `--f32_matmul highest` makes both
full float32. `--dtype bfloat16`: our modules compute in bfloat16 (parameters float32), HF runs
under `torch.autocast(bfloat16)`.
"""

from __future__ import annotations

import argparse
import contextlib
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

QUERIES = [
    'a cat',
    'a dog',
    'a remote control',
    'a sofa',
    'a person',
    'a photo of a bird',
    'a red car',
    'the sky',
    'a tree',
    'a lamp',
]


def _hf_model(cfg: configs.OwlViTConfig, threads: int, device: str = 'cpu'):
  """Random-weight HF OwlViTForObjectDetection with the same architecture, on `device`."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  hf_cls, cfg_cls = (
      (transformers.Owlv2ForObjectDetection, transformers.Owlv2Config)
      if cfg.objectness
      else (transformers.OwlViTForObjectDetection, transformers.OwlViTConfig)
  )
  hf_cfg = cfg_cls(
      text_config=dict(
          hidden_size=cfg.text_width,
          num_attention_heads=cfg.text_heads,
          num_hidden_layers=cfg.text_layers,
          intermediate_size=4 * cfg.text_width,
          max_position_embeddings=cfg.max_query_length,
      ),
      vision_config=dict(
          hidden_size=cfg.vision_width,
          num_attention_heads=cfg.vision_heads,
          num_hidden_layers=cfg.vision_layers,
          intermediate_size=4 * cfg.vision_width,
          patch_size=cfg.patch_size,
          image_size=cfg.image_size,
      ),
      projection_dim=cfg.embed_dim,
  )
  return hf_cls(hf_cfg).eval().to(device)


def _time(fn, *args, repeats: int = 1) -> float:
  """Seconds per call of `fn(*args)`, over `repeats` back-to-back calls."""
  t0 = time.perf_counter()
  for _ in range(repeats):
    fn(*args)
  return (time.perf_counter() - t0) / repeats


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='clip_b32')
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--threads', type=int, default=os.cpu_count())
  parser.add_argument(
      '--device',
      choices=['auto', 'cpu', 'cuda'],
      default='auto',
      help="torch device for HF; auto: 'cuda' when torch sees one, else 'cpu'",
  )
  parser.add_argument(
      '--repeats',
      type=int,
      default=1,
      help='back-to-back calls per timed sample (times are per call)',
  )
  parser.add_argument(
      '--dtype',
      choices=['float32', 'bfloat16'],
      default='float32',
      help='ours: module compute dtype; HF: torch.autocast dtype (bfloat16)',
  )
  parser.add_argument(
      '--f32_matmul',
      choices=['tf32', 'highest'],
      default='tf32',
      help='CUDA only: float32 matmul precision of both (JAX default = TF32)',
  )
  args = parser.parse_args()

  import torch  # pylint: disable=g-import-not-at-top

  device = args.device
  if device == 'auto':
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
  precision = ''
  if device == 'cuda':
    if args.f32_matmul == 'highest':
      jax.config.update('jax_default_matmul_precision', 'highest')
    torch.set_float32_matmul_precision('high' if args.f32_matmul == 'tf32' else 'highest')
    torch.backends.cudnn.allow_tf32 = args.f32_matmul == 'tf32'
    precision = (
        f', f32 matmuls {args.f32_matmul} (jax_default_matmul_precision='
        f'{getattr(jax.config, "jax_default_matmul_precision", "?")}, torch '
        f'{torch.get_float32_matmul_precision()}), torch device '
        f'{torch.cuda.get_device_name()}, jax device {jax.devices()[0].device_kind}'
    )
  cfg = configs.get_config(args.config)
  if cfg.embed_dim != cfg.text_width:
    # HF's class head projects to the text width, so it cannot express embed_dim != text_width
    # (the `tiny` configs); benchmark both with embed_dim = text_width instead.
    print(
        f'note: {cfg.name} has embed_dim {cfg.embed_dim} != text_width {cfg.text_width}, which '
        f'HF cannot express; using embed_dim {cfg.text_width} for both'
    )
    cfg = cfg.replace(embed_dim=cfg.text_width)
  print(
      f'config {cfg.name}: {cfg.image_size} px, patch {cfg.patch_size}, backend '
      f'{jax.default_backend()}, {jax.device_count()} device(s), torch threads {args.threads}, '
      f'OMP_WAIT_POLICY={os.environ["OMP_WAIT_POLICY"]}, XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}'
      + (
          f', HF on {device}, dtype {args.dtype}, {args.repeats} call(s) per sample{precision}'
          if (device, args.dtype, args.repeats) != ('cpu', 'float32', 1)
          else ''
      )
  )
  if device == 'cuda' and jax.default_backend() != 'gpu':
    print(f'WARNING: HF runs on CUDA but JAX on {jax.default_backend()}')

  dtype = jnp.dtype(args.dtype)
  module = (
      model_lib.TextZeroShotDetectionModule(cfg)
      if dtype == jnp.float32
      else model_lib.TextZeroShotDetectionModule(cfg, dtype=dtype)
  )
  variables = model_lib.init_variables(cfg, seed=0)
  hf = _hf_model(cfg, args.threads, device)
  sync = torch.cuda.synchronize if device == 'cuda' else lambda: None
  if device != 'cpu':
    print(
        f'HF {type(hf).__name__}: attention {getattr(hf.config, "_attn_implementation", "?")}, '
        f'{sum(p.numel() for p in hf.parameters()) / 1e6:.1f}M params on {device}'
    )
  autocast = (
      (lambda: torch.autocast(device, dtype=torch.bfloat16))
      if args.dtype == 'bfloat16'
      else contextlib.nullcontext
  )

  rng = np.random.default_rng(0)
  image = rng.random((1, cfg.image_size, cfg.image_size, 3), dtype=np.float32)
  tokens = tokenizer_lib.tokenize(QUERIES)  # (10, 16)
  pixel_values = torch.from_numpy(
      ((image - np.array(configs.IMAGE_MEAN)) / np.array(configs.IMAGE_STD))
      .astype(np.float32)
      .transpose(0, 3, 1, 2)
  ).to(device)

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
    outs = [
        score_query(variables, encoded['class_terms'], jnp.asarray(tokens[None, i : i + 1]))
        for i in range(10)
    ]
    jax.block_until_ready((boxes, outs))

  # --- HF ---
  def hf_call(i):
    ids = torch.from_numpy(tokens[i : i + 1].astype(np.int64)).to(device)
    with torch.inference_mode(), autocast():
      hf(input_ids=ids, attention_mask=(ids > 0).long(), pixel_values=pixel_values)

  def hf_one():
    hf_call(0)
    sync()

  def hf_ten():
    for i in range(10):
      hf_call(i)
    sync()

  t0 = time.perf_counter()
  ours_one(), ours_ten()  # compile
  print(f'compile + first run (ours): {time.perf_counter() - t0:.1f} s')
  hf_one()  # warm-up
  if device == 'cuda':  # cuDNN/cuBLAS autotuning, lazy CUDA module loading, the 10-call path
    for _ in range(2):
      hf_ten()
      ours_one(), ours_ten()

  tfmt = '.3f' if device == 'cpu' else '.5f'  # GPU calls take milliseconds
  res = {'ours_one': [], 'hf_one': [], 'ours_ten': [], 'hf_ten': []}
  for r in range(args.rounds):
    order = [('ours_one', ours_one), ('hf_one', hf_one)]
    order = order if r % 2 == 0 else order[::-1]
    for name, fn in order:
      res[name].append(_time(fn, repeats=args.repeats))
    order = [('ours_ten', ours_ten), ('hf_ten', hf_ten)]
    order = order if r % 2 == 0 else order[::-1]
    for name, fn in order:
      res[name].append(_time(fn, repeats=args.repeats))
    print(f'round {r}: ' + ', '.join(f'{k} {v[-1]:{tfmt}}s' for k, v in res.items()), flush=True)

  med = {k: statistics.median(v) for k, v in res.items()}
  ratio_one = [h / o for h, o in zip(res['hf_one'], res['ours_one'])]
  ratio_ten = [h / o for h, o in zip(res['hf_ten'], res['ours_ten'])]
  print(
      f"per image:      ours {med['ours_one']:{tfmt}} s ({1 / med['ours_one']:.2f} img/s), "
      f"HF {med['hf_one']:{tfmt}} s ({1 / med['hf_one']:.2f} img/s), "
      f'median ratio HF/ours {statistics.median(ratio_one):.2f}x'
  )
  print(
      f"10 calls/image: ours {med['ours_ten']:{tfmt}} s, HF {med['hf_ten']:{tfmt}} s, "
      f'median ratio HF/ours {statistics.median(ratio_ten):.2f}x'
  )
  # One machine-readable line for tools/gpu_check.sh's table: RESULT|what|value|unit|baseline.
  print(
      f"RESULT|OWL-ViT {cfg.name} forward, batch 1, {args.dtype}|{med['ours_one'] * 1e3:.2f}|"
      f"ms/image|HF {med['hf_one'] * 1e3:.2f} ms ({statistics.median(ratio_one):.2f}x)"
  )


if __name__ == '__main__':
  main()
