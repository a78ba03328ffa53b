"""Validation report: ``report.json``, a markdown table, ``rounds.jsonl`` and PNG plots.

``report.json`` (read by model cards)::

    {"temperature": T, "drafter": "dspark", "suites": {name: {"tau", "accept_rate": [...],
     "conditional_accept": [...], "num_rounds", "num_samples", "tokens_per_second", ...}}, "macro_tau": float}

Plots (matplotlib's object API, no pyplot state, so it is safe in any process):

* ``acceptance.png``: position-wise conditional acceptance and prefix survival per suite (one report) or the
  macro average per drafter (several reports, :func:`plot_acceptance`);
* ``reliability.png`` (drafters with a confidence head): reliability diagram of the survival probability per
  position, before and after Sequential Temperature Scaling (fitted on half of the rounds, drawn on the
  other half);
* ``threshold_sweep.png``: the static threshold policy replayed on the recorded full-length rounds for
  thresholds 0..0.95: accepted tokens per step, verified tokens per step and acceptance rate.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor

from ..decoding.calibration import (
    calibration_metrics,
    fit_sts,
    rounds_to_tensors,
    survival_probs,
    survival_targets,
)

PER_SUITE_KEYS = ("tau", "tokens_per_second", "verify_rate", "mean_proposal", "draft_ms", "verify_ms")


def _num(x: Tensor | float) -> float | None:
    v = float(x)
    return None if math.isnan(v) else v


def _json_safe(obj: Any) -> Any:
    """NaN/inf become null, tensors become lists, so the JSON stays strict."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, Tensor):
        return _json_safe(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def build_report(metrics: dict[str, Tensor], suite_names: Sequence[str], *, temperature: float, drafter: str,
                 **extra: Any) -> dict[str, Any]:
    """Assemble the report dict from :class:`~dspark_lightning.eval.metrics.DecodingMetrics` output.

    Suites without a round are left out; ``macro_tau`` is the unweighted mean of the suites' tau.
    """
    n = len(suite_names)
    # torchmetrics squeezes one-element results: restore [S] and [S, gamma].
    metrics = {k: v.reshape(n, -1) if k in ("accept_rate", "conditional_accept") else v.reshape(n)
               for k, v in metrics.items()}
    suites: dict[str, Any] = {}
    for i, name in enumerate(suite_names):
        if float(metrics["num_rounds"][i]) == 0:
            continue
        row: dict[str, Any] = {
            "tau": _num(metrics["tau"][i]),
            "accept_rate": [_num(v) for v in metrics["accept_rate"][i]],
            "conditional_accept": [_num(v) for v in metrics["conditional_accept"][i]],
            "num_rounds": int(metrics["num_rounds"][i]),
            "num_samples": int(metrics["num_samples"][i]),
            "tokens_per_second": _num(metrics["tokens_per_second"][i]),
        }
        for key in PER_SUITE_KEYS[2:]:
            row[key] = _num(metrics[key][i])
        suites[name] = row
    taus = [s["tau"] for s in suites.values() if s["tau"] is not None]
    return {"temperature": float(temperature), "drafter": drafter, "suites": suites,
            "macro_tau": sum(taus) / len(taus) if taus else None, **extra}


def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def markdown_table(report: dict[str, Any]) -> str:
    """Suites x metrics (tau, conditional acceptance per position, rounds, samples, tokens/s) + macro average."""
    suites = report["suites"]
    gamma = max((len(s["conditional_accept"]) for s in suites.values()), default=0)
    head = ["suite", "samples", "rounds", "tau"] + [f"acc@{i + 1}" for i in range(gamma)] + ["tok/s"]
    lines = [
        f"Speculative decoding, drafter {report['drafter']}, T = {report['temperature']:g}"
        + (f", policy {report['policy']}" if "policy" in report else ""),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    for name, s in suites.items():
        acc = [_fmt(v) for v in s["conditional_accept"]] + ["-"] * (gamma - len(s["conditional_accept"]))
        lines.append("| " + " | ".join([name, str(s["num_samples"]), str(s["num_rounds"]), _fmt(s["tau"])] + acc
                                       + [_fmt(s["tokens_per_second"], 1)]) + " |")
    if suites:
        macro_acc = []
        for i in range(gamma):
            vals = [s["conditional_accept"][i] for s in suites.values()
                    if i < len(s["conditional_accept"]) and s["conditional_accept"][i] is not None]
            macro_acc.append(_fmt(sum(vals) / len(vals)) if vals else "-")
        tps = [s["tokens_per_second"] for s in suites.values() if s["tokens_per_second"] is not None]
        lines.append("| " + " | ".join(["**macro avg**", str(sum(s["num_samples"] for s in suites.values())),
                                        str(sum(s["num_rounds"] for s in suites.values())),
                                        f"**{_fmt(report['macro_tau'])}**"] + macro_acc
                                       + [_fmt(sum(tps) / len(tps) if tps else None, 1)]) + " |")
    lines += ["", "tau: tokens per verify round, bonus included; acc@i: P(draft i accepted | drafts < i accepted)."]
    return "\n".join(lines)


# ---------------------------------------------------------------------- plots
def _positions(values: Sequence[float | None]) -> tuple[list[int], list[float]]:
    pairs = [(i + 1, v) for i, v in enumerate(values) if v is not None]
    return [p for p, _ in pairs], [v for _, v in pairs]


def plot_acceptance(reports: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Position-wise acceptance: per suite for one report, macro average per drafter for several."""
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    series: list[tuple[str, list, list]] = []
    if len(reports) == 1:
        for name, s in reports[0]["suites"].items():
            series.append((name, s["conditional_accept"], s["accept_rate"]))
    for report in reports if len(reports) > 1 or len(series) > 1 else []:
        suites = list(report["suites"].values())
        gamma = max((len(s["conditional_accept"]) for s in suites), default=0)

        def macro(key: str, suites: list = suites, gamma: int = gamma) -> list[float | None]:
            out = []
            for i in range(gamma):
                vals = [s[key][i] for s in suites if i < len(s[key]) and s[key][i] is not None]
                out.append(sum(vals) / len(vals) if vals else None)
            return out

        label = report.get("label") or report["drafter"]
        series.append((f"{label} (macro)" if len(reports) == 1 else label, macro("conditional_accept"),
                       macro("accept_rate")))
    for i, (name, cond, surv) in enumerate(series):
        macro_line = len(reports) == 1 and len(series) > 1 and i == len(series) - 1
        style = {"linestyle": "--", "color": "black", "linewidth": 2} if macro_line else {}
        left.plot(*_positions(cond), marker="o", label=name, **style)
        right.plot(*_positions(surv), marker="o", label=name, **style)
    title = f"T = {reports[0]['temperature']:g}" if reports else ""
    left.set(title=f"Conditional acceptance per position ({title})", xlabel="draft position i",
             ylabel="P(accept i | accepted < i)", ylim=(0, 1.02))
    right.set(title="Prefix survival (accept_rate@i)", xlabel="draft position i", ylabel="P(accepted >= i)",
              ylim=(0, 1.02))
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    right.legend(fontsize=8, loc="upper right")
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def _split(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    half = n // 2
    return torch.tensor(order[:half], dtype=torch.long), torch.tensor(order[half:], dtype=torch.long)


def plot_reliability(logits: Tensor, accepted: Tensor, proposal: Tensor, path: str | Path,
                     num_bins: int = 20) -> tuple[Path, dict[str, Any]]:
    """Reliability diagram of the survival probability per position, before and after STS.

    STS is fitted on a random half of the rounds and both curves are drawn on the other half (on all rounds
    when there are fewer than 40). Returns the path and ``{"temperatures", "before", "after"}`` metrics.
    """
    n, gamma = logits.shape
    if n >= 40:
        fit_idx, eval_idx = _split(n)
    else:
        fit_idx = eval_idx = torch.arange(n)
    temps = fit_sts(logits[fit_idx], accepted[fit_idx], proposal[fit_idx], num_bins)
    lg, ac, pr = logits[eval_idx], accepted[eval_idx], proposal[eval_idx]
    before = calibration_metrics(lg, ac, pr, None, num_bins)
    after = calibration_metrics(lg, ac, pr, temps, num_bins)
    labels, valid = survival_targets(ac, pr, gamma)
    cols = min(gamma, 4)
    rows = math.ceil(gamma / cols)
    fig = Figure(figsize=(3.2 * cols, 3.2 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for k in range(gamma):
        ax = axes[k]
        ax.plot([0, 1], [0, 1], color="grey", linewidth=1)
        for temps_k, name, color, stats in ((None, "raw", "tab:red", before), (temps, "STS", "tab:blue", after)):
            probs = survival_probs(lg, temps_k)[:, k][valid[:, k]]
            ys = labels[:, k][valid[:, k]].double()
            if probs.numel() == 0:
                continue
            bins = (probs * num_bins).long().clamp(0, num_bins - 1)
            count = torch.bincount(bins, minlength=num_bins).double()
            mean_p = torch.bincount(bins, probs, minlength=num_bins) / count.clamp(min=1)
            mean_y = torch.bincount(bins, ys, minlength=num_bins) / count.clamp(min=1)
            keep = count > 0
            ece = stats["positions"][k]["ece"]
            ax.plot(mean_p[keep].tolist(), mean_y[keep].tolist(), marker="o", markersize=3, color=color,
                    label=f"{name} ECE {100 * ece:.1f}%")
        auc = before["positions"][k]["auroc"]
        ax.set_title(f"position {k + 1} (T={float(temps[k]):.2f}, AUC {auc:.2f})" if not math.isnan(auc)
                     else f"position {k + 1} (T={float(temps[k]):.2f})", fontsize=9)
        ax.set(xlim=(0, 1), ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
        if k % cols == 0:
            ax.set_ylabel("observed survival")
        if k >= gamma - cols:
            ax.set_xlabel("predicted survival")
    for ax in axes[gamma:]:
        ax.set_visible(False)
    fig.suptitle(f"Reliability of prefix survival, before / after STS ({len(eval_idx)} rounds)")
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path, {"temperatures": temps.tolist(), "before": before, "after": after}


def threshold_sweep(logits: Tensor, accepted: Tensor, proposal: Tensor,
                    thresholds: Sequence[float] | None = None) -> dict[str, list[float]]:
    """Replay the static threshold policy on full-length rounds: the verify length becomes the first position
    whose per-step confidence is below the threshold; the acceptance outcome of the kept prefix is unchanged."""
    gamma = logits.shape[1]
    full = proposal == gamma
    thresholds = list(thresholds or [round(0.05 * i, 2) for i in range(20)])
    out: dict[str, list[float]] = {"threshold": thresholds, "accepted_per_step": [], "verified_per_step": [],
                                   "acceptance_rate": []}
    if not full.any():
        return out
    conf, acc = torch.sigmoid(logits[full].double()), accepted[full]
    for t in thresholds:
        length = (conf >= t).long().cumprod(1).sum(1)
        produced = torch.minimum(acc, length) + 1
        out["accepted_per_step"].append(float(produced.double().mean()))
        out["verified_per_step"].append(float((length + 1).double().mean()))
        out["acceptance_rate"].append(float(produced.sum() / (length + 1).sum()))
    return out


def plot_threshold_sweep(logits: Tensor, accepted: Tensor, proposal: Tensor, path: str | Path) -> tuple[Path, dict]:
    """Tokens per step and acceptance rate of the static threshold policy (paper Fig. 5)."""
    sweep = threshold_sweep(logits, accepted, proposal)
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.plot(sweep["threshold"][: len(sweep["verified_per_step"])], sweep["verified_per_step"], marker="o",
              label="verified tokens / step")
    left.plot(sweep["threshold"][: len(sweep["accepted_per_step"])], sweep["accepted_per_step"], marker="o",
              label="accepted tokens / step (tau)")
    left.set(title="Tokens per step vs confidence threshold", xlabel="threshold on per-step confidence",
             ylabel="tokens per step")
    left.legend(fontsize=8)
    right.plot(sweep["threshold"][: len(sweep["acceptance_rate"])], [100 * v for v in sweep["acceptance_rate"]],
               marker="o", color="tab:green")
    right.set(title="Acceptance rate vs confidence threshold", xlabel="threshold on per-step confidence",
              ylabel="accepted / verified tokens (%)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path, sweep


# ---------------------------------------------------------------------- files
def write_report(log_dir: str | Path, report: dict[str, Any], rounds: list[dict[str, Any]], *,
                 plots: bool = True) -> dict[str, Path]:
    """Write ``report.json``, ``report.md``, ``rounds.jsonl`` and the PNG plots into ``log_dir``.

    Returns the written paths by name. Calibration results (STS temperatures, ECE before/after) go into
    ``report.json`` under ``"calibration"`` when the drafter has a confidence head.
    """
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    with (log_dir / "rounds.jsonl").open("w") as f:
        for row in rounds:
            f.write(json.dumps(row) + "\n")
    paths["rounds"] = log_dir / "rounds.jsonl"
    if plots:
        paths["acceptance"] = plot_acceptance([report], log_dir / "acceptance.png")
        with_conf = [r for r in rounds if r.get("confidence_logits")]
        if with_conf:
            logits, accepted, proposal = rounds_to_tensors(with_conf)
            paths["reliability"], calib = plot_reliability(logits, accepted, proposal, log_dir / "reliability.png")
            paths["threshold_sweep"], sweep = plot_threshold_sweep(logits, accepted, proposal,
                                                                   log_dir / "threshold_sweep.png")
            report = {**report, "calibration": {
                "sts_temperatures": calib["temperatures"],
                "ece_before": calib["before"]["ece_mean"], "ece_after": calib["after"]["ece_mean"],
                "auroc": calib["before"]["auroc_mean"], "brier_before": calib["before"]["brier_mean"],
                "brier_after": calib["after"]["brier_mean"]}, "threshold_sweep": sweep}
    report = _json_safe(report)
    (log_dir / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    (log_dir / "report.md").write_text(markdown_table(report) + "\n")
    paths["report"], paths["markdown"] = log_dir / "report.json", log_dir / "report.md"
    return paths
