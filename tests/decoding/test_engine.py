"""The engine is lossless: greedy output equals the target's own, sampled output has the target's distribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from torch.overrides import TorchFunctionMode

from dspark_lightning.decoding import (
    ConfidenceThreshold,
    FixedLength,
    PrefixScheduler,
    SpeculativeEngine,
    SpsTable,
)
from dspark_lightning.decoding.sampling import verify_chain
from dspark_lightning.drafters.dflash import Proposal
from dspark_lightning.targets import FrozenTarget

DRAFTER_NAMES = ["dspark-vanilla", "dspark-rnn", "dflash-deepspec", "dflash-zlab", "eagle3"]
PROMPTS = [[5, 17, 33, 2, 9], [41], [7, 7, 12, 60, 3, 28, 19, 44, 1], [30, 11, 50]]
NEW = 24


def greedy_reference(target: FrozenTarget, prompt: list[int], n: int) -> list[int]:
    """The target alone, no KV cache: a full forward per token."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(target(torch.tensor([ids]), compute_logits=True).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def references(target64):
    return [greedy_reference(target64, p, NEW) for p in PROMPTS]


@pytest.mark.parametrize("name", DRAFTER_NAMES)
def test_greedy_equals_target_greedy(target64, references, name, make_drafter, tiny_target_config):
    drafter = make_drafter(name, tiny_target_config())
    for gamma in (1, 2, 4):
        engine = SpeculativeEngine(target64, drafter, gamma=gamma, compact_min_slots=16)
        batch = engine.generate(PROMPTS, max_new_tokens=NEW)  # uneven lengths, batch 4
        assert batch.tokens == references, (name, gamma)
        for prompt, ref in zip(PROMPTS[:2], references[:2]):
            assert engine.generate([prompt], max_new_tokens=NEW).tokens == [ref], (name, gamma)
        assert (batch.rounds.proposal_length == gamma).all()
        assert int(batch.rounds.num_tokens.sum()) == len(PROMPTS) * NEW  # no stop token: every round's tokens kept


class OracleDrafter(torch.nn.Module):
    """Proposes the target's known greedy continuation with one wrong token per block: long accepted prefixes,
    corrections, bonus tokens and stop tokens inside accepted drafts all happen."""

    def __init__(self, config, continuations: list[list[int]], prompt_lengths: list[int]) -> None:
        super().__init__()
        self.config = config
        self.sequences = continuations
        self.prompt_lengths = prompt_lengths
        self.rounds = 0

    def new_cache(self, batch, **kwargs):
        from dspark_lightning.drafters.dflash import ContextKVCache

        cache = ContextKVCache(1, batch, 1, 1, device="cpu", dtype=torch.float32)
        cache.keys = [torch.arange(batch, dtype=torch.float32)[:, None, None, None]]  # row -> request id
        cache.values = [cache.keys[0].clone()]
        return cache

    def extend_context(self, cache, target_hidden, counts=None):
        cache.lengths = cache.lengths + counts

    def propose(self, cache, anchor_ids, temperature=0.0, generator=None):
        k, vocab = self.config.block_size, self.config.vocab_size
        tokens = []
        for row, request in enumerate(cache.keys[0][:, 0, 0, 0].long().tolist()):
            done = int(cache.lengths[row]) + 1 - self.prompt_lengths[request]  # generated tokens so far
            want = (self.sequences[request] + [0] * 64)[done:done + k]
            wrong = (self.rounds + row) % (k + 2)  # sometimes beyond the block: everything right
            if wrong < k:
                want[wrong] = (want[wrong] + 1) % vocab
            tokens.append(want)
        self.rounds += 1
        tokens = torch.tensor(tokens)
        return Proposal(tokens, torch.nn.functional.one_hot(tokens, vocab).float())


