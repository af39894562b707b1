"""Decoder-side audio front ends: prompt mel, Kaldi fbank, resampling, WAV I/O."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fixtures_cosyvoice import speech_wav  # noqa: F401 - fixture
from stepvox.engine.audio.decoder_errors import AudioError, SampleRateError
from stepvox.engine.audio.io import check_sample_rate, read_wav, resample, to_mono_float, write_wav
from stepvox.engine.audio.kaldi_fbank import campplus_features, kaldi_fbank
from stepvox.engine.audio.mel import mel_spectrogram, slaney_mel_filterbank
from stepvox.engine.cosyvoice_config import MelConfig

torchaudio = pytest.importorskip("torchaudio")


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


def test_kaldi_fbank_matches_torchaudio(speech_wav):
    wav, sr = read_wav(speech_wav)
    x = resample(torch.from_numpy(wav[0]), sr, 16000)
    mine = kaldi_fbank(x)
    theirs = torchaudio.compliance.kaldi.fbank(x[None], num_mel_bins=80, dither=0, sample_frequency=16000)
    torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-5)
    feats = campplus_features(x)
    torch.testing.assert_close(feats.mean(0), torch.zeros(80), atol=1e-4, rtol=0)


@pytest.mark.parametrize("orig,new", [(22050, 16000), (16000, 22050), (44100, 22050), (24000, 16000), (8000, 22050)])
def test_resample_matches_torchaudio(orig, new):
    x = torch.randn(2, 3000, generator=torch.Generator().manual_seed(orig)) * 0.1
    torch.testing.assert_close(resample(x, orig, new), torchaudio.transforms.Resample(orig, new)(x), atol=1e-6, rtol=1e-5)
    assert resample(x, orig, orig) is x


def test_wav_io_roundtrip_and_formats(tmp_path):
    x = (np.sin(np.linspace(0, 200, 4000)) * 0.5).astype(np.float32)
    write_wav(str(tmp_path / "a.wav"), x, 16000)
    y, sr = read_wav(str(tmp_path / "a.wav"))
    assert sr == 16000 and y.shape == (1, 4000)
    np.testing.assert_allclose(y[0], x, atol=1 / 32767)
    write_wav(str(tmp_path / "f.wav"), np.stack([x, -x]), 24000, float32=True)
    y, sr = read_wav(str(tmp_path / "f.wav"))
    assert sr == 24000 and y.shape == (2, 4000) and np.array_equal(y[1], -x)
    # sox-written 24-bit and 8-bit files read back close to the 16-bit original
    import subprocess
    for bits in (24, 8):
        out = tmp_path / f"b{bits}.wav"
        subprocess.run(["sox", str(tmp_path / "a.wav"), "-b", str(bits), str(out)], check=True, capture_output=True)
        z, _ = read_wav(str(out))
        np.testing.assert_allclose(z[0], x, atol=2.0 ** (1 - bits) + 1 / 32767 + (1e-2 if bits == 8 else 0))


def test_malformed_audio(tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    with pytest.raises(AudioError):
        read_wav(str(tmp_path / "bad.wav"))
    (tmp_path / "txt.wav").write_text("hello")
    with pytest.raises(AudioError, match="RIFF"):
        read_wav(str(tmp_path / "txt.wav"))
    with pytest.raises(AudioError):
        read_wav(str(tmp_path / "missing.wav"))
    with pytest.raises(AudioError, match="empty"):
        to_mono_float(np.zeros(0, np.float32))
    with pytest.raises(AudioError, match="NaN"):
        to_mono_float(torch.tensor([0.1, float("nan")]))
    with pytest.raises(AudioError, match="peak"):
        to_mono_float(np.array([0.0, 1200.0], np.float32))
    with pytest.raises(AudioError, match="samples, channels"):
        to_mono_float(np.zeros((1000, 2), np.float32))
    with pytest.raises(AudioError):
        to_mono_float(np.zeros((2, 2, 2), np.float32))
    torch.testing.assert_close(to_mono_float(np.array([16384, -32768], np.int16)), torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(to_mono_float(torch.tensor([[0.2, 0.4], [0.0, 0.0]])), torch.tensor([0.1, 0.2]))
    for bad in (0, 7999, 250000, 16000.5, "16k", True):
        with pytest.raises(SampleRateError):
            check_sample_rate(bad)
    assert check_sample_rate(16000.0) == 16000
