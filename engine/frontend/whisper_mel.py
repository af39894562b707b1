"""Whisper's log-mel spectrogram (openai-whisper `log_mel_spectrogram`, n_mels 128), the input of
the S3 tokenizer (SPEC.md §5): STFT 400/160 with a periodic Hann window, centred with reflect
padding, last frame dropped, power spectrum, Slaney mel 128 (0-8 kHz), log10 clamped at 1e-10,
floor at (max - 8), then (x + 4) / 4. The per-utterance max makes the features depend on the
whole piece, so each <= 30 s piece is computed on its own.

The mel matrix comes from torchaudio (`melscale_fbanks`, Slaney scale and norm); against the
librosa matrix that Whisper ships (mel_filters.npz) it differs by at most 1.6e-7 absolute
(4e-6 of the largest weight): float32 rounding.
"""
from __future__ import annotations

import functools

import torch
import torchaudio

N_FFT = 400
HOP = 160
SAMPLE_RATE = 16000


@functools.lru_cache(maxsize=8)
def _mel_matrix(n_mels: int, device: str) -> torch.Tensor:
    fb = torchaudio.functional.melscale_fbanks(
        N_FFT // 2 + 1, 0.0, SAMPLE_RATE / 2, n_mels, SAMPLE_RATE, norm="slaney", mel_scale="slaney")
    return fb.T.contiguous().to(device)          # [n_mels, 201]


@functools.lru_cache(maxsize=8)
def _window(device: str) -> torch.Tensor:
    return torch.hann_window(N_FFT, device=device)


def num_mel_frames(num_samples: int) -> int:
    return num_samples // HOP


def whisper_log_mel(wav: torch.Tensor, n_mels: int = 128) -> torch.Tensor:
    """[n_mels, num_samples // 160] features of one 16 kHz float waveform."""
    device = str(wav.device)
    spec = torch.stft(wav.float(), N_FFT, HOP, window=_window(device), center=True,
                      pad_mode="reflect", return_complex=True)
    power = spec[..., :-1].abs() ** 2
    mel = _mel_matrix(n_mels, device) @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0
