"""Whisper log-mel (engine/frontend/whisper_mel.py), the S3 tokenizer's input: the Slaney mel matrix
against librosa's formula and the features against an independent reference."""
from __future__ import annotations

import numpy as np
import torch

from stepvox.engine.frontend.whisper_mel import _mel_matrix, whisper_log_mel

from stepvox.testing.official_tokenizer import slaney_mel_matrix, whisper_log_mel_reference


def _speechy(n, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n) / 16000
    return 0.3 * torch.sin(2 * np.pi * 180 * t * (1 + 0.2 * torch.sin(2 * t))) + 0.03 * torch.randn(n, generator=g)


def test_mel_matrix_matches_librosa_formula():
    ours = _mel_matrix(128, "cpu").numpy()
    ref = slaney_mel_matrix()
    assert np.abs(ours - ref).max() < 5e-7 and np.abs(ref).max() > 0.01


def test_whisper_log_mel_matches_reference():
    wav = _speechy(16000 + 123, 0)
    mel = whisper_log_mel(wav)
    assert mel.shape == (128, (16000 + 123) // 160)
    torch.testing.assert_close(mel, whisper_log_mel_reference(wav), atol=2e-5, rtol=1e-5)
