"""Which implementation a kernel call runs: Triton or the plain-PyTorch reference.

Rule (DESIGN.md): Triton on CUDA tensors; on CPU tensors the Triton interpreter when
TRITON_INTERPRET=1 was set before `triton` was imported, else the reference. The variable
STEPVOX_KERNELS=reference|triton|auto, or the `use_backend` context manager, overrides the rule
(benchmarks time the references this way; engine tests on CPU skip the slow interpreter).
"""
from __future__ import annotations

import contextlib
import os

import torch

_VALID = ("auto", "reference", "triton")
_forced: list[str] = []       # stack of forced modes (process-wide: engine threads see it too)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


# Triton decides at decoration time whether a @triton.jit function is interpreted, so what counts
# is the variable's value when the kernel modules were imported (this module is imported first).
INTERPRETER_ACTIVE = _truthy(os.environ.get("TRITON_INTERPRET"))


def current_mode() -> str:
    mode = _forced[-1] if _forced else os.environ.get("STEPVOX_KERNELS", "auto")
    if mode not in _VALID:
        raise ValueError(f"STEPVOX_KERNELS must be one of {_VALID}, got {mode!r}")
    return mode


def use_triton(tensor: torch.Tensor) -> bool:
    """True when a kernel called on `tensor` should run its Triton implementation."""
    mode = current_mode()
    if mode == "reference":
        return False
    if tensor.is_cuda:
        return True
    if mode == "triton" and not INTERPRETER_ACTIVE:
        raise RuntimeError(
            "STEPVOX_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
        )
    return INTERPRETER_ACTIVE


@contextlib.contextmanager
def use_backend(mode: str):
    """Force a backend for the calls made while the block runs (in every thread)."""
    if mode not in _VALID:
        raise ValueError(f"backend must be one of {_VALID}, got {mode!r}")
    _forced.append(mode)
    try:
        yield
    finally:
        _forced.pop()


_SM_COUNT: dict[int, int] = {}


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached; 8 stands in for a CPU), for grid sizing."""
    if device.type != "cuda":
        return 8
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]
