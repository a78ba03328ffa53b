"""``attached`` for DeepSeek-V4 (issue 8 item 4): a ``dspark_v4`` drafter bundled into a copy of a V4 checkpoint as the
official ``mtp.<stage>.*`` tensors, with the ``dspark_*`` keys SGLang reads in the target ``config.json``.

Tiny V4 targets (``configs/deepseek_v4/smoke.yaml``) are built in-process and saved with ``save_pretrained``, single
file and sharded, each also with a stand-in for the target's own MTP module (``mtp.0.*``, as the official
checkpoints carry; transformers' V4 does not build it), once in a shard shared with other target tensors and once in
a shard of its own. The drafter is a real Lightning checkpoint trained for two steps of the V4 smoke config.
Checked: the copy still loads as a plain V4 model in transformers with the original's logits, the draft reads back
with identical outputs, the index is valid, the target files are hard links (or, for the MTP-mixed shard, written anew
without the MTP tensors, the original untouched), the config keys, and the refusals.
"""

from __future__ import annotations

import collections
import copy
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from dspark_lightning.drafters import DrafterConfig, DSpark
from dspark_lightning.drafters.dspark_v4 import v4_config_keys, v4_to_mtp_names
from dspark_lightning.export import attached, detect_format, export_checkpoint, load_drafter, write_export
from dspark_lightning.export.attached import DRAFT_SHARD, REWRITTEN_SUFFIX, verify_index
from dspark_lightning.export.checkpoint import TrainedDrafter, instantiate, namespace, read_checkpoint
from dspark_lightning.export.fileio import SAFE_INDEX, SAFE_WEIGHTS, load_tensors, tensor_nbytes
from dspark_lightning.export.v4 import DeepseekV4Flavour

REPO = Path(__file__).resolve().parents[2]
SMOKE = yaml.safe_load((REPO / "configs" / "deepseek_v4" / "smoke.yaml").read_text())["model"]
TINY = SMOKE["target"]["tiny"]
VOCAB = TINY["vocab_size"]
# A stand-in for the target's own MTP module (official V4: mtp.0.{e_proj,h_proj,enorm,hnorm} + one V4 block).
MTP_SHAPES = {"mtp.0.e_proj.weight": (64, 64), "mtp.0.h_proj.weight": (64, 64), "mtp.0.enorm.weight": (64,),
              "mtp.0.hnorm.weight": (64,), "mtp.0.attn.wq_a.weight": (32, 64), "mtp.0.attn_norm.weight": (64,),
              "mtp.0.ffn.experts.0.w1.weight": (64, 64), "mtp.0.norm.weight": (64,), "mtp.0.hc_head_fn": (4, 256)}


def _digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _logits(model) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(5))  # past the window of 16
    with torch.no_grad():
        return model(input_ids=ids).logits


def _build_target(seed: int = 0, **changes):
    from dspark_lightning.targets import FrozenTarget, TargetConfig

    return FrozenTarget.from_config(TargetConfig(tiny={**TINY, **changes}, seed=seed), [0]).model


# What the official V4 config.json carries and transformers' save_pretrained does not (SGLang reads both keys): the
# tiny target's layer types (sliding, CSA 4, HCA 16, sliding) and its one MTP layer, and the V4 router.
OFFICIAL_KEYS = {"compress_ratios": [0, 4, 16, 0, 0], "topk_method": "noaux_tc"}


def _save_target(model, directory: Path, **kwargs) -> Path:
    """``save_pretrained`` plus the official-config keys, as a V4 checkpoint downloaded from the Hub has them."""
    model.save_pretrained(directory, **kwargs)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **OFFICIAL_KEYS}, indent=2))
    return directory


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def v4_ckpt(tmp_path_factory) -> Path:
    """Two training steps of the V4 smoke config (DrafterModule + Trainer, hyper-parameters as our dataclasses)."""
    import lightning as L

    from dspark_lightning.data.online import RandomTokensDataModule
    from dspark_lightning.modules import DrafterModule, LossWeights
    from dspark_lightning.targets import TargetConfig

    target = TargetConfig(**copy.deepcopy(SMOKE["target"]))
    module = DrafterModule(DrafterConfig(**SMOKE["drafter"]), target, loss=LossWeights(**SMOKE["loss"]))
    data = RandomTokensDataModule(target=target, num_samples=8, seq_len=24, prompt_len=4, batch_size=4)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0)
    torch.manual_seed(0)
    trainer.fit(module, data)
    path = tmp_path_factory.mktemp("v4_ckpt") / "dspark_v4.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def v4_target():
    """The smoke V4 target (same seed as training: its embed/head equal the drafter's frozen copies)."""
    return _build_target()


