"""The model card (``README.md``) of an export: YAML front matter, usage per layout, the measured acceptance
(from a ``validate`` report) and the exact training config. The template is ``hub/model_card.md``.

Report schema (``validate``'s ``report.json``)::

    {"temperature": T, "drafter": "dspark", "macro_tau": float,
     "suites": {"gsm8k": {"tau": float, "accept_rate": [float, ...], "num_rounds": int, ...}, ...}}
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import serve_command, sglang
from .checkpoint import TrainedDrafter, plain
from .common import package_version
from .fileio import read_json

TITLES = {"dspark": "DSpark", "dflash": "DFlash", "eagle3": "Eagle3", "dspark_v4": "DSpark (DeepSeek-V4)"}
FORMAT_NAMES = {"hf": "Hugging Face (remote code)", "deepspec": "DeepSpec", "sglang": "SGLang",
                "attached": "attached to the target checkpoint"}


def load_report(path: str | Path, algorithm: str) -> dict[str, Any]:
    """Read and check a validation report (schema in the module docstring)."""
    report = read_json(Path(path))
    suites = report.get("suites") if isinstance(report, dict) else None
    if not isinstance(suites, dict) or not suites:
        raise ValueError(f"Report {path} has no 'suites' mapping; expected validate's report.json "
                         f'{{"suites": {{name: {{"tau": ...}}}}}}.')
    bad = [name for name, s in suites.items() if not isinstance(s, dict) or not _number(s.get("tau"))]
    if bad:
        raise ValueError(f"Report {path}: suites {bad} have no numeric 'tau'.")
    drafter = report.get("drafter")
    if drafter is not None and drafter != algorithm:
        raise ValueError(f"Report {path} measured a {drafter!r} drafter but this checkpoint is {algorithm!r}; "
                         f"attach the report of this drafter.")
    return report


def load_calibration(path: str | Path, block_size: int) -> dict[str, Any]:
    """Read a confidence calibration JSON; ``temperatures`` (if present) must be gamma positive numbers."""
    data = read_json(Path(path))
    if not isinstance(data, dict):
        raise ValueError(f"Calibration {path} must be a JSON object (e.g. {{\"temperatures\": [...]}}).")
    temps = data.get("temperatures")
    if temps is not None:
        if not isinstance(temps, list) or len(temps) != block_size or not all(_number(t) and t > 0 for t in temps):
            raise ValueError(f"Calibration {path}: 'temperatures' must be {block_size} positive numbers (one per "
                             f"draft position, block_size={block_size}); got {temps!r}.")
    return data


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class CardInputs:
    fmt: str
    base_model: str | None
    license: str
    report: dict[str, Any] | None = None
    calibration_file: str | None = None
    serving: str | None = None  # SGLang algorithm name for sglang/attached
    files: tuple[str, ...] = ()
    dtype: str | None = None  # the dtype the served config.json records (--dtype of the serve command)


def results_table(report: dict[str, Any] | None) -> str:
    if report is None:
        return ("Not measured: no validation report was given at export (`export --report report.json`). "
                "Measure acceptance with `python -m dspark_lightning validate` before relying on this drafter.")
    suites = report["suites"]
    width = max((len(s.get("accept_rate") or []) for s in suites.values()), default=0)
    head = ["suite", "τ", "rounds"] + [f"accept@{k + 1}" for k in range(width)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in suites.items():
        rates = list(s.get("accept_rate") or [])
        cells = [name, f"{s['tau']:.3f}", str(s.get("num_rounds", ""))]
        cells += [f"{r:.3f}" if _number(r) else "" for r in rates] + [""] * (width - len(rates))
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"τ = accepted tokens per verification round, bonus token included; temperature "
             f"{report.get('temperature', '?')}; accept@k = share of rounds whose first k drafts were all accepted."]
    if _number(report.get("macro_tau")):
        notes.insert(0, f"Macro-average τ over the suites: **{report['macro_tau']:.3f}**.")
    return "\n".join(lines) + "\n\n" + " ".join(notes)


def usage(trained: TrainedDrafter, inputs: CardInputs) -> str:
    target = inputs.base_model or "<target model>"
    if inputs.fmt == "hf":
        return ("```python\nfrom transformers import AutoModel\n\n"
                "model = AutoModel.from_pretrained(\"<this repo>\", trust_remote_code=True)\n"
                "drafter = model.drafter  # new_cache / extend_context / propose / compute_logits\n```\n\n"
                "Or with the package: `dspark_lightning.export.load_drafter(\"<dir>\")`.")
    if inputs.fmt == "deepspec":
        return ("A DeepSpec draft checkpoint: `python eval.py --target_name_or_path "
                f"{target} --draft_name_or_path <this repo>` in DeepSpec, or import it with "
                "`python -m dspark_lightning import-deepspec <dir> --out drafter.ckpt`.")
    cfg = trained.config
    attached = inputs.fmt == "attached"
    serve_target = None if attached else target
    modes = ["static", "compact"] if inputs.serving == "DSPARK" and cfg.has_confidence_head else ["static"]
    blocks = []
    for mode in modes:
        env, args = serve_command.sglang_command(cfg, serving=inputs.serving, target=serve_target, dtype=inputs.dtype,
                                                 mode=mode, calibration_file=inputs.calibration_file)
        blocks.append(f"```bash\n{serve_command.render(env, args)}\n```\n\n"
                      f"`{serve_command.launcher_call(target=serve_target, mode=mode)}` (the `dspark_sglang` package "
                      "in `serving/` of dspark_lightning) prints and runs the same command.")
    lead = "The target checkpoint with its DSpark draft: SGLang finds the draft itself.\n\n" if attached else ""
    if len(blocks) == 2:
        blocks[1] = ("Confidence-scheduled verification (the trained confidence head picks how many draft tokens "
                     "to verify; `<SPS table>` is SGLang's SPS cost table of the serving GPU, e.g. "
                     "`python -m dspark_lightning profile-sps ... --format sglang`):\n\n" + blocks[1])
    notes = sglang.serving_notes(cfg) if inputs.fmt == "sglang" else []
    return lead + "\n\n".join(blocks) + "".join(f"\n\n**Note:** {n}" for n in notes)


def summary(trained: TrainedDrafter, inputs: CardInputs) -> str:
    cfg = trained.config
    lines = [f"A {TITLES[cfg.algorithm]} draft model for speculative decoding, in the "
             f"{FORMAT_NAMES[inputs.fmt]} layout, trained with dspark_lightning.", ""]
    facts = [f"target: {_target_text(trained, inputs)}",
             f"draft layers: {cfg.num_hidden_layers}, target feature layers: {list(cfg.target_layer_ids)}"]
    if cfg.algorithm == "eagle3":
        facts.append(f"training-time-test length: {cfg.ttt_length}; draft vocabulary: "
                     f"{cfg.draft_vocab_size or cfg.vocab_size} of {cfg.vocab_size}")
    else:
        facts.append(f"block size γ = {cfg.block_size} draft tokens per round ({cfg.block_layout} block layout), "
                     f"mask token {cfg.mask_token_id}")
    if cfg.algorithm == "dspark_v4":
        g = cfg.v4_geometry
        facts.append(f"draft stages: DeepSeek-V4 blocks (mHC x{g['hc_mult']}, sliding-window attention of "
                     f"{g['sliding_window']}, MoE {g['num_experts_per_tok']} of {g['n_routed_experts']} routed experts "
                     f"+ {g['n_shared_experts']} shared), bundled as `mtp.<stage>.*` tensors")
    if cfg.has_markov_head:
        facts.append(f"Markov head: {cfg.markov_head_type}, rank {cfg.markov_rank}")
    if cfg.has_confidence_head:
        facts.append("confidence head: yes" + (f" (calibration in `{inputs.calibration_file}`)"
                                               if inputs.calibration_file else " (uncalibrated)"))
    return "\n".join(lines + [f"- {f}" for f in facts])


def _target_text(trained: TrainedDrafter, inputs: CardInputs) -> str:
    target = trained.target or {}
    if inputs.base_model or target.get("path"):
        return f"`{inputs.base_model or target['path']}`"
    if target.get("tiny"):
        return f"a random-init tiny `{target['tiny'].get('model_type', '?')}` model (a test / smoke target)"
    return f"a `{trained.config.target_model_type}` model ({trained.config.num_target_layers} layers)"


def render(trained: TrainedDrafter, inputs: CardInputs, template_dir: Path) -> str:
    cfg = trained.config
    tags = ["speculative-decoding", "draft-model", cfg.algorithm, "dspark-lightning"]
    if inputs.fmt == "hf":
        tags.append("custom_code")
    front: dict[str, Any] = {}
    if inputs.base_model:
        front["base_model"] = inputs.base_model
    front.update({"library_name": "sglang" if inputs.fmt in ("sglang", "attached") else "transformers",
                  "license": inputs.license, "tags": tags, "pipeline_tag": "text-generation"})
    training = trained.training_config or yaml.safe_dump(plain(trained.hyper_parameters), sort_keys=False)
    step = f", step {trained.global_step}" if trained.global_step is not None else ""
    provenance = f"Exported by dspark_lightning {package_version()} from `{trained.source}`{step}."
    template = string.Template((template_dir / "model_card.md").read_text(encoding="utf-8"))
    return template.substitute(
        front_matter=yaml.safe_dump(front, sort_keys=False).strip(),
        title=f"{TITLES[cfg.algorithm]} drafter" + (f" for {inputs.base_model}" if inputs.base_model else ""),
        summary=summary(trained, inputs), usage=usage(trained, inputs), results=results_table(inputs.report),
        files=_files_text(inputs), training_config=training.strip(), provenance=provenance,
    )


def _files_text(inputs: CardInputs) -> str:
    what = {"README.md": "this model card", "config.json": "draft config", "model.safetensors": "draft weights",
            "model.safetensors.index.json": "the target's index, with the draft shard added",
            "model-dspark-draft.safetensors": "the draft weights (bundled in the target)",
            "calibration.json": "confidence calibration (per-position temperatures)",
            "validation_report.json": "the validation report the table above comes from",
            "training_config.yaml": "the training config"}
    def describe(f: str) -> str:
        if f in what:
            return what[f]
        if f.startswith("model-dspark-draft"):
            return "a shard of the draft weights (bundled in the target)"
        if f.endswith("-without-mtp.safetensors"):
            return "a target shard written anew without the target's own MTP module (the draft takes its names)"
        return "remote code" if f.endswith(".py") else "file"

    rows = [f"- `{f}`: {describe(f)}" for f in sorted(inputs.files)]
    return "\n".join(rows) if rows else "See the repository."
