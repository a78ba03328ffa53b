"""DeepSeek-V4 bundled DSpark export against SGLang 0.5.23's own ``DeepseekV4ForCausalLMDSpark`` (issue 8 item 5).

Runs in the serving venv and never imports ``dspark_lightning``. The main venv's interpreter
(``$DSPARK_LIGHTNING_PYTHON``, default ``<repo>/.venv/bin/python``) builds, in one subprocess:

1. the tiny V4 target of ``configs/deepseek_v4/smoke.yaml`` (``FrozenTarget.from_config`` + ``save_pretrained``, as
   ``tests/export/test_attached_v4.py`` does), its ``config.json`` given the keys an official V4 config.json has and
   transformers' does not (:data:`OFFICIAL_KEYS`; SGLang reads them, and the exporter refuses a target without them),
2. ``fit --config configs/deepseek_v4/smoke.yaml --trainer.max_steps 2 --trainer.limit_val_batches 0 ...``,
3. ``export --ckpt <run>/checkpoints/last.ckpt --format attached --attached_layout bundled --target_dir <target>``,
   and the same export against the transformers-format target (refused).

Then :func:`dspark_sglang.check.check_export` on the bundle runs SGLang's own resolution and loading on CPU
(``dspark_sglang/check_v4.py``): ``_handle_dspark`` defaults the draft to the target path (the ``dspark_*`` keys), the
worker is ``DSparkWorkerV2`` with gamma + 1 = 6 draft tokens with the launcher's flags, the draft class is
``DeepseekV4ForCausalLMDSpark``, every parameter is NaN before SGLang's loader reads the ``mtp.*`` tensors, every
tensor lands value for value and none stays NaN, in ``static`` and ``compact`` mode.

Not checkable here: the CUDA stage class (``DSparkV4CudaStage``), FP8 / FP4 weights, the forward pass and kernels.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from dspark_sglang.check import check_export
from dspark_sglang.launch import build_command

REPO = Path(__file__).resolve().parents[2]
GAMMA = 5  # block_size of configs/deepseek_v4/smoke.yaml
DRAFT_SHARD = "model-dspark-draft.safetensors"
# The tiny target's layer types (sliding, CSA 4, HCA 16, sliding) and its one MTP layer; the V4 router.
OFFICIAL_KEYS = {"compress_ratios": [0, 4, 16, 0, 0], "topk_method": "noaux_tc"}

# Runs in the main venv: tiny V4 target (transformers format, then with the official keys), 2 fit steps, exports.
DRIVER = r"""
import json, sys, time, traceback
from pathlib import Path
import yaml
from dspark_lightning.cli import main
from dspark_lightning.targets import FrozenTarget, TargetConfig

root, official = Path(sys.argv[1]), json.loads(sys.argv[2])
target = yaml.safe_load(Path("configs/deepseek_v4/smoke.yaml").read_text())["model"]["target"]
t = time.perf_counter()
model = FrozenTarget.from_config(TargetConfig(**target), [0]).model
model.save_pretrained(root / "transformers_target")
model.save_pretrained(root / "target")
config = json.loads((root / "target" / "config.json").read_text())
(root / "target" / "config.json").write_text(json.dumps({**config, **official}, indent=2))
main(["fit", "--config", "configs/deepseek_v4/smoke.yaml", "--trainer.max_steps", "2", "--trainer.logger", "false",
      "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
      "--trainer.default_root_dir", str(root / "run")])
export = ["export", "--ckpt", str(root / "run" / "checkpoints" / "last.ckpt"), "--format", "attached",
          "--attached_layout", "bundled"]
main([*export, "--target_dir", str(root / "target"), "--out", str(root / "export")])
try:
    main([*export, "--debug", "--target_dir", str(root / "transformers_target"), "--out", str(root / "refused")])
except ValueError as e:
    (root / "refusal.txt").write_text(str(e))
