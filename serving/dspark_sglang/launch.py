"""Start ``python -m sglang.launch_server`` for an exported drafter, with the flags its metadata implies.

    python -m dspark_sglang.launch --target PATH --drafter EXPORT_DIR [--mode static|cap-accept|compact]
        [--sps-table F] [--sts F] [--dry-run] [-- sglang args...]

One command per export, from what the drafter was trained with (SGLang 0.5.23's flags:
``python/sglang/srt/arg_groups/fields/spec.py``, ``python/sglang/srt/arg_groups/speculative_hook.py``,
``launch_server --help``). The model card dspark_lightning writes gives the same command, flag for flag
(``dspark_lightning/export/serve_command.py``; ``serving/tests/test_our_exports.py`` compares them):
- DSpark: ``--speculative-algorithm DSPARK``, ``--speculative-dspark-block-size`` gamma (config ``block_size``) and
  ``--speculative-num-draft-tokens`` gamma + 1; env ``SGLANG_RAGGED_VERIFY_MODE`` = ``--mode``. With
  confidence scheduling (``cap-accept``/``compact``, which need the exported confidence head) also the SPS cost
  table (``--sps-table``, or ``sps.json`` in the export; SGLang's ``SpsCostTable`` format) and the STS calibration
  (``--sts``, or ``calibration.json`` in the export), both checked before SGLang starts.
- DFlash: ``--speculative-algorithm DFLASH``, ``--speculative-num-draft-tokens`` = config ``block_size``.
- Eagle3: ``--speculative-algorithm EAGLE3``, and the chain the drafter was trained to unroll:
  ``--speculative-num-steps`` ``ttt_length``, ``--speculative-eagle-topk 1``, ``--speculative-num-draft-tokens``
  ``ttt_length + 1`` (SGLang's defaults, 3 / 1 / 4 for most targets, only when the config has no ``ttt_length``).
- ``--dtype``: the dtype the draft ``config.json`` records (SGLang's ``auto`` would serve a float32 export as float16;
  SGLang has one ``--dtype`` for target and draft).
- Attached checkpoints (a ``dspark/`` subfolder or ``dspark_*`` keys in the target config): ``--model-path`` is the
  export and SGLang finds the draft itself; ``--target`` is then optional.
- A plugin architecture (``DSparkLightningDraftModel`` / ``DFlashLightningDraftModel``): the command is refused unless
  the interpreter (``--python``) has this package's ``sglang.srt.plugins`` entry point, so a missing plugin is named
  here instead of SGLang's "Cannot find model module".

Extra arguments go to SGLang unchanged; a flag given there replaces the one this command would set.
The full command is printed before it runs; ``--dry-run`` only prints it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dspark_sglang.export_dir import ExportError, ExportInfo, check_sps_table, check_sts_file, read_export

MODES = ("static", "cap-accept", "compact")
RAGGED_VERIFY_ENV = "SGLANG_RAGGED_VERIFY_MODE"
PLUGIN_ENTRY_POINT = "dspark_lightning"  # [project.entry-points."sglang.srt.plugins"] of serving/pyproject.toml
PLUGIN_INSTALL = "pip install ./serving (from the dspark_lightning repository)"


@dataclass
class LaunchCommand:
    """``argv`` to execute with ``env`` (only the variables this command sets; the rest are inherited)."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def shell(self) -> str:
        """The command as one copy-pasteable shell line."""
        prefix = [f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items())]
        return " ".join(prefix + [shlex.quote(a) for a in self.argv])


def _flag_names(args: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in args if a.startswith("--")}


