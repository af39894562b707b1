"""`stepvox serve --chat` end to end: one real uvicorn process on loopback for the whole module (the
tiny default folders and a tiny random-weight chat model, `--chat` with no folder, as a user starts
it), spoken to with the official `openai` client, with plain HTTP (http.client: exact control of
bodies, streams and disconnects), and with `stepvox chat` in a subprocess.

Random weights write noise and the chat model never stops by itself: requests send a small
max_tokens (and speech_max_tokens, the TTS tokens per spoken sentence) and the tests check
structure, not content; a seeded request gives the same text every time. The server requires an
API key, admits 2 requests at once with 1 waiting, and has faults injected into its voice chat for
two seeds (the only way to make it fail on purpose). Transcriptions come from the tokenizer's
own Paraformer ASR, loaded by VoiceChat."""
from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import http.client
import io
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
from openai import APIError, APIStatusError

from stepvox import cli
from stepvox.engine.async_engine import AsyncLLMEngine
from stepvox.engine.pipelines.voice_chat import VoiceChat
from stepvox.testing.speech import espeak_wav
from test_server import Server, assert_error, multipart, start_server, stop_server, wav_bytes

API_KEY = "chat-key"
CHAT_MODEL = "stepvox-tiny-chat"
SMALL = {"max_tokens": 8, "seed": 1}                   # the chat model's answer: 8 tokens of noise
SPOKEN = {"speech_max_tokens": 20}                     # ~0.5 s of speech per sentence
RATE = 24000                                           # every chat audio format, as OpenAI's
EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "step-audio" / "examples"
FAULT_SEED, FAULT_LATER_SEED = 4242, 4243
# the server: faults injected into the voice chat for two seeds (before any event; after the first),
# then the real `stepvox serve`
FAULTY_LAUNCHER = f"""
import contextlib, sys
from stepvox.engine.pipelines.voice_chat import VoiceChat
real = VoiceChat.arespond
async def arespond(self, *args, seed=None, **kwargs):
    if seed == {FAULT_SEED}:
        raise RuntimeError("injected chat fault")
    async with contextlib.aclosing(real(self, *args, seed=seed, **kwargs)) as events:
        async for event in events:
            yield event
            if seed == {FAULT_LATER_SEED}:
                raise RuntimeError("injected chat fault after the first text")
VoiceChat.arespond = arespond
from stepvox.cli import main
sys.exit(main(sys.argv[1:]))
"""


# ---------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("chat-home")


@pytest.fixture(scope="module")
def server(home):
    s = start_server(home, "chat", ["--chat", "--api-key", API_KEY, "--max-concurrent", "2", "--max-queue", "1",
                                    "--max-body-mib", "2"],
                     launcher=FAULTY_LAUNCHER, api_key=API_KEY)
    yield s
    stop_server(s)                  # SIGTERM: both engines shut down, exit 0
    assert s.proc.returncode == 0 and "Traceback" not in s.log().split("Shutting down")[-1], s.log()


def chat_json(server: Server, **fields):
    return server.post_json("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], **SMALL,
                                                     **fields})


