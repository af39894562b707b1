"""Audio files through libsndfile (python-soundfile): read WAV / FLAC / OGG (whatever libsndfile
opens) into float32 [channels, samples] in [-1, 1]; write 16-bit PCM or float32 WAV. Every file
libsndfile refuses, a truncated data chunk and an empty file are an AudioInputError naming the
file and the problem."""
from __future__ import annotations

import os
import re
import struct

import numpy as np
import soundfile
import torch

from ..errors import AudioInputError
from .audio_input import MAX_CHANNELS, MAX_SAMPLE_RATE

# libsndfile's log line for a WAV data chunk that claims more bytes than the file holds
_TRUNCATED = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
# sizes that streaming writers put in the header before the length is known: not truncation
_STREAMED_SIZES = (0, 0xFFFFFFFF, 0x7FFFFFFF)


def _wav_fmt(path: str) -> str:
    """The fields of a RIFF/WAVE file's fmt chunk as text, or "" (to say why libsndfile refused it)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return ""
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return ""
    pos = 12
    while pos + 8 <= len(head):
        cid, size = head[pos:pos + 4], struct.unpack("<I", head[pos + 4:pos + 8])[0]
        if cid == b"fmt " and pos + 24 <= len(head):
            tag, channels, rate, _, block, bits = struct.unpack("<HHIIHH", head[pos + 8:pos + 24])
            return (f" (fmt chunk: format 0x{tag:x}, {channels} channels, {rate} Hz, {bits} bits per sample, "
                    f"block align {block})")
        pos += 8 + size + (size & 1)
    return ""


def _open_error(path: str, exc: Exception) -> AudioInputError:
    reason = str(exc).split(": ", 1)[-1] if str(exc).startswith("Error opening") else str(exc)
    return AudioInputError(f"{path}: not readable as audio: {reason}{_wav_fmt(path)}")


def read_wav(path: str, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Read an audio file (WAV PCM 8/16/24/32-bit or float, FLAC, OGG, ...). Returns float32
    [channels, samples] in [-1, 1] and the sample rate. With `max_seconds`, a longer file is
    refused from its header, before its samples are read, and so is one whose rate or channel count
    exceeds the input policy's (MAX_SAMPLE_RATE, MAX_CHANNELS): those would make a file of capped
    length decode to gigabytes. AudioInputError when the file cannot be used."""
    if not os.path.isfile(path):
        raise AudioInputError(f"{path}: {'not a regular file' if os.path.exists(path) else 'no such file'}")
    try:
        info = soundfile.info(path)
    except (soundfile.SoundFileError, OSError, ValueError, TypeError) as exc:
        raise _open_error(path, exc) from exc
    truncated = _TRUNCATED.search(info.extra_info or "")
    if truncated and int(truncated.group(1)) not in _STREAMED_SIZES:
        raise AudioInputError(f"{path}: truncated: its data chunk declares {truncated.group(1)} bytes, "
                              f"the file holds {truncated.group(2)}")
    if info.frames <= 0:
        raise AudioInputError(f"{path}: holds no audio frames")
    if max_seconds is not None and info.frames > max_seconds * info.samplerate:
        raise AudioInputError(f"{path}: {info.frames / info.samplerate:.1f} s of audio is longer than the "
                              f"limit of {max_seconds:g} s")
    if max_seconds is not None and (info.samplerate > MAX_SAMPLE_RATE or info.channels > MAX_CHANNELS):
        raise AudioInputError(f"{path}: {info.samplerate} Hz x {info.channels} channels; at most "
                              f"{MAX_SAMPLE_RATE} Hz and {MAX_CHANNELS} channels")
    try:
        data, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except (soundfile.SoundFileError, OSError, ValueError, TypeError) as exc:
        raise _open_error(path, exc) from exc
    if data.shape[0] == 0:
        raise AudioInputError(f"{path}: holds no audio frames")
    return np.ascontiguousarray(data.T), int(rate)


def write_wav(path: str, audio, sample_rate: int, float32: bool = False) -> None:
    """Write mono [N] or [channels, N] audio in [-1, 1] as 16-bit PCM (or 32-bit float) WAV."""
    a = audio.detach().cpu().numpy() if isinstance(audio, torch.Tensor) else np.asarray(audio)
    a = a.reshape(1, -1) if a.ndim == 1 else a
    if float32:
        frames, subtype = a.T.astype(np.float32), "FLOAT"
    else:
        # the scaling and rounding are ours (x * 32767, clipped), not libsndfile's, so files stay bit-identical
        frames, subtype = (np.clip(a.T, -1.0, 1.0) * 32767.0).round().astype(np.int16), "PCM_16"
    try:
        soundfile.write(path, frames, int(sample_rate), subtype=subtype, format="WAV")
    except soundfile.SoundFileError as exc:
        raise OSError(f"{path}: cannot write: {exc}") from exc
