"""DrafterConfig: geometry read from the target, validation messages, serialisation (STYLE habit 8)."""

from __future__ import annotations

import dataclasses
import json
import math
import types

import pytest
import torch

from dspark_lightning.drafters import DFlash, DrafterConfig, DSpark


def target_config(**overrides) -> types.SimpleNamespace:
    base = dict(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6,
                max_position_embeddings=256, attention_bias=False, hidden_act="silu", num_hidden_layers=4,
                rope_theta=10000.0)
    return types.SimpleNamespace(**{**base, **overrides})


BASE = dict(algorithm="dspark", num_hidden_layers=2, target_layer_ids=[0, 2], block_size=4, num_anchors=5,
            markov_rank=8, mask_token_id=63)


def resolved(**kw) -> DrafterConfig:
    return DrafterConfig(**{**BASE, **kw}).resolve(target_config())


@pytest.fixture
def no_parameters(monkeypatch):
    """Fail the test if any module registers a parameter (i.e. allocation started)."""

    def refuse(self, name, param):
        raise AssertionError(f"parameter {name!r} allocated before validation")

    monkeypatch.setattr(torch.nn.Module, "register_parameter", refuse)


# --------------------------------------------------------------------------------------------- resolve
def test_resolve_reads_geometry_from_target():
    cfg = resolved()
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (64, 32, 64)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 8)
    assert (cfg.rms_norm_eps, cfg.rope_theta) == (1e-6, 10000.0)
    assert (cfg.hidden_act, cfg.attention_bias) == ("silu", False)
    assert cfg.num_target_layers == 4 and cfg.num_hidden_layers == 2  # target depth vs drafter depth
    assert cfg.target_model_type == "qwen3"
    assert cfg.resolve(target_config()) == cfg, "resolve is idempotent"


def test_qwen3_target_has_qk_norm_and_no_embed_scale():
    cfg = resolved()
    assert cfg.qk_norm is True and cfg.embed_scale == 1.0


def test_llama_target_has_no_qk_norm():
    cfg = DrafterConfig(**BASE).resolve(target_config(model_type="llama"))
    assert cfg.qk_norm is False and cfg.embed_scale == 1.0


@pytest.mark.parametrize("model_type", ["gemma3_text", "gemma4"])
def test_gemma_target_scales_embeddings_by_sqrt_hidden(model_type):
    text = target_config(model_type=f"{model_type.removesuffix('_text')}_text", hidden_act=None,
                         hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=30.0)
    # Multimodal Gemma nests the text model; geometry is read from text_config.
    nested = model_type == "gemma4"
    target = types.SimpleNamespace(model_type=model_type, text_config=text) if nested else text
    cfg = DrafterConfig(**BASE).resolve(target)
    assert cfg.embed_scale == pytest.approx(math.sqrt(32))
    assert cfg.qk_norm is True
    assert cfg.hidden_act == "gelu_pytorch_tanh" and cfg.final_logit_softcapping == 30.0
    assert cfg.hidden_size == 32


def test_default_mask_token():
    big_qwen = target_config(vocab_size=151936)
    cfg = DrafterConfig(**{**BASE, "mask_token_id": None}).resolve(big_qwen)
    assert cfg.mask_token_id == 151669  # Qwen3's first unused embedding row
    with_pad = target_config(model_type="llama", pad_token_id=7)
    assert DrafterConfig(**{**BASE, "mask_token_id": None}).resolve(with_pad).mask_token_id == 7


def test_given_value_equal_to_target_is_accepted():
    assert resolved(hidden_size=32, vocab_size=64).hidden_size == 32


@pytest.mark.parametrize("field,value", [("vocab_size", 128), ("num_attention_heads", 8), ("head_dim", 16),
                                         ("num_key_value_heads", 4), ("intermediate_size", 96)])
def test_other_geometry_mismatches_raise(field, value):
    with pytest.raises(ValueError, match=rf"{field}={value}.*remove '{field}'"):
        resolved(**{field: value})


def test_rope_theta_mismatch_raises():
    with pytest.raises(ValueError, match="rope_theta"):
        resolved(rope_theta=1_000_000.0)