def test_greedy_with_long_accepted_prefixes_and_stop_tokens(target64, references, make_drafter, tiny_target_config):
    drafter = make_drafter("dflash-deepspec", tiny_target_config(), block_size=4)
    oracle = OracleDrafter(drafter.config, references, [len(p) for p in PROMPTS])
    engine = SpeculativeEngine(target64, oracle, compact_min_slots=8)
    out = engine.generate(PROMPTS, max_new_tokens=NEW)
    assert out.tokens == references
    assert out.rounds.accepted.max() == 4 and out.rounds.num_tokens.float().mean() > 2
    # Stop at a token that occurs mid-way: output ends right after its first occurrence.
    stop = references[2][10]
    out = SpeculativeEngine(target64, oracle).generate(PROMPTS, max_new_tokens=NEW, stop_token_ids=[stop])
    for tokens, ref in zip(out.tokens, references):
        cut = ref.index(stop) + 1 if stop in ref else NEW
        assert tokens == ref[:cut]
    assert out.stopped[2]
    # Budgets that end inside an accepted block are respected exactly.
    out = SpeculativeEngine(target64, oracle).generate(PROMPTS, max_new_tokens=7)
    assert out.tokens == [r[:7] for r in references]


def test_target_alone_through_the_engine(target64, references):
    out = SpeculativeEngine(target64, None).generate(PROMPTS, max_new_tokens=NEW)
    assert out.tokens == references
    assert (out.rounds.num_tokens == 1).all() and out.rounds.gamma == 0


def test_engine_refuses_mismatched_layers_and_sliding_windows(make_drafter, tiny_target_config):
    cfg = tiny_target_config()
    drafter = make_drafter("dspark-vanilla", cfg)
    with pytest.raises(ValueError, match="target_layer_ids"):
        SpeculativeEngine(FrozenTarget.from_config(cfg, [0, 1]), drafter)
    with pytest.raises(ValueError, match="gamma=5"):
        SpeculativeEngine(FrozenTarget.from_config(cfg, [0, 2]), drafter, gamma=5)
    sliding = FrozenTarget.from_config(cfg, [0, 2])
    sliding.model.config.layer_types = ["sliding_attention"] * 3
    with pytest.raises(ValueError, match="full-attention"):
        SpeculativeEngine(sliding, drafter)


def test_verify_chain_rules():
    logits = torch.full((1, 3, 4), -30.0)
    logits[0, 0, 1] = logits[0, 1, 2] = logits[0, 2, 3] = 30.0  # the target is sure: 1, 2, 3
    drafts = torch.tensor([[1, 0]])
    q = torch.nn.functional.one_hot(drafts, 4).float()
    accepted, nxt = verify_chain(drafts, q, logits, torch.tensor([2]), 0.0)
    assert accepted.tolist() == [1] and nxt.tolist() == [2]  # greedy: match, mismatch -> target argmax
    accepted, nxt = verify_chain(drafts, q, logits, torch.tensor([2]), 1.0, torch.Generator().manual_seed(0))
    assert accepted.tolist() == [1] and nxt.tolist() == [2]  # residual of a one-hot q is the target's choice
    accepted, nxt = verify_chain(drafts, q, logits, torch.tensor([1]), 1.0, torch.Generator().manual_seed(0))
    assert accepted.tolist() == [1] and nxt.tolist() == [2]  # bonus after the last offered draft
    accepted, nxt = verify_chain(drafts, q, logits, torch.tensor([0]), 1.0, torch.Generator().manual_seed(0))
    assert accepted.tolist() == [0] and nxt.tolist() == [1]  # nothing offered: a plain target sample


# --------------------------------------------------------------------------------------------- sampling
V = 12
SAMPLES, CHUNK = 20_000, 5_000
PROMPT = [3, 5, 1, 7]


def _exact_joint(target: FrozenTarget) -> np.ndarray:
    """P(x1, x2 | prompt) of the target at T = 1, by enumeration."""
    with torch.no_grad():
        p1 = torch.softmax(target(torch.tensor([PROMPT]), compute_logits=True).logits[0, -1].double(), -1)
        both = torch.tensor([PROMPT + [x] for x in range(V)])
        p2 = torch.softmax(target(both, compute_logits=True).logits[:, -1].double(), -1)
    joint = (p1[:, None] * p2).flatten().numpy()
    return joint / joint.sum()


def _sharpen(drafter: torch.nn.Module) -> torch.nn.Module:
    """Make drafts overlap the target more and confidences depend strongly on the previous draft."""
    with torch.no_grad():
        drafter.lm_head.weight.mul_(10)
        if getattr(drafter, "markov_head", None) is not None:
            drafter.markov_head.markov_w1.weight.mul_(100)
            drafter.confidence_head.proj.weight.mul_(3)
    return drafter


