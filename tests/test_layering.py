"""The package's one-way import layering (docs/design.md, "Package layers"), checked statically with `ast`.

A layer may import itself and the layers before it in `LAYER_ORDER`; `cli`/`__main__` may import
everything. `kernels` is a leaf: any layer may import it, it imports no other layer. The package
`__init__.py` runs on every `import dspark_lightning.<anything>`, so it is held to the drafters' rules.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "dspark_lightning"
REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = REPO_ROOT / PACKAGE

# decoding sits below data: it needs only drafters and targets, and regen generates through its engine (issue 24).
LAYER_ORDER = (
    "drafters", "losses", "targets", "decoding", "data", "modules", "eval", "export", "kernels", "cli",
)  # fmt: skip
LEAF_LAYER = "kernels"
ROOT = "<package __init__>"
LAYER_ALIASES = {"__main__": "cli", "__init__": ROOT}

# Third-party imports banned from the drafters (and the package root, which every import runs).
DRAFTER_FORBIDDEN = ("lightning", "pytorch_lightning", "webdataset", "transformers", "sglang")
# Narrow exception (issue 8): the DeepSeek-V4 drafter is composed from transformers' own V4 blocks, so that one file
# may import that one model package, and nothing else of transformers.
DRAFTER_TRANSFORMERS_EXCEPTIONS = {"drafters/dspark_v4.py": "transformers.models.deepseek_v4"}
NO_DISTRIBUTED = ("losses", "drafters")  # CONTRIBUTING.md: the LightningModule reduces, not these


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    source: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: `{self.source}` — {self.reason}"


def _layer_of_file(rel: Path) -> str:
    name = rel.parts[0].removesuffix(".py")
    return LAYER_ALIASES.get(name, name)


def _package_of_file(rel: Path) -> str:
    """Dotted package a file's relative imports are resolved against."""
    return ".".join((PACKAGE, *rel.parts[:-1]))


def _imported_modules(tree: ast.AST, package: str) -> list[tuple[int, str]]:
    """(line, absolute dotted name) for every import, including those inside functions.

    `from X import y` yields both `X` and `X.y`, because `y` may be a submodule
    (`from dspark_lightning import data`, `from torch import distributed`).
    """
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def _import_allowed(src: str, dst: str) -> bool:
    if dst == src or src == "cli" or dst == ROOT:
        return True
    if src == ROOT:
        return dst in (LAYER_ORDER[0], LEAF_LAYER)
    if src == LEAF_LAYER:
        return False
    if dst == LEAF_LAYER:
        return True
    return LAYER_ORDER.index(dst) < LAYER_ORDER.index(src)


def _top_level_names(package_dir: Path) -> set[str]:
    return {p.relative_to(package_dir).parts[0].removesuffix(".py") for p in package_dir.rglob("*.py")}


def find_violations(package_dir: Path) -> list[Violation]:
    """Every import in `package_dir` that breaks the layering or a third-party ban."""
    # Layers named in LAYER_ORDER count even before their files exist (the synthetic trees below).
    known = _top_level_names(package_dir) | set(LAYER_ORDER) | set(LAYER_ALIASES)
    violations: list[Violation] = []
    for path in sorted(package_dir.rglob("*.py")):
        rel = path.relative_to(package_dir)
        src = _layer_of_file(rel)
        if src != ROOT and src not in LAYER_ORDER:
            continue  # reported by test_every_module_belongs_to_a_layer
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        reasons: dict[tuple[int, str], None] = {}  # ordered set: one message per line and reason
        for line, reason in _file_problems(ast.parse(text, filename=str(path)), rel, src, known):
            reasons.setdefault((line, reason))
        violations += [
            Violation(f"{PACKAGE}/{rel.as_posix()}", line, lines[line - 1].strip(), reason)
            for line, reason in reasons
        ]
    return violations


def _file_problems(tree: ast.AST, rel: Path, src: str, known: set[str]) -> list[tuple[int, str]]:
    no_distributed = f"no torch.distributed in `{src}`; reduce in the LightningModule (sync_dist)"
    problems: list[tuple[int, str]] = []
    for line, module in _imported_modules(tree, _package_of_file(rel)):
        parts = module.split(".")
        if parts[0] == PACKAGE:
            # `from dspark_lightning import __version__` names an attribute of the root, not a layer.
            dst = LAYER_ALIASES.get(parts[1], parts[1]) if len(parts) > 1 and parts[1] in known else ROOT
            if (dst == ROOT or dst in LAYER_ORDER) and not _import_allowed(src, dst):
                reason = f"layer `{src}` must not import `{dst}` (allowed: {_allowed_text(src)})"
                problems.append((line, reason))
        elif parts[0] == "sglang":
            problems.append((line, f"{PACKAGE} never imports sglang; SGLang code lives in serving/"))
        elif src in ("drafters", ROOT) and parts[0] in DRAFTER_FORBIDDEN and not _excepted(rel, module):
            who = "drafters are pure torch modules" if src == "drafters" else "the root runs on every import"
            problems.append((line, f"{who}; `{parts[0]}` belongs higher up"))
        elif src in NO_DISTRIBUTED and (module + ".").startswith("torch.distributed."):
            problems.append((line, no_distributed))
    if src in NO_DISTRIBUTED:  # `import torch` then `torch.distributed.all_reduce(...)`
        problems += [
            (node.lineno, no_distributed)
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            and node.attr == "distributed"
            and isinstance(node.value, ast.Name)
            and node.value.id == "torch"
        ]
    return sorted(problems)


