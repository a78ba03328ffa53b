"""Building blocks shared by the drafters: RMSNorm, rotary embedding, SwiGLU MLP, and a decoder layer whose
attention takes *extra* keys/values (the KV injection of DFlash/DSpark, paper Eq. 3) and an explicit mask.

Parameter names are HF/Qwen3's (``self_attn.{q,k,v,o}_proj``, ``q_norm``, ``k_norm``, ``mlp.{gate,up,down}_proj``,
``input_layernorm``, ``post_attention_layernorm``) so checkpoints load in DeepSpec and SGLang without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import DrafterConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm, ``weight * x / rms(x)``; half-precision inputs are normalised in fp32 as HF
    Llama/Qwen3 do (fp64 stays fp64, so golden tests can compare at 1e-10)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        if dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """Default (unscaled) RoPE: ``cos``/``sin`` tables for arbitrary integer positions."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

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
    """

    def __init__(self, config: DrafterConfig, in_features: int | None = None) -> None:
        super().__init__()
        h, dh = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, dh
        inp = in_features or h
        bias = bool(config.attention_bias)
        self.q_proj = nn.Linear(inp, self.num_heads * dh, bias=bias)
        self.k_proj = nn.Linear(inp, self.num_kv_heads * dh, bias=bias)
        self.v_proj = nn.Linear(inp, self.num_kv_heads * dh, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * dh, h, bias=bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(dh, config.rms_norm_eps)
            self.k_norm = RMSNorm(dh, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def project_kv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, T, in] -> rotated k, v [B, kv_heads, T, dh]."""
        b, t, _ = x.shape
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        if self.k_norm is not None:
            k = self.k_norm(k)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rotary(k.transpose(1, 2), cos, sin), v

    def project_q(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        return apply_rotary(q.transpose(1, 2), cos, sin)

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
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=self.num_heads != self.num_kv_heads
        )  # [B, heads, Q, dh]
        b, _, t, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class DecoderLayer(nn.Module):
    """Pre-norm residual block (Qwen3/Llama): ``h += attn(norm(h)); h += mlp(norm(h))``."""

    def __init__(self, config: DrafterConfig, attn_in_features: int | None = None) -> None:
        super().__init__()
        h = config.hidden_size
        self.input_layernorm = RMSNorm(h, config.rms_norm_eps)
        self.self_attn = KVInjectionAttention(config, attn_in_features)
        self.post_attention_layernorm = RMSNorm(h, config.rms_norm_eps)
        self.mlp = MLP(h, config.intermediate_size, config.hidden_act)

    def forward(
        self,
        h: Tensor,
        cos: Tensor,
        sin: Tensor,
        extra_kv: tuple[Tensor, Tensor] | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, extra_kv, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


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
