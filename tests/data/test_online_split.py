"""The online data modules' validation split: whole prompts on one side, the plain shuffled split otherwise."""

from __future__ import annotations

import random

from dspark_lightning.data.online import prompt_group, split_by_group


def test_one_sample_per_group_is_the_plain_seeded_split():
    order = list(range(40))
    random.Random(3).shuffle(order)  # what the split did before groups existed
    train, val = split_by_group(list(range(40)), 0.1, seed=3)
    assert val == order[:4] and train == order[4:]


def test_the_answers_to_one_prompt_stay_on_one_side():
    groups = [f"p{i // 3}" for i in range(60)]  # 20 prompts, 3 answers each
    train, val = split_by_group(groups, 0.25, seed=0)
    assert sorted(train + val) == list(range(60)) and len(val) == 5 * 3
    assert not {groups[i] for i in train} & {groups[i] for i in val}


def test_prompt_group_reads_prompt_id_or_strips_the_sample_suffix():
    assert prompt_group({"id": "synth-3-7-s1", "prompt_id": "synth-3-7"}) == "synth-3-7"
    assert prompt_group({"id": "math500-49-s2"}) == prompt_group({"id": "math500-49-s0"}) == "math500-49"
    assert prompt_group({"id": 12}) == "12"


def test_forked_tokenising_workers_give_what_one_process_gives(chat_tokenizer):
    from transformers import AutoTokenizer

    from dspark_lightning.data.online import tokenize_rows

    tok = AutoTokenizer.from_pretrained(chat_tokenizer)
    conversations = [[{"role": "user", "content": f"question {i} about the lazy dog"},
                      {"role": "assistant", "content": "the quick brown fox " * (i % 5 + 1)}] for i in range(24)]
    alone = tokenize_rows(tok, conversations, max_length=120)
    forked = tokenize_rows(tok, conversations, max_length=120, workers=3)
    assert len(forked) == len(alone) == 24
    for (ids_a, mask_a), (ids_b, mask_b) in zip(alone, forked):
        assert ids_a.dtype == ids_b.dtype and mask_a.dtype == mask_b.dtype
        assert ids_a.tolist() == ids_b.tolist() and mask_a.tolist() == mask_b.tolist() and mask_a.any()
