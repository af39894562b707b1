"""HiFT vocoder: mel -> 22.05 kHz waveform (SPEC.md §3.4, §3.5 step 7; GH hifigan/generator.py).

  f0 = |Linear(ELU-conv stack(mel))|          per mel frame (ConvRNNF0Predictor)
  source = tanh(Linear(SineGen(f0 upsampled x256)))   9 harmonics, random start phases, noise
  s = STFT(source) (n_fft 16, hop 4, periodic Hann, reflect-centred) -> 18 channels
  x = conv_pre(mel); per stage: lrelu 0.1, ConvTranspose up, (reflect pad (1,0) on the last),
      + source_resblock(source_down(s)), mean of the stage's resblocks (Snake activations)
  x = conv_post(lrelu 0.01 (x)); wav = iSTFT(exp(x[:9]) clipped at 100, sin(x[9:])), clamp +-0.99

Weights are plain (weight norm folded at load). The randomness of SineGen is explicit: start
phases [B, 9] and noise [B, 9, N] are arguments, so callers can seed it, and `phase_offset` lets a
stream continue each harmonic's phase across chunks. STFT and iSTFT are matmuls with a DFT basis
plus overlap-add (torch.istft's arithmetic), which keeps the vocoder free of cuFFT plans.

Length buckets: `forward(..., frames=F)` runs mel right-padded to any length and gives each item
the output of its first F[b] frames. Every convolution then sees zeros past the item's end (masks
after conv_pre, in each Snake, before the upsamplers and conv_post), the STFT reflects at the
item's end, and the iSTFT drops the padded frames from its overlap-add and window envelope; the
valid samples equal the unpadded run's. HiFTGraphs replays that bucketed forward as one CUDA
graph per (batch, frame bucket), with the SineGen randomness as graph inputs.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...kernels import KernelConfig
from ...kernels.snake import snake
from ..device.graphs import GraphCache, bucket_length
from ..frontend.mel import periodic_hann
from .cosyvoice_checkpoint import weight_normed
from .cosyvoice_config import HiftConfig


def get_padding(kernel: int, dilation: int = 1) -> int:
    return (kernel * dilation - dilation) // 2


class Snake(nn.Module):
    def __init__(self, channels: int, kernels: KernelConfig):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))
        self.kernels = kernels

    def forward(self, x, mask=None):
        return snake(x, self.alpha, mask, backend=self.kernels.backend)


class ResBlock(nn.Module):
    def __init__(self, channels: int, kernel: int, dilations, kernels: KernelConfig):
        super().__init__()
        self.convs1 = nn.ModuleList(weight_normed(nn.Conv1d(channels, channels, kernel, 1, dilation=d,
                                                             padding=get_padding(kernel, d))) for d in dilations)
        self.convs2 = nn.ModuleList(weight_normed(nn.Conv1d(channels, channels, kernel, 1, dilation=1,
                                                             padding=get_padding(kernel, 1))) for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(channels, kernels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels, kernels) for _ in dilations)

    def forward(self, x, mask=None):
        """mask [B, 1, T]: the output is exact on the frames where mask = 1 (garbage elsewhere)."""
        for c1, c2, a1, a2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            x = c2(a2(c1(a1(x, mask)), mask)) + x
        return x


class F0Predictor(nn.Module):
    """ConvRNNF0Predictor: 5 x (Conv1d k3 + ELU), Linear to one value per frame, abs."""

    def __init__(self, in_channels: int, cond_channels: int):
        super().__init__()
        layers = []
        for i in range(5):
            layers += [weight_normed(nn.Conv1d(in_channels if i == 0 else cond_channels, cond_channels, 3, padding=1)),
                       nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond_channels, 1)

    def forward(self, mel, mask=None):
        x = mel
        for layer in self.condnet:
            x = layer(x if mask is None or not isinstance(layer, nn.Conv1d) else x * mask)
        return torch.abs(self.classifier(x.transpose(1, 2)).squeeze(-1))


class SourceModule(nn.Module):
    def __init__(self, harmonics: int):
        super().__init__()
        self.l_linear = nn.Linear(harmonics, 1)


class HiFTGenerator(nn.Module):
    def __init__(self, cfg: HiftConfig, kernels: KernelConfig = KernelConfig(), phase_dtype=torch.float32):
        """phase_dtype: dtype of the running phase sum: float32 as the official SineGen (its rounding
        is ~1e-3 cycle at 10 s on the 9th harmonic); float64 for exactness studies."""
        super().__init__()
        self.cfg = cfg
        base, n_up = cfg.base_channels, len(cfg.upsample_rates)
        self.m_source = SourceModule(cfg.nb_harmonics + 1)
        self.conv_pre = weight_normed(nn.Conv1d(cfg.in_channels, base, 7, 1, padding=3))
        self.ups = nn.ModuleList(
            weight_normed(nn.ConvTranspose1d(base // 2 ** i, base // 2 ** (i + 1), k, u, padding=(k - u) // 2))
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)))
        self.source_downs, self.source_resblocks = nn.ModuleList(), nn.ModuleList()
        down_rates = np.cumprod([1] + list(cfg.upsample_rates[::-1][:-1]))[::-1]
        spec_ch = cfg.n_fft + 2
        for i, (u, k, d) in enumerate(zip(down_rates, cfg.source_resblock_kernel_sizes,
                                          cfg.source_resblock_dilation_sizes)):
            ch, u = base // 2 ** (i + 1), int(u)
            self.source_downs.append(nn.Conv1d(spec_ch, ch, 1, 1) if u == 1 else
                                     nn.Conv1d(spec_ch, ch, u * 2, u, padding=u // 2))
            self.source_resblocks.append(ResBlock(ch, k, d, kernels))
        self.resblocks = nn.ModuleList()
        for i in range(n_up):
            ch = base // 2 ** (i + 1)
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes):
                self.resblocks.append(ResBlock(ch, k, d, kernels))
        self.conv_post = weight_normed(nn.Conv1d(base // 2 ** n_up, spec_ch, 7, 1, padding=3))
        self.f0_predictor = F0Predictor(cfg.f0_in_channels, cfg.f0_cond_channels)
        self._dft = {}
        self.phase_dtype = phase_dtype

    @property
    def harmonics(self) -> int:
        return self.cfg.nb_harmonics + 1

    @property
    def samples_per_frame(self) -> int:
        return self.cfg.samples_per_frame

    # ------------------------------------------------------------------ source (SineGen + merge)
    def f0(self, mel: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """mel [B, 80, T] -> f0 [B, T] in Hz (exact on frames with mask [B, 1, T] = 1)."""
        return self.f0_predictor(mel, mask)

    def frame_masks(self, frames: torch.Tensor, length: int, dtype=torch.float32) -> list[torch.Tensor]:
        """Masks [B, 1, n] of the valid positions for `frames` [B] valid mel frames of `length`: at
        the mel rate, after each upsampler (the last one reflect-padded by one), which is also the
        STFT frame rate of the source."""
        frames = frames.reshape(-1, 1, 1)
        rate, n, out = 1, length, []
        out.append((torch.arange(n, device=frames.device) < frames).to(dtype))
        for i, u in enumerate(self.cfg.upsample_rates):
            rate, extra = rate * u, int(i == len(self.cfg.upsample_rates) - 1)
            out.append((torch.arange(length * rate + extra, device=frames.device) < frames * rate + extra).to(dtype))
        return out

    def source(self, f0: torch.Tensor, start_phase: torch.Tensor, noise: torch.Tensor,
               phase_offset: torch.Tensor | None = None, phase_anchor: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """f0 [B, T]; start_phase [B, H] (the fundamental's entry is ignored: always 0); noise
        [B, H, T*256] standard normal. Each harmonic's phase (in cycles) is the running sum of
        f0 * k / sr; `phase_offset` [B, H] with `phase_anchor` [B] (sample index, default 0) pins the
        cycles accumulated before the anchor sample to the offset (streams continue phases this way).
        Returns (source [B, 1, T*256], wrapped cycles [B, H, T*256] in `phase_dtype`)."""
        c = self.cfg
        f0_up = f0.repeat_interleave(self.samples_per_frame, dim=-1)[:, None, :]          # nearest x256
        order = torch.arange(1, self.harmonics + 1, device=f0.device, dtype=f0.dtype)[None, :, None]
        cycles = torch.cumsum((f0_up * order / c.sampling_rate).to(self.phase_dtype), dim=-1)
        if phase_offset is not None:
            shift = phase_offset.to(self.phase_dtype)
            if phase_anchor is not None:
                anchor = torch.as_tensor(phase_anchor, device=f0.device).long().reshape(-1, 1, 1)
                before = torch.gather(cycles, 2, (anchor - 1).clamp(min=0).expand(-1, cycles.shape[1], 1))[..., 0]
                shift = shift - torch.where(anchor[:, :, 0] > 0, before, torch.zeros_like(before))
            cycles = cycles + shift[:, :, None]
        cycles = cycles % 1
        phase = start_phase.clone()
        phase[:, 0] = 0
        sine = c.nsf_alpha * torch.sin(2 * np.pi * cycles.to(f0.dtype) + phase[:, :, None])
        uv = (f0_up > c.nsf_voiced_threshold).float()
        noise_amp = uv * c.nsf_sigma + (1 - uv) * c.nsf_alpha / 3
        sine = sine * uv + noise_amp * noise
        merged = torch.tanh(self.m_source.l_linear(sine.transpose(1, 2))).transpose(1, 2)
        return merged, cycles

    # ------------------------------------------------------------------ STFT / iSTFT (n_fft 16)
    def _bases(self, device):
        key = str(device)
        if key not in self._dft:
            n = self.cfg.n_fft
            win = torch.from_numpy(periodic_hann(n)).double()
            k = torch.arange(n // 2 + 1, dtype=torch.float64)[:, None]
            t = torch.arange(n, dtype=torch.float64)[None, :]
            ang = 2 * math.pi * k * t / n
            analysis = torch.cat([win * torch.cos(ang), -win * torch.sin(ang)]).T          # [n, 2(n/2+1)]
            scale = torch.full((n // 2 + 1, 1), 2.0 / n, dtype=torch.float64)
            scale[0], scale[-1] = 1.0 / n, 1.0 / n
            synthesis = torch.cat([scale * torch.cos(ang), -scale * torch.sin(ang)]) * win  # [2(n/2+1), n]
            self._dft[key] = (analysis.float().to(device), synthesis.float().to(device), win.float().to(device))
        return self._dft[key]

    def stft(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """[B, N] -> [B, n_fft + 2, N // hop + 1]: real parts then imaginary parts (torch.stft, center).
        valid [B]: samples of each row that are real; the reflection happens at that end."""
        n, hop = self.cfg.n_fft, self.cfg.hop_len
        analysis, _, _ = self._bases(x.device)
        if valid is None:
            padded = F.pad(x[:, None], (n // 2, n // 2), mode="reflect")[:, 0]
        else:
            pos = torch.arange(x.shape[1] + n, device=x.device)[None, :] - n // 2
            end = valid.reshape(-1, 1)
            idx = torch.where(pos < 0, -pos, pos)
            idx = torch.where(idx >= end, 2 * (end - 1) - idx, idx).clamp(0, x.shape[1] - 1)
            padded = torch.gather(x, 1, idx)
        return torch.matmul(padded.unfold(-1, n, hop), analysis).transpose(1, 2)

    def istft(self, magnitude: torch.Tensor, phase: torch.Tensor, frame_mask: torch.Tensor | None = None
              ) -> torch.Tensor:
        """[B, n/2+1, F] each -> [B, hop * (F - 1)] (torch.istft with center, periodic Hann).
        frame_mask [B, 1, F]: frames with 0 are left out of the overlap-add and the envelope."""
        n, hop = self.cfg.n_fft, self.cfg.hop_len
        _, synthesis, win = self._bases(magnitude.device)
        magnitude = torch.clip(magnitude, max=1e2)
        if frame_mask is not None:
            magnitude = magnitude * frame_mask
        spec = torch.cat([magnitude * torch.cos(phase), magnitude * torch.sin(phase)], dim=1)
        frames = torch.matmul(spec.transpose(1, 2), synthesis)                             # [B, F, n]
        count = frames.shape[1]
        full = (count - 1) * hop + n
        ola = F.fold(frames.transpose(1, 2), (1, full), (1, n), stride=(1, hop))[:, 0, 0]
        if frame_mask is None:
            env = F.fold((win * win)[None, :, None].expand(1, n, count), (1, full), (1, n), stride=(1, hop))[0, 0, 0]
        else:   # per item; positions no valid frame reaches get 0 / 1 instead of 0 / 0
            env = F.fold((win * win)[None, :, None] * frame_mask, (1, full), (1, n), stride=(1, hop))[:, 0, 0]
            env = torch.where(env > 1e-11, env, torch.ones_like(env))
        return (ola / env)[:, n // 2: n // 2 + hop * (count - 1)]

    # ------------------------------------------------------------------ decoder
    def decode(self, mel: torch.Tensor, source: torch.Tensor, masks: list[torch.Tensor] | None = None
               ) -> torch.Tensor:
        """mel [B, 80, T], source [B, 1, T*256] -> waveform [B, T*256]. masks: frame_masks(...) of a
        length-bucketed batch."""
        c = self.cfg
        if masks is None:
            s = self.stft(source[:, 0])
            m = [None] * (len(self.ups) + 1)
        else:
            m = masks
            s = self.stft(source[:, 0], m[0].sum(dim=(1, 2)).long() * self.samples_per_frame) * m[-1]
        x = self.conv_pre(mel if m[0] is None else mel * m[0])
        n_up, n_k = len(self.ups), len(c.resblock_kernel_sizes)
        for i in range(n_up):
            x = F.leaky_relu(x, c.lrelu_slope)
            x = self.ups[i](x if m[i] is None else x * m[i])
            if i == n_up - 1:
                x = F.pad(x, (1, 0), mode="reflect")
            x = x + self.source_resblocks[i](self.source_downs[i](s), m[i + 1])
            xs = self.resblocks[i * n_k](x, m[i + 1])
            for j in range(1, n_k):
                xs = xs + self.resblocks[i * n_k + j](x, m[i + 1])
            x = xs / n_k
        x = F.leaky_relu(x)
        x = self.conv_post(x if m[-1] is None else x * m[-1])
        half = c.n_fft // 2 + 1
        wav = self.istft(torch.exp(x[:, :half]), torch.sin(x[:, half:]), m[-1])
        return torch.clamp(wav, -c.audio_limit, c.audio_limit)

    @torch.no_grad()
    def forward(self, mel: torch.Tensor, start_phase: torch.Tensor, noise: torch.Tensor,
                phase_offset: torch.Tensor | None = None, phase_anchor: torch.Tensor | None = None,
                cache_source: torch.Tensor | None = None, frames: torch.Tensor | None = None):
        """Offline/streaming vocoding. cache_source [B, 1, K] overrides the first K source samples
        (the upstream v1 streaming recipe). frames [B] (a tensor): valid mel frames of a right-padded
        batch (mel zero past them); each item's first frames[b] * 256 samples are its unpadded result.
        Returns (waveform [B, T*256], source [B, 1, T*256], cycles)."""
        masks = None if frames is None else self.frame_masks(frames, mel.shape[-1], mel.dtype)
        src, cycles = self.source(self.f0(mel, None if masks is None else masks[0]), start_phase, noise,
                                  phase_offset, phase_anchor)
        if cache_source is not None and cache_source.shape[-1] > 0:
            src = src.clone()
            src[:, :, :cache_source.shape[-1]] = cache_source
        return self.decode(mel, src, masks), src, cycles


class HiFTGraphs:
    """HiFTGenerator.forward replayed from CUDA graphs, one per (batch, frame bucket).

    Inputs are copied into static buffers (mel and noise zero-padded to the bucket, the valid frame
    count as a tensor), the bucketed forward replays, and the valid part of the outputs is copied
    out, so what a caller holds is never overwritten by a later replay. Graphs share one memory
    pool. cache_source is not graph-captured (HiFTGenerator.forward handles it eagerly)."""

    def __init__(self, hift: HiFTGenerator, bucket: int = 32):
        self.hift = hift
        self.bucket = bucket
        self.graphs = GraphCache(self._body, self._static, hift.conv_pre.weight.device, warmups=1)

    @property
    def graph_count(self) -> int:
        return len(self.graphs)

    def bucket_frames(self, frames: int) -> int:
        return bucket_length(frames, self.bucket)

    def _static(self, key):
        b, length = key
        h, spf, c = self.hift.harmonics, self.hift.samples_per_frame, self.hift.cfg.in_channels
        dev = self.graphs.device
        return (torch.zeros(b, c, length, device=dev), torch.zeros(b, h, device=dev),
                torch.zeros(b, h, length * spf, device=dev), torch.zeros(b, h, dtype=torch.float64, device=dev),
                torch.zeros(b, dtype=torch.long, device=dev), torch.full((b,), length, dtype=torch.long, device=dev))

    def _body(self, key, mel, start_phase, noise, phase_offset, phase_anchor, frames):
        wav, _, cycles = self.hift(mel, start_phase, noise, phase_offset, phase_anchor, frames=frames)
        return wav, cycles

    @torch.no_grad()
    def capture(self, batch: int, frames: int) -> None:
        self.graphs.entry((batch, self.bucket_frames(frames)))

    @torch.no_grad()
    def __call__(self, mel: torch.Tensor, start_phase: torch.Tensor, noise: torch.Tensor,
                 phase_offset: torch.Tensor | None = None, phase_anchor=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Same inputs as HiFTGenerator.forward (mel [B, 80, T] float32 on CUDA, all items T frames).
        Returns (waveform [B, T*256], cycles [B, H, T*256]), fresh tensors."""
        b, _, t = mel.shape
        n = t * self.hift.samples_per_frame
        graph, st, (wav, cycles) = self.graphs.entry((b, self.bucket_frames(t)))
        st_mel, st_phase, st_noise, st_offset, st_anchor, st_frames = st
        st_mel[:, :, :t].copy_(mel)
        st_mel[:, :, t:].zero_()
        st_noise[:, :, :n].copy_(noise)
        st_noise[:, :, n:].zero_()
        st_phase.copy_(start_phase)
        if phase_offset is None:
            st_offset.zero_()
        else:
            st_offset.copy_(phase_offset)
        if phase_anchor is None:
            st_anchor.zero_()
        else:
            st_anchor.copy_(torch.as_tensor(phase_anchor).reshape(b), non_blocking=True)
        st_frames.fill_(t)
        graph.replay()
        return wav[:, :n].clone(), cycles[:, :, :n].clone()
