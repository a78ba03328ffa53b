"""The reference math of DSpark's two heads, written out from the exported tensors.

This restates ``dspark_lightning/drafters/dspark.py`` (``MarkovHead.step``, ``ConfidenceHead``; DSpark paper
Eqs. 5-7) in a few lines, because ``dspark_sglang`` must not import ``dspark_lightning``: the conformance check
compares SGLang's modules, loaded from an export, against these functions on random inputs. If the drafter's
math changes, this file changes with it.

Tensor names are the exported ones: ``markov_head.markov_w1.weight`` [V, r] (embedding of the previous token),
``markov_head.markov_w2.weight`` [V, r] (rank-r features -> vocab bias), ``markov_head.gate_proj.{weight,bias}``
[r, H + r] (gated), ``markov_head.joint_proj.{weight,bias}`` [3r, 2r + H] (rnn),
``confidence_head.proj.{weight,bias}`` [1, H (+ r)].

Per position k with previous token x (the anchor for k = 0) and backbone state h_k [H]:

- vanilla: ``u = W1[x]``
- gated:   ``u = sigmoid(gate_proj([h_k ; W1[x]])) * W1[x]``
- rnn:     ``(g, c, o) = joint_proj([s ; W1[x] ; h_k])`` split in three,
  ``s <- sigmoid(g) s + (1 - sigmoid(g)) tanh(c)``, ``u = tanh(o)``; ``s`` starts at zero for each block
- Markov bias added to the parallel logits: ``W2 u``
- confidence logit: ``proj([h_k ; W1[x]])`` (or ``proj(h_k)`` without Markov features); confidence
  ``sigmoid(logit / T_k)`` with the STS temperature ``T_k`` (1 without calibration).

And the context path of the backbone (``dspark_lightning/drafters/dflash.py``, ``_layers.py``; paper Eqs. 2-3):
``C = hidden_norm(fc(target_hidden))``; layer i caches ``K = RoPE(k_norm(k_proj(C)))`` (``k_norm`` per head, absent
for targets without q/k norm) and ``V = v_proj(C)``, RoPE in the rotate-half form with ``inv_freq = theta^(-2j/d)``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

Weights = dict[str, Tensor]


def markov_step(w: Weights, head_type: str, prev: Tensor, hidden: Tensor,
                state: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """One position: prev [B] token ids, hidden [B, H] -> (bias [B, V], next state [B, r] or None)."""
    e = F.embedding(prev, w["markov_head.markov_w1.weight"])  # [B, r]
    if head_type == "vanilla":
        u = e
    elif head_type == "gated":
        gate = F.linear(torch.cat([hidden, e], -1), w["markov_head.gate_proj.weight"],
                        w.get("markov_head.gate_proj.bias"))
        u = torch.sigmoid(gate) * e
    elif head_type == "rnn":
        joint = F.linear(torch.cat([state, e, hidden], -1), w["markov_head.joint_proj.weight"],
                         w.get("markov_head.joint_proj.bias"))
        g, c, o = joint.chunk(3, dim=-1)
        state = torch.sigmoid(g) * state + (1 - torch.sigmoid(g)) * torch.tanh(c)
        u = torch.tanh(o)
    else:
        raise ValueError(f"markov_head_type={head_type!r}; valid: vanilla, gated, rnn.")
    return F.linear(u, w["markov_head.markov_w2.weight"]), state


def markov_block_biases(w: Weights, head_type: str, anchor: Tensor, tokens: Tensor, hidden: Tensor) -> Tensor:
    """A whole block, left to right: anchor [B], tokens [B, K] drafted, hidden [B, K, H] -> biases [B, K, V]."""
    rank = w["markov_head.markov_w1.weight"].shape[1]
    state = hidden.new_zeros(hidden.shape[0], rank) if head_type == "rnn" else None
    prev, out = anchor, []
    for k in range(tokens.shape[1]):
        bias, state = markov_step(w, head_type, prev, hidden[:, k], state)
        out.append(bias)
        prev = tokens[:, k]
    return torch.stack(out, dim=1)


def confidence(w: Weights, anchor: Tensor, tokens: Tensor, hidden: Tensor,
               temperatures: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """anchor [B], tokens [B, K], hidden [B, K, H] -> (confidence [B, K] in [0, 1], raw logit [B, K])."""
    weight = w["confidence_head.proj.weight"]
    features = hidden
    if weight.shape[1] > hidden.shape[-1]:  # with Markov features: [h_k ; W1[x_{k-1}]]
        prev = torch.cat([anchor[:, None], tokens[:, :-1]], dim=1)
        features = torch.cat([hidden, F.embedding(prev, w["markov_head.markov_w1.weight"])], -1)
    raw = F.linear(features, weight, w.get("confidence_head.proj.bias")).squeeze(-1)
    scale = 1.0 if temperatures is None else temperatures
    return torch.sigmoid(raw / scale), raw


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def project_context(w: Weights, target_hidden: Tensor, eps: float) -> Tensor:
    """Injected context ``hidden_norm(fc(target_hidden))``: [N, m*H] -> [N, H] (DSpark paper Eq. 2)."""
    return rms_norm(F.linear(target_hidden, w["fc.weight"]), w["hidden_norm.weight"], eps)


def rope(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Rotate-half RoPE over the last dim of x [N, heads, d] at integer positions [N]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    angles = positions.float()[:, None] * inv_freq[None]  # [N, d/2]
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def context_kv(w: Weights, layer: int, context: Tensor, positions: Tensor, head_dim: int, eps: float,
               theta: float) -> tuple[Tensor, Tensor]:
    """K, V [N, kv_heads, head_dim] that draft layer ``layer`` caches for projected context C [N, H]."""
    p = f"layers.{layer}.self_attn."
    k = F.linear(context, w[p + "k_proj.weight"], w.get(p + "k_proj.bias")).unflatten(-1, (-1, head_dim))
    v = F.linear(context, w[p + "v_proj.weight"], w.get(p + "v_proj.bias")).unflatten(-1, (-1, head_dim))
    if p + "k_norm.weight" in w:
        k = rms_norm(k, w[p + "k_norm.weight"], eps)
    return rope(k, positions, theta), v
