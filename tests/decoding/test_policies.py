"""Verify-length policies, the prefix scheduler (paper Algorithm 1, Appendix A) and SPS tables."""

from __future__ import annotations

import json

import pytest
import torch

from dspark_lightning.decoding import ConfidenceThreshold, FixedLength, PrefixScheduler, SpsTable, schedule_prefix
from dspark_lightning.decoding.policies import build_policy
from dspark_lightning.decoding.sps import isotonic_fit, profile_sps


def test_fixed_and_threshold_lengths():
    conf = torch.tensor([[0.9, 0.8, 0.3, 0.9], [0.2, 0.9, 0.9, 0.9], [0.9, 0.9, 0.9, 0.9]])
    assert FixedLength()(conf, 4, 3).tolist() == [4, 4, 4]
    assert FixedLength(2)(conf, 4, 3).tolist() == [2, 2, 2]
    # Per-step confidence (not the cumulative product): the first position below 0.5 ends the proposal.
    assert ConfidenceThreshold(0.5)(conf, 4, 3).tolist() == [2, 0, 4]
    with pytest.raises(ValueError, match="sps_table"):
        build_policy("scheduler")
    with pytest.raises(ValueError, match="Unknown verify policy"):
        build_policy("best")


def test_fixed_length_known_ahead_only_where_the_policy_ignores_the_confidences():
    assert FixedLength().fixed_length(8, 7) == 7 and FixedLength(3).fixed_length(8, 7) == 3
    assert ConfidenceThreshold(0.5).fixed_length(8, 7) is None
    # Verifying 64 tokens costs 2 % more step time than 8 (tolerance 3 %): flat, everything is verified.
    assert PrefixScheduler(SpsTable([8, 64], [100.0, 98.0])).fixed_length(8, 7) == 7
    assert PrefixScheduler(SpsTable([8, 64], [100.0, 95.0])).fixed_length(8, 7) is None
    assert PrefixScheduler(SpsTable([8, 64], [100.0, 95.0]), flat_tolerance=0.1).fixed_length(8, 7) == 7


def test_flat_sps_table_verifies_everything_steep_truncates():
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(256, 7, generator=g) * 0.98 + 0.01
    assert (schedule_prefix(conf, SpsTable.flat()) == 7).all()
    # Step time doubles from 256 to 512 tokens: only drafts with high survival are worth verifying.
    steep = SpsTable([256, 512, 2048], [100.0, 50.0, 10.0])
    lengths = schedule_prefix(conf, steep)
    assert lengths.sum() < 256 * 7 and lengths.min() >= 0 and lengths.max() <= 7
    survival = conf.cumprod(1)
    admitted = torch.arange(1, 8)[None] <= lengths[:, None]
    if admitted.any() and (~admitted).any():  # a batch-global cut: every admitted draft outranks every other
        assert survival[admitted].min() >= survival[~admitted].max()


def test_scheduler_maximises_throughput_up_to_its_stop():
    conf = torch.tensor([[0.9, 0.9, 0.2], [0.6, 0.5, 0.5]])
    table = SpsTable([2, 3, 4, 5, 6, 8], [10.0, 9.5, 9.0, 7.0, 6.0, 5.0])
    lengths = schedule_prefix(conf, table)
    expected = lambda ls: (2 + sum(conf[r, :n].cumprod(0).sum() for r, n in enumerate(ls))) * table(
        torch.tensor(2 + sum(ls)))
    best = max(((a, b) for a in range(4) for b in range(4)), key=lambda ls: float(expected(ls)))
    assert tuple(lengths.tolist()) == best == (2, 0)


