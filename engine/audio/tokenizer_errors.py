"""Typed errors of the audio tokenizer: bad audio in, bad checkpoint files on load."""
from __future__ import annotations

from ..errors import AudioInputError, CheckpointError, StepvoxError

__all__ = ["AudioInputError", "AudioTooShortError", "TokenizerCheckpointError", "StreamClosedError"]


class AudioTooShortError(AudioInputError):
    """The audio is valid but too short to yield a single 2+3 interleaved token group (~120 ms)."""


class TokenizerCheckpointError(CheckpointError):
    """A tokenizer file is missing, unreadable, or its tensors do not match the expected layout."""


class StreamClosedError(StepvoxError, RuntimeError):
    """Audio was fed to a tokenizer stream after it was finished."""
