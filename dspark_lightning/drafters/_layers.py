"""Building blocks shared by the drafters: RMSNorm, rotary embedding, SwiGLU MLP, and a decoder layer whose
attention takes *extra* keys/values (the KV injection of DFlash/DSpark, paper Eq. 3) and an explicit mask.

Parameter names are HF/Qwen3's (``self_attn.{q,k,v,o}_proj``, ``q_norm``, ``k_norm``, ``mlp.{gate,up,down}_proj``,
``input_layernorm``, ``post_attention_layernorm``) so checkpoints load in DeepSpec and SGLang without renaming.

The target family is configuration (DrafterConfig): a Gemma4 target turns on the pieces of DeepSpec's Gemma4
drafter (``deepspec/modeling/dspark/gemma4/modeling.py``) in the same modules: sandwich norms
(``pre_feedforward_layernorm``, ``post_feedforward_layernorm``), a ``layer_scalar`` buffer, K = V attention without
``v_proj``, a scale-free ``v_norm``, softmax scale 1.0, the full-attention head geometry and proportional (partial)
RoPE.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask

from .config import DrafterConfig

_compiled_flex = None


def flex_attention(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    """Flex attention, compiled once per process on CUDA (its fused kernel); eager elsewhere (the unfused
    reference, for CPU tests)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention as flex

    if q.device.type != "cuda":
        return flex(q, k, v, **kwargs)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex)
    return _compiled_flex(q, k, v, **kwargs)


def use_flex(choice: str, device: torch.device, head_dim: int) -> bool:
    """Whether training attention runs flex (a sparse ``BlockMask``) rather than SDPA with a dense mask:
    ``choice`` is a drafter's ``attn_implementation`` (``auto`` = flex on CUDA, sdpa elsewhere)."""
    if choice not in ("auto", "sdpa", "flex"):
        raise ValueError(f"attn_implementation={choice!r} unknown; choose 'auto', 'sdpa' or 'flex'.")
    if choice == "flex" and device.type == "cpu" and torch.is_grad_enabled():
        raise ValueError("attn_implementation='flex' has no backward on CPU (a PyTorch limit); train with "
                         "'sdpa' or 'auto' there, or run under torch.no_grad().")
    # The compiled flex kernel needs head_dim >= 16 (a PyTorch limit); auto keeps tiny test drafters on sdpa.
    return choice == "flex" or (choice == "auto" and device.type == "cuda" and head_dim >= 16)


