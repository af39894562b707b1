"""`stepvox serve` end to end: real uvicorn processes on loopback, started the way a user starts them
(`stepvox serve` on the tiny default folders, port 0), spoken to with the official `openai` client
and with plain HTTP (http.client: exact control of bodies, streams and disconnects).

Two servers: the main one, and a "restarted" one on the same voices folder that requires an API
key, admits one request at a time with a queue of one, and has an engine fault injected for one
input (the only way to make an engine fail on purpose); it is stopped with SIGTERM at the end.
Requests ask for few LM tokens (`max_tokens`) so that the CPU runs stay short."""
from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid

import numpy as np
import pytest
import soundfile as sf
from openai import APIStatusError, OpenAI
from prometheus_client.parser import text_string_to_metric_families

from stepvox import cli
from stepvox.testing.speech import espeak_wav

SMALL = {"max_tokens": 20, "seed": 1}            # ~0.5 s of speech: one decoder chunk
API_KEY = "sekret-key"
MAX_REFERENCE_S = 5
MAX_TEXT_CHARS = 200
FAULT = "engine, fail now"
FAULT_LATER = "engine, fail after the first audio"
# the restarted server: engine faults injected for two inputs, then the real `stepvox serve`
FAULTY_LAUNCHER = f"""
import contextlib, sys
from stepvox.engine.pipelines.tts import TTS
real = TTS.astream
async def astream(self, text, *args, **kwargs):
    if text == {FAULT!r}:
        raise RuntimeError("injected engine fault")
    async with contextlib.aclosing(real(self, text, *args, **kwargs)) as chunks:
        async for chunk in chunks:
            yield chunk
            if text == {FAULT_LATER!r}:
                raise RuntimeError("injected engine fault after the first audio")
TTS.astream = astream
from stepvox.cli import main
sys.exit(main(sys.argv[1:]))
"""


