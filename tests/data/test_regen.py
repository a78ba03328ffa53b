"""regen: the OpenAI-compatible back-end against a fake server on 127.0.0.1 (turns, sampling fields, several
servers, retries, failures file, resume), and the in-process HF back-end on a tiny model + tokenizer."""

from __future__ import annotations

import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dspark_lightning.data.conversations import read_conversations
from dspark_lightning.data.regen import regen
from dspark_lightning.targets import TargetConfig

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards hex every jovial bystander".split()


# ---------------------------------------------------------------------- a fake OpenAI-compatible server
class FakeServer:
    """Answers ``POST /v1/chat/completions`` with ``"<name>: re <last user message>"``.

    ``fail`` maps a user message to ``(status, times)``: answer ``status`` for its first ``times`` requests
    (``times=None``: always).
    """

    def __init__(self, name: str) -> None:
        self.name, self.requests, self.fail = name, [], {}
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                self._send(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                last = body["messages"][-1]["content"]
                with server.lock:
                    server.requests.append(body)
                    status, times = server.fail.get(last, (200, 0))
                    if times is None or times > 0:
                        if times:
                            server.fail[last] = (status, times - 1)
                        return self._send(status, {"error": {"message": f"{status} for {last!r}"}})
                message = {"role": "assistant", "content": f"{server.name}: re {last}"}
                if (body.get("chat_template_kwargs") or {}).get("enable_thinking"):
                    message["reasoning_content"] = f"thinking about {last}"
                self._send(200, {"id": "x", "object": "chat.completion", "model": body["model"],
                                 "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def servers():
    pair = [FakeServer("A"), FakeServer("B")]
    yield pair
    for s in pair:
        s.close()


def write_prompts(path: Path) -> None:
    rows = [
        {"turns": ["hello", "and then?"]},
        {"id": "sys", "source": "demo", "conversations": [
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "OLD ANSWER"}, {"role": "user", "content": "q2"}]},
        *({"id": f"p{i}", "turns": [f"prompt {i}"]} for i in range(6)),
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def rows_by_id(path: Path) -> dict:
    return {str(r["id"]): r for r in read_conversations(path)}


# ---------------------------------------------------------------------- OpenAI back-end
def test_openai_backend_answers_every_user_turn(tmp_path, servers):
    write_prompts(tmp_path / "prompts.jsonl")
    result = regen(str(tmp_path / "prompts.jsonl"), str(tmp_path / "out.jsonl"), base_urls=[s.url for s in servers],
                   temperature=0.5, top_p=0.9, top_k=5, min_p=0.05, max_tokens=64, concurrency=2, progress=False)
    assert result == {"written": 8, "failed": 0, "skipped": 0}
    out = rows_by_id(tmp_path / "out.jsonl")
    first = out["prompts-1"]["conversations"]  # a {"turns"} row gets the file-stem id
    assert [m["role"] for m in first] == ["user", "assistant", "user", "assistant"]
    assert first[1]["content"].endswith(": re hello") and first[3]["content"].endswith(": re and then?")
    sys_row = out["sys"]
    assert sys_row["source"] == "demo" and sys_row["regen"]["finish_reasons"] == ["stop", "stop"]
    assert [m["content"] for m in sys_row["conversations"][:2]] == ["Be brief.", "q1"]
    assert "OLD ANSWER" not in json.dumps(sys_row)  # the dataset's own answers are replaced
    requests = servers[0].requests + servers[1].requests
    assert servers[0].requests and servers[1].requests  # spread over both servers
    second_turn = next(r for r in requests if r["messages"][-1]["content"] == "q2")
    assert second_turn["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q1"},
                                       sys_row["conversations"][2], {"role": "user", "content": "q2"}]
    assert {(r["model"], r["temperature"], r["top_p"], r["top_k"], r["min_p"], r["max_tokens"]) for r in requests} == {
        ("fake-model", 0.5, 0.9, 5, 0.05, 64)}
    assert all(r["chat_template_kwargs"] == {"enable_thinking": False} for r in requests)


def test_retries_failures_file_and_resume(tmp_path, servers):
    write_prompts(tmp_path / "prompts.jsonl")
    servers[1].fail = servers[0].fail  # one failure budget for both: "prompt 1" fails once, wherever it goes
    servers[0].fail.update({"prompt 1": (500, 1), "prompt 2": (400, None), "prompt 3": (503, None)})
    args = dict(base_urls=[s.url for s in servers], concurrency=3, max_retries=2, retry_backoff_s=0.01, progress=False)
    first = regen(str(tmp_path / "prompts.jsonl"), str(tmp_path / "out.jsonl"), **args)
    assert first == {"written": 6, "failed": 2, "skipped": 0}  # prompt 1 succeeded on its retry
    failures = {r["id"]: r for r in map(json.loads, (tmp_path / "out.jsonl.failures.jsonl").read_text().splitlines())}
    assert set(failures) == {"p2", "p3"}
    assert "HTTP 400" in failures["p2"]["error"] and "attempt 1 of 3" in failures["p2"]["error"]  # no retry on 4xx
    assert "HTTP 503" in failures["p3"]["error"] and "attempt 3 of 3" in failures["p3"]["error"]
    assert failures["p2"]["row"]["conversations"][0]["content"] == "prompt 2"
    requests = [r["messages"][-1]["content"] for s in servers for r in s.requests]
    assert requests.count("prompt 1") == 2 and requests.count("prompt 2") == 1 and requests.count("prompt 3") == 3

    # A killed run leaves half a line; the servers recover; the rerun does only what is missing.
    with (tmp_path / "out.jsonl").open("a") as f:
        f.write('{"id": "p9", "conversa')
    servers[0].fail.clear()
    for s in servers:
        s.requests.clear()
    second = regen(str(tmp_path / "prompts.jsonl"), str(tmp_path / "out.jsonl"), **args)
    assert second == {"written": 2, "failed": 0, "skipped": 6}
    assert sorted(r["messages"][-1]["content"] for s in servers for r in s.requests) == ["prompt 2", "prompt 3"]
    out = (tmp_path / "out.jsonl").read_text().splitlines()
    assert len(out) == 8 and {json.loads(line)["id"] for line in out} == set(rows_by_id(tmp_path / "prompts.jsonl"))
    assert (tmp_path / "out.jsonl.failures.jsonl").read_text() == ""


def test_samples_thinking_and_reasoning(tmp_path, servers):
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": 1, "turns": ["why?"]}) + "\n")
    regen(str(tmp_path / "p.jsonl"), str(tmp_path / "out.jsonl"), base_urls=[servers[0].url], num_samples=3,
          enable_thinking=True, model="served-name", seed=10, progress=False)
    out = rows_by_id(tmp_path / "out.jsonl")
    assert set(out) == {"1-s0", "1-s1", "1-s2"}
    reply = out["1-s0"]["conversations"][1]["content"]
    assert reply == "<think>\nthinking about why?\n</think>\n\nA: re why?"
    assert sorted(r["seed"] for r in servers[0].requests) == [10, 11, 12]
    assert {r["model"] for r in servers[0].requests} == {"served-name"}
    assert all(r["chat_template_kwargs"] == {"enable_thinking": True} for r in servers[0].requests)
    regen(str(tmp_path / "p.jsonl"), str(tmp_path / "field.jsonl"), base_urls=[servers[0].url], enable_thinking=True,
          reasoning="field", progress=False)
    message = rows_by_id(tmp_path / "field.jsonl")["1"]["conversations"][1]
    assert message == {"role": "assistant", "content": "A: re why?", "reasoning_content": "thinking about why?"}


def test_unreachable_server_is_a_failure_not_a_crash(tmp_path):
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": 1, "turns": ["hi"]}) + "\n")
    result = regen(str(tmp_path / "p.jsonl"), str(tmp_path / "out.jsonl"), base_urls=["http://127.0.0.1:9/v1"],
                   model="m", max_retries=1, retry_backoff_s=0.01, timeout_s=2, progress=False)
    assert result == {"written": 0, "failed": 1, "skipped": 0}
    assert "127.0.0.1:9" in (tmp_path / "out.jsonl.failures.jsonl").read_text()


# ---------------------------------------------------------------------- HF back-end
@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    rng = random.Random(0)
    tok.train_from_iterator([" ".join(rng.choices(WORDS, k=20)) for _ in range(100)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = TEMPLATE
    folder = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(folder)
    return str(folder)


TINY = dict(model_type="qwen3", vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
            initializer_range=0.2)


def test_hf_backend_batched_greedy_equals_one_by_one(tmp_path, tiny_tokenizer):
    """Left padding is right: a batch of prompts of different lengths (one multi-turn) decodes as they do alone."""
    prompts = [{"id": "long", "turns": ["the quick brown fox jumps over a lazy dog", "and the wizards?"]},
               {"id": "short", "turns": ["hex"]}, {"id": "mid", "turns": ["seven jovial wizards"]}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    target = TargetConfig(tiny=TINY, seed=0)
    kwargs = dict(backend="hf", target=target, tokenizer=tiny_tokenizer, temperature=0.0, max_tokens=8,
                  device="cpu", progress=False)
    assert regen(str(tmp_path / "p.jsonl"), str(tmp_path / "batched.jsonl"), batch_size=3, **kwargs)["written"] == 3
    regen(str(tmp_path / "p.jsonl"), str(tmp_path / "single.jsonl"), batch_size=1, **kwargs)
    batched, single = rows_by_id(tmp_path / "batched.jsonl"), rows_by_id(tmp_path / "single.jsonl")
    assert [m["role"] for m in batched["long"]["conversations"]] == ["user", "assistant", "user", "assistant"]
    for key in ("long", "short", "mid"):
        assert batched[key]["conversations"] == single[key]["conversations"]
        assert batched[key]["regen"]["backend"] == "hf"
        assert set(batched[key]["regen"]["finish_reasons"]) <= {"stop", "length"}
    assert any(m["content"] for r in batched.values() for m in r["conversations"] if m["role"] == "assistant")


def test_hf_backend_samples_distinct_answers(tmp_path, tiny_tokenizer):
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": "q", "turns": ["a lazy dog"]}) + "\n")
    regen(str(tmp_path / "p.jsonl"), str(tmp_path / "out.jsonl"), backend="hf", target=TargetConfig(tiny=TINY, seed=0),
          tokenizer=tiny_tokenizer, temperature=1.0, top_k=0, top_p=1.0, max_tokens=12, num_samples=4, batch_size=4,
          device="cpu", progress=False)
    out = rows_by_id(tmp_path / "out.jsonl")
    assert set(out) == {"q-s0", "q-s1", "q-s2", "q-s3"}
    assert len({r["conversations"][1]["content"] for r in out.values()}) > 1
