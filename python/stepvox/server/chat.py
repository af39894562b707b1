"""One chat completion as a StreamJob (streaming.py sends it): the events of VoiceChat.arespond in
OpenAI's Chat Completions shapes.

- stream=true: server-sent `chat.completion.chunk`s. The first one (the role) leaves with the first
  answer text, so a failure while the prompt is prepared is still a JSON error. Each text delta is
  `delta.content`, and also `delta.audio.transcript` when audio was asked for; each piece of
  encoded audio is `delta.audio.data` (base64; the pieces concatenate to one stream of the format
  asked for). Then `delta.audio.expires_at`, a chunk with the finish_reason, the usage chunk
  (`stream_options.include_usage`: empty choices), and `data: [DONE]`. A failure after the first
  chunk sends `data: {"error": {...}}` and `data: [DONE]`, which OpenAI's clients raise.
- stream=false: one `chat.completion` once the answer is complete: message.content, message.audio
  {id, data (base64 of the whole answer as one file), transcript, expires_at}, finish_reason, usage.

OpenAI leaves `content` null when audio is asked for and sends the text only as the transcript;
stepvox sends it in both, so that clients that read only `content` show the answer. Audio is not
kept for later turns (`expires_at` is the creation time): clients send earlier answers back as
text. Usage as OpenAI counts it: prompt tokens (details: audio, the user audio's `<audio_N>` ids;
cached, served from the prefix cache), completion tokens = the chat model's text tokens + the TTS
model's speech tokens (details: audio_tokens).
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import time
from typing import AsyncIterator

import numpy as np

from stepvox.engine.errors import AudioInputError, PromptTooLongError
from stepvox.engine.frontend.audio_formats import encode_audio
from stepvox.engine.pipelines.chat_messages import AudioTokens, Message
from stepvox.engine.pipelines.chat_template import prompt_ids
from stepvox.engine.pipelines.voice_chat import AudioDelta, Event, ResponseDone, TextDelta, Usage

from .encoders import make_encoder
from .errors import ApiError, from_exception
from .streaming import StreamJob, sse_event

CHAT_AUDIO_RATE = 24000            # OpenAI's chat audio is 24 kHz in every format (pcm16 cannot say otherwise)
DONE_EVENT = b"data: [DONE]\n\n"


@dataclasses.dataclass
class ChatPlan:
    """A validated request, as VoiceChat.arespond takes it."""
    messages: list[Message]        # checked, audio decoded (tokenized by the job, once it has a slot)
    model: str                     # the model name the answer reports
    audio: bool                    # a spoken answer too
    voice: str
    audio_format: str              # wav mp3 flac opus pcm16
    stream: bool
    include_usage: bool
    sampling: dict                 # temperature, top_p, max_tokens, seed
    speech: dict                   # VoiceChat.arespond's speech options (tts_max_tokens, tts_seed)

    @property
    def modalities(self) -> str:
        return "text,audio" if self.audio else "text"


class ChatJob(StreamJob):
    def __init__(self, chat, plan: ChatPlan, request_id: str, metrics, arrival: float):
        self.chat, self.plan = chat, plan
        self.request_id, self.metrics, self.arrival = request_id, metrics, arrival
        self.created = int(time.time())
        suffix = request_id.removeprefix("req_")          # ids that lead back to X-Request-Id
        self.completion_id, self.audio_id = f"chatcmpl-{suffix}", f"audio_{suffix}"
        self.sse = plan.stream
        self.whole = not plan.stream
        self.media_type = "text/event-stream" if plan.stream else "application/json"
        self.file_format = "pcm" if plan.audio_format == "pcm16" else plan.audio_format
        self.encoder = (make_encoder(self.file_format, chat.sample_rate, CHAT_AUDIO_RATE)
                        if plan.audio and plan.stream else None)
        self.prompt_audio_tokens = 0

    # ---------------------------------------------------------------- the answer
    async def _answer(self) -> AsyncIterator[Event]:
        """arespond's events, timed for the metrics."""
        chat, p = self.chat, self.plan
        prepared = await chat.aprepare(p.messages)          # the audio tokenizer, on its own thread
        self.prompt_audio_tokens = sum(len(part.ids) for m in prepared for part in m.parts or ()
                                       if isinstance(part, AudioTokens))
        prompt = prompt_ids(chat.tokenizer, prepared)
        timed = {TextDelta: self.metrics.chat_first_text, AudioDelta: self.metrics.chat_first_audio}
        events = chat.arespond(None, p.voice, audio=p.audio, prompt=prompt, **p.sampling, **p.speech)
        async with contextlib.aclosing(events):
            async for event in events:
                histogram = timed.pop(type(event), None)
                if histogram is not None:
                    histogram.observe(time.monotonic() - self.arrival)
                if isinstance(event, AudioDelta):
                    self.metrics.audio_seconds.inc(event.audio.duration)
                yield event

    async def _encode(self, fn, *args) -> bytes:
        # mp3 / opus / resampling take ms per chunk: on a worker thread, not on the event loop
        return await asyncio.to_thread(fn, *args) if self.encoder.threaded else fn(*args)

    def pieces(self) -> AsyncIterator[bytes]:
        return self._chunks() if self.plan.stream else self._completion()

    # ---------------------------------------------------------------- stream=true
    def _chunk(self, delta: dict | None, finish_reason: str | None = None, usage: dict | None = None) -> bytes:
        body = {"id": self.completion_id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.plan.model, "system_fingerprint": None,
                "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                      "finish_reason": finish_reason}]}
        if self.plan.include_usage:
            body["usage"] = usage            # null on every chunk but the last, as OpenAI's
        return sse_event(body)

    def _audio_chunk(self, data: bytes) -> bytes:
        return self._chunk({"audio": {"id": self.audio_id, "data": base64.b64encode(data).decode("ascii")}})

    async def _chunks(self) -> AsyncIterator[bytes]:
        p = self.plan
        head = self._chunk({"role": "assistant", "content": ""})
        done = None
        async with contextlib.aclosing(self._answer()) as events:
            async for event in events:
                if isinstance(event, ResponseDone):
                    done = event
                    continue
                if isinstance(event, TextDelta):
                    delta = {"content": event.text}
                    if p.audio:
                        delta["audio"] = {"id": self.audio_id, "transcript": event.text}
                    piece = self._chunk(delta)
                else:
                    data = await self._encode(self.encoder.push, event.audio.samples)
                    piece = self._audio_chunk(data) if data else b""
                if piece:
                    yield head + piece
                    head = b""
        tail = b""
        if p.audio:
            data = await self._encode(self.encoder.finish)
            if data:
                tail += self._audio_chunk(data)
            tail += self._chunk({"audio": {"id": self.audio_id, "expires_at": self.created}})
        tail += self._chunk({}, finish_reason=_finish_reason(done))
        if p.include_usage:
            tail += self._chunk(None, usage=self._usage(done.usage))
        yield head + tail + DONE_EVENT

    # ---------------------------------------------------------------- stream=false
    async def _completion(self) -> AsyncIterator[bytes]:
        samples, done = [], None
        async with contextlib.aclosing(self._answer()) as events:
            async for event in events:
                if isinstance(event, AudioDelta):
                    samples.append(event.audio.samples)
                elif isinstance(event, ResponseDone):
                    done = event
        message = {"role": "assistant", "content": done.text, "refusal": None, "audio": None}
        if self.plan.audio:
            audio = np.concatenate(samples) if samples else np.zeros(0, np.float32)
            # an answer with nothing to speak is an empty file, never resampled (the filter needs samples)
            rate = self.chat.sample_rate if audio.size else CHAT_AUDIO_RATE
            data = await asyncio.to_thread(encode_audio, audio, rate, self.file_format, CHAT_AUDIO_RATE)
            message["audio"] = {"id": self.audio_id, "data": base64.b64encode(data).decode("ascii"),
                                "expires_at": self.created, "transcript": done.text}
        body = {"id": self.completion_id, "object": "chat.completion", "created": self.created,
                "model": self.plan.model, "system_fingerprint": None,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": _finish_reason(done)}],
                "usage": self._usage(done.usage)}
        yield json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()

    def _usage(self, usage: Usage) -> dict:
        completion = usage.completion_tokens + usage.speech_tokens
        return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": completion,
                "total_tokens": usage.prompt_tokens + completion,
                "prompt_tokens_details": {"cached_tokens": usage.cached_tokens,
                                          "audio_tokens": self.prompt_audio_tokens},
                "completion_tokens_details": {"audio_tokens": usage.speech_tokens, "reasoning_tokens": 0}}

    # ---------------------------------------------------------------- StreamJob
    def error(self, exc: BaseException) -> ApiError:
        if isinstance(exc, PromptTooLongError):
            return ApiError(400, str(exc), param="messages", code="prompt_too_long")
        if isinstance(exc, AudioInputError):        # refused by the audio tokenizer
            return ApiError(400, str(exc), param="messages", code="invalid_audio")
        return from_exception(exc, self.request_id)

    def error_event(self, error: ApiError) -> bytes:
        return sse_event(error.body()) + DONE_EVENT

    def finished(self, outcome: str) -> None:
        self.metrics.chat_requests.labels(self.plan.modalities, str(self.plan.stream).lower(), outcome).inc()


def _finish_reason(done: ResponseDone) -> str:
    return "length" if done.finish_reason == "length" else "stop"
