"""Audio files handed over as bytes (uploads, base64 fields): WAV, FLAC, Ogg and MP3 through
soundfile, and headerless 16-bit little-endian PCM at a stated rate.

Each file is refused from its header, before anything is decoded, when its rate or channel count
is outside the input policy (audio_input.py) or it is longer than the caller's limit, and channels
are averaged block by block as they are read: a short but wide file (655 kHz x 8 channels) never
decodes to gigabytes. The result is mono float32 samples and their rate; the tokenizers resample.
"""
from __future__ import annotations

import io

import numpy as np
import soundfile as sf

from ..errors import AudioInputError, AudioTooLongError
from .audio_input import MAX_CHANNELS, MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, check_sample_rate

READ_BLOCK_FRAMES = 65536     # frames decoded and mixed to mono at a time
LENGTH_SLACK_S = 0.5          # a container's stated length may round; callers check exact lengths
PCM_FORMATS = ("pcm16", "pcm")
FILE_FORMATS = ("wav", "flac", "mp3", "ogg", "opus")


def decode_audio_bytes(data: bytes, what: str, max_seconds: float, format: str | None = None,
                       pcm_rate: int | None = None) -> tuple[np.ndarray, int]:
    """(mono float32 samples, rate) of `data`. `format`: None or a file format (the container tells),
    or "pcm16" / "pcm" (raw little-endian 16-bit mono at `pcm_rate`). `what` names the input in
    errors. AudioInputError (AudioTooLongError past `max_seconds`) for anything unusable."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        raise AudioInputError(f"{what}: no audio data")
    fmt = None if format is None else str(format).lower()
    if fmt in PCM_FORMATS:
        return _decode_pcm16(bytes(data), what, max_seconds, pcm_rate)
    if fmt is not None and fmt not in FILE_FORMATS:
        raise AudioInputError(f"{what}: unknown audio format {format!r}; use one of "
                              f"{', '.join(FILE_FORMATS + PCM_FORMATS)}")
    limit_s = max_seconds + LENGTH_SLACK_S
    try:
        with sf.SoundFile(io.BytesIO(bytes(data))) as f:
            rate, frames, channels = f.samplerate, f.frames, f.channels
            if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
                try:
                    check_sample_rate(rate)          # its message says why
                except AudioInputError as exc:
                    raise AudioInputError(f"{what}: {exc}") from exc
            if not 1 <= channels <= MAX_CHANNELS:
                raise AudioInputError(f"{what}: {channels} channels; at most {MAX_CHANNELS}")
            if 0 < frames < 2 ** 62 and frames / rate > limit_s:
                raise AudioTooLongError(f"{what}: {frames / rate:.1f} s of audio; at most {max_seconds:g} s")
            max_frames = int(limit_s * rate) + 1    # a header may not tell the length: read at most this
            mono = np.empty(max_frames, dtype=np.float32)
            n = 0
            for block in f.blocks(blocksize=READ_BLOCK_FRAMES, dtype="float32", always_2d=True, frames=max_frames):
                mono[n:n + len(block)] = block.mean(axis=1)
                n += len(block)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise AudioInputError(f"{what}: not an audio file soundfile can read (WAV, FLAC, Ogg, MP3): {exc}") from exc
    if n == 0:
        raise AudioInputError(f"{what}: holds no audio frames")
    if n / rate > limit_s:
        raise AudioTooLongError(f"{what}: longer than {max_seconds:g} s")
    return mono[:n].copy(), rate


def _decode_pcm16(data: bytes, what: str, max_seconds: float, pcm_rate: int | None) -> tuple[np.ndarray, int]:
    if pcm_rate is None:
        raise AudioInputError(f"{what}: raw pcm16 has no header; its sample rate must be given")
    rate = check_sample_rate(pcm_rate)
    if len(data) % 2:
        raise AudioInputError(f"{what}: raw pcm16 of {len(data)} bytes is not a whole number of 16-bit samples")
    if len(data) / 2 / rate > max_seconds + LENGTH_SLACK_S:
        raise AudioTooLongError(f"{what}: {len(data) / 2 / rate:.1f} s of audio; at most {max_seconds:g} s")
    return (np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0), rate
