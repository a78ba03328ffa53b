"""dspark_sglang reads exported directories only: it never imports the training package."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dspark_sglang"


def test_no_dspark_lightning_import() -> None:
    offenders = []
    for file in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{file.name}:{node.lineno} {n}" for n in names if n.split(".")[0] == "dspark_lightning"]
    assert not offenders, offenders


def test_launch_and_export_reader_do_not_import_sglang() -> None:
    """The launcher builds commands without SGLang or torch (fast, usable from any interpreter)."""
    for name in ("launch.py", "export_dir.py"):
        tree = ast.parse((PACKAGE / name).read_text())
        modules = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        modules |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not modules & {"sglang", "torch"}, (name, modules)
