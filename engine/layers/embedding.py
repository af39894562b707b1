"""Vocabulary-parallel token embedding and LM head (the head is a separate tensor: never tied)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed.parallel_state import TPGroup
from ..errors import ConfigError
from .linear import Matmul


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
    def __init__(self, vocab_size: int, hidden: int, dtype: torch.dtype, device: torch.device, tp: TPGroup,
                 matmul: Matmul):
        super().__init__(vocab_size, hidden, dtype, device, tp)
        self.matmul = matmul

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits (model dtype) for the given rows."""
        return self.tp.gather_logits(self.matmul(hidden, self.weight))