class RMSNorm(nn.Module):
    """Root-mean-square norm, ``weight * x / rms(x)``; half-precision inputs are normalised in fp32 as HF
    Llama/Qwen3 do (fp64 stays fp64, so golden tests can compare at 1e-10). ``with_scale=False`` has no weight
    (Gemma4's ``v_norm``), hence no state-dict entry."""

    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        if dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x.to(dtype) if self.weight is None else self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """RoPE ``cos``/``sin`` tables for arbitrary integer positions.

    ``default``: every frequency pair of the head rotates. ``proportional`` (Gemma4 full attention): only the
    first ``int(partial_rotary_factor * head_dim / 2)`` pairs rotate, with the frequencies of the *full* head
    dim; the other pairs get frequency 0 (cos 1, sin 0), i.e. pass through unrotated.
    """

    def __init__(self, head_dim: int, theta: float, rope_type: str = "default",
                 partial_rotary_factor: float = 1.0) -> None:
        super().__init__()
        if rope_type == "default":
            inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        elif rope_type == "proportional":
            rotated = int(partial_rotary_factor * head_dim // 2)
            inv_freq = 1.0 / (theta ** (torch.arange(0, 2 * rotated, 2, dtype=torch.float32) / head_dim))
            inv_freq = torch.cat([inv_freq, torch.zeros(head_dim // 2 - rotated)])
        else:
            raise ValueError(f"rope_type={rope_type!r} is not implemented; choose 'default' or 'proportional'.")
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @classmethod
    def from_config(cls, config: DrafterConfig) -> RotaryEmbedding:
        """The draft layers' RoPE: head dim of the draft attention, the target's (full-attention) parameters."""
        factor = 1.0 if config.partial_rotary_factor is None else config.partial_rotary_factor
        return cls(config.attention_head_dim, config.rope_theta, config.rope_type or "default", factor)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions [B, T] int -> cos, sin [B, T, head_dim]."""
        freqs = positions.float()[..., None] * self.inv_freq  # [B, T, dh/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, heads, T, dh]; cos/sin [B, T, dh]."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


_ACTS = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class MLP(nn.Module):
    """Gated MLP: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, intermediate: int, act: str) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act = _ACTS[act]

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class KVInjectionAttention(nn.Module):
    """Multi-head (GQA) attention of block queries over ``[injected context K/V ; block K/V]``.

    The context K/V come from the *same* ``k_proj``/``v_proj`` applied to the projected target features
    (paper Eq. 3); they depend only on the context, never on earlier draft layers, which is what makes an
    inference-time context KV cache exact. ``in_features`` lets Eagle3 feed ``[embed ; hidden]`` (2H).
    Gemma4 (``attention_k_eq_v``): no ``v_proj``, V is the key projection taken before ``k_norm``; ``v_norm``
    then normalises V without a scale.
    """

    def __init__(self, config: DrafterConfig, in_features: int | None = None) -> None:
        super().__init__()
        h, dh = config.hidden_size, config.attention_head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.attention_num_kv_heads, dh
        self.scale = config.attention_scale  # None = SDPA's default, head_dim ** -0.5
        inp = in_features or h
        bias = bool(config.attention_bias)
        self.q_proj = nn.Linear(inp, self.num_heads * dh, bias=bias)
        self.k_proj = nn.Linear(inp, self.num_kv_heads * dh, bias=bias)
        self.v_proj = None if config.attention_k_eq_v else nn.Linear(inp, self.num_kv_heads * dh, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * dh, h, bias=bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(dh, config.rms_norm_eps)
            self.k_norm = RMSNorm(dh, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.v_norm = RMSNorm(dh, config.rms_norm_eps, with_scale=False) if config.v_norm else None

    def project_kv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, T, in] -> rotated k, v [B, kv_heads, T, dh]."""
        b, t, _ = x.shape
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = k if self.v_proj is None else self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        if self.k_norm is not None:
            k = self.k_norm(k)
        if self.v_norm is not None:
            v = self.v_norm(v)
        return apply_rotary(k.transpose(1, 2), cos, sin), v.transpose(1, 2)

    def project_q(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        return apply_rotary(q.transpose(1, 2), cos, sin)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | BlockMask | None) -> Tensor:
        """q [B, heads, Q, dh], k/v [B, kv, K, dh], mask [B or 1, 1, Q, K] bool or a flex ``BlockMask``
        -> o_proj output [B, Q, H]."""
        gqa = self.num_heads != self.num_kv_heads
        if isinstance(mask, BlockMask):
            out = flex_attention(q, k.to(q.dtype), v.to(q.dtype), block_mask=mask, scale=self.scale, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=gqa)
        b, _, t, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        extra_kv: tuple[Tensor, Tensor] | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """x [B, Q, in]; extra_kv: keys/values prepended to the block's own [B, kv, Lc, dh];
        mask [B or 1, 1, Q, Lc + Q] bool (True = attend) or None (attend to everything)."""
        q = self.project_q(x, cos, sin)
        k, v = self.project_kv(x, cos, sin)
        if extra_kv is not None:
            k = torch.cat([extra_kv[0], k], dim=2)
            v = torch.cat([extra_kv[1], v], dim=2)
        return self.attend(q, k, v, mask)


class DecoderLayer(nn.Module):
    """Residual block. ``pre`` norms (Qwen3/Llama): ``h += attn(norm(h)); h += mlp(norm(h))``. ``sandwich``
    norms (Gemma4): ``h += post_attention_layernorm(attn(input_layernorm(h)))``, then
    ``h += post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))``; with ``layer_scalar`` the result is
    multiplied by a persistent ones(1) buffer, as DeepSpec's Gemma4 layers save it."""

    def __init__(self, config: DrafterConfig, attn_in_features: int | None = None) -> None:
        super().__init__()
        h = config.hidden_size
        self.sandwich = (config.norm_style or "pre") == "sandwich"
        self.input_layernorm = RMSNorm(h, config.rms_norm_eps)
        self.self_attn = KVInjectionAttention(config, attn_in_features)
        self.post_attention_layernorm = RMSNorm(h, config.rms_norm_eps)
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(h, config.rms_norm_eps)
            self.post_feedforward_layernorm = RMSNorm(h, config.rms_norm_eps)
        self.mlp = MLP(h, config.intermediate_size, config.hidden_act)
        if config.layer_scalar:
            self.register_buffer("layer_scalar", torch.ones(1))
        else:
            self.layer_scalar = None

    def residual(self, h: Tensor, attn_out: Tensor) -> Tensor:
        """Everything after the attention: add its output ``attn_out`` to the stream ``h``, then the MLP."""
        if self.sandwich:
            h = h + self.post_attention_layernorm(attn_out)
            h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        else:
            h = h + attn_out
            h = h + self.mlp(self.post_attention_layernorm(h))
        return h if self.layer_scalar is None else h * self.layer_scalar.to(h.dtype)

    def forward(
        self,
        h: Tensor,
        cos: Tensor,
        sin: Tensor,
        extra_kv: tuple[Tensor, Tensor] | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        return self.residual(h, self.self_attn(self.input_layernorm(h), cos, sin, extra_kv, mask))


def unfilled(cls: type[nn.Module], *args: Any, **kwargs: Any) -> nn.Module:
    """``cls(*args, **kwargs)`` with its parameters allocated but not initialised, on the current default
    device: for the vocabulary-sized matrices a drafter fills right after with :func:`init_weights`, so that
    they are filled once, not twice (their own default init costs as much again, e.g. 1.3 B values at a 152k
    vocabulary and hidden 4096)."""
    device = kwargs.pop("device", None) or torch.get_default_device()
    return cls(*args, device="meta", **kwargs).to_empty(device=device)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """HF ``post_init`` convention: Linear/Embedding ~ N(0, std), biases 0 (RMSNorm weights stay 1)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


def softcap(logits: Tensor, cap: float | None) -> Tensor:
    """Gemma's final-logit soft capping ``cap * tanh(logits / cap)``; identity when ``cap`` is None."""
    return logits if not cap else torch.tanh(logits / cap) * cap


class LMHead(nn.Linear):
    """The bias-free vocabulary projection, holding Gemma's final-logit soft cap (``softcap``, None for none).

    ``lm_head(h)`` are the raw logits, as in HF; :meth:`logits` the capped ones, the one place a drafter caps its
    logits (the fused loss reads the same ``softcap``)."""

    def __init__(self, in_features: int, out_features: int, softcap: float | None = None, **kwargs: Any) -> None:
        super().__init__(in_features, out_features, bias=False, **kwargs)
        self.softcap = softcap

    def logits(self, hidden: Tensor) -> Tensor:
        return softcap(self(hidden), self.softcap)


def project_target_features(fc: nn.Linear, target_hidden: Tensor) -> Tensor:
    """``fc(target_hidden)`` for the concatenated target layer outputs [..., m*H], after checking their width."""
    if target_hidden.shape[-1] != fc.in_features:
        raise ValueError(
            f"target_hidden has width {target_hidden.shape[-1]} but the drafter expects {fc.in_features} = "
            f"len(target_layer_ids) x hidden_size; check target_layer_ids and the cache."
        )
    return fc(target_hidden.to(fc.weight.dtype))


@torch.no_grad()
def copy_target_embeddings(drafter: nn.Module, embed_weight: Tensor, lm_head_weight: Tensor,
                           head_rows: Tensor | None = None) -> None:
    """Copy the target's embedding [V, H] into ``drafter.embed_tokens`` and its lm_head [V, H] (rows ``head_rows``
    only, for a reduced draft vocabulary) into ``drafter.lm_head``."""
    expected = (drafter.config.vocab_size, drafter.config.hidden_size)
    for name, w in (("embed_weight", embed_weight), ("lm_head_weight", lm_head_weight)):
        if tuple(w.shape) != expected:
            raise ValueError(f"{name} has shape {tuple(w.shape)}, expected [vocab, hidden] = {expected}.")
    drafter.embed_tokens.weight.copy_(embed_weight)
    rows = lm_head_weight if head_rows is None else lm_head_weight[head_rows.to(lm_head_weight.device)]
    drafter.lm_head.weight.copy_(rows)


def scale_embedding(embeds: Tensor, scale: float) -> Tensor:
    """Gemma's scaled embedding ``e * sqrt(H)``; the scale is rounded to the embedding dtype first, as HF
    Gemma's ``ScaledWordEmbedding`` (and so DeepSpec's Gemma4 drafter) does (in bf16, sqrt(3840) becomes 62.0)."""
    if scale == 1.0:
        return embeds
    return embeds * torch.tensor(scale, dtype=embeds.dtype, device=embeds.device)