def test_appendix_a_admission_never_depends_on_the_admitted_token():
    """c_{k+1} is computed from draft k; changing it (any later confidence) must not change whether draft k
    is verified, for every request and position, whatever the table."""
    g = torch.Generator().manual_seed(1)
    table = SpsTable([64, 128, 256, 512], [100.0, 80.0, 45.0, 20.0])
    for _ in range(20):
        conf = torch.rand(64, 7, generator=g)
        lengths = schedule_prefix(conf, table)
        for r, k in [(int(torch.randint(64, (1,), generator=g)), int(torch.randint(7, (1,), generator=g)))
                     for _ in range(10)]:
            changed = conf.clone()
            changed[r, k + 1:] = torch.rand(6 - k, generator=g)  # confidences computed after sampling draft k
            again = schedule_prefix(changed, table)
            assert (again[r] > k) == (lengths[r] > k), (r, k)


def test_appendix_a_counterexample_best_budget_is_not_causal():
    """One request, two drafts; SPS(1)=1, SPS(2)=0.5, SPS(3)=0.45. Verifying draft 1 alone never pays. Choosing
    the best budget over the whole list would verify draft 1 only when c_2 (a function of draft 1) is high, so
    draft 1's own value would decide its verification. The causal early stop never verifies it."""
    table = SpsTable([1, 2, 3], [1.0, 0.5, 0.45])

    def best_budget(conf: torch.Tensor) -> int:
        s = conf.cumprod(1)[0]
        values = [1.0, float((1 + s[0]) * 0.5), float((1 + s[0] + s[1]) * 0.45)]
        return max(range(3), key=values.__getitem__)

    high, low = torch.tensor([[0.9, 0.9]]), torch.tensor([[0.9, 0.1]])
    assert best_budget(high) == 2 and best_budget(low) == 0  # non-causal: depends on c_2
    assert schedule_prefix(high, table).tolist() == schedule_prefix(low, table).tolist() == [0]


def test_sps_table_interpolates_step_time_and_loads(tmp_path):
    table = SpsTable([8, 16, 32], [100.0, 50.0, 60.0])  # a noisy dip at 32: pooled with 16 (isotonic fit)
    pooled = (1 / 50 + 1 / 60) / 2
    assert torch.allclose(table.step_time(torch.tensor([4, 8, 12, 16, 32, 48])),
                          torch.tensor([0.01, 0.01, (0.01 + pooled) / 2, pooled, pooled, pooled], dtype=torch.float64))
    path = tmp_path / "sps.json"
    path.write_text(json.dumps({"num_tokens": [8, 16], "steps_per_second": [100.0, 50.0]}))
    assert float(SpsTable.load(path)(torch.tensor(12))) == pytest.approx(1 / 0.015)
    path.write_text(json.dumps({"16": 50.0, "8": 100.0}))
    assert SpsTable.load(path).num_tokens == [8, 16]
    with pytest.raises(ValueError, match="strictly increasing"):
        SpsTable([8, 8], [1.0, 1.0])


def test_isotonic_fit_pools_violators():
    assert isotonic_fit([1.0, 3.0, 2.0, 4.0]) == [1.0, 2.5, 2.5, 4.0]
    assert isotonic_fit([3.0, 2.0, 1.0]) == [2.0, 2.0, 2.0]
    assert isotonic_fit([1.0, 2.0, 2.0, 5.0]) == [1.0, 2.0, 2.0, 5.0]  # already monotone: unchanged
    # the H200 batch-1 profile taken beside other jobs (steps/s at B = 1..8): a spike at B = 2
    sps = [40.14, 26.24, 40.14, 40.30, 33.81, 37.80, 37.94, 38.01]
    times = [1 / s for s in sps]
    fit = isotonic_fit(times)
    assert all(a <= b for a, b in zip(fit, fit[1:]))
    assert sum(fit) == pytest.approx(sum(times))  # each pooled block keeps its mean
    assert fit[0] == pytest.approx(times[0]) and fit[1] / fit[0] < 1.2  # a running max would give 1.53
    # the least-squares property against every other monotone candidate on a grid
    cands = [[a, b, c] for a in range(5) for b in range(5) for c in range(5) if a <= b <= c]
    data = [3.0, 0.0, 4.0]
    best = min(cands, key=lambda c: sum((x - y) ** 2 for x, y in zip(c, data)))
    fit = isotonic_fit(data)
    assert sum((x - y) ** 2 for x, y in zip(fit, data)) <= sum((x - y) ** 2 for x, y in zip(best, data))


