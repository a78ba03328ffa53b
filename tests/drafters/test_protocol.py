"""Every registered drafter satisfies the drafter protocol (drafters/protocol.py): built from a tiny config through the
registry, one training step through ``DrafterModule.compute_loss``, drafting through ``new_cache`` / ``extend_context``
/ ``propose``, and an export round trip (docs/drafters.md: what a new drafter must pass)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from dspark_lightning.drafters import DrafterConfig, registry
from dspark_lightning.drafters.config import ALGORITHMS
from dspark_lightning.drafters.protocol import GREEDY, TemperatureSampler, TrainableDrafter
from dspark_lightning.modules import DrafterModule, LossWeights
from dspark_lightning.targets import TargetConfig

REPO = Path(__file__).resolve().parents[2]
SMOKE = {"dspark": "configs/smoke/dspark.yaml", "dflash": "configs/smoke/dflash.yaml",
         "eagle3": "configs/smoke/eagle3.yaml", "dspark_v4": "configs/deepseek_v4/smoke.yaml"}
B, L, PROMPT, CONTEXT = 2, 24, 6, 10


def test_the_registry_holds_every_algorithm_and_names_the_choices_otherwise():
    assert set(registry.CLASSES) | set(registry.LAZY_CLASSES) == set(ALGORITHMS) == set(SMOKE)
    with pytest.raises(ValueError, match=r"Unknown drafter algorithm 'medusa'; choose one of \['dflash'"):
        registry.drafter_class("medusa")


@pytest.fixture(scope="module", params=ALGORITHMS)
def module(request) -> DrafterModule:
    """The smoke config's DrafterModule with the target's embedding and head copied in (as at ``fit``'s setup)."""
    model = yaml.safe_load((REPO / SMOKE[request.param]).read_text())["model"]
    torch.manual_seed(0)
    module = DrafterModule(DrafterConfig(**model["drafter"]), TargetConfig(**copy.deepcopy(model["target"])),
                           loss=LossWeights(**model.get("loss", {})))
    module._trainer = SimpleNamespace(ckpt_path=None)
    module.setup("fit")
    return module


def batch(vocab: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab - 1, (B, L), generator=torch.Generator().manual_seed(1))
    loss_mask = torch.zeros(B, L, dtype=torch.bool)
    loss_mask[:, PROMPT:] = True
    loss_mask[1, L - 5:] = False  # a shorter answer
    return {"input_ids": ids, "loss_mask": loss_mask, "attention_mask": torch.ones(B, L, dtype=torch.long)}


def test_built_from_the_registry_with_the_protocol_members(module):
    cfg, drafter = module.drafter_config, module.drafter
    assert type(drafter) is registry.drafter_class(cfg.algorithm)
    assert type(registry.build(cfg, "meta")) is type(drafter)
    assert isinstance(drafter, TrainableDrafter)
    eagle3 = cfg.algorithm == "eagle3"
    assert drafter.gamma == (cfg.ttt_length if eagle3 else cfg.block_size)
    assert drafter.training_anchors(cfg) == (None if eagle3 else cfg.num_anchors)
    assert len(drafter.layers) == cfg.num_hidden_layers and drafter.holds_target_head
    target = module.frozen_target()
    assert torch.equal(drafter.embed_tokens.weight, target.embed_weight)  # load_target_embeddings ran at setup
    assert torch.equal(drafter.lm_head.weight, target.lm_head_weight)


def test_one_training_step_through_compute_loss(module):
    module.drafter.zero_grad(set_to_none=True)
    result = module.compute_loss(batch(module.drafter_config.vocab_size))  # online: the frozen target runs
    assert result.num_tokens > 0 and torch.isfinite(result.loss)
    result.loss.backward()
    for name, p in module.drafter.layers.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in module.drafter.layers.parameters())


def draft(drafter, target, ids: torch.Tensor, sampler) -> object:
    """Commit the first CONTEXT positions of ``ids``, then draft gamma tokens after the anchor ``ids[:, CONTEXT]``."""
    hidden = target(ids).hidden
    cache = drafter.new_cache(B, capacity=8)  # smaller than the context: the cache grows
    drafter.extend_context(cache, hidden[:, :CONTEXT], ids[:, 1:CONTEXT + 1])
    assert cache.lengths.tolist() == [CONTEXT] * B
    return drafter.propose(cache, ids[:, CONTEXT], sampler, drafter.gamma)


def test_propose_through_the_protocol(module):
    drafter, target, vocab = module.drafter.eval(), module.frozen_target(), module.drafter_config.vocab_size
    ids = batch(vocab)["input_ids"]
    greedy = draft(drafter, target, ids, GREEDY)
    assert greedy.tokens.shape == (B, drafter.gamma) and greedy.probs is None
    assert int(greedy.tokens.min()) >= 0 and int(greedy.tokens.max()) < vocab
    sampled = draft(drafter, target, ids, TemperatureSampler(1.0, torch.Generator().manual_seed(3)))
    assert sampled.probs.shape == (B, drafter.gamma, vocab)
    torch.testing.assert_close(sampled.probs.sum(-1), torch.ones(B, drafter.gamma))
    assert (sampled.probs.gather(-1, sampled.tokens[..., None]) > 0).all()  # each draft was drawn from its row


def test_export_round_trip(module, tmp_path):
    from dspark_lightning.export.checkpoint import TrainedDrafter
    from dspark_lightning.export.exporter import write_export
    from dspark_lightning.export.loading import load_drafter

    drafter, target = module.drafter.eval(), module.frozen_target()
    target_config = {k: v for k, v in module.target_hf_config.to_diff_dict().items() if not k.startswith("_")}
    trained = TrainedDrafter.from_module(drafter, target_config)
    if module.drafter_config.algorithm == "dspark_v4":  # served bundled into the V4 checkpoint only
        target.model.save_pretrained(tmp_path / "target")
        config = json.loads((tmp_path / "target" / "config.json").read_text())  # + what the official V4 config
        config.update(compress_ratios=[0, 4, 16, 0, 0], topk_method="noaux_tc")  # carries (test_attached_v4.py)
        (tmp_path / "target" / "config.json").write_text(json.dumps(config))
        out = write_export(trained, fmt="attached", out=tmp_path / "out", dtype="float32",
                           target_dir=tmp_path / "target", attached_layout="bundled")
    else:
        out = write_export(trained, fmt="hf", out=tmp_path / "out", dtype="float32")
    loaded = load_drafter(out)
    assert type(loaded) is type(drafter) and loaded.state_dict().keys() == drafter.state_dict().keys()
    for name, tensor in drafter.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    ids = batch(module.drafter_config.vocab_size)["input_ids"]
    for sampler in (GREEDY, TemperatureSampler(1.0, torch.Generator().manual_seed(3))):
        want = draft(drafter, target, ids, sampler)
        if sampler is not GREEDY:
            sampler.generator.manual_seed(3)
        got = draft(loaded, target, ids, sampler)
        assert torch.equal(got.tokens, want.tokens)
