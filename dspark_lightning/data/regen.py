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
* ``engine`` (the default when a ``target`` is given): the target alone through the project's own
  :class:`~dspark_lightning.decoding.SpeculativeEngine` in this process, CUDA-graphed on a GPU, in large batches of
  prompts of similar length (``data/generation.py``).
* ``hf``: batched ``generate`` of the target's HF model in this process (left padding), for small targets.

``input="synthesise"`` has the target write the prompts too (Magpie, ``data/synthesis.py``), then answers them,
until ``max_answer_tokens`` answer tokens are written; in process only.

Every row's ``regen`` record says how it was made: backend, model and target, the prompt source (the input's
``source`` field or file name, or ``synthesised``), the sampling settings and seeds, and the answer tokens.
``heldout`` names evaluation suites whose prompts (and copies of them, ``data/dedup.py``) are never answered.

Output is appended one complete line per conversation; a rerun skips the ids already written (a partial last
line from a killed run is cut off first) and retries the failures. Each run appends its throughput (answer
tokens/s) to ``<output>.runs.jsonl`` and prints it.
"""

from __future__ import annotations

import json
import os
import random
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
from .generation import (
    SamplingSettings,
    Throughput,
    TokenGenerator,
    answer_conversations,
    derive_seed,
    load_generation_tokenizer,
    make_generator,
    render_prompt_ids,
    stop_token_ids,
)
from .synthesis import Synthesis, end_of_turn_ids

Reasoning = Literal["inline", "field", "drop"]
SYNTHESISE = "synthesise"  # the input that has the target write the prompts


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

    def record(self) -> dict[str, Any]:
        """The settings as a row records them."""
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
                "max_tokens": self.max_tokens, "enable_thinking": self.enable_thinking}

    def settings(self) -> SamplingSettings:
        return SamplingSettings(self.temperature, self.top_p, self.top_k, self.min_p, self.max_tokens)


@dataclass
class _Item:
    out_id: Any
    row: dict[str, Any]
    source: str = ""


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
                finish: list[str], record: dict[str, Any] | None = None) -> dict[str, Any]:
    extra = {k: v for k, v in item.row.items() if k not in ("id", "conversations", "turns", "regen")}
    extra.setdefault("prompt_id", item.row["id"])  # the answers of one prompt share it (a split keeps them together)
    return {**extra, "id": item.out_id, "conversations": messages,
            "regen": {"backend": backend, "model": model, "finish_reasons": finish, **(record or {})}}


def _prompt_source(row: dict[str, Any], input: str) -> str:
    """Where a given prompt came from: the row's ``source`` field, else the input file's name."""
    return str(row.get("source") or Path(str(input).split(":", 1)[-1]).stem)


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
        seed = None if backend.seed is None else backend.seed + sample
        record = {"prompt_source": item.source, "answer_sampling": {**backend.sampling.record(), "seed": seed}}
        return _output_row(item, messages, "openai", backend.model, finish, record)

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


# ---------------------------------------------------------------------- in process: engine or HF generate
def _target_record(target: TargetConfig) -> dict[str, Any]:
    return {"model": str(target.path or "tiny"), "target": target.identity()}


def _length_sorted_chunks(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Indices sorted by prompt length, cut into batches of ``batch_size`` (little padding), the batches in a seeded
    random order: a run stopped early keeps a spread of lengths, not only the shortest."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    random.Random(seed).shuffle(chunks)
    return chunks


def _run_in_process(generator: TokenGenerator, tokenizer: Any, target: TargetConfig, items: list[tuple[_Item, int]],
                    sampling: Sampling, batch_size: int, seed: int, out: _JsonlAppender, failures: _JsonlAppender,
                    bar: Any, max_answer_tokens: int | None, time_limit_s: float | None) -> tuple[int, int, Throughput]:
    """Answer ``items`` in batches of similar prompt length; each batch's rows are written once it is done."""
    stop_ids = stop_token_ids(tokenizer, target)
    kwargs = sampling.template_kwargs()
    settings = sampling.settings()
    record = {**_target_record(target), "seed": seed}
    lengths = []
    for item, _ in items:
        first_turn = next((k for k, m in enumerate(_prompt_messages(item.row)) if m["role"] == "user"), 0)
        lengths.append(len(render_prompt_ids(tokenizer, _prompt_messages(item.row)[:first_turn + 1], kwargs)))
    throughput = Throughput()
    started = time.perf_counter()
    ok = failed = 0
    for chunk_ids in _length_sorted_chunks(lengths, batch_size, seed):
        if max_answer_tokens is not None and throughput.tokens >= max_answer_tokens:
            break
        if time_limit_s is not None and time.perf_counter() - started > time_limit_s:
            break
        chunk = [items[i] for i in chunk_ids]
        call_seed = derive_seed(seed, "answers", chunk[0][0].out_id)
        t0 = time.perf_counter()
        try:
            answered = answer_conversations(generator, tokenizer, [_prompt_messages(item.row) for item, _ in chunk],
                                            settings, stop_ids, call_seed, kwargs)
        except Exception as err:  # record the chunk as failed and go on
            for item, _ in chunk:
                failures.write({"id": item.out_id, "error": f"{type(err).__name__}: {err}", "row": item.row})
            failed += len(chunk)
            bar.update(len(chunk))
            continue
        tokens = sum(sum(a.answer_tokens) for a in answered)
        throughput.add(tokens, len(chunk), time.perf_counter() - t0)
        for (item, _), done in zip(chunk, answered):
            row_record = {**record, "answer_tokens": done.answer_tokens, "prompt_source": item.source,
                          "answer_sampling": {**sampling.record(), "seed": call_seed}}
            out.write(_output_row(item, done.messages, generator.backend, record["model"], done.finish_reasons,
                                  row_record))
        ok += len(chunk)
        bar.update(len(chunk))
    return ok, failed, throughput


