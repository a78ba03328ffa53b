"""Serving tests: run with the serving venv (``serving/install.sh`` then ``serving/.venv/bin/python -m pytest``).

Every export is written once per session into a temporary directory (tests/tiny_exports.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import pytest
import tiny_exports


@pytest.fixture(scope="session")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of good exports, one per drafter kind the project produces."""
    root = tmp_path_factory.mktemp("exports")
    tiny_exports.write_target(root / "target")
    tiny_exports.write_target(root / "target_llama", "llama")
    for head in ("vanilla", "gated", "rnn"):
        tiny_exports.write_dspark(root / f"dspark_{head}", markov_head_type=head)
    tiny_exports.write_dspark(root / "dspark_conf_no_markov_features", markov_head_type="gated",
                              confidence_with_markov=False)
    tiny_exports.write_dspark(root / "dspark_no_confidence", confidence=False)
    tiny_exports.write_dspark(root / "dspark_zlab_layout", sample_from_anchor=False)
    tiny_exports.write_dspark(root / "dspark_llama", target_model_type="llama")
    tiny_exports.write_dspark(root / "dspark_no_markov", markov_rank=1, confidence_with_markov=False, zero_markov=True)
    tiny_exports.write_dspark(root / "dspark_sts", sts=[1.5, 2.0, 0.7, 1.1])
    tiny_exports.write_dflash_zlab(root / "dflash_zlab")
    tiny_exports.write_dflash_zlab(root / "dflash_llama", target_model_type="llama")
    tiny_exports.write_eagle3(root / "eagle3")
    tiny_exports.write_eagle3(root / "eagle3_padded_vocab", draft_vocab=96)  # SGLang pads lm_head rows to 128
    # SmolLM2-135M-Instruct geometry (the project's small real target; Llama, so no q/k norm).
    tiny_exports.write_dspark(root / "dspark_smollm2", geometry=tiny_exports.SMOLLM2, gamma=7, markov_rank=16)
    tiny_exports.write_eagle3(root / "eagle3_smollm2", geometry=tiny_exports.SMOLLM2, draft_vocab=2048)
    tiny_exports.write_target(root / "attached")
    tiny_exports.write_dspark(root / "attached" / "dspark")
    return root
