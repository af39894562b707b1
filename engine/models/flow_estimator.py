"""The flow-matching vector field: CosyVoice `ConditionalDecoder`, a 1-D U-Net (SPEC.md §3.3/§3.5).

Input [x, mu, spks, cond] (4 x 80 channels) -> down blocks (ResnetBlock1D, transformer blocks,
Downsample1D / Conv1d) -> mid blocks -> up blocks (skip concat, ResnetBlock1D, transformer blocks,
Upsample1D / Conv1d) -> Block1D -> 1x1 conv -> * mask. Transformer blocks are diffusers'
BasicTransformerBlock (LayerNorm, self-attention without q/k/v bias, LayerNorm, Linear-GELU-Linear);
time enters through a sinusoidal embedding (scale 1000) and an MLP, then per ResnetBlock a
Mish+Linear projection added after block1.

Differences from the official module, none of which change the result on valid frames:
- The time projections depend only on t, so `time_projections(t)` computes them once per step
  value; the solver caches them for its fixed schedule.
- Masks are honoured everywhere: GroupNorm statistics over valid frames and a key padding mask in
  attention. The official model runs unpadded with an all-ones mask (which is the same thing); the
  masked form lets a batch padded to a length bucket give each request its unpadded result.
- `fused=True` (the default) runs the network on channels-last activations [N, L, C] through
  stepvox.kernels.flow_conv.row_conv: every Conv1d / Linear is one kernel that also applies the
  input frame mask, the LayerNorm before it (transformer norm1 / norm3), the bias, GELU, the
  residual add, the stage's output mask and the GroupNorm statistics of what follows; GroupNorm +
  Mish + mask + time embedding / residual is one more kernel (flow_fused.group_norm_mish_rows).
  No layout transposes, no separate norms or elementwise passes: 4 kernels per ResnetBlock1D (its
  1x1 res_conv rides along block1's conv) and 5 per transformer block (q/k/v, attention,
  out-projection, feed-forward in, feed-forward out); on
  long sequences (FF_IN_UNFUSED_ROWS) the feed-forward input runs as LayerNorm, cuBLAS, GELU.
- Attention in the fused path is kernels/flow_attention.py: one launch that reads q/k/v from the
  fused projection's rows and takes the frame mask as its key mask.
- `fused=False` runs the plain modules (PyTorch convolutions, linears, SDPA with a boolean key
  mask; masked GroupNorm statistics through the kernels' reference): the reference the fused path
  is tested against.
Parameter names match the released flow.pt (`decoder.estimator.*`).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...kernels import KernelConfig
from ...kernels.flow_attention import flow_attention
from ...kernels.flow_conv import (LINEAR, UPSAMPLE_K4S2P1, conv_spec, conv_weight, linear_weight, row_conv,
                                   upsample_weight)
from ...kernels.flow_fused import group_norm_mish_reference, group_norm_mish_rows
from .cosyvoice_config import EstimatorConfig

GN_GROUPS = 8
TIME_SCALE = 1000


def sinusoidal_time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """SinusoidalPosEmb: [N] -> [N, dim] = [sin(1000 t f), cos(1000 t f)], f_k = 1e4^(-k/(dim/2-1)).
    `1000 * t` is rounded in t's dtype first, as in the official module; the rest in float32."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
    arg = (TIME_SCALE * t)[:, None] * freqs[None, :]
    return torch.cat((arg.sin(), arg.cos()), dim=-1).to(t.dtype)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class Block1D(nn.Module):
    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        self.block = nn.Sequential(nn.Conv1d(dim, dim_out, 3, padding=1), nn.GroupNorm(GN_GROUPS, dim_out), nn.Mish())

    def conv(self, x):
        return self.block[0](x)

    def norm_act(self, h, mask, padded: bool, temb=None, residual=None):
        """Mish(GroupNorm(h)) * mask (+ temb then * mask) (+ residual)."""
        gn = self.block[1]
        m = mask if padded else None
        if padded:
            # masked statistics have no eager PyTorch op: the plain-PyTorch reference is the unfused path
            return group_norm_mish_reference(h, gn.weight, gn.bias, GN_GROUPS, gn.eps, m, temb, residual)
        y = F.mish(gn(h)) * mask
        if temb is not None:
            y = (y + temb.reshape(-1, y.shape[1])[:, :, None]) * mask
        return y if residual is None else y + residual

    def forward(self, x, mask, padded: bool):
        return self.norm_act(self.conv(x * mask), mask, padded)