def _log_run(out_path: Path, entry: dict[str, Any]) -> None:
    """Append one run's summary (throughput included) to ``<output>.runs.jsonl``."""
    with out_path.with_name(out_path.name + ".runs.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(entry, ensure_ascii=False) + "\n")


def _throughput_line(what: str, throughput: Throughput, backend: str, batch_size: int, unit: str = "tokens") -> str:
    return (f"{what}: {throughput.tokens:,} {unit} in {throughput.seconds:.1f} s of generation: "
            f"{throughput.tokens_per_s:,.0f} {unit}/s ({backend}, batch {batch_size})")


def _run_synthesis(output: str, backend: str, target: TargetConfig, tokenizer_path: str | None,
                   synthesis: Synthesis, sampling: Sampling, *, max_answer_tokens: int | None, num_samples: int,
                   batch_size: int, heldout: list[str] | None, seed: int, device: str, time_limit_s: float | None,
                   progress: bool) -> dict[str, Any]:
    """``regen synthesise``: the target writes the prompts, then answers them (``data/synthesis.py``)."""
    from .dedup import HeldoutFilter
    from .synthesis import synthesise

    tokenizer = load_generation_tokenizer(target, tokenizer_path)
    started = time.time()
    generator = make_generator(backend, target, tokenizer, device)
    eos_ids = sorted(set(stop_token_ids(tokenizer, target)) - set(end_of_turn_ids(tokenizer, "assistant")))
    result = synthesise(
        generator, tokenizer, output, synthesis, sampling.settings(), answer_stop_ids=stop_token_ids(tokenizer, target),
        eos_ids=eos_ids or [tokenizer.eos_token_id], max_answer_tokens=max_answer_tokens, num_samples=num_samples,
        batch_size=batch_size, heldout=HeldoutFilter.from_suites(heldout) if heldout else None,
        heldout_suites=heldout, seed=seed, record={"backend": backend, **_target_record(target)},
        template_kwargs=sampling.template_kwargs(), time_limit_s=time_limit_s, progress=progress)
    summary = {"mode": SYNTHESISE, "backend": backend, "batch_size": batch_size,
               "prompt_batch_size": synthesis.batch_size, "written": result.written, "skipped": result.skipped,
               "prompts_kept": result.prompts_kept, "answer_tokens_total": result.answer_tokens,
               "dropped": result.dropped, "stopped_by": result.stopped_by,
               "prompts": result.prompt_throughput.record(), "answers": result.answer_throughput.record(),
               "answer_tokens_per_s": round(result.answer_throughput.tokens_per_s, 1),
               "wall_seconds": round(time.time() - started, 1)}
    _log_run(Path(output), summary)
    print(_throughput_line("synthesised prompts", result.prompt_throughput, backend, synthesis.batch_size))
    print(_throughput_line("answers", result.answer_throughput, backend, batch_size, "answer tokens"))
    print(f"regen synthesise: {result.written} conversations written to {output} ({result.skipped} already there), "
          f"{result.prompts_kept} prompts kept, dropped {result.dropped}, {result.answer_tokens:,} answer tokens in "
          f"all; stopped by the {result.stopped_by}.")
    return {"written": result.written, "failed": 0, "skipped": result.skipped, "prompts_kept": result.prompts_kept,
            "answer_tokens": result.answer_tokens, "answer_tokens_per_s": summary["answer_tokens_per_s"],
            "dropped": result.dropped, "stopped_by": result.stopped_by}


def _drop_heldout(rows: list[dict[str, Any]], suites: list[str] | None, path: Path) -> list[dict[str, Any]]:
    """The rows none of whose user turns copies a prompt of ``suites``; the others go to ``path`` (rewritten)."""
    if not suites:
        return rows
    from .dedup import HeldoutFilter

    heldout = HeldoutFilter.from_suites(suites)
    kept, dropped = [], []
    for row in rows:
        match = next((m for m in (heldout.match(msg["content"]) for msg in _prompt_messages(row)
                                  if msg["role"] == "user") if m), None)
        (dropped if match else kept).append({"id": row["id"], "reason": "heldout", "match": match, "row": row}
                                            if match else row)
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in dropped), encoding="utf-8")
    if dropped:
        print(f"regen: {len(dropped)} prompts copy a held-out prompt of {suites} and are left out (see {path}).")
    return kept


