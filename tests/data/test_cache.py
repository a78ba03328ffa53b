"""Target cache: build (manifest, shards, resume, several processes), estimate, verify, and the DataModule
(round trip, anchors, resume, DDP split, URLs, checks against the drafter, fit from a cache)."""

from __future__ import annotations

import json
import os
import random
import socket
from pathlib import Path

import pytest
import torch
import yaml

from dspark_lightning.data.cache import build as build_mod
from dspark_lightning.data.cache.build import build_cache, estimate_cache, read_inputs
from dspark_lightning.data.cache.datamodule import TargetCacheDataModule, _interleave
from dspark_lightning.data.cache.format import (
    DEEPSPEC_QWEN3_4B_BYTES_PER_TOKEN,
    CacheError,
    bytes_per_token,
    dequantize_fp8,
    fp8_error_bound,
    quantize_fp8,
    read_manifest,
)
from dspark_lightning.data.cache.reader import verify_cache
from dspark_lightning.data.conversations import tokenize_conversation
from dspark_lightning.targets import FrozenTarget, TargetConfig

REPO = Path(__file__).resolve().parents[2]
LAYERS = [0, 2]
TINY = dict(model_type="qwen3", vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex every jovial bystander near "
         "the river bank and answers questions about numbers like one two three").split()


