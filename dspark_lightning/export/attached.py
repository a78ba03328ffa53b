"""``attached``: the draft written into a copy of the target checkpoint, so one repository serves both.

Two layouts, the two SGLang's ``_handle_dspark`` auto-detects when ``--speculative-draft-model-path`` is omitted
(SGLang 0.5.23 ``python/sglang/srt/arg_groups/speculative_hook.py``):

- ``subfolder`` (default): ``dspark/config.json`` + ``dspark/model.safetensors``, an SGLang DSPARK draft directory
  whose embedding and head are the target's. The target files are untouched. Works for any target family.
- ``bundled``: the draft tensors in a new shard listed in ``model.safetensors.index.json`` (created when the
  target is one ``model.safetensors``), and ``dspark_*`` keys (``dspark_block_size``, ``dspark_markov_rank``,
  ``dspark_markov_head_type``, ``dspark_noise_token_id``, ``dspark_target_layer_ids``) in the target
  ``config.json``. SGLang 0.5.23 serves a bundled draft only for DeepSeek-V4 targets (it remaps the architecture
  to ``DeepseekV4ForCausalLMDSpark``, tensors ``mtp.<stage>.*``), so only the ``deepseek_v4`` flavour writes it.
  For a Qwen3/Llama target SGLang would build the target's own class as the draft and fail on the draft tensors
  (``KeyError: 'dspark.layers.0.mlp.gate_up_proj.weight'``): the generic flavour refuses ``bundled`` and writes
  ``subfolder`` only. Generic bundled copies written by earlier versions (``dspark.<name>`` tensors) still read
  back with :func:`read_bundled`.

Target files are hard-linked (copied across filesystems) and never rewritten: ``config.json`` and the index are
written as new files in the copy. How the draft is checked, named and described inside the target is an
:class:`AttachedFlavour`: ``generic`` here (Qwen3/Llama targets, draft tensors ``dspark.<name>``) and
``deepseek_v4`` in ``export/v4.py`` (``dspark_v4`` drafters, official ``mtp.<stage>.*`` tensors, bundled only).
A flavour may claim tensor names the target already holds (DeepSeek-V4's own MTP module is ``mtp.0.*``): those are
left out of the copy, and a target shard that mixes them with other tensors is written anew, under another name,
without them (the original file is never modified).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from ..drafters import DrafterConfig
from ..drafters.config import V4_MODEL_TYPES
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
DRAFT_SHARD_STEM = "model-dspark-draft"
# Draft shards larger than this are split (``model-dspark-draft-00001-of-0000N.safetensors``), as HF checkpoints are.
MAX_DRAFT_SHARD_BYTES = 5 * 1024**3
# A target shard that mixes tensors the flavour drops with tensors it keeps is rewritten as ``<stem>-<suffix>``.
REWRITTEN_SUFFIX = "-without-mtp.safetensors"
LAYOUTS = ("subfolder", "bundled")
# Keys whose presence in a target config.json makes SGLang treat the checkpoint as carrying a bundled draft.
SGLANG_BUNDLE_KEYS = ("dspark_block_size", "dspark_markov_rank", "dspark_noise_token_id", "dspark_target_layer_ids")
# Official DeepSeek-V4 checkpoints name them ``embed.weight`` / ``head.weight`` (transformers' save_pretrained of V4
# writes ``model.embed_tokens.weight`` / ``head.weight``).
_EMBED_NAMES = ("model.embed_tokens.weight", "embed_tokens.weight", "model.language_model.embed_tokens.weight",
                "embed.weight")
_HEAD_NAMES = ("lm_head.weight", "head.weight")


class AttachedFlavour:
    """How a draft is written into (and read out of) a target checkpoint.

    This generic flavour serves Qwen3/Llama-style targets: the draft is an SGLang DSPARK draft (checked with
    ``sglang.prepare``), bundled tensors are named ``dspark.<drafter name>``, and the target ``config.json`` gets
    SGLang's ``dspark_*`` keys plus ours. A flavour for another family subclasses it and overrides what differs:
    ``export/v4.py``'s ``DeepseekV4Flavour`` (``layouts = ("bundled",)``, ``mtp.<stage>.*`` names, the target's own
    MTP module dropped through :attr:`drops_target_tensors`), registered in :data:`FLAVOURS` on import.
    """

    name = "generic"
    layouts: tuple[str, ...] = ("subfolder",)
    # Why a layout is not written for this flavour (named in the refusal).
    refused_layouts = {
        "bundled": "SGLang 0.5.23 loads a draft bundled into the target's own files only for DeepseekV4ForCausalLM "
                   "targets (as DeepseekV4ForCausalLMDSpark); for this target it would build the target's own class "
                   "as the draft and fail on the draft tensors (KeyError: 'dspark.layers.0.mlp.gate_up_proj.weight'). "
                   "Use attached_layout='subfolder' (the default): SGLang finds the dspark/ draft by itself",
    }
    weight_prefix = "dspark."
    # True: target tensors that :meth:`is_bundled` claims are the target's own (not a draft) and are left out of the
    # copy (with a warning saying ``dropped_what``); False: such a target is refused as already carrying a draft.
    drops_target_tensors = False
    dropped_what = ""

    def check(self, trained: TrainedDrafter, target_config: dict[str, Any], target_dir: Path) -> None:
        """Raise unless this drafter can be attached to this target (algorithm, geometry, servability)."""
        cfg = trained.config
        if cfg.algorithm == "dspark_v4":
            raise ValueError("A dspark_v4 drafter is attached with flavour 'deepseek_v4' (the default for it), not "
                             f"{self.name!r}.")
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


def flavours() -> dict[str, AttachedFlavour]:
    """The registered flavours; ``export/v4.py`` registers ``deepseek_v4`` when imported (done here, on first use,
    so importing the export package does not import transformers' DeepSeek-V4 code)."""
    from . import v4  # noqa: F401

    return FLAVOURS


def default_flavour(cfg: DrafterConfig) -> str:
    """``deepseek_v4`` for a ``dspark_v4`` drafter, else ``generic``."""
    return "deepseek_v4" if cfg.algorithm == "dspark_v4" else "generic"


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
                   layout: str | None = None, flavour: str | None = None) -> Path:
    """Write the target copy with the draft attached into ``stage``; returns where the draft's card belongs.

    Args:
        layout: ``subfolder`` or ``bundled`` (default: the flavour's first layout).
        flavour: how the draft is named inside the target (default: :func:`default_flavour`).

    Raises:
        ValueError: unknown layout/flavour, a drafter that does not fit the target, or an already-attached target.
    """
    flavour = flavour or default_flavour(trained.config)
    registry = flavours()
    if flavour not in registry:
        raise ValueError(f"flavour={flavour!r} is unknown; registered flavours are {sorted(registry)}.")
    style = registry[flavour]
    layout = layout or style.layouts[0]
    if layout not in style.layouts:
        why = style.refused_layouts.get(layout)
        raise ValueError(f"attached_layout={layout!r} is not available for the {flavour} flavour"
                         + (f": {why}." if why else f"; choose one of {style.layouts}."))
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
    named = style.bundle_tensors(trained, target_config, dtype)
    mapping = weight_map(target_dir)
    plan = _plan_target_files(target_dir, mapping, named, style)
    _link_tree(target_dir, stage, skip={"config.json", SAFE_INDEX, *plan.not_linked})
    _write_bundled(stage, target_dir, mapping, plan, named, cast,
                   {**target_config, **style.config_keys(trained.config)}, style)
    return stage


