"""Benchmark prompt suites and the DataModule that feeds them to ``validate``.

A suite is named by one of:

* a shipped file (``resources/eval_datasets/<name>.jsonl``: gsm8k, math500, aime24, aime25, humaneval, mbpp,
  lbpp, livecodebench, mt-bench, arena-hard-v2, swe-bench; ``arena-hard`` = ``arena-hard-v2``);
* a path to any JSONL file of ``{"turns": [...]}`` rows (the suite is named after the file stem);
* ``random``: random token prompts, for targets without a tokenizer (the tiny smoke targets).

Only the first turn of a row is used, rendered with the target's chat template
(``add_generation_prompt=True``, ``enable_thinking=False``, no system prompt), as the reference evaluation
does. Without ``max_samples`` a suite is cut to the reference cap (:data:`REFERENCE_CAPS`) after a shuffle
with a fixed seed, so every run and every rank sees the same prompts.

Batches never mix suites: ``{"suite", "suite_index", "sample_index" [B], "prompt_ids" [B, L] (right-padded),
"prompt_lengths" [B], "max_new_tokens", "stop_token_ids" [S]}``. Under DDP each rank takes every
``world_size``-th prompt of each suite (no padding duplicates, so metrics count each prompt once) and
torchmetrics sums the counters across ranks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from ..data.benchmarks import (  # noqa: F401 - re-exported: the suite names and files live in data/
    ALIASES,
    RANDOM_SUITE,
    read_first_turns,
    shipped_suites,
    suite_name,
    suite_path,
)
from ..data.generation import stop_tokens
from ..targets import TargetConfig, load_target_config, load_tokenizer

REFERENCE_CAPS: dict[str, int] = {
    "gsm8k": 500, "math500": 500, "aime25": 30, "humaneval": 164, "mbpp": 256, "livecodebench": 500,
    "mt-bench": 80, "arena-hard-v2": 500,
}
DEFAULT_SUITES = tuple(REFERENCE_CAPS)
SUBSAMPLE_SEED = 980406  # the reference evaluation's, so the same prompts are chosen


def cap_for(name: str, max_samples: int | dict[str, int] | None) -> int | None:
    """Prompts to keep for suite ``name``: an int caps every suite, a dict per suite, None the reference cap."""
    if isinstance(max_samples, dict):
        return max_samples.get(name, REFERENCE_CAPS.get(name))
    if max_samples is not None:
        return max_samples
    return REFERENCE_CAPS.get(name)


def subsample(items: list[Any], cap: int | None, seed: int = SUBSAMPLE_SEED) -> list[Any]:
    """The first ``cap`` items after a seeded shuffle (all items, in order, when they fit)."""
    if cap is None or len(items) <= cap:
        return list(items)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in order[:cap]]


def render_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a user turn under the chat template, generation prompt added, thinking off."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=False)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


@dataclass
class Suite:
    """Tokenised prompts of one suite."""

    name: str
    prompts: list[list[int]]
    stop_token_ids: list[int]


def load_suites(target: TargetConfig | None, suites: list[str], *, max_samples: int | dict[str, int] | None = None,
                max_prompt_tokens: int | None = None, random_prompt_len: int = 16, seed: int = SUBSAMPLE_SEED,
                tokenizer: Any = None, hf_config: Any = None) -> list[Suite]:
    """Tokenise the prompts of ``suites`` for ``target`` (see the module docstring for names and caps).

    Args:
        target: gives the tokenizer, chat template and stop tokens (or, for ``random``, the vocabulary).
        suites: suite names or JSONL paths.
        max_samples: prompts per suite (int for all, dict per suite name; None = reference caps, 8 for random).
        max_prompt_tokens: drop prompts longer than this many tokens (None = keep all).
        random_prompt_len: tokens per prompt of the ``random`` suite.
        seed: shuffle seed of the subsampling (and of the random prompts).
        tokenizer: an already loaded tokenizer (default: the target's).
        hf_config: the target's HF config (default: read from ``target``).
    """
    if not suites:
        raise ValueError(f"No suites given; choose from {shipped_suites()}, '{RANDOM_SUITE}' or JSONL paths.")
    if hf_config is None:
        if target is None:
            raise ValueError("load_suites needs the target config (or hf_config and a tokenizer).")
        hf_config = load_target_config(target)
    text_config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    out = []
    for raw in suites:
        name = suite_name(raw)
        if name in (s.name for s in out):
            raise ValueError(f"Suite {name!r} is listed twice in suites={suites}.")
        cap = cap_for(name, max_samples)
        if name == RANDOM_SUITE:
            g = torch.Generator().manual_seed(seed)
            count = 8 if cap is None else cap
            prompts = torch.randint(0, text_config.vocab_size, (count, random_prompt_len), generator=g).tolist()
            out.append(Suite(name, prompts, []))
            continue
        if tokenizer is None:
            if target is None:
                raise ValueError(f"Suite {name!r} needs a tokenizer: pass tokenizer= or a target config.")
            tokenizer = load_tokenizer(target)
        texts = subsample(read_first_turns(suite_path(raw)), cap, seed)
        prompts = [render_prompt(tokenizer, t) for t in texts]
        if max_prompt_tokens is not None:
            prompts = [p for p in prompts if len(p) <= max_prompt_tokens]
        out.append(Suite(name, prompts, stop_tokens(tokenizer, text_config)))
    return out


def make_batches(suites: list[Suite], *, batch_size: int, max_new_tokens: int, rank: int = 0,
                 world_size: int = 1) -> list[dict[str, Any]]:
    """Batches of one suite each; this rank keeps prompts ``rank, rank + world_size, ...`` of every suite."""
    batches = []
    for index, suite in enumerate(suites):
        mine = list(range(rank, len(suite.prompts), world_size))
        for start in range(0, len(mine), batch_size):
            chunk = mine[start:start + batch_size]
            prompts = [suite.prompts[i] for i in chunk]
            width = max(len(p) for p in prompts)
            ids = torch.zeros(len(prompts), width, dtype=torch.long)
            for row, p in enumerate(prompts):
                ids[row, : len(p)] = torch.tensor(p, dtype=torch.long)
            batches.append({
                "suite": suite.name, "suite_index": index, "sample_index": torch.tensor(chunk),
                "prompt_ids": ids, "prompt_lengths": torch.tensor([len(p) for p in prompts]),
                "max_new_tokens": max_new_tokens,
                "stop_token_ids": torch.tensor(suite.stop_token_ids, dtype=torch.long),
            })
    return batches


def batch_prompts(batch: dict[str, Tensor]) -> list[list[int]]:
    """The prompts of a batch as token lists (padding removed)."""
    ids, lengths = batch["prompt_ids"].tolist(), batch["prompt_lengths"].tolist()
    return [row[:n] for row, n in zip(ids, lengths)]


class _Batches(IterableDataset):
    """Pre-built batches (an iterable, so Lightning does not wrap it in a padding DistributedSampler)."""

    def __init__(self, batches: list[dict[str, Any]]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class SuitesDataModule(L.LightningDataModule):
    """Benchmark prompts for ``validate``: speculative decoding on suites (see the module docstring).

    Args:
        target: the target (linked from ``model.target``): tokenizer, chat template, stop tokens, vocabulary.
        suites: suite names (shipped files, ``random``) or JSONL paths; default the reference's eight.
        max_samples: prompts per suite: an int for all, a dict per suite name, or None for the reference caps
            (gsm8k 500, math500 500, aime25 30, humaneval 164, mbpp 256, livecodebench 500, mt-bench 80,
            arena-hard-v2 500; other suites whole; random 8).
        max_new_tokens: generation budget per prompt (reference: 2048).
        batch_size: prompts decoded together (reference: 1).
        max_prompt_tokens: drop longer prompts (None = keep all).
        random_prompt_len: prompt length of the ``random`` suite.
        seed: subsampling seed.
    """

    def __init__(self, target: TargetConfig | None = None, suites: list[str] | None = None,
                 max_samples: int | dict[str, int] | None = None, max_new_tokens: int = 2048, batch_size: int = 1,
                 max_prompt_tokens: int | None = None, random_prompt_len: int = 16,
                 seed: int = SUBSAMPLE_SEED) -> None:
        super().__init__()
        if target is None:
            raise ValueError("SuitesDataModule needs the target (tokenizer, chat template): set data.target or link "
                             "it from model.target.")
        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError(f"batch_size={batch_size} and max_new_tokens={max_new_tokens} must be >= 1.")
        self.target = target
        self.suites = list(suites) if suites is not None else list(DEFAULT_SUITES)
        self.max_samples, self.max_new_tokens, self.batch_size = max_samples, max_new_tokens, batch_size
        self.max_prompt_tokens, self.random_prompt_len, self.seed = max_prompt_tokens, random_prompt_len, seed
        self.loaded: list[Suite] | None = None

    @property
    def suite_names(self) -> list[str]:
        return [suite_name(s) for s in self.suites]

    def setup(self, stage: str) -> None:
        if self.loaded is None:
            self.loaded = load_suites(self.target, self.suites, max_samples=self.max_samples,
                                      max_prompt_tokens=self.max_prompt_tokens,
                                      random_prompt_len=self.random_prompt_len, seed=self.seed)

    def _loader(self) -> DataLoader:
        self.setup("validate")
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        batches = make_batches(self.loaded, batch_size=self.batch_size, max_new_tokens=self.max_new_tokens,
                               rank=rank, world_size=world)
        return DataLoader(_Batches(batches), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()