# ---------------------------------------------------------------------- fixtures
def make_tokenizer(folder: Path, vocab_size: int = 300):
    """A byte-level BPE (vocab 300) with a ChatML-style template, trained in well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    rng = random.Random(0)
    tok.train_from_iterator([" ".join(rng.choices(WORDS, k=20)) for _ in range(200)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(folder)
    return fast


def write_conversations(path: Path, n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        answer_words = rng.randint(1, 2) if i % 7 == 3 else rng.randint(8, 25)  # every 7th is too short to keep
        rows.append({"id": f"c{i}", "conversations": [
            {"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(3, 10)))},
            {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=answer_words))}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def write_token_rows(path: Path, n: int, vocab: int, seed: int = 0, lengths=(24, 48)) -> None:
    g = torch.Generator().manual_seed(seed)
    with path.open("w") as f:
        for i in range(n):
            length = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=g))
            ids = torch.randint(0, vocab, (length,), generator=g).tolist()
            mask = [0] * 6 + [1] * (length - 6)
            f.write(json.dumps({"id": f"t{i}", "input_ids": ids, "loss_mask": mask}) + "\n")


@pytest.fixture(scope="module")
def target() -> TargetConfig:
    return TargetConfig(tiny=TINY, seed=0)


@pytest.fixture(scope="module")
def convo(tmp_path_factory, target):
    """40 conversations (5 too short), a tokenizer, and a bf16 cache of them in shards of 8 samples."""
    root = tmp_path_factory.mktemp("convo")
    make_tokenizer(root / "tok")
    rows = write_conversations(root / "conv.jsonl", 40)
    manifest = build_cache([str(root / "conv.jsonl")], str(root / "cache"), target, LAYERS, max_length=96,
                           tokenizer=str(root / "tok"), batch_size=1, max_shard_samples=8, progress=False)
    return root, rows, manifest


@pytest.fixture(scope="module")
def uneven_cache(tmp_path_factory, target):
    """48 token rows in shards of 7 (the last has 6), so two workers get 27 and 21 samples."""
    root = tmp_path_factory.mktemp("uneven")
    write_token_rows(root / "rows.jsonl", 48, TINY["vocab_size"], seed=1)
    build_cache([str(root / "rows.jsonl")], str(root / "cache"), target, LAYERS, max_shard_samples=7,
                min_loss_tokens=1, progress=False)
    return root / "cache"


@pytest.fixture(scope="module")
def tokens_cache(tmp_path_factory, target):
    """48 token rows of 24-48 tokens, in 8 shards of 6 samples (no tokenizer involved)."""
    root = tmp_path_factory.mktemp("tokens")
    write_token_rows(root / "rows.jsonl", 48, TINY["vocab_size"])
    build_cache([str(root / "rows.jsonl")], str(root / "cache"), target, LAYERS, max_shard_samples=6,
                min_loss_tokens=1, progress=False)
    return root / "cache"


def reference_states(target_cfg: TargetConfig, ids: torch.Tensor):
    target = FrozenTarget.from_config(target_cfg, LAYERS)
    out = target(ids[None])
    return out.hidden[0], out.last_hidden[0]


def collect(loader) -> list[dict]:
    return [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in loader]


# ---------------------------------------------------------------------- build, manifest, verify
def test_manifest_describes_the_build(convo, target):
    root, rows, m = convo
    tok = __import__("transformers").AutoTokenizer.from_pretrained(root / "tok")
    kept = [r for r in rows if int(tokenize_conversation(tok, r["conversations"], max_length=96)[1].sum()) >= 14]
    assert m == read_manifest(str(root / "cache"))
    assert m["format_version"] == 1 and m["dtype"] == "bfloat16" and m["target_layer_ids"] == LAYERS
    assert (m["hidden_size"], m["vocab_size"], m["max_length"]) == (32, 320, 96)
    assert m["target"]["identity"] == target.identity() and m["target"]["config_hash"] == target.config_hash()
    assert m["tokenizer"]["hash"] and m["tokenizer"]["chat_template"] == TEMPLATE
    assert m["num_samples"] == len(kept) and m["num_dropped"] == len(rows) - len(kept) > 0
    assert [s["name"] for s in m["shards"]] == [f"shard-00-{i:05d}.tar" for i in range(len(m["shards"]))]
    assert sum(s["samples"] for s in m["shards"]) == m["num_samples"]
    assert all(s["samples"] <= 8 for s in m["shards"])
    assert m["sources"][0]["rows"] == 40 and len(m["sources"][0]["sha256"]) == 64
    files = sorted(p.name for p in (root / "cache").iterdir())
    assert files == ["manifest.json"] + [s["name"] for s in m["shards"]]  # no temp or progress files left
    assert sum((root / "cache" / s["name"]).stat().st_size for s in m["shards"]) == m["num_bytes"]
    assert verify_cache(str(root / "cache"))["samples"] == m["num_samples"]


def test_round_trip_bf16_is_exact(convo, target):
    """conversations -> cache -> DataModule gives exactly the target's tensors (rounded to bf16) and tokens."""
    root, rows, m = convo
    tok = __import__("transformers").AutoTokenizer.from_pretrained(root / "tok")
    dm = TargetCacheDataModule(str(root / "cache"), target=target, batch_size=3, num_workers=0, num_anchors=5,
                               target_layer_ids=LAYERS, hidden_dtype="bfloat16", shuffle_buffer=4)
    dm.setup("fit")
    seen = 0
    by_id = {r["id"]: r for r in rows}
    for batch in dm.train_dataloader():
        for i, key in enumerate(batch["cache_keys"]):
            row = by_id[f"c{int(key.split('/')[1])}"]
            ids, mask = tokenize_conversation(tok, row["conversations"], max_length=96)
            n = ids.shape[0]
            assert torch.equal(batch["input_ids"][i, :n], ids) and torch.equal(batch["loss_mask"][i, :n], mask)
            assert batch["attention_mask"][i].sum() == n and not batch["loss_mask"][i, n:].any()
            hidden, last = reference_states(target, ids)
            assert torch.equal(batch["target_hidden"][i, :n], hidden.bfloat16())
            assert torch.equal(batch["target_last_hidden"][i, :n], last.bfloat16())
            anchors = batch["anchors"][i][batch["anchor_valid"][i]]
            assert (mask[anchors] & mask[anchors + 1]).all()  # anchors where loss_mask[a] and loss_mask[a+1]
            seen += 1
    assert seen == m["num_samples"]


