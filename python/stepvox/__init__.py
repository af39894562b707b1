"""stepvox: an inference engine for the Step-Audio speech-dialogue models."""
from stepvox.engine.async_engine import AsyncLLMEngine
from stepvox.engine.config import EngineConfig
from stepvox.engine.errors import (CheckpointError, ConfigError, EngineDeadError, InvalidRequestError,
                                   KVCacheExhaustedError, PromptTooLongError, RequestAbortedError, StepvoxError)
from stepvox.engine.outputs import CompletionOutput, RequestOutput
from stepvox.engine.sampling_params import SamplingParams

from .llm import LLM

__version__ = "0.1.0"

__all__ = [
    "LLM", "SamplingParams", "AsyncLLMEngine", "EngineConfig", "RequestOutput", "CompletionOutput",
    "StepvoxError", "CheckpointError", "ConfigError", "InvalidRequestError", "PromptTooLongError",
    "KVCacheExhaustedError", "RequestAbortedError", "EngineDeadError",
]
