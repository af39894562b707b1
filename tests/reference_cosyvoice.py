"""An independent eager implementation of SPEC.md §3.5 (token -> mel -> wav), written for the tests.

Plain functions over the released state dict (weight_g/weight_v folded with torch's own
`torch._weight_norm`), following the official code path step by step: ESPnet rel_shift by the
zero-pad/reshape trick, explicit softmax attention, unmasked F.group_norm, the official Euler loop
with torch.cat per step, SineGen with a float32 cumulative sum, torch.stft / torch.istft with a
scipy-style periodic Hann window. float32 throughout; tiny configs only.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def fold(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if k.endswith(".weight_g"):
            p = k[:-len(".weight_g")]
            out[p + ".weight"] = torch._weight_norm(sd[p + ".weight_v"], v, 0)
        elif not k.endswith(".weight_v"):
            out[k] = v
    return out


def linear(sd, p, x):
    return F.linear(x, sd[p + ".weight"], sd.get(p + ".bias"))


def layer_norm(sd, p, x, eps=1e-5):
    return F.layer_norm(x, (x.shape[-1],), sd[p + ".weight"], sd[p + ".bias"], eps)


def conv1d(sd, p, x, **kw):
    return F.conv1d(x, sd[p + ".weight"], sd.get(p + ".bias"), **kw)


# ----------------------------------------------------------------------------- flow encoder
def rel_pos_emb(t, d):
    pos = torch.arange(0, t, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * -(math.log(10000.0) / d))
    pe_pos, pe_neg = torch.zeros(t, d), torch.zeros(t, d)
    pe_pos[:, 0::2], pe_pos[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
    pe_neg[:, 0::2], pe_neg[:, 1::2] = torch.sin(-1 * pos * div), torch.cos(-1 * pos * div)
    return torch.cat([torch.flip(pe_pos, [0]).unsqueeze(0), pe_neg[1:].unsqueeze(0)], dim=1)


def rel_shift(x):
    zero_pad = torch.zeros((x.size(0), x.size(1), x.size(2), 1), dtype=x.dtype)
    x_padded = torch.cat([zero_pad, x], dim=-1).view(x.size(0), x.size(1), x.size(3) + 1, x.size(2))
    return x_padded[:, :, 1:].view_as(x)[:, :, :, : x.size(-1) // 2 + 1]


def encoder(sd, x, heads, blocks):
    d = sd["encoder.embed.out.0.weight"].shape[0]
    x = layer_norm(sd, "encoder.embed.out.1", linear(sd, "encoder.embed.out.0", x)) * math.sqrt(d)
    t = x.shape[1]
    pos = rel_pos_emb(t, d)
    dk = d // heads
    for i in range(blocks):
        p = f"encoder.encoders.{i}."
        res = x
        y = layer_norm(sd, p + "norm_mha", x)
        q = linear(sd, p + "self_attn.linear_q", y).view(1, t, heads, dk)
        k = linear(sd, p + "self_attn.linear_k", y).view(1, t, heads, dk).transpose(1, 2)
        v = linear(sd, p + "self_attn.linear_v", y).view(1, t, heads, dk).transpose(1, 2)
        pp = F.linear(pos, sd[p + "self_attn.linear_pos.weight"]).view(1, -1, heads, dk).transpose(1, 2)
        ac = torch.matmul((q + sd[p + "self_attn.pos_bias_u"]).transpose(1, 2), k.transpose(-2, -1))
        bd = rel_shift(torch.matmul((q + sd[p + "self_attn.pos_bias_v"]).transpose(1, 2), pp.transpose(-2, -1)))
        attn = torch.softmax((ac + bd) / math.sqrt(dk), dim=-1)
        o = torch.matmul(attn, v).transpose(1, 2).reshape(1, t, d)
        x = res + linear(sd, p + "self_attn.linear_out", o)
        y = layer_norm(sd, p + "norm_ff", x)
        x = x + linear(sd, p + "feed_forward.w_2", F.silu(linear(sd, p + "feed_forward.w_1", y)))
    return layer_norm(sd, "encoder.after_norm", x)


def regulator(sd, x):
    for i in (0, 3, 6, 9):
        x = conv1d(sd, f"length_regulator.model.{i}", x, padding=1)
        x = F.mish(F.group_norm(x, 1, sd[f"length_regulator.model.{i + 1}.weight"],
                                sd[f"length_regulator.model.{i + 1}.bias"]))
    return conv1d(sd, "length_regulator.model.12", x)


# ----------------------------------------------------------------------------- estimator
def block1d(sd, p, x, mask):
    y = conv1d(sd, p + ".block.0", x * mask, padding=1)
    y = F.mish(F.group_norm(y, 8, sd[p + ".block.1.weight"], sd[p + ".block.1.bias"]))
    return y * mask


def resnet(sd, p, x, mask, t):
    h = block1d(sd, p + ".block1", x, mask)
    h = h + linear(sd, p + ".mlp.1", F.mish(t)).unsqueeze(-1)
    h = block1d(sd, p + ".block2", h, mask)
    return h + conv1d(sd, p + ".res_conv", x * mask)


def transformer(sd, p, x, heads):
    b, t, c = x.shape
    y = layer_norm(sd, p + ".norm1", x)
    q, k, v = (F.linear(y, sd[f"{p}.attn1.to_{n}.weight"]) for n in "qkv")
    dh = q.shape[-1] // heads
    q, k, v = (z.view(b, t, heads, dh).transpose(1, 2) for z in (q, k, v))
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1) @ v
    x = linear(sd, p + ".attn1.to_out.0", a.transpose(1, 2).reshape(b, t, heads * dh)) + x
    y = layer_norm(sd, p + ".norm3", x)
    return linear(sd, p + ".ff.net.2", F.gelu(linear(sd, p + ".ff.net.0.proj", y))) + x


def estimator(sd, x, mask, mu, t, spks, cond, heads, n_blocks, mid_blocks):
    e = "decoder.estimator."
    half = 160
    freqs = torch.exp(torch.arange(half).float() * -(math.log(10000) / (half - 1)))
    temb = 1000 * t.unsqueeze(1) * freqs.unsqueeze(0)
    temb = torch.cat((temb.sin(), temb.cos()), dim=-1)
    temb = linear(sd, e + "time_mlp.linear_2", F.silu(linear(sd, e + "time_mlp.linear_1", temb)))
    x = torch.cat([x, mu, spks[:, :, None].expand(-1, -1, x.shape[-1]), cond], dim=1)

    def stage(p, x, m):
        x = resnet(sd, p + ".0", x, m, temb).transpose(1, 2)
        for j in range(n_blocks):
            x = transformer(sd, f"{p}.1.{j}", x, heads)
        return x.transpose(1, 2)

    masks, hiddens = [mask], []
    for i in range(2):
        m = masks[-1]
        x = stage(e + f"down_blocks.{i}", x, m)
        hiddens.append(x)
        if i == 0:
            x = conv1d(sd, e + "down_blocks.0.2.conv", x * m, stride=2, padding=1)
        else:
            x = conv1d(sd, e + "down_blocks.1.2", x * m, padding=1)
        masks.append(m[:, :, ::2])
    masks = masks[:-1]
    for i in range(mid_blocks):
        x = stage(e + f"mid_blocks.{i}", x, masks[-1])
    for i in range(2):
        m = masks.pop()
        skip = hiddens.pop()
        x = stage(e + f"up_blocks.{i}", torch.cat([x[:, :, :skip.shape[-1]], skip], dim=1), m)
        if i == 0:
            x = F.conv_transpose1d(x * m, sd[e + "up_blocks.0.2.conv.weight"], sd[e + "up_blocks.0.2.conv.bias"],
                                   stride=2, padding=1)
        else:
            x = conv1d(sd, e + "up_blocks.1.2", x * m, padding=1)
    x = block1d(sd, e + "final_block", x, m)
    return conv1d(sd, e + "final_proj", x * m) * mask


def flow_mel(sd, sizes, tokens, prompt_tokens, prompt_feat, embedding, z, frame_rate=41.667, cfg_rate=0.7):
    """tokens [N2], prompt_tokens [N1], prompt_feat [T1, 80], embedding [192], z [80, T1 + mel_len2]."""
    emb = linear(sd, "spk_embed_affine_layer", F.normalize(embedding[None], dim=1))
    n1, n2 = prompt_tokens.numel(), tokens.numel()
    x = F.embedding(torch.cat([prompt_tokens, tokens])[None].clamp(min=0), sd["input_embedding.weight"])
    h = linear(sd, "encoder_proj", encoder(sd, x, sizes["enc_heads"], sizes["enc_blocks"]))
    mel1, mel2 = prompt_feat.shape[0], int(n2 / frame_rate * 22050 / 256)
    x2 = F.interpolate(h[:, n1:].transpose(1, 2), size=mel2, mode="linear")
    if n1:
        x = torch.cat([F.interpolate(h[:, :n1].transpose(1, 2), size=mel1, mode="linear"), x2], dim=2)
    else:
        x = x2
    mu = regulator(sd, x)
    cond = torch.zeros(1, mel1 + mel2, 80)
    cond[:, :mel1] = prompt_feat
    cond = cond.transpose(1, 2)
    mask = torch.ones(1, 1, mel1 + mel2)
    t_span = 1 - torch.cos(torch.linspace(0, 1, 11) * 0.5 * torch.pi)
    xs = z[None].clone()
    t, dt = t_span[0].unsqueeze(0), t_span[1] - t_span[0]
    for step in range(1, 11):
        v = estimator(sd, torch.cat([xs, xs]), torch.cat([mask, mask]), torch.cat([mu, torch.zeros_like(mu)]),
                      torch.cat([t, t]), torch.cat([emb, torch.zeros_like(emb)]), torch.cat([cond, torch.zeros_like(cond)]),
                      sizes["heads"], sizes["n_blocks"], sizes["mid_blocks"])
        vc, vu = torch.chunk(v, 2, dim=0)
        xs = xs + dt * ((1.0 + cfg_rate) * vc - cfg_rate * vu)
        t = t + dt
        if step < 10:
            dt = t_span[step + 1] - t
    return xs[0, :, mel1:]


# ----------------------------------------------------------------------------- HiFT
def _resblock(sd, p, x, k):
    for j, d in enumerate((1, 3, 5)):
        a1 = sd[f"{p}.activations1.{j}.alpha"][None, :, None]
        xt = x + (1.0 / (a1 + 1e-9)) * torch.sin(x * a1) ** 2
        xt = conv1d(sd, f"{p}.convs1.{j}", xt, dilation=d, padding=(k * d - d) // 2)
        a2 = sd[f"{p}.activations2.{j}.alpha"][None, :, None]
        xt = xt + (1.0 / (a2 + 1e-9)) * torch.sin(xt * a2) ** 2
        xt = conv1d(sd, f"{p}.convs2.{j}", xt, padding=(k - 1) // 2)
        x = xt + x
    return x


def hift_wav(sd, mel, phase_vec, noise, phase_dtype=torch.float32):
    """mel [80, T]; phase_vec [9] (entry 0 forced to 0); noise [9, T*256] -> wav [T*256]."""
    x = mel[None]
    for i in (0, 2, 4, 6, 8):
        x = F.elu(conv1d(sd, f"f0_predictor.condnet.{i}", x, padding=1))
    f0 = torch.abs(linear(sd, "f0_predictor.classifier", x.transpose(1, 2)).squeeze(-1))
    f0 = F.interpolate(f0[:, None], scale_factor=256, mode="nearest")                     # [1, 1, N]
    fmat = torch.zeros(1, 9, f0.shape[-1])
    for i in range(9):
        fmat[:, i:i + 1, :] = f0 * (i + 1) / 22050
    theta = 2 * np.pi * (torch.cumsum(fmat.to(phase_dtype), dim=-1) % 1)
    pv = phase_vec.clone().view(1, 9, 1)
    pv[:, 0, :] = 0
    sine = 0.1 * torch.sin(theta.float() + pv)
    uv = (f0 > 10).float()
    sine = sine * uv + (uv * 0.003 + (1 - uv) * 0.1 / 3) * noise[None]
    s = torch.tanh(linear(sd, "m_source.l_linear", sine.transpose(1, 2))).transpose(1, 2)
    window = torch.from_numpy(np.array([0.5 - 0.5 * math.cos(2 * math.pi * n / 16) for n in range(16)],
                                       dtype=np.float32))
    spec = torch.view_as_real(torch.stft(s[:, 0], 16, 4, 16, window=window, return_complex=True))
    s_stft = torch.cat([spec[..., 0], spec[..., 1]], dim=1)
    x = conv1d(sd, "conv_pre", mel[None], padding=3)
    for i in range(2):
        x = F.leaky_relu(x, 0.1)
        x = F.conv_transpose1d(x, sd[f"ups.{i}.weight"], sd[f"ups.{i}.bias"], stride=8, padding=4)
        if i == 1:
            x = F.pad(x, (1, 0), mode="reflect")
        si = conv1d(sd, f"source_downs.{i}", s_stft, stride=8 if i == 0 else 1, padding=4 if i == 0 else 0)
        x = x + _resblock(sd, f"source_resblocks.{i}", si, (7, 11)[i])
        xs = sum(_resblock(sd, f"resblocks.{3 * i + j}", x, k) for j, k in enumerate((3, 7, 11)))
        x = xs / 3
    x = conv1d(sd, "conv_post", F.leaky_relu(x), padding=3)
    mag = torch.clip(torch.exp(x[:, :9]), max=1e2)
    ph = torch.sin(x[:, 9:])
    wav = torch.istft(torch.complex(mag * torch.cos(ph), mag * torch.sin(ph)), 16, 4, 16, window=window)
    return torch.clamp(wav, -0.99, 0.99)[0]
