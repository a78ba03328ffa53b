"""The weights part of :func:`dspark_sglang.check.check_export` for a DSpark draft bundled into a DeepSeek-V4
checkpoint (``dspark_*`` keys in the target ``config.json``, draft tensors ``mtp.<stage>.*`` in its index).

SGLang 0.5.23 serves it as ``DeepseekV4ForCausalLMDSpark`` (``srt/models/deepseek_v4_dspark.py``). Per ragged-verify
mode (``static``: no confidence head is built, its tensors are skipped by design; ``compact``: it is built and
required): build the class SGLang resolves, fill its parameters with NaN, load the checkpoint with SGLang's loader
(only the files that hold ``mtp.*`` tensors: the draft's ``load_weights`` skips every other tensor), then require

- every tensor SGLang's ``_remap_dspark_weight_name`` claims to reach a parameter the module declares (directly, a
  shard of a stacked parameter, or an expert slot of a FusedMoE parameter: the tables its ``load_weights`` uses),
  value for value after the cast to the parameter's dtype;
- no "unexpected weight" warning from the loader, and no parameter left NaN.

Not covered: the CUDA stage class (``DSparkV4CudaStage``, chosen when CUDA is present; it shares the remapping and the
parameter-declaring decoder-layer code), FP8 / FP4 weights, the forward pass.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from dspark_sglang.export_dir import ExportInfo

INDEX = "model.safetensors.index.json"
V4_DRAFT_LOGGER = "sglang.srt.models.deepseek_v4_dspark"


def bundled_weight_map(info: ExportInfo) -> dict[str, str]:
    """Tensor name -> file of the bundled checkpoint (its index, or the one ``model.safetensors``)."""
    from safetensors import safe_open

    index = info.path / INDEX
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    single = info.path / "model.safetensors"
    with safe_open(str(single), "pt") as f:
        return dict.fromkeys(f.keys(), single.name)


def read_named(info: ExportInfo, mapping: dict[str, str], names: list[str]) -> dict[str, Any]:
    from safetensors import safe_open

    out: dict[str, Any] = {}
    for file in sorted({mapping[n] for n in names}):
        with safe_open(str(info.path / file), "pt") as f:
            out.update({n: f.get_tensor(n) for n in names if mapping[n] == file})
    return out


def destination(model: Any, params: dict[str, Any], mapped: str) -> tuple[str, int | None, Any] | None:
    """(parameter, expert id, shard id) ``load_weights`` puts the tensor SGLang remapped to ``mapped`` in."""
    from sglang.srt.layers.moe.fused_moe_triton import FusedMoE
    from sglang.srt.models.deepseek_v4 import DEEPSEEK_V4_STACKED_PARAMS_MAPPING
    from sglang.srt.models.deepseek_v4_dspark import _dspark_stage_config

    for param_name, weight_name, shard in DEEPSEEK_V4_STACKED_PARAMS_MAPPING:
        if weight_name in mapped and mapped.replace(weight_name, param_name) in params:
            return mapped.replace(weight_name, param_name), None, shard
    experts = _dspark_stage_config(model.config).n_routed_experts + model.num_fused_shared_experts
    for param_name, weight_name, expert, shard in FusedMoE.make_expert_params_mapping(
            ckpt_gate_proj_name="gate_proj", ckpt_down_proj_name="down_proj", ckpt_up_proj_name="up_proj",
            num_experts=experts):
        if weight_name in mapped and mapped.replace(weight_name, param_name) in params:
            return mapped.replace(weight_name, param_name), expert, shard
    return (mapped, None, None) if mapped in params else None


def _slot(param: Any, expert: int | None, shard: Any, rows: int) -> Any:
    """The part of ``param`` a tensor of ``rows`` rows was loaded into (gate/up halves of fused w13/gate_up)."""
    p = param if expert is None else param[expert]
    if shard in ("w1", 0):
        return p[:rows]
    if shard in ("w3", 1):
        return p[p.shape[0] - rows:]
    return p


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def check_bundled_v4(info: ExportInfo, server_args: Any, modes: list[str], report: Any,
                     build: Callable[..., tuple[Any, Any] | None]) -> None:
    """The module docstring's checks; problems and notes go to ``report`` (a ``check.Report``)."""
    import torch

    from dspark_sglang.check import load_like_sglang

    mapping = bundled_weight_map(info)
    for mode in modes:
        report.modes.append(mode)
        built = build(info, server_args, mode, report)
        if built is None:
            continue
        model, model_config = built
        params = dict(model.named_parameters())
        claimed = sorted(n for n in mapping if model._remap_dspark_weight_name(n) is not None)
        drafts = sorted(n for n in mapping if n.startswith("mtp."))
        skipped = sorted(set(drafts) - set(claimed))
        by_design = [n for n in skipped if ".confidence_head." in n and model.confidence_head is None]
        for name in sorted(set(skipped) - set(by_design)):
            report.problem(f"[{mode}] {name} is a draft tensor SGLang's DeepseekV4ForCausalLMDSpark does not load "
                           "(_remap_dspark_weight_name skips it).")
        placed, nowhere = {}, []
        for name in claimed:
            dest = destination(model, params, model._remap_dspark_weight_name(name))
            if dest is None:
                nowhere.append(name)
            else:
                placed[name] = dest
        for name in nowhere:
            report.problem(f"[{mode}] {name} maps to {model._remap_dspark_weight_name(name)}, which "
                           f"{type(model).__name__} does not declare: SGLang's loader would skip it.")
        handler = _Warnings()
        logging.getLogger(V4_DRAFT_LOGGER).addHandler(handler)
        try:
            load_like_sglang(model, model_config, server_args, only_files={mapping[n] for n in drafts})
        except Exception as e:
            report.problem(f"[{mode}] SGLang's loader refused the bundled draft: {type(e).__name__}: {e}")
            continue
        finally:
            logging.getLogger(V4_DRAFT_LOGGER).removeHandler(handler)
        for message in handler.messages:
            if "unexpected weight" in message:
                report.problem(f"[{mode}] SGLang's loader warns: {message}")
        tensors = read_named(info, mapping, list(placed))
        landed = 0
        for name, (param_name, expert, shard) in placed.items():
            loaded = tensors[name]
            got = _slot(params[param_name].data, expert, shard, loaded.shape[0])
            if got.shape != loaded.shape or not torch.equal(got, loaded.to(got.dtype)):
                report.problem(f"[{mode}] {name} did not reach {param_name} (expert {expert}, shard {shard}) value "
                               f"for value: {tuple(got.shape)} {got.dtype} vs {tuple(loaded.shape)} {loaded.dtype}.")
            else:
                landed += 1
        unset = sorted(n for n, p in params.items() if p.is_floating_point() and torch.isnan(p).any())
        for name in unset:
            report.problem(f"[{mode}] {name} {tuple(params[name].shape)} is not in the bundled draft: SGLang would "
                           "serve its initial values.")
        report.tensors_checked = max(report.tensors_checked, landed)
        if by_design:
            report.note(f"[{mode}] {len(by_design)} confidence-head tensors are skipped by design (the head is built "
                        "only when SGLANG_RAGGED_VERIFY_MODE != static).")
    report.note("DeepSeek-V4 bundled draft: built as SGLang's DeepseekV4ForCausalLMDSpark and loaded on CPU; the "
                "numerics of the Markov / confidence heads are not compared (the reference covers the standard "
                "DSpark layers only).")
