"""``TargetCacheDataModule``: stream a target cache into ``fit`` (offline mode of the batch contract).

The stream is a pure function of ``(seed, epoch, rank, position)``, which is what makes resumption exact:

* **Split.** Training shards are dealt once to ``world_size x streams`` slots (``streams`` = ``num_workers``,
  or 1), balanced by the manifest's sample counts. Slot ``(rank, s)`` is read by DataLoader worker ``s`` of
  that rank, so ranks and workers read disjoint shards (what ``wds.split_by_node`` / ``split_by_worker``
  do, but decided in the main process from the manifest, where the per-shard sample counts are known).
* **Order.** Each epoch a stream reads its shards in a seeded order through a seeded shuffle buffer
  (``shuffle_buffer`` samples), decodes and checks each sample, samples anchors with a per-sample seed, and
  emits right-padded batches. With ``resampled=True`` a stream instead draws shards with replacement from all
  training shards, forever, and ``samples_per_epoch`` sets the epoch length.
* **Lockstep.** Every rank's epoch has the same number of batches (the smallest rank's, or
  ``samples_per_epoch / (batch_size * world_size)``), so DDP ranks never wait on each other.
* **Resume.** ``state_dict()`` is ``{epoch, position}``: batches the trainer has consumed this epoch (counted in
  ``on_before_batch_transfer``, so the batch Lightning prefetched but did not train on is not counted).
  ``load_state_dict`` + the next ``iter`` replays the interleaving of the workers' streams on paper, tells each
  worker how many batches to skip (raw bytes, no decoding) and in which order to restart, and the stream
  continues with exactly the batch the interrupted run would have trained on next.
"""

from __future__ import annotations

import heapq
import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning as L
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ...drafters.blocks import sample_anchors
from ...drafters.registry import drafter_class
from ...targets import TargetConfig
from ..online import EpochLoader, collate_tokens, stable_seed
from .format import CacheError, decode_sample, dequantize_fp8, read_manifest, tokenizer_hash
from .reader import SkipLog, iter_shard, shard_urls

log = logging.getLogger(__name__)
_HIDDEN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                  "float64": torch.float64}


_seed = stable_seed


# ---------------------------------------------------------------------- the worker side
@dataclass
class _Stream:
    """What one DataLoader worker reads in one epoch."""

    logical: int  # slot index within the rank; seeds depend on it, not on the physical worker id
    shards: list[int]  # manifest indices (non-resampled) in slot order
    batch_sizes: list[int]  # size of each batch this stream emits this epoch (its quota)
    skip: int = 0  # batches already consumed before a resume


@dataclass
class _EpochPlan:
    epoch: int
    rank: int
    streams: list[_Stream]  # in physical worker order; workers beyond the list emit nothing
    train: bool
    resampled: bool = False
    pool: list[int] = field(default_factory=list)  # shards a resampled stream draws from


def collate_cache(samples: list[dict[str, Any]], hidden_dtype: torch.dtype) -> dict[str, Any]:
    """Right-pad decoded samples to the batch contract (docs/design.md) and cast hidden states to ``hidden_dtype``."""
    batch: dict[str, Any] = collate_tokens(samples)
    b, length = batch["input_ids"].shape
    names = [n for n in ("target_hidden", "target_last_hidden", "target_hidden_scale", "target_last_hidden_scale")
             if n in samples[0]]
    for name in names:
        value = samples[0][name]
        # fp8 states left for the device and their fp32 scales keep their dtype; the rest take the training dtype.
        keep = value.dtype == torch.float8_e4m3fn or name.endswith("_scale")
        out = torch.zeros(b, length, *value.shape[1:], dtype=value.dtype if keep else hidden_dtype)
        for i, s in enumerate(samples):
            out[i, : s[name].shape[0]] = s[name]
        batch[name] = out
    if "anchors" in samples[0]:
        batch["anchors"] = torch.cat([s["anchors"] for s in samples])
        batch["anchor_valid"] = torch.cat([s["anchor_valid"] for s in samples])
    batch["cache_keys"] = [s["key"] for s in samples]
    batch["cache_skipped"] = torch.tensor(sum(s.get("skipped", 0) for s in samples), dtype=torch.long)
    return batch


