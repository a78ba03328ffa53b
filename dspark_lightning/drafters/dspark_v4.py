"""DSparkV4: DSpark with DeepSeek-V4 decoder blocks as its parallel backbone (DSpark paper §5.1).

The production drafter of DeepSeek-V4 is "three MoE layers with mHC and a sliding-window attention of 128", gamma = 5,
a Markov head and a calibrated confidence head. Design choices, each matching SGLang 0.5.23's
``DeepseekV4ForCausalLMDSpark`` (``srt/models/deepseek_v4_dspark.py``), which serves these weights:

- Stages are transformers' own ``DeepseekV4DecoderLayer`` (math of ``models/deepseek_v4``): low-rank q with per-head
  norm, one shared K=V head, partial interleaved RoPE (the ``main`` rotary, theta = ``rope_theta``), learned attention
  sinks, grouped low-rank output projection; top-k routed MoE plus one shared expert; mHC residual mixing over
  ``hc_mult`` streams. Every stage attends in a sliding window (SGLang builds them with compress ratio 0) and routes
  with the learned top-k gate (hash routing is off for draft stages in SGLang).
- KV injection (paper Eq. 3): the projected target context ``C = hidden_norm(fc([H^l1; ...]))`` goes through each
  stage's own ``kv_proj``/``kv_norm``/RoPE; its K=V rows are handed to the transformers attention through the one
  hook it has for extra keys, the cache's ``update`` (:class:`_InjectedContext`), and the block layout rule becomes
  the additive ``attention_mask``. transformers' V4 attention takes both, so nothing of it is re-implemented.
- Block layout and mask rules are DFlash's (``blocks.plan_blocks``): ``[x_a, MASK...]`` at positions ``a..a+gamma-1``;
  a block sees its own slots bidirectionally and the context ``p < a`` within the window: the ``sliding_window``
  positions ``a-W .. a-1``, the same for every slot of the block (SGLang's draft window gather). Training runs each
  block as its own batch row against its gathered window, so a 512-anchor sequence costs 512 x (W + gamma) keys.
- Token embeddings are widened to ``hc_mult`` streams; the last stage's streams are collapsed by the ``hc_head`` and
  normed: ``lm_head(norm(hc_head(h)))`` are the base logits. The confidence head reads the collapsed state before
  the norm (SGLang's ``confidence_features``) and has no bias; the Markov head is DSpark's vanilla one.
- Names: ``fc``, ``hidden_norm``, ``layers.N.*`` (transformers' V4 names), ``hc_head``, ``norm``, ``markov_head``,
  ``confidence_head``; :func:`v4_to_mtp_names` maps them to the official ``mtp.<stage>.*`` layout and back.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn
from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config
from transformers.models.deepseek_v4.modeling_deepseek_v4 import (
    DeepseekV4Attention,
    DeepseekV4DecoderLayer,
    DeepseekV4Experts,
    DeepseekV4HyperConnection,
    DeepseekV4HyperHead,
    DeepseekV4RMSNorm,
    DeepseekV4RotaryEmbedding,
    DeepseekV4TopKRouter,
    apply_rotary_pos_emb,
)

from ._layers import LMHead, init_weights, project_target_features, unfilled
from .blocks import BlockDrafter, BlockDraftOutput, plan_blocks
from .config import DrafterConfig
from .dflash import ContextKVCache
from .dspark import ConfidenceHead, MarkovHead, sample_left_to_right
from .protocol import GREEDY, DraftSampler, Proposal


def stage_config(config: DrafterConfig) -> DeepseekV4Config:
    """transformers' DeepSeek-V4 config of the draft stages: the target's geometry, sliding-window attention and
    top-k routed MoE on every stage."""
    g, n = config.v4_geometry, config.num_hidden_layers
    hf = DeepseekV4Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, moe_intermediate_size=config.intermediate_size,
        num_hidden_layers=n, num_attention_heads=config.num_attention_heads, num_key_value_heads=1,
        head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta,
        partial_rotary_factor=config.partial_rotary_factor, max_position_embeddings=config.max_position_embeddings,
        hidden_act=config.hidden_act, layer_types=["sliding_attention"] * n, mlp_layer_types=["moe"] * n,
        **{k: g[k] for k in ("q_lora_rank", "o_groups", "o_lora_rank", "sliding_window", "n_routed_experts",
                             "num_experts_per_tok", "n_shared_experts", "scoring_func", "routed_scaling_factor",
                             "norm_topk_prob", "swiglu_limit", "hc_mult", "hc_sinkhorn_iters", "hc_eps")},
    )
    hf._attn_implementation = "eager"  # V4 ships eager only (learned sinks); our mask is an additive tensor
    hf._experts_implementation = "eager"  # the per-expert loop; "grouped_mm" is transformers' faster GPU kernel
    return hf


def init_v4_weights(module: nn.Module, std: float = 0.02) -> None:
    """transformers' DeepSeek-V4 ``_init_weights`` for modules built outside a ``PreTrainedModel``: Linear,
    Embedding, experts, gates and mHC projections ~ N(0, std); sinks, biases and mHC bases 0; scales and norms 1."""
    init_weights(module, std)
    for m in module.modules():
        if isinstance(m, DeepseekV4Experts):
            nn.init.normal_(m.gate_up_proj, std=std)
            nn.init.normal_(m.down_proj, std=std)
        elif isinstance(m, DeepseekV4TopKRouter):
            nn.init.normal_(m.weight, std=std)
            nn.init.zeros_(m.e_score_correction_bias)
        elif isinstance(m, DeepseekV4Attention):
            nn.init.zeros_(m.sinks)
        elif isinstance(m, DeepseekV4HyperConnection):
            nn.init.normal_(m.fn, std=std)
            nn.init.zeros_(m.base)
            nn.init.ones_(m.scale)
        elif isinstance(m, DeepseekV4HyperHead):
            nn.init.normal_(m.hc_fn, std=std)
            nn.init.zeros_(m.hc_base)
            nn.init.ones_(m.hc_scale)
        elif isinstance(m, DeepseekV4RMSNorm):
            nn.init.ones_(m.weight)


class _InjectedContext:
    """Stands in for the transformers ``Cache`` a ``DeepseekV4Attention`` is called with: its ``update`` prepends the
    block's window of context K=V rows ``[R, 1, W, dh]`` to the block's own, ``[context ; block]`` (paper Eq. 3)."""

    def __init__(self, kv: Tensor) -> None:
        self.kv = kv

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        full = torch.cat([self.kv.to(key_states.dtype), key_states], dim=2)
        return full, full


class DSparkV4(BlockDrafter):
    """DeepSeek-V4 stages + Markov head + confidence head (see module docstring); DSpark's training/inference API."""

    def __init__(self, config: DrafterConfig) -> None:
        super().__init__()
        config.validate()
        if config.algorithm != "dspark_v4":
            raise ValueError(f"DSparkV4 needs algorithm 'dspark_v4', got {config.algorithm!r}.")
        self.config = config
        self.hf_config = hf = stage_config(config)
        h, v, m = config.hidden_size, config.vocab_size, config.num_context_layers
        self.hc_mult, self.window = hf.hc_mult, hf.sliding_window
        self.embed_tokens = unfilled(nn.Embedding, v, h)  # vocabulary-sized: filled once, by init_v4_weights
        self.fc = nn.Linear(m * h, h, bias=False)
        self.hidden_norm = DeepseekV4RMSNorm(h, hf.rms_norm_eps)
        self.layers = nn.ModuleList(DeepseekV4DecoderLayer(hf, i) for i in range(config.num_hidden_layers))
        for layer in self.layers:
            # The injected context is read-only, so a checkpointed layer may keep it (else transformers drops it).
            layer._can_checkpoint_with_cache = True
        self.hc_head = DeepseekV4HyperHead(hf)
        self.norm = DeepseekV4RMSNorm(h, hf.rms_norm_eps)
        self.lm_head = unfilled(LMHead, h, v)  # no soft cap
        self.rotary_emb = DeepseekV4RotaryEmbedding(hf)
        rank = config.markov_rank
        self.markov_head = MarkovHead(v, h, rank, config.markov_head_type) if config.has_markov_head else None
        self.confidence_head = None
        if config.has_confidence_head:
            features = rank if config.has_markov_head and config.confidence_head_with_markov else 0
            self.confidence_head = ConfidenceHead(h, features)
            self.confidence_head.proj = nn.Linear(h + features, 1, bias=False)  # SGLang's V4 head has no bias
        init_v4_weights(self, hf.initializer_range)
        self.embed_tokens.weight.requires_grad_(False)
        self.lm_head.weight.requires_grad_(False)

    # ------------------------------------------------------------------ pieces
    def compute_logits(self, hidden: Tensor, markov_features: Tensor | None = None) -> Tensor:
        """``lm_head(h) + W2 u`` for final-normed ``hidden`` [..., H] (the target's last hidden too)."""
        logits = self.lm_head.logits(hidden)
        if markov_features is not None:
            logits = logits + self.markov_head.bias(markov_features).to(logits.dtype)
        return logits

    def project_context(self, target_hidden: Tensor) -> Tensor:
        """target_hidden [B, L, m*H] -> C [B, L, H] (paper Eq. 2)."""
        return self.hidden_norm(project_target_features(self.fc, target_hidden))

    def context_kv(self, context: Tensor, positions: Tensor) -> list[Tensor]:
        """Per-stage rotated context K=V [B, 1, T, dh] of C [B, T, H] at ``positions`` [B, T] (the stage's own
        ``kv_proj``/``kv_norm``, as its attention projects the block)."""
        cos, sin = self.rotary_emb(context, positions, layer_type="main")
        return [apply_rotary_pos_emb(a.kv_norm(a.kv_proj(context)).unsqueeze(1), cos, sin)
                for a in (layer.self_attn for layer in self.layers)]

    def backbone(self, block_ids: Tensor, positions: Tensor, window_kv: list[Tensor],
                 window_valid: Tensor) -> tuple[Tensor, Tensor]:
        """Blocks as batch rows: block_ids/positions [R, S], window_kv per stage [R, 1, W, dh], window_valid [R, W]
        -> (final-normed hidden, hc-collapsed hidden before the norm), each [R, S, H]."""
        r, s = block_ids.shape
        e = self.embed_tokens(block_ids).to(self.fc.weight.dtype)
        h = e.unsqueeze(2).expand(r, s, self.hc_mult, e.shape[-1]).contiguous()  # [R, S, hc, H]
        rope = {"main": self.rotary_emb(e, positions, layer_type="main")}
        visible = torch.cat([window_valid, window_valid.new_ones(r, s)], dim=1)  # [R, W + S]
        mask = torch.zeros(visible.shape, dtype=e.dtype, device=e.device)
        mask = mask.masked_fill(~visible, torch.finfo(e.dtype).min)[:, None, None, :]  # additive [R, 1, 1, W+S]
        for layer, kv in zip(self.layers, window_kv):
            h = layer(h, position_embeddings=rope, position_ids=positions, attention_mask=mask,
                      cache=_InjectedContext(kv))
        collapsed = self.hc_head(h)
        return self.norm(collapsed), collapsed

    def _heads(self, out: BlockDraftOutput, collapsed: Tensor) -> BlockDraftOutput:
        if self.markov_head is not None:
            out.markov_features = self.markov_head.features(out.prev_ids, out.hidden)
        if self.confidence_head is not None:
            out.confidence_logits = self.confidence_head(collapsed, self._prev_embed(out.prev_ids))
        return out

    def _prev_embed(self, prev_ids: Tensor) -> Tensor | None:
        if self.confidence_head.proj.in_features == self.config.hidden_size:
            return None
        return self.markov_head.markov_w1(prev_ids)

    # ------------------------------------------------------------------ training
    def forward(self, input_ids: Tensor, target_hidden: Tensor, loss_mask: Tensor, anchors: Tensor,
                anchor_valid: Tensor) -> BlockDraftOutput:
        """Teacher-forced pass over all blocks (arguments as :meth:`DFlash.forward`)."""
        cfg = self.config
        b, length = input_ids.shape
        plan = plan_blocks(input_ids, loss_mask, anchors, anchor_valid, gamma=cfg.block_size, pred_offset=0,
                           mask_token_id=cfg.mask_token_id)
        n, s = plan.block_ids.shape[1:]
        ctx_pos = torch.arange(length, device=input_ids.device).expand(b, length)
        context_kv = self.context_kv(self.project_context(target_hidden), ctx_pos)  # per stage [B, 1, L, dh]
        w = min(self.window, length)
        idx = anchors[..., None] - w + torch.arange(w, device=anchors.device)  # [B, N, W] positions a-W .. a-1
        valid = (idx >= 0).reshape(b * n, w)
        flat = idx.clamp(min=0).reshape(b, 1, n * w, 1)
        window_kv = [kv.gather(2, flat.expand(-1, -1, -1, kv.shape[-1])).reshape(b * n, 1, w, kv.shape[-1])
                     for kv in context_kv]
        hidden, collapsed = self.backbone(plan.block_ids.reshape(b * n, s), plan.positions.reshape(b * n, s),
                                          window_kv, valid)
        out = BlockDraftOutput(hidden.view(b, n, s, -1), plan.labels, plan.prev_ids, plan.target_index,
                               plan.supervise)
        return self._heads(out, collapsed.view(b, n, s, -1))

    # ------------------------------------------------------------------ inference (drafters/protocol.py)
    def new_cache(self, batch: int, *, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None, capacity: int = 256, static: bool = False) -> ContextKVCache:
        """Context K=V per stage (stored as both keys and values of a :class:`ContextKVCache`, one KV head)."""
        w = self.fc.weight
        return ContextKVCache(len(self.layers), batch, 1, self.config.head_dim, device=device or w.device,
                              dtype=dtype or w.dtype, capacity=capacity, static=static)

    @torch.no_grad()
    def extend_context(self, cache: ContextKVCache, target_hidden: Tensor, tokens_after: Tensor | None = None,
                       counts: Tensor | None = None) -> None:
        """Commit target features of newly verified tokens (as :meth:`DFlash.extend_context`)."""
        b, t, _ = target_hidden.shape
        if counts is None:
            counts = torch.full((b,), t, dtype=torch.long, device=target_hidden.device)
        positions = cache.lengths[:, None] + torch.arange(t, device=target_hidden.device)
        kv = self.context_kv(self.project_context(target_hidden), positions)
        cache.append([(k, k) for k in kv], counts)

    def draft_hidden(self, cache: ContextKVCache, anchor_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(final-normed, collapsed) states [B, gamma, H] of blocks anchored at each row's next position."""
        b, s, w = anchor_ids.shape[0], self.config.block_size, self.window
        block_ids = torch.full((b, s), self.config.mask_token_id, dtype=torch.long, device=anchor_ids.device)
        block_ids[:, 0] = anchor_ids
        steps = torch.arange(max(s, w), device=anchor_ids.device)
        positions = cache.lengths[:, None] + steps[:s]
        idx = cache.lengths[:, None] - w + steps[:w]  # the window: positions len-W .. len-1
        gather = idx.clamp(min=0)[:, None, :, None].expand(-1, 1, -1, self.config.head_dim)
        window_kv = [keys.gather(2, gather) for keys in cache.keys]
        return self.backbone(block_ids, positions, window_kv, idx >= 0)

    @torch.no_grad()
    def propose(self, cache: ContextKVCache, anchor_ids: Tensor, sampler: DraftSampler = GREEDY,
                num_tokens: int | None = None) -> Proposal:
        """Draft ``num_tokens`` (default gamma) tokens: one backbone pass, then the Markov head samples left to
        right."""
        k = num_tokens or self.gamma
        hidden, collapsed = self.draft_hidden(cache, anchor_ids)
        base = self.compute_logits(hidden[:, :k])
        return sample_left_to_right(base, hidden[:, :k], collapsed[:, :k], anchor_ids, self.markov_head,
                                    self.confidence_head, self._prev_embed, sampler)


def parameter_counts(drafter: DSparkV4) -> dict[str, int]:
    """``total`` and ``trainable`` parameters, and ``activated`` per drafted token: every weight a token's forward
    reads, i.e. routed experts scaled by ``num_experts_per_tok / n_routed_experts`` and one row of the looked-up
    tables (``embed_tokens``, ``markov_w1``); the frozen ``lm_head`` counts (every token is projected through it)."""
    g = drafter.config.v4_geometry
    params = dict(drafter.named_parameters())
    experts = sum(p.numel() for n, p in params.items() if ".mlp.experts." in n)
    lookups = [drafter.embed_tokens.weight] + ([drafter.markov_head.markov_w1.weight] if drafter.markov_head else [])
    total = sum(p.numel() for p in params.values())
    activated = (total - experts + experts * g["num_experts_per_tok"] // g["n_routed_experts"]
                 - sum(t.numel() - t.shape[1] for t in lookups))
    return {"total": total, "trainable": sum(p.numel() for p in params.values() if p.requires_grad),
            "activated": activated}


# ---------------------------------------------------------------------- official checkpoint layout
# Our names inside ``layers.<s>.`` -> names inside ``mtp.<stage_offset + s>.`` of a DeepSeek-V4 checkpoint (the
# inverse of transformers' deepseek_v4 checkpoint conversion; SGLang's _remap_dspark_weight_name reads them).
_STAGE_NAMES = {
    "self_attn.q_a_proj.weight": "attn.wq_a.weight", "self_attn.q_a_norm.weight": "attn.q_norm.weight",
    "self_attn.q_b_proj.weight": "attn.wq_b.weight", "self_attn.kv_proj.weight": "attn.wkv.weight",
    "self_attn.kv_norm.weight": "attn.kv_norm.weight", "self_attn.o_a_proj.weight": "attn.wo_a.weight",
    "self_attn.o_b_proj.weight": "attn.wo_b.weight", "self_attn.sinks": "attn.attn_sink",
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "attn_hc.fn": "hc_attn_fn", "attn_hc.base": "hc_attn_base", "attn_hc.scale": "hc_attn_scale",
    "ffn_hc.fn": "hc_ffn_fn", "ffn_hc.base": "hc_ffn_base", "ffn_hc.scale": "hc_ffn_scale",
    "mlp.gate.weight": "ffn.gate.weight", "mlp.gate.e_score_correction_bias": "ffn.gate.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn.shared_experts.w1.weight",
    "mlp.shared_experts.down_proj.weight": "ffn.shared_experts.w2.weight",
    "mlp.shared_experts.up_proj.weight": "ffn.shared_experts.w3.weight",
}
_FIRST_STAGE_NAMES = {"fc.weight": "main_proj.weight", "hidden_norm.weight": "main_norm.weight"}
# Output side and heads live on the last stage (SGLang reads the heads from any stage, hc_head/norm from the last).
_LAST_STAGE_NAMES = {
    "hc_head.hc_fn": "hc_head_fn", "hc_head.hc_base": "hc_head_base", "hc_head.hc_scale": "hc_head_scale",
    "norm.weight": "norm.weight", "markov_head.markov_w1.weight": "markov_head.embed.weight",
    "markov_head.markov_w2.weight": "markov_head.head.weight",
    "confidence_head.proj.weight": "confidence_head.proj.weight",
}
_TARGET_COPIES = ("embed_tokens.weight", "lm_head.weight")  # frozen copies of the target's embed/head: not exported
_EXPERTS = re.compile(r"ffn\.experts\.(\d+)\.(w[123])\.weight")


def v4_to_mtp_names(state_dict: dict[str, Tensor], stage_offset: int = 0) -> dict[str, Tensor]:
    """Rename a :class:`DSparkV4` state dict to the ``mtp.<stage>.*`` tensors of a DeepSeek-V4 checkpoint.

    Draft stage ``s`` becomes ``mtp.<stage_offset + s>``: ``attn.{wq_a,q_norm,wq_b,wkv,kv_norm,wo_a,wo_b,attn_sink}``,
    ``attn_norm``, ``ffn_norm``, ``hc_{attn,ffn}_{fn,base,scale}``, ``ffn.gate.{weight,bias}``,
    ``ffn.experts.<e>.w{1,2,3}.weight`` (gate, down, up: the packed ``gate_up_proj`` is split, as clones) and
    ``ffn.shared_experts.w{1,2,3}.weight``. The first stage also holds ``main_proj``/``main_norm`` (our ``fc``/
    ``hidden_norm``); the last one ``norm``, ``hc_head_{fn,base,scale}``, ``markov_head.{embed,head}.weight`` and
    ``confidence_head.proj.weight``. The frozen ``embed_tokens``/``lm_head`` copies are left out (the target's own
    ``embed``/``head`` serve). SGLang 0.5.23 maps ``mtp.<i>`` to draft stage ``i``, so a checkpoint it serves needs
    ``stage_offset=0`` and no other ``mtp.*`` tensors (the target's MTP module must go).

    Raises:
        ValueError: a name that is not a DSparkV4 parameter or buffer.
    """
    out: dict[str, Tensor] = {}
    stages = {int(k.split(".")[1]) for k in state_dict if k.startswith("layers.")}
    last = stage_offset + max(stages, default=0)
    for name, tensor in state_dict.items():
        if name in _TARGET_COPIES:
            continue
        if name in _FIRST_STAGE_NAMES:
            out[f"mtp.{stage_offset}.{_FIRST_STAGE_NAMES[name]}"] = tensor
            continue
        if name in _LAST_STAGE_NAMES:
            out[f"mtp.{last}.{_LAST_STAGE_NAMES[name]}"] = tensor
            continue
        found = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        if found is None:
            raise ValueError(f"{name!r} is not a DSparkV4 tensor; give DSparkV4.state_dict().")
        prefix, rest = f"mtp.{stage_offset + int(found[1])}.", found[2]
        if rest == "mlp.experts.gate_up_proj":  # [E, 2I, H] = per expert [w1 (gate); w3 (up)]
            for e, (gate, up) in enumerate(t.chunk(2, dim=0) for t in tensor):
                out[f"{prefix}ffn.experts.{e}.w1.weight"] = gate.clone()
                out[f"{prefix}ffn.experts.{e}.w3.weight"] = up.clone()
        elif rest == "mlp.experts.down_proj":  # [E, H, I]
            for e, down in enumerate(tensor):
                out[f"{prefix}ffn.experts.{e}.w2.weight"] = down.clone()
        elif rest in _STAGE_NAMES:
            out[prefix + _STAGE_NAMES[rest]] = tensor
        else:
            raise ValueError(f"{name!r} is not a DSparkV4 tensor; give DSparkV4.state_dict().")
    return out


def mtp_to_v4_names(tensors: dict[str, Tensor], stage_offset: int = 0) -> dict[str, Tensor]:
    """Inverse of :func:`v4_to_mtp_names`: read the draft out of a checkpoint's tensors into DSparkV4 names.

    Tensors outside ``mtp.<i>`` with ``i >= stage_offset`` are ignored (the target's own). The result lacks the
    frozen ``embed_tokens``/``lm_head`` copies: load it with ``strict=False`` and copy them from the target.

    Raises:
        ValueError: an unknown ``mtp.*`` name, or a stage whose experts are incomplete.
    """
    inverse = {v: k for k, v in _STAGE_NAMES.items()}
    heads = {v: k for k, v in {**_FIRST_STAGE_NAMES, **_LAST_STAGE_NAMES}.items()}
    out: dict[str, Tensor] = {}
    experts: dict[int, dict[str, dict[int, Tensor]]] = {}
    for name, tensor in tensors.items():
        found = re.fullmatch(r"mtp\.(\d+)\.(.+)", name)
        if found is None or int(found[1]) < stage_offset:
            continue
        s, rest = int(found[1]) - stage_offset, found[2]
        if rest in heads:
            out[heads[rest]] = tensor
        elif rest in inverse:
            out[f"layers.{s}.{inverse[rest]}"] = tensor
        elif (expert := _EXPERTS.fullmatch(rest)) is not None:
            experts.setdefault(s, {}).setdefault(expert[2], {})[int(expert[1])] = tensor
        else:
            raise ValueError(f"{name!r} is not a DSpark V4 draft tensor (stage_offset={stage_offset}).")
    for s, parts in sorted(experts.items()):
        count = len(parts.get("w1", {}))
        if any(sorted(parts.get(w, {})) != list(range(count)) for w in ("w1", "w2", "w3")):
            raise ValueError(f"mtp.{s + stage_offset}.ffn.experts: w1/w2/w3 must cover experts 0..{count - 1}.")
        out[f"layers.{s}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([parts["w1"][e], parts["w3"][e]]) for e in range(count)])
        out[f"layers.{s}.mlp.experts.down_proj"] = torch.stack([parts["w2"][e] for e in range(count)])
    return out


def v4_config_keys(config: DrafterConfig) -> dict[str, Any]:
    """Keys to add to the target's ``config.json`` so SGLang serves the attached draft (as
    ``DeepseekV4ForCausalLMDSpark``).

    SGLang detects a bundled draft by ``dspark_block_size``/``dspark_markov_rank``/``dspark_noise_token_id``/
    ``dspark_target_layer_ids`` and builds one stage per target layer id; the MoE of the stages is the target's unless
    ``dspark_n_routed_experts``/``dspark_num_experts_per_tok`` say otherwise (always written, to be explicit). The
    confidence head keys are read unprefixed.

    Raises:
        ValueError: a drafter SGLang cannot serve (no Markov head, or a target layer id < 0).
    """
    if config.algorithm != "dspark_v4" or not config.has_markov_head:
        raise ValueError(f"SGLang's DeepSeek-V4 DSpark draft needs algorithm 'dspark_v4' with a Markov head; got "
                         f"algorithm={config.algorithm!r}, markov_rank={config.markov_rank}.")
    if min(config.target_layer_ids) < 0:
        raise ValueError(f"target_layer_ids={config.target_layer_ids}: SGLang captures decoder-layer outputs only "
                         f"(ids >= 0), not the embedding output (-1).")
    return {
        "dspark_block_size": config.block_size,
        "dspark_markov_rank": config.markov_rank,
        "dspark_markov_head_type": config.markov_head_type,
        "dspark_noise_token_id": config.mask_token_id,
        "dspark_target_layer_ids": list(config.target_layer_ids),
        "dspark_n_routed_experts": config.v4_geometry["n_routed_experts"],
        "dspark_num_experts_per_tok": config.v4_geometry["num_experts_per_tok"],
        "enable_confidence_head": config.has_confidence_head,
        "confidence_head_with_markov": config.has_confidence_head and config.confidence_head_with_markov,
    }
