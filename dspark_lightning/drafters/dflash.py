"""DFlash: a parallel block drafter conditioned on injected target hidden states.

Design (DSpark paper §3.1, DeepSpec ``modeling/dspark``, z-lab DFlash):
- Context: raw outputs of the target layers ``target_layer_ids`` concatenated per token ([L, m*H]),
  projected once, ``C = hidden_norm(fc(.))`` (paper Eq. 2).
- Every draft layer attends from the block queries to ``[k_proj(C) ; k_proj(block)]`` with shared
  projections (paper Eq. 3); context K/V never depend on earlier draft layers, so at inference they are
  cached once per committed token (:class:`ContextKVCache`).
- A block is ``[x_a, MASK...]``; the query of block ``a`` sees context ``p < a`` and its own block
  bidirectionally (``blocks.plan_blocks``). One backbone pass proposes all gamma tokens, sampled
  independently (no sequential head: that is DSpark's addition).
- ``embed_tokens`` and ``lm_head`` are frozen copies of the target's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._layers import (
    DecoderLayer,
    LMHead,
    RMSNorm,
    RotaryEmbedding,
    init_weights,
    project_target_features,
    scale_embedding,
    unfilled,
    use_flex,
)
from .blocks import BlockDrafter, BlockDraftOutput, flex_block_mask, plan_blocks
from .config import DrafterConfig
from .protocol import GREEDY, DraftSampler, Proposal


class ContextKVCache:
    """Per-layer context keys/values of a batch of requests with uneven lengths (right-padded).

    ``static`` (set by the engine's fixed-shape mode): views and masks always span the whole capacity, the buffers
    never grow, ``lengths`` is updated in place and appends read nothing back, so a draft pass has the same shapes
    and addresses every round (what a captured CUDA graph replays) and no step of a round waits for the host.
    """

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, *,
                 device: torch.device | str, dtype: torch.dtype, capacity: int = 256, static: bool = False) -> None:
        shape = (batch, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.static = static

    def select_rows(self, index: Tensor) -> None:
        """Keep rows ``index`` (in that order)."""
        self.keys = [k[index] for k in self.keys]
        self.values = [v[index] for v in self.values]
        self.lengths = self.lengths[index]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def append(self, layer_kv: list[tuple[Tensor, Tensor]], counts: Tensor) -> None:
        """Write the first ``counts[b]`` of T new entries ([B, kv, T, dh] per layer) after row b's length."""
        t = layer_kv[0][0].shape[2]
        if self.static:
            # No host sync: all T entries go in after each row's length; only counts[b] of them count, and the
            # next append overwrites the rest before anything reads them. The owner sizes the capacity for
            # the longest row + T (the engine does).
            dest = self.lengths[:, None] + torch.arange(t, device=counts.device)  # [B, T]
            for cache_k, cache_v, (k, v) in zip(self.keys, self.values, layer_kv):
                idx = dest[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
                cache_k.scatter_(2, idx, k.to(cache_k.dtype))
                cache_v.scatter_(2, idx, v.to(cache_v.dtype))
            self.lengths.add_(counts)
            return
        need = int((self.lengths + counts).max())
        if need > self.capacity:
            grow = max(need, 2 * self.capacity) - self.capacity
            pad = lambda x: torch.cat([x, x.new_zeros(*x.shape[:2], grow, x.shape[3])], dim=2)
            self.keys = [pad(k) for k in self.keys]
            self.values = [pad(v) for v in self.values]
        j = torch.arange(t, device=counts.device)
        rows, src = (j[None, :] < counts[:, None]).nonzero(as_tuple=True)  # one host sync for the batch
        dest = self.lengths[rows] + src
        for cache_k, cache_v, (k, v) in zip(self.keys, self.values, layer_kv):
            cache_k[rows, :, dest] = k[rows, :, src].to(cache_k.dtype)  # autocast may hand bf16
            cache_v[rows, :, dest] = v[rows, :, src].to(cache_v.dtype)
        self.lengths = self.lengths + counts

    def _width(self) -> int:
        if self.static:
            return self.capacity
        return int(self.lengths.max()) if self.lengths.numel() else 0

    def view(self, layer: int) -> tuple[Tensor, Tensor]:
        n = self._width()
        return self.keys[layer][:, :, :n], self.values[layer][:, :, :n]

    def key_mask(self) -> Tensor:
        """[B, max_len] bool (static: [B, capacity]), True for filled entries."""
        return torch.arange(self._width(), device=self.lengths.device) < self.lengths[:, None]


class DFlash(BlockDrafter):
    """Parallel block drafter (see module docstring). Parameter names follow DeepSpec/SGLang."""

    #: Training attention: ``sdpa`` with the dense block mask, ``flex`` with the sparse one
    #: (:func:`blocks.flex_block_mask`), ``auto`` = flex on CUDA, sdpa elsewhere. Inference always uses sdpa.
    attn_implementation: str = "auto"

    def __init__(self, config: DrafterConfig) -> None:
        super().__init__()
        config.validate()
        if config.algorithm == "eagle3":
            raise ValueError("DFlash needs algorithm 'dflash' or 'dspark', got 'eagle3'; use Eagle3 instead.")
        self.config = config
        h, v, m = config.hidden_size, config.vocab_size, config.num_context_layers
        self.embed_tokens = unfilled(nn.Embedding, v, h)  # vocabulary-sized: filled once, by init_weights
        self.fc = nn.Linear(m * h, h, bias=False)
        self.hidden_norm = RMSNorm(h, config.rms_norm_eps)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(h, config.rms_norm_eps)
        self.lm_head = unfilled(LMHead, h, v, softcap=config.final_logit_softcapping)
        self.rotary_emb = RotaryEmbedding.from_config(config)
        init_weights(self)
        self.embed_tokens.weight.requires_grad_(False)
        self.lm_head.weight.requires_grad_(False)

    # ------------------------------------------------------------------ pieces
    def embed(self, ids: Tensor) -> Tensor:
        e = self.embed_tokens(ids)
        return scale_embedding(e, self.config.embed_scale)

    def compute_logits(self, hidden: Tensor, markov_features: Tensor | None = None) -> Tensor:
        """Base logits ``lm_head(h)`` (+ Gemma soft cap); any leading shape. DFlash has no Markov head, so
        ``markov_features`` must be None (the argument keeps one signature across block drafters)."""
        if markov_features is not None:
            raise ValueError("DFlash has no Markov head; markov_features must be None.")
        return self.lm_head.logits(hidden)

    def project_context(self, target_hidden: Tensor) -> Tensor:
        """target_hidden [B, L, m*H] -> C [B, L, H] (paper Eq. 2)."""
        return self.hidden_norm(project_target_features(self.fc, target_hidden))

    def context_kv(self, context: Tensor, positions: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per-layer rotated context K/V [B, kv, L, dh] for C [B, L, H] at ``positions`` [B, L]."""
        cos, sin = self.rotary_emb(positions, context.dtype)
        return [layer.self_attn.project_kv(context, cos, sin) for layer in self.layers]

    def backbone(self, block_ids: Tensor, positions: Tensor, ctx_kv: list[tuple[Tensor, Tensor]],
                 mask: Tensor | None) -> Tensor:
        """block_ids/positions [B, Q] -> final-normed hidden [B, Q, H]."""
        h = self.embed(block_ids).to(self.fc.weight.dtype)
        cos, sin = self.rotary_emb(positions, h.dtype)
        for layer, kv in zip(self.layers, ctx_kv):
            h = layer(h, cos, sin, kv, mask)
        return self.norm(h)

    # ------------------------------------------------------------------ training
    def forward(self, input_ids: Tensor, target_hidden: Tensor, loss_mask: Tensor, anchors: Tensor,
                anchor_valid: Tensor) -> BlockDraftOutput:
        """Teacher-forced training pass over all blocks of a batch.

        Args:
            input_ids: [B, L] int64 tokens.
            target_hidden: [B, L, m*H] concatenated raw target layer outputs.
            loss_mask: [B, L] bool, True on trainable (assistant) tokens.
            anchors, anchor_valid: [B, N] from :func:`blocks.sample_anchors` (:meth:`training_forward` reads them
                from a batch or draws them).
        """
        cfg = self.config
        b, length = input_ids.shape
        flex = use_flex(self.attn_implementation, input_ids.device, cfg.attention_head_dim)
        plan = plan_blocks(input_ids, loss_mask, anchors, anchor_valid, gamma=cfg.block_size,
                           pred_offset=cfg.pred_offset, mask_token_id=cfg.mask_token_id, dense_mask=not flex)
        mask = flex_block_mask(anchors, length, cfg.block_len, compile_mask=input_ids.is_cuda) if flex else plan.mask
        context = self.project_context(target_hidden)
        ctx_pos = torch.arange(length, device=input_ids.device).expand(b, length)
        n, s = plan.block_ids.shape[1:]
        hidden = self.backbone(plan.block_ids.view(b, n * s), plan.positions.view(b, n * s),
                               self.context_kv(context, ctx_pos), mask)
        hidden = hidden.view(b, n, s, -1)[:, :, cfg.pred_offset:]  # [B, N, K, H]
        return BlockDraftOutput(hidden, plan.labels, plan.prev_ids, plan.target_index, plan.supervise)

    # ------------------------------------------------------------------ inference (drafters/protocol.py)
    def new_cache(self, batch: int, *, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None, capacity: int = 256, static: bool = False) -> ContextKVCache:
        w = self.fc.weight
        return ContextKVCache(len(self.layers), batch, self.config.attention_num_kv_heads,
                              self.config.attention_head_dim,
                              device=device or w.device, dtype=dtype or w.dtype, capacity=capacity, static=static)

    @torch.no_grad()
    def extend_context(self, cache: ContextKVCache, target_hidden: Tensor, tokens_after: Tensor | None = None,
                       counts: Tensor | None = None) -> None:
        """Commit target features of newly verified tokens: target_hidden [B, T, m*H], ``counts[b]`` of them
        valid for row b (default all). Positions continue each row's cache length. ``tokens_after`` is not read
        (the context is the target's features alone)."""
        b, t, _ = target_hidden.shape
        if counts is None:
            counts = torch.full((b,), t, dtype=torch.long, device=target_hidden.device)
        positions = cache.lengths[:, None] + torch.arange(t, device=target_hidden.device)
        cache.append(self.context_kv(self.project_context(target_hidden), positions), counts)

    def draft_hidden(self, cache: ContextKVCache, anchor_ids: Tensor) -> Tensor:
        """Backbone states of the prediction slots for anchors at each row's next position: [B, K, H].

        The anchor is the last committed token (bonus/correction); its position equals the cache length
        because the target has not processed it yet.
        """
        cfg = self.config
        b = anchor_ids.shape[0]
        s = cfg.block_len
        block_ids = torch.full((b, s), cfg.mask_token_id, dtype=torch.long, device=anchor_ids.device)
        block_ids[:, 0] = anchor_ids
        positions = cache.lengths[:, None] + torch.arange(s, device=anchor_ids.device)
        key_mask = cache.key_mask()
        mask = torch.cat([key_mask, key_mask.new_ones(b, s)], dim=1)[:, None, None, :]
        ctx_kv = [cache.view(i) for i in range(len(self.layers))]
        return self.backbone(block_ids, positions, ctx_kv, mask)[:, cfg.pred_offset:]

    @torch.no_grad()
    def propose(self, cache: ContextKVCache, anchor_ids: Tensor, sampler: DraftSampler = GREEDY,
                num_tokens: int | None = None) -> Proposal:
        """Draft ``num_tokens`` (default gamma) tokens per row, each drawn independently from its own logits."""
        k = num_tokens or self.gamma
        logits = self.compute_logits(self.draft_hidden(cache, anchor_ids)[:, :k])
        tokens, probs = sampler(logits, 0)
        return Proposal(tokens, probs)
