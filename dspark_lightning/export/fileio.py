"""Filesystem helpers of the exporters: staged (atomic) output directories, safetensors, JSON, links.

An export is written into a hidden sibling directory (``.NAME.partial-<random>``) and renamed onto ``NAME`` only
once every file is complete, so an interrupted export never leaves a directory that looks finished: either the
old ``NAME`` (or nothing) is there, or the complete new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PARTIAL_MARK = ".partial-"


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
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {name: f.get_tensor(name) for name in (names if names is not None else f.keys())}


def tensor_names(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return list(f.keys())


def tensor_nbytes(path: Path) -> dict[str, int]:
    """Bytes of each tensor of a safetensors file, from its header (no data is read)."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
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

    On any exception the staging directory is removed and ``out`` is left as it was.

    Raises:
        FileExistsError: ``out`` exists and ``overwrite`` is False.
        ValueError: ``out`` exists, ``overwrite`` is True, but it does not look like a model directory (no
            ``config.json`` and not empty), so replacing it could destroy unrelated files.
    """
    out = Path(out)
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}{PARTIAL_MARK}{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        yield stage
        if out.exists():
            old = out.parent / f".{out.name}.replaced-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(stage, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def check_output(out: Path, overwrite: bool) -> None:
    """Fail early (before any work) when ``out`` cannot be written; see :func:`staged_directory`."""
    out = Path(out)
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