def _add_mtp(directory: Path, file: str, names: list[str], *, new_file: bool) -> None:
    """Add stand-in MTP tensors ``names`` to ``file`` (rewritten, with the other tensors) or as a new ``file``."""
    g = torch.Generator().manual_seed(7)
    tensors = {} if new_file else load_tensors(directory / file)
    tensors.update({n: torch.randn(MTP_SHAPES[n], generator=g) for n in names})
    (directory / file).unlink(missing_ok=True)
    save_file(tensors, str(directory / file), metadata={"format": "pt"})
    if (directory / SAFE_INDEX).is_file():
        index = json.loads((directory / SAFE_INDEX).read_text())
        index["weight_map"].update(dict.fromkeys(names, file))
        index["metadata"]["total_size"] = sum(sum(tensor_nbytes(directory / f).values())
                                              for f in set(index["weight_map"].values()))
        (directory / SAFE_INDEX).write_text(json.dumps(index, indent=2))


@pytest.fixture(scope="module")
def v4_targets(tmp_path_factory, v4_target) -> dict[str, Path]:
    """``single`` / ``sharded`` save_pretrained directories, and ``*_mtp`` copies carrying a target MTP module:
    in ``model.safetensors`` (single) or half in the last target shard and half in a shard of its own (sharded)."""
    root = tmp_path_factory.mktemp("v4_targets")
    _save_target(v4_target, root / "single")
    _save_target(v4_target, root / "sharded", max_shard_size="300KB")
    assert len(json.loads((root / "sharded" / SAFE_INDEX).read_text())["weight_map"]) > 100
    shutil.copytree(root / "single", root / "single_mtp")
    _add_mtp(root / "single_mtp", SAFE_WEIGHTS, list(MTP_SHAPES), new_file=False)
    shutil.copytree(root / "sharded", root / "sharded_mtp")
    last = sorted(set(json.loads((root / "sharded" / SAFE_INDEX).read_text())["weight_map"].values()))[-1]
    names = list(MTP_SHAPES)
    _add_mtp(root / "sharded_mtp", last, names[:4], new_file=False)
    _add_mtp(root / "sharded_mtp", "model-mtp.safetensors", names[4:], new_file=True)
    verify_index(root / "sharded_mtp")
    return {p.name: p for p in root.iterdir()}


def _export(ckpt: Path, target_dir: Path, out: Path, **kwargs) -> Path:
    export_checkpoint(ckpt=str(ckpt), format="attached", out=str(out), target_dir=str(target_dir),
                      **{"dtype": "float32", "attached_layout": "bundled", **kwargs})
    return out


