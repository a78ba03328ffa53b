"""Target cache: bytes per token (bf16 vs fp8 vs DeepSpec), loader throughput, and the trainer's consumption rate.

Everything runs through the real code paths (``cache build`` on a frozen target, ``TargetCacheDataModule`` with
DataLoader workers, a Lightning ``fit`` from the cache), in one process, on one machine:

1. **Size.** Builds caches at Qwen3-4B's cache geometry (hidden 2560, target layers [1, 9, 17, 25, 33] + last
   hidden; a 36-layer random target that is narrow inside, so CPU can run it) in bf16 and fp8, and prints
   payload and on-disk bytes per token beside DeepSpec's 30,726 B/token for the same geometry, with fp8's
   measured error.
2. **Loader.** Streams those caches and the smoke-size cache with ``--workers`` workers: samples/s, tokens/s,
   GB/s read from disk; with ``verify_sha256`` (the default: each shard copied, hashed and checked before its
   first sample is used) and, for the bf16 and smoke caches, without it, which gives the check's cost.
3. **Trainer.** ``fit`` of the smoke DSpark (``configs/smoke/dspark.yaml`` model) from the smoke cache:
   samples/s consumed by training steps, beside what the loader alone delivers.

    python benchmarks/cache.py                    # defaults: 2 workers, 24 samples x 512 tokens at Qwen3-4B size
    python benchmarks/cache.py --workers 8 --samples 64 --out /nvme/bench --device cuda
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
import yaml

from dspark_lightning.data.cache.build import build_cache
from dspark_lightning.data.cache.datamodule import TargetCacheDataModule
from dspark_lightning.data.cache.format import (
    DEEPSPEC_QWEN3_4B_BYTES_PER_TOKEN,
    dequantize_fp8,
    fp8_error_bound,
    quantize_fp8,
    read_manifest,
)
from dspark_lightning.targets import FrozenTarget, TargetConfig

REPO = Path(__file__).resolve().parents[1]
QWEN3_4B_LAYERS = [1, 9, 17, 25, 33]
# Qwen3-4B's cache geometry (hidden 2560, 36 layers) with a narrow inside (1 head of 16, MLP 16) and a small
# vocabulary, so a CPU can build it; the cache bytes depend on hidden size and layers only (ids are int32).
QWEN3_4B_SHAPED = dict(model_type="qwen3", vocab_size=4096, hidden_size=2560, intermediate_size=16,
                       num_hidden_layers=36, num_attention_heads=1, num_key_value_heads=1, head_dim=16,
                       max_position_embeddings=4096)
# DeepSpec's H200 training step for Qwen3-4B (DSpark, 4,096 tokens, eager; benchmarks/train_step.py).
DEEPSPEC_STEP_S, DEEPSPEC_STEP_TOKENS = 0.1056, 4096


def write_rows(path: Path, samples: int, tokens: int, vocab: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with path.open("w") as f:
        for i in range(samples):
            ids = torch.randint(0, vocab, (tokens,), generator=g).tolist()
            f.write(json.dumps({"id": i, "input_ids": ids, "loss_mask": [0] * 16 + [1] * (tokens - 16)}) + "\n")


def loader_rate(path: Path, workers: int, batch_size: int, num_anchors: int, hidden_dtype: str,
                fp8_dequantize: str = "worker", epochs: int = 2, verify_sha256: bool = True) -> dict[str, float]:
    """Steady-state rate of the train loader (the first batch of each epoch, i.e. worker start-up, excluded)."""
    dm = TargetCacheDataModule(str(path), batch_size=batch_size, num_workers=workers, shuffle_buffer=16,
                               num_anchors=num_anchors, hidden_dtype=hidden_dtype, fp8_dequantize=fp8_dequantize,
                               verify_sha256=verify_sha256)
    dm.setup("fit")
    manifest = read_manifest(str(path))
    bytes_per_sample = manifest["num_bytes"] / manifest["num_samples"]
    samples = tokens = 0
    elapsed = 0.0
    for _ in range(epochs):
        start = None
        for batch in dm.train_dataloader():
            if start is None:
                start = time.perf_counter()
                continue
            samples += batch["input_ids"].shape[0]
            tokens += int(batch["attention_mask"].sum())
        elapsed += time.perf_counter() - start
    return {"samples_s": samples / elapsed, "tokens_s": tokens / elapsed,
            "gb_s": samples * bytes_per_sample / elapsed / 1e9}


def trainer_rate(cache: Path, root: Path, steps: int, device: str) -> float:
    """Samples/s consumed by fit steps of the smoke DSpark from the cache (steady state, after 5 warm-up steps)."""
    import lightning as L

    from dspark_lightning.drafters import DrafterConfig
    from dspark_lightning.modules import DrafterModule

    config = yaml.safe_load((REPO / "configs/smoke/dspark.yaml").read_text())
    target = TargetConfig.from_dict(config["model"]["target"])
    drafter = DrafterConfig(**config["model"]["drafter"])

    class Clock(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.samples = 0

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            if device == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            if len(self.times) > 5:
                self.samples += batch["input_ids"].shape[0]

    clock = Clock()
    data = TargetCacheDataModule(str(cache), batch_size=config["data"]["init_args"]["batch_size"], num_workers=2)
    trainer = L.Trainer(accelerator=device, devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[clock],
                        default_root_dir=str(root), limit_val_batches=0)
    trainer.fit(DrafterModule(drafter, target), datamodule=data)
    return clock.samples / (clock.times[-1] - clock.times[5])


def fp8_error(target_cfg: TargetConfig, layers: list[int]) -> tuple[float, float]:
    """(relative RMS error, max error / stated bound) of fp8 on real states of a target."""
    target = FrozenTarget.from_config(target_cfg, layers)
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    x = target(ids).hidden.reshape(-1, target.hidden_size * len(layers))
    q, s = quantize_fp8(x)
    err = (dequantize_fp8(q, s) - x).abs()
    return float(err.norm() / x.norm()), float((err / fp8_error_bound(x)).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--samples", type=int, default=24, help="samples in the Qwen3-4B-size caches")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per sample in the Qwen3-4B-size caches")
    parser.add_argument("--steps", type=int, default=60, help="training steps timed")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="where to write the caches (default: a temp dir, removed)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="cache-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        run(args, root)
    finally:
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)


def run(args: argparse.Namespace, root: Path) -> None:
    big = TargetConfig(tiny=QWEN3_4B_SHAPED, seed=0)
    write_rows(root / "big.jsonl", args.samples, args.tokens, QWEN3_4B_SHAPED["vocab_size"])
    sizes, build_s = {}, {}
    for dtype in ("bfloat16", "float8_e4m3fn"):
        start = time.perf_counter()
        m = build_cache(str(root / "big.jsonl"), str(root / f"big-{dtype}"), big, QWEN3_4B_LAYERS, dtype=dtype,
                        max_length=args.tokens, min_loss_tokens=1, batch_size=4, max_shard_samples=4, overwrite=True,
                        progress=False, accelerator=args.device)
        build_s[dtype] = time.perf_counter() - start
        sizes[dtype] = (m["bytes_per_token"], m["num_bytes"] / m["num_tokens"])

    smoke_cfg = yaml.safe_load((REPO / "configs/smoke/dspark.yaml").read_text())
    smoke = TargetConfig.from_dict(smoke_cfg["model"]["target"])
    smoke_layers = smoke_cfg["model"]["drafter"]["target_layer_ids"]
    write_rows(root / "smoke.jsonl", 512, 48, smoke_cfg["model"]["target"]["tiny"]["vocab_size"])
    build_cache(str(root / "smoke.jsonl"), str(root / "smoke"), smoke, smoke_layers, min_loss_tokens=1,
                max_shard_samples=64, overwrite=True, progress=False, accelerator=args.device)
    rel_rms, worst = fp8_error(smoke, smoke_layers)

    print(f"\n== Bytes per token at Qwen3-4B geometry (hidden 2560, layers {QWEN3_4B_LAYERS} + last hidden) ==")
    print(f"{'format':<34}{'payload B/token':>16}{'on disk B/token':>17}{'vs DeepSpec':>13}")
    print(f"{'DeepSpec v2 (bf16, custom .bin)':<34}{DEEPSPEC_QWEN3_4B_BYTES_PER_TOKEN:>16,}{'':>17}{'1.00x':>13}")
    for dtype, (payload, disk) in sizes.items():
        name = f"ours {dtype} (webdataset tar)"
        print(f"{name:<34}{payload:>16,}{disk:>17,.0f}{disk / DEEPSPEC_QWEN3_4B_BYTES_PER_TOKEN:>12.2f}x")
    print(f"(on disk includes tar and safetensors headers at {args.tokens} tokens/sample; DeepSpec's 38 TB cache "
          f"at fp8 would be {38 * sizes['float8_e4m3fn'][1] / DEEPSPEC_QWEN3_4B_BYTES_PER_TOKEN:.1f} TB)")
    print(f"fp8 error on real target states: {100 * rel_rms:.2f}% relative RMS, max |err| = {worst:.2f} x the "
          f"stated bound |x|/16 + scale/1024")
    print(f"build ({args.device}, {args.samples} x {args.tokens} tokens, 36-layer narrow target): "
          + ", ".join(f"{d} {args.samples * args.tokens / s:,.0f} tokens/s" for d, s in build_s.items()))

    print(f"\n== Loader: TargetCacheDataModule, {args.workers} workers, steady state ==")
    print(f"{'cache':<40}{'samples/s':>11}{'tokens/s':>12}{'GB/s':>8}")
    rates, previous = {}, ""
    for name, path, batch, anchors, dtype, where, verify in (
        (f"Qwen3-4B size bf16 ({args.tokens} tok/sample)", root / "big-bfloat16", 1, 512, "bfloat16", "worker", True),
        ("  same, verify_sha256 off", root / "big-bfloat16", 1, 512, "bfloat16", "worker", False),
        ("  fp8, dequantised in the workers", root / "big-float8_e4m3fn", 1, 512, "bfloat16", "worker", True),
        ("  fp8, left for the device", root / "big-float8_e4m3fn", 1, 512, "bfloat16", "device", True),
        ("smoke (hidden 64, 48 tok/sample)", root / "smoke", 4, 16, "float32", "worker", True),
        ("  same, verify_sha256 off", root / "smoke", 4, 16, "float32", "worker", False),
    ):
        r = loader_rate(path, args.workers, batch, anchors, dtype, where, verify_sha256=verify)
        rates[name] = r
        print(f"{name:<40}{r['samples_s']:>11,.1f}{r['tokens_s']:>12,.0f}{r['gb_s']:>8.3f}")
        if not verify:
            on = rates[previous]["samples_s"]
            print(f"{'':<4}verify_sha256 costs {100 * (1 - on / r['samples_s']):.1f}% of the loader's rate here")
        previous = name
    need = DEEPSPEC_STEP_TOKENS * DEEPSPEC_QWEN3_4B_BYTES_PER_TOKEN / DEEPSPEC_STEP_S / 1e9
    print(f"(an H200 training Qwen3-4B DSpark at DeepSpec's 105.6 ms per 4,096-token step reads "
          f"{DEEPSPEC_STEP_TOKENS / DEEPSPEC_STEP_S:,.0f} tokens/s = {need:.2f} GB/s of bf16 cache)")

    train = trainer_rate(root / "smoke", root / "fit", args.steps, args.device)
    loader = rates["smoke (hidden 64, 48 tok/sample)"]["samples_s"]
    print("\n== Trainer: fit of the smoke DSpark (configs/smoke/dspark.yaml model) from the smoke cache ==")
    print(f"{'':<40}{'samples/s':>11}")
    print(f"{'trainer consumes (fit steps)':<40}{train:>11,.1f}")
    print(f"{'loader delivers (same cache, alone)':<40}{loader:>11,.1f}")
    print(f"loader / trainer = {loader / train:.1f}x")


if __name__ == "__main__":
    main()
