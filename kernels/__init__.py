"""stepvox.kernels: the engine's hot ops as pure functions on tensors.

Each op has a Triton implementation and a plain-PyTorch reference beside it; its `backend`
argument picks one per call ("auto": Triton on CUDA; on CPU the interpreter when TRITON_INTERPRET=1,
else the reference). Ops of the decode step and the flow estimator also take `pdl` (kernels/pdl.py).
"""
from .activation import silu_and_mul, silu_and_mul_reference
from .alibi import alibi_slopes, sqrt_alibi_bias
from .attention_decode import attention_decode, attention_decode_reference, default_num_splits
from .attention_prefill import attention_prefill, attention_prefill_reference
from .backend import BACKENDS, KernelConfig, use_triton
from .embedding import embedding_sumsq, embedding_sumsq_reference
from .gemm_fp8 import linear_fp8, linear_fp8_reference
from .gemv import (linear_small_m, linear_small_m_add_, linear_small_m_add_reference, linear_small_m_reference,
                   rms_linear_small_m, rms_linear_small_m_reference)
from .kv_cache import write_kv, write_kv_reference
from .norm import rms_norm, rms_norm_reference

__all__ = [
    "alibi_slopes", "sqrt_alibi_bias",
    "attention_prefill", "attention_prefill_reference",
    "attention_decode", "attention_decode_reference", "default_num_splits",
    "write_kv", "write_kv_reference",
    "rms_norm", "rms_norm_reference",
    "silu_and_mul", "silu_and_mul_reference",
    "linear_small_m", "linear_small_m_reference",
    "rms_linear_small_m", "rms_linear_small_m_reference", "linear_small_m_add_", "linear_small_m_add_reference",
    "linear_fp8", "linear_fp8_reference",
    "embedding_sumsq", "embedding_sumsq_reference",
    "BACKENDS", "KernelConfig", "use_triton",
]
