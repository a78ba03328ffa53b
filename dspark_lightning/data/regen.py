"""``regen``: have the target answer the prompts, so the drafter learns the target's own distribution.

Input rows are prompts, ``{"turns": [...]}`` or ``{id, conversations}`` (assistant turns in them are dropped,
system and user turns kept). For every user turn in order, the conversation so far is sent to the target and
its reply is appended, so multi-turn prompts become multi-turn conversations in the target's words. Output
rows are ``{id, conversations: [{role, content}, ...]}`` plus the input's other keys and a ``regen`` record
(backend, model, finish reasons).

Back-ends:

* ``openai``: any OpenAI-compatible chat server (SGLang, vLLM, ...), several base URLs, ``concurrency`` requests
  in flight per URL (threads), retries with back-off that move to the next URL, a JSONL file of failures.
  Non-standard sampling fields (``top_k``, ``min_p``, ``chat_template_kwargs``) go in the request body, as
  SGLang and vLLM accept them.
* ``hf``: batched ``generate`` of the target's HF model in this process (left padding), for small targets.

Output is appended one complete line per conversation; a rerun skips the ids already written (a partial last
line from a killed run is cut off first) and retries the failures.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..targets import TargetConfig
from .conversations import read_conversations

Reasoning = Literal["inline", "field", "drop"]


@dataclass
class Sampling:
    """Sampling parameters (DeepSpec's Qwen3 defaults: temperature 0.7, top_p 0.8, top_k 20, min_p 0).

    Args:
        temperature: 0 = greedy.
        top_p: nucleus mass.
        top_k: keep the k most likely tokens (0 = off).
        min_p: drop tokens below ``min_p`` times the top probability (0 = off).
        max_tokens: longest reply, in tokens.
        enable_thinking: passed to the chat template as ``chat_template_kwargs={"enable_thinking": ...}``
            (Qwen3-style thinking switch); ``None`` passes nothing.
    """

    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20
    min_p: float = 0.0
    max_tokens: int = 4096
    enable_thinking: bool | None = False

    def template_kwargs(self) -> dict[str, Any]:
        return {} if self.enable_thinking is None else {"enable_thinking": self.enable_thinking}


@dataclass
class _Item:
    out_id: Any
    row: dict[str, Any]


class _Failure(Exception):
    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


# ---------------------------------------------------------------------- output files
class _JsonlAppender:
    """Thread-safe appender: each record is one ``write`` of a whole line, flushed at once."""

    def __init__(self, path: Path, truncate: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = path.open("w" if truncate else "a", encoding="utf-8")
        self.lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self.lock:
            self.f.write(line)
            self.f.flush()

    def close(self) -> None:
        os.fsync(self.f.fileno())
        self.f.close()


def _done_ids(path: Path) -> set[str]:
    """Ids already in ``path``; a partial last line (a killed run) is cut off."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with path.open("r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    done = set()
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if line.strip():
            try:
                done.add(str(json.loads(line)["id"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}:{lineno} is not a regen output row; move the file away or fix it.") from None
    return done


def _prompt_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """System and user messages of a row; the original assistant turns are dropped."""
    return [{"role": m["role"], "content": m["content"]} for m in row["conversations"] if m["role"] != "assistant"]


def _output_row(item: _Item, messages: list[dict[str, Any]], backend: str, model: str,
                finish: list[str]) -> dict[str, Any]:
    extra = {k: v for k, v in item.row.items() if k not in ("id", "conversations", "turns", "regen")}
    return {**extra, "id": item.out_id, "conversations": messages,
            "regen": {"backend": backend, "model": model, "finish_reasons": finish}}


def _with_reasoning(content: str, reasoning: str | None, mode: Reasoning) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning:
        if mode == "inline":
            message["content"] = f"<think>\n{reasoning.strip()}\n</think>\n\n{content.lstrip()}"
        elif mode == "field":
            message["reasoning_content"] = reasoning
    return message


# ---------------------------------------------------------------------- OpenAI-compatible servers
def _post_json(url: str, payload: dict[str, Any], timeout_s: float, api_key: str | None) -> dict[str, Any]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = response.read()
    except urllib.error.HTTPError as err:
        detail = err.read()[:300].decode("utf-8", "replace")
        retryable = err.code in (408, 429) or err.code >= 500
        raise _Failure(f"HTTP {err.code} from {url}: {detail}", retryable=retryable) from None
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
        raise _Failure(f"{url}: {getattr(err, 'reason', err)}", retryable=True) from None
    try:
        return json.loads(body)
    except json.JSONDecodeError:
        raise _Failure(f"{url} answered with invalid JSON: {body[:200]!r}", retryable=True) from None


def _server_model(base_url: str, timeout_s: float, api_key: str | None) -> str:
    """The first model a server lists (SGLang and vLLM serve one), or ``"default"``."""
    request = urllib.request.Request(f"{base_url.rstrip('/')}/models",
                                     headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())["data"][0]["id"]
    except Exception:  # any failure: the server will say what it wants in the chat call
        return "default"


class _OpenAIBackend:
    def __init__(self, base_urls: list[str], model: str | None, sampling: Sampling, *, max_retries: int,
                 retry_backoff_s: float, timeout_s: float, api_key: str | None, seed: int | None,
                 reasoning: Reasoning) -> None:
        if not base_urls:
            raise ValueError("base_urls is empty; give the OpenAI API root of each server, e.g. "
                             "http://127.0.0.1:30000/v1.")
        self.base_urls = [u.rstrip("/") for u in base_urls]
        self.model = model or _server_model(self.base_urls[0], timeout_s, api_key)
        self.sampling, self.max_retries, self.retry_backoff_s = sampling, max_retries, retry_backoff_s
        self.timeout_s, self.api_key, self.seed, self.reasoning = timeout_s, api_key, seed, reasoning

    def _payload(self, messages: list[dict[str, Any]], sample: int) -> dict[str, Any]:
        s = self.sampling
        payload: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": s.temperature,
                                   "top_p": s.top_p, "max_tokens": s.max_tokens}
        if s.top_k > 0:
            payload["top_k"] = s.top_k
        if s.min_p > 0:
            payload["min_p"] = s.min_p
        if s.template_kwargs():
            payload["chat_template_kwargs"] = s.template_kwargs()
        if self.seed is not None:
            payload["seed"] = self.seed + sample
        return payload

    def answer(self, index: int, item: _Item, sample: int) -> tuple[list[dict[str, Any]], list[str]]:
        """Answer every user turn of one conversation (sequential turns; retries move to the next server)."""
        history: list[dict[str, Any]] = []  # what the server sees: no reasoning in past turns
        output: list[dict[str, Any]] = []
        finish: list[str] = []
        for message in _prompt_messages(item.row):
            history.append(message)
            output.append(message)
            if message["role"] != "user":
                continue
            reply = self._call(index, self._payload(history, sample))
            choice = (reply.get("choices") or [None])[0]
            if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
                raise _Failure(f"reply without choices[0].message: {json.dumps(reply)[:200]}", retryable=False)
            content = choice["message"].get("content") or ""
            reasoning = choice["message"].get("reasoning_content") or choice["message"].get("reasoning")
            history.append({"role": "assistant", "content": content})
            output.append(_with_reasoning(content, reasoning, self.reasoning))
            finish.append(str(choice.get("finish_reason")))
        return output, finish

    def _call(self, index: int, payload: dict[str, Any]) -> dict[str, Any]:
        for attempt in range(self.max_retries + 1):
            url = self.base_urls[(index + attempt) % len(self.base_urls)] + "/chat/completions"
            try:
                return _post_json(url, payload, self.timeout_s, self.api_key)
            except _Failure as err:
                if not err.retryable or attempt == self.max_retries:
                    raise _Failure(f"{err} (attempt {attempt + 1} of {self.max_retries + 1})", False) from None
                time.sleep(self.retry_backoff_s * 2**attempt)
        raise AssertionError("unreachable")


def _run_openai(backend: _OpenAIBackend, items: list[tuple[_Item, int]], out: _JsonlAppender,
                failures: _JsonlAppender, workers: int, bar: Any) -> tuple[int, int]:
    ok = failed = 0

    def job(index: int, item: _Item, sample: int) -> dict[str, Any]:
        messages, finish = backend.answer(index, item, sample)
        return _output_row(item, messages, "openai", backend.model, finish)

    pending: dict[Future, _Item] = {}
    queue: Iterator = iter(enumerate(items))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="regen") as pool:
        while True:
            while len(pending) < 2 * workers:  # bounded: a million prompts need not be a million futures
                nxt = next(queue, None)
                if nxt is None:
                    break
                index, (item, sample) = nxt
                pending[pool.submit(job, index, item, sample)] = item
            if not pending:
                break
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                item = pending.pop(future)
                err = future.exception()
                if err is None:
                    out.write(future.result())
                    ok += 1
                else:
                    failures.write({"id": item.out_id, "error": str(err), "row": item.row})
                    failed += 1
                bar.update(1)
    return ok, failed


# ---------------------------------------------------------------------- in-process HF generate
def _run_hf(target: TargetConfig, tokenizer_path: str | None, items: list[tuple[_Item, int]], sampling: Sampling,
            batch_size: int, seed: int, out: _JsonlAppender, failures: _JsonlAppender, reasoning: Reasoning,
            device: str, bar: Any) -> tuple[int, int]:
    import torch

    from ..targets import FrozenTarget, load_tokenizer

    if tokenizer_path is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    else:
        tokenizer = load_tokenizer(target)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    model = FrozenTarget.from_config(target, [0], device=dev).model
    tokenizer.padding_side = "left"  # generation continues at the right edge of every row
    if tokenizer.pad_token is None:  # e.g. a tokenizer read from GGUF: batching needs one; eos is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    gen_kwargs: dict[str, Any] = {"max_new_tokens": sampling.max_tokens, "pad_token_id": pad, "eos_token_id": eos}
    if sampling.temperature > 0:
        gen_kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                          top_k=sampling.top_k or None, min_p=sampling.min_p or None)
    else:
        gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    name = str(target.path or "tiny")
    torch.manual_seed(seed)
    ok = failed = 0
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        prompts = [_prompt_messages(item.row) for item, _ in chunk]
        outputs: list[list[dict[str, Any]]] = [[] for _ in chunk]
        finish: list[list[str]] = [[] for _ in chunk]
        histories: list[list[dict[str, Any]]] = [[] for _ in chunk]
        cursors = [0] * len(chunk)
        try:
            while True:
                # Advance each conversation to its next user turn; batch all that have one.
                active = []
                for b, messages in enumerate(prompts):
                    while cursors[b] < len(messages):
                        message = messages[cursors[b]]
                        cursors[b] += 1
                        histories[b].append(message)
                        outputs[b].append(message)
                        if message["role"] == "user":
                            active.append(b)
                            break
                if not active:
                    break
                texts = [tokenizer.apply_chat_template(histories[b], tokenize=False, add_generation_prompt=True,
                                                       **sampling.template_kwargs()) for b in active]
                enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
                with torch.no_grad():
                    generated = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                               **gen_kwargs)
                for row, b in enumerate(active):
                    new = generated[row, enc["input_ids"].shape[1]:].tolist()
                    stopped = eos in new
                    text = tokenizer.decode(new[: new.index(eos)] if stopped else new, skip_special_tokens=True)
                    histories[b].append({"role": "assistant", "content": text.strip()})
                    outputs[b].append(_with_reasoning(text.strip(), None, reasoning))
                    finish[b].append("stop" if stopped else "length")
        except Exception as err:  # record the chunk as failed and go on
            for item, _ in chunk:
                failures.write({"id": item.out_id, "error": f"{type(err).__name__}: {err}", "row": item.row})
            failed += len(chunk)
            bar.update(len(chunk))
            continue
        for b, (item, _) in enumerate(chunk):
            out.write(_output_row(item, outputs[b], "hf", name, finish[b]))
        ok += len(chunk)
        bar.update(len(chunk))
    return ok, failed


