"""Chunk-deadline admission of speech (server/admission.py): the slack tracker and the admission rule
fed exact times, then real `stepvox serve` processes on loopback (test_server.py's helpers) refusing
speech with 429 `deadline_risk` while live streams hold their places (`--max-streams`) or while a
running stream's recent slack is below `--min-slack-ms`, and /metrics counting it all."""
from __future__ import annotations

import json
import re
import time

import pytest

from stepvox import cli
from stepvox.server.admission import RealtimeStreams, SlackTracker
from test_server import Server, assert_error, read_sse, start_server, stop_server

# ~800 LM tokens, ~19 s of speech: seconds of work on a CPU, so a stream stays live through a test
LONG = {"input": "Hello there.", "max_tokens": 800, "seed": 3, "response_format": "pcm"}
HOUR_MS = 3_600_000


# ---------------------------------------------------------------- the tracker and the rule, fed times
def test_slack_tracker_deadlines_slack_and_underruns():
    t = SlackTracker(window_s=1.0)
    assert t.recent_min_slack(5.0) is None and t.deadline is None        # nothing sent: no deadline yet
    assert t.sent(10.0, 0.5) is None                 # the first chunk starts playback: it has no deadline
    assert t.deadline == 10.5
    assert t.sent(10.25, 1.0) == pytest.approx(0.25)           # due at 10.5 (10.0 + 0.5 s played)
    assert t.deadline == pytest.approx(11.5)
    assert t.sent(11.625, 0.5) == pytest.approx(-0.125)         # due at 11.5: late, an underrun
    assert t.underruns == 1
    # the player ran dry and resumed with the late chunk: the next is due at 11.625 + 0.5, not at
    # 10.0 + 2.0 s sent (which would count this on-time chunk as a second underrun)
    assert t.deadline == pytest.approx(12.125)
    assert t.sent(12.0625, 1.0) == pytest.approx(0.0625)
    assert (t.chunks, t.underruns) == (4, 1) and t.deadline == pytest.approx(13.125)
    # recent: the slacks of the last second's chunks, and the headroom if the next chunk left now
    assert t.recent_min_slack(12.0625) == pytest.approx(-0.125)     # the underrun at 11.625 is recent
    assert t.recent_min_slack(12.75) == pytest.approx(0.0625)       # forgotten after a second
    assert t.recent_min_slack(13.375) == pytest.approx(-0.25)       # stalled: the next chunk is already late


def test_slack_tracker_refuses_impossible_chunks():
    t = SlackTracker()
    t.sent(1.0, 0.5)
    with pytest.raises(ValueError, match="times go backwards"):
        t.sent(0.5, 0.5)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="audio seconds > 0"):
            t.sent(2.0, bad)
    assert t.chunks == 1


def test_realtime_streams_refuse_at_max_streams_and_below_min_slack():
    streams = RealtimeStreams(max_streams=2, min_slack_s=0.1, window_s=1.0)
    a = streams.open()
    assert streams.refusal(0.0, realtime=True) is None
    b = streams.open()
    reason, message = streams.refusal(0.0, realtime=True)
    assert reason == "max_streams" and "max_streams 2" in message
    assert streams.refusal(0.0, realtime=False) is None       # a whole file holds no stream
    streams.close(b)
    assert len(streams) == 1 and streams.refusal(0.0, realtime=True) is None
    a.sent(0.0, 1.0)
    assert streams.refusal(0.5, realtime=True) is None         # 0.5 s of audio left to play
    a.sent(1.0625, 1.0)                                        # 62.5 ms late
    for realtime in (True, False):                             # every speech request waits for the streams
        reason, message = streams.refusal(1.1, realtime)
        assert reason == "min_slack" and "-62 ms" in message and "min_slack_ms 100" in message
    a.sent(1.875, 1.0)                                         # 0.1875 s early
    assert streams.refusal(2.125, realtime=True) is None       # the late chunk is over a second old
    assert streams.recent_min_slack(2.125) == pytest.approx(0.1875)
    assert streams.refusal(3.0, realtime=True)[0] == "min_slack"   # headroom 3.0625 - 3.0 < 0.1
    streams.close(a)
    assert streams.recent_min_slack(3.0) is None and streams.refusal(3.0, realtime=True) is None


