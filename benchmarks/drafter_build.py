"""Start-up cost of building a DrafterModule: vocabulary-sized matrices filled once (``_layers.unfilled`` +
``init_weights``) vs their default init followed by ``init_weights`` (the previous construction), side by side.

    python benchmarks/drafter_build.py                                   # the Qwen3-8B-width synthetic config
    python benchmarks/drafter_build.py --config configs/smollm2/dspark.yaml
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import torch
import yaml

from dspark_lightning.drafters import DrafterConfig, dflash, dspark, dspark_v4, eagle3
from dspark_lightning.modules.drafter_module import DrafterModule
from dspark_lightning.targets import TargetConfig

DRAFTER_MODULES = (dflash, dspark, dspark_v4, eagle3)


def build_seconds(model: dict, default_init: bool) -> tuple[float, int]:
    patches = [mock.patch.object(m, "unfilled", lambda cls, *a, **k: cls(*a, **k)) for m in DRAFTER_MODULES] \
        if default_init else []
    for p in patches:
        p.start()
    try:
        torch.manual_seed(0)
        start = time.perf_counter()
        module = DrafterModule(DrafterConfig(**model["drafter"]), TargetConfig(**model["target"]))
        seconds = time.perf_counter() - start
    finally:
        for p in patches:
            p.stop()
    return seconds, sum(p.numel() for p in module.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/multigpu/synthetic_qwen3_8b_width.yaml")
    parser.add_argument("--repeats", type=int, default=2,
                        help="builds of each kind, taking turns (the minimum is kept)")
    args = parser.parse_args()
    model = yaml.safe_load(open(args.config))["model"]
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.repeats):
        for default_init in (True, False):
            seconds, n = build_seconds(model, default_init)
            times[default_init].append(seconds)
    twice, filled_once = min(times[True]), min(times[False])
    print(f"{args.config}: {n / 1e9:.2f} B parameters, {torch.get_num_threads()} CPU threads")
    print("| construction | build, s | speed-up |\n|---|---:|---:|")
    print(f"| default init, then init_weights | {twice:.1f} | 1.00x |")
    print(f"| vocabulary matrices filled once | {filled_once:.1f} | {twice / filled_once:.2f}x |")


if __name__ == "__main__":
    main()
