"""Read an exported drafter directory: which SGLang algorithm serves it, with which settings.

Pure Python (json and paths only): the launcher uses it without importing torch or SGLang.

An export is one of
- a **draft directory**: ``config.json`` + ``*.safetensors`` of a DSpark, DFlash or Eagle3 drafter, served beside
  a separate target (``--speculative-draft-model-path``);
- an **attached checkpoint** (the DeepSeek-V4 way of shipping a draft inside the target's repository): a target
  checkpoint whose ``dspark/`` subfolder is a DSpark draft directory, which SGLang finds by itself when only
  ``--model-path`` is given; or a target ``config.json`` carrying the prefixed ``dspark_*`` keys, whose draft
  weights sit in the target's own safetensors (SGLang 0.5.23 loads that form for DeepSeek-V4 targets only).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Algorithm = Literal["DSPARK", "DFLASH", "EAGLE3"]
Layout = Literal["draft", "attached-subfolder", "attached-config"]

# Draft classes of SGLang 0.5.23 (srt/models/*.py EntryClass) and of our plugin, by the algorithm serving them.
DSPARK_ARCHITECTURES = (
    "Qwen3DSparkModel", "LingDSparkModel", "DSparkDraftModel", "DSparkMiniMaxDraftModel",
    "DeepseekV4ForCausalLMDSpark", "DSparkLightningDraftModel",
)  # fmt: skip
DFLASH_ARCHITECTURES = (
    "DFlashDraftModel", "DFlash2DraftModel", "DFlash2BeamDraftModel", "DFlashLagunaForCausalLM",
    "MiniMaxDFlash2DraftModel", "MuseGlimmerAssistantModel", "DFlashLightningDraftModel",
)  # fmt: skip
# Architectures only our plugin (dspark_sglang.plugin) registers.
PLUGIN_ARCHITECTURES = ("DSparkLightningDraftModel", "DFlashLightningDraftModel")
# The target config keys that mark a draft bundled into the target checkpoint (SGLang:
# dspark_config.checkpoint_bundles_dspark_draft).
BUNDLED_DSPARK_KEYS = ("dspark_block_size", "dspark_markov_rank", "dspark_noise_token_id", "dspark_target_layer_ids")
DSPARK_SUBFOLDER = "dspark"
# STS calibration files ({"temperatures": [gamma floats]}) the launcher passes on when the export ships them, first
# found wins: dspark_lightning's exporter writes calibration.json (dspark_calibration.json at the top of a bundled
# attached checkpoint).
STS_FILENAMES = ("calibration.json", "sts.json", "dspark_calibration.json")
SPS_FILENAMES = ("sps.json", "sps_table.json")
# SGLang's default block size for a DFlash draft whose config has none (models/dflash.py).
DFLASH_DEFAULT_BLOCK_SIZE = 16
# Values of SGLang's --dtype an export's config.json may record.
SERVED_DTYPES = ("bfloat16", "float16", "float32")


class ExportError(ValueError):
    """The directory is not an export SGLang can serve; the message says what is wrong and how to fix it."""


@dataclass
class ExportInfo:
    """What the launcher and the check need to know about an export.

    Attributes:
        path: The directory given.
        layout: ``draft`` (a draft directory), ``attached-subfolder`` (target checkpoint + ``dspark/``) or
            ``attached-config`` (``dspark_*`` keys in the target config).
        draft_dir: Where the draft's ``config.json`` and weights are (``path/dspark`` for a subfolder).
        config: The draft's ``config.json`` (for ``attached-config``: the target's).
        algorithm: ``DSPARK``, ``DFLASH`` or ``EAGLE3``.
        architecture: ``config["architectures"][0]``.
        num_draft_tokens: SGLang's verify window, ``--speculative-num-draft-tokens`` (DSPARK: gamma + 1;
            DFLASH: ``block_size``; EAGLE3: ``ttt_length + 1``, or ``None`` and SGLang chooses).
        gamma: Draft tokens proposed per round (DSPARK ``block_size``; DFLASH ``block_size - 1``; EAGLE3 the
            chain length the drafter was trained to unroll, ``ttt_length``: dspark_lightning's exporter writes it,
            SGLang does not read it).
        has_confidence_head: ``enable_confidence_head`` is true (DSPARK only).
        sts_path, sps_path: Calibration files shipped in the export, if any.
        weight_files: The draft's ``*.safetensors``.
        dtype: The dtype ``config.json`` records (``dtype``, else ``torch_dtype``), if it is one SGLang's
            ``--dtype`` takes.
    """

    path: Path
    layout: Layout
    draft_dir: Path
    config: dict[str, Any]
    algorithm: Algorithm
    architecture: str
    num_draft_tokens: int | None
    gamma: int | None
    has_confidence_head: bool = False
    sts_path: Path | None = None
    sps_path: Path | None = None
    weight_files: list[Path] = field(default_factory=list)
    dtype: str | None = None

    @property
    def needs_plugin(self) -> bool:
        return self.architecture in PLUGIN_ARCHITECTURES


def read_config(directory: Path) -> dict[str, Any]:
    file = directory / "config.json"
    if not file.is_file():
        raise ExportError(f"{directory} has no config.json; pass the directory the exporter wrote.")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{file} is not valid JSON: {e}.") from e


def top_level(config: dict[str, Any], key: str, default: Any = None) -> Any:
    return config.get(key, default)


def nested(config: dict[str, Any], key: str) -> Any:
    """A key as SGLang's parsers find it nested: ``dspark_config`` wins over ``dflash_config``."""
    for section in ("dspark_config", "dflash_config"):
        value = (config.get(section) or {}).get(key)
        if value is not None:
            return value
    return None