# ---------------------------------------------------------------------- the command
def regen(
    input: str,
    output: str,
    backend: Literal["openai", "hf"] = "openai",
    base_urls: list[str] | None = None,
    model: str | None = None,
    target: TargetConfig | None = None,
    tokenizer: str | None = None,
    temperature: float = 0.7,
    top_p: float = 0.8,
    top_k: int = 20,
    min_p: float = 0.0,
    max_tokens: int = 4096,
    enable_thinking: bool | None = False,
    reasoning: Reasoning = "inline",
    num_samples: int = 1,
    concurrency: int = 32,
    max_retries: int = 3,
    retry_backoff_s: float = 1.0,
    timeout_s: float = 600.0,
    api_key: str | None = None,
    failures: str | None = None,
    batch_size: int = 8,
    device: str = "auto",
    seed: int = 0,
    max_prompts: int | None = None,
    progress: bool = True,
) -> dict[str, int]:
    """Regenerate the assistant turns of prompt JSONL with the target.

    Args:
        input: prompts JSONL: ``{"turns": [...]}`` or ``{id, conversations}`` rows (assistant turns dropped).
        output: conversations JSONL, appended to (rerunning resumes: ids already there are skipped).
        backend: ``openai`` (HTTP servers) or ``hf`` (in-process ``generate`` of ``target``).
        base_urls: OpenAI API roots of the servers, e.g. ``["http://10.0.0.1:30000/v1", "http://10.0.0.2:30000/v1"]``.
        model: model name sent to the servers; default the first one ``GET /models`` lists.
        target: the target for the ``hf`` backend (its tokenizer's chat template is used).
        tokenizer: tokenizer directory overriding the target's (``hf`` backend).
        temperature, top_p, top_k, min_p, max_tokens: sampling (``temperature=0``: greedy).
        enable_thinking: ``chat_template_kwargs.enable_thinking`` (``None``: not sent).
        reasoning: where a separate reasoning text goes: ``inline`` (``<think>...</think>`` before the answer),
            ``field`` (``reasoning_content`` of the message) or ``drop``.
        num_samples: answers per prompt; with more than one, ids become ``<id>-s<k>``.
        concurrency: requests in flight per server (``openai``).
        max_retries, retry_backoff_s: retries of a failed request (exponential back-off, next server each time).
        timeout_s: per request.
        api_key: bearer token; default ``$OPENAI_API_KEY``.
        failures: JSONL of prompts that failed (rewritten each run); default ``<output>.failures.jsonl``.
        batch_size: prompts per ``generate`` call (``hf``).
        device: ``auto``, ``cpu`` or ``cuda`` (``hf``).
        seed: sampling seed (``hf``; sent as ``seed + sample`` to servers).
        max_prompts: use only the first prompts.
        progress: show a progress bar.

    Returns:
        ``{"written", "failed", "skipped"}`` (skipped: already in ``output``).
    """
    from tqdm.auto import tqdm

    if num_samples < 1 or concurrency < 1 or batch_size < 1 or max_retries < 0:
        raise ValueError("num_samples, concurrency and batch_size must be >= 1 and max_retries >= 0.")
    sampling = Sampling(temperature, top_p, top_k, min_p, max_tokens, enable_thinking)
    rows = read_conversations(input)[:max_prompts]
    out_path = Path(output)
    done = _done_ids(out_path)
    items: list[tuple[_Item, int]] = []
    for row in rows:
        for k in range(num_samples):
            out_id = row["id"] if num_samples == 1 else f"{row['id']}-s{k}"
            if str(out_id) not in done:
                items.append((_Item(out_id, row), k))
    skipped = len(rows) * num_samples - len(items)
    out = _JsonlAppender(out_path)
    fail = _JsonlAppender(Path(failures) if failures else out_path.with_name(out_path.name + ".failures.jsonl"),
                          truncate=True)
    bar = tqdm(total=len(items), desc=f"regen ({backend})", unit="conv", disable=not progress)
    try:
        if backend == "openai":
            client = _OpenAIBackend(base_urls or ["http://127.0.0.1:30000/v1"], model, sampling,
                                    max_retries=max_retries, retry_backoff_s=retry_backoff_s, timeout_s=timeout_s,
                                    api_key=api_key or os.environ.get("OPENAI_API_KEY"), seed=seed,
                                    reasoning=reasoning)
            written, failed = _run_openai(client, items, out, fail, concurrency * len(client.base_urls), bar)
        elif backend == "hf":
            if target is None:
                raise ValueError("backend='hf' needs target (the model that answers).")
            written, failed = _run_hf(target, tokenizer, items, sampling, batch_size, seed, out, fail, reasoning,
                                      device, bar)
        else:
            raise ValueError(f"backend={backend!r}; choose 'openai' or 'hf'.")
    finally:
        bar.close()
        out.close()
        fail.close()
    print(f"regen: {written} conversations written to {out_path}, {failed} failed"
          f"{f' (see {fail.f.name})' if failed else ''}, {skipped} already there.")
    return {"written": written, "failed": failed, "skipped": skipped}
