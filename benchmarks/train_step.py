"""One drafter training step at a chosen geometry: ms/step, peak memory, MFU; DSpark, DFlash, Eagle3 side by side.

Default geometry is DeepSpec's Qwen3-4B setting (hidden 2560, 5 draft layers, vocab 151,936, target layers
[1, 9, 17, 25, 33], one 4,096-token sequence, 512 anchors, block 7, bf16, fused AdamW); the reference trainer's
figures on the H200 are printed beside ours.

    python benchmarks/train_step.py                       # CUDA, Qwen3-4B geometry
    python benchmarks/train_step.py --small --device cpu  # a quick CPU sanity run
    python benchmarks/train_step.py --fused               # also time the fused CE/L1 loss (kernels/) beside it
    python benchmarks/train_step.py --attn sdpa flex      # dense-mask SDPA beside the sparse flex-attention mask
    python benchmarks/train_step.py --compile no layers step --profile 3   # eager vs compiled, top CUDA kernels

``--compile layers`` compiles each decoder layer (static shapes: its norms, rotary and SwiGLU fuse around the
matmuls and flex kernel); ``step`` compiles the whole step with ``dynamic=True``, as the reference trainer does.
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch

from dspark_lightning.drafters import DrafterConfig, registry
from dspark_lightning.drafters.blocks import sample_anchors
from dspark_lightning.losses import LossWeights, drafter_loss

REFERENCE_MS = {"dspark": (105.6, 80.8, 22.8), "dflash": (82.6, 60.6, 18.3)}  # eager, compiled, peak GiB


def qwen3_4b() -> SimpleNamespace:
    return SimpleNamespace(model_type="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                           num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
                           max_position_embeddings=40960, attention_bias=False, hidden_act="silu",
                           num_hidden_layers=36, rope_theta=1_000_000.0)


def small() -> SimpleNamespace:
    return SimpleNamespace(model_type="qwen3", vocab_size=4096, hidden_size=256, intermediate_size=512,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-6,
                           max_position_embeddings=4096, attention_bias=False, hidden_act="silu",
                           num_hidden_layers=8, rope_theta=10000.0)


def step_flops(cfg: DrafterConfig, seq: int, anchors: int) -> float:
    """Matmul FLOPs of one DSpark/DFlash training step (forward + backward).

    Trainable matmuls cost 3x their forward (forward, input grad, weight grad); the frozen lm_head costs 2x on the
    draft path (forward + input grad) and 1x on the target path; attention scores/values count 3x.
    """
    h, i, v, dh = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    nh, nkv, m = cfg.num_attention_heads, cfg.num_key_value_heads, len(cfg.target_layer_ids)
    n_layers = cfg.num_hidden_layers
    q = anchors * cfg.block_size
    per_query_layer = 2 * (h * nh * dh + 2 * h * nkv * dh + nh * dh * h + 3 * h * i)
    per_ctx_layer = 2 * 2 * h * nkv * dh
    attn = 2 * 2 * q * (seq + q) * nh * dh
    layers = n_layers * (q * per_query_layer + seq * per_ctx_layer + attn)
    fc = 2 * seq * m * h * h
    head = 2 * q * h * v
    markov = 2 * q * cfg.markov_rank * v if cfg.has_markov_head else 0
    return 3 * (layers + fc + markov) + 2 * head + head


def build(algorithm: str, target: SimpleNamespace, args: argparse.Namespace) -> tuple[torch.nn.Module, DrafterConfig]:
    if algorithm == "eagle3":
        cfg = DrafterConfig(algorithm="eagle3", num_hidden_layers=1, target_layer_ids=args.layers, ttt_length=7)
    else:
        cfg = DrafterConfig(algorithm=algorithm, num_hidden_layers=args.draft_layers, target_layer_ids=args.layers,
                            block_size=args.block, num_anchors=args.anchors, mask_token_id=target.vocab_size - 1,
                            markov_rank=256 if algorithm == "dspark" else 0,
                            enable_confidence_head=algorithm == "dspark",
                            confidence_head_with_markov=algorithm == "dspark")
    cfg = cfg.resolve(target)
    return registry.build(cfg).to(args.device, torch.bfloat16), cfg


def bench(algorithm: str, target: SimpleNamespace, args: argparse.Namespace, compile_: str = "no",
          fused: bool = False, attn: str = "auto", profile: int = 0) -> dict:
    device = torch.device(args.device)
    model, cfg = build(algorithm, target, args)
    backbone = model.backbone if algorithm == "dspark" else model
    backbone.attn_implementation = attn  # Eagle3: flex takes the sparse training-time-test mask
    if compile_ == "layers":
        for layer in model.layers:
            layer.compile(mode=args.compile_mode)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=6e-4, fused=device.type == "cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    L, H, m = args.seq, cfg.hidden_size, len(cfg.target_layer_ids)
    ids = torch.randint(0, cfg.vocab_size - 1, (1, L), generator=g).to(device)
    loss_mask = torch.ones(1, L, dtype=torch.bool, device=device)
    loss_mask[:, : L // 8] = False
    hidden = torch.randn(1, L, m * H, generator=g).to(device, torch.bfloat16)
    last = torch.randn(1, L, H, generator=g).to(device, torch.bfloat16)

    weights = LossWeights(ce=0.1 if algorithm == "dspark" else 1.0, l1=0.9 if algorithm == "dspark" else 0.0,
                          fused=fused)

    def step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = drafter_loss(model, model.training_forward(batch, hidden), last, weights).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    compiled = torch.compile(step, dynamic=True, mode=args.compile_mode) if compile_ == "step" else step
    anchors = model.training_anchors(cfg)

    def fn() -> torch.Tensor:  # anchors are drawn per step outside the compiled region, as the data loader does
        batch = {"input_ids": ids, "loss_mask": loss_mask}
        if anchors:
            batch["anchors"], batch["anchor_valid"] = sample_anchors(loss_mask, anchors)
        return compiled(batch)

    for _ in range(args.warmup):
        fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if profile:
        print_profile(fn, profile, sync, device, f"{algorithm} compile={compile_} fused={fused} attn={attn}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.iters):
        fn()
    sync()
    ms = (time.perf_counter() - t0) / args.iters * 1e3
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    flops = step_flops(cfg, L, cfg.num_anchors) if algorithm != "eagle3" else float("nan")
    return {"algorithm": algorithm, "compiled": compile_, "fused": fused, "attn": attn, "ms": ms, "peak_gib": peak,
            "tflops": flops / ms / 1e9, "step_tflop": flops / 1e12}


def print_profile(fn, steps: int, sync, device: torch.device, label: str, top: int = 15) -> None:
    """Run ``steps`` steps under the profiler; print the ops with the most device (or CPU) time per step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        sync()
    events = prof.key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    if device.type == "cuda":  # kernels only: an op's self device time repeats its kernels' time
        from torch.autograd import DeviceType

        events = [e for e in events if e.device_type == DeviceType.CUDA]
    total = sum(getattr(e, key) for e in events) / steps / 1e3
    print(f"-- profile: {label}: {total:.1f} ms of {'device' if device.type == 'cuda' else 'CPU'} time per step")
    for e in sorted(events, key=lambda e: getattr(e, key), reverse=True)[:top]:
        ms = getattr(e, key) / steps / 1e3
        print(f"   {ms:8.2f} ms {ms / total:6.1%} x{e.count // steps:<5d} {e.key[:90]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="a small geometry for a quick sanity run")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--anchors", type=int, default=512)
    parser.add_argument("--block", type=int, default=7)
    parser.add_argument("--draft-layers", type=int, default=5)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 9, 17, 25, 33])
    parser.add_argument("--algorithms", nargs="+", default=["dspark", "dflash", "eagle3"])
    parser.add_argument("--compile", nargs="+", choices=["no", "layers", "step"], default=["no"],
                        help="eager, each decoder layer compiled, or the whole step compiled (dynamic=True)")
    parser.add_argument("--compile-mode", default=None,
                        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                        help="torch.compile's mode for --compile layers|step (default: torch's own)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="profile STEPS steps of every configuration and print its top ops")
    parser.add_argument("--fused", action="store_true",
                        help="DSpark/DFlash: also time block_drafter_loss(fused=True) beside the default loss")
    parser.add_argument("--fused-only", action="store_true", help="DSpark/DFlash: time only the fused loss")
    parser.add_argument("--attn", nargs="+", default=["auto"], choices=["auto", "sdpa", "flex"],
                        help="DSpark/DFlash training attention (auto = flex on CUDA); several are timed side by side")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 rate for MFU (H200 measured)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    target = small() if args.small else qwen3_4b()
    if args.small:
        args.seq, args.anchors, args.layers = min(args.seq, 512), min(args.anchors, 64), [1, 3, 5]
    print(f"device={args.device} hidden={target.hidden_size} vocab={target.vocab_size} seq={args.seq} "
          f"anchors={args.anchors} block={args.block} draft_layers={args.draft_layers} "
          f"compile_mode={args.compile_mode or 'torch default'}")
    print(f"{'drafter':8} {'compile':7} {'fused':5} {'attn':5} {'ms/step':>9} {'peak GiB':>9} {'TFLOP':>7} "
          f"{'TFLOP/s':>8} {'MFU':>6} {'ref ms':>8} {'speed-up':>8}")
    for algorithm in args.algorithms:
        fused_modes = [False, True] if args.fused else [True] if args.fused_only else [False]
        fused_modes = [False] if algorithm == "eagle3" else fused_modes
        for compile_, fused, attn in ((c, f, a) for c in args.compile for f in fused_modes for a in args.attn):
            try:
                r = bench(algorithm, target, args, compile_, fused, attn, args.profile)
            except Exception as exc:  # one configuration failing (e.g. a compile error) must not hide the others
                print(f"{algorithm:8} {compile_:7} {str(fused):5} {attn:5} failed: {type(exc).__name__}: "
                      f"{str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}", flush=True)
                if args.device == "cuda":
                    torch.cuda.empty_cache()
                continue
            ref = REFERENCE_MS.get(algorithm)
            ref_ms = (ref[1] if compile_ != "no" else ref[0]) if ref and not args.small else float("nan")
            print(f"{algorithm:8} {compile_:7} {str(fused):5} {attn:5} {r['ms']:9.1f} {r['peak_gib']:9.2f} "
                  f"{r['step_tflop']:7.1f} {r['tflops']:8.1f} {r['tflops'] / args.peak_tflops:6.1%} {ref_ms:8.1f} "
                  f"{ref_ms / r['ms']:8.2f}x",
                  flush=True)
            if args.device == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