# ---------------------------------------------------------------------- export, then both loads
@pytest.mark.parametrize("kind", ["single", "sharded", "single_mtp", "sharded_mtp"])
def test_v4_bundled_export_loads_as_the_target_and_as_the_draft(kind, v4_targets, v4_ckpt, v4_target, original,
                                                               same_outputs, tmp_path):
    target_dir = v4_targets[kind]
    before = _digest(target_dir)
    original_index = json.loads((target_dir / SAFE_INDEX).read_text())["weight_map"] \
        if (target_dir / SAFE_INDEX).is_file() else dict.fromkeys(tensor_nbytes(target_dir / SAFE_WEIGHTS),
                                                                  SAFE_WEIGHTS)
    target_mtp = sorted(n for n in original_index if n.startswith("mtp."))
    out = tmp_path / "v4_with_dspark"
    if target_mtp:
        with pytest.warns(UserWarning, match=r"own MTP module \(mtp\.\*\).*left out of the copy"):
            _export(v4_ckpt, target_dir, out)
    else:
        _export(v4_ckpt, target_dir, out)
    assert _digest(target_dir) == before  # the original is never modified

    # (a) still a plain DeepSeek-V4 checkpoint for transformers, with the original target's logits.
    reloaded, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert type(reloaded).__name__ == "DeepseekV4ForCausalLM" and not info["missing_keys"]
    assert torch.equal(_logits(reloaded), _logits(v4_target))

    # (c) the index: every tensor in exactly one existing shard, total_size exact; draft = exactly our mtp.* set.
    verify_index(out)
    index = json.loads((out / SAFE_INDEX).read_text())["weight_map"]
    held = collections.Counter(n for f in set(index.values()) for n in tensor_nbytes(out / f))
    assert set(held) == set(index) and max(held.values()) == 1
    trained = read_checkpoint(v4_ckpt)
    draft_names = set(v4_to_mtp_names(trained.state_dict))
    assert {n for n in index if n.startswith("mtp.")} == draft_names  # the target's own MTP module is gone
    assert {n for n, f in index.items() if f == DRAFT_SHARD} == draft_names
    assert set(index) - draft_names == set(original_index) - set(target_mtp)
    # Target shards: hard links, except a shard that held MTP tensors: left out (MTP only) or written anew.
    rewritten = {f: f.replace(".safetensors", REWRITTEN_SUFFIX) for f in {original_index[n] for n in target_mtp}
                 if any(original_index[m] == f for m in set(original_index) - set(target_mtp))}
    for file in set(original_index.values()):
        if file in rewritten:
            assert not (out / file).exists() and rewritten[file] in set(index.values())
            kept = load_tensors(out / rewritten[file])
            theirs = load_tensors(target_dir / file, list(kept))
            assert set(kept) == {n for n, f in original_index.items() if f == file} - set(target_mtp)
            assert all(kept[n].dtype == theirs[n].dtype and torch.equal(kept[n], theirs[n]) for n in kept)
        elif all(n in target_mtp for n, f in original_index.items() if f == file):
            assert not (out / file).exists()
        else:
            assert os.path.samefile(out / file, target_dir / file), file
    assert set(rewritten) == ({SAFE_WEIGHTS} if kind == "single_mtp" else
                              {max(set(original_index.values()) - {"model-mtp.safetensors"})} if kind == "sharded_mtp"
                              else set())

    # (c) the config: the target's, plus SGLang's dspark_* keys (and ours).
    config = json.loads((out / "config.json").read_text())
    target_config = json.loads((target_dir / "config.json").read_text())
    cfg = trained.config
    assert {k: v for k, v in config.items() if k in target_config} == target_config
    assert {k: config[k] for k in v4_config_keys(cfg)} == v4_config_keys(cfg)
    assert (config["dspark_block_size"], config["dspark_markov_rank"], config["dspark_noise_token_id"]) == (5, 16, 255)
    assert config["dspark_target_layer_ids"] == [0, 2] and config["dspark_markov_head_type"] == "vanilla"
    assert (config["dspark_n_routed_experts"], config["dspark_num_experts_per_tok"]) == (4, 2)
    assert config["enable_confidence_head"] is True and config["confidence_head_with_markov"] is True
    assert config["dspark_flavour"] == "deepseek_v4"
    assert (out / "DSPARK.md").is_file() and "DeepSeek-V4 blocks" in (out / "DSPARK.md").read_text()

    # (b) the draft reads back out of the same directory with identical outputs (train-mode logits, T=0 proposals).
    assert detect_format(out) == "attached-bundled"
    loaded = load_drafter(out)
    assert type(loaded).__name__ == "DSparkV4" and loaded.config == cfg
    same_outputs(original(v4_ckpt), loaded)


def test_v4_round_trip_in_bfloat16_and_from_the_sglang_keys_alone(v4_targets, v4_ckpt, original, same_outputs,
                                                                   same_weights, tmp_path):
    out = _export(v4_ckpt, v4_targets["sharded"], tmp_path / "bf16", dtype="bfloat16")
    trained = read_checkpoint(v4_ckpt)
    cast = {k: v.to(torch.bfloat16) for k, v in trained.state_dict.items()}
    same_weights(instantiate(trained.config, cast), load_drafter(out))  # exactly the cast weights
    # A checkpoint bundled by others has only SGLang's keys: the config is rebuilt from them and the target.
    out = _export(v4_ckpt, v4_targets["sharded"], tmp_path / "f32")
    config = json.loads((out / "config.json").read_text())
    for key in ("dspark_exported_by", "dspark_flavour"):
        del config[key]
    (out / "config.json").write_text(json.dumps(config))
    loaded = load_drafter(out)
    expected = trained.config
    for field in ("algorithm", "block_size", "target_layer_ids", "mask_token_id", "markov_rank", "v4_geometry",
                  "enable_confidence_head", "confidence_head_with_markov", "hidden_size", "head_dim", "rope_theta"):
        assert getattr(loaded.config, field) == getattr(expected, field), field
    same_outputs(original(v4_ckpt), loaded)


