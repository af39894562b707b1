"""Load generator for `stepvox serve`: streamed speech requests against a running server (--url), or
against one it starts itself (--start: `stepvox serve` on a free port, given --model / --tokenizer /
--speakers, the released-shape random folders of bench/tts.py with --folders, or the server's tiny
default; stopped with SIGTERM at the end).

Every request POSTs /v1/audio/speech with response_format pcm (raw 16-bit mono, streamed as chunked
transfer), `sample_rate` 22050 by default (the decoder's own rate: no resampling on the server, so
the figures are the server's and not soxr's), `max_tokens` audio tokens (random weights do not stop
on their own, and the server has no ignore_eos), a `seed`, and a new 20-character text each (the
texts of bench/tts.py: one sentence, so one LM segment). The client is stdlib only (asyncio streams,
HTTP/1.1 by hand): each HTTP chunk is timestamped as it arrives.

Workloads
  sweep    closed loop: C clients (--concurrency, default 1,8,32,64), each sending --requests
           requests one after another on a kept-alive connection (--requests-c1 at C = 1, where the
           overhead is measured); a client stops starting new ones after --workload-cap seconds.
  poisson  open loop: requests arrive at --rate per second (Poisson, seeded; a list runs each) for
           --duration seconds, each on a new connection; then the last ones are waited for. The
           default rate `auto` is --auto-fractions (0.5, 0.8) of the best requests/s of the sweep,
           so that one run on an unknown card loads it below and near its capacity.
Before them, --warmup requests one at a time (not counted: the first compiles and captures graphs).

Figures per workload
  first audio   p50 / p90 / p99 ms from writing the request (connecting included, when it connects) to
                the arrival of the first audio bytes
  RTF           request time (send to last byte) / seconds of audio received, p50 / p90
  audio s/s     seconds of audio received by all requests / wall time of the workload
  underruns     chunks that arrived after the audio received before them would have finished
                playing, counting from the first chunk's arrival (a player that starts at the
                first chunk and never pauses); also the requests with at least one, and the stall
                seconds of a player that pauses and resumes
  errors        by HTTP status and error code, or the transport failure (connect, broken stream,
                timeout)
  server view   from /metrics scraped around the workload: mean time to first audio as the server
                sees it (route arrival to first chunk ready), mean RTF, mean LM time to first token

--in-process-baseline: in a subprocess (before the server starts, so they never share the GPU), the
same folders and engine options through the in-process API, `stepvox.TTS.from_pretrained` then
`TTS.astream` with the same texts, seeds and parameters as the warm-up and the C = 1 requests:
first audio from calling astream() to its first chunk. The server overhead at C = 1 is the median
of the paired differences (same text, same seed); the goal is <= 5 ms. Beside it, the HTTP part
alone: the client's mean first audio at C = 1 minus the server's own (/metrics) for the same requests.

Every phase prints a flushed line with the elapsed time; a failing section is recorded and the
others still run; the JSON is rewritten after each workload, so a run cut short leaves what it
measured. Prints a table last; JSON to $OUT/serve.json (or --out DIR), with every request's chunk
arrival times and sizes.

  python bench/serve.py --start --folders /tmp/serve-folders --in-process-baseline   # the GPU run
  python bench/serve.py --url http://127.0.0.1:8000 --concurrency 1,8 --rate 2,4       # a running server
  python bench/serve.py --smoke                 # tiny default folders on the CPU, ~1 min: catches errors
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse

from _util import fmt, guarded, parse_args_or_work, parse_list, percentile, print_table, write_json

BENCH = os.path.dirname(os.path.abspath(__file__))
SPEECH = "/v1/audio/speech"
START = time.perf_counter()
TEXT_CHARS = 20
NATIVE_RATE = 22050            # CosyVoice-300M-25Hz's output rate
SERVER_METRICS = ("stepvox_time_to_first_audio_seconds_sum", "stepvox_time_to_first_audio_seconds_count",
                  "stepvox_real_time_factor_sum", "stepvox_real_time_factor_count", "stepvox_audio_seconds_total",
                  "stepvox_lm_time_to_first_token_seconds_sum", "stepvox_lm_time_to_first_token_seconds_count")


def log(message: str) -> None:
    """One flushed line per phase with the time since start: a slow phase on the device shows where it is."""
    print(f"[{time.perf_counter() - START:7.1f} s] {message}", flush=True)


def texts(first: int, n: int) -> list[str]:
    """Texts number first..first+n-1: 19 characters of bench/tts.py's pool and a full stop, each drawn
    from its own seed, so any two workloads (and the baseline) can name the same or different texts."""
    from tts import TEXT_POOL      # bench/tts.py (this folder is on sys.path)
    out = []
    for i in range(first, first + n):
        rng = random.Random(10_000 + i)
        out.append("".join(rng.choice(TEXT_POOL) for _ in range(TEXT_CHARS - 1)) + "。")
    return out


def median(values):
    return percentile(values, 50)


# ----------------------------------------------------------------------------- the HTTP client
class Target:
    def __init__(self, url: str, api_key: str | None):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise SystemExit(f"--url {url}: an http://host:port address (no TLS in this client)")
        self.host, self.port = parts.hostname, parts.port or 80
        self.url = f"http://{self.host}:{self.port}"
        self.api_key = api_key

    def head(self, body_len: int) -> bytes:
        lines = [f"POST {SPEECH} HTTP/1.1", f"Host: {self.host}:{self.port}", "Content-Type: application/json",
                 f"Content-Length: {body_len}", "Accept: */*", "User-Agent: stepvox-bench-serve"]
        if self.api_key:
            lines.append(f"Authorization: Bearer {self.api_key}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
        import http.client
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()


class Connection:
    """One client's HTTP/1.1 connection, kept alive between its requests (reopened after a failure
    or a `Connection: close`)."""

    def __init__(self, target: Target):
        self.target = target
        self.reader = self.writer = None

    async def open(self) -> bool:
        """True when it had to connect."""
        if self.writer is not None and not self.writer.is_closing() and not self.reader.at_eof():
            return False
        self.close()
        self.reader, self.writer = await asyncio.open_connection(self.target.host, self.target.port)
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return True

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def _read_head(reader) -> tuple[int, dict[str, str]]:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionResetError("the server closed the connection before answering")
    parts = status_line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
        raise ConnectionError(f"not an HTTP status line: {status_line[:80]!r}")
    headers = {}
    while True:
        line = await reader.readline()
        if not line:
            raise asyncio.IncompleteReadError(b"", None)
        if line in (b"\r\n", b"\n"):
            return int(parts[1]), headers
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()


async def read_chunks(reader):
    """A chunked transfer's body: each chunk's bytes as it arrives; the trailers are read at the end."""
    while True:
        line = await reader.readline()
        if not line:
            raise asyncio.IncompleteReadError(b"", None)
        size = int(line.split(b";")[0].strip(), 16)
        if size == 0:
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):      # trailers
                pass
            return
        yield (await reader.readexactly(size + 2))[:-2]


async def speech(conn: Connection, payload: dict, timeout: float) -> dict:
    """One streamed request: status, the arrival of each body chunk (seconds from the start) and its
    bytes, or the failure. The start is taken before connecting, when it connects."""
    body = json.dumps(payload, ensure_ascii=False).encode()
    head = conn.target.head(len(body))
    r = dict(status=None, error=None, chunks=[], rate=None)
    t0 = time.perf_counter()

    async def run():
        r["connected"] = await conn.open()
        conn.writer.write(head + body)
        await conn.writer.drain()
        reader = conn.reader
        status, headers = await _read_head(reader)
        r["status"] = status
        r["rate"] = int(headers["x-sample-rate"]) if "x-sample-rate" in headers else None
        r["request_id"] = headers.get("x-request-id")
        keep = headers.get("connection", "").lower() != "close"
        if headers.get("transfer-encoding", "").lower() == "chunked":
            async for data in read_chunks(reader):
                r["chunks"].append((time.perf_counter() - t0, len(data)))
                if status != 200 and len(r.setdefault("body", b"")) < 4096:
                    r["body"] += data
        elif "content-length" in headers:
            data = await reader.readexactly(int(headers["content-length"]))
            if status == 200:
                r["chunks"].append((time.perf_counter() - t0, len(data)))
            else:
                r["body"] = data[:4096]
        else:
            data = await reader.read()
            keep = False
            if status == 200 and data:
                r["chunks"].append((time.perf_counter() - t0, len(data)))
            else:
                r["body"] = data[:4096]
        if not keep:
            conn.close()

    try:
        await asyncio.wait_for(run(), timeout)
    except asyncio.TimeoutError:
        r["error"] = "timeout"
        conn.close()
    except asyncio.IncompleteReadError:
        r["error"] = "broken stream" if r["status"] is not None else "no answer"
        conn.close()
    except (OSError, ConnectionError, ValueError) as exc:
        r["error"] = f"connection: {type(exc).__name__}"
        conn.close()
    r["total_s"] = time.perf_counter() - t0
    if r["error"] is None and r["status"] != 200:
        code = None
        with contextlib.suppress(Exception):
            code = json.loads(r["body"])["error"].get("code")
        r["error"] = f"{r['status']} {code or ''}".strip()
    r.pop("body", None)
    return r


def request_figures(r: dict, rate_asked: int) -> dict:
    """First audio, audio seconds, RTF and underruns of one finished request."""
    rate = r.get("rate") or rate_asked
    chunks = r.pop("chunks")
    out = dict(status=r["status"], error=r["error"], total_ms=r["total_s"] * 1e3, connected=r.get("connected"),
               n_chunks=len(chunks), chunk_ms=[round(t * 1e3, 2) for t, _ in chunks],
               chunk_bytes=[n for _, n in chunks],
               request_id=r.get("request_id"), text_index=r.get("text_index"))
    if r["error"] is not None or not chunks:
        if r["error"] is None:
            out["error"] = "no audio"
        return out
    seconds = [n / 2 / rate for _, n in chunks]
    t_first = chunks[0][0]
    received, late, stall, play_end = 0.0, 0, 0.0, t_first
    for (t, _), dur in zip(chunks, seconds):
        if t > t_first + received + 1e-9 and received > 0:
            late += 1              # a player started at the first chunk has run dry before this one came
        if t > play_end:
            stall += t - play_end  # a player that pauses until the next chunk and goes on
            play_end = t
        play_end += dur
        received += dur
    out.update(first_audio_ms=t_first * 1e3, audio_s=received, rtf=r["total_s"] / received, underruns=late,
               stall_s=stall)
    return out


# ----------------------------------------------------------------------------- workloads
class Workloads:
    def __init__(self, target: Target, args):
        self.target, self.args = target, args
        self.next_text = 0

    def payload(self, index: int, text: str) -> dict:
        a = self.args
        p = {"input": text, "response_format": "pcm", "sample_rate": a.sample_rate, "max_tokens": a.tokens,
             "seed": index, "voice": a.voice, "temperature": a.temperature}
        if a.model_field:
            p["model"] = a.model_field
        return p

    def take(self, n: int) -> list[tuple[int, str]]:
        first = self.next_text
        self.next_text += n
        return list(zip(range(first, first + n), texts(first, n)))

    async def one(self, conn: Connection, index: int, text: str) -> dict:
        r = await speech(conn, self.payload(index, text), self.args.request_timeout)
        r["text_index"] = index
        return request_figures(r, self.args.sample_rate)

    async def sequential(self, items: list[tuple[int, str]], label: str) -> list[dict]:
        conn, out = Connection(self.target), []
        for k, (index, text) in enumerate(items):
            out.append(await self.one(conn, index, text))
            f = out[-1]
            shown = (f"first audio {f['first_audio_ms']:.1f} ms, total {f['total_ms']:.0f} ms, {f['audio_s']:.2f} s "
                     "of audio" if f["error"] is None else f"error {f['error']}")
            log(f"{label} {k + 1}/{len(items)}: {shown}")
        conn.close()
        return out

    async def closed_loop(self, clients: int, per_client: int) -> tuple[list[dict], float]:
        items = self.take(clients * per_client)
        queues = [items[c::clients] for c in range(clients)]
        cap = self.args.workload_cap
        results: list[dict] = []
        t_start = time.perf_counter()
        skipped = 0

        async def client(mine):
            nonlocal skipped
            conn = Connection(self.target)
            try:
                for k, (index, text) in enumerate(mine):
                    if time.perf_counter() - t_start > cap:
                        skipped += len(mine) - k
                        return
                    results.append(await self.one(conn, index, text))
            finally:
                conn.close()

        await asyncio.gather(*(client(q) for q in queues))
        if skipped:
            log(f"   --workload-cap {cap:g} s reached: {skipped} requests not started")
        return results, time.perf_counter() - t_start

    async def poisson(self, rate: float, duration: float, seed: int) -> tuple[list[dict], float]:
        arrivals = poisson_arrivals(rate, duration, seed)
        items = self.take(len(arrivals))
        tasks = []
        t_start = time.perf_counter()

        async def fresh(index, text):
            conn = Connection(self.target)
            try:
                return await self.one(conn, index, text)
            finally:
                conn.close()

        for at, (index, text) in zip(arrivals, items):
            delay = t_start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(fresh(index, text)))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - t_start


def poisson_arrivals(rate: float, duration: float, seed: int) -> list[float]:
    """Arrival times in [0, duration) s of a Poisson process of `rate` per second, seeded."""
    rng = random.Random(seed)
    times, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return times
        times.append(t)


def summarize(name: str, results: list[dict], wall_s: float, extra: dict | None = None) -> dict:
    ok = [r for r in results if r["error"] is None]
    errors: dict[str, int] = {}
    for r in results:
        if r["error"] is not None:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    first = [r["first_audio_ms"] for r in ok]
    rtf = [r["rtf"] for r in ok]
    audio = sum(r["audio_s"] for r in ok)
    s = dict(workload=name, requests=len(results), ok=len(ok), errors=errors, wall_s=wall_s,
             first_audio_ms={f"p{q}": percentile(first, q) for q in (50, 90, 99)},
             first_audio_mean_ms=sum(first) / len(first) if first else None,
             rtf={f"p{q}": percentile(rtf, q) for q in (50, 90, 99)},
             audio_s=audio, audio_s_per_s=audio / wall_s if wall_s > 0 else None,
             requests_per_s=len(ok) / wall_s if wall_s > 0 else None,
             underrun_chunks=sum(r["underruns"] for r in ok), chunks=sum(r["n_chunks"] for r in ok),
             underrun_requests=sum(1 for r in ok if r["underruns"]),
             stall_s=sum(r["stall_s"] for r in ok),
             audio_s_per_request=median([r["audio_s"] for r in ok]))
    s.update(extra or {})
    s["per_request"] = results
    return s


def scrape(target: Target, names=SERVER_METRICS) -> dict[str, float]:
    """The server's /metrics: the samples of the metrics in `names`, summed over their labels."""
    status, body = target.get("/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    out = {}
    for line in body.decode("utf-8", "replace").splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{")[0]
        if name in names:
            out[name] = out.get(name, 0.0) + float(value)
    return out


def try_scrape(target: Target) -> dict | None:
    """/metrics, or None when it cannot be read (then the workload has no server view)."""
    try:
        return scrape(target)
    except Exception as exc:  # noqa: BLE001 - the load still runs; its requests record the failure
        log(f"   /metrics not read: {type(exc).__name__}: {exc}")
        return None


def server_view(before: dict | None, after: dict | None) -> dict:
    if before is None or after is None:
        return {}
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in SERVER_METRICS}

    def mean(prefix, scale=1.0):
        n = d[prefix + "_count"]
        return d[prefix + "_sum"] / n * scale if n else None

    return dict(server_first_audio_mean_ms=mean("stepvox_time_to_first_audio_seconds", 1e3),
                server_rtf_mean=mean("stepvox_real_time_factor"),
                server_lm_ttft_mean_ms=mean("stepvox_lm_time_to_first_token_seconds", 1e3),
                server_audio_s=d["stepvox_audio_seconds_total"])


# ----------------------------------------------------------------------------- the server process
def child_env() -> dict:
    # a fresh shell's environment: without TRITON_INTERPRET, "auto" kernels on the CPU are the reference ones
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def add_engine_args(group, device_help: str, kernels_help: str | None = None) -> None:
    """The engine's options on the command line; engine_flags and engine_options pass them on."""
    group.add_argument("--device", default=None, help=device_help)
    group.add_argument("--kernels", default=None, choices=("auto", "triton", "reference"), help=kernels_help)
    group.add_argument("--max-model-len", type=int, default=None)
    group.add_argument("--max-num-seqs", type=int, default=None)
    group.add_argument("--num-kv-pages", type=int, default=None)
    group.add_argument("--gpu-memory-utilization", type=float, default=None)
    group.add_argument("--eager", action="store_true", help="no CUDA graphs")


def engine_flags(args) -> list[str]:
    """The engine's options as `stepvox serve` flags."""
    flags = []
    for name in ("device", "kernels", "max_model_len", "max_num_seqs", "num_kv_pages", "gpu_memory_utilization"):
        value = getattr(args, name)
        if value is not None:
            flags += [f"--{name.replace('_', '-')}", str(value)]
    if args.eager:
        flags.append("--eager")
    return flags


def engine_options(args) -> dict:
    """The same options as TTS.from_pretrained arguments (cli.cmd_serve's mapping)."""
    options = {k: v for k, v in dict(kernel_backend=args.kernels, max_model_len=args.max_model_len,
                                     max_num_seqs=args.max_num_seqs, num_kv_pages=args.num_kv_pages,
                                     gpu_memory_utilization=args.gpu_memory_utilization,
                                     enforce_eager=args.eager or None).items() if v is not None}
    return options


def serve_argv(args, folders: dict | None, max_concurrent: int, max_queue: int) -> list[str]:
    """`stepvox serve` arguments: a free port of 127.0.0.1, the folders (none: the server's tiny default)
    and the engine flags of `args`."""
    argv = ["serve", "--host", "127.0.0.1", "--port", "0", "--no-access-log", "--max-concurrent",
            str(max_concurrent), "--max-queue", str(max_queue)]
    if folders:
        argv += ["--model", folders["model"], "--tokenizer", folders["tokenizer"]]
        if folders.get("speakers"):
            argv += ["--speakers", folders["speakers"]]
    return argv + engine_flags(args)


class ServerProcess:
    """A server started as `cmd` (its output to workdir/server.log); wait_ready() finds its address."""

    def __init__(self, cmd: list[str], workdir: str):
        self.log_path = os.path.join(workdir, "server.log")
        self.cmd = cmd
        with open(self.log_path, "w") as f:
            self.proc = subprocess.Popen(cmd, env=child_env(), stdout=f, stderr=subprocess.STDOUT)
        self.url = None

    def tail(self, n: int = 30) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def wait_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while self.url is None:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                found = re.search(r"serving \S+ on (http://127\.0\.0\.1:\d+) ", f.read())
            if found:
                self.url = found.group(1)
            elif self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.tail()}")
            elif time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start in {timeout:g} s:\n{self.tail()}")
            else:
                time.sleep(0.2)
        target = Target(self.url, None)
        while True:
            with contextlib.suppress(OSError):
                if target.get("/health")[0] == 200:
                    return self.url
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"/health did not answer 200 in {timeout:g} s:\n{self.tail()}")
            time.sleep(0.2)

    def stop(self, timeout: float = 90.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"the server did not exit {timeout:g} s after SIGTERM: killed")
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def prepare_released_folders(root: str) -> dict:
    """bench/tts.py's released-shape random folders under `root` (reused when a run completed them),
    written in a subprocess so that this process never holds GPU memory."""
    marker = os.path.join(root, "bench-complete.json")
    if not os.path.exists(marker):
        log(f"writing the released-shape random folders to {root} (bench/tts.py's prepare_folders) ...")
        code = (f"import sys; sys.path.insert(0, {BENCH!r}); import tts; "
                f"tts.prepare_folders({root!r}, False, 'cuda', {{}})")
        subprocess.run([sys.executable, "-c", code], env=child_env(), check=True)
    with open(marker) as f:
        done = json.load(f)
    if done.get("smoke"):
        raise RuntimeError(f"{root} holds bench/tts.py's tiny smoke folders; give another --folders")
    return done["paths"]