@contextlib.contextmanager
def open_stream(server: Server, payload: dict):
    """An open streamed chat completion (http.client): read its SSE lines, or close it mid-way."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    resp = None
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps({**payload, "stream": True}).encode(),
                     headers={"Content-Type": "application/json", **server.auth()})
        resp = conn.getresponse()
        yield resp
    finally:
        if resp is not None:
            resp.close()
        conn.close()


def next_chunk(resp) -> dict | str:
    """The next SSE event of an open stream: a chunk, or "[DONE]"."""
    while True:
        line = resp.readline()
        assert line, "the stream ended without [DONE]"
        if line.startswith(b"data: "):
            data = line[len(b"data: "):].strip()
            return "[DONE]" if data == b"[DONE]" else json.loads(data)


def both_engines_idle_s(server: Server, limit_s: float = 10.0) -> float:
    """Seconds until every KV page of both engines is free and no request runs."""
    t0 = time.monotonic()
    while True:
        h = server.health()
        if h["kv_free_pages"] == h["kv_total_pages"] and h["chat_kv_free_pages"] == h["chat_kv_total_pages"] \
                and not h["requests_running"] and not h["requests_waiting"]:
            return time.monotonic() - t0
        assert time.monotonic() - t0 < limit_s, h
        time.sleep(0.01)


def decode(data: bytes, fmt: str) -> tuple[np.ndarray, int]:
    if fmt == "pcm16":
        return np.frombuffer(data, "<i2").astype(np.float32) / 32768, RATE
    with sf.SoundFile(io.BytesIO(data)) as f:
        return f.read(dtype="float32"), f.samplerate


def audio_part(data: bytes, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


@pytest.fixture(scope="module")
def espeak_question(tmp_path_factory) -> bytes:
    """~1.5 s of espeak-ng speech as a WAV file."""
    path = str(tmp_path_factory.mktemp("question") / "q.wav")
    espeak_wav(path, "what is the weather like today")
    return pathlib.Path(path).read_bytes()


@pytest.fixture(scope="module")
def real_question() -> pathlib.Path:
    """Real speech from the official examples (2.3 s, 22.05 kHz)."""
    path = EXAMPLES / "multilingual1.wav"
    if not path.is_file():
        pytest.skip(f"needs the official example speech at {path}")
    return path


def check_usage(usage, speech: bool) -> None:
    assert usage.prompt_tokens > 0 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert 0 <= usage.prompt_tokens_details.cached_tokens <= usage.prompt_tokens
    speech_tokens = usage.completion_tokens_details.audio_tokens
    assert (speech_tokens > 0) == speech
    assert usage.completion_tokens == SMALL["max_tokens"] + speech_tokens      # text tokens + speech tokens


# ---------------------------------------------------------------- start-up
def test_serves_the_tiny_chat_model_and_lists_it(server, home):
    log = server.log()
    assert f"--chat tiny: using a tiny random-weight Step1 chat model written to {home / CHAT_MODEL}" in log
    assert f"chat model {CHAT_MODEL} on cpu" in log and "/v1/chat/completions" in log
    models = json.loads(server.request("GET", "/v1/models")[2])["data"]
    assert [m["id"] for m in models] == ["stepvox-tiny-tts", CHAT_MODEL] + ["step-audio-paraformer"]
    health = server.health()
    assert health["status"] == "ok" and health["chat_model"] == CHAT_MODEL
    assert health["chat_kv_free_pages"] == health["chat_kv_total_pages"] > 0


# ---------------------------------------------------------------- text answers
def test_text_answers_streamed_or_not_are_the_same_for_a_seed(server):
    messages = [{"role": "developer", "content": "适配用户的语言，用简短口语化的文字回答"},
                {"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
                {"role": "user", "content": [{"type": "text", "text": "What is the weather like?"}]}]
    raw = server.openai().chat.completions.with_raw_response.create(model=CHAT_MODEL, messages=messages, **SMALL)
    answer = raw.parse()
    assert raw.headers["x-request-id"].removeprefix("req_") == answer.id.removeprefix("chatcmpl-")
    assert answer.object == "chat.completion" and answer.model == CHAT_MODEL and len(answer.choices) == 1
    choice = answer.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content and choice.message.audio is None
    check_usage(answer.usage, speech=False)
    again = server.openai().chat.completions.create(model="gpt-4o-audio-preview", messages=messages, **SMALL)
    assert again.choices[0].message.content == choice.message.content
    assert again.usage.prompt_tokens_details.cached_tokens > 0           # the prefix cache served the prompt

    chunks = list(server.openai().chat.completions.create(model=CHAT_MODEL, messages=messages, stream=True,
                                                         stream_options={"include_usage": True}, **SMALL))
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
    check_usage(chunks[-1].usage, speech=False)
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens


# ---------------------------------------------------------------- spoken answers
def test_spoken_answer_to_espeak_speech(server, espeak_question):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Answer this:"},
                                             audio_part(espeak_question)]}]
    answer = server.openai().chat.completions.create(model=CHAT_MODEL, messages=messages, modalities=["text", "audio"],
                                                    audio={"voice": "Tingting", "format": "wav"}, extra_body=SPOKEN,
                                                    **SMALL)
    message = answer.choices[0].message
    assert message.audio.id.startswith("audio_") and message.audio.transcript == message.content != ""
    assert isinstance(message.audio.expires_at, int)
    samples, rate = decode(base64.b64decode(message.audio.data), "wav")
    assert rate == RATE and samples.ndim == 1 and samples.size > 0.2 * RATE and np.abs(samples).max() > 0
    check_usage(answer.usage, speech=True)
    assert answer.usage.prompt_tokens_details.audio_tokens > 20        # ~1.5 s of speech at 41.7 tokens/s


@pytest.mark.parametrize("fmt", ["pcm16", "mp3", "opus", "wav", "flac"])
def test_streamed_spoken_answer_to_real_speech(server, real_question, fmt):
    messages = [{"role": "user", "content": [audio_part(real_question.read_bytes())]}]
    stream = server.openai().chat.completions.create(model=CHAT_MODEL, messages=messages, modalities=["text", "audio"],
                                                    audio={"voice": {"id": "Tingting"}, "format": fmt}, stream=True,
                                                    stream_options={"include_usage": True}, extra_body=SPOKEN, **SMALL)
    text, transcript, data, ids, expiry = "", "", b"", set(), []
    for chunk in stream:
        if not chunk.choices:
            usage = chunk.usage
            continue
        delta = chunk.choices[0].delta
        text += delta.content or ""
        if delta.audio:
            audio = delta.audio if isinstance(delta.audio, dict) else delta.audio.model_dump()
            ids.add(audio["id"])
            transcript += audio.get("transcript") or ""
            data += base64.b64decode(audio.get("data") or "")
            if audio.get("expires_at") is not None:
                expiry.append(audio["expires_at"])
    assert text and transcript == text and len(ids) == 1 and len(expiry) == 1
    samples, rate = decode(data, fmt)
    assert rate == RATE and samples.size > 0.2 * RATE and np.abs(samples).max() > 0
    check_usage(usage, speech=True)
    assert usage.prompt_tokens_details.audio_tokens > 60                # 2.3 s of speech


# ---------------------------------------------------------------- errors
BAD_REQUESTS = [
    ({"messages": [{"role": "bot", "content": "hi"}]}, 400, "invalid_value", "messages[0].role", "must be one of"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"},
                                                {"type": "input_audio", "input_audio": {"data": "@@", "format": "wav"}}]}]},
     400, "invalid_audio", "messages[0].content[1].input_audio.data", "not base64"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}, audio_part(b"RIFF, but not audio")]}]},
     400, "invalid_audio", "messages[0].content[1].input_audio", "not an audio file"),
    ({"messages": [{"role": "user", "content": [{"type": "audio", "audio": "/etc/passwd"}]}]},
     400, "invalid_value", "messages[0].content[0]", "file paths are not accepted"),
    ({"messages": [{"role": "assistant", "content": [audio_part(wav_bytes(1.0))]}]}, 400, "invalid_value", "messages[0]",
     "audio is accepted in user messages only"),
    ({"n": 2}, 400, "unsupported_value", "n", "n = 2 is not supported"),
    ({"stop": ["\n"]}, 400, "unsupported_value", "stop", "not supported"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "unsupported_value", "tools", "not supported"),
    ({"modalities": ["text", "audio"], "audio": {"voice": "Nobody"}}, 404, "voice_not_found", "audio.voice",
     r"unknown voice 'Nobody'; known voices: \['Tingting'"),
    ({"model": "gpt-5"}, 404, "model_not_found", "model", "this server's chat model is 'stepvox-tiny-chat'"),
    ({"messages": []}, 422, "invalid_value", "messages", "at least 1 item"),
    ({"messages": ["hi"]}, 422, "invalid_value", "messages[0]", "valid dictionary"),
    ({"audio": {"format": "aac"}}, 422, "invalid_value", "audio.format", "Input should be 'wav'"),
    ({"temperature": 3}, 422, "invalid_value", "temperature", "less than or equal to 2"),
    ({"max_tokens": 0}, 422, "invalid_value", "max_tokens", "greater than or equal to 1"),
    ({"modalities": ["video"]}, 422, "invalid_value", "modalities[0]", "Input should be 'text' or 'audio'"),
    ({"frobnicate": 1}, 422, "invalid_value", "frobnicate", "Extra inputs are not permitted"),
]


@pytest.mark.parametrize("fields, status, code, param, says", BAD_REQUESTS,
                         ids=[f"{b[3]}-{i}" for i, b in enumerate(BAD_REQUESTS)])
def test_a_bad_request_is_an_openai_error_naming_the_field(server, fields, status, code, param, says):
    assert_error(chat_json(server, **fields), status, code, param, says)


def test_openai_client_raises_the_status(server):
    with pytest.raises(APIStatusError) as info:
        server.openai().chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}], n=2)
    assert info.value.status_code == 400 and info.value.body["param"] == "n"


def test_api_key_and_body_limit(server):
    no_key = Server(server.proc, server.port, server.log_path)
    _, headers = assert_error(chat_json(no_key), 401, "missing_api_key", None, "Authorization: Bearer")
    assert headers["www-authenticate"] == "Bearer"
    assert_error(no_key.post_json("/v1/chat/completions", {"messages": []}, headers={"Authorization": "Bearer wrong"}),
                 401, "invalid_api_key", None, "incorrect API key")
    with pytest.raises(APIStatusError) as info:
        no_key.openai().chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 401
    big = [{"role": "user", "content": [audio_part(bytes(3 << 20))]}]      # 4 MiB of base64; the server takes 2
    assert_error(chat_json(server, messages=big), 413, "body_too_large", None, "larger than 2097152 bytes")


@pytest.mark.parametrize("stream", [False, True])
def test_a_failure_before_the_first_text_is_500_naming_the_request(server, stream):
    error, headers = assert_error(chat_json(server, seed=FAULT_SEED, stream=stream), 500, "internal_error", None,
                                  "RuntimeError: injected chat fault")
    assert error["type"] == "server_error" and headers["x-request-id"] in error["message"]
    assert headers["x-request-id"] in server.log()                # the traceback is logged under that id
    assert chat_json(server)[0] == 200


def test_a_failure_after_the_first_text_ends_the_stream_with_an_error_event(server):
    with open_stream(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 50,
                              "seed": FAULT_LATER_SEED}) as resp:
        assert resp.status == 200
        request_id = resp.getheader("x-request-id")
        events = [next_chunk(resp) for _ in range(4)]
    role, text, failure, done = events
    assert role["choices"][0]["delta"]["role"] == "assistant" and text["choices"][0]["delta"]["content"]
    assert failure["error"]["code"] == "internal_error" and request_id in failure["error"]["message"]
    assert done == "[DONE]"
    with pytest.raises(APIError, match="injected chat fault after the first text"):
        list(server.openai().chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}],
                                                     stream=True, max_tokens=50, seed=FAULT_LATER_SEED))
    assert both_engines_idle_s(server) < 2.0 and server.health()["status_code"] == 200


# ---------------------------------------------------------------- disconnects, the queue, metrics
def cancelled_key(stream: bool) -> tuple:
    return ("stepvox_chat_requests_total", (("modalities", "text,audio"), ("outcome", "cancelled"),
                                            ("stream", str(stream).lower())))


@pytest.mark.parametrize("phase", ["text", "audio", "whole"])
def test_a_disconnect_frees_both_engines_pages(server, phase):
    """text: the client leaves a stream while the chat model writes (2000 tokens); audio: while the
    TTS speaks (a long speech budget); whole: a non-streamed answer's client leaves while it is
    made. Either way every page of both engines is back at once."""
    assert both_engines_idle_s(server) < 1.0
    stream = phase != "whole"
    cancelled = server.metrics().get(cancelled_key(stream), 0)
    long = {"max_tokens": 8, "speech_max_tokens": 4000} if phase == "audio" else {"max_tokens": 2000}
    payload = {"messages": [{"role": "user", "content": "hi"}], "seed": 3, "modalities": ["text", "audio"],
               "audio": {"format": "pcm16"}, "stream": stream, **long}
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(payload).encode(),
                     headers={"Content-Type": "application/json", **server.auth()})
        if stream:
            resp = conn.getresponse()
            assert resp.status == 200
            while True:
                delta = next_chunk(resp)["choices"][0]["delta"]
                if delta.get("content") if phase == "text" else "data" in delta.get("audio", {}):
                    break
        deadline = time.monotonic() + 30
        while (busy := server.health())["requests_running"] != 1 or (
                busy["chat_kv_free_pages" if phase != "audio" else "kv_free_pages"]
                == busy["chat_kv_total_pages" if phase != "audio" else "kv_total_pages"]):
            assert time.monotonic() < deadline, busy
            time.sleep(0.01)
    finally:
        conn.close()                # the client leaves
    freed_s = both_engines_idle_s(server)
    assert freed_s < 2.0, freed_s
    print(f"{phase}: pages of both engines back {1e3 * freed_s:.0f} ms after the disconnect")
    assert server.metrics()[cancelled_key(stream)] == cancelled + 1


def test_queue_full_is_429(server):
    """--max-concurrent 2, --max-queue 1: two running, one waiting, the fourth refused at once."""
    long = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000, "seed": 4}
    with concurrent.futures.ThreadPoolExecutor(1) as pool, contextlib.ExitStack() as stack:
        for _ in range(2):
            resp = stack.enter_context(open_stream(server, long))
            assert resp.status == 200 and next_chunk(resp)
        waiting = pool.submit(chat_json, server)
        deadline = time.monotonic() + 30
        while server.health()["requests_waiting"] != 1:
            assert time.monotonic() < deadline and not waiting.done()
            time.sleep(0.02)
        t0 = time.perf_counter()
        _, headers = assert_error(chat_json(server), 429, "queue_full", None, "the server is busy")
        assert time.perf_counter() - t0 < 1.0 and headers["retry-after"] == "1"
        assert not waiting.done()
    assert waiting.result(timeout=60)[0] == 200           # the streams' clients left: the waiting one ran
    both_engines_idle_s(server)


def test_metrics_count_chat_requests(server):
    ok = ("stepvox_chat_requests_total", (("modalities", "text"), ("outcome", "ok"), ("stream", "false")))
    spoken = ("stepvox_chat_requests_total", (("modalities", "text,audio"), ("outcome", "ok"), ("stream", "false")))
    first_text, first_audio = ("stepvox_chat_time_to_first_text_seconds_count", ()), \
        ("stepvox_chat_time_to_first_audio_seconds_count", ())
    before = server.metrics()
    assert chat_json(server)[0] == 200
    assert chat_json(server, modalities=["text", "audio"], **SPOKEN)[0] == 200
    assert_error(chat_json(server, n=3), 400, "unsupported_value", "n")
    after = server.metrics()
    assert after[ok] - before.get(ok, 0) == 1 and after[spoken] - before.get(spoken, 0) == 1
    assert after[first_text] - before[first_text] == 2 and after[first_audio] - before[first_audio] == 1
    errors = ("stepvox_errors_total", (("code", "unsupported_value"), ("type", "invalid_request_error")))
    assert after[errors] - before.get(errors, 0) == 1
    route = ("stepvox_http_requests_total", (("method", "POST"), ("route", "/v1/chat/completions"), ("status", "200")))
    assert after[route] - before[route] == 2
    assert after[("stepvox_chat_kv_free_pages", ())] == after[("stepvox_chat_kv_total_pages", ())] > 0
    assert after[("stepvox_chat_engine_alive", ())] == 1 and after[("stepvox_requests_running", ())] == 0


# ---------------------------------------------------------------- transcriptions
@pytest.mark.parametrize("response_format", ["json", "text", "verbose_json"])
def test_transcriptions(server, real_question, response_format):
    with open(real_question, "rb") as f:
        result = server.openai().audio.transcriptions.create(model="whisper-1", file=f, response_format=response_format,
                                                            language="zh", prompt="ignored")
    if response_format == "text":
        assert isinstance(result, str) and result.strip()
        return
    assert isinstance(result.text, str) and result.text.strip()
    if response_format == "verbose_json":
        assert result.duration == pytest.approx(sf.info(str(real_question)).duration, abs=0.01)
        assert result.language == "zh" and result.segments[0].text == result.text and result.segments[0].tokens


def test_transcription_errors(server):
    body, content_type = multipart({"model": "whisper-1"}, {"file": ("q.wav", b"not audio at all")})
    assert_error(server.request("POST", "/v1/audio/transcriptions", body, {"Content-Type": content_type}),
                 400, "invalid_audio", "file", "not an audio file")
    body, content_type = multipart({"model": "tts-1"}, {"file": ("q.wav", b"x")})
    assert_error(server.request("POST", "/v1/audio/transcriptions", body, {"Content-Type": content_type}),
                 404, "model_not_found", "model")


# ---------------------------------------------------------------- a server without --chat
def test_without_chat_the_chat_routes_are_404(server, home, espeak_question):
    """The app of a TTS alone (in this process, on the folders the server wrote)."""
    from fastapi.testclient import TestClient

    from stepvox.engine.pipelines.tts import TTS
    from stepvox.server import create_app

    root = home / "stepvox-tiny-tts"
    tts = TTS.from_pretrained(str(root / "Step-Audio-TTS-3B"), str(root / "Step-Audio-Tokenizer"),
                              str(root / "speakers"), device="cpu", kernel_backend="reference")
    try:
        web = TestClient(create_app(tts, shutdown_model=False))
        for path in ("/v1/chat/completions", "/v1/audio/transcriptions"):
            response = web.post(path, json={"messages": [{"role": "user", "content": "hi"}]})
            assert response.status_code == 404, response.text
            error = response.json()["error"]
            assert error["code"] == "model_not_found" and "started without --chat" in error["message"]
        assert [m["id"] for m in web.get("/v1/models").json()["data"]] == ["step-audio-tts-3b"]
        assert "chat_kv_free_pages" not in web.get("/health").json()
        # a voice chat without the ASR (--no-asr): chat is served, transcriptions are 404
        engine = AsyncLLMEngine.from_pretrained(str(home / CHAT_MODEL), device="cpu", kernel_backend="reference",
                                                max_model_len=512, num_kv_pages=64)
        chat = VoiceChat(engine, tts, transcriber=None)
        try:
            web = TestClient(create_app(chat, shutdown_model=False))
            body, content_type = multipart({"model": "whisper-1"}, {"file": ("q.wav", espeak_question)})
            response = web.post("/v1/audio/transcriptions", content=body, headers={"Content-Type": content_type})
            assert response.status_code == 404, response.text
            assert "started with --no-asr" in response.json()["error"]["message"]
        finally:
            engine.shutdown()
    finally:
        tts.shutdown()


@pytest.mark.parametrize("argv, says", [
    (["--chat", "/nonexistent"], "--chat /nonexistent: no such folder"),
    (["--chat", "--chat-memory-fraction", "0.6", "--tts-memory-fraction", "0.5"], "at most 0.9"),
    (["--chat", "--gpu-memory-utilization", "0.5"], "with --chat, split the GPU with --chat-memory-fraction"),
    (["--chat-memory-fraction", "0.5"], "--chat-memory-fraction goes with --chat"),
    (["--no-asr"], "--no-asr goes with --chat"),
    (["--chat", "--chat-tensor-parallel-size", "0"], "argument --chat-tensor-parallel-size: expected a positive"),
    (["--chat", "--tts-memory-fraction", "1.5"], "argument --tts-memory-fraction: expected a fraction"),
])
def test_serve_chat_user_errors_are_one_line_before_anything_loads(argv, says, capsys, monkeypatch):
    monkeypatch.setattr(cli, "default_tts_folders", lambda *a: pytest.fail("the default folders were written"))
    monkeypatch.setattr(cli, "default_chat_model", lambda *a: pytest.fail("the default chat model was written"))
    monkeypatch.setattr(cli.VoiceChat, "from_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))
    try:
        code = cli.main(["serve", "--port", "0", *argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2 and re.fullmatch(rf"stepvox: error: .*{says}.*\n", err), err
    assert out == ""


# ---------------------------------------------------------------- stepvox chat
def run_chat(server: Server, *args) -> subprocess.CompletedProcess:
    """`stepvox chat` as a user runs it: a process of its own."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.pop("STEPVOX_API_KEY", None)
    return subprocess.run([sys.executable, "-m", "stepvox.cli", "chat", "--url", server.url, "--api-key", API_KEY,
                           *args],
                          env=env, capture_output=True, text=True, timeout=120)


