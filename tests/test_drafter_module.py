"""DrafterModule checks that must fire before training starts."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from dspark_lightning.drafters import DrafterConfig
from dspark_lightning.modules.drafter_module import DrafterModule
from dspark_lightning.targets import TargetConfig

SMOKE = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "smoke" / "dspark.yaml").read_text())


def smoke_module(trainer=None, target=(), **kwargs):
    """The smoke config's DrafterModule (``target``: overrides of its target config), attached to ``trainer``."""
    model = SMOKE["model"]
    module = DrafterModule(DrafterConfig(**model["drafter"]), TargetConfig(**{**model["target"], **dict(target)}),
                           **kwargs)
    module._trainer = trainer
    return module


def module_with(optimizer, clip, precision):
    trainer = SimpleNamespace(gradient_clip_val=clip, precision=precision, estimated_stepping_batches=10)
    return smoke_module(trainer, optimizer=optimizer)


def test_fused_optimizer_with_clipping_under_amp_is_refused_with_the_fix():
    fused = lambda params: torch.optim.AdamW(params, lr=1e-3, fused=True)
    with pytest.raises(ValueError, match=r"AdamW\(fused=True\).*gradient_clip_val=1.0.*bf16-mixed.*Drop the"):
        module_with(fused, 1.0, "bf16-mixed").configure_optimizers()
    # without clipping, or in full precision, Lightning accepts it: so do we
    for clip, precision in ((None, "bf16-mixed"), (1.0, "32-true")):
        out = module_with(fused, clip, precision).configure_optimizers()
        assert out["optimizer"].defaults["fused"] is True


def test_gradient_clipping_under_fsdp_clips_through_the_wrapped_module(monkeypatch):
    """Lightning's FSDP precision plugin refuses norm clipping; the module hands it to the FSDP root module."""
    from lightning.pytorch.strategies import FSDPStrategy

    calls = []
    strategy = FSDPStrategy.__new__(FSDPStrategy)  # no process group: only the type and .model are used
    monkeypatch.setattr(FSDPStrategy, "model", SimpleNamespace(clip_grad_norm_=calls.append), raising=False)
    module = module_with(lambda p: torch.optim.AdamW(p), 1.0, "bf16-mixed")
    module._trainer.strategy = strategy
    module.configure_gradient_clipping(None, 0.5, "norm")
    module.configure_gradient_clipping(None, 0.25, None)  # Lightning passes None for its default, norm
    assert calls == [0.5, 0.25]


def test_compiled_layers_give_the_eager_loss_and_keep_parameter_names():
    from dspark_lightning.drafters.blocks import sample_anchors

    def build(compile_layers):
        torch.manual_seed(0)
        module = smoke_module(SimpleNamespace(ckpt_path=None), compile_layers=compile_layers)
        module.setup("fit")
        return module

    eager, compiled = build(False), build(True)
    layers = getattr(compiled.drafter, "backbone", compiled.drafter).layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, eager.drafter_config.vocab_size - 1, (2, 40), generator=g)
    loss_mask = torch.ones_like(ids, dtype=torch.bool)
    loss_mask[:, :8] = False
    torch.manual_seed(2)
    anchors, valid = sample_anchors(loss_mask, eager.drafter_config.num_anchors)
    batch = {"input_ids": ids, "loss_mask": loss_mask, "anchors": anchors, "anchor_valid": valid}
    want, got = eager.compute_loss(batch).loss, compiled.compute_loss(batch).loss
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    got.backward()
    assert all(p.grad is not None for p in layers.parameters())


def test_a_target_initialised_on_device_is_built_on_the_ranks_device():
    """init_on_device: the random target is drawn where the strategy will run the module (the meta device stands
    in for a GPU here), not where the module sits at setup (the CPU)."""
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("meta")), ckpt_path=None)
    module = smoke_module(trainer, target={"init_on_device": True})
    assert module.device.type == "cpu" and module._load_target().device.type == "meta"
    default = smoke_module(trainer)
    assert default._load_target().device.type == "cpu"  # other targets load where the module is, as before


@pytest.mark.parametrize("algorithm", ["dspark", "dflash", "eagle3"])
def test_compile_layers_compiles_every_decoder_layer_of_each_drafter_at_setup(algorithm):
    """``fit --model.compile_layers true`` crashed at setup for DFlash (whose ``backbone`` is a method): setup
    reaches the layers through the protocol's ``layers``, the same for every drafter."""
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "smoke" / f"{algorithm}.yaml")
                            .read_text())["model"]
    module = DrafterModule(DrafterConfig(**config["drafter"]), TargetConfig(**config["target"]), compile_layers=True,
                           copy_target_embeddings=False)
    names = list(module.state_dict())
    module.setup("fit")
    layers = module.drafter.layers
    assert len(layers) == module.drafter_config.num_hidden_layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert list(module.state_dict()) == names  # compiled in place: checkpoints keep their names


def test_hyper_parameters_pickled_before_loss_weights_moved_still_load_weights_only():
    """LossWeights moved from modules/drafter_module.py to losses.py; checkpoints written from Python before that
    name it under its old module, which the safe-globals list still accepts (modules/checkpoints.py)."""
    import io

    import dspark_lightning.modules  # noqa: F401 - registers the safe globals
    from dspark_lightning.losses import LossWeights

    buf = io.BytesIO()
    torch.save({"loss": LossWeights(ce=0.3)}, buf, _use_new_zipfile_serialization=False)  # plain pickle names
    old = buf.getvalue().replace(b"dspark_lightning.losses", b"dspark_lightning.modules.drafter_module")
    assert b"dspark_lightning.modules.drafter_module\nLossWeights" in old
    assert torch.load(io.BytesIO(old), weights_only=True)["loss"] == LossWeights(ce=0.3)
