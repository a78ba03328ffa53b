"""``attached``: the draft written into a copy of the target checkpoint, so one repository serves both.

Two layouts, the two SGLang's ``_handle_dspark`` auto-detects when ``--speculative-draft-model-path`` is omitted
(reference notes: SGLang §3; SGLang 0.5.23 ``arg_groups/speculative_hook.py``):

- ``subfolder`` (default): ``dspark/config.json`` + ``dspark/model.safetensors``, an SGLang DSPARK draft directory
  whose embedding and head are the target's. The target files are untouched. Works for any target family.
- ``bundled``: the draft tensors in a new shard listed in ``model.safetensors.index.json`` (created when the
  target is one ``model.safetensors``), and ``dspark_*`` keys (``dspark_block_size``, ``dspark_markov_rank``,
  ``dspark_markov_head_type``, ``dspark_noise_token_id``, ``dspark_target_layer_ids``) in the target
  ``config.json``. SGLang 0.5.23 serves a bundled draft only for DeepSeek-V4 targets (it remaps the architecture
  to ``DeepseekV4ForCausalLMDSpark``, tensors ``mtp.<stage>.*``); for Qwen3/Llama targets the bundled copy serves
  transformers and :func:`load_drafter`, and SGLang's Qwen3/Llama weight loaders would trip over the extra
  ``*_proj`` tensors in the index: use ``subfolder`` there.

Target files are hard-linked (copied across filesystems) and never rewritten: ``config.json`` and the index are
written as new files in the copy. How the draft is checked, named and described inside the target is an
:class:`AttachedFlavour` (``generic`` here); a DeepSeek-V4 flavour subclasses it (see its docstring).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any

from torch import Tensor

from ..drafters import DrafterConfig
from .checkpoint import TrainedDrafter
from .common import check_geometry, drafter_config_from_json, exported_by, heads
from .fileio import (
    SAFE_INDEX,
    SAFE_WEIGHTS,
    cast_floating,
    link_or_copy,
    load_tensors,
    read_json,
    save_tensors,
    tensor_nbytes,
    torch_dtype,
    write_json,
)
from .sglang import check_servable, prepare

SUBFOLDER = "dspark"
DRAFT_SHARD = "model-dspark-draft.safetensors"
LAYOUTS = ("subfolder", "bundled")
# Keys whose presence in a target config.json makes SGLang treat the checkpoint as carrying a bundled draft.
SGLANG_BUNDLE_KEYS = ("dspark_block_size", "dspark_markov_rank", "dspark_noise_token_id", "dspark_target_layer_ids")
_EMBED_NAMES = ("model.embed_tokens.weight", "embed_tokens.weight", "model.language_model.embed_tokens.weight")
_HEAD_NAMES = ("lm_head.weight",)


class AttachedFlavour:
    """How a draft is written into (and read out of) a target checkpoint.

    This generic flavour serves Qwen3/Llama-style targets: the draft is an SGLang DSPARK draft (checked with
    ``sglang.prepare``), bundled tensors are named ``dspark.<drafter name>``, and the target ``config.json`` gets
    SGLang's ``dspark_*`` keys plus ours. A flavour for another family subclasses it and overrides what differs;
    for DeepSeek-V4: ``layouts = ("bundled",)``, :meth:`check` (algorithm ``dspark_v4``, the target's own MTP module
    must not stay readable), :meth:`bundle_tensors` / :meth:`unbundle` with ``drafters.dspark_v4.v4_to_mtp_names`` /
    ``mtp_to_v4_names`` (``mtp.<stage>.*``), :meth:`is_bundled` (``mtp.``), :meth:`config_keys` with
    ``v4_config_keys``; then ``FLAVOURS["deepseek_v4"] = DeepseekV4Flavour()``.
    """

    name = "generic"
    layouts: tuple[str, ...] = LAYOUTS
    weight_prefix = "dspark."

    def check(self, trained: TrainedDrafter, target_config: dict[str, Any], target_dir: Path) -> None:
        """Raise unless this drafter can be attached to this target (algorithm, geometry, servability)."""
        cfg = trained.config
        if cfg.algorithm != "dspark":
            raise ValueError(f"--format attached needs a DSpark drafter (SGLang auto-detects DSpark drafts only); "
                             f"this one is {cfg.algorithm!r}: use --format sglang or hf.")
        check_geometry(cfg, target_config, f"the target {target_dir}")
        check_servable(cfg)

    def draft_directory(self, trained: TrainedDrafter, target_config: dict[str, Any],
                        dtype: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """``config.json`` and tensors of the ``dspark/`` subfolder: an SGLang DSPARK draft directory."""
        _, config, tensors = prepare(dataclasses.replace(trained, target_config=target_config), dtype)
        config["exported_by"]["format"] = "attached-subfolder"
        return config, tensors

    def bundle_tensors(self, trained: TrainedDrafter, target_config: dict[str, Any],
                       dtype: str) -> dict[str, Tensor]:
        """The draft tensors under their names inside the target (the ones SGLang loads; embed/head are shared)."""
        _, _, tensors = prepare(dataclasses.replace(trained, target_config=target_config), dtype)
        return {self.weight_prefix + k: v for k, v in tensors.items()}

    def is_bundled(self, name: str) -> bool:
        """Whether a tensor of the target index belongs to the bundled draft."""
        return name.startswith(self.weight_prefix)

    def unbundle(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Inverse of :meth:`bundle_tensors` (without the target-shared embedding/head)."""
        return {k[len(self.weight_prefix):]: v for k, v in tensors.items()}

    def config_keys(self, cfg: DrafterConfig) -> dict[str, Any]:
        """Keys added to the target ``config.json``: SGLang's ``dspark_*`` bundle keys, then ours."""
        head = heads(cfg)
        return {
            "dspark_block_size": cfg.block_size, "dspark_markov_rank": head["markov_rank"],
            "dspark_markov_head_type": head["markov_head_type"], "dspark_noise_token_id": cfg.mask_token_id,
            "dspark_target_layer_ids": list(cfg.target_layer_ids), "dspark_num_hidden_layers": cfg.num_hidden_layers,
            "dspark_enable_confidence_head": head["enable_confidence_head"],
            "dspark_confidence_head_with_markov": head["confidence_head_with_markov"],
            "dspark_sample_from_anchor": cfg.block_layout == "deepspec", "dspark_flavour": self.name,
            "dspark_exported_by": exported_by(cfg, "attached-bundled"),
        }

    def drafter_config(self, config: dict[str, Any]) -> DrafterConfig:
        """Inverse of :meth:`config_keys`: the drafter config of a target ``config.json`` carrying a bundle."""
        rank = int(config.get("dspark_markov_rank") or 0)
        fields = {
            "algorithm": "dspark", "num_hidden_layers": int(config["dspark_num_hidden_layers"]),
            "block_size": int(config["dspark_block_size"]), "mask_token_id": config["dspark_noise_token_id"],
            "target_layer_ids": list(config["dspark_target_layer_ids"]), "markov_rank": rank,
            "markov_head_type": config.get("dspark_markov_head_type") or "vanilla",
            "enable_confidence_head": bool(config.get("dspark_enable_confidence_head", False)),
            "confidence_head_with_markov": bool(config.get("dspark_confidence_head_with_markov", False)),
            "block_layout": "deepspec" if config.get("dspark_sample_from_anchor", True) else "zlab",
            "qk_norm": True, "embed_scale": 1.0,
        }
        data = {**config, "num_target_layers": config.get("num_hidden_layers"),
                "exported_by": config.get("dspark_exported_by")}
        return drafter_config_from_json(data, fields, compare=("block_size", "block_layout", "mask_token_id",
                                                               "target_layer_ids", "num_hidden_layers"))