# ---------------------------------------------------------------- servers
class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log_path: str, api_key: str | None = None):
        self.proc, self.port, self.log_path, self.api_key = proc, port, log_path, api_key
        self.url = f"http://127.0.0.1:{port}"

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def auth(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 120) -> tuple[int, dict, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers={**self.auth(), **(headers or {})})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def post_json(self, path: str, payload, headers: dict | None = None, timeout: float = 120):
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return self.request("POST", path, body, {"Content-Type": "application/json", **(headers or {})}, timeout)

    def speech(self, **fields):
        return self.post_json("/v1/audio/speech", {"input": "Hello there.", **SMALL, **fields})

    @contextlib.contextmanager
    def stream(self, payload: dict, timeout: float = 120):
        """An open speech response (http.client): read it, or close it mid-way (a disconnect)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        resp = None
        try:
            conn.request("POST", "/v1/audio/speech", body=json.dumps(payload).encode(),
                         headers={"Content-Type": "application/json", **self.auth()})
            resp = conn.getresponse()
            yield resp
        finally:                       # the socket closes with the last of its users
            if resp is not None:
                resp.close()
            conn.close()

    def health(self) -> dict:
        status, _, body = self.request("GET", "/health")
        return {"status_code": status, **json.loads(body)}

    def metrics(self) -> dict:
        """{(name, sorted labels): value} of every sample /metrics exposes (parsed by prometheus_client)."""
        status, headers, body = self.request("GET", "/metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain")
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(body.decode()) for s in family.samples}

    def openai(self) -> OpenAI:
        return OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "not-needed", max_retries=0, timeout=120)


def start_server(home, name: str, args: list[str], launcher: str | None = None, api_key: str | None = None) -> Server:
    # a fresh shell's environment: no TRITON_INTERPRET, so "auto" takes the reference kernels on the CPU
    env = dict(os.environ, TMPDIR=str(home))
    env.pop("TRITON_INTERPRET", None)
    env.pop("STEPVOX_API_KEY", None)
    log_path = str(home / f"{name}.log")
    command = ["-c", launcher] if launcher else ["-m", "stepvox.cli"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, *command, "serve", "--port", "0", "--device", "cpu",
                                 "--no-access-log", *args], env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    port = None
    while port is None:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            found = re.search(r"serving \S+ on http://127\.0\.0\.1:(\d+) ", f.read())
        if found:
            port = int(found.group(1))
        elif proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the server did not start:\n{open(log_path).read()}")
        else:
            time.sleep(0.1)
    server = Server(proc, port, log_path, api_key)
    while True:
        try:
            if server.health()["status_code"] == 200:
                return server
        except OSError:
            pass
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.1)


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(60)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """The TMPDIR of the servers: the first writes the tiny default folders, later ones reuse them."""
    return tmp_path_factory.mktemp("serve-home")


@pytest.fixture(scope="module")
def voices_dir(home):
    return home / "voices"


@pytest.fixture(scope="module")
def server(home, voices_dir):
    s = start_server(home, "main", ["--voices-dir", str(voices_dir), "--max-body-mib", "1",
                                    "--max-text-chars", str(MAX_TEXT_CHARS),
                                    "--max-reference-seconds", str(MAX_REFERENCE_S)])
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def restarted(home, voices_dir, server):
    """Started after the main one, on its voices folder (see the module docstring)."""
    s = start_server(home, "restarted", ["--voices-dir", str(voices_dir), "--api-key", API_KEY,
                                         "--max-concurrent", "1", "--max-queue", "1", "--shutdown-timeout", "30",
                                         "--max-reference-seconds", str(MAX_REFERENCE_S)],
                     launcher=FAULTY_LAUNCHER, api_key=API_KEY)
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> bytes:
    """A WAV of espeak-ng speech (~2 s): a voice to upload or clone."""
    path = str(tmp_path_factory.mktemp("ref") / "ref.wav")
    espeak_wav(path, "this is my voice, please clone it")
    with open(path, "rb") as f:
        return f.read()


def wav_bytes(seconds: float, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def decode(data: bytes, fmt: str, pcm_rate: int = 24000) -> tuple[np.ndarray, int]:
    if fmt == "pcm":
        return np.frombuffer(data, "<i2").astype(np.float32) / 32768, pcm_rate
    with sf.SoundFile(io.BytesIO(data)) as f:
        return f.read(dtype="float32"), f.samplerate


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data) in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f'Content-Type: application/octet-stream\r\n\r\n'.encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def upload_voice(server: Server, name: str, audio: bytes, transcript: str = "this is my voice"):
    body, content_type = multipart({"name": name, "transcript": transcript}, {"audio": ("ref.wav", audio)})
    return server.request("POST", "/v1/audio/voices", body, {"Content-Type": content_type})


def pages_back_s(server: Server, limit_s: float = 10.0) -> float:
    """Seconds until every KV page is free and no request runs (the engine thread frees an aborted
    request's pages at its next step)."""
    t0 = time.monotonic()
    while (now := server.health())["kv_free_pages"] != now["kv_total_pages"] or now["requests_running"]:
        assert time.monotonic() - t0 < limit_s, now
        time.sleep(0.01)
    return time.monotonic() - t0


def assert_error(response, status: int, code: str | None, param: str | None = None, says: str = ""):
    got_status, headers, body = response
    assert got_status == status, body
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["param"] == param, error
    assert re.search(says, error["message"]), error["message"]
    assert headers["content-type"] == "application/json"
    assert headers["x-request-id"].startswith("req_")
    return error, headers


# ---------------------------------------------------------------- start-up
def test_serves_the_embedded_default_and_says_so(server, home):
    log = server.log()
    assert "no --model given: using tiny random-weight folders" in log and str(home / "stepvox-tiny-tts") in log
    assert "API key not required" in log and f"registered voices kept in {home / 'voices'}" in log
    models = json.loads(server.request("GET", "/v1/models")[2])
    assert [m["id"] for m in models["data"]] == ["stepvox-tiny-tts"] and models["object"] == "list"
    health = server.health()
    assert health["status"] == "ok" and health["kv_free_pages"] == health["kv_total_pages"] > 0


@pytest.fixture
def busy_port():
    with contextlib.closing(socket.create_server(("127.0.0.1", 0))) as sock:
        yield sock.getsockname()[1]


@pytest.mark.parametrize("argv, says", [
    (["--port", "99999"], r"argument --port: expected a TCP port in \[0, 65535\], got '99999'"),
    (["--max-queue", "-1"], "max_queue must be an integer >= 0, got -1"),
    (["--max-concurrent", "0"], "argument --max-concurrent: expected a positive integer, got '0'"),
    (["--max-body-mib", "0"], "argument --max-body-mib: expected a positive integer, got '0'"),
    (["--shutdown-timeout", "nan"], "argument --shutdown-timeout: expected a positive number, got 'nan'"),
    (["--model", "/nonexistent"], "--model and --tokenizer go together"),
    (["--model", "/nonexistent", "--tokenizer", "/nonexistent"], "--model /nonexistent: no such folder"),
    (["--device", "banana"], "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    (["--num-kv-pages", "0"], "argument --num-kv-pages: expected a positive integer, got '0'"),
    (["--port", "{busy}"], "cannot listen on 127.0.0.1:{busy}: Address already in use"),
])
def test_serve_user_errors_are_one_line_before_anything_loads(argv, says, busy_port, capsys, monkeypatch):
    monkeypatch.setattr(cli, "default_tts_folders", lambda *a: pytest.fail("the default folders were written"))
    monkeypatch.setattr(cli.TTS, "from_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))
    argv = [a.replace("{busy}", str(busy_port)) for a in argv]
    try:
        code = cli.main(["serve", *argv])
    except SystemExit as exc:                 # argparse's errors exit from the parser
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2, err
    assert re.fullmatch(rf"stepvox: error: .*{says.replace('{busy}', str(busy_port))}.*\n", err), err
    assert out == ""


# ---------------------------------------------------------------- the openai client
@pytest.mark.parametrize("fmt, rate", [("wav", 22050), ("mp3", 24000), ("flac", 16000), ("opus", 48000),
                                       ("pcm", 24000)])
def test_openai_client_speech_decodes_in_the_format_and_rate_asked(server, fmt, rate):
    extra = {**SMALL, "sample_rate": rate}
    audio = server.openai().audio.speech.create(model="tts-1", voice="Tingting", input="Hello there.",
                                                response_format=fmt, extra_body=extra)
    samples, got_rate = decode(audio.content, fmt, pcm_rate=rate)
    assert got_rate == rate
    assert samples.ndim == 1 and 0.3 < samples.size / rate < 1.0 and np.abs(samples).max() > 0
    assert audio.response.headers["x-sample-rate"] == str(rate)


def test_openai_client_streams_with_a_custom_voice_object_and_instructions(server):
    client = server.openai()
    start = time.perf_counter()
    arrivals, data = [], b""
    with client.audio.speech.with_streaming_response.create(
            model="stepvox-tiny-tts", voice={"id": "Tingting"}, input="Hello there, how are you today?",
            instructions="Speak in a cheerful tone, in Cantonese", response_format="wav",
            extra_body={"max_tokens": 300, "seed": 2}) as response:
        assert response.headers["content-type"] == "audio/wav"
        assert urllib.parse.unquote(response.headers["x-stepvox-tags"]) == "(高兴1)(粤语)"
        for chunk in response.iter_bytes():
            arrivals.append(time.perf_counter() - start)
            data += chunk
    samples, rate = decode(data, "wav")
    assert rate == 22050 and samples.size / rate > 3.0
    # the first audio left while the rest was being made (~7 s of speech in growing decoder chunks)
    assert len(arrivals) >= 3 and arrivals[0] < 0.6 * arrivals[-1], arrivals


def test_speed_is_tempo(server):
    normal = decode(server.speech(response_format="wav")[2], "wav")[0]
    fast = decode(server.speech(response_format="wav", speed=2.0)[2], "wav")[0]
    assert abs(fast.size / normal.size - 0.5) < 0.1


# ---------------------------------------------------------------- server-sent events
def read_sse(data: bytes) -> list[dict]:
    events = []
    for block in data.decode().split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            events.append(json.loads(block[len("data: "):]))
    return events


def test_sse_deltas_concatenate_to_the_same_audio(server):
    fields = dict(input="Hello there. Nice to meet you.", response_format="pcm", max_tokens=40, seed=7)
    status, headers, raw = server.speech(**fields)
    assert status == 200 and headers["content-type"] == "audio/pcm"
    status, headers, body = server.speech(**fields, stream_format="sse")
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = read_sse(body)
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    assert len(deltas) >= 2 and events[-1]["type"] == "speech.audio.done" and len(events) == len(deltas) + 1
    audio = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    assert len(audio) == len(raw) and len(audio) > 0
    usage = events[-1]["usage"]
    assert usage["input_tokens"] > 0 and 0 < usage["output_tokens"] <= 2 * 40
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert events[-1]["stepvox"]["audio_seconds"] == pytest.approx(len(audio) / 2 / 24000, abs=0.01)


# ---------------------------------------------------------------- voices
def test_voice_uploaded_is_listed_used_survives_a_restart_and_is_deleted(server, reference, voices_dir, request):
    status, _, body = upload_voice(server, "alice", reference)
    assert status == 201 and json.loads(body) == {"id": "alice", "object": "voice", "name": "alice",
                                                  "type": "registered"}
    listed = json.loads(server.request("GET", "/v1/audio/voices")[2])["data"]
    assert {"id": "alice", "object": "voice", "name": "alice", "type": "registered"} in listed
    assert {"id": "Tingting", "object": "voice", "name": "Tingting", "type": "builtin"} in listed
    audio = server.openai().audio.speech.create(model="tts-1", voice="alice", input="Hi.", response_format="wav",
                                                extra_body=SMALL)
    assert decode(audio.content, "wav")[0].size > 0
    assert (voices_dir / "alice.json").is_file()

    restarted = request.getfixturevalue("restarted")             # another process, the same voices folder
    names = [v["id"] for v in json.loads(restarted.request("GET", "/v1/audio/voices")[2])["data"]]
    assert "alice" in names
    assert restarted.speech(voice="alice", response_format="wav")[0] == 200
    status, _, body = restarted.request("DELETE", "/v1/audio/voices/alice")
    assert status == 200 and json.loads(body) == {"id": "alice", "object": "voice", "deleted": True}
    assert not any(p.name.startswith("alice.") for p in voices_dir.iterdir())
    assert_error(restarted.speech(voice="alice"), 404, "voice_not_found", "voice", "unknown voice 'alice'")
    assert_error(restarted.request("DELETE", "/v1/audio/voices/alice"), 404, "voice_not_found", "name")


def test_one_off_clone_from_base64_reference(server, reference):
    status, headers, body = server.speech(response_format="wav", ref_audio=base64.b64encode(reference).decode(),
                                          ref_text="this is my voice, please clone it")
    assert status == 200 and decode(body, "wav")[0].size > 0


# ---------------------------------------------------------------- errors
BAD_FIELDS = [
    ({"speed": 3}, "speed", r"speed: Input should be less than or equal to 2"),
    ({"response_format": "aac"}, "response_format", "response_format: Input should be"),
    ({"emtion": "高兴1"}, "emtion", "emtion: Extra inputs are not permitted"),
    ({"sample_rate": 8000}, "sample_rate", "sample_rate: Input should be 16000"),
    ({"response_format": "opus", "sample_rate": 22050}, "sample_rate", r"Opus codes \(16000, 24000, 48000\)"),
    ({"seed": -1}, "seed", "seed: Input should be greater than or equal to 0"),
    ({"seed": True}, "seed", "seed: Input should be a valid integer"),
    ({"mode": "opera"}, "mode", "mode: Input should be 'normal', 'rap' or 'humming'"),
    ({"emotion": "(高兴1)"}, "emotion", "a tag is one word without parentheses"),
    ({"volume": -1}, "volume", "volume: Input should be greater than or equal to 0"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens: Input should be greater than or equal to 1"),
    ({"voice": 3}, "voice", "voice: Input should be a valid string"),
    ({"input": ""}, "input", "input: String should have at least 1 character"),
    ({"ref_audio": "AAAA"}, "ref_text", "ref_audio and ref_text go together"),
]


@pytest.mark.parametrize("fields, param, says", BAD_FIELDS, ids=[b[1] + "-" + str(i) for i, b in enumerate(BAD_FIELDS)])
def test_a_bad_field_is_422_naming_it(server, fields, param, says):
    assert_error(server.speech(**fields), 422, "invalid_value", param, says)


def test_request_errors(server, reference):
    assert_error(server.speech(voice="Nobody"), 404, "voice_not_found", "voice",
                 r"unknown voice 'Nobody'; known voices: \['Tingting'")
    assert_error(server.speech(model="gpt-5"), 404, "model_not_found", "model", "this server serves")
    assert_error(server.speech(input="x" * (MAX_TEXT_CHARS + 1)), 400, "text_too_long", "input",
                 f"at most {MAX_TEXT_CHARS} per request")
    assert_error(server.speech(input="   "), 400, "invalid_value", "input", "the text to speak is empty")
    assert_error(server.post_json("/v1/audio/speech", b"{not json"), 400, "invalid_json", None, "not valid JSON")
    assert_error(server.request("GET", "/v1/nothing"), 404, "not_found", None)
    # reference audio: not base64, not audio, too long, too short
    assert_error(server.speech(ref_audio="@@@", ref_text="t"), 400, "invalid_audio", "ref_audio", "not base64")
    assert_error(server.speech(ref_audio=base64.b64encode(b"RIFF, but not audio").decode(), ref_text="t"),
                 400, "invalid_audio", "ref_audio", "not an audio file")
    assert_error(server.speech(ref_audio=base64.b64encode(wav_bytes(MAX_REFERENCE_S + 1)).decode(), ref_text="t"),
                 400, "audio_too_long", "ref_audio", f"at most {MAX_REFERENCE_S} s")
    assert_error(server.speech(ref_audio=base64.b64encode(wav_bytes(0.4)).decode(), ref_text="t"),
                 400, "invalid_audio", "ref_audio", "at least 1 s")
    # voices
    assert_error(upload_voice(server, "bob", b"not audio at all"), 400, "invalid_audio", "audio", "not an audio file")
    assert_error(upload_voice(server, "Tingting", reference), 409, "voice_exists", "name")
    assert_error(upload_voice(server, "bad/name", reference), 422, "invalid_value", "name", "a voice name is")
    body, content_type = multipart({"name": "carol"}, {"audio": ("ref.wav", reference)})
    assert_error(server.request("POST", "/v1/audio/voices", body, {"Content-Type": content_type}),
                 422, "invalid_value", "transcript", "transcript: Field required")
    assert_error(server.request("DELETE", "/v1/audio/voices/Tingting"), 400, "voice_builtin", "name")
    assert_error(server.request("DELETE", "/v1/audio/voices/nobody"), 404, "voice_not_found", "name")


def hostile_flac() -> bytes:
    """170 KB of FLAC that would decode to 629 MB: 655350 Hz x 8 channels x 30 s of silence."""
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", 655350, 8, format="FLAC") as f:
        block = np.zeros((655350, 8), np.int16)
        for _ in range(30):
            f.write(block)
    return buf.getvalue()


def test_reference_audio_is_refused_from_its_header_before_decoding(server):
    bomb = hostile_flac()
    assert len(bomb) < 512 * 1024
    t0 = time.perf_counter()
    assert_error(upload_voice(server, "bomb", bomb), 400, "invalid_audio", "audio", "sample rate 655350 Hz")
    assert_error(server.speech(ref_audio=base64.b64encode(bomb).decode(), ref_text="t"), 400, "invalid_audio",
                 "ref_audio", "sample rate 655350 Hz")
    assert time.perf_counter() - t0 < 2.0
    nine = io.BytesIO()
    sf.write(nine, np.zeros((16000, 9), np.float32), 16000, format="WAV", subtype="PCM_16")
    assert_error(upload_voice(server, "nine", nine.getvalue()), 400, "invalid_audio", "audio", "9 channels; at most 8")
    low = io.BytesIO()
    sf.write(low, np.zeros(16000, np.float32), 8000, format="WAV", subtype="PCM_16")
    assert_error(upload_voice(server, "low", low.getvalue()), 400, "invalid_audio", "audio", "below 16000 Hz")
    voices = json.loads(server.request("GET", "/v1/audio/voices")[2])["data"]
    assert not {"bomb", "nine", "low"} & {v["id"] for v in voices}
    assert server.health()["status_code"] == 200


def test_voice_names_are_whole_and_one_of_two_concurrent_uploads_wins(server, reference):
    assert_error(upload_voice(server, "bob\n", reference), 422, "invalid_value", "name", "a voice name is")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: upload_voice(server, "twin", reference), range(2)))
    try:
        assert sorted(status for status, _, _ in results) == [201, 409], results
        conflict = next(r for r in results if r[0] == 409)
        assert_error(conflict, 409, "voice_exists", "name", "'twin' exists")
    finally:
        assert server.request("DELETE", "/v1/audio/voices/twin")[0] == 200


def test_body_size_limit_by_length_and_while_chunked(server):
    big = json.dumps({"input": "hi", "ref_audio": "A" * (1 << 20), "ref_text": "t"}).encode()
    assert_error(server.post_json("/v1/audio/speech", big), 413, "body_too_large", None, "larger than 1048576 bytes")
    # no Content-Length: the body arrives in chunks and is refused once past the limit
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request("POST", "/v1/audio/speech", body=iter([big[i:i + 65536] for i in range(0, len(big), 65536)]),
                     headers={"Content-Type": "application/json"}, encode_chunked=True)
        resp = conn.getresponse()
        assert_error((resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()), 413, "body_too_large")
    finally:
        conn.close()


def test_api_key(restarted):
    no_key = Server(restarted.proc, restarted.port, restarted.log_path)
    _, headers = assert_error(no_key.speech(), 401, "missing_api_key", None, "Authorization: Bearer")
    assert headers["www-authenticate"] == "Bearer"
    assert_error(no_key.post_json("/v1/audio/speech", {"input": "hi"}, headers={"Authorization": "Bearer wrong"}),
                 401, "invalid_api_key", None, "incorrect API key")
    assert_error(no_key.request("GET", "/v1/audio/voices", headers={"Authorization": "Bearer wrong"}),
                 401, "invalid_api_key")
    assert no_key.health()["status_code"] == 200 and no_key.metrics()    # health and metrics stay open
    with pytest.raises(APIStatusError) as info:
        no_key.openai().audio.speech.create(model="tts-1", voice="Tingting", input="hi")
    assert info.value.status_code == 401
    assert restarted.speech(response_format="pcm")[0] == 200


def test_engine_failure_is_500_naming_the_request_and_the_server_goes_on(restarted):
    error, headers = assert_error(restarted.speech(input=FAULT), 500, "internal_error", None,
                                  "RuntimeError: injected engine fault")
    assert error["type"] == "server_error" and headers["x-request-id"] in error["message"]
    assert headers["x-request-id"] in restarted.log()             # the traceback is logged under that id
    assert restarted.speech(response_format="wav")[0] == 200
    assert restarted.health()["status_code"] == 200


def test_a_failure_after_the_first_audio_ends_the_stream(restarted):
    # server-sent events: an error event last
    with restarted.stream({"input": FAULT_LATER, "max_tokens": 100, "seed": 1, "response_format": "pcm",
                           "stream_format": "sse"}) as resp:
        assert resp.status == 200
        events = read_sse(resp.read())
        request_id = resp.getheader("x-request-id")
    assert [e["type"] for e in events] == ["speech.audio.delta", "error"]
    error = events[-1]["error"]
    assert error["code"] == "internal_error" and error["type"] == "server_error" and request_id in error["message"]
    # raw audio: the body is cut off without its end, which the client sees
    with restarted.stream({"input": FAULT_LATER, "max_tokens": 100, "seed": 1, "response_format": "pcm"}) as resp:
        assert resp.status == 200
        with pytest.raises(http.client.IncompleteRead):
            resp.read()
    assert pages_back_s(restarted) < 2.0 and restarted.health()["status_code"] == 200
    assert restarted.speech(response_format="wav")[0] == 200


def test_queue_full_is_429_with_retry_after(restarted):
    """max_concurrent 1, max_queue 1: one running, one waiting, the third refused at once."""
    # ~800 LM tokens, ~19 s of speech: seconds of work, so it runs all through the test
    long = {"input": "Hello there.", "max_tokens": 800, "seed": 3, "response_format": "pcm"}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        with restarted.stream(long) as running:
            assert running.status == 200 and running.read1(65536)
            waiting = pool.submit(restarted.speech)
            deadline = time.monotonic() + 30
            while restarted.health()["requests_waiting"] != 1:
                assert time.monotonic() < deadline and not waiting.done()
                time.sleep(0.05)
            t0 = time.perf_counter()
            _, headers = assert_error(restarted.speech(), 429, "queue_full", None, "the server is busy")
            assert time.perf_counter() - t0 < 1.0 and headers["retry-after"] == "1"
            assert not waiting.done()
        # the running request's client has gone: its slot goes to the waiting one
        assert waiting.result(timeout=60)[0] == 200


def test_error_mapping_of_typed_errors():
    from stepvox.engine.errors import KVCacheExhaustedError
    from stepvox.engine.pipelines.voices import VoiceExistsError
    from stepvox.server.errors import from_exception
    too_big = from_exception(KVCacheExhaustedError("request r1 needs 300 KV pages"), "req_x")
    assert (too_big.status, too_big.param, too_big.type) == (400, "max_tokens", "invalid_request_error")
    exists = from_exception(VoiceExistsError("a voice named 'a' exists"), "req_x")
    assert (exists.status, exists.param, exists.code) == (409, "name", "voice_exists")


def test_an_unexpected_500_carries_the_request_id():
    """Starlette answers an unhandled exception outside every middleware: the handler adds the id."""
    import asyncio

    from fastapi import FastAPI

    from stepvox.server.app import RequestIdMiddleware
    from stepvox.server.errors import install

    class Counter:
        def labels(self, *a):
            return self

        def inc(self, *a):
            pass

    class Metrics:
        errors = http_requests = Counter()

    app = FastAPI()
    install(app, Metrics())

    @app.get("/boom")
    async def boom():
        raise ZeroDivisionError("a bug")

    app.add_middleware(RequestIdMiddleware, metrics=Metrics())
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "path": "/boom",
             "raw_path": b"/boom", "query_string": b"", "headers": [], "scheme": "http", "server": ("t", 80),
             "client": ("c", 1), "root_path": "", "state": {}}
    with pytest.raises(ZeroDivisionError):          # re-raised for the server's log, after the response
        asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    body = json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))
    assert start["status"] == 500 and headers["x-request-id"].startswith("req_")
    assert body["error"]["code"] == "internal_error" and headers["x-request-id"] in body["error"]["message"]


