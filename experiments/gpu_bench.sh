#!/usr/bin/env bash
# The GPU measurements of experiments/results/PERFORMANCE.md (issue #9), in one short script:
#   OUT=/tmp/gpu bash experiments/gpu_bench.sh                 # all four parts (about 3 minutes)
#   OUT=/tmp/gpu PARTS="1 4" TESTS=tests bash experiments/gpu_bench.sh
# 1. ResNet-50 (ImageNet 224x224, batch 256) bf16 train and eval steps: images/s, MFU.
# 2. CIFAR ResNet-56 (batch 128) float32 step time: cnnjax next to the Flax nn.Conv twin and
#    PyTorch channels-last on the same GPU.
# 3. The trainer end to end on one GPU (digits, 200 steps, checkpoint, resumed to 300).
# 4. The tests on the GPU (TESTS, default the layer tests; float32 at 'highest' precision, since
#    TF32 would miss the NumPy references).
# Each part has its own time limit, so that one failure leaves the others' figures. Runs from the
# repository root with the machine's python3 (cnnjax from the source tree, nothing installed).
set -u
OUT=${OUT:-/tmp/cnnjax_gpu}
PARTS=${PARTS:-1 2 3 4}
TESTS=${TESTS:-tests/test_functional.py tests/test_nn.py}
TEST_TIMEOUT=${TEST_TIMEOUT:-75}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
log() { echo "== $* ($(date +%T))"; }

part1() {
  log "1. ResNet-50 bf16, batch 256"
  timeout 240 $PY -m cnnjax bench --model resnet50 --batch_size 256 --dtype bfloat16 --impl cnnjax --xla default \
    --rounds 3 --steps 20 --matmul 8192 --json "$OUT/resnet50_bf16.json"
}
part2() {
  log "2. CIFAR ResNet-56 float32, batch 128: cnnjax, Flax twin, PyTorch channels-last"
  timeout 160 $PY -m experiments.bench --model resnet56 --batch_size 128 --impl cnnjax flax torch-cl \
    --xla default --rounds 5 --steps 30 --matmul 4096 --json "$OUT/resnet56_f32.json"
}
part3() {
  log "3. trainer end to end (digits, 200 steps, then resumed to 300)"
  rm -rf /tmp/cnnjax_gpu_run
  for steps in 200 300; do
    timeout 60 $PY -m cnnjax train --workdir /tmp/cnnjax_gpu_run --preset digits_resnet --num_steps $steps \
      --eval_every 100 --checkpoint_every 100 --log_every 50 --progress_bar false
  done
}
part4() {
  log "4. tests on the GPU: $TESTS"
  # shellcheck disable=SC2086
  XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_DEFAULT_MATMUL_PRECISION=highest timeout "$TEST_TIMEOUT" \
    $PY -m pytest -q --tb=short -p no:cacheprovider -p no:benchmark -n "${TEST_WORKERS:-4}" $TESTS
}

{
  log environment
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import jax, flax, optax, numpy; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'numpy', numpy.__version__); print(jax.devices())"
  $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
  for p in $PARTS; do "part$p"; done
  log done
} 2>&1 | tee "$OUT/log.txt"
