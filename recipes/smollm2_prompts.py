"""The training prompts of the SmolLM2 reproduction (docs/results/smollm2.md), split into shards for ``regen``.

Train suites (issue 7): livecodebench, arena-hard-v2, swe-bench, lbpp, aime24 and the first half of math500;
the evaluation suites (gsm8k, math500-heldout = the second half, aime25, humaneval, mbpp, mt-bench) never appear.
Prompts longer than ``--max-prompt-tokens`` under the target's chat template are left out: training sequences
are cut at 1,024 tokens, so a longer prompt would leave no answer to learn from.

    python recipes/smollm2_prompts.py --tokenizer /tmp/smol_hf --shards 4 --out /tmp/prompts
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from dspark_lightning.eval.suites import read_first_turns, suite_path

TRAIN_SUITES = {"livecodebench": None, "arena-hard-v2": None, "swe-bench": None, "lbpp": None, "aime24": None,
                "math500": 250}  # suite -> first rows taken (None = all)


def training_prompts(tokenizer, max_prompt_tokens: int) -> tuple[list[dict], int]:
    """The train-split prompts of at most ``max_prompt_tokens`` under the chat template, as ``{id, source, turns,
    prompt_tokens}`` rows (ids ``<suite>-<line>``, as ``read_conversations`` names rows), and how many were longer."""
    rows, dropped = [], 0
    for suite, first in TRAIN_SUITES.items():
        for i, turn in enumerate(read_first_turns(suite_path(suite))[:first], start=1):
            text = tokenizer.apply_chat_template([{"role": "user", "content": turn}], add_generation_prompt=True,
                                                 tokenize=False)
            n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            if n > max_prompt_tokens:
                dropped += 1
                continue
            rows.append({"id": f"{suite}-{i}", "source": suite, "turns": [turn], "prompt_tokens": n})
    return rows, dropped


def length_grouped(rows: list[dict], group: int, seed: int = 0) -> list[dict]:
    """Rows sorted by prompt length, cut into groups of ``group`` (one ``generate`` batch each: little padding),
    the groups in a seeded random order: a regen stopped early keeps a spread of lengths, not only the shortest."""
    ordered = sorted(rows, key=lambda r: (r["prompt_tokens"], r["id"]))
    groups = [ordered[i:i + group] for i in range(0, len(ordered), group)]
    random.Random(seed).shuffle(groups)
    return [row for g in groups for row in g]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="the target's tokenizer directory (chat template)")
    parser.add_argument("--out", required=True, help="directory for shard<i>.jsonl")
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--max-prompt-tokens", type=int, default=512)
    parser.add_argument("--group", type=int, default=128, help="regen's batch size: rows of similar length")
    args = parser.parse_args()
    if args.shards < 1:
        raise SystemExit(f"--shards {args.shards}: give at least 1.")
    from transformers import AutoTokenizer

    rows, dropped = training_prompts(AutoTokenizer.from_pretrained(args.tokenizer), args.max_prompt_tokens)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for s in range(args.shards):
        with (out / f"shard{s}.jsonl").open("w", encoding="utf-8") as f:
            for row in length_grouped(rows[s::args.shards], args.group, seed=s):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{len(rows)} training prompts in {args.shards} shards under {out} ({dropped} over "
          f"{args.max_prompt_tokens} tokens left out)")


if __name__ == "__main__":
    main()
