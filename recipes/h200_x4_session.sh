#!/usr/bin/env bash
# What issues 9 and 10 still need from a 4-GPU H200 machine (nvidia-h200-x4), planned from the second session's
# results (docs/results/multigpu.md, performance.md). Calls of at most 10 minutes, each within 30 s of the previous
# one (files outside the repository live only while the machine stays warm):
#
#   call 1  carry .device/wheels .device/p1   bash recipes/h200_x4_session.sh one
#           the GPU tests never run yet (CUDA graphs on tiny targets, compiled layers, init_on_device); DDP on 4
#           GPUs for the synthetic Qwen3-8B-width drafter (the one fit of issue 10 never run); then on GPU 0: the
#           scheduler with 16 warps beside 4 and 8, and benchmarks/train_step.py (DFlash and DSpark, compiled
#           layers vs compiled step; their eager rows are in performance.md)
#   call 2  carry .device/wheels .device/p2   bash recipes/h200_x4_session.sh two
#           GGUF -> HF; benchmarks/decode.py --modes eager static graphs alone on the
#           machine (untrained drafter: the per-step cost is what graphs change); the cache build of all 3,200
#           conversations with 1 and with 4 processes
#   call 3  carry .device/wheels              bash recipes/h200_x4_session.sh three
#           resume 4 GPUs -> 1 from the 4-process cache (RESUME_STEPS, default 40) with the shards dealt evenly,
#           alone on the machine, then the uninterrupted 4-GPU run to compare against
#   on a 1-GPU machine, after call 2's GGUF steps: bash recipes/h200_x4_session.sh decode (GPU tests + decode)
#
# Measured on the first such machine (docs/results/multigpu.md): a fit spends 140-270 s outside its timed steps
# (start-up, compiling, validation), so each call holds at most two rounds of fits. Runs in one round share the
# host, and a decode benchmark beside training reads the host's load (the engine is host-bound): it runs alone.
# Every call stops its work at BUDGET seconds and copies $RUN (without checkpoints and cache shards) to $OUT.
# Runs side by side share the host (64 cores), not GPUs. Fits marked done are skipped, so a call may be repeated.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source recipes/device_call.sh  # environment, OUT, BUDGET, left, deadline
export RUN=/tmp/mg SMOL=/tmp/smol_hf DATA=/tmp/data/train.jsonl
export STEPS=${STEPS:-300}  # x global batch 16 = the 4,800 sequences of the docs/results/smollm2.md drafters
mkdir -p "$RUN"

mg() {  # mg <visible GPUs> <world sizes> <parts...>: recipes/multigpu.sh on those GPUs, its output in $RUN/mg.out
  local gpus=$1 counts=$2; shift 2
  CUDA_VISIBLE_DEVICES=$gpus GPU_COUNTS="$counts" NGPU=$(( $(tr -cd , <<< "$gpus" | wc -c) + 1 )) SMOL_DIR=$SMOL \
    DATA=$DATA bash recipes/multigpu.sh "$@" 2>&1 | sed "s/^/[$gpus] /" | tee -a "$RUN/mg.out"
}

gpu_tests() {  # the GPU tests never run yet: CUDA graphs (tiny random targets), compiled layers, init_on_device
  [[ -f $RUN/gpu_tests.done ]] && return
  python -m pytest -q -m gpu -p no:cacheprovider tests/decoding tests/drafters tests/test_targets.py \
    -k "cuda_graphs or compiled_layers or init_on_device" 2>&1 | tail -15 | tee "$RUN/gpu_tests.out"
  touch "$RUN/gpu_tests.done"
}

train_step() {  # issue 9's table on one GPU: the fused loss and flex attention, compiled two ways, with profiles
  [[ -f $RUN/train_step.done ]] && return
  python benchmarks/scheduler.py --num-warps 4 8 16 2>&1 | tail -8 | tee "$RUN/scheduler.out"  # goal <= 100 us
  python benchmarks/train_step.py --algorithms dflash dspark --fused-only --attn flex --compile layers step \
    --profile 3 2>&1 | tee "$RUN/train_step.out" && touch "$RUN/train_step.done"
}

decode() {  # issue 9: CUDA graphs (GPU tests, then eager vs static vs graphed decoding, profiled), alone on GPU 0
  [[ -f $RUN/decode.done ]] && return
  local ckpt=$RUN/smollm2_ddp_4gpu/checkpoints/last.ckpt
  python benchmarks/decode.py $([[ -f $ckpt ]] && echo --ckpt "$ckpt") --target-path "$SMOL" --batch-sizes 1 32 \
    --temperatures 0 --max-new-tokens 128 --modes eager static graphs --profile 24 2>&1 | tee "$RUN/decode.out" \
    && touch "$RUN/decode.done"
}

collect() {
  echo "== collect -> $OUT"
  (cd "$(dirname "$RUN")" && tar czf "$OUT/mg.tgz" --exclude='*.ckpt' --exclude='*.tar' --exclude='events.out*' \
    "$(basename "$RUN")")
  nvidia-smi --query-gpu=index,memory.used,utilization.gpu --format=csv > "$OUT/nvidia-smi.csv" 2>/dev/null
  du -sh "$OUT"
}

bash recipes/h200_prepare.sh wheels || exit 1
case "${1:-}" in
  one)
    bash recipes/h200_prepare.sh part1
    export -f mg gpu_tests train_step
    deadline "$(left)" bash -c '
      CUDA_VISIBLE_DEVICES=0 gpu_tests
      MULTI_STRATEGIES=ddp mg 0,1,2,3 4 synthetic
      CUDA_VISIBLE_DEVICES=0 train_step'
    ;;
  two)
    bash recipes/h200_prepare.sh part2 && bash recipes/h200_prepare.sh convert || exit 1
    mkdir -p "$(dirname "$DATA")" && gunzip -c docs/results/smollm2/regen_train.jsonl.gz > "$DATA"
    export -f mg decode
    deadline "$(left)" bash -c '
      CUDA_VISIBLE_DEVICES=0 decode
      CACHE_SAMPLES=3200 mg 0,1,2,3 "1 4" cache'
    ;;
  three)
    export -f mg
    deadline "$(left)" bash -c 'STEPS=${RESUME_STEPS:-40} mg 0,1,2,3 4 resume'
    ;;
  decode)
    export -f gpu_tests decode
    deadline "$(left)" bash -c 'CUDA_VISIBLE_DEVICES=0 gpu_tests; CUDA_VISIBLE_DEVICES=0 decode'
    ;;
  *) echo "usage: $0 one|two|three|decode" >&2; exit 2 ;;
esac
collect