def algorithm_of(config: dict[str, Any]) -> Algorithm:
    """The algorithm that serves a draft config, from ``architectures``."""
    archs = config.get("architectures") or []
    if not archs:
        raise ExportError(
            "config.json has no 'architectures'; SGLang picks the draft class from it. Write e.g. "
            "[\"Qwen3DSparkModel\"] (DSpark), [\"DFlashDraftModel\"] (DFlash) or [\"LlamaForCausalLMEagle3\"] (Eagle3)."
        )
    arch = archs[0]
    if arch in DSPARK_ARCHITECTURES:
        return "DSPARK"
    if arch in DFLASH_ARCHITECTURES:
        return "DFLASH"
    if "Eagle3" in arch:
        return "EAGLE3"
    raise ExportError(
        f"architectures[0]={arch!r} is not a draft class SGLang 0.5.23 serves with DSPARK, DFLASH or EAGLE3; "
        f"valid: {sorted(DSPARK_ARCHITECTURES + DFLASH_ARCHITECTURES)} or an *Eagle3 class."
    )


def _first_file(directory: Path, names: tuple[str, ...]) -> Path | None:
    return next((directory / n for n in names if (directory / n).is_file()), None)


def read_export(path: str | Path) -> ExportInfo:
    """Classify an export directory (see the module docstring).

    Raises:
        ExportError: not an export SGLang can serve as written.
    """
    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"{path} is not a directory.")
    config = read_config(path)
    subfolder = path / DSPARK_SUBFOLDER
    if (subfolder / "config.json").is_file():
        layout: Layout = "attached-subfolder"
        draft_dir, draft_config = subfolder, read_config(subfolder)
    elif any(config.get(k) is not None for k in BUNDLED_DSPARK_KEYS):
        layout, draft_dir, draft_config = "attached-config", path, config
    else:
        layout, draft_dir, draft_config = "draft", path, config

    if layout == "attached-config":
        algorithm: Algorithm = "DSPARK"
        arch = (config.get("architectures") or ["?"])[0]
        block = config.get("dspark_block_size")
    else:
        algorithm = algorithm_of(draft_config)
        arch = draft_config["architectures"][0]
        block = draft_config.get("block_size", nested(draft_config, "block_size"))
        if layout == "attached-subfolder" and algorithm != "DSPARK":
            raise ExportError(f"{subfolder} holds a {algorithm} draft; SGLang only looks for a DSpark draft there.")

    if algorithm == "DSPARK":
        if block is None:
            raise ExportError(
                "DSpark config has no block_size (= gamma, the number of draft tokens); SGLang would fall back to "
                "gamma=7. Write the drafter's block_size top level."
            )
        gamma, window = int(block), int(block) + 1
    elif algorithm == "DFLASH":
        window = int(block) if block is not None else DFLASH_DEFAULT_BLOCK_SIZE
        gamma = window - 1
    else:  # EAGLE3: a chain of ttt_length steps (topk 1), when the export says so; else SGLang chooses
        steps = draft_config.get("ttt_length")
        gamma = int(steps) if steps is not None else None
        window = gamma + 1 if gamma is not None else None

    weights = sorted(draft_dir.glob("*.safetensors"))
    if layout != "attached-config" and not weights:
        raise ExportError(f"{draft_dir} has no *.safetensors weights.")
    confidence = bool(draft_config.get("enable_confidence_head", nested(draft_config, "enable_confidence_head")))
    dtype = draft_config.get("dtype") or draft_config.get("torch_dtype")
    return ExportInfo(
        path=path,
        layout=layout,
        draft_dir=draft_dir,
        config=draft_config,
        algorithm=algorithm,
        architecture=arch,
        num_draft_tokens=window,
        gamma=gamma,
        has_confidence_head=algorithm == "DSPARK" and confidence,
        sts_path=_first_file(draft_dir, STS_FILENAMES) or _first_file(path, STS_FILENAMES),
        sps_path=_first_file(draft_dir, SPS_FILENAMES) or _first_file(path, SPS_FILENAMES),
        weight_files=weights,
        dtype=dtype if dtype in SERVED_DTYPES else None,
    )


