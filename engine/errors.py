"""Every typed error stepvox raises on purpose, in one tree under StepvoxError. Each names what
was wrong so that a caller can act on it; the classes say who can fix it (the caller's request,
the model folder, an option) rather than which component noticed."""


class StepvoxError(Exception):
    """Base class of every error stepvox raises on purpose."""


# ---------------------------------------------------------------- model folders and options
class ConfigError(StepvoxError, ValueError):
    """A config file (config.json, cosyvoice.yaml, config.yaml) or an engine option is invalid."""


class CheckpointError(StepvoxError, ValueError):
    """A model folder is missing files, or its files cannot be read or do not match its config."""


class MissingTensorsError(CheckpointError):
    """The checkpoint lacks tensors the model needs (named in the message)."""


class UnexpectedTensorsError(CheckpointError):
    """The checkpoint holds tensors the model does not know (named in the message)."""


class TensorShapeError(CheckpointError):
    """A tensor's shape disagrees with the shape the config implies (both named in the message)."""


# ---------------------------------------------------------------- requests
class InvalidRequestError(StepvoxError, ValueError):
    """A request cannot be served as given (bad token ids, bad sampling parameters, ...)."""


class TurnStateError(InvalidRequestError):
    """A real-time session was asked for what its state does not allow (an answer while one runs, a
    commit of an empty buffer). `code` names the case in OpenAI's Realtime error codes."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


class PromptTooLongError(InvalidRequestError):
    """The prompt does not fit the model's context (max_model_len) or the whole KV cache."""


class AudioInputError(InvalidRequestError):
    """Audio that cannot be used as given: shape, dtype, values, sample rate, length, file format."""


class AudioTooShortError(AudioInputError):
    """The audio is valid but too short for what it is used for (one 120 ms token group, a prompt)."""


class AudioTooLongError(AudioInputError):
    """The audio is longer than the limit of what it is used for (a voice reference, a chat turn)."""


class SpeechTokenError(InvalidRequestError):
    """Speech tokens are empty, not integers, or outside the speech decoder's vocabulary."""


class SpeakerPromptError(InvalidRequestError):
    """A speaker prompt is inconsistent (prompt mel frames without prompt tokens, wrong sizes, ...)."""


class StreamClosedError(StepvoxError, RuntimeError):
    """A tokenizer or decoder stream was used after it was finished."""


# ---------------------------------------------------------------- the engine at run time
class RequestAbortedError(StepvoxError):
    """The request was cancelled before it finished."""


class KVCacheExhaustedError(StepvoxError):
    """A request needs more KV-cache pages than the whole cache holds."""


class EngineDeadError(StepvoxError, RuntimeError):
    """The engine loop failed; pending requests cannot complete."""


class WorkerFailedError(StepvoxError, RuntimeError):
    """A tensor-parallel worker died or raised; the message names its rank."""