# ---------------------------------------------------------------- disconnects, metrics, load
@pytest.mark.parametrize("stream_format", ["audio", "sse"])
def test_a_disconnect_mid_stream_returns_every_kv_page(server, stream_format):
    before = server.health()
    assert before["kv_free_pages"] == before["kv_total_pages"]
    key = ("stepvox_speech_requests_total", (("outcome", "cancelled"), ("response_format", "pcm"),
                                             ("stream_format", stream_format)))
    cancelled = server.metrics().get(key, 0)
    with server.stream({"input": "Hello there.", "max_tokens": 4000, "seed": 5, "response_format": "pcm",
                        "stream_format": stream_format}) as resp:
        assert resp.status == 200 and resp.read1(65536)                    # the first audio
        during = server.health()
        assert during["kv_free_pages"] < during["kv_total_pages"] and during["requests_running"] == 1
    freed_s = pages_back_s(server)                                         # the connection is closed here
    assert freed_s < 2.0, freed_s
    print(f"pages back {1e3 * freed_s:.0f} ms after the disconnect")
    after = server.metrics()
    assert after[key] == cancelled + 1
    assert after[("stepvox_kv_free_pages", ())] == after[("stepvox_kv_total_pages", ())]


def test_metrics_parse_and_count_requests(server):
    key = ("stepvox_speech_requests_total", (("outcome", "ok"), ("response_format", "wav"),
                                             ("stream_format", "audio")))
    before = server.metrics()
    for _ in range(2):
        assert server.speech(response_format="wav")[0] == 200
    assert_error(server.speech(voice="Nobody"), 404, "voice_not_found", "voice")
    after = server.metrics()
    assert after[key] - before.get(key, 0) == 2
    first_audio = ("stepvox_time_to_first_audio_seconds_count", ())
    assert after[first_audio] - before[first_audio] == 2
    assert after[("stepvox_audio_seconds_total", ())] > before[("stepvox_audio_seconds_total", ())]
    assert after[("stepvox_real_time_factor_count", ())] - before[("stepvox_real_time_factor_count", ())] == 2
    assert after[("stepvox_lm_time_to_first_token_seconds_count", ())] >= 2
    assert after[("stepvox_lm_time_per_output_token_seconds_count", ())] >= 2
    errors = ("stepvox_errors_total", (("code", "voice_not_found"), ("type", "invalid_request_error")))
    assert after[errors] - before.get(errors, 0) == 1
    route = ("stepvox_http_requests_total", (("method", "POST"), ("route", "/v1/audio/speech"), ("status", "200")))
    assert after[route] - before[route] == 2
    for gauge in ("stepvox_requests_running", "stepvox_requests_waiting", "stepvox_kv_cache_usage_ratio",
                  "stepvox_lm_requests_running", "stepvox_lm_requests_waiting"):
        assert after[(gauge, ())] == 0, gauge
    assert after[("stepvox_engine_alive", ())] == 1
    steps = {k: after.get(("stepvox_engine_step_seconds_count", (("kind", k),)), 0)
             - before.get(("stepvox_engine_step_seconds_count", (("kind", k),)), 0) for k in ("decode", "prefill")}
    assert steps["decode"] > 0 and steps["prefill"] >= 2          # each request's prompt, then its decodes
    inf = after[("stepvox_engine_step_seconds_bucket", (("kind", "decode"), ("le", "+Inf")))]
    assert inf == after[("stepvox_engine_step_seconds_count", (("kind", "decode"),))]


