"""The SmolLM2 reproduction's protocol helpers: the train/eval prompt split and the results tables."""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

from dspark_lightning.eval.suites import read_first_turns, suite_path

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
EVAL_SUITES = ("gsm8k", "math500-heldout", "aime25", "humaneval", "mbpp", "mt-bench")


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CharTokenizer:
    """One token per character of ``<user>text``: enough to exercise the length filter."""

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert not tokenize and add_generation_prompt
        return "<user>" + messages[0]["content"]

    def __call__(self, text, add_special_tokens):
        return {"input_ids": list(range(len(text)))}


def test_training_prompts_are_the_train_split_and_never_an_evaluation_prompt():
    prompts = load("smollm2_prompts")
    rows, dropped = prompts.training_prompts(CharTokenizer(), max_prompt_tokens=10**9)
    assert dropped == 0
    by_source = {s: [r for r in rows if r["source"] == s] for s in prompts.TRAIN_SUITES}
    assert len(by_source["math500"]) == 250 and by_source["math500"][-1]["id"] == "math500-250"
    for suite in ("livecodebench", "arena-hard-v2", "swe-bench", "lbpp", "aime24"):
        assert len(by_source[suite]) == len(read_first_turns(suite_path(suite)))
    evaluation = {turn for suite in EVAL_SUITES for turn in read_first_turns(suite_path(suite))}
    assert not {r["turns"][0] for r in rows} & evaluation  # math500-heldout is rows 251-500: disjoint
    assert len({r["id"] for r in rows}) == len(rows)


def test_training_prompts_length_filter_counts_what_it_drops():
    prompts = load("smollm2_prompts")
    everything, _ = prompts.training_prompts(CharTokenizer(), max_prompt_tokens=10**9)
    kept, dropped = prompts.training_prompts(CharTokenizer(), max_prompt_tokens=300)
    assert all(r["prompt_tokens"] <= 300 for r in kept) and kept
    assert len(kept) + dropped == len(everything)
    assert sum(len("<user>" + r["turns"][0]) > 300 for r in everything) == dropped


def write_report(root: Path, seed: int, drafter: str, temperature: str, taus: dict[str, float],
                 conditional: list[float]) -> None:
    folder = root / f"seed{seed}" / drafter / f"eval_T{temperature}"
    folder.mkdir(parents=True)
    suites = {s: {"tau": t, "conditional_accept": conditional} for s, t in taus.items()}
    report = {"macro_tau": statistics.mean(taus.values()), "suites": suites}
    (folder / "report.json").write_text(json.dumps(report))


def test_table_means_spreads_and_ratios(tmp_path, capsys):
    taus = {("dspark", 0): 1.5, ("dspark", 1): 1.3, ("dflash", 0): 1.2, ("dflash", 1): 1.3,
            ("eagle3", 0): 1.25, ("eagle3", 1): 1.25}
    for (drafter, seed), tau in taus.items():
        write_report(tmp_path, seed, drafter, "1.0", {"a": tau - 0.1, "b": tau + 0.1}, [0.3, 0.2])
    write_report(tmp_path, 0, "dspark", "1.0_sts", {"a": 9.0, "b": 9.0}, [0.3, 0.2])  # never in the tables
    table = load("smollm2_table")
    text = table.tables(table.load(tmp_path))
    assert "| **macro** | 1.400 ± 0.100 | 1.250 ± 0.050 | 1.250 ± 0.000 |" in text
    assert "| a | 1.300 ± 0.100 | 1.150 ± 0.050 | 1.150 ± 0.000 |" in text
    # DSpark / DFlash per seed: 1.5 / 1.2 - 1 = +25.0 %, 1.3 / 1.3 - 1 = +0.0 %; mean +12.5 %
    assert "- DSpark / dflash: +12.5 % (per seed +25.0 %, +0.0 %); paper +16-18 %" in text
    assert "- DSpark / eagle3: +12.0 % (per seed +20.0 %, +4.0 %); paper +27-31 %" in text
    png = tmp_path / "plot.png"
    table.plot(table.load(tmp_path), png, positions=2)
    assert png.stat().st_size > 1000


def test_table_refuses_an_empty_run(tmp_path, monkeypatch):
    table = load("smollm2_table")
    monkeypatch.setattr("sys.argv", ["smollm2_table.py", str(tmp_path)])
    with pytest.raises(SystemExit, match="no reports under"):
        table.main()


def test_length_grouped_keeps_batches_tight_and_their_order_mixed():
    prompts = load("smollm2_prompts")
    rows = [{"id": f"r{i}", "prompt_tokens": (i * 37) % 101} for i in range(100)]
    out = prompts.length_grouped(rows, group=10, seed=0)
    assert sorted(r["id"] for r in out) == sorted(r["id"] for r in rows)
    groups = [out[i:i + 10] for i in range(0, 100, 10)]
    assert all([r["prompt_tokens"] for r in g] == sorted(r["prompt_tokens"] for r in g) for g in groups)
    firsts = [g[0]["prompt_tokens"] for g in groups]
    assert firsts != sorted(firsts)  # the shortest group is not necessarily first any more
    assert out == prompts.length_grouped(rows, group=10, seed=0)  # seeded


def test_plot_skips_positions_no_round_reached(tmp_path):
    """A report writes NaN as null where no round got that far (an untrained drafter): the plot leaves it out."""
    for drafter in ("dspark", "dspark_2layer"):
        write_report(tmp_path, 0, drafter, "0.0", {"a": 1.0, "b": 1.1}, [0.1, None])
    table = load("smollm2_table")
    reports = table.load(tmp_path)
    assert table.conditional_macro(reports[("0.0", "dspark", "seed0")], 2)[0] == pytest.approx(0.1)
    assert "| a | 1.000 | 1.000 |" in table.tables(reports)  # a drafter beyond the three it knew has its column
    table.plot(reports, tmp_path / "plot.png", positions=2)
    assert (tmp_path / "plot.png").stat().st_size > 1000
