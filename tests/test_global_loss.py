"""Global loss normalisation (modules/global_loss.py): a DDP step on 2 gloo processes, with and without gradient
accumulation, gives the gradient (and logs the loss and metrics) of one process on the concatenated batch, for
DSpark, DFlash and Eagle3, although the sequences have very different numbers of supervised tokens."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import yaml

from dspark_lightning.drafters import DrafterConfig
from dspark_lightning.drafters.blocks import sample_anchors
from dspark_lightning.losses import LossWeights, Ratio
from dspark_lightning.modules import DrafterModule
from dspark_lightning.modules.global_loss import AccumulatedStep, logged_values, summed_over_ranks
from dspark_lightning.targets import TargetConfig

SMOKE = Path(__file__).resolve().parent.parent / "configs" / "smoke"
ALGORITHMS = ("dspark", "dflash", "eagle3")
L, PROMPT = 32, 8  # the answers start after Eagle3's ttt_length + 1 = 5 positions (global_loss.py's condition)
ANSWERS = (2, 22, 9, 4)  # supervised lengths of the 4 sequences: rank r, micro-batch m holds sequence r + 2 m


def module_for(algorithm: str) -> DrafterModule:
    model = yaml.safe_load((SMOKE / f"{algorithm}.yaml").read_text())["model"]
    torch.manual_seed(0)
    return DrafterModule(DrafterConfig(**model["drafter"]), TargetConfig(**model["target"]),
                         loss=LossWeights(**model.get("loss", {})), copy_target_embeddings=False,
                         optimizer=Recorder)


def sequence(module: DrafterModule, index: int) -> dict[str, torch.Tensor]:
    """A cached-states batch of one sequence with ``ANSWERS[index]`` supervised tokens (anchors drawn here, so that
    every run trains the same blocks)."""
    cfg = module.drafter_config
    g = torch.Generator().manual_seed(10 + index)
    loss_mask = torch.zeros(1, L, dtype=torch.bool)
    loss_mask[0, PROMPT:PROMPT + ANSWERS[index]] = True
    batch = {"input_ids": torch.randint(0, cfg.vocab_size - 1, (1, L), generator=g), "loss_mask": loss_mask,
             "attention_mask": torch.ones(1, L, dtype=torch.long),
             "target_hidden": torch.randn(1, L, len(cfg.target_layer_ids) * cfg.hidden_size, generator=g),
             "target_last_hidden": 3.0 * torch.randn(1, L, cfg.hidden_size, generator=g)}
    if module.drafter.training_anchors(cfg):
        batch["anchors"], batch["anchor_valid"] = sample_anchors(loss_mask, cfg.num_anchors, g)
    return batch


def concatenated(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


class Recorder(torch.optim.SGD):
    """lr 0: records the gradients the optimizer steps with."""

    def __init__(self, params) -> None:
        super().__init__(params, lr=0.0)
        self.grads: list[torch.Tensor] = []

    def step(self, closure=None):
        loss = None
        if closure is not None:  # Lightning's closure: the last micro-batch, backward, rescale, clipping
            with torch.enable_grad():
                loss = closure()
        self.grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                      for group in self.param_groups for p in group["params"]]
        super().step()
        return loss


def named_grads(module: DrafterModule, grads: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    names = [n for n, p in module.drafter.named_parameters() if p.requires_grad]  # configure_optimizers' order
    return dict(zip(names, grads, strict=True))


# ---------------------------------------------------------------------- the DDP runs
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), NODE_RANK="0",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import lightning as L

    try:
        for algorithm in ALGORITHMS:
            for accumulate in (1, 2):
                module = module_for(algorithm)
                data = [sequence(module, rank + world * m) for m in range(accumulate)]
                trainer = L.Trainer(accelerator="cpu", devices=world, strategy="ddp", max_steps=1,
                                    accumulate_grad_batches=accumulate, use_distributed_sampler=False, logger=False,
                                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                    limit_val_batches=0, num_sanity_val_steps=0)
                trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
                logged = {k: v.clone() for k, v in trainer.callback_metrics.items()}
                torch.save({"grads": named_grads(module, trainer.optimizers[0].grads), "logged": logged},
                           Path(out) / f"{algorithm}-{accumulate}-{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> Path:
    """One optimizer step of every drafter on 2 gloo ranks, without and with accumulation (2 micro-batches)."""
    out = tmp_path_factory.mktemp("ddp")
    # fork: the children need not re-import torch and Lightning (and a test module cannot be pickled by name).
    torch.multiprocessing.start_processes(_ddp_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True,
                                          start_method="fork")
    return out


def one_process(algorithm: str, sequences: list[int]):
    """Gradients and loss output of one process on the concatenation of ``sequences``."""
    module = module_for(algorithm)
    result = module.compute_loss(concatenated([sequence(module, i) for i in sequences]))
    result.loss.backward()
    return {n: torch.zeros_like(p) if p.grad is None else p.grad
            for n, p in module.drafter.named_parameters() if p.requires_grad}, result


def assert_same_gradients(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Equal to 1e-6 of each tensor's largest gradient (fp32: the ranks sum in another order)."""
    assert got.keys() == want.keys()
    for name, g in want.items():
        scale, err = float(g.abs().max()), float((got[name] - g).abs().max())
        assert err <= 1e-6 * scale, f"{name}: max |difference| {err:.3g} is {err / scale:.3g} of max |gradient|"


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_ddp_gradient_and_metrics_equal_one_process_on_the_global_batch(ddp_runs, algorithm, accumulate):
    runs = [torch.load(ddp_runs / f"{algorithm}-{accumulate}-{rank}.pt", weights_only=True) for rank in (0, 1)]
    want, reference = one_process(algorithm, list(range(2 * accumulate)))
    for run in runs:
        assert_same_gradients(run["grads"], want)
    if accumulate == 1:  # the logged values are the global batch's (with accumulation: the last micro-batch's)
        for run in runs:
            logged = run["logged"]
            torch.testing.assert_close(logged["train_loss"], reference.loss.detach(), rtol=1e-6, atol=0)
            torch.testing.assert_close(logged["train/accept_rate@0"], reference.accept_rate[0], rtol=1e-6, atol=0)
            torch.testing.assert_close(logged["train/expected_tau"], reference.expected_tau, rtol=1e-6, atol=0)


