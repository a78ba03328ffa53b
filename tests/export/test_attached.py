"""``attached``: the draft inside a copy of the target. The target still loads with plain transformers and gives
identical logits, the draft loads from the same directory, the index stays valid, the original is untouched."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dspark_lightning.drafters import DrafterConfig, DSpark
from dspark_lightning.export import detect_format, export_checkpoint, load_drafter, write_export
from dspark_lightning.export.checkpoint import TrainedDrafter, namespace


def _digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _logits(model, vocab: int) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def sharded_target_dir(tmp_path_factory, tiny_target_model) -> Path:
    path = tmp_path_factory.mktemp("tiny_target_sharded")
    tiny_target_model.save_pretrained(path, max_shard_size="60KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_attached_target_and_draft_both_load(sharded, checkpoints, original, same_outputs, tiny_target_dir,
                                             sharded_target_dir, tiny_target_model, tmp_path):
    target_dir = sharded_target_dir if sharded else tiny_target_dir
    before = _digest(target_dir)
    out = tmp_path / "attached"
    export_checkpoint(ckpt=str(checkpoints["dspark_gated"]), format="attached", out=str(out), dtype="float32",
                      target_dir=str(target_dir))
    assert _digest(target_dir) == before  # the original target is never rewritten
    # The target copy loads with plain transformers and gives the original's logits.
    target = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(_logits(target, 256), _logits(tiny_target_model, 256))
    # Target weight files are hard links of the original's (same filesystem here).
    for name in before:
        if name.endswith(".safetensors"):
            assert os.path.samefile(out / name, target_dir / name), name
    # The draft loads from the same directory.
    assert detect_format(out) == "attached-subfolder"
    same_outputs(original(checkpoints["dspark_gated"]), load_drafter(out))
    assert json.loads((out / "config.json").read_text()) == json.loads((target_dir / "config.json").read_text())
    draft = json.loads((out / "dspark" / "config.json").read_text())
    assert draft["architectures"] == ["Qwen3DSparkModel"] and draft["markov_head_type"] == "gated"
    assert (out / "dspark" / "README.md").is_file()


def test_bundled_layout_is_refused_for_a_qwen3_target(checkpoints, tiny_target_dir, tmp_path):
    """SGLang 0.5.23 loads a bundled draft only for DeepSeek-V4 targets: for Qwen3 it would build
    Qwen3ForCausalLM as the draft and fail on the dspark.* tensors."""
    out = tmp_path / "attached"
    with pytest.raises(ValueError, match=r"attached_layout='bundled' is not available for the generic flavour: "
                                         r"SGLang 0.5.23 loads .* only for DeepseekV4ForCausalLM .*KeyError.* "
                                         r"Use attached_layout='subfolder'"):
        export_checkpoint(ckpt=str(checkpoints["dspark_gated"]), format="attached", out=str(out),
                          target_dir=str(tiny_target_dir), attached_layout="bundled")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_llama_target_subfolder(tmp_path, same_outputs):
    hf_config = AutoConfig.for_model("llama", vocab_size=128, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                     tie_word_embeddings=True)
    torch.manual_seed(0)
    llama = AutoModelForCausalLM.from_config(hf_config)
    target_dir = tmp_path / "llama"
    llama.save_pretrained(target_dir)
    target_config = json.loads((target_dir / "config.json").read_text())
    # SGLang's DSpark layers always normalise q and k, so a Llama-target drafter trains with qk_norm: true.
    cfg = DrafterConfig(num_hidden_layers=2, target_layer_ids=[0, 1], block_size=3, mask_token_id=127,
                        markov_rank=8, qk_norm=True).resolve(namespace(target_config))
    drafter = DSpark(cfg).eval()
    with torch.no_grad():
        drafter.embed_tokens.weight.copy_(llama.get_input_embeddings().weight)
        drafter.lm_head.weight.copy_(llama.get_output_embeddings().weight)
    out = tmp_path / "attached"
    write_export(TrainedDrafter.from_module(drafter, target_config, source="in-memory"), fmt="attached", out=out,
                 dtype="float32", target_dir=target_dir)
    draft_config = json.loads((out / "dspark" / "config.json").read_text())
    assert draft_config["architectures"] == ["DSparkDraftModel"] and draft_config["model_type"] == "llama"
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(_logits(reloaded, 128), _logits(llama, 128))
    same_outputs(drafter, load_drafter(out))


def _variant_target(tiny_target_model, tmp_path: Path, **changes) -> Path:
    config = tiny_target_model.config.to_dict()
    config.update(changes)
    hf_config = AutoConfig.for_model(**{k: v for k, v in config.items() if not k.startswith("_")})
    torch.manual_seed(1)
    path = tmp_path / "other_target"
    AutoModelForCausalLM.from_config(hf_config).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hidden_size": 32, "head_dim": 8}, "hidden_size=64 but the target .* has hidden_size=32"),
        ({"vocab_size": 300}, "vocab_size=256 but the target .* has vocab_size=300"),
        ({}, "embed_tokens.weight differs from the target's"),  # same shapes, other weights
    ],
)
def test_drafter_that_does_not_fit_the_target_is_refused(changes, message, checkpoints, tiny_target_model, tmp_path):
    target_dir = _variant_target(tiny_target_model, tmp_path, **changes)
    out = tmp_path / "out"
    from dspark_lightning.export.checkpoint import read_checkpoint

    trained = read_checkpoint(checkpoints["dspark_vanilla"])  # resolved against its own (recorded) target
    with pytest.raises(ValueError, match=message):
        write_export(trained, fmt="attached", out=out, target_dir=target_dir)
    assert not out.exists()


def test_attached_needs_a_target_dir_and_refuses_writing_into_it(checkpoints, tiny_target_dir):
    with pytest.raises(ValueError, match="pass --target_dir"):
        export_checkpoint(ckpt=str(checkpoints["dspark_vanilla"]), format="attached", out="unused")
    with pytest.raises(ValueError, match="inside the target directory"):
        export_checkpoint(ckpt=str(checkpoints["dspark_vanilla"]), format="attached",
                          out=str(tiny_target_dir / "copy"), target_dir=str(tiny_target_dir))
