#!/usr/bin/env bash
# Training data of the SmolLM2 reproduction, made the way DeepSpec makes it: the target answers the training
# prompts itself (recipes/smollm2_prompts.py: the train suites, prompts up to 512 tokens), SAMPLES answers each
# at its recommended sampling (temperature 0.2, top-p 0.9), with the project's `regen` (hf back-end), one
# process per shard spread over the GPUs. regen resumes, so a call cut off by a time limit loses nothing: rerun.
#
#   SMOL_DIR=/tmp/smol_hf OUT=/tmp/data bash recipes/smollm2_data.sh   # -> $OUT/train.jsonl
#
# Knobs: SAMPLES (answers per prompt), MAX_TOKENS, BATCH (prompts per generate call), PROCS_PER_GPU,
# REGEN_SECONDS (stop the regen processes after this long and keep what was written).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SMOL_DIR=${SMOL_DIR:?an HF directory of the target (recipes/h200_prepare.sh convert)}
OUT=${OUT:-runs/smollm2_data}
SAMPLES=${SAMPLES:-3}
MAX_TOKENS=${MAX_TOKENS:-512}
BATCH=${BATCH:-128}
GPUS=(${GPUS:-$(seq 0 $(( $(nvidia-smi -L 2>/dev/null | wc -l) - 1 )))})  # GPU ids to use, e.g. GPUS="0 1"
[[ ${#GPUS[@]} -gt 0 ]] || GPUS=(0)
PROCS_PER_GPU=${PROCS_PER_GPU:-2}
REGEN_SECONDS=${REGEN_SECONDS:-0}
PY=${PY:-python}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
shards=$(( ${#GPUS[@]} * PROCS_PER_GPU ))
[[ -d "$OUT/prompts" ]] || $PY recipes/smollm2_prompts.py --tokenizer "$SMOL_DIR" --shards "$shards" --out "$OUT/prompts"
t0=$SECONDS
for i in $(seq 0 $((shards - 1))); do
  limit=()
  [[ "$REGEN_SECONDS" != 0 ]] && limit=(timeout --signal=INT "$REGEN_SECONDS")
  CUDA_VISIBLE_DEVICES=${GPUS[i % ${#GPUS[@]}]} "${limit[@]}" $PY -m dspark_lightning regen \
    "$OUT/prompts/shard$i.jsonl" "$OUT/regen$i.jsonl" --backend hf --target.path "$SMOL_DIR" \
    --target.gguf_file null --target.dtype bfloat16 --temperature 0.2 --top_p 0.9 --top_k 0 \
    --max_tokens "$MAX_TOKENS" --num_samples "$SAMPLES" --batch_size "$BATCH" --seed "$i" --progress false \
    > "$OUT/regen$i.log" 2>&1 &
done
wait || true
# Merge the complete lines (a process stopped mid-write leaves at most a partial last line) and count tokens.
$PY - "$OUT" "$SMOL_DIR" $((SECONDS - t0)) <<'PYEOF'
import json, sys
from pathlib import Path
from transformers import AutoTokenizer
out, tok, seconds = Path(sys.argv[1]), AutoTokenizer.from_pretrained(sys.argv[2]), int(sys.argv[3])
rows = []
for part in sorted(p for p in out.glob("regen*.jsonl") if "failures" not in p.name):
    for line in part.read_text(encoding="utf-8").split("\n"):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
answers = [m["content"] for r in rows for m in r["conversations"] if m["role"] == "assistant"]
tokens = sum(len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers)
finish = [f for r in rows for f in r.get("regen", {}).get("finish_reasons", [])]
tmp = out / "train.jsonl.tmp"
tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
tmp.replace(out / "train.jsonl")
print(f"regen: {len(rows)} conversations, {tokens:,} answer tokens in {seconds} s "
      f"({tokens / max(seconds, 1):,.0f} tokens/s over all processes); {finish.count('length')} cut at max_tokens "
      f"-> {out / 'train.jsonl'}")
PYEOF
