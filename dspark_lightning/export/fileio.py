"""Filesystem helpers of the exporters: staged (atomic) output directories, safetensors, JSON, links.

An export is written into a hidden sibling directory (``.NAME.partial-<pid>-<random>``) and renamed onto ``NAME``
only once every file is complete, so an interrupted export never leaves a directory that looks finished: either the
old ``NAME`` (or nothing) is there, or the complete new one. ``--overwrite`` swaps the two atomically where it can;
the next export repairs what a killed one left (:func:`recover_staged`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import logging
import os
import shutil
import sys
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PARTIAL_MARK = ".partial-"
REPLACED_MARK = ".replaced-"
log = logging.getLogger(__name__)


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} is not supported; choose one of {sorted(DTYPES)}.")
    return DTYPES[name]


def cast_floating(tensors: Mapping[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    """Cast floating-point tensors to ``dtype`` (None = keep); integer/bool buffers (``d2t``, ``t2d``) keep theirs."""
    return {
        name: t.detach().to(dtype) if dtype is not None and t.is_floating_point() else t.detach()
        for name, t in tensors.items()
    }


def save_tensors(tensors: Mapping[str, Tensor], path: Path, metadata: Mapping[str, str] | None = None) -> int:
    """Write ``tensors`` to a safetensors file (``format: pt``); returns the bytes of tensor data written.

    Tensors that share storage (tied copies) are cloned first: safetensors refuses shared storage.
    """
    seen: set[tuple[int, int]] = set()
    out: dict[str, Tensor] = {}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.numel() and key in seen:
            t = t.clone()
        seen.add(key)
        out[name] = t
    save_file(out, str(path), metadata={"format": "pt", **dict(metadata or {})})
    # safetensors writes through a private (0600) temporary file; give the file the mode open() would, as Hub
    # downloads have (huggingface_hub applies the umask too), so another user can serve the export.
    os.chmod(path, 0o666 & ~_umask())
    return sum(t.numel() * t.element_size() for t in out.values())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_tensors(path: Path, names: list[str] | None = None) -> dict[str, Tensor]:
    """Tensors of one safetensors file (all, or ``names``), on CPU."""
    with open_safetensors(path) as f:
        return {name: f.get_tensor(name) for name in (names if names is not None else f.keys())}


@contextlib.contextmanager
def open_safetensors(path: Path) -> Iterator[Any]:
    """``safe_open`` on the CPU, with errors that name the file (safetensors' own do not).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a truncated or corrupt file (its header does not describe its bytes).
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} does not exist: the export is incomplete. Export it again.")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except SafetensorError as err:
        raise ValueError(f"{path} is not a complete safetensors file ({err}; {Path(path).stat().st_size} bytes): "
                         f"it was truncated or corrupted. Export it again.") from None
    with handle as f:
        yield f


def tensor_names(path: Path) -> list[str]:
    with open_safetensors(path) as f:
        return list(f.keys())


def tensor_nbytes(path: Path) -> dict[str, int]:
    """Bytes of each tensor of a safetensors file, from its header (no data is read)."""
    with open_safetensors(path) as f:
        sizes = {}
        for name in f.keys():
            sl = f.get_slice(name)
            numel = 1
            for d in sl.get_shape():
                numel *= d
            sizes[name] = numel * _DTYPE_BYTES[sl.get_dtype()]
        return sizes


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist.") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}).") from None


def write_json(path: Path, data: Any) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def link_or_copy(src: Path, dst: Path) -> str:
    """Hard-link ``src`` to ``dst`` (same file, no extra space), falling back to a copy; returns which it did."""
    try:
        os.link(src, dst)
        return "link"
    except OSError:  # another filesystem, or links unsupported
        shutil.copy2(src, dst)
        return "copy"


def _looks_like_export(path: Path) -> bool:
    return path.is_dir() and ((path / "config.json").is_file() or not any(path.iterdir()))


@contextlib.contextmanager
def staged_directory(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory next to ``out``; on success rename it onto ``out`` atomically.

    On any exception the staging directory is removed and ``out`` is left as it was. An existing ``out`` is
    swapped with the staging directory in one atomic step where the system offers it (Linux ``renameat2``
    ``RENAME_EXCHANGE``); elsewhere it is first moved to a backup (``.NAME.replaced-*``), and a process killed
    between the two renames leaves that backup, which the next export to ``out`` puts back
    (:func:`recover_staged`) before anything else.

    Raises:
        FileExistsError: ``out`` exists and ``overwrite`` is False.
        ValueError: ``out`` exists, ``overwrite`` is True, but it does not look like a model directory (no
            ``config.json`` and not empty), so replacing it could destroy unrelated files.
    """
    out = Path(out)
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = _staging_name(out, PARTIAL_MARK)
    stage.mkdir()
    try:
        yield stage
        if not out.exists():
            os.replace(stage, out)
        elif exchange_paths(stage, out):
            shutil.rmtree(stage, ignore_errors=True)  # now holds the old export
        else:
            old = _staging_name(out, REPLACED_MARK)
            os.replace(out, old)
            try:
                os.replace(stage, out)
            except BaseException:
                os.replace(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _staging_name(out: Path, mark: str) -> Path:
    """``.NAME<mark><pid>-<random>`` beside ``out``: the pid tells a later run whether its writer is still alive."""
    return out.parent / f".{out.name}{mark}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def recover_staged(out: Path) -> list[str]:
    """Clean up after exports to ``out`` that were killed: put back a backup of a missing ``out``, remove staging
    and backup directories whose process is gone. Returns what it did (also logged).

    Directories of a live process (another export to the same ``out`` running now) are left alone.
    """
    out = Path(out)
    if not out.parent.is_dir():
        return []
    done: list[str] = []
    stale = {mark: sorted((p for p in out.parent.glob(f".{glob.escape(out.name)}{mark}*")
                           if p.is_dir() and not _writer_alive(p.name.rsplit(mark, 1)[1])),
                          key=lambda p: p.stat().st_mtime)
             for mark in (PARTIAL_MARK, REPLACED_MARK)}
    if not out.exists() and stale[REPLACED_MARK]:
        backup = stale[REPLACED_MARK].pop()  # the newest: what `out` was when the last export replaced it
        os.replace(backup, out)
        done.append(f"restored {out} from {backup.name} (an export was killed while replacing it)")
    for path in stale[PARTIAL_MARK] + stale[REPLACED_MARK]:
        shutil.rmtree(path, ignore_errors=True)
        done.append(f"removed the stale staging directory {path}")
    for line in done:
        log.warning("export: %s", line)
    return done


def _writer_alive(suffix: str) -> bool:
    pid = suffix.split("-", 1)[0]
    if not pid.isdigit() or "-" not in suffix:
        return False  # no pid in the name (an older dspark_lightning): nothing can still be writing it
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # the filesystem or kernel lacks it
        return False
    raise OSError(code, os.strerror(code), f"{a} <-> {b}")


def check_output(out: Path, overwrite: bool) -> None:
    """Fail early (before any work) when ``out`` cannot be written; see :func:`staged_directory`. Repairs what a
    killed export to ``out`` left first (:func:`recover_staged`)."""
    out = Path(out)
    recover_staged(out)
    if not out.exists():
        return
    if not overwrite:
        raise FileExistsError(f"Output {out} already exists; pass --overwrite true to replace it, or choose another "
                              f"--out.")
    if not _looks_like_export(out):
        raise ValueError(
            f"Refusing to replace {out}: it is not empty and has no config.json, so it does not look like a model "
            f"export. Remove it yourself or choose another --out."
        )
