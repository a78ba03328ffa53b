"""``python -m dspark_lightning export``: a Lightning checkpoint -> an hf / deepspec / sglang / attached directory.

Each layout's writer fills a staging directory; the model card, calibration and report are added; only then is
the directory renamed onto ``--out`` (``fileio.staged_directory``), so a failed or interrupted export leaves no
directory that looks complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

import yaml

from . import attached, deepspec, hf, sglang
from .card import CardInputs, load_calibration, load_report, render
from .checkpoint import TrainedDrafter, base_model_of, plain, read_checkpoint
from .fileio import (
    SAFE_WEIGHTS,
    cast_floating,
    check_output,
    read_json,
    save_tensors,
    staged_directory,
    torch_dtype,
    write_json,
)

FORMATS = ("hf", "deepspec", "sglang", "attached")
CALIBRATION_FILE = "calibration.json"
REPORT_FILE = "validation_report.json"
TRAINING_CONFIG_FILE = "training_config.yaml"


def export_checkpoint(
    *,
    ckpt: str,
    format: Literal["hf", "deepspec", "sglang", "attached"],
    out: str,
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16",
    calibration: str | None = None,
    report: str | None = None,
    target_dir: str | None = None,
    attached_layout: Literal["subfolder", "bundled"] | None = None,
    flavour: Literal["generic", "deepseek_v4"] | None = None,
    base_model: str | None = None,
    license: str = "apache-2.0",
    overwrite: bool = False,
) -> str:
    """Export a trained drafter checkpoint into a loadable repository directory.

    Args:
        ckpt: the DrafterModule Lightning checkpoint (``.ckpt``).
        format: ``hf`` (standalone repo, ``AutoModel`` with remote code), ``deepspec`` (DeepSpec's
            ``Qwen3DSparkModel`` / ``Qwen3Eagle3Model`` layout), ``sglang`` (what SGLang 0.5.23 loads: DSPARK, DFLASH
            or EAGLE3 by algorithm) or ``attached`` (the draft written into a copy of ``--target_dir``).
        out: output directory (written atomically; must not exist unless ``--overwrite``).
        dtype: dtype of the floating-point weights written.
        calibration: confidence calibration JSON (e.g. ``{"temperatures": [...]}``) shipped as ``calibration.json``.
        report: a ``validate`` report.json whose tau table goes into the model card.
        target_dir: the target's HF model directory. Required for ``attached``; otherwise it replaces the target
            config recorded in the checkpoint (geometry is checked against it).
        attached_layout: ``subfolder`` (``dspark/`` with its own config; Qwen3/Llama targets) or ``bundled`` (draft
            tensors in the target's safetensors index, ``dspark_*`` config keys; DeepSeek-V4 only, the one target
            SGLang 0.5.23 serves a bundled draft for). Default: ``subfolder``, and ``bundled`` for ``dspark_v4``.
        flavour: how an attached draft is named inside the target: ``generic`` (Qwen3/Llama targets, ``dspark.*``)
            or ``deepseek_v4`` (``dspark_v4`` drafters as the official ``mtp.<stage>.*`` tensors of a DeepSeek-V4
            checkpoint). Default: chosen by the drafter's algorithm.
        base_model: Hub id of the target for the model card (default: the checkpoint's target when it is one).
        license: license of the model card front matter (match the base model's terms).
        overwrite: replace ``out`` if it exists and holds a model directory.

    Returns:
        The output directory.
    """
    check_output(Path(out), overwrite)
    if format == "attached" and target_dir is None:
        raise ValueError("--format attached writes the draft into a copy of the target: pass --target_dir DIR.")
    trained = read_checkpoint(ckpt, target_dir=target_dir)
    return write_export(trained, fmt=format, out=out, dtype=dtype, calibration=calibration, report=report,
                        target_dir=target_dir, attached_layout=attached_layout, flavour=flavour,
                        base_model=base_model, license=license, overwrite=overwrite)


def write_export(
    trained: TrainedDrafter,
    *,
    fmt: str,
    out: str | Path,
    dtype: str = "bfloat16",
    calibration: str | None = None,
    report: str | None = None,
    target_dir: str | Path | None = None,
    attached_layout: str | None = None,
    flavour: str | None = None,
    base_model: str | None = None,
    license: str = "apache-2.0",
    overwrite: bool = False,
) -> str:
    """Write ``trained`` in layout ``fmt`` to ``out`` (arguments as :func:`export_checkpoint`)."""
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r} is unknown; choose one of {FORMATS}.")
    torch_dtype(dtype)  # validates the name before any work
    out = Path(out)
    check_output(out, overwrite)
    cfg = trained.config
    if cfg.algorithm == "dspark_v4" and fmt != "attached":
        raise ValueError(
            f"--format {fmt} cannot hold a 'dspark_v4' drafter: a DeepSeek-V4 DSpark draft is served bundled into the "
            f"V4 checkpoint itself. Use --format attached --target_dir <the DeepSeek-V4 model directory> "
            f"(docs/export.md, 'DeepSeek-V4')."
        )
    if cfg.algorithm not in ("dspark", "dflash", "eagle3", "dspark_v4"):
        raise ValueError(f"Exporting a {cfg.algorithm!r} drafter is not implemented.")
    calibration_data = load_calibration(calibration, cfg.block_size) if calibration else None
    report_data = load_report(report, cfg.algorithm) if report else None
    inputs = CardInputs(fmt=fmt, base_model=base_model or base_model_of(trained), license=license,
                        report=report_data, calibration_file=CALIBRATION_FILE if calibration else None)
    if fmt == "attached":
        if target_dir is None:
            raise ValueError("--format attached writes the draft into a copy of the target: pass --target_dir.")
        target = Path(target_dir).resolve()
        if out.resolve() == target or target in out.resolve().parents:
            raise ValueError(f"--out {out} is inside the target directory {target_dir}; write the copy elsewhere.")
    with staged_directory(out, overwrite) as stage:
        card_dir = _write_layout(trained, stage, fmt, dtype, inputs, target_dir, attached_layout, flavour)
        _write_extras(trained, stage, card_dir, inputs, fmt, calibration_data, report)
    print(f"Wrote a {fmt} export of the {cfg.algorithm} drafter to {out}.")
    return str(out)


def _write_layout(trained: TrainedDrafter, stage: Path, fmt: str, dtype: str, inputs: CardInputs,
                  target_dir: str | Path | None, attached_layout: str | None, flavour: str | None) -> Path:
    """Config and weights of layout ``fmt``; returns the directory the model card and extras belong in."""
    if fmt == "attached":
        inputs.serving = "DSPARK"
        return attached.write_attached(trained, stage, target_dir=target_dir, dtype=dtype, layout=attached_layout,
                                       flavour=flavour)
    if fmt == "hf":
        write_json(stage / "config.json", hf.hf_config(trained.config, dtype, trained.target))
        hf.write_remote_code(stage)
        tensors = trained.state_dict
    elif fmt == "deepspec":
        write_json(stage / "config.json", deepspec.deepspec_config(trained, dtype))
        tensors = trained.state_dict
    else:
        inputs.serving, config, tensors = sglang.prepare(trained, dtype)
        write_json(stage / "config.json", config)
    save_tensors(cast_floating(tensors, torch_dtype(dtype)), stage / SAFE_WEIGHTS)
    return stage


def _write_extras(trained: TrainedDrafter, stage: Path, card_dir: Path, inputs: CardInputs, fmt: str,
                  calibration: dict | None, report: str | None) -> None:
    """Calibration, report, training config and the model card (last: it lists the files)."""
    bundled = fmt == "attached" and card_dir == stage
    prefix = "dspark_" if bundled else ""  # the top level of a bundled copy is the target's namespace
    if calibration is not None:
        write_json(card_dir / f"{prefix}{CALIBRATION_FILE}", calibration)
        inputs.calibration_file = (card_dir / f"{prefix}{CALIBRATION_FILE}").relative_to(stage).as_posix()
    if report:
        shutil.copyfile(report, card_dir / f"{prefix}{REPORT_FILE}")
    training = trained.training_config or yaml.safe_dump(plain(trained.hyper_parameters), sort_keys=False)
    (card_dir / f"{prefix}{TRAINING_CONFIG_FILE}").write_text(training, encoding="utf-8")
    if fmt in ("sglang", "attached"):  # the dtype SGLang serves: what the config.json it reads records
        served = read_json(card_dir / "config.json")
        inputs.dtype = served.get("dtype") or served.get("torch_dtype")
    if bundled:
        inputs.files = attached.bundled_files(stage)
    else:
        inputs.files = tuple(sorted([p.name for p in card_dir.iterdir() if p.is_file()] + ["README.md"]))
    card_name = "DSPARK.md" if bundled else "README.md"
    (card_dir / card_name).write_text(render(trained, inputs, hf.hub_dir()), encoding="utf-8")
