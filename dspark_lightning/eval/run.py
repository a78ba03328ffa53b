"""``evaluate``: the work of ``validate`` without Lightning, for a drafter and target already in memory.

The ``eval`` command for exported drafter directories loads the drafter and calls this function.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..decoding import SpsTable
from ..targets import FrozenTarget
from .report import markdown_table, write_report
from .suites import load_suites, make_batches
from .validate import DecodingRun


def evaluate(
    drafter: nn.Module | None,
    target: FrozenTarget,
    suites: Sequence[str],
    *,
    temperature: float = 1.0,
    max_new_tokens: int = 2048,
    max_samples: int | dict[str, int] | None = None,
    batch_size: int = 1,
    policy: str = "fixed",
    gamma: int | None = None,
    threshold: float = 0.5,
    sps_table: str | SpsTable | None = None,
    sts_temperatures: Sequence[float] | None = None,
    max_prompt_tokens: int | None = None,
    seed: int = 0,
    tokenizer: Any = None,
    output_dir: str | Path | None = None,
    plots: bool = True,
    verbose: bool = True,
) -> dict[str, Any]:
    """Speculative decoding on benchmark suites; returns the report dict (``report.json``'s content).

    Args:
        drafter: a DSpark / DFlash / Eagle3 drafter with its weights (None measures the target alone).
        target: the frozen target, capturing the drafter's ``target_layer_ids``.
        suites: suite names (``gsm8k``, ``mt-bench``, ..., ``random``) or JSONL paths.
        temperature: sampling temperature (0 = greedy).
        max_new_tokens: generation budget per prompt.
        max_samples: prompts per suite (int, dict per suite, or None for the reference caps).
        batch_size: prompts decoded together.
        policy, gamma, threshold, sps_table, sts_temperatures: verify policy and engine settings.
        max_prompt_tokens: skip longer prompts.
        seed: sampling seed.
        tokenizer: the target's tokenizer (default: loaded from ``target.target_config``).
        output_dir: when given, write ``report.json``, ``report.md``, ``rounds.jsonl`` and the plots there.
        plots: write the PNG plots (with ``output_dir``).
        verbose: print the markdown table.

    Returns:
        ``{"temperature", "drafter", "suites": {name: {"tau", "accept_rate", "conditional_accept", "num_rounds",
        "num_samples", "tokens_per_second", ...}}, "macro_tau", ...}``.
    """
    loaded = load_suites(target.target_config, list(suites), max_samples=max_samples,
                         max_prompt_tokens=max_prompt_tokens, tokenizer=tokenizer, hf_config=target.config)
    names = [s.name for s in loaded]
    run = DecodingRun(target, drafter, names, temperature=temperature, policy=policy, gamma=gamma,
                      threshold=threshold, sps_table=sps_table, sts_temperatures=sts_temperatures, seed=seed)
    for batch in make_batches(loaded, batch_size=batch_size, max_new_tokens=max_new_tokens):
        run.run_batch(batch)
    name = "target" if drafter is None else drafter.config.algorithm
    report = run.report(name, policy=policy, max_new_tokens=max_new_tokens)
    if output_dir is not None:
        write_report(output_dir, report, run.round_dicts(), plots=plots)
        report = __import__("json").loads((Path(output_dir) / "report.json").read_text())
    if verbose:
        print(markdown_table(report), flush=True)
    return report