class ResnetBlock1D(nn.Module):
    def __init__(self, dim: int, dim_out: int, time_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_dim, dim_out))
        self.block1 = Block1D(dim, dim_out)
        self.block2 = Block1D(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x, mask, time_proj, padded: bool):
        xm = x * mask
        # block1 output (masked) + time projection, masked again as block2 masks its input
        h = self.block1.norm_act(self.block1.conv(xm), mask, padded, temb=time_proj)
        res = self.res_conv(xm)
        return self.block2.norm_act(self.block2.conv(h), mask, padded, residual=res)


class Attention(nn.Module):
    """diffusers Attention (self-attention, no q/k/v bias, to_out = [Linear, Dropout])."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])

    def forward(self, x, attn_mask):
        n, length, _ = x.shape
        q, k, v = (proj(x).view(n, length, self.heads, self.dim_head).transpose(1, 2)
                   for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.to_out[0](out.transpose(1, 2).reshape(n, length, self.heads * self.dim_head))


class GELUProj(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x):
        return F.gelu(self.proj(x))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GELUProj(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim_head)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, attn_mask):
        x = self.attn1(self.norm1(x), attn_mask) + x
        return self.ff(self.norm3(x)) + x


class Downsample1D(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, 2, 1)

    def forward(self, x):
        return self.conv(x)


class Upsample1D(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.ConvTranspose1d(dim, dim, 4, 2, 1)

    def forward(self, x):
        return self.conv(x)


def _transformers(cfg: EstimatorConfig, dim: int) -> nn.ModuleList:
    return nn.ModuleList(BasicTransformerBlock(dim, cfg.num_heads, cfg.attention_head_dim) for _ in range(cfg.n_blocks))


class ConditionalDecoder(nn.Module):
    def __init__(self, cfg: EstimatorConfig, kernels: KernelConfig = KernelConfig()):
        super().__init__()
        self.cfg = cfg
        self.kernels = kernels
        channels = tuple(cfg.channels)
        time_dim = channels[0] * 4
        self.time_mlp = TimestepEmbedding(cfg.in_channels, time_dim)
        self.down_blocks, self.mid_blocks, self.up_blocks = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        out_ch = cfg.in_channels
        for i, ch in enumerate(channels):
            in_ch, out_ch = out_ch, ch
            last = i == len(channels) - 1
            down = nn.Conv1d(out_ch, out_ch, 3, padding=1) if last else Downsample1D(out_ch)
            self.down_blocks.append(nn.ModuleList([ResnetBlock1D(in_ch, out_ch, time_dim),
                                                   _transformers(cfg, out_ch), down]))
        for _ in range(cfg.num_mid_blocks):
            self.mid_blocks.append(nn.ModuleList([ResnetBlock1D(channels[-1], out_ch, time_dim),
                                                  _transformers(cfg, out_ch)]))
        rev = channels[::-1] + (channels[0],)
        for i in range(len(rev) - 1):
            in_ch, out_ch = rev[i] * 2, rev[i + 1]
            last = i == len(rev) - 2
            up = nn.Conv1d(out_ch, out_ch, 3, padding=1) if last else Upsample1D(out_ch)
            self.up_blocks.append(nn.ModuleList([ResnetBlock1D(in_ch, out_ch, time_dim),
                                                 _transformers(cfg, out_ch), up]))
        self.final_block = Block1D(rev[-1], rev[-1])
        self.final_proj = nn.Conv1d(rev[-1], cfg.out_channels, 1)

    def resnets(self) -> list[ResnetBlock1D]:
        return [blk[0] for blk in list(self.down_blocks) + list(self.mid_blocks) + list(self.up_blocks)]

    @torch.no_grad()
    def time_projections(self, t: torch.Tensor) -> list[torch.Tensor]:
        """t: [1] (or [N]) in the model dtype -> per ResnetBlock the [N, C] time projection."""
        temb = self.time_mlp(sinusoidal_time_embedding(t, self.cfg.in_channels))
        return [r.mlp[1](F.mish(temb)) for r in self.resnets()]

    def forward(self, inp: torch.Tensor, mask: torch.Tensor, time_proj: list[torch.Tensor],
                padded: bool = False, fused: bool = True) -> torch.Tensor:
        """inp: [N, 4*80, L] = concat(x, mu, spks, cond); mask: [N, 1, L] (0/1, model dtype);
        time_proj: from time_projections; padded: whether any mask entry is 0 (key masks and masked
        statistics are skipped otherwise); fused: the channels-last fused kernels (else the plain
        modules). Returns the velocity [N, 80, L] (zero on masked frames)."""
        if fused:
            return self._forward_rows(inp, mask, time_proj, padded)
        return self._forward_modules(inp, mask, time_proj, padded)

    def _forward_modules(self, inp, mask, time_proj, padded: bool):
        projections = iter(time_proj)

        def stage(resnet, blocks, x, m):
            x = resnet(x, m, next(projections), padded)
            x = x.transpose(1, 2).contiguous()
            key_mask = (m[:, :, None, :] > 0) if padded else None      # [N, 1, 1, L]
            for blk in blocks:
                x = blk(x, key_mask)
            return x.transpose(1, 2).contiguous()

        masks, hiddens = [mask], []
        x = inp
        for resnet, blocks, down in self.down_blocks:
            m = masks[-1]
            x = stage(resnet, blocks, x, m)
            hiddens.append(x)
            x = down(x * m)
            masks.append(m[:, :, ::2])
        masks.pop()
        m = masks[-1]
        for resnet, blocks in self.mid_blocks:
            x = stage(resnet, blocks, x, m)
        for resnet, blocks, up in self.up_blocks:
            m = masks.pop()
            skip = hiddens.pop()
            x = torch.cat([x[:, :, :skip.shape[-1]], skip], dim=1)
            x = up(stage(resnet, blocks, x, m) * m)
        x = self.final_block(x, m, padded)          # already * m, which final_proj's input needs
        return self.final_proj(x) * mask

    # ------------------------------------------------------------------ channels-last fused path
    def _forward_rows(self, inp, mask, time_proj, padded: bool):
        n, _, length = inp.shape
        projections = iter(time_proj)
        levels = len(self.down_blocks)
        k = self.kernels
        row_masks = [mask[:, 0, :]]
        for _ in range(levels - 1):
            row_masks.append(row_masks[-1][:, ::2])

        def stage(resnet, blocks, x, level):
            m = row_masks[level] if padded else None
            x = _resnet_rows(resnet, x, m, next(projections), k)
            return _transformer_rows(blocks, x, m, k)

        hiddens = []
        x = inp.transpose(1, 2)                                   # [N, L, 4*80] view, no copy
        for level, (resnet, blocks, down) in enumerate(self.down_blocks):
            x = stage(resnet, blocks, x, level)
            hiddens.append(x)
            x = _conv_rows(down.conv if isinstance(down, Downsample1D) else down, x,
                           row_masks[level] if padded else None, k)
        level = levels - 1
        for resnet, blocks in self.mid_blocks:
            x = stage(resnet, blocks, x, level)
        for resnet, blocks, up in self.up_blocks:
            skip = hiddens.pop()
            x = torch.cat([x[:, :skip.shape[1]], skip], dim=2)
            x = stage(resnet, blocks, x, level)
            m = row_masks[level] if padded else None
            x = _upsample_rows(up.conv, x, m, k) if isinstance(up, Upsample1D) else _conv_rows(up, x, m, k)
            level -= 1
        m = row_masks[0] if padded else None
        fb = self.final_block
        h, stats = row_conv(x, _prepared(fb.block[0], conv_weight), fb.block[0].bias, _CONV3, mask_in=m,
                            mask_out=m, gn_groups=GN_GROUPS, backend=k.backend, pdl=k.pdl)
        h = group_norm_mish_rows(h, stats, fb.block[1].weight, fb.block[1].bias, fb.block[1].eps, mask=m,
                                 backend=k.backend, pdl=k.pdl)
        out = torch.empty(n, self.cfg.out_channels, length, dtype=inp.dtype, device=inp.device)
        row_conv(h, _prepared(self.final_proj, linear_weight), self.final_proj.bias, LINEAR, mask_out=m,
                 mul_mask_out=True, out=out.transpose(1, 2), backend=k.backend, pdl=k.pdl)
        return out


_CONV3 = conv_spec(3, 1, 1)
# From this many frames per sequence the feed-forward input (LayerNorm, Linear 256 -> 1024, GELU) runs
# as three library ops: the fused kernel recomputes the LayerNorm in every output-column tile and
# evaluates erf at low occupancy, which loses to cuBLAS + two light kernels on long sequences (H100:
# 18 us vs ~13 us at 2 x 1120 rows; it wins below ~560 rows: 6.7 vs ~9.6 us at 2 x 176).
FF_IN_UNFUSED_ROWS = 800


def _cached_on(module: nn.Module, weight: torch.Tensor, tag: str, build):
    """build() cached on `module` for the weight's device and dtype."""
    key = (weight.device, weight.dtype, tag)
    cache = getattr(module, "_rows_weight", None)
    if cache is None or cache[0] != key:
        cache = module._rows_weight = (key, build())
    return cache[1]


