"""Typed errors the engine raises. Each names what was wrong so that a caller can act on it."""


class StepvoxError(Exception):
    """Base class of every error stepvox raises on purpose."""


class CheckpointError(StepvoxError, ValueError):
    """A model folder is missing files, or its tensors do not match its config."""


class ConfigError(StepvoxError, ValueError):
    """A config file or an engine option is invalid."""


class InvalidRequestError(StepvoxError, ValueError):
    """A request cannot be served as given (bad token ids, bad sampling parameters, ...)."""


class PromptTooLongError(InvalidRequestError):
    """The prompt does not fit the model's context (max_model_len) or the whole KV cache."""


class RequestAbortedError(StepvoxError):
    """The request was cancelled before it finished."""


class EngineDeadError(StepvoxError, RuntimeError):
    """The engine loop failed; pending requests cannot complete."""


class KVCacheExhaustedError(StepvoxError):
    """A request needs more KV-cache pages than the whole cache holds."""


class AudioInputError(InvalidRequestError):
    """Audio that cannot be used as given: shape, dtype, values, sample rate, length."""
