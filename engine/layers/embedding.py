"""Vocabulary-parallel token embedding and LM head (the head is a separate tensor: never tied)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed.parallel_state import TPGroup
from ..errors import CheckpointError, ConfigError
from .linear import Matmul, copy_rows, stored_fp8, weight_params


class _VocabSlice(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, dtype: torch.dtype, device: torch.device, tp: TPGroup):
        super().__init__()
        self.tp = tp
        if vocab_size % tp.size:
            raise ConfigError(f"vocab size {vocab_size} cannot be split evenly over {tp.size} ranks")
        self.tp_size = tp.size
        self.local_vocab = vocab_size // tp.size
        self.start = tp.rank * self.local_vocab
        self.weight = nn.Parameter(torch.empty(self.local_vocab, hidden, dtype=dtype, device=device),
                                   requires_grad=False)

    def load_shard(self, source, shard: int = 0) -> None:
        self.weight.data.copy_(source[self.start:self.start + self.local_vocab])


class VocabParallelEmbedding(_VocabSlice):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        inside = (local >= 0) & (local < self.local_vocab)
        out = F.embedding(local.clamp(0, self.local_vocab - 1), self.weight) * inside.unsqueeze(-1)
        return self.tp.all_reduce(out)


class ParallelLMHead(_VocabSlice):
    """`fp8`: the head's weight in FP8 with a scale per vocabulary row (linear.py's rules)."""

    def __init__(self, vocab_size: int, hidden: int, dtype: torch.dtype, device: torch.device, tp: TPGroup,
                 matmul: Matmul, fp8: bool = False):
        super().__init__(vocab_size, hidden, dtype, device, tp)
        self.matmul = matmul
        if fp8:
            weight_params(self, self.local_vocab, hidden, dtype, device, fp8)
        else:
            self.weight_scale = None

    def load_shard(self, source, shard: int = 0, scale=None) -> None:
        as_stored = stored_fp8(source, scale, "lm_head.weight")
        if as_stored and self.weight_scale is None:
            raise CheckpointError("lm_head.weight is stored in FP8: load it with an FP8 LM head")
        rows = slice(self.start, self.start + self.local_vocab)
        copy_rows(self.weight.data, None if self.weight_scale is None else self.weight_scale.data, source[rows],
                  scale[rows] if as_stored else None)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits (model dtype) for the given rows."""
        return self.tp.gather_logits(self.matmul(hidden, self.weight, self.weight_scale))