# ----------------------------------------------------------------------------- the in-process baseline
def run_baseline(args, folders: dict | None, items: list[tuple[int, str]], warmup: list[tuple[int, str]],
                 workdir: str, res: dict) -> None:
    spec = dict(folders=folders, device=args.device, options=engine_options(args), voice=args.voice,
                tokens=args.tokens, temperature=args.temperature, warmup=warmup, items=items, log_start=START,
                result=os.path.join(workdir, "baseline.json"))
    spec_path = os.path.join(workdir, "baseline-spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f, ensure_ascii=False)
    log(f"in-process baseline: a subprocess loads the TTS and streams {len(warmup)} warm-up + {len(items)} requests")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--baseline-worker", spec_path],
                          env=child_env(), timeout=args.start_timeout + 60 * (len(items) + len(warmup)))
    if proc.returncode != 0:
        raise RuntimeError(f"the baseline worker exited with {proc.returncode}")
    with open(spec["result"]) as f:
        res["baseline"] = json.load(f)


def baseline_worker(spec_path: str) -> None:
    """Runs in the subprocess: TTS.from_pretrained, then astream() per request as the server calls it."""
    global START
    with open(spec_path) as f:
        spec = json.load(f)
    START = spec["log_start"]           # one clock (CLOCK_MONOTONIC) for both processes' lines
    import torch

    from stepvox import TTS
    from stepvox.cli import default_tts_folders
    folders = spec["folders"] or default_tts_folders()
    device = None if spec["device"] in (None, "auto") else spec["device"]
    t0 = time.perf_counter()
    tts = TTS.from_pretrained(folders["model"], folders["tokenizer"], folders.get("speakers"), device=device,
                              **spec["options"])
    out = dict(load_s=time.perf_counter() - t0, sample_rate=tts.sample_rate, device=str(tts.engine.engine.device),
               device_name=torch.cuda.get_device_name() if torch.cuda.is_available() and device != "cpu" else "cpu")
    log(f"baseline: TTS.from_pretrained {out['load_s']:.1f} s on {out['device']}")

    async def one(index: int, text: str) -> dict:
        t = time.perf_counter()
        first, samples = None, 0
        stream = tts.astream(text, spec["voice"], seed=index, temperature=spec["temperature"],
                             max_tokens=spec["tokens"])
        async with contextlib.aclosing(stream):
            async for chunk in stream:
                if first is None:
                    first = time.perf_counter() - t
                samples += chunk.samples.size
        total = time.perf_counter() - t
        audio_s = samples / tts.sample_rate
        return dict(text_index=index, first_audio_ms=first * 1e3 if first is not None else None,
                    total_ms=total * 1e3, audio_s=audio_s, rtf=total / audio_s if audio_s else None)

    async def run():
        for label, key in (("warm-up", "warmup"), ("request", "items")):
            rows = out.setdefault(key, [])
            for k, (index, text) in enumerate(spec[key]):
                rows.append(await one(index, text))
                log(f"baseline {label} {k + 1}/{len(spec[key])}: first audio {rows[-1]['first_audio_ms']:.1f} ms, "
                    f"total {rows[-1]['total_ms']:.0f} ms, {rows[-1]['audio_s']:.2f} s of audio")

    try:
        asyncio.run(run())
    finally:
        tts.shutdown()
    out["first_audio_ms"] = median([r["first_audio_ms"] for r in out["items"]])
    out["rtf"] = median([r["rtf"] for r in out["items"] if r["rtf"]])
    with open(spec["result"], "w") as f:
        json.dump(out, f)