FLAVOURS: dict[str, AttachedFlavour] = {"generic": AttachedFlavour()}


# ---------------------------------------------------------------------- the target checkpoint
def weight_map(target_dir: Path) -> dict[str, str]:
    """Tensor name -> file name of a target checkpoint (index, or the single ``model.safetensors``)."""
    if (target_dir / SAFE_INDEX).is_file():
        return dict(read_json(target_dir / SAFE_INDEX)["weight_map"])
    if (target_dir / SAFE_WEIGHTS).is_file():
        return dict.fromkeys(tensor_nbytes(target_dir / SAFE_WEIGHTS), SAFE_WEIGHTS)
    raise FileNotFoundError(
        f"Target directory {target_dir} has neither {SAFE_WEIGHTS} nor {SAFE_INDEX}; give a safetensors HF checkpoint."
    )


def read_named(directory: Path, names: list[str], mapping: dict[str, str] | None = None) -> dict[str, Tensor]:
    mapping = mapping if mapping is not None else weight_map(directory)
    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(mapping[name], []).append(name)
    out: dict[str, Tensor] = {}
    for file, file_names in by_file.items():
        out.update(load_tensors(directory / file, file_names))
    return out


def target_vocab_tensors(target_dir: Path) -> dict[str, Tensor]:
    """The target's input embedding and output head as the drafter names them (``embed_tokens``/``lm_head``)."""
    mapping = weight_map(target_dir)
    embed = next((n for n in _EMBED_NAMES if n in mapping), None)
    if embed is None:
        raise ValueError(f"No input embedding ({' / '.join(_EMBED_NAMES)}) in the target checkpoint {target_dir}.")
    head = next((n for n in _HEAD_NAMES if n in mapping), embed)  # absent head = tied embeddings
    tensors = read_named(target_dir, sorted({embed, head}), mapping)
    return {"embed_tokens.weight": tensors[embed], "lm_head.weight": tensors[head]}