def _excepted(rel: Path, module: str) -> bool:
    allowed = DRAFTER_TRANSFORMERS_EXCEPTIONS.get(rel.as_posix())
    return allowed is not None and (module == allowed or module.startswith(allowed + "."))


def _allowed_text(src: str) -> str:
    if src == ROOT:
        return f"{LAYER_ORDER[0]}, {LEAF_LAYER}"
    if src == LEAF_LAYER:
        return "torch, triton"
    below = [name for name in LAYER_ORDER[: LAYER_ORDER.index(src)] if name != LEAF_LAYER]
    return ", ".join([*below, LEAF_LAYER]) if below else LEAF_LAYER


def test_package_respects_layering() -> None:
    violations = find_violations(PACKAGE_DIR)
    assert not violations, "import layering broken (docs/design.md, Package layers):\n" + "\n".join(
        map(str, violations)
    )


def test_every_module_belongs_to_a_layer() -> None:
    unassigned = sorted(
        name
        for name in _top_level_names(PACKAGE_DIR)
        if LAYER_ALIASES.get(name, name) not in (*LAYER_ORDER, ROOT)
    )
    assert not unassigned, (
        f"{PACKAGE}/{{{', '.join(unassigned)}}} belong to no layer; add each to LAYER_ORDER in "
        "tests/test_layering.py at its place in docs/design.md's package layers, or move it into a layer"
    )


@pytest.mark.parametrize(
    ("rel_path", "source", "reason_part"),
    [
        (
            "drafters/dspark.py",
            "from ..modules import DrafterModule\n",
            "`drafters` must not import `modules`",
        ),
        ("drafters/dspark.py", "import lightning as L\n", "`lightning` belongs higher up"),
        ("drafters/dspark.py", "def f():\n    from transformers import AutoModel\n", "`transformers`"),
        ("drafters/dspark_v4.py", "from transformers import AutoModel\n", "`transformers`"),  # exception is narrow
        ("losses.py", "from dspark_lightning.data import cache\n", "`losses` must not import `data`"),
        ("losses.py", "import torch.distributed as dist\n", "no torch.distributed in `losses`"),
        ("losses.py", "import torch\nx = torch.distributed.get_rank()\n", "no torch.distributed"),
        ("losses.py", "from torch import distributed\n", "no torch.distributed"),
        ("data/cache.py", "from .. import modules\n", "`data` must not import `modules`"),
        ("eval/report.py", "from sglang.srt import server\n", "never imports sglang"),
        ("kernels/softmax.py", "from ..drafters import _layers\n", "`kernels` must not import `drafters`"),
        ("__init__.py", "from .modules import DrafterModule\n", "must not import `modules`"),
        ("__init__.py", "import lightning\n", "`lightning` belongs higher up"),
    ],
)
def test_checker_flags(tmp_path: Path, rel_path: str, source: str, reason_part: str) -> None:
    _write_tree(tmp_path, {rel_path: source})
    violations = find_violations(tmp_path)
    assert [v for v in violations if reason_part in v.reason], violations
    assert all(v.path == f"{PACKAGE}/{rel_path}" and v.line >= 1 for v in violations)


def test_checker_accepts_allowed_imports(tmp_path: Path) -> None:
    _write_tree(
        tmp_path,
        {
            "__init__.py": "from .drafters import DSpark\n__version__ = '0'\n",
            "drafters/dspark.py": "import torch\nfrom .config import DrafterConfig\nfrom .. import kernels\n",
            "losses.py": "from .drafters.dflash import Output\nfrom dspark_lightning import __version__\n",
            "modules/module.py": "import lightning as L\nfrom ..losses import x\nfrom ..targets import y\n",
            "eval/suites.py": "from ..decoding import engine\nfrom ..data import conversations\n",
            "data/regen.py": "from ..decoding import SpeculativeEngine\nfrom ..targets import TargetConfig\n",
            "kernels/softmax.py": "import triton\nfrom .reference import softmax\n",
            "cli.py": "from .export import write\nfrom .kernels import softmax\n",
            "__main__.py": "from .cli import main\n",
        },
    )
    assert find_violations(tmp_path) == []


def _write_tree(root: Path, files: dict[str, str]) -> None:
    for rel, source in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source, encoding="utf-8")


def test_resources_are_package_data() -> None:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject.get("tool", {}).get("setuptools", {}).get("package-data", {}).get(PACKAGE, [])
    assert any(p.rstrip("/") == "resources" or p.startswith("resources/") for p in patterns), (
        f"pyproject.toml [tool.setuptools.package-data] {PACKAGE} = {patterns!r} does not ship "
        f'{PACKAGE}/resources; add "resources/**/*"'
    )
