"""regen in process through the project's engine: the same greedy answers as HF generate, the record of every row,
the held-out filter on given prompts, the answer-token budget, and which sampling arguments reach the engine."""

from __future__ import annotations

import json

import pytest

from dspark_lightning.data.conversations import read_conversations
from dspark_lightning.data.generation import EngineGenerator, SamplingSettings
from dspark_lightning.data.regen import regen

GSM8K_2 = "A robe takes 2 bolts of blue fiber and half that much white fiber.  How many bolts in total does it take?"
PROMPTS = [{"id": "long", "source": "demo", "turns": ["the quick brown fox jumps over a lazy dog", "and the wizards?"]},
           {"id": "short", "turns": ["hex"]}, {"id": "mid", "turns": ["seven jovial wizards"]},
           {"id": "sys", "conversations": [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "why is the sky blue"}]}]


def rows_by_id(path):
    return {str(r["id"]): r for r in read_conversations(path)}


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


def test_engine_answers_what_hf_generate_answers_greedily(prompts, tmp_path, tiny_chat_target, chat_tokenizer):
    """The engine (target alone, right-padded slots) and HF generate (left padding) decode the same greedy tokens,
    multi-turn and system prompts included, in batches of mixed lengths."""
    kwargs = dict(target=tiny_chat_target, tokenizer=chat_tokenizer, temperature=0.0, max_tokens=8, device="cpu",
                  progress=False, batch_size=3)
    engine = regen(str(prompts), str(tmp_path / "engine.jsonl"), **kwargs)  # the default in process
    regen(str(prompts), str(tmp_path / "hf.jsonl"), backend="hf", **kwargs)
    assert engine["written"] == 4 and engine["answer_tokens"] > 0 and engine["answer_tokens_per_s"] > 0
    by_engine, by_hf = rows_by_id(tmp_path / "engine.jsonl"), rows_by_id(tmp_path / "hf.jsonl")
    assert set(by_engine) == set(by_hf) == {"long", "short", "mid", "sys"}
    assert [m["role"] for m in by_engine["long"]["conversations"]] == ["user", "assistant", "user", "assistant"]
    for key in by_engine:
        assert by_engine[key]["conversations"] == by_hf[key]["conversations"]
        assert by_engine[key]["regen"]["answer_tokens"] == by_hf[key]["regen"]["answer_tokens"]
    assert any(m["content"] for r in by_engine.values() for m in r["conversations"] if m["role"] == "assistant")


def test_every_given_prompt_row_records_how_it_was_made(prompts, tmp_path, tiny_chat_target, chat_tokenizer):
    regen(str(prompts), str(tmp_path / "out.jsonl"), target=tiny_chat_target, tokenizer=chat_tokenizer,
          temperature=1.0, top_p=1.0, top_k=0, max_tokens=6, num_samples=2, seed=7, device="cpu", progress=False)
    rows = rows_by_id(tmp_path / "out.jsonl")
    assert set(rows) == {f"{p['id']}-s{k}" for p in PROMPTS for k in range(2)}
    for out_id, row in rows.items():
        record = row["regen"]
        assert row["prompt_id"] == out_id.rsplit("-s", 1)[0]  # the samples of a prompt share it
        assert record["backend"] == "engine" and record["target"] == tiny_chat_target.identity()
        assert record["prompt_source"] == ("demo" if out_id.startswith("long") else "prompts")  # source or file
        assert record["answer_sampling"] == {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
                                             "max_tokens": 6, "enable_thinking": False,
                                             "seed": record["answer_sampling"]["seed"]}
        assert record["seed"] == 7 and len(record["answer_tokens"]) == len(record["finish_reasons"])
    runs = [json.loads(line) for line in (tmp_path / "out.jsonl.runs.jsonl").read_text().splitlines()]
    assert runs[0]["mode"] == "answer" and runs[0]["answers"]["rows"] == 8 and runs[0]["answers"]["tokens"] == sum(
        sum(r["regen"]["answer_tokens"]) for r in rows.values())


