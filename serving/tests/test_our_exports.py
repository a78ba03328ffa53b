"""End to end: drafters trained and exported by ``dspark_lightning``'s own CLI pass ``check`` against the real
SGLang 0.5.23, and their model cards give the command ``dspark_sglang.launch`` builds.

This file runs in the serving venv and never imports ``dspark_lightning``. The main project's interpreter
(``$DSPARK_LIGHTNING_PYTHON``, default ``<repo>/.venv/bin/python``, built by ``make venv``) runs the CLI in
subprocesses, per drafter:

    python -m dspark_lightning fit --config configs/smoke/<config>.yaml --trainer.max_steps 2 ... [overrides]
    python -m dspark_lightning export --ckpt <run>/checkpoints/last.ckpt --format sglang --out <dir> [options]

and once the two tables SGLang's confidence scheduling reads: ``profile-sps --format sglang`` (the SPS cost table)
and ``calibrate`` (the STS temperatures, shipped in the DSpark export as ``calibration.json``).

Importing the CLI costs about 6 s of CPU, so each subprocess runs a batch of these command lines through
``dspark_lightning.cli.main(argv)`` -- the function ``python -m dspark_lightning`` calls with ``sys.argv[1:]`` --
and ``DSPARK_TEST_JOBS`` (default 2) such subprocesses run side by side. Each export is then checked in-process with
:func:`dspark_sglang.check.check_export` against a target ``config.json`` of the drafter's target (config parse,
server-argument resolution to the right worker with gamma + 1 draft tokens, the draft class SGLang builds in the
exported dtype, SGLang's loader with no silent skips, Markov / confidence / context numerics), and every serve
command of the export's model card must be, flag for flag, the one ``dspark_sglang.launch`` builds from the export.
"""

from __future__ import annotations

import json
import math
import os
import random
import shlex
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from dspark_sglang.check import Report, check_export
from dspark_sglang.launch import build_command

REPO = Path(__file__).resolve().parents[2]
PYTHON_ENV = "DSPARK_LIGHTNING_PYTHON"
SMOKE_TINY = yaml.safe_load((REPO / "configs/smoke/dspark.yaml").read_text())["model"]["target"]["tiny"]
LLAMA_TINY = {**SMOKE_TINY, "model_type": "llama"}
# SmolLM2-135M-Instruct (Llama, no q/k norm) at its real width and vocabulary, 2 layers instead of 30.
SMOLLM2_TINY = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                "num_hidden_layers": 2, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
                "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192,
                "tie_word_embeddings": True}
TARGET_ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
WORKERS = {"DSPARK": "DSparkWorkerV2", "DFLASH": "DFlashWorkerV2", "EAGLE3": "EAGLEWorkerV2"}
FIT = ["--trainer.max_steps", "2", "--trainer.logger", "false", "--trainer.limit_val_batches", "0",
       "--trainer.enable_progress_bar", "false"]
JOBS = int(os.environ.get("DSPARK_TEST_JOBS", "2"))
TABLES = "tables"  # the batch entry that writes the SPS table and the STS file


@dataclass(frozen=True)
class Case:
    """One drafter: how it is trained (smoke config + CLI overrides) and what SGLang must make of its export."""

    smoke: str
    overrides: tuple[str, ...]
    algorithm: str
    architecture: str
    gamma: int
    target: dict = field(default_factory=lambda: SMOKE_TINY)
    confidence: bool = False  # a confidence head is exported (DSpark compact mode is checked too)
    zero_markov: bool = False  # a head-less drafter served by DSPARK with the all-zero rank-1 Markov head
    export_args: tuple[str, ...] = ()  # further `export` options ({tables}: the directory of TABLE_STEPS' files)
    dtype: str = "bfloat16"

    @property
    def plugin(self) -> bool:
        return self.architecture.endswith("LightningDraftModel")

    def fit_args(self) -> list[str]:
        smoke = yaml.safe_load((REPO / "configs/smoke" / f"{self.smoke}.yaml").read_text())["model"]["target"]["tiny"]
        target = [] if self.target == smoke else ["--model.target", json.dumps({"tiny": self.target, "seed": 0})]
        return ["--config", f"configs/smoke/{self.smoke}.yaml", *FIT, *target, *self.overrides]