@pytest.mark.parametrize("argv, says", [
    (["--max-streams", "0"], "argument --max-streams: expected a positive integer, got '0'"),
    (["--min-slack-ms", "nan"], r"min_slack_ms must be a finite number >= 0, got nan"),
    (["--min-slack-ms", "-5"], r"min_slack_ms must be a finite number >= 0, got -5.0"),
])
def test_serve_refuses_bad_deadline_options_before_anything_loads(argv, says, capsys, monkeypatch):
    monkeypatch.setattr(cli, "default_tts_folders", lambda *a: pytest.fail("the default folders were written"))
    monkeypatch.setattr(cli.TTS, "from_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))
    try:
        code = cli.main(["serve", "--port", "0", *argv])
    except SystemExit as exc:                 # argparse's errors exit from the parser
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2 and re.fullmatch(rf"stepvox: error: .*{says}.*\n", err), err
    assert out == ""


# ---------------------------------------------------------------- servers
@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("admission-home")


@pytest.fixture(scope="module")
def streams_server(home):
    s = start_server(home, "max-streams", ["--max-streams", "2"])
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def slack_server(home, streams_server):
    """Refuses speech as soon as any running stream has sent audio: no stream has an hour of slack."""
    s = start_server(home, "min-slack", ["--min-slack-ms", str(HOUR_MS)])
    yield s
    stop_server(s)


def metric(server: Server, name: str, **labels) -> float:
    return server.metrics().get((name, tuple(sorted(labels.items()))), 0.0)


def streams_gone(server: Server, limit_s: float = 30.0) -> None:
    """Waits until no real-time stream is held (a closed client's response ends at the engine's next step)."""
    t0 = time.monotonic()
    while metric(server, "stepvox_speech_streams") != 0:
        assert time.monotonic() - t0 < limit_s, server.metrics()
        time.sleep(0.05)


def test_max_streams_refuses_with_deadline_risk_while_streams_are_live(streams_server):
    s = streams_server
    assert metric(s, "stepvox_admission_refusals_total", reason="max_streams") == 0
    with s.stream(LONG) as first, s.stream({**LONG, "stream_format": "sse"}) as second:
        assert first.status == 200 and first.read1(65536)
        assert second.status == 200 and second.read1(65536)
        assert metric(s, "stepvox_speech_streams") == 2
        t0 = time.perf_counter()
        error, headers = assert_error(s.speech(input="One more."), 429, "deadline_risk", None,
                                      "2 real-time speech streams are running \\(max_streams 2\\)")
        assert time.perf_counter() - t0 < 1.0           # refused at once, not after queueing
        assert error["type"] == "rate_limit_error" and headers["retry-after"] == "1"
        assert assert_error(s.speech(stream_format="sse"), 429, "deadline_risk")[0]["type"] == "rate_limit_error"
        # a whole file (flac) is no real-time stream: max_streams does not count it
        status, headers, _ = s.speech(response_format="flac")
        assert status == 200 and headers["content-type"] == "audio/flac"
        assert metric(s, "stepvox_admission_refusals_total", reason="max_streams") == 2
        assert metric(s, "stepvox_admission_refusals_total", reason="min_slack") == 0
        assert metric(s, "stepvox_errors_total", type="rate_limit_error", code="deadline_risk") == 2
        assert metric(s, "stepvox_speech_requests_total", response_format="mp3", stream_format="audio",
                      outcome="refused") == 1
    # the clients have gone: their streams' places come back
    streams_gone(s)
    assert s.speech()[0] == 200


def test_chunk_slack_is_observed_for_every_chunk_after_the_first(streams_server):
    s = streams_server
    streams_gone(s)
    count_before = metric(s, "stepvox_speech_stream_chunk_slack_seconds_count")
    underruns_before = metric(s, "stepvox_speech_stream_underruns_total")
    late_before = metric(s, "stepvox_speech_stream_chunk_slack_seconds_bucket", le="0.0")
    # the native rate: no resampler holds samples back for a last piece
    status, _, body = s.speech(input="Hello there, how are you today?", max_tokens=200, response_format="pcm",
                               sample_rate=22050, stream_format="sse")
    assert status == 200
    deltas = [e for e in read_sse(body) if e["type"] == "speech.audio.delta"]
    assert len(deltas) >= 3, len(deltas)                  # several decoder chunks, each sent as it came
    # one slack per chunk after the first (the first starts playback); the done event carries no audio
    assert metric(s, "stepvox_speech_stream_chunk_slack_seconds_count") - count_before == len(deltas) - 1
    late = metric(s, "stepvox_speech_stream_chunk_slack_seconds_bucket", le="0.0") - late_before
    assert metric(s, "stepvox_speech_stream_underruns_total") - underruns_before == late
    body = s.request("GET", "/metrics")[2].decode()
    assert "stepvox_speech_stream_recent_min_slack_seconds NaN" in body      # no stream runs now


def test_min_slack_refuses_speech_while_a_stream_runs_short_of_it(slack_server):
    s = slack_server
    assert s.speech()[0] == 200                    # no stream has sent audio yet: nothing to protect
    with s.stream(LONG) as running:
        assert running.status == 200 and running.read1(65536)
        for fields in ({}, {"response_format": "flac"}, {"stream_format": "sse"}):   # every speech request
            error, headers = assert_error(s.speech(**fields), 429, "deadline_risk", None,
                                          f"chunk slack is -?\\d+ ms, below min_slack_ms {HOUR_MS}")
            assert headers["retry-after"] == "1"
        slack = metric(s, "stepvox_speech_stream_recent_min_slack_seconds")
        assert slack < 60, slack              # not NaN: the running stream's slack, seconds at most
        assert metric(s, "stepvox_admission_refusals_total", reason="min_slack") == 3
        assert metric(s, "stepvox_admission_refusals_total", reason="max_streams") == 0
        # refusals take no queue place: the one running request is all there is
        health = json.loads(s.request("GET", "/health")[2])
        assert health["requests_running"] == 1 and health["requests_waiting"] == 0
    streams_gone(s)
    assert s.speech()[0] == 200                    # the slow stream has gone: its slack no longer counts
