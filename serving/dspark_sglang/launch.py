"""Start ``python -m sglang.launch_server`` for an exported drafter, with the flags its metadata implies.

    python -m dspark_sglang.launch --target PATH --drafter EXPORT_DIR [--mode static|cap-accept|compact]
        [--sps-table F] [--sts F] [--dry-run] [-- sglang args...]

What it sets (SGLang 0.5.23: ``python/sglang/srt/arg_groups/fields/spec.py``, ``launch_server --help``):
- DSpark: ``--speculative-algorithm DSPARK``, ``--speculative-dspark-block-size`` gamma (config ``block_size``) and
  ``--speculative-num-draft-tokens`` gamma + 1; env ``SGLANG_RAGGED_VERIFY_MODE`` = ``--mode``. With
  confidence scheduling (``cap-accept``/``compact``, which need the exported confidence head) also the SPS cost
  table (``--sps-table``, or ``sps.json`` in the export) and the STS calibration (``--sts``, or ``calibration.json`` in
  the export).
- DFlash: ``--speculative-algorithm DFLASH``, ``--speculative-num-draft-tokens`` = config ``block_size``.
- Eagle3: ``--speculative-algorithm EAGLE3``; steps/top-k/draft tokens are left to SGLang unless passed.
- Attached checkpoints (a ``dspark/`` subfolder or ``dspark_*`` keys in the target config): ``--model-path`` is the
  export and SGLang finds the draft itself; ``--target`` is then optional.

Extra arguments go to SGLang unchanged; a flag given there replaces the one this command would set.
The full command is printed before it runs; ``--dry-run`` only prints it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dspark_sglang.export_dir import ExportError, read_export

MODES = ("static", "cap-accept", "compact")
RAGGED_VERIFY_ENV = "SGLANG_RAGGED_VERIFY_MODE"


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
        sps_table: SPS cost table JSON (``python -m sglang.benchmark.dspark_sps_profiler``); default: ``sps.json``
            in the export, if present.
        sts: STS temperature calibration JSON; default: ``calibration.json`` (or ``sts.json``) in the export, if
            present.
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

    if info.algorithm == "DSPARK":
        ours += [("--speculative-dspark-block-size", str(info.gamma)),
                 ("--speculative-num-draft-tokens", str(info.num_draft_tokens))]
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
                ours.append(("--speculative-dspark-sps-table-path", str(sps)))
            else:
                notes.append(
                    "no SPS cost table: SGLang's verify budget degenerates to verify-all. Profile one on the serving "
                    "GPU (python -m sglang.benchmark.dspark_sps_profiler) and pass --sps-table."
                )
            sts_file = Path(sts) if sts else info.sts_path
            if sts_file is not None:
                ours.append(("--speculative-dspark-confidence-sts-path", str(sts_file)))
        elif sps_table or sts:
            notes.append("--mode static verifies every draft token; the SPS table / STS file are not passed.")
    else:
        if mode != "static" or sps_table or sts:
            raise ExportError(
                f"{info.algorithm} verifies the whole draft; --mode/--sps-table/--sts apply to DSpark exports only."
            )
        if info.algorithm == "DFLASH":
            ours.append(("--speculative-num-draft-tokens", str(info.num_draft_tokens)))

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dspark_sglang.launch",
        description="Serve an exported drafter with sglang.launch_server (flags from the export's config.json).",
        epilog="Arguments after the known ones (or after --) go to sglang.launch_server unchanged.",
    )
    parser.add_argument("--drafter", required=True, help="export directory (draft dir or attached checkpoint)")
    parser.add_argument("--target", help="target model path or Hub id (optional for attached checkpoints)")
    parser.add_argument("--mode", default="static", choices=MODES,
                        help="DSpark SGLANG_RAGGED_VERIFY_MODE (default static; compact = confidence-scheduled)")
    parser.add_argument("--sps-table", help="SPS cost table for cap-accept/compact (default: sps.json in the export)")
    parser.add_argument("--sts", help="STS temperatures JSON for cap-accept/compact (default: calibration.json in the "
                                      "export)")
    parser.add_argument("--python", default=sys.executable, help="interpreter with SGLang (default: this one)")
    parser.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    args, extra = parser.parse_known_args(argv)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    try:
        cmd = build_command(args.drafter, args.target, mode=args.mode, sps_table=args.sps_table, sts=args.sts,
                            extra=extra, python=args.python)
    except ExportError as e:
        print(f"dspark_sglang.launch: {e}", file=sys.stderr)
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
