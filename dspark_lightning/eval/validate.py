"""``validate`` on benchmark suites: speculative decoding inside Lightning's validation loop.

``SpeculativeValidation`` is what ``model.decoding`` names in a validate config; ``DrafterModule`` hands it
the prompt batches of ``SuitesDataModule``. Each rank decodes its share of the prompts, the
:class:`~dspark_lightning.eval.metrics.DecodingMetrics` counters are summed across ranks by torchmetrics, the
per-round records are gathered, and rank 0 prints the table and writes ``report.json``, ``report.md``,
``rounds.jsonl`` and the plots into the trainer's log dir. :class:`DecodingRun` is the Lightning-free core,
shared with :func:`dspark_lightning.eval.run.evaluate`.

One temperature per run (``temperature``, default 1.0 as in the paper's Table 1); run again with
``--model.decoding.init_args.temperature 0`` for greedy decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..decoding import Generation, Rounds, SpeculativeEngine, SpsTable, build_policy
from ..decoding.policies import POLICIES
from ..modules.drafter_module import DrafterModule, ValidationDecoder
from ..targets import FrozenTarget
from .metrics import DecodingMetrics
from .report import build_report, markdown_table, write_report
from .suites import batch_prompts


def load_sts(path: str | None) -> list[float] | None:
    """Temperatures from an STS JSON ``{"temperatures": [...]}`` (None passes through)."""
    if path is None:
        return None
    import json

    data = json.loads(Path(path).read_text())
    temps = data.get("temperatures") if isinstance(data, dict) else None
    if not isinstance(temps, list) or not temps:
        raise ValueError(f"{path} is not an STS file: expected {{\"temperatures\": [T_1, ..., T_gamma]}}.")
    return [float(t) for t in temps]


class DecodingRun:
    """Decode prompt batches with one engine, count metrics per suite and keep the round records.

    Args:
        target, drafter: the frozen target and the drafter (None = the target alone).
        suite_names: suites in ``suite_index`` order.
        temperature: sampling temperature (0 = greedy).
        policy, gamma, threshold, sps_table, sts_temperatures: engine settings (see ``SpeculativeEngine`` and
            ``decoding.policies``).
        seed: base seed; each batch gets its own generator seeded from it, the suite and its first prompt.
        top_p: nucleus filter of the sampled distribution (1 = off).
        engine: further ``SpeculativeEngine`` options (``cuda_graphs``, ``compile_passes``, ``time_phases``).
    """

    def __init__(self, target: FrozenTarget, drafter: nn.Module | None, suite_names: Sequence[str], *,
                 temperature: float = 1.0, top_p: float = 1.0, policy: str = "fixed", gamma: int | None = None,
                 threshold: float = 0.5, sps_table: str | SpsTable | None = None,
                 sts_temperatures: Sequence[float] | None = None, seed: int = 0, **engine: Any) -> None:
        table = SpsTable.load(sps_table) if isinstance(sps_table, (str, Path)) else sps_table
        self.engine = SpeculativeEngine(target, drafter, gamma=gamma,
                                        policy=build_policy(policy, threshold=threshold, sps_table=table),
                                        sts_temperatures=sts_temperatures, **engine)
        self.suite_names = list(suite_names)
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.metric = DecodingMetrics(len(self.suite_names), self.engine.gamma).to(target.device)
        self.records: list[tuple[int, Tensor, Rounds]] = []

    def run_batch(self, batch: dict[str, Any]) -> Generation:
        """Decode one batch from ``suites.make_batches`` and record it."""
        suite = int(batch["suite_index"])
        samples = batch["sample_index"].cpu()
        generator = None
        if self.temperature > 0:
            generator = torch.Generator(device=self.engine.device)
            generator.manual_seed(self.seed + 1_000_003 * suite + int(samples[0]))
        out = self.engine.generate(batch_prompts(batch), max_new_tokens=int(batch["max_new_tokens"]),
                                   temperature=self.temperature, top_p=self.top_p,
                                   stop_token_ids=batch["stop_token_ids"].tolist(), generator=generator)
        self.metric.update(suite, out.rounds, out.num_tokens, len(samples))
        self.records.append((suite, samples, out.rounds))
        return out

    def packed_records(self) -> Tensor:
        """All records as a float64 tensor [N, 5 + gamma]: suite, sample, offered, accepted, tokens, logits."""
        rows = [torch.cat([torch.stack([torch.full_like(r.request, s), samples[r.request], r.proposal_length,
                                        r.accepted, r.num_tokens], 1).double(), r.confidence_logits.double()], 1)
                for s, samples, r in self.records]
        return torch.cat(rows) if rows else torch.zeros(0, 5 + self.engine.gamma, dtype=torch.float64)

    def round_dicts(self, packed: Tensor | None = None) -> list[dict[str, Any]]:
        """JSON rows for ``rounds.jsonl`` from :meth:`packed_records` (possibly gathered from all ranks)."""
        packed = self.packed_records() if packed is None else packed
        has_conf = packed.shape[1] > 5 and not torch.isnan(packed[:, 5:]).all()
        rows = []
        for values in packed.tolist():
            rows.append({"suite": self.suite_names[int(values[0])], "sample": int(values[1]),
                         "proposal_length": int(values[2]), "accepted": int(values[3]), "num_tokens": int(values[4]),
                         "confidence_logits": values[5:] if has_conf else None})
        return rows

    def report(self, drafter_name: str, **extra: Any) -> dict[str, Any]:
        """The report dict (metrics reduced across ranks when running distributed)."""
        return build_report(self.metric.compute(), self.suite_names, temperature=self.temperature,
                            drafter=drafter_name, gamma=self.engine.gamma, **extra)


class SpeculativeValidation(ValidationDecoder):
    """Validate a drafter by speculative decoding on benchmark suites (``model.decoding`` of a validate config).

    Args:
        temperature: sampling temperature of the run (1.0 as in the paper's Table 1; 0 = greedy).
        policy: verify-length policy: ``fixed`` (all drafts), ``threshold`` (per-step confidence >= threshold)
            or ``scheduler`` (paper Algorithm 1, needs ``sps_table``).
        gamma: drafted tokens per round (default: the drafter's block size / TTT length).
        threshold: confidence threshold of the ``threshold`` policy.
        sps_table: ``profile-sps`` JSON for the ``scheduler`` policy.
        sts: STS JSON (``calibrate`` output) applied to the confidences the policy sees.
        seed: sampling seed.
        top_p: nucleus filter of the sampled distribution (1 = off).
        cuda_graphs, compile_passes: run the engine's rounds as CUDA graphs / through torch.compile (GPU speed).
        time_phases: measure draft and verify time apart (split rounds, a host synchronisation between them); off,
            rounds run fused and the report's draft/verify milliseconds are not measured.
        plots: write the PNG plots.
        output_dir: where to write the report (default: the trainer's log dir).
    """

    def __init__(self, temperature: float = 1.0, policy: str = "fixed", gamma: int | None = None,
                 threshold: float = 0.5, sps_table: str | None = None, sts: str | None = None, seed: int = 0,
                 top_p: float = 1.0, cuda_graphs: bool = False, compile_passes: bool = False,
                 time_phases: bool = True, plots: bool = True, output_dir: str | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"Unknown policy {policy!r}; choose one of {POLICIES}.")
        if temperature < 0:
            raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy).")
        self.temperature, self.policy, self.gamma, self.threshold = temperature, policy, gamma, threshold
        self.sps_table, self.sts_path, self.seed, self.plots, self.output_dir = sps_table, sts, seed, plots, output_dir
        self.top_p = top_p
        self.engine_options = dict(cuda_graphs=cuda_graphs, compile_passes=compile_passes, time_phases=time_phases)
        self.run: DecodingRun | None = None
        self.last_report: dict[str, Any] | None = None

    def on_validation_epoch_start(self, module: DrafterModule) -> None:
        datamodule = getattr(module.trainer, "datamodule", None) if module._trainer is not None else None
        names = getattr(datamodule, "suite_names", None)
        if names is None:
            raise ValueError("SpeculativeValidation needs a SuitesDataModule (data.class_path: "
                             "dspark_lightning.eval.suites.SuitesDataModule).")
        self.run = DecodingRun(module.frozen_target(), module.drafter, names, temperature=self.temperature,
                               policy=self.policy, gamma=self.gamma, threshold=self.threshold,
                               sps_table=self.sps_table, sts_temperatures=load_sts(self.sts_path), seed=self.seed,
                               top_p=self.top_p, **self.engine_options)

    def validation_step(self, module: DrafterModule, batch: dict[str, Any], batch_idx: int) -> None:
        self.run.run_batch(batch)

    def on_validation_epoch_end(self, module: DrafterModule) -> None:
        run = self.run
        if run is None:
            return
        report = run.report(module.drafter_config.algorithm, policy=self.policy,
                            max_new_tokens=getattr(module.trainer.datamodule, "max_new_tokens", None))
        for name, suite in report["suites"].items():
            module.log(f"val/tau/{name}", float(suite["tau"]), sync_dist=True)  # same value on every rank
        if report["macro_tau"] is not None:
            module.log("val/macro_tau", float(report["macro_tau"]), sync_dist=True, prog_bar=True)
        packed = self._gather(module, run.packed_records())
        # trainer.log_dir broadcasts from rank 0: every rank must ask.
        log_dir = Path(self.output_dir or module.trainer.log_dir or module.trainer.default_root_dir)
        if module.trainer.is_global_zero:
            paths = write_report(log_dir, report, run.round_dicts(packed), plots=self.plots)
            print("\n" + markdown_table(report), flush=True)
            print("Report: " + ", ".join(str(p) for p in paths.values()), flush=True)
        self.last_report = report
        run.metric.reset()
        self.run = None

    @staticmethod
    def _gather(module: DrafterModule, packed: Tensor) -> Tensor:
        """Concatenate every rank's records (padded to the longest, then trimmed)."""
        if module.trainer.world_size == 1:
            return packed
        local = packed.to(module.device)
        counts = module.all_gather(torch.tensor([local.shape[0]], device=module.device)).flatten()
        longest = int(counts.max())
        padded = torch.cat([local, local.new_zeros(longest - local.shape[0], local.shape[1])])
        gathered = module.all_gather(padded)  # [world, longest, F]
        return torch.cat([gathered[r, : int(n)] for r, n in enumerate(counts.tolist())]).cpu()
