"""Reading cache shards: URLs from the manifest, streaming tar members through webdataset, ``cache verify``.

Shard URLs are built from the manifest and opened in one place, :func:`open_shard`, through ``fsspec`` (local paths,
``file://``, ``s3://``, ``gs://``, ``memory://`` ... any filesystem it has a driver for); webdataset's tar iterator
then reads the stream, one ``<key>.safetensors`` member per sample. No URL goes through a shell: webdataset's
``pipe:`` URLs (a shell command per shard) are refused, and the manifest's shard names are plain file names
(``format.check_shard_names``), so neither a manifest nor a template can make a reader run a command or leave the
cache's directory.
"""

from __future__ import annotations

import hashlib
import io
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import fsspec
from webdataset.tariterators import tar_file_iterator

from .format import SAMPLE_EXT, CacheError, check_shard_names, decode_sample, join_url, read_manifest

log = logging.getLogger(__name__)
SHELL_SCHEMES = ("pipe:",)  # webdataset's gopen hands these to a shell
SPOOL_BYTES = 256 << 20  # verify_sha256: a shard copy up to this size stays in memory, a larger one goes to a temp file


def shard_urls(path: str, manifest: dict[str, Any], shard_url: str | None = None) -> list[str]:
    """URL of every shard in manifest order.

    Args:
        path: the cache directory or URL prefix (where ``manifest.json`` is).
        manifest: the parsed manifest (its shard names are checked again here: they are joined into URLs).
        shard_url: a template with ``{name}`` (the shard file name) and optionally ``{path}``, for shards stored
            apart from the manifest, e.g. ``"s3://other-bucket/cache/{name}"`` or ``"simplecache::{path}/{name}"``
            (any fsspec URL); ``None`` = ``<path>/<name>``.

    Raises:
        ValueError: ``shard_url`` lacks ``{name}`` or is a ``pipe:`` (shell command) URL.
    """
    check_shard_names(manifest["shards"], join_url(path, "manifest.json"))
    names = [s["name"] for s in manifest["shards"]]
    if shard_url is None:
        return [join_url(path, n) for n in names]
    if shard_url.startswith(SHELL_SCHEMES):
        raise ValueError(f"shard_url={shard_url!r}: pipe: URLs run a shell command per shard and are not supported. "
                         f"Read object storage through fsspec instead: path: s3://bucket/prefix (pip install s3fs), "
                         f"gs://... (gcsfs), or shard_url: 's3://bucket/prefix/{{name}}'.")
    if "{name}" not in shard_url:
        raise ValueError(f"shard_url={shard_url!r} must contain '{{name}}' (the shard file name).")
    # Plain substitution, not str.format: the template is a URL, not a format spec.
    return [shard_url.replace("{path}", path.rstrip("/")).replace("{name}", n) for n in names]


def open_shard(url: str) -> BinaryIO:
    """Open a shard for sequential reading through fsspec (never a shell)."""
    if url.startswith(SHELL_SCHEMES):
        raise CacheError(f"Shard URL {url!r} is a pipe: (shell) URL; dspark_lightning reads shards through fsspec "
                         f"only.")
    try:
        return fsspec.open(url, "rb").open()
    except FileNotFoundError:
        raise CacheError(f"Shard {url} is listed in the manifest but does not exist.") from None


class ShardChecksumError(CacheError):
    """A shard's size or sha256 differs from what the manifest records."""


def verified_copy(url: str, shard: dict[str, Any]) -> BinaryIO:
    """A private copy of the shard whose size and sha256 match the manifest, positioned at its start.

    The copy is what gets read afterwards, so no byte reaches training before the whole shard is checked (hashing
    while streaming would hand out samples before a mismatch at the end is seen). It is held in memory up to
    :data:`SPOOL_BYTES`, in a temporary file beyond.

    Raises:
        ShardChecksumError: size or sha256 differ from the manifest (the message names the shard and both values).
        CacheError: the shard does not exist.
    """
    copy, problem = _copy_and_check(url, shard)
    if problem is not None:
        copy.close()
        raise ShardChecksumError(problem)
    return copy