CASES = {
    "dspark_vanilla": Case("dspark", (), "DSPARK", "Qwen3DSparkModel", 4, confidence=True,
                           export_args=("--calibration", "{tables}/sts.json")),
    "dspark_gated": Case("dspark", ("--model.drafter.markov_head_type", "gated"), "DSPARK", "Qwen3DSparkModel", 4,
                         confidence=True),
    "dspark_rnn": Case("dspark", ("--model.drafter.markov_head_type", "rnn"), "DSPARK", "Qwen3DSparkModel", 4,
                       confidence=True),
    "dflash_zlab": Case("dflash", ("--model.drafter.block_layout", "zlab"), "DFLASH", "DFlashDraftModel", 4),
    "dflash_deepspec": Case("dflash", (), "DSPARK", "Qwen3DSparkModel", 4, zero_markov=True),
    "eagle3_full": Case("eagle3", (), "EAGLE3", "LlamaForCausalLMEagle3", 4),
    "eagle3_reduced": Case("eagle3", ("--model.drafter.draft_vocab_size", "96"), "EAGLE3", "LlamaForCausalLMEagle3",
                           4, export_args=("--dtype", "float32"), dtype="float32"),
    "dspark_llama": Case("dspark_llama", (), "DSPARK", "DSparkLightningDraftModel", 4, target=LLAMA_TINY,
                         confidence=True),
    "dflash_zlab_llama": Case("dflash", ("--model.drafter.block_layout", "zlab"), "DFLASH",
                              "DFlashLightningDraftModel", 4, target=LLAMA_TINY),
    "dspark_smollm2": Case("dspark", ("--model.drafter.target_layer_ids", "[0, 1]", "--model.drafter.block_size", "7",
                                      "--model.drafter.mask_token_id", "0"),
                           "DSPARK", "DSparkLightningDraftModel", 7, target=SMOLLM2_TINY, confidence=True),
}


