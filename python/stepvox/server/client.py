"""The HTTP client of `stepvox chat`: one streamed chat completion from a stepvox server (or another
OpenAI-compatible one), with the standard library only. The answer's text is handed to a callback
as it arrives, its audio pieces are joined into one file; a refusal of the server is a
RequestRefused (exit code 2: the request was wrong), a failure of the server or the network a
ServerFailed (exit code 1), each naming the status and the server's own message."""
from __future__ import annotations

import base64
import dataclasses
import json
import struct
import time
import urllib.error
import urllib.request
from typing import Callable

from stepvox.engine.errors import InvalidRequestError, StepvoxError

WAV_HEADER_BYTES = 44               # the server's streamed WAV: RIFF + fmt (16) + data header
UNKNOWN_SIZE = b"\xff\xff\xff\xff"


class RequestRefused(InvalidRequestError):
    """The server answered 4xx."""


class ServerFailed(StepvoxError):
    """The server answered 5xx, broke off its stream, or could not be reached."""


@dataclasses.dataclass
class ChatAnswer:
    text: str
    audio: bytes                    # the spoken answer as one file ("" when not asked for)
    finish_reason: str | None
    usage: dict | None
    first_text_s: float | None      # request sent -> first text / audio received
    first_audio_s: float | None


def stream_chat(url: str, payload: dict, api_key: str | None = None, on_text: Callable[[str], None] | None = None,
                timeout_s: float = 300.0) -> ChatAnswer:
    """POST `payload` (stream forced on) to `url`/v1/chat/completions and collect the answer."""
    body = json.dumps({**payload, "stream": True, "stream_options": {"include_usage": True}}).encode()
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url.rstrip("/") + "/v1/chat/completions", data=body, headers=headers,
                                     method="POST")
    start = time.monotonic()
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        raise _refusal(exc.code, exc.read()) from None
    except (urllib.error.URLError, OSError) as exc:
        raise ServerFailed(f"cannot reach {url}: {getattr(exc, 'reason', exc)}") from None
    text, audio = [], bytearray()
    answer = ChatAnswer("", b"", None, None, None, None)
    done = False
    with response:
        try:
            for line in response:
                if not line.startswith(b"data: "):
                    continue
                data = line[len(b"data: "):].strip()
                if data == b"[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    error = chunk["error"]
                    raise ServerFailed(f"the answer broke off: {error.get('message')} ({error.get('code')})")
                answer.usage = chunk.get("usage") or answer.usage
                for choice in chunk.get("choices", ()):
                    delta = choice.get("delta", {})
                    answer.finish_reason = choice.get("finish_reason") or answer.finish_reason
                    if delta.get("content"):
                        if answer.first_text_s is None:
                            answer.first_text_s = time.monotonic() - start
                        text.append(delta["content"])
                        if on_text is not None:
                            on_text(delta["content"])
                    piece = (delta.get("audio") or {}).get("data")
                    if piece:
                        if answer.first_audio_s is None:
                            answer.first_audio_s = time.monotonic() - start
                        audio += base64.b64decode(piece)
        except (OSError, ValueError) as exc:       # a dropped connection, a line that is not JSON
            raise ServerFailed(f"the answer broke off: {exc}") from None
    if not done:
        raise ServerFailed("the answer broke off before its end (no [DONE])")
    answer.text = "".join(text)
    answer.audio = _sized_wav(bytes(audio))
    return answer


def _refusal(status: int, body: bytes) -> StepvoxError:
    try:
        error = json.loads(body)["error"]
        message = f"{error['message']} ({error.get('code') or error.get('type')})"
    except (ValueError, KeyError, TypeError):
        message = body.decode("utf-8", "replace")[:200] or "no message"
    kind = RequestRefused if 400 <= status < 500 else ServerFailed
    return kind(f"the server answered {status}: {message}")


def _sized_wav(data: bytes) -> bytes:
    """A streamed WAV says "length unknown" (0xFFFFFFFF) in its header; a file on disk says its size."""
    if len(data) < WAV_HEADER_BYTES or data[:4] != b"RIFF" or data[36:40] != b"data" or data[4:8] != UNKNOWN_SIZE:
        return data
    size = len(data) - WAV_HEADER_BYTES
    return data[:4] + struct.pack("<I", 36 + size) + data[8:40] + struct.pack("<I", size) + data[WAV_HEADER_BYTES:]
