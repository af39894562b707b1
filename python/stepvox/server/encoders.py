"""Audio encoders for streamed responses: float chunks in, the bytes of one growing file out.

What a client can play while the file is still arriving, per format:
- pcm: raw 16-bit little-endian mono samples, chunk by chunk.
- wav: a RIFF header whose RIFF and data sizes say 0xFFFFFFFF ("unknown, read to the end", as streamed
  WAV from OpenAI and ffmpeg is), then the PCM16 samples.
- mp3: MPEG frames as LAME makes them, constant bit rate. libsndfile rewrites the first frame (the
  Xing/Info tag) when the file is closed; a stream has sent it by then, so the rewrite is dropped
  and readers size the stream from its byte count, which is exact only for constant bit rate.
- opus: Ogg pages of at most ~50 ms of audio (libsndfile's default page latency is a second).
- flac: not streamable this way (the STREAMINFO block, which readers need, is only right once the
  file is closed): the whole file is sent once the audio is complete.

Resampling to another output rate is continuous across chunks (soxr's stream resampler), so chunk
boundaries leave no seams.
"""
from __future__ import annotations

import io
import struct

import numpy as np
import soundfile as sf
import soxr

from stepvox.engine.frontend.audio_formats import MEDIA_TYPES, encode_audio

_SFC_SET_OGG_PAGE_LATENCY_MS = 0x1302     # sndfile.h; soundfile has no wrapper for it
OPUS_PAGE_LATENCY_MS = 50.0
MP3_COMPRESSION_LEVEL = 0.5               # constant bit rate: ~80 kbit/s at 22.05 kHz mono


class _Resampler:
    """Continuous float32 resampling from the vocoder's rate to the output rate (identity when equal)."""

    def __init__(self, in_rate: int, out_rate: int):
        self._stream = None if in_rate == out_rate else soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32")

    def push(self, x: np.ndarray, last: bool = False) -> np.ndarray:
        if self._stream is None:
            return x
        return self._stream.resample_chunk(x, last=last)


def _pcm16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


class StreamEncoder:
    """Encodes one response. `push(samples)` and `finish()` return the bytes ready to send (maybe
    empty). `progressive`: bytes come out as audio goes in; `threaded`: the work is heavy enough to
    run off the event loop."""
    progressive = True
    threaded = False

    def __init__(self, format: str, native_rate: int, rate: int):
        self.format, self.native_rate, self.sample_rate = format, native_rate, rate
        self.media_type = MEDIA_TYPES[format]

    def push(self, samples: np.ndarray) -> bytes:
        raise NotImplementedError

    def finish(self) -> bytes:
        raise NotImplementedError


class PcmEncoder(StreamEncoder):
    def __init__(self, format: str, native_rate: int, rate: int):
        super().__init__(format, native_rate, rate)
        self._resampler = _Resampler(native_rate, rate)
        self.threaded = rate != native_rate

    def push(self, samples: np.ndarray) -> bytes:
        return _pcm16(self._resampler.push(samples))

    def finish(self) -> bytes:
        return _pcm16(self._resampler.push(np.zeros(0, np.float32), last=True))


class WavEncoder(PcmEncoder):
    def __init__(self, format: str, native_rate: int, rate: int):
        super().__init__(format, native_rate, rate)
        self._header = wav_header(rate)

    def _with_header(self, data: bytes) -> bytes:
        header, self._header = self._header, b""
        return header + data

    def push(self, samples: np.ndarray) -> bytes:
        return self._with_header(super().push(samples))

    def finish(self) -> bytes:
        return self._with_header(super().finish())


def wav_header(rate: int, data_bytes: int = 0xFFFFFFFF) -> bytes:
    """A 44-byte PCM16 mono WAV header; the default sizes mean "length unknown: read to the end"."""
    riff = 0xFFFFFFFF if data_bytes == 0xFFFFFFFF else 36 + data_bytes
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
            + b"data" + struct.pack("<I", data_bytes))


