"""In-process generation for ``regen``: the target writes answers (and synthesised prompts) in large batches.

Two generators share one interface, :meth:`TokenGenerator.generate` (token-id prompts in, generated token ids and
whether a stop token ended them out):

* ``engine`` (the default in process): the project's own :class:`~dspark_lightning.decoding.SpeculativeEngine`
  with the target alone (``drafter=None``: one token per step through the same loop speculative decoding uses),
  its rounds replayed from CUDA graphs on a GPU (``cuda_graphs=True``).
* ``hf``: the target's HF ``generate`` (left padding), kept for sampling settings the engine lacks (``min_p``).

:func:`answer_conversations` answers every user turn of a batch of conversations in order, all conversations that
have a next user turn in one ``generate`` call per turn.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from ..targets import FrozenTarget, TargetConfig, load_target_config, load_tokenizer

InProcess = Literal["engine", "hf"]


@dataclass
class Generated:
    """One generated continuation: its tokens (the stop token left out) and whether a stop token ended it."""

    tokens: list[int]
    stopped: bool

    @property
    def num_tokens(self) -> int:
        """Tokens the target generated, the stop token included (what a training answer holds)."""
        return len(self.tokens) + int(self.stopped)


@dataclass
class SamplingSettings:
    """How a batch is sampled (``temperature=0``: greedy; ``top_p=1``, ``top_k=0``, ``min_p=0``: off)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int = 512

    def record(self) -> dict[str, Any]:
        """The settings as a row records them."""
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
                "max_tokens": self.max_tokens}


@dataclass
class Throughput:
    """Tokens generated and the seconds spent generating them (model loading left out)."""

    tokens: int = 0
    seconds: float = 0.0
    calls: int = 0
    rows: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def add(self, tokens: int, rows: int, seconds: float) -> None:
        self.tokens += tokens
        self.rows += rows
        self.seconds += seconds
        self.calls += 1

    def record(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "rows": self.rows, "calls": self.calls, "seconds": round(self.seconds, 3),
                "tokens_per_s": round(self.tokens_per_s, 1)}


class TokenGenerator(Protocol):
    """Generates continuations of token-id prompts (see the module docstring)."""

    backend: str

    def generate(self, prompts: list[list[int]], sampling: SamplingSettings, stop_token_ids: list[int],
                 seed: int) -> list[Generated]: ...


def derive_seed(seed: int, *parts: Any) -> int:
    """A seed for one call, from the run's seed and what names the call (e.g. ``"prompts", round``): stable across
    processes and resumes, distinct between calls."""
    text = "/".join(map(str, (seed, *parts)))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=6).digest(), "little")


def resolve_device(device: str) -> torch.device:
    """``auto``: the GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_generation_tokenizer(target: TargetConfig, tokenizer_path: str | None = None) -> Any:
    """The tokenizer whose chat template renders the prompts (``tokenizer_path`` overrides the target's), with a
    pad token (EOS when it has none, e.g. a tokenizer read from GGUF: batching needs one)."""
    if tokenizer_path is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    else:
        tokenizer = load_tokenizer(target)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def stop_tokens(tokenizer: Any, target_config: Any) -> list[int]:
    """End-of-sequence ids from the tokenizer and the target config (generation stops after one of them)."""
    ids = set()
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(target_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return sorted(ids)


def stop_token_ids(tokenizer: Any, target: TargetConfig | None = None) -> list[int]:
    """End-of-sequence ids of the tokenizer and the target config, and the token that closes an assistant turn in
    the chat template (:func:`~.synthesis.end_of_turn_ids`)."""
    from .synthesis import end_of_turn_ids

    config = None
    if target is not None:
        hf = load_target_config(target)
        config = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
    ids = set(stop_tokens(tokenizer, config)) | set(end_of_turn_ids(tokenizer, "assistant"))
    if not ids:
        raise ValueError("Neither the tokenizer nor the target config names an end-of-sequence token, and the chat "
                         "template closes turns with no special token: generation would never stop.")
    return sorted(ids)


# ---------------------------------------------------------------------- the project's engine
@dataclass
class EngineGenerator:
    """The target alone through :class:`~dspark_lightning.decoding.SpeculativeEngine` (graphed on CUDA).

    ``top_p``/``top_k`` are passed to ``SpeculativeEngine.generate`` only when they are on (``top_p < 1``,
    ``top_k > 0``) and the temperature is positive, so greedy and plain sampling run on any engine version.
    """

    target: TargetConfig
    device: str = "auto"
    backend: str = "engine"

    def __post_init__(self) -> None:
        from ..decoding import SpeculativeEngine

        dev = resolve_device(self.device)
        frozen = FrozenTarget.from_config(self.target, [0], device=dev)  # no drafter reads the captured layer
        self.engine = SpeculativeEngine(frozen, None, cuda_graphs=dev.type == "cuda")
        self._accepts = set(inspect.signature(self.engine.generate).parameters)

    def generate(self, prompts: list[list[int]], sampling: SamplingSettings, stop_token_ids: list[int],
                 seed: int) -> list[Generated]:
        if sampling.min_p > 0:
            raise ValueError(f"min_p={sampling.min_p}: the engine samples without min_p; set min_p 0 or use "
                             f"backend='hf'.")
        extra: dict[str, Any] = {}
        if sampling.temperature > 0:
            if sampling.top_p < 1.0:
                extra["top_p"] = sampling.top_p
            if sampling.top_k > 0:
                extra["top_k"] = sampling.top_k
        missing = sorted(set(extra) - self._accepts)
        if missing:
            raise ValueError(f"This SpeculativeEngine.generate takes no {missing} (sampling {extra}); turn them off "
                             f"(top_p 1.0, top_k 0) or use backend='hf'.")
        stops = set(stop_token_ids)
        out = self.engine.generate(prompts, max_new_tokens=sampling.max_tokens, temperature=sampling.temperature,
                                   stop_token_ids=sorted(stops), seed=seed, **extra)
        generated = []
        for tokens, stopped in zip(out.tokens, out.stopped):
            ended = stopped and bool(tokens) and tokens[-1] in stops
            generated.append(Generated(tokens[:-1] if ended else list(tokens), ended))
        return generated


# ---------------------------------------------------------------------- HF generate
@dataclass
class HFGenerator:
    """The target's HF ``generate`` on left-padded batches."""

    target: TargetConfig
    pad_token_id: int
    device: str = "auto"
    backend: str = "hf"

    def __post_init__(self) -> None:
        self.dev = resolve_device(self.device)
        self.model = FrozenTarget.from_config(self.target, [0], device=self.dev).model

    def generate(self, prompts: list[list[int]], sampling: SamplingSettings, stop_token_ids: list[int],
                 seed: int) -> list[Generated]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):  # left padding: generation continues at the right edge of every row
            ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p):] = 1
        kwargs: dict[str, Any] = {"max_new_tokens": sampling.max_tokens, "pad_token_id": self.pad_token_id,
                                  "eos_token_id": list(stop_token_ids)}
        if sampling.temperature > 0:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                          top_k=sampling.top_k or None, min_p=sampling.min_p or None)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        stops = set(stop_token_ids)
        torch.manual_seed(seed)
        with torch.no_grad():
            out = self.model.generate(input_ids=ids.to(self.dev), attention_mask=mask.to(self.dev), **kwargs)
        generated = []
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), None)
            generated.append(Generated(row if cut is None else row[:cut], cut is not None))
        return generated