# ----------------------------------------------------------------------------- report
def workload_rows(res: dict) -> list[dict]:
    rows = []
    for w in res.get("workloads", []):
        fa, rtf = w["first_audio_ms"], w["rtf"]
        rows.append({
            "workload": w["workload"], "reqs ok/all": f"{w['ok']}/{w['requests']}",
            "first audio p50/p90/p99 ms": f"{fmt(fa['p50'])} / {fmt(fa['p90'])} / {fmt(fa['p99'])}",
            "server-side first audio mean ms": fmt(w.get("server_first_audio_mean_ms")),
            "RTF p50/p90": f"{fmt(rtf['p50'], '.3f')} / {fmt(rtf['p90'], '.3f')}",
            "audio s/s": fmt(w["audio_s_per_s"], ".2f"),
            "audio s/req": fmt(w["audio_s_per_request"], ".2f"),
            "underruns chunks (reqs); stall s": f"{w['underrun_chunks']}/{w['chunks']} ({w['underrun_requests']}); "
                                               f"{w['stall_s']:.2f}",
            "wall s": fmt(w["wall_s"]),
            "errors": ", ".join(f"{k}: {v}" for k, v in w["errors"].items()) or "-"})
    return rows


def overhead(res: dict) -> dict | None:
    """Server first audio at C = 1 against the baseline's, paired by text index."""
    base = res.get("baseline")
    c1 = next((w for w in res.get("workloads", []) if w["workload"] == "closed C=1"), None)
    if not base or not c1:
        return None
    ok = {r["text_index"]: r for r in c1["per_request"] if r["error"] is None}
    done = {r["text_index"]: r for r in base["items"] if r["first_audio_ms"] is not None}
    pairs = sorted(set(ok) & set(done))
    ours = {i: ok[i]["first_audio_ms"] for i in pairs}
    theirs = {i: done[i]["first_audio_ms"] for i in pairs}
    diffs = [ours[i] - theirs[i] for i in pairs]
    # same text and seed: the same tokens, so the same audio length (a check that the pairs compare like with like)
    same = sum(1 for i in pairs if abs(ok[i]["audio_s"] - done[i]["audio_s"]) < 1e-3)
    return dict(pairs=len(pairs), same_audio_length=same, paired_median_ms=median(diffs), diffs_ms=diffs,
                server_median_ms=median([ours[i] for i in pairs]),
                baseline_median_ms=median([theirs[i] for i in pairs]),
                goal_ms=5.0, met=(median(diffs) <= 5.0) if diffs else None)


