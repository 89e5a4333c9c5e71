r"""Load test of the crop service on loopback: K concurrent clients for a bounded time.

  python tools/load_test.py                       # tiny random model, 8 clients, 10 s a scenario
  python tools/load_test.py --model clip_b32 --clients 8 --duration 30

Starts `python -m clipcrop_jax.serve --random-init MODEL` on 127.0.0.1 (a free port) once per
server setting and runs, in one go:
  batching off / cold   --max-batch 1, every request a new image (the baseline)
  batching on  / cold   --max-batch N --batch-wait-ms T, every request a new image
  batching on  / hit    the same image every time (encoding cache), texts rotating
  overload              2x overload: 2 * max_queue clients against --max-queue max_queue
"Cold" images are one JPEG whose bytes differ by a comment segment: the service hashes the
bytes, so each is a cache miss and is decoded and encoded in full. Prints, per scenario:
throughput (answers/s), p50/p95/p99 latency of the answers, 503s, errors (other statuses,
transport errors) and the throughput ratio to the baseline of the same run.
"""

from __future__ import annotations

import argparse
import io
import itertools
import pathlib
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
from PIL import Image

from clipcrop_jax.serving import testing as serve_testing

REPO = pathlib.Path(__file__).resolve().parents[1]
TEXTS = ('a red square', 'the blue disc', 'green grass under a blue sky', 'a red square and a disc')


def _photo(width: int, height: int) -> bytes:
  """A JPEG of a simple scene (sky, grass, a red square, a blue disc) with some texture."""
  rng = np.random.default_rng(0)
  img = np.zeros((height, width, 3), np.uint8)
  img[:] = (135, 190, 235)
  img[int(height * 0.65) :] = (70, 150, 60)
  img[height // 3 : height * 2 // 3, width // 10 : width // 3] = (210, 30, 40)
  yy, xx = np.mgrid[:height, :width]
  img[(yy - height * 0.4) ** 2 + (xx - width * 0.7) ** 2 < (height * 0.2) ** 2] = (30, 60, 200)
  img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
  out = io.BytesIO()
  Image.fromarray(img).save(out, 'JPEG', quality=90)
  return out.getvalue()


def _unique(jpeg: bytes, n: int) -> bytes:
  """`jpeg` with a comment segment holding `n`: other bytes, the same pixels."""
  comment = f'load-test {n}'.encode()
  return jpeg[:2] + b'\xff\xfe' + (len(comment) + 2).to_bytes(2, 'big') + comment + jpeg[2:]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class Server:
  """`python -m clipcrop_jax.serve` in a subprocess, ready (warmed up) on entry."""

  def __init__(self, model: str, flags: list[str]):
    self.port = _free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self.argv = [
        sys.executable,
        '-m',
        'clipcrop_jax.serve',
        '--random-init',
        model,
        '--port',
        str(self.port),
        '--keyword-pipeline',
        'rules',
        '--log-level',
        'warning',
    ] + flags

  def __enter__(self) -> 'Server':
    self.proc = subprocess.Popen(self.argv, cwd=REPO)
    serve_testing.wait_until_ready(self.url, lambda: self.proc.poll() is None)
    return self

  def __exit__(self, *exc) -> None:
    self.proc.terminate()
    try:
      self.proc.wait(60)
    except subprocess.TimeoutExpired:
      self.proc.kill()


def run_clients(url: str, clients: int, duration: float, image_for) -> dict:
  """`clients` threads posting back to back for `duration` seconds; their statistics."""
  latencies, statuses, errors = [], [], []
  lock = threading.Lock()
  counter = itertools.count()
  stop_at = time.monotonic() + duration

  def client():
    with httpx.Client(timeout=120) as http:
      while time.monotonic() < stop_at:
        n = next(counter)
        started = time.perf_counter()
        try:
          r = http.post(
              url + '/v1/crops',
              files={'image': ('photo.jpg', image_for(n))},
              data={'text': TEXTS[n % len(TEXTS)], 'top_k': '3'},
          )
        except httpx.HTTPError as e:
          with lock:
            errors.append(f'{type(e).__name__}: {e}')
          continue
        elapsed = time.perf_counter() - started
        with lock:
          statuses.append(r.status_code)
          if r.status_code == 200 and 'crops' in r.json():
            latencies.append(elapsed)
          elif r.status_code != 503:
            errors.append(f'{r.status_code}: {r.text[:100]}')
        if r.status_code == 503:
          time.sleep(0.01)  # a real client would wait Retry-After; keep the pressure on

  started = time.monotonic()
  threads = [threading.Thread(target=client) for _ in range(clients)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  wall = time.monotonic() - started
  ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
  return {
      'answers': len(latencies),
      'throughput': len(latencies) / wall,
      'p50': np.percentile(ms, 50),
      'p95': np.percentile(ms, 95),
      'p99': np.percentile(ms, 99),
      '503': statuses.count(503),
      'errors': len(errors),
      'first_error': errors[0] if errors else '',
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--model', default='tiny', help="'tiny' or an OWL-ViT config (clip_b32)")
  parser.add_argument('--clients', type=int, default=8)
  parser.add_argument('--duration', type=float, default=10.0, help='seconds per scenario')
  parser.add_argument('--max-batch', type=int, default=8)
  parser.add_argument('--batch-wait-ms', type=float, default=5.0)
  parser.add_argument('--max-queue', type=int, default=8, help='of the overload scenario')
  parser.add_argument('--image-size', default='900x600', help='WxH of the uploaded JPEG')
  args = parser.parse_args(argv)
  width, height = (int(v) for v in args.image_size.split('x'))
  jpeg = _photo(width, height)
  cold = lambda n: _unique(jpeg, n)  # pylint: disable=unnecessary-lambda-assignment
  hit = lambda n: jpeg  # pylint: disable=unnecessary-lambda-assignment
  batching = ['--max-batch', str(args.max_batch), '--batch-wait-ms', str(args.batch_wait_ms)]
  rows = []
  print(
      f'model {args.model}, {args.clients} clients, {args.duration:g} s per scenario, '
      f'{width}x{height} JPEG uploads',
      flush=True,
  )
  with Server(args.model, ['--max-batch', '1']) as server:
    rows.append(('batching off / cold', run_clients(server.url, args.clients, args.duration, cold)))
  with Server(args.model, batching) as server:
    rows.append(('batching on / cold', run_clients(server.url, args.clients, args.duration, cold)))
    rows.append(('batching on / hit', run_clients(server.url, args.clients, args.duration, hit)))
  with Server(args.model, batching + ['--max-queue', str(args.max_queue)]) as server:
    rows.append(
        (
            f'overload 2x ({2 * args.max_queue} clients, max_queue {args.max_queue}), cold',
            run_clients(server.url, 2 * args.max_queue, args.duration, cold),
        )
    )
  base = rows[0][1]['throughput']
  print('\n| scenario | answers/s | vs baseline | p50 ms | p95 ms | p99 ms | 503 | errors |')
  print('|---|---|---|---|---|---|---|---|')
  for name, r in rows:
    print(
        f"| {name} | {r['throughput']:.1f} | {r['throughput'] / base:.2f}x | {r['p50']:.0f} | "
        f"{r['p95']:.0f} | {r['p99']:.0f} | {r['503']} | {r['errors']} |"
    )
  for name, r in rows:
    if r['errors']:
      print(f"{name}: first error: {r['first_error']}")
  return 1 if any(r['errors'] for _, r in rows) else 0


if __name__ == '__main__':
  sys.exit(main())
