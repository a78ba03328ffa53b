"""Lightning checkpoints of ``DrafterModule``, read without trusting them, and checked against the configured model.

* **Unpickling.** Every read is ``torch.load(weights_only=True)``: tensors, containers and primitives only, plus the
  few classes of ours that a checkpoint written from Python pickles in its hyper-parameters (:data:`SAFE_GLOBALS`,
  registered with ``torch.serialization.add_safe_globals`` when this package is imported, so Lightning's own
  loading accepts them too). Anything else (a crafted ``__reduce__``, a foreign class) is refused unexecuted.
* **Remote checkpoints.** Lightning loads ``http(s)://`` checkpoints with ``weights_only=False``; the CLI instead
  downloads any URL to a local file first (:func:`fetch_checkpoint`) and hands Lightning that file.
* **Fit.** :func:`check_checkpoint_fits` refuses a checkpoint whose drafter (algorithm, geometry, heads, target)
  differs from the one configured, naming both, before its weights are loaded.
* **last.ckpt is the newest.** :class:`NewestLastCheckpoint` writes ``last.ckpt`` first at each save point and makes
  the top-k file a hard link to it, and replaces a ``last.ckpt`` a previous run left instead of writing
  ``last-v1.ckpt`` beside it.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from ..drafters import DrafterConfig
from ..targets import TargetConfig
from .drafter_module import LossWeights, build_drafter, default_optimizer

# Classes and functions of ours that DrafterModule.save_hyperparameters pickles when built from Python (LightningCLI
# saves plain dicts). Unpickling them only rebuilds a config dataclass or names a function; it runs no other code.
SAFE_GLOBALS: tuple[Any, ...] = (DrafterConfig, TargetConfig, LossWeights, default_optimizer)
# The same classes under the names that checkpoints written before they moved carry.
FORMER_NAMES: tuple[tuple[Any, str], ...] = ((LossWeights, "dspark_lightning.modules.drafter_module.LossWeights"),)
# Drafter settings that only shape training, not the trained model: a checkpoint may resume with other values.
TRAINING_ONLY_FIELDS = ("num_anchors", "ttt_length")
LOCAL_SCHEMES = ("file://",)


def allow_our_globals() -> None:
    """Let ``torch.load(weights_only=True)`` (ours and Lightning's) rebuild :data:`SAFE_GLOBALS`."""
    torch.serialization.add_safe_globals([*SAFE_GLOBALS, *FORMER_NAMES])


def is_remote(path: str | os.PathLike) -> bool:
    """A URL other than ``file://`` (``http(s)://``, ``s3://`` ...)."""
    text = str(path)
    return "://" in text and not text.startswith(LOCAL_SCHEMES)


def fetch_checkpoint(url: str, directory: str | os.PathLike | None = None) -> Path:
    """Download ``url`` to a local file (atomically: a partial download never has the final name) and return it.

    Args:
        url: ``http(s)://`` (urllib) or any other fsspec URL (``s3://`` needs ``s3fs`` ...).
        directory: where to put it; default a fresh temporary directory.

    Raises:
        FileNotFoundError: the URL cannot be read (the message names it).
    """
    folder = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="dspark-ckpt-"))
    folder.mkdir(parents=True, exist_ok=True)
    name = Path(url.split("?", 1)[0].rstrip("/")).name or "checkpoint.ckpt"
    dest = folder / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{name}"
    partial = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    try:
        with _open_url(url) as src, open(partial, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        os.replace(partial, dest)
    except OSError as err:
        raise FileNotFoundError(f"Cannot download the checkpoint {url} ({type(err).__name__}: {err}). Check the URL, "
                                f"or download it yourself and pass the local file as --ckpt_path.") from None
    finally:
        partial.unlink(missing_ok=True)
    return dest


def _open_url(url: str) -> Any:
    if url.startswith(("http://", "https://")):
        return urllib.request.urlopen(url, timeout=60)  # the scheme is checked on the line above
    import fsspec

    return fsspec.open(url, "rb").open()


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` on the CPU (memory-mapped), with our config classes allowed.

    Raises:
        ValueError: the file holds pickled objects other than tensors, containers and :data:`SAFE_GLOBALS` (refused
            before any of them is built), or is not a Lightning checkpoint.
    """
    allow_our_globals()
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        ours = {f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS} | {name for _, name in FORMER_NAMES}
        try:
            foreign = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))) - ours)
        except Exception:  # the listing is only for the message
            foreign = []
        raise ValueError(
            f"Checkpoint {path} holds pickled objects that dspark_lightning does not unpickle "
            f"({', '.join(foreign) or str(err).splitlines()[0]}); refusing to load it. A checkpoint written by "
            f"dspark_lightning holds tensors, plain values and its config classes only.") from None
    if not isinstance(data, dict) or "state_dict" not in data:
        raise ValueError(f"{path} is not a Lightning checkpoint (no 'state_dict').")
    return data


def check_checkpoint_fits(checkpoint: dict[str, Any], drafter: DrafterConfig, target_config: Any,
                          where: str = "The checkpoint") -> None:
    """Raise unless ``checkpoint`` holds the drafter that ``drafter`` (resolved) describes.

    Compared: the checkpoint's resolved drafter config (``checkpoint["dspark_lightning"]``, else its
    hyper-parameters resolved against ``target_config``) field by field, except :data:`TRAINING_ONLY_FIELDS`, and the
    drafter tensors' names and shapes.

    Raises:
        ValueError: naming each differing field with both values, and the fix.
    """
    theirs = _checkpoint_drafter(checkpoint, target_config, where) or {}
    differing = [f"{k}: checkpoint {theirs[k]!r}, config {v!r}" for k, v in drafter.to_dict().items()
                 if k not in TRAINING_ONLY_FIELDS and k in theirs and theirs[k] != v]
    if not differing:  # same config on paper: the tensors must agree too (another code version may differ)
        differing = _tensor_mismatches(checkpoint, drafter)
    if differing:
        raise ValueError(
            f"{where} holds another model than the configured one: {'; '.join(differing)}. Give the model config it "
            f"was trained with, or pass --use_ckpt_config true to take the checkpoint's model config.")


def _checkpoint_drafter(checkpoint: dict[str, Any], target_config: Any, where: str) -> dict[str, Any] | None:
    """The checkpoint's resolved drafter config: recorded by ``DrafterModule.on_save_checkpoint``, or its
    hyper-parameters resolved against the configured target (older checkpoints); None without either."""
    info = checkpoint.get("dspark_lightning") or {}
    if isinstance(info.get("drafter_config"), dict):
        return dict(info["drafter_config"])
    raw = (checkpoint.get("hyper_parameters") or {}).get("drafter")
    if isinstance(raw, DrafterConfig):
        raw = raw.to_dict()
    if not isinstance(raw, dict):
        return None
    try:
        return DrafterConfig.from_dict(dict(raw)).resolve(target_config).to_dict()
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where} holds a {raw.get('algorithm')!r} drafter that does not fit the configured target "
                         f"({err}). Give the target it was trained for.") from None


def _tensor_mismatches(checkpoint: dict[str, Any], drafter: DrafterConfig) -> list[str]:
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_drafter(drafter).state_dict().items()}
    got = {k.removeprefix("drafter."): tuple(v.shape) for k, v in checkpoint["state_dict"].items()
           if k.startswith("drafter.")}
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    wrong = [f"{k} {got[k]} (config {expected[k]})" for k in sorted(set(got) & set(expected)) if got[k] != expected[k]]
    problems = []
    if missing or extra:
        problems.append(f"tensors: the checkpoint lacks {missing[:5]} and has {extra[:5]} in excess")
    if wrong:
        problems.append(f"tensor shapes: {wrong[:5]}")
    return problems


class NewestLastCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is never older than another checkpoint it wrote.

    Lightning writes a save point's top-k file first and ``last.ckpt`` second, so a kill between the two writes
    leaves ``last.ckpt`` a save behind (and, with ``save_top_k: 1``, the previous top-k file already deleted). Here,
    with ``save_last: true``, ``last.ckpt`` is written first and the top-k file is then a hard link to it (a copy
    where links fail): the same bytes, with Lightning's bookkeeping unchanged. A run in a directory holding a
    previous run's ``last.ckpt`` replaces it (Lightning would write ``last-v1.ckpt`` and leave ``last.ckpt`` stale).
    The CLI turns the configs' ``ModelCheckpoint`` callbacks into this class.

    Not saved: the state where a fit stops between two save points (``max_steps`` not a multiple of
    ``every_n_train_steps``). Lightning marks that epoch finished, so a resume from it would skip the rest of the
    epoch's data; resuming from the last save point redoes those steps exactly instead.
    """

    def _generate_state_key(self, **kwargs: Any) -> str:
        # Lightning's key for this state: checkpoints stay interchangeable with plain ModelCheckpoint runs.
        return f"ModelCheckpoint{kwargs!r}"

    def _save_checkpoint(self, trainer: Any, filepath: str) -> None:
        if self.save_last is True and filepath != self.last_model_path:
            # A top-k (or on-exception) file: linked to last.ckpt once that is written, in _save_last_checkpoint.
            self.__dict__.setdefault("_pending_links", []).append(filepath)
            self._last_global_step_saved, self._last_checkpoint_saved = trainer.global_step, filepath
            return
        super()._save_checkpoint(trainer, filepath)

    def _save_last_checkpoint(self, trainer: Any, monitor_candidates: dict[str, Any]) -> None:
        if self.save_last is True and not self.last_model_path:
            self.last_model_path = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
        super()._save_last_checkpoint(trainer, monitor_candidates)
        pending, self.__dict__["_pending_links"] = self.__dict__.get("_pending_links", []), []
        if trainer.is_global_zero:
            for path in pending:
                _link_or_copy(self._fs, self.last_model_path, path)


def _link_or_copy(fs: Any, src: str, dst: str) -> None:
    """``dst`` = the bytes of ``src``: a hard link on a local disk, else a copy (atomic: a temp name, then a rename)."""
    tmp = f"{dst}.tmp-{os.getpid()}"
    try:
        os.link(src, tmp)
    except (OSError, TypeError):
        fs.cp_file(src, tmp)
    fs.mv(tmp, dst)
