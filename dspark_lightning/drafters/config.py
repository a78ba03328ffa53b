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

ALGORITHMS = ("dspark", "dflash", "eagle3", "dspark_v4")
# Algorithms with DSpark's heads (Markov, confidence); dspark_v4 = DSpark on DeepSeek-V4 stages (dspark_v4.py).
_DSPARK_ALGORITHMS = ("dspark", "dspark_v4")
MARKOV_HEAD_TYPES = ("vanilla", "gated", "rnn")
BLOCK_LAYOUTS = ("deepspec", "zlab")
HIDDEN_ACTS = ("silu", "gelu", "gelu_pytorch_tanh", "relu")
NORM_STYLES = ("pre", "sandwich")
ROPE_TYPES = ("default", "proportional")

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
_GEMMA4_FAMILIES = ("gemma4", "gemma4_text", "gemma4_unified", "gemma4_unified_text")
_QK_NORM_FAMILIES = ("qwen3", "qwen3_moe", "gemma3", "gemma3_text", "olmo2", *_GEMMA4_FAMILIES)
_SCALED_EMBED_FAMILIES = ("gemma", "gemma2", "gemma3", "gemma3_text", *_GEMMA4_FAMILIES)
# DeepSeek-V4 geometry of the draft stages beyond the common fields (DrafterConfig.v4_geometry); read from the
# target. Only the routed-expert counts may differ from the target's (SGLang: dspark_n_routed_experts and
# dspark_num_experts_per_tok in the target config.json).
V4_MODEL_TYPES = ("deepseek_v4",)
V4_GEOMETRY_KEYS = ("q_lora_rank", "o_groups", "o_lora_rank", "sliding_window", "n_routed_experts",
                    "num_experts_per_tok", "n_shared_experts", "scoring_func", "routed_scaling_factor",
                    "norm_topk_prob", "swiglu_limit", "hc_mult", "hc_sinkhorn_iters", "hc_eps")
V4_DRAFT_OVERRIDES = ("n_routed_experts", "num_experts_per_tok")
# Gemma4 reserves token 4 (`<mask>`) for masking; DeepSpec's Gemma4 configs use it as the block mask token.
_GEMMA4_MASK_TOKEN = 4