def test_fp8_round_trip_within_stated_error(tmp_path, convo, target):
    root, _, _ = convo
    bound_x = torch.randn(16, 64) * torch.logspace(-3, 2, 16)[:, None]
    q, s = quantize_fp8(bound_x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (16,)
    assert ((dequantize_fp8(q, s) - bound_x).abs() <= fp8_error_bound(bound_x)).all()

    build_cache([str(root / "conv.jsonl")], str(tmp_path / "fp8"), target, LAYERS, dtype="float8_e4m3fn",
                max_length=96, tokenizer=str(root / "tok"), batch_size=1, max_shard_samples=8, progress=False)
    fp8, bf16 = read_manifest(str(tmp_path / "fp8")), read_manifest(str(root / "cache"))
    assert fp8["num_samples"] == bf16["num_samples"] and fp8["dtype"] == "float8_e4m3fn"
    assert fp8["bytes_per_token"] == 4 + 1 + 3 * 32 + 8 and bf16["bytes_per_token"] == 4 + 1 + 2 * 3 * 32
    assert fp8["num_bytes"] < 0.7 * bf16["num_bytes"]
    dm = TargetCacheDataModule(str(tmp_path / "fp8"), target=target, batch_size=4, num_workers=0,
                               shuffle_buffer=0, target_layer_ids=LAYERS, fp8_dequantize="worker")
    dm.setup("fit")
    batches = collect(dm.train_dataloader())
    # Dequantising on the device (after the half-size transfer) gives the same tensors.
    on_device = TargetCacheDataModule(str(tmp_path / "fp8"), batch_size=4, num_workers=0, shuffle_buffer=0,
                                      fp8_dequantize="device")
    on_device.setup("fit")
    for raw, want in zip(on_device.train_dataloader(), batches):
        assert raw["target_hidden"].dtype == torch.float8_e4m3fn and raw["target_hidden_scale"].dtype == torch.float32
        got = on_device.on_after_batch_transfer(raw, 0)
        assert "target_hidden_scale" not in got
        assert torch.equal(got["target_hidden"], want["target_hidden"])
        assert torch.equal(got["target_last_hidden"], want["target_last_hidden"])
    for batch in batches:
        for i in range(batch["input_ids"].shape[0]):
            n = int(batch["attention_mask"][i].sum())
            hidden, last = reference_states(target, batch["input_ids"][i, :n])
            for got, ref in ((batch["target_hidden"][i, :n], hidden), (batch["target_last_hidden"][i, :n], last)):
                assert got.dtype == torch.float32
                assert ((got - ref).abs() <= fp8_error_bound(ref) + 1e-6).all()
                assert (got - ref).norm() / ref.norm() < 0.04  # ~2.5% relative RMS in practice


def test_batched_build_matches_single_sample_forward(tmp_path, convo, target):
    """Right padding in the build's batches does not change the states of the real tokens."""
    root, _, _ = convo
    m = build_cache([str(root / "conv.jsonl")], str(tmp_path / "b"), target, LAYERS, max_length=96,
                    tokenizer=str(root / "tok"), batch_size=16, max_shard_samples=8, progress=False)
    assert [s["samples"] for s in m["shards"]] == [s["samples"] for s in read_manifest(str(root / "cache"))["shards"]]
    dm = TargetCacheDataModule(str(tmp_path / "b"), batch_size=8, num_workers=0, shuffle_buffer=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    for i in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][i].sum())
        hidden, _ = reference_states(target, batch["input_ids"][i, :n])
        torch.testing.assert_close(batch["target_hidden"][i, :n], hidden.bfloat16().float(), rtol=2**-7, atol=1e-6)


def test_build_resumes_after_a_kill(tmp_path, convo, target, monkeypatch):
    """A build killed while writing shard 2 keeps shards 0-1, leaves no .tar for shard 2, and resumes to the
    same bytes as an uninterrupted build."""
    root, _, full = convo
    out = tmp_path / "resumed"
    real = build_mod.write_shard
    calls = {"n": 0}

    def dying(path, members):
        calls["n"] += 1
        if calls["n"] == 3:  # the kill lands half-way through the third shard's file
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            tmp.write_bytes(b"partial")
            raise KeyboardInterrupt
        return real(path, members)

    monkeypatch.setattr(build_mod, "write_shard", dying)
    args = dict(max_length=96, tokenizer=str(root / "tok"), batch_size=1, max_shard_samples=8, progress=False)
    with pytest.raises(KeyboardInterrupt):
        build_cache([str(root / "conv.jsonl")], str(out), target, LAYERS, **args)
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-00-00000.tar", "shard-00-00001.tar"]
    assert not (out / "manifest.json").exists()
    progress = json.loads((out / "progress-00.json").read_text())
    assert len(progress["shards"]) == 2 and not progress["done"]

    written = []
    monkeypatch.setattr(build_mod, "write_shard", lambda p, m: written.append(p.name) or real(p, m))
    m = build_cache([str(root / "conv.jsonl")], str(out), target, LAYERS, **args)
    assert written == [s["name"] for s in full["shards"][2:]]  # only the missing shards were computed
    assert [(s["name"], s["sha256"]) for s in m["shards"]] == [(s["name"], s["sha256"]) for s in full["shards"]]
    assert m["num_dropped"] == full["num_dropped"] and not list(out.glob(".*tmp*"))
    # Other settings against the same directory are refused; a finished cache is left alone.
    with pytest.raises(CacheError, match="other settings"):
        build_cache([str(root / "conv.jsonl")], str(out), target, LAYERS, **{**args, "max_length": 64})
    written.clear()
    assert build_cache([str(root / "conv.jsonl")], str(out), target, LAYERS, **args)["num_samples"] == m["num_samples"]
    assert written == []


