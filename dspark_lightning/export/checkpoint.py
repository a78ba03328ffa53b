"""Read a trained drafter out of a Lightning checkpoint, without unpickling anything we did not write.

A ``DrafterModule`` checkpoint holds ``state_dict`` (keys ``drafter.<name>``) and ``hyper_parameters`` (``drafter``,
``target``, ``loss``, ...). Written by LightningCLI those are plain dicts; written from Python they are our own
dataclasses (``DrafterConfig``, ``TargetConfig``, ``LossWeights``) and function references (``default_optimizer``).
We load with ``torch.load(weights_only=True)`` and let only names under ``dspark_lightning.`` through, each mapped
to an inert stand-in that records its pickled state and can execute nothing; any other global makes the read
fail with the list of offending names. The drafter config is then rebuilt from the recorded fields and resolved
against the target's HF config (geometry is stored unresolved in the hyper-parameters).
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..drafters import DrafterConfig
from ..drafters.config import V4_MODEL_TYPES
from ..drafters.registry import build
from .fileio import read_json

OUR_PACKAGE = "dspark_lightning."
# Optional self-describing section a checkpoint may carry (see docs/export.md): resolved drafter config and
# the target's HF config, so an export needs neither the target files nor network access.
EXPORT_INFO_KEY = "dspark_lightning"


@dataclass
class TrainedDrafter:
    """Everything an exporter needs about one trained drafter.

    Attributes:
        config: the resolved drafter config (geometry filled from the target).
        state_dict: the drafter's tensors under their own names (``fc.weight``, ``layers.0.*``, ...).
        target_config: the target's HF ``config.json`` content (a plain dict).
        target: our ``TargetConfig`` fields (``path``, ``tiny``, ...) if known; names the base model.
        hyper_parameters: the checkpoint's hyper-parameters as plain JSON-able data.
        training_config: the exact training config as YAML text (LightningCLI's ``config.yaml`` when found).
        source: where it came from (for the model card).
        global_step: training step of the checkpoint, if known.
    """

    config: DrafterConfig
    state_dict: dict[str, Tensor]
    target_config: dict[str, Any]
    target: dict[str, Any] | None = None
    hyper_parameters: dict[str, Any] = field(default_factory=dict)
    training_config: str | None = None
    source: str = ""
    global_step: int | None = None

    @classmethod
    def from_module(cls, drafter: nn.Module, target_config: dict[str, Any], **kwargs: Any) -> TrainedDrafter:
        """Wrap an in-memory drafter (``DSpark``/``DFlash``/``Eagle3``) for export."""
        return cls(config=drafter.config, state_dict=dict(drafter.state_dict()),
                   target_config=copy.deepcopy(target_config), **kwargs)


# ---------------------------------------------------------------------- drafters
def shape_mismatches(expected: dict[str, tuple[int, ...]],
                     got: dict[str, tuple[int, ...]]) -> tuple[list[str], list[str], list[str]]:
    """Tensor names ``got`` lacks, names it has in excess, and ``"name shape (expected shape)"`` for the rest."""
    wrong = sorted(f"{k} {got[k]} (expected {expected[k]})" for k in set(got) & set(expected) if got[k] != expected[k])
    return sorted(set(expected) - set(got)), sorted(set(got) - set(expected)), wrong


def check_state_dict(config: DrafterConfig, state_dict: dict[str, Tensor], where: str) -> None:
    """Raise if ``state_dict`` does not hold exactly the tensors (names and shapes) the drafter has."""
    expected = {k: tuple(v.shape) for k, v in build(config, "meta").state_dict().items()}
    missing, unexpected, wrong = shape_mismatches(expected, {k: tuple(v.shape) for k, v in state_dict.items()})
    if missing or unexpected or wrong:
        raise ValueError(
            f"{where} does not match a {config.algorithm} drafter with this config: missing {missing}, unexpected "
            f"{unexpected}, wrong shapes {wrong}. Was it written by another version of the drafter code?"
        )


def instantiate(config: DrafterConfig, state_dict: dict[str, Tensor], dtype: torch.dtype | None = None) -> nn.Module:
    """Build the drafter and load ``state_dict`` strictly; tensors keep the file's dtype unless ``dtype`` is given.

    ``assign=True`` adopts the tensors as they are (no silent up-cast into fp32 parameters) while keeping each
    parameter's ``requires_grad``; non-persistent buffers (rotary frequencies) stay fp32 as at construction.
    """
    check_state_dict(config, state_dict, "The weights")
    model = build(config)
    # Fresh, aligned copies: no model memory stays mapped to a file, and kernels see the same alignment whatever
    # the tensors were read from (mmap'd checkpoint, safetensors), so equal weights give bit-equal outputs.
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).clone()
               for k, v in state_dict.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval()


# ---------------------------------------------------------------------- safe unpickling
class _Recorded:
    """Inert stand-in for one of our pickled objects: keeps the pickled state, runs no code of the original."""

    qualified_name = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["_args"] = args

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state


def _stand_in(name: str) -> type:
    return type(name.rsplit(".", 1)[-1], (_Recorded,), {"qualified_name": name})


def _safe_load(path: Path) -> dict[str, Any]:
    names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    foreign = sorted(n for n in names if not n.startswith(OUR_PACKAGE))
    if foreign:
        raise ValueError(
            f"Checkpoint {path} contains pickled objects of {foreign}, which dspark_lightning did not write; "
            f"refusing to unpickle them. Re-save the checkpoint with plain hyper-parameters (LightningCLI does)."
        )
    with torch.serialization.safe_globals([(_stand_in(n), n) for n in names]):
        data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(data, dict) or "state_dict" not in data:
        raise ValueError(f"{path} is not a Lightning checkpoint (no 'state_dict').")
    return data


def plain(value: Any) -> Any:
    """Hyper-parameters as JSON-able data: stand-ins become their recorded fields, references their names."""
    if isinstance(value, _Recorded):
        state = value.__dict__.get("_state")
        return plain(state) if isinstance(state, dict) else type(value).qualified_name
    if isinstance(value, type) and issubclass(value, _Recorded):
        return value.qualified_name
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if isinstance(value, Tensor):
        return value.tolist() if value.numel() <= 16 else f"<tensor {tuple(value.shape)}>"
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (type, types.FunctionType)):  # a real reference (torch's safe list rebuilt it): its name
        return f"{value.__module__}.{value.__qualname__}"
    return repr(value)


# ---------------------------------------------------------------------- target config
def namespace(config: dict[str, Any]) -> types.SimpleNamespace:
    """An attribute view of an HF config dict (nested ``text_config`` too), enough for ``DrafterConfig.resolve``.

    The aliases of the model type's transformers config class are added as the class would answer them (DeepSeek-V4:
    ``intermediate_size`` is ``moe_intermediate_size``), since ``config.json`` holds the canonical names only.
    """
    data = dict(config)
    if isinstance(data.get("text_config"), dict):
        data["text_config"] = namespace(data["text_config"])
    for alias, name in _attribute_map(data.get("model_type")).items():
        if alias not in data and name in data:
            data[alias] = data[name]
    return types.SimpleNamespace(**data)


def _attribute_map(model_type: Any) -> dict[str, str]:
    if not isinstance(model_type, str):
        return {}
    from transformers import CONFIG_MAPPING  # imported only when a config is read

    try:
        return dict(getattr(CONFIG_MAPPING[model_type], "attribute_map", None) or {})
    except (KeyError, ValueError, ImportError):
        return {}


def target_config_from_dir(target_dir: str | Path) -> dict[str, Any]:
    path = Path(target_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"--target_dir {target_dir} has no config.json; give the target's HF model directory.")
    return read_json(path)


def _target_config_from_hparams(target: dict[str, Any] | None) -> dict[str, Any]:
    if not target:
        raise ValueError("The checkpoint names no target; pass --target_dir (the target's HF model directory).")
    from ..targets import TargetConfig, load_target_config  # transformers: imported only when needed

    try:
        hf_config = load_target_config(TargetConfig.from_dict(target))
    except (OSError, ValueError) as e:
        raise ValueError(
            f"Cannot read the config of the checkpoint's target {target.get('path') or 'tiny'!r} ({e}). Pass "
            f"--target_dir with the target's HF model directory."
        ) from e
    data = {k: v for k, v in hf_config.to_diff_dict().items() if not k.startswith("_") and k != "transformers_version"}
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(data.get("model_type", ""))
    if arch and not data.get("architectures"):
        data["architectures"] = [arch]
    return data


# ---------------------------------------------------------------------- the checkpoint
def _training_config_text(ckpt: Path, drafter: dict[str, Any]) -> str | None:
    """LightningCLI's ``config.yaml`` of the run, if it sits next to the checkpoint and matches its drafter."""
    import yaml

    candidates = [ckpt.parent / "config.yaml"]
    if ckpt.parent.name == "checkpoints":
        candidates.append(ckpt.parent.parent / "config.yaml")
    for path in candidates:
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        try:
            parsed = yaml.safe_load(text) or {}
        except yaml.YAMLError:
            continue
        saved = (parsed.get("model") or {}).get("drafter") if isinstance(parsed, dict) else None
        if isinstance(saved, dict) and all(drafter.get(k) == v for k, v in saved.items()):
            return text
    return None


