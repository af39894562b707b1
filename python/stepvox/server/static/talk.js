// The Talk tab of stepvox's page: a real-time voice session over WS /v1/realtime (a server started
// with --chat). The microphone goes through an AudioWorklet (talk-worklet.js) as 20 ms frames of
// 16 kHz PCM16 in input_audio_buffer.append events; the answer's response.audio.delta pieces (24 kHz
// PCM16) are scheduled back to back; speech_started stops playback (barge-in); both transcripts and
// the latency (end of speech to first answer audio) are shown. window.stepvoxTalk holds the state.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const OUT_RATE = 24000;
  const talk = {
    phase: "off",               // off | connecting | listening | error
    events: [],                 // types of the server events, in order
    userTranscripts: [],
    assistantText: "",
    answers: 0,
    latenciesMs: [],            // speech_stopped -> first audio delta, per answer
    audioSamples: 0,
    error: null,
  };
  window.stepvoxTalk = talk;

  let ws = null, ctx = null, mic = null, node = null, playCtx = null;
  let playhead = 0, sources = [], stoppedAt = null, waitingFirstAudio = false;

  function key() { return sessionStorage.getItem("stepvox.apiKey") || ""; }

  function show() {
    $("talk-user").textContent = talk.userTranscripts.join(" / ") || "–";
    $("talk-assistant").textContent = talk.assistantText || "–";
    const l = talk.latenciesMs;
    $("talk-latency").textContent = l.length ? `${Math.round(l[l.length - 1])} ms` : "–";
    $("talk-status").textContent = talk.phase;
  }

  function stopPlayback() {
    for (const s of sources) { try { s.stop(); } catch (_) { /* ended */ } }
    sources = [];
    playhead = 0;
  }

  function play(b64) {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const pcm = new Int16Array(bytes.buffer, 0, bytes.length >> 1);
    if (!pcm.length) return;
    const buffer = playCtx.createBuffer(1, pcm.length, OUT_RATE);
    const data = buffer.getChannelData(0);
    for (let i = 0; i < pcm.length; i++) data[i] = pcm[i] / 32768;
    const source = playCtx.createBufferSource();
    source.buffer = buffer;
    source.connect(playCtx.destination);
    playhead = Math.max(playhead, playCtx.currentTime + 0.03);
    source.start(playhead);
    playhead += buffer.duration;
    sources.push(source);
    talk.audioSamples += pcm.length;
  }

  function onEvent(event) {
    talk.events.push(event.type);
    switch (event.type) {
      case "input_audio_buffer.speech_started": stopPlayback(); break;
      case "input_audio_buffer.speech_stopped": stoppedAt = performance.now(); waitingFirstAudio = true; break;
      case "response.created": talk.assistantText = ""; break;
      case "response.audio_transcript.delta": talk.assistantText += event.delta; break;
      case "response.audio.delta":
        if (waitingFirstAudio && stoppedAt !== null) talk.latenciesMs.push(performance.now() - stoppedAt);
        waitingFirstAudio = false;
        play(event.delta);
        break;
      case "conversation.item.input_audio_transcription.completed": talk.userTranscripts.push(event.transcript); break;
      case "response.done": talk.answers += 1; break;
      case "error": talk.error = event.error && event.error.message; break;
    }
    show();
  }

  async function start() {
    talk.phase = "connecting"; show();
    try {
      playCtx = new AudioContext();
      await playCtx.resume();
      mic = await navigator.mediaDevices.getUserMedia({audio: {channelCount: 1, echoCancellation: true}});
      try { ctx = new AudioContext({sampleRate: 16000}); } catch (_) { ctx = new AudioContext(); }
      await ctx.audioWorklet.addModule("/static/talk-worklet.js");
      const scheme = location.protocol === "https:" ? "wss:" : "ws:";
      // browsers cannot set headers on a WebSocket: the key goes as a subprotocol, as OpenAI's does
      const protocols = ["realtime"].concat(key() ? ["openai-insecure-api-key." + key()] : []);
      ws = new WebSocket(`${scheme}//${location.host}/v1/realtime`, protocols);
      ws.onmessage = (m) => onEvent(JSON.parse(m.data));
      ws.onclose = () => { if (talk.phase !== "error") talk.phase = "off"; show(); };
      await new Promise((resolve, reject) => { ws.onopen = resolve; ws.onerror = () => reject(new Error("WebSocket refused")); });
      const voice = $("voice").value;
      if (voice) ws.send(JSON.stringify({type: "session.update", session: {voice, speech_max_tokens: 40,
        max_response_output_tokens: Number($("talk-max-tokens").value) || null}}));
      node = new AudioWorkletNode(ctx, "mic-frames");
      node.port.onmessage = (m) => {
        if (!ws || ws.readyState !== WebSocket.OPEN) return;
        const bytes = new Uint8Array(m.data);
        let text = "";
        for (let i = 0; i < bytes.length; i++) text += String.fromCharCode(bytes[i]);
        ws.send(JSON.stringify({type: "input_audio_buffer.append", audio: btoa(text)}));
      };
      ctx.createMediaStreamSource(mic).connect(node);
      talk.phase = "listening";
    } catch (e) {
      talk.phase = "error";
      talk.error = String(e && e.message || e);
    }
    $("talk-start").disabled = talk.phase === "listening";
    $("talk-stop").disabled = talk.phase !== "listening";
    show();
  }

  function end() {
    if (node) node.disconnect();
    if (mic) mic.getTracks().forEach((t) => t.stop());
    if (ws) ws.close();
    stopPlayback();
    talk.phase = "off";
    $("talk-start").disabled = false;
    $("talk-stop").disabled = true;
    show();
  }

  $("talk-start").addEventListener("click", start);
  $("talk-stop").addEventListener("click", end);
})();
