"""Audio a pipeline returns: mono float32 samples with their rate, saved or encoded on request."""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from ..errors import AudioInputError
from ..frontend.audio_formats import FORMATS, encode_audio


@dataclasses.dataclass
class Audio:
    samples: np.ndarray          # float32 [N] in [-1, 1]
    sample_rate: int

    @property
    def duration(self) -> float:
        return self.samples.size / self.sample_rate

    def to_bytes(self, format: str = "wav", sample_rate: int | None = None) -> bytes:
        """The audio as a `format` file (wav | flac | mp3 | opus | pcm: raw 16-bit little endian),
        at `sample_rate` (16000, 22050, 24000, 44100, 48000; default: its own, Opus 24 kHz)."""
        return encode_audio(self.samples, self.sample_rate, format, sample_rate)

    def save(self, path: str | os.PathLike, format: str | None = None, sample_rate: int | None = None) -> str:
        """Write the audio to `path`, in `format` (default: from the file's extension; .ogg is Opus)."""
        path = os.fspath(path)
        if format is None:
            ext = os.path.splitext(path)[1].lower().lstrip(".")
            format = {"ogg": "opus", "raw": "pcm"}.get(ext, ext)
            if format not in FORMATS:
                raise AudioInputError(f"{path}: cannot tell the format from the extension; pass format= "
                                      f"({', '.join(FORMATS)})")
        data = self.to_bytes(format, sample_rate)
        with open(path, "wb") as f:
            f.write(data)
        return path

    @staticmethod
    def concatenate(chunks: list["Audio"], sample_rate: int) -> "Audio":
        parts = [c.samples for c in chunks if c.samples.size]
        return Audio(np.concatenate(parts) if parts else np.zeros(0, np.float32), sample_rate)
