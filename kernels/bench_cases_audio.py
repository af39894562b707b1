"""The audio kernels' entries in `stepvox bench kernels` (see bench_cases.py): the flow decoder's
estimator ops (row_conv, attention, GroupNorm + Mish, add + LayerNorm, the CFG Euler step), HiFT's
Snake, the Paraformer encoder's SAN-M attention and both tokenizers' nearest-centroid search.

Default shapes are the released models' (SPEC.md §3-§5): CosyVoice-300M-25Hz's flow estimator
(channels 256, 8 heads x 64, GroupNorm(8)) on its CFG batch of 2 sequences x 1120 mel frames
(10 s of speech after a 3 s speaker prompt: 861 + 258 frames, bucketed to 1120), HiFT at 10 s,
the Paraformer encoder's streaming windows and the S3 tokenizer's codebook. Frame masks cut the
last sequence short (a shorter request in a length-bucketed batch), so padding is exercised.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .bench_cases import KernelOp, make_case, nbytes, randn
from .flow_attention import flow_attention, flow_attention_reference
from .flow_conv import conv_spec, conv_weight, row_conv, row_conv_reference
from .flow_fused import (add_layer_norm, add_layer_norm_reference, group_norm_mish, group_norm_mish_reference,
                         group_norm_mish_rows, group_norm_mish_rows_reference)
from .flow_ode import cfg_euler_step, cfg_euler_step_reference
from .nearest_centroid import nearest_centroid, nearest_centroid_reference
from .sanm import sanm_attention, sanm_attention_indexed, sanm_attention_indexed_reference, sanm_attention_reference
from .snake import snake, snake_reference


def _frame_mask(n: int, frames: int, device, dtype) -> torch.Tensor:
    """[n, frames] of 1 / 0: every sequence full except the last, valid for its first 4/5."""
    m = torch.ones(n, frames)
    if n > 1:
        m[-1, max(1, frames * 4 // 5):] = 0
    return m.to(device=device, dtype=dtype)


def _flat(*tensors: torch.Tensor) -> torch.Tensor:
    """Several outputs as one float32 vector, so one compare covers them all."""
    return torch.cat([t.float().flatten() for t in tensors])


# ----------------------------------------------------------------------------- flow estimator
def _row_conv(shape, device, dtype, gen):
    """The estimator's Conv1d k3 p1 in its ResnetBlock1D form, on channels-last rows: input frame
    mask, bias and GroupNorm(8) partial statistics over the output mask's frames in the epilogue.
    (The engine's block1 also carries the 1x1 res_conv beside it: cout 512, statistics of 256.)"""
    n, frames, cin, cout, taps = (shape[k] for k in ("n", "frames", "cin", "cout", "taps"))
    x = randn((n, frames, cin), gen, device, dtype)
    w = conv_weight(randn((cout, cin, taps), gen, device, torch.float32, std=(taps * cin) ** -0.5)).to(dtype)
    b = randn((cout,), gen, device, dtype, std=0.1)
    m = _frame_mask(n, frames, device, dtype)
    spec = conv_spec(taps, 1, taps // 2)
    kw = dict(mask_in=m, mask_out=m, gn_groups=8)

    def compare():
        # statistics are checked by group_norm_mish_rows (whose reference recomputes them from y)
        y, _ = row_conv(x, w, b, spec, backend="triton", **kw)
        return y, row_conv_reference(x, w, b, spec, mask_in=m)
    y = torch.empty(n, spec.out_length(frames), cout, device=device, dtype=dtype)
    rows = n * y.shape[1]
    # 2 per multiply-add; 1 per input element (mask); 1 (bias) + 4 (count, sum, deviation, square) per output
    flops = 2 * rows * cin * cout * taps + n * frames * cin + 5 * rows * cout
    # (the statistics partials, a few KB, are left out of the bytes)
    return make_case(lambda: row_conv(x, w, b, spec, out=y, backend="triton", **kw), compare, flops,
                     nbytes(x, w, b, m, y), dtype)


def _flow_attention(shape, device, dtype, gen):
    """The transformer blocks' self-attention, read from the fused q/k/v rows, padded keys masked."""
    n, frames, heads, d = (shape[k] for k in ("n", "frames", "heads", "head_dim"))
    qkv = randn((n, frames, 3 * heads * d), gen, device, dtype)
    m = _frame_mask(n, frames, device, dtype)
    out = torch.empty(n, frames, heads * d, device=device, dtype=dtype)

    def compare():
        # reference: the float32 answer for the same rounded inputs, rounded once (as the kernel's is)
        ref = flow_attention_reference(qkv.float(), heads, m).to(dtype)
        return flow_attention(qkv, heads, m, backend="triton"), ref
    # every (query, key) pair is computed (masked keys too): 2 x 2 per multiply-add of q.k and p.v,
    # ~5 per score for the softmax (scale, max, exp, sum, rescale)
    scores = n * heads * frames * frames
    return make_case(lambda: flow_attention(qkv, heads, m, out=out, backend="triton"), compare,
                     4 * scores * d + 5 * scores, nbytes(qkv, m, out), dtype)


def _group_norm_mish(shape, device, dtype, gen):
    """Channel-first GroupNorm + Mish with a frame mask: the length regulator's conv stack
    (GroupNorm(1, 80) after each of its k3 convs) on a padded batch."""
    n, c, groups, frames = (shape[k] for k in ("n", "channels", "groups", "frames"))
    x = randn((n, c, frames), gen, device, dtype, std=2.0)
    w, b = randn((c,), gen, device, dtype), randn((c,), gen, device, dtype)
    m = _frame_mask(n, frames, device, dtype)[:, None]

    def compare():
        return (group_norm_mish(x, w, b, groups, 1e-5, m, backend="triton"),
                group_norm_mish_reference(x, w, b, groups, 1e-5, m))
    # ~4 per element for the statistics, ~4 to normalise, ~6 for Mish, 1 for the mask
    return make_case(lambda: group_norm_mish(x, w, b, groups, 1e-5, m, backend="triton"), compare,
                     15 * x.numel(), nbytes(x, w, b, m, x), dtype)


def _group_norm_mish_rows(shape, device, dtype, gen):
    """The estimator's GroupNorm(8) + Mish + mask + time embedding on channels-last rows (block1's
    tail), from the partial statistics row_conv left (made once here, by the Triton row_conv)."""
    n, frames, c, groups = (shape[k] for k in ("n", "frames", "channels", "groups"))
    x = randn((n, frames, c), gen, device, dtype)
    wc = conv_weight(randn((c, c, 3), gen, device, torch.float32, std=(3 * c) ** -0.5)).to(dtype)
    m = _frame_mask(n, frames, device, dtype)
    h, stats = row_conv(x, wc, None, conv_spec(3, 1, 1), mask_in=m, mask_out=m, gn_groups=groups, backend="triton")
    w, b = randn((c,), gen, device, dtype), randn((c,), gen, device, dtype)
    temb = randn((n, c), gen, device, dtype)

    def run():
        return group_norm_mish_rows(h, stats, w, b, 1e-5, mask=m, temb=temb, backend="triton")

    def compare():
        # the reference reduces h itself: the row_conv statistics are checked too
        return run(), group_norm_mish_rows_reference(h, w, b, groups, 1e-5, m, temb)
    # ~4 to normalise, ~6 for Mish, 3 for mask, time embedding, mask again (the merge of partials is negligible)
    return make_case(run, compare, 13 * h.numel(), nbytes(h, stats.partial, w, b, temb, m, h), dtype)


def _add_layer_norm(shape, device, dtype, gen):
    """Residual add + LayerNorm over the estimator's 256 channels (returns both)."""
    n, frames, d = (shape[k] for k in ("n", "frames", "dim"))
    x, r = randn((n, frames, d), gen, device, dtype), randn((n, frames, d), gen, device, dtype)
    w, b = randn((d,), gen, device, dtype), randn((d,), gen, device, dtype)

    def compare():
        got = add_layer_norm(x, r, w, b, 1e-5, backend="triton")
        return _flat(*got), _flat(*add_layer_norm_reference(x, r, w, b, 1e-5))
    # 1 for the add, ~7 for the LayerNorm (sum, deviation, square, sum, scale, weight, bias)
    return make_case(lambda: add_layer_norm(x, r, w, b, 1e-5, backend="triton"), compare, 8 * x.numel(),
                     nbytes(x, r, w, b, x, x), dtype)


def _cfg_euler_step(shape, device, dtype, gen):
    """One Euler step of the flow ODE with CFG (rate 0.7) over the 80 mel channels, the new x also
    written into both halves of the next estimator input [2B, 4 x 80, L] (x | mu | spks | cond)."""
    bsz, c, frames = (shape[k] for k in ("n", "channels", "frames"))
    v = randn((2 * bsz, c, frames), gen, device, dtype)
    x = randn((bsz, c, frames), gen, device, dtype)
    m = _frame_mask(bsz, frames, device, dtype)[:, None]
    dt = float(torch.tensor(1 - math.cos(0.1 * math.pi / 2), dtype=dtype))    # the cosine schedule's first step
    out = torch.empty_like(x)
    nxt = torch.zeros(2 * bsz, 4 * c, frames, device=device, dtype=dtype)

    def compare():
        # it writes in place: each side gets its own fresh x, output and next input
        got, got_next = torch.empty_like(x), torch.zeros_like(nxt)
        cfg_euler_step(v, x.clone(), m, dt, 0.7, out=got, next_input=got_next, backend="triton")
        ref, ref_next = torch.empty_like(x), torch.zeros_like(nxt)
        cfg_euler_step_reference(v, x.clone(), m, dt, 0.7, out=ref, next_input=ref_next)
        return _flat(got, got_next), _flat(ref, ref_next)
    # per element of x: 2 mask products, 2 guidance products, 1 difference, 1 times dt, 1 add
    return make_case(lambda: cfg_euler_step(v, x, m, dt, 0.7, out=out, next_input=nxt, backend="triton"), compare,
                     7 * x.numel(), nbytes(v, x, m, out, out, out), dtype)


# ----------------------------------------------------------------------------- HiFT
def _snake(shape, device, dtype, gen):
    """Snake of HiFT's 128-channel resblocks (after both upsamplers: 64 samples per mel frame), with
    the length-bucketed vocoder's sample mask."""
    n, c, t = (shape[k] for k in ("n", "channels", "samples"))
    x = randn((n, c, t), gen, device, dtype, std=2.0)
    alpha = (torch.rand(c, generator=gen) + 0.2).to(device=device, dtype=dtype)
    m = _frame_mask(n, t, device, dtype)[:, None]

    def compare():
        # reference in float32, rounded once: eager fp16/bf16 rounds after each of its five ops
        return snake(x, alpha, m, backend="triton"), snake_reference(x.float(), alpha.float(), m.float()).to(dtype)
    # ~7 per element: product, sine, square, alpha + eps, reciprocal, product, add (+1 mask)
    return make_case(lambda: snake(x, alpha, m, backend="triton"), compare, 8 * x.numel(), nbytes(x, alpha, m, x),
                     dtype)


# ----------------------------------------------------------------------------- Paraformer encoder
def _sanm_inputs(shape, device, dtype, gen):
    w, r, d = (shape[k] for k in ("windows", "rows", "dim"))
    q, k, v = randn((w, r, 3 * d), gen, device, dtype).split(d, dim=-1)     # views of one packed q|k|v
    fw = randn((d, shape["kernel"]), gen, device, dtype, std=0.2)
    return q, k, v, fw


def _sanm_work(shape, lb_valid: torch.Tensor, n_rows: torch.Tensor) -> int:
    """Per window: q.k and p.v over its valid keys (2 x 2 per multiply-add), ~5 per score for the
    softmax, and the FSMN's depthwise taps (2 per tap) plus the add of v, on every row."""
    r, d, heads, kf = (shape[k] for k in ("rows", "dim", "heads", "kernel"))
    keys = int((lb_valid.long() + n_rows.long()).sum())
    return 4 * r * keys * d + 5 * r * keys * heads + shape["windows"] * r * d * (2 * kf + 1)


def _sanm_attention(shape, device, dtype, gen):
    """A live stream's step: each window's 5 carried + 4 new rows attend over themselves and a
    full look-back cache of 16 rows per layer (tensors [W, L, D])."""
    w, r, d, lb, heads = (shape[k] for k in ("windows", "rows", "dim", "look_back", "heads"))
    q, k, v, fw = _sanm_inputs(shape, device, dtype, gen)
    lb_k, lb_v = randn((w, lb, d), gen, device, dtype), randn((w, lb, d), gen, device, dtype)
    lb_len = torch.full((w,), lb, dtype=torch.int32, device=device)
    n_rows = torch.full((w,), r, dtype=torch.int32, device=device)
    args = (q, k, v, lb_k, lb_v, lb_len, n_rows, fw, heads, (shape["kernel"] - 1) // 2)

    def compare():
        return _flat(*sanm_attention(*args, backend="triton")), _flat(*sanm_attention_reference(*args))
    return make_case(lambda: sanm_attention(*args, backend="triton"), compare, _sanm_work(shape, lb_len, n_rows),
                     nbytes(q, k, v, lb_k, lb_v, lb_len, n_rows, fw, q, q), dtype)


def _sanm_attention_indexed(shape, device, dtype, gen):
    """The offline batch: all windows of one utterance at once, look-back slots pointing at the
    first 4 rows of each of the 4 windows before (fewer at the start), read in place from k, v."""
    w, r, d, lb, heads = (shape[k] for k in ("windows", "rows", "dim", "look_back", "heads"))
    q, k, v, fw = _sanm_inputs(shape, device, dtype, gen)
    step = 4                                                    # new rows per window
    slot = torch.arange(lb)
    src = torch.arange(w)[:, None] - lb // step + slot[None, :] // step     # source window of each slot
    index = torch.where(src >= 0, src * r + slot[None, :] % step, 0).to(device)
    lb_len = (src >= 0).sum(1).to(device=device, dtype=torch.int32)
    n_rows = torch.full((w,), r, dtype=torch.int32, device=device)
    args = (q, k, v, index, lb_len, n_rows, fw, heads, (shape["kernel"] - 1) // 2)

    def compare():
        return _flat(*sanm_attention_indexed(*args, backend="triton")), _flat(*sanm_attention_indexed_reference(*args))
    return make_case(lambda: sanm_attention_indexed(*args, backend="triton"), compare,
                     _sanm_work(shape, lb_len, n_rows), nbytes(q, k, v, index, lb_len, n_rows, fw, q, q), dtype)


# ----------------------------------------------------------------------------- tokenizers
def _nearest_centroid(shape, device, dtype, gen):
    """The S3 tokenizer's quantiser: L2-normalised rows against its codebook (TF32 screen + exact
    re-score; the codebook's squared norms are cached, as the tokenizers do). float32 only: the
    search is float32 and both tokenizers pass float32 rows."""
    n, k, d = (shape[k] for k in ("rows", "codes", "dim"))
    x = F.normalize(randn((n, d), gen, device, torch.float32), dim=-1).to(dtype)
    e = F.normalize(randn((k, d), gen, device, torch.float32), dim=-1)
    sq = e.pow(2).sum(-1)

    def dist(idx):
        return (x.double() - e.double()[idx]).pow(2).sum(-1)

    def compare():
        # compared as the distance of the chosen code: an exact near-tie (or tie) resolved by another
        # summation order gives equal distances, a wrong code a larger one
        return dist(nearest_centroid(x, e, sq, backend="triton")), dist(nearest_centroid_reference(x, e, sq))
    out = torch.empty(n, dtype=torch.long)
    # the screen's scores (2 per multiply-add) and ~3 per score for the bound; the exact re-score of
    # the few candidates per row is not counted
    return make_case(lambda: nearest_centroid(x, e, sq, backend="triton"), compare, 2 * n * k * d + 3 * n * k,
                     nbytes(x, e, sq, out), dtype)


AUDIO_OPS: list[KernelOp] = [
    KernelOp("row_conv", "audio", "flow_conv", dict(n=2, frames=1120, cin=256, cout=256, taps=3),
             dict(n=2, frames=37, cin=24, cout=32, taps=3), _row_conv,
             note="flow estimator ResnetBlock1D conv (Conv1d 256->256 k3 + GroupNorm(8) statistics), CFG batch "
                  "2 x 1120 frames (the mid blocks run at 560)"),
    KernelOp("flow_attention", "audio", "flow_attention", dict(n=2, frames=1120, heads=8, head_dim=64),
             dict(n=2, frames=40, heads=2, head_dim=16), _flow_attention,
             note="flow estimator self-attention, 8 heads x 64, 2 x 1120 frames (the mid blocks run at 560)"),
    KernelOp("group_norm_mish", "audio", "flow_fused", dict(n=1, channels=80, groups=1, frames=1120),
             dict(n=2, channels=16, groups=4, frames=70), _group_norm_mish,
             note="length regulator GroupNorm(1, 80) + Mish, 1120 frames (channel first)"),
    KernelOp("group_norm_mish_rows", "audio", "flow_fused", dict(n=2, frames=1120, channels=256, groups=8),
             dict(n=2, frames=45, channels=32, groups=8), _group_norm_mish_rows,
             note="flow estimator GroupNorm(8) + Mish + temb on rows, 2 x 1120 x 256"),
    KernelOp("add_layer_norm", "audio", "flow_fused", dict(n=2, frames=1120, dim=256),
             dict(n=2, frames=9, dim=48), _add_layer_norm,
             note="residual add + LayerNorm(256), 2 x 1120 rows (the estimator folds its LayerNorms into row_conv)"),
    KernelOp("cfg_euler_step", "audio", "flow_ode", dict(n=1, channels=80, frames=1120),
             dict(n=2, channels=5, frames=45), _cfg_euler_step,
             note="flow ODE Euler step with CFG, 80 mel x 1120 frames, next input 2 x 320 channels"),
    KernelOp("snake", "audio", "snake", dict(n=1, channels=128, samples=861 * 64),
             dict(n=2, channels=4, samples=300), _snake,
             note="HiFT Snake, 128 channels x 55104 samples (10 s: 861 mel frames x 64)"),
    KernelOp("sanm_attention", "audio", "sanm",
             dict(windows=1, rows=9, look_back=16, dim=512, heads=4, kernel=11),
             dict(windows=3, rows=9, look_back=16, dim=32, heads=2, kernel=11), _sanm_attention,
             note="Paraformer SAN-M attention + FSMN, one live stream's window (9 rows, 16 look-back, 4 x 128)"),
    KernelOp("sanm_attention_indexed", "audio", "sanm",
             dict(windows=42, rows=9, look_back=16, dim=512, heads=4, kernel=11),
             dict(windows=6, rows=9, look_back=16, dim=32, heads=2, kernel=11), _sanm_attention_indexed,
             note="Paraformer SAN-M attention + FSMN, offline: 42 windows = 10 s of 16 kHz audio"),
    KernelOp("nearest_centroid", "audio", "nearest_centroid", dict(rows=250, codes=4096, dim=1280),
             dict(rows=20, codes=150, dim=40), _nearest_centroid, dtypes=(torch.float32,),
             note="S3 tokenizer quantiser: 250 rows (10 s at 25 Hz) x codebook 4096 x 1280"),
]