def read_checkpoint(ckpt: str | Path, target_dir: str | Path | None = None) -> TrainedDrafter:
    """Read a ``DrafterModule`` checkpoint into a :class:`TrainedDrafter`.

    Args:
        ckpt: path of the ``.ckpt`` file.
        target_dir: the target's HF model directory; its ``config.json`` resolves the drafter geometry (default:
            the checkpoint's own record, else the target named in its hyper-parameters).

    Raises:
        FileNotFoundError: ``ckpt`` does not exist.
        ValueError: not a drafter checkpoint, foreign pickled objects, or weights that do not fit the config.
    """
    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist (--ckpt); give a DrafterModule .ckpt file.")
    data = _safe_load(path)
    hparams = plain(data.get("hyper_parameters") or {})
    info = plain(data.get(EXPORT_INFO_KEY) or {})
    prefix = "drafter."
    state_dict = {k[len(prefix):]: v for k, v in data["state_dict"].items() if k.startswith(prefix)}
    if not state_dict:
        raise ValueError(f"{path} has no 'drafter.*' tensors: is it a DrafterModule checkpoint?")
    drafter = info.get("drafter_config") or hparams.get("drafter")
    if not isinstance(drafter, dict):
        raise ValueError(f"{path} has no drafter hyper-parameters (hyper_parameters['drafter']).")
    target = hparams.get("target") if isinstance(hparams.get("target"), dict) else None
    if target_dir is not None:
        target_config = target_config_from_dir(target_dir)
    elif isinstance(info.get("target_config"), dict):
        target_config = info["target_config"]
    else:
        target_config = _target_config_from_hparams(target)
    where = f"the target ({target_dir or 'recorded in the checkpoint'})"
    _check_family(drafter.get("algorithm"), target_config, where)
    _check_vocab_geometry(target_config, state_dict, where)
    config = DrafterConfig.from_dict(drafter).resolve(namespace(target_config))
    check_state_dict(config, state_dict, f"Checkpoint {path}")
    return TrainedDrafter(
        config=config, state_dict=state_dict, target_config=target_config, target=target,
        hyper_parameters=hparams,
        training_config=info.get("training_config") or _training_config_text(path, drafter),
        source=path.name, global_step=data.get("global_step"),
    )


