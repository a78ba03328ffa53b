"""Train-loss curves of several fits in one PNG, from the ``summary.json`` each fit writes (one loss per step).

    python recipes/plot_losses.py --out losses.png --title "resume 4 -> 1 GPU" \
        "4 GPUs, part 1=/tmp/mg/resume_4gpu_part1/lightning_logs/version_0/summary.json" \
        "1 GPU, resumed=/tmp/mg/resume_1gpu_part2/lightning_logs/version_0/summary.json@21"

Each curve is ``LABEL=SUMMARY[@FIRST_STEP]``; ``FIRST_STEP`` (default 1) is the global step of the summary's first
loss, for a run resumed from a checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from matplotlib.figure import Figure


def parse_curve(spec: str) -> tuple[str, Path, int]:
    label, sep, rest = spec.partition("=")
    if not sep or not rest:
        raise SystemExit(f"curve {spec!r}: expected LABEL=path/to/summary.json[@FIRST_STEP]")
    path, _, first = rest.rpartition("@") if "@" in rest else (rest, "", "1")
    return label, Path(path), int(first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("curves", nargs="+", help="LABEL=SUMMARY[@FIRST_STEP]")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--title", default="train loss per step")
    args = parser.parse_args()
    fig = Figure(figsize=(7, 4), dpi=120)
    ax = fig.subplots()
    for label, path, first in map(parse_curve, args.curves):
        losses = json.loads(path.read_text())["train_losses"]
        ax.plot(range(first, first + len(losses)), losses, marker=".", label=label)
    ax.set(xlabel="global step", ylabel="train loss", title=args.title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
