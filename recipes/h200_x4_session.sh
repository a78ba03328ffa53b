#!/usr/bin/env bash
# What issue 9 still needs from a lent H200 (any kind: it uses GPU 0 only), planned from the third 4-GPU session's
# results (docs/results/performance.md, "Not done"). Issue 10's runs are done (docs/results/multigpu.md; this file
# at commit 9080c2e held them). Run at commit df012c4 on one H200: docs/results/performance.md, "Fourth GPU
# session". Calls of at most 10 minutes, each within 30 s of the previous one (files outside
# the repository live only while the machine stays warm):
#
#   call 1  carry .device/wheels .device/p1   bash recipes/h200_x4_session.sh one
#           the GPU tests not run yet (a round graph per verify width, the graphed SPS profile), the scheduler
#           decision through the policy's own path with the 16-warp default, in rotated turns, Eagle3's step with
#           the sparse TTT mask (flex) beside the dense one, and the DFlash step (53.0 ms against the 46 ms goal)
#           with its layers compiled by max-autotune
#   call 2  carry .device/wheels .device/p2   bash recipes/h200_x4_session.sh two
#           GGUF -> HF; the SmolLM2 DSpark trained online on 1 GPU (STEPS, default 300 x batch 16, about 3.5 min
#           with start-up); then the decode benchmark with it
#   call 3  carry .device/wheels              bash recipes/h200_x4_session.sh three
#           what call 2's deadline left of the decode benchmark (batch 1 and 32, T = 0, eager vs CUDA graphs,
#           fixed-length verification vs the prefix scheduler, each mode with an SPS table measured as it
#           verifies), alone on the machine; then CUDA graphs of the passes compiled by torch.compile beside
#           the plain graphs (SpeculativeEngine(compile_passes=True))
#
# Every call stops its work at BUDGET seconds and copies $RUN (without checkpoints) to $OUT.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source recipes/device_call.sh  # environment, OUT, BUDGET, left, deadline
export RUN=/tmp/mg SMOL=/tmp/smol_hf DATA=/tmp/data/train.jsonl
export STEPS=${STEPS:-300}
mkdir -p "$RUN"

gpu_tests() {
  [[ -f $RUN/gpu_tests.done ]] && return
  python -m pytest -q -m gpu -p no:cacheprovider tests/decoding tests/drafters/test_eagle3.py \
    -k "cuda_graphs or profile_sps or flex" 2>&1 | tail -15 | tee "$RUN/gpu_tests.out"
  python benchmarks/scheduler.py --num-warps 8 16 2>&1 | tail -8 | tee "$RUN/scheduler.out"  # goal <= 100 us
  touch "$RUN/gpu_tests.done"
  python benchmarks/train_step.py --algorithms eagle3 --attn sdpa flex 2>&1 | tee "$RUN/train_step_eagle3.out"
  python benchmarks/train_step.py --algorithms dflash --fused-only --attn flex --compile layers \
    --compile-mode max-autotune-no-cudagraphs --profile 3 2>&1 | tee "$RUN/train_step_autotune.out"
}

train() {  # the 1-GPU online SmolLM2 DSpark of multigpu.md (validation tau 1.34 at 300 steps there)
  CUDA_VISIBLE_DEVICES=0 GPU_COUNTS=1 NGPU=1 SMOL_DIR=$SMOL DATA=$DATA bash recipes/multigpu.sh smollm2 2>&1 \
    | tee -a "$RUN/mg.out"
}

decode() {  # decode <name> <modes...>: scheduler vs fixed at batch 32 and 1, with the trained drafter
  local name=$1; shift
  [[ -f $RUN/$name.done ]] && return
  local ckpt=$RUN/smollm2_auto_1gpu/checkpoints/last.ckpt
  [[ -f $ckpt ]] || { echo "!! no trained drafter at $ckpt"; return; }
  python benchmarks/decode.py --ckpt "$ckpt" --target-path "$SMOL" --batch-sizes 32 1 --temperatures 0 \
    --max-new-tokens 128 --modes "$@" --policies fixed scheduler 2>&1 | tee "$RUN/$name.out" \
    && touch "$RUN/$name.done"
}

collect() {
  echo "== collect -> $OUT"
  (cd "$(dirname "$RUN")" && tar czf "$OUT/mg.tgz" --exclude='*.ckpt' --exclude='*.tar' --exclude='events.out*' \
    "$(basename "$RUN")")
  du -sh "$OUT"
}

bash recipes/h200_prepare.sh wheels || exit 1
case "${1:-}" in
  one)
    bash recipes/h200_prepare.sh part1
    export -f gpu_tests
    deadline "$(left)" bash -c 'CUDA_VISIBLE_DEVICES=0 gpu_tests'
    ;;
  two)
    bash recipes/h200_prepare.sh part2 && bash recipes/h200_prepare.sh convert || exit 1
    mkdir -p "$(dirname "$DATA")" && gunzip -c docs/results/smollm2/regen_train.jsonl.gz > "$DATA"
    export -f train decode
    deadline "$(left)" bash -c 'train; CUDA_VISIBLE_DEVICES=0 decode decode eager graphs'
    ;;
  three)
    export -f decode
    deadline "$(left)" bash -c '
      CUDA_VISIBLE_DEVICES=0 decode decode eager graphs
      CUDA_VISIBLE_DEVICES=0 decode decode_compiled graphs graphs-compiled'
    ;;
  *) echo "usage: $0 one|two|three" >&2; exit 2 ;;
esac
collect
