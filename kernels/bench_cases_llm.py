"""The LLM engine's kernels as `stepvox bench kernels` ops (bench_cases.py says what an op holds).

Default shapes are Step-Audio-TTS-3B's (hidden 3072, 48 heads of 64, 4 KV groups, MLP 8192,
vocabulary 74752) at a decode batch of 16 or a 2048-token prefill; shape parameters change them
(`--shape heads=96,kv_heads=8,head_dim=128` is the 130B chat model's attention). Each case's
`compare` runs the Triton path and the reference path (backend="reference") on fresh copies.
"""
from __future__ import annotations

import torch

from .alibi import alibi_slopes
from .argmax import argmax_rows
from .attention_decode import attention_decode
from .attention_prefill import attention_prefill
from .activation import silu_and_mul
from .bench_cases import KernelCase, KernelOp, make_case, nbytes, randn
from .embedding import embedding_sumsq
from .gemm_fp8 import linear_fp8
from .gemv import linear_small_m, linear_small_m_add_, rms_linear_small_m
from .fp8 import E4M3_MAX, FP8_DTYPE, quantize_rows
from .kv_cache import write_kv
from .norm import rms_norm
from .sampling import sample_top_k, sample_top_k_reference

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _case(call, flops: int, bytes_: int, dtype: torch.dtype, loose: float = 1.0) -> KernelCase:
    """A case whose `call(backend)` makes fresh inputs' result: timed with Triton, compared with the reference."""
    return make_case(lambda: call("triton"), lambda: (call("triton"), call("reference")), flops, bytes_, dtype, loose)


