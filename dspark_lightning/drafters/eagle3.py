"""Eagle3: a one-layer autoregressive drafter trained with training-time test (TTT).

Follows EAGLE-3 (Li et al., 2025, training-time test) as implemented in DeepSpec ``deepspec/modeling/eagle3/``
(``common.py``, ``loss.py``) and served by SGLang's ``LlamaForCausalLMEagle3`` (SGLang 0.5.23
``python/sglang/srt/models/llama_eagle3.py``).

Design choices:
- Input of the single decoder layer at draft step k is a pair ``(e, h)``: ``e`` the embedding of a token
  and ``h`` a hidden state, ``fc(target_hidden)`` at step 0 (no norm after ``fc``) and the layer's own
  pre-norm output afterwards. q/k/v read ``[input_layernorm(e) ; hidden_norm(h)]`` (2H); the residual
  stream is ``h``. Logits are ``lm_head(norm(h))`` (+ Gemma soft cap).
- Training-time test (:meth:`Eagle3.forward`), steps ``k = 0..K-1`` (``K = ttt_length``), sequence
  position ``i``:
    * input token ``x_{i+1+k}`` (0 beyond the end); input hidden ``fc(target_hidden_i)`` at ``k = 0``,
      else step ``k-1``'s output at ``i``; rotary position ``i + k``;
    * the output predicts ``x_{i+2+k}`` with target ``p_t = softmax(lm_head_target(target_last[i+1+k]))``;
      it is supervised iff ``i+2+k < T`` and ``loss_mask[i+2+k]``: the supervised targets are exactly the answer
      tokens (DeepSpec's ``loss_mask[i+k]`` rule trains a shifted set; ``losses.eagle3_ttt_loss`` says how);
    * query ``(k, i)`` attends to the step-0 keys ``(0, j)``, ``j <= i``, and to its own chain's keys
      ``(c, i)``, ``c = 1..k`` (keys accumulate across steps, as DeepSpec's DynamicCache does).
  This is exactly what chained inference computes, which the tests check.
- Inference (:meth:`extend_context`, :meth:`propose`) keeps committed keys/values in an
  :class:`Eagle3Cache`; ``propose`` keeps its draft keys in local tensors, so the cache only ever holds
  committed context and "rolling back" after verification is simply not extending it with rejected tokens.
- Reduced output vocabulary (``draft_vocab_size``): SGLang's convention, buffer ``d2t`` [Vd] with
  ``target_id = d2t[i] + i`` and ``t2d`` [V] bool. The reduced ``lm_head`` is trainable (initialised from
  the target's rows); a full-vocabulary ``lm_head`` is a frozen copy of the target's. ``embed_tokens`` is
  always a frozen copy of the target's.
- Requires ``num_hidden_layers == 1`` (as DeepSpec and SGLang do).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._layers import (
    DecoderLayer,
    LMHead,
    RMSNorm,
    RotaryEmbedding,
    copy_target_embeddings,
    init_weights,
    project_target_features,
    scale_embedding,
    unfilled,
    use_flex,
)
from .config import DrafterConfig
from .dflash import ContextKVCache
from .protocol import GREEDY, DraftSampler, Proposal

KV = tuple[Tensor, Tensor]


@dataclass
class Eagle3Output:
    """Training-time-test unroll. ``K`` = ttt_length steps over ``B`` rows of ``T`` positions.

    Logits are not materialised (the loss builds them chunk by chunk with :meth:`Eagle3.compute_logits`).
    """

    hidden: Tensor  # [K, B, T, H] pre-norm layer outputs of every step
    labels: Tensor  # [K, B, T] token each output predicts, x_{i+2+k} (0 beyond the end)
    target_index: Tensor  # [K, B, T] position i+1+k whose target last hidden gives p_t
    supervise: Tensor  # [K, B, T] bool


def build_draft_vocab(token_counts: Tensor, draft_vocab_size: int) -> tuple[Tensor, Tensor]:
    """Reduced vocabulary of the ``draft_vocab_size`` most frequent tokens (ties: lower id first).

    Args:
        token_counts: [V] token frequencies (e.g. over the training answers).
        draft_vocab_size: Vd, the number of tokens to keep.

    Returns:
        d2t [Vd] int64 (``target_id = d2t[i] + i``, draft ids in increasing target-id order) and t2d [V] bool.
    """
    vocab = token_counts.shape[0]
    if not 0 < draft_vocab_size <= vocab:
        raise ValueError(f"draft_vocab_size={draft_vocab_size} must be in [1, vocab_size={vocab}].")
    order = torch.sort(token_counts, descending=True, stable=True).indices  # stable: ties keep id order
    hot = order[:draft_vocab_size].sort().values.long()
    t2d = torch.zeros(vocab, dtype=torch.bool, device=token_counts.device)
    t2d[hot] = True
    return hot - torch.arange(draft_vocab_size, device=hot.device), t2d


def _cat_kv(past: KV, new: KV) -> KV:
    return torch.cat([past[0], new[0]], dim=2), torch.cat([past[1], new[1]], dim=2)


class Eagle3Cache(ContextKVCache):
    """Committed keys/values of the single layer for a batch of uneven rows (right-padded, boolean key
    mask), plus ``last_hidden`` [B, H]: the pre-norm output at each row's last committed position, which
    is the state the next proposal starts from. ``lengths[b]`` is row b's number of committed positions."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, hidden_size: int, *,
                 device: torch.device | str, dtype: torch.dtype, capacity: int = 256, static: bool = False) -> None:
        super().__init__(1, batch, kv_heads, head_dim, device=device, dtype=dtype, capacity=capacity, static=static)
        self.last_hidden = torch.zeros(batch, hidden_size, device=device, dtype=dtype)

    def select_rows(self, index: Tensor) -> None:
        super().select_rows(index)
        self.last_hidden = self.last_hidden[index]


