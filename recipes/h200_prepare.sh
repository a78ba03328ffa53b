#!/usr/bin/env bash
# On the lent H200 (no network, 64 MiB per transfer): install the carried wheels, reassemble the SmolLM2 GGUF
# from the two halves carried in two consecutive calls, check its md5, and convert it once to an HF directory
# (safetensors + tokenizer) so each later process loads the target in about a second instead of re-parsing GGUF.
#
#   bash recipes/h200_prepare.sh wheels      # every call: pip-install .device/wheels into /tmp/site
#   bash recipes/h200_prepare.sh part1|part2 # stash .device/p1 or .device/p2 in /tmp/smol (machine kept warm)
#   bash recipes/h200_prepare.sh convert     # join, md5, convert to /tmp/smol_hf
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
MD5=a1231443440b107ff29f02bdb38c9d0a
case "${1:-}" in
  wheels)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .device/wheels/*.whl ;;
  part1) mkdir -p /tmp/smol && cp .device/p1/gguf.part.aa /tmp/smol/ ;;
  part2) mkdir -p /tmp/smol && cp .device/p2/gguf.part.ab /tmp/smol/ ;;
  convert)
    cat /tmp/smol/gguf.part.aa /tmp/smol/gguf.part.ab > "/tmp/smol/$GGUF"
    echo "$MD5  /tmp/smol/$GGUF" | md5sum -c -
    python3 - <<'EOF'
import time
from safetensors.torch import save_model
from transformers import AutoModelForCausalLM, AutoTokenizer
t = time.time()
kw = dict(gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
AutoTokenizer.from_pretrained("/tmp/smol", **kw).save_pretrained("/tmp/smol_hf")
model = AutoModelForCausalLM.from_pretrained("/tmp/smol", **kw)  # dequantised; save_pretrained refuses GGUF models
if hasattr(model.config, "quantization_config"):
    delattr(model.config, "quantization_config")
model.config.save_pretrained("/tmp/smol_hf")
model.generation_config.save_pretrained("/tmp/smol_hf")
save_model(model, "/tmp/smol_hf/model.safetensors")  # handles the tied embedding/head
print(f"converted GGUF -> /tmp/smol_hf in {time.time() - t:.1f}s")
EOF
    ;;
  *) echo "usage: $0 wheels|part1|part2|convert" >&2; exit 2 ;;
esac