def test_profile_sps_writes_a_table(tmp_path, capsys):
    from dspark_lightning.targets import TargetConfig

    target = TargetConfig(tiny={"model_type": "qwen3", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
                                "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                                "head_dim": 8})
    out = profile_sps(target, str(tmp_path / "sps.json"), num_tokens=[2, 8], requests=2, context_length=8,
                      warmup=0, iters=2, device="cpu")
    table = SpsTable.load(tmp_path / "sps.json")
    assert table.num_tokens == [2, 8] == out["num_tokens"] and all(s > 0 for s in table.steps_per_second)
    assert "steps/s" in capsys.readouterr().out
    assert PrefixScheduler(table)(torch.full((2, 3), 0.5), 3, 2).shape == (2,)


def test_profile_sps_graphed_forward_is_the_engines_verify_forward(monkeypatch, tmp_path):
    """The forward ``profile_sps(cuda_graphs=True)`` captures (slot cache, context prefilled, new tokens written
    after it) gives the logits of a plain forward over context + new; on a CPU the option is refused first."""
    import dspark_lightning.decoding.sps as sps_module
    from dspark_lightning.targets import FrozenTarget, TargetConfig

    target = TargetConfig(tiny={"model_type": "qwen3", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
                                "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                                "head_dim": 8}, dtype="float32")
    with pytest.raises(ValueError, match="cuda_graphs=True profiles CUDA graphs; the device is cpu"):
        profile_sps(target, str(tmp_path / "sps.json"), num_tokens=[2], requests=2, device="cpu", cuda_graphs=True)
    assert not (tmp_path / "sps.json").exists()
    monkeypatch.setattr(sps_module, "GraphedCall", lambda fn, *inputs, warmup=2: fn)  # replay = call, on the CPU
    model = FrozenTarget.from_config(target, [0])
    g = torch.Generator().manual_seed(0)
    context, new = torch.randint(0, 32, (3, 6), generator=g), torch.randint(0, 32, (3, 4), generator=g)
    (logits,) = sps_module._graphed_verify(model, context, new)()
    full = model(torch.cat([context, new], dim=1), compute_logits=True).logits[:, 6:]
    torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_profile_sps_with_cuda_graphs_on_the_gpu(tmp_path):
    from dspark_lightning.targets import TargetConfig

    target = TargetConfig(tiny={"model_type": "qwen3", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
                                "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                                "head_dim": 8})
    out = profile_sps(target, str(tmp_path / "sps.json"), num_tokens=[4, 8, 16], requests=4, context_length=16,
                      warmup=1, iters=3, device="cuda", cuda_graphs=True)
    assert out["cuda_graphs"] is True and len(out["steps_per_second"]) == 3
    assert SpsTable.load(tmp_path / "sps.json").num_tokens == [4, 8, 16]


def test_prefix_scheduler_backend_choice(monkeypatch):
    """The decision runs in kernels.prefix_schedule; ``backend`` (or DSPARK_KERNEL_BACKEND) picks torch or Triton."""
    conf = torch.rand(16, 5, generator=torch.Generator().manual_seed(2))
    table = SpsTable([16, 32, 64], [100.0, 70.0, 30.0])
    lengths = schedule_prefix(conf, table)
    assert lengths.dtype == torch.long and lengths.shape == (16,)
    assert PrefixScheduler(table, backend="torch")(conf, 5, 16).tolist() == lengths.tolist()
    assert PrefixScheduler(table)(conf, 3, 16).tolist() == schedule_prefix(conf[:, :3], table).tolist()
    with pytest.raises(ValueError, match="Unknown kernel backend"):
        PrefixScheduler(table, backend="cuda")(conf, 5, 16)
    monkeypatch.setenv("DSPARK_KERNEL_BACKEND", "bogus")
    with pytest.raises(ValueError, match="Unknown kernel backend"):
        schedule_prefix(conf, table)