@dataclass
class DrafterConfig:
    """Hyper-parameters of a draft model.

    Args:
        algorithm: ``dspark`` (block drafter + Markov/confidence heads), ``dflash`` (block drafter, no heads)
            or ``eagle3`` (training-time-test autoregressive drafter); ``dspark_v4``: DSpark whose backbone stages are
            DeepSeek-V4 blocks, for DeepSeek-V4 targets only (drafters/dspark_v4.py, docs/deepseek_v4.md).
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
        rope_theta: Rotary base; ``None`` = from the target. A target with RoPE parameters per layer type
            (Gemma4) gives those of its ``full_attention`` layers, since every draft layer attends fully.
        rope_type: ``default`` or ``proportional`` (Gemma4 full attention: only the first
            ``partial_rotary_factor`` of each head's frequency pairs rotate); ``None`` = from the target.
        partial_rotary_factor: Fraction of rotated frequency pairs (``proportional`` only); ``None`` = target.
        norm_style: ``pre`` (Qwen3/Llama: ``h += attn(norm(h)); h += mlp(norm(h))``) or ``sandwich`` (Gemma4:
            each sub-block's output is normed too, ``pre_feedforward_layernorm``/``post_feedforward_layernorm``);
            ``None`` = from the target family.
        attention_scale: Softmax scale of q.k; ``None`` = ``head_dim ** -0.5``. Gemma4 resolves to 1.0 (its q and
            k are RMS-normed per head).
        attention_k_eq_v: No ``v_proj``: values are the key projection before ``k_norm`` (Gemma4's
            ``attention_k_eq_v``); ``None`` = from the target.
        v_norm: Scale-free per-head RMSNorm on the values (Gemma4); ``None`` = from the target family.
        layer_scalar: Each layer ends with ``h * layer_scalar``, a persistent ones(1) buffer saved as
            ``layers.{i}.layer_scalar`` (Gemma4); ``None`` = from the target family.
        global_head_dim, num_global_key_value_heads: Geometry of the target's full-attention layers (Gemma4),
            which the draft layers copy: head dim ``global_head_dim``, and ``num_global_key_value_heads`` kv heads
            when ``attention_k_eq_v``. ``None`` = from the target (unset for targets without them).
        v4_geometry: ``dspark_v4`` only: the DeepSeek-V4 keys of the draft stages that the common fields do not cover
            (``V4_GEOMETRY_KEYS``: q/o low-rank dims, ``sliding_window``, MoE and mHC sizes), filled from the target
            by :meth:`resolve`. Only ``n_routed_experts``/``num_experts_per_tok`` may be set to differ from the
            target (SGLang serves them as ``dspark_n_routed_experts``/``dspark_num_experts_per_tok``).
        The remaining geometry fields default to the target's values.
    """

    algorithm: Literal["dspark", "dflash", "eagle3", "dspark_v4"] = "dspark"
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
    # Target-family style (None = from the target family, resolve()); defaults reproduce Qwen3/Llama.
    rope_type: str | None = None
    partial_rotary_factor: float | None = None
    norm_style: Literal["pre", "sandwich"] | None = None
    attention_scale: float | None = None
    attention_k_eq_v: bool | None = None
    v_norm: bool | None = None
    layer_scalar: bool | None = None
    global_head_dim: int | None = None
    num_global_key_value_heads: int | None = None
    v4_geometry: dict[str, Any] | None = None  # dspark_v4: DeepSeek-V4 stage geometry (see docstring)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DrafterConfig:
        """Build from a mapping (a saved ``to_dict`` output or a YAML block); unknown keys raise."""
        return strict_from_dict(cls, data, "drafter")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolve(self, target_config: Any) -> DrafterConfig:
        """Fill geometry from a target HF config (any object with HF attribute names) and validate.

        Raises:
            ValueError: a value given here disagrees with the target, or the result is invalid.
        """
        values = self.to_dict()
        text_config = getattr(target_config, "text_config", None) or target_config
        get = _attribute_reader(text_config)
        for ours, theirs in _TARGET_FIELDS.items():
            found = next((get(t) for t in theirs if get(t) is not None), None)
            if found is None:
                continue
            if ours == "max_position_embeddings" and values[ours] is not None:
                continue  # the drafter may use a shorter context than the target
            _take_from_target(values, ours, found, "the target", ". The drafter shares the target's geometry:")
        model_type = getattr(target_config, "model_type", None)
        if values["target_model_type"] is None:
            values["target_model_type"] = model_type
        if values["head_dim"] is None and values["hidden_size"] and values["num_attention_heads"]:
            values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]
        v4 = _check_v4_pairing(values["algorithm"], model_type)
        for name, found in (_v4_target_rope(get) if v4 else _target_rope(get)).items():
            _take_from_target(values, name, found, "the target")
        text_type = getattr(text_config, "model_type", None)
        gemma4 = model_type in _GEMMA4_FAMILIES or text_type in _GEMMA4_FAMILIES
        if gemma4:
            _check_gemma4_target(get)
        if values["attention_k_eq_v"] is None:
            values["attention_k_eq_v"] = bool(get("attention_k_eq_v"))
        full_dim, full_kv = (None, None)
        if gemma4:
            full_dim, full_kv = _full_attention_geometry(text_config, values["attention_k_eq_v"])
        for name, found in (("global_head_dim", full_dim), ("num_global_key_value_heads", full_kv)):
            if found is None:
                continue
            _take_from_target(values, name, found, "the target's full-attention layers")
        style = dict(norm_style="sandwich", attention_scale=1.0, v_norm=True, layer_scalar=True) if gemma4 else \
            dict(norm_style="pre", attention_scale=None, v_norm=False, layer_scalar=False)
        for name, default in style.items():
            if values[name] is None:
                values[name] = default
        if values["qk_norm"] is None:
            values["qk_norm"] = (model_type or "") in _QK_NORM_FAMILIES
        if values["embed_scale"] is None:
            scaled = (model_type or "") in _SCALED_EMBED_FAMILIES
            values["embed_scale"] = math.sqrt(values["hidden_size"]) if scaled else 1.0
        if values["mask_token_id"] is None:
            values["mask_token_id"] = _default_mask_token(target_config, values["vocab_size"])
        if v4:
            values["v4_geometry"] = _v4_geometry(get, values["v4_geometry"])
        resolved = DrafterConfig(**values)
        resolved.validate()
        return resolved

    # ------------------------------------------------------------------ validation
    @property
    def num_context_layers(self) -> int:
        return len(self.target_layer_ids)

    @property
    def attention_head_dim(self) -> int:
        """Head dim of the draft attention: the target's full-attention ``global_head_dim`` when it has one."""
        return self.global_head_dim or self.head_dim

    @property
    def attention_num_kv_heads(self) -> int:
        """KV heads of the draft attention (Gemma4 with K = V: ``num_global_key_value_heads``)."""
        if self.attention_k_eq_v and self.global_head_dim and self.num_global_key_value_heads:
            return self.num_global_key_value_heads
        return self.num_key_value_heads

    @property
    def has_markov_head(self) -> bool:
        return self.algorithm in _DSPARK_ALGORITHMS and self.markov_rank > 0

    @property
    def has_confidence_head(self) -> bool:
        return self.algorithm in _DSPARK_ALGORITHMS and self.enable_confidence_head

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
        if self.num_attention_heads % self.attention_num_kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of the full-attention kv heads "
                f"num_global_key_value_heads={self.num_global_key_value_heads}."
            )
        self._validate_style()
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
        if self.algorithm in _DSPARK_ALGORITHMS:
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
        if self.algorithm == "dspark_v4":
            self._validate_v4()

    def _validate_v4(self) -> None:
        """DeepSeek-V4 stages as SGLang's ``DeepseekV4ForCausalLMDSpark`` builds them (drafters/dspark_v4.py)."""
        geometry = self.v4_geometry or {}
        missing = [k for k in V4_GEOMETRY_KEYS if geometry.get(k) is None]
        if missing:
            raise ValueError(f"dspark_v4 needs the DeepSeek-V4 geometry {missing}: call resolve(target_config) with a "
                             f"deepseek_v4 target (it fills v4_geometry).")
        if len(self.target_layer_ids) != self.num_hidden_layers:
            raise ValueError(
                f"dspark_v4 has one draft stage per target feature layer (SGLang builds len(dspark_target_layer_ids) "
                f"stages): num_hidden_layers={self.num_hidden_layers} but target_layer_ids={self.target_layer_ids}; "
                f"give {self.num_hidden_layers} layer ids or set num_hidden_layers={len(self.target_layer_ids)}."
            )
        if self.block_layout != "deepspec":
            raise ValueError(f"dspark_v4 uses the deepspec block layout (SGLang sample_from_anchor=True); got "
                             f"block_layout={self.block_layout!r}.")
        if self.markov_rank > 0 and self.markov_head_type != "vanilla":
            raise ValueError(f"dspark_v4 supports markov_head_type 'vanilla' only (SGLang's DSparkV4MarkovHead); got "
                             f"{self.markov_head_type!r}.")
        if not 1 <= geometry["num_experts_per_tok"] <= geometry["n_routed_experts"]:
            raise ValueError(f"v4_geometry num_experts_per_tok={geometry['num_experts_per_tok']} must be in "
                             f"[1, n_routed_experts={geometry['n_routed_experts']}].")
        if geometry["n_shared_experts"] != 1:
            raise ValueError(f"v4_geometry n_shared_experts={geometry['n_shared_experts']}: transformers' DeepSeek-V4 "
                             f"MoE has exactly one shared expert.")

    def _validate_style(self) -> None:
        if self.norm_style is not None and self.norm_style not in NORM_STYLES:
            raise ValueError(f"norm_style={self.norm_style!r} unknown; choose one of {NORM_STYLES}.")
        if self.attention_scale is not None and not self.attention_scale > 0:
            raise ValueError(f"attention_scale={self.attention_scale} must be > 0 (null = head_dim ** -0.5).")
        rope_type = self.rope_type or "default"
        if rope_type not in ROPE_TYPES:
            raise ValueError(
                f"rope_type={rope_type!r} is not implemented by the drafters; choose one of {ROPE_TYPES} (add the "
                f"scaling to drafters/_layers.py RotaryEmbedding to support another)."
            )
        factor = 1.0 if self.partial_rotary_factor is None else self.partial_rotary_factor
        if not 0.0 < factor <= 1.0:
            raise ValueError(f"partial_rotary_factor={factor} must be in (0, 1].")
        # dspark_v4's partial, interleaved RoPE is transformers' DeepSeek-V4 rotary, not _layers.RotaryEmbedding.
        if rope_type == "default" and factor != 1.0 and self.algorithm != "dspark_v4":
            raise ValueError(
                f"partial_rotary_factor={factor} with rope_type 'default' (rotate only part of each head) is not "
                f"implemented; only Gemma4's 'proportional' partial RoPE is."
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


def _take_from_target(values: dict[str, Any], name: str, found: Any, source: str, note: str = ":") -> None:
    """Fill ``values[name]`` from the target, or raise if the drafter config gave a different value."""
    if values[name] is None:
        values[name] = found
    elif values[name] != found:
        raise ValueError(
            f"Drafter {name}={values[name]} but {source} has {name}={found}{note} remove '{name}' from the "
            f"drafter config (it is read from the target)."
        )


def strict_from_dict(cls: type, data: dict[str, Any], what: str) -> Any:
    """``cls(**data)`` for a dataclass, refusing unknown keys with the list of valid ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"Unknown {what} config keys {unknown}; valid keys are {sorted(names)}.")
    return cls(**data)


def _default_mask_token(target_config: Any, vocab_size: int | None) -> int | None:
    """Pick a token the target never emits for the block's mask slots.

    Qwen3 reserves embedding rows past the tokenizer (151669 in a 151936-row table); when the embedding
    table has no spare row we fall back to the pad token, then the last row.
    """
    model_type = getattr(target_config, "model_type", "") or ""
    if model_type.startswith("qwen3") and vocab_size and vocab_size > 151669:
        return 151669
    if model_type in _GEMMA4_FAMILIES and vocab_size and vocab_size > _GEMMA4_MASK_TOKEN:
        return _GEMMA4_MASK_TOKEN
    pad = getattr(target_config, "pad_token_id", None)
    if isinstance(pad, int) and vocab_size and 0 <= pad < vocab_size:
        return pad
    return vocab_size - 1 if vocab_size else None


def _target_rope(get: Any) -> dict[str, Any]:
    """``rope_theta``, ``rope_type`` and ``partial_rotary_factor`` of the target's full-attention layers.

    HF configs hold RoPE parameters either flat (``rope_parameters``/``rope_scaling`` = one dict, or a bare
    ``rope_theta``) or per layer type (Gemma4: ``{"full_attention": {...}, "sliding_attention": {...}}``). The
    draft layers all attend fully, so they take the ``full_attention`` entry, as DeepSpec's Gemma4 drafter does.
    """
    rope = get("rope_parameters") or get("rope_scaling") or {}
    if not isinstance(rope, dict):
        rope = {}
    if {"full_attention", "sliding_attention"} & set(rope):
        if not isinstance(rope.get("full_attention"), dict):
            raise ValueError(
                f"The target's rope_parameters are per layer type {sorted(rope)} without a 'full_attention' entry; "
                f"the drafter's layers attend fully and need those parameters."
            )
        rope = rope["full_attention"]
    rope_type = rope.get("rope_type", rope.get("type")) or "default"
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"The target uses rope_type={rope_type!r}; the drafters implement {ROPE_TYPES} RoPE only. Use a target "
            f"with one of those or add the scaling to drafters/_layers.py (RotaryEmbedding)."
        )
    factor = rope.get("factor", 1.0)
    if rope_type == "proportional" and factor not in (None, 1.0):
        raise ValueError(
            f"The target's proportional RoPE has factor={factor}; only factor 1.0 is implemented "
            f"(drafters/_layers.py RotaryEmbedding)."
        )
    partial = rope.get("partial_rotary_factor", get("partial_rotary_factor"))
    return {
        "rope_theta": rope.get("rope_theta") or get("rope_theta") or 10000.0,
        "rope_type": rope_type,
        "partial_rotary_factor": 1.0 if partial is None else float(partial),
    }


def _check_v4_pairing(algorithm: str, model_type: str | None) -> bool:
    """True for a DeepSeek-V4 target, which needs (and is the only target of) the ``dspark_v4`` drafter."""
    v4 = model_type in V4_MODEL_TYPES
    if v4 and algorithm != "dspark_v4":
        raise ValueError(f"The target is DeepSeek-V4 (model_type={model_type!r}); its drafter is algorithm "
                         f"'dspark_v4' (V4 stages with mHC, MoE and sliding-window attention), not {algorithm!r}.")
    if algorithm == "dspark_v4" and not v4:
        raise ValueError(f"algorithm 'dspark_v4' drafts for DeepSeek-V4 targets (model_type in {V4_MODEL_TYPES}); "
                         f"the target has model_type={model_type!r}: use algorithm 'dspark'.")
    return v4


def _v4_target_rope(get: Any) -> dict[str, Any]:
    """RoPE of a DeepSeek-V4 target's ``main`` (sliding-window) layers: the draft stages attend in a sliding window
    only, and SGLang's V4 draft attention (compress ratio 0) uses that unscaled ``rope_theta`` rotary."""
    main = (get("rope_parameters") or {}).get("main") or {}
    rope_type = main.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"The DeepSeek-V4 target's main RoPE has rope_type={rope_type!r}; the V4 draft stages use "
                         f"the unscaled main RoPE ('default').")
    partial = main.get("partial_rotary_factor", get("partial_rotary_factor"))
    return {"rope_theta": main.get("rope_theta") or get("rope_theta"), "rope_type": "default",
            "partial_rotary_factor": float(partial)}


