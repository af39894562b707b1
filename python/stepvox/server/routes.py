"""The routes: speech, voices, models, health, metrics, and the browser page (GET /) (chat completions
and transcriptions: chat_routes.py). Each checks what it can before any model work (fields, limits,
the voice, the queue), so that a bad request costs nothing; model work and disk or decoding work
never run on the event loop."""
from __future__ import annotations

import asyncio
import base64
import binascii
import pathlib
import time
import urllib.parse

import numpy as np
from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response

from stepvox.engine.errors import AudioInputError, AudioTooLongError, InvalidRequestError
from stepvox.engine.frontend.audio_bytes import decode_audio_bytes
from stepvox.engine.frontend.audio_formats import output_rate
from stepvox.engine.pipelines.tts import tagged_text
from stepvox.engine.pipelines.tts_text import compose_tags
from stepvox.engine.pipelines.voices import MAX_TRANSCRIPT_CHARS, UnknownVoiceError, VoiceRef, check_name

from .config import OPENAI_TTS_MODELS
from .encoders import make_encoder
from .errors import ApiError, from_exception, request_id_of
from .instructions import tags_from_instructions
from .schemas import ModelCard, ModelList, SpeechRequest, VoiceDeleted, VoiceId, VoiceInfo, VoiceList
from .speech import SpeechJob, SpeechPlan
from .streaming import StreamedResponse

router = APIRouter()
PCM_DEFAULT_RATE = 24000      # OpenAI's pcm is 24 kHz; a headerless format cannot tell clients otherwise


def server_state(request: Request):
    """The app's ServerState, or 503 when it takes no requests now."""
    state = request.app.state.stepvox
    problem = state.problem()
    if problem is not None:
        raise ApiError(503, problem, type="server_error", code="unavailable", headers={"Retry-After": "5"})
    return state


# ---------------------------------------------------------------- speech
@router.post("/v1/audio/speech", response_class=Response,
             responses={200: {"content": {"audio/mpeg": {}, "audio/wav": {}, "text/event-stream": {}}}})
async def create_speech(body: SpeechRequest, request: Request):
    arrival = time.monotonic()
    state = server_state(request)
    tts, config = state.tts, state.config
    request_id = request_id_of(request)
    if body.model is not None and body.model not in (config.model_name, *OPENAI_TTS_MODELS):
        raise ApiError(404, f"model {body.model!r} is not served here; this server serves {config.model_name!r} "
                       "(see /v1/models)", param="model", code="model_not_found")
    if len(body.input) > tts.max_text_chars:
        raise ApiError(400, f"input of {len(body.input)} characters; at most {tts.max_text_chars} per request",
                       param="input", code="text_too_long")
    if (body.ref_audio is None) != (body.ref_text is None):
        missing = "ref_text" if body.ref_text is None else "ref_audio"
        raise ApiError(422, f"{missing}: ref_audio and ref_text go together (a one-off clone: the reference "
                       "audio and the words spoken in it)", param=missing, code="invalid_value")
    voice = body.voice.id if isinstance(body.voice, VoiceId) else body.voice
    if body.ref_audio is None:
        voice = voice or state.default_voice
        if voice is None:
            raise ApiError(422, "voice: no voice given and the server has no default voice", param="voice",
                           code="invalid_value")
        if voice not in tts.voices():
            raise ApiError(404, f"unknown voice {voice!r}; known voices: {tts.voices()}", param="voice",
                           code="voice_not_found")
    # explicit fields win over words found in `instructions`
    tags = tags_from_instructions(body.instructions)
    for field, value in (("emotion", body.emotion), ("language", body.language), ("speed", body.speed_tag)):
        if value is not None:
            tags[field] = value
    if body.mode != "normal" or "mode" not in tags:
        tags["mode"] = body.mode
    try:
        tagged_text(body.input, tags.get("emotion"), tags.get("language"), tags.get("speed"), tags["mode"],
                    tts.max_text_chars)
    except InvalidRequestError as exc:
        raise ApiError(400, str(exc), param="input", code="invalid_value") from exc
    rate_asked = body.sample_rate if body.sample_rate is not None else (
        PCM_DEFAULT_RATE if body.response_format == "pcm" else None)
    try:
        rate = output_rate(body.response_format, rate_asked, tts.sample_rate)
    except AudioInputError as exc:
        raise ApiError(422, f"sample_rate: {exc}", param="sample_rate", code="invalid_value") from exc

    ticket = state.admission.reserve()          # 429 here, before any work
    try:
        clone = None
        if body.ref_audio is not None:
            samples, ref_rate = await asyncio.to_thread(_decode_base64_audio, body.ref_audio, "ref_audio",
                                                        tts.voice_registry.max_reference_seconds)
            clone = VoiceRef(samples, body.ref_text, ref_rate)
        plan = SpeechPlan(body.input, voice or "", clone, tags, body.speed, body.volume, body.seed,
                          body.temperature, body.top_k, body.max_tokens, body.response_format, body.stream_format)
        encoder = make_encoder(body.response_format, tts.sample_rate, rate)
    except BaseException:
        ticket.release()
        raise
    job = SpeechJob(tts, plan, encoder, request_id, state.metrics, arrival)
    applied = compose_tags(tags["mode"], tags.get("emotion"), tags.get("language"), tags.get("speed"))
    headers = {"Cache-Control": "no-cache", "X-Sample-Rate": str(rate), "X-Accel-Buffering": "no"}
    if applied:
        headers["X-Stepvox-Tags"] = urllib.parse.quote(applied)       # UTF-8 tags, percent-encoded
    return StreamedResponse(job, ticket, headers, state.metrics)