def check_sps_table(path: Path) -> None:
    """Raise unless ``path`` is a JSON file of the form SGLang 0.5.23's ``--speculative-dspark-sps-table-path`` reads
    (``SpsCostTable``: ``sample_batch_tokens`` strictly increasing, as many ``sample_steps_per_sec``,
    ``max_batch_tokens`` >= the last probe; or the additive model with ``bias_seconds``). JSON only: ``check``
    also loads it with SGLang's own loader."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"SPS table {path} cannot be read as JSON: {e}.") from e
    if not isinstance(data, dict):
        raise ExportError(f"SPS table {path} is not a JSON object.")
    if "bias_seconds" in data:
        return
    if "num_tokens" in data and "sample_batch_tokens" not in data:
        raise ExportError(
            f"SPS table {path} is in dspark_lightning's own format (num_tokens / steps_per_second); SGLang reads "
            "sample_batch_tokens / sample_steps_per_sec / max_batch_tokens. Profile it with `python -m "
            "dspark_lightning profile-sps ... --format sglang` (or SGLang's python -m "
            "sglang.benchmark.dspark_sps_profiler)."
        )
    missing = [k for k in ("sample_batch_tokens", "sample_steps_per_sec", "max_batch_tokens") if k not in data]
    if missing:
        raise ExportError(f"SPS table {path} lacks {missing}; SGLang's SpsCostTable needs sample_batch_tokens, "
                          "sample_steps_per_sec and max_batch_tokens.")
    tokens, sps = data["sample_batch_tokens"], data["sample_steps_per_sec"]
    if not tokens or tokens != sorted(set(tokens)) or len(tokens) != len(sps) or data["max_batch_tokens"] < tokens[-1]:
        raise ExportError(f"SPS table {path}: sample_batch_tokens must be strictly increasing, as long as "
                          "sample_steps_per_sec, and max_batch_tokens at least the last of them.")


def check_sts_file(path: Path, gamma: int | None) -> None:
    """Raise unless ``path`` is an STS calibration SGLang reads (``DSparkStsCalibration``): ``temperatures``, gamma
    positive numbers (one per draft position)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"STS calibration {path} cannot be read as JSON: {e}.") from e
    temps = data.get("temperatures") if isinstance(data, dict) else None
    if not isinstance(temps, list) or not temps or not all(
            isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0 for t in temps):
        raise ExportError(f"STS calibration {path} needs \"temperatures\": positive numbers; got {temps!r}.")
    if gamma is not None and len(temps) != gamma:
        raise ExportError(f"STS calibration {path} has {len(temps)} temperatures; the drafter proposes gamma={gamma} "
                          "tokens, one temperature each.")
