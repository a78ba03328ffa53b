"""The ``sglang.launch_server`` command that serves an export as it was trained, for its model card.

It is the command ``python -m dspark_sglang.launch`` builds from the exported ``config.json``
(``serving/dspark_sglang/launch.py``), flag for flag and in the same order; ``serving/tests/test_our_exports.py``
compares the two for every drafter kind. The launcher reads the export, this module the drafter config the export
was written from, so the settings come from training either way:

- DSPARK: ``SGLANG_RAGGED_VERIFY_MODE`` (``static`` verifies all gamma draft tokens; ``compact`` lets the
  confidence head schedule them, with the SPS cost table of the serving GPU and the STS calibration when the export
  ships one), ``--speculative-dspark-block-size`` gamma, ``--speculative-num-draft-tokens`` gamma + 1;
- DFLASH (z-lab layout): ``--speculative-num-draft-tokens`` = its ``block_size`` = gamma + 1;
- EAGLE3: the chain it was trained to unroll, ``--speculative-num-steps`` ``ttt_length``,
  ``--speculative-eagle-topk 1``, ``--speculative-num-draft-tokens`` ``ttt_length + 1`` (SGLang's own defaults
  are 3 / 1 / 4 for most targets);
- ``--dtype``: the dtype of the exported ``config.json`` (SGLang's default ``auto`` would serve a float32 export
  in float16; SGLang has one ``--dtype`` for target and draft).

Placeholders: ``<target model>`` (unless the card names the base model), ``<this repo>``, ``<SPS table>``.
"""

from __future__ import annotations

from ..drafters import DrafterConfig

RAGGED_VERIFY_ENV = "SGLANG_RAGGED_VERIFY_MODE"
THIS_REPO = "<this repo>"
SPS_PLACEHOLDER = "<SPS table>"
# SGLang's --dtype choices for the dtypes the exporter writes.
SERVED_DTYPES = ("bfloat16", "float16", "float32")


def speculative_flags(cfg: DrafterConfig, serving: str) -> list[tuple[str, str]]:
    """The algorithm's flags after ``--speculative-algorithm``, from what the drafter was trained with."""
    if serving == "DSPARK":
        return [("--speculative-dspark-block-size", str(cfg.block_size)),
                ("--speculative-num-draft-tokens", str(cfg.block_size + 1))]
    if serving == "DFLASH":
        return [("--speculative-num-draft-tokens", str(cfg.block_size + 1))]
    return [("--speculative-num-steps", str(cfg.ttt_length)), ("--speculative-eagle-topk", "1"),
            ("--speculative-num-draft-tokens", str(cfg.ttt_length + 1))]


def sglang_command(cfg: DrafterConfig, *, serving: str, target: str | None, dtype: str | None,
                   mode: str = "static", calibration_file: str | None = None) -> tuple[dict[str, str], list[str]]:
    """(environment, arguments after ``python -m sglang.launch_server``) of an export.

    Args:
        serving: ``DSPARK``, ``DFLASH`` or ``EAGLE3``.
        target: the target model for a draft directory; None for an attached checkpoint (the export is the
            target and SGLang finds its draft).
        dtype: the dtype the exported ``config.json`` records (None: leave ``--dtype`` to SGLang).
        mode: DSPARK's ragged-verify mode, ``static`` or ``compact`` (confidence-scheduled; needs the head).
        calibration_file: the STS calibration, relative to the repository (passed in ``compact`` mode).
    """
    flags = [("--model-path", THIS_REPO if target is None else target)]
    if target is not None:
        flags.append(("--speculative-draft-model-path", THIS_REPO))
    flags += [("--speculative-algorithm", serving), *speculative_flags(cfg, serving)]
    if dtype in SERVED_DTYPES:
        flags.append(("--dtype", dtype))
    env = {}
    if serving == "DSPARK":
        env[RAGGED_VERIFY_ENV] = mode
        if mode != "static":
            flags.append(("--speculative-dspark-sps-table-path", SPS_PLACEHOLDER))
            if calibration_file:
                flags.append(("--speculative-dspark-confidence-sts-path", f"{THIS_REPO}/{calibration_file}"))
    return env, [part for flag in flags for part in flag]


def launcher_call(*, target: str | None, mode: str = "static") -> str:
    """The ``dspark_sglang.launch`` call that prints and runs the same command."""
    call = "python -m dspark_sglang.launch" + (f" --target {target}" if target is not None else "")
    call += f" --drafter {THIS_REPO}"
    return call + (f" --mode {mode} --sps-table {SPS_PLACEHOLDER}" if mode != "static" else "")


def render(env: dict[str, str], args: list[str], width: int = 100) -> str:
    """One shell command, broken before a flag when a line would pass ``width`` characters."""
    lines = [" ".join([*(f"{k}={v}" for k, v in sorted(env.items())), "python -m sglang.launch_server"])]
    pairs: list[str] = []
    for part in args:
        if part.startswith("--") or not pairs:
            pairs.append(part)
        else:
            pairs[-1] += f" {part}"
    for pair in pairs:
        if len(lines[-1]) + 1 + len(pair) > width:
            lines[-1] += " \\"
            lines.append("  " + pair)
        else:
            lines[-1] += " " + pair
    return "\n".join(lines)
