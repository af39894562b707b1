"""Request and response bodies. Field names are OpenAI's where OpenAI has the field (`model`,
`input`, `voice`, `instructions`, `response_format`, `speed`, `stream_format`), stepvox's own
otherwise; a field nobody knows is refused (422 naming it) rather than ignored, so a typo is caught.
Limits that depend on the loaded model (text length, reference length) are checked by the routes."""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

from stepvox.engine.frontend.audio_formats import RATES

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
