"""Time one prefix-scheduler decision (paper Algorithm 1): the previous torch code, the sync-free torch path, Triton.

Each timed call includes a device synchronisation on CUDA (the decision is only useful once its lengths exist), and
the median over ``--repeats`` calls is printed in microseconds with its ratio to the baseline. ``baseline`` is a copy
of the implementation before ``kernels/prefix_schedule.py`` (about a dozen small kernels and a host sync from
``order[:keep]``). The Triton row needs CUDA (on CPU the kernel would run in Triton's interpreter). All three are
checked to give the same lengths first.

CPU:   python benchmarks/scheduler.py --device cpu
H200:  python benchmarks/scheduler.py --requests 256 --gamma 7
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from timing import median_seconds

from dspark_lightning.decoding import SpsTable, schedule_prefix
from dspark_lightning.kernels import prefix_schedule, triton_available


def baseline(confidence: torch.Tensor, sps: SpsTable) -> torch.Tensor:
    """``policies.schedule_prefix`` as it was: a sort, a cumulative sum, a host sync for ``keep``, a bincount."""
    r, k = confidence.shape
    device = confidence.device
    if k == 0 or r == 0:
        return torch.zeros(r, dtype=torch.long, device=device)
    survival = confidence.to(torch.float64).clamp(0, 1).cumprod(1)
    flat = survival.t().reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices
    gains = flat[order]
    expected = r + torch.cat([gains.new_zeros(1), gains.cumsum(0)])
    value = expected * sps.arange(r, r + r * k + 1, device)
    keep = (value[1:] >= value[:-1]).long().cumprod(0).sum()
    return torch.bincount(order[:keep] % r, minlength=r)


def median_microseconds(runs: dict[str, Callable[[], torch.Tensor]], device: torch.device, repeats: int,
                        warmup: int) -> dict[str, float]:
    return {name: 1e6 * t for name, t in median_seconds(runs, device, repeats, warmup).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=256, help="R, requests in the verify batch")
    parser.add_argument("--gamma", type=int, default=7, help="K, drafted tokens per request")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--num-warps", type=int, nargs="*", default=[],
                        help="extra Triton rows with these warps per program (default: the kernel's own choice)")
    args = parser.parse_args()

    device = torch.device(args.device)
    r, k = args.requests, args.gamma
    sps = SpsTable([r, 2 * r, 4 * r, 8 * r], [100.0, 97.0, 83.0, 55.0])  # an H200-like shape: flat, then rising cost
    conf = (torch.rand(r, k, generator=torch.Generator().manual_seed(0)) ** 0.3).to(device)
    runs = {"baseline": lambda: baseline(conf, sps), "torch": lambda: schedule_prefix(conf, sps, backend="torch")}
    if device.type == "cuda" and triton_available():
        runs["triton"] = lambda: schedule_prefix(conf, sps, backend="triton")
        values = sps.arange(r, r + r * k + 1, device)
        for w in args.num_warps:
            runs[f"triton/w{w}"] = lambda w=w: prefix_schedule(conf, values, backend="triton", num_warps=w)

    want = baseline(conf, sps)
    for name, fn in runs.items():
        if not torch.equal(fn(), want):
            raise SystemExit(f"{name} disagrees with the baseline: {fn().tolist()} vs {want.tolist()}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"prefix-scheduler decision, R={r} requests x K={k} drafts, {name}; {int(want.sum())} drafts admitted; "
          f"median of {args.repeats}")
    medians = median_microseconds(runs, device, args.repeats, args.warmup)
    for label, us in medians.items():
        print(f"  {label:11s} {us:9.1f} us   x{medians['baseline'] / us:5.2f} vs baseline")
    if "triton" not in runs:
        print("  triton      n/a (needs a CUDA device and triton)")


if __name__ == "__main__":
    main()