def _check_family(algorithm: str | None, target_config: dict[str, Any], where: str) -> None:
    """A DeepSeek-V4 drafter (``dspark_v4``) goes with a DeepSeek-V4 target, and only with one."""
    text = target_config.get("text_config") if isinstance(target_config.get("text_config"), dict) else target_config
    model_type = text.get("model_type") or target_config.get("model_type")
    if (algorithm == "dspark_v4") != (model_type in V4_MODEL_TYPES):
        raise ValueError(
            f"The checkpoint's drafter is algorithm {algorithm!r} but {where} has model_type={model_type!r}: "
            f"'dspark_v4' drafters belong to DeepSeek-V4 targets (model_type in {V4_MODEL_TYPES}) and only they. Pass "
            f"the target it was trained for as --target_dir."
        )


def _check_vocab_geometry(target_config: dict[str, Any], state_dict: dict[str, Tensor], where: str) -> None:
    """The trained embedding fixes vocab and hidden size; a target config that disagrees is the wrong target."""
    embed = state_dict.get("embed_tokens.weight")
    text = target_config.get("text_config") if isinstance(target_config.get("text_config"), dict) else target_config
    if embed is None or embed.dim() != 2:
        return
    vocab, hidden = embed.shape
    theirs = (text.get("vocab_size"), text.get("hidden_size"))
    if theirs != (vocab, hidden):
        raise ValueError(
            f"The checkpoint's drafter has vocab_size={vocab}, hidden_size={hidden} (embed_tokens.weight) but "
            f"{where} has vocab_size={theirs[0]}, hidden_size={theirs[1]}: not the target it was trained for. "
            f"Pass the right --target_dir."
        )


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def base_model_of(trained: TrainedDrafter) -> str | None:
    """The target's Hub id when the checkpoint names one (a local path or a tiny target has none)."""
    for candidate in ((trained.target or {}).get("path"), trained.target_config.get("_name_or_path")):
        if isinstance(candidate, str) and HUB_ID.fullmatch(candidate) and not Path(candidate).exists():
            return candidate
    return None