def _copy_and_check(url: str, shard: dict[str, Any]) -> tuple[BinaryIO, str | None]:
    """The shard copied (see :func:`verified_copy`) and rewound, with the size/sha256 mismatch message or None."""
    sha = hashlib.sha256()
    with open_shard(url) as f:
        if shard.get("bytes", SPOOL_BYTES + 1) <= SPOOL_BYTES:
            data = f.read(SPOOL_BYTES + 1)  # one read, hashed in place; BytesIO shares the buffer (no second copy)
            sha.update(data)
            copy: BinaryIO = io.BytesIO(data)
            nbytes = len(data) + sum(len(block) for block in iter(lambda: f.read(1 << 20), b""))
        else:
            copy = tempfile.TemporaryFile()
            nbytes = 0
            try:
                for block in iter(lambda: f.read(1 << 20), b""):
                    sha.update(block)
                    nbytes += len(block)
                    copy.write(block)
            except BaseException:
                copy.close()
                raise
            copy.seek(0)
    if nbytes == shard["bytes"] and sha.hexdigest() == shard["sha256"]:
        return copy, None
    return copy, (f"shard {url}: {nbytes} bytes with sha256 {sha.hexdigest()}, but the manifest records "
                  f"{shard['bytes']} bytes with sha256 {shard['sha256']}. The shard changed after the build: rebuild "
                  f"it or restore the original.")


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
        verify_sha256: check the shard's size and sha256 against the manifest before the first sample is yielded
            (:func:`verified_copy`).
        skip_log: ``None`` raises on a broken tar or a sha256 mismatch; otherwise the rest of a broken shard (or
            the whole mismatched one) is skipped and logged.

    Raises:
        CacheError: truncated or unreadable tar, a member that is not ``<key>.safetensors``, or (with
            ``verify_sha256``) a size or sha256 different from the manifest's. The message names the shard.
    """
    try:
        stream = verified_copy(url, shard) if verify_sha256 else open_shard(url)
    except ShardChecksumError as err:
        if skip_log is None:
            raise
        skip_log.add(str(err), shard=True)
        return
    yield from _members(stream, url, skip_log)


def _members(stream: BinaryIO, url: str, skip_log: SkipLog | None) -> Iterator[tuple[str, bytes]]:
    """``(key, bytes)`` of the tar members of an opened shard (closed at the end); see :func:`iter_shard`."""
    last = None
    try:
        for member in tar_file_iterator(stream):
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
    finally:
        stream.close()


def verify_cache(path: str, shard_url: str | None = None, max_errors: int = 20) -> dict[str, Any]:
    """Check a cache: every shard's size and sha256 against the manifest, and decode every sample.

    Args:
        path: the cache directory or URL prefix holding ``manifest.json`` (any fsspec URL).
        shard_url: template for shard URLs with ``{name}`` (e.g. ``"s3://bucket/cache/{name}"``); default
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
            copy, problem = _copy_and_check(url, shard)  # and decode it all anyway: report every problem
            if problem is not None:
                errors.append(problem)
            for key, data in _members(copy, url, None):
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
    if not errors and samples == 0:
        errors.append(f"the cache holds no samples ({len(urls)} shards; the manifest records "
                      f"{manifest.get('num_rows', '?')} input rows, {manifest.get('num_dropped', '?')} dropped). "
                      f"Training from it would fail; rebuild it from inputs that keep samples.")
    if errors:
        raise CacheError(f"Cache {path}: {len(errors)} problem(s):\n  " + "\n  ".join(errors))
    print(f"Cache {path} OK: {len(urls)} shards, {samples} samples, {tokens} tokens, {nbytes / 1e6:.1f} MB; "
          f"sha256 and every sample checked.")
    return result