def make_generator(backend: InProcess, target: TargetConfig, tokenizer: Any, device: str = "auto") -> TokenGenerator:
    """The in-process generator named by ``backend``."""
    if backend == "engine":
        return EngineGenerator(target, device)
    if backend == "hf":
        return HFGenerator(target, tokenizer.pad_token_id, device)
    raise ValueError(f"backend={backend!r} is not an in-process generator; choose 'engine' or 'hf'.")


# ---------------------------------------------------------------------- answering conversations
@dataclass
class Answered:
    """A conversation with every user turn answered: its messages, one finish reason and token count per answer."""

    messages: list[dict[str, Any]]
    finish_reasons: list[str] = field(default_factory=list)
    answer_tokens: list[int] = field(default_factory=list)


def render_prompt_ids(tokenizer: Any, messages: list[dict[str, Any]], template_kwargs: dict[str, Any]) -> list[int]:
    """Token ids of ``messages`` under the chat template, the assistant's generation prompt added."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **template_kwargs)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def answer_conversations(generator: TokenGenerator, tokenizer: Any, prompts: list[list[dict[str, Any]]],
                         sampling: SamplingSettings, stop_ids: list[int], seed: int,
                         template_kwargs: dict[str, Any] | None = None) -> list[Answered]:
    """Answer every user turn of each conversation in order (system and user messages in, assistant replies
    appended), one ``generate`` call per turn for all conversations that have one, shortest prompt first.

    Args:
        generator: the in-process generator.
        tokenizer: renders the chat template and decodes the replies.
        prompts: per conversation its system and user messages (assistant messages already dropped).
        sampling: how the answers are sampled.
        stop_ids: tokens that end an answer.
        seed: the batch's seed; turn ``t`` samples with ``derive_seed(seed, t)``.
        template_kwargs: extra chat-template arguments (``enable_thinking``).
    """
    kwargs = template_kwargs or {}
    results = [Answered([]) for _ in prompts]
    histories: list[list[dict[str, Any]]] = [[] for _ in prompts]
    cursors = [0] * len(prompts)
    turn = 0
    while True:
        active = []  # conversations with a next user turn: advance each to it
        for b, messages in enumerate(prompts):
            while cursors[b] < len(messages):
                message = messages[cursors[b]]
                cursors[b] += 1
                histories[b].append(message)
                results[b].messages.append(message)
                if message["role"] == "user":
                    active.append(b)
                    break
        if not active:
            return results
        ids = {b: render_prompt_ids(tokenizer, histories[b], kwargs) for b in active}
        order = sorted(active, key=lambda b: len(ids[b]))  # rows of similar length: little padding
        outputs = generator.generate([ids[b] for b in order], sampling, stop_ids, derive_seed(seed, turn))
        for b, out in zip(order, outputs):
            text = tokenizer.decode(out.tokens, skip_special_tokens=True).strip()
            histories[b].append({"role": "assistant", "content": text})
            results[b].messages.append({"role": "assistant", "content": text})
            results[b].finish_reasons.append("stop" if out.stopped else "length")
            results[b].answer_tokens.append(out.num_tokens)
        turn += 1