def summary_rows(res: dict) -> list[dict]:
    rows = [dict(metric="device / date (UTC)", value=f"{res['device']} / {res['date']}"),
            dict(metric="requests", value=f"pcm at {res['sample_rate']} Hz, max_tokens {res['tokens']}, voice "
                 f"{res['voice']}, 20-character texts; server {res.get('server_url', '-')}")]
    if "server_start_s" in res:
        rows.append(dict(metric="server start (process to /health 200)", value=f"{res['server_start_s']:.1f} s"))
    warm = res.get("warmup")
    if warm:
        rows.append(dict(metric="server warm-up first audio (ms)",
                         value=", ".join(fmt(r.get("first_audio_ms"), ".0f") for r in warm)))
    base = res.get("baseline")
    if base:
        rows.append(dict(metric=f"in-process baseline: load / first audio median of {len(base.get('items', []))}",
                         value=f"{fmt(base.get('load_s'))} s / {fmt(base.get('first_audio_ms'), '.2f')} ms, "
                               f"RTF {fmt(base.get('rtf'), '.3f')}"))
    ov = res.get("overhead")
    if ov and ov["pairs"]:
        rows.append(dict(metric=f"server overhead at C=1 (median of {ov['pairs']} paired differences)",
                         value=f"{ov['paired_median_ms']:.2f} ms (server {ov['server_median_ms']:.2f} - in-process "
                               f"{ov['baseline_median_ms']:.2f}); goal <= 5 ms: {'met' if ov['met'] else 'NOT met'}; "
                               f"same audio length in {ov['same_audio_length']}/{ov['pairs']} pairs"))
    c1 = next((w for w in res.get("workloads", []) if w["workload"] == "closed C=1"), None)
    if c1 and c1.get("first_audio_mean_ms") is not None and c1.get("server_first_audio_mean_ms") is not None:
        rows.append(dict(metric="HTTP path at C=1: client first audio - server-side (means, same requests)",
                         value=f"{c1['first_audio_mean_ms'] - c1['server_first_audio_mean_ms']:.2f} ms (request "
                               "sent -> route, encode, send, client read)"))
    if "server_exit" in res:
        rows.append(dict(metric="server exit status after SIGTERM", value=str(res["server_exit"])))
    return rows


