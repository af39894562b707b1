"""Kaldi-style log mel filterbank (torchaudio.compliance.kaldi.fbank semantics) in plain torch.

Used for the CAM++ speaker embedding (SPEC.md §6): 16 kHz audio in [-1, 1] (not scaled by 32768),
80 bins, dither 0, 25 ms / 10 ms frames with snip_edges, DC removal, pre-emphasis 0.97 (first sample
replicated), Povey window (Hann ** 0.85, symmetric), zero pad to 512, power spectrum, HTK-mel
triangles between 20 Hz and Nyquist (mel = 1127 ln(1 + f/700)), log with float eps floor.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch


def _mel_scalar(f: float) -> float:
    return 1127.0 * math.log(1.0 + f / 700.0)


@lru_cache(maxsize=8)
def _kaldi_mel_banks(num_bins: int, padded: int, sample_rate: float, low: float, high: float) -> torch.Tensor:
    """[num_bins, padded // 2 + 1] float32 (last FFT bin carries no weight, as in Kaldi). Float32
    arithmetic on Python-double scalars, the way torchaudio computes it."""
    nyquist = 0.5 * sample_rate
    high = high if high > 0 else nyquist + high
    fft_bin_width = sample_rate / padded
    mel_low, mel_high = _mel_scalar(low), _mel_scalar(high)
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = torch.arange(num_bins)[:, None]
    left, center, right = mel_low + b * delta, mel_low + (b + 1.0) * delta, mel_low + (b + 2.0) * delta
    mel = (1127.0 * (1.0 + fft_bin_width * torch.arange(padded // 2) / 700.0).log())[None, :]
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)
    return torch.nn.functional.pad(banks, (0, 1)).float()


def kaldi_fbank(wav: torch.Tensor, num_mel_bins: int = 80, sample_rate: int = 16000, frame_length_ms: float = 25.0,
                frame_shift_ms: float = 10.0, preemphasis: float = 0.97, low_freq: float = 20.0,
                high_freq: float = 0.0, window: str = "povey") -> torch.Tensor:
    """wav: [N] float. Returns [frames, num_mel_bins] log mel energies (frames = 1 + (N - 400) // 160)."""
    wav = wav.reshape(-1).float()
    size = int(sample_rate * frame_length_ms * 0.001)
    shift = int(sample_rate * frame_shift_ms * 0.001)
    if wav.numel() < size:
        raise ValueError(f"kaldi_fbank: need at least {size} samples, got {wav.numel()}")
    padded = 1 << (size - 1).bit_length()
    frames = wav.unfold(0, size, shift)                      # snip_edges: whole frames only
    frames = frames - frames.mean(dim=1, keepdim=True)        # remove DC offset
    prev = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)  # pre-emphasis, first sample replicated
    frames = frames - preemphasis * prev
    if window == "povey":
        win = torch.hann_window(size, periodic=False).pow(0.85)
    elif window == "hamming":
        win = torch.hamming_window(size, periodic=False, alpha=0.54, beta=0.46)
    else:
        raise ValueError(f"kaldi_fbank: unknown window {window!r}")
    frames = torch.nn.functional.pad(frames * win.to(frames.device), (0, padded - size))
    power = torch.fft.rfft(frames).abs().pow(2.0)
    banks = _kaldi_mel_banks(num_mel_bins, padded, float(sample_rate), float(low_freq), float(high_freq))
    energies = power @ banks.to(power.device).T
    eps = torch.finfo(torch.float32).eps
    return torch.log(torch.clamp(energies, min=eps))


def campplus_features(wav16k: torch.Tensor) -> torch.Tensor:
    """CAM++ input (GH frontend `_extract_spk_embedding`): fbank minus its mean over time, [frames, 80]."""
    feat = kaldi_fbank(wav16k, num_mel_bins=80, sample_rate=16000)
    return feat - feat.mean(dim=0, keepdim=True)

