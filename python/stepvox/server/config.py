"""What a server is told at start: limits, key, names (every value checked, ConfigError naming it)."""
from __future__ import annotations

import dataclasses

from stepvox.engine import checks
from stepvox.engine.errors import ConfigError

# OpenAI's speech model names, accepted as aliases of the served model so that clients written for
# OpenAI work unchanged
OPENAI_TTS_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts", "gpt-4o-mini-tts-2025-03-20",
                     "gpt-4o-mini-tts-2025-12-15")
OPENAI_CHAT_MODELS = ("gpt-4o-audio-preview", "gpt-4o-mini-audio-preview", "gpt-audio", "gpt-audio-mini")
OPENAI_TRANSCRIPTION_MODELS = ("whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe")


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    model_name: str = "step-audio-tts-3b"        # the id /v1/models lists and `model` may name
    chat_model_name: str = "step-audio-chat"     # the same for the chat model, when one is served
    asr_model_name: str = "step-audio-paraformer"   # and for the tokenizer's ASR (transcriptions)
    api_key: str | None = None                   # None: no authentication
    max_concurrent: int = 64                     # requests (speech, chat, transcription) running at once
    max_queue: int = 256                         # requests waiting for a slot; beyond: 429
    max_body_bytes: int = 16 << 20               # a 30 s 48 kHz stereo WAV in base64 is ~8 MiB
    retry_after_s: int = 1                       # Retry-After of a 429
    max_voice_uploads: int = 2                   # voice uploads decoded or processed at once; beyond: 429
    default_voice: str | None = None             # None: Tingting if the speakers folder has it, else the first
    realtime_idle_timeout_s: float = 300.0       # a /v1/realtime session without a client event this long ends
    realtime_max_session_s: float = 3600.0       # and any session after this long
    # chunk-deadline admission of speech (admission.py), 429 deadline_risk beyond; None: off
    max_streams: int | None = None               # real-time speech streams (streamed responses) held at once
    min_slack_ms: float | None = None            # refuse speech while a running stream's recent slack is below it

    def __post_init__(self):
        for name in ("model_name", "chat_model_name", "asr_model_name"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{name} must be a non-empty string, got {value!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ConfigError("api_key must be a non-empty string (or None for no authentication)")
        for name, lo in (("max_concurrent", 1), ("max_queue", 0), ("max_body_bytes", 1024), ("retry_after_s", 1),
                         ("max_voice_uploads", 1)):
            object.__setattr__(self, name, checks.integer(getattr(self, name), name, ConfigError, lo))
        for name in ("realtime_idle_timeout_s", "realtime_max_session_s"):
            object.__setattr__(self, name, checks.real(getattr(self, name), name, ConfigError, 0.0, lo_open=True))
        if self.max_streams is not None:
            object.__setattr__(self, "max_streams", checks.integer(self.max_streams, "max_streams", ConfigError, 1))
        if self.min_slack_ms is not None:
            object.__setattr__(self, "min_slack_ms", checks.real(self.min_slack_ms, "min_slack_ms", ConfigError, 0.0))

    @property
    def min_slack_s(self) -> float | None:
        return None if self.min_slack_ms is None else self.min_slack_ms / 1000
