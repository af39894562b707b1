"""WAV file I/O (engine/frontend/wav.py): round trips, sox-written formats, malformed files."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest

from stepvox.engine.errors import AudioInputError
from stepvox.engine.frontend.wav import read_wav, write_wav


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
    for bits in (24, 8):
        out = tmp_path / f"b{bits}.wav"
        subprocess.run(["sox", str(tmp_path / "a.wav"), "-b", str(bits), str(out)], check=True, capture_output=True)
        z, _ = read_wav(str(out))
        np.testing.assert_allclose(z[0], x, atol=2.0 ** (1 - bits) + 1 / 32767 + (1e-2 if bits == 8 else 0))


def test_malformed_files(tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    with pytest.raises(AudioInputError):
        read_wav(str(tmp_path / "bad.wav"))
    (tmp_path / "txt.wav").write_text("hello")
    with pytest.raises(AudioInputError, match="RIFF"):
        read_wav(str(tmp_path / "txt.wav"))
    with pytest.raises(AudioInputError):
        read_wav(str(tmp_path / "missing.wav"))
