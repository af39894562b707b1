"""Step-Audio's waveform preparation (engine/frontend/preprocess.py): peak normalisation and the
silence trim."""
from __future__ import annotations

import numpy as np
import torch

from stepvox.engine.frontend.preprocess import energy_normalize, trim_silence


def test_energy_norm_and_trim_follow_step_audio():
    wav = torch.tensor([0.0, 0.5, -0.25])
    torch.testing.assert_close(energy_normalize(wav), wav / 0.5 * 0.999)
    quiet = torch.full((4,), 0.001)
    torch.testing.assert_close(energy_normalize(quiet), quiet / 0.01 * 0.999)
    # 1 s silence, 0.5 s tone, 1 s silence at 16 kHz
    t = torch.arange(8000) / 16000
    wav = torch.cat([torch.zeros(16000), 0.5 * torch.sin(2 * np.pi * 440 * t), torch.zeros(16000)])
    out = trim_silence(wav)
    # loud frames (hop 128, centred 512 frames) start 2 frames before the tone and end 2 after it
    start, end = 16000 - 256, 24000 + 256
    hops = int(np.ceil((end - start) / 240))
    assert out.numel() == hops * 240 + 4320
    torch.testing.assert_close(out[:200], wav[start - 800:start - 600])
    # all-zero audio: every frame is 0 dB below the (zero) peak, so librosa keeps it all
    silent = trim_silence(torch.zeros(5000))
    assert silent.numel() == int(np.ceil(5000 / 240)) * 240 + 4320 and silent.abs().max() == 0
