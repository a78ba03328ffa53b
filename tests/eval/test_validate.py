"""``validate`` on the smoke config (LightningCLI's own), and ``evaluate`` without Lightning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from dspark_lightning.cli import lightning_main
from dspark_lightning.decoding import Rounds
from dspark_lightning.drafters import DrafterConfig
from dspark_lightning.eval.metrics import DecodingMetrics
from dspark_lightning.eval.report import build_report, markdown_table, write_report
from dspark_lightning.eval.run import evaluate
from dspark_lightning.eval.suites import load_suites, make_batches
from dspark_lightning.eval.validate import DecodingRun
from dspark_lightning.modules.drafter_module import build_drafter
from dspark_lightning.targets import FrozenTarget, TargetConfig, load_target_config

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke"
REPORT_KEYS = {"tau", "accept_rate", "conditional_accept", "num_rounds", "num_samples", "tokens_per_second"}


def test_validate_smoke_config_prints_table_and_writes_report(tmp_path, capsys):
    lightning_main(["validate", "--config", str(SMOKE / "validate_dspark.yaml"), "--trainer.default_root_dir",
                    str(tmp_path), "--trainer.enable_progress_bar", "false"])
    out = capsys.readouterr().out
    assert "| suite | samples | rounds | tau |" in out and "**macro avg**" in out
    reports = list(tmp_path.rglob("report.json"))
    assert len(reports) == 1
    log_dir = reports[0].parent
    for name in ("report.md", "rounds.jsonl", "acceptance.png", "reliability.png", "threshold_sweep.png"):
        assert (log_dir / name).is_file() and (log_dir / name).stat().st_size > 0, name
    report = json.loads(reports[0].read_text())
    assert report["temperature"] == 1.0 and report["drafter"] == "dspark"
    suite = report["suites"]["random"]
    assert REPORT_KEYS <= set(suite) and suite["num_samples"] == 8
    assert suite["tau"] >= 1.0 and report["macro_tau"] == suite["tau"]
    assert len(suite["accept_rate"]) == len(suite["conditional_accept"]) == 4
    rounds = [json.loads(line) for line in (log_dir / "rounds.jsonl").read_text().splitlines()]
    assert len(rounds) == suite["num_rounds"] and len(rounds[0]["confidence_logits"]) == 4
    assert sum(r["num_tokens"] for r in rounds) / len(rounds) == pytest.approx(suite["tau"])


@pytest.mark.parametrize("algorithm", ["dflash", "eagle3"])
def test_validate_configs_parse_and_link_the_target(algorithm):
    cfg = yaml.safe_load((SMOKE / f"validate_{algorithm}.yaml").read_text())
    assert cfg["model"]["drafter"]["algorithm"] == algorithm
    assert cfg["model"]["decoding"]["class_path"] == "dspark_lightning.eval.validate.SpeculativeValidation"
    cli = lightning_main(["--config", str(SMOKE / f"validate_{algorithm}.yaml")], run=False)
    assert cli.datamodule.target == cli.model.target_config
    assert cli.datamodule.suite_names == ["random"]


def test_evaluate_without_lightning_greedy(tmp_path):
    target_cfg = TargetConfig(tiny={"model_type": "qwen3", "vocab_size": 64, "hidden_size": 32,
                                    "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                    "num_key_value_heads": 2, "head_dim": 8, "initializer_range": 0.2})
    cfg = DrafterConfig(algorithm="dspark", num_hidden_layers=1, target_layer_ids=[0, 1], block_size=3,
                        mask_token_id=63, markov_rank=8).resolve(load_target_config(target_cfg))
    drafter = build_drafter(cfg).eval()
    target = FrozenTarget.from_config(target_cfg, cfg.target_layer_ids)
    report = evaluate(drafter, target, ["random"], temperature=0.0, max_new_tokens=12, max_samples=3,
                      batch_size=2, output_dir=tmp_path, plots=False, verbose=False)
    assert report["temperature"] == 0.0 and report["suites"]["random"]["num_samples"] == 3
    assert (tmp_path / "report.json").is_file() and not (tmp_path / "acceptance.png").exists()
    alone = evaluate(None, target, ["random"], temperature=0.0, max_new_tokens=12, max_samples=3, verbose=False)
    assert alone["drafter"] == "target" and alone["suites"]["random"]["tau"] == 1.0


def test_decoding_run_passes_engine_keywords_and_timed_phases_decode_the_same():
    target_cfg = TargetConfig(tiny={"model_type": "qwen3", "vocab_size": 64, "hidden_size": 32,
                                    "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                    "num_key_value_heads": 2, "head_dim": 8, "initializer_range": 0.2})
    cfg = DrafterConfig(algorithm="dspark", num_hidden_layers=1, target_layer_ids=[0, 1], block_size=3,
                        mask_token_id=63, markov_rank=8).resolve(load_target_config(target_cfg))
    torch.manual_seed(0)
    drafter = build_drafter(cfg).eval()
    target = FrozenTarget.from_config(target_cfg, cfg.target_layer_ids)
    suites = load_suites(target_cfg, ["random"], max_samples=3, hf_config=target.config)
    batch = make_batches(suites, batch_size=3, max_new_tokens=10)[0]
    default = DecodingRun(target, drafter, ["random"], temperature=0.0)
    timed = DecodingRun(target, drafter, ["random"], temperature=0.0, time_phases=True)
    assert not default.engine.time_phases and timed.engine.time_phases
    a, b = default.run_batch(batch), timed.run_batch(batch)
    assert a.tokens == b.tokens and torch.equal(a.rounds.accepted, b.rounds.accepted)


def test_metrics_survival_vs_conditional_and_report_table():
    metric = DecodingMetrics(num_suites=2, gamma=3)
    # four rounds of suite 0: accepted 3, 1, 0, 2 of 3 offered; one round of suite 1 with only 1 offered
    rounds = Rounds(request=torch.zeros(4, dtype=torch.long), step=torch.arange(4),
                    proposal_length=torch.tensor([3, 3, 3, 3]), accepted=torch.tensor([3, 1, 0, 2]),
                    num_tokens=torch.tensor([4, 2, 1, 3]), confidence_logits=torch.zeros(4, 3),
                    draft_seconds=torch.full((4,), 0.01, dtype=torch.float64),
                    verify_seconds=torch.full((4,), 0.03, dtype=torch.float64))
    metric.update(0, rounds, kept_tokens=10, samples=1)
    short = Rounds(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), torch.tensor([1]),
                   torch.tensor([1]), torch.tensor([2]), torch.zeros(1, 3), torch.tensor([0.01], dtype=torch.float64),
                   torch.tensor([0.01], dtype=torch.float64))
    metric.update(1, short, kept_tokens=2, samples=1)
    m = metric.compute()
    assert m["tau"].tolist() == [2.5, 2.0]
    assert torch.allclose(m["accept_rate"][0], torch.tensor([3 / 4, 2 / 4, 1 / 4], dtype=torch.float64))
    assert torch.allclose(m["conditional_accept"][0], torch.tensor([3 / 4, 2 / 3, 1 / 2], dtype=torch.float64))
    assert m["conditional_accept"][1, 0] == 1.0 and torch.isnan(m["conditional_accept"][1, 1])
    assert m["tokens_per_second"][0] == pytest.approx(10 / 0.16)
    report = build_report(m, ["a", "b"], temperature=1.0, drafter="dspark")
    assert report["macro_tau"] == 2.25 and report["suites"]["b"]["accept_rate"][1] is None
    table = markdown_table(report)
    assert "| a | 1 | 4 | 2.500 | 0.750 | 0.667 | 0.500 |" in table and "**2.250**" in table


def test_write_report_without_confidences(tmp_path):
    metric = DecodingMetrics(num_suites=1, gamma=2)
    rounds = Rounds(torch.zeros(2, dtype=torch.long), torch.arange(2), torch.tensor([2, 2]), torch.tensor([1, 2]),
                    torch.tensor([2, 3]), torch.full((2, 2), float("nan")),
                    torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    metric.update(0, rounds, kept_tokens=5, samples=1)
    report = build_report(metric.compute(), ["s"], temperature=0.0, drafter="dflash")
    paths = write_report(tmp_path, report, rounds.to_dicts(suite="s"))
    assert set(paths) == {"rounds", "acceptance", "report", "markdown"}  # no confidences: no calibration plots
    assert json.loads((tmp_path / "report.json").read_text())["suites"]["s"]["tau"] == 2.5