# ----------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_argument_group("server")
    where.add_argument("--url", help="a running server, http://host:port")
    where.add_argument("--start", action="store_true", help="start `stepvox serve` on a free port (stopped at the end)")
    where.add_argument("--api-key", default=os.environ.get("STEPVOX_API_KEY"), help="for a --url server that wants one")
    where.add_argument("--model", help="Step-Audio-TTS-3B folder (with --tokenizer); default: the tiny default")
    where.add_argument("--tokenizer", help="Step-Audio-Tokenizer folder")
    where.add_argument("--speakers", help="speakers folder")
    where.add_argument("--folders", help="bench/tts.py's released-shape random folders here (written on the GPU "
                       "unless a run completed them); instead of --model / --tokenizer / --speakers")
    add_engine_args(where, "engine device (server and baseline); smoke: cpu")
    where.add_argument("--max-concurrent", type=int, default=64, help="the started server's --max-concurrent")
    where.add_argument("--max-queue", type=int, default=256, help="the started server's --max-queue")
    where.add_argument("--start-timeout", type=float, default=600.0, help="seconds for the server to load")
    load = ap.add_argument_group("load")
    load.add_argument("--smoke", action="store_true", help="tiny default folders on the CPU, C = 1,4, few requests")
    load.add_argument("--concurrency", default=None, help="closed-loop client counts (default 1,8,32,64; smoke 1,4)")
    load.add_argument("--requests", type=int, default=None, help="requests per client (default 4; smoke 2)")
    load.add_argument("--requests-c1", type=int, default=None, help="requests at C = 1 (default 16; smoke 4)")
    load.add_argument("--rate", default=None, help="Poisson arrivals per second, a list runs each; auto: "
                      "--auto-fractions of the sweep's best requests/s (default auto); 0: none")
    load.add_argument("--auto-fractions", default=None, help="for --rate auto (default 0.5,0.8; smoke 0.5)")
    load.add_argument("--duration", type=float, default=None, help="seconds of Poisson arrivals (default 30; smoke 8)")
    load.add_argument("--warmup", type=int, default=None, help="requests before the workloads (default 3; smoke 1)")
    load.add_argument("--workload-cap", type=float, default=60.0,
                      help="a closed-loop client starts no new request after this many seconds of its workload")
    load.add_argument("--request-timeout", type=float, default=300.0)
    load.add_argument("--tokens", type=int, default=None,
                      help="max_tokens: LM tokens per request (default 415 = 9.96 s of audio; smoke 40)")
    load.add_argument("--sample-rate", type=int, default=NATIVE_RATE, help="pcm rate asked for (22050: no resampling)")
    load.add_argument("--voice", default="Tingting")
    load.add_argument("--temperature", type=float, default=0.7)
    load.add_argument("--model-field", default=None, help="the request's `model` field (default: none)")
    load.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrivals")
    load.add_argument("--in-process-baseline", action="store_true",
                      help="first audio of the warm-up and C = 1 requests through stepvox.TTS in a subprocess")
    ap.add_argument("--out", default=None, help="folder for serve.json (default $OUT, else ./out)")
    args = parse_args_or_work(ap, baseline_worker=baseline_worker)
    if args is None:
        return
    if args.out:
        os.environ["OUT"] = args.out
    smoke = args.smoke
    if smoke:
        args.start = True
        args.in_process_baseline = True
        args.device = args.device or "cpu"
    if bool(args.url) == bool(args.start):
        ap.error("give --url of a running server or --start (one of them)")
    if (args.model is None) != (args.tokenizer is None) or (args.folders and args.model):
        ap.error("--model and --tokenizer go together; --folders replaces them")
    concurrency = parse_list(args.concurrency or ("1,4" if smoke else "1,8,32,64"), int)
    rates = [x.strip() for x in (args.rate or "auto").split(",") if x.strip()]
    fractions = parse_list(args.auto_fractions or ("0.5" if smoke else "0.5,0.8"), float)
    args.requests = args.requests or (2 if smoke else 4)
    args.requests_c1 = args.requests_c1 or (4 if smoke else 16)
    args.duration = args.duration or (8.0 if smoke else 30.0)
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 3)
    args.tokens = args.tokens or (40 if smoke else 415)

    res = dict(device="cpu" if args.device == "cpu" else gpu_name(), smoke=smoke,
               date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
               sample_rate=args.sample_rate, tokens=args.tokens, voice=args.voice, concurrency=concurrency,
               rates=rates, requests_per_client=args.requests, requests_c1=args.requests_c1,
               duration_s=args.duration, args=vars(args), workloads=[])
    workdir = tempfile.mkdtemp(prefix="stepvox-bench-serve-")
    log(f"{res['device']}: {args.tokens} LM tokens a request, pcm {args.sample_rate} Hz; sweep {concurrency}, "
        f"Poisson {','.join(rates)} /s for {args.duration:g} s")

    def save():
        res["overhead"] = overhead(res)
        res["table"] = workload_rows(res)
        res["summary"] = summary_rows(res)
        write_json("serve.json", res)

    def section(name, fn):
        """One part; its failure is recorded, and the JSON rewritten after each part."""
        out = guarded(res, name, fn)
        save()
        return out

    server = None
    try:
        folders = None
        if args.model:
            folders = dict(model=args.model, tokenizer=args.tokenizer, speakers=args.speakers)
        elif args.folders:
            folders = section("folders", lambda: prepare_released_folders(args.folders))
            if folders is None:
                return
        res["folders"] = folders or ("the server's tiny default" if args.start else
                                     "a running server's (the baseline's: the tiny default)")
        # text indices: warm-up 0..W-1, C = 1 next (the baseline streams the same ones)
        plan = Workloads(None, args)
        warm_items = plan.take(args.warmup)
        c1_items = plan.take(args.requests_c1) if 1 in concurrency else []
        if args.in_process_baseline:
            if args.url:
                log("note: the baseline loads its own TTS beside the running server (same device: less memory)")
            section("baseline", lambda: run_baseline(args, folders, c1_items, warm_items, workdir, res))
            if res.get("baseline", {}).get("sample_rate", args.sample_rate) != args.sample_rate:
                log(f"note: the decoder's rate is {res['baseline']['sample_rate']} Hz, --sample-rate "
                    f"{args.sample_rate}: the server resamples, the baseline does not")
        if args.start:
            log("starting `stepvox serve` ...")
            t0 = time.perf_counter()
            server = ServerProcess([sys.executable, "-m", "stepvox.cli"]
                                   + serve_argv(args, folders, args.max_concurrent, args.max_queue), workdir)
            url = section("server start", lambda: server.wait_ready(args.start_timeout))
            if url is None:
                return
            res["server_start_s"] = time.perf_counter() - t0
            res["server_command"] = " ".join(server.cmd)
            log(f"server ready at {url} in {res['server_start_s']:.1f} s")
        else:
            url = args.url
        target = Target(url, args.api_key)
        res["server_url"] = url
        health = section("health", lambda: target.get("/health"))
        if health is None:
            return
        res["health_before"] = json.loads(health[1])
        if health[0] != 200:
            res.setdefault("errors", {})["health"] = f"/health answered {health[0]}: {res['health_before']}"
            return
        work = Workloads(target, args)
        work.next_text = plan.next_text

        async def run_all():
            if warm_items:
                log(f"warm-up: {len(warm_items)} requests, one at a time (not counted)")
                try:
                    res["warmup"] = await work.sequential(warm_items, "warm-up")
                except Exception as exc:  # noqa: BLE001 - a benchmark reports every failure and goes on
                    res.setdefault("errors", {})["warmup"] = f"{type(exc).__name__}: {exc}"
                save()
            for c in concurrency:
                per = args.requests_c1 if c == 1 else args.requests
                name = f"closed C={c}"
                log(f"{name}: {c} clients x {per} requests ...")
                try:
                    before = try_scrape(target)
                    if c == 1:
                        t0 = time.perf_counter()
                        results = await work.sequential(c1_items, "C=1")
                        wall = time.perf_counter() - t0
                    else:
                        results, wall = await work.closed_loop(c, per)
                    w = summarize(name, results, wall, dict(clients=c, per_client=per))
                    w.update(server_view(before, try_scrape(target)))
                    res["workloads"].append(w)
                    log(f"{name}: {w['ok']}/{w['requests']} ok in {wall:.1f} s; first audio p50 "
                        f"{fmt(w['first_audio_ms']['p50'])} ms p99 {fmt(w['first_audio_ms']['p99'])} ms; "
                        f"{fmt(w['audio_s_per_s'], '.2f')} audio s/s; errors {w['errors'] or 'none'}")
                except Exception as exc:  # noqa: BLE001 - a benchmark reports every failure and goes on
                    res.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
                    log(f"{name} FAILED: {type(exc).__name__}: {exc}")
                save()
            best = max((w["requests_per_s"] or 0 for w in res["workloads"]), default=0)
            resolved = []
            for spec in rates:
                if spec == "auto":
                    if best > 0:
                        resolved += [round(best * f, 3) for f in fractions]
                    else:
                        log("--rate auto: no closed-loop workload measured a rate; no Poisson workload")
                else:
                    resolved.append(float(spec))
            res["rates"] = resolved
            for rate in resolved:
                if rate <= 0:
                    continue
                name = f"poisson {rate:g}/s"
                log(f"{name} for {args.duration:g} s ...")
                try:
                    before = try_scrape(target)
                    results, wall = await work.poisson(rate, args.duration, args.seed)
                    w = summarize(name, results, wall, dict(rate=rate, duration_s=args.duration))
                    w.update(server_view(before, try_scrape(target)))
                    res["workloads"].append(w)
                    log(f"{name}: {w['ok']}/{w['requests']} ok in {wall:.1f} s; first audio p50 "
                        f"{fmt(w['first_audio_ms']['p50'])} ms p99 {fmt(w['first_audio_ms']['p99'])} ms; "
                        f"{fmt(w['audio_s_per_s'], '.2f')} audio s/s; errors {w['errors'] or 'none'}")
                except Exception as exc:  # noqa: BLE001
                    res.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
                    log(f"{name} FAILED: {type(exc).__name__}: {exc}")
                save()

        asyncio.run(run_all())
        with contextlib.suppress(Exception):
            res["health_after"] = json.loads(target.get("/health")[1])
    finally:
        if server is not None:
            log("stopping the server (SIGTERM) ...")
            res["server_exit"] = server.stop()
            res["server_log_tail"] = server.tail(15)
            log(f"server exited with {res['server_exit']}")
            if res["server_exit"] != 0:
                print(res["server_log_tail"], flush=True)
        save()
        path = os.path.join(os.environ.get("OUT", "out"), "serve.json")
        print(f"\n`stepvox serve` under load on {res['device']} "
              f"({'tiny default folders' if smoke else res.get('folders')}); JSON: {path}")
        if res.get("errors"):
            print("FAILED SECTIONS:", {k: v[:300] for k, v in res["errors"].items()})
        print_table(res["table"], ["workload", "reqs ok/all", "first audio p50/p90/p99 ms",
                                   "server-side first audio mean ms", "RTF p50/p90", "audio s/s", "audio s/req",
                                   "underruns chunks (reqs); stall s", "wall s", "errors"])
        print()
        print_table(res["summary"], ["metric", "value"])
        shutil.rmtree(workdir, ignore_errors=True)


def gpu_name() -> str:
    """The GPU's name from nvidia-smi (this process never touches CUDA: the server and the baseline own it)."""
    with contextlib.suppress(Exception):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    return "cpu"


if __name__ == "__main__":
    main()