def _decode_base64_audio(text: str, param: str, max_seconds: float) -> tuple[np.ndarray, int]:
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, f"{param} is not base64: {exc}", param=param, code="invalid_audio") from exc
    return read_audio(data, param, max_seconds)


def read_audio(data: bytes, param: str, max_seconds: float) -> tuple[np.ndarray, int]:
    """(mono samples [N] float32, rate) of an audio file's bytes (WAV, FLAC, Ogg, MP3), refused from
    its header before anything is decoded (frontend/audio_bytes.py); errors name `param`."""
    try:
        return decode_audio_bytes(data, param, max_seconds)
    except AudioTooLongError as exc:
        raise ApiError(400, str(exc), param=param, code="audio_too_long") from exc
    except AudioInputError as exc:
        raise ApiError(400, str(exc), param=param, code="invalid_audio") from exc


# ---------------------------------------------------------------- voices
def _voice_list(tts) -> VoiceList:
    reg = tts.voice_registry
    data = [VoiceInfo(id=n, name=n, type="builtin") for n in reg.names(builtin=True)]
    data += [VoiceInfo(id=n, name=n, type="registered") for n in reg.names(builtin=False)]
    return VoiceList(data=data)


@router.get("/v1/audio/voices", response_model=VoiceList)
async def list_voices(request: Request):
    return _voice_list(server_state(request).tts)


