"""The one audio-input policy (engine/frontend/audio_input.py): dtypes, shapes, values, rates."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from stepvox.engine.errors import AudioInputError, InvalidRequestError
from stepvox.engine.frontend.audio_input import check_sample_rate, checked_audio, to_mono_float


def test_malformed_audio():
    with pytest.raises(AudioInputError, match="empty"):
        to_mono_float(np.zeros(0, np.float32))
    with pytest.raises(AudioInputError, match="NaN"):
        to_mono_float(torch.tensor([0.1, float("nan")]))
    with pytest.raises(AudioInputError, match="Inf"):
        to_mono_float(np.array([0.1, np.inf], np.float32))
    with pytest.raises(AudioInputError, match="peak"):
        to_mono_float(np.array([0.0, 1200.0], np.float32))
    with pytest.raises(AudioInputError, match="samples, channels"):
        to_mono_float(np.zeros((1000, 2), np.float32))
    with pytest.raises(AudioInputError):
        to_mono_float(np.zeros((2, 2, 2), np.float32))
    with pytest.raises(AudioInputError, match="numpy array"):
        to_mono_float([0.1, 0.2])
    torch.testing.assert_close(to_mono_float(np.array([16384, -32768], np.int16)), torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(to_mono_float(torch.tensor([[0.2, 0.4], [0.0, 0.0]])), torch.tensor([0.1, 0.2]))
    assert issubclass(AudioInputError, InvalidRequestError) and issubclass(AudioInputError, ValueError)


def test_dtypes():
    torch.testing.assert_close(to_mono_float(np.array([1 << 30, -(1 << 31)], np.int32)), torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(to_mono_float(torch.tensor([1 << 30], dtype=torch.int32)), torch.tensor([0.5]))
    for dtype in (np.float16, np.float64):
        out = to_mono_float(np.array([0.25, -0.5], dtype))
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, torch.tensor([0.25, -0.5]))
    assert to_mono_float(torch.tensor([0.25], dtype=torch.bfloat16)).dtype == torch.float32
    for bad in (np.zeros(8, np.uint8), np.zeros(8, np.int8), np.zeros(8, np.int64), np.zeros(8, np.bool_),
                np.zeros(8, np.complex64), torch.zeros(8, dtype=torch.int64), torch.zeros(8, dtype=torch.bool),
                torch.zeros(8, dtype=torch.uint8)):
        with pytest.raises(AudioInputError, match="unsupported audio dtype"):
            to_mono_float(bad)
    peak = to_mono_float(np.array([0.0, 1.9], np.float32))          # slightly clipped float audio is used as is
    assert float(peak.max()) == pytest.approx(1.9)


def test_channels():
    eight = np.stack([np.full(100, i / 10, np.float32) for i in range(8)])
    torch.testing.assert_close(to_mono_float(eight), torch.full((100,), 0.35))
    with pytest.raises(AudioInputError, match="at most 8 channels"):
        to_mono_float(np.zeros((9, 100), np.float32))
    out = to_mono_float(np.zeros((1, 100), np.float32))
    assert out.shape == (100,) and out.dtype == torch.float32


def test_sample_rates():
    for bad in (0, 7999, 250000, 16000.5, "16k", True):
        with pytest.raises(AudioInputError):
            check_sample_rate(bad)
    for narrow in (4000, 8000, 11025, 15999):          # narrow-band rates are refused everywhere now
        with pytest.raises(AudioInputError, match=f"{narrow} Hz is below 16000 Hz"):
            check_sample_rate(narrow)
    with pytest.raises(AudioInputError, match="above the supported 192000 Hz"):
        check_sample_rate(192001)
    assert check_sample_rate(16000.0) == 16000
    for good in (16000, 22050, 44100, 48000, 192000, np.int64(24000)):
        assert check_sample_rate(good) == int(good) and type(check_sample_rate(good)) is int
    wav, sr = checked_audio(np.zeros((2, 50), np.int16), 44100.0)
    assert sr == 44100 and type(sr) is int and wav.shape == (50,) and wav.dtype == torch.float32
    with pytest.raises(AudioInputError):
        checked_audio(np.zeros(50, np.float32), 8000)
