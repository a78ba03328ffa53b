"""``load_drafter``: read any export we write (hf, deepspec, sglang, attached) back into our drafter classes."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ..drafters import DrafterConfig
from . import attached, deepspec, hf, sglang
from .checkpoint import instantiate
from .common import drafter_config_from_json
from .fileio import SAFE_INDEX, SAFE_WEIGHTS, load_tensors, read_json

FORMATS = ("hf", "deepspec", "sglang", "attached-subfolder", "attached-bundled")
_SGLANG_ARCHS = ("Qwen3DSparkModel", "DSparkDraftModel", "LingDSparkModel", "DFlashDraftModel",
                 "LlamaForCausalLMEagle3", *sglang.PLUGIN_ARCHITECTURES.values())


def detect_format(directory: str | Path) -> str:
    """Which layout ``directory`` holds (one of :data:`FORMATS`).

    Raises:
        FileNotFoundError: ``directory`` or its ``config.json`` is missing.
        ValueError: a config.json we cannot read as a draft.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory; give an export directory.")
    if (directory / attached.SUBFOLDER / "config.json").is_file():
        return "attached-subfolder"
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} has no config.json; give an export directory.")
    config = read_json(directory / "config.json")
    if hf.is_hf_export(config):
        return "hf"
    if any(k in config for k in attached.SGLANG_BUNDLE_KEYS):
        return "attached-bundled"
    arch = (config.get("architectures") or [""])[0]
    fmt = (config.get("exported_by") or {}).get("format", "")
    if arch in deepspec.EAGLE3_ARCHS or (arch in deepspec.DSPARK_ARCHS and fmt in ("", "deepspec")
                                         and _has_tensor(directory, "embed_tokens.weight")):
        return "deepspec"
    if arch in _SGLANG_ARCHS:
        return "sglang"
    raise ValueError(f"{directory}/config.json (architectures={config.get('architectures')!r}) is not a drafter "
                     f"export we can read; formats: {FORMATS}.")


def _has_tensor(directory: Path, name: str) -> bool:
    from .attached import weight_map

    try:
        return name in weight_map(directory)
    except FileNotFoundError:
        return False


def read_export(directory: str | Path, target_dir: str | Path | None = None) -> tuple[DrafterConfig, dict[str, Tensor]]:
    """Drafter config and tensors of an export directory (see :func:`load_drafter`)."""
    directory = Path(directory)
    fmt = detect_format(directory)
    if fmt == "hf":
        config = read_json(directory / "config.json")
        return DrafterConfig.from_dict(config["drafter"]), load_tensors(directory / SAFE_WEIGHTS)
    if fmt == "deepspec":
        cfg, tensors, _ = deepspec.read_deepspec(directory)
        return cfg, tensors
    if fmt == "attached-bundled":
        cfg, tensors = attached.read_bundled(directory)
        return cfg, _with_target_vocab(cfg, tensors, directory)
    if fmt == "attached-subfolder":
        return _read_sglang(directory / attached.SUBFOLDER, directory)
    if target_dir is None and directory.name == attached.SUBFOLDER and attached.is_attached(directory.parent):
        target_dir = directory.parent
    return _read_sglang(directory, target_dir)


def _read_sglang(directory: Path, target_dir: str | Path | None) -> tuple[DrafterConfig, dict[str, Tensor]]:
    config = read_json(directory / "config.json")
    fields, compare = sglang.config_fields(config)
    cfg = drafter_config_from_json(config, fields, compare=compare)
    tensors = sglang.drafter_tensors(cfg, _weights(directory))
    return cfg, _with_target_vocab(cfg, tensors, target_dir, directory)


def _weights(directory: Path) -> dict[str, Tensor]:
    if (directory / SAFE_INDEX).is_file():
        mapping = read_json(directory / SAFE_INDEX)["weight_map"]
        return attached.read_named(directory, sorted(mapping), mapping)
    return load_tensors(directory / SAFE_WEIGHTS)


def _with_target_vocab(cfg: DrafterConfig, tensors: dict[str, Tensor], target_dir: str | Path | None,
                       directory: Path | None = None) -> dict[str, Tensor]:
    """Add the target's embedding (and head, for block drafters) that SGLang-style layouts do not ship."""
    needed = [n for n in ("embed_tokens.weight", "lm_head.weight") if n not in tensors]
    if not needed:
        return tensors
    if target_dir is None:
        raise ValueError(
            f"{directory} holds no {needed}: SGLang layouts share the target's embedding/head. Pass "
            f"target_dir=<the target's HF model directory> to load it."
        )
    vocab = attached.target_vocab_tensors(Path(target_dir))
    like = next((t for t in tensors.values() if t.is_floating_point()), None)
    out = dict(tensors)
    for name in needed:
        t = vocab[name]
        out[name] = t.to(like.dtype) if like is not None else t
    return out


def load_drafter(
    directory: str | Path,
    target_dir: str | Path | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Load an export (any of :data:`FORMATS`) into a ``DSpark`` / ``DFlash`` / ``Eagle3`` in eval mode; a DeepSeek-V4
    checkpoint carrying a bundled DSpark draft (``mtp.<stage>.*`` + ``dspark_*`` config keys) into a ``DSparkV4``.

    Args:
        directory: the export directory (for ``attached``, the target copy that carries the draft).
        target_dir: the target's HF model directory, needed for a standalone ``sglang`` export (it ships no
            embedding / head); found automatically for ``attached``.
        dtype: cast floating-point weights (default: the file's dtype).
        device: where to put the model (default CPU).
    """
    cfg, tensors = read_export(directory, target_dir)
    model = instantiate(cfg, tensors, dtype)
    return model.to(device) if device is not None else model

