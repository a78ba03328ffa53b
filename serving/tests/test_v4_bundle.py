"""DeepSeek-V4 bundled DSpark export against SGLang 0.5.23's own ``DeepseekV4ForCausalLMDSpark`` (issue 8 item 5).

Runs in the serving venv and never imports ``dspark_lightning``. The main venv's interpreter
(``$DSPARK_LIGHTNING_PYTHON``, default ``<repo>/.venv/bin/python``) builds, in one subprocess:

1. the tiny V4 target of ``configs/deepseek_v4/smoke.yaml`` (``FrozenTarget.from_config`` + ``save_pretrained``,
   as ``tests/export/test_attached_v4.py`` does),
2. ``fit --config configs/deepseek_v4/smoke.yaml --trainer.max_steps 2 --trainer.limit_val_batches 0 ...``,
3. ``export --ckpt <run>/checkpoints/last.ckpt --format attached --attached_layout bundled --target_dir <target>``.

Checked with SGLang's own code, on CPU:

- detection: ``prepare_server_args([--model-path EXPORT, --speculative-algorithm DSPARK, --device cuda])`` +
  ``resolve_once`` (``_handle_dspark``) defaults the draft path to the target path (bundled draft, from the
  ``dspark_*`` keys), resolves ``DSparkWorkerV2`` and gamma + 1 = 6 draft tokens, and the draft ``ModelConfig``
  remaps the architecture to ``DeepseekV4ForCausalLMDSpark``;
- weights: SGLang builds ``DeepseekV4ForCausalLMDSpark`` (its non-CUDA ``DSparkV4PlatformStage`` stages), every
  parameter is set to NaN, its ``load_weights`` reads the exported ``mtp.*`` tensors; every draft tensor must map
  through ``_remap_dspark_weight_name`` (+ the stacked / FusedMoE expert tables ``load_weights`` uses) to a
  declared parameter, with no "unexpected weight" warning, land there value for value, and leave no parameter
  unloaded; in ``SGLANG_RAGGED_VERIFY_MODE=static`` (no confidence head built: its tensor is skipped by design)
  and ``compact`` (the confidence head is built and must be loaded).

Not checkable here: see ``SGLANG_VIEW_KEYS`` (the transformers-format V4 config.json lacks keys SGLang's V4 config
reads) and the CUDA stage class (``DSparkV4CudaStage``, chosen when ``torch.cuda`` is present; it shares the
remapping and the parameter-declaring ``DeepseekV4*DecoderLayer`` base code but is not built on CPU), FP8 / FP4
quantized weights (the export is float32; ``_dequant_fp8_wo_a_streaming`` and ``.scale`` -> ``weight_scale_inv``
are not exercised), the forward pass and kernels.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dspark_sglang.check import _env, _prepare_sglang

REPO = Path(__file__).resolve().parents[2]
GAMMA = 5  # block_size of configs/deepseek_v4/smoke.yaml
DRAFT_SHARD = "model-dspark-draft.safetensors"

# Runs in the main venv: tiny V4 target, 2 fit steps, bundled export.
DRIVER = r"""
import sys, time
from pathlib import Path
import yaml
from dspark_lightning.cli import main
from dspark_lightning.targets import FrozenTarget, TargetConfig

root = Path(sys.argv[1])
target = yaml.safe_load(Path("configs/deepseek_v4/smoke.yaml").read_text())["model"]["target"]
t = time.perf_counter()
FrozenTarget.from_config(TargetConfig(**target), [0]).model.save_pretrained(root / "target")
main(["fit", "--config", "configs/deepseek_v4/smoke.yaml", "--trainer.max_steps", "2", "--trainer.logger", "false",
      "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
      "--trainer.default_root_dir", str(root / "run")])
main(["export", "--ckpt", str(root / "run" / "checkpoints" / "last.ckpt"), "--format", "attached",
      "--attached_layout", "bundled", "--target_dir", str(root / "target"), "--out", str(root / "export")])
