"""Training blocks of a parallel drafter: anchor sampling, block inputs, positions, labels and the mask.

Layout (DeepSpec, paper §3.1): per anchor ``a`` the block input is ``[x_a, MASK, ..., MASK]``; prediction
``k`` (0-based, gamma of them) targets ``x_{a+1+k}``. In the ``deepspec`` layout the block has gamma slots and
the anchor slot predicts; in the ``zlab`` layout it has gamma+1 slots and only the mask slots predict.
A block query sees context positions ``p < a`` (the anchor has not been through the target yet at
inference) and every slot of its own block (bidirectional).

:class:`BlockDrafter` holds what the block drafters (DFlash, DSpark, DSparkV4) share of the drafter protocol
(``protocol.py``): gamma, the training forward over a batch, the target's embedding copy and the head of the fused loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._layers import copy_target_embeddings
from .config import DrafterConfig
from .protocol import LogitsHead


def sample_anchors(
    loss_mask: Tensor, num_anchors: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Draw up to ``num_anchors`` anchors per row where ``loss_mask[a]`` and ``loss_mask[a+1]`` hold.

    Args:
        loss_mask: [B, L] bool.
        num_anchors: anchors per row; rows with fewer candidates are padded with invalid anchors at 0.
        generator: RNG for reproducible draws (data workers pass their own).

    Returns:
        anchors [B, N] int64 sorted ascending within the valid prefix, valid [B, N] bool.
    """
    mask = loss_mask.bool()
    b, length = mask.shape
    cand = torch.zeros_like(mask)
    cand[:, :-1] = mask[:, :-1] & mask[:, 1:]
    scores = torch.rand((b, length), generator=generator, device=mask.device)
    scores = scores.masked_fill(~cand, 2.0)  # invalid candidates sort last
    n = min(num_anchors, length)
    picked_scores, picked = scores.topk(n, dim=1, largest=False)
    valid = picked_scores < 2.0
    # Sort the valid anchors ascending, invalid ones (set to a large key) after them.
    key = torch.where(valid, picked, torch.full_like(picked, length + 1))
    order = key.argsort(dim=1)
    anchors = picked.gather(1, order)
    valid = valid.gather(1, order)
    anchors = torch.where(valid, anchors, torch.zeros_like(anchors))
    if n < num_anchors:
        pad = num_anchors - n
        anchors = torch.cat([anchors, anchors.new_zeros(b, pad)], dim=1)
        valid = torch.cat([valid, valid.new_zeros(b, pad)], dim=1)
    return anchors, valid


@dataclass
class BlockDraftOutput:
    """Training forward of a block drafter. ``N`` anchors, ``K`` = gamma predictions per block.

    Logits are not materialised here (a [B*N*K, V] fp32 tensor is 2 GB at V=150k): the loss builds them
    chunk by chunk with the drafter's ``compute_logits``.
    """

    hidden: Tensor  # [B, N, K, H] final-normed backbone states of the prediction slots
    labels: Tensor  # [B, N, K] tokens to predict
    prev_ids: Tensor  # [B, N, K] teacher-forced previous tokens (anchor first)
    target_index: Tensor  # [B, N, K] positions whose target last hidden gives p_t
    supervise: Tensor  # [B, N, K] bool
    markov_features: Tensor | None = None  # [B, N, K, r] low-rank Markov features (DSpark)
    confidence_logits: Tensor | None = None  # [B, N, K] fp32 (DSpark)


class BlockDrafter(nn.Module):
    """The protocol members every block drafter has alike. A subclass provides ``config``, ``embed_tokens``,
    ``lm_head`` (an ``LMHead``), optionally ``markov_head``, and ``forward(input_ids, target_hidden, loss_mask,
    anchors, anchor_valid) -> BlockDraftOutput``."""

    config: DrafterConfig
    holds_target_head = True  # the frozen lm_head is a copy of the target's, so p_t comes from the drafter

    @property
    def gamma(self) -> int:
        return self.config.block_size

    @property
    def max_draft_tokens(self) -> int:
        """One block pass drafts its ``block_size`` tokens and no more."""
        return self.config.block_size

    @classmethod
    def training_anchors(cls, config: DrafterConfig) -> int:
        return config.num_anchors

    def training_forward(self, batch: Mapping[str, Tensor], target_hidden: Tensor) -> BlockDraftOutput:
        """The training pass over ``batch``'s blocks: its ``anchors``/``anchor_valid`` when it has them (the cache
        DataModule draws them in its workers), else ``num_anchors`` drawn here (:func:`sample_anchors`)."""
        anchors, valid = batch.get("anchors"), batch.get("anchor_valid")
        if anchors is None:
            anchors, valid = sample_anchors(batch["loss_mask"], self.config.num_anchors)
        return self(batch["input_ids"], target_hidden, batch["loss_mask"], anchors, valid)

    def load_target_embeddings(self, embed_weight: Tensor, lm_head_weight: Tensor) -> None:
        """Copy the target's embedding and lm_head [V, H] into the frozen ``embed_tokens`` / ``lm_head``."""
        copy_target_embeddings(self, embed_weight, lm_head_weight)

    def logits_head(self) -> LogitsHead:
        """The tensors behind ``compute_logits``, for the fused loss."""
        markov_head = getattr(self, "markov_head", None)
        # detach: the head is frozen by design, but under FSDP (use_orig_params) its weight is a view of a flat
        # parameter that requires grad
        return LogitsHead(self.lm_head.weight.detach(),
                          markov_head.markov_w2.weight if markov_head is not None else None, self.lm_head.softcap)