def build_command(drafter: str | Path, target: str | Path | None = None, *, mode: str = "static",
                  sps_table: str | Path | None = None, sts: str | Path | None = None,
                  extra: list[str] | None = None, python: str = sys.executable) -> LaunchCommand:
    """The ``sglang.launch_server`` command serving ``drafter`` (an export directory) beside ``target``.

    Args:
        drafter: Export directory (draft directory or attached checkpoint).
        target: Target model path or Hub id; optional for attached checkpoints.
        mode: DSpark ragged-verify mode: ``static`` verifies every draft token; ``compact`` verifies only the
            tokens the confidence scheduler keeps (needs the confidence head); ``cap-accept`` verifies all and
            caps acceptance at the schedule (measurement).
        sps_table: SPS cost table JSON in SGLang's format (``python -m dspark_lightning profile-sps ... --format
            sglang`` or ``python -m sglang.benchmark.dspark_sps_profiler``); default: ``sps.json`` in the export, if
            present.
        sts: STS temperature calibration JSON (gamma temperatures); default: ``calibration.json`` (or
            ``sts.json``) in the export, if present.
        extra: Further ``sglang.launch_server`` arguments; they override the flags set here.
        python: Interpreter that has SGLang installed.

    Raises:
        ExportError: the export cannot be served as asked; the message names the fix.
    """
    info = read_export(drafter)
    extra = list(extra or [])
    if mode not in MODES:
        raise ExportError(f"--mode {mode!r}; valid: {', '.join(MODES)}.")
    notes: list[str] = []
    ours: list[tuple[str, str | None]] = []  # (flag, value or None for a switch)
    env: dict[str, str] = {}

    if info.layout == "draft":
        if target is None:
            raise ExportError(f"{info.path} is a draft directory; pass the target model with --target.")
        ours += [("--model-path", str(target)), ("--speculative-draft-model-path", str(info.draft_dir))]
    else:
        ours.append(("--model-path", str(target) if target is not None else str(info.path)))
        if target is not None and Path(target).resolve() != info.path.resolve():
            # A separate target copy: point SGLang at the attached draft explicitly.
            if info.layout == "attached-subfolder":
                ours.append(("--speculative-draft-model-path", str(info.draft_dir)))
            else:
                raise ExportError(
                    f"{info.path} bundles the draft in the target config (dspark_* keys); SGLang loads it from the "
                    "target checkpoint itself. Drop --target or pass the export as --target."
                )
        if info.layout == "attached-config" and info.architecture != "DeepseekV4ForCausalLM":
            raise ExportError(
                f"{info.path}: SGLang 0.5.23 loads a draft bundled through dspark_* config keys only for "
                f"DeepseekV4ForCausalLM targets (got {info.architecture}). Export the attached checkpoint with the "
                "draft in a dspark/ subfolder instead."
            )
    ours.append(("--speculative-algorithm", info.algorithm))
    ours += speculative_flags(info, notes)
    if info.dtype is not None:
        ours.append(("--dtype", info.dtype))

    if info.algorithm == "DSPARK":
        env[RAGGED_VERIFY_ENV] = mode
        if mode != "static":
            if not info.has_confidence_head:
                raise ExportError(
                    f"--mode {mode} schedules verification from the confidence head, but {info.draft_dir}/config.json "
                    "has enable_confidence_head false or missing. Export the drafter with its trained confidence "
                    "head, or serve with --mode static."
                )
            sps = Path(sps_table) if sps_table else info.sps_path
            if sps is not None:
                check_sps_table(sps)
                ours.append(("--speculative-dspark-sps-table-path", str(sps)))
            else:
                notes.append(
                    "no SPS cost table: SGLang's verify budget degenerates to verify-all. Profile one on the serving "
                    "GPU (python -m dspark_lightning profile-sps ... --format sglang, or python -m "
                    "sglang.benchmark.dspark_sps_profiler) and pass --sps-table."
                )
            sts_file = Path(sts) if sts else info.sts_path
            if sts_file is not None:
                check_sts_file(sts_file, info.gamma)
                ours.append(("--speculative-dspark-confidence-sts-path", str(sts_file)))
        elif sps_table or sts:
            notes.append("--mode static verifies every draft token; the SPS table / STS file are not passed.")
    elif mode != "static" or sps_table or sts:
        raise ExportError(
            f"{info.algorithm} verifies the whole draft; --mode/--sps-table/--sts apply to DSpark exports only."
        )

    overridden = _flag_names(extra)
    argv = [python, "-m", "sglang.launch_server"]
    for flag, value in ours:
        if flag in overridden:
            notes.append(f"{flag} taken from the extra arguments, not from the export.")
            continue
        argv += [flag] if value is None else [flag, value]
    if info.needs_plugin:
        notes.append(
            f"architecture {info.architecture} comes from the dspark_sglang plugin: install this package "
            "(pip install ./serving) in the serving environment so SGLang loads it."
        )
    return LaunchCommand(argv=argv + extra, env=env, notes=notes)


