"""Command line: ``python -m dspark_lightning <command> ...``.

``fit``/``validate``/``test`` are LightningCLI's own (YAML configs with ``class_path``/``init_args``; strategies,
devices and nodes come from the ``trainer:`` block). The other commands are typed functions exposed through
jsonargparse, so ``--help`` documents them.

What this CLI changes in LightningCLI's handling of ``--ckpt_path`` (``modules/checkpoints.py``): a URL is downloaded
to a local file first and every checkpoint is unpickled with ``weights_only=True`` (Lightning would use
``weights_only=False`` for ``http(s)://``); the configured model block runs as given and a checkpoint of another
drafter is refused (LightningCLI would silently replace the model block with the checkpoint's hyper-parameters;
``--use_ckpt_config true`` asks for that). The project's own errors (``ValueError``, ``FileNotFoundError``,
``FileExistsError`` raised in ``dspark_lightning``) print as one ``error:`` line; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
PACKAGE_DIR = Path(__file__).resolve().parent
OWN_ERRORS = (ValueError, FileNotFoundError, FileExistsError)


class DSparkLightningCLI(LightningCLI):
    """LightningCLI with the target linked from the model into the data module (typed once in YAML), safe checkpoint
    loading, and a check that a checkpoint holds the configured drafter (see the module docstring)."""

    def add_arguments_to_parser(self, parser) -> None:  # jsonargparse parser
        parser.link_arguments("model.target", "data.init_args.target")
        parser.add_argument(
            "--use_ckpt_config", type=bool, default=False,
            help="Take the model block (drafter, target, loss, optimizer) from --ckpt_path's hyper-parameters instead "
                 "of the config; by default the config's model runs and a checkpoint of another drafter is refused.")

    def _parse_ckpt_path(self) -> None:
        """Download a remote ``ckpt_path``; check a local one against the configured drafter before anything is
        built; replace the model block with the checkpoint's only with ``--use_ckpt_config``."""
        from .modules.checkpoints import fetch_checkpoint, is_remote

        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and is_remote(ckpt_path):
            folder = tempfile.mkdtemp(prefix="dspark-ckpt-")
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            config["ckpt_path"] = ckpt_path = str(fetch_checkpoint(str(ckpt_path), folder))
        if not ckpt_path or not Path(ckpt_path).is_file():
            return  # "last"/"best"/"hpc": resolved by the Trainer, checked by DrafterModule.on_load_checkpoint
        if config.get("use_ckpt_config"):
            super()._parse_ckpt_path()
        else:
            _check_checkpoint(Path(ckpt_path), config.get("model"))

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        """The Trainer method's arguments, with ``weights_only=True`` whatever the config says."""
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if "weights_only" in self._subcommand_method_arguments.get(subcommand, ()):
            if kwargs.get("weights_only") is False:
                raise ValueError("--weights_only false would unpickle the checkpoint with full trust; dspark_lightning "
                                 "always loads checkpoints with weights_only=True. Remove --weights_only.")
            kwargs["weights_only"] = True
        return kwargs

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
        from .modules.checkpoints import NewestLastCheckpoint

        for callback in trainer.callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                callback.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
            if type(callback) is ModelCheckpoint:  # the configs name Lightning's class; same state, one fix
                callback.__class__ = NewestLastCheckpoint
        return trainer


def _check_checkpoint(path: Path, model: object) -> None:
    """Refuse ``path`` if it holds another drafter than the configured ``model`` block (before anything is built)."""
    from .drafters import DrafterConfig
    from .modules.checkpoints import check_checkpoint_fits, load_checkpoint
    from .targets import TargetConfig, load_target_config

    checkpoint = load_checkpoint(path)
    try:
        drafter, target = (getattr(model, name).as_dict() for name in ("drafter", "target"))
        target_config = load_target_config(TargetConfig.from_dict(target))
        resolved = DrafterConfig.from_dict(drafter).resolve(target_config)
    except (AttributeError, TypeError):  # not a DrafterModule model block: nothing to compare here
        return
    check_checkpoint_fits(checkpoint, resolved, target_config, where=f"Checkpoint {path}")


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
    """Run a command; the project's own errors end the process with one ``error:`` line (``--debug``: traceback)."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
        if from_command_line:
            sys.argv = [sys.argv[0], *argv]  # LightningCLI parses sys.argv itself
    try:
        _run(argv, from_command_line)
    except OWN_ERRORS as err:
        message = own_error_message(err)
        if debug or message is None:
            raise
        print(f"error: {message}\n(run with --debug for the traceback)", file=sys.stderr)
        raise SystemExit(1) from None


def own_error_message(err: BaseException) -> str | None:
    """The message of an error dspark_lightning raised itself (the innermost frame, or, for an error re-raised
    from a DataLoader worker, the worker's innermost frame, is in the package); None for anyone else's."""
    text = str(err)
    if "Original Traceback" in text:  # torch's ExceptionWrapper: the worker's traceback is in the message
        files = [line.split('"')[1] for line in text.splitlines() if line.strip().startswith('File "')]
        last = text.rstrip().splitlines()[-1]
        ours = bool(files) and Path(files[-1]).resolve().is_relative_to(PACKAGE_DIR)
        return last.split(": ", 1)[1] if ours and ": " in last else None
    frames = traceback.extract_tb(err.__traceback__)
    if frames and Path(frames[-1].filename).resolve().is_relative_to(PACKAGE_DIR):
        return text
    return None


def _run(argv: list[str], from_command_line: bool) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        commands = ", ".join((*LIGHTNING_COMMANDS, *_commands()))
        print(f"usage: python -m dspark_lightning {{{commands}}} [--help] [--debug] ...")
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