@dataclasses.dataclass
class _TargetPlan:
    """What happens to the target's tensors in a bundled copy: ``dropped`` names (claimed by the flavour as the
    target's own, e.g. V4's MTP module), shards left out (``removed``: only dropped tensors) or written anew
    without them (``rewritten``: old file -> new file); every other shard is hard-linked."""

    dropped: set[str]
    removed: set[str]
    rewritten: dict[str, str]

    @property
    def not_linked(self) -> set[str]:
        return self.removed | set(self.rewritten)


def _plan_target_files(target_dir: Path, mapping: dict[str, str], named: dict[str, Tensor],
                       style: AttachedFlavour) -> _TargetPlan:
    files = set(mapping.values())
    claimed = sorted(n for n in mapping if style.is_bundled(n) or n in named)
    ours = sorted(f for f in files if Path(f).name.startswith(DRAFT_SHARD_STEM))
    if ours or (claimed and not style.drops_target_tensors):
        raise ValueError(f"The target {target_dir} already has tensors {claimed[:5]} / files {ours[:3]} named like "
                         f"a bundled draft; give the plain target checkpoint.")
    dropped = set(claimed)
    plan = _TargetPlan(dropped=dropped, removed=set(), rewritten={})
    if not dropped:
        return plan
    for file in sorted({mapping[n] for n in dropped}):
        if all(n in dropped for n, f in mapping.items() if f == file):
            plan.removed.add(file)
            continue
        new = re.sub(r"\.safetensors$", "", file) + REWRITTEN_SUFFIX
        if new in files or (target_dir / new).exists():
            raise ValueError(f"Cannot write {file} without the target's {style.dropped_what}: {new} already exists "
                             f"in {target_dir}.")
        plan.rewritten[file] = new
    shown = ", ".join(sorted(dropped)[:3]) + (", ..." if len(dropped) > 3 else "")
    actions = [f"{f} (only such tensors) is not copied" for f in sorted(plan.removed)]
    actions += [f"{old} is written anew as {new} without them" for old, new in sorted(plan.rewritten.items())]
    warnings.warn(
        f"The target {target_dir} holds {len(dropped)} tensors under the draft's names ({shown}): "
        f"{style.dropped_what}. They are left out of the copy: {'; '.join(actions)}. The original files are not "
        f"modified; the other target shards are hard links.", stacklevel=3,
    )
    return plan


