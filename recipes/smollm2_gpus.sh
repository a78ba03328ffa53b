#!/usr/bin/env bash
# recipes/smollm2.sh once per (seed, drafter), all at once: seed i runs on the i-th of GPUS (cyclically), its three drafters
# side by side on that GPU (the 135M target and the small drafters leave an H200 mostly idle, so they share it).
# Every pipeline resumes (see recipes/smollm2.sh), so this can be rerun after a cut-off call.
#
#   SMOL_DIR=/tmp/smol_hf DATA=/tmp/data/train.jsonl RUN=/tmp/run SEEDS="0 1" STEPS=1000 bash recipes/smollm2_gpus.sh
#
# Logs: <RUN>/seed<S>/<drafter>.log. Any knob of recipes/smollm2.sh passes through the environment.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RUN=${RUN:-runs/smollm2}
SEEDS=${SEEDS:-"0 1"}
DRAFTERS=${DRAFTERS:-"dspark dflash eagle3"}
GPUS=(${GPUS:-$(seq 0 $(( $(nvidia-smi -L 2>/dev/null | wc -l) - 1 )))})  # GPU ids to use, e.g. GPUS="0 1"
[[ ${#GPUS[@]} -gt 0 ]] || GPUS=(0)
i=0
for seed in $SEEDS; do
  mkdir -p "$RUN/seed$seed"
  for algo in $DRAFTERS; do
    CUDA_VISIBLE_DEVICES=${GPUS[i % ${#GPUS[@]}]} RUN=$RUN SEED=$seed ALGOS=$algo DECODE_BENCH=0 \
      bash recipes/smollm2.sh >> "$RUN/seed$seed/$algo.log" 2>&1 &  # appended: a resumed call keeps the history
  done
  i=$((i + 1))
done
wait
for seed in $SEEDS; do for algo in $DRAFTERS; do
  echo "== seed $seed $algo: $(grep -E '^(Trained|Throughput)' "$RUN/seed$seed/$algo.log" | tr '\n' ' ')"
  grep -E "Error|error:" "$RUN/seed$seed/$algo.log" | tail -3
done; done