def _v4_geometry(get: Any, given: dict[str, Any] | None) -> dict[str, Any]:
    """``v4_geometry`` from the target; a given value must match it, except the draft's routed-expert counts."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(V4_GEOMETRY_KEYS))
    if unknown:
        raise ValueError(f"Unknown v4_geometry keys {unknown}; valid keys are {list(V4_GEOMETRY_KEYS)}.")
    geometry = {}
    for key in V4_GEOMETRY_KEYS:
        found = get(key)
        if key in given and found is not None and given[key] != found and key not in V4_DRAFT_OVERRIDES:
            raise ValueError(f"v4_geometry {key}={given[key]} but the target has {key}={found}; only "
                             f"{list(V4_DRAFT_OVERRIDES)} may differ: remove '{key}' (it is read from the target).")
        geometry[key] = given.get(key, found)
    return geometry


def _check_gemma4_target(get: Any) -> None:
    """The Gemma4 drafter variant (DeepSpec ``deepspec/modeling/dspark/gemma4/modeling.py``, which asserts it) is
    defined for dense targets without per-layer inputs."""
    if get("enable_moe_block"):
        raise ValueError(
            "The target is a Gemma4 MoE model (enable_moe_block=true); the Gemma4 drafter variant follows dense "
            "targets (DeepSpec supports no MoE block either). Use a dense Gemma4 target such as gemma-4-12B."
        )
    if get("hidden_size_per_layer_input"):
        raise ValueError(
            f"The target has per-layer inputs (hidden_size_per_layer_input={get('hidden_size_per_layer_input')}, "
            f"Gemma4 E2B/E4B); the Gemma4 drafter variant supports targets with hidden_size_per_layer_input=0."
        )


def _full_attention_geometry(text_config: Any, k_eq_v: bool) -> tuple[int | None, int | None]:
    """``(global_head_dim, num_global_key_value_heads)`` of a Gemma4 text config.

    Hub ``config.json`` files (and transformers up to 5.1x) hold them as attributes; newer transformers moves
    them into ``per_layer_config`` of the full-attention layers (``head_dim`` and, when K = V,
    ``num_key_value_heads``), so both places are read.
    """
    head_dim = getattr(text_config, "global_head_dim", None)
    kv_heads = getattr(text_config, "num_global_key_value_heads", None)
    if head_dim is not None:
        return head_dim, kv_heads
    layer_types = list(getattr(text_config, "layer_types", None) or [])
    per_layer = getattr(text_config, "per_layer_config", None)
    if "full_attention" not in layer_types or per_layer is None:
        return None, None
    index = layer_types.index("full_attention")
    if isinstance(per_layer, dict):  # serialised form: keys are layer indices as strings ("05")
        entry = {int(k): v for k, v in per_layer.items()}.get(index) or {}
        read = entry.get
    else:
        entry = per_layer[index]
        read = lambda name: getattr(entry, name, None)
    return read("head_dim"), (read("num_key_value_heads") if k_eq_v else kv_heads)


def _attribute_reader(config: Any) -> Any:
    """``get(name)``: the config's value of ``name`` or None.

    Newer transformers refuses a global read of attributes that vary per layer in heterogeneous configs (Gemma4:
    ``head_dim``, ``num_key_value_heads``, with a RuntimeError); the value of ``config.json``, which the drafter
    compares against, is then the instance attribute.
    """

    def get(name: str) -> Any:
        try:
            return getattr(config, name, None)
        except RuntimeError:
            return vars(config).get(name)

    return get
