"""Encoding audio for delivery: WAV, FLAC, MP3, Opus (in Ogg) through soundfile (libsndfile), and raw
16-bit little-endian PCM, at the output rates a speech service offers.

Rates: 16, 22.05 (the vocoder's own), 24, 44.1 and 48 kHz; Opus only codes 16, 24 and 48 kHz, and
when no rate is asked for, Opus is delivered at 24 kHz. Other rates are refused up front with an
AudioInputError that lists the supported ones, as are unknown formats.
"""
from __future__ import annotations

import io

import numpy as np
import soundfile as sf
import torch

from ..errors import AudioInputError
from .resample import resample

FORMATS = ("wav", "flac", "mp3", "opus", "pcm")
RATES = (16000, 22050, 24000, 44100, 48000)
OPUS_RATES = (16000, 24000, 48000)
# soundfile (format, subtype) per delivery format
_SOUNDFILE = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "mp3": ("MP3", "MPEG_LAYER_III"),
              "opus": ("OGG", "OPUS")}
MEDIA_TYPES = {"wav": "audio/wav", "flac": "audio/flac", "mp3": "audio/mpeg", "opus": "audio/ogg",
               "pcm": "audio/pcm"}


def check_format(format: str) -> str:
    fmt = str(format).lower()
    if fmt not in FORMATS:
        raise AudioInputError(f"unknown audio format {format!r}; use one of {', '.join(FORMATS)}")
    return fmt


def output_rate(format: str, sample_rate: int | None, native_rate: int) -> int:
    """The rate audio of `native_rate` is delivered at in `format` (`sample_rate` None: native,
    except Opus at 24 kHz)."""
    fmt = check_format(format)
    if sample_rate is None:
        return 24000 if fmt == "opus" and native_rate not in OPUS_RATES else native_rate
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate not in RATES:
        raise AudioInputError(f"output sample rate {sample_rate!r} is not offered; use one of {RATES}")
    if fmt == "opus" and sample_rate not in OPUS_RATES:
        raise AudioInputError(f"Opus codes {OPUS_RATES} Hz only, not {sample_rate}")
    return int(sample_rate)


def encode_audio(samples: np.ndarray, sample_rate: int, format: str = "wav", out_rate: int | None = None) -> bytes:
    """Mono float samples in [-1, 1] at `sample_rate` -> the bytes of a `format` file (or raw
    16-bit little-endian PCM for "pcm") at `out_rate` (see output_rate)."""
    fmt = check_format(format)
    rate = output_rate(fmt, out_rate, sample_rate)
    x = np.asarray(samples, dtype=np.float32).reshape(-1)
    if rate != sample_rate:
        x = resample(torch.from_numpy(x), sample_rate, rate).numpy()
    x = np.clip(x, -1.0, 1.0)
    if fmt == "pcm":
        return (x * 32767.0).round().astype("<i2").tobytes()
    container, subtype = _SOUNDFILE[fmt]
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=container, subtype=subtype)
    return buf.getvalue()