def test_heldout_prompts_are_never_answered(tmp_path, tiny_chat_target, chat_tokenizer):
    path = tmp_path / "p.jsonl"
    rows = [{"id": "ok", "turns": ["Write a poem about the sea."]}, {"id": "copy", "turns": [GSM8K_2]},
            {"id": "second-turn", "turns": ["Hello!", GSM8K_2.upper()]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = regen(str(path), str(tmp_path / "out.jsonl"), target=tiny_chat_target, tokenizer=chat_tokenizer,
                   temperature=0.0, max_tokens=4, heldout=["gsm8k", "mt-bench"], device="cpu", progress=False)
    assert result["written"] == 1 and set(rows_by_id(tmp_path / "out.jsonl")) == {"ok"}
    dropped = [json.loads(line) for line in (tmp_path / "out.jsonl.dropped.jsonl").read_text().splitlines()]
    assert [(d["id"], d["reason"], d["match"]) for d in dropped] == [("copy", "heldout", "gsm8k:2"),
                                                                    ("second-turn", "heldout", "gsm8k:2")]


def test_answer_token_budget_stops_between_batches(prompts, tmp_path, tiny_chat_target, chat_tokenizer):
    result = regen(str(prompts), str(tmp_path / "out.jsonl"), target=tiny_chat_target, tokenizer=chat_tokenizer,
                   temperature=0.0, max_tokens=5, batch_size=1, max_answer_tokens=1, device="cpu", progress=False)
    assert result["written"] == 1 and 1 <= result["answer_tokens"] <= 10  # one batch (at most two turns of 5)


class StubEngine:
    """Records the keyword arguments of ``generate``; ``accepts`` decides whether it has top_p/top_k."""

    def __init__(self, accepts: bool) -> None:
        self.kwargs: list[dict] = []
        if accepts:
            def generate(prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, stop_token_ids=(), seed=0):
                return self._out(prompts, locals())
        else:
            def generate(prompts, *, max_new_tokens, temperature=0.0, stop_token_ids=(), seed=0):
                return self._out(prompts, locals())
        self.generate = generate

    def _out(self, prompts, args):
        self.kwargs.append({k: v for k, v in args.items() if k not in ("prompts", "self")})
        return type("Out", (), {"tokens": [[5, 2]] * len(prompts), "stopped": [True] * len(prompts)})()


def stub_generator(accepts: bool) -> EngineGenerator:
    import inspect

    gen = EngineGenerator.__new__(EngineGenerator)
    gen.engine = StubEngine(accepts)
    gen._accepts = set(inspect.signature(gen.engine.generate).parameters)
    return gen


def test_top_p_and_top_k_reach_the_engine_only_when_on():
    new = stub_generator(accepts=True)
    out = new.generate([[1, 2]], SamplingSettings(1.0, 0.95, 20, 0.0, 8), [2], seed=4)
    assert out[0].tokens == [5] and out[0].stopped  # the stop token is left out
    assert new.engine.kwargs[-1] == {"max_new_tokens": 8, "temperature": 1.0, "top_p": 0.95, "top_k": 20,
                                     "stop_token_ids": [2], "seed": 4}
    new.generate([[1, 2]], SamplingSettings(0.0, 0.95, 20, 0.0, 8), [2], seed=4)  # greedy: no sampling arguments
    assert new.engine.kwargs[-1] == {"max_new_tokens": 8, "temperature": 0.0, "top_p": 1.0, "top_k": 0,
                                     "stop_token_ids": [2], "seed": 4}
    old = stub_generator(accepts=False)
    old.generate([[1]], SamplingSettings(1.0, 1.0, 0, 0.0, 8), [2], seed=0)  # plain sampling runs on any engine
    with pytest.raises(ValueError, match=r"takes no \['top_k', 'top_p'\].*top_p 1.0, top_k 0\) or use backend='hf'"):
        old.generate([[1]], SamplingSettings(1.0, 0.9, 5, 0.0, 8), [2], seed=0)
    with pytest.raises(ValueError, match="min_p=0.1: the engine samples without min_p"):
        old.generate([[1]], SamplingSettings(1.0, 1.0, 0, 0.1, 8), [2], seed=0)
