"""The serve commands in the docs are the ones ``dspark_sglang.launch`` builds (no SGLang import, no server start).

``serving/README.md`` and ``docs/export.md`` show each example as a launcher call followed by the SGLang command it
runs. Here every such pair is replayed: the example exports the docs name (``exports/...``) are written as tiny
exports with the settings the docs describe (gamma, heads, calibration, dtype), the launcher call is built with
:func:`dspark_sglang.launch.build_command`, and its command must equal the documented one token for token.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import tiny_exports

from dspark_sglang.launch import build_command, parser

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "serving" / "README.md", REPO / "docs" / "export.md"]
STS7 = [1.2, 1.1, 1.0, 1.0, 0.9, 0.9, 0.8]


def _dspark_attached(path: Path, **kw) -> Path:
    tiny_exports.write_target(path)
    tiny_exports.write_dspark(path / "dspark", **kw)
    return path


def _float32(path: Path) -> Path:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "torch_dtype": "float32"}))
    return path


# The example exports the docs name, with the settings their text gives them.
EXAMPLES = {
    "exports/qwen3-8b-dspark": lambda p: tiny_exports.write_dspark(p, gamma=7, sts=STS7),
    "exports/smollm2-dspark": lambda p: tiny_exports.write_dspark(p, gamma=7, target_model_type="llama"),
    "exports/qwen3-8b-dflash-deepspec": lambda p: tiny_exports.write_dspark(
        p, markov_rank=1, zero_markov=True, confidence=False, confidence_with_markov=False),
    "exports/qwen3-8b-dflash": lambda p: tiny_exports.write_dflash_zlab(p, block_size=16),
    "exports/llama-8b-eagle3": lambda p: tiny_exports.write_eagle3(p, ttt_length=7),
    "exports/qwen3-8b-attached": lambda p: _dspark_attached(p, gamma=7),
    "exports/qwen3-8b-dspark-fp32": lambda p: _float32(tiny_exports.write_dspark(p, gamma=7)),
}
SPS_TABLE = {"sample_batch_tokens": [8, 16, 32], "sample_steps_per_sec": [90.0, 80.0, 50.0], "max_batch_tokens": 32}


def _pairs(doc: Path) -> list[tuple[str, str]]:
    """(launcher call, SGLang command) of every fenced block line pair in ``doc``; continuation lines joined."""
    pairs = []
    for block in re.findall(r"^```[\w-]*\n(.*?)^```", doc.read_text(), flags=re.S | re.M):
        lines = [ln for ln in block.replace("\\\n", " ").splitlines() if ln.strip() and not ln.startswith("#")]
        for i, line in enumerate(lines[:-1]):
            if line.startswith("python -m dspark_sglang.launch"):
                pairs.append((line, lines[i + 1]))
    return pairs


def _documented() -> list[tuple[str, str, str]]:
    return [(doc.relative_to(REPO).as_posix(), call, command) for doc in DOCS for call, command in _pairs(doc)]


@pytest.fixture()
def example_exports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for name, write in EXAMPLES.items():
        write(Path(name))
    return tmp_path


def test_docs_show_launcher_pairs_for_every_example() -> None:
    documented = _documented()
    named = {re.search(r"--drafter (\S+)", call)[1] for _, call, _ in documented}
    assert named == set(EXAMPLES), named ^ set(EXAMPLES)
    assert {doc for doc, _, _ in documented} == {"serving/README.md", "docs/export.md"}


@pytest.mark.parametrize(("doc", "call", "command"), _documented(), ids=lambda x: x if len(x) < 40 else None)
def test_documented_command_is_the_launchers(doc: str, call: str, command: str, example_exports: Path) -> None:
    args, extra = parser().parse_known_args(shlex.split(call)[3:])
    if args.sps_table:
        Path(args.sps_table).write_text(json.dumps(SPS_TABLE))
    built = build_command(args.drafter, args.target, mode=args.mode, sps_table=args.sps_table, sts=args.sts,
                          extra=extra[1:] if extra[:1] == ["--"] else extra, python="python")
    assert shlex.split(command) == shlex.split(built.shell()), f"{doc}: {call}"
