"""Kaldi log-mel filterbank features (torchaudio.compliance.kaldi.fbank semantics, dither 0).

Frames of `frame_length_ms` every `frame_shift_ms` (whole frames only: snip_edges), DC removed,
pre-emphasis 0.97 (first sample replicated), a Hamming or Povey window, zero padding to a power of
two, power spectrum, Kaldi's HTK-mel triangles between 20 Hz and Nyquist, log with a float eps
floor. The operations run in torchaudio's order (so they give its values) with the window and mel
banks cached per device instead of rebuilt and copied (a host sync) at every call.

Users: the Paraformer front end (16 kHz samples scaled by 2**15, Hamming window; SPEC.md §4.2) and
the CAM++ speaker embedding (samples in [-1, 1], Povey window; SPEC.md §6).
"""
from __future__ import annotations

import functools

import torch
import torchaudio.compliance.kaldi as kaldi

WINDOWS = ("hamming", "povey")


@functools.lru_cache(maxsize=16)
def _constants(window: str, size: int, num_mel_bins: int, sample_rate: int, device: str):
    """(window [size], mel banks [bins, padded/2 + 1], float eps) on `device`."""
    padded = 1 << (size - 1).bit_length()
    if window == "hamming":
        win = torch.hamming_window(size, periodic=False, alpha=0.54, beta=0.46, device=device)
    else:
        win = torch.hann_window(size, periodic=False, device=device).pow(0.85)
    banks, _ = kaldi.get_mel_banks(num_mel_bins, padded, float(sample_rate), 20.0, 0.0, 100.0, -500.0, 1.0)
    banks = torch.nn.functional.pad(banks.to(device=device, dtype=torch.float32), (0, 1), mode="constant", value=0)
    eps = torch.tensor(torch.finfo(torch.float).eps).to(device)
    return win, banks, eps


def num_frames(num_samples: int, frame_samples: int, shift_samples: int) -> int:
    return 0 if num_samples < frame_samples else (num_samples - frame_samples) // shift_samples + 1


def kaldi_fbank(wav: torch.Tensor, *, num_mel_bins: int = 80, sample_rate: int = 16000,
                frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0, window: str = "povey",
                scale: float = 1.0) -> torch.Tensor:
    """[frames, num_mel_bins] log mel energies of 1-D float audio (multiplied by `scale` first);
    no frame (an empty result) when the audio is shorter than one frame."""
    if window not in WINDOWS:
        raise ValueError(f"kaldi_fbank: window must be one of {WINDOWS}, got {window!r}")
    size = int(frame_length_ms * sample_rate / 1000)
    shift = int(frame_shift_ms * sample_rate / 1000)
    wav = wav.reshape(-1)
    if wav.numel() < size:
        return wav.new_zeros(0, num_mel_bins, dtype=torch.float32)
    win, banks, eps = _constants(window, size, num_mel_bins, int(sample_rate), str(wav.device))
    x = wav.float() * scale
    m = num_frames(x.numel(), size, shift)
    frames = x.as_strided((m, size), (shift * x.stride(0), x.stride(0)))
    frames = frames - torch.mean(frames, dim=1).unsqueeze(1)                       # remove DC offset
    prev = torch.nn.functional.pad(frames.unsqueeze(0), (1, 0), mode="replicate").squeeze(0)
    frames = frames - 0.97 * prev[:, :-1]                                          # pre-emphasis
    frames = frames * win.unsqueeze(0)
    padded = 1 << (size - 1).bit_length()
    frames = torch.nn.functional.pad(frames.unsqueeze(0), (0, padded - size), mode="constant", value=0).squeeze(0)
    power = torch.fft.rfft(frames).abs().pow(2.0)
    return torch.max(torch.mm(power, banks.T), eps).log()


def campplus_features(wav16k: torch.Tensor) -> torch.Tensor:
    """CAM++ input (GH frontend `_extract_spk_embedding`): 80-bin Povey fbank of 16 kHz audio in
    [-1, 1] minus its mean over time, [frames, 80]."""
    feat = kaldi_fbank(wav16k, num_mel_bins=80, sample_rate=16000, window="povey")
    return feat - feat.mean(dim=0, keepdim=True)
