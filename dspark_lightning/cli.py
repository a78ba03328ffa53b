"""Command line: ``python -m dspark_lightning <command> ...``.

``fit``/``validate``/``test`` are LightningCLI's own (YAML configs with ``class_path``/``init_args``; strategies,
devices and nodes come from the ``trainer:`` block). The other commands are typed functions exposed through
jsonargparse, so ``--help`` documents them.
"""

from __future__ import annotations

import os
import sys

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


class DSparkLightningCLI(LightningCLI):
    """LightningCLI with the target linked from the model into the data module (typed once in YAML)."""

    def add_arguments_to_parser(self, parser) -> None:  # jsonargparse parser
        parser.link_arguments("model.target", "data.init_args.target")

    def before_fit(self) -> None:
        """Keep the exact resolved config in every checkpoint (exports put it in the model card)."""
        parser = self._parser(self.subcommand)
        config = self.config[self.subcommand] if self.subcommand else self.config
        self.model.training_config_yaml = parser.dump(config, skip_none=False, skip_check=True)

    def instantiate_trainer(self, **kwargs):
        """Every run ends with a printed summary (and ``summary.json``) unless the config adds its own, and its progress
        bar counts steps out of ``max_steps`` when steps bound the run (``modules/console.py``)."""
        from .modules.console import use_step_progress_bar
        from .modules.summary import RunSummary

        trainer = super().instantiate_trainer(**kwargs)
        if not any(isinstance(c, RunSummary) for c in trainer.callbacks):
            trainer.callbacks.append(RunSummary())
        use_step_progress_bar(trainer)
        # Checkpoints go to <default_root_dir>/checkpoints rather than a per-run logger version folder, so
        # `fit --ckpt_path last` finds the previous run's last.ckpt.
        for callback in trainer.callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                callback.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        return trainer


def lightning_main(args: list[str] | None = None, run: bool = True) -> DSparkLightningCLI:
    """Run LightningCLI on the generic DrafterModule with any LightningDataModule."""
    import lightning as L

    from .modules import DrafterModule
    from .modules.console import quiet_lightning

    quiet_lightning()
    return DSparkLightningCLI(
        DrafterModule,
        L.LightningDataModule,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


# Non-Lightning subcommands: "module:function" (nested dicts are sub-subcommands). Each function is typed and
# documented, so its signature *is* the command line. Imported only when its command runs.
COMMANDS: dict = {
    "regen": "dspark_lightning.data.regen:regen",
    "cache": {
        "build": "dspark_lightning.data.cache.build:build_cache",
        "estimate": "dspark_lightning.data.cache.build:estimate_cache",
        "verify": "dspark_lightning.data.cache.reader:verify_cache",
    },
    "profile-sps": "dspark_lightning.decoding.sps:profile_sps",
    "calibrate": "dspark_lightning.decoding.calibration:calibrate",
    "eval": "dspark_lightning.export.evaluate:eval_export",
    "export": "dspark_lightning.export:export_checkpoint",
    "import-deepspec": "dspark_lightning.export.deepspec:import_deepspec",
    "push": "dspark_lightning.export.push:push",
}


def _load(spec):
    if isinstance(spec, dict):
        return {name: _load(sub) for name, sub in spec.items()}
    import importlib

    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def _commands() -> dict:
    """Command names (without importing their modules)."""
    return COMMANDS


def main(argv: list[str] | None = None) -> None:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        commands = ", ".join((*LIGHTNING_COMMANDS, *_commands()))
        print(f"usage: python -m dspark_lightning {{{commands}}} [--help] ...")
        return
    if argv[0] in LIGHTNING_COMMANDS:
        lightning_main(None if from_command_line else argv)
        _destroy_process_group()
        return
    from jsonargparse import auto_cli

    if argv[0] not in COMMANDS:
        raise SystemExit(f"Unknown command {argv[0]!r}; choose one of {(*LIGHTNING_COMMANDS, *COMMANDS)}.")
    auto_cli({argv[0]: _load(COMMANDS[argv[0]])}, args=[argv[0], *map(_underscore_option, argv[1:])])


def _destroy_process_group() -> None:
    """End the process group a DDP/FSDP run leaves behind (Lightning keeps it once the Trainer is done). Left to the
    interpreter's exit, Gloo's worker threads can outlive its finalisation and abort the finished run's process
    ("terminate called without an active exception", exit code -6)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _underscore_option(arg: str) -> str:
    """``--repo-id x`` / ``--dry-run`` as ``--repo_id`` / ``--dry_run`` (options are named after parameters)."""
    if not arg.startswith("--") or arg == "--":
        return arg
    name, sep, value = arg[2:].partition("=")
    return "--" + name.replace("-", "_") + sep + value
