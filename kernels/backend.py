"""Which implementation a kernel call runs: Triton or the plain-PyTorch reference.

Every kernel takes `backend`: "auto" (the default) runs Triton on CUDA tensors and, on CPU tensors,
the Triton interpreter when TRITON_INTERPRET=1 was set before `triton` was imported, else the
reference; "triton" and "reference" force one. Callers above the kernels (layers, models,
engines) hold a `KernelConfig` and pass its fields down, so two engines in one process can run
different backends and nothing is switched process-wide.
"""
from __future__ import annotations

import dataclasses
import os

import torch

BACKENDS = ("auto", "reference", "triton")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


# Triton decides at decoration time whether a @triton.jit function is interpreted, so what counts
# is the variable's value when the kernel modules were imported (this module is imported first).
INTERPRETER_ACTIVE = _truthy(os.environ.get("TRITON_INTERPRET"))


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """How the kernels of one model run: `backend` (see the module doc) and `pdl` (programmatic
    dependent launch of the decode-step and flow kernels on Hopper; kernels/pdl.py)."""
    backend: str = "auto"
    pdl: bool = True

    def __post_init__(self):
        check_backend(self.backend)
        if not isinstance(self.pdl, bool):
            raise ValueError(f"KernelConfig.pdl must be a bool, got {self.pdl!r}")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def use_triton(tensor: torch.Tensor, backend: str = "auto") -> bool:
    """True when a kernel called on `tensor` with `backend` runs its Triton implementation."""
    if check_backend(backend) == "reference":
        return False
    if tensor.is_cuda:
        return True
    if backend == "triton" and not INTERPRETER_ACTIVE:
        raise RuntimeError("the triton backend on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
    return INTERPRETER_ACTIVE


_SM_COUNT: dict[int, int] = {}


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached; 8 stands in for a CPU), for grid sizing."""
    if device.type != "cuda":
        return 8
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]
