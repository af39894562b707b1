"""Kaldi log-mel filterbank (engine/frontend/fbank.py) against torchaudio.compliance.kaldi.fbank."""
from __future__ import annotations

import pytest
import torch
import torchaudio

from stepvox.engine.frontend.fbank import campplus_features, kaldi_fbank, num_frames
from stepvox.engine.frontend.resample import resample
from stepvox.engine.frontend.wav import read_wav


def test_kaldi_fbank_matches_torchaudio(speech_wav):
    wav, sr = read_wav(speech_wav)
    x = resample(torch.from_numpy(wav[0]), sr, 16000)
    mine = kaldi_fbank(x)
    theirs = torchaudio.compliance.kaldi.fbank(x[None], num_mel_bins=80, dither=0, sample_frequency=16000)
    torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-5)
    feats = campplus_features(x)
    torch.testing.assert_close(feats.mean(0), torch.zeros(80), atol=1e-4, rtol=0)
    torch.testing.assert_close(feats, mine - mine.mean(0, keepdim=True))


def test_hamming_scaled_variant_matches_torchaudio(speech_wav):
    """The Paraformer's settings: Hamming window, samples scaled by 2**15, other bin counts."""
    wav, sr = read_wav(speech_wav)
    x = resample(torch.from_numpy(wav[0]), sr, 16000)
    mine = kaldi_fbank(x, num_mel_bins=64, window="hamming", scale=32768.0)
    theirs = torchaudio.compliance.kaldi.fbank(x[None] * 32768, num_mel_bins=64, dither=0, sample_frequency=16000,
                                               window_type="hamming")
    assert mine.shape == theirs.shape and mine.shape[1] == 64
    torch.testing.assert_close(mine, theirs, atol=1e-3, rtol=1e-5)


def test_frame_count_and_short_audio():
    g = torch.Generator().manual_seed(5)
    for n in (400, 401, 559, 560, 16000):
        x = torch.randn(n, generator=g) * 0.1
        out = kaldi_fbank(x)
        assert out.shape == (num_frames(n, 400, 160), 80) == (1 + (n - 400) // 160, 80)
        assert out.shape == torchaudio.compliance.kaldi.fbank(x[None], num_mel_bins=80, dither=0).shape
    empty = kaldi_fbank(torch.zeros(399))             # shorter than one frame: no frame, not an error
    assert empty.shape == (0, 80) and empty.dtype == torch.float32
    assert kaldi_fbank(torch.zeros(10), num_mel_bins=40).shape == (0, 40)
    assert num_frames(399, 400, 160) == 0
    with pytest.raises(ValueError, match="window"):
        kaldi_fbank(torch.zeros(1000), window="hann")