@pytest.mark.parametrize("case", ["dspark-fixed", "dspark-scheduler", "dspark-threshold", "eagle3-fixed"])
def test_sampled_joint_of_first_two_tokens_matches_target(case, make_drafter, tiny_target_config):
    name, policy_name = case.rsplit("-", 1)
    cfg = tiny_target_config(vocab=V, layers=2)
    target = FrozenTarget.from_config(cfg, [0, 1])
    drafter = _sharpen(make_drafter(f"{name}-vanilla" if name == "dspark" else name, cfg, block_size=3,
                                    layer_ids=(0, 1)))
    # With CHUNK requests, verifying a whole first position is worth it, later drafts only for some requests.
    steep = SpsTable([CHUNK, 2 * CHUNK, 4 * CHUNK], [1.0, 1.0, 0.787])
    policy = {"fixed": FixedLength(), "scheduler": PrefixScheduler(steep), "threshold": ConfidenceThreshold(0.45)}
    engine = SpeculativeEngine(target, drafter, gamma=3, policy=policy[policy_name])
    counts = np.zeros(V * V)
    offered = []
    for seed in range(SAMPLES // CHUNK):
        out = engine.generate([PROMPT] * CHUNK, max_new_tokens=2, temperature=1.0,
                              generator=torch.Generator().manual_seed(seed))
        tokens = np.array(out.tokens)
        np.add.at(counts, tokens[:, 0] * V + tokens[:, 1], 1)
        offered.append(out.rounds.proposal_length)
    lengths = torch.bincount(torch.cat(offered), minlength=4)
    if policy_name == "fixed":
        assert lengths[:3].sum() == 0
    else:
        assert (lengths > 0).sum() >= 2, lengths  # blocks really are truncated, to different lengths
    expected = _exact_joint(target) * counts.sum()
    big = expected >= 5
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    assert chisquare(observed, expected).pvalue > 0.01


def test_engine_installs_the_fused_markov_sampler_and_it_drafts_what_the_loop_drafts(target64, make_drafter,
                                                                                    tiny_target_config):
    """The engine hands a vanilla DSpark the kernels' sampler (Gumbel-max); its greedy proposals, probabilities and
    confidences equal the drafter's own loop, and ``fused_markov=False`` leaves the drafter untouched."""
    from dspark_lightning.kernels.markov_sampling import markov_sampler

    looped = make_drafter("dspark-vanilla", tiny_target_config())
    fused = make_drafter("dspark-vanilla", tiny_target_config())
    SpeculativeEngine(target64, looped, fused_markov=False)
    SpeculativeEngine(target64, fused)
    assert looped.markov_sampler is None and fused.markov_sampler is markov_sampler
    prompts = torch.tensor([[5, 17, 33, 2, 9, 41], [7, 7, 12, 60, 3, 28]])
    out = target64(prompts)
    proposals = []
    for drafter in (looped, fused):
        cache = drafter.new_cache(len(prompts))
        drafter.extend_context(cache, out.hidden[:, :-1])
        proposals.append(drafter.propose(cache, prompts[:, -1], temperature=0.0))
    torch.testing.assert_close(proposals[1].tokens, proposals[0].tokens, rtol=0, atol=0)
    torch.testing.assert_close(proposals[1].probs, proposals[0].probs, rtol=0, atol=0)
    torch.testing.assert_close(proposals[1].confidence, proposals[0].confidence)


# ------------------------------------------------------------------------------------ fixed shapes
STATIC_NAMES = ["dspark-vanilla", "dspark-rnn", "dflash-deepspec", "dflash-zlab"]


def records(out):
    r = out.rounds
    return [t.tolist() for t in (r.request, r.step, r.proposal_length, r.accepted, r.num_tokens)]


@pytest.mark.parametrize("name", STATIC_NAMES + [None])
def test_static_shapes_decode_what_the_default_mode_decodes(target64, references, name, make_drafter,
                                                           tiny_target_config):
    """Preallocated slots, gamma + 1 verified slots every round, finished rows kept and frozen: the same tokens
    and the same per-round records as the default engine (greedy, uneven batch), and the same sampled tokens."""
    drafter = None if name is None else make_drafter(name, tiny_target_config())
    for gamma in ((1, 4) if drafter is not None else (None,)):
        dynamic = SpeculativeEngine(target64, drafter, gamma=gamma)
        static = SpeculativeEngine(target64, drafter, gamma=gamma, static_shapes=True)
        want, got = dynamic.generate(PROMPTS, max_new_tokens=NEW), static.generate(PROMPTS, max_new_tokens=NEW)
        assert got.tokens == want.tokens == references and records(got) == records(want), (name, gamma)
        sampled = [e.generate([PROMPTS[0]], max_new_tokens=NEW, temperature=1.0, seed=3) for e in (dynamic, static)]
        assert sampled[1].tokens == sampled[0].tokens and records(sampled[1]) == records(sampled[0])


def test_static_shapes_with_long_accepted_prefixes_stop_tokens_and_budgets(target64, references, make_drafter,
                                                                          tiny_target_config):
    drafter = make_drafter("dflash-deepspec", tiny_target_config(), block_size=4)
    oracle = lambda: OracleDrafter(drafter.config, references, [len(p) for p in PROMPTS])
    out = SpeculativeEngine(target64, oracle(), static_shapes=True).generate(PROMPTS, max_new_tokens=NEW)
    assert out.tokens == references and out.rounds.accepted.max() == 4
    stop = references[2][10]
    for budget, stops in ((NEW, [stop]), (7, [])):
        want = SpeculativeEngine(target64, oracle()).generate(PROMPTS, max_new_tokens=budget, stop_token_ids=stops)
        got = SpeculativeEngine(target64, oracle(), static_shapes=True).generate(PROMPTS, max_new_tokens=budget,
                                                                                stop_token_ids=stops)
        # (records differ once a row finishes: the oracle's wrong token depends on the row, which static keeps)
        assert got.tokens == want.tokens and got.stopped == want.stopped


def test_static_shapes_refuse_eagle3_naming_the_fix(target64, make_drafter, tiny_target_config):
    with pytest.raises(ValueError, match="static_shapes supports DSpark, DFlash.*static_shapes=False for Eagle3"):
        SpeculativeEngine(target64, make_drafter("eagle3", tiny_target_config()), static_shapes=True)


def test_cuda_graphs_need_a_cuda_target_and_cuda_inputs(target64):
    from dspark_lightning.decoding.graphs import GraphedCall

    with pytest.raises(ValueError, match=r"cuda_graphs=True needs the target on a CUDA device, not cpu.*static_shapes"):
        SpeculativeEngine(target64, None, cuda_graphs=True)
    with pytest.raises(ValueError, match="example inputs on a CUDA device"):
        GraphedCall(lambda x: (x,), torch.zeros(2))


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


class _UncapturedCall:
    """``GraphedCall``'s interface on the CPU: runs ``fn`` under :class:`_NoHostReadback` on every call, and
    ``warmup`` times when built, as the capture's warm-up does (side effects included)."""

    def __init__(self, fn, *example_inputs, warmup=2, reset=None):
        self.fn = fn
        for _ in range(warmup):
            self(*(x.clone() for x in example_inputs))
            if reset is not None:
                reset()

    def __call__(self, *inputs):
        with _NoHostReadback():
            return self.fn(*inputs)


def round_widths(rounds) -> list[int]:
    """The verify width of every round: the anchor plus the longest verify length among the round's requests."""
    return [1 + int(rounds.proposal_length[rounds.step == i].max()) for i in range(int(rounds.step.max()) + 1)]


def test_no_host_readback_mode_catches_what_capture_refuses():
    x = torch.arange(4.0)
    for call in (lambda: x.sum().item(), lambda: bool(x.sum()), lambda: x[x > 1], lambda: torch.tensor([1.0])):
        with pytest.raises(AssertionError, match="captured pass"), _NoHostReadback():
            call()


@pytest.mark.parametrize("name", STATIC_NAMES + [None])
def test_the_passes_cuda_graphs_capture_never_read_back_to_the_host(target64, references, name, make_drafter,
                                                                     tiny_target_config, monkeypatch):
    """What the graphed engine captures (the greedy draft pass, the verify pass) runs here on the CPU under a mode
    that refuses host read-backs: a CUDA graph could capture it, and the tokens are the target's own."""
    import dspark_lightning.decoding.engine as engine_module

    monkeypatch.setattr(engine_module, "GraphedCall", _UncapturedCall)
    drafter = None if name is None else make_drafter(name, tiny_target_config())
    engine = SpeculativeEngine(target64, drafter, static_shapes=True)
    engine.cuda_graphs = True  # the constructor wants CUDA for this; the passes are what is checked
    out = engine.generate(PROMPTS, max_new_tokens=NEW)
    assert out.tokens == references
    assert set(engine._static.graphs) == ({"round/1"} if drafter is None else {"round/5", "draft"})
    if drafter is not None:  # the draft context holds what the target committed: prompt (less the anchor) + rounds
        r = out.rounds
        want = [len(p) - 1 + int((r.accepted[r.request == i] + 1).sum()) for i, p in enumerate(PROMPTS)]
        assert engine._static.dcache.lengths.tolist() == want


def test_graphed_verify_follows_the_policy_one_graph_per_width(target64, references, make_drafter,
                                                               tiny_target_config, monkeypatch):
    """A policy that verifies fewer drafts shortens the graphed verify pass: the round's width is the longest
    verify length plus the anchor, one graph per width met; the tokens and records are the default engine's."""
    import dspark_lightning.decoding.engine as engine_module

    monkeypatch.setattr(engine_module, "GraphedCall", _UncapturedCall)
    drafter = make_drafter("dspark-vanilla", tiny_target_config())
    policy = ConfidenceThreshold(0.55)  # rounds of widths 1, 2 and 5 on these prompts
    want = SpeculativeEngine(target64, drafter, policy=policy).generate(PROMPTS, max_new_tokens=NEW)
    engine = SpeculativeEngine(target64, drafter, policy=policy, static_shapes=True)
    engine.cuda_graphs = True
    got = engine.generate(PROMPTS, max_new_tokens=NEW)
    assert got.tokens == want.tokens == references and records(got) == records(want)
    widths = {int(key.split("/")[1]) for key in engine._static.graphs if key.startswith("round/")}
    per_round = round_widths(got.rounds)
    assert widths == set(per_round) and len(widths) > 1
    # each round took its width of slots after the prompt's (the last round wrote from cache.start on)
    assert engine._static.cache.start + per_round[-1] == len(PROMPTS[2]) - 1 + sum(per_round)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["dspark-vanilla", "dspark-rnn", "dflash-deepspec", None])