class _CacheStream(IterableDataset):
    """Yields collated batches for the plan set before each ``iter`` (see the module docstring)."""

    def __init__(self, urls: list[str], manifest: dict[str, Any], *, batch_size: int, shuffle_buffer: int, seed: int,
                 num_anchors: int | None, hidden_dtype: torch.dtype, skip_corrupt: bool, verify_sha256: bool,
                 dequantize: bool = True) -> None:
        super().__init__()
        self.urls, self.shards = urls, manifest["shards"]
        self.geometry = dict(dtype=manifest["dtype"], hidden_size=manifest["hidden_size"],
                             num_layers=len(manifest["target_layer_ids"]), vocab_size=manifest["vocab_size"])
        self.batch_size, self.shuffle_buffer, self.seed = batch_size, shuffle_buffer, seed
        self.num_anchors, self.hidden_dtype = num_anchors, hidden_dtype
        self.skip_corrupt, self.verify_sha256, self.dequantize = skip_corrupt, verify_sha256, dequantize
        self.plan: _EpochPlan | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        plan = self.plan
        assert plan is not None, "the loader sets a plan before iterating"
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if worker >= len(plan.streams):
            return
        yield from self._stream(plan, plan.streams[worker])

    def _raw(self, plan: _EpochPlan, stream: _Stream, sweep: int, skip_log: SkipLog) -> Iterator[tuple]:
        """``(shard index, key, bytes)`` of one pass over the stream's shards (shuffled), or of a resampled draw."""
        rng = random.Random(_seed(self.seed, plan.epoch, plan.rank, stream.logical, sweep, "shards"))

        def samples() -> Iterator[tuple]:
            if plan.resampled:
                while True:
                    i = rng.choice(plan.pool)
                    for key, data in iter_shard(self.urls[i], self.shards[i], verify_sha256=self.verify_sha256,
                                                skip_log=skip_log if self.skip_corrupt else None):
                        yield i, key, data
            order = list(stream.shards)
            if plan.train:
                rng.shuffle(order)
            for i in order:
                for key, data in iter_shard(self.urls[i], self.shards[i], verify_sha256=self.verify_sha256,
                                            skip_log=skip_log if self.skip_corrupt else None):
                    yield i, key, data

        if not plan.train or self.shuffle_buffer <= 1:
            return samples()
        shuffle_rng = random.Random(_seed(self.seed, plan.epoch, plan.rank, stream.logical, sweep, "buffer"))
        return wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=shuffle_rng)(samples())

    def _stream(self, plan: _EpochPlan, stream: _Stream) -> Iterator[dict[str, Any]]:
        skip_log = SkipLog()
        sweep = 0
        raw = self._raw(plan, stream, sweep, skip_log)
        # Resume: drop the samples of the batches already trained on, undecoded.
        for _ in range(sum(stream.batch_sizes[: stream.skip])):
            if next(raw, None) is None:
                return
        position = sum(stream.batch_sizes[: stream.skip])  # samples emitted so far by this stream
        for size in stream.batch_sizes[stream.skip:]:
            batch: list[dict[str, Any]] = []
            skipped_before = skip_log.samples + skip_log.shards
            while len(batch) < size:
                item = next(raw, None)
                if item is None:
                    if not plan.train or skip_log.samples + skip_log.shards == 0:
                        break
                    # Skipped corrupt samples left this stream short of its quota: read its shards again so the
                    # rank still delivers the planned number of batches (DDP ranks stay in step).
                    sweep += 1
                    raw = self._raw(plan, stream, sweep, skip_log)
                    item = next(raw, None)
                    if item is None:
                        break
                sample = self._decode(plan, stream, item, position, skip_log)
                if sample is not None:
                    batch.append(sample)
                    position += 1
            if not batch:
                return
            batch[0]["skipped"] = skip_log.samples + skip_log.shards - skipped_before
            yield collate_cache(batch, self.hidden_dtype)

    def _decode(self, plan: _EpochPlan, stream: _Stream, item: tuple, position: int, skip_log: SkipLog
                ) -> dict[str, Any] | None:
        shard, key, data = item
        where = f"shard {self.urls[shard]} key {key!r}"
        try:
            sample: dict[str, Any] = decode_sample(data, where=where, out_dtype=self.hidden_dtype,
                                                   dequantize=self.dequantize, **self.geometry)
        except CacheError as err:
            if not self.skip_corrupt:
                raise
            skip_log.add(str(err))
            return None
        sample["key"] = f"{self.shards[shard]['name']}/{key}"
        if self.num_anchors:
            g = torch.Generator().manual_seed(_seed(self.seed, plan.epoch, plan.rank, stream.logical, position,
                                                    "anchors" if plan.train else "val-anchors"))
            sample["anchors"], sample["anchor_valid"] = sample_anchors(sample["loss_mask"][None], self.num_anchors, g)
        return sample


