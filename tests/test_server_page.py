"""The browser page of `stepvox serve` (GET /), in Debian's headless Chromium driven by selenium,
against a real `stepvox serve` process (the tiny default folders, a free loopback port) that
requires an API key: the page asks for the key, lists the voices, registers a clone voice from an
uploaded file, speaks a short text with it (streamed pcm into Web Audio), shows the time to first
audio and the RTF, stops a long text mid-stream (the server frees its KV pages), and deletes the
voice; a screenshot is saved under the test's tmp_path.

Chromium and its driver come from apt (`chromium`, `chromium-driver`; .ci/run installs them). When
they are missing the test installs them the same way where it can (root with apt-get), and skips,
saying why, only where it cannot."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from stepvox.server.routes import STATIC_DIR, STATIC_FILES
from stepvox.testing.speech import espeak_wav
from test_server import pages_back_s, start_server, stop_server

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
API_KEY = "page-key"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--autoplay-policy=no-user-gesture-required", "--disable-dev-shm-usage", "--window-size=1100,1500"]
VOICE = "page-clone"


def _have_chromium() -> bool:
    return os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)


def _install_chromium() -> str | None:
    """Installs chromium and chromium-driver with apt as .ci/run does; None, or why it could not."""
    if not shutil.which("apt-get"):
        return "no apt-get"
    if os.geteuid() != 0:
        return "not root (apt-get install needs it)"
    install = ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for commands in ([install], [["apt-get", "update", "-q"], install]):
        try:
            if all(subprocess.run(c, env=env, capture_output=True, timeout=600).returncode == 0 for c in commands):
                return None
        except subprocess.TimeoutExpired:
            return "apt-get timed out"
    return "apt-get install chromium chromium-driver failed"


@pytest.fixture(scope="module")
def chromium_ready():
    if not _have_chromium():
        why = _install_chromium()
        if not _have_chromium():
            pytest.skip(f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): absent, and "
                        f"they could not be installed here ({why or 'installed, yet not found'}); "
                        ".ci/run installs them")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("serve-page-home"), "page", ["--api-key", API_KEY], api_key=API_KEY)
    yield s
    stop_server(s)


@pytest.fixture
def browser(chromium_ready, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver",
                                    reason="selenium is in the test extra: pip install -e '.[test]'")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # the driver's path given: selenium does not look for (or download) one
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def wait_for(driver, script: str, timeout: float = 30, what: str = ""):
    """Polls a JS expression until it is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = driver.execute_script("return " + script)
        if value:
            return value
        if time.monotonic() > deadline:
            state = driver.execute_script("return JSON.stringify(window.stepvox || null)")
            pytest.fail(f"timed out waiting for {what or script}; page state: {state}")
        time.sleep(0.05)


def speech_requests(server) -> dict:
    """{(outcome, response_format, stream_format): count} of the server's speech requests."""
    metrics = server.request("GET", "/metrics")[2].decode()
    return {(s.labels["outcome"], s.labels["response_format"], s.labels["stream_format"]): s.value
            for family in text_string_to_metric_families(metrics) for s in family.samples
            if s.name == "stepvox_speech_requests_total"}


def text_of(driver, element_id: str) -> str:
    return driver.execute_script(f"return document.getElementById({element_id!r}).textContent").strip()


# ---------------------------------------------------------------- plain HTTP
def test_page_and_its_files_are_served_without_the_key_and_load_nothing_from_outside(server):
    status, headers, body = server.request("GET", "/", headers={"Authorization": ""})
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert headers["content-security-policy"].startswith("default-src 'self'")
    assert b'src="/static/app.js"' in body and b'href="/static/style.css"' in body
    for name, media_type in STATIC_FILES.items():
        status, headers, served = server.request("GET", f"/static/{name}", headers={"Authorization": ""})
        assert status == 200 and headers["content-type"] == media_type
        assert served == (STATIC_DIR / name).read_bytes()
        assert not re.search(rb"https?://|//cdn|@import", served), name        # no external URL anywhere
    for path in ("/static/nothing.js", "/static/..%2Froutes.py", "/static/"):
        status, _, body = server.request("GET", path, headers={"Authorization": ""})
        assert status == 404 and json.loads(body)["error"]["code"] == "not_found", path
    status, _, _ = server.request("GET", "/v1/audio/voices", headers={"Authorization": ""})
    assert status == 401                                   # the page's API calls need the key


