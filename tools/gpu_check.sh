#!/bin/bash
if [ "${GPU_CHECK_TINY:-0}" != 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
# One-shot GPU check (run from the repo root on a lent GPU machine; logs go to $OUT), all parts
# under one deadline of TOTAL_S (default 470 s after the start, the pip install included), so the
# whole script ends in under 8 minutes; a part that fails or times out does not stop the next,
# and a part with < 20 s left is SKIPPED. At the end ONE table: every RESULT|what|value|unit|
# baseline line the benchmarks printed, plus each part's status. Parts, most important first:
#   crops        tools/benchmark_clipcrop.py --mode folder: B/32 bfloat16 crops/s over a folder of
#                JPEGs, batch 1 (baseline) vs batched 64 / 256, the pre-decoded rate and MFU
#                (target >= 2000 crops/s);
#   train        tools/benchmark_train.py --synthetic: frozen-encoder B/32 train step, bfloat16,
#                host matching, batch 256: examples/s (target >= 400);
#   setup        --setup: set-up from OWL-ViT weights to the first train state (target < 30 s);
#   matching     --matching: one step's Hungarian matching, device (optax) vs host (SciPy);
#   phases       --phases: per-phase ms of the step at batch 64 (host matching);
#   max_batch    --max_batch: largest batch, frozen and trainable + remat (XLA memory analysis);
#   owlvit_bf16  tools/benchmark_owlvit.py bf16 vs HF;
#   pytest       tests/test_owlvit_model.py tests/test_decoder.py with full f32 matmuls.
# Measured on an H200 (2026-11-26, before issue 15): B/32 train set-up 87 s, first step compile
# 49 s, OWL-ViT forward compile 12 s. .whl/ (git-ignored; `carry` it) holds the wheels missing
# there: ml-collections, instant-clip-tokenizer, ftfy, wcwidth, pytest, pluggy, iniconfig, fetched
# with `pip download --no-deps --only-binary=:all: --python-version 3.12 --platform
# manylinux_2_17_x86_64 -d .whl NAME==VERSION` (versions as in the dev venv).
# GPU_CHECK_TINY=1: tiny configs, few images/steps (a CPU dry run of this script).
set -o pipefail
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
TOTAL_S=${TOTAL_S:-470}  # seconds since the script started (the pip install included)
CAP_MULT=1

if [ "${GPU_CHECK_TINY:-0}" = 1 ]; then
  CROPS=(--owlvit tiny --dtype float32 --batch_size 8 --images 32 --baseline_images 8
         --image_size 640x480)
  MODEL=tiny DTYPE=float32
  TRAIN=(--models tiny --batch_size 8 --steps 2 --warmup 1)
  PHASES=(--models tiny --batch_size 8 --steps 2)
  MAXB=(--models tiny --max_batch_probe 4)
  OWL="--config tiny --rounds 1 --repeats 2"
  CAP_MULT=4 TOTAL_S=${GPU_CHECK_TOTAL_S:-1800}  # a loaded 2-core CPU compiles slowly
  PYTEST_K=(-k "box_bias or sine_position or shapes_with_eval_shape")
else
  CROPS=(--owlvit clip_b32 --dtype bfloat16 --batch_size 64,256 --images 1024
         --baseline_images 64 --image_size 1024x768)
  MODEL=b32 DTYPE=bfloat16
  TRAIN=(--models b32 --dtype bfloat16 --batch_size 256 --steps 10 --warmup 2)
  PHASES=(--models b32 --dtype bfloat16 --batch_size 64 --steps 5)
  MAXB=(--models b32 --dtype bfloat16 --max_batch_probe 64)
  OWL="--rounds 2 --repeats 10"
  PYTEST_K=()
fi

# part NAME CAP_S CMD...: runs CMD with a timeout of min(CAP_S, time left before the deadline),
# tee'd into $OUT/NAME.log; never fails the script.
part() {
  local name=$1 cap=$(($2 * CAP_MULT)); shift 2
  local left=$((TOTAL_S - SECONDS))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 20 ]; then
    echo "=== $name: SKIPPED (only ${left}s left)" | tee "$OUT/$name.log"
    return 0
  fi
  echo "=== $name (timeout ${limit}s): $*" | tee "$OUT/$name.log"
  local t0=$SECONDS
  timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
  local rc=$?
  echo "=== $name: rc $rc, $((SECONDS - t0)) s$([ $rc = 124 ] && echo ' (TIMED OUT)')" \
    | tee -a "$OUT/$name.log"
  [ $rc = 0 ] || echo "PART $name FAILED" | tee -a "$OUT/$name.log"
  return 0
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  python3 -c "import jax, jaxlib, flax, optax, numpy, scipy; print('jax', jax.__version__, jaxlib.__version__, jax.devices(), '| flax', flax.__version__, '| optax', optax.__version__, '| numpy', numpy.__version__, '| scipy', scipy.__version__)"
} 2>&1 | tee "$OUT/env.log" || echo "PART env FAILED"

part crops 100 python3 tools/benchmark_clipcrop.py --mode folder "${CROPS[@]}"
part train 100 python3 tools/benchmark_train.py --synthetic "${TRAIN[@]}" --matching_solver host
part setup 50 python3 tools/benchmark_train.py --setup --no_setup_baseline --models $MODEL \
  --dtype $DTYPE
part matching 40 python3 tools/benchmark_train.py --matching --batch_size 8,64 --steps 5
part max_batch 90 python3 tools/benchmark_train.py --max_batch "${MAXB[@]}" \
  --max_batch_modes frozen,trainable+remat
part phases 80 python3 tools/benchmark_train.py --phases "${PHASES[@]}" --matching_solver host
XLA_PYTHON_CLIENT_PREALLOCATE=false \
  part owlvit_bf16 60 python3 tools/benchmark_owlvit.py $OWL --dtype bfloat16
JAX_DEFAULT_MATMUL_PRECISION=highest \
  part pytest 50 python3 -m pytest -q -x tests/test_owlvit_model.py tests/test_decoder.py \
  -p no:cacheprovider "${PYTEST_K[@]}"

echo "=== done in ${SECONDS} s"
{
  echo "what|value|unit|baseline / notes"
  echo "---|---|---|---"
  grep -h '^RESULT|' "$OUT"/*.log | cut -d'|' -f2- | awk '!seen[$0]++'
  grep -h -E '^=== [a-z_0-9]+: (rc|SKIPPED)' "$OUT"/*.log | sed -E 's/^=== ([a-z_0-9]+): (.*)$/part \1|\2||/'
  grep -h -E '^[0-9]+ (passed|failed)|passed|failed' "$OUT"/pytest.log 2>/dev/null | tail -1 \
    | sed -E 's/^(.*)$/pytest|\1||/'
} > "$OUT/table.psv"
(column -t -s '|' "$OUT/table.psv" 2>/dev/null || tr '|' '\t' < "$OUT/table.psv") | tee "$OUT/table.txt"
exit 0
