"""Every YAML under ``configs/`` parses with LightningCLI and builds its model on the meta device, offline.

The paper configs are also checked against the reference: the drafters' parameter counts against those of DeepSpec's
own drafters (which cross-checks the builtin target geometry, ``resources/target_configs``), the
hyper-parameters against DeepSpec's ``config/<algorithm>/*.py``, and the builtin target configs against the geometry
DeepSpec's drafters imply. Nothing is
downloaded (``HF_HUB_OFFLINE``, conftest) and no real memory is allocated: the 14B DSpark drafter has 3.4 B
parameters.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch
import yaml

from dspark_lightning.cli import lightning_main
from dspark_lightning.targets import TargetConfig, builtin_target_config, builtin_target_configs, load_target_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
# Only the machine-specific trainer keys are replaced, so a multi-GPU config parses on a CPU box.
ON_THIS_MACHINE = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto",
                   "--trainer.num_nodes=1", "--trainer.logger=false"]
TOKEN_DATA = {"class_path": "dspark_lightning.data.online.RandomTokensDataModule",
              "init_args": {"num_samples": 8, "seq_len": 16, "prompt_len": 4, "batch_size": 1}}

# DeepSpec's drafters (``deepspec/modeling/{dspark,eagle3}/qwen3/``) built on the meta device from the real Qwen3
# configs: (total parameters in B, trainable in M), embed_tokens and lm_head included and frozen.
PAPER_PARAMETERS = {
    "qwen3/dspark_4b.yaml": (1.393, 615.2), "qwen3/dflash_4b.yaml": (1.315, 537.4),
    "qwen3/eagle3_4b.yaml": (0.927, 149.4),
    "qwen3/dspark_8b.yaml": (2.371, 1126.4), "qwen3/dflash_8b.yaml": (2.293, 1048.6),
    "qwen3/eagle3_8b.yaml": (1.547, 302.0),
    "qwen3/dspark_14b.yaml": (3.416, 1860.4), "qwen3/dflash_14b.yaml": (3.338, 1782.6),
    "qwen3/eagle3_14b.yaml": (2.054, 498.1),
}
# The paper's feature layers and mask tokens per target (DeepSpec ``deepspec/modeling/dspark/qwen3/config.py``).
PAPER_TARGETS = {
    "4b": ("Qwen/Qwen3-4B", [1, 9, 17, 25, 33], 151669), "8b": ("Qwen/Qwen3-8B", [1, 9, 17, 25, 33], 151669),
    "14b": ("Qwen/Qwen3-14B", [1, 10, 19, 28, 37], 151669),
    "12b": ("google/gemma-4-12B-it", [5, 17, 29, 41, 46], 4),
}
PAPER_CONFIGS = sorted(p for p in CONFIGS if p.parent.name in ("qwen3", "gemma4"))


def rel(path: Path) -> str:
    return path.relative_to(ROOT / "configs").as_posix()


def _importable(class_path: str) -> bool:
    module, _, name = class_path.rpartition(".")
    try:
        return hasattr(importlib.import_module(module), name)
    except ImportError:
        return False


_PARSED: dict[Path, object] = {}


def parse(path: Path, tmp_path: Path):
    """LightningCLI on ``path`` on the meta device, instantiated but not run (``run=False`` parses the ``fit``
    arguments without the subcommand); a data module whose class is not in this checkout yet is replaced by a
    token one, so the model and trainer blocks are still checked. Parsed once per file (the tests only read)."""
    if path not in _PARSED:
        _PARSED[path] = _parse(path, tmp_path)
    return _PARSED[path]


def _parse(path: Path, tmp_path: Path):
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    source = path
    data_class = (config.get("data") or {}).get("class_path")
    if data_class and not _importable(data_class):
        config["data"] = TOKEN_DATA
        source = tmp_path / path.name
        source.write_text(yaml.safe_dump(config), encoding="utf-8")
    # An overlay (no model.target, e.g. smollm2/validate.yaml) is layered over its folder's DSpark config, as
    # its header says to run it.
    base = [] if (config.get("model") or {}).get("target") else ["--config", str(path.parent / "dspark.yaml")]
    args = [*base, "--config", str(source), *ON_THIS_MACHINE, f"--trainer.default_root_dir={tmp_path}"]
    with torch.device("meta"):
        return lightning_main(args, run=False)


def counts(module: torch.nn.Module) -> tuple[int, int]:
    params = list(module.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


# --------------------------------------------------------------------------------------------- all configs
@pytest.mark.parametrize("path", CONFIGS, ids=rel)
def test_config_parses_and_builds_on_the_meta_device(path, tmp_path):
    cli = parse(path, tmp_path)
    module = cli.model
    assert all(p.is_meta for p in module.parameters()), "the drafter must be built without real memory"
    assert counts(module.drafter)[1] > 0
    assert cli.datamodule is not None and cli.trainer is not None
    # The CLI links the target into the data module: one target per run, typed once.
    if hasattr(cli.datamodule, "target"):
        assert cli.datamodule.target == module.target_config


def test_every_paper_target_and_algorithm_has_a_config():
    names = {rel(p) for p in PAPER_CONFIGS}
    expected = {f"{'gemma4' if size == '12b' else 'qwen3'}/{algo}_{size}.yaml"
                for size in PAPER_TARGETS for algo in ("dspark", "dflash", "eagle3")}
    assert names == expected
    assert {rel(p) for p in CONFIGS if p.parent.name == "smollm2"} == {
        "smollm2/dspark.yaml", "smollm2/dflash.yaml", "smollm2/eagle3.yaml", "smollm2/validate.yaml",
        "smollm2/from_cache.yaml"}


# ------------------------------------------------------------------------------------------ paper configs
@pytest.mark.parametrize("name", sorted(PAPER_PARAMETERS))
def test_paper_drafter_parameter_counts_match_the_reference(name, tmp_path):
    total, trainable = counts(parse(ROOT / "configs" / name, tmp_path).model.drafter)
    ref_total, ref_trainable = PAPER_PARAMETERS[name]
    assert round(total / 1e9, 3) == ref_total, f"{name}: {total:,} parameters"
    assert abs(trainable / 1e6 - ref_trainable) < 0.1, f"{name}: {trainable:,} trainable parameters"


def gemma4_12b_parameters(algorithm: str) -> tuple[int, int]:
    """Parameter count of DeepSpec's Gemma4 drafters from the module shapes of ``deepspec/modeling/*/gemma4/`` and
    the 12B geometry (V 262144, H 3840, I 15360, 16 heads of global_head_dim 512, 1 global kv head, K = V so no
    v_proj)."""
    v, h, inter, heads, dh, kv_heads, m, rank = 262144, 3840, 15360, 16, 512, 1, 5, 256

    def layer(attn_in: int) -> int:
        attention = attn_in * heads * dh + attn_in * kv_heads * dh + heads * dh * h + 2 * dh  # q, k, o, q/k norm
        return attention + 3 * h * inter + 4 * h  # gelu MLP, sandwich norms (input/post-attn/pre-ff/post-ff)

    frozen = 2 * v * h  # embed_tokens, lm_head
    if algorithm == "eagle3":
        trainable = m * h * h + layer(2 * h) + h + h  # fc, the layer, its hidden_norm, final norm
    else:
        trainable = m * h * h + h + 5 * layer(h) + h  # fc, hidden_norm, 5 layers, norm
        if algorithm == "dspark":
            trainable += 2 * v * rank + (h + rank + 1)  # markov_w1/w2, confidence head
    return frozen + trainable, trainable


@pytest.mark.parametrize("algorithm", ["dspark", "dflash", "eagle3"])
def test_gemma4_drafter_parameter_counts(algorithm, tmp_path):
    module = parse(ROOT / "configs" / "gemma4" / f"{algorithm}_12b.yaml", tmp_path).model
    assert counts(module.drafter) == gemma4_12b_parameters(algorithm)
    cfg = module.drafter_config
    assert (cfg.norm_style, cfg.attention_k_eq_v, cfg.v_norm, cfg.layer_scalar, cfg.attention_scale) == (
        "sandwich", True, True, True, 1.0)
    assert (cfg.rope_type, cfg.partial_rotary_factor, cfg.rope_theta) == ("proportional", 0.25, 1_000_000.0)
    assert cfg.final_logit_softcapping == 30.0 and cfg.hidden_act == "gelu_pytorch_tanh"


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=rel)
def test_paper_configs_carry_the_reference_hyper_parameters(path, tmp_path):
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    trainer, data = raw["trainer"], raw["data"]["init_args"]
    assert (trainer["accelerator"], trainer["strategy"], trainer["devices"]) == ("gpu", "ddp", 8)
    assert (trainer["precision"], trainer["gradient_clip_val"]) == ("bf16-mixed", 1.0)
    assert data["batch_size"] * trainer["devices"] * trainer["num_nodes"] * trainer["accumulate_grad_batches"] == 512
    assert raw["data"]["class_path"] == "dspark_lightning.data.cache.datamodule.TargetCacheDataModule"
    assert data["path"].startswith("/") and "~" not in data["path"], "an absolute placeholder the user replaces"
    assert trainer["default_root_dir"].startswith("/")

    module = parse(path, tmp_path).model
    algorithm, size = path.stem.split("_")
    hub_id, layer_ids, mask_token = PAPER_TARGETS[size]
    cfg, loss = module.drafter_config, module.loss_weights
    assert module.target_config.path == hub_id and cfg.target_layer_ids == layer_ids
    optimizer = raw["model"]["optimizer"]
    assert optimizer["class_path"] == "torch.optim.AdamW"
    assert (optimizer["init_args"]["lr"], optimizer["init_args"]["weight_decay"]) == (6e-4, 0.0)
    assert module.warmup_ratio == 0.04
    if algorithm == "eagle3":
        assert (cfg.num_hidden_layers, cfg.ttt_length, loss.step_decay) == (1, 7, 0.8)
        return
    assert (cfg.num_hidden_layers, cfg.block_size, cfg.block_layout, cfg.num_anchors) == (5, 7, "deepspec", 512)
    assert cfg.mask_token_id == mask_token and loss.decay == 4.0
    if algorithm == "dspark":
        assert (cfg.markov_rank, cfg.markov_head_type) == (256, "vanilla")
        assert cfg.enable_confidence_head and cfg.confidence_head_with_markov
        assert (loss.ce, loss.l1, loss.confidence) == (0.1, 0.9, 1.0)
    else:
        assert cfg.markov_rank == 0 and not cfg.enable_confidence_head
        assert (loss.ce, loss.l1, loss.confidence) == (1.0, 0.0, 0.0)


# -------------------------------------------------------------------------------- builtin target configs
# Geometry DeepSpec pins (its drafters' parameter counts; the released Qwen3-4B drafter's config.json).
QWEN3_GEOMETRY = {  # hidden, intermediate, layers, heads, kv heads
    "Qwen/Qwen3-4B": (2560, 9728, 36, 32, 8), "Qwen/Qwen3-8B": (4096, 12288, 36, 32, 8),
    "Qwen/Qwen3-14B": (5120, 17408, 40, 40, 8),
}


def test_builtin_target_configs_hold_the_reference_geometry():
    paper_targets = {"Qwen/Qwen3-4B", "Qwen/Qwen3-8B", "Qwen/Qwen3-14B", "google/gemma-4-12B-it"}
    assert paper_targets <= set(builtin_target_configs())
    for repo_id, geometry in QWEN3_GEOMETRY.items():
        c = builtin_target_config(repo_id)
        assert c.model_type == "qwen3"
        assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
                c.num_key_value_heads) == geometry
        assert (c.head_dim, c.vocab_size, c.rms_norm_eps, c.max_position_embeddings) == (128, 151936, 1e-6, 40960)
        assert c.rope_parameters["rope_theta"] == 1_000_000 and c.hidden_act == "silu"
    assert builtin_target_config("Qwen/Qwen3-4B").tie_word_embeddings is True  # 4B ties (its config.json)

    gemma = builtin_target_config("google/gemma-4-12B-it")
    raw = json.loads((ROOT / "dspark_lightning/resources/target_configs/google--gemma-4-12B-it.json").read_text())
    text = raw["text_config"]
    assert gemma.model_type == "gemma4_unified" and gemma.text_config.hidden_size == 3840
    assert (text["num_hidden_layers"], text["global_head_dim"], text["num_global_key_value_heads"]) == (48, 512, 1)
    assert text["layer_types"][46] == "sliding_attention" and text["layer_types"][47] == "full_attention"


def test_hub_id_offline_falls_back_to_the_builtin_config(caplog):
    with caplog.at_level(logging.WARNING, logger="dspark_lightning.targets"):
        config = load_target_config(TargetConfig(path="qwen/qwen3-8b"))  # Hub ids are case-insensitive
    assert config.hidden_size == 4096
    assert any("builtin copy" in r.getMessage() and "qwen/qwen3-8b" in r.getMessage() for r in caplog.records)


def test_hub_id_without_builtin_config_keeps_the_hub_error():
    with pytest.raises(OSError):
        load_target_config(TargetConfig(path="Qwen/Qwen3-32B"))
    with pytest.raises(ValueError, match=r"No builtin config for 'Qwen/Qwen3-32B'.*Qwen/Qwen3-4B"):
        builtin_target_config("Qwen/Qwen3-32B")


def test_a_local_directory_wins_over_the_builtin_config(tmp_path, monkeypatch):
    local = tmp_path / "Qwen" / "Qwen3-4B"
    local.mkdir(parents=True)
    data = json.loads((ROOT / "dspark_lightning/resources/target_configs/Qwen--Qwen3-4B.json").read_text())
    (local / "config.json").write_text(json.dumps({**data, "hidden_size": 2048}))
    monkeypatch.chdir(tmp_path)  # "Qwen/Qwen3-4B" is now a relative path that exists
    assert load_target_config(TargetConfig(path="Qwen/Qwen3-4B")).hidden_size == 2048
