#!/usr/bin/env bash
# Issue 18's GPU runs (the engine with fused rounds), one lent GPU, calls of at most 10 minutes; every call
# re-creates what it needs (a machine idle for 30 s is gone):
#
#   call timing   carry .device/wheels          bash recipes/gpu_engine_session.sh timing
#       the engine's GPU tests (graphed = eager, greedy and sampled), then round costs on SmolLM2's geometry with
#       random weights (no GGUF needed): untrained 5- and 2-layer DSparks, batch 1/16/64, T = 0 and 1, CUDA graphs,
#       the batch-1 round split, HF generate eager and static-cache compiled; CUDA graphs over compiled passes at
#       batch 1
#
# Results go to $OUT (JSON and logs).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source recipes/device_call.sh  # environment, OUT, BUDGET, left, deadline
bash recipes/h200_prepare.sh wheels || exit 1
nvidia-smi -L
case "${1:-}" in
  timing)
    deadline 170 bash -c "python -m pytest -q -m gpu -p no:cacheprovider tests/decoding 2>&1 | tail -25 \
      | tee $OUT/gpu_tests.txt"
    deadline "$(( $(left) - 120 ))" python benchmarks/decode.py --random-target --untrained-layers 5 2 \
      --batch-sizes 1 16 64 --temperatures 0 1 --modes graphs --hf --hf-batch-sizes 1 --profile \
      --json "$OUT/random_graphs.json" 2>&1 | tee "$OUT/random_graphs.txt"
    deadline "$(left)" python benchmarks/decode.py --random-target --untrained-layers 5 2 --batch-sizes 1 \
      --temperatures 0 --modes graphs-compiled --repeats 2 --json "$OUT/random_compiled.json" 2>&1 \
      | tee "$OUT/random_compiled.txt"
    ;;
  *) echo "usage: $0 timing" >&2; exit 2 ;;
esac