def test_estimate_matches_the_build(convo, target, capsys):
    root, _, m = convo
    est = estimate_cache([str(root / "conv.jsonl")], target, LAYERS, max_length=96, tokenizer=str(root / "tok"))
    assert (est["samples"], est["tokens"]) == (m["num_samples"], m["num_tokens"])
    assert est["dropped"] == m["num_dropped"]
    assert abs(est["bytes"]["bfloat16"] - m["num_bytes"]) / m["num_bytes"] < 0.1
    assert est["bytes_per_token"]["float8_e4m3fn"] < est["bytes_per_token"]["bfloat16"]
    out = capsys.readouterr().out
    assert "30,726" in out and "30,725 B/token at Qwen3-4B geometry" in out and "15,373" in out
    # DeepSpec's figure: ids (4) + attention mask (1) + loss mask (1) + bf16 hidden of 5 layers and the last one.
    assert bytes_per_token(2560, 5, "bfloat16") + 1 == DEEPSPEC_QWEN3_4B_BYTES_PER_TOKEN


def test_read_inputs_accepts_turns_and_token_rows(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"turns": ["hi"]}) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"id": 7, "input_ids": [1, 2], "loss_mask": [0, 1]}) + "\n")
    rows, sources = read_inputs([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")])
    assert [r.index for r in rows] == [0, 1] and rows[0].messages[0]["role"] == "user" and rows[1].input_ids == [1, 2]
    assert [s["kind"] for s in sources] == ["conversations", "tokens"]


# ---------------------------------------------------------------------- the DataModule stream
def test_interleave_is_the_dataloader_round_robin():
    assert _interleave([3, 1], 4) == ([3, 1], 1)
    assert _interleave([3, 3], 3) == ([2, 1], 1)
    assert _interleave([1, 3, 2], 6) == ([1, 3, 2], 2)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_epoch_covers_the_training_shards_once(tokens_cache, num_workers):
    dm = TargetCacheDataModule(str(tokens_cache), batch_size=4, num_workers=num_workers, val_shards=2, seed=1)
    dm.setup("fit")
    keys = [k for b in dm.train_dataloader() for k in b["cache_keys"]]
    train = {s["name"] for s in dm.manifest["shards"][:-2]}
    assert len(keys) == len(set(keys)) == 36 and {k.split("/")[0] for k in keys} == train
    val = [k for b in dm.val_dataloader() for k in b["cache_keys"]]
    assert len(val) == 12 and not set(val) & set(keys)
    again = [k for b in dm.train_dataloader() for k in b["cache_keys"]]
    assert sorted(again) == sorted(keys) and again != keys  # epoch 1: same samples, another order


@pytest.mark.parametrize(("num_workers", "stop"), [(0, 3), (2, 10), (2, 13)])
def test_resume_continues_the_uninterrupted_stream(uneven_cache, num_workers, stop):
    """state_dict after ``stop`` batches + a fresh DataModule = the rest of the uninterrupted stream: mid-epoch,
    after one worker ran dry (2 workers of 6 and 5 batches), and in the next epoch."""
    kwargs = dict(batch_size=5, num_workers=num_workers, num_anchors=3, shuffle_buffer=8, seed=3)
    ref = TargetCacheDataModule(str(uneven_cache), **kwargs)
    ref.setup("fit")
    per_epoch = ref.batches_per_epoch
    assert per_epoch == (10 if num_workers == 0 else 11)
    uninterrupted = collect(ref.train_dataloader()) + collect(ref.train_dataloader())

    first = TargetCacheDataModule(str(uneven_cache), **kwargs)
    first.setup("fit")
    loader = first.train_dataloader()
    epochs = stop // per_epoch
    for _ in range(epochs):
        collect(loader)
    it = iter(loader)
    for _ in range(stop % per_epoch):
        next(it)
    state = first.state_dict()
    assert (state["epoch"], state["position"]) == (epochs, stop % per_epoch)

    resumed = TargetCacheDataModule(str(uneven_cache), **kwargs)
    resumed.setup("fit")
    resumed.load_state_dict(state)
    rest = collect(resumed.train_dataloader()) + collect(resumed.train_dataloader())
    rest = rest[: len(uninterrupted) - stop]
    assert len(rest) == len(uninterrupted) - stop
    for got, want in zip(rest, uninterrupted[stop:]):
        assert got["cache_keys"] == want["cache_keys"]
        for name in ("input_ids", "target_hidden", "anchors", "anchor_valid"):
            assert torch.equal(got[name], want[name])


def test_training_shards_are_shared_evenly_between_ranks(tokens_cache):
    """6 training shards on 2 ranks x 2 workers: 3 shards per rank (dealt to the 4 slots directly, one rank got 4
    and the other 2, and the epoch ended for both at the smaller share), every shard read by exactly one rank."""
    def rank_keys(rank):
        dm = TargetCacheDataModule(str(tokens_cache), rank=rank, world_size=2, batch_size=3, num_workers=2,
                                   val_shards=2, seed=1)
        dm.setup("fit")
        shards = sorted(i for slot in dm._slots[rank] for i in slot)
        return dm, shards, [k for b in collect(dm.train_dataloader()) for k in b["cache_keys"]]

    (dm0, shards0, keys0), (dm1, shards1, keys1) = rank_keys(0), rank_keys(1)
    assert len(shards0) == len(shards1) == 3 and sorted(shards0 + shards1) == list(range(6))
    assert dm0.batches_per_epoch == dm1.batches_per_epoch == 3 * 6 // 3
    assert len(keys0) == len(keys1) == 18 and not set(keys0) & set(keys1)


def test_validation_is_lockstep_across_ranks(tokens_cache):
    """Every rank runs the same number of validation batches (DDP hangs otherwise); a split that leaves a rank
    without one is refused at setup, naming the fix."""
    def val_batches(rank, **kw):
        dm = TargetCacheDataModule(str(tokens_cache), rank=rank, world_size=2, seed=1, **kw)
        dm.setup("fit")
        return collect(dm.val_dataloader())

    per_rank = [val_batches(r, batch_size=4, val_shards=3) for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) >= 1
    keys = [set(k for b in batches for k in b["cache_keys"]) for batches in per_rank]
    assert not keys[0] & keys[1]
    with pytest.raises(ValueError, match=r"1 validation shard\(s\) for 2 rank\(s\).*at least 2 \(the world size\)"):
        val_batches(1, batch_size=4, val_shards=1)


def test_resume_on_another_world_size_continues_the_epoch_share(tokens_cache, caplog):
    """2 ranks x batch 2 stopped after 3 batches; 1 rank x batch 4 (same global batch) resumes the same epoch at
    the same share of it; any other changed setting restarts the epoch, with a warning."""
    two = TargetCacheDataModule(str(tokens_cache), batch_size=2, val_shards=2, seed=1, rank=0, world_size=2)
    two.setup("fit")
    it = iter(two.train_dataloader())
    for _ in range(3):
        next(it)
    state = two.state_dict()
    assert (state["epoch"], state["position"]) == (0, 3)

    one = TargetCacheDataModule(str(tokens_cache), batch_size=4, val_shards=2, seed=1, rank=0, world_size=1)
    one.setup("fit")
    one.load_state_dict(state)
    with caplog.at_level("WARNING"):
        rest = collect(one.train_dataloader())
    start = round(3 / two.batches_per_epoch * one.batches_per_epoch)
    assert 0 < start < one.batches_per_epoch and len(rest) == one.batches_per_epoch - start
    assert (f"resuming on 1 rank(s) x batch 4 from a run on 2 x 2: epoch 0 continues at batch {start} of "
            f"{one.batches_per_epoch}") in caplog.text

    reseeded = TargetCacheDataModule(str(tokens_cache), batch_size=4, val_shards=2, seed=2, rank=0, world_size=1)
    reseeded.setup("fit")
    reseeded.load_state_dict(state)
    with caplog.at_level("WARNING"):
        assert len(collect(reseeded.train_dataloader())) == reseeded.batches_per_epoch
    assert "epoch 0 starts from its beginning" in caplog.text


def test_fit_resumed_from_last_ckpt_trains_on_the_uninterrupted_stream(tokens_cache, target, tmp_path):
    """Trainer.fit(ckpt_path=last) after 5 of 16 steps (12 batches per epoch, 2 workers) sees the same batches
    and reaches the same losses as one uninterrupted run."""
    import lightning as L

    from dspark_lightning.drafters import DrafterConfig
    from dspark_lightning.modules import DrafterModule

    class Recorder(L.Callback):
        def __init__(self):
            self.batches, self.losses = [], []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.batches.append((batch["input_ids"].clone(), batch["anchors"].clone()))

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))

    def fit(max_steps, run, ckpt_path=None):
        drafter = DrafterConfig(algorithm="dspark", num_hidden_layers=1, target_layer_ids=LAYERS, block_size=4,
                                num_anchors=4, markov_rank=4)
        # A constant LR: the default schedule spans max_steps, which differs between the runs compared here.
        constant = lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        module = DrafterModule(drafter, target, lr_scheduler=constant)
        data = TargetCacheDataModule(str(tokens_cache), target=target, batch_size=4, num_workers=2, seed=5)
        recorder = Recorder()
        checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / run, save_last=True,
                                                         every_n_train_steps=5)
        trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[recorder, checkpoint], num_sanity_val_steps=0)
        # weights_only=True: the config dataclasses in the hparams are on torch's safe list (modules/checkpoints.py).
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
        assert data.batches_per_epoch == 12
        return recorder

    L.seed_everything(0)
    whole = fit(16, "whole")
    L.seed_everything(0)
    fit(5, "part")
    resumed = fit(16, "part", ckpt_path=str(tmp_path / "part" / "last.ckpt"))
    assert len(resumed.batches) == 11
    for (ids, anchors), (ref_ids, ref_anchors) in zip(resumed.batches, whole.batches[5:]):
        assert torch.equal(ids, ref_ids) and torch.equal(anchors, ref_anchors)
    torch.testing.assert_close(resumed.losses, whole.losses[5:])


