"""What bounds the speed-up of speculative decoding when every pass is host-bound (a 135M target on the H200).

`performance.md` profiled the engine on the H200 with SmolLM2-135M: the GPU is busy about 5 % of a step, so a
step costs its host work (Python, dispatch, launches), whatever the number of tokens verified. This script
reproduces that regime on purpose: a random target of SmolLM2's depth (30 layers, its five captured layers) but of
tiny width runs on the CPU, where a forward pass costs its host work only. Timed side by side in one run (median of
``--repeats`` turns, after one warm-up turn):

* HF ``generate`` of the target alone (the reference for the engine's own overhead);
* the engine's target-alone step;
* one speculative round (draft + verify + bookkeeping) with a DSpark drafter of the SmolLM2 recipe's shape
  (``configs/smollm2/dspark.yaml``; untrained: only the cost of a round matters here, not its acceptance).

With ``step`` the target-alone step and ``round`` the speculative round, a drafter of accepted length τ (tokens per
round) speeds decoding up by ``τ * step / round``; the table prints it for the τ given, and the τ a goal needs.

    python benchmarks/speedup_bound.py                       # batch 1, 30-layer target, 5-layer DSpark
    python benchmarks/speedup_bound.py --draft-layers 1 --tau 1.49 2.5 --goal 2.5
    python benchmarks/speedup_bound.py --modes eager compiled   # the passes compiled by torch.compile
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from decode import ENGINE_MODES

from dspark_lightning.decoding import SpeculativeEngine
from dspark_lightning.drafters import DrafterConfig
from dspark_lightning.modules.drafter_module import build_drafter
from dspark_lightning.targets import FrozenTarget, TargetConfig, load_target_config

LAYERS = [1, 7, 14, 20, 27]  # the SmolLM2 recipe's target_layer_ids


def tiny_deep_target(layers: int, hidden: int, vocab: int) -> TargetConfig:
    return TargetConfig(tiny=dict(model_type="llama", vocab_size=vocab, hidden_size=hidden,
                                  intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=4096,
                                  tie_word_embeddings=True), seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target-layers", type=int, default=30, help="SmolLM2-135M has 30")
    parser.add_argument("--hidden", type=int, default=64, help="tiny, so that a pass costs its host work only")
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--draft-layers", type=int, default=5, help="configs/smollm2/dspark.yaml has 5")
    parser.add_argument("--gamma", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=48, help="new tokens per request")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tau", type=float, nargs="+", default=[1.49, 2.5, 4.0],
                        help="accepted lengths to evaluate (1.49: the SmolLM2 DSpark's macro tau at T = 0)")
    parser.add_argument("--goal", type=float, default=2.5, help="speed-up goal (issue 9: 2.5x at batch 1, T = 0)")
    parser.add_argument("--modes", nargs="+", default=["eager"], choices=["eager", "compiled"],
                        help="engine modes timed in the same turns (compiled: the passes through torch.compile, "
                             "compile_passes=True)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    cfg = tiny_deep_target(args.target_layers, args.hidden, args.vocab)
    target = FrozenTarget.from_config(cfg, LAYERS)
    drafter = build_drafter(DrafterConfig(
        algorithm="dspark", num_hidden_layers=args.draft_layers, target_layer_ids=LAYERS, block_size=args.gamma,
        mask_token_id=0, markov_rank=64, markov_head_type="vanilla").resolve(load_target_config(cfg))).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, args.vocab, (40,), generator=g).tolist() for _ in range(args.batch_size)]
    ids = torch.tensor(prompts)
    engines = {}
    for mode in args.modes:
        engines["alone", mode] = SpeculativeEngine(target, None, **ENGINE_MODES[mode])
        engines["spec", mode] = SpeculativeEngine(target, drafter, gamma=args.gamma, **ENGINE_MODES[mode])
    hf_runs, runs = [], {name: [] for name in engines}
    for _ in range(1 + args.repeats):  # taking turns, the first turn a warm-up
        start = time.perf_counter()
        target.model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                              temperature=None, top_p=None, top_k=None, pad_token_id=0)
        hf_runs.append((time.perf_counter() - start) / args.tokens)
        for name, engine in engines.items():
            out = engine.generate(prompts, max_new_tokens=args.tokens)
            r = out.rounds
            n = len(r.draft_seconds)  # per round, all from this run: wall (prefill excluded), draft, verify
            runs[name].append(((out.seconds - out.prefill_seconds) / n, float(r.draft_seconds.mean()),
                               float(r.verify_seconds.mean()), n))
    print(f"target: {args.target_layers} layers, hidden {args.hidden} (host-bound by construction); DSpark "
          f"{args.draft_layers} layers, gamma {args.gamma}; batch {args.batch_size}, {args.tokens} tokens")
    print(f"HF generate, per token          {1e3 * statistics.median(hf_runs[1:]):8.2f} ms")
    for mode in args.modes:
        step = statistics.median(run[0] for run in runs["alone", mode][1:])
        round_, draft, verify, rounds = sorted(runs["spec", mode][1:])[args.repeats // 2]  # median round time
        print(f"-- engine, {mode}")
        print(f"target-alone step               {1e3 * step:8.2f} ms")
        print(f"speculative round               {1e3 * round_:8.2f} ms  (draft {1e3 * draft:.2f}, verify "
              f"{1e3 * verify:.2f}, {rounds} rounds)")
        print(f"round / step                    {round_ / step:8.2f}")
        for tau in args.tau:
            print(f"speed-up at tau = {tau:<5}         {tau * step / round_:8.2f}x")
        print(f"tau needed for {args.goal}x            {args.goal * round_ / step:8.2f}")


if __name__ == "__main__":
    main()