def test_v4_draft_split_into_several_shards(v4_targets, v4_ckpt, original, same_outputs, tmp_path, monkeypatch):
    monkeypatch.setattr(attached, "MAX_DRAFT_SHARD_BYTES", 200_000)
    out = _export(v4_ckpt, v4_targets["single"], tmp_path / "split")
    verify_index(out)
    files = sorted({f for n, f in json.loads((out / SAFE_INDEX).read_text())["weight_map"].items()
                    if n.startswith("mtp.")})
    assert len(files) > 1 and files[0] == f"model-dspark-draft-00001-of-{len(files):05d}.safetensors"
    assert all(sum(tensor_nbytes(out / f).values()) <= 200_000 for f in files)
    assert all(f"`{f}`" in (out / "DSPARK.md").read_text() for f in files)
    same_outputs(original(v4_ckpt), load_drafter(out))


def test_v4_export_command_line(v4_targets, v4_ckpt, original, same_outputs, tmp_path):
    from dspark_lightning.cli import main

    out = tmp_path / "cli"
    main(["export", "--ckpt", str(v4_ckpt), "--format", "attached", "--attached_layout", "bundled",
          "--target_dir", str(v4_targets["sharded"]), "--out", str(out), "--dtype", "float32"])
    same_outputs(original(v4_ckpt), load_drafter(out))
    # bundled is the default (and only) layout of a dspark_v4 drafter
    main(["export", "--ckpt", str(v4_ckpt), "--format", "attached", "--target_dir", str(v4_targets["single"]),
          "--out", str(tmp_path / "default_layout")])
    assert json.loads((tmp_path / "default_layout" / "config.json").read_text())["dspark_block_size"] == 5


# ---------------------------------------------------------------------- refusals
def test_non_v4_target_is_refused_naming_its_model_type(v4_ckpt, tiny_target_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"'dspark_v4' but the target .* has model_type='qwen3'"):
        _export(v4_ckpt, tiny_target_dir, out)
    trained = read_checkpoint(v4_ckpt)  # resolved against its recorded V4 target
    with pytest.raises(ValueError, match=r"has model_type='qwen3', but a dspark_v4 drafter"):
        write_export(trained, fmt="attached", out=out, target_dir=tiny_target_dir)
    assert not out.exists()


@pytest.mark.parametrize(
    ("changes", "seed", "through_checkpoint", "write_message"),
    [
        ({"hidden_size": 96}, 0, "hidden_size=64 .* hidden_size=96", "hidden_size=64 but the target .* hidden_size=96"),
        ({"sliding_window": 32}, 0, "sliding_window=16 but the target has sliding_window=32",
         "sliding_window=16 but the target .* sliding_window=32"),
        ({}, 1, "embed_tokens.weight differs", "embed_tokens.weight differs from the target's"),
    ],
    ids=["hidden", "window", "other_weights"],
)
def test_v4_drafter_that_does_not_fit_the_target_is_refused(changes, seed, through_checkpoint, write_message,
                                                            v4_ckpt, tmp_path):
    target_dir = tmp_path / "other_v4"
    _save_target(_build_target(seed, **changes), target_dir)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=through_checkpoint):
        _export(v4_ckpt, target_dir, out)
    with pytest.raises(ValueError, match=write_message):
        write_export(read_checkpoint(v4_ckpt), fmt="attached", out=out, target_dir=target_dir)
    assert not out.exists()


