#!/usr/bin/env bash
# Issue 18's GPU runs (the engine with fused rounds) on one lent GPU: three calls of at most 10 minutes, each
# within 30 s of the previous one (files outside the repository live only while the machine stays warm):
#
#   call 1  carry .device/wheels .device/p1   bash recipes/gpu_engine_session.sh timing
#       the engine's GPU tests (graphed = eager, greedy and sampled); round costs on SmolLM2's geometry with random
#       weights: untrained 5- and 2-layer DSparks, batch 1/16/64, T = 0 and 1, CUDA graphs, the batch-1 round
#       split, HF generate eager and static-cache compiled; graphs over compiled passes at batch 1. The first half
#       of the SmolLM2 GGUF is stashed.
#   call 2  carry .device/wheels .device/p2   bash recipes/gpu_engine_session.sh train
#       GGUF joined and converted; DSpark 5-layer and 2-layer trained online side by side on the regenerated
#       conversations (docs/results/smollm2/regen_train.jsonl.gz), TRAIN_TIME each (default 6 minutes)
#   call 3  carry .device/wheels              bash recipes/gpu_engine_session.sh decode
#       benchmarks/decode.py with both drafters: batch 1/16/64, T = 0 and 1, fixed vs scheduler, HF baselines,
#       the round split; the target alone at batch 256 (regen throughput)
#
# Results go to $OUT (JSON, logs, the fits' summaries without checkpoints).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source recipes/device_call.sh  # environment, OUT, BUDGET, left, deadline
export RUN=/tmp/w2 SMOL=/tmp/smol_hf
bash recipes/h200_prepare.sh wheels || exit 1
nvidia-smi -L
mkdir -p "$RUN"

fit() {  # fit <name> <layers>: the SmolLM2 DSpark recipe, online, for TRAIN_TIME
  python -m dspark_lightning fit --config configs/smollm2/dspark.yaml --model.target.path "$SMOL" \
    --model.target.gguf_file null --model.drafter.num_hidden_layers "$2" --seed_everything 0 \
    --data.init_args.path /tmp/data/train.jsonl --data.init_args.max_length 1024 --data.init_args.batch_size 32 \
    --trainer.max_steps 100000 --trainer.max_epochs -1 --trainer.max_time "${TRAIN_TIME:-00:00:06:00}" \
    --trainer.val_check_interval 100 --trainer.check_val_every_n_epoch null --trainer.enable_progress_bar false \
    --trainer.default_root_dir "$RUN/$1" > "$RUN/$1.log" 2>&1
  echo "== $1: exit $?"; grep -E "^(Trained|Throughput|Validation)" "$RUN/$1.log"; tail -3 "$RUN/$1.log"
}
export -f fit

case "${1:-}" in
  timing)
    bash recipes/h200_prepare.sh part1
    deadline 120 bash -c "python -m pytest -q -m gpu -p no:cacheprovider tests/decoding -k 'not compiled' 2>&1 \
      | tail -25 | tee $OUT/gpu_tests.txt"
    deadline "$(left)" python benchmarks/decode.py --random-target --untrained-layers 5 2 --repeats 2 \
      --batch-sizes 1 16 64 --temperatures 0 1 --modes graphs --hf --hf-batch-sizes 1 --profile \
      --max-new-tokens 128 --json "$OUT/random_graphs.json" 2>&1 | tee "$OUT/random_graphs.txt"
    ;;
  train)
    bash recipes/h200_prepare.sh part2 && bash recipes/h200_prepare.sh convert || exit 1
    mkdir -p /tmp/data && gunzip -c docs/results/smollm2/regen_train.jsonl.gz > /tmp/data/train.jsonl
    fit dspark5 5 & fit dspark2 2 & wait
    (cd "$RUN" && tar czf "$OUT/fits.tgz" --exclude='*.ckpt' dspark5 dspark2 dspark5.log dspark2.log)
    find "$RUN" -name "*.ckpt" | xargs ls -la
    ;;
  quick)  # what a short lease allows: the GPU tests, then round costs at batch 1 and 16 (carry .device/wheels)
    deadline 100 bash -c "python -m pytest -q -m gpu -p no:cacheprovider tests/decoding -k 'not compiled' 2>&1 \
      | tail -25 | tee $OUT/gpu_tests.txt"
    deadline "$(left)" python benchmarks/decode.py --random-target --untrained-layers 5 2 --repeats 2 \
      --batch-sizes 1 16 --temperatures 0 1 --modes graphs --profile --max-new-tokens 128 \
      --json "$OUT/random_graphs.json" 2>&1 | tee "$OUT/random_graphs.txt"
    ;;
  final)  # train and decode in one call (carry .device/wheels .device/p2)
    bash recipes/h200_prepare.sh part2 && bash recipes/h200_prepare.sh convert || exit 1
    mkdir -p /tmp/data && gunzip -c docs/results/smollm2/regen_train.jsonl.gz > /tmp/data/train.jsonl
    TRAIN_TIME=${TRAIN_TIME:-00:00:03:00} fit dspark5 5 & TRAIN_TIME=${TRAIN_TIME:-00:00:03:00} fit dspark2 2 & wait
    (cd "$RUN" && tar czf "$OUT/fits.tgz" --exclude='*.ckpt' dspark5 dspark2 dspark5.log dspark2.log)
    ck=($(find "$RUN/dspark5" -name last.ckpt | head -1) $(find "$RUN/dspark2" -name last.ckpt | head -1))
    echo "drafters: ${ck[*]}"
    deadline "$(left)" python benchmarks/decode.py --ckpt "${ck[@]}" --target-path "$SMOL" --repeats 2 \
      --batch-sizes 1 16 64 --temperatures 0 1 --modes graphs --policies fixed --max-new-tokens 128 \
      --json "$OUT/speedup.json" 2>&1 \
      | tee "$OUT/speedup.txt"
    ;;
  decode)
    ck=($(find "$RUN/dspark5" -name last.ckpt | head -1) $(find "$RUN/dspark2" -name last.ckpt | head -1))
    echo "drafters: ${ck[*]}"
    deadline "$(( $(left) - 60 ))" python benchmarks/decode.py --ckpt "${ck[@]}" --target-path "$SMOL" \
      --batch-sizes 1 16 64 --temperatures 0 1 --modes graphs --policies fixed scheduler --hf --hf-batch-sizes 1 16 \
      --profile --json "$OUT/speedup.json" 2>&1 | tee "$OUT/speedup.txt"
    deadline "$(left)" python benchmarks/decode.py --ckpt "${ck[0]}" --target-path "$SMOL" --batch-sizes 256 \
      --temperatures 0.7 --top-p 0.9 --modes graphs --repeats 1 --max-new-tokens 384 --target-only \
      --json "$OUT/regen_rate.json" 2>&1 | tee "$OUT/regen_rate.txt"
    ;;
  *) echo "usage: $0 timing|train|decode|final|quick" >&2; exit 2 ;;
esac
