"""Every way the engine runs a round (fused, split, compiled, CUDA graphs) decodes the same tokens and records, and
what a CUDA graph captures never reads back to the host."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from dspark_lightning.decoding import ConfidenceThreshold, PrefixScheduler, SpeculativeEngine, SpsTable
from dspark_lightning.targets import FrozenTarget

NAMES = ["dspark-vanilla", "dspark-rnn", "dflash-deepspec", "dflash-zlab", "eagle3", None]
PROMPTS = [[5, 17, 33, 2, 9], [41], [7, 7, 12, 60, 3, 28, 19, 44, 1], [30, 11, 50]]
NEW = 24
SAMPLED = dict(temperature=1.0, top_p=0.9, seed=3)


def records(out):
    r = out.rounds
    return [t.tolist() for t in (r.request, r.step, r.proposal_length, r.accepted, r.num_tokens)]


def _drafter(name, make_drafter, tiny_target_config):
    return None if name is None else make_drafter(name, tiny_target_config())


@pytest.mark.parametrize("name", NAMES)
def test_fused_and_split_rounds_decode_the_same_tokens_and_records(target64, name, make_drafter,
                                                                   tiny_target_config):
    """Fused rounds (no host read-back, the run-state read one round late) and split rounds (draft and verify timed
    apart) agree exactly, greedy and sampled with top-p; only split rounds measure the draft/verify split."""
    drafter = _drafter(name, make_drafter, tiny_target_config)
    fused, split = SpeculativeEngine(target64, drafter), SpeculativeEngine(target64, drafter, time_phases=True)
    width = 1 + (fused.gamma if drafter is not None else 0)
    assert fused.fused_width(len(PROMPTS)) == width and split.fused_width(len(PROMPTS)) is None
    for kwargs in ({}, SAMPLED):
        want, got = split.generate(PROMPTS, max_new_tokens=NEW, **kwargs), fused.generate(PROMPTS, max_new_tokens=NEW,
                                                                                         **kwargs)
        assert got.tokens == want.tokens and records(got) == records(want), (name, kwargs)
        assert got.stopped == want.stopped == [False] * len(PROMPTS)
    assert torch.isnan(got.rounds.draft_seconds).all() and (got.rounds.round_seconds > 0).all()
    assert (want.rounds.draft_seconds > 0).all() and (want.rounds.verify_seconds > 0).all()


def test_a_request_samples_the_same_tokens_alone_or_in_any_batch(target64, make_drafter, tiny_target_config):
    """The randomness is keyed by (seed, request, position), not by the batch: at T > 0 a request decodes the same
    tokens alone and beside others (fixed verify length, so no decision is batch-global)."""
    engine = SpeculativeEngine(target64, make_drafter("dspark-vanilla", tiny_target_config()))
    batch = engine.generate(PROMPTS, max_new_tokens=NEW, **SAMPLED)
    alone = engine.generate(PROMPTS[:1], max_new_tokens=NEW, **SAMPLED)
    assert alone.tokens[0] == batch.tokens[0]
    assert engine.generate(PROMPTS, max_new_tokens=NEW, **{**SAMPLED, "seed": 4}).tokens != batch.tokens


class _NoHostReadback(TorchFunctionMode):
    """Refuses what a CUDA graph cannot capture: reading a tensor back to the host (``item``, ``tolist``, ``bool``,
    ``int``, ``nonzero``, boolean indexing, ``cpu``), tensors made from Python data (a host-to-device copy) and
    sampling through ``multinomial``."""

    REFUSED = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
               torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.__len__, torch.Tensor.nonzero,
               torch.nonzero, torch.Tensor.cpu, torch.Tensor.numpy, torch.masked_select, torch.Tensor.masked_select,
               torch.unique, torch.Tensor.unique, torch.multinomial, torch.tensor, torch.as_tensor}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.REFUSED:
            raise AssertionError(f"a captured pass calls {func.__name__}")
        if func is torch.Tensor.__getitem__ and isinstance(args[1], torch.Tensor) and args[1].dtype == torch.bool:
            raise AssertionError("a captured pass indexes with a boolean mask")
        return func(*args, **(kwargs or {}))


class _UncapturedStep:
    """``CapturedStep``'s interface on the CPU: runs ``fn`` under :class:`_NoHostReadback` on every call, and
    ``warmup`` times when built, as the capture's warm-up does (side effects included, ``reset`` after each)."""

    def __init__(self, fn, device, *, warmup=2, reset=None, pool=None):
        self.fn = fn
        for _ in range(warmup):
            self()
            if reset is not None:
                reset()

    def __call__(self):
        with _NoHostReadback():
            self.fn()


def test_no_host_readback_mode_catches_what_capture_refuses():
    x = torch.arange(4.0)
    for call in (lambda: x.sum().item(), lambda: bool(x.sum()), lambda: x[x > 1], lambda: torch.tensor([1.0])):
        with pytest.raises(AssertionError, match="captured pass"), _NoHostReadback():
            call()