def _prepared(module: nn.Module, prepare) -> torch.Tensor:
    """The module's weight in row_conv layout."""
    return _cached_on(module, module.weight, prepare.__name__, lambda: prepare(module.weight.detach()))


def _qkv_rows(attn: "Attention") -> torch.Tensor:
    return _cached_on(attn, attn.to_q.weight, "qkv",
                      lambda: linear_weight(torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]).detach()))


def _conv_rows(conv: nn.Conv1d, x, m, k: KernelConfig):
    """Conv1d(x * m) on rows (the Downsample1D / plain k3 convs between stages)."""
    spec = conv_spec(conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0])
    return row_conv(x, _prepared(conv, conv_weight), conv.bias, spec, mask_in=m, backend=k.backend, pdl=k.pdl)


def _upsample_rows(conv: nn.ConvTranspose1d, x, m, k: KernelConfig):
    if (conv.kernel_size[0], conv.stride[0], conv.padding[0]) != (4, 2, 1):
        raise ValueError("Upsample1D: only ConvTranspose1d(k=4, s=2, p=1) is implemented on rows")
    return row_conv(x, _prepared(conv, upsample_weight), conv.bias, UPSAMPLE_K4S2P1, mask_in=m, backend=k.backend,
                    pdl=k.pdl)


