"""One speech request as a StreamJob (streaming.py sends it): the TTS stream of the request, encoded
as it comes (encoders.py), as raw audio bytes or as server-sent events (OpenAI's
`speech.audio.delta` with base64 audio, then `speech.audio.done` with the token usage); it feeds
the metrics (time to first audio, real-time factor, audio seconds, LM timings, outcomes). It is
admitted against the running streams' chunk deadlines, and tells how much audio each piece carries
(the chunk slack of a real-time stream, admission.py)."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import time
from typing import AsyncIterator

from stepvox.engine.pipelines.voices import VoiceRef

from .encoders import StreamEncoder
from .errors import ApiError, from_exception
from .streaming import StreamJob, sse_event


@dataclasses.dataclass
class SpeechPlan:
    """A validated request, as the TTS takes it."""
    text: str
    voice: str
    clone: VoiceRef | None
    tags: dict                    # emotion, language, speed, mode
    speed_factor: float
    volume: float
    seed: int | None
    temperature: float
    top_k: int
    max_tokens: int | None
    response_format: str
    stream_format: str


class SpeechJob(StreamJob):
    deadline_admitted = True

    def __init__(self, tts, plan: SpeechPlan, encoder: StreamEncoder, request_id: str, metrics, arrival: float):
        self.tts, self.plan, self.encoder = tts, plan, encoder
        self.request_id, self.metrics, self.arrival = request_id, metrics, arrival
        self.sse = plan.stream_format == "sse"
        self.media_type = "text/event-stream" if self.sse else encoder.media_type
        self.whole = not self.sse and not encoder.progressive      # flac: the whole file in one piece
        self.audio_seconds = 0.0
        # audio pushed into the encoder since the last piece was handed out: that piece's audio (the few
        # ms an encoder holds back count with the piece they were pushed for)
        self._unsent_audio_s = 0.0
        self._tokens: dict[str, tuple[int, int]] = {}      # LM request id -> (prompt tokens, generated tokens)

    def _on_output(self, out) -> None:
        self._tokens[out.request_id] = (len(out.prompt_token_ids), len(out.outputs[0].token_ids))
        self.metrics.lm_output(out)

    def usage(self) -> dict:
        prompt = sum(p for p, _ in self._tokens.values())
        generated = sum(g for _, g in self._tokens.values())
        return {"input_tokens": prompt, "output_tokens": generated, "total_tokens": prompt + generated}

    async def _encode(self, fn, *args) -> bytes:
        # mp3 / opus / resampling take ms per chunk: on a worker thread, not on the event loop
        return await asyncio.to_thread(fn, *args) if self.encoder.threaded else fn(*args)

    async def audio(self) -> AsyncIterator[bytes]:
        """The encoded audio, piece by piece as the TTS produces it."""
        p = self.plan
        started = time.monotonic()
        stream = self.tts.astream(p.text, p.voice, clone=p.clone, emotion=p.tags.get("emotion"),
                                  language=p.tags.get("language"), speed=p.tags.get("speed"),
                                  mode=p.tags.get("mode", "normal"), speed_factor=p.speed_factor, volume=p.volume,
                                  seed=p.seed, temperature=p.temperature, top_k=p.top_k, max_tokens=p.max_tokens,
                                  on_output=self._on_output)
        async with contextlib.aclosing(stream):
            async for chunk in stream:
                self.audio_seconds += chunk.duration
                self._unsent_audio_s += chunk.duration
                self.metrics.audio_seconds.inc(chunk.duration)
                data = await self._encode(self.encoder.push, chunk.samples)
                if data:
                    yield data
        data = await self._encode(self.encoder.finish)
        if data:
            yield data
        if self.audio_seconds > 0:
            self.metrics.rtf.observe((time.monotonic() - started) / self.audio_seconds)

    async def events(self) -> AsyncIterator[bytes]:
        """The same audio as server-sent events, then the done event with the usage."""
        # aclosing: when this generator is closed (a disconnect), the audio generator and its LM request
        # close at once, not when the garbage collector gets to them
        async with contextlib.aclosing(self.audio()) as audio:
            async for data in audio:
                yield sse_event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii")})
        yield sse_event({"type": "speech.audio.done", "usage": self.usage(),
                         "stepvox": {"request_id": self.request_id, "audio_seconds": round(self.audio_seconds, 6),
                                     "sample_rate": self.encoder.sample_rate,
                                     "tags": {k: v for k, v in self.plan.tags.items() if v}}})

    def pop_audio_seconds(self) -> float:
        audio_s, self._unsent_audio_s = self._unsent_audio_s, 0.0
        return audio_s

    def pieces(self) -> AsyncIterator[bytes]:
        return self.events() if self.sse else self.audio()

    def error(self, exc: BaseException) -> ApiError:
        return from_exception(exc, self.request_id, audio_param="ref_audio")

    def error_event(self, error: ApiError) -> bytes:
        return sse_event({"type": "error", "error": error.body()["error"]})

    def first_sent(self) -> None:
        # time to first audio: when its first bytes leave (a whole-file format's at its end)
        self.metrics.first_audio.observe(time.monotonic() - self.arrival)

    def finished(self, outcome: str) -> None:
        self.metrics.speech_requests.labels(self.plan.response_format, self.plan.stream_format, outcome).inc()
