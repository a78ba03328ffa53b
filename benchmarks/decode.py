"""Wall-clock decoding throughput: speculative decoding against the target alone, in the same engine, and against
what a user would run instead (HF ``generate``, eager and with its static cache compiled).

The target is SmolLM2-135M-Instruct (``targets.smollm2_target()``, or ``--target-path``); drafters come from
Lightning checkpoints (``--ckpt``, several for a side-by-side, read without unpickling anything foreign) or
untrained DSparks of the SmolLM2 recipe's shape (round costs only). Prompts are the first turns of a shipped suite
under the chat template. For every batch size, temperature and engine mode, the target alone and every (drafter,
policy) decode the same prompts, in turns; a row gives tokens/s (prefill included), the speed-up over the target
alone in the same mode, the round cost ``c`` in target steps (decode time per round over decode time per target-
alone step; speed-up ~ tau / c), and tau.
``--json`` writes the same table.

``--profile`` splits a batch-1 round of the first drafter into draft, verify (target forward), accept/commit and host
time: CUDA graphs of each phase timed with CUDA events, beside the fused round's wall time.

    CPU (small):   python benchmarks/decode.py --device cpu --batch-sizes 1 --max-new-tokens 32 --modes eager
    GPU:           python benchmarks/decode.py --ckpt a.ckpt b.ckpt --batch-sizes 1 16 64 --temperatures 0 1 \\
                       --modes graphs --policies fixed scheduler --hf --profile --json docs/results/speedup.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dspark_lightning.decoding import SpeculativeEngine, SpsTable, build_policy
from dspark_lightning.decoding.sps import profile_sps
from dspark_lightning.drafters import DrafterConfig
from dspark_lightning.eval.suites import load_suites
from dspark_lightning.export.checkpoint import instantiate, read_checkpoint
from dspark_lightning.modules.drafter_module import build_drafter
from dspark_lightning.targets import FrozenTarget, TargetConfig, load_target_config, smollm2_target

# Engine keyword arguments of each --modes choice.
ENGINE_MODES = {"eager": {}, "compiled": {"compile_passes": True}, "graphs": {"cuda_graphs": True},
                "graphs-compiled": {"cuda_graphs": True, "compile_passes": True}}

# The SmolLM2 recipe's drafter shape (configs/smollm2/dspark.yaml), used untrained when no checkpoint is given.
UNTRAINED = dict(algorithm="dspark", target_layer_ids=[1, 7, 14, 20, 27], block_size=7, mask_token_id=0,
                 markov_rank=256, markov_head_type="vanilla")
# SmolLM2-135M-Instruct's geometry (its config.json), for timing on random weights where the GGUF is not at hand:
# the kernels and their costs are the real model's, the tokens are not.
SMOLLM2_GEOMETRY = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                        max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                        tie_word_embeddings=True)


def load_drafter(ckpt: str | int, target: FrozenTarget, dtype: torch.dtype) -> tuple[str, torch.nn.Module]:
    """``(name, drafter)`` from a DrafterModule checkpoint (safe read), or an untrained DSpark of ``ckpt`` layers."""
    if isinstance(ckpt, int):
        drafter = build_drafter(DrafterConfig(num_hidden_layers=ckpt, **UNTRAINED).resolve(target.text_config))
        with torch.no_grad():
            drafter.embed_tokens.weight.copy_(target.embed_weight)
            drafter.lm_head.weight.copy_(target.lm_head_weight)
        name = f"untrained dspark-{ckpt}L"
    else:
        trained = read_checkpoint(ckpt)
        drafter = instantiate(trained.config, trained.state_dict)
        name = f"{trained.config.algorithm}-{trained.config.num_hidden_layers}L ({Path(ckpt).parent.parent.name})"
    return name, drafter.to(device=target.device, dtype=dtype).eval()


def decode_seconds(out) -> float:
    return out.seconds - out.prefill_seconds


def hf_generate(target: FrozenTarget, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                top_p: float, static_compiled: bool) -> float:
    """Tokens/s of the target alone through HF ``generate`` (left-padded batch, exactly ``max_new_tokens`` per row);
    ``static_compiled``: HF's own fast path, a static KV cache (on CUDA ``generate`` then compiles the forward with
    ``torch.compile`` and CUDA graphs). Compiling the forward by hand with ``mode="reduce-overhead"`` instead failed
    on the H200: generate read a graph output the next replay had overwritten."""
    device = target.device
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, device=device)
        mask[i, width - len(p):] = 1
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=top_p) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    kwargs = dict(attention_mask=mask, min_new_tokens=max_new_tokens, max_new_tokens=max_new_tokens, pad_token_id=0,
                  **sampling)
    if static_compiled:  # generate compiles the forward itself for a static cache (_valid_auto_compile_criteria)
        kwargs.update(cache_implementation="static")
    for _ in range(2):  # warm-up (the compile, the graphs)
        target.model.generate(ids, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    target.model.generate(ids, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(prompts) * max_new_tokens / (time.perf_counter() - start)


def timed_turns(engines: dict, prompts: list[list[int]], kwargs: dict, repeats: int) -> dict:
    """Each engine decodes the prompts once to warm up (graphs captured, compiled), then ``repeats`` times in
    rotating turns; returns the run with the median decode time per engine."""
    for engine in engines.values():
        engine.generate(prompts, **kwargs)
    runs: dict = {name: [] for name in engines}
    names = list(engines)
    for i in range(repeats):
        for name in names[i % len(names):] + names[:i % len(names)]:
            runs[name].append(engines[name].generate(prompts, **kwargs))
    return {name: sorted(outs, key=decode_seconds)[len(outs) // 2] for name, outs in runs.items()}


def per_round(out) -> float:
    """Decode seconds (prefill excluded) per batch round (a target-alone step is a round of one token)."""
    return decode_seconds(out) / max(out.rounds.round_seconds.numel(), 1)


def round_ms(out) -> dict[str, float]:
    """Per-round time as the engine measured it (CUDA events between graph replays): median, mean, max, in ms; a
    mean above the median points at occasional slow rounds rather than a slow pass."""
    t = out.rounds.round_seconds.double() * 1e3
    return {"median": float(t.median()), "mean": float(t.mean()), "max": float(t.max())} if t.numel() else {}


def tau_of(out) -> float:
    return float(out.rounds.num_tokens.double().mean())


def round_split(engine: SpeculativeEngine, prompt: list[int], tokens: int, stops: list[int]) -> dict[str, float]:
    """Milliseconds of one batch-1 greedy round, by phase: draft pass, target forward of the verify width,
    accept/commit (the verify graph less the forward), host (the fused round's wall time less both graphs)."""
    target, drafter = engine.target, engine.drafter
    split = SpeculativeEngine(target, drafter, gamma=engine.gamma, cuda_graphs=True, time_phases=True)
    split.generate([prompt], max_new_tokens=tokens, stop_token_ids=stops)
    st = split._state
    events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
    widths = [key for key in st.graphs if key.startswith("verify/")]
    draft, verify = st.graphs["draft"], st.graphs[widths[0]]
    saved = st.snapshot()
    times = {"draft": [], "verify": []}
    for _ in range(50):
        events[0].record()
        draft()
        events[1].record()
        verify()
        events[2].record()
        events[2].synchronize()
        st.restore(saved)
        times["draft"].append(events[0].elapsed_time(events[1]))
        times["verify"].append(events[1].elapsed_time(events[2]))
    width = int(widths[0].split("/")[1])
    forward_ms = 1e3 / profile_sps_point(target, width, len(prompt))
    fused = SpeculativeEngine(target, drafter, gamma=engine.gamma, cuda_graphs=True)
    fused.generate([prompt], max_new_tokens=tokens, stop_token_ids=stops)
    out = fused.generate([prompt], max_new_tokens=tokens, stop_token_ids=stops)
    round_ms = 1e3 * statistics.median(out.rounds.round_seconds.tolist())
    draft_ms, verify_ms = statistics.median(times["draft"]), statistics.median(times["verify"])
    return {"round_ms": round_ms, "draft_ms": draft_ms, "target_forward_ms": forward_ms,
            "accept_commit_ms": max(verify_ms - forward_ms, 0.0), "host_ms": max(round_ms - draft_ms - verify_ms, 0.0)}


def profile_sps_point(target: FrozenTarget, width: int, context: int) -> float:
    """Graphed verify forwards per second of one row of ``width`` tokens after ``context`` (``profile_sps``)."""
    path = Path(tempfile.mkdtemp()) / "sps.json"
    cfg = target.target_config
    table = profile_sps(cfg, str(path), num_tokens=[width], requests=1, context_length=context, iters=50,
                        device=str(target.device), cuda_graphs=True, model=target)
    return float(table["steps_per_second"][0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", nargs="*", default=[], help="DrafterModule checkpoints")
    parser.add_argument("--untrained-layers", type=int, nargs="*", default=[],
                        help="untrained DSparks of these depths (default 5 when no --ckpt): round costs only")
    parser.add_argument("--random-target", action="store_true",
                        help="SmolLM2's geometry with random weights and random prompts (timing without the GGUF)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus filter at T > 0 (engine and HF alike)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--suite", default="mt-bench", help="prompt suite (shipped name or JSONL path)")
    parser.add_argument("--max-prompt-tokens", type=int, default=512)
    parser.add_argument("--policies", nargs="+", default=["fixed"], choices=["fixed", "threshold", "scheduler"])
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--sps-table", default=None, help="profile-sps JSON (policy scheduler; else profiled here)")
    parser.add_argument("--gamma", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="timed turns per row (the median is reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", nargs="+", default=["graphs"], choices=list(ENGINE_MODES))
    parser.add_argument("--target-only", action="store_true", help="time the target alone (e.g. regen throughput)")
    parser.add_argument("--hf", action="store_true", help="also time HF generate, eager and static-cache compiled")
    parser.add_argument("--hf-batch-sizes", type=int, nargs="*", default=None,
                        help="batch sizes HF generate is timed at (default: all; its compile is per shape)")
    parser.add_argument("--profile", action="store_true", help="split a batch-1 round into its phases (CUDA)")
    parser.add_argument("--json", default=None, help="write the table (and the profile) here")
    parser.add_argument("--target-path", default=None, help="HF directory (or GGUF directory) of the target")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    target_cfg = smollm2_target(dtype_name)
    if args.target_path:
        is_hf_dir = (Path(args.target_path) / "config.json").is_file()
        target_cfg = TargetConfig(path=args.target_path, gguf_file=None if is_hf_dir else target_cfg.gguf_file,
                                  dtype=dtype_name)
    if args.random_target:
        target_cfg = TargetConfig(tiny=SMOLLM2_GEOMETRY, dtype=dtype_name, init_on_device=device.type == "cuda")
    hf = load_target_config(target_cfg)
    layer_ids = UNTRAINED["target_layer_ids"]
    if args.ckpt:
        layer_ids = list(read_checkpoint(args.ckpt[0]).config.target_layer_ids)
    target = FrozenTarget.from_config(target_cfg, layer_ids, device=device)
    sources = args.ckpt + args.untrained_layers if (args.ckpt or args.untrained_layers) else [5]
    drafters = dict(load_drafter(source, target, target.dtype) for source in sources)
    for name, drafter in drafters.items():
        if list(drafter.config.target_layer_ids) != layer_ids:
            raise ValueError(f"Drafter {name} reads target layers {drafter.config.target_layer_ids}, the first one "
                             f"{layer_ids}: compare drafters of one target_layer_ids per run.")
    if args.random_target:
        g = torch.Generator().manual_seed(args.seed)
        lengths = torch.randint(64, 320, (max(args.batch_sizes),), generator=g).tolist()
        prompt_pool = [torch.randint(1, hf.vocab_size, (n,), generator=g).tolist() for n in lengths]
        stops, suite_name = [], "random prompts"
    else:
        suite = load_suites(target_cfg, [args.suite], max_samples=max(args.batch_sizes) * 2,
                            max_prompt_tokens=args.max_prompt_tokens, hf_config=hf)[0]
        prompt_pool, stops, suite_name = suite.prompts, suite.stop_token_ids, f"suite {suite.name}"
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    what = "SmolLM2-135M-Instruct" + (" geometry, random weights" if args.random_target else "")
    print(f"target {what} ({dtype_name}, {card}); drafters {', '.join(drafters)}; {suite_name}; "
          f"max_new_tokens {args.max_new_tokens}; top_p {args.top_p}", flush=True)

    sps = {}
    if "scheduler" in args.policies:
        for mode in args.modes:
            graphed = bool(ENGINE_MODES[mode].get("cuda_graphs"))
            if args.sps_table:
                sps[mode] = SpsTable.load(args.sps_table)
                continue
            gamma = args.gamma or next(iter(drafters.values())).gamma
            path = Path(tempfile.mkdtemp()) / "sps.json"
            profile_sps(target_cfg, str(path), num_tokens=sorted({b * q for b in args.batch_sizes
                                                                  for q in range(1, gamma + 2)}),
                        requests=max(args.batch_sizes), device=str(device), cuda_graphs=graphed, model=target)
            sps[mode] = SpsTable.load(path)

    rows = []
    header = ("| batch | T | mode | drafter | policy | target tok/s | speculative tok/s | speed-up | c (target steps "
              "per round) | tau | verified drafts/round |")
    print("\n" + header + "\n|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|", flush=True)
    for batch in args.batch_sizes:
        prompts = [prompt_pool[i % len(prompt_pool)] for i in range(batch)]
        for temperature in args.temperatures:
            kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=temperature, stop_token_ids=stops,
                          seed=args.seed, top_p=args.top_p if temperature > 0 else 1.0)
            for mode in args.modes:
                engines = {("target", None): SpeculativeEngine(target, None, **ENGINE_MODES[mode])}
                for name, drafter in ({} if args.target_only else drafters).items():
                    for policy in args.policies:
                        engines[name, policy] = SpeculativeEngine(
                            target, drafter, gamma=args.gamma, **ENGINE_MODES[mode],
                            policy=build_policy(policy, threshold=args.threshold, sps_table=sps.get(mode)))
                result = timed_turns(engines, prompts, kwargs, args.repeats)
                base = result["target", None]
                base_tps = base.num_tokens / base.seconds
                if args.target_only:
                    rows.append(dict(batch=batch, temperature=temperature, top_p=kwargs["top_p"], mode=mode,
                                     drafter="target alone", target_tokens_per_second=base_tps,
                                     tokens=base.num_tokens, seconds=base.seconds, card=card))
                    print(f"| {batch} | {temperature:g} | {mode} | target alone | - | {base_tps:.1f} | | | | | |",
                          flush=True)
                for (name, policy), out in result.items():
                    if name == "target":
                        continue
                    tps = out.num_tokens / out.seconds
                    speedup, tau = tps / base_tps, tau_of(out)
                    c = per_round(out) / per_round(base)
                    row = dict(batch=batch, temperature=temperature, top_p=kwargs["top_p"], mode=mode, policy=policy,
                               drafter=name, target_tokens_per_second=base_tps, speculative_tokens_per_second=tps,
                               speedup=speedup, c=c, tau=tau,
                               verified_drafts_per_round=float(out.rounds.proposal_length.double().mean()),
                               round_ms=round_ms(out), target_step_ms=round_ms(base),
                               tokens=[base.num_tokens, out.num_tokens], card=card)
                    rows.append(row)
                    print(f"| {batch} | {temperature:g} | {mode} | {name} | {policy} | {base_tps:.1f} | {tps:.1f} "
                          f"| {speedup:.2f}x | {c:.2f} | {tau:.2f} | "
                          f"{row['verified_drafts_per_round']:.2f} |", flush=True)
                del engines, result
            if args.hf and (args.hf_batch_sizes is None or batch in args.hf_batch_sizes):
                for static in (False, True):
                    try:
                        tps = hf_generate(target, prompts, args.max_new_tokens, temperature, args.top_p, static)
                    except Exception as error:  # HF's compiled path is optional; say why it did not run
                        print(f"HF generate (static={static}) failed: {type(error).__name__}: {error}", flush=True)
                        continue
                    rows.append(dict(batch=batch, temperature=temperature, mode="hf-static-compiled" if static
                                     else "hf-eager", drafter="target alone", target_tokens_per_second=tps, card=card))
                    print(f"| {batch} | {temperature:g} | HF generate{' static+compile' if static else ''} | target "
                          f"alone | - | {tps:.1f} | | | | | |", flush=True)

    profile = None
    if args.profile and device.type == "cuda":
        name, drafter = next(iter(drafters.items()))
        engine = SpeculativeEngine(target, drafter, gamma=args.gamma)
        profile = {"drafter": name, **round_split(engine, prompt_pool[0], 64, stops)}
        print("\nround split (batch 1, T = 0, ms): " + ", ".join(f"{k} {v:.3f}" for k, v in profile.items()
                                                               if k != "drafter"), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": rows, "profile": profile, "args": vars(args)}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
