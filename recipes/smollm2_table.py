"""Tables and a comparison plot of the SmolLM2 reproduction from the reports ``recipes/smollm2.sh`` wrote.

Reads ``<run>/seed<S>/<drafter>/eval_T<T>/report.json`` for every seed, drafter and temperature found, prints the
markdown tables of docs/results/smollm2.md (tau per suite and drafter, mean over seeds with the spread, the
macro ratios DSpark/DFlash and DSpark/Eagle3 beside the paper's) and writes ``acceptance_by_drafter.png``
(macro conditional acceptance per draft position, one line per drafter and seed).

    python recipes/smollm2_table.py /tmp/run --png docs/results/smollm2/acceptance_by_drafter.png
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

DRAFTERS = ("dspark", "dflash", "eagle3")
PAPER = {"dflash": "+16-18 %", "eagle3": "+27-31 %"}  # DSpark's tau gain on Qwen3 (paper Table 1)


def load(run: Path) -> dict[tuple[str, str, str], dict]:
    """(temperature, drafter, seed) -> report."""
    reports = {}
    for path in sorted(run.glob("seed*/*/eval_T*/report.json")):
        temperature = path.parent.name.removeprefix("eval_T")
        if temperature.endswith("_sts"):
            continue
        reports[(temperature, path.parent.parent.name, path.parent.parent.parent.name)] = json.loads(path.read_text())
    return reports


def mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {(max(values) - min(values)) / 2:.3f}"


def tables(reports: dict[tuple[str, str, str], dict]) -> str:
    lines = []
    for temperature in sorted({t for t, _, _ in reports}, key=float, reverse=True):
        found = {d for t, d, _ in reports if t == temperature}
        drafters = [d for d in DRAFTERS if d in found] + sorted(found - set(DRAFTERS))  # e.g. dspark_2layer
        seeds = sorted({s for t, _, s in reports if t == temperature})
        suites = list(next(r for k, r in reports.items() if k[0] == temperature)["suites"])
        lines += [f"\n### T = {float(temperature):g} (mean over {', '.join(seeds)}; ± half the spread)\n",
                  "| suite | " + " | ".join(drafters) + " |", "|---|" + "---:|" * len(drafters)]
        macro = {}
        for suite in [*suites, "macro"]:
            cells = []
            for d in drafters:
                vals = [reports[(temperature, d, s)]["macro_tau" if suite == "macro" else "suites"]
                        for s in seeds if (temperature, d, s) in reports]
                vals = [v if suite == "macro" else v[suite]["tau"] for v in vals]
                if suite == "macro":
                    macro[d] = vals
                cells.append(mean_spread(vals))
            name = f"**{suite}**" if suite == "macro" else suite
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if "dspark" in macro:
            lines.append("")
            for other in ("dflash", "eagle3"):
                if other in macro:
                    per_seed = [a / b - 1 for a, b in zip(macro["dspark"], macro[other])]
                    lines.append(f"- DSpark / {other}: {100 * statistics.mean(per_seed):+.1f} % "
                                 f"(per seed {', '.join(f'{100 * x:+.1f} %' for x in per_seed)}); "
                                 f"paper {PAPER[other]}")
    return "\n".join(lines)


def conditional_macro(report: dict, positions: int) -> list[float]:
    out = []
    for k in range(positions):
        vals = [s["conditional_accept"][k] for s in report["suites"].values()  # None/NaN: no round got that far
                if k < len(s["conditional_accept"]) and s["conditional_accept"][k] is not None
                and not math.isnan(s["conditional_accept"][k])]
        out.append(statistics.mean(vals) if vals else math.nan)
    return out


def plot(reports: dict[tuple[str, str, str], dict], path: Path, positions: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temps = sorted({t for t, _, _ in reports}, key=float, reverse=True)
    fig, axes = plt.subplots(1, len(temps), figsize=(5.5 * len(temps), 4), squeeze=False)
    colors = {"dspark": "tab:red", "dflash": "tab:blue", "eagle3": "tab:green"}
    for ax, temperature in zip(axes[0], temps):
        for (t, drafter, seed), report in sorted(reports.items()):
            if t != temperature:
                continue
            ax.plot(range(1, positions + 1), conditional_macro(report, positions), marker="o",
                    color=colors.get(drafter), linestyle="-" if seed == "seed0" else "--", label=f"{drafter} {seed}")
        ax.set(title=f"T = {float(temperature):g}: conditional acceptance (macro over suites)",
               xlabel="draft position k", ylabel="P(accept k | accepted < k)", ylim=(0, 0.5),
               xticks=range(1, positions + 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="the RUN directory of recipes/smollm2.sh")
    parser.add_argument("--png", type=Path, default=None, help="write the comparison plot here")
    args = parser.parse_args()
    reports = load(args.run)
    if not reports:
        raise SystemExit(f"no reports under {args.run}/seed*/*/eval_T*/report.json; run recipes/smollm2.sh first.")
    print(tables(reports))
    if args.png:
        plot(reports, args.png)


if __name__ == "__main__":
    main()