def test_resampled_epochs_have_the_requested_length(tokens_cache):
    dm = TargetCacheDataModule(str(tokens_cache), batch_size=4, num_workers=0, resampled=True, samples_per_epoch=40)
    dm.setup("fit")
    batches = collect(dm.train_dataloader())
    assert len(batches) == dm.batches_per_epoch == 10 and all(len(b["cache_keys"]) == 4 for b in batches)
    with pytest.raises(ValueError, match="samples_per_epoch"):
        TargetCacheDataModule(str(tokens_cache), resampled=True)


def test_shard_urls_from_fsspec(tokens_cache):
    """Local paths, file:// URLs, shard_url templates and fsspec memory:// go through the same reader."""
    import fsspec

    def keys(**kw):
        dm = TargetCacheDataModule(batch_size=6, num_workers=0, shuffle_buffer=0, **kw)
        dm.setup("fit")
        return [k for b in dm.train_dataloader() for k in b["cache_keys"]]

    local = keys(path=str(tokens_cache))
    assert keys(path=f"file://{tokens_cache}") == local
    assert keys(path=str(tokens_cache), shard_url=f"file://{tokens_cache}/{{name}}") == local
    mem = fsspec.filesystem("memory")
    for p in tokens_cache.iterdir():
        mem.pipe(f"/cache-test/{p.name}", p.read_bytes())
    assert keys(path="memory://cache-test") == local
    assert verify_cache("memory://cache-test")["samples"] == 48


