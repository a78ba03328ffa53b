"""Draft classes for what our drafters produce and SGLang 0.5.23 does not serve as written.

The one gap found (serving/README.md, "What the plugin adds"): SGLang's DFlash/DSpark draft layer
(``srt/models/dflash.py::DFlashAttention``) always applies per-head RMSNorm to q and k (Qwen3 style). Our drafters
follow the target family, and for targets without q/k norm (Llama, e.g. SmolLM2) they have none. Such an export
loads into the upstream classes without an error -- ``q_norm``/``k_norm`` keep their initial ones -- and then
computes a different attention. These classes are the upstream ones with q/k norm turned off when the config
says ``"qk_norm": false``; everything else (worker, kernels, Markov and confidence heads, weight loading) is
upstream's. With ``qk_norm`` true or absent they are exactly the upstream classes.

Selected by ``config.json`` ``architectures``: ``DSparkLightningDraftModel`` (served with
``--speculative-algorithm DSPARK``) and ``DFlashLightningDraftModel`` (``DFLASH``). Imported only inside SGLang
processes, through :func:`dspark_sglang.plugin.register`.
"""

from __future__ import annotations

import torch
from sglang.srt.model_executor.forward_batch_info import ForwardBatch
from sglang.srt.models.dflash import DFlashAttention, DFlashDecoderLayer, DFlashDraftModel
from sglang.srt.models.dspark import DSparkDraftModel


def config_qk_norm(config) -> bool:  # a transformers PretrainedConfig
    return bool(getattr(config, "qk_norm", True))


class NoQKNormAttention(DFlashAttention):
    """DFlash draft attention without the per-head q/k RMSNorm (Llama-family draft layers)."""

    def __init__(self, config, layer_id: int, quant_config=None, prefix: str = "") -> None:
        super().__init__(config, layer_id, quant_config=quant_config, prefix=prefix)
        # No parameters that no checkpoint fills, and no fused kernel that would apply them.
        del self.q_norm, self.k_norm
        self.use_table_qk_norm_rope = False

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                forward_batch: ForwardBatch) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        if self.v_scale is not None:
            v = v * self.v_scale
        if self.attention_sink_bias is None:
            out = self.attn(q, k, v, forward_batch)
        else:
            out = self.attn(q, k, v, forward_batch, sinks=self.attention_sink_bias)
        out, _ = self.o_proj(self.apply_attention_output(out, hidden_states))
        return out

    def apply_k_norm(self, k: torch.Tensor) -> torch.Tensor:
        # Context K/V injection (DFlash worker and DSpark write_target_hidden_kv per-layer path).
        return k


class NoQKNormDecoderLayer(DFlashDecoderLayer):
    attention_cls = NoQKNormAttention


class DFlashLightningDraftModel(DFlashDraftModel):
    """Upstream ``DFlashDraftModel``; ``"qk_norm": false`` drops the q/k norm of every layer."""

    def __init__(self, config, quant_config=None, prefix: str = "") -> None:
        if not config_qk_norm(config):
            self.decoder_layer_cls = NoQKNormDecoderLayer
        super().__init__(config, quant_config=quant_config, prefix=prefix)
        if not config_qk_norm(config):
            # The worker's fused context-KV helper applies k_norm weights; use the per-layer path.
            self.supports_fused_context_kv = False


class DSparkLightningDraftModel(DSparkDraftModel):
    """Upstream ``DSparkDraftModel`` (Markov + confidence heads); ``"qk_norm": false`` drops the q/k norm."""

    def __init__(self, config, quant_config=None, prefix: str = "") -> None:
        self._qk_norm = config_qk_norm(config)
        if not self._qk_norm:
            self.decoder_layer_cls = NoQKNormDecoderLayer
        super().__init__(config, quant_config=quant_config, prefix=prefix)
        if not self._qk_norm:
            self.supports_fused_context_kv = False

    # The two fused context-KV writers of DSparkDraftMixin normalise K with the k_norm weights; without q/k
    # norm, write_target_hidden_kv falls back to kv_proj_only -> apply_k_norm (identity) -> RoPE per layer.
    def _fused_kv_write_bundle(self, pool):
        return super()._fused_kv_write_bundle(pool) if self._qk_norm else None

    def _stacked_ctx_kv_params(self):
        return super()._stacked_ctx_kv_params() if self._qk_norm else None


EntryClass = [DSparkLightningDraftModel, DFlashLightningDraftModel]