# ------------------------------------------------------------------------------------------- bad input
def test_hidden_size_mismatch(no_parameters):
    with pytest.raises(ValueError, match=r"hidden_size=48.*hidden_size=32.*remove 'hidden_size'"):
        resolved(hidden_size=48)


# (config overrides, regex the message must contain: the bad value and the way out)
BAD = {
    "layer id out of range": (dict(target_layer_ids=[0, 40]), r"\[40\].*4 layers.*\[-1, 3\]"),
    "layer id below -1": (dict(target_layer_ids=[-2, 1]), r"\[-2\].*\[-1, 3\]"),
    "mask token = vocab": (dict(mask_token_id=64), r"mask_token_id=64.*\[0, vocab_size=64\)"),
    "mask token negative": (dict(mask_token_id=-1), r"mask_token_id=-1.*\[0, vocab_size=64\)"),
    "unknown markov head": (dict(markov_head_type="lstm"), r"'lstm'.*vanilla.*gated.*rnn"),
    "decreasing layer ids": (dict(target_layer_ids=[2, 0]), r"\[2, 0\].*strictly increasing"),
    "repeated layer ids": (dict(target_layer_ids=[1, 1]), r"\[1, 1\].*strictly increasing"),
    "empty layer ids": (dict(target_layer_ids=[]), r"target_layer_ids is empty"),
    "confidence with markov, no markov head": (
        dict(markov_rank=0, enable_confidence_head=True, confidence_head_with_markov=True),
        r"confidence_head_with_markov.*markov_rank > 0.*confidence_head_with_markov: false"),
    "unknown block layout": (dict(block_layout="chain"), r"'chain'.*deepspec.*zlab"),
    "zero block size": (dict(block_size=0), r"block_size=0"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_raises_in_resolve(case, no_parameters):
    overrides, message = BAD[case]
    with pytest.raises(ValueError, match=message):
        resolved(**overrides)


HEAD_CASES = ("unknown markov head", "confidence with markov, no markov head")  # DFlash has no heads


MODEL_CASES = [(c, DSpark) for c in BAD] + [(c, DFlash) for c in BAD if c not in HEAD_CASES]


@pytest.mark.parametrize("case,cls", MODEL_CASES)
def test_bad_config_raises_before_any_module_is_allocated(case, cls, no_parameters):
    overrides, message = BAD[case]
    algorithm = "dspark" if cls is DSpark else "dflash"
    # Bypass resolve, as a hand-built or edited config would; the constructor must still refuse it.
    cfg = dataclasses.replace(resolved(algorithm=algorithm), **overrides)
    with pytest.raises(ValueError, match=message):
        cls(cfg)


@pytest.mark.parametrize("case", HEAD_CASES)
def test_head_settings_do_not_concern_dflash(case):
    overrides, _ = BAD[case]
    DFlash(dataclasses.replace(resolved(algorithm="dflash"), **overrides))


def test_unresolved_config_is_refused_by_the_models(no_parameters):
    with pytest.raises(ValueError, match=r"resolve\(target_config\)"):
        DSpark(DrafterConfig(**BASE))


# --------------------------------------------------------------------------------------- serialisation
def test_to_dict_from_dict_round_trip():
    for cfg in (DrafterConfig(**BASE), resolved(), resolved(block_layout="zlab", markov_head_type="rnn")):
        data = cfg.to_dict()
        assert DrafterConfig.from_dict(data) == cfg
        assert DrafterConfig.from_dict(json.loads(json.dumps(data))) == cfg


def test_to_dict_uses_deepspec_key_names():
    data = resolved().to_dict()
    for key in ("block_size", "mask_token_id", "target_layer_ids", "markov_rank", "markov_head_type",
                "enable_confidence_head", "confidence_head_with_markov", "num_anchors"):
        assert key in data


def test_from_dict_unknown_keys_raise_listing_valid_keys():
    with pytest.raises(ValueError) as info:
        DrafterConfig.from_dict({**BASE, "blocksize": 7, "markov_dim": 3})
    message = str(info.value)
    assert "'blocksize'" in message and "'markov_dim'" in message
    for valid in ("block_size", "markov_rank", "target_layer_ids", "mask_token_id"):
        assert f"'{valid}'" in message
