"""The two SPS table formats ``profile-sps`` writes (ours and SGLang's ``SpsCostTable``) and that both read back.

SGLang's own loader reads the ``sglang`` file in ``serving/tests/test_our_exports.py`` (serving venv).
"""

from __future__ import annotations

import json

import pytest
import torch

from dspark_lightning.decoding.sps import SpsTable, as_sps_table, profile_sps
from dspark_lightning.targets import TargetConfig

TINY = TargetConfig(tiny={"model_type": "qwen3", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
                          "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8})


def test_sglang_format_holds_sglangs_fields_and_reads_back(tmp_path, capsys):
    out = profile_sps(TINY, str(tmp_path / "sps.json"), num_tokens=[8, 2], requests=2, context_length=8, warmup=0,
                      iters=1, device="cpu", format="sglang")
    data = json.loads((tmp_path / "sps.json").read_text())
    assert data == out
    assert data["sample_batch_tokens"] == [2, 8] and data["max_batch_tokens"] == 8
    assert len(data["sample_steps_per_sec"]) == 2 and all(s > 0 for s in data["sample_steps_per_sec"])
    assert "num_tokens" not in data and "steps_per_second" not in data  # one copy of the numbers
    assert (data["requests"], data["context_length"], data["device"]) == (2, 8, "cpu")
    table = SpsTable.load(tmp_path / "sps.json")
    assert table.num_tokens == [2, 8] and table.steps_per_second == data["sample_steps_per_sec"]
    capsys.readouterr()


def test_both_formats_give_the_same_table():
    ours = {"num_tokens": [4, 8, 16], "steps_per_second": [100.0, 80.0, 50.0], "requests": 4}
    theirs = {"sample_batch_tokens": [4, 8, 16], "sample_steps_per_sec": [100.0, 80.0, 50.0],
              "max_batch_tokens": 16}
    mapping = {"16": 50.0, "4": 100.0, "8": 80.0}
    tokens = torch.arange(1, 24)
    expected = SpsTable([4, 8, 16], [100.0, 80.0, 50.0]).step_time(tokens)
    for data in (ours, theirs, mapping):
        assert torch.equal(SpsTable.from_dict(data).step_time(tokens), expected)
        assert torch.equal(as_sps_table(data).step_time(tokens), expected)


def test_unknown_format_and_sglangs_additive_model_are_refused(tmp_path):
    with pytest.raises(ValueError, match="format='vllm' is unknown"):
        profile_sps(TINY, str(tmp_path / "sps.json"), num_tokens=[2], device="cpu", format="vllm")
    assert not (tmp_path / "sps.json").exists()
    additive = {"bias_seconds": 0.01, "bs_probes": [1], "alpha_seconds": [0.0], "m_probes": [1],
                "theta_seconds": [0.0]}
    with pytest.raises(ValueError, match="additive SPS cost model"):
        SpsTable.from_dict(additive)
