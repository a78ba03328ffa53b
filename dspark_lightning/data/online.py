"""DataModules for online mode: token batches only; the frozen target runs inside the LightningModule.

Both modules yield the batch contract of docs/design.md without target states: ``input_ids [B, L] int64``,
``loss_mask [B, L] bool``, ``attention_mask [B, L] bool`` (right padding), plus ``anchors``/``anchor_valid [B, N]``
for block drafters.

The training stream is a pure function of ``(seed, epoch, rank, position)``, as the cache DataModule's is
(``data/cache/datamodule.py``), so ``fit --ckpt_path last`` continues it exactly:

* **Order.** Each epoch the training samples are permuted with a generator seeded by ``(seed, epoch)``; batch ``i``
  of rank ``r`` of ``R`` is the ``(i * R + r)``-th slice of ``batch_size`` samples (the tail that fills no batch
  on every rank is dropped), so ranks read disjoint samples and run the same number of steps.
* **Anchors.** Block drafters' anchors are drawn here, per sample, from a generator seeded by the sample's index
  and the epoch (not in the training step from the global generator, whose state a checkpoint does not hold).
* **Resume.** ``state_dict()`` is ``{epoch, position, settings}``: batches the trainer consumed this epoch (counted
  in ``on_before_batch_transfer``, so a batch Lightning prefetched but did not train on is not counted). After
  ``load_state_dict`` the next epoch iteration skips that many batches of the same permutation; any number of
  DataLoader workers gives the same batches, since they only load the indices the main process hands them.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import random
import re
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..drafters.blocks import sample_anchors
from ..targets import TargetConfig, load_target_config, load_tokenizer
from .conversations import read_conversations, tokenize_conversation

log = logging.getLogger(__name__)


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from any tuple of values (stable across processes, unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


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
    pick = lambda chosen: [i for k in chosen for i in members[keys[k]]]
    return pick(order[n_val:]), pick(order[:n_val])


def prompt_group(row: dict[str, Any]) -> str:
    """The prompt a conversation answers: its ``prompt_id`` (``regen`` writes one), else its id less the
    ``-s<k>`` suffix ``regen`` gives the samples of one prompt."""
    if "prompt_id" in row:
        return str(row["prompt_id"])
    return re.sub(r"-s\d+$", "", str(row["id"]))


class _IndexedDataset(Dataset):
    """The samples, each returned with its index (the anchors' seed)."""

    def __init__(self, samples: list[dict[str, Tensor]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[int, dict[str, Tensor]]:
        return i, self.samples[i]


class _Collate:
    """Pad a batch and draw each sample's anchors from its own seed (a class: picklable for spawned workers)."""

    def __init__(self, pad_id: int, num_anchors: int | None, seed: int, epoch: int, split: str) -> None:
        self.pad_id, self.num_anchors, self.seed, self.epoch, self.split = pad_id, num_anchors, seed, epoch, split

    def __call__(self, items: list[tuple[int, dict[str, Tensor]]]) -> dict[str, Tensor]:
        batch = collate_tokens([s for _, s in items], self.pad_id)
        if self.num_anchors:
            anchors, valid = [], []
            for i, s in items:
                g = torch.Generator().manual_seed(stable_seed(self.seed, self.epoch, self.split, i, "anchors"))
                a, v = sample_anchors(s["loss_mask"][None], self.num_anchors, g)
                anchors.append(a)
                valid.append(v)
            batch["anchors"], batch["anchor_valid"] = torch.cat(anchors), torch.cat(valid)
        return batch


class EpochLoader:
    """Base of what the DataModules' ``train_dataloader`` return: one epoch of batches per ``iter``, of a fixed
    length, whose stream position lives in the DataModule (``dm.state_dict()``)."""

    def __init__(self, dm: Any) -> None:
        self.dm = dm

    def __len__(self) -> int:
        return self.dm.batches_per_epoch

    # Lightning saves and restores a train loader that has these (and warns on mid-epoch resume otherwise); the
    # position lives in the DataModule, so both paths (the loops' state, the DataModule's entry) carry the same state.
    def state_dict(self) -> dict[str, Any]:
        return self.dm.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.dm.load_state_dict(state_dict)


class _EpochLoader(EpochLoader):
    """The online train loader: this epoch's permutation, from where a resume left off."""

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        dm = self.dm
        epoch, start = dm._begin_epoch()
        batches = dm._epoch_batches(epoch)[start:]
        if batches:
            loader = DataLoader(dm.train_set, batch_sampler=batches, num_workers=dm.num_workers,
                                collate_fn=_Collate(dm.pad_id, dm.num_anchors, dm.seed, epoch, "train"))
            position = start
            for batch in loader:
                position += 1
                dm._yielded = (epoch, position)
                yield batch
        dm._next_epoch = epoch + 1


class _TokenDataModule(L.LightningDataModule):
    """Shared split, order, anchors and resume logic; subclasses provide ``_make_samples() -> list[dict]`` and
    ``_no_samples() -> str`` (the error when none is left, naming the input and what dropped it)."""

    def __init__(self, batch_size: int, val_fraction: float, num_workers: int, seed: int,
                 num_anchors: int | None = None) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1.")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} must be in [0, 1).")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be >= 0.")
        self.batch_size, self.val_fraction, self.num_workers, self.seed = batch_size, val_fraction, num_workers, seed
        self.num_anchors = num_anchors
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.pad_id = 0
        self.rank, self.world_size, self.batches_per_epoch = 0, 1, 0
        self._restored: dict[str, Any] | None = None
        self._yielded: tuple[int, int] = (0, 0)  # (epoch, batches handed out)
        self._consumed: tuple[int, int] = (0, 0)  # (epoch, batches trained on), counted with a trainer only
        self._next_epoch = 0
        self.sample_groups: list[Any] | None = None  # per sample: what it shares with others (its prompt)

    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        samples = self._make_samples()
        if not samples:
            raise ValueError(self._no_samples())
        train, val = split_by_group(self.sample_groups or list(range(len(samples))), self.val_fraction, self.seed)
        n_val = len(val)
        self.val_set = _IndexedDataset([samples[i] for i in val])
        self.train_set = _IndexedDataset([samples[i] for i in train])
        trainer = self.trainer
        if trainer is not None:
            self.rank, self.world_size = trainer.global_rank, trainer.world_size
        self.batches_per_epoch = len(self.train_set) // (self.batch_size * self.world_size)
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"{len(self.train_set)} training samples ({len(samples)} in all, {n_val} held out by val_fraction="
                f"{self.val_fraction}) fill no batch of batch_size={self.batch_size} on each of {self.world_size} "
                f"rank(s). Lower batch_size or val_fraction, or give more samples.")
        drafter = getattr(getattr(trainer, "lightning_module", None), "drafter_config", None)
        if self.num_anchors is None and drafter is not None and drafter.algorithm != "eagle3":
            self.num_anchors = drafter.num_anchors

    def _make_samples(self) -> list[dict[str, Tensor]]:
        raise NotImplementedError

    def _no_samples(self) -> str:
        raise NotImplementedError

    def train_dataloader(self) -> _EpochLoader:
        if self.train_set is None:
            raise RuntimeError(f"Call setup() before asking {type(self).__name__} for a dataloader.")
        return _EpochLoader(self)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          collate_fn=_Collate(self.pad_id, self.num_anchors, self.seed, 0, "val"))

    # ------------------------------------------------------------------ order, epochs, resume
    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches (sample indices) of ``epoch``: a seeded permutation, dealt to ranks batch by batch."""
        g = torch.Generator().manual_seed(stable_seed(self.seed, epoch, "order"))
        order = torch.randperm(len(self.train_set), generator=g).tolist()
        b, w = self.batch_size, self.world_size
        return [order[(i * w + self.rank) * b:(i * w + self.rank + 1) * b] for i in range(self.batches_per_epoch)]

    def _settings(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "batch_size": self.batch_size, "seed": self.seed,
                "train_samples": len(self.train_set), "batches_per_epoch": self.batches_per_epoch}

    def _begin_epoch(self) -> tuple[int, int]:
        epoch = self.trainer.current_epoch if self.trainer is not None else self._next_epoch
        start, restored, self._restored = 0, self._restored, None
        if restored is not None:
            if restored.get("settings") != self._settings():
                log.warning("%s: the checkpoint's stream settings %s differ from now %s; the exact position cannot be "
                            "restored, epoch %d starts from its beginning.", type(self).__name__,
                            restored.get("settings"), self._settings(), epoch)
            elif restored["epoch"] == epoch or self.trainer is None:
                epoch, start = restored["epoch"], restored["position"]
                if start >= self.batches_per_epoch and self.trainer is None:
                    epoch, start = epoch + 1, 0
        self._yielded = self._consumed = (epoch, start)
        return epoch, start

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training:
            epoch, count = self._consumed
            self._consumed = (epoch, count + 1)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Where the training stream is: ``{epoch, position (batches trained on), settings}``."""
        if self.train_set is None:
            return {}
        epoch, position = self._consumed if self.trainer is not None else self._yielded
        return {"epoch": epoch, "position": position, "settings": self._settings()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the stream at the saved position on the next ``iter`` of the train loader."""
        if state_dict:
            self._restored = dict(state_dict)


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
        num_anchors: anchors per sample; default the trainer module's ``drafter_config.num_anchors`` (none for
            Eagle3).
    """

    def __init__(self, target: TargetConfig | None = None, path: str = "builtin:smollm2_demo", max_length: int = 2048,
                 max_samples: int | None = None, system_prompt: str | None = None, batch_size: int = 4,
                 val_fraction: float = 0.05, num_workers: int = 0, seed: int = 0,
                 num_anchors: int | None = None, tokenize_workers: int = 0) -> None:
        super().__init__(batch_size, val_fraction, num_workers, seed, num_anchors)
        if target is None:
            raise ValueError("ConversationsDataModule needs the target (for its tokenizer): set data.target "
                             "or link it from model.target.")
        if tokenize_workers < 0:
            raise ValueError(f"tokenize_workers={tokenize_workers} must be >= 0.")
        self.target, self.path, self.max_length = target, path, max_length
        self.max_samples, self.system_prompt, self.tokenize_workers = max_samples, system_prompt, tokenize_workers
        self._rows = 0

    def _make_samples(self) -> list[dict[str, Tensor]]:
        tokenizer = load_tokenizer(self.target)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        rows = read_conversations(self.path)[: self.max_samples]
        self._rows = len(rows)
        tokenized = tokenize_rows(tokenizer, [row["conversations"] for row in rows], self.max_length,
                                  self.system_prompt, self.tokenize_workers)
        samples, self.sample_groups = [], []
        for row, (ids, mask) in zip(rows, tokenized):
            if mask[1:].any():
                samples.append({"input_ids": ids, "loss_mask": mask})
                self.sample_groups.append(prompt_group(row))
        return samples

    def _no_samples(self) -> str:
        if self._rows == 0:
            return f"max_samples={self.max_samples} leaves no conversation of {self.path}; raise it or remove it."
        return (f"All {self._rows} conversations of {self.path} were dropped: none has an assistant token (after its "
                f"first token) within max_length={self.max_length}. Raise max_length, or check that the rows have "
                f"assistant turns (regen writes them).")


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
        num_anchors: anchors per sample; default the trainer module's ``drafter_config.num_anchors`` (none for
            Eagle3).
    """

    def __init__(self, target: TargetConfig | None = None, num_samples: int = 64, seq_len: int = 64,
                 prompt_len: int = 8, batch_size: int = 4, val_fraction: float = 0.125, num_workers: int = 0,
                 seed: int = 0, num_anchors: int | None = None) -> None:
        super().__init__(batch_size, val_fraction, num_workers, seed, num_anchors)
        if not 0 <= prompt_len < seq_len - 1:
            raise ValueError(f"prompt_len={prompt_len} must be in [0, seq_len - 1 = {seq_len - 1}).")
        if num_samples < 1:
            raise ValueError(f"num_samples={num_samples} must be >= 1.")
        self.target, self.num_samples, self.seq_len, self.prompt_len = target, num_samples, seq_len, prompt_len

    def _make_samples(self) -> list[dict[str, Tensor]]:
        vocab = load_target_config(self.target).vocab_size if self.target is not None else 256
        g = torch.Generator().manual_seed(self.seed)
        ids = torch.randint(0, vocab, (self.num_samples, self.seq_len), generator=g)
        mask = torch.zeros(self.seq_len, dtype=torch.bool)
        mask[self.prompt_len:] = True
        return [{"input_ids": row, "loss_mask": mask.clone()} for row in ids]
