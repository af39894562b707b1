"""`load_format="dummy"`: random weights of a Step1 config's shapes, made on the device tensor by
tensor, for benchmarks of shapes whose checkpoint does not fit a disk (the 130B chat model; vLLM's
`--load-format dummy`). The folder needs only config.json and a tokenizer.

A tensor's values depend on its name only (a seed from the name), so every tensor-parallel rank
makes the same whole tensor and keeps its slice, and a bf16 and an FP8 engine of one folder see the
same weights (the FP8 one quantizes them while loading). Projections and the embedding are
N(0, 0.02), norms 1: finite through any depth.
"""
from __future__ import annotations

import zlib

import torch

from ..config import Step1Config
from .step1_checkpoint import expected_shapes

WEIGHT_STD = 0.02


class _RandomTensor:
    """Stands in for a safetensors slice: indexing makes the whole tensor, then slices it."""

    def __init__(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        self.name, self.shape, self.dtype, self.device = name, shape, dtype, device

    def get_dtype(self) -> str:
        return "BF16"

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def __getitem__(self, index) -> torch.Tensor:
        if self.name.endswith("norm.weight"):
            return torch.ones(self.shape, dtype=self.dtype, device=self.device)[index]
        gen = torch.Generator(device=self.device).manual_seed(zlib.crc32(self.name.encode()))
        whole = torch.empty(self.shape, dtype=self.dtype, device=self.device).normal_(0.0, WEIGHT_STD, generator=gen)
        return whole[index]


class DummyReader:
    """CheckpointReader's interface over random tensors of `cfg`'s shapes, made on `device`."""

    def __init__(self, folder: str, cfg: Step1Config, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.bfloat16):
        self.folder, self.cfg = folder, cfg
        self.shapes = expected_shapes(cfg)
        self.locations = {name: "dummy" for name in self.shapes}
        self.device, self.dtype = torch.device(device), dtype

    def get(self, name: str) -> _RandomTensor:
        return _RandomTensor(name, self.shapes[name], self.dtype, self.device)

    def has(self, name: str) -> bool:
        return name in self.shapes

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
