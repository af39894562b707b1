"""Speech recognition for POST /v1/audio/transcriptions: the Step-Audio tokenizer's own Paraformer
(VoiceChat.transcriber, sharing the tokenizer's encoder), run on the audio-tokenizer thread, the one
thread that uses that encoder; the answer in OpenAI's response formats:

- json: {"text", "usage": {"type": "duration", "seconds"}}
- text: the text alone (text/plain)
- verbose_json: {"task": "transcribe", "language", "duration", "text", "segments": [one segment over
  the whole file: id, seek, start, end, text, tokens (the ASR's token ids), temperature], "usage"}

The Paraformer decodes greedily and finds the language itself: OpenAI's `language`, `prompt` and
`temperature` are accepted and do not change the result (`language` is echoed by verbose_json).
"""
from __future__ import annotations

import asyncio
import math

import numpy as np
from fastapi.responses import JSONResponse, PlainTextResponse, Response

RESPONSE_FORMATS = ("json", "text", "verbose_json")


async def transcribe(chat, samples: np.ndarray, sample_rate: int):
    """The transcriber's result (`.text`, `.token_ids`) for mono samples, off the event loop."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(chat.tts.audio_executor, chat.transcriber.transcribe, samples, sample_rate)


def transcription_response(result, response_format: str, seconds: float, language: str | None) -> Response:
    text = result.text
    if response_format == "text":
        return PlainTextResponse(text)
    usage = {"type": "duration", "seconds": math.ceil(seconds)}
    if response_format == "json":
        return JSONResponse({"text": text, "usage": usage})
    segment = {"id": 0, "seek": 0, "start": 0.0, "end": round(seconds, 3), "text": text,
               "tokens": [int(t) for t in result.token_ids], "temperature": 0.0}
    return JSONResponse({"task": "transcribe", "language": language or "unknown", "duration": round(seconds, 3),
                         "text": text, "segments": [segment], "usage": usage})
