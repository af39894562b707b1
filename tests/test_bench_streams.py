"""bench/streams.py --smoke on the CPU (tiny random folders): the sweep, the Poisson workload and the
server path run end to end, and the JSON holds the fields the GPU run reports, with counts that
agree with the streams started. Whether the CPU keeps up is not the question (it does not): the
figures are checked for sanity, not speed."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check_level(level: dict, streams: int) -> None:
    shown = {k: v for k, v in level.items() if k != "per_stream"}       # the failure message
    per_stream = level["per_stream"]
    assert level["streams"] == streams == len(per_stream), shown
    assert sum(s["requests"] for s in per_stream) == level["requests"], shown
    assert level["requests"] >= streams, shown
    assert 0 <= level["cut"] <= level["requests"], shown
    assert level["error_count"] == 0, shown
    assert level["requests_heard"] == level["first_audio_ms"]["n"], shown
    assert 1 <= level["requests_heard"] <= level["requests"], shown
    assert 1 <= level["streams_heard"] <= streams, shown
    fa = level["first_audio_ms"]
    assert 0 < fa["p50"] <= fa["p90"] <= fa["p99"], shown
    assert level["chunks"] >= level["requests_heard"], shown
    assert 0 <= level["underrun_chunks"] <= level["chunks"] - level["requests_heard"], shown
    assert sum(s["underruns"] for s in per_stream) == level["underrun_chunks"], shown
    assert level["underrun_streams"] == sum(1 for s in per_stream if s["underruns"]), shown
    assert level["underrun_streams"] <= streams, shown
    assert level["underrun_stream_fraction"] == pytest.approx(level["underrun_streams"] / streams, abs=1e-4), shown
    assert level["underrun_requests"] <= level["requests_heard"], shown
    if level["chunks"] > level["requests_heard"]:       # chunks after a first one have a slack
        sl = level["slack_ms"]
        assert sl["min"] <= sl["p1"] <= sl["p50"], shown
        assert (sl["min"] < 0) == (level["underrun_chunks"] > 0), shown
    assert level["audio_s"] > 0, shown
    t0, t1 = level["window"]
    assert t1 - t0 >= level["hold_s"], shown
    steps = level["steps"]
    assert steps["steps"] > 0, shown
    assert steps["interval_ms"]["p50"] > 0 and steps["call_ms"]["p50"] > 0, shown
    assert level["gpu"] is None                         # no NVML on the CPU


def test_streams_smoke(tmp_path):
    out = tmp_path / "streams.json"
    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "bench", "streams.py"), "--smoke", "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert "errors" not in res, res["errors"]
    assert res["smoke"] and res["device"] == "cpu"
    assert res["nvml"]["available"] is False and "skipped" in res["nvml"]["note"]

    inproc = res["in_process"]
    assert inproc["load_s"] > 0 and inproc["prompt_tokens"] > 0
    assert inproc["warmup"]["streams"] == 1 and inproc["warmup"]["first_audio_ms"]["n"] == 1
    assert [lv["streams"] for lv in inproc["levels"]] == res["plan"]["levels"] == [1, 2]
    for level in inproc["levels"]:
        check_level(level, level["streams"])
    assert "largest_zero_underrun" in inproc and "held" in inproc and inproc["skipped"] == []

    p = inproc["poisson"]
    assert p["base"] == 1 and p["base_heard"] == 1 and p["rate"] == 2.0
    assert p["arrivals"] >= 1 and 0 <= p["arrivals_heard"] <= p["arrivals"] and p["arrival_errors"] == 0
    qa, aw, qb = (p["windows"][k] for k in ("quiet_a", "arrivals", "quiet_b"))
    assert qa[0] < qa[1] <= aw[0] < aw[1] <= qb[0] < qb[1]
    for key in ("steps_quiet", "steps_arrivals"):
        assert p[key]["steps"] > 0 and p[key]["interval_ms"]["p99"] >= p[key]["interval_ms"]["p50"] > 0
    assert p["steps_arrivals"]["prefill_steps"] >= 1        # an arrival's prompt was computed inside the window
    assert p["p99_arrivals_over_p50_quiet"] > 0
    for key in ("base_quiet", "base_arrivals"):
        assert 0 <= p[key]["underrun_chunks"] <= p[key]["chunks"]

    server = res["server"]
    assert server["start_s"] > 0 and server["exit"] == 0 and server["url"].startswith("http://127.0.0.1:")
    assert [lv["streams"] for lv in server["levels"]] == [2]
    check_level(server["levels"][0], 2)
    view = server["levels"][0]["server_view"]           # /metrics scraped around the level
    assert view.get("stepvox_time_to_first_audio_seconds_count", 0) >= server["levels"][0]["requests_heard"]

    assert len(res["table"]) == 3 and len(res["poisson_table"]) == 1
    assert {"path", "N", "first audio p50/p90/p99 ms", "underrun streams", "slack p1/p50 ms"} <= set(res["table"][0])
    assert "first audio p50/p90/p99 ms" in proc.stdout      # the table printed
    png = tmp_path / "streams.png"
    if importlib.util.find_spec("matplotlib") is None:
        assert res["plot"] is None and "matplotlib" in res["plot_note"]
    else:
        assert res["plot"] == str(png)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
