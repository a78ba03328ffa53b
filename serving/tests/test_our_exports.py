"""End to end: drafters trained and exported by ``dspark_lightning``'s own CLI pass ``check`` against the real
SGLang 0.5.23.

This file runs in the serving venv and never imports ``dspark_lightning``. The main project's interpreter
(``$DSPARK_LIGHTNING_PYTHON``, default ``<repo>/.venv/bin/python``, built by ``make venv``) runs the CLI in
subprocesses, per drafter:

    python -m dspark_lightning fit --config configs/smoke/<algo>.yaml --trainer.max_steps 2 ... [overrides]
    python -m dspark_lightning export --ckpt <run>/checkpoints/last.ckpt --format sglang --out <dir>

Importing the CLI costs about 6 s of CPU, so each subprocess runs a batch of these command lines through
``dspark_lightning.cli.main(argv)`` -- the function ``python -m dspark_lightning`` calls with ``sys.argv[1:]`` --
and ``DSPARK_TEST_JOBS`` (default 2) such subprocesses run side by side. Each export is then checked in-process with
:func:`dspark_sglang.check.check_export` against a target ``config.json`` of the drafter's target (config parse,
server-argument resolution to the right worker with gamma + 1 draft tokens, the draft class SGLang builds,
``load_weights`` with no silent skips, Markov / confidence / context numerics), and the serve command of the
export's model card is resolved by SGLang too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from dspark_sglang.check import Report, check_export

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

    @property
    def plugin(self) -> bool:
        return self.architecture.endswith("LightningDraftModel")

    def fit_args(self) -> list[str]:
        target = [] if self.target is SMOKE_TINY else ["--model.target", json.dumps({"tiny": self.target, "seed": 0})]
        return ["--config", f"configs/smoke/{self.smoke}.yaml", *FIT, *target, *self.overrides]


CASES = {
    "dspark_vanilla": Case("dspark", (), "DSPARK", "Qwen3DSparkModel", 4, confidence=True),
    "dspark_gated": Case("dspark", ("--model.drafter.markov_head_type", "gated"), "DSPARK", "Qwen3DSparkModel", 4,
                         confidence=True),
    "dspark_rnn": Case("dspark", ("--model.drafter.markov_head_type", "rnn"), "DSPARK", "Qwen3DSparkModel", 4,
                       confidence=True),
    "dflash_zlab": Case("dflash", ("--model.drafter.block_layout", "zlab"), "DFLASH", "DFlashDraftModel", 4),
    "dflash_deepspec": Case("dflash", (), "DSPARK", "Qwen3DSparkModel", 4, zero_markov=True),
    "eagle3_full": Case("eagle3", ("--model.drafter.qk_norm", "false"), "EAGLE3", "LlamaForCausalLMEagle3", 4),
    "eagle3_reduced": Case("eagle3", ("--model.drafter.qk_norm", "false", "--model.drafter.draft_vocab_size", "96"),
                           "EAGLE3", "LlamaForCausalLMEagle3", 4),
    "dspark_llama": Case("dspark", (), "DSPARK", "DSparkLightningDraftModel", 4, target=LLAMA_TINY, confidence=True),
    "dflash_zlab_llama": Case("dflash", ("--model.drafter.block_layout", "zlab"), "DFLASH",
                              "DFlashLightningDraftModel", 4, target=LLAMA_TINY),
    "dspark_smollm2": Case("dspark", ("--model.drafter.target_layer_ids", "[0, 1]", "--model.drafter.block_size", "7",
                                      "--model.drafter.mask_token_id", "0"),
                           "DSPARK", "DSparkLightningDraftModel", 7, target=SMOLLM2_TINY, confidence=True),
}


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
    return [("fit", ["fit", *case.fit_args(), "--trainer.default_root_dir", str(run)]),
            ("export", ["export", "--ckpt", str(run / "checkpoints" / "last.ckpt"), "--format", "sglang",
                        "--out", str(out)])]


def _run_batch(python: Path, batch: list[str], root: Path, built: dict[str, Built]) -> None:
    plan = [(name, _commands(name, CASES[name], root)) for name in batch]
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
    results = {name: Built() for name in CASES}
    jobs = max(1, min(JOBS, len(CASES)))
    batches = [list(CASES)[i::jobs] for i in range(jobs)]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(_run_batch, python, batch, root, results) for batch in batches]:
            future.result()
    print(f"\nmain-venv CLI: {time.perf_counter() - start:.1f} s wall for {len(CASES)} fits + exports in {jobs} "
          f"processes; per case {({n: r.seconds for n, r in results.items()})}")
    return results


def _card_command(export: Path, target: Path) -> list[str]:
    """The ``sglang.launch_server`` arguments of the export's model card, with its placeholders filled in."""
    card = (export / "README.md").read_text()
    block = card.split("```bash\n", 1)[1].split("```", 1)[0]
    line = block.replace("\\\n", " ").replace("<this repo>", str(export)).replace("<target model>", str(target))
    argv = shlex.split(line)
    assert argv[:3] == ["python", "-m", "sglang.launch_server"], argv
    return argv[3:]


