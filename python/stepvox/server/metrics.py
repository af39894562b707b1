"""Prometheus metrics of one server, in a registry of its own (two apps in one process, as tests
make, never share counters): request counts and outcomes, time to first audio (speech) and to first
text and audio (chat), real-time sessions (end of speech to first audio, speculations, barge-in
stops), real-time factor, audio produced, the admission queue and its refusals, the chunk slack and
underruns of real-time speech streams, and the LM engines read at scrape time (KV pages, scheduler
queues: the TTS's as `stepvox_kv_*` / `stepvox_lm_*`, a chat model's as `stepvox_chat_kv_*` /
`stepvox_chat_lm_*`). Names follow Prometheus conventions
(`_seconds`, `_total`, base units)."""
from __future__ import annotations

import math
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

from stepvox.engine.step_times import KINDS as STEP_KINDS

from .admission import REFUSAL_REASONS

# first audio of a streamed request: ms on a GPU, seconds on a CPU or under load
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0, 60.0)
RTF_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0, 10.0, 50.0)
# a chunk's deadline minus its send time: below 0 an underrun, a few hundred ms a healthy stream
SLACK_BUCKETS = (-2.5, -1.0, -0.5, -0.25, -0.1, -0.05, 0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _EngineCollector:
    """An LM engine's state when scraped (the engine thread owns it; these are plain reads).
    `prefix`: "stepvox_" for the TTS's engine, "stepvox_chat_" for a chat model's."""

    def __init__(self, engine, prefix: str, what: str):
        self.engine, self.prefix, self.what = engine, prefix, what      # an AsyncLLMEngine

    def collect(self):
        engine = self.engine.engine
        manager, scheduler = engine.block_manager, engine.scheduler
        free, total = manager.num_free_pages, manager.num_pages
        p, what = self.prefix, self.what
        values = (
            (f"{p}kv_free_pages", f"{what} KV-cache pages free (every page is free when no request runs)", free),
            (f"{p}kv_total_pages", f"{what} KV-cache pages in all", total),
            (f"{p}kv_cache_usage_ratio", f"fraction of the {what} KV-cache pages in use", 1.0 - free / total),
            (f"{p}lm_requests_running", f"{what} LM sequences scheduled", len(scheduler.running)),
            (f"{p}lm_requests_waiting", f"{what} LM sequences queued in the engine", len(scheduler.waiting)),
            (f"{p}engine_alive", f"1 while the {what} LM engine loop runs", 0.0 if self.engine.is_dead else 1.0),
        )
        for name, doc, value in values:
            yield GaugeMetricFamily(name, doc, value=value)
        steps = HistogramMetricFamily(f"{p}engine_step_seconds", f"{what} LM engine steps' wall time by kind "
                                      "(decode: decodes only; mixed: with prompt chunks; prefill: prompts only)",
                                      labels=["kind"])
        times = engine.step_times
        for kind in STEP_KINDS:
            steps.add_metric([kind], times.cumulative(kind), times.sums[kind])
        yield steps


class ServerMetrics:
    def __init__(self, tts, chat=None):
        """`tts`: the TTS served; `chat`: the VoiceChat served (None: speech only)."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter("stepvox_http_requests", "HTTP requests answered, by route and status",
                                     ["method", "route", "status"], registry=r)
        self.speech_requests = Counter("stepvox_speech_requests", "speech requests by format and outcome "
                                       "(ok, error, cancelled: the client left, refused: deadline_risk)",
                                       ["response_format", "stream_format", "outcome"], registry=r)
        self.errors = Counter("stepvox_errors", "error responses and failed streams, by error type and code",
                              ["type", "code"], registry=r)
        self.first_audio = Histogram("stepvox_time_to_first_audio_seconds", "request arrival to its first audio "
                                     "bytes sent (queueing included; a whole-file format's at its end)",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.rtf = Histogram("stepvox_real_time_factor", "synthesis wall time / seconds of audio, per completed "
                             "request", buckets=RTF_BUCKETS, registry=r)
        self.audio_seconds = Counter("stepvox_audio_seconds", "seconds of audio produced", registry=r)
        self.running = Gauge("stepvox_requests_running", "requests (speech, chat, transcription) running",
                             registry=r)
        self.waiting = Gauge("stepvox_requests_waiting", "requests waiting for a slot", registry=r)
        self.admission_refusals = Counter("stepvox_admission_refusals", "requests refused with 429 by admission, "
                                          "by reason (queue_full; max_streams and min_slack: deadline_risk)",
                                          ["reason"], registry=r)
        for reason in REFUSAL_REASONS:      # every reason shows from the start, at 0
            self.admission_refusals.labels(reason)
        self.speech_streams = Gauge("stepvox_speech_streams", "real-time speech streams held (streamed speech "
                                    "responses, from admission to their end)", registry=r)
        self.chunk_slack = Histogram("stepvox_speech_stream_chunk_slack_seconds", "a streamed speech chunk's "
                                     "deadline (when the audio sent before it has played) minus its send time; "
                                     "every chunk after a stream's first", buckets=SLACK_BUCKETS, registry=r)
        self.underruns = Counter("stepvox_speech_stream_underruns", "streamed speech chunks sent after their "
                                 "deadline (the client's player ran dry)", registry=r)
        self.recent_min_slack = Gauge("stepvox_speech_stream_recent_min_slack_seconds", "the smallest recent "
                                      "chunk slack among the running speech streams, as admission reads it (NaN: "
                                      "no stream has sent a chunk)", registry=r)
        self.lm_ttft = Histogram("stepvox_lm_time_to_first_token_seconds", "LM request arrival to its first "
                                 "token, per sentence segment", buckets=LATENCY_BUCKETS, registry=r)
        self.lm_tpot = Histogram("stepvox_lm_time_per_output_token_seconds", "LM decode time per token after the "
                                 "first, per sentence segment", buckets=TOKEN_BUCKETS, registry=r)
        self.chat_requests = Counter("stepvox_chat_requests", "chat completions by modalities, streaming and "
                                     "outcome (ok, error, cancelled: the client left)",
                                     ["modalities", "stream", "outcome"], registry=r)
        self.chat_first_text = Histogram("stepvox_chat_time_to_first_text_seconds", "chat request arrival to its "
                                         "first answer text (queueing and audio tokenization included)",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.chat_first_audio = Histogram("stepvox_chat_time_to_first_audio_seconds", "chat request arrival to "
                                          "its first answer audio", buckets=LATENCY_BUCKETS, registry=r)
        self.transcriptions = Counter("stepvox_transcription_requests", "transcriptions by response format and "
                                      "outcome (ok, error)", ["response_format", "outcome"], registry=r)
        self.realtime_sessions = Gauge("stepvox_realtime_sessions", "open /v1/realtime sessions", registry=r)
        self.realtime_first_audio = Histogram("stepvox_realtime_end_of_speech_to_first_audio_seconds",
                                              "a committed turn's last speech frame to its answer's first audio",
                                              buckets=LATENCY_BUCKETS, registry=r)
        self.realtime_speculations = Counter("stepvox_realtime_speculations", "speculative answers by outcome "
                                             "(promoted at the commit, discarded when speech resumed)", ["outcome"],
                                             registry=r)
        self.realtime_wasted = Counter("stepvox_realtime_wasted_text_deltas", "text pieces discarded speculative "
                                       "answers had written", registry=r)
        self.realtime_barge_in = Histogram("stepvox_realtime_barge_in_stop_seconds", "speech over an answer to its "
                                           "generation stopped", buckets=LATENCY_BUCKETS, registry=r)
        r.register(_EngineCollector(tts.engine, "stepvox_", "TTS"))
        if chat is not None:
            r.register(_EngineCollector(chat.chat_engine, "stepvox_chat_", "chat"))

    def watch_streams(self, streams) -> None:
        """Reads the admission's RealtimeStreams at scrape time (both live on the event loop)."""
        def recent_min_slack() -> float:
            slack = streams.recent_min_slack(time.monotonic())
            return math.nan if slack is None else slack
        self.recent_min_slack.set_function(recent_min_slack)

    def lm_output(self, out) -> None:
        """An LM output seen by the TTS stream: its timings when its segment finishes."""
        m = out.metrics
        if not out.finished or m is None or m.first_token_time is None:
            return
        self.lm_ttft.observe(max(0.0, m.first_token_time - m.arrival_time))
        n = len(out.outputs[0].token_ids)
        if n > 1 and m.finished_time is not None:
            self.lm_tpot.observe(max(0.0, (m.finished_time - m.first_token_time) / (n - 1)))

    def realtime_session_done(self, stats: dict) -> None:
        """A /v1/realtime session's statistics (RealtimeSession.stats), when it ends."""
        for seconds in stats["end_of_speech_to_first_audio_s"]:
            self.realtime_first_audio.observe(seconds)
        for seconds in stats["barge_in_stop_s"]:
            self.realtime_barge_in.observe(seconds)
        self.realtime_speculations.labels("promoted").inc(stats["promoted"])
        self.realtime_speculations.labels("discarded").inc(stats["discarded"])
        self.realtime_wasted.inc(stats["wasted_text_deltas"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
