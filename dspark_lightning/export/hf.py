"""``hf``: a standalone Hugging Face repository that loads with ``AutoModel.from_pretrained(dir,
trust_remote_code=True)``.

The repository holds ``config.json`` (``model_type: dspark_lightning``, ``architectures``, ``auto_map`` pointing
at the shipped code, the drafter config under ``drafter``), ``model.safetensors`` under the drafter's own
parameter names, and the remote code: the thin wrappers of ``hub/`` plus the package's drafter sources, copied at
export time as ``drafter_<name>.py`` with their relative imports rewritten to those copies (one source of truth:
what loads on the Hub is the code that trained the weights).
"""

from __future__ import annotations

import ast
import importlib.resources
import re
from pathlib import Path
from typing import Any

from ..drafters import DrafterConfig
from .common import package_version

MODEL_TYPE = "dspark_lightning"
ARCHITECTURE = "DSparkLightningDrafter"
CONFIG_MODULE = "configuration_dspark_lightning"
MODELING_MODULE = "modeling_dspark_lightning"
AUTO_MAP = {"AutoConfig": f"{CONFIG_MODULE}.DSparkLightningConfig", "AutoModel": f"{MODELING_MODULE}.{ARCHITECTURE}"}
_RELATIVE_IMPORT = re.compile(r"^(\s*from\s+)\.(\w+)(\s+import\b)", flags=re.MULTILINE)
_RELATIVE_IMPORT_NAMES = re.compile(r"^\s*from\s+\.(\w+)\s+import\b", flags=re.MULTILINE)


def hub_dir() -> Path:
    """The shipped assets: ``hub/`` at the repository root, package data as ``dspark_lightning/resources/hub``."""
    path = Path(str(importlib.resources.files("dspark_lightning") / "resources" / "hub"))
    if not (path / f"{MODELING_MODULE}.py").is_file():
        raise FileNotFoundError(f"The Hub assets are missing from {path}; reinstall dspark_lightning.")
    return path


def drafter_sources() -> dict[str, str]:
    """Module name -> source of every drafter module (``drafters/*.py`` except ``__init__``)."""
    package = Path(str(importlib.resources.files("dspark_lightning") / "drafters"))
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted(package.glob("*.py")) if p.stem != "__init__"}


def shipped_name(module: str) -> str:
    """File stem of a drafter module inside an exported repo: ``_layers`` -> ``drafter_layers``."""
    return f"drafter_{module.lstrip('_')}"


def localize(module: str, source: str, known: set[str]) -> str:
    """Rewrite ``from .X import`` to the shipped copies and refuse any other package-relative import form."""

    def repl(match: re.Match[str]) -> str:
        target = match.group(2)
        if target not in known:
            raise ValueError(f"drafters/{module}.py imports .{target}, which is not a drafter module; the Hub copy "
                             f"could not resolve it.")
        return f"{match.group(1)}.{shipped_name(target)}{match.group(3)}"

    rewritten = _RELATIVE_IMPORT.sub(repl, source)
    for node in ast.walk(ast.parse(rewritten)):
        relative = isinstance(node, ast.ImportFrom) and node.level > 0
        if relative and (node.level > 1 or not (node.module or "").startswith("drafter_")):
            raise ValueError(f"drafters/{module}.py has an import the exporter cannot localise (line {node.lineno}).")
        absolute = isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("dspark")
        if absolute or (isinstance(node, ast.Import) and any(a.name.startswith("dspark") for a in node.names)):
            raise ValueError(f"drafters/{module}.py imports the package itself (line {node.lineno}); drafters must "
                             f"import torch and sibling modules only.")
    header = (f"# Copied from dspark_lightning/drafters/{module}.py (dspark_lightning {package_version()}) at export "
              f"time; imports rewritten to the sibling copies.\n")
    return header + rewritten


def shipped_modules(sources: dict[str, str], wrapper_source: str) -> list[str]:
    """Drafter modules the wrapper needs: those it imports, and what they import, transitively."""
    by_shipped = {shipped_name(m): m for m in sources}
    todo = [by_shipped[n] for n in _RELATIVE_IMPORT_NAMES.findall(wrapper_source) if n in by_shipped]
    needed: list[str] = []
    while todo:
        module = todo.pop()
        if module in needed:
            continue
        needed.append(module)
        todo += [m for m in _RELATIVE_IMPORT_NAMES.findall(sources[module]) if m in sources]
    return sorted(needed)


def write_remote_code(stage: Path) -> list[str]:
    """Write the wrappers and the localised drafter sources they need into ``stage``; returns the file names."""
    sources = drafter_sources()
    assets = hub_dir()
    wrapper = (assets / f"{MODELING_MODULE}.py").read_text(encoding="utf-8")
    written = []
    for module in shipped_modules(sources, wrapper):
        name = f"{shipped_name(module)}.py"
        (stage / name).write_text(localize(module, sources[module], set(sources)), encoding="utf-8")
        written.append(name)
    for module in (CONFIG_MODULE, MODELING_MODULE):
        name = f"{module}.py"
        (stage / name).write_text((assets / name).read_text(encoding="utf-8"), encoding="utf-8")
        written.append(name)
    return written


def hf_config(cfg: DrafterConfig, dtype: str, target: dict[str, Any] | None) -> dict[str, Any]:
    """``config.json`` of an ``hf`` export."""
    config: dict[str, Any] = {
        "model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], "auto_map": dict(AUTO_MAP),
        "drafter": cfg.to_dict(), "tie_word_embeddings": False, "dtype": dtype,
        "exported_by": {"library": "dspark_lightning", "version": package_version(), "format": "hf"},
    }
    if target and target.get("path"):
        config["target"] = {"path": target["path"]}
    return config


def missing_remote_code(directory: Path, config: dict[str, Any]) -> list[str]:
    """Files ``AutoModel.from_pretrained(directory, trust_remote_code=True)`` imports that ``directory`` lacks: the
    modules ``auto_map`` names and, transitively, the sibling modules they import."""
    todo = [f"{ref.split('.', 1)[0]}.py" for ref in (config.get("auto_map") or {}).values()]
    if not todo:
        return ["config.json auto_map (it names no remote code)"]
    seen: set[str] = set()
    missing: list[str] = []
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = Path(directory) / name
        if not path.is_file():
            missing.append(name)
            continue
        todo += [f"{m}.py" for m in _RELATIVE_IMPORT_NAMES.findall(path.read_text(encoding="utf-8"))]
    return sorted(missing)


def is_hf_export(config: dict[str, Any]) -> bool:
    return config.get("model_type") == MODEL_TYPE and isinstance(config.get("drafter"), dict)