# ---------------------------------------------------------------- the page in Chromium
def test_page_asks_for_the_key_lists_voices_clones_one_and_speaks_it_as_it_streams(server, browser, tmp_path):
    reference = str(tmp_path / "reference.wav")
    espeak_wav(reference, "this is my voice, please clone it")
    driver = browser
    driver.get(server.url + "/")
    assert driver.title == "stepvox"

    # the server wants a key: the page shows the field; with the key the voices come
    wait_for(driver, "!document.getElementById('key-section').hidden", what="the API key field")
    assert text_of(driver, "health") == "ready"
    driver.find_element("id", "api-key").send_keys(API_KEY)
    driver.find_element("id", "api-key-use").click()
    voices = wait_for(driver, "window.stepvox.voices.length && window.stepvox.voices", what="the voice list")
    assert {v["id"] for v in voices} >= {"Tingting", "TingtingRAP", "Tingting哼唱"}
    options = driver.execute_script("return [...document.querySelectorAll('#voice option')].map(o => o.value)")
    assert options == [v["id"] for v in voices]
    assert text_of(driver, "key-status") == "key accepted"
    wait_for(driver, "document.getElementById('model').textContent", what="the model name")

    # a clone voice from an uploaded file: registered, listed and selected
    driver.find_element("id", "clone-name").send_keys(VOICE)
    driver.find_element("id", "clone-file").send_keys(reference)
    driver.find_element("id", "clone-transcript").send_keys("this is my voice, please clone it")
    driver.find_element("id", "clone-upload").click()
    wait_for(driver, f"document.getElementById('voice').value === {VOICE!r}", what="the uploaded voice selected")
    assert text_of(driver, "clone-status") == f'voice "{VOICE}" registered'

    # speak: few LM tokens, so that the CPU run stays short
    text = driver.find_element("id", "text")
    text.clear()
    text.send_keys("Hello there.")
    driver.execute_script("document.querySelector('details').open = true")
    driver.find_element("id", "max-tokens").send_keys("20")
    driver.find_element("id", "seed").send_keys("1")
    driver.execute_script("document.getElementById('emotion').value = '高兴1'")
    driver.find_element("id", "speak").click()
    state = wait_for(driver, "['done', 'error'].includes(window.stepvox.phase) && window.stepvox", timeout=45,
                     what="the speech to arrive")
    assert state["phase"] == "done", state
    assert state["receivedSamples"] > 0 and state["chunks"] >= 1
    assert state["receivedBytes"] == 2 * state["receivedSamples"]
    assert state["sampleRate"] == 24000 and state["tags"] == "(高兴1)"
    assert 0 < state["firstAudioMs"] <= state["totalMs"] and state["rtf"] > 0
    assert state["audioSeconds"] == pytest.approx(state["receivedSamples"] / 24000)
    assert state["audioContext"] == "running"              # Web Audio took the chunks (autoplay allowed)
    assert re.fullmatch(r"\d+ ms", text_of(driver, "ttfa")), text_of(driver, "ttfa")
    assert re.fullmatch(r"\d+\.\d{3}", text_of(driver, "rtf")), text_of(driver, "rtf")
    assert re.fullmatch(r"\d+\.\d\d s", text_of(driver, "audio-seconds"))
    assert driver.find_element("id", "speak").is_enabled()
    screenshot = tmp_path / "page.png"
    assert driver.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
    print(f"screenshot: {screenshot}; first audio {state['firstAudioMs']:.0f} ms, RTF {state['rtf']:.3f}, "
          f"{state['receivedSamples']} samples in {state['chunks']} chunks")

    # the server saw one pcm stream, completed
    assert speech_requests(server) == {("ok", "pcm", "audio"): 1}

    # Stop mid-stream (a long text, at 16 kHz): the page aborts the fetch, the server cancels the request
    text.clear()
    text.send_keys(" ".join(f"Sentence number {i} of a long text." for i in range(40)))
    driver.execute_script("document.getElementById('sample-rate').value = '16000'")
    driver.find_element("id", "speak").click()
    wait_for(driver, "window.stepvox.receivedSamples > 0", timeout=30, what="the first audio of the long text")
    driver.find_element("id", "stop").click()
    state = wait_for(driver, "window.stepvox.phase !== 'streaming' && window.stepvox", what="the stop")
    assert state["phase"] == "stopped" and state["sampleRate"] == 16000, state
    assert pages_back_s(server) < 10
    assert server.health()["requests_running"] == 0
    assert speech_requests(server) == {("ok", "pcm", "audio"): 1, ("cancelled", "pcm", "audio"): 1}

    # the registered voice is deleted from the page
    driver.find_element("id", "voice-delete").click()
    wait_for(driver, f"!window.stepvox.voices.some(v => v.id === {VOICE!r})", what="the voice deleted")
    assert text_of(driver, "clone-status") == f'voice "{VOICE}" deleted'

    # nothing went wrong in the page: the only console errors are the 401s before the key was given
    errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert all("status of 401" in m for m in errors), errors