class Eagle3DecoderLayer(DecoderLayer):
    """Eagle3's layer: ``h' = h + o_proj(attn([input_layernorm(e) ; hidden_norm(h)]))``, then
    ``h' += mlp(post_attention_layernorm(h'))``. With Gemma4 sandwich norms (DeepSpec
    ``deepspec/modeling/eagle3/gemma4/``) the residual part is :meth:`DecoderLayer.residual`'s: the attention output
    is normed before it is added, the MLP is wrapped in ``pre/post_feedforward_layernorm`` and the result is scaled
    by ``layer_scalar``."""

    def __init__(self, config: DrafterConfig) -> None:
        super().__init__(config, attn_in_features=2 * config.hidden_size)
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, embeds: Tensor, hidden: Tensor, cos: Tensor, sin: Tensor, past_kv: KV | None = None,
                mask: Tensor | None = None) -> tuple[Tensor, KV]:
        """embeds/hidden [B, Q, H]; past_kv keys/values [B, kv, P, dh] placed before the Q new ones;
        mask [B or 1, 1, Q, P + Q] bool (True = attend). Returns the output [B, Q, H] and the new K/V."""
        attn = self.self_attn
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
        q = attn.project_q(x, cos, sin)
        k, v = attn.project_kv(x, cos, sin)
        keys, values = (k, v) if past_kv is None else _cat_kv(past_kv, (k, v))
        return self.residual(hidden, attn.attend(q, keys, values, mask)), (k, v)


def dense_ttt_mask(length: int, step: int, device: torch.device) -> Tensor:
    """The training-time-test mask of step ``step``, ``[1, 1, T, (step + 1) T]`` bool (SDPA): segment 0 (step 0's
    keys) causally, segments 1..step (later steps' keys) at the query's own position only."""
    pos = torch.arange(length, device=device)
    diagonal = torch.eye(length, dtype=torch.bool, device=device)
    return torch.cat([pos[None, :] <= pos[:, None]] + [diagonal] * step, dim=1)[None, None]


@lru_cache(maxsize=64)  # it depends on the shape only: built once per (length, step, device), not every batch
def ttt_block_mask(length: int, step: int, *, device: torch.device, compile_mask: bool = False):
    """:func:`dense_ttt_mask` as a flex-attention ``BlockMask``. Sparse: the diagonal segments cost one tile per
    query tile, where the dense mask computes them whole."""
    from torch.nn.attention.flex_attention import create_block_mask

    def visible(batch, head, q_idx, kv_idx):
        segment, position = kv_idx // length, kv_idx % length
        return ((segment == 0) & (position <= q_idx)) | ((segment > 0) & (position == q_idx))

    return create_block_mask(visible, None, None, length, (step + 1) * length, device=device, _compile=compile_mask)


