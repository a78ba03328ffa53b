"""The last step of ``make demo``: speculative decoding with the drafter the demo just trained, beside the target.

It reads the fit's checkpoint, then decodes a few held-out prompts (a shipped benchmark suite that the demo did not
train on) twice through :class:`dspark_lightning.decoding.SpeculativeEngine`, first with the target alone and then
with the drafter. It prints:

- one prompt's two texts, which greedy decoding (T = 0) must make identical: if any prompt differs, it says
  where and exits 1;
- τ and the acceptance per draft position (``eval.report.markdown_table``);
- tokens/s of both runs;
- the report it wrote (``report.json``/``report.md``/``rounds.jsonl`` and the PNGs of ``eval.report``);
- the commands to run next.

    python recipes/demo_decode.py --fit-config configs/demo/smollm2_dspark_cpu.yaml   # after its fit
    python recipes/demo_decode.py --ckpt RUN/checkpoints/last.ckpt --suite mt-bench --prompts 8

On CUDA both engines run with ``cuda_graphs=True`` and every batch is decoded once untimed first (the graphs are
captured then). The target runs in float32 unless ``--dtype`` says otherwise. The identity at T = 0 is exact
arithmetic: a batched verify pass and a one-token step add their products in different orders, so in bf16 a
near-tie between two tokens can round either way.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from dspark_lightning.decoding import Generation
from dspark_lightning.eval.report import markdown_table, write_report
from dspark_lightning.eval.suites import Suite, batch_prompts, load_suites, make_batches, suite_name
from dspark_lightning.eval.validate import DecodingRun
from dspark_lightning.export.checkpoint import TrainedDrafter, instantiate, read_checkpoint
from dspark_lightning.targets import FrozenTarget, TargetConfig, load_tokenizer

# Measured results to compare with (docs/results/): the SmolLM2 reproduction and the engine's GPU timings.
RESULTS_DOCS = ("docs/results/smollm2.md", "docs/results/performance.md")
SHOWN_PROMPT_CHARS = 400


@dataclass
class SideBySide:
    """Both runs of the same prompts: the target alone and speculative decoding with the drafter.

    Attributes:
        prompts: token ids of every prompt, in decoding order.
        target_tokens, speculative_tokens: the tokens each run generated per prompt.
        target_seconds, speculative_seconds: wall time of each run's timed generations (prefill included).
        report: the speculative run's report dict (``eval.report.build_report``: τ, acceptance per position).
        paths: the files ``eval.report.write_report`` wrote, by name.
    """

    prompts: list[list[int]]
    target_tokens: list[list[int]] = field(default_factory=list)
    speculative_tokens: list[list[int]] = field(default_factory=list)
    target_seconds: float = 0.0
    speculative_seconds: float = 0.0
    report: dict[str, Any] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def target_tokens_per_second(self) -> float:
        return sum(map(len, self.target_tokens)) / self.target_seconds

    @property
    def speculative_tokens_per_second(self) -> float:
        return sum(map(len, self.speculative_tokens)) / self.speculative_seconds

    @property
    def speed_up(self) -> float:
        return self.speculative_tokens_per_second / self.target_tokens_per_second

    def differences(self) -> list[tuple[int, int]]:
        """``(prompt index, first differing position)`` for every prompt whose two outputs differ."""
        found = []
        for i, (a, b) in enumerate(zip(self.target_tokens, self.speculative_tokens, strict=True)):
            position = first_difference(a, b)
            if position is not None:
                found.append((i, position))
        return found


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first position where ``a`` and ``b`` differ (a length difference counts); None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def default_checkpoint(fit_config: Path) -> Path:
    """``<trainer.default_root_dir>/checkpoints/last.ckpt`` of a fit config (where the CLI's ModelCheckpoint saves)."""
    trainer = (yaml.safe_load(fit_config.read_text(encoding="utf-8")) or {}).get("trainer") or {}
    root = trainer.get("default_root_dir")
    if not root:
        raise ValueError(f"{fit_config} sets no trainer.default_root_dir; pass the checkpoint with --ckpt.")
    return Path(root) / "checkpoints" / "last.ckpt"


def load_trained(ckpt: Path, device: torch.device, dtype: str) -> tuple[TrainedDrafter, torch.nn.Module, FrozenTarget]:
    """The checkpoint's drafter (weights in ``dtype``) and its frozen target, both on ``device``."""
    trained = read_checkpoint(ckpt)
    if trained.target is None:
        raise ValueError(f"{ckpt} records no target (hyper_parameters['target']); was it written by DrafterModule?")
    target_cfg = TargetConfig.from_dict({**trained.target, "dtype": dtype})
    target = FrozenTarget.from_config(target_cfg, trained.config.target_layer_ids, device=device)
    drafter = instantiate(trained.config, trained.state_dict, dtype=target.dtype).to(device)
    return trained, drafter, target


def _timed(run_batch: Callable[[dict[str, Any]], Generation], batch: dict[str, Any],
           device: torch.device) -> tuple[Generation, float]:
    """``run_batch(batch)`` and its wall time (the device synchronised on both sides)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = run_batch(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def decode_side_by_side(target: FrozenTarget, drafter: torch.nn.Module, suites: list[Suite], *, max_new_tokens: int,
                        batch_size: int = 1, engine_options: dict[str, Any] | None = None, full_warmup: bool = False,
                        out_dir: Path | None = None) -> SideBySide:
    """Greedy decoding of every prompt of ``suites`` by the target alone and by speculative decoding.

    The two runs take turns batch by batch, so a load that changes during the call slows both alike. Before its
    first timed batch each engine decodes two tokens of that batch untimed (``full_warmup``: every batch in full,
    which is where CUDA graphs get captured).

    Args:
        target, drafter: the frozen target and the trained drafter (same device and dtype).
        suites: the prompts (``eval.suites.load_suites``).
        max_new_tokens: generation budget per prompt.
        batch_size: prompts decoded together.
        engine_options: ``SpeculativeEngine`` keywords for both engines (e.g. ``{"cuda_graphs": True}``).
        full_warmup: decode each batch once untimed before timing it.
        out_dir: where ``eval.report.write_report`` writes the speculative run's report and plots (None: nowhere).
    """
    names = [s.name for s in suites]
    alone = DecodingRun(target, None, names, temperature=0.0, **(engine_options or {}))
    spec = DecodingRun(target, drafter, names, temperature=0.0, **(engine_options or {}))
    batches = make_batches(suites, batch_size=batch_size, max_new_tokens=max_new_tokens)
    result = SideBySide(prompts=[p for b in batches for p in batch_prompts(b)])
    for index, batch in enumerate(batches):
        for run in (alone, spec):
            if full_warmup or index == 0:
                run.engine.generate(batch_prompts(batch), stop_token_ids=batch["stop_token_ids"].tolist(),
                                    max_new_tokens=max_new_tokens if full_warmup else min(2, max_new_tokens))
        out, seconds = _timed(alone.run_batch, batch, target.device)
        result.target_tokens += out.tokens
        result.target_seconds += seconds
        out, seconds = _timed(spec.run_batch, batch, target.device)
        result.speculative_tokens += out.tokens
        result.speculative_seconds += seconds
    report = spec.report(drafter.config.algorithm, policy="fixed", max_new_tokens=max_new_tokens)
    report["side_by_side"] = {
        "target_tokens_per_second": result.target_tokens_per_second,
        "speculative_tokens_per_second": result.speculative_tokens_per_second,
        "speed_up": result.speed_up, "identical": not result.differences(), "prompts": len(result.prompts),
        "batch_size": batch_size, "device": str(target.device), "dtype": str(target.dtype).removeprefix("torch."),
    }
    result.report = report
    if out_dir is not None:
        result.paths = write_report(out_dir, report, spec.round_dicts(), plots=True)
    return result


def _target_name(target: dict[str, Any]) -> str:
    if target.get("tiny"):
        return f"a tiny random {target['tiny'].get('model_type', '')} (seed {target.get('seed', 0)})"
    return " ".join(str(target[k]) for k in ("path", "gguf_file") if target.get(k))


def _text(tokenizer: Any, tokens: Sequence[int]) -> str:
    if tokenizer is None:  # a tiny random target has no tokenizer
        return "token ids " + " ".join(map(str, tokens))
    return tokenizer.decode(list(tokens), skip_special_tokens=True).strip()


def _indent(text: str, limit: int | None = None) -> str:
    if limit is not None and len(text) > limit:
        text = text[:limit].rstrip() + " [...]"
    return "\n".join("    " + line for line in (text.splitlines() or [""]))


def _token_at(tokenizer: Any, tokens: Sequence[int], position: int) -> str:
    if position >= len(tokens):
        return "end of output"
    return f"{tokens[position]} {_text(tokenizer, tokens[position:position + 1])!r}"


def identity_lines(result: SideBySide, tokenizer: Any) -> list[str]:
    """The verdict on greedy identity: one OK line, or a FAILED block naming each prompt and token that differ."""
    differences = result.differences()
    n = len(result.prompts)
    if not differences:
        return [f"OK: identical. Speculative decoding gave the target's own greedy output, token for token, on all {n} "
                "prompts (at T = 0 it may change how fast the text comes, never what it says)."]
    lines = [f"FAILED: at T = 0 speculative decoding must reproduce the target alone, but {len(differences)} of {n} "
             "prompts differ:"]
    for i, position in differences:
        alone = _token_at(tokenizer, result.target_tokens[i], position)
        spec = _token_at(tokenizer, result.speculative_tokens[i], position)
        lines.append(f"  prompt {i + 1}: from generated token {position} on (target alone: {alone}; "
                     f"speculative: {spec})")
    lines.append("  This is a bug (engine, drafter/target loading, or a kernel's numerics): please report it with this "
                 "output and the checkpoint.")
    return lines


def summary_text(result: SideBySide, *, tokenizer: Any, trained: TrainedDrafter, suite: str, max_new_tokens: int,
                 fit_config: Path | None, ckpt: Path) -> str:
    """Everything the demo prints after decoding (see the module docstring)."""
    cfg, report = trained.config, result.report
    side = report["side_by_side"]
    tau = report["macro_tau"]
    lines = [
        "",
        "=" * 100,
        f"Speculative decoding with the drafter this demo trained: {cfg.algorithm}, {cfg.num_hidden_layers} layer(s), "
        f"block {cfg.block_size}, step {trained.global_step}; target {_target_name(trained.target)}; "
        f"{side['device']} {side['dtype']}, greedy (T = 0), γ = {report['gamma']}.",
        f"{side['prompts']} prompts of {suite} (not among the training conversations), at most {max_new_tokens} new "
        f"tokens each, batch {side['batch_size']}.",
        "",
        f"Prompt 1 of {side['prompts']}:",
        _indent(_text(tokenizer, result.prompts[0]), SHOWN_PROMPT_CHARS),
        f"Target alone ({len(result.target_tokens[0])} tokens):",
        _indent(_text(tokenizer, result.target_tokens[0])),
        f"Speculative, target + drafter ({len(result.speculative_tokens[0])} tokens):",
        _indent(_text(tokenizer, result.speculative_tokens[0])),
        "",
        *identity_lines(result, tokenizer),
        "",
        markdown_table(report),
        "",
        f"Tokens/s, prefill included: target alone {side['target_tokens_per_second']:.1f}, speculative "
        f"{side['speculative_tokens_per_second']:.1f} ({side['speed_up']:.2f}x).",
        *honest_note(tau, result.speed_up, trained.global_step, side["device"]),
        "",
        "Report: " + ", ".join(str(p) for p in result.paths.values()),
        "",
        *next_commands(ckpt, fit_config, result.paths.get("report")),
    ]
    return "\n".join(lines)


def honest_note(tau: float | None, speed_up: float, steps: int | None, device: str) -> list[str]:
    """What the figures mean for a drafter trained for minutes, and where the GPU measurements are."""
    verdict = "slower than" if speed_up < 1 else "faster than"
    if tau is None:
        return ["No verify round ran (every prompt stopped at once), so there is no τ to show."]
    return [
        f"τ = {tau:.2f} tokens per target verify round (a drafter whose every draft were accepted would give "
        f"γ + 1). This drafter trained for {steps} steps on {device}: most drafts are rejected, so a round costs a "
        f"draft pass plus a verify for little more than one token, and speculative decoding is {verdict} the target "
        f"alone here ({speed_up:.2f}x).",
        "A round costs at least one target step, so the speed-up is at most τ. Measured on GPUs: "
        f"{RESULTS_DOCS[0]} (the SmolLM2 reproduction on an H200: τ 1.49 at T = 0 after 600 steps of batch 8) and "
        f"{RESULTS_DOCS[1]} (the engine with CUDA graphs, and what bounds the speed-up); the DSpark paper's Qwen3 "
        "drafters reach τ 4.7 (Table 1).",
    ]


def next_commands(ckpt: Path, fit_config: Path | None, report: Path | None) -> list[str]:
    """The commands a user runs next: validate on the suites, export, serve."""
    config = fit_config or Path("<the fit's config>")
    export_dir = ckpt.parent.parent / "export_sglang"
    logs = ckpt.parent.parent / "lightning_logs"
    with_report = f" --report {report}" if report is not None else ""
    return [
        "Next:",
        "  # validate on the benchmark suites (τ per suite, acceptance, calibration, plots); drop the last line's",
        "  # options for the full protocol (docs/validate.md)",
        f"  python -m dspark_lightning validate --config {config} --config configs/smollm2/validate.yaml \\",
        f"    --ckpt_path {ckpt} --model.decoding.init_args.temperature 0 \\",
        "    --data.init_args.max_samples 4 --data.init_args.max_new_tokens 64 --trainer.limit_val_batches null",
        "  # export it for SGLang (or --format hf | deepspec | attached; docs/export.md)",
        f"  python -m dspark_lightning export --ckpt {ckpt} --format sglang --out {export_dir}{with_report}",
        "  # serve it (a GPU machine with sglang 0.5.23 and `pip install ./serving`; serving/README.md)",
        f"  python -m dspark_sglang.launch --target HuggingFaceTB/SmolLM2-135M-Instruct --drafter {export_dir}",
        "  # the fit's curves",
        f"  tensorboard --logdir {logs}",
    ]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fit-config", type=Path, help="the fit's YAML: names the run directory (default checkpoint) "
                                                         "and goes into the printed validate command")
    parser.add_argument("--ckpt", type=Path, help="DrafterModule checkpoint (default: <default_root_dir of "
                                                  "--fit-config>/checkpoints/last.ckpt)")
    parser.add_argument("--suite", default="gsm8k", help="a shipped suite, a JSONL path or 'random' (tiny targets)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts decoded (default: 3 on CPU, 8 on CUDA)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="per prompt (default: 48 on CPU, 128 on CUDA)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--max-prompt-tokens", type=int, default=256, help="skip longer prompts")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="weights of target and drafter while decoding (see the module docstring)")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="replay the engine's rounds from CUDA graphs (default: on with CUDA)")
    parser.add_argument("--out", type=Path, help="report directory (default: <run dir>/decode)")
    args = parser.parse_args(argv)
    if args.ckpt is None and args.fit_config is None:
        parser.error("give --fit-config (the demo's YAML) or --ckpt.")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo's decoding step; 0 when the two outputs are identical, 1 otherwise."""
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    ckpt = args.ckpt or default_checkpoint(args.fit_config)
    if not ckpt.is_file():
        raise SystemExit(f"No checkpoint at {ckpt}: run the fit first (make demo), or pass --ckpt.")
    prompts = args.prompts or (8 if cuda else 3)
    max_new_tokens = args.max_new_tokens or (128 if cuda else 48)
    graphs = cuda if args.cuda_graphs is None else args.cuda_graphs
    print(f"Decoding {prompts} {args.suite} prompts with {ckpt} on {device} ...", flush=True)
    trained, drafter, target = load_trained(ckpt, device, args.dtype)
    tokenizer = None if trained.target.get("tiny") else load_tokenizer(target.target_config)
    suites = load_suites(target.target_config, [args.suite], max_samples=prompts,
                         max_prompt_tokens=args.max_prompt_tokens, tokenizer=tokenizer, hf_config=target.config)
    if not suites[0].prompts:
        raise SystemExit(f"No {args.suite} prompt has at most {args.max_prompt_tokens} tokens; raise "
                         "--max-prompt-tokens.")
    result = decode_side_by_side(target, drafter, suites, max_new_tokens=max_new_tokens, batch_size=args.batch_size,
                                 engine_options={"cuda_graphs": True} if graphs else None, full_warmup=cuda,
                                 out_dir=args.out or ckpt.parent.parent / "decode")
    print(summary_text(result, tokenizer=tokenizer, trained=trained, suite=suite_name(args.suite),
                       max_new_tokens=max_new_tokens, fit_config=args.fit_config, ckpt=ckpt), flush=True)
    if result.differences():
        print("\n".join(identity_lines(result, tokenizer)), file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
