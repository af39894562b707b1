"""WAV files: read into float32 [channels, samples] in [-1, 1], write 16-bit PCM or float32."""
from __future__ import annotations

import struct

import numpy as np
import torch

from ..errors import AudioInputError

_PCM, _FLOAT, _EXTENSIBLE = 1, 3, 0xFFFE


def read_wav(path: str) -> tuple[np.ndarray, int]:
    """Read a RIFF/WAVE file (PCM 8/16/24/32-bit or IEEE float 32/64). Returns float32
    [channels, samples] in [-1, 1] and the sample rate. AudioInputError when the file is malformed."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise AudioInputError(f"{path}: cannot read: {exc}") from exc
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise AudioInputError(f"{path}: not a RIFF/WAVE file")
    pos, fmt, payload = 12, None, None
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        body = data[pos + 8:pos + 8 + size]
        if cid == b"fmt ":
            if len(body) < 16:
                raise AudioInputError(f"{path}: fmt chunk too short")
            fmt = struct.unpack("<HHIIHH", body[:16])
            if fmt[0] == _EXTENSIBLE and len(body) >= 26:
                fmt = (struct.unpack("<H", body[24:26])[0],) + fmt[1:]
        elif cid == b"data":
            payload = body
        pos += 8 + size + (size & 1)
    if fmt is None or payload is None:
        raise AudioInputError(f"{path}: missing fmt or data chunk")
    tag, channels, rate, _, block_align, bits = fmt
    if channels < 1 or bits % 8 or block_align != channels * bits // 8:
        raise AudioInputError(f"{path}: inconsistent fmt chunk (channels {channels}, bits {bits})")
    width = bits // 8
    usable = len(payload) - len(payload) % block_align
    raw = np.frombuffer(payload[:usable], dtype=np.uint8)
    if tag == _PCM and width == 1:
        x = (raw.astype(np.float32) - 128.0) / 128.0
    elif tag == _PCM and width == 2:
        x = raw.view("<i2").astype(np.float32) / 32768.0
    elif tag == _PCM and width == 3:
        b = raw.reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / float(1 << 23)
    elif tag == _PCM and width == 4:
        x = raw.view("<i4").astype(np.float32) / float(1 << 31)
    elif tag == _FLOAT and width in (4, 8):
        x = raw.view("<f4" if width == 4 else "<f8").astype(np.float32)
    else:
        raise AudioInputError(f"{path}: unsupported WAV encoding (format tag {tag}, {bits} bits)")
    return np.ascontiguousarray(x.reshape(-1, channels).T), int(rate)


def write_wav(path: str, audio, sample_rate: int, float32: bool = False) -> None:
    """Write mono [N] or [channels, N] audio in [-1, 1] as 16-bit PCM (or 32-bit float)."""
    a = audio.detach().cpu().numpy() if isinstance(audio, torch.Tensor) else np.asarray(audio)
    a = a.reshape(1, -1) if a.ndim == 1 else a
    channels = a.shape[0]
    if float32:
        body, tag, bits = a.T.astype("<f4").tobytes(), _FLOAT, 32
    else:
        body, tag, bits = (np.clip(a.T, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes(), _PCM, 16
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", tag, channels, int(sample_rate), int(sample_rate) * block, block, bits)
    with open(path, "wb") as f:
        f.write(b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(body)) + b"WAVE")
        f.write(b"fmt " + struct.pack("<I", len(fmt)) + fmt)
        f.write(b"data" + struct.pack("<I", len(body)) + body)
