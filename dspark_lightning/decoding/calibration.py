"""Confidence calibration: metrics (ECE, AUROC, Brier) and Sequential Temperature Scaling (STS).

What is calibrated (DSpark paper §3.2.1): the confidence head predicts per-step acceptance ``c_k``; the
scheduler consumes the prefix survival ``S_k = prod_{i<=k} c_i``, whose label in a verified round is
``1[drafts 1..k were all accepted]``. Metrics are therefore computed on ``S_k`` per position ``k`` over the
rounds in which position ``k`` was offered for verification.

STS fits one temperature per position, left to right: ``T_k`` minimises the ECE of
``S_k = S_{k-1} * sigmoid(z_k / T_k)`` with ``T_1..T_{k-1}`` already fixed, by a 1-D search (a log-spaced grid,
then a finer grid around the best point). The result is written as ``{"temperatures": [T_1, ..., T_gamma]}``,
the shape SGLang's ``--speculative-dspark-confidence-sts-path`` reads and ``SpeculativeEngine`` applies.

``calibrate`` reads the rounds that ``validate`` / ``evaluate`` record (``rounds.jsonl``: one JSON object per
request per round with ``proposal_length``, ``accepted`` and ``confidence_logits``).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

NUM_BINS = 20


# ---------------------------------------------------------------------- metrics
def expected_calibration_error(probs: Tensor, labels: Tensor, num_bins: int = NUM_BINS) -> float:
    """ECE with ``num_bins`` equal-width bins on [0, 1]: ``sum_b (n_b / N) |mean(p)_b - mean(y)_b|``."""
    probs, labels = probs.double().flatten(), labels.double().flatten()
    if probs.numel() == 0:
        return math.nan
    return float(_ece_grid(probs[None], labels, num_bins)[0])


def _ece_grid(probs: Tensor, labels: Tensor, num_bins: int) -> Tensor:
    """ECE of each row of ``probs`` [G, N] against ``labels`` [N]; returns [G]."""
    g, n = probs.shape
    bins = (probs * num_bins).long().clamp(0, num_bins - 1)
    gaps = torch.zeros(g, num_bins, dtype=probs.dtype, device=probs.device)
    gaps.scatter_add_(1, bins, probs - labels[None])  # per-bin sum of (p - y)
    return gaps.abs().sum(1) / n


def auroc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied scores counted 1/2); NaN with one class only."""
    scores, labels = scores.double().flatten(), labels.bool().flatten()
    n_pos = int(labels.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mid_rank = ends - (counts.double() - 1) / 2  # average 1-based rank of each distinct score
    rank_sum = mid_rank[inverse][labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def brier_score(probs: Tensor, labels: Tensor) -> float:
    """Mean squared error between probabilities and 0/1 labels."""
    if probs.numel() == 0:
        return math.nan
    return float(((probs.double() - labels.double()) ** 2).mean())


# ---------------------------------------------------------------------- rounds -> survival
def survival_targets(accepted: Tensor, proposal_length: Tensor, gamma: int) -> tuple[Tensor, Tensor]:
    """Labels ``1[accepted >= k]`` and validity ``k <= proposal_length`` for positions k = 1..gamma ([N, gamma])."""
    k = torch.arange(1, gamma + 1)
    labels = accepted[:, None] >= k[None]
    valid = proposal_length[:, None] >= k[None]
    return labels, valid


def survival_probs(logits: Tensor, temperatures: Tensor | None = None) -> Tensor:
    """``S_k = prod_{i<=k} sigmoid(z_i / T_i)`` for logits [N, gamma] (T = 1 when not given)."""
    z = logits.double()
    if temperatures is not None:
        z = z / temperatures.double()[None, : z.shape[1]]
    return torch.sigmoid(z).cumprod(1)


def _best_temperature(candidates: Tensor, prev: Tensor, z: Tensor, labels: Tensor, num_bins: int) -> Tensor:
    """The candidate T minimising ECE of ``prev * sigmoid(z / T)``; among ties the mildest (closest to 1)."""
    preds = prev[None] * torch.sigmoid(z[None] / candidates[:, None])  # [G, n]
    errors = _ece_grid(preds, labels, num_bins)
    tied = candidates[errors <= errors.min() + 1e-12]
    return tied[tied.log().abs().argmin()]


def fit_sts(logits: Tensor, accepted: Tensor, proposal_length: Tensor, num_bins: int = NUM_BINS,
            grid: Tensor | None = None) -> Tensor:
    """Sequential Temperature Scaling: per-position temperatures [gamma] fitted left to right.

    Args:
        logits: [N, gamma] raw confidence logits of N verified rounds.
        accepted, proposal_length: [N] accepted drafts and drafts offered per round.
        num_bins: ECE bins.
        grid: candidate temperatures for the coarse search (default 161 log-spaced values in [0.05, 20]).

    Returns:
        [gamma] float64 temperatures (1.0 where a position was never offered).
    """
    gamma = logits.shape[1]
    labels, valid = survival_targets(accepted, proposal_length, gamma)
    coarse = grid if grid is not None else torch.logspace(math.log10(0.05), math.log10(20.0), 161, dtype=torch.float64)
    temps = torch.ones(gamma, dtype=torch.float64)
    previous = torch.ones(logits.shape[0], dtype=torch.float64)  # calibrated S_{k-1}
    z = logits.double()
    for k in range(gamma):
        rows = valid[:, k]
        if rows.any():
            y, prev, zk = labels[rows, k].double(), previous[rows], z[rows, k]
            t = _best_temperature(coarse, prev, zk, y, num_bins)
            step = float((coarse[1] / coarse[0]).log()) if coarse.numel() > 1 else 0.1
            fine = (t.log() + torch.linspace(-step, step, 41, dtype=torch.float64)).exp()
            temps[k] = _best_temperature(torch.cat([fine, t[None]]), prev, zk, y, num_bins)
        previous = previous * torch.sigmoid(z[:, k] / temps[k])
    return temps


def calibration_metrics(logits: Tensor, accepted: Tensor, proposal_length: Tensor,
                        temperatures: Tensor | None = None, num_bins: int = NUM_BINS) -> dict[str, Any]:
    """Per-position ECE / AUROC / Brier of the survival probabilities, plus count-weighted means.

    Returns:
        ``{"positions": [{"position", "count", "ece", "auroc", "brier", "mean_pred", "mean_label"}, ...],
        "ece_mean", "auroc_mean", "brier_mean"}``.
    """
    gamma = logits.shape[1]
    labels, valid = survival_targets(accepted, proposal_length, gamma)
    probs = survival_probs(logits, temperatures)
    rows = []
    for k in range(gamma):
        m = valid[:, k]
        p, y = probs[m, k], labels[m, k]
        rows.append({"position": k + 1, "count": int(m.sum()), "ece": expected_calibration_error(p, y, num_bins),
                     "auroc": auroc(p, y), "brier": brier_score(p, y),
                     "mean_pred": float(p.mean()) if p.numel() else math.nan,
                     "mean_label": float(y.double().mean()) if y.numel() else math.nan})

    def weighted(key: str) -> float:
        pairs = [(r["count"], r[key]) for r in rows if r["count"] and not math.isnan(r[key])]
        total = sum(c for c, _ in pairs)
        return sum(c * v for c, v in pairs) / total if total else math.nan

    return {"positions": rows, "ece_mean": weighted("ece"), "auroc_mean": weighted("auroc"),
            "brier_mean": weighted("brier")}


# ---------------------------------------------------------------------- files
def load_rounds(path: str | Path) -> list[dict[str, Any]]:
    """Read recorded rounds: a ``.jsonl`` file, a ``.json`` list (or ``{"rounds": [...]}``), or a directory
    (every ``rounds*.jsonl`` in it)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("rounds*.jsonl"))
        if not files:
            raise FileNotFoundError(f"No rounds*.jsonl in {path}; give the log dir of a validate run or a file.")
        return [row for f in files for row in load_rounds(f)]
    if not path.is_file():
        raise FileNotFoundError(f"Rounds file {path} does not exist.")
    text = path.read_text()
    if path.suffix == ".json":
        data = json.loads(text)
        return list(data["rounds"] if isinstance(data, dict) else data)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def rounds_to_tensors(rows: list[dict[str, Any]]) -> tuple[Tensor, Tensor, Tensor]:
    """``(confidence_logits [N, gamma], accepted [N], proposal_length [N])`` from rounds with confidences."""
    rows = [r for r in rows if r.get("confidence_logits")]
    if not rows:
        raise ValueError("No recorded round has confidence_logits: calibration needs a drafter with a confidence "
                         "head (DSpark with enable_confidence_head).")
    gamma = max(len(r["confidence_logits"]) for r in rows)
    logits = torch.full((len(rows), gamma), float("nan"), dtype=torch.float64)
    for i, r in enumerate(rows):
        logits[i, : len(r["confidence_logits"])] = torch.tensor(r["confidence_logits"], dtype=torch.float64)
    accepted = torch.tensor([int(r["accepted"]) for r in rows])
    proposal = torch.tensor([int(r["proposal_length"]) for r in rows])
    # A position without a logit cannot be scored: treat the proposal as ending before it.
    have = (~torch.isnan(logits)).long().cumprod(1).sum(1)
    return logits.nan_to_num(0.0), accepted, torch.minimum(proposal, have)


def calibrate(rounds: str, output: str, holdout_fraction: float = 0.2, num_bins: int = NUM_BINS,
              seed: int = 0) -> dict[str, Any]:
    """Fit Sequential Temperature Scaling on recorded rounds and write ``{"temperatures": [...]}``.

    The rounds are split at random into a fitting part and a held-out part (``holdout_fraction``); the
    temperatures are fitted on the first and ECE/AUROC/Brier before and after are reported on the second.

    Args:
        rounds: ``rounds.jsonl`` written by ``validate`` / ``evaluate`` (or a JSON list, or their log dir).
        output: JSON file to write (``--speculative-dspark-confidence-sts-path`` for SGLang).
        holdout_fraction: share of rounds kept out of the fit to measure calibration (0 = fit on all).
        num_bins: equal-width bins of the ECE.
        seed: seed of the split.

    Returns:
        ``{"temperatures", "before", "after", "num_fit", "num_holdout"}`` (metrics on the held-out rounds).
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction={holdout_fraction} must be in [0, 1).")
    logits, accepted, proposal = rounds_to_tensors(load_rounds(rounds))
    order = list(range(logits.shape[0]))
    random.Random(seed).shuffle(order)
    n_hold = int(round(holdout_fraction * len(order)))
    hold, fit = torch.tensor(order[:n_hold], dtype=torch.long), torch.tensor(order[n_hold:], dtype=torch.long)
    temps = fit_sts(logits[fit], accepted[fit], proposal[fit], num_bins)
    check = hold if n_hold else fit
    before = calibration_metrics(logits[check], accepted[check], proposal[check], None, num_bins)
    after = calibration_metrics(logits[check], accepted[check], proposal[check], temps, num_bins)
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"temperatures": [round(float(t), 6) for t in temps]}, indent=2) + "\n")
    where = "held-out" if n_hold else "fitting (no hold-out)"
    print(f"STS fitted on {len(fit)} rounds; calibration on {len(check)} {where} rounds:")
    print("| position | T | ECE before | ECE after | AUROC | Brier before | Brier after |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for t, b, a in zip(temps.tolist(), before["positions"], after["positions"]):
        print(f"| {b['position']} | {t:.3f} | {b['ece']:.4f} | {a['ece']:.4f} | {b['auroc']:.3f} | "
              f"{b['brier']:.4f} | {a['brier']:.4f} |")
    print(f"mean ECE {before['ece_mean']:.4f} -> {after['ece_mean']:.4f}; temperatures written to {path}")
    return {"temperatures": temps.tolist(), "before": before, "after": after, "num_fit": len(fit),
            "num_holdout": n_hold}
