"""``recipes/demo_decode.py``, the decoding step of ``make demo``, on a smoke checkpoint (tiny random target)."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
SMOKE = yaml.safe_load((ROOT / "configs" / "smoke" / "dspark.yaml").read_text())


def _load_recipe():
    spec = importlib.util.spec_from_file_location("demo_decode", ROOT / "recipes" / "demo_decode.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through the module
    spec.loader.exec_module(module)
    return module


demo = _load_recipe()


@pytest.fixture(scope="module")
def smoke_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DrafterModule checkpoint after 4 steps on the smoke target, at <run>/checkpoints/last.ckpt."""
    import lightning as L

    from dspark_lightning.data.online import RandomTokensDataModule
    from dspark_lightning.drafters import DrafterConfig
    from dspark_lightning.modules import DrafterModule, LossWeights
    from dspark_lightning.targets import TargetConfig

    model = SMOKE["model"]
    target = TargetConfig(**copy.deepcopy(model["target"]))
    module = DrafterModule(DrafterConfig(**model["drafter"]), target, loss=LossWeights(**model["loss"]))
    data = RandomTokensDataModule(target=target, num_samples=16, seq_len=24, prompt_len=4, batch_size=4)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0)
    torch.manual_seed(0)
    trainer.fit(module, data)
    path = tmp_path_factory.mktemp("demo_run") / "checkpoints" / "last.ckpt"
    path.parent.mkdir()
    trainer.save_checkpoint(path)
    return path


def test_demo_decodes_identically_and_writes_the_report(smoke_ckpt, tmp_path, capsys):
    code = demo.main(["--ckpt", str(smoke_ckpt), "--suite", "random", "--prompts", "3", "--max-new-tokens", "10",
                      "--out", str(tmp_path), "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "OK: identical" in out and "on all 3 prompts" in out
    assert "Target alone (10 tokens):" in out and "Speculative, target + drafter (10 tokens):" in out
    report = json.loads((tmp_path / "report.json").read_text())
    side = report["side_by_side"]
    assert side["identical"] is True and side["prompts"] == 3 and side["device"] == "cpu"
    # tau is what rounds.jsonl records: tokens per verify round.
    rounds = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert report["macro_tau"] == pytest.approx(sum(r["num_tokens"] for r in rounds) / len(rounds), rel=1e-12)
    assert sum(r["num_tokens"] for r in rounds) == 3 * 10  # no stop token in random prompts: the whole budget
    assert (tmp_path / "acceptance.png").stat().st_size > 0 and (tmp_path / "report.md").is_file()
    assert f"{side['target_tokens_per_second']:.1f}" in out and f"({side['speed_up']:.2f}x)" in out
    for command in ("python -m dspark_lightning validate", "python -m dspark_lightning export",
                    "python -m dspark_sglang.launch", "tensorboard --logdir"):
        assert command in out
    assert f"--ckpt_path {smoke_ckpt}" in out and "docs/results/smollm2.md" in out


def test_both_runs_give_the_targets_own_greedy_tokens(smoke_ckpt):
    """Independent reference: HF ``generate`` (its own KV cache, one token per step) on the same target."""
    from dspark_lightning.eval.suites import load_suites

    trained, drafter, target = demo.load_trained(smoke_ckpt, torch.device("cpu"), "float32")
    suites = load_suites(target.target_config, ["random"], max_samples=2, hf_config=target.config)
    result = demo.decode_side_by_side(target, drafter, suites, max_new_tokens=8, batch_size=2)
    reference = []
    for prompt in suites[0].prompts:
        ids = torch.tensor([prompt])
        out = target.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                                    do_sample=False, pad_token_id=0)
        reference.append(out[0, len(prompt):].tolist())
    assert result.target_tokens == reference
    assert result.speculative_tokens == reference
    assert result.differences() == []
    assert result.report["gamma"] == trained.config.block_size


def test_a_difference_names_the_prompt_and_token_and_fails(smoke_ckpt, tmp_path, monkeypatch, capsys):
    real = demo.decode_side_by_side

    def corrupted(*args, **kwargs):
        result = real(*args, **kwargs)
        result.speculative_tokens[1][3] += 1
        return result

    monkeypatch.setattr(demo, "decode_side_by_side", corrupted)
    code = demo.main(["--ckpt", str(smoke_ckpt), "--suite", "random", "--prompts", "2", "--max-new-tokens", "6",
                      "--out", str(tmp_path), "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 1
    assert "FAILED: at T = 0 speculative decoding must reproduce the target alone, but 1 of 2 prompts differ" in \
        captured.err
    assert "prompt 2: from generated token 3 on" in captured.err


def test_first_difference():
    assert demo.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert demo.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert demo.first_difference([1, 2], [1, 2, 3]) == 2  # one stopped early
    assert demo.first_difference([], []) is None


def test_the_default_checkpoint_is_the_demo_configs_run_directory(tmp_path):
    for device in ("cpu", "gpu"):
        config = ROOT / "configs" / "demo" / f"smollm2_dspark_{device}.yaml"
        root = yaml.safe_load(config.read_text())["trainer"]["default_root_dir"]
        assert demo.default_checkpoint(config) == Path(root) / "checkpoints" / "last.ckpt"
    bare = tmp_path / "bare.yaml"
    bare.write_text("trainer: {max_steps: 3}\n")
    with pytest.raises(ValueError, match="sets no trainer.default_root_dir; pass the checkpoint with --ckpt"):
        demo.default_checkpoint(bare)


def test_a_missing_checkpoint_says_to_run_the_fit(tmp_path):
    with pytest.raises(SystemExit, match="No checkpoint at .*: run the fit first"):
        demo.main(["--ckpt", str(tmp_path / "none.ckpt")])
