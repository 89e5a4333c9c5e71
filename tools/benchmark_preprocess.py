"""Preprocessing time and peak memory: the old padded-square path vs the bounded paths.

  python tools/benchmark_preprocess.py                      # 12 MP JPEG + 10000x20 PNG, size 768
  python tools/benchmark_preprocess.py --before-timeout 0   # let the old path finish (minutes)
  python tools/benchmark_preprocess.py --size 960 --repeats 9 --skip-before

Two images are written to a temporary folder: a 4000 x 3000 JPEG (q90, photo-like: smooth colour
gradients, blurred blobs, fine noise) and a 10000 x 20 PNG. For each (image, path) pair a fresh
interpreter imports only clipcrop_jax/owlvit/preprocessing.py (numpy, Pillow, scipy; no jax),
records its RSS after the imports, then runs the path 1 + `--repeats` times. Reported:

* time: median of the `--repeats` warm calls (the first call is printed separately);
* peak: the child's peak RSS (VmHWM, polled from /proc by this process) minus its post-import RSS;
  ru_maxrss cannot be used because after fork + exec it starts at the parent's peak;
* max|d|: largest pixel difference to the exact result (values in [0, 1]).

Paths:

* before: the code before the fix, i.e. `load_image` (with its EXIF copy) and the padded reference:
  a max(H, W)^2 float32 square, Gaussian filter, zoom. Killed after `--before-timeout` seconds
  (then time and peak are lower bounds, marked '>').
* fast (path): `load_for_model(path, size)`, what `ClipCropper` uses for files: JPEG DCT-scaled
  decoding + cells. Target for the 12 MP JPEG on 2 cores: <= 0.15 s and <= 300 MB.
* fast (array): `preprocess(load_image(path), size)`, for callers that need the full image anyway.
* exact (array): `preprocess(load_image(path), size, exact=True)`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

PREPROCESSING_PY = (
    pathlib.Path(__file__).resolve().parent.parent / "clipcrop_jax" / "owlvit" / "preprocessing.py"
)

PATHS = ("before", "fast (path)", "fast (array)", "exact (array)")

_CHILD = r"""
import importlib.util, json, sys, time
spec = importlib.util.spec_from_file_location("preprocessing", sys.argv[1])
pp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pp)
import numpy as np
from PIL import Image, ImageOps
Image.init()
which, path, size, repeats = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])

def old_load(p):  # load_image as it was: exif_transpose always copies.
  with Image.open(p) as img:
    img.load()
    return pp._pil_to_uint8_rgb(ImageOps.exif_transpose(img), p)

calls = {
    "before": lambda: pp._colab_padded_reference(old_load(path), size, 0.5),
    "fast (path)": lambda: pp.load_for_model(path, size, max_pixels=10**9)[0],
    "fast (array)": lambda: pp.preprocess(pp.load_image(path, max_pixels=10**9), size),
    "exact (array)": lambda: pp.preprocess(pp.load_image(path, max_pixels=10**9), size, exact=True),
}
status = open("/proc/self/status").read()
print(json.dumps({"base_kib": int(status.split("VmRSS:")[1].split()[0])}), flush=True)
times = []
for i in range(1 + repeats):
  t0 = time.perf_counter()
  out = calls[which]()
  times.append(time.perf_counter() - t0)
  print(json.dumps({"time": times[-1]}), flush=True)
  if i == 0:
    np.save(sys.argv[6], out)
