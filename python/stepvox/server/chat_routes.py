"""The voice-chat routes, served when the server holds a VoiceChat (`stepvox serve --chat`; without
it both answer 404 saying so): POST /v1/chat/completions (answered by chat.py) and POST
/v1/audio/transcriptions (transcription.py). As the speech route, each checks what it can before
any model work (fields, the model, the voice, the queue), and decodes audio off the event loop once
the request has its place in the queue. Messages are parsed by the voice chat's own parser, which
never reads a file path here."""
from __future__ import annotations

import asyncio
import re
import time
from typing import Literal, Optional

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import Response

from stepvox.engine.errors import AudioInputError, AudioTooLongError, InvalidRequestError
from stepvox.engine.pipelines.chat_messages import Message, parse_messages

from .chat import ChatJob, ChatPlan
from .config import OPENAI_CHAT_MODELS, OPENAI_TRANSCRIPTION_MODELS
from .errors import ApiError, from_exception, request_id_of
from .routes import read_audio, server_state
from .schemas import ChatAudio, ChatRequest, VoiceId
from .streaming import StreamedResponse
from .transcription import RESPONSE_FORMATS, transcribe, transcription_response

router = APIRouter()
# the start of a parser message that names a place in the request: messages[0].content[1].input_audio
_PLACE = re.compile(r"messages(\[\d+\])?(\.\w+|\[\d+\])*")


def voice_chat_of(request: Request):
    """The server's VoiceChat. A dependency: it runs before the body is checked, so that a server
    without one answers 404 to whatever is sent."""
    chat = server_state(request).chat
    if chat is None:
        raise ApiError(404, f"this server was started without --chat: {request.url.path} needs a chat model "
                       "(stepvox serve --chat DIR)", code="model_not_found")
    return chat


# ---------------------------------------------------------------- chat completions
@router.post("/v1/chat/completions", response_class=Response,
             responses={200: {"content": {"application/json": {}, "text/event-stream": {}}}})
async def create_chat_completion(body: ChatRequest, request: Request, chat=Depends(voice_chat_of)):
    arrival = time.monotonic()
    state = server_state(request)
    config = state.config
    if body.model is not None and body.model not in (config.chat_model_name, *OPENAI_CHAT_MODELS):
        raise ApiError(404, f"model {body.model!r} is not served here; this server's chat model is "
                       f"{config.chat_model_name!r} (see /v1/models)", param="model", code="model_not_found")
    unsupported = body.unsupported()
    if unsupported is not None:
        raise ApiError(400, f"{unsupported} = {getattr(body, unsupported)!r} is not supported: this server answers "
                       "with one choice, without tools, stop strings, penalties or log-probabilities; leave the "
                       "field out", param=unsupported, code="unsupported_value")
    audio = "audio" in body.modalities
    spec = body.audio or ChatAudio()
    voice = (spec.voice.id if isinstance(spec.voice, VoiceId) else spec.voice) or state.default_voice
    if audio:
        if voice is None:
            raise ApiError(422, "audio.voice: no voice given and the server has no default voice",
                           param="audio.voice", code="invalid_value")
        if voice not in chat.tts.voices():
            raise ApiError(404, f"unknown voice {voice!r}; known voices: {chat.tts.voices()}", param="audio.voice",
                           code="voice_not_found")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    sampling = {k: v for k, v in dict(temperature=body.temperature, top_p=body.top_p, max_tokens=max_tokens,
                                      seed=body.seed).items() if v is not None}
    speech = {k: v for k, v in dict(tts_max_tokens=body.speech_max_tokens, tts_seed=body.seed).items()
              if v is not None}

    ticket = state.admission.reserve()          # 429 here, before any work
    try:
        messages = await asyncio.to_thread(_parse_messages, body.messages, chat.max_audio_seconds)
        plan = ChatPlan(messages, config.chat_model_name, audio, voice or "", spec.format, body.stream,
                        bool(body.stream_options and body.stream_options.include_usage), sampling, speech)
        job = ChatJob(chat, plan, request_id_of(request), state.metrics, arrival)
    except BaseException:
        ticket.release()
        raise
    return StreamedResponse(job, ticket, {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}, state.metrics)


def _parse_messages(messages: list[dict], max_audio_seconds: float) -> list[Message]:
    """The voice chat's messages (audio decoded), or a 400 naming the place in the request."""
    # OpenAI's newer clients send the system prompt as "developer"
    messages = [dict(m, role="system") if m.get("role") == "developer" else m for m in messages]
    try:
        return parse_messages(messages, allow_paths=False, max_audio_seconds=max_audio_seconds)
    except (InvalidRequestError, AudioInputError) as exc:
        place = _PLACE.match(str(exc))
        code = ("audio_too_long" if isinstance(exc, AudioTooLongError)
                else "invalid_audio" if isinstance(exc, AudioInputError) else "invalid_value")
        raise ApiError(400, str(exc), param=place.group(0) if place else "messages", code=code) from exc


# ---------------------------------------------------------------- transcriptions
@router.post("/v1/audio/transcriptions", response_class=Response,
             responses={200: {"content": {"application/json": {}, "text/plain": {}}}})
async def create_transcription(request: Request, chat=Depends(voice_chat_of),
                               file: UploadFile = File(description="speech: WAV, FLAC, Ogg or MP3, up to the voice chat's max_audio_seconds (120 s)"),
                               model: str = Form(max_length=256),
                               response_format: Literal[RESPONSE_FORMATS] = Form("json"),
                               language: Optional[str] = Form(None, max_length=64, description="echoed; the "
                                                              "model finds the language itself"),
                               prompt: Optional[str] = Form(None, description="accepted and not used"),
                               temperature: Optional[float] = Form(None, ge=0.0, le=1.0, description="accepted; "
                                                                   "decoding is greedy"),
                               stream: bool = Form(False)):
    state = server_state(request)
    config = state.config
    if chat.transcriber is None:
        raise ApiError(404, "this server was started with --no-asr: /v1/audio/transcriptions needs the tokenizer's "
                       "ASR", code="model_not_found")
    if model not in (config.asr_model_name, config.chat_model_name, *OPENAI_TRANSCRIPTION_MODELS):
        raise ApiError(404, f"model {model!r} is not served here; transcriptions take {config.asr_model_name!r} "
                       "(see /v1/models) or one of OpenAI's transcription model names", param="model",
                       code="model_not_found")
    if stream:
        raise ApiError(400, "stream = true is not supported: the transcription comes whole", param="stream",
                       code="unsupported_value")
    ticket = state.admission.reserve()          # 429 here, before any work
    outcome = "error"
    try:
        data = await file.read()
        samples, rate = await asyncio.to_thread(read_audio, data, "file", chat.max_audio_seconds)
        del data
        await ticket.acquire()
        try:
            result = await transcribe(chat, samples, rate)
        except Exception as exc:    # noqa: BLE001 - mapped to its status (audio errors name the upload)
            raise from_exception(exc, request_id_of(request), audio_param="file") from exc
        response = transcription_response(result, response_format, samples.size / rate, language)
        outcome = "ok"
        return response
    finally:
        ticket.release()
        state.metrics.transcriptions.labels(response_format, outcome).inc()