def test_cuda_graphs_decode_what_the_eager_engine_decodes(name, make_drafter, tiny_target_config):
    """Draft and verify replayed from CUDA graphs: the same greedy tokens and records as the default engine on
    the same GPU (uneven batch, finished rows frozen); a second call of the same shapes replays the first call's
    graphs, a call of another batch size captures its own."""
    target = FrozenTarget.from_config(tiny_target_config(), [0, 2], device="cuda")
    drafter = None if name is None else make_drafter(name, tiny_target_config()).cuda()
    eager = SpeculativeEngine(target, drafter)
    graphed = SpeculativeEngine(target, drafter, cuda_graphs=True)
    captured = []
    for call, prompts in enumerate((PROMPTS, PROMPTS, PROMPTS[:1])):
        want, got = eager.generate(prompts, max_new_tokens=NEW), graphed.generate(prompts, max_new_tokens=NEW)
        assert got.tokens == want.tokens and records(got) == records(want), (name, call)
        assert set(graphed._static.graphs) == ({"round/1"} if drafter is None else {"round/5", "draft"})
        captured.append(graphed._static.graphs)
    assert captured[1] is captured[0] and captured[2] is not captured[0]
    sampled = graphed.generate(PROMPTS[:1], max_new_tokens=NEW, temperature=1.0, seed=3)  # T > 0: no graphs
    assert sampled.tokens == eager.generate(PROMPTS[:1], max_new_tokens=NEW, temperature=1.0, seed=3).tokens


