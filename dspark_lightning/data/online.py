"""DataModules for online mode: token batches only; the frozen target runs inside the LightningModule.

Both modules yield the batch contract of docs/design.md without target states: ``input_ids [B, L] int64``,
``loss_mask [B, L] bool``, ``attention_mask [B, L] bool`` (right padding).
"""

from __future__ import annotations

import random

import lightning as L
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

    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        samples = self._make_samples()
        order = list(range(len(samples)))
        random.Random(self.seed).shuffle(order)
        n_val = int(round(self.val_fraction * len(samples)))
        self.val_set = _ListDataset([samples[i] for i in order[:n_val]])
        self.train_set = _ListDataset([samples[i] for i in order[n_val:]])

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

    Args:
        target: the target whose tokenizer and chat template are used (linked from ``model.target``).
        path: a JSONL file, or ``builtin:<name>`` for a set shipped with the package (``builtin:smollm2_demo``).
        max_length: truncate samples to this many tokens.
        max_samples: use at most this many conversations (None = all).
        system_prompt: prepended as a system message when the conversation has none.
        batch_size, val_fraction, num_workers, seed: loader settings.
    """

    def __init__(self, target: TargetConfig | None = None, path: str = "builtin:smollm2_demo", max_length: int = 2048,
                 max_samples: int | None = None, system_prompt: str | None = None, batch_size: int = 4,
                 val_fraction: float = 0.05, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__(batch_size, val_fraction, num_workers, seed)
        if target is None:
            raise ValueError("ConversationsDataModule needs the target (for its tokenizer): set data.target "
                             "or link it from model.target.")
        self.target, self.path, self.max_length = target, path, max_length
        self.max_samples, self.system_prompt = max_samples, system_prompt

    def _make_samples(self) -> list[dict[str, Tensor]]:
        tokenizer = load_tokenizer(self.target)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        rows = read_conversations(self.path)[: self.max_samples]
        samples = []
        for row in rows:
            ids, mask = tokenize_conversation(tokenizer, row["conversations"], max_length=self.max_length,
                                              system_prompt=self.system_prompt)
            if mask[1:].any():
                samples.append({"input_ids": ids, "loss_mask": mask})
        return samples


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
