#!/usr/bin/env bash
# Create serving/.venv: CPU torch + SGLang 0.5.23 without its CUDA dependencies, for the CPU conformance
# check and the serving tests (serving/README.md). Idempotent: a stamp holding the hash of this script,
# the lock and pyproject.toml skips the work when nothing changed; delete serving/.venv to start over.
#
# Why not `pip install sglang==0.5.23`: sglang pins torch==2.14.1 and ~200 packages (CUDA torch, cuBLAS,
# flashinfer, sglang-kernel...), multi-GB and useless without a GPU. `--no-deps` plus the light imports that
# `import sglang`, server-argument resolution and the draft model modules need is enough on CPU.
#
# Env: SERVING_VENV (default serving/.venv), PY (default python3), TORCH (default torch==2.13.0: the CPU
# wheel in the local wheel store; the script refuses a torch build with CUDA).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${SERVING_VENV:-$HERE/.venv}"
PY="${PY:-python3}"
TORCH="${TORCH:-torch==2.13.0}"
SGLANG="sglang==0.5.23"
LOCK="$HERE/requirements-cpu.lock"
STAMP="$VENV/.installed"

want="$(cat "${BASH_SOURCE[0]}" "$LOCK" "$HERE/pyproject.toml" | sha256sum | cut -d' ' -f1) $TORCH"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  echo "serving venv up to date: $VENV"
  exit 0
fi

start=$SECONDS
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check --quiet)

# 1. torch first and alone (CPU wheel), then pin it so nothing below can swap it for a CUDA build.
"${pip[@]}" install "$TORCH"
torch_version="$("$VENV/bin/python" -W ignore -c 'import torch; assert torch.version.cuda is None, torch.__version__; print(torch.__version__)')" \
  || { echo "install.sh: $TORCH resolved to a CUDA build; point pip at a CPU wheel (TORCH=...)" >&2; exit 1; }
constraints="$VENV/torch-constraint.txt"
echo "torch==${torch_version%%+*}" > "$constraints"

# 2. SGLang itself, none of its declared dependencies.
"${pip[@]}" install --no-deps "$SGLANG"

# 3. What the CPU paths import (triton: srt/utils/common.py imports it at module level), at the versions of
#    requirements-cpu.lock; then this package (editable, so its sglang.srt.plugins entry point is live).
"${pip[@]}" install -c "$constraints" -r "$LOCK"
"${pip[@]}" install --no-deps -e "$HERE"

"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import sglang, torch
assert torch.version.cuda is None, "CUDA torch in the serving venv"
eps = [e.name for e in md.entry_points(group="sglang.srt.plugins")]
assert "dspark_lightning" in eps, eps
print(f"sglang {sglang.__version__}, torch {torch.__version__}, plugins {eps}")
PY
echo "$want" > "$STAMP"
echo "serving venv ready in $((SECONDS - start)) s: $VENV ($(du -sh "$VENV" | cut -f1))"
