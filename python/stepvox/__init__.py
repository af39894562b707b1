"""stepvox: an inference engine for the Step-Audio speech-dialogue models."""
from stepvox.engine.async_engine import AsyncLLMEngine
from stepvox.engine.audio.decoder import SpeakerPrompt, SpeechDecoder
from stepvox.engine.audio.decoder_stream import StreamConfig
from stepvox.engine.audio.tokenizer import AudioTokenizer
from stepvox.engine.config import EngineConfig
from stepvox.engine.errors import (AudioInputError, AudioTooLongError, AudioTooShortError, CheckpointError, ConfigError, EngineDeadError,
                                   InvalidRequestError, KVCacheExhaustedError, MissingTensorsError,
                                   PromptTooLongError, RequestAbortedError, SpeakerPromptError, SpeechTokenError,
                                   StepvoxError, StreamClosedError, TensorShapeError, UnexpectedTensorsError,
                                   WorkerFailedError)
from stepvox.engine.outputs import CompletionOutput, RequestOutput
from stepvox.engine.pipelines.audio import Audio
from stepvox.engine.pipelines.tts import TTS
from stepvox.engine.pipelines.voice_chat import (AudioDelta, Conversation, ResponseDone, TextDelta, Usage,
                                                 VoiceChat)
from stepvox.engine.pipelines.voices import UnknownVoiceError, VoiceExistsError, VoiceRef
from stepvox.engine.sampling_params import SamplingParams
from stepvox.kernels import KernelConfig

from .llm import LLM

__version__ = "0.1.0"

__all__ = [
    "LLM", "SamplingParams", "AsyncLLMEngine", "EngineConfig", "KernelConfig", "RequestOutput", "CompletionOutput",
    "TTS", "Audio", "VoiceRef", "VoiceChat", "Conversation", "TextDelta", "AudioDelta", "ResponseDone", "Usage",
    "SpeechDecoder", "SpeakerPrompt", "StreamConfig", "AudioTokenizer",
    "StepvoxError", "ConfigError", "CheckpointError", "MissingTensorsError", "UnexpectedTensorsError",
    "TensorShapeError", "InvalidRequestError", "PromptTooLongError", "AudioInputError", "AudioTooShortError",
    "AudioTooLongError",
    "SpeechTokenError", "SpeakerPromptError", "StreamClosedError", "RequestAbortedError", "KVCacheExhaustedError",
    "EngineDeadError", "WorkerFailedError", "UnknownVoiceError", "VoiceExistsError",
]
