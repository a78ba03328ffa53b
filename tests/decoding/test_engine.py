"""The engine is lossless: greedy output equals the target's own, sampled output has the target's distribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from dspark_lightning.decoding import (
    ConfidenceThreshold,
    FixedLength,
    PrefixScheduler,
    Sampling,
    SpeculativeEngine,
    SpsTable,
)
from dspark_lightning.decoding.sampling import CounterRNG, verify_chain
from dspark_lightning.drafters.protocol import Proposal
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
        engine = SpeculativeEngine(target64, drafter, gamma=gamma)
        batch = engine.generate(PROMPTS, max_new_tokens=NEW)  # uneven lengths, batch 4
        assert batch.tokens == references, (name, gamma)
        for prompt, ref in zip(PROMPTS[:2], references[:2]):
            assert engine.generate([prompt], max_new_tokens=NEW).tokens == [ref], (name, gamma)
        assert (batch.rounds.proposal_length == gamma).all()
        assert int(batch.rounds.num_tokens.sum()) == len(PROMPTS) * NEW  # no stop token: every round's tokens kept


class OracleDrafter(torch.nn.Module):
    """Proposes the target's known greedy continuation with one wrong token per block: long accepted prefixes,
    corrections, bonus tokens and stop tokens inside accepted drafts all happen. A drafter of
    ``drafters/protocol.py`` written from scratch, as a user's would be."""

    def __init__(self, config, continuations: list[list[int]], prompt_lengths: list[int]) -> None:
        super().__init__()
        self.config = config
        self.sequences = continuations
        self.prompt_lengths = prompt_lengths
        self.rounds = 0

    @property
    def gamma(self):
        return self.config.block_size

    max_draft_tokens = gamma

    def new_cache(self, batch, *, device=None, dtype=None, capacity=256, static=False):
        from dspark_lightning.drafters.dflash import ContextKVCache

        return ContextKVCache(1, batch, 1, 1, device="cpu", dtype=torch.float32, capacity=1, static=static)

    def extend_context(self, cache, target_hidden, tokens_after, counts=None):
        cache.lengths.add_(counts)

    def propose(self, cache, anchor_ids, sampler, num_tokens=None):
        k, vocab = self.config.block_size, self.config.vocab_size
        tokens = []
        for row in range(len(cache.lengths)):
            request = row % len(self.sequences)  # rows past the requests (padding) never run
            done = int(cache.lengths[row]) + 1 - self.prompt_lengths[request]  # generated tokens so far
            want = (self.sequences[request] + [0] * 64)[done:done + k]
            wrong = (self.rounds + row) % (k + 2)  # sometimes beyond the block: everything right
            if wrong < k:
                want[wrong] = (want[wrong] + 1) % vocab
            tokens.append(want)
        self.rounds += 1
        return Proposal(torch.tensor(tokens), None)


def test_greedy_with_long_accepted_prefixes_and_stop_tokens(target64, references, make_drafter, tiny_target_config):
    drafter = make_drafter("dflash-deepspec", tiny_target_config(), block_size=4)
    oracle = OracleDrafter(drafter.config, references, [len(p) for p in PROMPTS])
    engine = SpeculativeEngine(target64, oracle)
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


def test_engine_refuses_mismatched_layers_and_gamma(make_drafter, tiny_target_config):
    cfg = tiny_target_config()
    drafter = make_drafter("dspark-vanilla", cfg)
    with pytest.raises(ValueError, match="target_layer_ids"):
        SpeculativeEngine(FrozenTarget.from_config(cfg, [0, 1]), drafter)
    with pytest.raises(ValueError, match="gamma=5"):
        SpeculativeEngine(FrozenTarget.from_config(cfg, [0, 2]), drafter, gamma=5)
    with pytest.raises(ValueError, match=r"top_p=0.0 must be in \(0, 1\]"):
        SpeculativeEngine(FrozenTarget.from_config(cfg, [0, 2]), drafter).generate([[1]], max_new_tokens=2,
                                                                                    temperature=1.0, top_p=0)


