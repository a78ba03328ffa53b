"""Prompt synthesis with the target itself (Magpie: Xu et al. 2024, "Magpie: Alignment Data Synthesis from Scratch
by Prompting Aligned LLMs with Nothing"), for ``regen synthesise``.

The chat template is rendered up to where a user message's content starts (the system turn, the template's
default system prompt if it has one, and the user header: ``<|im_start|>user\\n`` for ChatML) and the target
continues it: what it writes before its end-of-turn token is a request in the target's own words. The prefix is
found by rendering a one-message conversation whose content is a sentinel string and cutting at the sentinel, so
any HF chat template works, with no per-family table.

Each *round* generates ``batch_size`` requests, cleans them, drops the degenerate ones (unfinished, template
tokens, too short, too long, repetitive), the ones that copy a held-out evaluation prompt
(:class:`~.dedup.HeldoutFilter`) and the duplicates of requests kept before (:class:`~.dedup.NearDuplicateIndex`),
then answers the rest (:func:`~.generation.answer_conversations`) until the answer-token budget is spent.

Files, all appended to (``<output>`` is the conversations JSONL):

* ``<output>``: one row per answer, ``{id, prompt_id, source: "synthesised", conversations, regen: {...}}``;
* ``<output>.dropped.jsonl``: every generated request that was not kept, with the reason (and the held-out prompt
  or earlier request it matched);
* ``<output>.index.jsonl``: the *done-index*, a settings line, then one line per finished round (counts, seeds,
  timings, and the byte sizes of the two files after the round), written only once the round's rows are on disk.

A killed run is resumed by cutting both files back to the sizes the last index line records, so a round is either
wholly there or not at all, and rerunning continues with the next round's seeds (``derive_seed(seed, "prompts",
round)``): an interrupted and resumed run writes exactly what an uninterrupted one does. A resume with different
settings (sampling, filters, seed, target) is refused rather than mixing two data sets.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .dedup import HeldoutFilter, NearDuplicateIndex, words
from .generation import (
    Answered,
    SamplingSettings,
    Throughput,
    TokenGenerator,
    answer_conversations,
    derive_seed,
)

SENTINEL = "QZXUSERCONTENTXZQ"  # stands for a message's content while the template is rendered
SOURCE = "synthesised"
EMPTY_ROUNDS_LIMIT = 3  # rounds in a row that keep no prompt before the run gives up


@dataclass
class Synthesis:
    """How the target writes the prompts (``regen synthesise``).

    Args:
        system_prompt: a system message before the user turn (and in every conversation written); None renders the
            template without one (SmolLM2's then adds its default system prompt, as it does in training).
        temperature, top_p, top_k: sampling of the requests (Magpie: T = 1, top-p 0.95; more diverse than greedy).
        max_tokens: longest request, in tokens; one that reaches it without an end-of-turn token is unfinished.
        batch_size: requests generated per round.
        num_prompts: stop once this many requests are kept (None: only the answer-token budget stops the run).
        min_words: shorter requests are dropped.
        max_chars: longer requests are dropped.
        min_distinct: a request of 10 words or more whose distinct word 3-grams are fewer than this fraction of its
            3-grams is repetitive (a loop), as is one with a non-blank line repeated 3 times.
        drop_unfinished: drop requests that ended at ``max_tokens`` rather than at an end-of-turn token.
        dedup_threshold: Jaccard similarity (word 3-gram shingles) at which a request duplicates an earlier one.
    """

    system_prompt: str | None = None
    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 0
    max_tokens: int = 128
    batch_size: int = 512
    num_prompts: int | None = None
    min_words: int = 3
    max_chars: int = 2000
    min_distinct: float = 0.5
    drop_unfinished: bool = True
    dedup_threshold: float = 0.7

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_tokens < 1 or (self.num_prompts is not None and self.num_prompts < 1):
            raise ValueError(f"batch_size={self.batch_size}, max_tokens={self.max_tokens} and num_prompts="
                             f"{self.num_prompts} must be >= 1.")

    def sampling(self) -> SamplingSettings:
        return SamplingSettings(self.temperature, self.top_p, self.top_k, 0.0, self.max_tokens)

    def settings(self) -> dict[str, Any]:
        """What defines the prompts a run makes (a resume must not change it); the budget and batching may."""
        return {k: v for k, v in asdict(self).items() if k not in ("num_prompts", "batch_size")}


# ---------------------------------------------------------------------- the chat template
@dataclass
class UserTurn:
    """The chat template around a user message's content.

    Attributes:
        prefix: the rendering before the content (system turn, user header).
        prefix_ids: its token ids: what the target is given.
        end: what the template writes after the content (e.g. ``<|im_end|>\\n``).
        stop_token_ids: tokens that end the request: the template's end-of-turn token and the EOS tokens.
    """

    prefix: str
    prefix_ids: list[int]
    end: str
    stop_token_ids: list[int]


def _around_sentinel(tokenizer: Any, messages: list[dict[str, str]],
                     template_kwargs: dict[str, Any]) -> tuple[str, str]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{type(tokenizer).__name__} has no chat template; prompt synthesis renders the template up "
                         f"to a user turn: set tokenizer.chat_template.")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False, **template_kwargs)
    if text.count(SENTINEL) != 1:
        raise ValueError(f"The chat template renders the content of the last message {text.count(SENTINEL)} times "
                         f"(expected once), so the text around it cannot be found: {text[:300]!r}.")
    at = text.index(SENTINEL)
    return text[:at], text[at + len(SENTINEL):]


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids.update(i for i, token in decoder.items() if getattr(token, "special", False))
    return ids


def end_of_turn_ids(tokenizer: Any, role: str = "user", template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """The special token that closes a ``role`` turn in the chat template (``<|im_end|>``, ``<|eot_id|>``,
    ``<end_of_turn>``), as a one-element list; empty when the template closes turns with plain text."""
    before = [{"role": "user", "content": "Hi."}] if role == "assistant" else []
    _, end = _around_sentinel(tokenizer, [*before, {"role": role, "content": SENTINEL}], template_kwargs or {})
    ids = tokenizer(end, add_special_tokens=False)["input_ids"] if end else []
    return [ids[0]] if ids and ids[0] in _special_ids(tokenizer) else []


def user_turn(tokenizer: Any, system_prompt: str | None = None,
              template_kwargs: dict[str, Any] | None = None, eos_ids: list[int] | None = None) -> UserTurn:
    """The template up to a user message's content (see the module docstring).

    Args:
        tokenizer: the target's tokenizer with its chat template.
        system_prompt: a system message before the user turn (None: none; the template may add its default).
        template_kwargs: extra chat-template arguments (``enable_thinking``).
        eos_ids: end-of-sequence ids that also stop a request (default: the tokenizer's EOS).

    Raises:
        ValueError: no chat template, a template that does not render the content once, or no token to stop at.
    """
    kwargs = template_kwargs or {}
    system = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    prefix, end = _around_sentinel(tokenizer, [*system, {"role": "user", "content": SENTINEL}], kwargs)
    if eos_ids is None:
        eos = getattr(tokenizer, "eos_token_id", None)
        eos_ids = [] if eos is None else [eos]
    stops = sorted({*eos_ids, *end_of_turn_ids(tokenizer, "user", kwargs)})
    if not stops:
        raise ValueError("The chat template closes a user turn with no special token and the tokenizer has no EOS "
                         "token: the target's requests would never stop. Give eos_ids.")
    return UserTurn(prefix, tokenizer(prefix, add_special_tokens=False)["input_ids"], end, stops)


# ---------------------------------------------------------------------- cleaning and filtering
def clean_prompt(text: str, end: str = "") -> str:
    """A generated request as it will be stored: cut at the template's end-of-turn text if the target wrote it as
    plain text, line ends normalised, trailing spaces and runs of blank lines removed, stripped."""
    marker = end.strip()
    if marker and marker in text:
        text = text[:text.index(marker)]
    text = text.replace("\r\n", "\n")
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def degenerate_reason(text: str, syn: Synthesis) -> str | None:
    """Why a cleaned request is unusable (``short``, ``long``, ``repetitive``), or None."""
    tokens = words(text)
    if len(tokens) < syn.min_words:
        return "short"
    if len(text) > syn.max_chars:
        return "long"
    if len(tokens) >= 10:
        grams = [tuple(tokens[i:i + 3]) for i in range(len(tokens) - 2)]
        if len(set(grams)) < syn.min_distinct * len(grams):
            return "repetitive"
    lines = Counter(line.strip() for line in text.splitlines() if line.strip())
    if lines and max(lines.values()) >= 3:
        return "repetitive"
    return None


# ---------------------------------------------------------------------- files: rows, dropped, done-index
def _complete_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of ``path``; a partial last line (a killed run) is cut off the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with path.open("r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


def _truncate(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size > size:
        with path.open("r+b") as f:
            f.truncate(size)
    elif size and (not path.exists() or path.stat().st_size < size):
        raise ValueError(f"{path} is shorter than the {size} bytes its done-index records: it was edited or replaced. "
                         f"Move the output and its .index.jsonl/.dropped.jsonl away to start over.")


@dataclass
class _State:
    """What a run resumes from: the finished rounds' totals and the requests kept so far."""

    next_round: int = 0
    kept: int = 0
    rows: int = 0
    answer_tokens: int = 0
    empty_rounds: int = 0


def _resume(out: Path, index: Path, dropped: Path, settings: dict[str, Any], dedup: NearDuplicateIndex) -> _State:
    """Cut ``out`` and ``dropped`` back to the last finished round, check the settings, refill ``dedup``."""
    entries = _complete_lines(index)
    if not entries:
        if out.exists() and out.stat().st_size:
            raise ValueError(f"{out} exists but {index} (the done-index of a synthesis run) does not: it is not a "
                             f"synthesis output. Give another output path, or move {out} away.")
        return _State()
    recorded = entries[0].get("settings")
    if recorded != json.loads(json.dumps(settings)):
        changed = sorted(k for k in {*recorded, *settings} if recorded.get(k) != settings.get(k)) if recorded else []
        raise ValueError(f"{out} was synthesised with other settings ({changed or 'no settings line'} differ): a "
                         f"resume would mix two data sets. Rerun with the recorded settings ({index}, first line), or "
                         f"give another output path.")
    rounds = entries[1:]
    last = rounds[-1] if rounds else {"output_bytes": 0, "dropped_bytes": 0}
    _truncate(out, last["output_bytes"])
    _truncate(dropped, last["dropped_bytes"])
    state = _State(next_round=rounds[-1]["round"] + 1 if rounds else 0)
    for row in _complete_lines(out):
        state.rows += 1
        state.answer_tokens += sum(row["regen"]["answer_tokens"])
        if dedup.add(_request(row), row["prompt_id"]) is None:
            state.kept += 1
    for entry in reversed(rounds):
        if entry["kept"]:
            break
        state.empty_rounds += 1
    return state


def _request(row: dict[str, Any]) -> str:
    return next(m["content"] for m in row["conversations"] if m["role"] == "user")


class _Appender:
    """Appends whole lines; :meth:`sync` makes them durable before the done-index names them."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.f = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def sync(self) -> int:
        self.f.flush()
        os.fsync(self.f.fileno())
        return self.f.tell()

    def close(self) -> None:
        self.f.close()


# ---------------------------------------------------------------------- the run
@dataclass
class SynthesisResult:
    """What one ``regen synthesise`` call did (``written``: rows this call; ``skipped``: rows already there)."""

    written: int
    skipped: int
    prompts_kept: int
    answer_tokens: int
    dropped: dict[str, int]
    prompt_throughput: Throughput
    answer_throughput: Throughput
    stopped_by: str


def synthesise(generator: TokenGenerator, tokenizer: Any, output: str | Path, syn: Synthesis,
               answer: SamplingSettings, *, answer_stop_ids: list[int], eos_ids: list[int],
               max_answer_tokens: int | None, num_samples: int = 1, batch_size: int = 512,
               heldout: HeldoutFilter | None = None, heldout_suites: list[str] | None = None, seed: int = 0,
               record: dict[str, Any] | None = None, template_kwargs: dict[str, Any] | None = None,
               time_limit_s: float | None = None, progress: bool = True) -> SynthesisResult:
    """Synthesise requests with the target and answer them until the budget is spent (see the module docstring).

    Args:
        generator: the in-process generator (engine or HF).
        tokenizer: the target's tokenizer (chat template).
        output: the conversations JSONL (appended to; its ``.index.jsonl`` and ``.dropped.jsonl`` beside it).
        syn: how requests are sampled and filtered.
        answer: how answers are sampled.
        answer_stop_ids: tokens that end an answer.
        eos_ids: end-of-sequence tokens that also end a request.
        max_answer_tokens: stop once the rows hold this many answer tokens (None: ``syn.num_prompts`` stops it).
        num_samples: answers per kept request (ids ``<prompt_id>-s<k>`` when more than one).
        batch_size: conversations answered per ``generate`` call.
        heldout: the filter against evaluation prompts (None: no filter).
        heldout_suites: the suites behind ``heldout`` (recorded in the settings).
        seed: the run's seed; every call's seed is derived from it and the round.
        record: what every row's ``regen`` record holds besides the sampling (backend, model, target).
        template_kwargs: extra chat-template arguments (``enable_thinking``).
        time_limit_s: start no round that the last round's duration says would end after this many seconds.
        progress: show a progress bar.
    """
    from tqdm.auto import tqdm

    if max_answer_tokens is None and syn.num_prompts is None:
        raise ValueError("Synthesis needs a budget: give max_answer_tokens (answer tokens to write) or "
                         "synthesis.num_prompts (requests to keep).")
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples={num_samples} and batch_size={batch_size} must be >= 1.")
    out = Path(output)
    index_path = out.with_name(out.name + ".index.jsonl")
    dropped_path = out.with_name(out.name + ".dropped.jsonl")
    turn = user_turn(tokenizer, syn.system_prompt, template_kwargs, eos_ids)
    record = dict(record or {})
    settings = {"synthesis": syn.settings(), "answer": answer.record(), "num_samples": num_samples, "seed": seed,
                "heldout_suites": heldout_suites, "target": record.get("target"), "prefix": turn.prefix}
    dedup = NearDuplicateIndex(threshold=syn.dedup_threshold)
    state = _resume(out, index_path, dropped_path, settings, dedup)
    skipped = state.rows
    index = _Appender(index_path)
    if state.next_round == 0 and index_path.stat().st_size == 0:
        index.write({"settings": settings})
        index.sync()
    rows_file, dropped_file = _Appender(out), _Appender(dropped_path)
    prompt_tp, answer_tp = Throughput(), Throughput()
    dropped_total: Counter[str] = Counter()
    by_tokens = max_answer_tokens is not None
    bar = tqdm(total=max_answer_tokens if by_tokens else syn.num_prompts,
               initial=state.answer_tokens if by_tokens else state.kept, unit="tok" if by_tokens else "prompt",
               desc=f"regen synthesise ({generator.backend})", disable=not progress, unit_scale=by_tokens)
    started = time.perf_counter()
    last_round_s = 0.0
    stopped_by = "budget"
    try:
        while True:
            if by_tokens and state.answer_tokens >= max_answer_tokens:
                break
            if syn.num_prompts is not None and state.kept >= syn.num_prompts:
                break
            if time_limit_s is not None and time.perf_counter() - started + last_round_s > time_limit_s:
                stopped_by = "time limit"
                break
            t0 = time.perf_counter()
            r = state.next_round
            prompt_seed = derive_seed(seed, "prompts", r)
            generated = generator.generate([turn.prefix_ids] * syn.batch_size, syn.sampling(), turn.stop_token_ids,
                                           prompt_seed)
            t1 = time.perf_counter()
            prompt_tokens = sum(g.num_tokens for g in generated)
            prompt_tp.add(prompt_tokens, len(generated), t1 - t0)
            room = None if syn.num_prompts is None else syn.num_prompts - state.kept
            kept, drops = _select(tokenizer, turn, syn, generated, r, dedup, heldout, room)
            for d in drops:
                dropped_file.write(d)
            reasons = Counter(d["reason"] for d in drops)
            dropped_total.update(reasons)
            rows, tokens = _answer(generator, tokenizer, syn, answer, kept, r, prompt_seed, seed, num_samples,
                                   batch_size, answer_stop_ids, record, template_kwargs)
            t2 = time.perf_counter()
            answer_tp.add(tokens, len(rows), t2 - t1)
            for row in rows:
                rows_file.write(row)
            output_bytes, dropped_bytes = rows_file.sync(), dropped_file.sync()
            index.write({"round": r, "seed": prompt_seed, "generated": len(generated), "kept": len(kept),
                         "dropped": dict(sorted(reasons.items())), "rows": len(rows), "answer_tokens": tokens,
                         "prompt_tokens": prompt_tokens, "prompt_seconds": round(t1 - t0, 3),
                         "answer_seconds": round(t2 - t1, 3), "output_bytes": output_bytes,
                         "dropped_bytes": dropped_bytes})
            index.sync()
            state.next_round += 1
            state.kept += len(kept)
            state.rows += len(rows)
            state.answer_tokens += tokens
            state.empty_rounds = 0 if kept else state.empty_rounds + 1
            last_round_s = t2 - t0
            bar.update(tokens if by_tokens else len(kept))
            bar.set_postfix(kept=state.kept, dropped=sum(dropped_total.values()))
            if state.empty_rounds >= EMPTY_ROUNDS_LIMIT:
                raise RuntimeError(f"{EMPTY_ROUNDS_LIMIT} rounds in a row kept no request (the last dropped "
                                   f"{dict(reasons)}; see {dropped_path}): check the system prompt, the sampling and "
                                   f"the filters (min_words, max_tokens, drop_unfinished).")
    finally:
        bar.close()
        for f in (rows_file, dropped_file, index):
            f.close()
    return SynthesisResult(state.rows - skipped, skipped, state.kept, state.answer_tokens, dict(dropped_total),
                           prompt_tp, answer_tp, stopped_by)


def _select(tokenizer: Any, turn: UserTurn, syn: Synthesis, generated: list, round_: int,
            dedup: NearDuplicateIndex, heldout: HeldoutFilter | None,
            room: int | None) -> tuple[list[tuple[str, str]], list[dict[str, Any]]]:
    """The round's kept ``(prompt_id, request)`` pairs and its dropped records, in generation order."""
    special = _special_ids(tokenizer) - set(turn.stop_token_ids)
    kept: list[tuple[str, str]] = []
    drops: list[dict[str, Any]] = []
    for k, g in enumerate(generated):
        prompt_id = f"synth-{round_}-{k}"
        text = clean_prompt(tokenizer.decode(g.tokens, skip_special_tokens=True), turn.end)
        match = None
        if syn.drop_unfinished and not g.stopped:
            reason = "unfinished"
        elif special & set(g.tokens):
            reason = "template"
        else:
            reason = degenerate_reason(text, syn)
        if reason is None and heldout is not None:
            match = heldout.match(text)
            reason = None if match is None else "heldout"
        if reason is None and room is not None and len(kept) >= room:
            reason = "surplus"
        if reason is None:
            match = dedup.add(text, prompt_id)
            reason = None if match is None else "duplicate"
        if reason is None:
            kept.append((prompt_id, text))
        else:
            drops.append({"prompt_id": prompt_id, "reason": reason, "match": match, "text": text})
    return kept, drops


def _answer(generator: TokenGenerator, tokenizer: Any, syn: Synthesis, answer: SamplingSettings,
            kept: list[tuple[str, str]], round_: int, prompt_seed: int, seed: int, num_samples: int,
            batch_size: int, stop_ids: list[int], record: dict[str, Any],
            template_kwargs: dict[str, Any] | None) -> tuple[list[dict[str, Any]], int]:
    """Answer the kept requests ``num_samples`` times each; the rows and their answer tokens."""
    system = [{"role": "system", "content": syn.system_prompt}] if syn.system_prompt is not None else []
    items = [(pid, text, j) for pid, text in kept for j in range(num_samples)]
    rows, tokens = [], 0
    for c, start in enumerate(range(0, len(items), batch_size)):
        chunk = items[start:start + batch_size]
        answer_seed = derive_seed(seed, "answers", round_, c)
        answered: list[Answered] = answer_conversations(
            generator, tokenizer, [[*system, {"role": "user", "content": text}] for _, text, _ in chunk], answer,
            stop_ids, answer_seed, template_kwargs)
        for (pid, _, j), done in zip(chunk, answered):
            tokens += sum(done.answer_tokens)
            rows.append({
                "id": pid if num_samples == 1 else f"{pid}-s{j}", "prompt_id": pid, "source": SOURCE,
                "conversations": done.messages,
                "regen": {**record, "finish_reasons": done.finish_reasons, "answer_tokens": done.answer_tokens,
                          "prompt_source": SOURCE, "prompt_sampling": {**syn.sampling().record(), "seed": prompt_seed,
                                                                        "system_prompt": syn.system_prompt},
                          "answer_sampling": {**answer.record(), "seed": answer_seed}, "seed": seed,
                          "round": round_},
            })
    return rows, tokens