def _fp8_rows(n: int, k: int, gen, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A random FP8 weight [n, k] with float32 row scales, as the FP8 layers store them."""
    q, scale = quantize_rows(torch.randn(n, k, generator=gen) * 0.02)
    return q.to(device), scale.to(device)


def _paged(batch: int, context: int, kv_heads: int, head_dim: int, page: int, fp8: bool, gen, device, dtype):
    """A filled paged cache for `batch` sequences of `context` keys (pages shuffled) and its block table."""
    per_seq = -(-context // page)
    pages = batch * per_seq
    cache_dtype = FP8_DTYPE if fp8 else dtype
    k_cache = randn((pages, kv_heads, page, head_dim), gen, device, torch.float32).to(cache_dtype)
    v_cache = randn((pages, kv_heads, page, head_dim), gen, device, torch.float32).to(cache_dtype)
    table = torch.randperm(pages, generator=gen).to(torch.int32).view(batch, per_seq).to(device)
    scales = (torch.full((kv_heads,), 0.5, device=device), torch.full((kv_heads,), 0.25, device=device)) if fp8 \
        else (None, None)
    return k_cache, v_cache, table, scales


def make_attention_decode(s, device, dtype, gen):
    b, hq, hkv, d, ctx, page = s["batch"], s["heads"], s["kv_heads"], s["head_dim"], s["context"], s["page_size"]
    fp8 = bool(s["kv_fp8"])
    k_cache, v_cache, table, (k_scale, v_scale) = _paged(b, ctx, hkv, d, page, fp8, gen, device, dtype)
    q = randn((b, hq, d), gen, device, dtype)
    k_new, v_new = randn((b, hkv, d), gen, device, dtype), randn((b, hkv, d), gen, device, dtype)
    seq_lens = torch.full((b,), ctx, dtype=torch.int32, device=device)
    slots = (table[:, (ctx - 1) // page].long() * page + (ctx - 1) % page)
    slopes = alibi_slopes(hq).to(device)

    def call(backend):
        kc, vc = k_cache.clone(), v_cache.clone()
        return attention_decode(q, kc, vc, table, seq_lens, slopes, k_new=k_new, v_new=v_new, new_slots=slots,
                                k_scale=k_scale, v_scale=v_scale, backend=backend)

    flops = 4 * b * hq * ctx * d                          # q.k and p.v over every key
    bytes_ = nbytes(q, k_new, v_new) * 2 + 2 * b * ctx * hkv * d * k_cache.element_size()
    return _case(call, flops, bytes_, dtype)


def make_attention_prefill(s, device, dtype, gen):
    n, hq, hkv, d, ctx, page = s["tokens"], s["heads"], s["kv_heads"], s["head_dim"], s["context"], s["page_size"]
    q = randn((n, hq, d), gen, device, dtype)
    k, v = randn((n, hkv, d), gen, device, dtype), randn((n, hkv, d), gen, device, dtype)
    cu = torch.tensor([0, n], dtype=torch.int32, device=device)
    slopes = alibi_slopes(hq).to(device)
    extra = {}
    cached = 0
    if ctx:
        k_cache, v_cache, table, _ = _paged(1, ctx, hkv, d, page, False, gen, device, dtype)
        extra = dict(k_cache=k_cache, v_cache=v_cache, block_table=table,
                     context_lens=torch.tensor([ctx], dtype=torch.int32, device=device))
        cached = 2 * ctx * hkv * d * k_cache.element_size()

    def call(backend):
        return attention_prefill(q, k, v, cu, n, slopes, backend=backend, **extra)

    visible = n * ctx + n * (n + 1) // 2                 # (query, key) pairs under the causal mask
    return _case(call, 4 * hq * d * visible, nbytes(q, k, v) + nbytes(q) + cached, dtype)


def make_write_kv(s, device, dtype, gen):
    n, hkv, d, page = s["tokens"], s["kv_heads"], s["head_dim"], s["page_size"]
    fp8 = bool(s["kv_fp8"])
    k, v = randn((n, hkv, d), gen, device, dtype), randn((n, hkv, d), gen, device, dtype)
    pages = -(-n // page)
    cache_dtype = FP8_DTYPE if fp8 else dtype
    k_cache = torch.zeros(pages, hkv, page, d, dtype=cache_dtype, device=device)
    slots = torch.randperm(pages * page, generator=gen)[:n].to(device)
    scales = (dict(k_scale=(k.float().abs().amax(dim=(0, 2)) / E4M3_MAX).contiguous(),
                   v_scale=(v.float().abs().amax(dim=(0, 2)) / E4M3_MAX).contiguous()) if fp8 else {})

    def call(backend):
        kc, vc = torch.zeros_like(k_cache), torch.zeros_like(k_cache)
        write_kv(k, v, kc, vc, slots, backend=backend, **scales)
        return torch.cat([kc.float(), vc.float()])

    return _case(call, 0, nbytes(k, v) + 2 * n * hkv * d * k_cache.element_size(), dtype)


def make_rms_norm(s, device, dtype, gen):
    x = randn((s["rows"], s["hidden"]), gen, device, dtype)
    residual = randn((s["rows"], s["hidden"]), gen, device, dtype)
    weight = randn((s["hidden"],), gen, device, dtype)

    def call(backend):
        out, _ = rms_norm(x, weight, 1e-5, residual.clone(), backend=backend)
        return out

    return _case(call, 6 * x.numel(), nbytes(x, residual, weight) + 2 * nbytes(x), dtype)


def make_silu_and_mul(s, device, dtype, gen):
    x = randn((s["rows"], 2 * s["intermediate"]), gen, device, dtype)
    return _case(lambda backend: silu_and_mul(x, backend=backend), 6 * x.numel() // 2, nbytes(x) * 3 // 2, dtype)


def make_embedding_sumsq(s, device, dtype, gen):
    weight = randn((s["vocab"], s["hidden"]), gen, device, dtype, std=0.02)
    ids = torch.randint(0, s["vocab"], (s["rows"],), generator=gen).to(device)

    def call(backend):
        rows, sumsq = embedding_sumsq(ids, weight, backend=backend)
        return torch.cat([rows.float().flatten(), sumsq.float().sum(0).flatten()])

    return _case(call, 2 * s["rows"] * s["hidden"], 2 * s["rows"] * s["hidden"] * weight.element_size(), dtype)


def make_argmax(s, device, dtype, gen):
    logits = randn((s["rows"], s["vocab"]), gen, device, dtype)
    return _case(lambda backend: argmax_rows(logits, backend=backend).float(), logits.numel(), nbytes(logits), dtype)


def make_sample_top_k(s, device, dtype, gen):
    logits = randn((s["rows"], s["vocab"]), gen, device, dtype)
    temperatures = torch.full((s["rows"],), 0.7, device=device)
    top_ks = torch.full((s["rows"],), s["top_k"], dtype=torch.int32, device=device)
    seeds = torch.arange(s["rows"], dtype=torch.int64, device=device)
    uniforms = torch.rand(s["rows"], s["vocab"], generator=gen).to(device)

    def call(backend):
        # both paths draw from the same given uniforms, so their ids are comparable
        if backend == "reference":
            return sample_top_k_reference(logits, temperatures, top_ks, uniforms).float()
        return sample_top_k(logits, temperatures, top_ks, seeds, uniforms=uniforms, backend=backend).float()

    return _case(call, 4 * logits.numel(), nbytes(logits, uniforms), dtype)


def _gemv_inputs(s, device, dtype, gen):
    m, n, k = s["rows"], s["n"], s["k"]
    x = randn((m, k), gen, device, dtype)
    if s["fp8"]:
        weight, scale = _fp8_rows(n, k, gen, device)
    else:
        weight, scale = randn((n, k), gen, device, dtype, std=0.02), None
    return x, weight, scale


def make_linear_small_m(s, device, dtype, gen):
    x, weight, scale = _gemv_inputs(s, device, dtype, gen)
    return _case(lambda backend: linear_small_m(x, weight, scale=scale, backend=backend),
                 2 * x.shape[0] * weight.numel(), nbytes(x, weight) + x.shape[0] * weight.shape[0] * x.element_size(),
                 dtype, loose=2.0)


def make_linear_small_m_add(s, device, dtype, gen):
    x, weight, scale = _gemv_inputs(s, device, dtype, gen)
    residual = randn((x.shape[0], weight.shape[0]), gen, device, dtype)

    def call(backend):
        r = residual.clone()
        linear_small_m_add_(x, weight, r, scale=scale, backend=backend)
        return r

    return _case(call, 2 * x.shape[0] * weight.numel(), nbytes(x, weight) + 2 * nbytes(residual), dtype, loose=2.0)


def make_rms_linear_small_m(s, device, dtype, gen):
    x, weight, scale = _gemv_inputs(s, device, dtype, gen)
    sumsq = (x.float() ** 2).sum(1)[None, :].contiguous()
    norm_weight = randn((x.shape[1],), gen, device, dtype) if scale is not None else None

    def call(backend):
        return rms_linear_small_m(x, weight, sumsq, 1e-5, silu_and_mul=True, scale=scale, norm_weight=norm_weight,
                                  backend=backend)

    return _case(call, 2 * x.shape[0] * weight.numel(),
                 nbytes(x, weight) + x.shape[0] * weight.shape[0] // 2 * x.element_size(), dtype, loose=2.0)


def make_linear_fp8(s, device, dtype, gen):
    m, n, k = s["rows"], s["n"], s["k"]
    x = randn((m, k), gen, device, dtype)
    weight, scale = _fp8_rows(n, k, gen, device)
    # long float32 sums in a different order than the reference's: a few units of the output dtype
    return _case(lambda backend: linear_fp8(x, weight, scale, backend=backend), 2 * m * n * k,
                 nbytes(x, weight) + m * n * x.element_size(), dtype, loose=2.0)


def _op(name, module, default, small, make, dtypes=FLOAT_DTYPES, note=""):
    return KernelOp(name=name, family="llm", module=module, default_shape=default, small_shape=small, make=make,
                    dtypes=dtypes, note=note)


_ATTN = dict(heads=48, kv_heads=4, head_dim=64, page_size=16)
_ATTN_SMALL = dict(heads=8, kv_heads=2, head_dim=32, page_size=16)
_PROJ_3B = dict(n=2 * 8192, k=3072)                         # gate|up of TTS-3B

LLM_OPS = [
    _op("attention_decode", "attention_decode", dict(batch=16, context=4096, kv_fp8=0, **_ATTN),
        dict(batch=2, context=80, kv_fp8=0, **_ATTN_SMALL), make_attention_decode,
        note="paged split-KV decode with the fused new-key write; kv_fp8=1 reads an FP8 cache"),
    _op("attention_prefill", "attention_prefill", dict(tokens=2048, context=0, **_ATTN),
        dict(tokens=70, context=40, **_ATTN_SMALL), make_attention_prefill,
        note="causal sqrt-ALiBi prefill; context > 0 adds paged cached keys"),
    _op("write_kv", "kv_cache", dict(tokens=2048, kv_heads=4, head_dim=64, page_size=16, kv_fp8=0),
        dict(tokens=40, kv_heads=2, head_dim=32, page_size=16, kv_fp8=0), make_write_kv,
        note="kv_fp8=1 quantizes into an FP8 cache"),
    _op("rms_norm", "norm", dict(rows=2048, hidden=3072), dict(rows=5, hidden=96), make_rms_norm,
        note="with the residual add"),
    _op("silu_and_mul", "activation", dict(rows=2048, intermediate=8192), dict(rows=5, intermediate=96),
        make_silu_and_mul),
    _op("embedding_sumsq", "embedding", dict(rows=16, vocab=74752, hidden=3072), dict(rows=5, vocab=300, hidden=64),
        make_embedding_sumsq),
    _op("argmax_rows", "argmax", dict(rows=16, vocab=74752), dict(rows=3, vocab=700), make_argmax),
    _op("sample_top_k", "sampling", dict(rows=16, vocab=74752, top_k=50), dict(rows=3, vocab=700, top_k=5),
        make_sample_top_k, note="given uniforms, so the draw is comparable with the reference"),
    _op("linear_small_m", "gemv", dict(rows=1, fp8=0, **_PROJ_3B), dict(rows=3, n=96, k=64, fp8=0),
        make_linear_small_m, note="decode GEMV; fp8=1 reads FP8 weights with row scales"),
    _op("linear_small_m_add_", "gemv", dict(rows=1, n=3072, k=8192, fp8=0), dict(rows=3, n=64, k=96, fp8=0),
        make_linear_small_m_add, note="down projection + residual add, in place"),
    _op("rms_linear_small_m", "gemv", dict(rows=1, fp8=0, **_PROJ_3B), dict(rows=3, n=96, k=64, fp8=0),
        make_rms_linear_small_m, note="RMSNorm folded into the product, SiLU-and-mul epilogue"),
    _op("linear_fp8", "gemm_fp8", dict(rows=2048, **_PROJ_3B), dict(rows=40, n=96, k=64), make_linear_fp8,
        note="prefill GEMM with FP8 weights (W8A16)"),
]
