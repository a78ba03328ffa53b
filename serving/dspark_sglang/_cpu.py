"""Shims that let the conformance check import SGLang's draft-model code on a CPU-only machine.

Used by :mod:`dspark_sglang.check` only, never by the launcher or the plugin (a real GPU serve has a real
torchvision and CUDA). Three gaps, all outside the code paths the check exercises:

- ``torchvision``: ``sglang.srt.configs`` imports it for image preprocessing of vision models. The PyPI wheel
  is a CUDA build that fails to load beside CPU torch, so when no working torchvision is importable a
  stand-in package is served whose attributes are inert placeholder classes.
- SGLang's model-parallel groups must exist even at tp=1: a one-process ``gloo`` group is created.
- ``RotaryEmbedding`` uses its native (pure torch) path only when SGLang believes it is on CPU; otherwise it
  tries ``vllm._custom_ops``. The module flag is set for this process. Off CUDA it also stores its cos/sin cache
  in the model dtype (bf16); ``SGLANG_ROPE_CACHE_FP32=1`` keeps it fp32, as on CUDA.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import socket
import sys
import types


class _PlaceholderMeta(type):
    """Any attribute of a placeholder class is another placeholder class."""

    def __getattr__(cls, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return _PlaceholderMeta(name, (), {"__module__": cls.__module__})


class _PlaceholderModule(types.ModuleType):
    def __getattr__(self, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return _PlaceholderMeta(name, (), {"__module__": self.__name__})


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, root: str) -> None:
        self.root = root

    def find_spec(self, fullname, path=None, target=None):  # importlib protocol
        if fullname == self.root or fullname.startswith(self.root + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _PlaceholderModule(spec.name)
        module.__path__ = []
        # transformers parses the version of any importable torchvision; the oldest possible one turns off
        # its version-gated torchvision code paths.
        module.__version__ = "0.0.0"
        return module

    def exec_module(self, module) -> None:
        pass


def _torchvision_works() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # a CUDA wheel raises RuntimeError, a missing one ImportError
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        return False
    return True


def install_cpu_shims() -> None:
    """Make SGLang's model modules importable and constructible in this CPU process (idempotent)."""
    if not any(isinstance(f, _StandInFinder) for f in sys.meta_path) and not _torchvision_works():
        sys.meta_path.insert(0, _StandInFinder("torchvision"))
    os.environ.setdefault("SGLANG_ROPE_CACHE_FP32", "1")
    import sglang.srt.layers.rotary_embedding.base as rotary_base

    rotary_base._is_cpu = True
    init_single_process_groups()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_process_groups() -> None:
    """World-size-1 gloo process group and SGLang's tp/pp/ep groups (its layers need them at tp=1).

    The rendezvous variables are set for the call only: a fixed or inherited port collides when several checks
    run at once or one starts another as a subprocess.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        return
    from sglang.test.layer_ut_utils import init_single_process_dist

    names = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    port = _free_port()
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        init_single_process_dist(master_port=port)
    finally:
        for n in names:
            os.environ.pop(n, None)
        os.environ.update(saved)
