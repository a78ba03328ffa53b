"""Importing DeepSpec draft directories built here as DeepSpec writes them (``deepspec/modeling/*/qwen3/``,
``deepspec/modeling/*/gemma4/``): config keys = the target config (Gemma4: its text config) + DeepSpec's draft keys,
tensors under DeepSpec's module names, embed/lm_head included, bf16. The imported drafter must give the logits of a
drafter built by hand from the same description."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dspark_lightning.drafters import DrafterConfig, DSpark, Eagle3
from dspark_lightning.export import load_drafter, read_checkpoint
from dspark_lightning.export.checkpoint import instantiate
from dspark_lightning.export.deepspec import import_deepspec

V, H, INTER, NH, NKV, DH, TARGET_LAYERS = 128, 32, 64, 4, 2, 8, 4
QWEN3_TARGET = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": V, "hidden_size": H,
    "intermediate_size": INTER, "num_hidden_layers": TARGET_LAYERS, "num_attention_heads": NH,
    "num_key_value_heads": NKV, "head_dim": DH, "hidden_act": "silu", "rms_norm_eps": 1e-6,
    "max_position_embeddings": 512,
    "rope_parameters": {"rope_theta": 1000000, "rope_type": "default"}, "attention_bias": False,
    "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None, "use_cache": True,
    "sliding_window": None, "use_sliding_window": False, "max_window_layers": 4, "initializer_range": 0.02,
    "attention_dropout": 0.0, "layer_types": ["full_attention"] * TARGET_LAYERS, "dtype": "bfloat16",
    "transformers_version": "5.10.2",
}


def _layer(prefix: str, in_features: int) -> dict[str, tuple[int, ...]]:
    q, kv = NH * DH, NKV * DH
    return {f"{prefix}input_layernorm.weight": (H,), f"{prefix}post_attention_layernorm.weight": (H,),
            f"{prefix}self_attn.q_proj.weight": (q, in_features), f"{prefix}self_attn.k_proj.weight": (kv, in_features),
            f"{prefix}self_attn.v_proj.weight": (kv, in_features), f"{prefix}self_attn.o_proj.weight": (H, q),
            f"{prefix}self_attn.q_norm.weight": (DH,), f"{prefix}self_attn.k_norm.weight": (DH,),
            f"{prefix}mlp.gate_proj.weight": (INTER, H), f"{prefix}mlp.up_proj.weight": (INTER, H),
            f"{prefix}mlp.down_proj.weight": (H, INTER)}


def _write(directory: Path, config: dict, shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=g)
        if name.endswith("norm.weight"):
            t = 1.0 + 0.2 * t
        elif len(shape) == 2 and "embed" not in name and "markov_w1" not in name:
            t = t * shape[1] ** -0.5
        tensors[name] = t.to(torch.bfloat16)
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return tensors


def _target_ns(**overrides) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{**QWEN3_TARGET, **overrides})


def dspark_dir(root: Path, markov_rank: int = 8) -> tuple[Path, DrafterConfig, dict[str, torch.Tensor]]:
    """A DeepSpec DSpark (markov_rank > 0) or DFlash (markov_rank 0, no confidence head) directory."""
    dspark = markov_rank > 0
    config = {**QWEN3_TARGET, "architectures": ["Qwen3DSparkModel"], "num_target_layers": TARGET_LAYERS,
              "num_hidden_layers": 2, "block_size": 3, "tie_word_embeddings": False,
              "layer_types": ["full_attention"] * 2, "mask_token_id": V - 1, "target_layer_ids": [0, 2],
              "num_anchors": 512, "enable_confidence_head": dspark, "markov_rank": markov_rank}
    if dspark:
        config.update({"confidence_head_with_markov": True, "markov_head_type": "vanilla"})
    shapes = {"embed_tokens.weight": (V, H), "lm_head.weight": (V, H), "fc.weight": (H, 2 * H),
              "hidden_norm.weight": (H,), **_layer("layers.0.", H), **_layer("layers.1.", H), "norm.weight": (H,)}
    if dspark:
        shapes.update({"markov_head.markov_w1.weight": (V, markov_rank),
                       "markov_head.markov_w2.weight": (V, markov_rank),
                       "confidence_head.proj.weight": (1, H + markov_rank), "confidence_head.proj.bias": (1,)})
    directory = root / ("dspark" if dspark else "dflash")
    tensors = _write(directory, config, shapes, seed=markov_rank)
    # The drafter as DeepSpec's files describe it, configured by hand.
    cfg = DrafterConfig(algorithm="dspark" if dspark else "dflash", num_hidden_layers=2, target_layer_ids=[0, 2],
                        block_size=3, block_layout="deepspec", mask_token_id=V - 1, markov_rank=markov_rank,
                        enable_confidence_head=dspark, confidence_head_with_markov=dspark,
                        ).resolve(_target_ns())
    return directory, cfg, tensors


def eagle3_dir(root: Path, arch: str = "Qwen3Eagle3Model") -> tuple[Path, DrafterConfig, dict[str, torch.Tensor]]:
    config = {**QWEN3_TARGET, "architectures": [arch], "num_target_layers": TARGET_LAYERS, "num_hidden_layers": 1,
              "draft_num_hidden_layers": 1, "ttt_length": 7, "step_loss_decay": 0.8, "target_layer_ids": [0, 1, 2],
              "target_model_name_or_path": "Qwen/Qwen3-4B", "layer_types": ["full_attention"],
              "tie_word_embeddings": False}
    shapes = {"embed_tokens.weight": (V, H), "lm_head.weight": (V, H), "fc.weight": (H, 3 * H),
              "layers.0.hidden_norm.weight": (H,), **_layer("layers.0.", 2 * H), "norm.weight": (H,)}
    directory = root / arch
    tensors = _write(directory, config, shapes, seed=7)
    cfg = DrafterConfig(algorithm="eagle3", num_hidden_layers=1, target_layer_ids=[0, 1, 2], ttt_length=7,
                        ).resolve(_target_ns())
    return directory, cfg, tensors


def _by_hand(cfg: DrafterConfig, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = (Eagle3 if cfg.algorithm == "eagle3" else DSpark)(cfg)
    model.load_state_dict({k: v.clone() for k, v in tensors.items()}, strict=True, assign=True)
    return model.eval()


@pytest.mark.parametrize("kind", ["dspark", "dflash", "eagle3", "eagle3_legacy_name"])
def test_import_deepspec_gives_the_logits_of_the_described_drafter(kind, tmp_path, same_outputs, same_weights):
    from transformers import AutoModel

    if kind.startswith("eagle3"):
        directory, cfg, tensors = eagle3_dir(tmp_path, "Eagle3DraftModel" if kind.endswith("name") else
                                             "Qwen3Eagle3Model")
    else:
        directory, cfg, tensors = dspark_dir(tmp_path, markov_rank=8 if kind == "dspark" else 0)
    reference = _by_hand(cfg, tensors)

    ckpt = tmp_path / "imported.ckpt"
    import_deepspec(str(directory), out=str(ckpt))
    trained = read_checkpoint(ckpt)  # needs no target: the resolved configs travel in the checkpoint
    assert trained.config == cfg
    imported = instantiate(trained.config, trained.state_dict)
    same_weights(reference, imported)
    same_outputs(reference, imported)

    repo = tmp_path / "imported_hf"
    import_deepspec(str(directory), out=str(repo))
    same_outputs(reference, load_drafter(repo))
    hub = AutoModel.from_pretrained(repo, trust_remote_code=True)
    same_outputs(reference, hub.drafter)
    assert load_drafter(directory).config == cfg  # load_drafter reads DeepSpec directories directly too


def test_imported_checkpoint_loads_in_drafter_module(tmp_path, same_outputs):
    from transformers import AutoConfig, AutoModelForCausalLM

    from dspark_lightning.modules import DrafterModule

    directory, cfg, tensors = dspark_dir(tmp_path)
    target_dir = tmp_path / "target"
    fields = {k: v for k, v in QWEN3_TARGET.items() if k not in ("architectures", "transformers_version", "dtype")}
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**fields)).save_pretrained(target_dir)
    ckpt = tmp_path / "imported.ckpt"
    import_deepspec(str(directory), out=str(ckpt), target=str(target_dir))
    module = DrafterModule.load_from_checkpoint(ckpt)  # Lightning loads into the module's fp32 parameters
    same_outputs(_by_hand(cfg, {k: v.float() for k, v in tensors.items()}), module.drafter.eval())


def test_not_a_deepspec_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        import_deepspec(str(tmp_path), out=str(tmp_path / "x.ckpt"))
    (tmp_path / "config.json").write_text(json.dumps({**QWEN3_TARGET}))
    with pytest.raises(ValueError, match=r"\['Qwen3ForCausalLM'\] is not a DeepSpec Qwen3 draft"):
        import_deepspec(str(tmp_path), out=str(tmp_path / "x.ckpt"))


# ---------------------------------------------------------------------- Gemma4 (DeepSpec gemma4/ classes)
GDH, GKV = 2 * DH, 1  # the full-attention head geometry DeepSpec's Gemma4 layers use, K = V
GEMMA4_TEXT = {
    "model_type": "gemma4_text", "vocab_size": V, "hidden_size": H, "intermediate_size": INTER,
    "num_hidden_layers": TARGET_LAYERS, "num_attention_heads": NH, "num_key_value_heads": NKV, "head_dim": DH,
    "global_head_dim": GDH, "num_global_key_value_heads": GKV, "attention_k_eq_v": True,
    "hidden_size_per_layer_input": 0, "final_logit_softcapping": 30.0, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 512, "sliding_window": 16, "rms_norm_eps": 1e-6, "attention_bias": False,
    "rope_parameters": {"full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                           "rope_theta": 10000.0},
                        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
    "layer_types": ["sliding_attention"] * (TARGET_LAYERS - 1) + ["full_attention"], "tie_word_embeddings": True,
    "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "dtype": "bfloat16", "transformers_version": "5.10.2",
}


def _gemma4_layer(prefix: str, in_features: int) -> dict[str, tuple[int, ...]]:
    """DeepSpec's Gemma4 decoder layer: sandwich norms, a layer_scalar buffer, K = V (no v_proj), full-attention
    head geometry."""
    return {f"{prefix}input_layernorm.weight": (H,), f"{prefix}post_attention_layernorm.weight": (H,),
            f"{prefix}pre_feedforward_layernorm.weight": (H,), f"{prefix}post_feedforward_layernorm.weight": (H,),
            f"{prefix}layer_scalar": (1,),
            f"{prefix}self_attn.q_proj.weight": (NH * GDH, in_features),
            f"{prefix}self_attn.k_proj.weight": (GKV * GDH, in_features),
            f"{prefix}self_attn.o_proj.weight": (H, NH * GDH),
            f"{prefix}self_attn.q_norm.weight": (GDH,), f"{prefix}self_attn.k_norm.weight": (GDH,),
            f"{prefix}mlp.gate_proj.weight": (INTER, H), f"{prefix}mlp.up_proj.weight": (INTER, H),
            f"{prefix}mlp.down_proj.weight": (H, INTER)}


def gemma4_dir(root: Path, algorithm: str) -> tuple[Path, DrafterConfig, dict[str, torch.Tensor]]:
    """A DeepSpec Gemma4 draft directory (``Gemma4DSparkModel`` for DSpark/DFlash, ``Gemma4Eagle3Model``) and the
    drafter configured by hand for the same Gemma4 target."""
    target_keys = {"target_model_type": "gemma4", "target_text_model_type": "gemma4_text",
                   "num_target_layers": TARGET_LAYERS, "tie_word_embeddings": False}
    shapes = {"embed_tokens.weight": (V, H), "lm_head.weight": (V, H), "norm.weight": (H,)}
    if algorithm == "eagle3":
        config = {**GEMMA4_TEXT, **target_keys, "architectures": ["Gemma4Eagle3Model"], "num_hidden_layers": 1,
                  "draft_num_hidden_layers": 1, "ttt_length": 3, "step_loss_decay": 0.8, "target_layer_ids": [0, 1, 2],
                  "layer_types": ["full_attention"]}
        shapes.update({"fc.weight": (H, 3 * H), "layers.0.hidden_norm.weight": (H,),
                       **_gemma4_layer("layers.0.", 2 * H)})
        fields = dict(algorithm="eagle3", num_hidden_layers=1, target_layer_ids=[0, 1, 2], ttt_length=3)
    else:
        dspark = algorithm == "dspark"
        config = {**GEMMA4_TEXT, **target_keys, "architectures": ["Gemma4DSparkModel"], "num_hidden_layers": 2,
                  "block_size": 3, "layer_types": ["full_attention"] * 2, "mask_token_id": 4,
                  "target_layer_ids": [0, 2], "num_anchors": 512, "enable_confidence_head": dspark,
                  "markov_rank": 8 if dspark else 0}
        shapes.update({"fc.weight": (H, 2 * H), "hidden_norm.weight": (H,), **_gemma4_layer("layers.0.", H),
                       **_gemma4_layer("layers.1.", H)})
        if dspark:
            config.update({"confidence_head_with_markov": True, "markov_head_type": "vanilla"})
            shapes.update({"markov_head.markov_w1.weight": (V, 8), "markov_head.markov_w2.weight": (V, 8),
                           "confidence_head.proj.weight": (1, H + 8), "confidence_head.proj.bias": (1,)})
        heads = dict(markov_rank=8, enable_confidence_head=True, confidence_head_with_markov=True) if dspark else \
            dict(markov_rank=0, enable_confidence_head=False, confidence_head_with_markov=False)
        fields = dict(algorithm=algorithm, num_hidden_layers=2, target_layer_ids=[0, 2], block_size=3,
                      block_layout="deepspec", mask_token_id=4, **heads)
    directory = root / f"gemma4_{algorithm}"
    tensors = _write(directory, config, shapes, seed=11)
    target = {k: v for k, v in GEMMA4_TEXT.items() if k not in ("dtype", "transformers_version")}
    cfg = DrafterConfig(**fields).resolve(types.SimpleNamespace(**target, hidden_act="gelu_pytorch_tanh"))
    return directory, cfg, tensors


@pytest.mark.parametrize("algorithm", ["dspark", "dflash", "eagle3"])
def test_import_deepspec_reads_the_gemma4_layout(algorithm, tmp_path, same_outputs, same_weights):
    directory, cfg, tensors = gemma4_dir(tmp_path, algorithm)
    assert (cfg.norm_style, cfg.attention_k_eq_v, cfg.layer_scalar, cfg.attention_head_dim) == (
        "sandwich", True, True, GDH)  # the by-hand drafter is DeepSpec's Gemma4 variant
    reference = _by_hand(cfg, tensors)
    ckpt = tmp_path / "imported.ckpt"
    import_deepspec(str(directory), out=str(ckpt))
    trained = read_checkpoint(ckpt)
    assert trained.config == cfg and trained.target_config["model_type"] == "gemma4_text"
    imported = instantiate(trained.config, trained.state_dict)
    same_weights(reference, imported)
    same_outputs(reference, imported)
    assert load_drafter(directory).config == cfg


@pytest.mark.parametrize("algorithm", ["dspark", "dflash", "eagle3"])
def test_gemma4_drafters_export_to_deepspec_and_back_bit_for_bit(algorithm, tmp_path, same_outputs):
    """Ours -> DeepSpec's Gemma4 layout (same tensor names and bytes, DeepSpec's config keys) -> ours again."""
    from safetensors.torch import load_file

    from dspark_lightning.export.checkpoint import TrainedDrafter
    from dspark_lightning.export.exporter import write_export

    directory, cfg, tensors = gemma4_dir(tmp_path, algorithm)
    ours = _by_hand(cfg, tensors)
    target_config = {"model_type": "gemma4", "text_config": dict(GEMMA4_TEXT)}  # a multimodal top level
    out = write_export(TrainedDrafter.from_module(ours, target_config), fmt="deepspec", out=tmp_path / "out",
                       dtype="bfloat16")
    written = json.loads((Path(out) / "config.json").read_text())
    arch = "Gemma4Eagle3Model" if algorithm == "eagle3" else "Gemma4DSparkModel"
    assert written["architectures"] == [arch] and written["model_type"] == "gemma4_text"
    assert (written["target_model_type"], written["target_text_model_type"]) == ("gemma4", "gemma4_text")
    assert (written["global_head_dim"], written["num_global_key_value_heads"]) == (GDH, GKV)
    weights = load_file(str(Path(out) / "model.safetensors"))
    assert weights.keys() == tensors.keys()  # DeepSpec's names, nothing renamed or added
    assert all(torch.equal(weights[k], tensors[k]) for k in tensors)
    back = load_drafter(out)
    assert back.config == cfg
    same_outputs(ours, back)