def test_setup_refuses_a_cache_for_another_drafter_or_target(tokens_cache, target):
    TargetCacheDataModule(str(tokens_cache), target=target, target_layer_ids=LAYERS).setup("fit")
    with pytest.raises(CacheError, match=r"holds target layers \[0, 2\].*target_layer_ids=\[1, 2\]"):
        TargetCacheDataModule(str(tokens_cache), target_layer_ids=[1, 2]).setup("fit")
    other = TargetConfig(tiny={**TINY, "intermediate_size": 96}, seed=0)
    with pytest.raises(CacheError, match=r"built for target .*config hash .*but training uses"):
        TargetCacheDataModule(str(tokens_cache), target=other).setup("fit")
    reseeded = TargetConfig(tiny=TINY, seed=1)  # same architecture, other weights
    with pytest.raises(CacheError, match="'seed': 0.*'seed': 1"):
        TargetCacheDataModule(str(tokens_cache), target=reseeded).setup("fit")
    TargetCacheDataModule(str(tokens_cache), target=reseeded, allow_target_mismatch=True).setup("fit")


def test_setup_checks_the_trainer_modules_drafter(tokens_cache, target):
    """With a trainer attached the drafter config of the LightningModule is the reference."""
    from types import SimpleNamespace

    from dspark_lightning.drafters import DrafterConfig
    from dspark_lightning.targets import load_target_config

    def attach(dm, **changes):
        drafter = DrafterConfig(algorithm="dspark", num_hidden_layers=1, target_layer_ids=LAYERS, block_size=4,
                                num_anchors=7, markov_rank=4).resolve(load_target_config(target))
        for k, v in changes.items():
            setattr(drafter, k, v)
        module = SimpleNamespace(drafter_config=drafter, target_config=target)
        dm.trainer = SimpleNamespace(lightning_module=module, global_rank=0, world_size=1, precision="bf16-mixed",
                                     current_epoch=0, training=True)
        return dm

    dm = attach(TargetCacheDataModule(str(tokens_cache), num_workers=0))
    dm.setup("fit")
    assert dm.num_anchors == 7 and dm.hidden_dtype == torch.bfloat16
    with pytest.raises(CacheError, match="hidden_size=32, but the drafter has hidden_size=64"):
        attach(TargetCacheDataModule(str(tokens_cache)), hidden_size=64).setup("fit")
    with pytest.raises(CacheError, match="mask_token_id=400 is outside the cache vocabulary"):
        attach(TargetCacheDataModule(str(tokens_cache)), mask_token_id=400).setup("fit")