print(f"@@@ main-venv build {time.perf_counter() - t:.1f} s", flush=True)
"""


def _main_python() -> Path:
    python = Path(os.environ.get("DSPARK_LIGHTNING_PYTHON") or REPO / ".venv" / "bin" / "python")
    if not python.exists():
        pytest.fail(f"The main project's interpreter {python} does not exist: run `make venv` in {REPO}.",
                    pytrace=False)
    return python


@pytest.fixture(scope="module")
def v4_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("v4_bundle")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.run([str(_main_python()), "-c", DRIVER, str(root), json.dumps(OFFICIAL_KEYS)], cwd=REPO,
                          env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:]
    print(f"\nmain-venv V4 target + fit + exports: {time.perf_counter() - start:.1f} s")
    return root


def test_export_is_a_bundled_v4_checkpoint_with_the_keys_sglang_reads(v4_root):
    export = v4_root / "export"
    cfg = json.loads((export / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV4ForCausalLM"]
    assert cfg["dspark_block_size"] == GAMMA and cfg["dspark_target_layer_ids"] == [0, 2]
    assert {k: cfg[k] for k in OFFICIAL_KEYS} == OFFICIAL_KEYS  # the target's own, carried into the bundle
    index = json.loads((export / "model.safetensors.index.json").read_text())["weight_map"]
    mtp = {n for n in index if n.startswith("mtp.")}
    assert mtp and {index[n] for n in mtp} == {DRAFT_SHARD}
    assert mtp == set(load_file(str(export / DRAFT_SHARD)))


def test_transformers_format_target_is_refused_naming_the_keys(v4_root):
    """Without compress_ratios / topk_method SGLang's resolution crashes (AttributeError 'compress_ratios')."""
    refusal = (v4_root / "refusal.txt").read_text()
    assert "lacks ['compress_ratios', 'topk_method'], which SGLang 0.5.23 reads for DeepSeek-V4" in refusal
    assert "compress_ratios = [0, 4, 16, 0, 0]" in refusal
    assert not (v4_root / "refused").exists()


def test_check_runs_sglangs_resolution_and_loader_on_the_bundle(v4_root):
    export = v4_root / "export"
    report = check_export(export)
    assert report.ok, report.render()
    assert (report.algorithm, report.layout, report.worker) == ("DSPARK", "attached-config", "DSparkWorkerV2")
    assert report.draft_class == "sglang.srt.models.deepseek_v4_dspark.DeepseekV4ForCausalLMDSpark"
    assert report.num_draft_tokens == GAMMA + 1 and report.modes == ["static", "compact"]
    assert report.tensors_checked == len(load_file(str(export / DRAFT_SHARD)))  # compact: every draft tensor
    assert any("confidence-head tensors are skipped by design" in n for n in report.notes)
    # The launcher's command for it (the one the model card DSPARK.md gives, placeholders filled in).
    cmd = build_command(export, None, python="python")
    assert cmd.argv[3:] == ["--model-path", str(export), "--speculative-algorithm", "DSPARK",
                            "--speculative-dspark-block-size", str(GAMMA), "--speculative-num-draft-tokens",
                            str(GAMMA + 1), "--dtype", "float32"]
    card = (export / "DSPARK.md").read_text()
    block = card.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ").replace("<this repo>", str(export))
    assert block.split() == cmd.shell().split()


def test_check_fails_a_bundle_missing_a_draft_tensor(v4_root, tmp_path):
    """A stage tensor dropped from the index and the shard: the NaN-filled parameter it fed stays NaN."""
    from safetensors.torch import save_file

    view = tmp_path / "view"
    view.mkdir()
    export = v4_root / "export"
    for p in export.iterdir():
        if p.name not in (DRAFT_SHARD, "model.safetensors.index.json"):
            (view / p.name).symlink_to(p)
    tensors = load_file(str(export / DRAFT_SHARD))
    dropped = next(n for n in sorted(tensors) if n.endswith("attn_norm.weight"))
    del tensors[dropped]
    save_file(tensors, str(view / DRAFT_SHARD), metadata={"format": "pt"})
    index = json.loads((export / "model.safetensors.index.json").read_text())
    del index["weight_map"][dropped]
    (view / "model.safetensors.index.json").write_text(json.dumps(index))
    report = check_export(view)
    assert not report.ok
    assert any("input_layernorm.weight" in p and "is not in the bundled draft" in p for p in report.problems), \
        report.render()
