"""Pick the built-in demo conversations (``builtin:smollm2_demo``) from a regen output of recipes/smollm2_data.sh.

Rule: first samples (``-s0``) whose answer ended on its own (finish reason ``stop``) and whose SmolLM2 chat-template
rendering is at most ``--max-tokens`` tokens, taken round-robin over the source suites in id order, ``--rows`` rows.

    python recipes/smollm2_demo_set.py /tmp/data/train.jsonl --tokenizer /tmp/smol_hf \
        --out dspark_lightning/resources/conversations/smollm2_demo.jsonl
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from dspark_lightning.data.conversations import read_conversations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("regen_output", type=Path)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=108)
    parser.add_argument("--max-tokens", type=int, default=384)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    by_source: dict[str, list[dict]] = defaultdict(list)
    for row in read_conversations(args.regen_output):
        if not row["id"].endswith("-s0") or row.get("regen", {}).get("finish_reasons") != ["stop"]:
            continue
        text = tokenizer.apply_chat_template(row["conversations"], tokenize=False)
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= args.max_tokens:
            by_source[row["source"]].append(row)
    queues = [sorted(rows, key=lambda r: r["id"]) for _, rows in sorted(by_source.items())]
    picked: list[dict] = []
    while len(picked) < args.rows and any(queues):
        for queue in queues:
            if queue and len(picked) < args.rows:
                picked.append(queue.pop(0))
    picked.sort(key=lambda r: r["id"])
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in picked), encoding="utf-8")
    counts = defaultdict(int)
    for r in picked:
        counts[r["source"]] += 1
    print(f"{len(picked)} rows -> {args.out}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
    main()
