// stepvox's browser page: no build step, no dependencies, nothing loaded from outside this server.
//
// Speak streams POST /v1/audio/speech with response_format "pcm" (raw 16-bit little-endian mono at
// the rate the X-Sample-Rate header names, 24000 unless sample_rate is sent) through fetch's
// ReadableStream, and schedules each piece as an AudioBuffer right after the previous one, so the
// audio plays as it arrives. window.stepvox holds the page's state (counters, last readout) for
// scripts and tests.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORAGE = "stepvox.apiKey";
  const START_LEAD_S = 0.05;    // first chunk (and after an underrun): start this far ahead of "now"

  const state = {
    apiKeyRequired: false,
    voices: [],                 // [{id, name, type}]
    speaking: false,
    phase: "idle",              // idle | requesting | streaming | done | stopped | error
    requests: 0,                // Speak presses that reached the server
    chunks: 0,                  // pieces of audio received in the last request
    receivedBytes: 0,
    receivedSamples: 0,         // in the last request
    totalSamples: 0,            // over every request of this page
    sampleRate: null,
    firstAudioMs: null,         // request sent -> first audio bytes
    totalMs: null,              // request sent -> last byte
    audioSeconds: null,
    rtf: null,
    underruns: 0,
    audioContext: null,         // the AudioContext's state once Speak has made one ("running": it plays)
    tags: null,
    requestId: null,
    error: null,
  };
  window.stepvox = state;

  let apiKey = sessionStorage.getItem(KEY_STORAGE) || "";
  let audioCtx = null;
  let playhead = 0;             // AudioContext time at which the next chunk starts
  let sources = [];             // scheduled AudioBufferSourceNodes of the current request
  let abort = null;             // AbortController of the request in flight

  // ---------------------------------------------------------------- HTTP
  function headers(extra) {
    const h = Object.assign({}, extra || {});
    if (apiKey) h["Authorization"] = "Bearer " + apiKey;
    return h;
  }

  async function errorMessage(resp) {
    try {
      const body = await resp.json();
      if (body && body.error && body.error.message) return `${resp.status}: ${body.error.message}`;
    } catch (_) { /* not JSON */ }
    return `${resp.status} ${resp.statusText}`;
  }

  // fetch with the API key; a 401 reveals the key field (the server requires one)
  async function api(path, options) {
    options = Object.assign({}, options || {});
    options.headers = headers(options.headers);
    const resp = await fetch(path, options);
    if (resp.status === 401) needKey(await errorMessage(resp));
    return resp;
  }

  function needKey(message) {
    state.apiKeyRequired = true;
    $("key-section").hidden = false;
    $("api-key").value = apiKey;
    setStatus("key-status", apiKey ? message : "enter the server's API key", "error");
  }

  function setStatus(id, text, kind) {
    const el = $(id);
    el.textContent = text || "";
    el.className = "status" + (kind ? " " + kind : "");
  }

  // ---------------------------------------------------------------- server info, voices
  async function loadHealth() {
    try {
      const resp = await fetch("/health");
      const body = await resp.json();
      const el = $("health");
      el.textContent = resp.ok ? "ready" : (body.reason || "unavailable");
      el.className = "badge " + (resp.ok ? "ok" : "bad");
    } catch (_) {
      $("health").textContent = "unreachable";
      $("health").className = "badge bad";
    }
  }

  async function loadModel() {
    const resp = await api("/v1/models");
    if (!resp.ok) return;
    const body = await resp.json();
    if (body.data && body.data.length) $("model").textContent = body.data[0].id;
  }

  async function loadVoices(select) {
    const resp = await api("/v1/audio/voices");
    if (!resp.ok) {
      if (resp.status !== 401) setStatus("speak-status", "voices: " + await errorMessage(resp), "error");
      return false;
    }
    const body = await resp.json();
    state.voices = body.data || [];
    const picker = $("voice");
    const keep = select || picker.value;
    picker.replaceChildren();
    for (const [type, label] of [["builtin", "built-in"], ["registered", "registered"]]) {
      const group = document.createElement("optgroup");
      group.label = label;
      for (const v of state.voices.filter((v) => v.type === type)) {
        const option = document.createElement("option");
        option.value = v.id;
        option.textContent = v.name;
        option.dataset.type = v.type;
        group.appendChild(option);
      }
      if (group.children.length) picker.appendChild(group);
    }
    if (keep && state.voices.some((v) => v.id === keep)) picker.value = keep;
    voiceChanged();
    return true;
  }

  function voiceChanged() {
    const option = $("voice").selectedOptions[0];
    $("voice-delete").disabled = !option || option.dataset.type !== "registered";
  }

  async function useKey() {
    apiKey = $("api-key").value.trim();
    if (apiKey) sessionStorage.setItem(KEY_STORAGE, apiKey);
    else sessionStorage.removeItem(KEY_STORAGE);
    if (await loadVoices()) {
      setStatus("key-status", "key accepted", "ok");
      loadModel();
    }
  }

  // ---------------------------------------------------------------- speech
  function speechBody() {
    const body = {
      input: $("text").value,
      response_format: "pcm",
      stream_format: "audio",
      mode: $("mode").value,
    };
    if ($("voice").value) body.voice = $("voice").value;
    for (const [id, field] of [["emotion", "emotion"], ["language", "language"], ["speed-tag", "speed_tag"]]) {
      if ($(id).value) body[field] = $(id).value;
    }
    const tempo = parseFloat($("tempo").value);
    if (Number.isFinite(tempo) && tempo !== 1) body.speed = tempo;
    const maxTokens = parseInt($("max-tokens").value, 10);
    if (Number.isFinite(maxTokens)) body.max_tokens = maxTokens;
    const temperature = parseFloat($("temperature").value);
    if (Number.isFinite(temperature)) body.temperature = temperature;
    const seed = parseInt($("seed").value, 10);
    if (Number.isFinite(seed)) body.seed = seed;
    const rate = parseInt($("sample-rate").value, 10);
    if (Number.isFinite(rate)) body.sample_rate = rate;     // the stream says its rate (X-Sample-Rate)
    return body;
  }

  function ensureAudio() {
    if (!audioCtx) {
      const Ctx = window.AudioContext || window.webkitAudioContext;
      if (!Ctx) return null;
      audioCtx = new Ctx({ latencyHint: "interactive" });
    }
    if (audioCtx.state === "suspended") audioCtx.resume();
    return audioCtx;
  }

  // PCM16 little-endian bytes -> Float32 samples
  function pcm16ToFloat(bytes) {
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const n = bytes.byteLength >> 1;
    const out = new Float32Array(n);
    for (let i = 0; i < n; i++) out[i] = view.getInt16(2 * i, true) / 32768;
    return out;
  }

  function schedule(samples, rate) {
    if (!audioCtx) return;
    const buffer = audioCtx.createBuffer(1, samples.length, rate);
    buffer.copyToChannel(samples, 0);
    const src = audioCtx.createBufferSource();
    src.buffer = buffer;
    src.connect(audioCtx.destination);
    const now = audioCtx.currentTime;
    if (playhead < now) {                       // nothing queued: the previous chunk has finished
      if (state.chunks > 1) state.underruns += 1;
      playhead = now + START_LEAD_S;
    }
    src.start(playhead);
    playhead += buffer.duration;
    sources.push(src);
    src.onended = () => {
      sources = sources.filter((s) => s !== src);
      if (!sources.length && !state.speaking && state.phase === "done") setStatus("speak-status", "played", "ok");
    };
  }

  function resetReadout() {
    Object.assign(state, {
      chunks: 0, receivedBytes: 0, receivedSamples: 0, sampleRate: null, firstAudioMs: null, totalMs: null,
      audioSeconds: null, rtf: null, underruns: 0, tags: null, requestId: null, error: null,
    });
    for (const id of ["ttfa", "rtf", "audio-seconds", "underruns", "tags"]) $(id).textContent = "–";
  }

  function showReadout() {
    $("ttfa").textContent = state.firstAudioMs === null ? "–" : `${state.firstAudioMs.toFixed(0)} ms`;
    $("rtf").textContent = state.rtf === null ? "–" : state.rtf.toFixed(3);
    $("audio-seconds").textContent = state.sampleRate ? `${(state.receivedSamples / state.sampleRate).toFixed(2)} s` : "–";
    $("underruns").textContent = String(state.underruns);
    $("tags").textContent = state.tags || "–";
  }

  function setSpeaking(on) {
    state.speaking = on;
    $("speak").disabled = on;
    $("stop").disabled = !on;
  }

  async function speak() {
    if (state.speaking) return;
    const body = speechBody();
    if (!body.input.trim()) {
      setStatus("speak-status", "type some text first", "error");
      return;
    }
    resetReadout();
    setSpeaking(true);
    state.phase = "requesting";
    setStatus("speak-status", "waiting for the first audio…");
    const ctx = ensureAudio();
    state.audioContext = ctx ? ctx.state : "unavailable";
    stopSources();
    abort = new AbortController();
    const t0 = performance.now();
    try {
      const resp = await api("/v1/audio/speech", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
        signal: abort.signal,
      });
      state.requestId = resp.headers.get("X-Request-Id");
      if (!resp.ok) throw new Error(await errorMessage(resp));
      state.requests += 1;
      const rate = parseInt(resp.headers.get("X-Sample-Rate"), 10) || 24000;
      state.sampleRate = rate;
      const tags = resp.headers.get("X-Stepvox-Tags");
      state.tags = tags ? decodeURIComponent(tags) : null;
      state.phase = "streaming";
      const reader = resp.body.getReader();
      let carry = null;                           // an odd byte left from the previous piece
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        if (!value || !value.byteLength) continue;
        state.receivedBytes += value.byteLength;
        let bytes = value;
        if (carry) {
          bytes = new Uint8Array(value.byteLength + 1);
          bytes[0] = carry[0];
          bytes.set(value, 1);
          carry = null;
        }
        if (bytes.byteLength & 1) {
          carry = bytes.slice(bytes.byteLength - 1);
          bytes = bytes.subarray(0, bytes.byteLength - 1);
        }
        if (!bytes.byteLength) continue;
        if (state.firstAudioMs === null) {
          state.firstAudioMs = performance.now() - t0;
          setStatus("speak-status", "playing as it arrives…");
        }
        const samples = pcm16ToFloat(bytes);
        state.chunks += 1;
        state.receivedSamples += samples.length;
        state.totalSamples += samples.length;
        schedule(samples, rate);
        showReadout();
      }
      state.totalMs = performance.now() - t0;
      state.audioSeconds = state.receivedSamples / rate;
      state.rtf = state.audioSeconds > 0 ? state.totalMs / 1000 / state.audioSeconds : null;
      state.phase = "done";
      if (audioCtx) state.audioContext = audioCtx.state;
      showReadout();
      setStatus("speak-status", sources.length ? "received; playing…" : "done", "ok");
    } catch (err) {
      if (err.name === "AbortError") {
        state.phase = "stopped";
        setStatus("speak-status", "stopped");
      } else {
        state.phase = "error";
        state.error = String(err.message || err);
        setStatus("speak-status", state.error, "error");
      }
      showReadout();
    } finally {
      abort = null;
      setSpeaking(false);
    }
  }

  function stopSources() {
    for (const src of sources) {
      try { src.stop(); } catch (_) { /* not started */ }
    }
    sources = [];
    playhead = 0;
  }

  function stop() {
    if (abort) abort.abort();       // the server cancels the request when the connection closes
    stopSources();
  }

  // ---------------------------------------------------------------- voices: upload, delete
  async function uploadVoice() {
    const name = $("clone-name").value.trim();
    const transcript = $("clone-transcript").value.trim();
    const file = $("clone-file").files[0];
    if (!name || !transcript || !file) {
      setStatus("clone-status", "a name, an audio file and its transcript are needed", "error");
      return;
    }
    const form = new FormData();
    form.append("name", name);
    form.append("transcript", transcript);
    form.append("audio", file, file.name);
    $("clone-upload").disabled = true;
    setStatus("clone-status", "uploading…");
    try {
      const resp = await api("/v1/audio/voices", { method: "POST", body: form });
      if (!resp.ok) throw new Error(await errorMessage(resp));
      await loadVoices(name);
      setStatus("clone-status", `voice "${name}" registered`, "ok");
    } catch (err) {
      setStatus("clone-status", String(err.message || err), "error");
    } finally {
      $("clone-upload").disabled = false;
    }
  }

  async function deleteVoice() {
    const name = $("voice").value;
    if (!name) return;
    try {
      const resp = await api("/v1/audio/voices/" + encodeURIComponent(name), { method: "DELETE" });
      if (!resp.ok) throw new Error(await errorMessage(resp));
      await loadVoices();
      setStatus("clone-status", `voice "${name}" deleted`, "ok");
    } catch (err) {
      setStatus("clone-status", String(err.message || err), "error");
    }
  }

  // ---------------------------------------------------------------- start
  $("speak").addEventListener("click", speak);
  $("stop").addEventListener("click", stop);
  $("voice").addEventListener("change", voiceChanged);
  $("api-key-use").addEventListener("click", useKey);
  $("api-key").addEventListener("keydown", (e) => { if (e.key === "Enter") useKey(); });
  $("clone-upload").addEventListener("click", uploadVoice);
  $("voice-delete").addEventListener("click", deleteVoice);
  $("text").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) speak(); });

  if (apiKey) {                 // a key given before (this tab): shown, so that it can be changed
    $("key-section").hidden = false;
    $("api-key").value = apiKey;
  }
  loadHealth();
  loadVoices().then((ok) => { if (ok) loadModel(); });
})();
