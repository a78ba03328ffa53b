"""DataModules for online mode: token batches only; the frozen target runs inside the LightningModule.

Both modules yield the batch contract of DESIGN.md without target states: ``input_ids [B, L] int64``,
``loss_mask [B, L] bool``, ``attention_mask [B, L] bool`` (right padding).
"""

from __future__ import annotations

import multiprocessing as mp
import random
import re
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..targets import TargetConfig, load_target_config, load_tokenizer
from .conversations import read_conversations, tokenize_conversation


def collate_tokens(samples: list[dict[str, Tensor]], pad_id: int = 0) -> dict[str, Tensor]:
    """Right-pad ``input_ids``/``loss_mask`` to the longest sample; build ``attention_mask``."""
    length = max(s["input_ids"].shape[0] for s in samples)
    b = len(samples)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((b, length), dtype=torch.bool)
    attention_mask = torch.zeros((b, length), dtype=torch.bool)
    for i, s in enumerate(samples):
        n = s["input_ids"].shape[0]
        input_ids[i, :n] = s["input_ids"]
        loss_mask[i, :n] = s["loss_mask"]
        attention_mask[i, :n] = True
    return {"input_ids": input_ids, "loss_mask": loss_mask, "attention_mask": attention_mask}


def split_by_group(groups: list[Any], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Sample indices for training and validation: whole groups go to one side (the answers to one prompt never
    straddle the split, so the validation loss is never computed on a training prompt), ``val_fraction`` of the
    groups to validation, chosen by a seeded shuffle. With one sample per group this is the plain shuffled split."""
    members: dict[Any, list[int]] = {}
    for i, group in enumerate(groups):
        members.setdefault(group, []).append(i)
    keys = list(members)
    order = list(range(len(keys)))
    random.Random(seed).shuffle(order)
    n_val = int(round(val_fraction * len(keys)))
    pick = lambda chosen: [i for k in chosen for i in members[keys[k]]]  # noqa: E731
    return pick(order[n_val:]), pick(order[:n_val])


def prompt_group(row: dict[str, Any]) -> str:
    """The prompt a conversation answers: its ``prompt_id`` (``regen`` writes one), else its id less the
    ``-s<k>`` suffix ``regen`` gives the samples of one prompt."""
    if "prompt_id" in row:
        return str(row["prompt_id"])
    return re.sub(r"-s\d+$", "", str(row["id"]))


class _ListDataset(Dataset):
    def __init__(self, samples: list[dict[str, Tensor]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return self.samples[i]


class _TokenDataModule(L.LightningDataModule):
    """Shared split/loader logic; subclasses provide ``_make_samples() -> list[dict]``."""

    def __init__(self, batch_size: int, val_fraction: float, num_workers: int, seed: int) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1.")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} must be in [0, 1).")
        self.batch_size, self.val_fraction, self.num_workers, self.seed = batch_size, val_fraction, num_workers, seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.pad_id = 0
        self.sample_groups: list[Any] | None = None  # per sample: what it shares with others (its prompt)

    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        samples = self._make_samples()
        train, val = split_by_group(self.sample_groups or list(range(len(samples))), self.val_fraction, self.seed)
        self.val_set = _ListDataset([samples[i] for i in val])
        self.train_set = _ListDataset([samples[i] for i in train])

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          collate_fn=lambda s: collate_tokens(s, self.pad_id), drop_last=shuffle,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)


class ConversationsDataModule(_TokenDataModule):
    """Conversations JSONL ``{id, conversations: [{role, content}]}`` tokenised with the target's chat template.

    The validation split holds whole prompts: the answers to one prompt (:func:`prompt_group`) are all on one side.

    Args:
        target: the target whose tokenizer and chat template are used (linked from ``model.target``).
        path: a JSONL file, or ``builtin:<name>`` for a set shipped with the package (``builtin:smollm2_demo``).
        max_length: truncate samples to this many tokens.
        max_samples: use at most this many conversations (None = all).
        system_prompt: prepended as a system message when the conversation has none.
        batch_size, val_fraction, num_workers, seed: loader settings.
        tokenize_workers: processes that tokenise the conversations at set-up (0: this process); tens of thousands
            of regenerated conversations take a minute in one process.
    """

    def __init__(self, target: TargetConfig | None = None, path: str = "builtin:smollm2_demo", max_length: int = 2048,
                 max_samples: int | None = None, system_prompt: str | None = None, batch_size: int = 4,
                 val_fraction: float = 0.05, num_workers: int = 0, seed: int = 0, tokenize_workers: int = 0) -> None:
        super().__init__(batch_size, val_fraction, num_workers, seed)
        if target is None:
            raise ValueError("ConversationsDataModule needs the target (for its tokenizer): set data.target "
                             "or link it from model.target.")
        if tokenize_workers < 0:
            raise ValueError(f"tokenize_workers={tokenize_workers} must be >= 0.")
        self.target, self.path, self.max_length = target, path, max_length
        self.max_samples, self.system_prompt, self.tokenize_workers = max_samples, system_prompt, tokenize_workers

    def _make_samples(self) -> list[dict[str, Tensor]]:
        tokenizer = load_tokenizer(self.target)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        rows = read_conversations(self.path)[: self.max_samples]
        tokenized = tokenize_rows(tokenizer, [row["conversations"] for row in rows], self.max_length,
                                  self.system_prompt, self.tokenize_workers)
        samples, self.sample_groups = [], []
        for row, (ids, mask) in zip(rows, tokenized):
            if mask[1:].any():
                samples.append({"input_ids": ids, "loss_mask": mask})
                self.sample_groups.append(prompt_group(row))
        return samples


_FORKED: dict[str, Any] = {}  # what forked tokenising workers inherit (the tokenizer is not sent to them)


def _tokenize_forked(messages: list[dict[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = tokenize_conversation(_FORKED["tokenizer"], messages, max_length=_FORKED["max_length"],
                                      system_prompt=_FORKED["system_prompt"])
    return ids.numpy(), mask.numpy()  # numpy crosses the pipe as bytes (tensors would go through shared memory)


def tokenize_rows(tokenizer: Any, conversations: list[list[dict[str, str]]], max_length: int,
                  system_prompt: str | None = None, workers: int = 0) -> list[tuple[Tensor, Tensor]]:
    """:func:`~.conversations.tokenize_conversation` of every conversation, in order, in ``workers`` forked
    processes when more than one (Linux; elsewhere, or with fewer, in this process)."""
    if workers <= 1 or len(conversations) < 2 * workers or "fork" not in mp.get_all_start_methods():
        return [tokenize_conversation(tokenizer, m, max_length=max_length, system_prompt=system_prompt)
                for m in conversations]
    _FORKED.update(tokenizer=tokenizer, max_length=max_length, system_prompt=system_prompt)
    try:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
            chunk = max(1, len(conversations) // (8 * workers))
            return [(torch.from_numpy(ids), torch.from_numpy(mask))
                    for ids, mask in pool.map(_tokenize_forked, conversations, chunksize=chunk)]
    finally:
        _FORKED.clear()


class RandomTokensDataModule(_TokenDataModule):
    """Random token sequences with a prompt/answer loss mask: a data source for smoke tests and benchmarks.

    The target still defines what the drafter learns (its next-token distributions), so losses fall.

    Args:
        target: gives the vocabulary size (linked from ``model.target``).
        num_samples, seq_len, prompt_len: sequences of ``seq_len`` tokens whose first ``prompt_len`` are not trained on.
        batch_size, val_fraction, num_workers, seed: loader settings.
    """

    def __init__(self, target: TargetConfig | None = None, num_samples: int = 64, seq_len: int = 64,
                 prompt_len: int = 8, batch_size: int = 4, val_fraction: float = 0.125, num_workers: int = 0,
                 seed: int = 0) -> None:
        super().__init__(batch_size, val_fraction, num_workers, seed)
        if not 0 <= prompt_len < seq_len - 1:
            raise ValueError(f"prompt_len={prompt_len} must be in [0, seq_len - 1 = {seq_len - 1}).")
        self.target, self.num_samples, self.seq_len, self.prompt_len = target, num_samples, seq_len, prompt_len

    def _make_samples(self) -> list[dict[str, Tensor]]:
        vocab = load_target_config(self.target).vocab_size if self.target is not None else 256
        g = torch.Generator().manual_seed(self.seed)
        ids = torch.randint(0, vocab, (self.num_samples, self.seq_len), generator=g)
        mask = torch.zeros(self.seq_len, dtype=torch.bool)
        mask[self.prompt_len:] = True
        return [{"input_ids": row, "loss_mask": mask.clone()} for row in ids]