def test_compiled_passes_decode_what_the_default_engine_decodes(target64, references, make_drafter,
                                                                tiny_target_config):
    """``compile_passes``: the draft pass and the rest of the round through torch.compile (widths 1, 2 and 5 under
    the threshold policy, so the round recompiles with dynamic sizes) give the default engine's tokens and
    records."""
    from torch._dynamo.utils import counters

    drafter = make_drafter("dspark-vanilla", tiny_target_config())
    policy = ConfidenceThreshold(0.55)
    want = SpeculativeEngine(target64, drafter, policy=policy).generate(PROMPTS, max_new_tokens=NEW)
    engine = SpeculativeEngine(target64, drafter, policy=policy, compile_passes=True)
    graphs_before, breaks_before = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    got = engine.generate(PROMPTS, max_new_tokens=NEW)
    assert engine.static_shapes and got.tokens == want.tokens == references and records(got) == records(want)
    # compiled, as whole graphs (no break)
    assert counters["stats"]["unique_graphs"] > graphs_before and sum(counters["graph_break"].values()) == breaks_before
    with pytest.raises(ValueError, match="static_shapes supports DSpark, DFlash"):
        SpeculativeEngine(target64, make_drafter("eagle3", tiny_target_config()), compile_passes=True)


@pytest.mark.gpu
@pytest.mark.parametrize("compile_passes", [False, True])
def test_cuda_graphs_verify_one_width_per_graph_as_the_policy_asks(compile_passes, make_drafter, tiny_target_config):
    """On the GPU: a threshold policy's rounds of widths 1, 2 and 5 replay one round graph per width (over the
    compiled passes too), and decode what the default engine decodes."""
    target = FrozenTarget.from_config(tiny_target_config(), [0, 2], device="cuda")
    drafter = make_drafter("dspark-vanilla", tiny_target_config()).cuda()
    policy = ConfidenceThreshold(0.55)
    want = SpeculativeEngine(target, drafter, policy=policy).generate(PROMPTS, max_new_tokens=NEW)
    graphed = SpeculativeEngine(target, drafter, policy=policy, cuda_graphs=True, compile_passes=compile_passes)
    got = graphed.generate(PROMPTS, max_new_tokens=NEW)
    assert got.tokens == want.tokens and records(got) == records(want)
    widths = set(round_widths(got.rounds))
    assert {f"round/{w}" for w in widths} | {"draft"} == set(graphed._static.graphs) and len(widths) > 1