def test_32_concurrent_streams_all_complete(server):
    def one(i: int):
        with server.stream({"input": f"Hello number {i}.", "max_tokens": 15, "seed": i, "response_format": "pcm",
                            "stream_format": "sse" if i % 2 else "audio"}, timeout=300) as resp:
            return resp.status, resp.read()

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    elapsed = time.perf_counter() - t0
    assert [status for status, _ in results] == [200] * 32
    for i, (_, body) in enumerate(results):
        if i % 2:
            assert read_sse(body)[-1]["type"] == "speech.audio.done"
        else:
            assert len(body) > 0 and len(body) % 2 == 0
    health = server.health()
    assert health["requests_running"] == 0 and health["kv_free_pages"] == health["kv_total_pages"]
    print(f"32 concurrent streams in {elapsed:.1f} s")


# ---------------------------------------------------------------- shutdown
def test_sigterm_finishes_in_flight_stops_accepting_and_exits_0(restarted):
    """Last: it stops the restarted server."""
    got = {}
    started = threading.Event()

    def in_flight():          # ~800 LM tokens, ~19 s of speech: seconds of work
        with restarted.stream({"input": "Hello there.", "max_tokens": 800, "seed": 4, "response_format": "pcm"},
                              timeout=120) as resp:
            got["status"], got["first"] = resp.status, resp.read1(65536)
            started.set()
            got["rest"] = resp.read()
            got["done_at"] = time.monotonic()

    thread = threading.Thread(target=in_flight)
    thread.start()
    assert started.wait(60)
    t0 = time.monotonic()
    restarted.proc.send_signal(signal.SIGTERM)
    while True:               # the server stops accepting connections at once...
        try:
            still = restarted.health()
        except (ConnectionRefusedError, ConnectionResetError):   # reset: accepted into the backlog as it closed
            refused_at = time.monotonic()
            break
        assert time.monotonic() - t0 < 5, still
        time.sleep(0.02)
    thread.join(60)
    # ... while the request in flight goes on to its end
    assert got["status"] == 200 and got["done_at"] > refused_at
    assert (len(got["first"]) + len(got["rest"])) / 2 / 24000 > 10
    assert restarted.proc.wait(30) == 0
    print(f"SIGTERM: refused new connections after {1e3 * (refused_at - t0):.0f} ms, finished the stream in flight "
          f"{got['done_at'] - t0:.1f} s after it, exited 0 {time.monotonic() - t0:.1f} s after it")
    log = restarted.log()
    assert "Traceback" not in log.split("Shutting down")[-1], log
