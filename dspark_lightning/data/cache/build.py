"""``cache build`` and ``cache estimate``: run the frozen target over conversations and write the cache.

How a build proceeds (one process per device; ranks never talk to each other):

1. Every rank reads the input rows and takes a contiguous slice of them (rank ``r`` of ``R``: rows
   ``[r*N/R, (r+1)*N/R)``).
2. It tokenises its rows (chat template, assistant loss mask, ``max_length``), drops those with fewer than
   ``min_loss_tokens`` trainable tokens, and groups the rest into shards (``max_shard_samples`` /
   ``max_shard_bytes``). Shard boundaries depend on token counts only, so a resumed build cuts the same shards.
3. Per shard it runs the target (batches sorted by length, right padding), encodes each sample (bf16 or fp8),
   writes ``.shard-RR-IIIII.tar.tmp-PID``, fsyncs it and renames it to ``shard-RR-IIIII.tar``, then records the
   shard (samples, tokens, bytes, sha256) in ``progress-RR.json`` (also written atomically).
4. When its slice is done a rank writes ``manifest.rank-RR.json``; rank 0 waits for all of them and writes the
   merged ``manifest.json`` (atomically), then removes the per-rank files.

Rerunning the same command after a crash continues from ``progress-RR.json``: complete shards are kept, a shard
that was being written is redone (its temp file never had a ``.tar`` name), and a build whose settings differ
from the recorded ones is refused. A finished cache is left alone.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from ...targets import FrozenTarget, TargetConfig, load_target_config, load_tokenizer
from ..conversations import conversations_path, iter_jsonl, read_conversations, tokenize_conversation
from .format import (
    CACHE_DTYPES,
    CACHE_KIND,
    DEEPSPEC_QWEN3_4B_BYTES_PER_TOKEN,
    FORMAT_VERSION,
    MANIFEST_NAME,
    QWEN3_4B_HIDDEN,
    QWEN3_4B_LAYERS,
    SAMPLE_EXT,
    TAR_BLOCK,
    CacheError,
    bytes_per_token,
    encode_sample,
    tar_member_bytes,
    tokenizer_hash,
    write_json_atomic,
)

CacheDtype = Literal["bfloat16", "float8_e4m3fn"]
_SAMPLE_HEADER_BYTES = 512  # safetensors JSON header of one sample, roughly (estimates only)


def shard_name(rank: int, index: int) -> str:
    return f"shard-{rank:02d}-{index:05d}.tar"


# ---------------------------------------------------------------------- inputs
@dataclass
class _Row:
    index: int  # position in the concatenated inputs
    id: str
    messages: list[dict[str, str]] | None = None
    input_ids: list[int] | None = None
    loss_mask: list[int] | None = None


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_token_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for lineno, row in iter_jsonl(path):
        ids = row.get("input_ids")
        mask = row.get("loss_mask", [1] * len(ids) if isinstance(ids, list) else None)
        if not isinstance(ids, list) or not isinstance(mask, list) or len(ids) != len(mask) or not ids:
            raise ValueError(f"{path}:{lineno}: a token row needs a non-empty 'input_ids' list and a "
                             f"'loss_mask' list of the same length.")
        rows.append({"id": str(row.get("id", f"{path.stem}-{lineno}")), "input_ids": ids, "loss_mask": mask})
    return rows


def read_inputs(inputs: list[str]) -> tuple[list[_Row], list[dict[str, Any]]]:
    """Rows of every input file, in order, and a description of each file (path, bytes, sha256, rows).

    A file holds either conversations (``{id, conversations}`` or ``{"turns"}``, see ``read_conversations``) or
    pre-tokenised rows ``{id, input_ids: [...], loss_mask: [...]}`` (no chat template applied).
    """
    rows: list[_Row] = []
    sources = []
    for name in inputs:
        path = conversations_path(name)
        tokens = "input_ids" in next(iter_jsonl(path), (0, {}))[1]  # the first row says which kind the file holds
        raw = _read_token_rows(path) if tokens else read_conversations(path)
        for r in raw:
            rows.append(_Row(index=len(rows), id=str(r["id"]), messages=r.get("conversations"),
                             input_ids=r.get("input_ids"), loss_mask=r.get("loss_mask")))
        sources.append({"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": _file_digest(path),
                        "rows": len(raw), "kind": "tokens" if tokens else "conversations"})
    return rows, sources


def _tokenize(row: _Row, tokenizer: Any, max_length: int, system_prompt: str | None) -> tuple[Tensor, Tensor]:
    if row.input_ids is not None:
        ids = torch.tensor(row.input_ids[:max_length], dtype=torch.long)
        return ids, torch.tensor(row.loss_mask[:max_length], dtype=torch.bool)
    if tokenizer is None:
        raise ValueError(f"Row {row.id!r} is a conversation but no tokenizer is available: the target is a tiny "
                         f"random model, so pass tokenizer=<a tokenizer directory>.")
    return tokenize_conversation(tokenizer, row.messages, max_length=max_length, system_prompt=system_prompt)


def _load_tokenizer(target: TargetConfig, tokenizer: str | None) -> Any:
    if tokenizer is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tokenizer)
    if target.tiny is not None:
        return None  # token rows need none; a conversation row raises in _tokenize
    return load_tokenizer(target)


def _tokenizer_info(tok: Any) -> dict[str, Any]:
    if tok is None:
        return {"hash": None, "chat_template": None, "name_or_path": None}
    return {"hash": tokenizer_hash(tok), "chat_template": getattr(tok, "chat_template", None),
            "name_or_path": getattr(tok, "name_or_path", None)}


# ---------------------------------------------------------------------- shards
class _HashingWriter(io.RawIOBase):
    def __init__(self, f: Any) -> None:
        super().__init__()
        self.f, self.sha, self.nbytes = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.nbytes

    def write(self, data: Any) -> int:
        data = bytes(data)
        self.f.write(data)
        self.sha.update(data)
        self.nbytes += len(data)
        return len(data)


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> dict[str, Any]:
    """Write ``members`` (key, safetensors bytes) as a tar at ``path``, atomically; return bytes and sha256.

    Member headers are fixed (mtime 0, mode 0444, no owner), so the same samples always give the same bytes.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            hashing = _HashingWriter(f)
            with tarfile.open(fileobj=hashing, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for key, data in members:
                    info = tarfile.TarInfo(f"{key}.{SAMPLE_EXT}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o444
                    tar.addfile(info, io.BytesIO(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"bytes": hashing.nbytes, "sha256": hashing.sha.hexdigest()}


@dataclass
class _Pending:
    row: _Row
    input_ids: Tensor
    loss_mask: Tensor


def _plan_shards(pending: Iterator[_Pending], max_samples: int, max_bytes: int, per_token: int
                 ) -> Iterator[list[_Pending]]:
    """Cut the sample stream into shards; depends on token counts only (so a resumed build cuts the same)."""
    shard: list[_Pending] = []
    size = 0
    for p in pending:
        member = tar_member_bytes(per_token * p.input_ids.shape[0] + _SAMPLE_HEADER_BYTES)
        if shard and (len(shard) >= max_samples or size + member > max_bytes):
            yield shard
            shard, size = [], 0
        shard.append(p)
        size += member
    if shard:
        yield shard


@torch.no_grad()
def _encode_shard(target: FrozenTarget, shard: list[_Pending], batch_size: int, dtype: str) -> list[tuple[str, bytes]]:
    """Run the target over a shard's samples (length-sorted batches) and encode each, in shard order."""
    blobs: list[bytes | None] = [None] * len(shard)
    order = sorted(range(len(shard)), key=lambda i: shard[i].input_ids.shape[0])
    device = target.device
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        lengths = [shard[i].input_ids.shape[0] for i in idx]
        ids = torch.zeros(len(idx), max(lengths), dtype=torch.long)
        attn = torch.zeros(len(idx), max(lengths), dtype=torch.long)
        for b, i in enumerate(idx):
            ids[b, : lengths[b]] = shard[i].input_ids
            attn[b, : lengths[b]] = 1
        out = target(ids.to(device), attn.to(device))
        # Encoding (bf16 cast, or fp8 quantisation from the target's own precision) runs on the device, so only
        # the stored bytes cross to the host.
        hidden, last = out.hidden, out.last_hidden
        for b, i in enumerate(idx):
            n = lengths[b]
            blobs[i] = encode_sample(shard[i].input_ids, shard[i].loss_mask, hidden[b, :n], last[b, :n], dtype=dtype,
                                     sample_id=shard[i].row.id)
    return [(f"{p.row.index:010d}", blob) for p, blob in zip(shard, blobs)]


# ---------------------------------------------------------------------- one rank
@dataclass
class _BuildSpec:
    """Everything a rank needs (picklable: it crosses process boundaries when devices > 1)."""

    inputs: list[str]
    output: str
    target: TargetConfig
    target_layer_ids: list[int]
    dtype: str
    max_length: int
    min_loss_tokens: int
    system_prompt: str | None
    tokenizer: str | None
    batch_size: int
    max_shard_samples: int
    max_shard_bytes: int
    max_samples: int | None
    overwrite: bool
    merge_timeout_s: float
    progress: bool


def _rank_files(out: Path, rank: int) -> tuple[Path, Path]:
    return out / f"progress-{rank:02d}.json", out / f"manifest.rank-{rank:02d}.json"


def _clear_rank(out: Path, rank: int) -> None:
    for pattern in (f"shard-{rank:02d}-*.tar", f".shard-{rank:02d}-*.tmp-*", f"progress-{rank:02d}.json",
                    f"manifest.rank-{rank:02d}.json"):
        for p in out.glob(pattern):
            p.unlink()


def _fingerprint(spec: _BuildSpec, sources: list[dict[str, Any]], world_size: int, target_info: dict[str, Any],
                 tok_info: dict[str, Any]) -> str:
    settings = {
        # Inputs by content, not path: a build resumes from another mount of the same files.
        "sources": [s["sha256"] for s in sources], "target": target_info, "tokenizer": tok_info["hash"],
        "layers": spec.target_layer_ids, "dtype": spec.dtype, "max_length": spec.max_length,
        "min_loss_tokens": spec.min_loss_tokens, "system_prompt": spec.system_prompt,
        "max_shard_samples": spec.max_shard_samples, "max_shard_bytes": spec.max_shard_bytes,
        "max_samples": spec.max_samples, "world_size": world_size, "format_version": FORMAT_VERSION,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _build_rank(spec: _BuildSpec, rank: int, world_size: int, device: torch.device) -> dict[str, Any] | None:
    began = time.perf_counter()
    out = Path(spec.output)
    out.mkdir(parents=True, exist_ok=True)
    if spec.overwrite:
        _clear_rank(out, rank)
        if rank == 0 and (out / MANIFEST_NAME).exists():
            (out / MANIFEST_NAME).unlink()
    rows, sources = read_inputs(spec.inputs)
    rows = rows[: spec.max_samples]
    hf_config = load_target_config(spec.target)
    target_info = {"identity": spec.target.identity(), "revision": spec.target.revision,
                   "config_hash": spec.target.config_hash(hf_config), "model_type": hf_config.model_type,
                   "dtype": spec.target.dtype}
    tok = _load_tokenizer(spec.target, spec.tokenizer)
    tok_info = _tokenizer_info(tok)
    fingerprint = _fingerprint(spec, sources, world_size, target_info, tok_info)

    manifest_path = out / MANIFEST_NAME
    if manifest_path.exists() and not spec.overwrite:
        done = json.loads(manifest_path.read_text())
        if done.get("build", {}).get("fingerprint") == fingerprint:
            if rank == 0:
                print(f"Cache {out} is already complete ({done['num_samples']} samples); nothing to do.")
            return done
        raise CacheError(f"{manifest_path} describes a cache built with other settings (build fingerprint "
                         f"{done.get('build', {}).get('fingerprint')} vs {fingerprint} now). Use another output "
                         f"directory or overwrite=True to rebuild.")
    progress_path, partial_path = _rank_files(out, rank)
    state = {"fingerprint": fingerprint, "rank": rank, "world_size": world_size, "next_index": None, "shards": [],
             "dropped": 0, "done": False}
    if progress_path.exists():
        previous = json.loads(progress_path.read_text())
        if previous.get("fingerprint") != fingerprint:
            raise CacheError(
                f"{progress_path} belongs to a build with other settings (fingerprint {previous.get('fingerprint')} "
                f"vs {fingerprint}: inputs, target, tokenizer, layers, dtype, lengths, shard sizes or world size "
                f"changed). Rerun with the original settings to resume, or overwrite=True to start again.")
        state = previous
    for stale in out.glob(f".shard-{rank:02d}-*.tmp-*"):  # a shard being written when the last run died
        stale.unlink()

    start, end = rank * len(rows) // world_size, (rank + 1) * len(rows) // world_size
    first = state["next_index"] if state["next_index"] is not None else start
    vocab = hf_config.get_text_config().vocab_size
    per_token = bytes_per_token(hf_config.get_text_config().hidden_size, len(spec.target_layer_ids), spec.dtype)
    dropped_before = state["dropped"]  # committed drops among rows < first
    drops: list[int] = []

    def pending() -> Iterator[_Pending]:
        for row in rows[first:end]:
            ids, mask = _tokenize(row, tok, spec.max_length, spec.system_prompt)
            if int(mask.sum()) < spec.min_loss_tokens:
                drops.append(row.index)
                continue
            if int(ids.max()) >= vocab or int(ids.min()) < 0:
                raise CacheError(f"Row {row.id!r} has token ids outside [0, {vocab}): the tokenizer does not belong "
                                 f"to this target.")
            yield _Pending(row, ids, mask)

    target = None
    from tqdm.auto import tqdm

    bar = tqdm(total=end - first, desc=f"cache build rank {rank}", position=rank, disable=not spec.progress,
               unit="sample", leave=rank == 0)
    ready, built_tokens = None, 0  # when the target was ready; tokens encoded in this run
    for shard in _plan_shards(pending(), spec.max_shard_samples, spec.max_shard_bytes, per_token):
        if target is None:
            target = FrozenTarget.from_config(spec.target, spec.target_layer_ids, device=device)
            ready = time.perf_counter()
        index = len(state["shards"])
        name = shard_name(rank, index)
        written = write_shard(out / name, _encode_shard(target, shard, spec.batch_size, spec.dtype))
        last = shard[-1].row.index
        state["shards"].append({
            "name": name, "rank": rank, "index": index, "samples": len(shard),
            "tokens": sum(p.input_ids.shape[0] for p in shard),
            "loss_tokens": sum(int(p.loss_mask.sum()) for p in shard),
            "first_row": shard[0].row.index, "last_row": last, **written,
        })
        # The planner reads one sample past the shard; drops after `last` are counted again on resume.
        state["next_index"], state["dropped"] = last + 1, dropped_before + sum(1 for i in drops if i <= last)
        write_json_atomic(progress_path, state)
        built_tokens += state["shards"][-1]["tokens"]
        bar.update(last + 1 - bar.n - first)
    bar.close()
    done = time.perf_counter()
    timing = {"start_up_s": (ready or done) - began, "build_s": done - (ready or done), "tokens": built_tokens}
    state.update(next_index=end, dropped=dropped_before + len(drops), done=True)
    write_json_atomic(progress_path, state)
    write_json_atomic(partial_path, {"fingerprint": fingerprint, "rank": rank, "shards": state["shards"],
                                     "dropped": state["dropped"], "rows": end - start, "timing": timing})
    if rank != 0:
        return None
    partials = _wait_for_partials(out, world_size, fingerprint, spec.merge_timeout_s)
    manifest = _merge(spec, partials, sources, fingerprint, world_size, target_info, tok_info, hf_config, len(rows))
    if manifest["num_samples"] == 0:  # no manifest: a cache nothing can train on must not look finished
        raise CacheError(_nothing_kept(spec.inputs, len(rows), spec.min_loss_tokens, spec.max_length,
                                       spec.max_samples))
    write_json_atomic(manifest_path, manifest)
    for r in range(world_size):
        for p in _rank_files(out, r):
            p.unlink(missing_ok=True)
    _print_summary(out, manifest)
    _print_rates(partials)
    return manifest


def _nothing_kept(inputs: list[str], rows: int, min_loss_tokens: int, max_length: int, max_samples: int | None) -> str:
    """The error for inputs that leave no sample: which files, how many rows, and which filter dropped them."""
    if rows == 0:
        return f"max_samples={max_samples} leaves no rows of {inputs} to cache; raise it or remove it."
    return (f"No sample of {inputs} is left: all {rows} rows were dropped by min_loss_tokens={min_loss_tokens} (fewer "
            f"trainable assistant tokens once truncated to max_length={max_length}). Lower min_loss_tokens, raise "
            f"max_length, or check that the rows have assistant turns (regen writes them).")


def _wait_for_partials(out: Path, world_size: int, fingerprint: str, timeout_s: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        partials, missing = [], []
        for r in range(world_size):
            path = _rank_files(out, r)[1]
            data = json.loads(path.read_text()) if path.exists() else None
            if data is None or data.get("fingerprint") != fingerprint:
                missing.append(r)
            else:
                partials.append(data)
        if not missing:
            return partials
        if time.monotonic() > deadline:
            raise CacheError(f"Ranks {missing} did not finish within {timeout_s} s (no manifest.rank-XX.json in "
                             f"{out}). Rerun the same build: finished shards are kept.")
        time.sleep(0.5)


def _merge(spec: _BuildSpec, partials: list[dict[str, Any]], sources: list[dict[str, Any]], fingerprint: str,
           world_size: int, target_info: dict[str, Any], tok_info: dict[str, Any], hf_config: Any, rows: int
           ) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("dspark-lightning")
    except PackageNotFoundError:  # running from a source tree
        ours = "unknown"
    shards = sorted((s for p in partials for s in p["shards"]), key=lambda s: (s["rank"], s["index"]))
    text = hf_config.get_text_config()
    tokens = sum(s["tokens"] for s in shards)
    return {
        "kind": CACHE_KIND,
        "format_version": FORMAT_VERSION,
        "created_by": f"dspark_lightning {ours}",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "target": target_info,
        "tokenizer": tok_info,
        "target_layer_ids": list(spec.target_layer_ids),
        "hidden_size": text.hidden_size,
        "vocab_size": text.vocab_size,
        "num_target_layers": text.num_hidden_layers,
        "dtype": spec.dtype,
        "max_length": spec.max_length,
        "min_loss_tokens": spec.min_loss_tokens,
        "system_prompt": spec.system_prompt,
        "num_rows": rows,
        "num_samples": sum(s["samples"] for s in shards),
        "num_dropped": sum(p["dropped"] for p in partials),
        "num_tokens": tokens,
        "num_loss_tokens": sum(s["loss_tokens"] for s in shards),
        "num_bytes": sum(s["bytes"] for s in shards),
        "bytes_per_token": bytes_per_token(text.hidden_size, len(spec.target_layer_ids), spec.dtype),
        "shards": shards,
        "sources": sources,
        "build": {"fingerprint": fingerprint, "world_size": world_size, "max_shard_samples": spec.max_shard_samples,
                  "max_shard_bytes": spec.max_shard_bytes, "max_samples": spec.max_samples},
    }


def _print_summary(out: Path, m: dict[str, Any]) -> None:
    per_token = m["num_bytes"] / max(1, m["num_tokens"])
    print(f"Cache {out}: {m['num_samples']} samples ({m['num_dropped']} dropped with < {m['min_loss_tokens']} loss "
          f"tokens), {m['num_tokens']} tokens, {len(m['shards'])} shards, {m['num_bytes'] / 1e6:.1f} MB "
          f"({per_token:,.0f} B/token on disk, {m['dtype']}).")


def _print_rates(partials: list[dict[str, Any]]) -> None:
    """Tokens per second of each rank once its target was loaded (start-up apart), and of the whole build."""
    timings = sorted((p["rank"], p["timing"]) for p in partials if "timing" in p)
    if not timings:
        return
    for rank, t in timings:
        rate = t["tokens"] / t["build_s"] if t["build_s"] > 0 else 0.0
        print(f"  rank {rank}: {t['tokens']:,} tokens in {t['build_s']:.1f} s after {t['start_up_s']:.1f} s of "
              f"start-up: {rate:,.0f} tokens/s")
    slowest = max(t["build_s"] for _, t in timings)
    total = sum(t["tokens"] for _, t in timings)
    if len(timings) > 1 and slowest > 0:
        print(f"  all {len(timings)} ranks: {total / slowest:,.0f} tokens/s ({total / slowest / len(timings):,.0f} "
              "per rank, the slowest rank's build time)")


# ---------------------------------------------------------------------- launching
def _distributed_env() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` when started by torchrun (or any launcher that sets RANK/WORLD_SIZE)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        return rank, world, int(os.environ.get("LOCAL_RANK", rank))
    return None


def _pick_device(accelerator: str, local_rank: int) -> torch.device:
    if accelerator in ("auto", "cuda", "gpu") and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if accelerator in ("cuda", "gpu"):
        raise ValueError(f"accelerator={accelerator!r} but no CUDA device is visible; use accelerator='cpu'.")
    return torch.device("cpu")


def _fabric_rank(fabric: Any, spec: _BuildSpec) -> dict[str, Any] | None:
    return _build_rank(spec, fabric.global_rank, fabric.world_size, fabric.device)


def build_cache(
    inputs: str | list[str],
    output: str,
    target: TargetConfig,
    target_layer_ids: list[int],
    dtype: CacheDtype = "bfloat16",
    max_length: int = 4096,
    min_loss_tokens: int = 14,
    system_prompt: str | None = None,
    tokenizer: str | None = None,
    batch_size: int = 8,
    max_shard_samples: int = 10_000,
    max_shard_bytes: int = 1 << 30,
    max_samples: int | None = None,
    devices: int = 1,
    accelerator: str = "auto",
    overwrite: bool = False,
    merge_timeout_s: float = 3600.0,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Run the frozen target over conversations and write a webdataset target cache with a manifest.

    Args:
        inputs: a JSONL file (or a list of them) of conversations (``{id, conversations}``, as ``regen`` writes)
            or of pre-tokenised rows (``{id, input_ids, loss_mask}``).
        output: local directory for shards and ``manifest.json`` (upload it to object storage afterwards).
        target: the frozen target.
        target_layer_ids: target layers whose raw outputs are cached (the drafter's ``target_layer_ids``).
        dtype: ``bfloat16`` (exact) or ``float8_e4m3fn`` (per-token scales, half the bytes; see docs/cache.md).
        max_length: truncate samples to this many tokens.
        min_loss_tokens: drop samples with fewer trainable (assistant) tokens.
        system_prompt: prepended as a system message when a conversation has none.
        tokenizer: tokenizer directory or Hub id; default the target's own (required for conversations when the
            target is a tiny random model).
        batch_size: samples per target forward.
        max_shard_samples: start a new shard after this many samples.
        max_shard_bytes: ... or before a shard would exceed this many bytes.
        max_samples: use only the first rows of the inputs.
        devices: processes (one per device) when not started by torchrun; launched through Lightning Fabric.
        accelerator: ``auto``, ``cuda``/``gpu`` or ``cpu``.
        overwrite: delete an existing cache/progress in ``output`` first instead of resuming.
        merge_timeout_s: how long rank 0 waits for the other ranks before writing the manifest.
        progress: show a progress bar.

    Returns:
        The manifest (on rank 0; ``None`` on other ranks).
    """
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not a cache dtype; choose one of {list(CACHE_DTYPES)}.")
    if min(batch_size, max_shard_samples, max_shard_bytes, max_length, devices) < 1:
        raise ValueError("batch_size, max_shard_samples, max_shard_bytes, max_length and devices must be >= 1.")
    if "://" in output:
        raise ValueError(f"output={output!r}: build into a local directory, then copy it to object storage "
                         f"(shards are renamed atomically, which object stores do not offer).")
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    spec = _BuildSpec(inputs, output, target, list(target_layer_ids), dtype, max_length, min_loss_tokens,
                      system_prompt, tokenizer, batch_size, max_shard_samples, max_shard_bytes, max_samples, overwrite,
                      merge_timeout_s, progress)
    env = _distributed_env()
    if env is not None:
        rank, world, local_rank = env
        return _build_rank(spec, rank, world, _pick_device(accelerator, local_rank))
    if devices == 1:
        return _build_rank(spec, 0, 1, _pick_device(accelerator, 0))
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cuda" if accelerator == "gpu" else accelerator, devices=devices,
                    strategy="ddp_spawn")
    return fabric.launch(_fabric_rank, spec)


# ---------------------------------------------------------------------- estimate
def estimate_cache(
    inputs: str | list[str],
    target: TargetConfig,
    target_layer_ids: list[int],
    max_length: int = 4096,
    min_loss_tokens: int = 14,
    system_prompt: str | None = None,
    tokenizer: str | None = None,
    max_samples: int | None = None,
) -> dict[str, Any]:
    """Print the tokens and bytes a ``cache build`` with these settings would write (tokenises; no target run).

    Args:
        inputs, target, target_layer_ids, max_length, min_loss_tokens, system_prompt, tokenizer, max_samples:
            as for ``cache build``.

    Returns:
        ``{"samples", "dropped", "tokens", "loss_tokens", "bytes": {dtype: bytes}, "bytes_per_token": {dtype: B}}``.
    """
    rows, _ = read_inputs([inputs] if isinstance(inputs, str) else list(inputs))
    rows = rows[:max_samples]
    tok = _load_tokenizer(target, tokenizer)
    text = load_target_config(target).get_text_config()
    hidden, m = text.hidden_size, len(target_layer_ids)
    lengths, loss_tokens, dropped = [], 0, 0
    for row in rows:
        ids, mask = _tokenize(row, tok, max_length, system_prompt)
        if int(mask.sum()) < min_loss_tokens:
            dropped += 1
            continue
        lengths.append(ids.shape[0])
        loss_tokens += int(mask.sum())
    if not lengths:
        raise ValueError(_nothing_kept(inputs if isinstance(inputs, list) else [inputs], len(rows), min_loss_tokens,
                                       max_length, max_samples))
    tokens = sum(lengths)
    result: dict[str, Any] = {"samples": len(lengths), "dropped": dropped, "tokens": tokens, "loss_tokens": loss_tokens,
                              "bytes": {}, "bytes_per_token": {}}
    print(f"{len(lengths)} samples kept, {dropped} dropped (< {min_loss_tokens} loss tokens); {tokens:,} tokens "
          f"({loss_tokens:,} trained on), mean length {tokens / max(1, len(lengths)):.0f}.")
    print(f"Target: hidden {hidden}, {m} layers {list(target_layer_ids)} + last hidden.")
    print(f"{'dtype':<15}{'payload B/token':>16}{'on disk':>14}   vs DeepSpec (Qwen3-4B, 5 layers + last, bf16: "
          f"{DEEPSPEC_QWEN3_4B_BYTES_PER_TOKEN:,} B/token)")
    for dtype in CACHE_DTYPES:
        per_token = bytes_per_token(hidden, m, dtype)
        total = sum(tar_member_bytes(per_token * n + _SAMPLE_HEADER_BYTES) for n in lengths) + 2 * TAR_BLOCK
        result["bytes"][dtype], result["bytes_per_token"][dtype] = total, per_token
        same_geometry = bytes_per_token(QWEN3_4B_HIDDEN, QWEN3_4B_LAYERS, dtype)
        ratio = same_geometry / DEEPSPEC_QWEN3_4B_BYTES_PER_TOKEN
        print(f"{dtype:<15}{per_token:>16,}{_human(total):>14}   "
              f"{same_geometry:,} B/token at Qwen3-4B geometry = {ratio:.2f}x")
    return result


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n} B"
