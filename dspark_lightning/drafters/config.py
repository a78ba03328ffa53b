"""One validated configuration for every drafter (DSpark, DFlash, Eagle3).

The geometry of a drafter (hidden size, heads, vocabulary, rotary parameters) is the target's: DeepSpec
copies the target config and so do we, but explicitly. Fields left as ``None`` are filled from the
target's HF config by :meth:`DrafterConfig.resolve`; a field that *is* given and disagrees with the target
raises, so a number is never typed twice and never silently wrong.

The serialised form (:meth:`to_dict`) uses the key names of DeepSpec / SGLang ``config.json`` files
(``block_size``, ``mask_token_id``, ``target_layer_ids``, ``markov_rank``, ...).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

ALGORITHMS = ("dspark", "dflash", "eagle3")
MARKOV_HEAD_TYPES = ("vanilla", "gated", "rnn")
BLOCK_LAYOUTS = ("deepspec", "zlab")
HIDDEN_ACTS = ("silu", "gelu", "gelu_pytorch_tanh", "relu")

# Geometry fields read from the target's HF config (our name -> HF attribute names, first found wins).
_TARGET_FIELDS: dict[str, tuple[str, ...]] = {
    "vocab_size": ("vocab_size",),
    "hidden_size": ("hidden_size",),
    "intermediate_size": ("intermediate_size",),
    "num_attention_heads": ("num_attention_heads",),
    "num_key_value_heads": ("num_key_value_heads", "num_attention_heads"),
    "head_dim": ("head_dim",),
    "rms_norm_eps": ("rms_norm_eps",),
    "max_position_embeddings": ("max_position_embeddings",),
    "attention_bias": ("attention_bias",),
    "hidden_act": ("hidden_act", "hidden_activation"),
    "num_target_layers": ("num_hidden_layers",),
    "final_logit_softcapping": ("final_logit_softcapping",),
}
# Model families whose attention normalises q and k per head (Qwen3, Gemma3/4); Llama does not.
_QK_NORM_FAMILIES = ("qwen3", "qwen3_moe", "gemma3", "gemma3_text", "gemma4", "gemma4_text", "olmo2")
_SCALED_EMBED_FAMILIES = ("gemma", "gemma2", "gemma3", "gemma3_text", "gemma4", "gemma4_text")


@dataclass
class DrafterConfig:
    """Hyper-parameters of a draft model.

    Args:
        algorithm: ``dspark`` (block drafter + Markov/confidence heads), ``dflash`` (block drafter, no heads)
            or ``eagle3`` (training-time-test autoregressive drafter).
        num_hidden_layers: Draft depth (DeepSpec: 5 for DSpark/DFlash, 1 for Eagle3).
        target_layer_ids: Target decoder layers whose raw outputs are concatenated as context
            (``-1`` = the embedding output). Strictly increasing.
        block_size: gamma, the number of draft tokens per round (DeepSpec ``block_size``).
        block_layout: ``deepspec`` (anchor + gamma-1 masks; the anchor slot predicts the first token) or
            ``zlab`` (anchor + gamma masks; only the masks predict).
        mask_token_id: Input-only noise token of the block (must be < ``vocab_size``).
        num_anchors: Blocks sampled per training sequence.
        markov_rank: Rank r of the Markov head (0 = no sequential head).
        markov_head_type: ``vanilla`` (paper Eq. 5), ``gated`` or ``rnn`` (paper Eq. 6).
        enable_confidence_head: Predict per-position conditional acceptance (paper Eq. 7).
        confidence_head_with_markov: Confidence input is ``[h_k ; W1[x_{k-1}]]`` instead of ``h_k``.
        ttt_length: Eagle3 training-time-test unroll length.
        draft_vocab_size: Eagle3 reduced output vocabulary (``None`` = the full target vocabulary).
        qk_norm: Per-head RMSNorm on q and k (Qwen3, Gemma); ``None`` = from the target family.
        embed_scale: Multiplier of token embeddings (Gemma: sqrt(hidden)); ``None`` = from the target family.
        rope_theta: Rotary base; ``None`` = from the target (default RoPE only).
        The remaining geometry fields default to the target's values.
    """

    algorithm: Literal["dspark", "dflash", "eagle3"] = "dspark"
    num_hidden_layers: int = 5
    target_layer_ids: list[int] = field(default_factory=lambda: [1, 9, 17, 25, 33])
    block_size: int = 7
    block_layout: Literal["deepspec", "zlab"] = "deepspec"
    mask_token_id: int | None = None
    num_anchors: int = 512
    markov_rank: int = 256
    markov_head_type: Literal["vanilla", "gated", "rnn"] = "vanilla"
    enable_confidence_head: bool = True
    confidence_head_with_markov: bool = True
    ttt_length: int = 7
    draft_vocab_size: int | None = None
    # Geometry: None = read from the target config by resolve().
    vocab_size: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float | None = None
    rope_theta: float | None = None
    max_position_embeddings: int | None = None
    attention_bias: bool | None = None
    hidden_act: str | None = None
    qk_norm: bool | None = None
    embed_scale: float | None = None
    final_logit_softcapping: float | None = None
    num_target_layers: int | None = None
    target_model_type: str | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DrafterConfig:
        """Build from a mapping (a saved ``to_dict`` output or a YAML block); unknown keys raise."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"Unknown drafter config keys {unknown}; valid keys are {sorted(names)}.")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolve(self, target_config: Any) -> DrafterConfig:
        """Fill geometry from a target HF config (any object with HF attribute names) and validate.

        Raises:
            ValueError: a value given here disagrees with the target, or the result is invalid.
        """
        values = self.to_dict()
        text_config = getattr(target_config, "text_config", None) or target_config
        get = lambda name: getattr(text_config, name, None)  # noqa: E731
        for ours, theirs in _TARGET_FIELDS.items():
            found = next((get(t) for t in theirs if get(t) is not None), None)
            if found is None:
                continue
            if values[ours] is None:
                values[ours] = found
            elif values[ours] != found and ours not in ("max_position_embeddings",):
                raise ValueError(
                    f"Drafter {ours}={values[ours]} but the target has {ours}={found}. The drafter shares the "
                    f"target's geometry: remove '{ours}' from the drafter config (it is read from the target)."
                )
        model_type = getattr(target_config, "model_type", None)
        if values["target_model_type"] is None:
            values["target_model_type"] = model_type
        if values["head_dim"] is None and values["hidden_size"] and values["num_attention_heads"]:
            values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]
        rope = get("rope_parameters") or get("rope_scaling") or {}
        target_theta = (rope.get("rope_theta") if isinstance(rope, dict) else None) or get("rope_theta") or 10000.0
        rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
        if rope_type not in ("default", None):
            raise ValueError(
                f"The target uses rope_type={rope_type!r}; the drafters implement the default RoPE only. "
                f"Use a target with default rotary embeddings or add the scaling to drafters/_layers.py."
            )
        if values["rope_theta"] is None:
            values["rope_theta"] = target_theta
        elif values["rope_theta"] != target_theta:
            raise ValueError(
                f"Drafter rope_theta={values['rope_theta']} but the target has rope_theta={target_theta}: remove "
                f"'rope_theta' from the drafter config (it is read from the target)."
            )
        if values["qk_norm"] is None:
            values["qk_norm"] = (model_type or "") in _QK_NORM_FAMILIES
        if values["embed_scale"] is None:
            scaled = (model_type or "") in _SCALED_EMBED_FAMILIES
            values["embed_scale"] = math.sqrt(values["hidden_size"]) if scaled else 1.0
        if values["mask_token_id"] is None:
            values["mask_token_id"] = _default_mask_token(target_config, values["vocab_size"])
        resolved = DrafterConfig(**values)
        resolved.validate()
        return resolved

    # ------------------------------------------------------------------ validation
    @property
    def num_context_layers(self) -> int:
        return len(self.target_layer_ids)

    @property
    def has_markov_head(self) -> bool:
        return self.algorithm == "dspark" and self.markov_rank > 0

    @property
    def has_confidence_head(self) -> bool:
        return self.algorithm == "dspark" and self.enable_confidence_head

    def validate(self) -> None:
        """Check a resolved config; every message names the value and the fix."""
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"Unknown algorithm {self.algorithm!r}; choose one of {ALGORITHMS}.")
        missing = [n for n in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                               "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "hidden_act")
                   if getattr(self, n) is None]
        if missing:
            raise ValueError(f"Drafter geometry {missing} is unset: call resolve(target_config) first or set them.")
        if self.num_hidden_layers < 1:
            raise ValueError(f"num_hidden_layers={self.num_hidden_layers} must be >= 1.")
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; choose one of {HIDDEN_ACTS}.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}."
            )
        ids = list(self.target_layer_ids)
        if not ids:
            raise ValueError("target_layer_ids is empty; give at least one target layer, e.g. [1, 9, 17, 25, 33].")
        if any(b <= a for a, b in zip(ids, ids[1:])):
            raise ValueError(f"target_layer_ids={ids} must be strictly increasing.")
        if self.num_target_layers is not None:
            bad = [i for i in ids if i < -1 or i >= self.num_target_layers]
            if bad:
                raise ValueError(
                    f"target_layer_ids {bad} out of range for a target with {self.num_target_layers} layers: "
                    f"use ids in [-1, {self.num_target_layers - 1}] (-1 = embedding output)."
                )
        if self.algorithm == "eagle3":
            if self.ttt_length < 1:
                raise ValueError(f"ttt_length={self.ttt_length} must be >= 1.")
            if self.draft_vocab_size is not None and not 0 < self.draft_vocab_size <= self.vocab_size:
                raise ValueError(
                    f"draft_vocab_size={self.draft_vocab_size} must be in [1, vocab_size={self.vocab_size}]."
                )
            return
        if self.block_size < 1:
            raise ValueError(f"block_size={self.block_size} must be >= 1 (it is gamma, the draft tokens per round).")
        if self.block_layout not in BLOCK_LAYOUTS:
            raise ValueError(f"block_layout={self.block_layout!r} unknown; choose one of {BLOCK_LAYOUTS}.")
        if self.mask_token_id is None or not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(
                f"mask_token_id={self.mask_token_id} must be in [0, vocab_size={self.vocab_size}); pick an unused "
                f"embedding row of the target (Qwen3: 151669) or a reserved special token."
            )
        if self.num_anchors < 1:
            raise ValueError(f"num_anchors={self.num_anchors} must be >= 1.")
        if self.algorithm == "dspark":
            if self.markov_rank < 0:
                raise ValueError(f"markov_rank={self.markov_rank} must be >= 0 (0 disables the Markov head).")
            if self.markov_rank > 0 and self.markov_head_type not in MARKOV_HEAD_TYPES:
                raise ValueError(
                    f"Unknown markov_head_type {self.markov_head_type!r}; choose one of {MARKOV_HEAD_TYPES}."
                )
            if self.enable_confidence_head and self.confidence_head_with_markov and self.markov_rank == 0:
                raise ValueError(
                    "confidence_head_with_markov=True needs a Markov head (markov_rank > 0); set "
                    "confidence_head_with_markov: false or markov_rank > 0."
                )

    # ------------------------------------------------------------------ derived block layout
    @property
    def block_len(self) -> int:
        """Tokens fed to the backbone per block (anchor included)."""
        return self.block_size + (1 if self.block_layout == "zlab" else 0)

    @property
    def pred_offset(self) -> int:
        """Index of the first block slot whose output is a prediction."""
        return 1 if self.block_layout == "zlab" else 0


def _default_mask_token(target_config: Any, vocab_size: int | None) -> int | None:
    """Pick a token the target never emits for the block's mask slots.

    Qwen3 reserves embedding rows past the tokenizer (151669 in a 151936-row table); when the embedding
    table has no spare row we fall back to the pad token, then the last row.
    """
    model_type = getattr(target_config, "model_type", "") or ""
    if model_type.startswith("qwen3") and vocab_size and vocab_size > 151669:
        return 151669
    pad = getattr(target_config, "pad_token_id", None)
    if isinstance(pad, int) and vocab_size and 0 <= pad < vocab_size:
        return pad
    return vocab_size - 1 if vocab_size else None
