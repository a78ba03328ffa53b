"""Reading cache shards: URLs from the manifest, streaming tar members through webdataset, ``cache verify``.

Shard URLs are built from the manifest and opened in one place, :func:`open_shard`: ``pipe:`` commands go to
webdataset's ``gopen``; everything else (local paths, ``file://``, ``s3://``, ``gs://``, ``memory://`` ...) to
``fsspec``, which handles any filesystem it has a driver for. The opened stream is then read by webdataset's
tar iterator, one ``<key>.safetensors`` member per sample.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import fsspec
import webdataset as wds
from webdataset.tariterators import tar_file_iterator

from .format import SAMPLE_EXT, CacheError, decode_sample, join_url, read_manifest

log = logging.getLogger(__name__)


def shard_urls(path: str, manifest: dict[str, Any], shard_url: str | None = None) -> list[str]:
    """URL of every shard in manifest order.

    Args:
        path: the cache directory or URL prefix (where ``manifest.json`` is).
        manifest: the parsed manifest.
        shard_url: a template with ``{name}`` (the shard file name) and optionally ``{path}``, e.g.
            ``"pipe:aws s3 cp s3://bucket/cache/{name} -"``; ``None`` = ``<path>/<name>``.
    """
    names = [s["name"] for s in manifest["shards"]]
    if shard_url is None:
        return [join_url(path, n) for n in names]
    if "{name}" not in shard_url:
        raise ValueError(f"shard_url={shard_url!r} must contain '{{name}}' (the shard file name).")
    return [shard_url.format(name=n, path=path.rstrip("/")) for n in names]


def open_shard(url: str) -> BinaryIO:
    """Open a shard for sequential reading (``pipe:`` through webdataset, anything else through fsspec)."""
    if url.startswith("pipe:"):
        return wds.gopen(url, "rb")
    try:
        return fsspec.open(url, "rb").open()
    except FileNotFoundError:
        raise CacheError(f"Shard {url} is listed in the manifest but does not exist.") from None


class _CountingReader(io.RawIOBase):
    """Pass-through reader that hashes and counts what goes through it (sha256 checked while streaming)."""

    def __init__(self, stream: BinaryIO, hash_it: bool) -> None:
        super().__init__()
        self.stream = stream
        self.sha = hashlib.sha256() if hash_it else None
        self.nbytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.stream.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.nbytes += n
        if self.sha is not None:
            self.sha.update(data)
        return n

    def close(self) -> None:
        try:
            self.stream.close()
        finally:
            super().close()


@dataclass
class SkipLog:
    """What a reader skipped with ``skip_corrupt=True`` (each entry names the shard and key)."""

    samples: int = 0
    shards: int = 0
    reasons: list[str] = field(default_factory=list)

    def add(self, reason: str, shard: bool = False) -> None:
        if shard:
            self.shards += 1
        else:
            self.samples += 1
        if len(self.reasons) < 100:
            self.reasons.append(reason)
        log.warning("skip_corrupt: skipped %s", reason)


def iter_shard(
    url: str,
    shard: dict[str, Any],
    *,
    verify_sha256: bool = False,
    skip_log: SkipLog | None = None,
) -> Iterator[tuple[str, bytes]]:
    """Yield ``(key, safetensors bytes)`` for every sample of one shard, in tar order.

    Args:
        url: where to read the shard.
        shard: its manifest entry (``name``, ``samples``, ``bytes``, ``sha256``).
        verify_sha256: hash the bytes while streaming and compare size and sha256 with the manifest at the end.
        skip_log: ``None`` raises on a broken tar; otherwise the rest of a broken shard is skipped and logged.

    Raises:
        CacheError: truncated or unreadable tar, a member that is not ``<key>.safetensors``, or (with
            ``verify_sha256``) a size or sha256 different from the manifest's. The message names the shard.
    """
    stream = _CountingReader(open_shard(url), hash_it=verify_sha256)
    buffered = io.BufferedReader(stream, 1 << 20)
    last = None
    try:
        try:
            for member in tar_file_iterator(buffered):
                key, dot, ext = member["fname"].partition(".")
                if ext != SAMPLE_EXT or not dot:
                    raise CacheError(f"shard {url} key {key!r}: unexpected tar member {member['fname']!r}; a cache "
                                     f"shard holds only '<key>.{SAMPLE_EXT}' members.")
                last = key
                yield key, member["data"]
        except CacheError:
            raise
        except Exception as err:  # tarfile/webdataset raise many types for a broken tar
            reason = (f"shard {url}: truncated or unreadable tar after key {last!r} "
                      f"({type(err).__name__}: {str(err).split(' @ ')[0]}).")
            if skip_log is None:
                raise CacheError(reason + " Rebuild it (rerun cache build) or set skip_corrupt: true.") from None
            skip_log.add(reason, shard=True)
            return
        if verify_sha256:
            while buffered.read(1 << 20):  # the tar reader may stop before the archive's zero padding
                pass
            digest = stream.sha.hexdigest()
            if stream.nbytes != shard["bytes"] or digest != shard["sha256"]:
                raise CacheError(
                    f"shard {url}: {stream.nbytes} bytes with sha256 {digest}, but the manifest records "
                    f"{shard['bytes']} bytes with sha256 {shard['sha256']}. The shard changed after the build: "
                    f"rebuild it or restore the original."
                )
    finally:
        buffered.close()


def verify_cache(path: str, shard_url: str | None = None, max_errors: int = 20) -> dict[str, Any]:
    """Check a cache: every shard's size and sha256 against the manifest, and decode every sample.

    Args:
        path: the cache directory or URL prefix holding ``manifest.json`` (any fsspec URL).
        shard_url: template for shard URLs with ``{name}`` (e.g. ``"pipe:cat /data/cache/{name}"``); default
            ``<path>/<name>``.
        max_errors: stop after this many problems.

    Returns:
        ``{"shards", "samples", "tokens", "bytes", "errors"}``.

    Raises:
        CacheError: any problem (the message lists each, naming the shard and the sample key).
    """
    manifest = read_manifest(path)
    geometry = dict(dtype=manifest["dtype"], hidden_size=manifest["hidden_size"],
                    num_layers=len(manifest["target_layer_ids"]), vocab_size=manifest["vocab_size"])
    errors: list[str] = []
    samples = tokens = nbytes = 0
    urls = shard_urls(path, manifest, shard_url)
    for url, shard in zip(urls, manifest["shards"]):
        n = t = 0
        try:
            for key, data in iter_shard(url, shard, verify_sha256=True):
                try:
                    sample = decode_sample(data, where=f"shard {url} key {key!r}", **geometry)
                except CacheError as err:
                    errors.append(str(err))
                    if len(errors) >= max_errors:
                        break
                    continue
                n += 1
                t += sample["input_ids"].shape[0]
            else:
                if (n, t) != (shard["samples"], shard["tokens"]):
                    errors.append(f"shard {url}: {n} samples / {t} tokens, the manifest records "
                                  f"{shard['samples']} / {shard['tokens']}.")
        except CacheError as err:
            errors.append(str(err))
        samples, tokens, nbytes = samples + n, tokens + t, nbytes + shard["bytes"]
        if len(errors) >= max_errors:
            break
    result = {"shards": len(urls), "samples": samples, "tokens": tokens, "bytes": nbytes, "errors": errors}
    if errors:
        raise CacheError(f"Cache {path}: {len(errors)} problem(s):\n  " + "\n  ".join(errors))
    print(f"Cache {path} OK: {len(urls)} shards, {samples} samples, {tokens} tokens, {nbytes / 1e6:.1f} MB; "
          f"sha256 and every sample checked.")
    return result
