#!/usr/bin/env bash
# The GPU session behind docs/results/{smollm2,multigpu,performance}.md: one H200 machine with 2 or 4 GPUs lent
# in calls of at most 10 minutes, files outside the repository kept only while calls follow each other within 30 s.
# With 4 GPUs issue 10 runs on GPUs 2-3 beside the reproduction; with 2 it runs after it, on both.
#
#   call 1  bash recipes/h200_session.sh check      carry .device/wheels .device/p1: GPU tests, kernel
#                                                   benchmarks, first half of the GGUF
#   call 2  bash recipes/h200_session.sh start      carry .device/wheels .device/p2: GGUF -> HF, regen the
#                                                   training data (GPUs 0-1) while issue 10 starts (GPUs 2-3),
#                                                   then the reproduction (GPUs 0-1) beside issue 10
#   call 3+ bash recipes/h200_session.sh continue   everything resumes where the last call stopped; the
#                                                   training-step benchmark runs on GPU 2 after issue 10
#   or      bash recipes/h200_session.sh multigpu   issue 10 (MG_PARTS) and the training-step table only
#
# Each call stops its work at BUDGET seconds (SIGINT, then SIGKILL) and copies what exists to $OUT.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source recipes/device_call.sh  # environment, OUT, BUDGET, left, deadline
STEPS=${STEPS:-600}   # the steps of docs/results/smollm2.md; keep it fixed across the calls of one run
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
MG_GPUS=$([[ $NGPU -ge 4 ]] && echo 2,3 || echo 0,1)
export SMOL=/tmp/smol_hf DATA_DIR=/tmp/data RUN7=/tmp/run RUN10=/tmp/mg STEPS NGPU MG_GPUS

reproduction() {  # issue 7 on GPUs 0-1 (one seed per GPU), then the decode benchmark on a quiet GPU 0
  SMOL_DIR=$SMOL DATA=$DATA_DIR/train.jsonl RUN=$RUN7 GPUS="0 1" SEEDS="0 1" STEPS=$STEPS VAL_EVERY=100 \
    TEMPS="1.0 0.0" EVAL_SAMPLES=32 MAX_NEW=128 bash recipes/smollm2_gpus.sh
  CUDA_VISIBLE_DEVICES=0 SMOL_DIR=$SMOL RUN=$RUN7 SEED=0 ALGOS=dspark SKIP_FIT=1 STEPS=$STEPS EVAL_SAMPLES=32 \
    MAX_NEW=128 DECODE_BENCH=1 DECODE_ARGS="--policies fixed scheduler" bash recipes/smollm2.sh
}

multigpu() {  # issue 10 on two GPUs
  CUDA_VISIBLE_DEVICES=$MG_GPUS NGPU=2 SMOL_DIR=$SMOL DATA=$DATA_DIR/train.jsonl RUN=$RUN10 bash recipes/multigpu.sh "$@"
}

train_step() {  # issue 9's training-step table, on one of issue 10's GPUs once it is done with them
  [[ -f /tmp/train_step.done ]] && return
  CUDA_VISIBLE_DEVICES=${MG_GPUS%%,*} python benchmarks/train_step.py --algorithms dspark dflash eagle3 --fused --attn sdpa flex \
    2>&1 | tee /tmp/train_step.out && touch /tmp/train_step.done
}

collect() {  # one tarball per tree: the device tool returns neither deep folders nor many files
  echo "== collect -> $OUT"
  (cd /tmp && tar czf "$OUT/run.tgz" --exclude='*.ckpt' --exclude='rounds.jsonl' --exclude='events.out*' --exclude='*.tar' \
     "$(basename "$RUN7")" "$(basename "$RUN10")" 2>/dev/null)
  [[ -f "$RUN7/seed0/dspark/eval_T1.0/rounds.jsonl" ]] && gzip -c "$RUN7/seed0/dspark/eval_T1.0/rounds.jsonl" \
    > "$OUT/seed0_dspark_rounds_T1.0.jsonl.gz"
  [[ -f "$DATA_DIR/train.jsonl" ]] && gzip -c "$DATA_DIR/train.jsonl" > "$OUT/regen_train.jsonl.gz"
  (cd "$DATA_DIR" 2>/dev/null && tar czf "$OUT/regen_logs.tgz" ./*.log 2>/dev/null)
  cp /tmp/train_step.out "$OUT/" 2>/dev/null
  nvidia-smi --query-gpu=index,memory.used,utilization.gpu --format=csv > "$OUT/nvidia-smi.csv" 2>/dev/null
  du -sh "$OUT"
}

case "${1:-}" in
  check)
    bash recipes/h200_prepare.sh wheels && bash recipes/h200_prepare.sh part1
    nvidia-smi -L
    # GPU tests compile Triton and inductor kernels (about 5 min for these two folders on the H200): narrow
    # GPU_TESTS to what changed
    python -m pytest -q -m gpu -p no:cacheprovider ${GPU_TESTS:-tests/kernels tests/drafters} 2>&1 | tail -15
    python benchmarks/scheduler.py --num-warps 2 4 8 2>&1 | tail -8
    python benchmarks/markov_sampling.py 2>&1 | tail -14
    ;;
  start)
    bash recipes/h200_prepare.sh wheels && bash recipes/h200_prepare.sh part2 && bash recipes/h200_prepare.sh convert \
      || exit 1
    synthetic=
    if [[ $NGPU -ge 4 ]]; then
      deadline "$(left)" bash -c "$(declare -f multigpu); multigpu synthetic" > /tmp/mg_synthetic.out 2>&1 &
      synthetic=$!
    fi
    SMOL_DIR=$SMOL OUT=$DATA_DIR GPUS="0 1" PROCS_PER_GPU=3 REGEN_SECONDS=${REGEN_SECONDS:-210} \
      bash recipes/smollm2_data.sh
    deadline "$(left)" bash -c "$(declare -f reproduction); reproduction" &
    repro=$!
    if [[ -n $synthetic ]]; then
      wait "$synthetic"; cat /tmp/mg_synthetic.out
      deadline "$(left)" bash -c "$(declare -f multigpu); multigpu smollm2 cache resume"
    fi
    wait "$repro"
    collect
    ;;
  continue)
    if [[ $NGPU -ge 4 ]]; then
      deadline "$(left)" bash -c "$(declare -f reproduction multigpu train_step); reproduction &
        multigpu synthetic smollm2 cache resume; train_step; wait"
    else  # two GPUs: the reproduction first, then issue 10 and the training-step table on a quiet machine
      deadline "$(left)" bash -c "$(declare -f reproduction multigpu train_step); reproduction;
        multigpu ${MG_PARTS:-synthetic smollm2 cache resume}; train_step"
    fi
    collect
    ;;
  multigpu)  # issue 10 and the training-step table alone (after check + start's GGUF steps on a fresh machine)
    [[ -f $DATA_DIR/train.jsonl ]] || SMOL_DIR=$SMOL OUT=$DATA_DIR GPUS="0 1" PROCS_PER_GPU=3 \
      REGEN_SECONDS=${REGEN_SECONDS:-120} bash recipes/smollm2_data.sh
    deadline "$(left)" bash -c "$(declare -f multigpu train_step); multigpu ${MG_PARTS:-synthetic smollm2 cache resume};
      train_step"
    collect
    ;;
  *) echo "usage: $0 check|start|continue|multigpu" >&2; exit 2 ;;
esac