# ---------------------------------------------------------------- the Talk tab (a --chat server)
@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("serve-talk-home"), "talk", ["--chat", "--api-key", API_KEY],
                     api_key=API_KEY)
    yield s
    stop_server(s)


def test_talk_tab_holds_a_spoken_turn_through_the_fake_microphone(chromium_ready, chat_server, tmp_path):
    """Chromium's fake microphone plays a wav (espeak-ng speech, then silence: a pause that commits
    the turn) into the Talk tab; the answer's transcript and audio come back over /v1/realtime."""
    import numpy as np
    import soundfile as sf
    webdriver = pytest.importorskip("selenium.webdriver")
    speech, rate = espeak_wav(str(tmp_path / "q.wav"), "hello, what is the weather like today")
    mic = str(tmp_path / "mic.wav")
    sf.write(mic, np.concatenate([np.zeros(rate // 2, np.float32), speech.astype(np.float32),
                                  np.zeros(rate * 3, np.float32)]), rate, subtype="PCM_16")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                                  f"--use-file-for-fake-audio-capture={mic}"]:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.get(chat_server.url + "/")
        driver.execute_script(f"sessionStorage.setItem('stepvox.apiKey', {API_KEY!r})")
        driver.get(chat_server.url + "/")
        wait_for(driver, "window.stepvox.voices.length", what="the voice list")
        driver.find_element("id", "talk-max-tokens").send_keys("6")
        driver.find_element("id", "talk-start").click()
        wait_for(driver, "window.stepvoxTalk.phase === 'listening' || window.stepvoxTalk.error", what="the session")
        assert driver.execute_script("return window.stepvoxTalk.error") is None
        talk = wait_for(driver, "window.stepvoxTalk.answers >= 1 && window.stepvoxTalk.userTranscripts.length >= 1 "
                                "&& window.stepvoxTalk.audioSamples > 0 && window.stepvoxTalk", timeout=120,
                        what="a spoken answer")
        for kind in ("session.created", "input_audio_buffer.speech_started", "input_audio_buffer.committed",
                     "response.audio.delta", "response.done"):
            assert kind in talk["events"], talk["events"]
        assert talk["assistantText"] and text_of(driver, "talk-assistant") == talk["assistantText"]
        assert text_of(driver, "talk-user") != "–" and re.fullmatch(r"\d+ ms", text_of(driver, "talk-latency"))
        screenshot = tmp_path / "talk.png"
        assert driver.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
        print(f"screenshot: {screenshot}; latency {talk['latenciesMs']} ms, answer {talk['assistantText']!r}")
        driver.find_element("id", "talk-stop").click()
    finally:
        driver.quit()