class Eagle3(nn.Module):
    """One-layer TTT drafter (see module docstring). Parameter names follow DeepSpec/SGLang."""

    #: Training attention: ``sdpa`` with the dense [T, (k+1)T] mask of step k, ``flex`` with the sparse one
    #: (:func:`ttt_block_mask`), ``auto`` = flex on CUDA, sdpa elsewhere. Inference always uses sdpa. Flex's
    #: hidden states and gradients match the dense mask's on CUDA (GPU test); its step is 1.17x faster on the H200.
    attn_implementation: str = "auto"

    def __init__(self, config: DrafterConfig) -> None:
        super().__init__()
        config.validate()
        if config.algorithm != "eagle3":
            raise ValueError(f"Eagle3 needs algorithm 'eagle3', got {config.algorithm!r}; use DFlash/DSpark.")
        if config.num_hidden_layers != 1:
            raise ValueError(
                f"Eagle3 has exactly one decoder layer, got num_hidden_layers={config.num_hidden_layers}; "
                "set num_hidden_layers: 1 (DeepSpec and SGLang only support one)."
            )
        self.config = config
        h, v, m = config.hidden_size, config.vocab_size, config.num_context_layers
        draft_vocab = config.draft_vocab_size or v
        self.embed_tokens = unfilled(nn.Embedding, v, h)  # vocabulary-sized: filled once, by init_weights
        self.fc = nn.Linear(m * h, h, bias=False)
        self.layers = nn.ModuleList([Eagle3DecoderLayer(config)])
        self.norm = RMSNorm(h, config.rms_norm_eps)
        self.lm_head = unfilled(LMHead, h, draft_vocab, softcap=config.final_logit_softcapping)
        self.rotary_emb = RotaryEmbedding.from_config(config)
        if config.draft_vocab_size is not None:
            # Placeholder map (the first Vd tokens) until set_draft_vocab installs the real one.
            self.register_buffer("d2t", torch.zeros(draft_vocab, dtype=torch.long))
            self.register_buffer("t2d", torch.arange(v) < draft_vocab)
        else:
            self.d2t = self.t2d = None
        init_weights(self)
        self.embed_tokens.weight.requires_grad_(False)
        self.lm_head.weight.requires_grad_(self.reduced_vocab)

    # ------------------------------------------------------------------ vocabulary
    @property
    def reduced_vocab(self) -> bool:
        """True when the output vocabulary is a strict subset of the target's."""
        return self.lm_head.out_features < self.config.vocab_size

    @property
    def hot_ids(self) -> Tensor | None:
        """[Vd] target id of each draft id (``d2t + arange``), or None for the full vocabulary."""
        if self.d2t is None:
            return None
        return self.d2t + torch.arange(self.d2t.shape[0], device=self.d2t.device)

    @torch.no_grad()
    def set_draft_vocab(self, d2t: Tensor, t2d: Tensor) -> None:
        """Install a reduced vocabulary from :func:`build_draft_vocab` (before load_target_embeddings)."""
        if self.d2t is None:
            raise ValueError("This Eagle3 has the full vocabulary (draft_vocab_size: null); set it first.")
        if d2t.shape != self.d2t.shape or t2d.shape != self.t2d.shape:
            raise ValueError(
                f"d2t {tuple(d2t.shape)} / t2d {tuple(t2d.shape)} do not match the drafter's "
                f"{tuple(self.d2t.shape)} / {tuple(self.t2d.shape)} (draft_vocab_size, vocab_size)."
            )
        hot = d2t.to(self.d2t.device).long() + torch.arange(d2t.shape[0], device=self.d2t.device)
        expected = torch.zeros_like(self.t2d)
        if hot.min() < 0 or hot.max() >= expected.shape[0]:
            raise ValueError(f"d2t maps to target ids outside [0, {expected.shape[0]}).")
        expected[hot] = True
        if int(expected.sum()) != hot.shape[0] or not torch.equal(expected, t2d.to(expected.device).bool()):
            raise ValueError("d2t and t2d disagree (or d2t repeats a target id); use build_draft_vocab.")
        self.d2t.copy_(d2t)
        self.t2d.copy_(t2d)

    @property
    def holds_target_head(self) -> bool:
        """A full-vocabulary ``lm_head`` is the target's (frozen copy); a reduced one is the drafter's own."""
        return not self.reduced_vocab

    def load_target_embeddings(self, embed_weight: Tensor, lm_head_weight: Tensor) -> None:
        """Copy the target's embedding [V, H] and lm_head [V, H]; a reduced head takes rows ``hot_ids``."""
        copy_target_embeddings(self, embed_weight, lm_head_weight, self.hot_ids)

    # ------------------------------------------------------------------ pieces
    def embed(self, ids: Tensor) -> Tensor:
        return scale_embedding(self.embed_tokens(ids), self.config.embed_scale).to(self.fc.weight.dtype)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """Draft logits ``lm_head(norm(h))`` (+ soft cap) over the draft vocabulary from *pre-norm* states."""
        return self.lm_head.logits(self.norm(hidden))

    def target_logits(self, target_last_hidden: Tensor) -> Tensor:
        """Target logits from final-normed target states, valid only when ``lm_head`` is the target's."""
        if self.reduced_vocab:
            raise ValueError(
                "With a reduced draft vocabulary the drafter does not hold the target lm_head; pass the "
                "target's own head (softcap(h @ W_target.T)) to the loss instead."
            )
        return self.lm_head.logits(target_last_hidden)

    def project_hidden(self, target_hidden: Tensor) -> Tensor:
        """target_hidden [B, T, m*H] -> fc(.) [B, T, H] (no norm: the layer's hidden_norm follows)."""
        return project_target_features(self.fc, target_hidden)

    # ------------------------------------------------------------------ training
    @classmethod
    def training_anchors(cls, config: DrafterConfig) -> None:
        """None: the training-time test runs from every position, it takes no anchors."""
        return None

    def training_forward(self, batch: Mapping[str, Tensor], target_hidden: Tensor) -> Eagle3Output:
        """:meth:`forward` on a batch of the batch contract."""
        return self(batch["input_ids"], target_hidden, batch["loss_mask"])

    def forward(self, input_ids: Tensor, target_hidden: Tensor, loss_mask: Tensor) -> Eagle3Output:
        """Training-time test over ``ttt_length`` steps (semantics in the module docstring).

        Args:
            input_ids: [B, T] int64, right-padded.
            target_hidden: [B, T, m*H] concatenated raw target layer outputs.
            loss_mask: [B, T] bool, True on trainable (assistant) tokens; False on padding.
        """
        b, t = input_ids.shape
        steps = self.config.ttt_length
        device = input_ids.device
        layer = self.layers[0]
        pos = torch.arange(t, device=device)
        padded_ids = F.pad(input_ids, (0, steps + 1))  # token x_n for n >= T is 0
        padded_mask = F.pad(loss_mask.bool(), (0, steps + 1))

        flex = use_flex(self.attn_implementation, device, self.config.attention_head_dim)
        h = self.project_hidden(target_hidden)
        past: KV | None = None
        hidden, labels, target_index, supervise = [], [], [], []
        for k in range(steps):
            cos, sin = self.rotary_emb((pos + k).expand(b, t), h.dtype)
            mask = (ttt_block_mask(t, k, device=device, compile_mask=input_ids.is_cuda) if flex
                    else dense_ttt_mask(t, k, device))
            h, (key, value) = layer(self.embed(padded_ids[:, 1 + k:1 + k + t]), h, cos, sin, past, mask)
            past = (key, value) if past is None else _cat_kv(past, (key, value))
            hidden.append(h)
            labels.append(padded_ids[:, 2 + k:2 + k + t])
            target_index.append((pos + 1 + k).clamp(max=t - 1).expand(b, t))
            supervise.append(padded_mask[:, 2 + k:2 + k + t])
        return Eagle3Output(torch.stack(hidden), torch.stack(labels), torch.stack(target_index),
                            torch.stack(supervise))

    # ------------------------------------------------------------------ inference (drafters/protocol.py)
    @property
    def gamma(self) -> int:
        """The trained chain length (``ttt_length``); ``propose`` can draft more."""
        return self.config.ttt_length

    @property
    def max_draft_tokens(self) -> None:
        """A chain drafts as many tokens as asked (past ``ttt_length`` it runs untrained steps)."""
        return None

    def new_cache(self, batch: int, *, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None, capacity: int = 256, static: bool = False) -> Eagle3Cache:
        w = self.fc.weight
        cfg = self.config
        return Eagle3Cache(batch, cfg.attention_num_kv_heads, cfg.attention_head_dim, cfg.hidden_size,
                           device=device or w.device, dtype=dtype or w.dtype, capacity=capacity, static=static)

    @torch.no_grad()
    def extend_context(self, cache: Eagle3Cache, target_hidden: Tensor, tokens_after: Tensor,
                       counts: Tensor | None = None) -> None:
        """Commit verified positions: feature ``h_j`` paired with the *next* token ``x_{j+1}``.

        Args:
            cache: from :meth:`new_cache`; row b's new positions start at ``cache.lengths[b]``.
            target_hidden: [B, T, m*H] target features of the new positions.
            tokens_after: [B, T] the token following each of those positions (prefill of a prompt x_0..x_n:
                features h_0..h_{n-1} with tokens x_1..x_n; after a round: the verified positions' features
                with the committed tokens, accepted drafts then the bonus).
            counts: [B] how many of the T entries are valid per row (default all); rows with 0 are untouched.
        """
        tokens = tokens_after
        b, t = tokens.shape
        if tuple(target_hidden.shape[:2]) != (b, t):
            raise ValueError(
                f"target_hidden {tuple(target_hidden.shape)} and tokens_after {tuple(tokens.shape)} must share "
                "[batch, positions]: one next token per feature."
            )
        device = tokens.device
        if counts is None:
            counts = torch.full((b,), t, dtype=torch.long, device=device)
        j = torch.arange(t, device=device)
        cos, sin = self.rotary_emb(cache.lengths[:, None] + j, self.fc.weight.dtype)
        key_mask = cache.key_mask()  # [B, P]
        causal = (j[None, :] <= j[:, None]).expand(b, t, t)
        mask = torch.cat([key_mask[:, None, :].expand(b, t, key_mask.shape[1]), causal], dim=-1)[:, None]
        h_in = self.project_hidden(target_hidden)
        h, kv = self.layers[0](self.embed(tokens), h_in, cos, sin, cache.view(0), mask)
        last = h[torch.arange(b, device=device), (counts - 1).clamp(min=0)].to(cache.last_hidden.dtype)
        cache.last_hidden.copy_(torch.where(counts[:, None] > 0, last, cache.last_hidden))  # in place: graphs read it
        cache.append([kv], counts)

    def _chain(self, cache: Eagle3Cache, num_steps: int,
               next_token: Callable[[int, Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        """Run the draft chain from ``cache.last_hidden``; ``next_token(k, hidden [B, H]) -> [B]`` target ids.

        Returns the states [B, num_steps, H] (state k predicts draft k+1) and the tokens fed [B, num_steps-1].
        Draft keys stay local: the cache is not modified.
        """
        layer = self.layers[0]
        committed_k, committed_v = cache.view(0)
        key_mask = cache.key_mask()
        h = cache.last_hidden
        states, fed = [h], []
        draft_k, draft_v = [], []
        for k in range(1, num_steps):
            token = next_token(k - 1, h)
            fed.append(token)
            cos, sin = self.rotary_emb((cache.lengths - 1 + k)[:, None], h.dtype)
            past = (torch.cat([committed_k, *draft_k], 2), torch.cat([committed_v, *draft_v], 2))
            mask = torch.cat([key_mask, key_mask.new_ones(key_mask.shape[0], k)], dim=1)[:, None, None, :]
            out, (key, value) = layer(self.embed(token[:, None]), h[:, None], cos, sin, past, mask)
            draft_k.append(key)
            draft_v.append(value)
            h = out[:, 0]
            states.append(h)
        empty = torch.zeros(h.shape[0], 0, dtype=torch.long, device=h.device)
        return torch.stack(states, 1), torch.stack(fed, 1) if fed else empty

    def draft_states(self, cache: Eagle3Cache, tokens: Tensor) -> Tensor:
        """Teacher-forced chain: feed target ids ``tokens`` [B, K-1] as the drafts; returns pre-norm states
        [B, K, H] (state 0 = ``cache.last_hidden``; state k follows feeding ``tokens[:, k-1]``)."""
        return self._chain(cache, tokens.shape[1] + 1, lambda k, h: tokens[:, k])[0]

    def _to_target(self, draft_ids: Tensor) -> Tensor:
        hot = self.hot_ids
        return draft_ids if hot is None else hot[draft_ids]

    @torch.no_grad()
    def propose(self, cache: Eagle3Cache, anchor_ids: Tensor | None = None, sampler: DraftSampler = GREEDY,
                num_tokens: int | None = None) -> Proposal:
        """Draft ``num_tokens`` (default ttt_length) tokens per row, chain-wise from ``cache.last_hidden`` (the anchor
        entered the cache with the last :meth:`extend_context`, so ``anchor_ids`` is not read).

        Returns target-vocabulary tokens [B, K] and the probabilities they were drawn from [B, K, V] (zero outside
        the draft vocabulary; None when greedy). The cache is unchanged: after verification, call
        :meth:`extend_context` with the verified features and the committed tokens.
        """
        num_tokens = num_tokens or self.gamma
        drafted, probs = [], []

        def draw(k: int, h: Tensor) -> Tensor:
            token, p = sampler(self.compute_logits(h)[:, None], k)
            drafted.append(self._to_target(token[:, 0]))
            probs.append(p)
            return drafted[-1]

        states, _ = self._chain(cache, num_tokens, draw)
        draw(num_tokens - 1, states[:, -1])
        if sampler.greedy:
            return Proposal(torch.stack(drafted, 1), None)
        p = torch.cat(probs, 1)  # [B, K, Vd]
        if self.hot_ids is not None:
            full = p.new_zeros(*p.shape[:2], self.config.vocab_size)
            p = full.index_copy_(2, self.hot_ids, p)
        return Proposal(torch.stack(drafted, 1), p)
