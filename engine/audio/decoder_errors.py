"""Typed errors of the speech decoder (flow + HiFT token2wav): every bad input has its own class.

All derive from SpeechDecoderError (a ValueError), so callers can catch the family or one case.
"""
from __future__ import annotations

from .. import errors as engine_errors


class SpeechDecoderError(engine_errors.StepvoxError, ValueError):
    """Base class: the speech decoder cannot proceed with what it was given."""


class DecoderConfigError(SpeechDecoderError, engine_errors.ConfigError):
    """cosyvoice.yaml is missing, not valid YAML, or describes a model this engine does not run."""


class DecoderCheckpointError(SpeechDecoderError, engine_errors.CheckpointError):
    """flow.pt / hift.pt / campplus.onnx is missing, unreadable, or does not match the config."""


class MissingTensorsError(DecoderCheckpointError):
    """The checkpoint lacks tensors the config requires (named in the message)."""


class UnexpectedTensorsError(DecoderCheckpointError):
    """The checkpoint holds tensors the config does not know (named in the message)."""


class TensorShapeError(DecoderCheckpointError):
    """A tensor's shape disagrees with the shape the config implies (both named in the message)."""


class AudioError(SpeechDecoderError, engine_errors.AudioInputError):
    """Audio is malformed: wrong rank, empty, too short, not finite, or not a readable WAV file."""


class SampleRateError(AudioError):
    """The sample rate is not an integer in the supported range."""


class TokenError(SpeechDecoderError):
    """Speech tokens are empty, not integers, or outside the flow vocabulary."""


class PromptError(SpeechDecoderError):
    """A speaker prompt is inconsistent (for instance prompt mel frames without prompt tokens)."""


class StreamStateError(SpeechDecoderError):
    """A decoder stream was used after it was finished."""
