"""WS /v1/realtime: one RealtimeSession (engine/pipelines/realtime.py) per connection, spoken to in a
subset of OpenAI's Realtime events with their shapes.

Client: `session.update` {session: {voice, instructions, max_response_output_tokens, turn_detection:
{type: "server_vad", threshold, silence_duration_ms (the commit), create_response, pause_ms
(stepvox: when the speculative answer starts)} or null (the client commits and asks for answers),
input_audio_format: "pcm16", input_audio_sample_rate (stepvox; default 16000), history (stepvox:
"audio", or "transcript": past user turns kept as their words, the official demo's rule),
speech_max_tokens (stepvox: TTS tokens per sentence)}} (before the first audio; later updates are refused),
`input_audio_buffer.append` {audio: base64 PCM16 mono}, `input_audio_buffer.commit`,
`input_audio_buffer.clear`, `response.create`, `response.cancel`. Server: `session.created` /
`session.updated`, `input_audio_buffer.speech_started` / `speech_stopped` / `committed`,
`conversation.item.created`, `response.created`,
`response.audio_transcript.delta`, `response.audio.delta` (base64 PCM16 at 24 kHz, as OpenAI's),
`conversation.item.input_audio_transcription.completed` (the user's words, from the tokenizer's
Paraformer ASR), `response.done`, `conversation.item.truncated` (a barge-in over an answer still playing), `error`.
An unknown or malformed event gets an `error` event naming it and the session goes on. A session
ends after `max_session_s`, or `idle_timeout_s` without a client event.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import json
import secrets

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from stepvox.engine.errors import ConfigError, InvalidRequestError, StepvoxError, TurnStateError
from stepvox.engine.frontend.audio_input import check_sample_rate
from stepvox.engine.pipelines.realtime import (SAMPLE_RATE, RealtimeSession, ResponseAudio, ResponseFailed,
                                               ResponseFinished, ResponseStarted, ResponseText, ResponseTruncated,
                                               SpeechStarted, SpeechStopped, TurnCommitted, TurnDetection,
                                               UserTranscript)

from .encoders import make_encoder
from .routes import server_state

router = APIRouter()
OUTPUT_RATE = 24000            # OpenAI's realtime pcm16
MAX_EVENT_BYTES = 1 << 20      # one client event (an append of ~30 s of audio in base64)


def _count(value, name: str) -> int | None:
    """A positive token count, or None for no limit (None or "inf")."""
    if value is None or value == "inf":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequestError(f"{name} must be a positive integer or \"inf\", got {value!r}")
    return value


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


class _Connection:
    def __init__(self, ws: WebSocket, chat, config, default_voice: str | None):
        self.ws, self.chat, self.config = ws, chat, config
        self.voice = default_voice or "Tingting"
        self.instructions: str | None = None
        self.detection: TurnDetection | None = TurnDetection()
        self.input_rate = SAMPLE_RATE
        self.history = "audio"
        self.max_tokens: int | None = None
        self.speech_max_tokens: int | None = None
        self.session: RealtimeSession | None = None
        self.session_id = _id("sess")
        self.item_id = self.response_id = None
        self.awaiting_transcript: collections.deque[str] = collections.deque()   # committed items, in order
        self.encoder = None
        self.forwarder: asyncio.Task | None = None

    def describe(self) -> dict:
        d = self.detection
        detection = None if d is None else {
            "type": "server_vad", "threshold": d.threshold, "silence_duration_ms": d.commit_ms, "pause_ms": d.pause_ms,
            "prefix_padding_ms": 300, "create_response": d.create_response, "interrupt_response": True}
        return {"id": self.session_id, "object": "realtime.session", "model": self.config.chat_model_name,
                "modalities": ["text", "audio"], "voice": self.voice, "instructions": self.instructions or "",
                "input_audio_format": "pcm16", "input_audio_sample_rate": self.input_rate,
                "output_audio_format": "pcm16", "turn_detection": detection, "history": self.history,
                "max_response_output_tokens": self.max_tokens if self.max_tokens is not None else "inf"}

    async def send(self, payload: dict) -> None:
        await self.ws.send_text(json.dumps({"event_id": _id("event"), **payload}, ensure_ascii=False))

    async def error(self, message: str, code: str, event_id=None) -> None:
        await self.send({"type": "error", "error": {"type": "invalid_request_error", "code": code,
                                                    "message": message, "param": None, "event_id": event_id}})

    def started(self) -> RealtimeSession:
        if self.session is None:
            options = {} if self.max_tokens is None else {"max_tokens": self.max_tokens}
            if self.speech_max_tokens is not None:
                options["tts_max_tokens"] = self.speech_max_tokens
            self.session = RealtimeSession(self.chat, system=self.instructions, voice=self.voice,
                                           detection=self.detection, respond_options=options,
                                           sample_rate=self.input_rate, history=self.history)
            self.forwarder = asyncio.create_task(self.forward(self.session))
        return self.session

    # ---------------------------------------------------------------- client events
    async def handle(self, text: str) -> None:
        try:
            event = json.loads(text)
        except json.JSONDecodeError:
            return await self.error("the event is not JSON", "invalid_json")
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            return await self.error("an event is an object with a string `type`", "invalid_event")
        kind, event_id = event["type"], event.get("event_id")
        try:
            if kind == "session.update":
                await self.update(event.get("session"), event_id)
            elif kind == "input_audio_buffer.append":
                audio = event.get("audio")
                if not isinstance(audio, str):
                    return await self.error("input_audio_buffer.append needs `audio`: base64 PCM16", "invalid_value",
                                            event_id)
                await self.started().append(base64.b64decode(audio, validate=True))
            elif kind == "input_audio_buffer.commit":
                await self.started().commit()
            elif kind == "input_audio_buffer.clear":
                await self.started().clear()
            elif kind == "response.create":
                await self.started().create_response()
            elif kind == "response.cancel":
                await self.started().cancel_response()
            else:
                await self.error(f"unknown or unsupported event type {kind!r}", "unknown_event", event_id)
        except TurnStateError as exc:
            await self.error(f"{kind}: {exc}", exc.code, event_id)
        except (binascii.Error, ValueError, StepvoxError) as exc:
            await self.error(f"{kind}: {exc}", "invalid_value", event_id)

    async def update(self, spec, event_id) -> None:
        if not isinstance(spec, dict):
            return await self.error("session.update needs a `session` object", "invalid_value", event_id)
        if self.session is not None:
            return await self.error("session.update is accepted before the first audio only", "session_started",
                                    event_id)
        voice = spec.get("voice", self.voice)
        if voice not in self.chat.tts.voices():
            return await self.error(f"unknown voice {voice!r}; known voices: {self.chat.tts.voices()}",
                                    "voice_not_found", event_id)
        fmt = spec.get("input_audio_format", "pcm16")
        if fmt != "pcm16":
            return await self.error(f"input_audio_format {fmt!r} is not supported (pcm16 only)", "invalid_value",
                                    event_id)
        try:
            rate = check_sample_rate(spec.get("input_audio_sample_rate", self.input_rate))
            detection = self._detection(spec.get("turn_detection", "unchanged"))
            max_tokens = _count(spec.get("max_response_output_tokens", self.max_tokens), "max_response_output_tokens")
            speech_max = _count(spec.get("speech_max_tokens", self.speech_max_tokens), "speech_max_tokens")
            history = spec.get("history", self.history)
            if history not in ("audio", "transcript"):
                raise InvalidRequestError(f"history must be \"audio\" or \"transcript\", got {history!r}")
            if history == "transcript" and self.chat.transcriber is None:
                raise InvalidRequestError("history \"transcript\" needs speech recognition (the server runs --no-asr)")
            instructions = spec.get("instructions", self.instructions)
            if instructions is not None and not isinstance(instructions, str):
                raise InvalidRequestError("instructions must be a string")
        except StepvoxError as exc:
            return await self.error(f"session.update: {exc}", "invalid_value", event_id)
        self.detection, self.input_rate, self.max_tokens, self.speech_max_tokens = detection, rate, max_tokens, speech_max
        self.voice, self.instructions, self.history = voice, instructions, history
        await self.send({"type": "session.updated", "session": self.describe()})

    def _detection(self, spec) -> TurnDetection | None:
        if spec == "unchanged":
            return self.detection
        if spec is None:
            return None
        if not isinstance(spec, dict):
            raise InvalidRequestError("turn_detection must be an object or null")
        if spec.get("type", "server_vad") != "server_vad":
            raise InvalidRequestError(f"turn_detection.type {spec.get('type')!r} is not supported (server_vad)")
        d = self.detection or TurnDetection()
        try:
            return TurnDetection(threshold=spec.get("threshold", d.threshold), min_speech_ms=d.min_speech_ms,
                                 pause_ms=spec.get("pause_ms", d.pause_ms),
                                 commit_ms=spec.get("silence_duration_ms", d.commit_ms),
                                 create_response=bool(spec.get("create_response", d.create_response)))
        except ConfigError as exc:
            raise InvalidRequestError(f"turn_detection: {exc}") from exc

    # ---------------------------------------------------------------- session events
    async def forward(self, session: RealtimeSession) -> None:
        while True:
            await self.forward_event(await session.events.get())

    async def close(self) -> None:
        if self.forwarder is not None:
            self.forwarder.cancel()
            with contextlib.suppress(BaseException):
                await self.forwarder
        if self.session is not None:
            await self.session.close()

    async def forward_event(self, event) -> None:
        if isinstance(event, SpeechStarted):
            self.item_id = _id("item")
            await self.send({"type": "input_audio_buffer.speech_started", "audio_start_ms": int(event.audio_ms),
                             "item_id": self.item_id})
        elif isinstance(event, SpeechStopped):
            await self.send({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": int(event.audio_ms),
                             "item_id": self.item_id})
        elif isinstance(event, TurnCommitted):
            item_id, self.item_id = self.item_id or _id("item"), None
            self.awaiting_transcript.append(item_id)
            await self.send({"type": "input_audio_buffer.committed", "item_id": item_id, "previous_item_id": None})
            await self.send({"type": "conversation.item.created", "previous_item_id": None, "item": {
                "id": item_id, "object": "realtime.item", "type": "message", "role": "user",
                "status": "completed", "content": [{"type": "input_audio", "transcript": None}]}})
        elif isinstance(event, ResponseStarted):
            self.response_id = _id("resp")
            self.encoder = make_encoder("pcm", self.chat.sample_rate, OUTPUT_RATE)
            await self.send({"type": "response.created", "response": {
                "id": self.response_id, "object": "realtime.response", "status": "in_progress", "output": [],
                "stepvox": {"speculative": event.speculative}}})
        elif isinstance(event, UserTranscript):
            item_id = self.awaiting_transcript.popleft() if self.awaiting_transcript else None
            await self.send({"type": "conversation.item.input_audio_transcription.completed",
                             "item_id": item_id, "content_index": 0, "transcript": event.text})
        elif isinstance(event, ResponseText):
            await self.send({"type": "response.audio_transcript.delta", "response_id": self.response_id,
                             "item_id": self.response_id, "output_index": 0, "content_index": 0, "delta": event.text})
        elif isinstance(event, ResponseAudio):
            data = self.encoder.push(event.audio.samples)
            if data:
                await self.send({"type": "response.audio.delta", "response_id": self.response_id,
                                 "item_id": self.response_id, "output_index": 0, "content_index": 0,
                                 "delta": base64.b64encode(data).decode("ascii")})
        elif isinstance(event, ResponseFinished):
            await self.send({"type": "response.done", "response": {
                "id": self.response_id, "object": "realtime.response",
                "status": "cancelled" if event.interrupted else "completed",
                "output": [{"id": self.response_id, "type": "message", "role": "assistant",
                            "content": [{"type": "audio", "transcript": event.text}]}],
                "stepvox": {"played_ms": round(event.played_ms, 1),
                            "end_of_speech_to_first_audio_ms": None if event.first_audio_s is None
                            else round(event.first_audio_s * 1e3, 1)}}})
        elif isinstance(event, ResponseTruncated):
            await self.send({"type": "conversation.item.truncated", "item_id": self.response_id, "content_index": 0,
                             "audio_end_ms": int(event.played_ms), "stepvox": {"transcript": event.text}})
        elif isinstance(event, ResponseFailed):
            await self.error(str(event.error), "response_failed")
            await self.send({"type": "response.done", "response": {"id": self.response_id, "status": "failed",
                                                                   "output": []}})


@router.websocket("/v1/realtime")
async def realtime(ws: WebSocket):
    state = server_state(ws)
    chat = state.chat
    if chat is None:
        await ws.close(code=1008, reason="this server was started without --chat")
        return
    offered = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",")]
    await ws.accept(subprotocol="realtime" if "realtime" in offered else None)
    config = state.config
    connection = _Connection(ws, chat, config, state.default_voice)
    state.metrics.realtime_sessions.inc()
    await connection.send({"type": "session.created", "session": connection.describe()})

    async def receive_loop():
        while True:
            message = await asyncio.wait_for(ws.receive(), config.realtime_idle_timeout_s)
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None or len(text) > MAX_EVENT_BYTES:
                await connection.error(f"events are JSON text of at most {MAX_EVENT_BYTES} bytes", "invalid_event")
                continue
            await connection.handle(text)

    try:
        await asyncio.wait_for(receive_loop(), config.realtime_max_session_s)
    except (asyncio.TimeoutError, WebSocketDisconnect):
        pass
    finally:
        await connection.close()
        state.metrics.realtime_sessions.dec()
        if connection.session is not None:
            state.metrics.realtime_session_done(connection.session.stats)
        with contextlib.suppress(BaseException):
            await ws.close()
