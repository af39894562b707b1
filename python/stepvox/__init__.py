"""stepvox: an inference engine for the Step-Audio speech-dialogue models."""
from stepvox.engine.async_engine import AsyncLLMEngine
from stepvox.engine.audio.decoder_errors import SpeechDecoderError
from stepvox.engine.audio.tokenizer_errors import AudioTooShortError, TokenizerCheckpointError
from stepvox.engine.audio_tokenizer import AudioTokenizer
from stepvox.engine.config import EngineConfig
from stepvox.engine.errors import (AudioInputError, CheckpointError, ConfigError, EngineDeadError,
                                   InvalidRequestError, KVCacheExhaustedError, PromptTooLongError,
                                   RequestAbortedError, StepvoxError)
from stepvox.engine.outputs import CompletionOutput, RequestOutput
from stepvox.engine.sampling_params import SamplingParams
from stepvox.engine.speech_decoder import SpeakerPrompt, SpeechDecoder
from stepvox.engine.speech_decoder_stream import StreamConfig

from .llm import LLM

__version__ = "0.1.0"

__all__ = [
    "LLM", "SamplingParams", "AsyncLLMEngine", "EngineConfig", "RequestOutput", "CompletionOutput",
    "SpeechDecoder", "SpeakerPrompt", "StreamConfig", "AudioTokenizer",
    "AudioInputError", "AudioTooShortError", "SpeechDecoderError", "TokenizerCheckpointError",
    "StepvoxError", "CheckpointError", "ConfigError", "InvalidRequestError", "PromptTooLongError",
    "KVCacheExhaustedError", "RequestAbortedError", "EngineDeadError",
]
