"""Band-limited resampling (engine/frontend/resample.py): torchaudio's sinc filter where its bank
is small, libsoxr past `max_filter_taps`; offline and streaming alike; bounded memory at any ratio."""
from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torchaudio

from stepvox.engine.errors import AudioInputError, StreamClosedError
from stepvox.engine.frontend.resample import (MAX_FILTER_TAPS, StreamingResampler, output_length, resample,
                                              sinc_filter_taps)

ODD_RATES = [8001, 16001, 22051, 32001, 44101, 48001]


# ---------------------------------------------------------------- offline resample (speech decoder side:
# prompt mel at 22.05 kHz, CAM++ at 16 kHz; ported from test_speech_decoder_audio.py)
@pytest.mark.parametrize("orig,new", [(22050, 16000), (16000, 22050), (44100, 22050), (24000, 16000), (8000, 22050)])
def test_resample_matches_torchaudio(orig, new):
    x = torch.randn(2, 3000, generator=torch.Generator().manual_seed(orig)) * 0.1
    torch.testing.assert_close(resample(x, orig, new), torchaudio.transforms.Resample(orig, new)(x), atol=1e-6, rtol=1e-5)
    assert resample(x, orig, orig) is x


# ---------------------------------------------------------------- streaming resampler (audio tokenizer side:
# live input to 16 kHz; ported from test_audio_tokenizer.py)
def test_streaming_resampler_matches_offline():
    g = torch.Generator().manual_seed(0)
    x = 0.1 * torch.randn(44100, generator=g)
    rs = StreamingResampler(44100, 16000)
    pieces, i = [], 0
    for n in [1, 7, 1000, 5000, 13, 20000, 30000]:
        pieces.append(rs.push(x[i:i + n]))
        i += n
    pieces.append(rs.finish())
    torch.testing.assert_close(torch.cat(pieces), resample(x, 44100, 16000), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- which filter, and the bound on its size
def test_filter_choice_follows_the_tap_bound():
    for orig, new in [(22050, 16000), (44100, 16000), (48000, 22050), (16000, 22050), (8001, 22050)]:
        kernel = torchaudio.transforms.Resample(orig, new).kernel
        assert sinc_filter_taps(orig, new) == kernel.numel() <= MAX_FILTER_TAPS   # the official ratios stay sinc
    assert sinc_filter_taps(16001, 16000) == 16000 * (2 * 7 + 16001) > 256e6       # what torchaudio would build
    assert sinc_filter_taps(44101, 16000) > 700e6
    # forcing libsoxr (max_filter_taps=0) on the official ratio: the same band-limited signal
    t = torch.arange(22050 * 2, dtype=torch.float64) / 22050
    x = (0.5 * torch.sin(2 * math.pi * 1000 * t) + 0.3 * torch.sin(2 * math.pi * 3100 * t)).float()
    sinc, soxr_out = resample(x, 22050, 16000), resample(x, 22050, 16000, max_filter_taps=0)
    assert sinc.shape == soxr_out.shape == (32000,)
    assert (sinc - soxr_out)[800:-800].abs().max() < 2e-3


@pytest.mark.parametrize("orig", ODD_RATES)
@pytest.mark.parametrize("new", [16000, 22050])
def test_odd_rates_match_the_exact_signal(orig, new):
    """A sum of sines sampled at an odd rate, resampled, equals the same sines sampled at the new
    rate (float64 formula) away from the edges; offline and streamed give the same samples."""
    freqs, amps = [440.0, 1234.5, 3000.0], [0.4, 0.3, 0.2]

    def signal(rate, n):
        t = np.arange(n, dtype=np.float64) / rate
        return sum(a * np.sin(2 * np.pi * f * t) for f, a in zip(freqs, amps))

    n = 2 * orig + 17
    x = torch.from_numpy(signal(orig, n).astype(np.float32))
    y = resample(x, orig, new)
    assert y.shape == (math.ceil(n * new / orig),) == (output_length(n, orig, new),) and y.dtype == torch.float32
    edge = int(0.05 * new)
    # libsoxr is exact to float32 rounding; torchaudio's short Hann-windowed sinc (8001:22050 has a
    # small bank, so it stays on that path) ripples by ~0.5% at 3 kHz of a 4 kHz band
    atol = 2e-5 if sinc_filter_taps(orig, new) > MAX_FILTER_TAPS else 1e-2
    np.testing.assert_allclose(y[edge:-edge].numpy(), signal(new, y.numel())[edge:-edge], atol=atol)
    # the stream, fed in uneven pieces: the same samples, continuous across the pieces, same length
    rs = StreamingResampler(orig, new)
    rng = np.random.default_rng(orig + new)
    pieces, i = [], 0
    while i < n:
        k = int(rng.integers(1, 9000))
        pieces.append(rs.push(x[i:i + k]))
        i += k
    pieces.append(rs.finish())
    torch.testing.assert_close(torch.cat(pieces), y, atol=1e-6, rtol=0)
    # batched [..., N] input resamples each row
    two = resample(torch.stack([x, -x]), orig, new)
    torch.testing.assert_close(two, torch.stack([y, -y]), atol=1e-6, rtol=0)


def test_bad_rates_and_reuse():
    with pytest.raises(AudioInputError, match="rates must be >= 1 Hz"):
        resample(torch.zeros(10), 0, 16000)
    with pytest.raises(AudioInputError, match="rates must be >= 1 Hz"):
        StreamingResampler(16000, -1)
    with pytest.raises(AudioInputError, match="max_filter_taps must be an integer >= 0"):
        resample(torch.zeros(10), 16001, 16000, max_filter_taps=2.5)
    for orig in (16000, 22050, 16001):
        rs = StreamingResampler(orig, 16000)
        assert rs.push(torch.zeros(5)).numel() <= 5
        rs.finish()
        with pytest.raises(StreamClosedError):
            rs.push(torch.zeros(5))
        with pytest.raises(StreamClosedError):
            rs.finish()
    # a stream shorter than one filter block still gives ceil(n * new / orig) samples
    for orig in (22050, 44101):
        rs = StreamingResampler(orig, 16000)
        out = torch.cat([rs.push(torch.ones(3)), rs.finish()])
        assert out.numel() == math.ceil(3 * 16000 / orig) == resample(torch.ones(3), orig, 16000).numel()


# ---------------------------------------------------------------- bounded memory (a subprocess's peak RSS)
RSS_GROWTH_MB = 300          # over the subprocess's RSS after imports (~600 MB: torch)
RSS_PEAK_MB = 1536           # before: a 2 s clip at 16001 Hz reached 8.6 GB, 44101 Hz was killed


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_odd_rates_resample_within_a_memory_bound():
    script = textwrap.dedent(f"""
        import torch
        from stepvox.engine.frontend.resample import StreamingResampler, output_length, resample
        def peak_mb():
            # VmHWM, this process's own peak: ru_maxrss would carry over pytest's (Linux keeps the
            # parent's high-water mark across fork and exec)
            return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
        base = peak_mb()
        for orig in {ODD_RATES + [16003, 44099, 47999]}:
            for new in (16000, 22050):
                x = 0.1 * torch.randn(2 * orig)
                y = resample(x, orig, new)
                assert y.numel() == output_length(x.numel(), orig, new)
                rs = StreamingResampler(orig, new)
                z = torch.cat([rs.push(x[i:i + 4000]) for i in range(0, x.numel(), 4000)] + [rs.finish()])
                assert torch.equal(z, y) or float((z - y).abs().max()) < 1e-6
        print(base, peak_mb())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    base, peak = map(float, done.stdout.split())
    assert peak - base < RSS_GROWTH_MB and peak < RSS_PEAK_MB, (base, peak)