# ---------------------------------------------------------------------- the command
def regen(
    input: str,
    output: str,
    backend: Literal["openai", "engine", "hf"] | None = None,
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
    batch_size: int | None = None,
    device: str = "auto",
    seed: int = 0,
    max_prompts: int | None = None,
    progress: bool = True,
    synthesis: Synthesis | None = None,
    max_answer_tokens: int | None = None,
    heldout: list[str] | None = None,
    time_limit_s: float | None = None,
) -> dict[str, Any]:
    """Regenerate the assistant turns of prompt JSONL with the target, or have it write the prompts too.

    Args:
        input: prompts JSONL: ``{"turns": [...]}`` or ``{id, conversations}`` rows (assistant turns dropped); or
            ``synthesise``: the target writes the prompts (``synthesis``), then answers them (in process only).
        output: conversations JSONL, appended to (rerunning resumes: ids already there are skipped; a synthesis
            run resumes from its done-index ``<output>.index.jsonl``).
        backend: ``openai`` (HTTP servers), ``engine`` (the target alone through the project's speculative engine,
            in process, CUDA-graphed on a GPU) or ``hf`` (in-process ``generate``); default ``engine`` when a
            ``target`` is given, else ``openai``.
        base_urls: OpenAI API roots of the servers, e.g. ``["http://10.0.0.1:30000/v1", "http://10.0.0.2:30000/v1"]``.
        model: model name sent to the servers; default the first one ``GET /models`` lists.
        target: the target for the in-process back-ends (its tokenizer's chat template is used).
        tokenizer: tokenizer directory overriding the target's (in process).
        temperature, top_p, top_k, min_p, max_tokens: sampling of the answers (``temperature=0``: greedy). The
            engine samples without ``min_p``.
        enable_thinking: ``chat_template_kwargs.enable_thinking`` (``None``: not sent).
        reasoning: where a separate reasoning text goes: ``inline`` (``<think>...</think>`` before the answer),
            ``field`` (``reasoning_content`` of the message) or ``drop``.
        num_samples: answers per prompt; with more than one, ids become ``<id>-s<k>``.
        concurrency: requests in flight per server (``openai``).
        max_retries, retry_backoff_s: retries of a failed request (exponential back-off, next server each time).
        timeout_s: per request.
        api_key: bearer token; default ``$OPENAI_API_KEY``.
        failures: JSONL of prompts that failed (rewritten each run); default ``<output>.failures.jsonl``.
        batch_size: conversations per ``generate`` call (in process; default 256 for ``engine``, 8 for ``hf``),
            prompts of similar length together.
        device: ``auto``, ``cpu`` or ``cuda`` (in process).
        seed: sampling seed (in process: each call's seed is derived from it; sent as ``seed + sample`` to servers).
        max_prompts: use only the first prompts.
        progress: show a progress bar.
        synthesis: how the target writes the prompts (``input="synthesise"``; default :class:`Synthesis`()).
        max_answer_tokens: stop once this many answer tokens are written (synthesis: the budget; in process with
            given prompts: no new batch starts after it).
        heldout: evaluation suites (names or JSONL paths) whose prompts, and copies of them, are never answered
            (``data/dedup.py``: near duplicates and shared 13-word n-grams), e.g. the six the SmolLM2 drafters are
            validated on.
        time_limit_s: start no new batch (synthesis: round) after this many seconds (in process), so a job under a
            deadline stops between batches.

    Returns:
        ``{"written", "failed", "skipped"}`` (skipped: already in ``output``), the answer tokens and the throughput
        (in process), and for a synthesis the prompts kept and the drop counts by reason.
    """
    from tqdm.auto import tqdm

    backend = backend or ("engine" if target is not None else "openai")
    if backend not in ("openai", "engine", "hf"):
        raise ValueError(f"backend={backend!r}; choose 'openai', 'engine' or 'hf'.")
    batch_size = batch_size or (256 if backend == "engine" else 8)
    if num_samples < 1 or concurrency < 1 or batch_size < 1 or max_retries < 0:
        raise ValueError("num_samples, concurrency and batch_size must be >= 1 and max_retries >= 0.")
    if backend != "openai" and target is None:
        raise ValueError(f"backend={backend!r} needs target (the model that answers).")
    sampling = Sampling(temperature, top_p, top_k, min_p, max_tokens, enable_thinking)
    if input == SYNTHESISE:
        if backend == "openai":
            raise ValueError("input='synthesise' runs in process: give target (and backend 'engine' or 'hf').")
        return _run_synthesis(output, backend, target, tokenizer, synthesis or Synthesis(), sampling,
                              max_answer_tokens=max_answer_tokens, num_samples=num_samples, batch_size=batch_size,
                              heldout=heldout, seed=seed, device=device, time_limit_s=time_limit_s, progress=progress)
    rows = read_conversations(input)[:max_prompts]
    out_path = Path(output)
    rows = _drop_heldout(rows, heldout, out_path.with_name(out_path.name + ".dropped.jsonl"))
    done = _done_ids(out_path)
    items: list[tuple[_Item, int]] = []
    for row in rows:
        for k in range(num_samples):
            out_id = row["id"] if num_samples == 1 else f"{row['id']}-s{k}"
            if str(out_id) not in done:
                items.append((_Item(out_id, row, _prompt_source(row, input)), k))
    skipped = len(rows) * num_samples - len(items)
    out = _JsonlAppender(out_path)
    fail = _JsonlAppender(Path(failures) if failures else out_path.with_name(out_path.name + ".failures.jsonl"),
                          truncate=True)
    bar = tqdm(total=len(items), desc=f"regen ({backend})", unit="conv", disable=not progress)
    throughput = None
    started = time.time()
    try:
        if backend == "openai":
            client = _OpenAIBackend(base_urls or ["http://127.0.0.1:30000/v1"], model, sampling,
                                    max_retries=max_retries, retry_backoff_s=retry_backoff_s, timeout_s=timeout_s,
                                    api_key=api_key or os.environ.get("OPENAI_API_KEY"), seed=seed,
                                    reasoning=reasoning)
            written, failed = _run_openai(client, items, out, fail, concurrency * len(client.base_urls), bar)
        else:
            tok = load_generation_tokenizer(target, tokenizer)
            generator = make_generator(backend, target, tok, device)
            written, failed, throughput = _run_in_process(generator, tok, target, items, sampling, batch_size, seed,
                                                          out, fail, bar, max_answer_tokens, time_limit_s)
    finally:
        bar.close()
        out.close()
        fail.close()
    result: dict[str, Any] = {"written": written, "failed": failed, "skipped": skipped}
    if throughput is not None:
        result.update(answer_tokens=throughput.tokens, answer_tokens_per_s=round(throughput.tokens_per_s, 1))
        _log_run(out_path, {"mode": "answer", "backend": backend, "batch_size": batch_size, **result,
                            "answers": throughput.record(), "wall_seconds": round(time.time() - started, 1)})
        print(_throughput_line("answers", throughput, backend, batch_size, "answer tokens"))
    print(f"regen: {written} conversations written to {out_path}, {failed} failed"
          f"{f' (see {fail.f.name})' if failed else ''}, {skipped} already there.")
    return result
