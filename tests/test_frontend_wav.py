"""Audio file I/O (engine/frontend/wav.py, libsndfile): round trips, sox-written formats, malformed
files as AudioInputError naming the file and the problem."""
from __future__ import annotations

import struct
import subprocess

import numpy as np
import pytest
import soundfile

from stepvox.engine.errors import AudioInputError
from stepvox.engine.frontend.wav import read_wav, write_wav


def _wav_bytes(tag=1, channels=1, rate=16000, bits=16, block=None, data=b"\x00\x01" * 100, data_size=None):
    block = channels * bits // 8 if block is None else block
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, bits)
    size = len(data) if data_size is None else data_size
    return (b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
            + b"data" + struct.pack("<I", size) + data)


def test_wav_io_roundtrip_and_formats(tmp_path):
    x = (np.sin(np.linspace(0, 200, 4000)) * 0.5).astype(np.float32)
    write_wav(str(tmp_path / "a.wav"), x, 16000)
    y, sr = read_wav(str(tmp_path / "a.wav"))
    assert sr == 16000 and y.shape == (1, 4000) and y.dtype == np.float32
    np.testing.assert_allclose(y[0], x, atol=1 / 32767)
    # 16-bit samples are x * 32767 rounded, read back as k / 32768
    raw = np.frombuffer((tmp_path / "a.wav").read_bytes()[44:], dtype="<i2")
    np.testing.assert_array_equal(raw, np.round(x * 32767).astype(np.int16))
    write_wav(str(tmp_path / "f.wav"), np.stack([x, -x]), 24000, float32=True)
    y, sr = read_wav(str(tmp_path / "f.wav"))
    assert sr == 24000 and y.shape == (2, 4000) and np.array_equal(y[1], -x)
    # sox-written 24-bit and 8-bit WAV, FLAC and OGG read back close to the 16-bit original
    for name, args, atol in [("b24.wav", ["-b", "24"], 2.0 ** -23 + 1 / 32767), ("b8.wav", ["-b", "8"], 2 ** -7 + 2e-2),
                             ("c.flac", [], 1 / 32767), ("d.ogg", [], 0.1)]:
        out = tmp_path / name
        subprocess.run(["sox", str(tmp_path / "a.wav"), *args, str(out)], check=True, capture_output=True)
        z, zr = read_wav(str(out))
        assert zr == 16000 and z.shape == (1, 4000)
        np.testing.assert_allclose(z[0], x, atol=atol)


@pytest.mark.parametrize("name,content,message", [
    ("bits0.wav", _wav_bytes(bits=0, block=2), "0 bits per sample"),
    ("channels0.wav", _wav_bytes(channels=0, block=2), "0 channels"),
    ("rate0.wav", _wav_bytes(rate=0), "0 Hz"),
    ("tag.wav", _wav_bytes(tag=0x63), "format 0x63"),
    ("header.wav", _wav_bytes()[:30], "not readable as audio"),
    ("short.wav", _wav_bytes(data_size=100000), "truncated: its data chunk declares 100000 bytes, the file holds 200"),
    ("empty.wav", _wav_bytes(data=b""), "holds no audio frames"),
    ("junk.wav", b"RIFF\x00\x00\x00\x00WAVEjunk", "not readable as audio"),
    ("txt.wav", b"hello", "not readable as audio: Format not recognised"),
])
def test_malformed_files(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(AudioInputError, match=message) as info:
        read_wav(str(tmp_path / name))
    assert str(info.value).startswith(str(tmp_path / name))


def test_missing_long_and_streamed_files(tmp_path):
    with pytest.raises(AudioInputError, match="missing.wav: no such file"):
        read_wav(str(tmp_path / "missing.wav"))
    with pytest.raises(AudioInputError, match="not a regular file"):
        read_wav(str(tmp_path))
    # a length limit is checked from the header
    write_wav(str(tmp_path / "long.wav"), np.zeros(32000, np.float32), 16000)
    assert read_wav(str(tmp_path / "long.wav"), max_seconds=2.0)[0].shape == (1, 32000)
    with pytest.raises(AudioInputError, match="2.0 s of audio is longer than the limit of 1.5 s"):
        read_wav(str(tmp_path / "long.wav"), max_seconds=1.5)
    # a streaming writer's placeholder data size is not truncation
    (tmp_path / "piped.wav").write_bytes(_wav_bytes(data_size=0xFFFFFFFF))
    assert read_wav(str(tmp_path / "piped.wav"))[0].shape == (1, 100)


def test_a_capped_read_refuses_rates_and_channels_that_would_decode_to_gigabytes(tmp_path):
    wide = tmp_path / "wide.flac"           # 1 s of it decodes to 21 MB of float32; 30 s to 630 MB
    soundfile.write(str(wide), np.zeros((655350, 8), np.float32), 655350, format="FLAC")
    with pytest.raises(AudioInputError, match="655350 Hz x 8 channels"):
        read_wav(str(wide), max_seconds=30.0)
    many = tmp_path / "many.wav"
    soundfile.write(str(many), np.zeros((16000, 9), np.float32), 16000)
    with pytest.raises(AudioInputError, match="9 channels"):
        read_wav(str(many), max_seconds=30.0)
    assert read_wav(str(many))[0].shape == (9, 16000)     # uncapped reads stay as they were
