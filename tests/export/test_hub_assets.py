"""The remote code of ``hf`` exports: the wrappers of ``hub/`` plus every drafter module, copied with local imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from dspark_lightning.export import hf

REPO = Path(__file__).resolve().parents[2]


def test_hub_assets_are_package_data_through_the_symlink():
    assert hf.hub_dir().resolve() == (REPO / "hub").resolve()
    for name in ("configuration_dspark_lightning.py", "modeling_dspark_lightning.py", "model_card.md"):
        assert (hf.hub_dir() / name).is_file()


def test_remote_code_is_the_drafter_modules_the_wrapper_needs_with_local_imports(tmp_path):
    written = hf.write_remote_code(tmp_path)
    for module in ("config", "_layers", "blocks", "dflash", "dspark", "eagle3", "protocol", "registry"):
        assert f"{hf.shipped_name(module)}.py" in written, module
    assert "drafter_dspark_v4.py" not in written  # not imported by the wrapper: only what loads ships
    assert {"configuration_dspark_lightning.py", "modeling_dspark_lightning.py"} <= set(written)
    shipped = {Path(name).stem for name in written}
    for name in written:
        tree = ast.parse((tmp_path / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.module in shipped, (name, node.module)  # resolvable inside the repo
            if isinstance(node, ast.ImportFrom) and not node.level:
                assert not (node.module or "").startswith("dspark_lightning"), name
    source = (REPO / "dspark_lightning" / "drafters" / "dspark.py").read_text()
    copy = (tmp_path / "drafter_dspark.py").read_text()
    assert copy.splitlines()[1:] == source.replace("from .dflash import", "from .drafter_dflash import").replace(
        "from ._layers import", "from .drafter_layers import").replace(
        "from .config import", "from .drafter_config import").replace(
        "from .protocol import", "from .drafter_protocol import").replace(
        "from .blocks import", "from .drafter_blocks import").splitlines()  # verbatim apart from the imports


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("from .missing import x\n", "not a drafter module"),
        ("from .. import losses\n", "cannot localise"),
        ("from dspark_lightning.targets import x\n", "imports the package itself"),
        ("import dspark_lightning\n", "imports the package itself"),
    ],
)
def test_localize_refuses_imports_it_cannot_ship(source, message):
    with pytest.raises(ValueError, match=message):
        hf.localize("dspark", source, {"dspark", "config"})
