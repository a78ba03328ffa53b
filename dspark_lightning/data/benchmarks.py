"""The benchmark prompt files: which file a suite name means, and the prompts in it.

A suite is named by a shipped file (``resources/eval_datasets/<name>.jsonl``, with a few aliases), by a path to a
JSONL file of ``{"turns": [...]}`` rows (named after its stem), or ``random`` (random token prompts, no file).
Validation reads them through :mod:`dspark_lightning.eval.suites`; ``regen`` reads them to keep their prompts out
of the training data (:mod:`.dedup`).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .conversations import iter_jsonl

ALIASES = {"arena-hard": "arena-hard-v2", "math": "math500", "mtbench": "mt-bench"}
RANDOM_SUITE = "random"


def shipped_suites() -> list[str]:
    """Names of the suites shipped with the package."""
    folder = resources.files("dspark_lightning") / "resources" / "eval_datasets"
    return sorted(p.name[: -len(".jsonl")] for p in folder.iterdir() if p.name.endswith(".jsonl"))


def suite_path(name: str) -> Path:
    """File of a shipped suite or a JSONL path."""
    candidate = Path(name)
    if candidate.suffix == ".jsonl" or candidate.is_file():
        if not candidate.is_file():
            raise FileNotFoundError(f"Suite file {candidate} does not exist.")
        return candidate
    name = ALIASES.get(name, name)
    path = resources.files("dspark_lightning") / "resources" / "eval_datasets" / f"{name}.jsonl"
    if not path.is_file():
        raise ValueError(f"Unknown suite {name!r}: give a JSONL path, '{RANDOM_SUITE}', or one of {shipped_suites()}.")
    return Path(str(path))


def suite_name(name: str) -> str:
    """Display name: the alias-resolved name, or the stem of a JSONL path."""
    if name == RANDOM_SUITE:
        return name
    candidate = Path(name)
    if candidate.suffix == ".jsonl" or candidate.is_file():
        return candidate.stem
    return ALIASES.get(name, name)


def read_first_turns(path: Path) -> list[str]:
    """First turn of every ``{"turns": [...]}`` row (a ``conversations`` row gives its first user message)."""
    turns = []
    for lineno, row in iter_jsonl(path):
        if "turns" in row and row["turns"]:
            turns.append(str(row["turns"][0]))
        elif "conversations" in row:
            turns.append(next(m["content"] for m in row["conversations"] if m.get("role") == "user"))
        else:
            raise ValueError(f"{path}:{lineno}: a suite row needs 'turns' (list of strings); got keys {sorted(row)}.")
    return turns


def suite_prompts(suites: list[str]) -> list[tuple[str, str]]:
    """``("<suite>:<line>", turn)`` for every turn of every row of the suites (all rows, not a sample)."""
    out = []
    for suite in suites:
        name, path = suite_name(suite), suite_path(suite)
        for lineno, row in iter_jsonl(path):
            turns = row.get("turns") or [m["content"] for m in row.get("conversations", []) if m.get("role") == "user"]
            if not turns:
                raise ValueError(f"{path}:{lineno}: a suite row needs 'turns'; got keys {sorted(row)}.")
            out.extend((f"{name}:{lineno}", str(turn)) for turn in turns)
    return out
