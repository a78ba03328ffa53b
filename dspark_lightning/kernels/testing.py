"""Helpers for the kernels' parity tests: Triton's CPU interpreter and the fresh-process rerun.

``TRITON_INTERPRET=1`` only takes effect if it is set before ``triton.language`` is imported (its library functions
are decorated then, and importing this package already imports triton through torch), so a test module sets it
itself before its first ``dspark_lightning.kernels`` import. When another test module of the session imported triton
first, :func:`triton_runs_here` is False and the module's Triton cases run again in a fresh interpreter process
through :func:`run_triton_cases_in_fresh_process`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from .vocab_ce_l1 import triton_available

SKIP_REASON = ("triton missing, or imported before TRITON_INTERPRET=1 "
               "(then test_triton_cases_in_fresh_process runs these)")


def triton_runs_here() -> bool:
    """True on CUDA, or when triton.language was decorated for the interpreter in this process."""
    if not triton_available():
        return False
    if torch.cuda.is_available():
        return True
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    return not isinstance(getattr(tl.standard, "zeros", None), JITFunction)


def run_triton_cases_in_fresh_process(test_file: str, timeout_s: float = 900) -> None:
    """Run ``test_file``'s Triton cases (``-k "triton and not fresh and not gpu"``) in a new interpreter process and
    fail with its output unless they all passed, none skipped."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file,
           "-k", "triton and not fresh and not gpu"]
    done = subprocess.run(cmd, env=env, cwd=Path(test_file).resolve().parents[2], capture_output=True, text=True,
                          timeout=timeout_s)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout.splitlines()[-1], done.stdout[-2000:]


def triton_test_kit(test_file: str):
    """``(needs_triton, test_triton_cases_in_fresh_process)`` for a test module: a skip marker for its Triton cases
    when they cannot run in this process, and the module-level test that then reruns them in a fresh one."""
    import pytest

    here = triton_runs_here()

    @pytest.mark.skipif(here or not triton_available(), reason="the Triton cases run in this process")
    def test_triton_cases_in_fresh_process():
        run_triton_cases_in_fresh_process(test_file)

    return pytest.mark.skipif(not here, reason=SKIP_REASON), test_triton_cases_in_fresh_process
