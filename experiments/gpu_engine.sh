#!/usr/bin/env bash
# The GPU runs of issues 19 (the engine's speed) and 20 (Figure 6 at the paper's recipe), one part
# per command, each sized for one 10-minute call of a lent H200:
#   OUT=/tmp/gpu PART=bench bash experiments/gpu_engine.sh
#   OUT=/tmp/gpu PART=headline DATA=/tmp/data bash experiments/gpu_engine.sh
# bench:    experiments/bench_engine.py on CIFAR ResNet-20 and -56, batch 128, float32 and bfloat16:
#           per-step host-fed (today's engine), data on the device, 100 steps per call, and 2/4/8
#           seeds per program (vmap; and loop for comparison); then the PyTorch twin of ResNet-56
#           (eager and torch.compile). CIFAR-10 from $DATA if set, else the embedded digits.
# headline: the paper_headline preset (plain-20/56 and ResNet-20/56, 64k iterations, as two twin
#           programs) on CIFAR-10 in $DATA; results in $OUT/degradation_paper_headline.
# CIFAR-10 reaches the machine in three parts (DEVELOPERS.md, "Data on the lent GPU"); the last
# call starts with `python3 .device/cifar10/join.py join .device/cifar10 /tmp/data/cifar10.npz &&`.
# Runs from the repository root with the machine's python3 (cnnjax from the source tree).
set -u
OUT=${OUT:-/tmp/cnnjax_gpu}
PART=${PART:-bench}
DATA=${DATA:-}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
log() { echo "== $* ($(date +%T))"; }
data_args=()
[ -n "$DATA" ] && data_args=(--data_dir "$DATA")

bench() {
  log "issue 19: the engine's options, ResNet-20/56, float32 and bfloat16"
  timeout 420 $PY experiments/bench_engine.py --model resnet20 resnet56 --dtype float32 bfloat16 \
    --steps_per_dispatch 100 --steps 200 --rounds 3 --seeds 2 4 8 --member_maps loop \
    "${data_args[@]}" \
    --json "$OUT/bench_engine.json"
  log "issue 20: the PyTorch twin of ResNet-56"
  timeout 150 $PY experiments/torch_twin.py --model resnet56 --steps 1000 "${data_args[@]}" \
    --json "$OUT/torch_twin.json"
}
headline() {
  [ -n "$DATA" ] || { echo "PART=headline needs DATA (the directory of cifar10.npz)"; return 2; }
  log "issue 20: paper_headline, 64k iterations"
  timeout 570 $PY -m experiments.degradation --preset paper_headline "${data_args[@]}" \
    --out "$OUT/degradation_paper_headline" --workdir /tmp/cnnjax_runs/paper_headline \
    --set progress_bar=false
}

{
  log environment
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import jax, flax, optax; print(jax.__version__, flax.__version__, optax.__version__)"
  $PY -c "import jax; print(jax.devices())"
  "$PART"
  log done
} 2>&1 | tee "$OUT/log_$PART.txt"