def report(stderr: str) -> list[dict]:
    return [dict(prompt=int(m[0]), cached=int(m[1]), completion=int(m[2]), finish=m[3])
            for m in re.findall(r"stepvox chat: (\d+) prompt tokens \((\d+) cached\), (\d+) completion tokens "
                                r"\((\w+)\)", stderr)]


def test_stepvox_chat_text_in_text_out(server):
    proc = run_chat(server, "你好", "--max-tokens", "6", "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and proc.stdout.endswith("\n")
    [turn] = report(proc.stderr)
    assert turn["completion"] == 6 and turn["finish"] == "length" and turn["prompt"] > 0


def test_stepvox_chat_audio_in_audio_out(server, espeak_question, tmp_path):
    question = tmp_path / "question.wav"
    question.write_bytes(espeak_question)
    out = tmp_path / "answer.mp3"
    proc = run_chat(server, "--audio", str(question), "--out", str(out), "--voice", "Tingting", "--max-tokens", "6",
                    "--speech-max-tokens", "20", "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and f"written to {out}" in proc.stderr
    samples, rate = sf.read(str(out), dtype="float32")
    assert rate == RATE and samples.size > 0.2 * RATE


def chat_main(server: Server, argv: list[str], capsys, key: bool = True) -> tuple[int, str, str]:
    """`stepvox chat` in this process (its client is plain urllib): (exit code, stdout, stderr)."""
    try:
        code = cli.main(["chat", "--url", server.url, *(["--api-key", API_KEY] if key else []), *argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_stepvox_chat_keeps_the_history_of_stdin_lines(server, capsys, monkeypatch):
    monkeypatch.delenv("STEPVOX_API_KEY", raising=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n\nand again\n"))
    code, out, err = chat_main(server, ["--max-tokens", "4", "--seed", "2", "--system", "be brief"], capsys)
    assert code == 0, err
    first, second = report(err)
    assert len(out.splitlines()) == 2
    assert second["prompt"] > first["prompt"] + first["completion"]      # the first turn is in the second's prompt
    assert second["cached"] > 0                                            # and the prefix cache served it


def test_stepvox_chat_writes_a_streamed_wav_with_its_sizes(server, capsys, tmp_path):
    wav = tmp_path / "answer.wav"
    code, out, err = chat_main(server, ["hi", "--out", str(wav), "--max-tokens", "4", "--speech-max-tokens", "20"],
                               capsys)
    assert code == 0, err
    info = sf.info(str(wav))
    assert info.samplerate == RATE and info.frames == (wav.stat().st_size - 44) // 2 > 0
    with open(wav, "rb") as f:
        assert f.read(8)[4:] != b"\xff\xff\xff\xff"


def test_stepvox_chat_errors_are_one_line(server, capsys, tmp_path):
    code, out, err = chat_main(server, ["hi", "--out", str(tmp_path / "x.wav"), "--voice", "Nobody",
                                        "--max-tokens", "2"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("stepvox: error: the server answered 404: unknown voice 'Nobody'")
    code, out, err = chat_main(server, ["hi"], capsys, key=False)
    assert code == 2 and "the server answered 401" in err and err.count("\n") == 1
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]                # bound, not listening: connections are refused
        code = cli.main(["chat", "hi", "--url", f"http://127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("stepvox: error: cannot reach") and err.count("\n") == 1, err


# ---------------------------------------------------------------- /v1/realtime
def _realtime(server, headers=None):
    from websockets.sync.client import connect
    return connect(f"ws://127.0.0.1:{server.port}/v1/realtime", open_timeout=30,
                   additional_headers={"Authorization": f"Bearer {API_KEY}"} if headers is None else headers)


def _recv(ws, until, timeout=180):
    events, deadline = [], time.monotonic() + timeout
    while True:
        event = json.loads(ws.recv(timeout=max(deadline - time.monotonic(), 0.1)))
        events.append(event)
        if until(event):
            return events


def test_realtime_session_answers_a_spoken_turn(server, espeak_question):
    samples, rate = sf.read(io.BytesIO(espeak_question), dtype="float32")
    from stepvox.engine.frontend.resample import resample
    import torch
    speech = resample(torch.from_numpy(samples), rate, 16000).numpy()
    audio = np.concatenate([np.zeros(4800, np.float32), speech, np.zeros(16000, np.float32)])
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    with _realtime(server) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "session.created"
        ws.send("not json")                                          # malformed: an error, the session goes on
        assert json.loads(ws.recv(timeout=30))["error"]["code"] == "invalid_json"
        ws.send(json.dumps({"type": "response.create.now"}))
        assert json.loads(ws.recv(timeout=30))["error"]["code"] == "unknown_event"
        ws.send(json.dumps({"type": "session.update", "session": {
            "voice": "Tingting", "instructions": "简短回答", "max_response_output_tokens": 6, "speech_max_tokens": 20,
            "turn_detection": {"type": "server_vad", "silence_duration_ms": 600, "pause_ms": 200}}}))
        updated = json.loads(ws.recv(timeout=30))
        assert updated["type"] == "session.updated" and updated["session"]["turn_detection"]["silence_duration_ms"] == 600
        for i in range(0, len(pcm), 640):                           # 20 ms frames
            ws.send(json.dumps({"type": "input_audio_buffer.append",
                                "audio": base64.b64encode(pcm[i:i + 640]).decode()}))
        events = _recv(ws, lambda e: e["type"] in ("response.done", "error"))
        if "conversation.item.input_audio_transcription.completed" not in [e["type"] for e in events]:
            events += _recv(ws, lambda e: e["type"] == "conversation.item.input_audio_transcription.completed")
    kinds = [e["type"] for e in events]
    transcribed = next(e for e in events if e["type"] == "conversation.item.input_audio_transcription.completed")
    created = next(e for e in events if e["type"] == "conversation.item.created")
    assert transcribed["item_id"] == created["item"]["id"] and isinstance(transcribed["transcript"], str)
    order = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
             "conversation.item.created", "response.created"]
    assert [k for k in kinds if k in order] == order, kinds
    assert kinds[-1] == "response.done" and events[-1]["response"]["status"] == "completed"
    transcript = "".join(e["delta"] for e in events if e["type"] == "response.audio_transcript.delta")
    assert transcript == events[-1]["response"]["output"][0]["content"][0]["transcript"]
    audio_out = b"".join(base64.b64decode(e["delta"]) for e in events if e["type"] == "response.audio.delta")
    assert len(audio_out) > 0 and len(audio_out) % 2 == 0
    started = next(e for e in events if e["type"] == "input_audio_buffer.speech_started")
    assert 0 < started["audio_start_ms"] < 1000
    deadline = time.monotonic() + 20                # the session's statistics land when the server closes it
    while True:
        metrics = server.request("GET", "/metrics")[2].decode()
        promoted = re.search(r'^stepvox_realtime_speculations_total\{outcome="promoted"\} (\S+)$', metrics,
                             re.MULTILINE)
        if (promoted and float(promoted.group(1)) >= 1) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert promoted and float(promoted.group(1)) >= 1
    assert re.search(r"^stepvox_realtime_end_of_speech_to_first_audio_seconds_count [1-9]", metrics, re.MULTILINE)


def test_realtime_needs_the_api_key(server):
    from websockets.exceptions import InvalidStatus
    with pytest.raises(InvalidStatus):
        _realtime(server, headers={})


def _pcm(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


def _send_audio(ws, audio: np.ndarray, rate: int = 16000) -> None:
    """Real-time-sized frames (20 ms), sent as fast as the socket takes them."""
    pcm, step = _pcm(audio), rate // 50 * 2
    for i in range(0, len(pcm), step):
        ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm[i:i + step]).decode()}))


@contextlib.contextmanager
def _open_session(server, **session):
    """A /v1/realtime connection after session.created and its session.update."""
    with _realtime(server) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "session.created"
        ws.send(json.dumps({"type": "session.update", "session": {
            "instructions": "简短回答", "max_response_output_tokens": 6, "speech_max_tokens": 20,
            "turn_detection": {"type": "server_vad", "silence_duration_ms": 600, "pause_ms": 200}, **session}}))
        updated = json.loads(ws.recv(timeout=30))
        assert updated["type"] == "session.updated", updated
        yield ws


def _speech16k(path_or_bytes, rate: int = 16000) -> np.ndarray:
    from stepvox.engine.frontend.resample import resample
    import torch
    samples, sr = sf.read(path_or_bytes if isinstance(path_or_bytes, pathlib.Path) else io.BytesIO(path_or_bytes),
                          dtype="float32")
    return resample(torch.from_numpy(samples), sr, rate).numpy()


def _metric(server, pattern: str) -> float:
    found = re.search(pattern, server.request("GET", "/metrics")[2].decode(), re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def _session_stats_landed(server, pattern: str, at_least: float, limit_s: float = 20) -> float:
    """The session's statistics reach /metrics when the server closes it."""
    deadline = time.monotonic() + limit_s
    while True:
        value = _metric(server, pattern)
        if value >= at_least or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


DISCARDED = r'^stepvox_realtime_speculations_total\{outcome="discarded"\} (\S+)$'
PROMOTED = r'^stepvox_realtime_speculations_total\{outcome="promoted"\} (\S+)$'


def test_realtime_real_speech_with_a_short_pause_is_one_turn_and_its_speculation_is_dropped(server, real_question):
    speech = _speech16k(real_question)
    half = speech.size // 2
    silence = lambda ms: np.zeros(ms * 16, np.float32)      # noqa: E731
    discarded, promoted = _metric(server, DISCARDED), _metric(server, PROMOTED)
    with _open_session(server) as ws:
        # 350 ms inside the question: past pause_ms (a speculation starts), short of the 600 ms commit
        _send_audio(ws, np.concatenate([silence(300), speech[:half], silence(350), speech[half:], silence(900)]))
        events = _recv(ws, lambda e: e["type"] in ("response.done", "error"))
    kinds = [e["type"] for e in events]
    assert kinds.count("input_audio_buffer.speech_started") == 1 and kinds.count("input_audio_buffer.committed") == 1
    assert kinds[-1] == "response.done" and events[-1]["response"]["status"] == "completed", kinds
    created = next(e for e in events if e["type"] == "response.created")
    assert created["response"]["stepvox"]["speculative"]               # the second speculation, promoted
    assert events[-1]["response"]["stepvox"]["end_of_speech_to_first_audio_ms"] > 0
    assert _session_stats_landed(server, DISCARDED, discarded + 1) == discarded + 1
    assert _metric(server, PROMOTED) == promoted + 1
    assert both_engines_idle_s(server) < 10                              # the dropped answer's pages are free


def test_realtime_barge_in_over_the_socket(server, espeak_question):
    speech = _speech16k(espeak_question)
    silence = lambda ms: np.zeros(ms * 16, np.float32)      # noqa: E731
    with _open_session(server, max_response_output_tokens="inf", speech_max_tokens=60) as ws:
        _send_audio(ws, np.concatenate([silence(300), speech, silence(800)]))
        events = _recv(ws, lambda e: e["type"] in ("response.audio.delta", "error"))
        assert events[-1]["type"] == "response.audio.delta", events[-1]
        _send_audio(ws, np.concatenate([silence(200), speech]))          # the user talks over the answer
        rest = _recv(ws, lambda e: e["type"] == "conversation.item.truncated"
                     or (e["type"] == "response.done" and e["response"]["status"] == "cancelled"))
        stopped = rest[-1]
        # a barge-in detected: speech_started comes with (or right after) the stop
        assert "input_audio_buffer.speech_started" in [e["type"] for e in rest] + [
            json.loads(ws.recv(timeout=30))["type"]]
    if stopped["type"] == "response.done":                              # cut while generated
        assert stopped["response"]["stepvox"]["played_ms"] >= 0
        said = stopped["response"]["output"][0]["content"][0]["transcript"]
    else:                                                               # generated, still playing
        said = stopped["stepvox"]["transcript"]
    spoken = "".join(e["delta"] for e in events + rest if e["type"] == "response.audio_transcript.delta")
    assert spoken.startswith(said)                                      # the history keeps what was played
    assert both_engines_idle_s(server) < 10


def test_realtime_eight_sessions_at_once_all_complete(server, espeak_question):
    speech = _speech16k(espeak_question)

    def one(k: int) -> list:
        with _open_session(server) as ws:
            _send_audio(ws, np.concatenate([np.zeros((100 + 40 * k) * 16, np.float32), speech,
                                            np.zeros(900 * 16, np.float32)]))
            return _recv(ws, lambda e: e["type"] in ("response.done", "error"))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    for events in results:
        assert events[-1]["type"] == "response.done" and events[-1]["response"]["status"] == "completed", events[-1]
        assert any(e["type"] == "response.audio.delta" for e in events)
    assert both_engines_idle_s(server) < 10


def test_realtime_without_turn_detection_the_client_commits_and_asks(server, espeak_question):
    speech = _speech16k(espeak_question)
    with _open_session(server, turn_detection=None) as ws:
        ws.send(json.dumps({"type": "response.create"}))
        assert json.loads(ws.recv(timeout=30))["error"]["code"] == "no_committed_audio"     # nothing yet; goes on
        _send_audio(ws, speech)
        ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        committed = _recv(ws, lambda e: e["type"] == "conversation.item.created", timeout=30)
        assert [e["type"] for e in committed] == ["input_audio_buffer.committed", "conversation.item.created"]
        ws.send(json.dumps({"type": "response.create"}))
        events = _recv(ws, lambda e: e["type"] in ("response.done", "error"))
    assert events[0]["type"] == "response.created" and not events[0]["response"]["stepvox"]["speculative"]
    assert events[-1]["type"] == "response.done" and events[-1]["response"]["status"] == "completed"
    assert "input_audio_buffer.speech_started" not in [e["type"] for e in events]


def test_realtime_input_at_24khz_with_a_transcript_history(server, espeak_question):
    speech = _speech16k(espeak_question, rate=24000)
    with _open_session(server, input_audio_sample_rate=24000, history="transcript") as ws:
        _send_audio(ws, np.concatenate([np.zeros(7200, np.float32), speech, np.zeros(24000, np.float32)]), rate=24000)
        events = _recv(ws, lambda e: e["type"] in ("response.done", "error"))
    started = next(e for e in events if e["type"] == "input_audio_buffer.speech_started")
    assert 0 < started["audio_start_ms"] < 700                      # 300 ms of silence first, at any input rate
    assert events[-1]["type"] == "response.done" and events[-1]["response"]["status"] == "completed"


@pytest.mark.parametrize("session, says", [
    ({"input_audio_sample_rate": 4000}, "sample rate"),
    ({"input_audio_format": "g711_ulaw"}, "pcm16 only"),
    ({"turn_detection": {"type": "semantic_vad"}}, "not supported"),
    ({"turn_detection": {"silence_duration_ms": 100, "pause_ms": 200}}, "pause_ms"),
    ({"max_response_output_tokens": 0}, "positive integer"),
    ({"voice": "nobody"}, "unknown voice"),
    ({"history": "summary"}, "history must be"),
])
def test_realtime_bad_session_update_is_an_error_and_the_session_goes_on(server, session, says):
    with _realtime(server) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "session.created"
        ws.send(json.dumps({"type": "session.update", "session": session}))
        error = json.loads(ws.recv(timeout=30))
        assert error["type"] == "error" and says in error["error"]["message"], error
        ws.send(json.dumps({"type": "session.update", "session": {"voice": "Tingting"}}))
        assert json.loads(ws.recv(timeout=30))["type"] == "session.updated"
