"""The DSpark Markov head's sampling loop: the torch reference loop vs the fused Triton kernel, side by side.

For each batch size, vocabulary and temperature both implementations draft K tokens from the same bf16 base
logits, weights and Gumbel noise (drawn once, outside the timing); the table gives the median milliseconds of each,
their ratio, and whether the tokens agree.

    python benchmarks/markov_sampling.py                         # CUDA: B 1, 32; V 49,152, 151,936; r 256; K 7
    python benchmarks/markov_sampling.py --small --device cpu    # tiny shapes; Triton runs in its interpreter
    python benchmarks/markov_sampling.py --block-v 64 128 256    # sweep the Triton tile height over V

The Triton path is K + 1 launches (one per draft position on a (B, cdiv(V, block_v)) grid, and one for the last
token), so at small shapes its time is launch overhead; the host-side launch cost is included in the timing.

On CPU the Triton kernel runs under ``TRITON_INTERPRET=1`` (set here before triton is imported), so its time there
says nothing about a GPU; the CPU run only checks that both paths run and agree.
"""

from __future__ import annotations

import argparse
import functools
import os

import torch
from timing import median_seconds


def median_ms(fn, device: torch.device, iters: int) -> float:
    return 1e3 * median_seconds({"call": fn}, device, iters)["call"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="B 1, 4; V 1,000, 3,000; r 32 (a quick CPU run)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--gamma", type=int, default=7, help="draft positions K")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--block-v", type=int, nargs="+", default=[None],
                        help="Triton tile heights over V to time (powers of two; default: the kernel's own, 128)")
    parser.add_argument("--num-warps", type=int, default=4)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first triton import (inside markov_sample)
    from dspark_lightning.kernels import gumbel_noise, markov_sample, markov_sample_reference

    batch_sizes = args.batch_sizes or ([1, 4] if args.small else [1, 32])
    vocab_sizes = args.vocab_sizes or ([1000, 3000] if args.small else [49152, 151936])
    rank = args.rank or (32 if args.small else 256)
    iters = args.iters or (3 if device.type == "cpu" else 20)
    print(f"device {device}, K = {args.gamma}, r = {rank}, bf16 logits and weights, median of {iters} calls")
    print(f"{'B':>4} {'V':>7} {'T':>4} {'block_v':>7} {'torch ms':>10} {'triton ms':>10} {'torch/triton':>13}  tokens")
    g = torch.Generator().manual_seed(0)
    for v in vocab_sizes:
        w1 = torch.randn(v, rank, generator=g).to(device, torch.bfloat16)
        w2 = (3 * rank ** -0.5 * torch.randn(v, rank, generator=g)).to(device, torch.bfloat16)
        for b in batch_sizes:
            base = (3 * torch.randn(b, args.gamma, v, generator=g)).to(device, torch.bfloat16)
            prev0 = torch.randint(0, v, (b,), generator=g).to(device)
            noise = gumbel_noise(base.shape, g).to(device)
            for temperature in args.temperatures:
                call = (base, prev0, w1, w2, temperature, noise)
                t_ref = median_ms(functools.partial(markov_sample_reference, *call), device, iters)
                want = markov_sample_reference(*call)[0]
                for block_v in args.block_v:
                    tri = functools.partial(markov_sample, *call, backend="triton", block_v=block_v,
                                            num_warps=args.num_warps)
                    t_tri = median_ms(tri, device, iters)
                    same = torch.equal(want, tri()[0])
                    print(f"{b:>4} {v:>7} {temperature:>4g} {block_v or 'auto':>7} {t_ref:>10.3f} {t_tri:>10.3f} "
                          f"{t_ref / t_tri:>13.3g}  {'equal' if same else 'DIFFER'}")


if __name__ == "__main__":
    main()