def _conv1_and_res(r: "ResnetBlock1D") -> tuple[torch.Tensor, torch.Tensor]:
    """block1's k3 conv and the 1x1 res_conv as one k3 product (res_conv on the centre tap, zeros on
    the others; both read x * m): [1, 3, Cin, 2 * Cout] weight and bias, cached on the module."""
    c1, rc = r.block1.block[0], r.res_conv

    def build():
        res = torch.zeros_like(c1.weight)
        res[:, :, 1] = rc.weight[:, :, 0]
        return conv_weight(torch.cat([c1.weight, res]).detach()), torch.cat([c1.bias, rc.bias]).detach()
    return _cached_on(r, c1.weight, "conv1+res", build)


def _resnet_rows(r: "ResnetBlock1D", x, m, temb, k: KernelConfig):
    """ResnetBlock1D on rows: x [N, L, Cin] (any strides; frames with m = 0 are ignored). Four
    kernels: conv1 with res_conv beside it (GroupNorm statistics of the conv1 half), GroupNorm+Mish
    (+ time embedding), conv2, GroupNorm+Mish + the res_conv half."""
    n1 = r.block1.block[1]
    c2, n2 = r.block2.block[0], r.block2.block[1]
    cout = c2.weight.shape[0]
    w1, b1 = _conv1_and_res(r)
    run = dict(backend=k.backend, pdl=k.pdl)
    both, st = row_conv(x, w1, b1, _CONV3, mask_in=m, mask_out=m, gn_groups=GN_GROUPS, stats_channels=cout, **run)
    h = group_norm_mish_rows(both[:, :, :cout], st, n1.weight, n1.bias, n1.eps, mask=m, temb=temb, **run)
    h, st = row_conv(h, _prepared(c2, conv_weight), c2.bias, _CONV3, mask_out=m, gn_groups=GN_GROUPS, **run)
    return group_norm_mish_rows(h, st, n2.weight, n2.bias, n2.eps, mask=m, residual=both[:, :, cout:], **run)


def _transformer_rows(blocks, x, m, k: KernelConfig):
    """BasicTransformerBlocks on the residual stream x [N, L, C]; the last block's output is
    multiplied by m (every consumer of a stage output masks it). Attention takes its key mask from m."""
    n, length, _ = x.shape
    run = dict(backend=k.backend, pdl=k.pdl)
    for i, blk in enumerate(blocks):
        at = blk.attn1
        n1, n3 = blk.norm1, blk.norm3
        qkv = row_conv(x, _qkv_rows(at), None, LINEAR, ln=(n1.weight, n1.bias, n1.eps), **run)
        a = flow_attention(qkv, at.heads, m, **run)
        out = at.to_out[0]
        x = row_conv(a, _prepared(out, linear_weight), out.bias, LINEAR, residual=x, **run)
        p1, p2 = blk.ff.net[0].proj, blk.ff.net[2]
        if length >= FF_IN_UNFUSED_ROWS:
            f = F.gelu(F.linear(F.layer_norm(x, (x.shape[-1],), n3.weight, n3.bias, n3.eps), p1.weight, p1.bias))
        else:
            f = row_conv(x, _prepared(p1, linear_weight), p1.bias, LINEAR, ln=(n3.weight, n3.bias, n3.eps),
                         gelu=True, **run)
        last = i == len(blocks) - 1
        x = row_conv(f, _prepared(p2, linear_weight), p2.bias, LINEAR, residual=x,
                     mask_out=m if last else None, mul_mask_out=last and m is not None, **run)
    return x