def _graphed_on_cpu(engine, monkeypatch):
    import dspark_lightning.decoding.engine as engine_module

    monkeypatch.setattr(engine_module, "CapturedStep", _UncapturedStep)
    engine.cuda_graphs = True  # the constructor wants CUDA for this; the passes are what is checked
    return engine


@pytest.mark.parametrize("name", NAMES)
def test_a_fused_round_never_reads_back_to_the_host(target64, name, make_drafter, tiny_target_config, monkeypatch):
    """What the graphed engine captures runs here on the CPU under a mode that refuses host read-backs (so a CUDA
    graph could capture it), with the capture's warm-ups undone: the ungraphed engine's tokens and records."""
    drafter = _drafter(name, make_drafter, tiny_target_config)
    for kwargs in ({}, SAMPLED):
        want = SpeculativeEngine(target64, drafter).generate(PROMPTS, max_new_tokens=NEW, **kwargs)
        engine = _graphed_on_cpu(SpeculativeEngine(target64, drafter), monkeypatch)
        got = engine.generate(PROMPTS, max_new_tokens=NEW, **kwargs)
        assert got.tokens == want.tokens and records(got) == records(want), (name, kwargs)
        assert set(engine._state.graphs) == {f"round/{engine.gamma + 1}"}
    if drafter is not None:  # the draft context holds what the target committed: prompt (less the anchor) + rounds
        r = got.rounds
        want_lengths = [len(p) - 1 + int((r.accepted[r.request == i] + 1).sum()) for i, p in enumerate(PROMPTS)]
        assert engine._state.dcache.lengths.tolist() == want_lengths


def round_widths(rounds) -> list[int]:
    """The verify width of every round: the anchor plus the longest verify length among the round's requests."""
    return [1 + int(rounds.proposal_length[rounds.step == i].max()) for i in range(int(rounds.step.max()) + 1)]


@pytest.mark.parametrize("policy", [ConfidenceThreshold(0.55), PrefixScheduler(SpsTable([4, 8, 16], [1.0, 1.0, 0.8]))])
def test_split_rounds_verify_the_width_the_policy_asks_one_graph_each(target64, references_for, policy, make_drafter,
                                                                     tiny_target_config, monkeypatch):
    """A policy that verifies fewer drafts shortens the verify pass to the longest verify length plus the anchor, one
    graph per width met; requests verify different lengths and the tokens are the target's own."""
    drafter = make_drafter("dspark-vanilla", tiny_target_config())
    want = SpeculativeEngine(target64, drafter, policy=policy).generate(PROMPTS, max_new_tokens=NEW)
    engine = _graphed_on_cpu(SpeculativeEngine(target64, drafter, policy=policy), monkeypatch)
    got = engine.generate(PROMPTS, max_new_tokens=NEW)
    assert got.tokens == want.tokens == references_for(PROMPTS, NEW) and records(got) == records(want)
    widths = {int(key.split("/")[1]) for key in engine._state.graphs if key.startswith("verify/")}
    assert widths == set(round_widths(got.rounds)) and len(widths) > 1 and "draft" in engine._state.graphs
    assert len(set(got.rounds.proposal_length.tolist())) > 1  # the policy did vary the verify length


def test_a_scheduler_on_a_flat_table_runs_fused_rounds_that_verify_everything(target64, make_drafter,
                                                                             tiny_target_config):
    """Where verifying every draft costs no more than verifying none, the prefix scheduler's rounds are fused: the
    fixed-length engine's tokens and records; on a steep table it decides per round (split)."""
    drafter = make_drafter("dspark-vanilla", tiny_target_config())
    flat = SpeculativeEngine(target64, drafter, policy=PrefixScheduler(SpsTable([1, 64], [100.0, 99.0])))
    steep = SpeculativeEngine(target64, drafter, policy=PrefixScheduler(SpsTable([4, 8, 16], [1.0, 1.0, 0.8])))
    assert flat.fused_width(len(PROMPTS)) == flat.gamma + 1 and steep.fused_width(len(PROMPTS)) is None
    want = SpeculativeEngine(target64, drafter).generate(PROMPTS, max_new_tokens=NEW)
    got = flat.generate(PROMPTS, max_new_tokens=NEW)
    assert got.tokens == want.tokens and records(got) == records(want)