def _link_tree(src: Path, dst: Path, skip: set[str]) -> None:
    for root, dirs, files in os.walk(src):
        dirs[:] = [d for d in dirs if d != ".git"]
        rel = Path(root).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for file in files:
            if (rel / file).as_posix() in skip:
                continue
            link_or_copy(Path(root) / file, dst / rel / file)


def _draft_shards(named: dict[str, Tensor], cast: torch.dtype, max_bytes: int) -> list[list[str]]:
    """Tensor names per draft shard, in order, each shard at most ``max_bytes`` (a larger tensor alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in named.items():
        nbytes = t.numel() * (cast.itemsize if t.is_floating_point() else t.element_size())
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_bundled(stage: Path, target_dir: Path, mapping: dict[str, str], plan: _TargetPlan,
                   named: dict[str, Tensor], cast: torch.dtype, config: dict[str, Any], style: AttachedFlavour,
                   max_shard_bytes: int | None = None) -> None:
    """Draft shard(s) + index entries + config keys; the target's shards stay as linked (see :class:`_TargetPlan`)."""
    index = read_json(target_dir / SAFE_INDEX) if (target_dir / SAFE_INDEX).is_file() else {"metadata": {}}
    new_map = {n: plan.rewritten.get(f, f) for n, f in mapping.items() if n not in plan.dropped}
    for old, new in sorted(plan.rewritten.items()):
        kept = [n for n, f in mapping.items() if f == old and n not in plan.dropped]
        with safe_open(str(target_dir / old), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
        save_tensors(read_named(target_dir, kept, mapping), stage / new, metadata=metadata)
    shards = _draft_shards(named, cast, max_shard_bytes or MAX_DRAFT_SHARD_BYTES)
    for i, names in enumerate(shards):
        file = DRAFT_SHARD if len(shards) == 1 else f"{DRAFT_SHARD_STEM}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_tensors(cast_floating({n: named[n] for n in names}, cast), stage / file,
                     metadata={"dspark_flavour": style.name})
        new_map.update(dict.fromkeys(names, file))
    index["weight_map"] = new_map
    metadata = index.setdefault("metadata", {})
    metadata["total_size"] = sum(sum(tensor_nbytes(stage / file).values()) for file in sorted(set(new_map.values())))
    if metadata.get("total_parameters") is not None:  # transformers >= 5 records it; keep it true for the copy
        metadata["total_parameters"] = (int(metadata["total_parameters"]) + sum(t.numel() for t in named.values())
                                        - _numel(target_dir, mapping, plan.dropped))
    write_json(stage / SAFE_INDEX, index)
    write_json(stage / "config.json", config)
    verify_index(stage)


def _numel(directory: Path, mapping: dict[str, str], names: set[str]) -> int:
    """Elements of tensors ``names`` of a checkpoint, from the file headers."""
    total = 0
    for file in sorted({mapping[n] for n in names}):
        with safe_open(str(directory / file), framework="pt", device="cpu") as f:
            for name in (n for n in names if mapping[n] == file):
                total += math.prod(f.get_slice(name).get_shape())
    return total


def bundled_files(directory: Path) -> tuple[str, ...]:
    """The files a bundled export wrote at the top level of the target copy (for the model card)."""
    files = set(read_json(directory / SAFE_INDEX)["weight_map"].values())
    written = sorted(f for f in files if Path(f).name.startswith(DRAFT_SHARD_STEM) or f.endswith(REWRITTEN_SUFFIX))
    return (*written, "config.json", SAFE_INDEX)


# ---------------------------------------------------------------------- reading back
def is_attached(directory: Path) -> bool:
    if (directory / SUBFOLDER / "config.json").is_file():
        return True
    config_path = directory / "config.json"
    return config_path.is_file() and any(k in read_json(config_path) for k in SGLANG_BUNDLE_KEYS)


def bundle_flavour(config: dict[str, Any]) -> str:
    """Flavour of a bundled checkpoint: its ``dspark_flavour`` key (ours), else by the target family (a DeepSeek-V4
    checkpoint bundled by others carries ``mtp.<stage>.*`` tensors)."""
    if config.get("dspark_flavour"):
        return str(config["dspark_flavour"])
    return "deepseek_v4" if config.get("model_type") in V4_MODEL_TYPES else "generic"


def read_bundled(directory: Path) -> tuple[DrafterConfig, dict[str, Tensor]]:
    """Drafter config and tensors of a bundled attached checkpoint (without the target's embedding/head)."""
    config = read_json(directory / "config.json")
    name = bundle_flavour(config)
    style = flavours().get(name)
    if style is None:
        raise ValueError(f"{directory} bundles a draft of flavour {name!r}, which is not registered; known: "
                         f"{sorted(FLAVOURS)}.")
    mapping = weight_map(directory)
    tensors = read_named(directory, sorted(n for n in mapping if style.is_bundled(n)), mapping)
    return style.drafter_config(config), style.unbundle(tensors)