def test_transformers_format_v4_config_is_refused_naming_the_keys_sglang_reads(v4_ckpt, v4_target, tmp_path):
    """The bundle keeps the target's config.json; SGLang 0.5.23 builds the V4 draft from compress_ratios and
    topk_method, which transformers' save_pretrained does not write (it has compress_rates by layer type)."""
    target_dir = tmp_path / "transformers_format"
    v4_target.save_pretrained(target_dir)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"lacks \['compress_ratios', 'topk_method'\], which SGLang 0.5.23 reads") as e:
        _export(v4_ckpt, target_dir, out)
    assert "compress_ratios = [0, 4, 16, 0, 0]" in str(e.value) and "'noaux_tc'" in str(e.value)
    assert not out.exists()
    config = json.loads((target_dir / "config.json").read_text())
    (target_dir / "config.json").write_text(json.dumps({**config, **OFFICIAL_KEYS, "compress_ratios": [0, 4]}))
    with pytest.raises(ValueError, match=r"compress_ratios=\[0, 4\]; SGLang reads one ratio per layer \(4 layers"):
        _export(v4_ckpt, target_dir, out)


def test_v4_layouts_formats_and_flavours_are_checked(v4_ckpt, v4_targets, tiny_target_dir, tmp_path):
    trained = read_checkpoint(v4_ckpt)
    sharded = v4_targets["sharded"]
    with pytest.raises(ValueError, match="attached_layout='subfolder' is not available for the deepseek_v4"):
        write_export(trained, fmt="attached", out=tmp_path / "a", target_dir=sharded, attached_layout="subfolder")
    for fmt in ("hf", "sglang", "deepspec"):
        with pytest.raises(ValueError, match=f"--format {fmt} cannot hold a 'dspark_v4' drafter"):
            write_export(trained, fmt=fmt, out=tmp_path / fmt)
    with pytest.raises(ValueError, match="flavour 'deepseek_v4'"):
        write_export(trained, fmt="attached", out=tmp_path / "b", target_dir=sharded, flavour="generic")
    # A Qwen3 DSpark drafter through the V4 flavour.
    qwen = json.loads((tiny_target_dir / "config.json").read_text())
    dspark = DSpark(DrafterConfig(num_hidden_layers=1, target_layer_ids=[0], block_size=3, markov_rank=4)
                    .resolve(namespace(qwen)))
    with pytest.raises(ValueError, match="writes dspark_v4 drafters; this one is 'dspark'"):
        write_export(TrainedDrafter.from_module(dspark, qwen), fmt="attached", out=tmp_path / "c",
                     target_dir=tiny_target_dir, flavour="deepseek_v4")
    # A target that already carries a bundled draft.
    first = _export(v4_ckpt, sharded, tmp_path / "first")
    with pytest.raises(ValueError, match="already carries a DSpark draft"):
        _export(v4_ckpt, first, tmp_path / "second")
    assert not any(p.name.startswith((".a", ".b", ".c", ".second")) for p in tmp_path.iterdir())


def test_quantised_or_incomplete_bundled_drafts_are_refused_on_import(v4_ckpt):
    flavour = DeepseekV4Flavour()
    tensors = v4_to_mtp_names(read_checkpoint(v4_ckpt).state_dict)
    with pytest.raises(ValueError, match=r"quantised .* 'mtp.0.attn.wq_a.scale'"):
        flavour.unbundle({**tensors, "mtp.0.attn.wq_a.scale": torch.ones(1)})
    del tensors["mtp.1.ffn.experts.3.w2.weight"]
    with pytest.raises(ValueError, match=r"mtp.1.ffn.experts: w1/w2/w3 must cover experts 0..3"):
        flavour.unbundle(tensors)


def test_unserved_heads_are_refused(v4_ckpt, v4_targets, tmp_path):
    trained = read_checkpoint(v4_ckpt)
    for change, message in (({"target_layer_ids": [-1, 2]}, r"target_layer_ids=\[-1, 2\]"),
                            ({"markov_rank": 0}, "markov_rank=0")):
        cfg = DrafterConfig(**{**trained.config.to_dict(), **change})
        with pytest.raises(ValueError, match=message):
            DeepseekV4Flavour().check(TrainedDrafter(cfg, trained.state_dict, trained.target_config), json.loads(
                (v4_targets["single"] / "config.json").read_text()), v4_targets["single"])


def test_quantised_target_gets_a_warning(v4_ckpt, v4_targets, tmp_path):
    target_dir = tmp_path / "fp8_target"
    shutil.copytree(v4_targets["single"], target_dir, copy_function=os.link)
    config = json.loads((target_dir / "config.json").read_text())
    (target_dir / "config.json").unlink()  # a new file: the hard-linked original stays as it is
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (target_dir / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="quant_method='fp8'.*quantising the draft is not implemented"):
        out = _export(v4_ckpt, target_dir, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