def test_a_rank_mean_would_differ_so_the_runs_above_test_something():
    """Averaging each rank's own mean (what DDP does with unreduced losses) is far from the global mean here."""
    want, _ = one_process("dspark", [0, 1])
    per_rank = [one_process("dspark", [i])[0] for i in (0, 1)]
    name = "layers.0.mlp.down_proj.weight"
    naive = (per_rank[0][name] + per_rank[1][name]) / 2
    assert float((naive - want[name]).norm() / want[name].norm()) > 0.05


# ---------------------------------------------------------------------- pieces, in one process
def test_logged_values_skip_means_over_nothing_and_spread_positions():
    ratios = {"loss": Ratio(torch.tensor([2.0, 3.0]), torch.tensor([4.0, 0.0]), floor=1.0),
              "ce": Ratio(torch.tensor(1.0), torch.tensor(4.0), eps=1e-6),
              "expected_tau": Ratio(torch.tensor(0.0), torch.tensor(0.0), floor=1.0),
              "accept_rate": Ratio(torch.tensor([1.5, 0.0]), torch.tensor([2.0, 0.0]), floor=1.0)}
    values = logged_values(ratios)
    assert values.keys() == {"loss", "ce", "accept_rate@0"}
    assert float(values["loss"]) == 2.0 / 4.0 + 3.0 / 1.0 and float(values["accept_rate@0"]) == 0.75


def test_summed_over_ranks_is_one_collective_that_keeps_shapes_and_normalisers():
    calls = []
    ratios = {"loss": Ratio(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]), floor=1.0),
              "ce": Ratio(torch.tensor(5.0, dtype=torch.float64), torch.tensor(6.0), eps=1e-6)}
    summed = summed_over_ranks(ratios, lambda flat: calls.append(flat) or 2 * flat)  # two equal ranks
    assert len(calls) == 1 and calls[0].dtype == torch.float64  # fp64 runs stay fp64
    assert summed["loss"].total.tolist() == [2.0, 4.0] and summed["loss"].weight.tolist() == [6.0, 8.0]
    assert summed["ce"].total.shape == () and (summed["ce"].eps, summed["loss"].floor) == (1e-6, 1.0)


def test_an_accumulated_step_is_rescaled_to_the_mean_over_its_micro_batches():
    """Weights W = 2 then 6 (one denominator): micro-batch losses N_m / W_m; Lightning divides each by A = 2.
    The rescaled gradient is that of (N_1 + N_2) / (W_1 + W_2)."""
    from dspark_lightning.modules.global_loss import GlobalStep

    x = torch.zeros((), requires_grad=True)
    acc = AccumulatedStep()
    for numerator_slope, weight in ((3.0, 2.0), (5.0, 6.0)):
        share = numerator_slope * x / weight  # d/dx of N_m / W_m, N_m = slope * x
        step = GlobalStep(share, {"loss": Ratio(torch.tensor(0.0), torch.tensor(weight))})
        (acc.weigh(step) / 2).backward()
    acc.finish([x], accumulate=2)
    assert float(x.grad) == pytest.approx((3.0 + 5.0) / 8.0, rel=1e-7) and acc.first is None