print(f"@@@ main-venv build {time.perf_counter() - t:.1f} s", flush=True)
"""

# transformers' V4 config.json (what save_pretrained writes, and so what the tiny target and its export carry)
# names some geometry differently from the official V4 config.json that SGLang's V4 code reads. The SGLang view of
# the export adds these official-style keys, derived from the transformers keys; everything else (the dspark_* keys,
# the weights, the index) is the export's own, symlinked unchanged.
def _official_keys(cfg: dict) -> dict:
    rates = {"sliding_attention": 0, **cfg["compress_rates"]}
    return {
        # ModelConfig._derive_model_shapes: one ratio per layer (+ the MTP layer, as the official configs).
        "compress_ratios": [int(rates[t]) for t in cfg["layer_types"]] + [0],
        "topk_method": "noaux_tc",  # MoEGate: transformers' V4 always routes with a score-correction bias
        "n_group": 1, "topk_group": 1,
        "num_hash_layers": sum(t == "hash_moe" for t in cfg.get("mlp_layer_types", [])),
        "window_size": cfg["sliding_window"],
    }


def _main_python() -> Path:
    python = Path(os.environ.get("DSPARK_LIGHTNING_PYTHON") or REPO / ".venv" / "bin" / "python")
    if not python.exists():
        pytest.fail(f"The main project's interpreter {python} does not exist: run `make venv` in {REPO}.",
                    pytrace=False)
    return python


@pytest.fixture(scope="module")
def v4_export(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("v4_bundle")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.run([str(_main_python()), "-c", DRIVER, str(root)], cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:]
    print(f"\nmain-venv V4 target + fit + export: {time.perf_counter() - start:.1f} s")
    return root / "export"


@pytest.fixture(scope="module")
def sglang_view(v4_export, tmp_path_factory) -> Path:
    """The export with the official-style V4 keys SGLang needs added to config.json (:func:`_official_keys`)."""
    view = tmp_path_factory.mktemp("v4_sglang_view")
    for p in v4_export.iterdir():
        if p.name != "config.json":
            (view / p.name).symlink_to(p)
    cfg = json.loads((v4_export / "config.json").read_text())
    extra = _official_keys(cfg)
    assert not set(extra) & set(cfg), "the export now writes official V4 keys: drop them from _official_keys"
    (view / "config.json").write_text(json.dumps({**cfg, **extra}, indent=2))
    return view


@pytest.fixture(scope="module")
def sglang():
    _prepare_sglang(verbose=False)


def _resolve(model_path: Path):
    from sglang.srt.server_args import prepare_server_args

    with _env("SGLANG_RAGGED_VERIFY_MODE", "static"):
        server_args = prepare_server_args(["--model-path", str(model_path), "--speculative-algorithm", "DSPARK",
                                           "--device", "cuda", "--skip-tokenizer-init"])
        server_args.resolve_once()
    return server_args


def test_export_is_a_bundled_v4_checkpoint(v4_export):
    cfg = json.loads((v4_export / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV4ForCausalLM"]
    assert cfg["dspark_block_size"] == GAMMA and cfg["dspark_target_layer_ids"] == [0, 2]
    index = json.loads((v4_export / "model.safetensors.index.json").read_text())["weight_map"]
    mtp = {n for n in index if n.startswith("mtp.")}
    assert mtp and {index[n] for n in mtp} == {DRAFT_SHARD}
    assert mtp == set(load_file(str(v4_export / DRAFT_SHARD)))


def test_sglang_needs_official_v4_keys(v4_export, sglang):
    """Documents the gap the SGLang view fills: the transformers-format config.json alone does not resolve."""
    with pytest.raises(AttributeError, match="compress_ratios"):
        _resolve(v4_export)


def test_sglang_detects_the_bundled_draft(sglang_view, sglang):
    from sglang.srt.arg_groups.overrides import resolved_view
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_loader.utils import get_model_architecture
    from sglang.srt.speculative.dspark_components.dspark_config import checkpoint_bundles_dspark_draft
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    server_args = _resolve(sglang_view)
    view = resolved_view(server_args)
    assert Path(view.speculative_draft_model_path).resolve() == sglang_view.resolve()  # the bundled draft
    assert view.speculative_num_draft_tokens == GAMMA + 1
    assert SpeculativeAlgorithm.from_string(view.speculative_algorithm).create_worker(server_args).__name__ \
        == "DSparkWorkerV2"
    draft = ModelConfig.from_server_args(server_args, model_path=str(sglang_view), is_draft_model=True)
    assert checkpoint_bundles_dspark_draft(draft.hf_config)
    assert draft.hf_config.architectures == ["DeepseekV4ForCausalLMDSpark"]
    cls, _ = get_model_architecture(draft)
    assert cls.__name__ == "DeepseekV4ForCausalLMDSpark"


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _destination(model, mapped: str) -> list[tuple[str, int | None, str | None]]:
    """Where ``load_weights`` puts the tensor SGLang remapped to ``mapped``: [(param, expert id, shard id)]."""
    from sglang.srt.layers.moe.fused_moe_triton import FusedMoE
    from sglang.srt.models.deepseek_v4 import DEEPSEEK_V4_STACKED_PARAMS_MAPPING
    from sglang.srt.models.deepseek_v4_dspark import _dspark_stage_config

    params = dict(model.named_parameters())
    for param_name, weight_name, shard in DEEPSEEK_V4_STACKED_PARAMS_MAPPING:
        if weight_name in mapped and mapped.replace(weight_name, param_name) in params:
            return [(mapped.replace(weight_name, param_name), None, shard)]
    n_experts = _dspark_stage_config(model.config).n_routed_experts + model.num_fused_shared_experts
    for param_name, weight_name, expert, shard in FusedMoE.make_expert_params_mapping(
            ckpt_gate_proj_name="gate_proj", ckpt_down_proj_name="down_proj", ckpt_up_proj_name="up_proj",
            num_experts=n_experts):
        if weight_name in mapped and mapped.replace(weight_name, param_name) in params:
            return [(mapped.replace(weight_name, param_name), expert, shard)]
    return [(mapped, None, None)] if mapped in params else []


def _slot(param: torch.Tensor, expert: int | None, shard: str | int | None, rows: int) -> torch.Tensor:
    """The part of ``param`` a tensor of ``rows`` rows was loaded into (gate/up halves of fused w13/gate_up)."""
    p = param if expert is None else param[expert]
    if shard in ("w1", 0):
        return p[:rows]
    if shard in ("w3", 1):
        return p[p.shape[0] - rows:]
    return p


@pytest.mark.parametrize("mode", ["static", "compact"])
def test_every_draft_tensor_loads_into_the_sglang_draft_module(mode, sglang_view, sglang):
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_loader.utils import get_model_architecture, set_default_torch_dtype

    server_args = _resolve(sglang_view)
    tensors = load_file(str(sglang_view / DRAFT_SHARD))
    assert tensors and all(n.startswith("mtp.") for n in tensors)
    with _env("SGLANG_RAGGED_VERIFY_MODE", mode):
        draft = ModelConfig.from_server_args(server_args, model_path=str(sglang_view), is_draft_model=True)
        cls, _ = get_model_architecture(draft)
        with set_default_torch_dtype(draft.dtype):
            model = cls(config=draft.hf_config, quant_config=None)
    assert model.num_stages == 2 and model.gamma == GAMMA
    assert (model.confidence_head is not None) == (mode == "compact")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for p in params.values():
            p.fill_(float("nan"))

    # 1. SGLang's own remapping of every exported name, to a parameter SGLang's module declares.
    unmapped, skipped, placed = [], [], {}
    for name in tensors:
        mapped = model._remap_dspark_weight_name(name)
        if mapped is None:
            skipped.append(name)
            continue
        dest = _destination(model, mapped)
        if not dest:
            unmapped.append(f"{name} -> {mapped}")
        else:
            placed[name] = dest[0]
    assert not unmapped, "exported tensors SGLang maps to no parameter:\n" + "\n".join(unmapped)
    by_design = [] if mode == "compact" else [n for n in tensors if ".confidence_head." in n]
    assert sorted(skipped) == sorted(by_design)

    # 2. SGLang's load_weights over the exported tensors: no warnings, every tensor in place (compared after the cast
    # to the parameter dtype SGLang chose: the export is bf16, SGLang's CPU build float16), nothing left NaN.
    handler = _Warnings()
    logger = logging.getLogger("sglang.srt.models.deepseek_v4_dspark")
    logger.addHandler(handler)
    try:
        model.load_weights(iter(tensors.items()))
    finally:
        logger.removeHandler(handler)
    assert not [m for m in handler.messages if "unexpected weight" in m], handler.messages
    wrong = []
    for name, (param_name, expert, shard) in placed.items():
        loaded = tensors[name]
        got = _slot(params[param_name].data, expert, shard, loaded.shape[0])
        if got.shape != loaded.shape or not torch.equal(got, loaded.to(got.dtype)):
            wrong.append(f"{name} -> {param_name} expert={expert} shard={shard} {got.dtype} {tuple(got.shape)} vs "
                         f"{loaded.dtype} {tuple(loaded.shape)} max|diff| "
                         f"{(got.float() - loaded.float()).abs().max().item() if got.shape == loaded.shape else '-'}")
    assert not wrong, "tensors not loaded value for value:\n" + "\n".join(wrong)
    unloaded = sorted(n for n, p in params.items() if torch.isnan(p).any())
    assert not unloaded, f"SGLang draft parameters the export does not fill: {unloaded}"