@router.post("/v1/audio/voices", response_model=VoiceInfo, status_code=201)
async def create_voice(request: Request, name: str = Form(min_length=1, max_length=64),
                       transcript: str = Form(min_length=1, max_length=MAX_TRANSCRIPT_CHARS),
                       audio: UploadFile = File(description="1-30 s of speech: WAV, FLAC, Ogg or MP3")):
    state = server_state(request)
    tts = state.tts
    try:
        check_name(name)
    except InvalidRequestError as exc:
        raise ApiError(422, f"name: {exc}", param="name", code="invalid_value") from exc
    if name in tts.voices():
        raise ApiError(409, f"a voice named {name!r} exists; delete it first (built-in voices stay)", param="name",
                       code="voice_exists")
    # decoding and processing an upload takes memory and a thread: a few at once, the rest refused
    if state.voice_uploads >= state.config.max_voice_uploads:
        raise ApiError(429, f"the server is busy: {state.voice_uploads} voice uploads are being processed "
                       f"(at most {state.config.max_voice_uploads} at once); retry later", type="rate_limit_error",
                       code="queue_full", headers={"Retry-After": str(state.config.retry_after_s)})
    state.voice_uploads += 1
    try:
        data = await audio.read()
        samples, rate = await asyncio.to_thread(read_audio, data, "audio", tts.voice_registry.max_reference_seconds)
        del data
        try:
            await tts.aregister_voice(name, samples, transcript, rate)
        except Exception as exc:    # noqa: BLE001 - mapped to its status (audio errors name the upload)
            raise from_exception(exc, request_id_of(request), audio_param="audio") from exc
    finally:
        state.voice_uploads -= 1
    return VoiceInfo(id=name, name=name, type="registered")


@router.delete("/v1/audio/voices/{name}", response_model=VoiceDeleted)
async def delete_voice(name: str, request: Request):
    tts = server_state(request).tts
    if name in tts.voice_registry.names(builtin=True):
        raise ApiError(400, f"{name!r} is a built-in voice (of the speakers folder); only registered voices can "
                       "be deleted", param="name", code="voice_builtin")
    try:
        await asyncio.to_thread(tts.remove_voice, name)             # removes its files too
    except UnknownVoiceError as exc:
        raise ApiError(404, str(exc), param="name", code="voice_not_found") from exc
    return VoiceDeleted(id=name)


# ---------------------------------------------------------------- models, health, metrics
@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request):
    state = request.app.state.stepvox
    config = state.config
    names = [config.model_name]
    if state.chat is not None:
        names.append(config.chat_model_name)
        if state.chat.transcriber is not None:
            names.append(config.asr_model_name)
    return ModelList(data=[ModelCard(id=name, created=state.started) for name in names])


@router.get("/health")
async def health(request: Request):
    """200 while the server takes requests, 503 when it cannot (shutting down, an engine stopped);
    the KV-page counts (the TTS's, and the chat model's when one is served) are for checks that a
    cancelled request gave its pages back."""
    state = request.app.state.stepvox
    manager = state.tts.engine.engine.block_manager
    problem = state.problem()
    body = {"status": "ok" if problem is None else "unavailable", "model": state.config.model_name,
            "requests_running": state.admission.running, "requests_waiting": state.admission.waiting,
            "kv_free_pages": manager.num_free_pages, "kv_total_pages": manager.num_pages}
    if state.chat is not None:
        chat_manager = state.chat.chat_engine.engine.block_manager
        body.update(chat_model=state.config.chat_model_name, chat_kv_free_pages=chat_manager.num_free_pages,
                    chat_kv_total_pages=chat_manager.num_pages)
    if problem is not None:
        body["reason"] = problem
    return JSONResponse(body, status_code=200 if problem is None else 503)


@router.get("/metrics")
async def metrics(request: Request):
    state = request.app.state.stepvox
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


# ---------------------------------------------------------------- the browser page
STATIC_DIR = pathlib.Path(__file__).parent / "static"
STATIC_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                "style.css": "text/css; charset=utf-8", "talk.js": "text/javascript; charset=utf-8",
                "talk-worklet.js": "text/javascript; charset=utf-8"}
# the page loads nothing from anywhere else (the favicon is an empty data: URL)
PAGE_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
                "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"}


@router.get("/", include_in_schema=False)
async def page():
    return FileResponse(STATIC_DIR / "index.html", media_type=STATIC_FILES["index.html"], headers=PAGE_HEADERS)


@router.get("/static/{name}", include_in_schema=False)
async def static_file(name: str):
    if name not in STATIC_FILES:
        raise ApiError(404, f"no static file {name!r}", code="not_found")
    return FileResponse(STATIC_DIR / name, media_type=STATIC_FILES[name], headers=PAGE_HEADERS)
