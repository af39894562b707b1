"""Prompt mel spectrogram of the speech decoder (engine/frontend/mel.py): matcha's formula and
librosa's Slaney filterbank."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchaudio

from stepvox.engine.frontend.mel import MelConfig, mel_spectrogram, periodic_hann, slaney_mel_filterbank
from stepvox.engine.frontend.wav import read_wav


def test_slaney_filterbank_matches_torchaudio():
    mine = slaney_mel_filterbank(22050, 1024, 80, 0.0, 8000.0)
    theirs = torchaudio.functional.melscale_fbanks(513, 0.0, 8000.0, 80, 22050, norm="slaney", mel_scale="slaney").T
    np.testing.assert_allclose(mine, theirs.numpy(), atol=2e-7)


def test_prompt_mel_matches_matcha_formula(speech_wav):
    wav, sr = read_wav(speech_wav)
    assert sr == 22050
    x = torch.from_numpy(wav[0])
    mel = mel_spectrogram(x, MelConfig())
    # matcha: reflect pad 384, STFT 1024/256 hann center=False, sqrt(|.|^2 + 1e-9), mel, log clamp 1e-5
    y = torch.nn.functional.pad(x[None, None], (384, 384), mode="reflect")[0]
    spec = torch.view_as_real(torch.stft(y, 1024, 256, 1024, torch.hann_window(1024), center=False, return_complex=True))
    mag = torch.sqrt(spec.pow(2).sum(-1) + 1e-9)
    fb = torchaudio.functional.melscale_fbanks(513, 0.0, 8000.0, 80, 22050, norm="slaney", mel_scale="slaney").T
    expect = torch.log(torch.clamp(fb @ mag, min=1e-5))
    assert mel.shape == expect.shape == (1, 80, x.numel() // 256)
    torch.testing.assert_close(mel, expect, atol=1e-4, rtol=1e-4)


def test_batch_and_short_input():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5000, generator=g) * 0.1
    batch = mel_spectrogram(x)
    assert batch.shape == (2, 80, 5000 // 256)
    torch.testing.assert_close(batch[1:], mel_spectrogram(x[1]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="need more than 384 samples"):
        mel_spectrogram(torch.zeros(384))


def test_periodic_hann():
    """scipy's get_window("hann", n, fftbins=True): float64, rounded once; torch's float32 window
    differs from it by float rounding only."""
    for n in (16, 1024):
        exact = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)).astype(np.float32)
        assert periodic_hann(n).dtype == np.float32 and np.array_equal(periodic_hann(n), exact)
        np.testing.assert_allclose(periodic_hann(n), torch.hann_window(n).numpy(), rtol=0, atol=2.5e-7)
