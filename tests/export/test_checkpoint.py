"""Reading Lightning checkpoints safely: our dataclasses and dicts both work, foreign pickles are refused."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
import torch

from dspark_lightning.export.checkpoint import read_checkpoint
from dspark_lightning.modules.checkpoints import load_checkpoint


def test_reads_dataclass_and_dict_hyper_parameters_alike(checkpoints):
    by_code = read_checkpoint(checkpoints["dspark_vanilla"])  # DrafterConfig / TargetConfig / LossWeights pickled
    by_cli = read_checkpoint(checkpoints["dspark_cli"])  # LightningCLI: plain dicts + config.yaml next to it
    assert by_code.config == by_cli.config
    assert by_code.config.hidden_size == 64 and by_code.config.vocab_size == 256  # resolved from the tiny target
    assert by_code.hyper_parameters["optimizer"].endswith("drafter_module.default_optimizer")
    assert by_code.hyper_parameters["loss"]["l1"] == 0.9
    assert by_cli.training_config is not None and "RandomTokensDataModule" in by_cli.training_config
    assert by_code.training_config is None  # no config.yaml beside a Trainer.save_checkpoint file
    assert by_code.target_config["model_type"] == "qwen3" and by_code.target_config["num_hidden_layers"] == 4


def test_tensors_equal_the_checkpoint(checkpoints):
    path = checkpoints["eagle3_reduced"]
    trained = read_checkpoint(path)
    raw = torch.load(path, weights_only=True)["state_dict"]
    assert trained.state_dict.keys() == {k.removeprefix("drafter.") for k in raw}
    for k, v in raw.items():
        assert torch.equal(trained.state_dict[k.removeprefix("drafter.")], v)
    assert trained.config.draft_vocab_size == 96 and trained.state_dict["d2t"].dtype == torch.long


class Planted:
    """A foreign class: unpickling it would run its __setstate__."""

    ran = False

    def __setstate__(self, state):
        type(self).ran = True


def test_foreign_pickled_objects_are_refused_unexecuted(checkpoints, tmp_path: Path):
    data = load_checkpoint(checkpoints["dspark_vanilla"])
    data["hyper_parameters"]["extra"] = Planted()
    data["hyper_parameters"]["ordered"] = collections.OrderedDict(a=1)  # allowed by torch's own list
    bad = tmp_path / "foreign.ckpt"
    torch.save(data, bad)
    with pytest.raises(ValueError, match=r"Planted.*refusing to unpickle"):
        read_checkpoint(bad)
    assert not Planted.ran


def test_missing_checkpoint_names_the_path(tmp_path: Path):
    missing = tmp_path / "nope" / "last.ckpt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        read_checkpoint(missing)


def test_target_dir_overrides_and_is_checked(checkpoints, tiny_target_dir, tmp_path: Path):
    trained = read_checkpoint(checkpoints["dflash_zlab"], target_dir=tiny_target_dir)
    assert trained.target_config["architectures"] == ["Qwen3ForCausalLM"]
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((tiny_target_dir / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "hidden_size": 32}))
    with pytest.raises(ValueError, match="hidden_size=64.*hidden_size=32"):
        read_checkpoint(checkpoints["dflash_zlab"], target_dir=other)