class _SentFile(io.RawIOBase):
    """A write-only file for libsndfile whose bytes are handed out as soon as written. A write over
    bytes already handed out (a header fixed up at close) is dropped: the reader has them."""

    def __init__(self):
        super().__init__()
        self._pending = bytearray()
        self._sent = 0            # bytes handed out
        self._pos = 0
        self._size = 0

    def readable(self):
        return True

    def writable(self):
        return True

    def seekable(self):
        return True

    def read(self, size=-1):     # libsndfile's writers do not read back what they wrote
        return b""

    def write(self, data) -> int:
        data = bytes(data)
        n = len(data)
        start = self._pos - self._sent          # where the write lands in the unsent bytes
        if start < 0:                           # over bytes already handed out: keep the unsent tail
            data, start = data[-start:] if -start < n else b"", 0
        if data:
            end = start + len(data)
            if end > len(self._pending):
                self._pending.extend(bytes(end - len(self._pending)))
            self._pending[start:end] = data
        self._pos += n
        self._size = max(self._size, self._pos)
        return n

    def seek(self, offset, whence=io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def take(self) -> bytes:
        out = bytes(self._pending)
        self._sent += len(out)
        self._pending.clear()
        return out


class SoundFileEncoder(StreamEncoder):
    """mp3 and opus through libsndfile, written as they go into a _SentFile."""
    threaded = True

    def __init__(self, format: str, native_rate: int, rate: int):
        super().__init__(format, native_rate, rate)
        self._resampler = _Resampler(native_rate, rate)
        self._out = _SentFile()
        if format == "mp3":
            self._file = sf.SoundFile(self._out, "w", rate, 1, format="MP3", subtype="MPEG_LAYER_III",
                                      compression_level=MP3_COMPRESSION_LEVEL, bitrate_mode="CONSTANT")
        else:
            self._file = sf.SoundFile(self._out, "w", rate, 1, format="OGG", subtype="OPUS")
            _set_page_latency(self._file, OPUS_PAGE_LATENCY_MS)

    def push(self, samples: np.ndarray) -> bytes:
        x = self._resampler.push(samples)
        if x.size:
            self._file.write(np.clip(x, -1.0, 1.0))
        return self._out.take()

    def finish(self) -> bytes:
        x = self._resampler.push(np.zeros(0, np.float32), last=True)
        if x.size:
            self._file.write(np.clip(x, -1.0, 1.0))
        self._file.close()
        return self._out.take()


def _set_page_latency(file: sf.SoundFile, ms: float) -> None:
    try:
        value = sf._ffi.new("double*", ms)
        sf._snd.sf_command(file._file, _SFC_SET_OGG_PAGE_LATENCY_MS, value, sf._ffi.sizeof("double"))
    except AttributeError:        # another soundfile build: pages stay at libsndfile's default latency
        pass


class WholeFileEncoder(StreamEncoder):
    """flac: collected, encoded once complete (see the module docstring)."""
    progressive = False
    threaded = True

    def __init__(self, format: str, native_rate: int, rate: int):
        super().__init__(format, native_rate, rate)
        self._chunks: list[np.ndarray] = []

    def push(self, samples: np.ndarray) -> bytes:
        self._chunks.append(samples)
        return b""

    def finish(self) -> bytes:
        if not self._chunks:         # no audio: an empty file, not resampled (the filter needs samples)
            return encode_audio(np.zeros(0, np.float32), self.sample_rate, self.format, self.sample_rate)
        return encode_audio(np.concatenate(self._chunks), self.native_rate, self.format, self.sample_rate)


_ENCODERS = {"pcm": PcmEncoder, "wav": WavEncoder, "mp3": SoundFileEncoder, "opus": SoundFileEncoder,
             "flac": WholeFileEncoder}


def make_encoder(format: str, native_rate: int, rate: int) -> StreamEncoder:
    return _ENCODERS[format](format, native_rate, rate)
