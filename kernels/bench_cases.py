"""What `stepvox bench kernels` knows of an op: how to make its inputs at a named shape, its Triton
call, its reference, and the work it does (FLOPs, bytes moved).

bench_cases_llm.py (the LLM engine's ops) and bench_cases_audio.py (the audio tokenizer's and the
speech decoder's) list the ops; catalog.py gathers them. `KernelOp.make(shape, device, dtype,
generator)` returns a `KernelCase`:

- `run()`: one call of the Triton implementation (what is timed; it may write to its own buffers
  again and again);
- `compare()`: (Triton result, reference result) computed from fresh copies of the inputs, checked
  with the case's `atol` / `rtol`;
- `flops` and `bytes`: the work of one `run()` (bytes: every input read and output written once),
  for achieved TF/s and GB/s.

Shapes are dicts of named integers. `default_shape` is a released model's (what the GPU times);
`small_shape` is small enough for the Triton interpreter on the CPU (what the tests check).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import torch


@dataclasses.dataclass
class KernelCase:
    run: Callable[[], Any]
    compare: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    flops: int
    bytes: int
    atol: float
    rtol: float


@dataclasses.dataclass(frozen=True)
class KernelOp:
    name: str
    family: str                                   # "llm" or "audio"
    module: str                                   # where the kernel lives (kernels/<module>.py)
    default_shape: dict[str, int]
    small_shape: dict[str, int]
    make: Callable[[dict[str, int], torch.device, torch.dtype, torch.Generator], KernelCase]
    dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16, torch.float32)
    note: str = ""

    def shape(self, overrides: dict[str, int] | None = None, small: bool = False) -> dict[str, int]:
        """The op's shape with `overrides` applied; an unknown name is refused (naming the known)."""
        base = dict(self.small_shape if small else self.default_shape)
        for key, value in (overrides or {}).items():
            if key not in base:
                raise KeyError(f"{self.name} has no shape parameter {key!r}; it takes {', '.join(base)}")
            base[key] = int(value)
        return base


@contextlib.contextmanager
def no_tf32():
    """float32 references without TF32: torch lets cuDNN convolutions use it by default (and a
    caller may have allowed it for matmuls), which alone would miss the float32 tolerance."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    prev = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = prev


def make_case(run, compare, flops, bytes_, dtype: torch.dtype, loose: float = 1.0) -> KernelCase:
    """A case with `tolerance(dtype)` (times `loose` for long float32 sums in another order than
    the reference's), whose compare runs with TF32 off."""
    def checked():
        with no_tf32():
            return compare()
    atol, rtol = tolerance(dtype)
    return KernelCase(run=run, compare=checked, flops=int(flops), bytes=int(bytes_), atol=atol * loose,
                      rtol=rtol * loose)


def randn(shape, gen: torch.Generator, device: torch.device, dtype: torch.dtype, std: float = 1.0) -> torch.Tensor:
    """Normal values made on the CPU from `gen` (the same on every device), then moved."""
    return (torch.randn(*shape, generator=gen) * std).to(device=device, dtype=dtype)


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) of a result rounded to `dtype` once after float32 work (a few units in its last place)."""
    return {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}[dtype]
