"""WAV I/O, validation and resampling for the speech decoder side, in numpy/torch only.

`resample` is the windowed-sinc resampler of torchaudio (`functional.resample` defaults: Hann
window, lowpass width 6, rolloff 0.99), which the official prompt preprocessing uses for its 16 kHz
(speaker embedding) and 22.05 kHz (prompt mel) copies of a prompt wav.
"""
from __future__ import annotations

import math
import struct
from functools import lru_cache

import numpy as np
import torch

from .decoder_errors import AudioError, SampleRateError

MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 192000
_PCM, _FLOAT, _EXTENSIBLE = 1, 3, 0xFFFE


# ----------------------------------------------------------------------------- WAV files
def read_wav(path: str) -> tuple[np.ndarray, int]:
    """Read a RIFF/WAVE file (PCM 8/16/24/32-bit or IEEE float 32/64). Returns float32
    [channels, samples] in [-1, 1] and the sample rate. AudioError when the file is malformed."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise AudioError(f"{path}: cannot read: {exc}") from exc
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise AudioError(f"{path}: not a RIFF/WAVE file")
    pos, fmt, payload = 12, None, None
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        body = data[pos + 8:pos + 8 + size]
        if cid == b"fmt ":
            if len(body) < 16:
                raise AudioError(f"{path}: fmt chunk too short")
            fmt = struct.unpack("<HHIIHH", body[:16])
            if fmt[0] == _EXTENSIBLE and len(body) >= 26:
                fmt = (struct.unpack("<H", body[24:26])[0],) + fmt[1:]
        elif cid == b"data":
            payload = body
        pos += 8 + size + (size & 1)
    if fmt is None or payload is None:
        raise AudioError(f"{path}: missing fmt or data chunk")
    tag, channels, rate, _, block_align, bits = fmt
    if channels < 1 or bits % 8 or block_align != channels * bits // 8:
        raise AudioError(f"{path}: inconsistent fmt chunk (channels {channels}, bits {bits})")
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
        raise AudioError(f"{path}: unsupported WAV encoding (format tag {tag}, {bits} bits)")
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


# ----------------------------------------------------------------------------- validation
def check_sample_rate(sample_rate) -> int:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) and not (
            isinstance(sample_rate, float) and sample_rate.is_integer()):
        raise SampleRateError(f"sample rate must be an integer, got {sample_rate!r}")
    sr = int(sample_rate)
    if not MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE:
        raise SampleRateError(f"sample rate {sr} Hz outside the supported {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz")
    return sr


def to_mono_float(wav, max_abs: float = 1.5) -> torch.Tensor:
    """[N] or [channels, N] array/tensor -> float32 mono [N] (channel mean, as the official
    preprocessing). Integer PCM is scaled by its full range. AudioError on empty, non-finite or
    clearly unnormalised audio (peak above `max_abs`, e.g. int16 values stored as floats)."""
    if isinstance(wav, np.ndarray):
        wav = torch.from_numpy(np.ascontiguousarray(wav))
    if not isinstance(wav, torch.Tensor):
        raise AudioError(f"audio must be a numpy array or torch tensor, got {type(wav).__name__}")
    if wav.dtype in (torch.int16, torch.int32, torch.int8, torch.uint8):
        full = {torch.int16: 32768.0, torch.int32: 2.0 ** 31, torch.int8: 128.0, torch.uint8: 128.0}[wav.dtype]
        wav = (wav.float() - (128.0 if wav.dtype == torch.uint8 else 0.0)) / full
    elif not wav.is_floating_point():
        raise AudioError(f"audio dtype {wav.dtype} is not supported")
    if wav.dim() == 2:
        if wav.shape[0] > 16 and wav.shape[1] <= 16:
            raise AudioError(f"audio of shape {list(wav.shape)} looks like [samples, channels]; "
                             "pass [channels, samples]")
        wav = wav.float().mean(dim=0)
    elif wav.dim() != 1:
        raise AudioError(f"audio must be [samples] or [channels, samples], got shape {list(wav.shape)}")
    wav = wav.float()
    if wav.numel() == 0:
        raise AudioError("audio is empty")
    if not torch.isfinite(wav).all():
        raise AudioError("audio contains NaN or infinite samples")
    peak = wav.abs().max().item()
    if peak > max_abs:
        raise AudioError(f"audio peak {peak:.3g} exceeds {max_abs}: pass float samples in [-1, 1]")
    return wav


# ----------------------------------------------------------------------------- resampling
@lru_cache(maxsize=16)
def _sinc_kernel(orig: int, new: int, width_lp: int = 6, rolloff: float = 0.99) -> tuple[torch.Tensor, int]:
    base = min(orig, new) * rolloff
    width = math.ceil(width_lp * orig / base)
    idx = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig
    # the output phase is computed in float32 and the input offsets in float64, as torchaudio does
    t = torch.arange(0, -new, -1)[:, None, None] / new + idx
    t = (t * base).clamp(-width_lp, width_lp)
    window = torch.cos(t * math.pi / width_lp / 2) ** 2
    t = t * math.pi
    kernel = torch.where(t == 0, torch.ones_like(t), t.sin() / t) * window * (base / orig)
    return kernel.float(), width


def resample(wav: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """Band-limited resampling of [..., N] float audio; identity when the rates match."""
    orig_rate, new_rate = int(orig_rate), int(new_rate)
    if orig_rate == new_rate:
        return wav
    g = math.gcd(orig_rate, new_rate)
    orig, new = orig_rate // g, new_rate // g
    kernel, width = _sinc_kernel(orig, new)
    shape = wav.shape
    x = wav.reshape(-1, shape[-1]).float()
    length = x.shape[-1]
    x = torch.nn.functional.pad(x, (width, width + orig))
    y = torch.nn.functional.conv1d(x[:, None], kernel.to(x.device), stride=orig)
    y = y.transpose(1, 2).reshape(x.shape[0], -1)
    target = math.ceil(new * length / orig)
    return y[..., :target].reshape(shape[:-1] + (-1,))
