"""Prompt mel spectrogram of the speech decoder (SPEC.md §3.5 step 8; matcha `mel_spectrogram`).

22.05 kHz audio -> reflect pad (n_fft - hop)/2 each side -> STFT (n_fft 1024, hop 256, periodic
Hann 1024, center False) -> magnitude sqrt(re^2 + im^2 + 1e-9) -> Slaney-normalised mel filterbank
on the Slaney mel scale (librosa's default `filters.mel`) -> log(clamp(., 1e-5)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

@dataclass(frozen=True)
class MelConfig:
    """matcha `mel_spectrogram` arguments (the `feat_extractor` entry of cosyvoice.yaml)."""
    n_fft: int = 1024
    num_mels: int = 80
    sampling_rate: int = 22050
    hop_size: int = 256
    win_size: int = 1024
    fmin: float = 0.0
    fmax: float | None = 8000.0
    center: bool = False


_F_SP = 200.0 / 3          # Slaney scale: linear below 1 kHz ...
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = math.log(6.4) / 27.0   # ... logarithmic above


def hz_to_mel_slaney(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    lin = f / _F_SP
    log = _MIN_LOG_MEL + np.log(np.maximum(f, 1e-10) / _MIN_LOG_HZ) / _LOGSTEP
    return np.where(f >= _MIN_LOG_HZ, log, lin)


def mel_to_hz_slaney(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    lin = m * _F_SP
    log = _MIN_LOG_HZ * np.exp(_LOGSTEP * (m - _MIN_LOG_MEL))
    return np.where(m >= _MIN_LOG_MEL, log, lin)


@lru_cache(maxsize=8)
def slaney_mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float | None) -> np.ndarray:
    """[n_mels, n_fft // 2 + 1] float32 triangular filters, area-normalised (librosa norm='slaney')."""
    fmax = sample_rate / 2.0 if fmax is None else float(fmax)
    fft_freqs = np.fft.rfftfreq(n_fft, d=1.0 / sample_rate)
    mel_pts = np.linspace(hz_to_mel_slaney(fmin), hz_to_mel_slaney(fmax), n_mels + 2)
    hz_pts = mel_to_hz_slaney(mel_pts)
    widths = np.diff(hz_pts)
    ramps = hz_pts[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    # librosa stores the triangles in float32 first, then scales them (two roundings, kept here)
    weights = np.maximum(0.0, np.minimum(lower, upper)).astype(np.float32)
    enorm = 2.0 / (hz_pts[2:] - hz_pts[:-2])
    return (weights.astype(np.float64) * enorm[:, None]).astype(np.float32)


def periodic_hann(length: int) -> np.ndarray:
    """float32 periodic Hann window (scipy get_window('hann', N, fftbins=True), torch.hann_window)."""
    n = np.arange(length, dtype=np.float64)
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * n / length)).astype(np.float32)


def mel_spectrogram(wav: torch.Tensor, cfg: MelConfig = MelConfig()) -> torch.Tensor:
    """wav: [N] or [B, N] float at cfg.sampling_rate in [-1, 1]. Returns log-mel [B, num_mels, frames]
    (frames = N // hop for the released settings)."""
    if wav.dim() == 1:
        wav = wav[None]
    wav = wav.float()
    pad = (cfg.n_fft - cfg.hop_size) // 2
    if wav.shape[-1] <= pad:
        raise ValueError(f"mel_spectrogram: need more than {pad} samples, got {wav.shape[-1]}")
    y = torch.nn.functional.pad(wav[:, None], (pad, pad), mode="reflect")[:, 0]
    window = torch.hann_window(cfg.win_size, device=wav.device)   # matcha's window (periodic)
    spec = torch.stft(y, cfg.n_fft, hop_length=cfg.hop_size, win_length=cfg.win_size, window=window,
                      center=cfg.center, pad_mode="reflect", normalized=False, onesided=True, return_complex=True)
    spec = torch.view_as_real(spec)
    mag = torch.sqrt(spec.pow(2).sum(-1) + 1e-9)
    basis = torch.from_numpy(slaney_mel_filterbank(cfg.sampling_rate, cfg.n_fft, cfg.num_mels,
                                                   float(cfg.fmin), cfg.fmax)).to(wav.device)
    return torch.log(torch.clamp(torch.matmul(basis, mag), min=1e-5))
