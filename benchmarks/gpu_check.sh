#!/usr/bin/env bash
# The GPU check: every claim that needs an accelerator, in one prepared run.
#
#   benchmarks/gpu_check.sh [--dry-run] [PART ...]     PART: memory zoo overhead train accuracy (default: all)
#
# Runs from a plain checkout (PYTHONPATH is set here; no install needed) and writes its log and
# the benchmarks' JSON-lines rows to $RESULTS (default benchmarks/results/gpu). The untimed parts
# (predictions, conversions, FLOP counts, peak measurements: each its own process) run side by
# side; overhead.py's timed steps wait until they are done and then take turns (--timing-gate),
# so no timed step overlaps other work. --dry-run runs every part at toy size on the CPU (fake
# tensors instead of CUDA measurements), to catch a broken step before GPU minutes are spent.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
PARTS=${*:-memory zoo overhead train accuracy}
export FXLOCAL_FASHION_MNIST=${FXLOCAL_FASHION_MNIST:-$PWD/../shared/datasets/fashion-mnist}
RESULTS=${RESULTS:-benchmarks/results/gpu}
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
LOG="$RESULTS/gpu_check.log"
WORK=$(mktemp -d)
GATE="$WORK/gate"
mkdir -p "$GATE"
want() { [[ " $PARTS " == *" $1 "* ]]; }

if [ $DRY = 1 ]; then
  DEV=cpu MEMDEV=fake BIG=2 SMALL=4 STEPS=1 IMG=64
  ACC="--quick --epochs 1 --train-subset 256 --test-subset 128 --rows e2e dgl:4 mlaan:16 --seeds 0 --jobs 2"
  VAL="--quick --epochs 1 --train-subset 256 --test-subset 128 --validation 128 --jobs 2"
else
  DEV=cuda MEMDEV=cuda BIG=64 SMALL=128 STEPS=10 IMG=224
  ACC="--jobs 13 --workers 1"  # the full protocol: its 13 runs side by side
  VAL="--validation 10000 --jobs 1 --workers 1"
fi
THREADS=${THREADS:-2}
PART_TIMEOUT=${PART_TIMEOUT:-450}  # seconds a part may take; 124 in the log means it ran out

{
  echo "# gpu_check $(date -u +%FT%TZ) parts: $PARTS dry-run: $DRY"
  git log -1 --format='commit %h %s' 2>/dev/null
  "$PY" -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
} 2>&1 | tee "$LOG"

# run NAME CMD...: one part in the background, its output to $WORK/NAME.out, appended to the log when done
PIDS=()
run() {
  local name=$1; shift
  ( start=$(date +%s)
    OMP_NUM_THREADS=$THREADS timeout "$PART_TIMEOUT" "$@" > "$WORK/$name.out" 2>&1; rc=$?
    { echo; echo "## $name (exit $rc, $(( $(date +%s) - start )) s): $*"; echo; cat "$WORK/$name.out"; } >> "$LOG"
    [ $rc = 0 ] || echo "FAILED: $name (exit $rc)" >> "$LOG" ) &
  PIDS+=($!)
}

MEM="$PY benchmarks/memory.py --device $MEMDEV --record $RESULTS/memory.jsonl"
if want memory; then
  if [ $DRY = 1 ]; then
    run memory_resnet101 $MEM --batch $BIG --input-size 3 $IMG $IMG --aux dgl mlaan --backbone-recompute all
  else
    run memory_resnet101 $MEM
  fi
  run memory_resnet32_k16 $MEM --model resnet32_cifar --k 16 --batch $SMALL --input-size 3 32 32 --no-hand-split --aux dgl mlaan man --backbone-recompute
fi
if want zoo; then
  for model in vit_small_patch16_224 convnext_tiny efficientnet_b0; do
    run "memory_$model" $MEM --model $model --batch $BIG --no-hand-split --aux dgl mlaan --backbone-recompute
    run "cli_memory_$model" "$PY" -m fxlocal.cli memory $model --k 4 --aux dgl --batch $BIG --device $MEMDEV
  done
fi
if want train; then
  run train_quickstart "$PY" -m fxlocal.cli train recipes/quickstart.yaml --set device=$DEV --set epochs=1 --set output_dir="$WORK/quickstart"
fi
# the timed runs prepare now, and time once the untimed parts above are done
UNTIMED=("${PIDS[@]}")
OH="$PY benchmarks/overhead.py --device $DEV --steps $STEPS --timing-gate $GATE --record $RESULTS/overhead.jsonl"
if want overhead; then
  run overhead_resnet101 $OH --batch $BIG --input-size 3 $IMG $IMG --k 4 16
  run overhead_resnet101_bf16_cl $OH --batch $BIG --input-size 3 $IMG $IMG --k 4 --amp bf16 --channels-last
  run overhead_resnet32 $OH --model resnet32_cifar --input-size 3 32 32 --batch $SMALL --k 4 16
  run recompute_backbone "$PY" benchmarks/recompute.py --what backbone --device $DEV --batch $BIG --input-size 3 $IMG $IMG \
    --steps $STEPS --timing-gate "$GATE" $([ $DRY = 1 ] && echo --aux dgl)
fi
for pid in "${UNTIMED[@]}"; do wait "$pid"; done
touch "$GATE/open"
if want accuracy; then  # after the rest: every run of the protocol side by side, and the options chosen on validation
  for pid in "${PIDS[@]}"; do wait "$pid"; done
  RUNS="$WORK/runs"
  A="$PY benchmarks/accuracy.py --device $DEV --results $RESULTS/accuracy.jsonl --runs $RUNS"
  run accuracy $A $ACC
  run accuracy_mlaan_val $A $VAL --rows mlaan:16 --seeds 0
  run accuracy_mlaan_val_reference $A $VAL --rows mlaan:16 --seeds 0 --set convert.aux_options.pool_norm=false --tag reference-pool-fc
  wait
  # each run's per-epoch metrics, finished or not
  (cd "$WORK" && tar czf "$RESULTS/accuracy_runs.tgz" $(find runs -name metrics.jsonl))
fi
wait
rm -rf "$WORK"
echo "# gpu_check done $(date -u +%FT%TZ)" | tee -a "$LOG"
! grep -q '^FAILED' "$LOG"