def verify_index(directory: Path) -> None:
    """Raise unless ``model.safetensors.index.json`` lists every tensor of its files exactly once, each file exists,
    and ``metadata.total_size`` is the sum of their tensor bytes."""
    index = read_json(directory / SAFE_INDEX)
    mapping: dict[str, str] = index["weight_map"]
    total = 0
    for file in sorted(set(mapping.values())):
        if not (directory / file).is_file():
            raise ValueError(f"{SAFE_INDEX} of {directory} lists {file}, which does not exist.")
        sizes = tensor_nbytes(directory / file)
        listed = {n for n, f in mapping.items() if f == file}
        if listed != set(sizes):
            raise ValueError(f"{SAFE_INDEX} of {directory} and {file} disagree: only in the index "
                             f"{sorted(listed - set(sizes))}, only in the file {sorted(set(sizes) - listed)}.")
        total += sum(sizes.values())
    declared = (index.get("metadata") or {}).get("total_size")
    if declared is not None and int(declared) != total:
        raise ValueError(f"{SAFE_INDEX} of {directory} declares total_size={declared}, but its files hold "
                         f"{total} bytes.")


def _check_heads_match(trained: TrainedDrafter, target: dict[str, Tensor], target_dir: Path) -> None:
    """The drafter's frozen embedding/head copies must be the target's: at serving time the target's are used."""
    for name, theirs in target.items():
        ours = trained.state_dict.get(name)
        if ours is None:
            continue
        if tuple(ours.shape) != tuple(theirs.shape) or not ours.to(theirs.dtype).equal(theirs):
            raise ValueError(
                f"The drafter's {name} differs from the target's in {target_dir}: the drafter was trained against "
                f"another checkpoint (served with this target, its acceptance would collapse). Export against the "
                f"target it was trained with."
            )