"""


def _vm_hwm_kib(pid: int) -> int | None:
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1])
  except OSError:
    pass
  return None


def measure(
    which: str, image: pathlib.Path, size: int, repeats: int, timeout: float, out_npy: pathlib.Path
) -> dict:
  """Runs one path in a fresh interpreter; returns times, peak MiB and whether it was killed."""
  proc = subprocess.Popen(
      [
          sys.executable,
          "-c",
          _CHILD,
          str(PREPROCESSING_PY),
          which,
          str(image),
          str(size),
          str(repeats),
          str(out_npy),
      ],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )
  start, peak_kib, killed = time.monotonic(), 0, False
  while proc.poll() is None:
    peak_kib = max(peak_kib, _vm_hwm_kib(proc.pid) or 0)
    if timeout and time.monotonic() - start > timeout:
      proc.kill()
      killed = True
      break
    time.sleep(0.02)
  stdout, stderr = proc.communicate()
  if proc.returncode not in (0, None) and not killed:
    raise RuntimeError(f"{which} on {image.name} failed:\n{stderr}")
  records = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
  base_kib = records[0]["base_kib"] if records else 0
  times = [r["time"] for r in records if "time" in r]
  return {
      "first": times[0] if times else time.monotonic() - start,
      "median": statistics.median(times[1:]) if len(times) > 1 else None,
      "peak_mib": (peak_kib - base_kib) / 1024,
      "killed": killed,
      "output": np.load(out_npy) if out_npy.exists() else None,
  }


def write_images(folder: pathlib.Path) -> dict[str, pathlib.Path]:
  """A 12 MP photo-like JPEG and a 10000 x 20 PNG."""
  rng = np.random.default_rng(0)
  h, w = 3000, 4000
  yy = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
  xx = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
  base = 60 + 120 * yy + 60 * xx * np.float32([1.0, 0.6, 0.2])
  blobs = rng.integers(0, 256, (h // 100, w // 100, 3), dtype=np.uint8)
  blobs = np.asarray(Image.fromarray(blobs).resize((w, h), Image.BICUBIC), np.float32)
  detail = rng.normal(0, 6, (h // 2, w // 2, 1)).astype(np.float32).repeat(2, 0).repeat(2, 1)
  photo = np.clip(0.5 * base + 0.5 * blobs + detail, 0, 255).astype(np.uint8)
  jpeg = folder / "photo_4000x3000.jpg"
  Image.fromarray(photo).save(jpeg, quality=90)
  thin = rng.integers(0, 256, (20, 10000, 3), dtype=np.uint8)
  png = folder / "thin_10000x20.png"
  Image.fromarray(thin).save(png)
  return {"12 MP JPEG 4000x3000": jpeg, "PNG 10000x20": png}


def _fmt_time(result: dict) -> str:
  if result["killed"]:
    return f"> {result['first']:.0f} s"
  value = result["median"] if result["median"] is not None else result["first"]
  return f"{value:.3f} s"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", type=int, default=768, help="model input side (768 for B/32)")
  parser.add_argument("--repeats", type=int, default=5, help="warm calls per measurement")
  parser.add_argument(
      "--before-repeats",
      type=int,
      default=0,
      help="warm calls of the slow 'before' path (its first call is always timed)",
  )
  parser.add_argument(
      "--before-timeout",
      type=float,
      default=60.0,
      help="seconds before a 'before' run is killed (0: no limit)",
  )
  parser.add_argument("--skip-before", action="store_true", help="do not run the old path")
  args = parser.parse_args(argv)
  if not os.path.exists("/proc/self/status"):
    print("needs Linux /proc for peak memory", file=sys.stderr)
    return 2

  with tempfile.TemporaryDirectory() as tmp:
    folder = pathlib.Path(tmp)
    images = write_images(folder)
    print(
        f"size {args.size}, {os.cpu_count()} CPUs, time = median of {args.repeats} warm calls "
        f"('before': the first call), peak = RSS high-water mark above the post-import RSS\n"
    )
    header = (
        f"{'image':22s} {'path':14s} {'time':>10s} {'1st call':>9s} {'peak':>10s} "
        f"{'time x':>8s} {'peak x':>8s} {'max|d|':>8s}"
    )
    print(header)
    print("-" * len(header))
    for label, image in images.items():
      results = {}
      for which in PATHS:
        if which == "before" and args.skip_before:
          continue
        slow = which == "before"
        out_npy = folder / "output.npy"
        out_npy.unlink(missing_ok=True)
        results[which] = measure(
            which,
            image,
            args.size,
            args.before_repeats if slow else args.repeats,
            args.before_timeout if slow else 0,
            out_npy,
        )
      exact = results["exact (array)"]["output"]
      before = results.get("before")
      for which, r in results.items():
        t = r["median"] if r["median"] is not None else r["first"]
        ratio_t = ratio_m = ""
        if before is not None and which != "before":
          t_before = before["median"] if before["median"] is not None else before["first"]
          mark = ">" if before["killed"] else ""
          ratio_t = f"{mark}{t_before / t:.0f}x"
          ratio_m = f"{mark}{before['peak_mib'] / max(r['peak_mib'], 1):.0f}x"
        diff = "" if r["output"] is None else f"{np.abs(r['output'] - exact).max():.4f}"
        peak = f"{'>' if r['killed'] else ''}{r['peak_mib']:.0f} MiB"
        print(
            f"{label:22s} {which:14s} {_fmt_time(r):>10s} {r['first']:8.3f}s {peak:>10s} "
            f"{ratio_t:>8s} {ratio_m:>8s} {diff:>8s}"
        )
        label = ""
  return 0


if __name__ == "__main__":
  sys.exit(main())
