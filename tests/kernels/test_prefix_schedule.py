"""The prefix scheduler's decision (kernels/prefix_schedule.py): torch path vs a literal Algorithm 1, Triton vs torch.

Oracle: Algorithm 1 written as the paper's loop (rank drafts by survival, ties position-first; admit while the
objective does not decrease), in float64 Python with the same summation order as the torch path, so the torch
path must match it exactly. The Triton kernel must give exactly the same lengths as the torch path; it runs
natively on CUDA and under ``TRITON_INTERPRET=1`` on CPU (set below before triton is imported; when another test
module imported triton first, ``test_triton_cases_in_fresh_process`` reruns the Triton cases in a fresh process).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # before anything imports triton (dspark_lightning.kernels does)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dspark_lightning.decoding import PrefixScheduler, SpsTable, schedule_prefix
from dspark_lightning.kernels import prefix_schedule, prefix_schedule_reference
from dspark_lightning.kernels import testing as kernel_testing

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton, test_triton_cases_in_fresh_process = kernel_testing.triton_test_kit(__file__)


# ------------------------------------------------------------------------------------------------ inputs
def table(kind: str, r: int) -> SpsTable:
    """SPS tables for R requests: flat (verify everything), steep (a cut early), realistic (H200-like shape)."""
    if kind == "flat":
        return SpsTable.flat(50.0)
    if kind == "steep":
        return SpsTable([r, 2 * r, 8 * r], [100.0, 50.0, 10.0])
    return SpsTable([r, 2 * r, 4 * r, 8 * r], [100.0, 97.0, 83.0, 55.0])


def confidences(r: int, k: int, seed: int, ties: bool = False) -> torch.Tensor:
    """Random confidences; with ``ties``, quantised to {0, 1/4, ..., 1} so that many survivals are exactly equal."""
    g = torch.Generator().manual_seed(seed)
    if ties:
        return torch.randint(0, 5, (r, k), generator=g).float() / 4
    return torch.rand(r, k, generator=g) ** 0.3  # mostly high, like a trained confidence head


def algorithm1(conf: torch.Tensor, sps_values: torch.Tensor) -> list[int]:
    """The paper's greedy loop with the causal early stop, one draft at a time."""
    r, k = conf.shape
    survival = conf.double().clamp(0, 1).cumprod(1)
    ranked = sorted(((float(survival[i, j]), j * r + i) for i in range(r) for j in range(k)),
                    key=lambda t: (-t[0], t[1]))  # ties: position-major flat index
    lengths, admitted_sum = [0] * r, 0.0
    value = float(sps_values[0]) * r
    for j, (gain, flat) in enumerate(ranked, start=1):
        new_value = (r + (admitted_sum + gain)) * float(sps_values[j])
        if new_value < value:
            break
        admitted_sum, value = admitted_sum + gain, new_value
        lengths[flat % r] += 1
    return lengths


# ------------------------------------------------------------------------------------------- torch path
@pytest.mark.parametrize("kind", ["flat", "steep", "realistic"])
@pytest.mark.parametrize(("r", "k"), [(1, 1), (3, 4), (64, 7), (256, 7), (5, 16)])
def test_reference_matches_algorithm1(r, k, kind):
    values = table(kind, r).arange(r, r + r * k + 1)
    for seed, ties in [(0, False), (1, False), (2, True), (3, True)]:
        conf = confidences(r, k, seed, ties)
        got = prefix_schedule_reference(conf, values)
        assert got.dtype == torch.long and got.tolist() == algorithm1(conf, values), (seed, ties)
    if kind == "flat":
        assert (got == k).all()