@pytest.mark.parametrize("policy", [ConfidenceThreshold(0.45), PrefixScheduler(SpsTable([4, 8, 16], [1.0, 1.0, 0.8]))])
def test_static_shapes_follow_the_policy_per_request(target64, references, policy, make_drafter, tiny_target_config):
    """Requests verify different numbers of drafts; static verifies the longest of them (plus the anchor) for every
    row and masks the rest: the same tokens, verify lengths and acceptances as the default engine."""
    drafter = make_drafter("dspark-vanilla", tiny_target_config())
    want = SpeculativeEngine(target64, drafter, policy=policy).generate(PROMPTS, max_new_tokens=NEW)
    got = SpeculativeEngine(target64, drafter, policy=policy, static_shapes=True).generate(PROMPTS, max_new_tokens=NEW)
    assert got.tokens == want.tokens == references and records(got) == records(want)
    assert len(set(want.rounds.proposal_length.tolist())) > 1  # the policy did vary the verify length


def test_static_buffers_are_kept_for_calls_of_the_same_shapes(target64, references, make_drafter, tiny_target_config):
    """A second call of the same batch size and capacities reuses the buffers (what its CUDA graphs were captured
    on), reset: the same tokens; another batch size gets new buffers."""
    engine = SpeculativeEngine(target64, make_drafter("dspark-vanilla", tiny_target_config()), static_shapes=True)
    assert engine.generate(PROMPTS, max_new_tokens=NEW).tokens == references
    state = engine._static
    assert engine.generate(PROMPTS, max_new_tokens=NEW - 2).tokens == [r[:NEW - 2] for r in references]
    assert engine._static is state  # capacities rounded up to STATIC_CAPACITY_STEP: the same buffers
    assert engine.generate(PROMPTS[:1], max_new_tokens=NEW).tokens == references[:1] and engine._static is not state