@dataclass
class BlockPlan:
    """Everything the backbone and the losses need about the training blocks of a batch.

    Shapes: ``N`` anchors, ``S`` = block length (gamma or gamma+1), ``K`` = gamma predictions.
    """

    block_ids: Tensor  # [B, N, S] block input tokens (anchor then masks)
    positions: Tensor  # [B, N, S] rotary positions a, a+1, ...
    labels: Tensor  # [B, N, K] token predicted by each prediction slot
    prev_ids: Tensor  # [B, N, K] teacher-forced previous token of each prediction (x_a, x_{a+1}, ...)
    target_index: Tensor  # [B, N, K] sequence position whose target state gives p_t for the prediction
    supervise: Tensor  # [B, N, K] bool, contiguous prefix of supervised predictions
    mask: Tensor | None  # [B, 1, N*S, L + N*S] bool attention mask (True = attend)


def plan_blocks(
    input_ids: Tensor,
    loss_mask: Tensor,
    anchors: Tensor,
    valid: Tensor,
    *,
    gamma: int,
    pred_offset: int,
    mask_token_id: int,
    dense_mask: bool = True,
) -> BlockPlan:
    """Lay out the blocks for ``anchors`` [B, N] (see the module docstring). ``dense_mask=False`` leaves
    ``mask`` None for callers that build the sparse :func:`flex_block_mask` instead."""
    b, length = input_ids.shape
    n = anchors.shape[1]
    s = gamma + pred_offset
    slot = torch.arange(s, device=anchors.device)
    k = torch.arange(gamma, device=anchors.device)
    anchor_tok = input_ids.gather(1, anchors)  # [B, N]
    block_ids = torch.full((b, n, s), mask_token_id, dtype=input_ids.dtype, device=input_ids.device)
    block_ids[:, :, 0] = anchor_tok
    positions = anchors[..., None] + slot  # [B, N, S]

    label_pos = anchors[..., None] + 1 + k  # [B, N, K]
    in_range = label_pos < length
    safe = label_pos.clamp(max=length - 1)
    flat = lambda t: t.reshape(b, -1)
    labels = input_ids.gather(1, flat(safe)).view(b, n, gamma)
    label_in_loss = loss_mask.bool().gather(1, flat(safe)).view(b, n, gamma)
    supervise = (in_range & label_in_loss & valid[..., None]).long().cumprod(-1).bool()
    prev_pos = (anchors[..., None] + k).clamp(max=length - 1)
    prev_ids = input_ids.gather(1, flat(prev_pos)).view(b, n, gamma)
    target_index = prev_pos  # p_t for x_{a+1+k} is the target's output at position a+k

    if not dense_mask:
        return BlockPlan(block_ids, positions, labels, prev_ids, target_index, supervise, None)
    # Mask: query of block i sees context p < a_i and its own block.
    ctx_visible = torch.arange(length, device=anchors.device) < anchors[..., None]  # [B, N, L]
    ctx_visible = ctx_visible[:, :, None, :].expand(b, n, s, length).reshape(b, n * s, length)
    blk = torch.arange(n, device=anchors.device).repeat_interleave(s)
    same_block = (blk[:, None] == blk[None, :]).expand(b, n * s, n * s)
    mask = torch.cat([ctx_visible, same_block], dim=-1)[:, None]
    return BlockPlan(block_ids, positions, labels, prev_ids, target_index, supervise, mask)


def flex_block_mask(anchors: Tensor, context_len: int, block_len: int, *, compile_mask: bool = False):
    """The mask of :func:`plan_blocks` as a flex-attention ``BlockMask`` (sparse: only the 128x128 tiles that
    attend anything are computed, about a quarter of the dense [N*S, L + N*S] work at 512 anchors).

    Key ``kv < L`` is context, visible to the queries of block ``i`` when ``kv < anchors[b, i]``; key
    ``kv >= L`` is slot ``kv - L`` of the blocks, visible inside the query's own block. Built once per batch
    and shared by every layer.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    b, n = anchors.shape
    q_len = n * block_len

    def visible(batch, head, q_idx, kv_idx):
        block = q_idx // block_len
        in_context = kv_idx < context_len
        sees_context = kv_idx < anchors[batch, block]
        same_block = (kv_idx - context_len) // block_len == block
        return (in_context & sees_context) | (~in_context & same_block)

    return create_block_mask(visible, b, None, q_len, context_len + q_len, device=anchors.device,
                             _compile=compile_mask)