# ---------------------------------------------------------------------- planning (main process)
def _deal(shards: list[int], counts: list[int], slots: int) -> list[list[int]]:
    """Deal shards to slots, largest first to the least-loaded slot (ties: lowest slot), each slot in shard order."""
    heap = [(0, k) for k in range(slots)]  # (samples dealt, slot): already a heap
    dealt: list[list[int]] = [[] for _ in range(slots)]
    for i in sorted(shards, key=lambda i: (-counts[i], i)):
        load, k = heapq.heappop(heap)
        dealt[k].append(i)
        heapq.heappush(heap, (load + counts[i], k))
    return [sorted(d) for d in dealt]


def _interleave(lengths: list[int], steps: int) -> tuple[list[int], int]:
    """Batches taken from each stream after ``steps`` batches of a round-robin that skips exhausted streams
    (what ``torch.utils.data.DataLoader`` does with an IterableDataset), and the stream whose turn is next."""
    taken = [0] * len(lengths)
    turn, done = 0, 0
    while done < steps and any(t < n for t, n in zip(taken, lengths)):
        if taken[turn] < lengths[turn]:
            taken[turn] += 1
            done += 1
        turn = (turn + 1) % len(lengths)
    return taken, turn


def _batch_sizes(samples: int, batch_size: int) -> list[int]:
    full, rest = divmod(samples, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


class _EpochLoader(EpochLoader):
    """What ``train_dataloader`` returns: an iterable of batches with a fixed length per epoch."""

    def __init__(self, dm: TargetCacheDataModule, dataset: _CacheStream) -> None:
        # Not `.dataset`: Lightning would warn about a sized IterableDataset, which this wrapper handles.
        super().__init__(dm)
        self._stream = dataset

    def __iter__(self) -> Iterator[dict[str, Any]]:
        dm = self.dm
        epoch, start = dm._begin_epoch()
        self._stream.plan = dm._train_plan(epoch, start)
        loader = DataLoader(self._stream, batch_size=None, num_workers=dm.num_workers,
                            persistent_workers=False, pin_memory=dm.pin_memory)
        position = start
        for batch in loader:
            if position >= dm.batches_per_epoch:
                break
            position += 1
            dm._yielded = (epoch, position)
            yield batch
        if position < dm.batches_per_epoch:
            raise CacheError(f"Epoch {epoch} of {dm.path} ended after {position} of {dm.batches_per_epoch} planned "
                             f"batches on rank {dm.rank}: a shard holds fewer samples than the manifest says. Run "
                             f"`python -m dspark_lightning cache verify {dm.path}`.")
        dm._end_epoch(epoch)


# ---------------------------------------------------------------------- the DataModule
class TargetCacheDataModule(L.LightningDataModule):
    """Stream a target cache (webdataset shards + ``manifest.json``) as training batches.

    Batches follow the contract of docs/design.md: ``input_ids [B, L] int64``, ``loss_mask``/``attention_mask [B, L]
    bool`` (right padding), ``target_hidden [B, L, m*H]``, ``target_last_hidden [B, L, H]`` (in the training
    dtype), ``anchors``/``anchor_valid [B, N]`` (block drafters), plus ``cache_keys`` (``"<shard>/<key>"``
    per row) and ``cache_skipped`` (corrupt samples skipped while making the batch).

    Args:
        path: directory or URL prefix holding ``manifest.json`` (local path, ``file://``, ``s3://``, any fsspec URL).
        target: the training target (linked from ``model.target``); checked against the manifest when no
            trainer module provides one.
        batch_size: samples per batch (per rank).
        num_workers: DataLoader workers per rank; each reads its own shards (0 = read in the main process).
        shuffle_buffer: samples held by each worker's shuffle buffer (memory: this many raw samples per worker).
        samples_per_epoch: samples per epoch over all ranks; required with ``resampled``, else an optional cap.
        resampled: draw shards with replacement, forever (``samples_per_epoch`` sets the epoch).
        val_shards: the last ``val_shards`` shards of the manifest are the validation set.
        val_fraction: ... or this fraction of them (rounded, at least 1 when > 0); 0 and 0 = no validation.
        skip_corrupt: skip (and count and log) corrupt samples and truncated shards instead of raising.
        verify_sha256: check each shard's size and sha256 against the manifest before any of its samples is used
            (the shard is copied to memory, or a temp file beyond 256 MiB, hashed, then read from the copy); a
            mismatch raises, or skips the whole shard with ``skip_corrupt``. Costs docs/cache.md §6 measures.
        seed: seed of shard order, shuffle buffers and anchors.
        shard_url: template for shard URLs with ``{name}`` (and ``{path}``), any fsspec URL, e.g.
            ``"s3://other-bucket/cache/{name}"``; default ``<path>/<name>``. ``pipe:`` (shell) URLs are refused.
        num_anchors: anchors per sample; default what the trainer module's drafter trains on
            (``training_anchors(drafter_config)``: ``num_anchors`` for block drafters, none for Eagle3). Without a
            trainer and without this, batches carry no anchors.
        target_layer_ids: expected layer ids when no trainer module provides a drafter config.
        tokenizer: tokenizer (directory or Hub id) training assumes; its hash must match the manifest's. Default:
            the target's own tokenizer when it has one and ``check_tokenizer``.
        check_tokenizer: compare the target's tokenizer hash with the manifest's.
        allow_target_mismatch: accept a manifest whose target identity (path/revision) differs when the config
            hash matches (the same model stored elsewhere).
        hidden_dtype: dtype of the hidden states in batches; default from the trainer's precision (bf16/fp16
            for ``bf16-*``/``16-*``, else float32).
        fp8_dequantize: where an fp8 cache is dequantised: ``worker`` (DataLoader workers, CPU) or ``device`` (in
            ``on_after_batch_transfer``, after the half-size fp8 batch reached the GPU; batches from the loader
            then carry ``target_hidden`` in fp8 plus ``*_scale``). ``auto``: ``device`` when training on CUDA.
        pin_memory: pin batches in page-locked memory; default: when training on CUDA.
        rank, world_size: only without a trainer: this process's place (default: torch.distributed, then the
            ``RANK``/``WORLD_SIZE`` environment, then 0 of 1).
    """

    def __init__(
        self,
        path: str,
        target: TargetConfig | None = None,
        batch_size: int = 4,
        num_workers: int = 2,
        shuffle_buffer: int = 64,
        samples_per_epoch: int | None = None,
        resampled: bool = False,
        val_shards: int = 0,
        val_fraction: float = 0.0,
        skip_corrupt: bool = False,
        verify_sha256: bool = True,
        seed: int = 0,
        shard_url: str | None = None,
        num_anchors: int | None = None,
        target_layer_ids: list[int] | None = None,
        tokenizer: str | None = None,
        check_tokenizer: bool = True,
        allow_target_mismatch: bool = False,
        hidden_dtype: str | None = None,
        fp8_dequantize: Literal["auto", "worker", "device"] = "auto",
        pin_memory: bool | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1 or num_workers < 0 or shuffle_buffer < 0:
            raise ValueError(f"batch_size={batch_size} must be >= 1, num_workers={num_workers} and "
                             f"shuffle_buffer={shuffle_buffer} >= 0.")
        if resampled and not samples_per_epoch:
            raise ValueError("resampled=True draws shards forever: set samples_per_epoch (samples per epoch over all "
                             "ranks) to define an epoch.")
        if not 0.0 <= val_fraction < 1.0 or val_shards < 0:
            raise ValueError(f"val_fraction={val_fraction} must be in [0, 1) and val_shards={val_shards} >= 0.")
        if hidden_dtype is not None and hidden_dtype not in _HIDDEN_DTYPES:
            raise ValueError(f"hidden_dtype={hidden_dtype!r}; choose one of {sorted(_HIDDEN_DTYPES)}.")
        self.path, self.target, self.batch_size, self.num_workers = path, target, batch_size, num_workers
        self.shuffle_buffer, self.samples_per_epoch, self.resampled = shuffle_buffer, samples_per_epoch, resampled
        self.val_shards, self.val_fraction, self.skip_corrupt = val_shards, val_fraction, skip_corrupt
        self.verify_sha256, self.seed, self.shard_url = verify_sha256, seed, shard_url
        self.num_anchors, self.target_layer_ids, self.tokenizer = num_anchors, target_layer_ids, tokenizer
        self.check_tokenizer, self.allow_target_mismatch = check_tokenizer, allow_target_mismatch
        if fp8_dequantize not in ("auto", "worker", "device"):
            raise ValueError(f"fp8_dequantize={fp8_dequantize!r}; choose 'auto', 'worker' or 'device'.")
        self.hidden_dtype_name, self.pin_memory, self.fp8_dequantize = hidden_dtype, pin_memory, fp8_dequantize
        self._rank, self._world_size = rank, world_size
        self.manifest: dict[str, Any] | None = None
        self.skipped = 0
        self._restored: dict[str, Any] | None = None
        self._yielded: tuple[int, int] = (0, 0)  # (epoch, batches handed out)
        self._consumed: tuple[int, int] = (0, 0)  # (epoch, batches trained on), counted with a trainer only
        self._next_epoch = 0

    # ------------------------------------------------------------------ setup and checks
    def setup(self, stage: str | None = None) -> None:
        if self.manifest is not None:
            return
        manifest = read_manifest(self.path)
        module = self.trainer.lightning_module if self.trainer is not None else None
        drafter = getattr(module, "drafter_config", None)
        target = getattr(module, "target_config", None) or self.target
        self._check_geometry(manifest, drafter)
        if target is not None:
            self._check_target(manifest, target)
        self._check_tokenizer(manifest, target)
        if self.num_anchors is None and drafter is not None:
            self.num_anchors = drafter_class(drafter.algorithm).training_anchors(drafter)
        self.rank, self.world_size = self._place()
        self.urls = shard_urls(self.path, manifest, self.shard_url)
        counts = [s["samples"] for s in manifest["shards"]]
        n = len(counts)
        n_val = self.val_shards or (max(1, round(self.val_fraction * n)) if self.val_fraction > 0 else 0)
        if n_val >= n:
            raise ValueError(f"{self.path} has {n} shards; val_shards/val_fraction asks for {n_val} validation shards "
                             f"and would leave none for training. Build smaller shards (max_shard_samples).")
        self.train_ids, self.val_ids = list(range(n - n_val)), list(range(n - n_val, n))
        self.streams = max(1, self.num_workers)
        slots = self.world_size * self.streams
        # Shards go to ranks first, then to a rank's worker streams: dealt straight to all rank x worker slots,
        # 12 shards on 4 ranks x 2 workers gave two ranks 4 shards and two ranks 2, and an epoch ends for all
        # ranks at the smallest share (a third of the data unread).
        self._slots = [_deal(ids, counts, self.streams) for ids in _deal(self.train_ids, counts, self.world_size)]
        # Validation shards go to ranks first, then to a rank's worker streams, so that every rank gets one as long
        # as there are as many as ranks. Validation is lockstep too: under DDP every rank must run the same number
        # of validation steps (each forward and the metric reduction are collectives), so all stop at the smallest.
        per_rank_val = [_deal(ids, counts, self.streams) for ids in _deal(self.val_ids, counts, self.world_size)]
        self._val_slots = per_rank_val[self.rank]
        self._counts = counts
        val_lengths = [sum(len(_batch_sizes(sum(counts[i] for i in slot), self.batch_size)) for slot in rank_slots)
                       for rank_slots in per_rank_val]
        self.val_batches = min(val_lengths) if self.val_ids else 0
        if self.val_ids and self.val_batches < 1:
            raise ValueError(
                f"{self.path}: {n_val} validation shard(s) for {self.world_size} rank(s) leave a rank without a "
                f"validation batch (ranks would run different numbers of validation steps and hang). Set val_shards "
                f"to at least {self.world_size} (the world size), "
                f"or val_shards: 0 with val_fraction: 0 to skip validation.")
        per_rank = self.batch_size * self.world_size
        if self.resampled:
            self.batches_per_epoch = self.samples_per_epoch // per_rank
        else:
            lengths = [sum(len(_batch_sizes(sum(counts[i] for i in slot), self.batch_size)) for slot in rank_slots)
                       for rank_slots in self._slots]
            self.batches_per_epoch = min(lengths)
            if self.samples_per_epoch:
                self.batches_per_epoch = min(self.batches_per_epoch, self.samples_per_epoch // per_rank)
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"{self.path}: rank {self.rank} of {self.world_size} gets no full epoch ({len(self.train_ids)} "
                f"training shards for {slots} rank x worker slots, {sum(counts[i] for i in self.train_ids)} samples, "
                f"samples_per_epoch={self.samples_per_epoch}, batch_size={self.batch_size}). Build more, smaller "
                f"shards (max_shard_samples), use fewer workers, or set resampled: true with samples_per_epoch."
            )
        self.hidden_dtype = self._training_dtype()
        device = getattr(getattr(self.trainer, "strategy", None), "root_device", None)
        on_cuda = getattr(device, "type", "cpu") == "cuda"
        if self.pin_memory is None:
            self.pin_memory = on_cuda
        self.dequantize_on_device = manifest["dtype"] == "float8_e4m3fn" and (
            self.fp8_dequantize == "device" or (self.fp8_dequantize == "auto" and on_cuda))
        self.manifest = manifest

    def _place(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if self._rank is not None or self._world_size is not None:
            return self._rank or 0, self._world_size or 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        import os

        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    def _training_dtype(self) -> torch.dtype:
        if self.hidden_dtype_name is not None:
            return _HIDDEN_DTYPES[self.hidden_dtype_name]
        precision = str(getattr(self.trainer, "precision", "32-true")) if self.trainer is not None else "32-true"
        if precision.startswith("bf16"):
            return torch.bfloat16
        if precision.startswith("16"):
            return torch.float16
        return torch.float64 if precision.startswith("64") else torch.float32

    def _check_geometry(self, manifest: dict[str, Any], drafter: Any) -> None:
        where = f"cache {self.path}"
        layers = list(drafter.target_layer_ids) if drafter is not None else self.target_layer_ids
        if layers is not None and list(layers) != list(manifest["target_layer_ids"]):
            raise CacheError(f"{where} holds target layers {manifest['target_layer_ids']}, but the drafter reads "
                             f"target_layer_ids={list(layers)}. Build a cache with these layers or change the drafter.")
        if drafter is None:
            return
        for name in ("hidden_size", "vocab_size"):
            if getattr(drafter, name) != manifest[name]:
                raise CacheError(f"{where} has {name}={manifest[name]}, but the drafter has {name}="
                                 f"{getattr(drafter, name)}: the cache was built for another target.")
        mask = getattr(drafter, "mask_token_id", None)
        if mask is not None and not 0 <= mask < manifest["vocab_size"]:
            raise CacheError(f"The drafter's mask_token_id={mask} is outside the cache vocabulary "
                             f"[0, {manifest['vocab_size']}).")

    def _check_target(self, manifest: dict[str, Any], target: TargetConfig) -> None:
        built = manifest["target"]
        ours = json.loads(json.dumps(target.identity()))
        config_hash = target.config_hash()
        if built.get("config_hash") != config_hash:
            raise CacheError(f"Cache {self.path} was built for target {built.get('identity')} (config hash "
                             f"{built.get('config_hash')}), but training uses {ours} (config hash {config_hash}). "
                             f"Build a cache for this target.")
        if built.get("identity") != ours and not self.allow_target_mismatch:
            raise CacheError(f"Cache {self.path} was built for target {built.get('identity')}, but training uses "
                             f"{ours} (same config hash). If it is the same model stored elsewhere, set "
                             f"allow_target_mismatch: true; otherwise build a cache for this target.")

    def _check_tokenizer(self, manifest: dict[str, Any], target: TargetConfig | None) -> None:
        built = manifest["tokenizer"].get("hash")
        if built is None:
            return
        if self.tokenizer is not None:
            from transformers import AutoTokenizer

            tok, name = AutoTokenizer.from_pretrained(self.tokenizer), self.tokenizer
        elif self.check_tokenizer and target is not None and target.tiny is None:
            from ...targets import load_tokenizer

            tok, name = load_tokenizer(target), f"the target's tokenizer ({target.path})"
        else:
            return
        ours = tokenizer_hash(tok)
        if ours != built:
            raise CacheError(f"Cache {self.path} was tokenised with a tokenizer of hash {built} "
                             f"({manifest['tokenizer'].get('name_or_path')}), but {name} has hash {ours}. Rebuild the "
                             f"cache with this tokenizer.")

    # ------------------------------------------------------------------ loaders
    def _dataset(self) -> _CacheStream:
        return _CacheStream(self.urls, self.manifest, batch_size=self.batch_size, shuffle_buffer=self.shuffle_buffer,
                            seed=self.seed, num_anchors=self.num_anchors, hidden_dtype=self.hidden_dtype,
                            skip_corrupt=self.skip_corrupt, verify_sha256=self.verify_sha256,
                            dequantize=not self.dequantize_on_device)

    def train_dataloader(self) -> _EpochLoader:
        self._require_setup()
        return _EpochLoader(self, self._dataset())

    def val_dataloader(self) -> DataLoader | list:
        self._require_setup()
        if not self.val_ids:
            return []
        lengths = [len(_batch_sizes(sum(self._counts[i] for i in slot), self.batch_size)) for slot in self._val_slots]
        quota, _ = _interleave(lengths, self.val_batches)
        streams = [_Stream(s, slot, _batch_sizes(sum(self._counts[i] for i in slot), self.batch_size)[: quota[s]])
                   for s, slot in enumerate(self._val_slots) if quota[s]]
        dataset = self._dataset()
        dataset.plan = _EpochPlan(epoch=0, rank=self.rank, streams=streams, train=False)
        return DataLoader(dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory)

    def _require_setup(self) -> None:
        if self.manifest is None:
            raise RuntimeError("Call setup() before asking TargetCacheDataModule for a dataloader.")

    def _train_plan(self, epoch: int, start: int) -> _EpochPlan:
        slots = self._slots[self.rank]
        if self.resampled:
            lengths = [self.batches_per_epoch] * self.streams
        else:
            lengths = [len(_batch_sizes(sum(self._counts[i] for i in slot), self.batch_size)) for slot in slots]
        quota, _ = _interleave(lengths, self.batches_per_epoch)
        consumed, turn = _interleave(quota, start)
        streams = []
        for k in range(self.streams):
            s = (turn + k) % self.streams
            if consumed[s] < quota[s]:
                samples = sum(self._counts[i] for i in slots[s])
                sizes = [self.batch_size] * quota[s] if self.resampled else _batch_sizes(samples, self.batch_size)
                streams.append(_Stream(s, slots[s], sizes[: quota[s]], skip=consumed[s]))
        return _EpochPlan(epoch=epoch, rank=self.rank, streams=streams, train=True, resampled=self.resampled,
                          pool=list(self.train_ids))

    # ------------------------------------------------------------------ epochs, resume
    def _begin_epoch(self) -> tuple[int, int]:
        epoch = self.trainer.current_epoch if self.trainer is not None else self._next_epoch
        start, restored, self._restored = 0, self._restored, None
        if restored is not None:
            settings = self._settings()
            rescaled = self._rescaled_position(restored, settings, epoch)
            if rescaled is not None:
                epoch, start = restored["epoch"], rescaled
            elif restored.get("settings") != settings:
                log.warning("TargetCacheDataModule: the checkpoint's stream settings %s differ from now %s; the "
                            "exact position cannot be restored, epoch %d starts from its beginning.",
                            restored.get("settings"), settings, epoch)
            elif restored["epoch"] == epoch or self.trainer is None:
                epoch, start = restored["epoch"], restored["position"]
                if start >= self.batches_per_epoch and self.trainer is None:
                    epoch, start = epoch + 1, 0
        self._yielded = self._consumed = (epoch, start)
        return epoch, start

    def _rescaled_position(self, restored: dict[str, Any], settings: dict[str, Any], epoch: int) -> int | None:
        """Resume on another number of ranks (or batch size): the same epoch, continued at the same share of its
        samples. The shards are dealt anew for the new world size, so this is the same *amount* of data per
        epoch, not the very same samples (an exact stream needs the same world size and batch size).
        None when anything else changed."""
        old = restored.get("settings") or {}
        scale_keys = ("world_size", "batch_size", "batches_per_epoch")
        if old == settings or any(old.get(k) != v for k, v in settings.items() if k not in scale_keys):
            return None
        if restored["epoch"] != epoch and self.trainer is not None:
            return None
        fraction = restored["position"] / max(old["batches_per_epoch"], 1)
        start = min(round(fraction * self.batches_per_epoch), self.batches_per_epoch)
        log.warning("TargetCacheDataModule: resuming on %d rank(s) x batch %d from a run on %d x %d: epoch %d "
                    "continues at batch %d of %d (%.1f%% of the epoch, as before); the shards are dealt anew, so "
                    "the remaining samples are not exactly the ones the old run would have read.",
                    self.world_size, self.batch_size, old["world_size"], old["batch_size"], restored["epoch"],
                    start, self.batches_per_epoch, 100 * fraction)
        return start

    def _end_epoch(self, epoch: int) -> None:
        self._next_epoch = epoch + 1

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict) and "cache_skipped" in batch:
            skipped = int(batch.pop("cache_skipped"))
            if skipped:
                self.skipped += skipped
                log.warning("TargetCacheDataModule: %d corrupt sample(s) skipped so far (skip_corrupt=True).",
                            self.skipped)
        if self.trainer is not None and self.trainer.training:
            epoch, count = self._consumed
            self._consumed = (epoch, count + 1)
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Dequantise fp8 hidden states on the device (``fp8_dequantize='device'``) into the training dtype."""
        if isinstance(batch, dict):
            for name in ("target_hidden", "target_last_hidden"):
                scale = batch.pop(f"{name}_scale", None)
                if scale is not None:
                    batch[name] = dequantize_fp8(batch[name], scale, self.hidden_dtype)
        return batch

    def _settings(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "streams": self.streams, "batch_size": self.batch_size,
                "seed": self.seed, "resampled": self.resampled, "batches_per_epoch": self.batches_per_epoch,
                "shuffle_buffer": self.shuffle_buffer, "build": self.manifest.get("build", {}).get("fingerprint")}

    def state_dict(self) -> dict[str, Any]:
        """Where the training stream is: ``{epoch, position (batches trained on), settings, skipped}``."""
        if self.manifest is None:
            return {}
        epoch, position = self._consumed if self.trainer is not None else self._yielded
        return {"epoch": epoch, "position": position, "settings": self._settings(), "skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the stream at the saved position on the next ``iter`` of the train loader."""
        if state_dict:
            self._restored = dict(state_dict)
            self.skipped = state_dict.get("skipped", 0)
