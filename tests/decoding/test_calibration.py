"""Calibration metrics, Sequential Temperature Scaling and the ``calibrate`` command."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dspark_lightning.decoding.calibration import (
    auroc,
    brier_score,
    calibrate,
    calibration_metrics,
    expected_calibration_error,
    fit_sts,
    load_rounds,
)


def test_ece_auroc_brier_on_known_values():
    probs = torch.tensor([0.1, 0.1, 0.9, 0.9])
    labels = torch.tensor([0, 1, 1, 1])
    # bin of 0.1: mean p 0.1, mean y 0.5 -> 0.4 * 2/4; bin of 0.9: 0.9 vs 1.0 -> 0.1 * 2/4
    assert expected_calibration_error(probs, labels) == pytest.approx(0.25)
    assert expected_calibration_error(torch.tensor([1.0, 0.0]), torch.tensor([1, 0])) == 0.0  # edges binned
    assert brier_score(probs, labels) == pytest.approx((0.01 + 0.81 + 0.01 + 0.01) / 4)
    # positives score 0.1, 0.9, 0.9 vs the negative's 0.1: pairs won 2, tied 1 -> (2 + 0.5) / 3
    assert auroc(probs, labels) == pytest.approx(2.5 / 3)
    assert math.isnan(auroc(probs, torch.ones(4)))
    g = torch.Generator().manual_seed(0)
    s, y = torch.rand(500, generator=g), torch.rand(500, generator=g) < 0.4
    pairs = (s[y][:, None] > s[~y][None]).double().mean()
    assert auroc(s, y) == pytest.approx(float(pairs))


def synthetic_rounds(n: int, gamma: int, sharpness: float, seed: int) -> tuple[torch.Tensor, ...]:
    """Rounds of an over-confident head: the true per-step acceptance is sigmoid(u), the head says
    sigmoid(sharpness * u); acceptance is sampled left to right until the first rejection."""
    g = torch.Generator().manual_seed(seed)
    true_logit = torch.randn(n, gamma, generator=g) * 1.5 + 1.0
    accept = torch.rand(n, gamma, generator=g) < torch.sigmoid(true_logit)
    accepted = accept.long().cumprod(1).sum(1)
    proposal = torch.full((n,), gamma)
    return sharpness * true_logit, accepted, proposal


def test_sts_lowers_ece_of_an_over_confident_head_on_held_out_rounds():
    fit = synthetic_rounds(4000, 5, sharpness=3.0, seed=0)
    held = synthetic_rounds(4000, 5, sharpness=3.0, seed=1)
    temps = fit_sts(*fit)
    assert temps.shape == (5,)
    assert 2.0 < float(temps[0]) < 4.5  # undoes the 3x sharpening at the first position
    before = calibration_metrics(*held)
    after = calibration_metrics(*held, temperatures=temps)
    assert after["ece_mean"] < 0.5 * before["ece_mean"]
    for b, a in zip(before["positions"], after["positions"]):
        assert a["ece"] < b["ece"] and a["count"] == 4000
    # A calibrated head stays (nearly) where it is.
    calm = fit_sts(*synthetic_rounds(4000, 3, sharpness=1.0, seed=2))
    assert torch.allclose(calm, torch.ones(3, dtype=torch.float64), atol=0.35)


def test_truncated_rounds_only_score_offered_positions():
    logits = torch.zeros(3, 4)
    m = calibration_metrics(logits, torch.tensor([0, 2, 4]), torch.tensor([1, 2, 4]))
    assert [p["count"] for p in m["positions"]] == [3, 2, 1, 1]


def test_calibrate_command_writes_sts_json(tmp_path, capsys):
    logits, accepted, proposal = synthetic_rounds(2000, 4, sharpness=3.0, seed=3)
    rounds = tmp_path / "rounds.jsonl"
    with rounds.open("w") as f:
        for z, a, n in zip(logits.tolist(), accepted.tolist(), proposal.tolist()):
            f.write(json.dumps({"suite": "x", "proposal_length": n, "accepted": a, "confidence_logits": z}) + "\n")
        f.write(json.dumps({"suite": "x", "proposal_length": 4, "accepted": 1, "confidence_logits": None}) + "\n")
    assert len(load_rounds(tmp_path)) == 2001
    out = calibrate(str(rounds), str(tmp_path / "sts.json"), holdout_fraction=0.25)
    written = json.loads((tmp_path / "sts.json").read_text())
    assert list(written) == ["temperatures"] and len(written["temperatures"]) == 4
    assert out["after"]["ece_mean"] < out["before"]["ece_mean"] and out["num_holdout"] == 500
    assert "mean ECE" in capsys.readouterr().out
    (tmp_path / "none.jsonl").write_text(json.dumps({"proposal_length": 4, "accepted": 0}) + "\n")
    with pytest.raises(ValueError, match="confidence head"):
        calibrate(str(tmp_path / "none.jsonl"), str(tmp_path / "x.json"))
