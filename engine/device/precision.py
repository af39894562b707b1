"""Matrix-product precision of float32 models on CUDA."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def matmul_precision(tf32: bool, device: torch.device):
    """Inside the block, float32 matrix products on `device` use TF32 tensor cores when `tf32`
    (other numerics than float32: opt-in); torch's setting is restored after."""
    if not tf32 or device.type != "cuda":
        yield
        return
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