def test_reference_inputs_and_checks():
    conf = confidences(6, 9, seed=4)
    values = table("realistic", 6).arange(6, 6 + 6 * 5 + 1)
    sliced = conf[:, :5]  # non-contiguous, as the policy passes confidence[:, :num_drafted]
    want = algorithm1(sliced, values)
    assert prefix_schedule_reference(sliced, values).tolist() == want
    assert prefix_schedule_reference(sliced.double(), values.float().double()).tolist() == want
    assert prefix_schedule(sliced, values, backend="torch").tolist() == want
    one = torch.tensor([[1.5, 0.9, -0.1]], dtype=torch.float64)  # its transpose is contiguous: no copy is made
    assert prefix_schedule_reference(one, SpsTable.flat().arange(1, 5)).tolist() == [3]
    assert one.tolist() == [[1.5, 0.9, -0.1]]  # clamped in a copy, the caller's tensor untouched
    assert prefix_schedule_reference(torch.zeros(0, 3), torch.ones(1)).shape == (0,)
    assert prefix_schedule_reference(torch.zeros(4, 0), torch.ones(1)).tolist() == [0] * 4
    with pytest.raises(ValueError, match="sps_values must hold"):
        prefix_schedule_reference(sliced, values[:-1])
    with pytest.raises(ValueError, match=r"\[R, K\]"):
        prefix_schedule_reference(sliced[0], values)
    with pytest.raises(ValueError, match="Unknown kernel backend"):
        prefix_schedule(sliced, values, backend="cuda")


# ------------------------------------------------------------------------------------------ Triton kernel
def assert_triton_matches(r: int, k: int, kind: str, seeds=((0, False), (1, True)), device: str = DEVICE) -> None:
    values = table(kind, r).arange(r, r + r * k + 1, device)
    for seed, ties in seeds:
        conf = confidences(r, k, seed, ties).to(device)
        want = prefix_schedule_reference(conf, values)
        got = prefix_schedule(conf, values, backend="triton")
        assert got.dtype == torch.long and got.device == conf.device
        assert got.tolist() == want.tolist(), (r, k, kind, seed, ties)


@needs_triton
@pytest.mark.parametrize("kind", ["flat", "steep", "realistic"])
@pytest.mark.parametrize("k", [1, 4, 7])
@pytest.mark.parametrize("r", [1, 3, 64])
def test_triton_matches_torch(r, k, kind):
    assert_triton_matches(r, k, kind)


@needs_triton
@pytest.mark.parametrize(("k", "kind"), [(1, "realistic"), (4, "flat"), (7, "steep"), (7, "realistic")])
def test_triton_matches_torch_256_requests(k, kind):
    # interpreted, one 2,048-key bitonic sort takes seconds: one random and one tied input per case
    assert_triton_matches(256, k, kind)


@needs_triton
def test_triton_inputs_and_policy_dispatch(monkeypatch):
    g = torch.Generator().manual_seed(7)
    conf = (torch.rand(9, 12, generator=g) * 1.4 - 0.2).to(DEVICE)  # outside [0, 1] too: clamped
    values = table("realistic", 9).arange(9, 9 + 9 * 6 + 1, DEVICE)
    sliced = conf[:, 2:8]  # strides (12, 1) with an offset
    want = prefix_schedule_reference(sliced, values).tolist()
    for x in (sliced, sliced.double(), sliced.bfloat16().float(), sliced.t().contiguous().t()):
        assert prefix_schedule(x, values, backend="triton").tolist() == prefix_schedule_reference(x, values).tolist()
    assert prefix_schedule(sliced, values, backend="triton", num_warps=1).tolist() == want
    assert prefix_schedule(sliced[:0], values[:1], backend="triton").shape == (0,)

    # the policy: backend by argument or by environment
    sps = table("realistic", 9)
    first = schedule_prefix(conf[:, :6], sps, backend="torch").tolist()
    assert PrefixScheduler(sps, backend="triton")(conf, 6, 9).tolist() == first
    monkeypatch.setenv("DSPARK_KERNEL_BACKEND", "triton")
    assert PrefixScheduler(sps)(conf, 6, 9).tolist() == first


# ------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("kind", ["flat", "steep", "realistic"])
def test_gpu_triton_matches_torch(kind):
    for r in (1, 3, 64, 256, 1000):
        for k in (1, 4, 7, 12):
            assert_triton_matches(r, k, kind, seeds=[(s, s % 2 == 1) for s in range(6)], device="cuda")


@pytest.mark.gpu
@needs_triton
def test_gpu_decision_never_synchronises():
    sps = table("realistic", 256)
    conf = confidences(256, 7, seed=0).cuda()
    for backend in ("torch", "triton"):
        schedule_prefix(conf, sps, backend=backend)  # warm: table values cached on the device, kernel compiled
        torch.cuda.set_sync_debug_mode("error")
        try:
            schedule_prefix(conf, sps, backend=backend)
        finally:
            torch.cuda.set_sync_debug_mode("default")
