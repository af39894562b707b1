"""Step1 self-attention: fused QKV projection, paged KV cache, sqrt-ALiBi kernels, output projection."""
from __future__ import annotations

import torch
from torch import nn

from stepvox.kernels import KernelConfig, alibi_slopes, attention_decode, attention_prefill, write_kv

from ..attention_metadata import AttentionMetadata
from ..distributed.parallel_state import TPGroup
from ..errors import ConfigError
from .linear import ColumnParallelLinear, Matmul, RowParallelLinear


class PagedSqrtAlibiAttention(nn.Module):
    """Attention over this rank's heads, given q/k/v of the step's tokens and the layer's cache.

    An FP8 cache comes with `k_scale`, `v_scale` [kv_heads] (model_runner.py sets all four). While
    `kv_absmax` [2, kv_heads] is set, each forward also raises it to the step's largest |K| and |V|
    per KV head (the calibration of the FP8 scales).
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, slopes: torch.Tensor,
                 kernels: KernelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.kernels = kernels
        self.scale = head_dim ** -0.5
        self.register_buffer("slopes", slopes.float(), persistent=False)
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.k_scale: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None
        self.kv_absmax: torch.Tensor | None = None

    def forward(self, q, k, v, meta: AttentionMetadata) -> torch.Tensor:
        out = torch.empty_like(q)
        d = meta.num_decode
        backend = self.kernels.backend
        scales = dict(k_scale=self.k_scale, v_scale=self.v_scale)
        if self.kv_absmax is not None:
            torch.maximum(self.kv_absmax, torch.stack([k.abs().amax(dim=(0, 2)), v.abs().amax(dim=(0, 2))]).float(),
                          out=self.kv_absmax)
        if self.k_cache is not None and meta.slot_mapping is not None and meta.num_prefill_tokens:
            write_kv(k[d:], v[d:], self.k_cache, self.v_cache, meta.slot_mapping[d:], **scales, backend=backend)
        if d:
            # the decode kernel writes the decodes' own K/V to the cache (one launch, not two)
            attention_decode(q[:d], self.k_cache, self.v_cache, meta.decode_block_table, meta.decode_seq_lens,
                             self.slopes, self.scale, k_new=k[:d], v_new=v[:d], new_slots=meta.slot_mapping[:d],
                             num_splits=meta.decode_num_splits, max_seq_len=meta.decode_max_seq_len, out=out[:d],
                             **scales, backend=backend, pdl=self.kernels.pdl)
        if meta.num_prefill_tokens:
            has_ctx = meta.prefill_context_lens is not None
            attention_prefill(q[d:], k[d:], v[d:], meta.prefill_cu_seqlens, meta.prefill_max_len, self.slopes,
                              self.scale, k_cache=self.k_cache if has_ctx else None,
                              v_cache=self.v_cache if has_ctx else None,
                              block_table=meta.prefill_block_table if has_ctx else None,
                              context_lens=meta.prefill_context_lens, out=out[d:], **scales, backend=backend)
        return out


class Step1Attention(nn.Module):
    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, dtype: torch.dtype, device: torch.device,
                 tp: TPGroup, kernels: KernelConfig, matmul: Matmul, fp8: bool = False):
        super().__init__()
        if num_kv_heads % tp.size:
            raise ConfigError(f"tensor_parallel_size {tp.size} must divide the {num_kv_heads} KV groups "
                              f"(each rank keeps whole KV groups with their query heads)")
        head_dim = hidden // num_heads
        self.local_heads, self.local_kv = num_heads // tp.size, num_kv_heads // tp.size
        self.head_dim = head_dim
        self.qkv_proj = ColumnParallelLinear(hidden, [num_heads * head_dim, num_kv_heads * head_dim,
                                                      num_kv_heads * head_dim], dtype, device, tp, matmul,
                                             names=("q_proj", "k_proj", "v_proj"), fp8=fp8)
        self.o_proj = RowParallelLinear(num_heads * head_dim, hidden, dtype, device, tp, matmul, name="o_proj",
                                        fp8=fp8)
        slopes = alibi_slopes(num_heads, tp.rank, tp.size).to(device)
        self.attn = PagedSqrtAlibiAttention(self.local_heads, self.local_kv, head_dim, slopes, kernels)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, reduce: bool = True) -> torch.Tensor:
        return self.o_proj(self.attend(self.qkv_proj(x), meta), reduce)

    def attend(self, qkv: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Attention over the fused q|k|v rows [T, (Hq + 2 Hkv) D]; returns [T, Hq D] for o_proj."""
        t = qkv.shape[0]
        q_end = self.local_heads * self.head_dim
        kv_end = q_end + self.local_kv * self.head_dim
        q = qkv[:, :q_end].view(t, self.local_heads, self.head_dim)
        k = qkv[:, q_end:kv_end].view(t, self.local_kv, self.head_dim)
        v = qkv[:, kv_end:].view(t, self.local_kv, self.head_dim)
        return self.attn(q, k, v, meta).view(t, -1)