# The SPS cost table (SGLang's format) of a tiny target on this CPU, and STS temperatures fitted on recorded rounds
# (four draft positions, as the DSpark smoke drafter): the two files compact verification reads.
SPS_TARGET = {"tiny": {"model_type": "qwen3", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
                       "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8}}
SPS_TOKENS = [5, 10, 20]


def _table_steps(tables: Path) -> list[tuple[str, list[str]]]:
    return [("profile-sps", ["profile-sps", "--target", json.dumps(SPS_TARGET), str(tables / "sps.json"),
                             "--num_tokens", json.dumps(SPS_TOKENS), "--requests", "5", "--context_length", "8",
                             "--warmup", "0", "--iters", "1", "--device", "cpu", "--format", "sglang"]),
            ("calibrate", ["calibrate", str(tables / "rounds.jsonl"), str(tables / "sts.json"),
                           "--holdout_fraction", "0"])]


def _write_rounds(path: Path, gamma: int = 4, n: int = 80) -> None:
    """Recorded verification rounds as ``validate`` writes them (``rounds.jsonl``), from a seeded generator."""
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        logits = [rng.gauss(0.0, 2.0) for _ in range(gamma)]
        accepted = next((k for k, z in enumerate(logits) if rng.random() > 1 / (1 + math.exp(-z))), gamma)
        rows.append({"proposal_length": gamma, "accepted": accepted, "confidence_logits": logits})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


@dataclass
class Built:
    """What the main venv's CLI produced for a case (or why it failed)."""

    export: Path | None = None
    target: Path | None = None
    logs: dict[str, str] = field(default_factory=dict)  # step -> its stdout + stderr
    seconds: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def main_python() -> Path:
    python = Path(os.environ.get(PYTHON_ENV) or REPO / ".venv" / "bin" / "python")
    if not python.exists():
        pytest.fail(f"The main project's interpreter {python} does not exist: run `make venv` in {REPO} first (or "
                    f"point ${PYTHON_ENV} at a Python with dspark_lightning installed).", pytrace=False)
    return python


# Runs in the main venv: each command line through the CLI entry point; a failing case does not stop the batch.
DRIVER = r"""
import json, sys, time, traceback
from dspark_lightning.cli import main

for name, steps in json.loads(sys.argv[1]):
    for step, argv in steps:
        print(f"@@@ start {name} {step}", flush=True)
        start, error = time.perf_counter(), None
        try:
            main(argv)
        except (Exception, SystemExit) as e:
            traceback.print_exc()
            error = f"{type(e).__name__}: {e}"
        sys.stderr.flush()
        done = {"case": name, "step": step, "seconds": round(time.perf_counter() - start, 1), "error": error}
        print("@@@ done " + json.dumps(done), flush=True)
        if error:
            break
"""


def _commands(name: str, case: Case, root: Path) -> list[tuple[str, list[str]]]:
    run, out = root / "runs" / name, root / "exports" / name
    extra = [a.replace("{tables}", str(root / "tables")) for a in case.export_args]
    return [("fit", ["fit", *case.fit_args(), "--trainer.default_root_dir", str(run)]),
            ("export", ["export", "--ckpt", str(run / "checkpoints" / "last.ckpt"), "--format", "sglang",
                        "--out", str(out), *extra])]


def _run_batch(python: Path, batch: list[str], root: Path, built: dict[str, Built]) -> None:
    plan = [(name, _table_steps(root / "tables") if name == TABLES else _commands(name, CASES[name], root))
            for name in batch]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([str(python), "-c", DRIVER, json.dumps(plan)], cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
    log: list[str] = []
    for line in proc.stdout.splitlines():
        if line.startswith("@@@ start "):
            log = []
        elif line.startswith("@@@ done "):
            done = json.loads(line.removeprefix("@@@ done "))
            result = built[done["case"]]
            result.logs[done["step"]], result.seconds[done["step"]] = "\n".join(log), done["seconds"]
            if done["error"]:
                argv = dict(plan[batch.index(done["case"])][1])[done["step"]]
                result.error = (f"`python -m dspark_lightning {shlex.join(argv)}` failed: {done['error']}\n"
                                + "\n".join(log)[-4000:])
        else:
            log.append(line)
    for name in batch:
        result = built[name]
        if name == TABLES:
            if result.error is None and "calibrate" not in result.logs:
                result.error = f"the main-venv batch process exited with {proc.returncode}:\n{proc.stdout[-4000:]}"
            continue
        if result.error is None and "export" not in result.logs:
            result.error = f"the main-venv batch process exited with {proc.returncode}:\n{proc.stdout[-4000:]}"
        elif result.error is None:
            result.export = root / "exports" / name
            result.target = _write_target(CASES[name].target, root / "targets" / name)


def _write_target(tiny: dict, path: Path) -> Path:
    """The target's config.json (all that SGLang's server-argument resolution reads of a target)."""
    path.mkdir(parents=True)
    config = {**tiny, "architectures": [TARGET_ARCHITECTURES[tiny["model_type"]]]}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Built]:
    """Every case trained (2 steps) and exported by the main venv's CLI, in ``JOBS`` batch processes."""
    python = main_python()
    root = tmp_path_factory.mktemp("our_exports")
    _write_rounds(root / "tables" / "rounds.jsonl")
    results = {name: Built() for name in [TABLES, *CASES]}
    jobs = max(1, min(JOBS, len(CASES)))
    batches = [list(CASES)[i::jobs] for i in range(jobs)]
    batches[0].insert(0, TABLES)  # before dspark_vanilla, whose export ships the fitted STS file
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(_run_batch, python, batch, root, results) for batch in batches]:
            future.result()
    print(f"\nmain-venv CLI: {time.perf_counter() - start:.1f} s wall for {len(CASES)} fits + exports and the tables "
          f"in {jobs} processes; per case {({n: r.seconds for n, r in results.items()})}")
    results[TABLES].export = root / "tables"
    return results


def _card_commands(export: Path, target: Path, sps: Path) -> list[list[str]]:
    """The serve commands of the export's model card (env assignments + argv), placeholders filled in."""
    card = (export / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in card.split("```bash\n")[1:]]
    fill = {"<this repo>": str(export), "<target model>": str(target), "<SPS table>": str(sps)}
    commands = []
    for block in blocks:
        line = block.replace("\\\n", " ")
        for placeholder, value in fill.items():
            line = line.replace(placeholder, value)
        commands.append(shlex.split(line))
    return commands


def _launcher_command(export: Path, target: Path, mode: str, sps: Path) -> list[str]:
    cmd = build_command(export, target, mode=mode, sps_table=sps if mode != "static" else None, python="python")
    return shlex.split(cmd.shell())


def _tensor_names(export: Path) -> set[str]:
    with safe_open(str(export / "model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("name", list(CASES))
def test_cli_export_passes_check_with_the_real_sglang(name: str, built: dict[str, Built]) -> None:
    case, result = CASES[name], built[name]
    assert result.error is None, result.error
    export, config = result.export, json.loads((result.export / "config.json").read_text())
    assert config["architectures"] == [case.architecture]

    sps = built[TABLES].export / "sps.json"
    report: Report = check_export(export, target=result.target, sps_table=sps if case.confidence else None)
    assert report.ok, report.render()
    assert report.algorithm == case.algorithm and report.draft_class.endswith("." + case.architecture)
    assert report.worker == WORKERS[case.algorithm]
    notes = "\n".join(report.notes)
    if case.algorithm != "EAGLE3":  # gamma draft tokens + the anchor: a verify window of gamma + 1
        assert report.gamma == case.gamma and report.num_draft_tokens == case.gamma + 1, report.render()
        assert "context K/V of all" in notes
    if case.algorithm == "DSPARK":
        assert report.modes == (["static", "compact"] if case.confidence else ["static"])
        assert "Markov bias" in notes and "equals the reference" in notes
        assert ("confidence (without STS) equals the reference" in notes) == case.confidence
        assert "writes the reference K/V" in notes

    # The model card's serve commands are the launcher's, flag for flag (static; compact for a confidence head),
    # and so resolve as check_export resolved the launcher's flags above: the worker, gamma + 1 draft tokens (Eagle3:
    # the trained chain of ttt_length steps, top-k 1), the exported dtype.
    modes = ["static", "compact"] if case.confidence else ["static"]
    assert _card_commands(export, result.target, sps) == [_launcher_command(export, result.target, m, sps)
                                                          for m in modes]
    launched = _launcher_command(export, result.target, "static", sps)
    assert launched[launched.index("--dtype") + 1] == case.dtype == config["dtype"]
    if case.dtype == "float32":  # SGLang's --dtype auto would serve it as float16
        assert "with SGLang's default --dtype auto this float32 export is served as float16" in notes
    if case.algorithm == "EAGLE3":
        assert launched[launched.index("--speculative-num-steps"):][:6] == [
            "--speculative-num-steps", "4", "--speculative-eagle-topk", "1", "--speculative-num-draft-tokens", "5"]
    if "calibration" in "".join(case.export_args):
        assert "confidence (with the export's STS temperatures) equals the reference" in notes

    card, tensors = (export / "README.md").read_text(), _tensor_names(export)
    if case.plugin:
        assert config["qk_norm"] is False and config["model_type"] == "llama"
        assert not any(n.endswith(("q_norm.weight", "k_norm.weight")) for n in tensors)
        for text in (card, result.logs["export"]):  # model card and the exporter's log line
            assert "dspark_sglang plugin" in text and "pip install ./serving" in text
    else:
        assert "qk_norm" not in config and "dspark_sglang plugin" not in card + result.logs["export"]
        if case.algorithm != "EAGLE3":
            assert any(n.endswith("q_norm.weight") for n in tensors)
    if case.zero_markov:
        assert (config["markov_rank"], config["markov_head_type"], config["enable_confidence_head"],
                config["sample_from_anchor"]) == (1, "vanilla", False, True)
        assert "the Markov head is all zeros" in notes
        for text in (card, result.logs["export"]):
            assert "all-zero rank-1 vanilla Markov head" in text


def test_profile_sps_and_calibrate_write_files_sglang_loads(built: dict[str, Built]) -> None:
    """``profile-sps --format sglang`` and ``calibrate`` write what SGLang's own loaders read (its
    ``--speculative-dspark-sps-table-path`` / ``--speculative-dspark-confidence-sts-path``)."""
    from sglang.srt.speculative.dspark_components.dspark_sps import SpsCostTable, load_sps_table_from_path
    from sglang.srt.speculative.dspark_components.dspark_sts import load_sts_calibration_from_path

    assert built[TABLES].error is None, built[TABLES].error
    tables = built[TABLES].export
    written = json.loads((tables / "sps.json").read_text())
    table = load_sps_table_from_path(str(tables / "sps.json"))
    assert isinstance(table, SpsCostTable)
    assert table.sample_batch_tokens == SPS_TOKENS and table.max_batch_tokens == SPS_TOKENS[-1]
    assert table.sample_steps_per_sec == written["sample_steps_per_sec"] and all(v > 0 for v in written[
        "sample_steps_per_sec"])
    assert table.lookup(SPS_TOKENS[1]) == written["sample_steps_per_sec"][1]
    sts = load_sts_calibration_from_path(str(tables / "sts.json"))
    assert sts.temperatures == json.loads((tables / "sts.json").read_text())["temperatures"]
    assert len(sts.temperatures) == 4 and all(t > 0 for t in sts.temperatures)
    shipped = built["dspark_vanilla"].export / "calibration.json"
    assert json.loads(shipped.read_text()) == json.loads((tables / "sts.json").read_text())
    assert load_sts_calibration_from_path(str(shipped)).temperatures == sts.temperatures