def test_verify_chain_rules():
    logits = torch.full((1, 3, 4), -30.0)
    logits[0, 0, 1] = logits[0, 1, 2] = logits[0, 2, 3] = 30.0  # the target is sure: 1, 2, 3
    drafts = torch.tensor([[1, 0]])
    q = torch.nn.functional.one_hot(drafts, 4).float()
    rng, anchor = CounterRNG(0, torch.tensor([0])), torch.tensor([5])
    greedy, sampled = Sampling(0.0), Sampling(1.0)
    accepted, nxt = verify_chain(drafts, q, logits, torch.tensor([2]), greedy)
    assert accepted.tolist() == [1] and nxt.tolist() == [2]  # greedy: match, mismatch -> target argmax
    accepted, nxt = verify_chain(drafts, q, logits, torch.tensor([2]), sampled, rng, anchor)
    assert accepted.tolist() == [1] and nxt.tolist() == [2]  # residual of a one-hot q is the target's choice
    accepted, nxt = verify_chain(drafts, q, logits, torch.tensor([1]), sampled, rng, anchor)
    assert accepted.tolist() == [1] and nxt.tolist() == [2]  # bonus after the last offered draft
    accepted, nxt = verify_chain(drafts, q, logits, torch.tensor([0]), sampled, rng, anchor)
    assert accepted.tolist() == [0] and nxt.tolist() == [1]  # nothing offered: a plain target sample


# --------------------------------------------------------------------------------------------- sampling
V = 12
SAMPLES, CHUNK = 20_000, 5_000
PROMPT = [3, 5, 1, 7]


