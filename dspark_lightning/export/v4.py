"""The DeepSeek-V4 flavour of the ``attached`` format: a ``dspark_v4`` drafter bundled into a V4 checkpoint.

SGLang 0.5.23 serves such a checkpoint as ``DeepseekV4ForCausalLMDSpark`` (``srt/models/deepseek_v4_dspark.py``):
when the target ``config.json`` carries ``dspark_block_size`` / ``dspark_markov_rank`` / ``dspark_noise_token_id`` /
``dspark_target_layer_ids`` (``dspark_config.checkpoint_bundles_dspark_draft``) it remaps the draft architecture and
loads every ``mtp.<i>.*`` tensor of the checkpoint into draft stage ``i`` (``_remap_dspark_weight_name``). So:

- the draft is written as ``mtp.<stage>.*`` (``drafters.dspark_v4.v4_to_mtp_names`` with ``stage_offset=0``; each
  stage's packed experts become ``E`` x ``w1/w2/w3`` tensors) into a new shard listed in
  ``model.safetensors.index.json``, and ``v4_config_keys`` go into the target ``config.json``;
- the target's own MTP module (the official checkpoints' ``mtp.0.*``: ``e_proj``, ``h_proj``, ``enorm``, ``hnorm``
  and a V4 block) would load into draft stage 0, so it is left out of the copy: a shard holding only MTP tensors is
  not copied, a shard mixing them with other target tensors is written anew (``<shard>-without-mtp.safetensors``)
  without them; the original files are never modified, every other shard is a hard link. The copy then serves
  DSpark speculative decoding, not the target's MTP (``--speculative-algorithm NEXTN/EAGLE``);
- reading back (:meth:`DeepseekV4Flavour.unbundle`, :meth:`DeepseekV4Flavour.drafter_config`) inverts both:
  ``mtp_to_v4_names`` (the frozen ``embed_tokens``/``lm_head`` copies come from the target's ``embed``/``head``) and
  the config rebuilt as ``algorithm="dspark_v4"`` with ``dspark_n_routed_experts`` / ``dspark_num_experts_per_tok``
  in ``v4_geometry``.

Not handled: FP8/FP4 quantisation. The official V4 checkpoints store FP8 (Flash: FP4 experts) weights with block
scales and SGLang builds the draft stages with the target's ``quantization_config``; the draft is written in
``--dtype`` (bf16 by default), unquantised. A checkpoint whose ``mtp.*`` draft carries ``.scale`` tensors is refused
on import.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from torch import Tensor

from ..drafters import DrafterConfig
from ..drafters.config import V4_DRAFT_OVERRIDES, V4_GEOMETRY_KEYS, V4_MODEL_TYPES
from .attached import FLAVOURS, AttachedFlavour
from .checkpoint import TrainedDrafter
from .common import check_geometry, drafter_config_from_json, exported_by

# Keys of the official DeepSeek-V4 config.json that SGLang 0.5.23 reads as attributes, with no default, when it
# builds the bundled draft (and the target): ``compress_ratios`` (one KV compression ratio per layer, MTP layers
# included: ``srt/configs/model_config.py`` for DeepseekV4ForCausalLMDSpark, ``srt/models/deepseek_v4.py``) and
# ``topk_method`` (``srt/models/deepseek_v2.py``, the MoE gate). transformers' DeepseekV4Config (what
# ``save_pretrained`` writes) has neither: it names the ratios by layer type (``compress_rates``, ``layer_types``).
SGLANG_V4_CONFIG_KEYS = ("compress_ratios", "topk_method")


def check_sglang_v4_keys(target_config: dict[str, Any], target_dir: Path) -> None:
    """Raise unless the target ``config.json`` has the keys SGLang's V4 code reads (they travel into the bundle).

    The values are the target's own and are not invented here: an official V4 config.json has them; a
    transformers-format one is refused with the values its own keys imply, to add after checking them.
    """
    missing = [k for k in SGLANG_V4_CONFIG_KEYS if target_config.get(k) is None]
    ratios = target_config.get("compress_ratios")
    layers = int(target_config.get("num_hidden_layers") or 0)
    if not missing and (not isinstance(ratios, list) or len(ratios) < layers):
        raise ValueError(f"The target {target_dir}/config.json has compress_ratios={ratios!r}; SGLang reads one "
                         f"ratio per layer ({layers} layers, then the MTP layers).")
    if not missing:
        return
    hint = ""
    rates, types = target_config.get("compress_rates"), target_config.get("layer_types")
    if "compress_ratios" in missing and isinstance(rates, dict) and isinstance(types, list):
        by_type = {"sliding_attention": 0, **rates}
        mtp = int(target_config.get("num_nextn_predict_layers") or 0)
        hint = (f" This looks like a transformers-format config (compress_rates by layer type): its layer_types give "
                f"compress_ratios = {[int(by_type.get(t, 0)) for t in types] + [0] * mtp} (0 for each of its "
                f"{mtp} MTP layers, as the official configs end), and the official V4 configs have topk_method "
                f"'noaux_tc'; check them against the model's official config.json.")
    raise ValueError(
        f"The target {target_dir}/config.json lacks {missing}, which SGLang 0.5.23 reads for DeepSeek-V4 (the bundle "
        f"keeps the target's config.json, so SGLang could not build the draft: AttributeError '{missing[0]}'). Export "
        f"against the official config.json of the V4 model, or add the keys to the target's config.json.{hint}"
    )


class DeepseekV4Flavour(AttachedFlavour):
    """``dspark_v4`` drafters in DeepSeek-V4 checkpoints: ``mtp.<stage>.*`` tensors, ``v4_config_keys``."""

    name = "deepseek_v4"
    layouts = ("bundled",)
    refused_layouts = {"subfolder": "SGLang reads a DeepSeek-V4 draft from the target's own mtp.* tensors only (it "
                                    "has no dspark/ subfolder class for V4); use attached_layout='bundled'"}
    weight_prefix = "mtp."
    drops_target_tensors = True
    dropped_what = ("the target's own MTP module (mtp.*); SGLang loads every mtp.<i>.* tensor of a DSpark-bundled "
                    "DeepSeek-V4 checkpoint into draft stage i, so it would overwrite the draft. The copy serves "
                    "DSpark speculative decoding, not the target's MTP (NEXTN/EAGLE)")

    def check(self, trained: TrainedDrafter, target_config: dict[str, Any], target_dir: Path) -> None:
        """A ``dspark_v4`` drafter that SGLang can serve, trained for this DeepSeek-V4 target's geometry."""
        from ..drafters.dspark_v4 import v4_config_keys

        cfg = trained.config
        if cfg.algorithm != "dspark_v4":
            raise ValueError(f"The deepseek_v4 attached flavour writes dspark_v4 drafters; this one is "
                             f"{cfg.algorithm!r}: use --flavour generic (the default for it).")
        model_type = target_config.get("model_type")
        if model_type not in V4_MODEL_TYPES:
            raise ValueError(f"The target {target_dir} has model_type={model_type!r}, but a dspark_v4 drafter is "
                             f"attached to a DeepSeek-V4 checkpoint (model_type in {V4_MODEL_TYPES}): pass the "
                             f"DeepSeek-V4 model directory it was trained for as --target_dir.")
        where = f"the target {target_dir}"
        check_geometry(cfg, target_config, where)
        mismatched = [(key, value, target_config[key]) for key, value in (
            [("head_dim", cfg.head_dim), ("moe_intermediate_size", cfg.intermediate_size)]
            + [(k, cfg.v4_geometry[k]) for k in V4_GEOMETRY_KEYS if k not in V4_DRAFT_OVERRIDES]
        ) if target_config.get(key) is not None and target_config[key] != value]
        if mismatched:
            key, ours, theirs = mismatched[0]
            raise ValueError(f"The drafter has {key}={ours} but {where} has {key}={theirs}: the drafter was trained "
                             f"for another DeepSeek-V4 model. Export it against the target it was trained with.")
        v4_config_keys(cfg)  # raises for what SGLang cannot serve (no Markov head, a layer id < 0)
        check_sglang_v4_keys(target_config, target_dir)
        if target_config.get("quantization_config"):
            method = (target_config["quantization_config"] or {}).get("quant_method", "?")
            warnings.warn(
                f"The target {target_dir} is quantised (quantization_config quant_method={method!r}); the draft is "
                f"written unquantised (--dtype). SGLang builds the draft stages with the target's quantization "
                f"config, so it may not load these tensors as they are: quantising the draft is not implemented "
                f"(docs/deepseek_v4.md). The copy still loads in transformers and load_drafter.", stacklevel=4,
            )

    def draft_directory(self, trained: TrainedDrafter, target_config: dict[str, Any],
                        dtype: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
        raise ValueError("The deepseek_v4 flavour has the bundled layout only (SGLang reads a V4 draft from the "
                         "target's own mtp.* tensors).")

    def bundle_tensors(self, trained: TrainedDrafter, target_config: dict[str, Any],
                       dtype: str) -> dict[str, Tensor]:
        """``mtp.<stage>.*`` tensors of the draft (stage 0 = draft stage 0; no embed/head: the target's serve)."""
        from ..drafters.dspark_v4 import v4_to_mtp_names

        return v4_to_mtp_names(trained.state_dict, stage_offset=0)

    def unbundle(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """DSparkV4 names of a checkpoint's ``mtp.*`` draft tensors (without the target-shared embed/head)."""
        from ..drafters.dspark_v4 import mtp_to_v4_names

        scales = sorted(n for n in tensors if n.endswith(".scale"))
        if scales:
            raise ValueError(f"The bundled draft is quantised ({len(scales)} block-scale tensors, e.g. {scales[0]!r}): "
                             f"reading FP8/FP4 draft weights is not supported; dequantise them first.")
        return mtp_to_v4_names(tensors, stage_offset=0)

    def config_keys(self, cfg: DrafterConfig) -> dict[str, Any]:
        """SGLang's keys (``v4_config_keys``), then ours: the flavour and the full drafter config."""
        from ..drafters.dspark_v4 import v4_config_keys

        return {**v4_config_keys(cfg), "dspark_flavour": self.name,
                "dspark_exported_by": exported_by(cfg, "attached-bundled")}

    def drafter_config(self, config: dict[str, Any]) -> DrafterConfig:
        """The ``dspark_v4`` config of a V4 ``config.json`` carrying a bundle (the target geometry is that file's)."""
        missing = [k for k in ("dspark_block_size", "dspark_noise_token_id", "dspark_target_layer_ids")
                   if config.get(k) is None]
        if missing:
            raise ValueError(f"The DeepSeek-V4 config.json bundles a DSpark draft but lacks {missing}.")
        ids = [int(i) for i in config["dspark_target_layer_ids"]]
        rank = int(config.get("dspark_markov_rank") or 0)
        overrides = {k: config[f"dspark_{k}"] for k in V4_DRAFT_OVERRIDES if config.get(f"dspark_{k}")}
        fields = {
            "algorithm": "dspark_v4", "num_hidden_layers": len(ids), "target_layer_ids": ids,
            "block_size": int(config["dspark_block_size"]), "mask_token_id": int(config["dspark_noise_token_id"]),
            "markov_rank": rank, "markov_head_type": config.get("dspark_markov_head_type") or "vanilla",
            "enable_confidence_head": bool(config.get("enable_confidence_head", False)),
            "confidence_head_with_markov": bool(config.get("confidence_head_with_markov", False)),
            "block_layout": "deepspec", "v4_geometry": overrides or None,
        }
        data = {**config, "num_target_layers": config.get("num_hidden_layers"),
                "exported_by": config.get("dspark_exported_by")}
        return drafter_config_from_json(data, fields, compare=("block_size", "mask_token_id", "target_layer_ids",
                                                               "num_hidden_layers", "v4_geometry"))


FLAVOURS[DeepseekV4Flavour.name] = DeepseekV4Flavour()
