"""Benchmark suites: shipped files, caps, chat-template prompts, rank split."""

from __future__ import annotations

import json

import pytest

from dspark_lightning.eval.suites import (
    REFERENCE_CAPS,
    SuitesDataModule,
    batch_prompts,
    load_suites,
    make_batches,
    read_first_turns,
    shipped_suites,
    subsample,
    suite_path,
)
from dspark_lightning.targets import TargetConfig

TINY = TargetConfig(tiny={"model_type": "qwen3", "vocab_size": 50, "hidden_size": 16, "intermediate_size": 32,
                          "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
                          "eos_token_id": 7})


class FakeTokenizer:
    """Characters as tokens; the chat template wraps the user turn like a ChatML template."""

    eos_token_id = 3

    def apply_chat_template(self, messages, tokenize, add_generation_prompt, enable_thinking):
        assert messages[0]["role"] == "user" and not tokenize and add_generation_prompt and not enable_thinking
        return f"<u>{messages[0]['content']}</u><a>"

    def __call__(self, text, add_special_tokens):
        return {"input_ids": [ord(c) % 50 for c in text]}


def test_shipped_suites_are_package_data_with_reference_caps():
    names = shipped_suites()
    assert {"gsm8k", "math500", "aime24", "aime25", "humaneval", "mbpp", "lbpp", "livecodebench", "mt-bench",
            "arena-hard-v2", "swe-bench"} <= set(names)
    assert set(REFERENCE_CAPS) <= set(names)
    assert len(read_first_turns(suite_path("mt-bench"))) == 80
    assert suite_path("arena-hard") == suite_path("arena-hard-v2")
    with pytest.raises(ValueError, match="Unknown suite 'gsm9k'"):
        suite_path("gsm9k")


def test_load_suites_caps_renders_and_stops(tmp_path):
    custom = tmp_path / "mine.jsonl"
    custom.write_text("\n".join(json.dumps({"turns": [f"q{i}", "second turn"]}) for i in range(5)) + "\n")
    suites = load_suites(TINY, ["aime25", str(custom), "random"], max_samples={"mine": 3, "random": 2},
                         tokenizer=FakeTokenizer())
    aime, mine, rand = suites
    assert (aime.name, len(aime.prompts)) == ("aime25", 30)  # reference cap
    assert mine.name == "mine" and len(mine.prompts) == 3
    assert mine.prompts == [FakeTokenizer()(f"<u>{t}</u><a>", False)["input_ids"]
                            for t in subsample([f"q{i}" for i in range(5)], 3)]
    assert aime.stop_token_ids == [3, 7]  # tokenizer eos + config eos
    assert rand.stop_token_ids == [] and len(rand.prompts) == 2 and all(len(p) == 16 for p in rand.prompts)
    assert subsample(list(range(10)), 4) == subsample(list(range(10)), 4) != list(range(4))


def test_batches_split_prompts_across_ranks_without_duplicates():
    suites = load_suites(TINY, ["random"], max_samples=7)
    seen = []
    for rank in range(3):
        for batch in make_batches(suites, batch_size=2, max_new_tokens=5, rank=rank, world_size=3):
            assert batch["suite"] == "random" and batch["prompt_ids"].shape[0] <= 2
            seen += batch["sample_index"].tolist()
            assert batch_prompts(batch) == [suites[0].prompts[i] for i in batch["sample_index"].tolist()]
    assert sorted(seen) == list(range(7))


def test_datamodule_yields_batches():
    dm = SuitesDataModule(target=TINY, suites=["random"], max_samples=5, max_new_tokens=4, batch_size=2)
    batches = list(dm.val_dataloader())
    assert [b["prompt_ids"].shape[0] for b in batches] == [2, 2, 1]
    assert dm.suite_names == ["random"]
    with pytest.raises(ValueError, match="needs the target"):
        SuitesDataModule()
