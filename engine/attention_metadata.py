"""What the attention layers need to know about one step's batch.

Tokens of a step are laid out decodes first (one token per sequence, served by the paged decode
kernel), then prefill chunks (served by the varlen prefill kernel, reading earlier context from the
cache). The model runner builds this; the layers only read it.
"""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor | None          # [T] int64 cache slot of each token (-1: don't write); None: no cache
    num_decode: int = 0                        # the first num_decode tokens are decodes
    decode_block_table: torch.Tensor | None = None   # [num_decode, max_pages] int32
    decode_seq_lens: torch.Tensor | None = None      # [num_decode] int32, including the new token
    decode_num_splits: int | None = None
    decode_max_seq_len: int | None = None
    num_prefill_tokens: int = 0
    prefill_cu_seqlens: torch.Tensor | None = None   # [P + 1] int32 over the prefill tokens
    prefill_max_len: int = 0
    prefill_context_lens: torch.Tensor | None = None  # [P] int32; None when every chunk starts at 0
    prefill_block_table: torch.Tensor | None = None   # [P, max_pages] int32 (needed with context)