def test_setup_refuses_another_tokenizer(convo, tmp_path, target):
    root, _, _ = convo
    TargetCacheDataModule(str(root / "cache"), tokenizer=str(root / "tok")).setup("fit")
    make_tokenizer(tmp_path / "other", vocab_size=290)
    with pytest.raises(CacheError, match="tokenizer of hash .* has hash"):
        TargetCacheDataModule(str(root / "cache"), tokenizer=str(tmp_path / "other")).setup("fit")


# ---------------------------------------------------------------------- several processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, root: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        root_path = Path(root)
        build_cache([str(root_path / "rows.jsonl")], str(root_path / "cache"), TargetConfig(tiny=TINY, seed=0), LAYERS,
                    max_shard_samples=5, min_loss_tokens=1, progress=False, accelerator="cpu")
        torch.distributed.barrier()  # rank 0 wrote manifest.json
        dm = TargetCacheDataModule(str(root_path / "cache"), batch_size=3, num_workers=0, num_anchors=2)
        dm.setup("fit")
        keys = [k for b in dm.train_dataloader() for k in b["cache_keys"]]
        (root_path / f"keys-{rank}.json").write_text(json.dumps({"keys": keys, "batches": dm.batches_per_epoch}))
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_build_one_cache_and_read_disjoint_halves(tmp_path, capsys):
    """torchrun-style build with 2 ranks (gloo): per-rank shards, one merged manifest, the same bytes as a
    single-process build; then the DataModule on 2 ranks: disjoint samples that together cover the cache."""
    write_token_rows(tmp_path / "rows.jsonl", 40, TINY["vocab_size"])
    # fork: the children need not re-import torch and Lightning (and a test module cannot be pickled by name).
    torch.multiprocessing.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                                          start_method="fork")
    m = read_manifest(str(tmp_path / "cache"))
    assert m["build"]["world_size"] == 2 and m["num_samples"] == 40
    assert [s["name"] for s in m["shards"]] == [f"shard-{r:02d}-{i:05d}.tar" for r in (0, 1) for i in range(4)]
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert files == ["manifest.json"] + [s["name"] for s in m["shards"]]
    verify_cache(str(tmp_path / "cache"))
    got = [json.loads((tmp_path / f"keys-{r}.json").read_text()) for r in (0, 1)]
    assert got[0]["batches"] == got[1]["batches"]  # ranks stay in step
    k0, k1 = set(got[0]["keys"]), set(got[1]["keys"])
    assert not k0 & k1 and len(k0 | k1) == 40
    # Rank slices are contiguous: the single-process build cuts the same samples into the same bytes.
    capsys.readouterr()
    single = build_cache([str(tmp_path / "rows.jsonl")], str(tmp_path / "single"), TargetConfig(tiny=TINY, seed=0),
                         LAYERS, max_shard_samples=5, min_loss_tokens=1, progress=False, accelerator="cpu")
    assert sorted(s["sha256"] for s in single["shards"]) == sorted(s["sha256"] for s in m["shards"])
    assert f"  rank 0: {single['num_tokens']:,} tokens in " in capsys.readouterr().out  # its rate, start-up apart


