"""Token encoder of the flow: WeNet/ESPnet ConformerEncoder as configured by cosyvoice.yaml (SPEC.md §3.3).

input_layer 'linear' (Linear + LayerNorm(1e-5)), 'rel_pos_espnet' positions (x * sqrt(d), relative
sinusoids for offsets T-1 .. -(T-1)), `num_blocks` pre-norm layers of rel-pos self-attention
(Transformer-XL biases pos_bias_u / pos_bias_v, linear_pos without bias) and a swish FFN, no
macaron FFN and no convolution module, then `after_norm`. Parameter names follow the released
flow.pt (`encoder.embed.out.0`, `encoder.encoders.{i}.self_attn.linear_q`, ...).

Scores are (q + u) k^T / sqrt(d) + rel_shift((q + v) p^T) / sqrt(d): the first term is what SDPA
computes, the second goes in as its additive mask, so the softmax and weighted sum run in one
efficient kernel. A key padding mask lets several requests share one batch exactly.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cosyvoice_config import EncoderConfig


def espnet_rel_positions(length: int, d_model: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[1, 2*length-1, d_model]: row p encodes relative offset (length-1-p); sin on even, cos on
    odd features; computed in float32 and cast, like EspnetRelPositionalEncoding."""
    pos = torch.arange(length, dtype=torch.float32, device=device)[:, None]
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32, device=device) * -(math.log(10000.0) / d_model))
    pe = torch.zeros(2 * length - 1, d_model, dtype=torch.float32, device=device)
    pe[:length, 0::2] = torch.sin(pos * div).flip(0)
    pe[:length, 1::2] = torch.cos(pos * div).flip(0)
    pe[length:, 0::2] = torch.sin(-pos[1:] * div)
    pe[length:, 1::2] = torch.cos(-pos[1:] * div)
    return pe.to(dtype)[None]


def relative_to_absolute(bd: torch.Tensor) -> torch.Tensor:
    """[..., T, 2T-1] scores against relative offsets -> [..., T, T] with out[i, j] = bd[i, T-1-i+j]
    (offset i - j), the effect of ESPnet's rel_shift."""
    t = bd.shape[-2]
    idx = (t - 1 - torch.arange(t, device=bd.device)[:, None] + torch.arange(t, device=bd.device)[None, :])
    return torch.gather(bd, -1, idx.expand(bd.shape[:-1] + (t,)))


class RelPositionSelfAttention(nn.Module):
    def __init__(self, n_head: int, n_feat: int):
        super().__init__()
        self.h, self.d_k = n_head, n_feat // n_head
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(self.h, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.empty(self.h, self.d_k))

    def forward(self, x: torch.Tensor, pos_emb: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.linear_q(x).view(b, t, self.h, self.d_k)
        k = self.linear_k(x).view(b, t, self.h, self.d_k).transpose(1, 2)
        v = self.linear_v(x).view(b, t, self.h, self.d_k).transpose(1, 2)
        p = self.linear_pos(pos_emb).view(1, -1, self.h, self.d_k).transpose(1, 2)     # [1, H, 2T-1, d]
        q_u = (q + self.pos_bias_u).transpose(1, 2)
        q_v = (q + self.pos_bias_v).transpose(1, 2)
        bd = relative_to_absolute(torch.matmul(q_v, p.transpose(-2, -1))) / math.sqrt(self.d_k)
        if key_mask is not None:
            bd = bd.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        out = F.scaled_dot_product_attention(q_u, k, v, attn_mask=bd)
        return self.linear_out(out.transpose(1, 2).reshape(b, t, self.h * self.d_k))


class PositionwiseFeedForward(nn.Module):
    def __init__(self, d: int, units: int):
        super().__init__()
        self.w_1 = nn.Linear(d, units)
        self.w_2 = nn.Linear(units, d)

    def forward(self, x):
        return self.w_2(F.silu(self.w_1(x)))


class ConformerLayer(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        d = cfg.output_size
        self.self_attn = RelPositionSelfAttention(cfg.attention_heads, d)
        self.feed_forward = PositionwiseFeedForward(d, cfg.linear_units)
        self.norm_ff = nn.LayerNorm(d, eps=1e-5)
        self.norm_mha = nn.LayerNorm(d, eps=1e-5)

    def forward(self, x, pos_emb, key_mask):
        x = x + self.self_attn(self.norm_mha(x), pos_emb, key_mask)
        return x + self.feed_forward(self.norm_ff(x))


class LinearEmbed(nn.Module):
    """LinearNoSubsampling: `out` = Sequential(Linear, LayerNorm, Dropout) -> keys out.0 / out.1."""

    def __init__(self, idim: int, odim: int):
        super().__init__()
        self.out = nn.Sequential(nn.Linear(idim, odim), nn.LayerNorm(odim, eps=1e-5))

    def forward(self, x):
        return self.out(x)


class ConformerEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = LinearEmbed(cfg.input_size, cfg.output_size)
        self.encoders = nn.ModuleList(ConformerLayer(cfg) for _ in range(cfg.num_blocks))
        self.after_norm = nn.LayerNorm(cfg.output_size, eps=1e-5)

    def forward(self, xs: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """xs: [B, T, input_size] (padded); lengths: [B] valid frames or None (all valid).
        Returns [B, T, output_size]; rows beyond a sequence's length are meaningless."""
        b, t, _ = xs.shape
        x = self.embed(xs) * math.sqrt(self.cfg.output_size)
        pos_emb = espnet_rel_positions(t, self.cfg.output_size, xs.device, x.dtype)
        key_mask = None
        if lengths is not None:
            key_mask = torch.arange(t, device=xs.device)[None, :] < lengths.to(xs.device)[:, None]
        for layer in self.encoders:
            x = layer(x, pos_emb, key_mask)
        return self.after_norm(x)