# ---------------------------------------------------------------------- writing
def write_attached(trained: TrainedDrafter, stage: Path, *, target_dir: str | Path, dtype: str,
                   layout: str = "subfolder", flavour: str = "generic") -> Path:
    """Write the target copy with the draft attached into ``stage``; returns where the draft's card belongs.

    Raises:
        ValueError: unknown layout/flavour, a drafter that does not fit the target, or an already-attached target.
    """
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour={flavour!r} is unknown; registered flavours are {sorted(FLAVOURS)}.")
    style = FLAVOURS[flavour]
    if layout not in style.layouts:
        raise ValueError(f"attached_layout={layout!r} is not available for the {flavour} flavour; choose one of "
                         f"{style.layouts}.")
    target_dir = Path(target_dir)
    if not (target_dir / "config.json").is_file():
        raise FileNotFoundError(f"--target_dir {target_dir} has no config.json; give the target's HF model directory.")
    target_config = read_json(target_dir / "config.json")
    style.check(trained, target_config, target_dir)
    if (target_dir / SUBFOLDER).exists() or any(k in target_config for k in SGLANG_BUNDLE_KEYS):
        raise ValueError(f"The target {target_dir} already carries a DSpark draft ({SUBFOLDER}/ or dspark_* keys); "
                         f"give the plain target checkpoint.")
    _check_heads_match(trained, target_vocab_tensors(target_dir), target_dir)
    cast = torch_dtype(dtype)
    if layout == "subfolder":
        draft_config, tensors = style.draft_directory(trained, target_config, dtype)
        _link_tree(target_dir, stage, skip=set())
        (stage / SUBFOLDER).mkdir()
        write_json(stage / SUBFOLDER / "config.json", draft_config)
        save_tensors(cast_floating(tensors, cast), stage / SUBFOLDER / SAFE_WEIGHTS)
        return stage / SUBFOLDER
    if style.name == "generic":
        warnings.warn(
            "attached_layout='bundled' with the generic flavour: SGLang 0.5.23 serves bundled drafts only for "
            "DeepSeek-V4 targets, and its Qwen3/Llama loaders reject the extra tensors in the index. Use "
            "attached_layout='subfolder' to serve this target with SGLang.", stacklevel=2,
        )
    named = cast_floating(style.bundle_tensors(trained, target_config, dtype), cast)
    _link_tree(target_dir, stage, skip={"config.json", SAFE_INDEX})
    _write_bundled(stage, target_dir, named, {**target_config, **style.config_keys(trained.config)}, style)
    return stage


def _link_tree(src: Path, dst: Path, skip: set[str]) -> None:
    for root, dirs, files in os.walk(src):
        dirs[:] = [d for d in dirs if d != ".git"]
        rel = Path(root).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for file in files:
            if rel == Path(".") and file in skip:
                continue
            link_or_copy(Path(root) / file, dst / rel / file)


def _write_bundled(stage: Path, target_dir: Path, named: dict[str, Tensor], config: dict[str, Any],
                   style: AttachedFlavour) -> None:
    """New shard + index entries + config keys; the target's shards stay as linked."""
    if (target_dir / SAFE_INDEX).is_file():
        index = read_json(target_dir / SAFE_INDEX)
        total = int((index.get("metadata") or {}).get("total_size") or 0)
    else:
        sizes = tensor_nbytes(target_dir / SAFE_WEIGHTS)
        index = {"metadata": {}, "weight_map": dict.fromkeys(sizes, SAFE_WEIGHTS)}
        total = sum(sizes.values())
    clash = sorted(set(named) & set(index["weight_map"]))
    if clash or DRAFT_SHARD in set(index["weight_map"].values()):
        raise ValueError(f"The target {target_dir} already has tensors {clash[:5]} / a {DRAFT_SHARD}; give the plain "
                         f"target checkpoint.")
    total += save_tensors(named, stage / DRAFT_SHARD, metadata={"dspark_flavour": style.name})
    index["weight_map"].update(dict.fromkeys(named, DRAFT_SHARD))
    index.setdefault("metadata", {})["total_size"] = total
    write_json(stage / SAFE_INDEX, index)
    write_json(stage / "config.json", config)
    verify_index(stage)


# ---------------------------------------------------------------------- reading back
def is_attached(directory: Path) -> bool:
    if (directory / SUBFOLDER / "config.json").is_file():
        return True
    config_path = directory / "config.json"
    return config_path.is_file() and any(k in read_json(config_path) for k in SGLANG_BUNDLE_KEYS)


def read_bundled(directory: Path) -> tuple[DrafterConfig, dict[str, Tensor]]:
    """Drafter config and tensors of a bundled attached checkpoint (without the target's embedding/head)."""
    config = read_json(directory / "config.json")
    style = FLAVOURS.get(config.get("dspark_flavour", "generic"))
    if style is None:
        raise ValueError(f"{directory} bundles a draft of flavour {config.get('dspark_flavour')!r}, which is not "
                         f"registered; known: {sorted(FLAVOURS)}.")
    mapping = weight_map(directory)
    tensors = read_named(directory, sorted(n for n in mapping if style.is_bundled(n)), mapping)
    return style.drafter_config(config), style.unbundle(tensors)