def test_build_rates_per_rank_and_for_the_whole_build(capsys):
    from dspark_lightning.data.cache.build import _print_rates

    _print_rates([{"rank": 1, "timing": {"tokens": 3000, "build_s": 2.0, "start_up_s": 9.5}},
                  {"rank": 0, "timing": {"tokens": 5000, "build_s": 4.0, "start_up_s": 10.0}}])
    assert capsys.readouterr().out.splitlines() == [
        "  rank 0: 5,000 tokens in 4.0 s after 10.0 s of start-up: 1,250 tokens/s",
        "  rank 1: 3,000 tokens in 2.0 s after 9.5 s of start-up: 1,500 tokens/s",
        "  all 2 ranks: 2,000 tokens/s (1,000 per rank, the slowest rank's build time)",
    ]


# ---------------------------------------------------------------------- fit from a cache
def _smoke_run(tmp_path: Path, name: str, data: dict | None, steps: int = 20) -> list[float]:
    from dspark_lightning.cli import lightning_main
    from dspark_lightning.modules.summary import RunSummary

    config = yaml.safe_load((REPO / "configs/smoke/dspark.yaml").read_text())
    if data is not None:
        config["data"] = data
    config["trainer"].update(max_steps=steps, default_root_dir=str(tmp_path / name), logger=False,
                             enable_progress_bar=False, callbacks=[])
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = lightning_main(["fit", "--config", str(path)], run=True)
    summary = next(c for c in cli.trainer.callbacks if isinstance(c, RunSummary))
    return summary.losses


def test_fit_from_a_cache_lowers_the_loss_like_online(tmp_path):
    """configs/smoke/dspark.yaml with its data swapped for a cache of the same token samples."""
    from dspark_lightning.data.online import RandomTokensDataModule

    config = yaml.safe_load((REPO / "configs/smoke/dspark.yaml").read_text())
    target = TargetConfig.from_dict(config["model"]["target"])
    online = RandomTokensDataModule(target=target, **config["data"]["init_args"])
    with (tmp_path / "rows.jsonl").open("w") as f:
        for i, s in enumerate(online._make_samples()):
            row = {"id": i, "input_ids": s["input_ids"].tolist(), "loss_mask": s["loss_mask"].int().tolist()}
            f.write(json.dumps(row) + "\n")
    layers = config["model"]["drafter"]["target_layer_ids"]
    build_cache([str(tmp_path / "rows.jsonl")], str(tmp_path / "cache"), target, layers, max_shard_samples=8,
                min_loss_tokens=1, progress=False)
    cache_data = {"class_path": "dspark_lightning.data.cache.datamodule.TargetCacheDataModule",
                  "init_args": {"path": str(tmp_path / "cache"), "batch_size": 4, "num_workers": 0, "val_shards": 1}}
    online_losses = _smoke_run(tmp_path, "online", None)
    cache_losses = _smoke_run(tmp_path, "cache", cache_data)
    mean = lambda xs: sum(xs) / len(xs)
    assert len(cache_losses) == len(online_losses) == 20
    first, last, online_last = mean(cache_losses[:5]), mean(cache_losses[-5:]), mean(online_losses[-5:])
    assert last < first - 0.1 and mean(online_losses[-5:]) < mean(online_losses[:5]) - 0.1
    assert abs(last - online_last) < 0.05 * online_last  # same data, same drop (observed: 2.71 -> 2.41 vs 2.37)