@contextlib.contextmanager
def _static_verify() -> Iterator[None]:
    old = os.environ.get("SGLANG_RAGGED_VERIFY_MODE")
    os.environ["SGLANG_RAGGED_VERIFY_MODE"] = "static"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SGLANG_RAGGED_VERIFY_MODE", None)
        else:
            os.environ["SGLANG_RAGGED_VERIFY_MODE"] = old


def _resolve(args: list[str]) -> tuple[str, int]:
    """(worker class, --speculative-num-draft-tokens) SGLang resolves ``args`` to, as for a CUDA server."""
    from sglang.srt.arg_groups.overrides import resolved_view
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    with _static_verify():
        server_args = prepare_server_args(args + ["--device", "cuda", "--skip-tokenizer-init"])
        server_args.resolve_once()
    view = resolved_view(server_args)
    worker = SpeculativeAlgorithm.from_string(view.speculative_algorithm).create_worker(server_args)
    return worker.__name__, view.speculative_num_draft_tokens


def _tensor_names(export: Path) -> set[str]:
    with safe_open(str(export / "model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("name", list(CASES))
def test_cli_export_passes_check_with_the_real_sglang(name: str, built: dict[str, Built]) -> None:
    case, result = CASES[name], built[name]
    assert result.error is None, result.error
    export, config = result.export, json.loads((result.export / "config.json").read_text())
    assert config["architectures"] == [case.architecture]

    report: Report = check_export(export, target=result.target)
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

    # The serve command the model card gives resolves in SGLang to the same worker, gamma + 1 tokens
    # (Eagle3: the card passes --speculative-num-steps gamma --speculative-eagle-topk 1 --speculative-num-draft-tokens
    # gamma + 1 for the chain it was trained as).
    assert _resolve(_card_command(export, result.target)) == (WORKERS[case.algorithm], case.gamma + 1)

    card, tensors = (export / "README.md").read_text(), _tensor_names(export)
    if case.plugin:
        assert config["qk_norm"] is False and config["model_type"] == "llama"
        assert not any(n.endswith(("q_norm.weight", "k_norm.weight")) for n in tensors)
        for text in (card, result.logs["export"]):  # model card and the exporter's log line
            assert "dspark_sglang plugin" in text and "pip install ./serving" in text
    else:
        assert "qk_norm" not in config and "dspark_sglang" not in card + result.logs["export"]
        if case.algorithm != "EAGLE3":
            assert any(n.endswith("q_norm.weight") for n in tensors)
    if case.zero_markov:
        assert (config["markov_rank"], config["markov_head_type"], config["enable_confidence_head"],
                config["sample_from_anchor"]) == (1, "vanilla", False, True)
        assert "the Markov head is all zeros" in notes
        for text in (card, result.logs["export"]):
            assert "all-zero rank-1 vanilla Markov head" in text
