"""Temperature + top-k sampling of logits rows in two launches (k <= 64; greedy rows as k = 1).

The draw is the exponential race the engine's sampler uses: token = argmax over the kept tokens of
p_i / E_i with E_i ~ Exp(1), i.e. argmax of logit_i / T - log(E_i); the softmax normaliser does not
change the argmax, so no softmax is computed. E_i = -log(U_i) with U_i from Philox (`tl.rand`) keyed
by the row's seed and the token id: a draw depends on (seed, logits) only, not on the launch.

1. Candidates: each program takes CHUNK logits of a row and keeps its top MAX_TOP_K as int64 keys
   (the float's order-preserving bits above, the complemented token id below: equal values order
   by smaller id first).
2. Draw: one program per row sorts the candidates, reads the k-th largest value and races every
   candidate at least that large (ties at the k-th value are all kept, as masked_fill(x < kth)
   keeps them; a chunk holding more than MAX_TOP_K such ties contributes MAX_TOP_K of them).
   A greedy row (temperature 0) takes the largest value, smallest id first, without noise.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backend import use_triton

MAX_TOP_K = 64
CHUNK = 2048
LOWEST_KEY = tl.constexpr(-(2 ** 63))      # below every real key: padding of the candidate lists


def sample_top_k_reference(logits: torch.Tensor, temperatures: torch.Tensor, top_ks: torch.Tensor,
                           uniforms: torch.Tensor) -> torch.Tensor:
    """The same rule with given uniforms [N, V] (tests draw them; the kernel derives them from seeds)."""
    x = logits.float()
    greedy = temperatures == 0
    scaled = x / torch.where(greedy, torch.ones_like(temperatures), temperatures)[:, None]
    ks = torch.where(greedy, torch.ones_like(top_ks), top_ks).long()
    kth = scaled.sort(dim=-1, descending=True).values.gather(1, (ks - 1)[:, None])
    noise = -torch.log(-torch.log(uniforms.clamp_min(1e-10)))
    score = torch.where(greedy[:, None], scaled, scaled + noise)
    score = score.masked_fill(scaled < kth, float("-inf"))
    return score.argmax(-1)


@triton.jit
def _to_key(value, token):
    bits = value.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)          # signed order of these ints = float order
    return (ordered.to(tl.int64) << 32) | (0xFFFFFFFF - token.to(tl.int64))


@triton.jit
def _from_key(key):
    ordered = (key >> 32).to(tl.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True), (0xFFFFFFFF - (key & 0xFFFFFFFF)).to(tl.int32)


@triton.jit
def _candidates_kernel(Logits, Temps, Cand, V, stride_l, num_chunks, CHUNK: tl.constexpr, KP: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    tokens = chunk * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(Logits + row.to(tl.int64) * stride_l + tokens, mask=tokens < V, other=float("-inf"))
    t = tl.load(Temps + row)
    scaled = x.to(tl.float32) / tl.where(t == 0.0, 1.0, t)
    best = tl.topk(_to_key(scaled, tokens), KP)
    tl.store(Cand + (row * num_chunks + chunk) * KP + tl.arange(0, KP), best)


@triton.jit
def _draw_kernel(Cand, Temps, TopK, Seeds, Uniforms, Out, n_cand, V, stride_u, CAND_PAD: tl.constexpr,
                 KP: tl.constexpr, GIVEN_UNIFORMS: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, CAND_PAD)
    keys = tl.load(Cand + row * n_cand + offs, mask=offs < n_cand, other=LOWEST_KEY)
    greedy = tl.load(Temps + row) == 0.0
    k = tl.where(greedy, 1, tl.load(TopK + row))
    best = tl.topk(keys, KP)
    kth = tl.max(tl.where(tl.arange(0, KP) == k - 1, best, LOWEST_KEY), axis=0)
    keep = (keys >> 32) >= (kth >> 32)                    # value at least the k-th largest
    value, token = _from_key(keys)
    if GIVEN_UNIFORMS:               # tests: the reference's uniforms instead of Philox
        u = tl.load(Uniforms + row * stride_u + token, mask=(offs < n_cand) & (token < V), other=0.5)
    else:
        u = tl.rand(tl.load(Seeds + row), token)
    u = tl.maximum(u, 1e-10)
    score = tl.where(greedy, value, value - tl.log(-tl.log(u)))
    score = tl.where(keep & (offs < n_cand), score, float("-inf"))
    top = tl.max(score, axis=0)
    chosen = tl.min(tl.where(score == top, token, 2147483647), axis=0)   # smallest id among equals
    tl.store(Out + row, chosen.to(tl.int64))


def sample_top_k(logits: torch.Tensor, temperatures: torch.Tensor, top_ks: torch.Tensor,
                 seeds: torch.Tensor, chunk: int = CHUNK, uniforms: torch.Tensor | None = None, *,
                 backend: str = "auto") -> torch.Tensor:
    """logits [N, V] (any float dtype); temperatures [N] float32 (0: greedy); top_ks [N] integers in
    [1, MAX_TOP_K] (ignored for greedy rows); seeds [N] int64 (one Philox stream per row and call).
    Returns the drawn ids [N] int64 on the logits' device. Triton only (CUDA, or the interpreter);
    `chunk` (a power of two >= MAX_TOP_K) is the candidate pass's tile; `uniforms` [N, V] float32
    replaces the Philox draws (tests compare with sample_top_k_reference that way)."""
    n, vocab = logits.shape
    if not use_triton(logits, backend):
        raise RuntimeError("sample_top_k runs on Triton only; the sampler uses its torch path elsewhere")
    if temperatures.shape != (n,) or top_ks.shape != (n,) or seeds.shape != (n,):
        raise ValueError("sample_top_k: temperatures, top_ks and seeds need one entry per row")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = torch.empty(n, dtype=torch.int64, device=logits.device)
    if n == 0:
        return out
    if chunk < MAX_TOP_K or chunk & (chunk - 1):
        raise ValueError(f"sample_top_k: chunk must be a power of two >= {MAX_TOP_K}, got {chunk}")
    chunks = triton.cdiv(vocab, chunk)
    cand = torch.empty(n, chunks * MAX_TOP_K, dtype=torch.int64, device=logits.device)
    _candidates_kernel[(n, chunks)](logits, temperatures, cand, vocab, logits.stride(0), chunks,
                                    CHUNK=chunk, KP=MAX_TOP_K, num_warps=8)
    given = uniforms is not None
    if given and (uniforms.shape != (n, vocab) or uniforms.dtype != torch.float32):
        raise ValueError("sample_top_k: uniforms must be float32 [N, V]")
    _draw_kernel[(n,)](cand, temperatures, top_ks, seeds, uniforms if given else cand, out, chunks * MAX_TOP_K,
                       vocab, uniforms.stride(0) if given else 0,
                       CAND_PAD=triton.next_power_of_2(chunks * MAX_TOP_K), KP=MAX_TOP_K, GIVEN_UNIFORMS=given,
                       num_warps=8)
    return out
