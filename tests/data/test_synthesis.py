"""regen's prompt synthesis (Magpie): the template prefix, cleaning and filters, dedup, the held-out filter at
generation time, the record on every row, and resume after an interruption; a tiny random target through the
project's engine on the CPU, and a scripted generator where the test needs chosen texts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from dspark_lightning.data import synthesis as synthesis_module
from dspark_lightning.data.dedup import HeldoutFilter
from dspark_lightning.data.generation import Generated, SamplingSettings
from dspark_lightning.data.regen import regen
from dspark_lightning.data.synthesis import Synthesis, clean_prompt, degenerate_reason, synthesise, user_turn
from dspark_lightning.decoding import SpeculativeEngine

from .conftest import GEMMA_TEMPLATE, LLAMA3_TEMPLATE, build_chat_tokenizer

SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
GSM8K_1 = ("Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her "
           "friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh duck "
           "egg. How much in dollars does she make every day at the farmers' market?")


# ---------------------------------------------------------------------- the template
def test_user_turn_is_the_template_up_to_the_user_content(chat_tokenizer, tmp_path):
    tok = AutoTokenizer.from_pretrained(chat_tokenizer)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    turn = user_turn(tok)  # SmolLM2's template adds its default system prompt
    assert turn.prefix == SMOL_SYSTEM + "<|im_start|>user\n" and turn.end == "<|im_end|>\n"
    assert turn.prefix_ids == tok(turn.prefix, add_special_tokens=False)["input_ids"]
    assert turn.stop_token_ids == [im_end]
    assert user_turn(tok, "Be brief.").prefix == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
    for template, eos, prefix, stop in [
        (LLAMA3_TEMPLATE, "<|eot_id|>", "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
        (GEMMA_TEMPLATE, "<|endoftext|>", "<bos><start_of_turn>user\n", "<end_of_turn>"),
    ]:
        other = AutoTokenizer.from_pretrained(build_chat_tokenizer(tmp_path / stop.strip("<|>"), template, eos))
        turn = user_turn(other)
        assert turn.prefix == prefix
        assert set(turn.stop_token_ids) == {other.convert_tokens_to_ids(stop), other.eos_token_id}


def test_user_turn_refuses_templates_it_cannot_cut(chat_tokenizer):
    tok = AutoTokenizer.from_pretrained(chat_tokenizer)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="renders the content of the last message 2 times"):
        user_turn(tok)
    tok.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        user_turn(tok)


def test_clean_and_degenerate():
    syn = Synthesis(min_words=3, max_chars=60)
    assert clean_prompt("  Hello there,  friend \r\n\n\n\nBye <|im_end|> junk", "<|im_end|>\n") == \
        "Hello there,  friend\n\nBye"
    assert degenerate_reason("Write a poem.", syn) is None
    assert degenerate_reason("Hi you", syn) == "short"
    assert degenerate_reason("word " * 20, syn) == "long"
    assert degenerate_reason("go to the shop " * 3, syn) == "repetitive"  # 3-grams 3 distinct of 10
    assert degenerate_reason("Say it.\nSay it.\nSay it.", Synthesis(max_chars=100)) == "repetitive"


# ---------------------------------------------------------------------- a scripted generator
class Scripted:
    """Writes the scripted requests (round by round) and answers every conversation with one fixed text."""

    backend = "scripted"

    def __init__(self, tokenizer, rounds: list[list[tuple[str, bool]]], answer: str = "Here is the answer.") -> None:
        self.tok, self.rounds, self.answer = tokenizer, list(rounds), answer
        self.prefix = user_turn(tokenizer).prefix_ids
        self.calls: list[tuple[list[list[int]], SamplingSettings, int]] = []

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def generate(self, prompts, sampling, stop_token_ids, seed):
        self.calls.append((prompts, sampling, seed))
        if all(p == self.prefix for p in prompts):
            script = self.rounds.pop(0)
            assert len(script) == len(prompts)
            return [Generated(self.encode(text), stopped) for text, stopped in script]
        return [Generated(self.encode(self.answer), True) for _ in prompts]


def test_filters_dedup_and_heldout_at_generation_time(chat_tokenizer, tmp_path):
    tok = AutoTokenizer.from_pretrained(chat_tokenizer)
    script = [
        [("Write a poem about the quick brown fox.", True),
         ("write a POEM about the quick brown fox", True),  # the same request
         ("Hi", True),  # short
         (GSM8K_1, True),  # an evaluation prompt
         ("fox fox fox fox fox fox fox fox fox fox fox fox", True),  # a loop
         ("Explain why the sky is blue and list", False),  # cut at max_tokens
         ("Tell me <|im_start|> a lazy dog", True),  # a template token
         ("Explain why the sky is blue, in three facts.", True)],
        [("Please write a poem about the quick brown fox.", True),  # near duplicate of round 0's first
         ("How can seven wizards hex a jovial bystander?", True),
         *[(f"List {n} facts about the lazy dog.", True) for n in range(6)]],  # beyond num_prompts: surplus
    ]
    gen = Scripted(tok, script)
    syn = Synthesis(batch_size=8, num_prompts=3)
    out = tmp_path / "synth.jsonl"
    result = synthesise(gen, tok, out, syn, SamplingSettings(0.7, 1.0, 0, 0.0, 16), answer_stop_ids=[2],
                        eos_ids=[tok.eos_token_id], max_answer_tokens=None,
                        heldout=HeldoutFilter.from_suites(["gsm8k"]), heldout_suites=["gsm8k"], seed=5,
                        record={"backend": "scripted"}, progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["conversations"][0]["content"] for r in rows] == [
        "Write a poem about the quick brown fox.", "Explain why the sky is blue, in three facts.",
        "How can seven wizards hex a jovial bystander?"]
    assert [r["id"] for r in rows] == ["synth-0-0", "synth-0-7", "synth-1-1"]
    assert all(r["conversations"][1] == {"role": "assistant", "content": "Here is the answer."} for r in rows)
    dropped = [json.loads(line) for line in out.with_name("synth.jsonl.dropped.jsonl").read_text().splitlines()]
    assert [(d["prompt_id"], d["reason"], d["match"]) for d in dropped] == [
        ("synth-0-1", "duplicate", "synth-0-0"), ("synth-0-2", "short", None), ("synth-0-3", "heldout", "gsm8k:1"),
        ("synth-0-4", "repetitive", None), ("synth-0-5", "unfinished", None), ("synth-0-6", "template", None),
        ("synth-1-0", "duplicate", "synth-0-0"), *[(f"synth-1-{k}", "surplus", None) for k in range(2, 8)]]
    assert result.prompts_kept == 3 and result.dropped == {"duplicate": 2, "short": 1, "heldout": 1,
                                                            "repetitive": 1, "unfinished": 1, "template": 1,
                                                            "surplus": 6}
    # The requests were sampled with the synthesis settings and each round's derived seed; answers with theirs.
    prompt_calls = [c for c in gen.calls if all(p == gen.prefix for p in c[0])]
    assert [c[1] for c in prompt_calls] == [SamplingSettings(1.0, 0.95, 0, 0.0, 128)] * 2
    assert rows[0]["regen"]["prompt_sampling"]["seed"] == prompt_calls[0][2] != prompt_calls[1][2]
    index = [json.loads(line) for line in out.with_name("synth.jsonl.index.jsonl").read_text().splitlines()]
    assert index[0]["settings"]["heldout_suites"] == ["gsm8k"] and [e["kept"] for e in index[1:]] == [2, 1]
    assert index[-1]["output_bytes"] == out.stat().st_size


def test_a_round_that_keeps_nothing_three_times_stops_with_the_reasons(chat_tokenizer, tmp_path):
    tok = AutoTokenizer.from_pretrained(chat_tokenizer)
    gen = Scripted(tok, [[("Hi", True)]] * 3)
    with pytest.raises(RuntimeError, match=r"3 rounds in a row kept no request .*'short': 1"):
        synthesise(gen, tok, tmp_path / "s.jsonl", Synthesis(batch_size=1), SamplingSettings(), answer_stop_ids=[2],
                   eos_ids=[2], max_answer_tokens=10, progress=False)


def test_synthesis_needs_a_budget(chat_tokenizer, tmp_path):
    tok = AutoTokenizer.from_pretrained(chat_tokenizer)
    with pytest.raises(ValueError, match="needs a budget: give max_answer_tokens"):
        synthesise(Scripted(tok, []), tok, tmp_path / "s.jsonl", Synthesis(), SamplingSettings(), answer_stop_ids=[2],
                   eos_ids=[2], max_answer_tokens=None, progress=False)


# ---------------------------------------------------------------------- the tiny target through the engine
TINY_SYNTH = dict(max_tokens=8, batch_size=6, drop_unfinished=False, min_words=1, top_p=1.0)


def run_synthesis(out: Path, target, tokenizer, budget: int, **kwargs):
    args = dict(backend="engine", target=target, tokenizer=tokenizer, device="cpu", temperature=1.0, top_p=1.0,
                top_k=0, max_tokens=6, batch_size=4, max_answer_tokens=budget, seed=3, progress=False,
                synthesis=Synthesis(**TINY_SYNTH))
    return regen("synthesise", str(out), **{**args, **kwargs})


@pytest.fixture
def engine_calls(monkeypatch):
    """Every SpeculativeEngine.generate call: (prompts, keyword arguments, result)."""
    calls = []
    original = SpeculativeEngine.generate

    def spy(self, prompts, **kwargs):
        result = original(self, prompts, **kwargs)
        calls.append(([list(p) for p in prompts], kwargs, result))
        return result

    monkeypatch.setattr(SpeculativeEngine, "generate", spy)
    return calls


def test_requests_come_out_of_the_template_and_every_row_carries_its_record(tiny_chat_target, chat_tokenizer,
                                                                            tmp_path, engine_calls):
    tok = AutoTokenizer.from_pretrained(chat_tokenizer)
    out = tmp_path / "synth.jsonl"
    result = run_synthesis(out, tiny_chat_target, chat_tokenizer, budget=30)
    prefix = tok(SMOL_SYSTEM + "<|im_start|>user\n", add_special_tokens=False)["input_ids"]
    prompt_calls = [c for c in engine_calls if c[0] == [prefix] * 6]
    assert prompt_calls and all(c[1]["max_new_tokens"] == 8 and c[1]["temperature"] == 1.0 for c in prompt_calls)
    assert "top_p" not in prompt_calls[0][1]  # off (1.0): not passed, so any engine version runs it
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and result["written"] == len(rows) and result["answer_tokens"] >= 30
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for row in rows:  # each request is what the engine wrote after the template prefix, decoded and cleaned
        _, round_, k = row["prompt_id"].split("-")
        tokens = prompt_calls[int(round_)][2].tokens[int(k)]
        tokens = tokens[:-1] if tokens and tokens[-1] == im_end else tokens
        assert row["conversations"][0] == {"role": "user",
                                           "content": clean_prompt(tok.decode(tokens, skip_special_tokens=True))}
        assert row["conversations"][1]["role"] == "assistant" and row["source"] == "synthesised"
        record = row["regen"]
        assert record["backend"] == "engine" and record["model"] == "tiny"
        assert record["target"] == tiny_chat_target.identity() and record["seed"] == 3
        assert record["prompt_source"] == "synthesised" and record["round"] == int(round_)
        assert record["prompt_sampling"] == {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
                                             "max_tokens": 8, "seed": record["prompt_sampling"]["seed"],
                                             "system_prompt": None}
        assert record["answer_sampling"]["temperature"] == 1.0 and record["answer_sampling"]["max_tokens"] == 6
        assert len(record["answer_tokens"]) == len(record["finish_reasons"]) == 1
        assert 1 <= record["answer_tokens"][0] <= 6
    runs = [json.loads(line) for line in out.with_name("synth.jsonl.runs.jsonl").read_text().splitlines()]
    assert runs[-1]["mode"] == "synthesise" and runs[-1]["answers"]["tokens"] == result["answer_tokens"]
    assert runs[-1]["answer_tokens_per_s"] > 0


def test_an_interrupted_synthesis_resumes_to_what_an_uninterrupted_one_writes(tiny_chat_target, chat_tokenizer,
                                                                             tmp_path, monkeypatch):
    whole = tmp_path / "whole.jsonl"
    run_synthesis(whole, tiny_chat_target, chat_tokenizer, budget=60)
    rounds = len(whole.with_name("whole.jsonl.index.jsonl").read_text().splitlines()) - 1
    assert rounds >= 3

    # Killed between writing round 1's rows and its index line, mid-way through a further line.
    cut = tmp_path / "cut.jsonl"
    original = synthesis_module._Appender.write

    def write(self, record):
        if self.path.name.endswith(".index.jsonl") and record.get("round") == 1:
            with cut.open("a") as f:
                f.write('{"id": "synth-9-9", "conv')
            raise KeyboardInterrupt
        original(self, record)

    monkeypatch.setattr(synthesis_module._Appender, "write", write)
    with pytest.raises(KeyboardInterrupt):
        run_synthesis(cut, tiny_chat_target, chat_tokenizer, budget=60)
    monkeypatch.setattr(synthesis_module._Appender, "write", original)
    result = run_synthesis(cut, tiny_chat_target, chat_tokenizer, budget=60)
    assert result["skipped"] > 0  # round 0 was kept
    assert cut.read_text() == whole.read_text()
    beside = lambda path, suffix: path.with_name(path.name + suffix).read_text()
    assert beside(cut, ".dropped.jsonl") == beside(whole, ".dropped.jsonl")
    timing = ("prompt_seconds", "answer_seconds")

    def index(path):
        lines = beside(path, ".index.jsonl").splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in lines]

    assert index(cut) == index(whole)
    # A finished run resumed with the same budget writes nothing more; with other settings it is refused.
    assert run_synthesis(cut, tiny_chat_target, chat_tokenizer, budget=60)["written"] == 0
    with pytest.raises(ValueError, match=r"other settings \(\['answer'\] differ\)"):
        run_synthesis(cut, tiny_chat_target, chat_tokenizer, budget=60, temperature=0.5)


def test_an_output_that_is_not_a_synthesis_is_refused(tiny_chat_target, chat_tokenizer, tmp_path):
    out = tmp_path / "given.jsonl"
    out.write_text('{"id": "x", "conversations": []}\n')
    with pytest.raises(ValueError, match="not a synthesis output"):
        run_synthesis(out, tiny_chat_target, chat_tokenizer, budget=10)
