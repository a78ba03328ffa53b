"""Conformance of an exported drafter with the installed SGLang, on CPU.

    python -m dspark_sglang.check EXPORT_DIR [--target-vocab N] [--target PATH] [--sps-table F] [--json]

Steps (each failure is a line naming the problem; exit code 1 if there is any, 0 otherwise):

1. Read the export (:mod:`dspark_sglang.export_dir`) and check the config keys SGLang reads where it reads them
   (e.g. DSpark's head keys top level, not only nested under ``dflash_config``).
2. Parse the draft config with SGLang's own parsers (``parse_dspark_draft_config`` + ``resolve_runtime_config``,
   or ``parse_dflash_draft_config``); load the SPS table (given, or the export's ``sps.json``) with SGLang's loader.
3. Resolve server arguments with SGLang -- once from the config alone and once with the flags
   ``dspark_sglang.launch`` would pass -- as ``--device cuda`` (resolution needs no GPU): the worker class must be
   ``DSparkWorkerV2`` / ``DFlashWorkerV2`` / ``EAGLEWorkerV2``, the verify window gamma + 1 (DSpark), ``block_size``
   (DFlash) or Eagle3's trained chain, and the draft's dtype the exported one.
4. Build the draft class SGLang resolves from ``architectures`` (after loading the ``sglang.srt.plugins``
   entry points, as a server does), fill every parameter with NaN, load the export the way SGLang's
   ``DefaultModelLoader`` does, then require (a) every exported tensor to sit, value for value, in the parameter (or
   the slice of SGLang's fused ``qkv_proj``/``gate_up_proj``) it belongs to, and (b) every parameter to be loaded,
   except those SGLang fills from the target at runtime. DSpark: in ``SGLANG_RAGGED_VERIFY_MODE=static`` (no
   confidence head is built) and ``compact`` (the confidence head is built and required). A DeepSeek-V4 bundle:
   :mod:`dspark_sglang.check_v4`.
5. Numerics on random inputs, in float32, against :mod:`dspark_sglang.reference`: the Markov bias of every step
   of a block (vanilla / gated / rnn), the confidence (with the export's STS temperatures if it ships
   ``calibration.json``), and the context projection ``hidden_norm(fc(.))``. Eagle3: the hot-token map from ``d2t``.

Not covered on CPU: the draft forward through attention, the worker, CUDA graphs and kernels (SGLang needs a GPU
for those), see serving/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dspark_sglang.export_dir import (
    PLUGIN_ARCHITECTURES,
    ExportError,
    ExportInfo,
    nested,
    read_export,
)

RAGGED_VERIFY_ENV = "SGLANG_RAGGED_VERIFY_MODE"
EXPECTED_WORKER = {"DSPARK": "DSparkWorkerV2", "DFLASH": "DFlashWorkerV2", "EAGLE3": "EAGLEWorkerV2"}
# Keys SGLang's build_markov_head / build_confidence_head read from the top level of config.json only.
DSPARK_TOP_LEVEL_KEYS = ("markov_rank", "markov_head_type", "enable_confidence_head", "confidence_head_with_markov")
MARKOV_HEAD_TYPES = ("vanilla", "gated", "rnn")
# Target architecture for a stand-in target config, by the draft's model_type.
TARGET_ARCHITECTURE = {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                       "mistral": "MistralForCausalLM"}
# Config keys of a target config that a stand-in target copies from the draft config.
TARGET_GEOMETRY_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                        "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings", "hidden_act",
                        "attention_bias", "torch_dtype", "dtype", "tie_word_embeddings", "vocab_size")
# Fused parameters of SGLang's layers: exported name part -> (parameter name part, shard index).
STACKED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
           "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
_STACKED_NAME = re.compile(r"^(?P<pre>.*layers\.\d+\.(?:self_attn|mlp)\.)"
                           r"(?P<part>q_proj|k_proj|v_proj|gate_proj|up_proj)\.(?P<leaf>weight|bias)$")


@dataclass
class Report:
    """The outcome of :func:`check_export`; ``ok`` when ``problems`` is empty."""

    path: str
    algorithm: str | None = None
    architecture: str | None = None
    layout: str | None = None
    draft_class: str | None = None
    worker: str | None = None
    gamma: int | None = None
    num_draft_tokens: int | None = None
    modes: list[str] = field(default_factory=list)
    tensors_checked: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, message: str) -> None:
        if message not in self.problems:
            self.problems.append(message)

    def note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def render(self) -> str:
        head = (f"{'PASS' if self.ok else 'FAIL'} {self.path}: {self.algorithm} {self.architecture} "
                f"({self.layout}) -> {self.draft_class}, worker {self.worker}, gamma {self.gamma}, "
                f"--speculative-num-draft-tokens {self.num_draft_tokens}, modes {self.modes}, "
                f"{self.tensors_checked} tensors")
        lines = [head] + [f"  problem: {p}" for p in self.problems] + [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- config keys
def check_config_keys(info: ExportInfo, report: Report) -> None:
    """Static checks of config.json against where SGLang 0.5.23 reads each key (no SGLang import)."""
    cfg = info.config
    if info.layout == "attached-config":
        return
    if info.algorithm == "DSPARK":
        for key in DSPARK_TOP_LEVEL_KEYS:
            inner, top = nested(cfg, key), cfg.get(key)
            if inner is not None and top is None:
                report.problem(
                    f"'{key}' is only nested under dflash_config/dspark_config; SGLang's build_markov_head / "
                    f"build_confidence_head read it from the top level of config.json (nested-only configs fail "
                    f"with markov_rank=0 or silently drop the confidence head). Write '{key}' top level."
                )
            elif inner is not None and inner != top:
                report.problem(f"'{key}' is {top!r} top level but {inner!r} nested; SGLang uses both places. "
                               f"Make them agree.")
        rank = int(cfg.get("markov_rank") or 0)
        if rank <= 0 and nested(cfg, "markov_rank") is None:
            report.problem(
                "markov_rank is 0 or missing: SGLang 0.5.23 DSPARK requires a Markov head (the target model runner, "
                "the worker and the draft class all refuse markov_rank=0, before any plugin class is built). Export "
                "a head-less DSpark with an all-zero rank-1 vanilla Markov head (markov_w1/markov_w2 zeros: bias "
                "exactly 0), or, with the z-lab block layout and no confidence head, as a DFLASH draft."
            )
        head_type = cfg.get("markov_head_type")
        if rank > 0 and head_type not in MARKOV_HEAD_TYPES:
            report.problem(f"markov_head_type={head_type!r}; SGLang supports {list(MARKOV_HEAD_TYPES)}.")
        if not cfg.get("enable_confidence_head") and nested(cfg, "enable_confidence_head") is None:
            report.note("no confidence head (enable_confidence_head false/missing): serve with "
                        "SGLANG_RAGGED_VERIFY_MODE=static only; compact/cap-accept need the head.")
        if any(int(i) < 0 for i in cfg.get("target_layer_ids") or nested(cfg, "target_layer_ids") or []):
            report.problem("target_layer_ids contains -1 (the embedding output); SGLang captures decoder-layer "
                           "outputs only (DFlashDraftConfig.resolve_target_layer_ids rejects it).")
    if info.algorithm in ("DSPARK", "DFLASH"):
        mask = cfg.get("mask_token_id", nested(cfg, "mask_token_id"))
        if mask is None:
            report.problem("mask_token_id is missing (top level or dflash_config); SGLang requires the block's "
                           "input-only mask token.")
        qk_norm = cfg.get("qk_norm", True)
        if not qk_norm and info.architecture not in PLUGIN_ARCHITECTURES:
            report.problem(
                f"qk_norm is false but architectures=[{info.architecture!r}]: upstream draft layers always apply "
                "q/k RMSNorm. Use architectures ['DSparkLightningDraftModel'] (DSPARK) or "
                "['DFlashLightningDraftModel'] (DFLASH) from the dspark_sglang plugin."
            )
    if info.algorithm == "EAGLE3" and cfg.get("tie_word_embeddings") and cfg.get("draft_vocab_size"):
        report.problem("tie_word_embeddings is true: SGLang's LlamaForCausalLMEagle3 then uses the target embedding "
                       "as lm_head and drops the exported draft lm_head. Write tie_word_embeddings false.")


# --------------------------------------------------------------------------------------------------- SGLang setup
_SGLANG_READY = False


def _prepare_sglang(verbose: bool) -> None:
    """Import SGLang on CPU and load the sglang.srt.plugins entry points, once per process."""
    global _SGLANG_READY
    if not verbose:
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        logging.getLogger("sglang").setLevel(logging.ERROR)
        logging.getLogger("dspark_sglang").setLevel(logging.ERROR)
    if _SGLANG_READY:
        return
    from dspark_sglang._cpu import install_cpu_shims

    install_cpu_shims()
    from sglang.srt.plugins import load_plugins

    load_plugins()
    _SGLANG_READY = True


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _hf_config(path: Path) -> Any:
    from sglang.srt.utils.hf_transformers_utils import get_config

    return get_config(str(path), trust_remote_code=False)


def _stand_in_target(info: ExportInfo, vocab: int, directory: Path) -> Path:
    """A target config.json with the draft's geometry (resolution reads the target config, not its weights)."""
    cfg = info.config
    model_type = cfg.get("model_type") if cfg.get("model_type") in TARGET_ARCHITECTURE else "qwen3"
    layer_ids = cfg.get("target_layer_ids") or nested(cfg, "target_layer_ids") or \
        (cfg.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids") or [0]
    target = {k: cfg[k] for k in TARGET_GEOMETRY_KEYS if k in cfg}
    target.update(
        architectures=[TARGET_ARCHITECTURE[model_type]],
        model_type=model_type,
        num_hidden_layers=int(cfg.get("num_target_layers") or max(layer_ids) + 2),
        vocab_size=vocab,
    )
    if "target_hidden_size" in cfg:
        target["hidden_size"] = cfg["target_hidden_size"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(target, indent=2))
    return directory


def check_sglang_config(info: ExportInfo, hf_config: Any, vocab: int, report: Report) -> None:
    """SGLang's own config parsers on the draft config."""
    try:
        if info.algorithm == "DSPARK":
            from sglang.srt.speculative.dspark_components.dspark_config import (
                parse_dspark_draft_config,
                resolve_runtime_config,
            )

            parsed = parse_dspark_draft_config(draft_hf_config=hf_config)
            runtime = resolve_runtime_config(draft_hf_config=hf_config, speculative_num_draft_tokens=None,
                                             target_vocab_size=vocab)
            if runtime.gamma != info.gamma:
                report.problem(f"SGLang parses gamma={runtime.gamma}, the export's block_size is {info.gamma}.")
            report.note(f"SGLang parses: gamma {runtime.gamma}, mask_token_id {runtime.mask_token_id}, "
                        f"target_layer_ids {parsed.target_layer_ids}, markov_rank {parsed.markov_rank} "
                        f"({parsed.markov_head_type})")
        elif info.algorithm == "DFLASH":
            from sglang.srt.speculative.dflash_utils import parse_dflash_draft_config

            parsed = parse_dflash_draft_config(draft_hf_config=hf_config)
            if parsed.mask_token_id is None:
                report.problem("SGLang finds no mask_token_id (top level or dflash_config).")
            elif int(parsed.mask_token_id) >= vocab:
                report.problem(f"mask_token_id={parsed.mask_token_id} is outside the target vocabulary ({vocab}).")
            report.note(f"SGLang parses: block_size {parsed.block_size}, mask_token_id {parsed.mask_token_id}, "
                        f"target_layer_ids {parsed.target_layer_ids}")
    except Exception as e:  # SGLang raises ValueError/KeyError/TypeError for bad configs
        report.problem(f"SGLang cannot parse the draft config: {type(e).__name__}: {e}")


def check_server_args(info: ExportInfo, target: Path, report: Report,
                      sps_table: Path | None = None) -> tuple[Any, Any]:
    """Resolve server arguments twice, from the config alone and with the flags ``dspark_sglang.launch`` passes;
    returns both ``ServerArgs`` (None where resolution failed)."""
    from dspark_sglang.launch import build_command

    attached = info.layout != "draft"
    bare = ["--model-path", str(info.path if attached else target), "--speculative-algorithm", info.algorithm]
    if not attached:
        bare += ["--speculative-draft-model-path", str(info.draft_dir)]
    mode = "compact" if info.has_confidence_head else "static"
    try:
        launch = build_command(info.path, None if attached else target, mode=mode, sps_table=sps_table,
                               python="python").argv[3:]
    except ExportError as e:
        report.problem(f"dspark_sglang.launch refuses the export: {e}")
        launch = None
    resolved: dict[str, Any] = {}
    for label, args in (("config only", bare), ("dspark_sglang.launch flags", launch)):
        if args is not None:
            resolved[label] = _resolve(info, args, mode, label, report)
    return resolved.get("config only"), resolved.get("dspark_sglang.launch flags")


def _resolve(info: ExportInfo, args: list[str], mode: str, label: str, report: Report) -> Any:
    from sglang.srt.arg_groups.overrides import resolved_view
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    try:
        with _env(RAGGED_VERIFY_ENV, mode):
            server_args = prepare_server_args(args + ["--device", "cuda", "--skip-tokenizer-init"])
            server_args.resolve_once()
    except Exception as e:
        report.problem(f"SGLang server-argument resolution ({label}) failed: {type(e).__name__}: {e}")
        return None
    view = resolved_view(server_args)
    worker = SpeculativeAlgorithm.from_string(view.speculative_algorithm).create_worker(server_args)
    report.worker = worker.__name__
    report.num_draft_tokens = view.speculative_num_draft_tokens
    if worker.__name__ != EXPECTED_WORKER[info.algorithm]:
        report.problem(f"{info.algorithm} resolved to worker {worker.__name__}, expected "
                       f"{EXPECTED_WORKER[info.algorithm]} ({label}).")
    shape = (view.speculative_num_steps, view.speculative_eagle_topk, view.speculative_num_draft_tokens)
    if info.algorithm == "EAGLE3" and label == "config only":
        # SGLang reads no chain length from an Eagle3 config: it picks one by target architecture.
        report.note(f"SGLang alone serves this Eagle3 with steps / top-k / draft tokens {shape[0]} / {shape[1]} / "
                    f"{shape[2]}" + (f"; the export's command passes the trained {info.gamma} / 1 / "
                                     f"{info.num_draft_tokens}." if info.gamma is not None else "."))
    elif info.algorithm == "EAGLE3" and info.gamma is not None and shape != (info.gamma, 1, info.num_draft_tokens):
        report.problem(f"SGLang resolved Eagle3 steps / top-k / draft tokens {shape[0]} / {shape[1]} / {shape[2]}, "
                       f"the drafter was trained for a chain of {info.gamma} ({label}).")
    elif info.num_draft_tokens is not None and view.speculative_num_draft_tokens != info.num_draft_tokens:
        report.problem(f"SGLang resolved --speculative-num-draft-tokens {view.speculative_num_draft_tokens}, "
                       f"the export implies {info.num_draft_tokens} ({label}).")
    if info.layout != "draft" and Path(view.speculative_draft_model_path).resolve() != info.draft_dir.resolve():
        report.problem(f"SGLang resolved the attached draft to {view.speculative_draft_model_path}, "
                       f"not {info.draft_dir} ({label}).")
    return server_args


def check_dtype(info: ExportInfo, bare: Any, launch: Any, report: Report) -> None:
    """The dtype SGLang builds the draft in must be the one the export was written in (with the launch flags)."""
    from sglang.srt.configs.model_config import ModelConfig

    if info.dtype is None:
        return
    for label, server_args in (("config only", bare), ("dspark_sglang.launch flags", launch)):
        if server_args is None:
            continue
        served = str(ModelConfig.from_server_args(server_args, model_path=str(info.draft_dir),
                                                  is_draft_model=True).dtype).removeprefix("torch.")
        if served == info.dtype:
            continue
        if label == "config only":
            report.note(f"with SGLang's default --dtype auto this {info.dtype} export is served as {served}; the "
                        f"export's command passes --dtype {info.dtype}.")
        else:
            report.problem(f"SGLang builds the draft in {served}, but the export is {info.dtype} ({label}): pass "
                           f"--dtype {info.dtype}.")


# --------------------------------------------------------------------------------------------------- weights
def read_tensors(info: ExportInfo) -> dict[str, Any]:
    from safetensors import safe_open

    tensors: dict[str, Any] = {}
    for file in info.weight_files:
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


def _ignored_by_design(info: ExportInfo, name: str, mode: str, model: Any) -> str | None:
    """Why SGLang skips an exported tensor on purpose (None: it must land in a parameter)."""
    bare = name.removeprefix("model.")
    if bare.startswith("rotary_emb.") or ".rotary_emb." in bare:
        return "rotary caches are rebuilt by SGLang"
    if info.algorithm in ("DSPARK", "DFLASH") and bare.startswith(("lm_head.", "embed_tokens.")):
        return "the draft uses the target's embedding and lm_head"
    if info.algorithm == "DSPARK" and bare.startswith("confidence_head.") and model.confidence_head is None:
        return f"the confidence head is built only when {RAGGED_VERIFY_ENV} != static"
    if info.algorithm == "EAGLE3" and bare == "t2d":
        return "t2d is unused; d2t gives the hot-token map"
    return None


def _vocab_rows(model: Any, param_name: str) -> int | None:
    """Rows a checkpoint fills in a vocabulary-parallel parameter, whose rows SGLang pads (to multiples of 64)."""
    module = model.get_submodule(param_name.rsplit(".", 1)[0]) if "." in param_name else model
    if hasattr(module, "org_vocab_size") and hasattr(module, "num_embeddings_padded"):
        return int(module.org_vocab_size)
    return None


def _destination(params: dict[str, Any], model: Any, name: str, algorithm: str) -> tuple[str, Any] | None:
    """The parameter (and slice of it) an exported tensor belongs to in SGLang's model, or None."""
    bare = name.removeprefix("model.")
    if algorithm == "EAGLE3":
        bare = bare.replace("midlayer.", "layers.0.")
    candidates = (bare, f"model.{bare}")
    match = _STACKED_NAME.match(bare)
    if match is None:
        found = next((c for c in candidates if c in params), None)
        if found is None:
            return None
        rows = _vocab_rows(model, found)
        return (found, params[found]) if rows is None else (f"{found}[:{rows}]", params[found][:rows])
    fused, shard = STACKED[match["part"]]
    fused_name = f"{match['pre']}{fused}.{match['leaf']}"
    found = next((c for c in (fused_name, f"model.{fused_name}") if c in params), None)
    if found is None:
        return None
    module = model.get_submodule(found.rsplit(".", 1)[0])
    if fused == "qkv_proj":
        sizes = [module.q_proj_shard_size, module.kv_proj_shard_size, module.v_proj_shard_size]
    else:
        sizes = list(module.output_sizes)
    start = sum(sizes[:shard])
    return f"{found}[{start}:{start + sizes[shard]}]", params[found][start:start + sizes[shard]]


def load_like_sglang(model: Any, model_config: Any, server_args: Any, only_files: set[str] | None = None) -> None:
    """Fill every floating-point parameter with NaN, then load the export the way SGLang's ``DefaultModelLoader``
    does (its file selection, weight iterator, the model's ``load_weights`` and the post-processing).

    Args:
        only_files: load only these weight files of the selection (a bundled draft: the files holding its tensors;
            the draft's ``load_weights`` skips every other tensor of the target checkpoint anyway).
    """
    import torch
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.model_loader.loader import DefaultModelLoader, get_model_loader

    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.fill_(float("nan"))
    loader = get_model_loader(LoadConfig(load_format=server_args.speculative_draft_load_format
                                         or server_args.load_format))
    if not isinstance(loader, DefaultModelLoader):
        raise TypeError(f"SGLang picked {type(loader).__name__} for this export, not DefaultModelLoader.")
    source = DefaultModelLoader.Source.init_new(model_config, model)
    folder, files, safetensors = loader._prepare_weights(source.model_or_path, source.revision,
                                                         source.fall_back_to_pt, source.allow_patterns_overrides)
    if only_files is not None:
        files = [f for f in files if Path(f).name in only_files]
    resolved = DefaultModelLoader.ResolvedSource(source=source, hf_folder=folder, weight_files=tuple(files),
                                                 use_safetensors=safetensors)
    weights = loader._get_weights_iterator(source, resolved_source=resolved)
    loader.load_weights_and_postprocess(model, weights, torch.device("cpu"))


def check_weights(info: ExportInfo, model: Any, model_config: Any, server_args: Any, tensors: dict[str, Any],
                  mode: str, report: Report) -> int | None:
    """Load the export into a NaN-filled model as SGLang does; every tensor must land, every parameter be loaded.

    Returns the number of tensors that landed, or None when loading raised.
    """
    import torch

    params = dict(model.named_parameters())
    try:
        load_like_sglang(model, model_config, server_args)
    except Exception as e:
        report.problem(f"[{mode}] SGLang's loader ({type(model).__name__}.load_weights) refused the export: "
                       f"{type(e).__name__}: {e}")
        return None

    landed = 0
    for name, tensor in tensors.items():
        if info.algorithm == "EAGLE3" and name == "d2t":
            continue  # becomes hot_token_id, checked by check_eagle3_maps
        why = _ignored_by_design(info, name, mode, model)
        if why is not None:
            if not name.startswith("confidence_head."):
                mb = tensor.numel() * tensor.element_size() / 2**20
                report.note(f"{name} {tuple(tensor.shape)} is ignored by SGLang ({why}); dropping it saves "
                            f"{mb:.1f} MiB." if mb >= 0.1 else f"{name} is ignored by SGLang ({why}).")
            continue
        dest = _destination(params, model, name, info.algorithm)
        if dest is None:
            report.problem(
                f"{name} {tuple(tensor.shape)} has no parameter in {type(model).__name__}: SGLang's loader skips it "
                f"silently, so the served drafter would run without it."
            )
            continue
        where, value = dest
        if tuple(value.shape) != tuple(tensor.shape):
            report.problem(f"{name} has shape {tuple(tensor.shape)} but SGLang's {where} is {tuple(value.shape)}.")
            continue
        if torch.isnan(value).any():
            report.problem(f"[{mode}] {name} did not reach {where}: load_weights left it unset.")
        elif not torch.equal(value, tensor.to(value.dtype)):
            report.problem(f"[{mode}] {name} reached {where} with different values.")
        else:
            landed += 1

    allowed = set()
    if info.algorithm == "EAGLE3":
        allowed.add("model.embed_tokens.weight")  # set from the target (EagleDraftWorker.init_lm_head)
        if getattr(model, "load_lm_head_from_target", False):
            allowed.add("lm_head.weight")
    unset: dict[str, str] = {}
    for pname, p in params.items():
        if pname in allowed or not p.is_floating_point():
            continue
        rows = _vocab_rows(model, pname)
        count = int(torch.isnan(p if rows is None else p[:rows]).sum())  # padding rows stay unset
        if count:
            unset[pname] = f"{pname} {tuple(p.shape)} ({count} of {p.numel()} values)"
    qk = [n for n in unset if n.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight"))]
    if any(n.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight")) for n in tensors):
        qk = []  # the drafter has q/k norms: a missing one is a missing tensor, named below, not a missing plugin
    if qk:
        report.problem(
            f"the export has no q_norm/k_norm ({len(qk)} parameters, e.g. {qk[0]}), but {type(model).__name__}'s "
            "draft layers apply q/k RMSNorm and would keep their initial weights: a drafter for a target without "
            "q/k norm (e.g. Llama) computes a different attention there. Write architectures "
            "['DSparkLightningDraftModel'] (DSPARK) or ['DFlashLightningDraftModel'] (DFLASH) and \"qk_norm\": false "
            "(dspark_sglang plugin)."
        )
    for pname, text in unset.items():
        if pname not in qk:
            report.problem(f"{text} not in the export: SGLang would serve its initial values.")
    return landed


# --------------------------------------------------------------------------------------------------- numerics
def check_numerics(info: ExportInfo, model: Any, tensors: dict[str, Any], report: Report) -> None:
    """Float32 comparison of SGLang's heads with dspark_sglang.reference on random inputs."""
    import torch

    from dspark_sglang import reference

    model.float()
    w = {k: v.float() for k, v in tensors.items() if v.is_floating_point()}
    cfg = info.config
    gen = torch.Generator().manual_seed(0)
    hidden_size, vocab = int(cfg["hidden_size"]), int(cfg["vocab_size"])
    batch, k = 3, info.gamma or 4

    def close(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
        return ours.shape == theirs.shape and torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5)

    with torch.no_grad():
        if "fc.weight" in w and "hidden_norm.weight" in w and hasattr(model, "project_target_hidden"):
            x = torch.randn(5, w["fc.weight"].shape[1], generator=gen)
            eps = float(cfg.get("rms_norm_eps", 1e-6))
            context = model.project_target_hidden(x).float()
            if not close(context, reference.project_context(w, x, eps)):
                report.problem("project_target_hidden (hidden_norm(fc(.))) differs from the reference.")
            else:
                check_context_kv(info, model, w, x, context, report)
        if info.algorithm != "DSPARK" or "markov_head.markov_w1.weight" not in w:
            return
        hidden = torch.randn(batch, k, hidden_size, generator=gen)
        anchor = torch.randint(0, vocab, (batch,), generator=gen)
        tokens = torch.randint(0, vocab, (batch, k), generator=gen)
        head_type = str(cfg.get("markov_head_type", "vanilla")).lower()
        head = model.markov_head
        try:
            expected = reference.markov_block_biases(w, head_type, anchor, tokens, hidden)
        except KeyError as e:
            report.problem(f"the export lacks {e} for a {head_type} Markov head.")
            return
        state, prev, worst = head.init_state(hidden[:, 0]), anchor, 0.0
        for step in range(k):
            bias, state = head.step_bias(prev, hidden_states=hidden[:, step], state=state)
            worst = max(worst, float((bias.float() - expected[:, step]).abs().max()))
            if not close(bias.float(), expected[:, step]):
                report.problem(f"Markov bias ({head_type}, {type(head).__name__}) differs from the reference at step "
                               f"{step}: max |diff| {worst:.3g}.")
                break
            prev = tokens[:, step]
        else:
            report.note(f"Markov bias ({head_type}) equals the reference over {k} steps (max |diff| {worst:.2g}).")
            if not any(float(w[n].abs().max()) for n in w if n.startswith("markov_head.")):
                report.note("the Markov head is all zeros: bias exactly 0, i.e. a DSpark without a Markov head.")
        if model.confidence_head is None or "confidence_head.proj.weight" not in w:
            return
        temps = None
        if info.sts_path is not None:
            from sglang.srt.speculative.dspark_components.dspark_sts import load_sts_calibration_from_path

            try:
                temps = torch.tensor(load_sts_calibration_from_path(str(info.sts_path)).temperatures)
            except Exception as e:
                report.problem(f"{info.sts_path} is not an STS calibration SGLang reads: {e}")
            if temps is not None and temps.numel() != k:
                report.problem(f"{info.sts_path} has {temps.numel()} temperatures; SGLang requires gamma={k}.")
                temps = None
        cases = [("without STS", None)] + ([("with the export's STS temperatures", temps)] if temps is not None else [])
        for label, t in cases:
            model.confidence_head.sts_temperatures = torch.ones(()) if t is None else t
            conf, raw = model.compute_confidence(anchor_tokens=anchor, draft_tokens=tokens,
                                                 confidence_features=hidden.reshape(batch * k, hidden_size))
            ref_conf, ref_raw = reference.confidence(w, anchor, tokens, hidden, t)
            if not (close(raw.float(), ref_raw) and close(conf.float(), ref_conf)):
                report.problem(f"confidence ({label}) differs from the reference: max |diff| "
                               f"{float((conf.float() - ref_conf).abs().max()):.3g}.")
            else:
                report.note(f"confidence ({label}) equals the reference.")


def plain_rope_theta(cfg: dict[str, Any]) -> float | None:
    """The RoPE base when the config asks for plain (unscaled, full-width) RoPE, else None."""
    if float(cfg.get("partial_rotary_factor") or 1.0) != 1.0:
        return None
    theta = cfg.get("rope_theta", 10000.0)
    for key in ("rope_parameters", "rope_scaling"):  # transformers 5 writes rope_parameters
        spec = cfg.get(key)
        if not spec:
            continue
        if spec.get("rope_type", spec.get("type", "default")) != "default" or spec.get("partial_rotary_factor"):
            return None
        theta = spec.get("rope_theta", theta)
    return float(theta)


def check_context_kv(info: ExportInfo, model: Any, w: dict[str, Any], target_hidden: Any, context: Any,
                     report: Report) -> None:
    """Per-layer K/V that SGLang writes into the draft KV cache for the context (its per-layer fallback path
    kv_proj_only -> apply_k_norm -> apply_k_rope) against the reference."""
    import torch

    from dspark_sglang import reference

    cfg = info.config
    theta = plain_rope_theta(cfg)
    if theta is None:
        report.note("context K/V not compared: the reference implements plain RoPE only (this config scales it).")
        return
    positions = torch.arange(context.shape[0]) * 7 + 3
    eps = float(cfg.get("rms_norm_eps", 1e-6))
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        k, v = attn.kv_proj_only(context)
        k = attn.apply_k_rope(positions, attn.apply_k_norm(k)).view(-1, attn.num_kv_heads, attn.head_dim)
        ref_k, ref_v = reference.context_kv(w, i, context, positions, attn.head_dim, eps, theta)
        if torch.isnan(k).any() or torch.isnan(v).any():
            report.problem(f"context K/V of draft layer {i} is NaN: it uses parameters the export did not fill.")
            return
        if not (torch.allclose(k.float(), ref_k, rtol=1e-4, atol=1e-4)
                and torch.allclose(v.float().view_as(ref_v), ref_v, rtol=1e-4, atol=1e-4)):
            report.problem(f"context K/V of draft layer {i} (what SGLang caches for the target context) differs "
                           f"from the reference: max |dK| {float((k.float() - ref_k).abs().max()):.3g}.")
            return
    report.note(f"context K/V of all {len(model.layers)} draft layers equal the reference.")
    if not hasattr(model, "write_target_hidden_kv"):
        return
    # DSpark writes the context K/V itself (stacked or per-layer path; the fused kernel needs a GPU pool).
    pool = _RecordingPool()
    model.write_target_hidden_kv(target_hidden=target_hidden, pool=pool, positions=positions,
                                 cache_loc=torch.arange(context.shape[0]))
    for i, layer in enumerate(model.layers):
        k, v = pool.writes.get(layer.self_attn.attn.layer_id, (None, None))
        ref_k, ref_v = reference.context_kv(w, i, context, positions, layer.self_attn.head_dim, eps, theta)
        if k is None or not (torch.allclose(k.float().view_as(ref_k), ref_k, rtol=1e-4, atol=1e-4)
                             and torch.allclose(v.float().view_as(ref_v), ref_v, rtol=1e-4, atol=1e-4)):
            report.problem(f"write_target_hidden_kv wrote a different K/V for draft layer {i} than the reference.")
            return
    report.note("write_target_hidden_kv (the DSpark prefill/commit KV injection) writes the reference K/V.")


class _RecordingPool:
    """Stands in for the draft KV pool: keeps what ``set_kv_buffer`` is given, per layer."""

    def __init__(self) -> None:
        self.writes: dict[int, tuple[Any, Any]] = {}

    def set_kv_buffer(self, layer: Any, loc: Any, k: Any, v: Any, *scales: Any) -> None:
        self.writes[layer.layer_id] = (k, v)


def check_eagle3_maps(model: Any, tensors: dict[str, Any], report: Report) -> None:
    import torch

    d2t = tensors.get("d2t")
    if d2t is None:
        report.problem("Eagle3 export has no d2t: SGLang then samples from the full-vocabulary lm_head it borrows "
                       "from the target, but the exported lm_head covers draft_vocab_size tokens.")
        return
    hot = d2t.long() + torch.arange(d2t.shape[0])
    if model.hot_token_id is None or not torch.equal(model.hot_token_id.long(), hot):
        report.problem("SGLang's hot_token_id is not d2t + arange(draft_vocab).")
    vocab = int(model.config.vocab_size)
    if int(hot.min()) < 0 or int(hot.max()) >= vocab:
        report.problem(f"d2t maps draft ids outside the target vocabulary [0, {vocab}).")
    lm_rows = tensors.get("lm_head.weight")
    if lm_rows is not None and lm_rows.shape[0] != d2t.shape[0]:
        report.problem(f"d2t has {d2t.shape[0]} entries but lm_head.weight has {lm_rows.shape[0]} rows.")
    t2d = tensors.get("t2d")
    if t2d is not None and (int(t2d.bool().sum()) != d2t.shape[0] or not bool(t2d.bool()[hot].all())):
        report.problem("t2d does not mark exactly the target ids d2t maps to.")


# --------------------------------------------------------------------------------------------------- driver
def check_export(path: str | Path, *, target_vocab: int | None = None, target: str | Path | None = None,
                 sps_table: str | Path | None = None, verbose: bool = False) -> Report:
    """Check that the installed SGLang serves the export at ``path`` as written (module docstring).

    Args:
        path: Export directory.
        target_vocab: Target vocabulary size (embedding rows) for the mask-token bound; default: the draft
            config's ``vocab_size``.
        target: A target model directory to resolve server arguments against (its ``vocab_size`` is the default
            ``target_vocab``); default: a stand-in target config with the draft's geometry.
        sps_table: An SPS cost table to serve a DSpark export with (``--sps-table`` of the launcher); checked with
            SGLang's loader, as is an ``sps.json`` the export ships.
        verbose: Keep SGLang's log output and warnings.
    """
    report = Report(path=str(path))
    try:
        info = read_export(path)
    except ExportError as e:
        report.problem(str(e))
        return report
    report.algorithm, report.architecture, report.layout = info.algorithm, info.architecture, info.layout
    report.gamma = info.gamma
    check_config_keys(info, report)
    if info.layout == "attached-config" and info.architecture != "DeepseekV4ForCausalLM":
        report.num_draft_tokens = info.num_draft_tokens
        report.problem(
            f"the draft is bundled through dspark_* keys in a {info.architecture} target config: SGLang 0.5.23 "
            "loads that form only for DeepseekV4ForCausalLM targets (it remaps the draft class to "
            "DeepseekV4ForCausalLMDSpark; for this target it builds the target's own class as the draft and fails on "
            "the draft tensors). Export the attached checkpoint with the draft in a dspark/ subfolder."
        )
        return report

    _prepare_sglang(verbose)
    sps = Path(sps_table) if sps_table else info.sps_path
    if sps is not None:
        check_sps_with_sglang(sps, report)
    if target_vocab is None and target is not None and (Path(target) / "config.json").is_file():
        target_config = json.loads((Path(target) / "config.json").read_text())
        target_vocab = (target_config.get("text_config") or target_config).get("vocab_size")
    vocab = int(target_vocab or info.config.get("vocab_size") or 0)
    with tempfile.TemporaryDirectory(prefix="dspark-check-target-") as tmp:
        if info.layout != "attached-config":
            check_sglang_config(info, _hf_config(info.draft_dir), vocab, report)
        target_dir = Path(target) if target else _stand_in_target(info, vocab, Path(tmp))
        bare, launch = check_server_args(info, target_dir, report, sps_table=Path(sps_table) if sps_table else None)
        check_dtype(info, bare, launch, report)
        server_args = launch or bare  # the weights are checked even when the launcher refuses (problem reported)
        if server_args is None:
            return report
        modes = ["default"] if info.algorithm != "DSPARK" else \
            ["static", "compact"] if info.has_confidence_head else ["static"]
        if info.layout == "attached-config":
            from dspark_sglang.check_v4 import check_bundled_v4

            check_bundled_v4(info, server_args, modes, report, build=_build_model)
            return report
        tensors = read_tensors(info)
        check_heads_match_algorithm(info, tensors, report)
        for mode in modes:
            report.modes.append(mode)
            built = _build_model(info, server_args, mode, report)
            if built is None:
                continue
            model, model_config = built
            landed = check_weights(info, model, model_config, server_args, tensors, mode, report)
            if landed is None:
                continue
            report.tensors_checked = max(report.tensors_checked, landed)
            if mode == modes[-1]:  # numerics once, on the model with every head built
                if info.algorithm == "EAGLE3":
                    check_eagle3_maps(model, tensors, report)
                try:
                    check_numerics(info, model, tensors, report)
                except Exception as e:  # a shape the export got wrong surfaces here
                    report.problem(f"numerics check failed: {type(e).__name__}: {e}")
    return report


def check_sps_with_sglang(path: Path, report: Report) -> None:
    """The SPS cost table must load with SGLang's own loader (``load_sps_table_from_path``)."""
    from sglang.srt.speculative.dspark_components.dspark_sps import load_sps_table_from_path

    try:
        table = load_sps_table_from_path(str(path))
    except Exception as e:  # msgspec.ValidationError / ValueError
        hint = (" It is in dspark_lightning's own format: write it with `python -m dspark_lightning profile-sps ... "
                "--format sglang`." if path.is_file() and "num_tokens" in path.read_text() else "")
        report.problem(f"SGLang cannot load the SPS table {path}: {type(e).__name__}: {e}.{hint}")
        return
    probes = getattr(table, "sample_batch_tokens", None)
    report.note(f"SPS table {path.name} loads in SGLang ({type(table).__name__}"
                + (f", {len(probes)} probes up to {probes[-1]} tokens)" if probes else ")"))


def check_heads_match_algorithm(info: ExportInfo, tensors: dict[str, Any], report: Report) -> None:
    """A DSpark drafter (Markov / confidence head tensors) must be labelled for DSPARK: DFLASH has neither head."""
    heads = sorted({n.split(".", 1)[0] for n in tensors if n.startswith(("markov_head.", "confidence_head."))})
    if info.algorithm == "DFLASH" and heads:
        count = sum(n.startswith(("markov_head.", "confidence_head.")) for n in tensors)
        report.problem(
            f"the export is a DSpark drafter ({' and '.join(heads)}: {count} tensors) but config.json names "
            f"architectures [{info.architecture!r}]: SGLang serves it as DFLASH, whose draft class has neither head, "
            "and drops them silently. Write a DSPARK architecture (Qwen3DSparkModel, DSparkDraftModel, or the plugin's "
            "DSparkLightningDraftModel) with the DSpark keys (block_size = gamma, markov_rank, markov_head_type, "
            "enable_confidence_head) top level."
        )


def _build_model(info: ExportInfo, server_args: Any, mode: str, report: Report) -> tuple[Any, Any] | None:
    """The draft class SGLang resolves for the export, built as its loader does (dtype), and its ModelConfig."""
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_loader.utils import get_model_architecture, set_default_torch_dtype
    from sglang.srt.models.registry import ModelRegistry

    if info.needs_plugin and info.architecture not in ModelRegistry.models:
        report.problem(
            f"[{mode}] architectures [{info.architecture!r}] is a class of the dspark_sglang plugin, which this SGLang "
            "did not load (SGLang itself stops with 'Cannot find model module'): install it where SGLang runs, pip "
            "install ./serving (from the dspark_lightning repository); if SGLANG_PLUGINS is set it must include "
            "dspark_lightning."
        )
        return None
    with _env(RAGGED_VERIFY_ENV, "static" if mode == "default" else mode):
        try:
            model_config = ModelConfig.from_server_args(server_args, model_path=str(info.draft_dir),
                                                        is_draft_model=True)
            cls, _ = get_model_architecture(model_config)
            report.draft_class = f"{cls.__module__}.{cls.__name__}"
            with set_default_torch_dtype(model_config.dtype):
                return cls(config=model_config.hf_config, quant_config=None), model_config
        except Exception as e:
            report.problem(f"[{mode}] SGLang cannot build the draft class for architectures="
                           f"[{info.architecture!r}]: {type(e).__name__}: {e}")
            return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dspark_sglang.check",
                                     description="Check an exported drafter against the installed SGLang (CPU).")
    parser.add_argument("export_dir", help="export directory (config.json + *.safetensors)")
    parser.add_argument("--target-vocab", type=int, help="target vocabulary size (default: the config's vocab_size)")
    parser.add_argument("--target", help="target model dir to resolve server args against (default: a stand-in)")
    parser.add_argument("--sps-table", help="SPS cost table to serve a DSpark export with (checked with SGLang)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--verbose", action="store_true", help="keep SGLang's logs and warnings")
    args = parser.parse_args(argv)
    report = check_export(args.export_dir, target_vocab=args.target_vocab, target=args.target,
                          sps_table=args.sps_table, verbose=args.verbose)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.render())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
