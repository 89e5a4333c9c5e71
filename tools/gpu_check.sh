#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
nvidia-smi | head -15
# One-shot GPU check (run from the repo root on a lent GPU machine; logs go to $OUT):
#   1a. tools/benchmark_owlvit.py, B/32 @ 768, float32 (TF32 matmuls on both sides): our jit
#       forward vs HF transformers on CUDA;
#   2a. tools/benchmark_train.py --synthetic: the real-size train step (B/32 @ 768, frozen encoder,
#       paper decoder, configs/gaic_b32.py) at batch 8: steps/s, examples/s, peak memory;
#   2b. the same with the encoder trainable at batch 8 (real-size training smoke: loss finite);
#   1b. benchmark_owlvit.py in bfloat16 (ours: bf16 compute; HF: torch.autocast bf16);
#   3.  pytest tests/test_owlvit_model.py tests/test_decoder.py (full f32 matmuls).
# Each part runs under `timeout` against one overall deadline (TOTAL_S, default 560 s after the
# start), so the script ends in under 10 minutes; a part that fails or times out does not stop the
# next. Measured on an H200 (2026-11-26): B/32 train set-up (jit init of the full model) 87 s, first
# step compile 49 s, OWL-ViT forward compile 12 s and ~20 s per benchmark round; earlier caps of
# 100/150/90 s cut every part short. .whl/ (git-ignored; `carry` it) holds the wheels missing
# there: ml-collections, instant-clip-tokenizer, ftfy, wcwidth, pytest, pluggy, iniconfig, fetched
# with `pip download --no-deps --only-binary=:all: --python-version 3.12 --platform
# manylinux_2_17_x86_64 -d .whl NAME==VERSION` (versions as in the dev venv).
# GPU_CHECK_TINY=1: tiny configs, 1-2 rounds/steps (a CPU dry run of this script).
set -o pipefail
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
TOTAL_S=${TOTAL_S:-560}  # seconds since the script started (the pip install included)
CAP_MULT=1

if [ "${GPU_CHECK_TINY:-0}" = 1 ]; then
  OWL="--config tiny --rounds 1 --repeats 2"
  TRAIN="--models tiny --steps 2 --warmup 1"
  BS_FROZEN=2,4 BS_TRAINABLE=2
  CAP_MULT=6 TOTAL_S=${GPU_CHECK_TOTAL_S:-1800}  # a loaded 2-core CPU compiles slowly
  PYTEST_K=(-k "box_bias or sine_position or shapes_with_eval_shape")
else
  OWL="--rounds 3 --repeats 10"
  TRAIN="--models b32 --steps 10 --warmup 2"
  BS_FROZEN=8 BS_TRAINABLE=8
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
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import ml_collections, ftfy, instant_clip_tokenizer, pytest; print('wheels import ok:', ml_collections.__file__, instant_clip_tokenizer.__file__)"
  python3 -c "import jax, jaxlib, flax, optax, torch, transformers, numpy; print('jax', jax.__version__, jaxlib.__version__, jax.devices(), '| flax', flax.__version__, '| optax', optax.__version__, '| torch', torch.__version__, torch.cuda.is_available(), '| transformers', transformers.__version__, '| numpy', numpy.__version__)"
} 2>&1 | tee "$OUT/env.log" || echo "PART env FAILED"

# 1a. HF runs in the same process: no JAX preallocation, so torch gets GPU memory too.
XLA_PYTHON_CLIENT_PREALLOCATE=false \
  part owlvit_f32 120 python3 tools/benchmark_owlvit.py $OWL --dtype float32 || echo "PART owlvit_f32 FAILED"
# 2a. / 2b. Step only on a synthetic batch (no TensorFlow there).
part train_frozen 200 python3 tools/benchmark_train.py --synthetic $TRAIN --batch_size $BS_FROZEN \
  || echo "PART train_frozen FAILED"
part train_trainable 200 python3 tools/benchmark_train.py --synthetic $TRAIN --batch_size $BS_TRAINABLE \
  --trainable_encoder || echo "PART train_trainable FAILED"
# 1b.
XLA_PYTHON_CLIENT_PREALLOCATE=false \
  part owlvit_bf16 70 python3 tools/benchmark_owlvit.py $OWL --dtype bfloat16 || echo "PART owlvit_bf16 FAILED"
# 3. Full-precision f32 matmuls: the tests' tolerances were set on CPU (no TF32).
JAX_DEFAULT_MATMUL_PRECISION=highest \
  part pytest 120 python3 -m pytest -q -x tests/test_owlvit_model.py tests/test_decoder.py \
  -p no:cacheprovider "${PYTEST_K[@]}" || echo "PART pytest FAILED"

echo "=== done in ${SECONDS} s; summary:"
grep -h -E '^(===|PART|per image|10 calls|all losses|model |b32 |tiny |[0-9]+ (passed|failed)|.*(passed|failed|error).* in )' \
  "$OUT"/owlvit_f32.log "$OUT"/train_frozen.log "$OUT"/train_trainable.log "$OUT"/owlvit_bf16.log \
  "$OUT"/pytest.log 2>/dev/null | awk '!seen[$0]++'
exit 0
