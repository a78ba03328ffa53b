"""Target cache: webdataset tar shards of frozen-target hidden states, a manifest, and the DataModule that streams them.

``format`` (sample blobs, fp8, manifest), ``build`` (``cache build`` / ``cache estimate``), ``reader`` (shard URLs,
streaming, ``cache verify``), ``datamodule`` (``TargetCacheDataModule``). The DataModule is imported lazily, so
the build and verify commands do not pay for importing Lightning.
"""

from __future__ import annotations

from typing import Any

from .format import CACHE_DTYPES, FORMAT_VERSION, CacheError, read_manifest

__all__ = ["CACHE_DTYPES", "FORMAT_VERSION", "CacheError", "TargetCacheDataModule", "read_manifest"]


def __getattr__(name: str) -> Any:
    if name == "TargetCacheDataModule":
        from .datamodule import TargetCacheDataModule

        return TargetCacheDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
