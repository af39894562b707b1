"""Request and response bodies. Field names are OpenAI's where OpenAI has the field (`model`,
`input`, `voice`, `instructions`, `response_format`, `speed`, `stream_format`; chat completions'
`messages`, `modalities`, `audio`, ...), stepvox's own otherwise; a field nobody knows is refused
(422 naming it) rather than ignored, so a typo is caught. Limits that depend on the loaded model
(text length, reference length, context) are checked by the routes and the engines."""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

from stepvox.engine.frontend.audio_formats import RATES
from stepvox.engine.pipelines.chat_messages import MAX_MESSAGES
from stepvox.engine.sampling_params import MAX_TOKENS

MAX_SEED = 2 ** 63 - 1
MAX_TAG_CHARS = 32
MAX_INSTRUCTIONS_CHARS = 1000
MAX_TOKENS_PER_SEGMENT = 8192


class VoiceId(BaseModel):
    """OpenAI's custom-voice form of `voice`: {"id": "name"}."""
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=64)


class SpeechRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # OpenAI's fields
    model: Optional[str] = Field(None, max_length=256, description="the served model's id (see /v1/models) or "
                                 "one of OpenAI's TTS model names; default: the served model")
    input: str = Field(min_length=1, description="the text to speak; tags such as (高兴1) may be written inline")
    voice: Optional[Union[str, VoiceId]] = Field(None, description="a built-in or registered voice; default: the "
                                                 "server's default voice")
    instructions: Optional[str] = Field(None, max_length=MAX_INSTRUCTIONS_CHARS,
                                        description="style words mapped to tags (see the README)")
    response_format: Literal["mp3", "opus", "flac", "wav", "pcm"] = "mp3"
    speed: float = Field(1.0, ge=0.5, le=2.0, description="tempo, pitch kept (speed_factor)")
    stream_format: Literal["audio", "sse"] = "audio"
    # stepvox's fields
    emotion: Optional[str] = Field(None, max_length=MAX_TAG_CHARS, description="高兴1 高兴2 生气1 生气2 悲伤1 撒娇1")
    language: Optional[str] = Field(None, max_length=MAX_TAG_CHARS, description="中文 英文 韩语 日语 四川话 粤语 广东话")
    speed_tag: Optional[str] = Field(None, max_length=MAX_TAG_CHARS, description="spoken speed: 慢速1 慢速2 快速1 快速2")
    mode: Literal["normal", "rap", "humming"] = "normal"
    volume: float = Field(1.0, ge=0.0, le=4.0)
    sample_rate: Optional[Literal[RATES]] = Field(None, description="output rate; default 22050 (pcm and opus "
                                                  "24000)")
    seed: Optional[StrictInt] = Field(None, ge=0, le=MAX_SEED)
    temperature: float = Field(0.7, ge=0.0, le=10000.0, description="0: greedy")
    top_k: StrictInt = Field(50, ge=1, le=100000)
    max_tokens: Optional[StrictInt] = Field(None, ge=1, le=MAX_TOKENS_PER_SEGMENT,
                                            description="LM tokens per sentence segment (default: by its length)")
    ref_audio: Optional[str] = Field(None, min_length=1, description="base64 audio file (wav, flac, ogg, mp3) of "
                                     "1-30 s for a one-off clone, with ref_text")
    ref_text: Optional[str] = Field(None, min_length=1, max_length=500, description="the words spoken in ref_audio")

    @field_validator("emotion", "language", "speed_tag")
    @classmethod
    def _one_tag_word(cls, value):
        if value is not None and (not value.strip() or any(c in value for c in "()（）")):
            raise ValueError("a tag is one word without parentheses")
        return value


class ChatAudio(BaseModel):
    """OpenAI's `audio` of a chat completion: the voice and format of the spoken answer."""
    model_config = ConfigDict(extra="forbid")
    voice: Optional[Union[str, VoiceId]] = Field(None, description="a built-in or registered voice; default: the "
                                                 "server's default voice")
    format: Literal["wav", "mp3", "flac", "opus", "pcm16"] = Field("wav", description="pcm16: raw 16-bit mono; "
                                                                   "every format is 24 kHz, as OpenAI's")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    include_obfuscation: Optional[bool] = None     # accepted; stepvox pads no chunks


# OpenAI fields a chat completion accepts with their neutral value only (anything else is a 400
# naming the field): stepvox has no tools, stop strings, penalties or log-probabilities
NEUTRAL_VALUES = {"n": (1,), "stop": (None, "", []), "frequency_penalty": (None, 0), "presence_penalty": (None, 0),
                  "logprobs": (None, False), "top_logprobs": (None, 0), "tools": (None, []),
                  "tool_choice": (None, "none", "auto"), "response_format": (None, {"type": "text"})}


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # OpenAI's fields
    model: Optional[str] = Field(None, max_length=256, description="the served chat model's id (see /v1/models) "
                                 "or one of OpenAI's audio chat model names; default: the served chat model")
    messages: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_MESSAGES,
                                           description="roles system (or developer) / user / assistant; content a "
                                           "string or text and input_audio parts")
    modalities: list[Literal["text", "audio"]] = Field(default_factory=lambda: ["text"], min_length=1,
                                                      description='["text", "audio"]: a spoken answer too')
    audio: Optional[ChatAudio] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0, description="default 0.7 (the official); 0: greedy")
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0, description="default 0.9 (the official)")
    max_tokens: Optional[StrictInt] = Field(None, ge=1, le=MAX_TOKENS, description="deprecated by OpenAI for "
                                            "max_completion_tokens; either caps the answer's tokens")
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1, le=MAX_TOKENS, description="default 2048 (the "
                                                       "official), and never past the model's context")
    seed: Optional[StrictInt] = Field(None, ge=0, le=MAX_SEED)
    n: StrictInt = 1
    stop: Any = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[StrictInt] = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Optional[bool] = None     # accepted: there are no tools
    response_format: Any = None
    user: Optional[str] = Field(None, max_length=256)          # accepted and ignored
    store: Optional[bool] = None                               # accepted; nothing is stored
    metadata: Optional[dict[str, str]] = None                  # accepted and ignored
    service_tier: Optional[str] = Field(None, max_length=32)   # accepted and ignored
    # stepvox's fields
    speech_max_tokens: Optional[StrictInt] = Field(None, ge=1, le=MAX_TOKENS_PER_SEGMENT, description="TTS LM "
                                                   "tokens per spoken sentence (default: by its length)")

    def unsupported(self) -> str | None:
        """The first field set to a value stepvox does not offer (see NEUTRAL_VALUES), or None."""
        for name, neutral in NEUTRAL_VALUES.items():
            if getattr(self, name) not in neutral:
                return name
        return None


class VoiceInfo(BaseModel):
    id: str
    object: Literal["voice"] = "voice"
    name: str
    type: Literal["builtin", "registered"]


class VoiceList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VoiceInfo]


class VoiceDeleted(BaseModel):
    id: str
    object: Literal["voice"] = "voice"
    deleted: bool = True


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "stepvox"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
