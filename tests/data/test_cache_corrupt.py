"""Bad caches: every failure names the shard (and the sample key); ``skip_corrupt`` counts and logs instead.

Covered here: truncated tar, corrupt sample, sha256 mismatch (checked before a shard's first sample is used),
NaN/Inf hidden states, missing shard, missing or unknown-version manifest, an empty cache, and manifests whose shard
names try to leave the cache directory or smuggle in shell commands. A cache built for another target, drafter or
tokenizer is refused in ``test_cache.py`` (``test_setup_refuses_*``).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from dspark_lightning.data.cache import reader
from dspark_lightning.data.cache.build import build_cache, write_shard
from dspark_lightning.data.cache.datamodule import TargetCacheDataModule
from dspark_lightning.data.cache.format import CacheError, encode_sample
from dspark_lightning.data.cache.reader import verify_cache
from dspark_lightning.targets import TargetConfig

TINY = dict(model_type="qwen3", vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=128)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """12 samples in 3 shards of 4."""
    root = tmp_path_factory.mktemp("pristine")
    g = torch.Generator().manual_seed(0)
    with (root / "rows.jsonl").open("w") as f:
        for i in range(12):
            ids = torch.randint(0, 128, (20,), generator=g).tolist()
            f.write(json.dumps({"id": i, "input_ids": ids, "loss_mask": [0] * 4 + [1] * 16}) + "\n")
    build_cache([str(root / "rows.jsonl")], str(root / "cache"), TargetConfig(tiny=TINY), [0, 1], max_shard_samples=4,
                min_loss_tokens=1, progress=False)
    return root / "cache"


@pytest.fixture
def cache(pristine, tmp_path) -> Path:
    shutil.copytree(pristine, tmp_path / "cache")
    return tmp_path / "cache"


def members(shard: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(shard) as tar:
        return tar.getmembers()


def patch(shard: Path, offset: int, data: bytes) -> None:
    with shard.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def epoch(path: Path, **kwargs) -> list[dict]:
    """One training epoch; the tar- and sample-level checks are tested without the sha256 (which would see any
    change first), unless a test asks for it."""
    kwargs.setdefault("verify_sha256", False)
    dm = TargetCacheDataModule(str(path), batch_size=2, num_workers=0, shuffle_buffer=0, **kwargs)
    dm.setup("fit")
    return list(dm.train_dataloader())


def test_pristine_cache_reads_and_verifies(cache):
    assert sum(len(b["cache_keys"]) for b in epoch(cache)) == 12
    verify_cache(str(cache))


def test_truncated_tar(cache, caplog):
    shard = cache / "shard-00-00001.tar"
    shard.write_bytes(shard.read_bytes()[: members(shard)[2].offset_data + 100])  # cut inside the third sample
    with pytest.raises(CacheError, match=r"shard .*shard-00-00001\.tar: truncated or unreadable tar after key "
                                         r"'0000000005'.*skip_corrupt"):
        epoch(cache)
    with pytest.raises(CacheError, match=r"(?s)shard-00-00001\.tar: 6756 bytes with sha256 .* but the manifest "
                                         r"records 20480 bytes.*shard-00-00001\.tar: truncated"):
        verify_cache(str(cache))
    with caplog.at_level(logging.WARNING):
        batches = epoch(cache, skip_corrupt=True)
    # The epoch keeps its planned length (the two lost samples are made up by re-reading), and says what it skipped.
    assert len(batches) == 6 and sum(int(b["cache_skipped"]) for b in batches) >= 1
    assert "skip_corrupt: skipped shard" in caplog.text and "shard-00-00001.tar" in caplog.text


def test_corrupt_sample(cache, caplog):
    shard = cache / "shard-00-00002.tar"
    target = members(shard)[1]
    patch(shard, target.offset_data, b"\xff" * 8)  # the safetensors header length: now absurd
    with pytest.raises(CacheError, match=r"shard .*shard-00-00002\.tar key '0000000009': not a readable safetensors"):
        epoch(cache)
    with pytest.raises(CacheError, match=r"shard-00-00002\.tar key '0000000009'"):
        verify_cache(str(cache))
    with caplog.at_level(logging.WARNING):
        batches = epoch(cache, skip_corrupt=True)
    keys = [k for b in batches for k in b["cache_keys"]]
    assert len(batches) == 6 and sum(int(b["cache_skipped"]) for b in batches) == 1
    assert "shard-00-00002.tar/0000000009" not in keys
    assert "key '0000000009'" in caplog.text


def test_sha256_mismatch(cache, caplog):
    shard = cache / "shard-00-00000.tar"
    last = members(shard)[-1]
    data = bytearray(shard.read_bytes())
    data[last.offset_data + last.size - 2] ^= 0x01  # lowest mantissa bit of a bf16 value: still decodes
    shard.write_bytes(bytes(data))
    assert sum(len(b["cache_keys"]) for b in epoch(cache)) == 12  # undetectable without hashing...
    with pytest.raises(CacheError, match=r"shard .*shard-00-00000\.tar: .* sha256 .* but the manifest records"):
        verify_cache(str(cache))
    # ...which the loader does before it hands out the shard's first sample (the default): nothing of shard 0 is
    # trained on, neither before the error nor with skip_corrupt.
    dm = TargetCacheDataModule(str(cache), batch_size=1, num_workers=0, shuffle_buffer=0)
    assert dm.verify_sha256 is True
    dm.setup("fit")
    seen = []
    with pytest.raises(CacheError, match=r"shard-00-00000\.tar: .*sha256"):
        for batch in dm.train_dataloader():
            seen += batch["cache_keys"]
    assert seen and not any(k.startswith("shard-00-00000.tar/") for k in seen)
    with caplog.at_level(logging.WARNING):
        batches = epoch(cache, verify_sha256=True, skip_corrupt=True)
    keys = [k for b in batches for k in b["cache_keys"]]
    assert len(batches) == 6 and not any(k.startswith("shard-00-00000.tar/") for k in keys)
    assert sum(int(b["cache_skipped"]) for b in batches) >= 1 and "shard-00-00000.tar" in caplog.text


def test_shards_past_the_memory_limit_are_checked_through_a_temp_file(cache, monkeypatch):
    monkeypatch.setattr(reader, "SPOOL_BYTES", 1024)  # every shard (20 KiB) now goes to a temporary file
    assert sum(len(b["cache_keys"]) for b in epoch(cache, verify_sha256=True)) == 12
    shard = cache / "shard-00-00001.tar"
    data = bytearray(shard.read_bytes())
    data[-2000] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"shard-00-00001\.tar: 20480 bytes with sha256 .* but the manifest"):
        epoch(cache, verify_sha256=True)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_hidden_states(cache, bad):
    shard = cache / "shard-00-00001.tar"
    hidden = torch.randn(20, 32)
    hidden[3, 5] = bad
    blob = encode_sample(torch.arange(20), torch.ones(20), hidden, torch.randn(20, 16), dtype="bfloat16",
                         sample_id="x", check_finite=False)
    written = write_shard(shard, [("0000000004", blob)])
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["shards"][1].update(samples=1, tokens=20, **written)
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=r"shard-00-00001\.tar key '0000000004': target_hidden holds NaN/Inf"):
        epoch(cache)
    batches = epoch(cache, skip_corrupt=True)
    assert all(torch.isfinite(b["target_hidden"]).all() for b in batches)
    assert sum(int(b["cache_skipped"]) for b in batches) >= 1
    with pytest.raises(CacheError, match="target produced NaN/Inf in target_hidden"):  # the writer refuses it too
        encode_sample(torch.arange(20), torch.ones(20), hidden, torch.randn(20, 16), dtype="bfloat16", sample_id="x")


def test_missing_shard(cache):
    (cache / "shard-00-00002.tar").unlink()
    with pytest.raises(CacheError, match=r"Shard .*shard-00-00002\.tar is listed in the manifest but does not exist"):
        epoch(cache)


def test_missing_manifest(tmp_path):
    with pytest.raises(CacheError, match=r"No cache manifest at .*manifest\.json: build the cache first"):
        TargetCacheDataModule(str(tmp_path)).setup("fit")
    with pytest.raises(CacheError, match="No cache manifest"):
        verify_cache(str(tmp_path))


def test_unknown_version_or_kind(cache):
    manifest = json.loads((cache / "manifest.json").read_text())
    (cache / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(CacheError, match=r"format_version=99; this dspark_lightning reads \[1\]"):
        TargetCacheDataModule(str(cache)).setup("fit")
    (cache / "manifest.json").write_text(json.dumps({**manifest, "kind": "something else"}))
    with pytest.raises(CacheError, match="is not a dspark_lightning target-cache manifest"):
        TargetCacheDataModule(str(cache)).setup("fit")
    (cache / "manifest.json").write_text("{not json")
    with pytest.raises(CacheError, match="is not valid JSON"):
        TargetCacheDataModule(str(cache)).setup("fit")


def test_a_cache_without_samples_does_not_verify(cache):
    manifest = json.loads((cache / "manifest.json").read_text())
    for shard in manifest["shards"]:
        (cache / shard["name"]).unlink()
    (cache / "manifest.json").write_text(json.dumps({**manifest, "shards": [], "num_samples": 0, "num_dropped": 12}))
    with pytest.raises(CacheError, match=r"holds no samples \(0 shards; the manifest records 12 input rows, 12 "
                                         r"dropped\)"):
        verify_cache(str(cache))


# The payloads: with the old `pipe:` shard URLs the first ran `touch M`; the second read a file outside the
# cache. Neither may be opened, whichever URL form is used.
HOSTILE_NAMES = ["shard-00-00000.tar; touch M; #", "/etc/hostname", "../outside.tar", "sub/shard-00-00000.tar",
                 "$(touch M).tar", "shard-00-`touch M`.tar", "shard-00-00000.tar\n", "..tar", "s3://bucket/x.tar"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_shard_names_must_be_plain_file_names(cache, name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    opened = []
    real_open = reader.open_shard
    monkeypatch.setattr(reader, "open_shard", lambda url: opened.append(url) or real_open(url))
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["shards"][0]["name"] = name
    (cache / "manifest.json").write_text(json.dumps(manifest))
    refused = re.escape(f"shards[0] has name {name!r}, which is not a plain shard file name")
    for read in (lambda: verify_cache(str(cache)), lambda: epoch(cache),
                 lambda: epoch(cache, shard_url="{path}/{name}", verify_sha256=True),
                 lambda: verify_cache(str(cache), shard_url="pipe:cat {path}/{name}")):
        with pytest.raises(CacheError, match=refused):
            read()
    assert opened == [] and not (tmp_path / "M").exists()


def test_pipe_shard_urls_are_refused_unrun(cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    command = "pipe:touch M; cat {path}/{name}"
    with pytest.raises(ValueError, match=r"pipe: URLs run a shell command per shard and are not supported.*s3://"):
        epoch(cache, shard_url=command)
    with pytest.raises(ValueError, match="pipe: URLs run a shell command"):
        verify_cache(str(cache), shard_url=command)
    with pytest.raises(CacheError, match="fsspec only"):
        next(reader.iter_shard(command, {}))
    assert not (tmp_path / "M").exists()
