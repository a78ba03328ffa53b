"""Shared fixtures of the export tests: real Lightning checkpoints of every drafter variant, trained once per
session on the smoke tiny target, the tiny target saved as an HF directory, and output comparisons."""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
SMOKE = {name: yaml.safe_load((REPO / "configs" / "smoke" / f"{name}.yaml").read_text())
         for name in ("dspark", "dflash", "eagle3")}
TINY_TARGET = SMOKE["dspark"]["model"]["target"]  # {"tiny": {...qwen3...}, "seed": 0}
REDUCED_VOCAB = 96

# variant -> (smoke config, drafter overrides)
VARIANTS: dict[str, tuple[str, dict]] = {
    "dspark_vanilla": ("dspark", {}),
    "dspark_gated": ("dspark", {"markov_head_type": "gated"}),
    "dspark_rnn": ("dspark", {"markov_head_type": "rnn", "confidence_head_with_markov": False}),
    "dflash_deepspec": ("dflash", {}),
    "dflash_zlab": ("dflash", {"block_layout": "zlab"}),
    "eagle3_full": ("eagle3", {"qk_norm": True}),  # the Qwen3 family default (DeepSpec's Eagle3 has q/k norms)
    "eagle3_full_llama_style": ("eagle3", {"qk_norm": False}),
    "eagle3_reduced": ("eagle3", {"qk_norm": False, "draft_vocab_size": REDUCED_VOCAB}),
}


def _fit(variant: str, root: Path) -> Path:
    """Train two steps with DrafterModule + Trainer (hyper-parameters pickled as our dataclasses)."""
    import lightning as L

    from dspark_lightning.data.online import RandomTokensDataModule
    from dspark_lightning.drafters import DrafterConfig
    from dspark_lightning.drafters.eagle3 import build_draft_vocab
    from dspark_lightning.modules import DrafterModule, LossWeights
    from dspark_lightning.targets import TargetConfig

    smoke, overrides = VARIANTS[variant]
    model_cfg = SMOKE[smoke]["model"]
    target = TargetConfig(**copy.deepcopy(model_cfg["target"]))
    drafter = DrafterConfig(**{**model_cfg["drafter"], **overrides})
    module = DrafterModule(drafter, target, loss=LossWeights(**model_cfg.get("loss", {})))
    data = RandomTokensDataModule(target=target, num_samples=12, seq_len=24, prompt_len=4, batch_size=4)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0)
    torch.manual_seed(0)
    trainer.fit(module, data)
    if overrides.get("draft_vocab_size"):
        counts = torch.rand(module.drafter.config.vocab_size, generator=torch.Generator().manual_seed(3))
        module.drafter.set_draft_vocab(*build_draft_vocab(counts, REDUCED_VOCAB))
    path = root / f"{variant}.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """variant -> Lightning checkpoint; ``dspark_cli`` is written by LightningCLI (plain-dict hyper-parameters
    and the run's config.yaml next to it)."""
    root = tmp_path_factory.mktemp("ckpts")
    paths = {variant: _fit(variant, root) for variant in VARIANTS}
    from dspark_lightning.cli import lightning_main

    run = root / "cli_run"
    with mock.patch.object(sys, "argv", ["dspark_lightning"]):  # LightningCLI warns when pytest's argv is present
        _cli_fit(lightning_main, run)
    paths["dspark_cli"] = run / "checkpoints" / "last.ckpt"
    return paths


def _cli_fit(lightning_main, run: Path) -> None:
    lightning_main(["fit", "--config", str(REPO / "configs/smoke/dspark.yaml"), "--trainer.max_steps", "2",
                    "--trainer.default_root_dir", str(run), "--trainer.logger", "false",
                    "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
                    "--trainer.enable_progress_bar", "false"], run=True)


@pytest.fixture(scope="session")
def tiny_target_model():
    """The smoke tiny target (same seed as training, so its embedding/head equal the drafters' copies)."""
    from dspark_lightning.targets import FrozenTarget, TargetConfig

    return FrozenTarget.from_config(TargetConfig(**copy.deepcopy(TINY_TARGET)), [0]).model


@pytest.fixture(scope="session")
def tiny_target_dir(tmp_path_factory: pytest.TempPathFactory, tiny_target_model) -> Path:
    path = tmp_path_factory.mktemp("tiny_target")
    tiny_target_model.save_pretrained(path)
    return path


# ---------------------------------------------------------------------- comparing drafters
def _inputs(cfg, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b, length = 2, 20
    input_ids = torch.randint(0, cfg.vocab_size - 1, (b, length), generator=g)
    loss_mask = torch.zeros(b, length, dtype=torch.bool)
    loss_mask[:, 4:] = True
    hidden = torch.randn(b, length, cfg.num_context_layers * cfg.hidden_size, generator=g)
    return {"input_ids": input_ids, "loss_mask": loss_mask, "target_hidden": hidden}


def drafter_outputs(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Train-mode forward logits (+ confidences) and a T=0 proposal after committing a context, as tensors."""
    cfg = model.config
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    x = _inputs(cfg, seed)
    hidden = x["target_hidden"].to(dtype)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        if cfg.algorithm == "eagle3":
            fwd = model(x["input_ids"], hidden, x["loss_mask"])
            out["logits"] = model.compute_logits(fwd.hidden)
            cache = model.new_cache(2)
            model.extend_context(cache, hidden[:, :10], x["input_ids"][:, 1:11])
            proposal = model.propose(cache)
        else:
            anchors = torch.tensor([[4, 7, 11], [5, 9, 14]])
            valid = torch.ones_like(anchors, dtype=torch.bool)
            fwd = model(x["input_ids"], hidden, x["loss_mask"], anchors, valid)
            out["logits"] = model.compute_logits(fwd.hidden, fwd.markov_features)
            if fwd.confidence_logits is not None:
                out["confidence"] = fwd.confidence_logits
            cache = model.new_cache(2)
            model.extend_context(cache, hidden[:, :10])
            proposal = model.propose(cache, x["input_ids"][:, 10])
            if proposal.confidence is not None:
                out["proposal_confidence"] = proposal.confidence
    out["proposal_tokens"] = proposal.tokens
    return out


def assert_same_outputs(a: torch.nn.Module, b: torch.nn.Module, seed: int = 0) -> None:
    oa, ob = drafter_outputs(a, seed), drafter_outputs(b, seed)
    assert oa.keys() == ob.keys()
    for key in oa:
        assert torch.equal(oa[key], ob[key]), f"{key} differs"


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="session")
def original() -> Callable[[Path], torch.nn.Module]:
    """Checkpoint path -> the drafter as trained (fp32, eval), rebuilt from the checkpoint's tensors."""
    from dspark_lightning.export.checkpoint import instantiate, read_checkpoint

    def load(path: Path) -> torch.nn.Module:
        trained = read_checkpoint(path)
        return instantiate(trained.config, trained.state_dict)

    return load


@pytest.fixture(scope="session")
def same_outputs() -> Callable[..., None]:
    """``same_outputs(a, b)``: identical forward logits, confidences and T=0 proposals (torch.equal)."""
    return assert_same_outputs


@pytest.fixture(scope="session")
def same_weights() -> Callable[..., None]:
    return assert_same_weights


@pytest.fixture(scope="session")
def outputs() -> Callable[..., dict[str, torch.Tensor]]:
    return drafter_outputs
