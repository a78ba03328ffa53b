"""The target cache on disk: one safetensors blob per sample inside webdataset tar shards, plus a manifest.

Layout of a cache directory (or object-store prefix)::

    manifest.json                  # written last, atomically: describes everything below
    shard-00-00000.tar             # rank 00, shard 0; one tar member "<key>.safetensors" per sample
    shard-00-00001.tar
    shard-01-00000.tar             # rank 01 (multi-device builds)
    progress-00.json ...           # only while a build runs (resume bookkeeping); readers ignore it

A sample blob holds (``L`` = sequence length, ``H`` = target hidden size, ``m`` = context layers):

=======================  ==========================  ===============================================
key                      dtype, shape                meaning
=======================  ==========================  ===============================================
``input_ids``            int32 ``[L]``               tokens
``loss_mask``            uint8 ``[L]``               1 on trainable (assistant) tokens
``target_hidden``        bf16 or fp8 ``[L, m*H]``    raw outputs of ``target_layer_ids``, concatenated
``target_last_hidden``   bf16 or fp8 ``[L, H]``      final-norm output (logits = frozen ``lm_head`` of it)
``*_scale``              fp32 ``[L]``                fp8 only: per-token scale of the two tensors above
=======================  ==========================  ===============================================

The blob's safetensors metadata carries the sample's ``id``. Nothing is pickled.

fp8 (``float8_e4m3fn``) stores each token row ``x`` as ``q = round(x / s)`` with ``s = max|x| / 448``
(448 is the largest e4m3 value), and reads ``x' = q * s``. e4m3 keeps 3 mantissa bits, so for every element
``|x' - x| <= |x| / 16 + s / 1024`` (half a unit in the last place of a normal value, or half the subnormal
spacing ``2**-9 * s`` near zero). :func:`fp8_error_bound` computes this bound; the tests hold the round trip to it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
CACHE_KIND = "dspark_lightning.target_cache"
MANIFEST_NAME = "manifest.json"
SAMPLE_EXT = "safetensors"
CACHE_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float8_e4m3fn": torch.float8_e4m3fn}
FP8_MAX = 448.0  # largest finite float8_e4m3fn value
TAR_BLOCK = 512
# DeepSpec's cache for Qwen3-4B (hidden 2560, 5 layers + last hidden, bf16): 4 + 1 + 1 + 2*2560*(5+1) bytes/token.
DEEPSPEC_QWEN3_4B_BYTES_PER_TOKEN = 30_726
QWEN3_4B_HIDDEN, QWEN3_4B_LAYERS = 2560, 5
_HIDDEN_KEYS = ("target_hidden", "target_last_hidden")
# What a shard name in a manifest may be: a plain file name ending in .tar (``shard-RR-IIIII.tar`` as the builder
# writes them). An allow-list, not a deny-list: no path separator, no "..", no whitespace, no shell or URL syntax.
SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,250}\.tar")


class CacheError(ValueError):
    """A target cache is missing, of an unknown version, corrupt, or built for another target/tokenizer."""


# ---------------------------------------------------------------------- fp8 with per-token scales
def quantize_fp8(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x [L, D]`` (any float dtype) -> ``(q [L, D] float8_e4m3fn, scale [L] float32)``; see module docstring."""
    x = x.float()
    scale = x.abs().amax(dim=-1) / FP8_MAX  # [L]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row keeps scale 1
    q = (x / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_fp8(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`quantize_fp8` (up to :func:`fp8_error_bound`): ``q [..., D]``, ``scale [...]``."""
    return (q.float() * scale.float().unsqueeze(-1)).to(dtype)


def fp8_error_bound(x: Tensor) -> Tensor:
    """Elementwise bound on ``|dequantize_fp8(*quantize_fp8(x)) - x|``: ``|x|/16 + s/1024`` per token row."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True) / FP8_MAX
    return x.abs() / 16 + scale / 1024


# ---------------------------------------------------------------------- one sample
def bytes_per_token(hidden_size: int, num_layers: int, dtype: str) -> int:
    """Payload bytes per token: ids (4) + mask (1) + hidden states (+ two fp32 scales for fp8)."""
    width = hidden_size * (num_layers + 1)
    if dtype == "bfloat16":
        return 4 + 1 + 2 * width
    if dtype == "float8_e4m3fn":
        return 4 + 1 + width + 2 * 4
    raise ValueError(f"dtype={dtype!r} is not a cache dtype; choose one of {list(CACHE_DTYPES)}.")


def encode_sample(
    input_ids: Tensor,
    loss_mask: Tensor,
    hidden: Tensor,
    last_hidden: Tensor,
    *,
    dtype: str,
    sample_id: str,
    check_finite: bool = True,
) -> bytes:
    """Serialise one sample (``input_ids [L]``, ``loss_mask [L]``, ``hidden [L, m*H]``, ``last_hidden [L, H]``).

    Raises:
        CacheError: the hidden states hold NaN/Inf (``check_finite``), or the shapes disagree.
    """
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not a cache dtype; choose one of {list(CACHE_DTYPES)}.")
    length = input_ids.shape[0]
    if loss_mask.shape != (length,) or hidden.shape[0] != length or last_hidden.shape[0] != length:
        raise CacheError(f"Sample {sample_id!r}: inconsistent lengths input_ids {tuple(input_ids.shape)}, "
                         f"loss_mask {tuple(loss_mask.shape)}, hidden {tuple(hidden.shape)}, "
                         f"last_hidden {tuple(last_hidden.shape)}.")
    if check_finite:
        for name, t in zip(_HIDDEN_KEYS, (hidden, last_hidden)):
            if not all_finite(t):
                raise CacheError(f"Sample {sample_id!r}: the target produced NaN/Inf in {name}; refusing to cache "
                                 f"it. Check the target's dtype (fp16 overflows; use bfloat16 or float32).")
    tensors = {"input_ids": input_ids.to(torch.int32), "loss_mask": loss_mask.to(torch.uint8)}
    for name, t in zip(_HIDDEN_KEYS, (hidden, last_hidden)):
        if dtype == "bfloat16":
            tensors[name] = t.to(torch.bfloat16)
        else:
            tensors[name], tensors[f"{name}_scale"] = quantize_fp8(t)
    # Cast/quantised on the tensors' device (the GPU during a build); only the stored bytes come to the host.
    return st_save({k: v.cpu().contiguous() for k, v in tensors.items()}, metadata={"id": str(sample_id)})


def sample_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob, read from its JSON header only."""
    try:
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + size])
        return dict(header.get("__metadata__") or {})
    except Exception:  # a broken header is reported by decode_sample
        return {}


def all_finite(t: Tensor) -> bool:
    """No NaN/Inf in ``t``: a min/max reduction (NaN propagates), much faster than ``isfinite`` on bf16 CPU tensors;
    for fp8 (e4m3fn has no Inf; its NaNs are the bytes 0x7F and 0xFF) a check of the raw bytes."""
    if t.numel() == 0:
        return True
    if t.dtype == torch.float8_e4m3fn:
        raw = t.view(torch.int8)
        return int(raw.max()) != 0x7F and not bool((raw == -1).any())
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low) and torch.isfinite(high))


def decode_sample(
    data: bytes,
    *,
    where: str,
    dtype: str,
    hidden_size: int,
    num_layers: int,
    vocab_size: int,
    out_dtype: torch.dtype | None = None,
    dequantize: bool = True,
) -> dict[str, Tensor]:
    """Parse and check one sample blob (never unpickles).

    Args:
        data: the safetensors bytes.
        where: ``"<shard url> key <key>"``, put in every error message.
        dtype, hidden_size, num_layers, vocab_size: what the manifest promises.
        out_dtype: dtype of the returned hidden states; ``None`` keeps bf16 as stored (exact) and returns fp8
            dequantised to float32.
        dequantize: ``False`` returns fp8 hidden states as stored, with their ``*_scale`` tensors (dequantised
            later, e.g. on the GPU, by :func:`dequantize_fp8`).

    Returns:
        ``input_ids [L] int64``, ``loss_mask [L] bool``, ``target_hidden [L, m*H]``, ``target_last_hidden [L, H]``
        (and ``target_hidden_scale``/``target_last_hidden_scale [L]`` for fp8 without ``dequantize``).

    Raises:
        CacheError: unreadable blob, missing key, wrong dtype or shape, token id out of range, NaN/Inf.
    """
    try:
        raw = st_load(data)
    except Exception as err:  # safetensors raises its own error types
        raise CacheError(f"{where}: not a readable safetensors blob ({type(err).__name__}: {err}).") from None
    fp8 = dtype == "float8_e4m3fn"
    expected = {"input_ids": torch.int32, "loss_mask": torch.uint8}
    for name in _HIDDEN_KEYS:
        expected[name] = CACHE_DTYPES[dtype]
        if fp8:
            expected[f"{name}_scale"] = torch.float32
    missing = sorted(set(expected) - set(raw))
    if missing:
        raise CacheError(f"{where}: sample lacks {missing} (has {sorted(raw)}).")
    for name, want in expected.items():
        if raw[name].dtype != want:
            raise CacheError(f"{where}: {name} is {raw[name].dtype}, the manifest says {want}.")
    length = raw["input_ids"].shape[0]
    shapes = {"input_ids": (length,), "loss_mask": (length,), "target_hidden": (length, num_layers * hidden_size),
              "target_last_hidden": (length, hidden_size)}
    if fp8:
        shapes.update(target_hidden_scale=(length,), target_last_hidden_scale=(length,))
    for name, shape in shapes.items():
        if tuple(raw[name].shape) != shape:
            raise CacheError(f"{where}: {name} has shape {tuple(raw[name].shape)}, expected {shape} "
                             f"(L={length}, {num_layers} layers x hidden {hidden_size}).")
    input_ids = raw["input_ids"].long()
    if length and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise CacheError(f"{where}: input_ids outside [0, {vocab_size}).")
    if length and int(raw["loss_mask"].max()) > 1:
        raise CacheError(f"{where}: loss_mask holds values other than 0/1.")
    out: dict[str, Tensor] = {"input_ids": input_ids, "loss_mask": raw["loss_mask"].bool()}
    for name in _HIDDEN_KEYS:
        value = raw[name]
        if not all_finite(value) or (fp8 and not all_finite(raw[f"{name}_scale"])):
            raise CacheError(f"{where}: {name} holds NaN/Inf.")
        if fp8 and dequantize:
            value = dequantize_fp8(value, raw[f"{name}_scale"], out_dtype or torch.float32)
        elif fp8:
            out[f"{name}_scale"] = raw[f"{name}_scale"]
        elif out_dtype is not None:
            value = value.to(out_dtype)
        out[name] = value
    return out


def tar_member_bytes(payload: int) -> int:
    """Bytes a member of ``payload`` bytes takes in a tar (512-byte header + data padded to 512)."""
    return TAR_BLOCK + -(-payload // TAR_BLOCK) * TAR_BLOCK


# ---------------------------------------------------------------------- tokenizer identity
def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 of the tokenizer's full JSON (fast tokenizers) or of its sorted vocabulary, plus added tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()), separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------- manifest
def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON to ``path`` through a temp file + fsync + rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def join_url(base: str, name: str) -> str:
    """``base`` (a directory or URL prefix) joined with a file name."""
    return f"{base.rstrip('/')}/{name}" if "://" in base else str(Path(base) / name)


def read_manifest(path: str) -> dict[str, Any]:
    """Read and check ``<path>/manifest.json`` through fsspec (local dirs, ``file://``, ``s3://``, ...).

    Raises:
        CacheError: no manifest, invalid JSON, not a target cache, or an unknown format version.
    """
    import fsspec

    url = join_url(path, MANIFEST_NAME)
    try:
        with fsspec.open(url, "r", encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise CacheError(f"No cache manifest at {url}: build the cache first (python -m dspark_lightning cache "
                         f"build ...) or point 'path' at the directory holding manifest.json.") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as err:
        raise CacheError(f"{url} is not valid JSON ({err.msg} at line {err.lineno}).") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != CACHE_KIND:
        raise CacheError(f"{url} is not a dspark_lightning target-cache manifest (kind "
                         f"{manifest.get('kind') if isinstance(manifest, dict) else None!r}, expected {CACHE_KIND!r}).")
    version = manifest.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise CacheError(f"{url} has format_version={version!r}; this dspark_lightning reads "
                         f"{list(SUPPORTED_FORMAT_VERSIONS)}. Rebuild the cache or upgrade dspark_lightning.")
    missing = [k for k in ("target", "tokenizer", "target_layer_ids", "hidden_size", "vocab_size", "dtype", "shards")
               if k not in manifest]
    if missing:
        raise CacheError(f"{url} lacks the keys {missing}.")
    if manifest["dtype"] not in CACHE_DTYPES:
        raise CacheError(f"{url}: dtype {manifest['dtype']!r} unknown; expected one of {list(CACHE_DTYPES)}.")
    check_shard_names(manifest["shards"], url)
    return manifest


def check_shard_names(shards: Any, where: str) -> None:
    """Every shard entry names a plain file inside the cache (:data:`SHARD_NAME`), once.

    The names are joined to the cache path to read the shards: a name like ``/etc/hostname`` or ``../x.tar`` would
    read outside the cache, and one with shell syntax (``x.tar; touch M``) has no business in a file name.

    Raises:
        CacheError: ``shards`` is not a list of objects with such names, or a name repeats.
    """
    if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
        raise CacheError(f"{where}: 'shards' must be a list of objects.")
    seen: set[str] = set()
    for i, shard in enumerate(shards):
        name = shard.get("name")
        if not isinstance(name, str) or not SHARD_NAME.fullmatch(name) or ".." in name:
            raise CacheError(f"{where}: shards[{i}] has name {name!r}, which is not a plain shard file name (letters, "
                             f"digits, '_', '-', '.', ending in .tar, no '..'; e.g. 'shard-00-00000.tar'). The "
                             f"manifest was not written by cache build; refusing to read it.")
        if name in seen:
            raise CacheError(f"{where}: shard {name!r} is listed twice.")
        seen.add(name)