def test_compiled_passes_decode_what_the_plain_engine_decodes(target64, make_drafter, tiny_target_config):
    """``compile_passes``: the fused round through torch.compile as whole graphs (no break), the same tokens and
    records (greedy here: a compile costs minutes on a CPU; the GPU tests compile the sampled round too)."""
    from torch._dynamo.utils import counters

    drafter = make_drafter("dspark-vanilla", tiny_target_config())
    plain, compiled = SpeculativeEngine(target64, drafter), SpeculativeEngine(target64, drafter, compile_passes=True)
    graphs_before, breaks_before = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    want, got = plain.generate(PROMPTS, max_new_tokens=8), compiled.generate(PROMPTS, max_new_tokens=8)
    assert got.tokens == want.tokens and records(got) == records(want)
    assert counters["stats"]["unique_graphs"] > graphs_before and sum(counters["graph_break"].values()) == breaks_before


def test_buffers_are_kept_for_calls_of_the_same_shapes(target64, references_for, make_drafter, tiny_target_config):
    """A second call of the same batch bucket and capacities reuses the buffers (what its CUDA graphs were captured
    on), reset: the same tokens; another batch size or other sampling settings get new ones."""
    engine = SpeculativeEngine(target64, make_drafter("dspark-vanilla", tiny_target_config()))
    references = references_for(PROMPTS, NEW)
    assert engine.generate(PROMPTS, max_new_tokens=NEW).tokens == references
    state = engine._state
    assert engine.generate(PROMPTS, max_new_tokens=NEW - 2).tokens == [r[:NEW - 2] for r in references]
    assert engine._state is state  # capacities rounded up to CAPACITY_STEP: the same buffers
    assert engine.generate(PROMPTS[:3], max_new_tokens=NEW).tokens == references[:3] and engine._state is state
    assert engine.generate(PROMPTS[:1], max_new_tokens=NEW).tokens == references[:1] and engine._state is not state
    state = engine._state
    engine.generate(PROMPTS[:1], max_new_tokens=NEW, **SAMPLED)
    assert engine._state is not state


# ------------------------------------------------------------------------------------------------- GPU
def _cuda_pair(name, make_drafter, tiny_target_config, **engine_kwargs):
    target = FrozenTarget.from_config(tiny_target_config(), [0, 2], device="cuda")
    drafter = None if name is None else make_drafter(name, tiny_target_config()).cuda()
    return (SpeculativeEngine(target, drafter, **engine_kwargs),
            SpeculativeEngine(target, drafter, cuda_graphs=True, **engine_kwargs))


@pytest.mark.gpu
@pytest.mark.parametrize("name", NAMES)
def test_cuda_graphs_decode_what_the_eager_engine_decodes(name, make_drafter, tiny_target_config):
    """Fused rounds replayed from one CUDA graph: the eager engine's tokens and records on the same GPU, greedy and
    sampled (uneven batch, finished rows frozen); a second call of the same shapes replays the first call's graph,
    a call of another batch size captures its own."""
    eager, graphed = _cuda_pair(name, make_drafter, tiny_target_config)
    for kwargs in ({}, SAMPLED):
        captured = []
        for call, prompts in enumerate((PROMPTS, PROMPTS, PROMPTS[:1])):
            want = eager.generate(prompts, max_new_tokens=NEW, **kwargs)
            got = graphed.generate(prompts, max_new_tokens=NEW, **kwargs)
            assert got.tokens == want.tokens and records(got) == records(want), (name, call, kwargs)
            name = f"round/{graphed.gamma + 1}"
            assert set(graphed._state.graphs) == {name}
            captured.append(graphed._state.graphs[name])
        assert captured[1] is captured[0] and captured[2] is not captured[0]


@pytest.mark.gpu
@pytest.mark.parametrize("compile_passes", [False, True])
def test_cuda_graphs_of_split_rounds_one_per_width(compile_passes, make_drafter, tiny_target_config):
    """Split rounds under a threshold policy replay the draft graph and one verify graph per width (over the
    compiled passes too), and decode what the eager engine decodes."""
    policy = ConfidenceThreshold(0.55)
    eager, graphed = _cuda_pair("dspark-vanilla", make_drafter, tiny_target_config, policy=policy,
                                compile_passes=compile_passes)
    for kwargs in ({}, SAMPLED):
        want, got = eager.generate(PROMPTS, max_new_tokens=NEW, **kwargs), graphed.generate(PROMPTS,
                                                                                          max_new_tokens=NEW, **kwargs)
        assert got.tokens == want.tokens and records(got) == records(want), kwargs
    widths = set(round_widths(got.rounds))
    assert {f"verify/{w}" for w in widths} | {"draft"} == set(graphed._state.graphs) and len(widths) > 1


@pytest.mark.gpu
def test_cuda_graphs_of_compiled_fused_rounds(make_drafter, tiny_target_config):
    eager, graphed = _cuda_pair("dspark-vanilla", make_drafter, tiny_target_config, compile_passes=True)
    for kwargs in ({}, SAMPLED):
        want, got = eager.generate(PROMPTS, max_new_tokens=NEW, **kwargs), graphed.generate(PROMPTS,
                                                                                          max_new_tokens=NEW, **kwargs)
        assert got.tokens == want.tokens and records(got) == records(want), kwargs
