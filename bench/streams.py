"""Many real-time TTS streams on one GPU (issue 19): a concurrency sweep and Poisson arrivals over a
running base load, through the in-process API (TTS.astream) and the server (POST /v1/audio/speech,
streamed pcm), with random weights of the released shapes (bench/tts.py's folders: Step-Audio-TTS-3B
in the released format, its LM head's speech rows scaled so that random weights speak) or, with
--smoke, the tests' tiny random folders on the CPU.

A stream is one listener: it sends a request (a new 20-character text and seed each time, --tokens
audio tokens, ignore_eos in-process; the server has no ignore_eos, random weights do not stop anyway),
plays its audio as it arrives, and sends the next request when one ends (--pace closed: the engine
always holds N requests, the strict bound) or when its audio has finished playing (--pace realtime),
until it has been held --hold seconds; then the request in flight is cancelled (its pages freed) and
the chunks it delivered still count. Stream starts are spread over --ramp seconds.

Per request: first audio = first chunk's arrival - the call (in-process: astream() called; server: the
request written on the stream's kept-alive connection). Chunk k's deadline = the first chunk's arrival
+ the seconds of audio delivered before chunk k; slack = deadline - arrival (chunks after the first);
an underrun = a chunk that arrives after its deadline. Also the stalls of a player that pauses when it
runs dry and resumes with the late chunk (the server's SlackTracker rule: one stall per dry spell).

Workloads (in-process first, in a worker process, then the server, started as `stepvox serve` under
uvicorn in its own process; neither shares the GPU with the other). Defaults on the GPU; --smoke
uses 1,2 streams held 4 s, 40 tokens, a base of 1 and no server Poisson.
  warm-up  --warmup streams x 1 request (not counted: decoder graphs of every window size captured)
  sweep    N = --levels (1,8,16,32,64,100,128) streams held --hold (15) s each, ascending; stops
           after a level where at least --stop-fraction (0.5) of the streams underran. Per level:
           first audio p50/p90/p99, underruns (chunks; streams with one, their fraction), slack
           p1/p50, stalls, audio s/s, the engine's step times, GPU utilization and power. The largest
           N with zero underruns (no errors, every stream heard) is then held again for
           --confirm-hold (60) s (when longer than --hold; a lower one is tried if it fails).
  poisson  --base (32) streams, one long request each (up to the context end), then three windows:
           quiet (--window/2 s), Poisson arrivals at --rate (4)/s for --window (15) s (each a --tokens
           request), quiet again (--window/2 s; arrivals still running finish). Step times without
           arrivals (both quiet windows) and with them; the arrivals' first audio; the base streams'
           underruns and slack inside each window. The base requests' contexts grow through the
           windows (so do step times a little); the quiet windows on both sides bracket it.
  server   the same with --server-levels (32,100) held --server-hold (10) s, no confirmation, and
           Poisson at --server-rate (4)/s for --server-window (10) s (base requests of 8192 tokens,
           the API's limit; one that ends restarts, counted in base_restarts).

Step times: the engine has no per-step timing hook (LLMEngine.stats counts tokens and steps only),
so this bench wraps LLMEngine.step (the in-process engine's bound method; in the server's process
the class method, before it loads) and records each call's start, end, prefill tokens and decode
rows (the stats' deltas). interval = end of a step - end of the step before (what a running stream
waits between tokens: host work between steps included; not after a step that left nothing to do);
call = the step() call's own wall time (async scheduling: the step launched ahead runs meanwhile).
The headline "decode step time" is the interval; p99 with arrivals / p50 without is the issue's ratio.

GPU utilization (%) and board power (W) come from NVML (nvidia-ml-py), sampled every 100 ms in a
thread of this process during the whole run and averaged over each level's window; on the CPU they
are skipped with a note.

--budget-s (480) bounds the run: each level, confirmation and Poisson workload starts only if its cost
(ramp + hold or windows + a few seconds) fits before the end, with the server's share kept for it;
what is skipped is listed. The JSON is rewritten after each section, so a run cut short keeps what
it measured.

Output: a table on stdout; JSON to --json (default $OUT/streams.json, else out/streams.json); a PNG
beside it (matplotlib: first-audio p50/p90 and underrunning streams against concurrency).

  python bench/streams.py --folders /tmp/streams-folders --levels 1,16,32,64,100,128   # the GPU run (H200)
  python bench/streams.py --smoke --json /tmp/streams_smoke.json               # tiny folders on the CPU
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import functools
import itertools
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from _util import fmt, guarded, parse_args_or_work, parse_list, percentile, print_table
from serve import (Connection, ServerProcess, Target, _read_head, add_engine_args, child_env, engine_options,
                   poisson_arrivals, prepare_released_folders, read_chunks, serve_argv)
from serve import scrape as scrape_metrics

BENCH = os.path.dirname(os.path.abspath(__file__))
START = time.perf_counter()          # CLOCK_MONOTONIC on Linux: one clock for this process and its children
NATIVE_RATE = 22050
TEXT_CHARS = 20
SERVER_METRICS = ("stepvox_speech_stream_underruns_total", "stepvox_speech_stream_chunk_slack_seconds_count",
                  "stepvox_admission_refusals_total", "stepvox_time_to_first_audio_seconds_sum",
                  "stepvox_time_to_first_audio_seconds_count")


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f} s] {message}", flush=True)


def dist_ms(values_s, qs=(50, 90, 99)) -> dict:
    """Percentiles (and mean, count) in ms of values in seconds."""
    out = {f"p{q}": _ms(percentile(values_s, q)) for q in qs}
    out["mean"] = _ms(sum(values_s) / len(values_s)) if values_s else None
    out["n"] = len(values_s)
    return out


def _ms(v):
    return None if v is None else round(v * 1e3, 3)


def text_for(index: int) -> str:
    """Text number `index`: 19 characters of bench/tts.py's pool and a full stop (one sentence, one
    LM segment), drawn from its own seed."""
    from tts import TEXT_POOL      # bench/tts.py (this folder is on sys.path)
    rng = random.Random(20_000 + index)
    return "".join(rng.choice(TEXT_POOL) for _ in range(TEXT_CHARS - 1)) + "。"


def write_json_atomic(path: str, payload) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, default=str, ensure_ascii=False)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- engine step times
class StepRecorder:
    """Each LLMEngine.step call as (start, end, prefill tokens, decode rows, requests left): the
    token counts are the engine's stats' deltas; requests left = has_unfinished_requests() after the
    step (when false, the engine loop may idle before the next one). With `path`, a thread appends
    new records to that file every 0.25 s (the server's process: the bench reads them there)."""

    def __init__(self, path: str | None = None):
        self.records: list[tuple[float, float, int, int, bool]] = []
        self.path = path
        self._written = 0
        self._stop = threading.Event()
        if path:
            open(path, "w").close()
            self._thread = threading.Thread(target=self._flush_loop, name="bench-steps", daemon=True)
            self._thread.start()

    def _timed(self, engine, step, *args, **kwargs):
        stats = engine.stats
        prefill, decode = stats["prefill_tokens"], stats["decode_tokens"]
        t0 = time.perf_counter()
        out = step(*args, **kwargs)
        t1 = time.perf_counter()
        self.records.append((t0, t1, stats["prefill_tokens"] - prefill, stats["decode_tokens"] - decode,
                             engine.has_unfinished_requests()))
        return out

    def attach(self, engine) -> None:
        """Time this engine's steps (an instance attribute over the bound method)."""
        step = engine.step
        engine.step = functools.partial(self._timed, engine, step)

    def patch_class(self, cls) -> None:
        """Time every engine of `cls` made from now on (the server's process)."""
        step = cls.step
        recorder = self

        @functools.wraps(step)
        def timed(engine, *args, **kwargs):
            return recorder._timed(engine, functools.partial(step, engine), *args, **kwargs)
        cls.step = timed

    def flush(self) -> None:
        new = self.records[self._written:]
        if not new:
            return
        self._written += len(new)
        with open(self.path, "a") as f:
            f.write("".join(f"{a:.6f} {b:.6f} {p} {d} {int(busy)}\n" for a, b, p, d, busy in new))

    def _flush_loop(self) -> None:
        while not self._stop.wait(0.25):
            with contextlib.suppress(Exception):
                self.flush()


def read_step_file(path: str) -> list[tuple[float, float, int, int, bool]]:
    out = []
    with contextlib.suppress(FileNotFoundError):
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 5:
                    out.append((float(parts[0]), float(parts[1]), int(parts[2]), int(parts[3]), parts[4] == "1"))
    return out


def step_stats(records, windows: list[tuple[float, float]]) -> dict:
    """Step times of the steps that ended inside `windows`: intervals (end - previous end; not after
    a step that left the engine with nothing to do, when it may idle) overall, of pure-decode steps
    and of steps with a prefill chunk; the calls' own times; how many steps had a prefill and the
    mean decode rows per step."""
    recs = sorted(records, key=lambda r: r[1])
    interval, decode_only, mixed, call, rows = [], [], [], [], []
    prefill_steps = prefill_tokens = 0
    prev_end = None
    for t0, t1, prefill, decode, busy in recs:
        if any(a <= t1 <= b for a, b in windows):
            call.append(t1 - t0)
            rows.append(decode)
            if prefill:
                prefill_steps += 1
                prefill_tokens += prefill
            if prev_end is not None:
                gap = t1 - prev_end
                interval.append(gap)
                (mixed if prefill else decode_only).append(gap)
        prev_end = t1 if busy else None
    qs = (50, 90, 99)
    return dict(steps=len(call), interval_ms=dist_ms(interval, qs), decode_interval_ms=dist_ms(decode_only, qs),
                prefill_interval_ms=dist_ms(mixed, qs), call_ms=dist_ms(call, qs),
                interval_max_ms=_ms(max(interval)) if interval else None, prefill_steps=prefill_steps,
                prefill_tokens=prefill_tokens, decode_rows_mean=round(sum(rows) / len(rows), 2) if rows else None)


# ----------------------------------------------------------------------------- NVML
class NvmlSampler:
    """GPU utilization and board power every `period` s in a thread (NVML: no CUDA context)."""

    def __init__(self, period: float = 0.1, enabled: bool = True):
        self.samples: list[tuple[float, float, float]] = []     # (time, utilization %, power W)
        self.available, self.note, self.name = False, None, None
        self.period = period
        self._stop = threading.Event()
        if not enabled:
            self.note = "skipped: a CPU run"
            return
        try:
            import pynvml
            pynvml.nvmlInit()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
            index = int(visible) if visible.isdigit() else 0
            self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(self._handle)
            self.name = name.decode() if isinstance(name, bytes) else name
        except Exception as exc:  # noqa: BLE001 - no NVML, no driver, no GPU: the run goes on without
            self.note = f"skipped: NVML not available ({type(exc).__name__}: {exc})"
            return
        self.available = True
        self._thread = threading.Thread(target=self._run, name="bench-nvml", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        nv, h = self._nvml, self._handle
        while not self._stop.is_set():
            t = time.perf_counter()
            with contextlib.suppress(Exception):
                util = nv.nvmlDeviceGetUtilizationRates(h).gpu
                power = nv.nvmlDeviceGetPowerUsage(h) / 1000.0
                self.samples.append((t, float(util), power))
            self._stop.wait(max(0.0, self.period - (time.perf_counter() - t)))

    def window(self, *windows) -> dict | None:
        """Means and maxima over the samples inside the (start, end) windows given."""
        if not self.available:
            return None
        s = [x for x in self.samples if any(a <= x[0] <= b for a, b in windows)]
        if not s:
            return dict(samples=0)
        util, power = [x[1] for x in s], [x[2] for x in s]
        return dict(samples=len(s), util_mean_pct=round(sum(util) / len(util), 1), util_max_pct=max(util),
                    power_mean_w=round(sum(power) / len(power), 1), power_max_w=round(max(power), 1))

    def close(self) -> None:
        self._stop.set()
        if self.available:
            self._thread.join(timeout=2)
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()


# ----------------------------------------------------------------------------- sources
class InProcessSession:
    """Requests through TTS.astream in this process."""

    def __init__(self, tts, voice: str, temperature: float):
        self.tts, self.voice, self.temperature = tts, voice, temperature

    async def speak(self, text: str, seed: int, max_tokens: int):
        """Audio seconds of each chunk as it comes."""
        stream = self.tts.astream(text, self.voice, seed=seed, temperature=self.temperature, max_tokens=max_tokens,
                                  ignore_eos=True)
        rate = self.tts.sample_rate
        async with contextlib.aclosing(stream):
            async for chunk in stream:
                yield chunk.samples.size / rate

    def close(self) -> None:
        pass


class RequestFailed(Exception):
    pass


class HttpSession:
    """One stream's kept-alive connection to the server: POST /v1/audio/speech, pcm streamed in
    chunked transfer; each HTTP chunk is one arrival (bench/serve.py's client)."""

    def __init__(self, target, voice: str, temperature: float, sample_rate: int = NATIVE_RATE):
        self.target, self.voice, self.temperature, self.rate = target, voice, temperature, sample_rate
        self.conn = Connection(target)

    async def speak(self, text: str, seed: int, max_tokens: int):
        payload = {"input": text, "response_format": "pcm", "sample_rate": self.rate, "max_tokens": max_tokens,
                   "seed": seed, "voice": self.voice, "temperature": self.temperature}
        body = json.dumps(payload, ensure_ascii=False).encode()
        done = False
        try:
            await self.conn.open()
            self.conn.writer.write(self.target.head(len(body)) + body)
            await self.conn.writer.drain()
            reader = self.conn.reader
            status, headers = await _read_head(reader)
            rate = int(headers.get("x-sample-rate", self.rate))
            keep = headers.get("connection", "").lower() != "close"
            chunked = headers.get("transfer-encoding", "").lower() == "chunked"
            if status != 200:
                data = await _read_body(reader, headers, chunked)
                done = keep
                code = None
                with contextlib.suppress(Exception):
                    code = json.loads(data)["error"].get("code")
                raise RequestFailed(f"HTTP {status} {code or ''}".strip())
            if chunked:
                async for data in read_chunks(reader):
                    yield len(data) / 2 / rate
            else:
                n = int(headers.get("content-length", "0"))
                await reader.readexactly(n)
                if n:
                    yield n / 2 / rate
            done = keep
        finally:
            if not done:          # cancelled, broken or closing: the next request opens a new connection
                self.conn.close()

    def close(self) -> None:
        self.conn.close()


async def _read_body(reader, headers: dict, chunked: bool, cap: int = 1 << 16) -> bytes:
    if chunked:
        data = b""
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                return data[:cap]
            data += (await reader.readexactly(size + 2))[:-2]
    return (await reader.readexactly(int(headers.get("content-length", "0"))))[:cap]


# ----------------------------------------------------------------------------- the load
class Load:
    """Drives requests against one path (in-process or server) and keeps what happened."""

    def __init__(self, make_session, tokens: int, pace: str, steps, sampler=None, scrape=None):
        self.make_session = make_session          # () -> a session (one per stream)
        self.tokens, self.pace = tokens, pace
        self.steps = steps                        # () -> step records so far
        self.sampler = sampler                    # NvmlSampler in this process, or None (the parent slices)
        self.scrape = scrape                      # () -> server metrics, or None
        self.index = itertools.count()

    async def request(self, session, tokens: int, out: list) -> dict:
        index = next(self.index)
        r = dict(index=index, start=time.perf_counter(), chunks=[], end=None, error=None, cut=False)
        out.append(r)             # kept even when cancelled
        try:
            async with contextlib.aclosing(session.speak(text_for(index), index, tokens)) as chunks:
                async for seconds in chunks:
                    r["chunks"].append((time.perf_counter(), seconds))
        except asyncio.CancelledError:
            r["cut"] = True
            raise
        except Exception as exc:  # noqa: BLE001 - a failed request is counted, the stream goes on
            r["error"] = str(exc)[:200] if isinstance(exc, RequestFailed) else f"{type(exc).__name__}: {exc}"[:200]
        r["end"] = time.perf_counter()
        return r

    async def stream(self, start_at: float, hold: float, tokens: int, out: list, stop_after: int | None = None) -> None:
        """One listener from `start_at` for `hold` s: requests one after another (pace), the one in
        flight at the end cancelled."""
        await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
        session = self.make_session()

        async def loop():
            n = 0
            while stop_after is None or n < stop_after:
                r = await self.request(session, tokens, out)
                n += 1
                if r["error"] is not None:
                    await asyncio.sleep(0.1)          # a refused request (429): no busy loop
                elif self.pace == "realtime" and r["chunks"]:
                    plays_until = r["chunks"][0][0] + sum(s for _, s in r["chunks"])
                    await asyncio.sleep(max(0.0, plays_until - time.perf_counter()))
        try:
            await asyncio.wait_for(loop(), timeout=max(0.0, start_at + hold - time.perf_counter()))
        except asyncio.TimeoutError:
            pass
        finally:
            session.close()

    async def level(self, n: int, hold: float, ramp: float, label: str) -> dict:
        log(f"{label}: {n} streams held {hold:g} s (starts over {ramp:g} s) ...")
        before = self.scrape() if self.scrape else None
        t0 = time.perf_counter()
        per_stream: list[list] = [[] for _ in range(n)]
        await asyncio.gather(*(self.stream(t0 + ramp * i / n, hold, self.tokens, per_stream[i]) for i in range(n)))
        t1 = time.perf_counter()
        await asyncio.sleep(0.6)                  # the server's step records reach their file
        s = level_summary(per_stream, n, hold, ramp, t0, t1)
        s["label"] = label
        s["steps"] = step_stats(self.steps(), [(t0, t1)])
        if self.sampler is not None:
            s["gpu"] = self.sampler.window((t0, t1))
        if before is not None:
            s["server_view"] = metrics_delta(before, self.scrape())
        fa = s["first_audio_ms"]
        log(f"{label}: {s['requests']} requests ({s['cut']} cut at the end, {s['error_count']} errors); first audio "
            f"p50 {fmt(fa['p50'])} p90 {fmt(fa['p90'])} p99 {fmt(fa['p99'])} ms; underruns {s['underrun_chunks']}/"
            f"{s['chunks']} chunks in {s['underrun_streams']}/{n} streams; slack p1 {fmt(s['slack_ms']['p1'])} ms; "
            f"step p50/p99 {pcts(s['steps']['interval_ms'], ('p50', 'p99'), '.2f')} ms")
        return s

    async def warmup(self, n: int, tokens: int) -> dict:
        log(f"warm-up: {n} streams x 1 request of {tokens} tokens (not counted) ...")
        out: list = []
        t0 = time.perf_counter()
        await asyncio.gather(*(self.stream(t0, 3600.0, tokens, out, stop_after=1) for _ in range(n)))
        figs = [request_figures(r) for r in out]
        first = [f["first_audio_s"] for f in figs if f["first_audio_s"] is not None]
        errors = [r["error"] for r in out if r["error"]]
        log(f"warm-up done in {time.perf_counter() - t0:.1f} s; first audio {[round(x * 1e3) for x in first]} ms"
            + (f"; errors {errors[:3]}" if errors else ""))
        return dict(streams=n, tokens=tokens, wall_s=time.perf_counter() - t0, first_audio_ms=dist_ms(first),
                    errors=errors[:10])

    async def poisson(self, base: int, rate: float, window: float, ramp: float, base_tokens: int,
                      arrival_tokens: int, seed: int, label: str) -> dict:
        log(f"{label}: {base} base streams (one long request each), then quiet {window / 2:g} s, arrivals at "
            f"{rate:g}/s for {window:g} s, quiet {window / 2:g} s ...")
        before = self.scrape() if self.scrape else None
        t0 = time.perf_counter()
        base_out: list[list] = [[] for _ in range(base)]
        tasks = [asyncio.create_task(self.stream(t0 + ramp * i / base, 1e6, base_tokens, base_out[i]))
                 for i in range(base)]
        arrivals: list = []
        arrival_tasks: list = []
        try:
            wait_until = time.perf_counter() + ramp + 120.0
            while time.perf_counter() < wait_until and not all(o and o[0]["chunks"] for o in base_out):
                if all(t.done() for t in tasks):
                    break
                await asyncio.sleep(0.05)
            heard = sum(1 for o in base_out if o and o[0]["chunks"])
            await asyncio.sleep(1.0)
            qa = time.perf_counter()
            await asyncio.sleep(window / 2)
            qa = (qa, time.perf_counter())
            times = poisson_arrivals(rate, window, seed)
            aw0 = time.perf_counter()
            session_for = self.make_session
            for at in times:
                await asyncio.sleep(max(0.0, aw0 + at - time.perf_counter()))
                sess = session_for()
                arrival_tasks.append(asyncio.create_task(self._one(sess, arrival_tokens, arrivals)))
            await asyncio.sleep(max(0.0, aw0 + window - time.perf_counter()))
            aw = (aw0, time.perf_counter())
            qb = time.perf_counter()
            await asyncio.sleep(window / 2)
            qb = (qb, time.perf_counter())
        finally:
            for task in tasks + arrival_tasks:
                task.cancel()
            await asyncio.gather(*tasks, *arrival_tasks, return_exceptions=True)
        t1 = time.perf_counter()
        await asyncio.sleep(0.6)
        records = self.steps()
        quiet, busy = step_stats(records, [qa, qb]), step_stats(records, [aw])
        arr = [request_figures(r) for r in arrivals]
        first = [f["first_audio_s"] for f in arr if f["first_audio_s"] is not None]
        base_figs = [request_figures(r) for o in base_out for r in o]

        def base_in(*windows):
            slack = [s for f in base_figs for (t, s) in f["slack_at"] if any(a <= t <= b for a, b in windows)]
            return dict(chunks=len(slack), underrun_chunks=sum(1 for s in slack if s < 0),
                        slack_ms=dict(p1=_ms(percentile(slack, 1)), p50=_ms(percentile(slack, 50)),
                                      min=_ms(min(slack)) if slack else None))
        ratio = None
        if quiet["interval_ms"]["p50"] and busy["interval_ms"]["p99"] is not None:
            ratio = round(busy["interval_ms"]["p99"] / quiet["interval_ms"]["p50"], 3)
        out = dict(label=label, base=base, base_heard=heard, rate=rate, window_s=window, base_tokens=base_tokens,
                   arrival_tokens=arrival_tokens, windows=dict(quiet_a=qa, arrivals=aw, quiet_b=qb),
                   base_restarts=sum(max(0, len(o) - 1) for o in base_out),
                   arrivals=len(arrivals), arrivals_heard=len(first),
                   arrival_errors=sum(1 for r in arrivals if r["error"]),
                   arrival_first_audio_ms=dist_ms(first),
                   arrival_underrun_chunks=sum(f["underruns"] for f in arr),
                   arrival_chunks=sum(f["chunks"] for f in arr),
                   steps_quiet=quiet, steps_arrivals=busy, p99_arrivals_over_p50_quiet=ratio,
                   base_quiet=base_in(qa, qb), base_arrivals=base_in(aw),
                   wall_s=t1 - t0)
        if self.sampler is not None:
            out["gpu_quiet"] = self.sampler.window(qa, qb)
            out["gpu_arrivals"] = self.sampler.window(aw)
        if before is not None:
            out["server_view"] = metrics_delta(before, self.scrape())
        log(f"{label}: step interval p50/p99 quiet {fmt(quiet['interval_ms']['p50'], '.2f')}/"
            f"{fmt(quiet['interval_ms']['p99'], '.2f')} ms, with arrivals {fmt(busy['interval_ms']['p50'], '.2f')}/"
            f"{fmt(busy['interval_ms']['p99'], '.2f')} ms (p99/p50 quiet {fmt(ratio, '.2f')}); {len(arrivals)} "
            f"arrivals, first audio p90 {fmt(out['arrival_first_audio_ms']['p90'])} ms; base underruns quiet "
            f"{out['base_quiet']['underrun_chunks']}, arrivals "
            f"{out['base_arrivals']['underrun_chunks']}")
        return out

    async def _one(self, session, tokens: int, out: list) -> None:
        try:
            await self.request(session, tokens, out)
        finally:
            session.close()


def request_figures(r: dict) -> dict:
    """First audio, chunk slacks against the fixed timeline (deadline of chunk k = first arrival +
    audio before k), underruns, and the stalls of a player that pauses when it runs dry."""
    chunks = r["chunks"]
    out = dict(first_audio_s=None, chunks=len(chunks), underruns=0, slack=[], slack_at=[], audio_s=0.0,
               stalls=0, stall_s=0.0)
    if not chunks:
        return out
    t_first = chunks[0][0]
    out["first_audio_s"] = t_first - r["start"]
    before = chunks[0][1]
    play_end = t_first + chunks[0][1]
    for t, seconds in chunks[1:]:
        slack = t_first + before - t
        out["slack"].append(slack)
        out["slack_at"].append((t, slack))
        if slack < 0:
            out["underruns"] += 1
        if t > play_end:
            out["stalls"] += 1
            out["stall_s"] += t - play_end
            play_end = t
        play_end += seconds
        before += seconds
    out["audio_s"] = before
    return out


def level_summary(per_stream: list[list], n: int, hold: float, ramp: float, t0: float, t1: float) -> dict:
    figs = [[request_figures(r) for r in reqs] for reqs in per_stream]
    flat = [f for fs in figs for f in fs]
    reqs = [r for reqs in per_stream for r in reqs]
    first = [f["first_audio_s"] for f in flat if f["first_audio_s"] is not None]
    slack = [s for f in flat for s in f["slack"]]
    errors: dict[str, int] = {}
    for r in reqs:
        if r["error"]:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    streams = []
    for reqs_i, fs in zip(per_stream, figs):
        sl = [s for f in fs for s in f["slack"]]
        streams.append(dict(requests=len(reqs_i), heard=sum(1 for f in fs if f["first_audio_s"] is not None),
                            audio_s=round(sum(f["audio_s"] for f in fs), 3),
                            underruns=sum(f["underruns"] for f in fs), stalls=sum(f["stalls"] for f in fs),
                            min_slack_ms=_ms(min(sl)) if sl else None,
                            errors=sum(1 for r in reqs_i if r["error"])))
    underrun_streams = sum(1 for s in streams if s["underruns"])
    audio = sum(f["audio_s"] for f in flat)
    done = [(r, f) for r, f in zip(reqs, flat) if not r["cut"] and not r["error"] and f["audio_s"] > 0]
    return dict(streams=n, hold_s=hold, ramp_s=ramp, window=(t0, t1), wall_s=round(t1 - t0, 3),
                requests=len(reqs), requests_heard=len(first),
                completed=len(done), cut=sum(1 for r in reqs if r["cut"]), error_count=sum(errors.values()),
                errors=errors, streams_heard=sum(1 for s in streams if s["heard"]),
                first_audio_ms=dist_ms(first), chunks=sum(f["chunks"] for f in flat),
                underrun_chunks=sum(f["underruns"] for f in flat), underrun_streams=underrun_streams,
                underrun_stream_fraction=round(underrun_streams / n, 4) if n else None,
                underrun_requests=sum(1 for f in flat if f["underruns"]),
                stalls=sum(f["stalls"] for f in flat), stall_s=round(sum(f["stall_s"] for f in flat), 3),
                slack_ms=dict(p1=_ms(percentile(slack, 1)), p50=_ms(percentile(slack, 50)),
                              min=_ms(min(slack)) if slack else None),
                audio_s=round(audio, 3), audio_s_per_s=round(audio / (t1 - t0), 3) if t1 > t0 else None,
                rtf_p50=percentile([(r["end"] - r["start"]) / f["audio_s"] for r, f in done], 50),
                per_stream=streams)


def held(level: dict) -> bool:
    """Every stream heard, no errors, no underrun."""
    return (level["underrun_chunks"] == 0 and level["error_count"] == 0
            and level["streams_heard"] == level["streams"])


def pcts(d: dict, keys=("p50", "p90", "p99"), spec=".0f") -> str:
    return "/".join(fmt(d.get(k), spec) for k in keys)


def metrics_delta(before: dict | None, after: dict | None) -> dict:
    if not before or not after:
        return {}
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in set(before) | set(after)}


# ----------------------------------------------------------------------------- one path's workloads
class Budget:
    def __init__(self, end: float | None):
        self.end = end

    def fits(self, cost: float) -> bool:
        return self.end is None or time.perf_counter() + cost <= self.end


def level_cost(plan: dict, hold: float) -> float:
    return plan["ramp"] + hold + plan["overhead_s"]


def poisson_cost(plan: dict) -> float:
    return plan["ramp"] + 2 * plan["window"] + plan["overhead_s"] + 3.0


async def run_workloads(load: Load, plan: dict, budget: Budget, res: dict, save, label: str) -> None:
    """Warm-up, the sweep (ascending, stopped at the first failing level), the confirmation hold and
    the Poisson workload of one path, each only if it fits the budget (Poisson's share kept)."""
    res.setdefault("levels", [])
    res.setdefault("skipped", [])
    if plan["warmup"]:
        res["warmup"] = await load.warmup(plan["warmup"], plan["tokens"])
        save()
    reserve = poisson_cost(plan) if plan["rate"] > 0 else 0.0
    confirm = plan["confirm_hold"] if plan["confirm_hold"] > plan["hold"] else 0.0
    if confirm:
        reserve += level_cost(plan, confirm)
    for n in plan["levels"]:
        if not budget.fits(level_cost(plan, plan["hold"]) + reserve):
            res["skipped"].append(f"N={n} (budget)")
            log(f"{label}: N={n} skipped: it does not fit the budget")
            continue
        s = await load.level(n, plan["hold"], plan["ramp"], f"{label} N={n}")
        res["levels"].append(s)
        save()
        if (s["underrun_stream_fraction"] or 0) >= plan["stop_fraction"] or s["streams_heard"] == 0:
            rest = plan["levels"][plan["levels"].index(n) + 1:]
            if rest:
                res["stopped_early"] = (f"after N={n}: {s['underrun_streams']}/{n} streams underran (>= "
                                        f"{plan['stop_fraction']:g}); not run: {rest}")
                log(f"{label}: sweep stopped: {res['stopped_early']}")
            break
    good = [lv["streams"] for lv in res["levels"] if held(lv)]
    res["largest_zero_underrun"] = max(good) if good else None
    res["confirm"] = []
    if confirm and good:
        reserve = poisson_cost(plan) if plan["rate"] > 0 else 0.0
        for n in sorted(good, reverse=True):
            if not budget.fits(level_cost(plan, confirm) + reserve):
                res["skipped"].append(f"confirm N={n} for {confirm:g} s (budget)")
                break
            s = await load.level(n, confirm, plan["ramp"], f"{label} confirm N={n}")
            res["confirm"].append(s)
            save()
            if held(s):
                break
    confirmed = [c["streams"] for c in res["confirm"] if held(c)]
    res["held"] = dict(streams=confirmed[0], hold_s=confirm) if confirmed else (
        dict(streams=res["largest_zero_underrun"], hold_s=plan["hold"]) if good else None)
    save()
    if plan["rate"] > 0:
        if budget.fits(poisson_cost(plan)):
            res["poisson"] = await load.poisson(plan["base"], plan["rate"], plan["window"], plan["ramp"],
                                                plan["base_tokens"], plan["tokens"], plan["seed"], f"{label} poisson")
        else:
            res["skipped"].append("poisson (budget)")
            log(f"{label}: the Poisson workload skipped: it does not fit the budget")
        save()


# ----------------------------------------------------------------------------- the in-process worker
def inprocess_worker(spec_path: str) -> None:
    """Runs in a subprocess (its GPU memory is returned when it exits, before the server loads)."""
    global START
    with open(spec_path) as f:
        spec = json.load(f)
    START = spec["log_start"]
    from stepvox.engine.pipelines.tts import TTS
    out: dict = dict(device=spec["device"])

    def save():
        write_json_atomic(spec["result"], out)

    folders = spec["folders"]
    log(f"in-process: TTS.from_pretrained on {spec['device']} ...")
    t0 = time.perf_counter()
    tts = TTS.from_pretrained(folders["model"], folders["tokenizer"], folders["speakers"], device=spec["device"],
                              **spec["options"])
    out["load_s"] = time.perf_counter() - t0
    log(f"in-process: loaded in {out['load_s']:.1f} s")
    try:
        engine = tts.engine.engine
        recorder = StepRecorder()
        recorder.attach(engine)
        out["prompt_tokens"] = len(tts.prompt_token_ids(text_for(0), spec["voice"]))
        out["max_model_len"] = engine.max_model_len
        plan = dict(spec["plan"])
        plan["base_tokens"] = plan["base_tokens"] or engine.max_model_len       # stops at the context's end
        out["plan"] = plan
        end = spec["budget_end"]
        if end is not None:
            end -= spec["server_reserve_s"] + (out["load_s"] if spec["server_reserve_s"] else 0.0)
        load = Load(lambda: InProcessSession(tts, spec["voice"], spec["temperature"]), plan["tokens"], plan["pace"],
                    steps=lambda: recorder.records)
        asyncio.run(run_workloads(load, plan, Budget(end), out, save, "in-process"))
        out["engine_stats"] = dict(engine.stats)
    finally:
        save()
        tts.shutdown()


# ----------------------------------------------------------------------------- the server
def server_worker(spec_path: str) -> None:
    """`stepvox serve` in this process with LLMEngine.step timed (records to a file the bench reads)."""
    with open(spec_path) as f:
        spec = json.load(f)
    from stepvox.engine.llm_engine import LLMEngine
    recorder = StepRecorder(spec["steps_path"])
    recorder.patch_class(LLMEngine)
    from stepvox.cli import main as cli_main
    try:
        code = cli_main(spec["argv"])
    finally:
        recorder.flush()
    sys.exit(code)


def scrape(target) -> dict | None:
    """This bench's SERVER_METRICS from /metrics (bench/serve.py's reader), or None when they cannot be read."""
    with contextlib.suppress(Exception):
        return scrape_metrics(target, SERVER_METRICS)
    return None


def run_server(args, plan: dict, folders: dict, workdir: str, sampler: NvmlSampler, budget: Budget, res: dict,
               save) -> None:
    out = res["server"]
    steps_path = os.path.join(workdir, "server-steps.txt")
    top = max(plan["levels"] + [plan["base"] + 32])
    argv = serve_argv(args, folders, max(args.max_concurrent or 0, top + 64), 256)
    argv += shlex.split(args.server_args or "")
    spec_path = os.path.join(workdir, "server-spec.json")
    with open(spec_path, "w") as f:
        json.dump(dict(argv=argv, steps_path=steps_path), f)

    log(f"server: starting `stepvox {' '.join(argv)}` (step timing on) ...")
    t0 = time.perf_counter()
    # bench/serve.py's process handling, this file's worker (`stepvox serve` with the steps timed) as the command
    server = ServerProcess([sys.executable, os.path.abspath(__file__), "--server-worker", spec_path], workdir)
    try:
        url = server.wait_ready(args.start_timeout)
        out["start_s"] = time.perf_counter() - t0
        out["command"] = "stepvox " + " ".join(argv)
        out["url"] = url
        log(f"server: ready at {url} in {out['start_s']:.1f} s")
        target = Target(url, None)
        load = Load(lambda: HttpSession(target, args.voice, args.temperature), plan["tokens"], plan["pace"],
                    steps=lambda: read_step_file(steps_path), sampler=sampler, scrape=lambda: scrape(target))
        out["plan"] = plan
        asyncio.run(run_workloads(load, plan, budget, out, save, "server"))
    finally:
        log("server: stopping (SIGTERM) ...")
        out["exit"] = server.stop(timeout=30.0)
        out["log_tail"] = server.tail(12)
        if out["exit"] not in (0, -signal.SIGTERM):
            print(out["log_tail"], flush=True)
        save()


def run_inprocess(args, plan: dict, folders: dict, workdir: str, sampler: NvmlSampler, budget: Budget,
                  server_reserve_s: float, res: dict, save) -> None:
    result = os.path.join(workdir, "inprocess.json")
    spec = dict(folders=folders, device=args.device, options=engine_options(args), voice=args.voice,
                temperature=args.temperature, plan=plan, budget_end=budget.end, server_reserve_s=server_reserve_s,
                log_start=START, result=result)
    spec_path = os.path.join(workdir, "inprocess-spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    timeout = None if budget.end is None else max(60.0, budget.end - time.perf_counter() + 30.0)
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--inprocess-worker", spec_path],
                            env=child_env())
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log("in-process worker: past the budget; killed (what it wrote is kept)")
        proc.kill()
        proc.wait()
    finally:
        if os.path.exists(result):
            with open(result) as f:
                res["in_process"].update(json.load(f))
        for lv in res["in_process"].get("levels", []) + res["in_process"].get("confirm", []):
            lv["gpu"] = sampler.window(lv["window"])
        p = res["in_process"].get("poisson")
        if p:
            p["gpu_quiet"] = sampler.window(p["windows"]["quiet_a"], p["windows"]["quiet_b"])
            p["gpu_arrivals"] = sampler.window(p["windows"]["arrivals"])
        save()
    if proc.returncode != 0:
        raise RuntimeError(f"the in-process worker exited with {proc.returncode}")


# ----------------------------------------------------------------------------- report
def level_rows(res: dict) -> list[dict]:
    rows = []
    for path in ("in_process", "server"):
        part = res.get(path) or {}
        for lv in part.get("levels", []) + part.get("confirm", []):
            fa, st, gpu = lv["first_audio_ms"], lv.get("steps") or {}, lv.get("gpu") or {}
            iv = st.get("interval_ms") or {}
            rows.append({
                "path": path.replace("_", "-"), "N": lv["streams"], "hold s": fmt(lv["hold_s"], "g"),
                "reqs (cut, err)": f"{lv['requests']} ({lv['cut']}, {lv['error_count']})",
                "first audio p50/p90/p99 ms": pcts(fa),
                "underrun streams": f"{lv['underrun_streams']}/{lv['streams']}",
                "underrun chunks": f"{lv['underrun_chunks']}/{lv['chunks']}",
                "slack p1/p50 ms": f"{fmt(lv['slack_ms']['p1'], '.0f')}/{fmt(lv['slack_ms']['p50'], '.0f')}",
                "audio s/s": fmt(lv["audio_s_per_s"], ".1f"),
                "step p50/p99 ms": f"{fmt(iv.get('p50'), '.2f')}/{fmt(iv.get('p99'), '.2f')}",
                "GPU % / W": f"{fmt(gpu.get('util_mean_pct'), '.0f')} / {fmt(gpu.get('power_mean_w'), '.0f')}"})
    return rows


def poisson_rows(res: dict) -> list[dict]:
    rows = []
    for path in ("in_process", "server"):
        p = (res.get(path) or {}).get("poisson")
        if not p:
            continue
        q, b = p["steps_quiet"]["interval_ms"], p["steps_arrivals"]["interval_ms"]
        fa = p["arrival_first_audio_ms"]
        base_q = p["base_quiet"]["underrun_chunks"]
        rows.append({
            "path": path.replace("_", "-"), "base": p["base"], "rate /s": fmt(p["rate"], "g"),
            "step p50/p99 quiet ms": f"{fmt(q['p50'], '.2f')}/{fmt(q['p99'], '.2f')}",
            "step p50/p99 arrivals ms": f"{fmt(b['p50'], '.2f')}/{fmt(b['p99'], '.2f')}",
            "p99 arr / p50 quiet": fmt(p["p99_arrivals_over_p50_quiet"], ".2f"),
            "prefill steps": p["steps_arrivals"]["prefill_steps"],
            "arrivals (heard)": f"{p['arrivals']} ({p['arrivals_heard']})",
            "arrival first audio p50/p90/p99 ms": pcts(fa),
            "base underruns quiet / arrivals": f"{base_q} / {p['base_arrivals']['underrun_chunks']}"})
    return rows


def summary_rows(res: dict) -> list[dict]:
    rows = [dict(metric="device / date (UTC)", value=f"{res['device']} / {res['date']}"),
            dict(metric="requests", value=f"{res['plan']['tokens']} audio tokens, voice {res['voice']}, pace "
                 f"{res['plan']['pace']}, 20-character texts"),
            dict(metric="NVML", value="on" if res["nvml"]["available"] else res["nvml"]["note"])]
    for path in ("in_process", "server"):
        part = res.get(path) or {}
        if not part.get("levels"):
            continue
        h = part.get("held")
        rows.append(dict(metric=f"{path.replace('_', '-')}: largest N with zero underruns (sweep)",
                         value=str(part.get("largest_zero_underrun"))))
        rows.append(dict(metric=f"{path.replace('_', '-')}: held with zero underruns",
                         value=f"N={h['streams']} for {h['hold_s']:g} s" if h else "none"))
        if part.get("stopped_early"):
            rows.append(dict(metric=f"{path.replace('_', '-')}: sweep stopped", value=part["stopped_early"]))
        if part.get("skipped"):
            rows.append(dict(metric=f"{path.replace('_', '-')}: skipped", value=", ".join(part["skipped"])))
    return rows


def plot(res: dict, png: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        res["plot_note"] = "not drawn: matplotlib is not installed"
        return None
    fig, ax = plt.subplots(figsize=(8, 4.8))
    right = ax.twinx()
    styles = {"in_process": ("tab:blue", "o"), "server": ("tab:orange", "s")}
    drawn = False
    for path, (color, marker) in styles.items():
        levels = (res.get(path) or {}).get("levels") or []
        if not levels:
            continue
        drawn = True
        x = [lv["streams"] for lv in levels]
        name = path.replace("_", "-")
        for q, style in (("p50", "-"), ("p90", "--")):
            ax.plot(x, [lv["first_audio_ms"][q] if lv["first_audio_ms"][q] is not None else float("nan")
                        for lv in levels], style, color=color, marker=marker, label=f"{name} first audio {q}")
        right.plot(x, [lv["underrun_stream_fraction"] * 100 for lv in levels], ":", color=color, marker="x",
                   label=f"{name} streams with underruns")
    if not drawn:
        plt.close(fig)
        res["plot_note"] = "not drawn: no level was measured"
        return None
    ticks = sorted({lv["streams"] for path in styles for lv in (res.get(path) or {}).get("levels") or []})
    ax.set_xticks(ticks)
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("first audio (ms)")
    right.set_ylabel("streams with underruns (%)")
    right.set_ylim(-2, 102)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    lines = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="upper left")
    holds = ", ".join(f"{name} {res[plan]['hold']:g} s" for name, plan, path in
                      (("in-process", "plan", "in_process"), ("server", "server_plan", "server"))
                      if (res.get(path) or {}).get("levels"))
    ax.set_title(f"TTS streams on {res['device']}: first audio and underruns (held per level: {holds}; "
                 f"{res['plan']['tokens']} tokens a request)", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


# ----------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny random folders on the CPU, small levels, short holds")
    ap.add_argument("--json", default=None, help="JSON path (default $OUT/streams.json, else out/streams.json); "
                                                 "the PNG goes beside it")
    ap.add_argument("--folders", default=None, help="released-shape random folders here (bench/tts.py's; written "
                                                    "unless a run completed them); default: a temporary folder")
    ap.add_argument("--keep", action="store_true", help="keep the folders written to a temporary folder")
    ap.add_argument("--paths", default="in-process,server", help="in-process, server or both (default both)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="the whole run's wall seconds (default 480; smoke: none): later sections that do not fit "
                         "are skipped and listed")
    w = ap.add_argument_group("workloads")
    w.add_argument("--levels", default=None, help="sweep concurrencies (default 1,8,16,32,64,100,128; smoke 1,2)")
    w.add_argument("--hold", type=float, default=None, help="seconds each stream is held per level (default 15; "
                                                            "smoke 4)")
    w.add_argument("--confirm-hold", type=float, default=None,
                   help="hold the largest zero-underrun level again this long (default 60; smoke 0: off)")
    w.add_argument("--ramp", type=float, default=None, help="stream starts spread over this many seconds "
                                                            "(default 2; smoke 0.2)")
    w.add_argument("--pace", choices=("closed", "realtime"), default="closed",
                   help="closed: a stream's next request when one ends; realtime: when its audio has played")
    w.add_argument("--stop-fraction", type=float, default=None,
                   help="stop the sweep after a level where this fraction of the streams underran (default 0.5; "
                        "smoke: never, every level runs)")
    w.add_argument("--tokens", type=int, default=None, help="audio tokens a request (default 415 = 9.96 s of "
                                                            "audio; smoke 40)")
    w.add_argument("--warmup", type=int, default=None, help="warm-up streams, 1 request each (default 8; smoke 1)")
    w.add_argument("--base", type=int, default=None, help="Poisson: base streams (default 32; smoke 1)")
    w.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second (default 4; smoke 2; 0: no "
                                                            "Poisson workload)")
    w.add_argument("--window", type=float, default=None, help="Poisson: seconds of arrivals, and of quiet around "
                                                              "them (half before, half after; default 15; smoke 2)")
    w.add_argument("--base-tokens", type=int, default=None,
                   help="Poisson: a base request's tokens (default: the context's end in-process, 8192 server)")
    w.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrivals")
    w.add_argument("--voice", default="Tingting")
    w.add_argument("--temperature", type=float, default=0.7)
    s = ap.add_argument_group("server path (its own sweep: fewer, shorter levels)")
    s.add_argument("--server-levels", default=None, help="(default 32,100; smoke 2)")
    s.add_argument("--server-hold", type=float, default=None, help="(default 10; smoke 4)")
    s.add_argument("--server-rate", type=float, default=None, help="Poisson over the server (default 4; smoke 0)")
    s.add_argument("--server-window", type=float, default=None, help="(default 10; smoke 2)")
    s.add_argument("--server-args", default=None, help="more `stepvox serve` flags, e.g. '--max-streams 100'")
    s.add_argument("--max-concurrent", type=int, default=None, help="the server's --max-concurrent (default: the "
                                                                    "largest level + 64)")
    s.add_argument("--start-timeout", type=float, default=600.0)
    e = ap.add_argument_group("engine (both paths)")
    add_engine_args(e, "default cuda; smoke cpu", "smoke: reference")
    args = parse_args_or_work(ap, inprocess_worker=inprocess_worker, server_worker=server_worker)
    if args is None:
        return

    smoke = args.smoke

    def pick(value, gpu, cpu):
        return value if value is not None else (cpu if smoke else gpu)

    args.device = pick(args.device, "cuda", "cpu")
    if smoke:
        args.kernels = args.kernels or "reference"
        args.max_model_len = args.max_model_len or 2048
        args.num_kv_pages = args.num_kv_pages or 512
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if not set(paths) <= {"in-process", "server"} or not paths:
        ap.error("--paths: in-process, server or both")
    base = dict(tokens=pick(args.tokens, 415, 40), hold=pick(args.hold, 15.0, 4.0), ramp=pick(args.ramp, 2.0, 0.2),
                pace=args.pace, stop_fraction=pick(args.stop_fraction, 0.5, 2.0), warmup=pick(args.warmup, 8, 1),
                confirm_hold=pick(args.confirm_hold, 60.0, 0.0), base=pick(args.base, 32, 1), seed=args.seed,
                overhead_s=3.0 if not smoke else 2.0)
    plan = dict(base, levels=parse_list(args.levels or ("1,2" if smoke else "1,8,16,32,64,100,128"), int),
                rate=pick(args.rate, 4.0, 2.0), window=pick(args.window, 15.0, 2.0), base_tokens=args.base_tokens)
    server_plan = dict(base, levels=parse_list(args.server_levels or ("2" if smoke else "32,100"), int),
                       hold=pick(args.server_hold, 10.0, 4.0), rate=pick(args.server_rate, 4.0, 0.0),
                       window=pick(args.server_window, 10.0, 2.0), confirm_hold=0.0,
                       base_tokens=args.base_tokens or 8192)        # the server's max_tokens limit
    budget_s = pick(args.budget_s, 480.0, None)
    budget = Budget(None if budget_s is None else START + budget_s)
    json_path = args.json or os.path.join(os.environ.get("OUT", "out"), "streams.json")
    png_path = os.path.splitext(json_path)[0] + ".png"

    sampler = NvmlSampler(enabled=args.device != "cpu")
    res = dict(device=sampler.name or ("cpu" if args.device == "cpu" else args.device), smoke=smoke,
               date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"), budget_s=budget_s,
               voice=args.voice, plan=plan, server_plan=server_plan, paths=paths, args=vars(args),
               nvml=dict(available=sampler.available, note=sampler.note, device=sampler.name, period_s=sampler.period),
               in_process={}, server={})

    def save():
        res["table"] = level_rows(res)
        res["poisson_table"] = poisson_rows(res)
        res["summary"] = summary_rows(res)
        write_json_atomic(json_path, res)

    def section(name, fn):
        out = guarded(res, name, fn)
        save()
        return out

    root = args.folders or tempfile.mkdtemp(prefix="stepvox-bench-streams-")
    workdir = tempfile.mkdtemp(prefix="stepvox-bench-streams-work-")
    log(f"{res['device']}: paths {paths}; sweep {plan['levels']} x {plan['hold']:g} s; Poisson {plan['rate']:g}/s over "
        f"{plan['base']} streams; server sweep {server_plan['levels']} x {server_plan['hold']:g} s; budget "
        f"{budget_s or 'none'}")
    try:
        if smoke:
            def tiny():
                marker = os.path.join(root, "streams-smoke.json")
                if os.path.exists(marker):
                    with open(marker) as f:
                        return json.load(f)
                from stepvox.testing.tts import write_tts_folders
                folders = write_tts_folders(root)
                with open(marker, "w") as f:
                    json.dump(folders, f)
                return folders
            folders = section("folders", tiny)
        else:
            folders = section("folders", lambda: prepare_released_folders(root))
        if folders is None:
            return
        res["folders"] = folders
        log(f"folders ready in {root}")
        server_reserve = 0.0
        if "server" in paths:
            server_reserve = (sum(level_cost(server_plan, server_plan["hold"]) for _ in server_plan["levels"])
                              + (poisson_cost(server_plan) if server_plan["rate"] > 0 else 0.0)
                              + 20.0 + (10.0 if server_plan["warmup"] else 0.0))     # + its load: the worker's
        if "in-process" in paths:
            section("in-process", lambda: run_inprocess(args, plan, folders, workdir, sampler, budget, server_reserve,
                                                        res, save))
        if "server" in paths:
            section("server", lambda: run_server(args, server_plan, folders, workdir, sampler, budget, res, save))
    finally:
        sampler.close()
        res["wall_s"] = time.perf_counter() - START
        res["plot"] = None
        if guarded_plot(res, png_path):
            res["plot"] = png_path
        save()
        kind = "tiny folders, CPU" if smoke else "random weights, released shapes"
        print(f"\nReal-time TTS streams on {res['device']} ({kind}); JSON: {json_path}; "
              f"plot: {res['plot'] or res.get('plot_note')}")
        if res.get("errors"):
            print("FAILED SECTIONS:", {k: str(v)[:300] for k, v in res["errors"].items()})
        if res["table"]:
            print_table(res["table"], list(res["table"][0]))
        if res["poisson_table"]:
            print()
            print_table(res["poisson_table"], list(res["poisson_table"][0]))
        print()
        for row in res["summary"]:
            print(f"{row['metric']}: {row['value']}")
        shutil.rmtree(workdir, ignore_errors=True)
        if not args.folders and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        elif not args.folders:
            print(f"folders kept in {root} (reuse with --folders {root})")


def guarded_plot(res: dict, png: str) -> str | None:
    try:
        return plot(res, png)
    except Exception as exc:  # noqa: BLE001 - the figures are in the JSON anyway
        res["plot_note"] = f"not drawn: {type(exc).__name__}: {exc}"
        return None


if __name__ == "__main__":
    main()