def speculative_flags(info: ExportInfo, notes: list[str]) -> list[tuple[str, str | None]]:
    """The algorithm's flags after ``--speculative-algorithm`` (module docstring)."""
    if info.algorithm == "DSPARK":
        return [("--speculative-dspark-block-size", str(info.gamma)),
                ("--speculative-num-draft-tokens", str(info.num_draft_tokens))]
    if info.algorithm == "DFLASH":
        return [("--speculative-num-draft-tokens", str(info.num_draft_tokens))]
    if info.gamma is None:
        notes.append("the Eagle3 config has no ttt_length (the chain it was trained for): SGLang picks "
                     "--speculative-num-steps / --speculative-eagle-topk / --speculative-num-draft-tokens by target "
                     "architecture (3 / 1 / 4 for most). Pass them after -- to serve it as trained.")
        return []
    return [("--speculative-num-steps", str(info.gamma)), ("--speculative-eagle-topk", "1"),
            ("--speculative-num-draft-tokens", str(info.num_draft_tokens))]


def plugin_problem(python: str) -> str | None:
    """Why SGLang run by ``python`` would not load this package's plugin (None: it would).

    SGLang loads ``sglang.srt.plugins`` entry points of the interpreter's environment, restricted to
    ``SGLANG_PLUGINS`` when that is set (``srt/plugins/__init__.py``).
    """
    allowed = os.environ.get("SGLANG_PLUGINS")
    if allowed is not None and PLUGIN_ENTRY_POINT not in [n.strip() for n in allowed.split(",")]:
        return f"SGLANG_PLUGINS={allowed!r} does not include {PLUGIN_ENTRY_POINT!r}"
    probe = (f"import importlib.metadata as m; print(any(e.name == {PLUGIN_ENTRY_POINT!r} for e in "
             "m.entry_points(group='sglang.srt.plugins')))")
    try:
        out = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60)
    except OSError as e:
        return f"{python} cannot be run ({e})"
    if out.stdout.strip() != "True":
        return f"the environment of {python} has no {PLUGIN_ENTRY_POINT!r} sglang.srt.plugins entry point"
    return None


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m dspark_sglang.launch`` (unknown arguments go to SGLang)."""
    cli = argparse.ArgumentParser(
        prog="python -m dspark_sglang.launch",
        description="Serve an exported drafter with sglang.launch_server (flags from the export's config.json).",
        epilog="Arguments after the known ones (or after --) go to sglang.launch_server unchanged.",
    )
    cli.add_argument("--drafter", required=True, help="export directory (draft dir or attached checkpoint)")
    cli.add_argument("--target", help="target model path or Hub id (optional for attached checkpoints)")
    cli.add_argument("--mode", default="static", choices=MODES,
                        help="DSpark SGLANG_RAGGED_VERIFY_MODE (default static; compact = confidence-scheduled)")
    cli.add_argument("--sps-table", help="SPS cost table for cap-accept/compact (default: sps.json in the export)")
    cli.add_argument("--sts", help="STS temperatures JSON for cap-accept/compact (default: calibration.json in the "
                                   "export)")
    cli.add_argument("--python", default=sys.executable, help="interpreter with SGLang (default: this one)")
    cli.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    return cli


def main(argv: list[str] | None = None) -> int:
    args, extra = parser().parse_known_args(argv)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    try:
        cmd = build_command(args.drafter, args.target, mode=args.mode, sps_table=args.sps_table, sts=args.sts,
                            extra=extra, python=args.python)
    except ExportError as e:
        print(f"dspark_sglang.launch: {e}", file=sys.stderr)
        return 2
    info = read_export(args.drafter)
    problem = plugin_problem(args.python) if info.needs_plugin else None
    if problem is not None:
        print(f"dspark_sglang.launch: {info.draft_dir} is served by the dspark_sglang plugin's "
              f"{info.architecture}, but {problem}: SGLang would stop with 'Cannot find model module'. Install the "
              f"plugin where SGLang runs: {PLUGIN_INSTALL}.", file=sys.stderr)
        return 2
    for note in cmd.notes:
        print(f"note: {note}", file=sys.stderr)
    print(cmd.shell(), flush=True)
    if args.dry_run:
        return 0
    os.execvpe(cmd.argv[0], cmd.argv, {**os.environ, **cmd.env})
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