def _filtered64(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """An independent float64 reference of the target's sampled distribution: temperature, then the top-k most
    likely tokens, then the smallest prefix of the sorted distribution whose mass reaches top-p."""
    p = torch.softmax(logits.double() / temperature, -1)
    out = torch.zeros_like(p)
    for row in range(p.shape[0]):
        order = p[row].argsort(descending=True)
        kept = order[:top_k] if top_k else order
        mass = p[row, kept] / p[row, kept].sum()
        n = int((torch.cumsum(mass, 0) - mass < top_p).sum()) if top_p < 1 else len(kept)
        out[row, kept[:max(n, 1)]] = p[row, kept[:max(n, 1)]]
    return out / out.sum(-1, keepdim=True)


def _exact_joint(target: FrozenTarget, prompt: list[int], stop: int | None = None, **sampling) -> np.ndarray:
    """P(x1, x2 | prompt) of the target by enumeration, flattened ``x1 * V + x2``; with a stop token the outcome
    ``(stop, -)`` (the request ends after one token) is the extra last entry."""
    sampling.setdefault("temperature", 1.0)
    with torch.no_grad():
        p1 = _filtered64(target(torch.tensor([prompt]), compute_logits=True).logits[0, -1:], **sampling)[0]
        both = torch.tensor([prompt + [x] for x in range(V)])
        p2 = _filtered64(target(both, compute_logits=True).logits[:, -1], **sampling)
    joint = p1[:, None] * p2
    if stop is None:
        return joint.flatten().numpy()
    joint[stop] = 0
    return np.append(joint.flatten().numpy(), float(p1[stop]))


def _outcomes(tokens: list[list[int]], stop: int | None = None) -> np.ndarray:
    """Indices into :func:`_exact_joint`'s outcomes."""
    return np.array([V * V if stop is not None and t[0] == stop else t[0] * V + t[1] for t in tokens])


def _chi2_pvalue(counts: np.ndarray, exact: np.ndarray) -> float:
    """Pearson's test, outcomes of expected count < 5 pooled into one bin (impossible ones must never occur)."""
    assert counts[exact == 0].sum() == 0
    expected = exact / exact.sum() * counts.sum()
    big, small = expected >= 5, (expected > 0) & (expected < 5)
    observed, wanted = counts[big], expected[big]
    if small.any():
        observed, wanted = np.append(observed, counts[small].sum()), np.append(wanted, expected[small].sum())
    return chisquare(observed, wanted).pvalue


def _sharpen(drafter: torch.nn.Module) -> torch.nn.Module:
    """Make drafts overlap the target more and confidences depend strongly on the previous draft."""
    with torch.no_grad():
        drafter.lm_head.weight.mul_(10)
        if getattr(drafter, "markov_head", None) is not None:
            drafter.markov_head.markov_w1.weight.mul_(100)
            drafter.confidence_head.proj.weight.mul_(3)
    return drafter


def _sampling_setup(name, make_drafter, tiny_target_config):
    cfg = tiny_target_config(vocab=V, layers=2)
    target = FrozenTarget.from_config(cfg, [0, 1])
    drafter = _sharpen(make_drafter(f"{name}-vanilla" if name == "dspark" else name, cfg, block_size=3,
                                    layer_ids=(0, 1)))
    return target, drafter


@pytest.mark.parametrize("case", ["dspark-fixed", "dspark-scheduler", "dspark-threshold", "eagle3-fixed",
                                  "dspark-fixed-top_p", "dspark-fixed-top_k", "dflash-scheduler-top_p"])
def test_sampled_joint_of_first_two_tokens_matches_target(case, make_drafter, tiny_target_config):
    name, policy_name, *filtering = case.split("-")
    filters = {"top_p": {"top_p": 0.7}, "top_k": {"top_k": 4}}.get(filtering[0] if filtering else "", {})
    target, drafter = _sampling_setup(name if name != "dflash" else "dflash-deepspec", make_drafter,
                                      tiny_target_config)
    # With CHUNK requests, verifying a whole first position is worth it, later drafts only for some requests.
    steep = SpsTable([CHUNK, 2 * CHUNK, 4 * CHUNK], [1.0, 1.0, 0.787])
    policy = {"fixed": FixedLength(), "scheduler": PrefixScheduler(steep), "threshold": ConfidenceThreshold(0.45)}
    engine = SpeculativeEngine(target, drafter, gamma=3, policy=policy[policy_name])
    counts = np.zeros(V * V)
    offered = []
    for seed in range(SAMPLES // CHUNK):
        out = engine.generate([PROMPT] * CHUNK, max_new_tokens=2, temperature=1.0,
                              generator=torch.Generator().manual_seed(seed), **filters)
        np.add.at(counts, _outcomes(out.tokens), 1)
        offered.append(out.rounds.proposal_length)
    lengths = torch.bincount(torch.cat(offered), minlength=4)
    if policy_name == "fixed":
        assert lengths[:3].sum() == 0
    else:
        assert (lengths > 0).sum() >= 2, lengths  # blocks really are truncated, to different lengths
    exact = _exact_joint(target, PROMPT, **filters)
    if filters:  # the filter really removes tokens the plain distribution would draw
        assert (exact == 0).sum() > (_exact_joint(target, PROMPT) == 0).sum()
        assert counts[exact == 0].sum() == 0  # and the engine never draws them
    assert _chi2_pvalue(counts, exact) > 0.01


def test_sampled_uneven_batch_with_rows_finishing_at_different_rounds(make_drafter, tiny_target_config):
    """Two prompts of different lengths share each batch, and a stop token ends some requests after their first
    token while others run another round: each prompt's outcomes follow the target's exact distribution."""
    target, drafter = _sampling_setup("dspark", make_drafter, tiny_target_config)
    other = [9, 2, 11, 4, 4, 6, 1]
    with torch.no_grad():
        first = torch.softmax(target(torch.tensor([PROMPT]), compute_logits=True).logits[0, -1], -1)
    stop = int(first.argsort()[-2])  # a likely first token, but not the likeliest
    engine = SpeculativeEngine(target, drafter, gamma=2)
    counts = {0: np.zeros(V * V + 1), 1: np.zeros(V * V + 1)}
    rounds_per_request = []
    for seed in range(4):
        prompts = [PROMPT, other] * (CHUNK // 2)
        out = engine.generate(prompts, max_new_tokens=2, temperature=1.0, stop_token_ids=[stop], seed=seed)
        for parity in (0, 1):
            np.add.at(counts[parity], _outcomes(out.tokens[parity::2], stop), 1)
        rounds_per_request.append(torch.bincount(out.rounds.request, minlength=len(prompts)))
    assert {1, 2} <= set(torch.cat(rounds_per_request).tolist())  # requests ended at different rounds
    assert counts[0][-1] > 0 and counts[1][-1] > 0
    for parity, prompt in ((0, PROMPT), (1, other)):
        assert _chi2_pvalue(counts[parity], _exact_joint(target, prompt, stop)) > 0.01


def test_engine_installs_the_fused_markov_sampler_and_it_drafts_what_the_loop_drafts(target64, make_drafter,
                                                                                    tiny_target_config):
    """The engine hands a vanilla DSpark the kernels' sampler; its greedy proposals and confidences equal the
    drafter's own loop, and ``fused_markov=False`` leaves the drafter untouched."""
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
        proposals.append(drafter.propose(cache, prompts[:, -1]))
    torch.testing.assert_close(proposals[1].tokens, proposals[0].tokens, rtol=0, atol=0)
    assert proposals[0].probs is None and proposals[1].probs is None
    torch.testing.assert_close(proposals[1].confidence, proposals[0].confidence)


# ------------------------------------------------------------------------------- sliding-window targets
def gemma3_config(vocab: int = 64, window: int = 3):
    """A peaked random Gemma-3-shaped target: two local layers (window shorter than the prompts), one global."""
    from dspark_lightning.targets import TargetConfig

    return TargetConfig(tiny={"model_type": "gemma3_text", "vocab_size": vocab, "hidden_size": 32,
                              "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
                              "num_key_value_heads": 2, "head_dim": 8, "query_pre_attn_scalar": 8,
                              "max_position_embeddings": 512, "initializer_range": 0.2, "sliding_window": window,
                              "layer_types": ["sliding_attention", "sliding_attention", "full_attention"]})


@pytest.mark.parametrize("name", ["dspark-vanilla", "eagle3", None])
def test_greedy_on_a_sliding_window_target_equals_its_own_greedy(name, make_drafter):
    """The engine's windowed mask reproduces what HF's Gemma 3 computes itself (no cache, its own masks), for
    prompts longer than the window; the window matters (a wide one decodes other tokens)."""
    target = FrozenTarget.from_config(gemma3_config(), [0, 2])
    drafter = None if name is None else make_drafter(name, gemma3_config())
    prompts = [[5, 17, 33, 2, 9, 41, 7, 12], [41], [7, 7, 12, 60, 3, 28, 19, 44, 1]]
    references = [greedy_reference(target, p, NEW) for p in prompts]
    out = SpeculativeEngine(target, drafter).generate(prompts, max_new_tokens=NEW)
    assert out.tokens == references
    wide = FrozenTarget.from_config(gemma3_config(window=64), [0, 2])
    assert [greedy_reference(wide, p, NEW) for p in prompts] != references


def test_sampled_joint_on_a_sliding_window_target_matches_it(make_drafter):
    target = FrozenTarget.from_config(gemma3_config(vocab=V, window=2), [0, 2])
    drafter = _sharpen(make_drafter("dspark-vanilla", gemma3_config(vocab=V, window=2), block_size=3))
    engine = SpeculativeEngine(target, drafter, gamma=3)
    counts = np.zeros(V * V)
    for seed in range(SAMPLES // CHUNK):
        out = engine.generate([PROMPT] * CHUNK, max_new_tokens=2, temperature=1.0, seed=seed)
        np.add.at(counts, _outcomes(out.tokens), 1)
    assert _chi2_pvalue(counts, _exact_joint(target, PROMPT)) > 0.01
