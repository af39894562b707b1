"""The real-time dialogue controller: one session of a live conversation over a VoiceChat.

    session = RealtimeSession(chat, system="...", detection=TurnDetection(pause_ms=200, commit_ms=700))
    await session.append(pcm)                     # as the microphone gives it (mono, `sample_rate`)
    event = await session.events.get()            # SpeechStarted, SpeechStopped, TurnCommitted,
                                                  # ResponseStarted, UserTranscript, ResponseText,
                                                  # ResponseAudio, ResponseFinished, ...

Voice activity comes from Silero VAD (the `silero-vad` wheel's ONNX model, run by onnxruntime; one
model state per session) on 32 ms frames. The session keeps its own clock: the audio it has been
given, so what it decides depends on the audio alone, not on how fast it arrives.

States: idle -> speaking (speech for `min_speech_ms`) -> paused (silence) -> committed (silence for
`commit_ms`) -> responding -> idle. After `pause_ms` of silence a speculative answer starts: the
utterance is tokenized and the chat model (and the TTS of its first sentences) run, their events
held back. Speech again before `commit_ms` discards it (its requests are cancelled and their KV
pages freed; pages of the shared history stay in the prefix cache); at `commit_ms` it is promoted
as it is, without computing anything again, and its held events go out. Without speculation the
answer starts at the commit. Speech while an answer plays is a barge-in: the answer is cancelled
and the assistant turn keeps only the sentences that were played by then (the session's clock
from the answer's first audio). The history is a Conversation (voice_chat.py): ids kept, context
bounded, the system prompt pinned, the transcript policy applied.

`TurnDetection(create_response=False)`: turns are still detected and committed, but an answer
starts only on `create_response()` (no speculation). `detection=None`: no voice activity at all;
the caller commits (`commit()`) and asks for answers, as with OpenAI's `turn_detection: null`.

Input at any accepted rate is resampled to 16 kHz as it arrives (a streaming resampler).

The user's audio is tokenized when the speculation starts (or at the commit), whole, with the
official peak normalisation, not streamed while the user speaks: the S3 tokenizer codes a whole
(up to 30 s) piece at once, so a stream would only move the Paraformer half of the work earlier
(about 5 of 12 ms for a 3 s turn on an H100), a stream cannot peak-normalise (its ids differ from
those of the official tokenization), and with speculation the tokenization is hidden by the
commit wait anyway (bench/RESULTS.md).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time

import numpy as np
import torch
from silero_vad import load_silero_vad

from .. import checks
from ..errors import AudioInputError, ConfigError, StepvoxError, TurnStateError
from ..frontend.audio_input import check_sample_rate
from ..frontend.resample import StreamingResampler
from .audio import Audio
from .voice_chat import AudioDelta, Conversation, ResponseDone, TextDelta, Turn, VoiceChat

SAMPLE_RATE = 16000
VAD_FRAME = 512                  # samples per Silero VAD call at 16 kHz (32 ms)
FRAME_MS = VAD_FRAME * 1000 / SAMPLE_RATE


@dataclasses.dataclass(frozen=True)
class TurnDetection:
    threshold: float = 0.5       # speech probability that counts as speech
    min_speech_ms: int = 96      # speech this long starts a turn (a click does not)
    pause_ms: int = 200          # silence after speech that starts a speculative answer
    commit_ms: int = 700         # silence that ends the user's turn
    speculate: bool = True
    create_response: bool = True     # answer each committed turn (False: only on create_response())

    def __post_init__(self):
        checks.real(self.threshold, "threshold", ConfigError, 0.0, 1.0, lo_open=True)
        for name in ("min_speech_ms", "pause_ms", "commit_ms"):
            checks.integer(getattr(self, name), name, ConfigError, 1)
        if self.pause_ms > self.commit_ms:
            raise ConfigError(f"pause_ms ({self.pause_ms}) must not exceed commit_ms ({self.commit_ms})")


class VoiceActivity:
    """Speech probability per 32 ms frame of 16 kHz audio (Silero VAD, ONNX)."""

    def __init__(self):
        self.model = load_silero_vad(onnx=True)
        self._pending = np.zeros(0, np.float32)

    def push(self, samples: np.ndarray) -> list[float]:
        self._pending = np.concatenate([self._pending, samples])
        n = self._pending.size // VAD_FRAME
        frames, self._pending = self._pending[:n * VAD_FRAME], self._pending[n * VAD_FRAME:]
        return [float(self.model(torch.from_numpy(f.copy()), SAMPLE_RATE)) for f in frames.reshape(n, VAD_FRAME)]


# ---------------------------------------------------------------- events
@dataclasses.dataclass
class SpeechStarted:
    audio_ms: float


@dataclasses.dataclass
class SpeechStopped:
    audio_ms: float              # where the speech ended


@dataclasses.dataclass
class TurnCommitted:
    audio_ms: float
    audio_samples: int           # the user's turn (16 kHz)
    responding: bool             # its answer starts now (ResponseStarted follows)


@dataclasses.dataclass
class ResponseStarted:
    speculative: bool            # promoted from a speculation (nothing recomputed)


@dataclasses.dataclass
class UserTranscript:
    text: str                    # the committed turn's words (the tokenizer's Paraformer ASR)


@dataclasses.dataclass
class ResponseText:
    text: str


@dataclasses.dataclass
class ResponseAudio:
    audio: Audio
    sentence: int


@dataclasses.dataclass
class ResponseFinished:
    text: str                    # what joined the history (the played part after a barge-in)
    interrupted: bool
    played_ms: float
    first_audio_s: float | None = None   # end of the user's speech to this answer's first audio


@dataclasses.dataclass
class ResponseTruncated:
    text: str                    # a finished answer the user spoke over while it played: the
    played_ms: float             # history keeps the sentences played by then; stop playback now


@dataclasses.dataclass
class ResponseFailed:
    error: BaseException         # a typed StepvoxError naming the cause; the session goes on


@dataclasses.dataclass
class _Answer:
    turn_audio: np.ndarray
    words: asyncio.Future | None = None                 # the user's words, once the turn is committed
    task: asyncio.Task | None = None
    live: bool = False                                  # promoted: its events go out as they come
    held: list = dataclasses.field(default_factory=list)
    text_deltas: int = 0
    turn: Turn | None = None
    sentence_ms: list = dataclasses.field(default_factory=list)   # audio ms of each sentence so far
    sentences: list = dataclasses.field(default_factory=list)     # their texts
    first_audio_clock: float | None = None               # the session clock when its first audio went out
    first_audio_s: float | None = None                   # end of the user's speech to that moment (wall)
    done: ResponseDone | None = None
    finished: bool = False                               # joined the history


async def _join_words(parts: list[asyncio.Future], into: asyncio.Future) -> None:
    texts = [await part for part in parts]
    if not into.done():
        into.set_result("".join(texts))


class RealtimeSession:
    def __init__(self, chat: VoiceChat, *, system: str | None = None, voice: str = "Tingting",
                 history: str = "audio", detection: TurnDetection | None = TurnDetection(),
                 max_turns: int | None = None, max_history_tokens: int | None = None,
                 respond_options: dict | None = None, sample_rate: int = SAMPLE_RATE):
        """`detection`: turn detection, or None for turns the caller commits; `sample_rate`: of the
        audio given to `append` (resampled to 16 kHz as it arrives)."""
        self.chat, self.voice, self.detection = chat, voice, detection
        self.conversation = Conversation(chat, system, history, voice, max_turns, max_history_tokens)
        self.respond_options = dict(respond_options or {})
        self.sample_rate = check_sample_rate(sample_rate)
        self.resampler = StreamingResampler(self.sample_rate, SAMPLE_RATE)
        self.vad = VoiceActivity() if detection is not None else None
        self.events: asyncio.Queue = asyncio.Queue()
        self.state = "idle"
        self.clock_ms = 0.0                              # audio received so far
        self._speech_run = 0                             # consecutive speech frames
        self._silence_ms = 0.0
        self._speech_end_ms = 0.0
        self._utterance: list[np.ndarray] = []
        self._lookback: list[np.ndarray] = []           # audio just before the speech start
        # committed turns no answer has taken yet, each with its words to come
        self._committed: list[tuple[np.ndarray, asyncio.Future | None]] = []
        self._answer: _Answer | None = None
        self._response: _Answer | None = None            # the committed answer being generated
        self._playing: _Answer | None = None             # a generated answer whose audio is still playing
        self._transcripts: set[asyncio.Task] = set()
        self._speech_end_wall = 0.0
        self.stats = dict(speculations=0, promoted=0, discarded=0, wasted_text_deltas=0, commits=0,
                          end_of_speech_to_first_audio_s=[], barge_in_stop_s=[])

    # ------------------------------------------------------------------ input
    async def append(self, pcm) -> None:
        """Mono audio at `sample_rate`: int16 samples (or PCM16 bytes) or float samples in [-1, 1]."""
        if isinstance(pcm, (bytes, bytearray, memoryview)):
            if len(pcm) % 2:
                raise AudioInputError("PCM16 audio must be a whole number of 2-byte samples")
            samples = np.frombuffer(bytes(pcm), dtype="<i2").astype(np.float32) / 32768.0
        else:
            samples = np.asarray(pcm)
            samples = samples.astype(np.float32) / 32768.0 if samples.dtype == np.int16 else samples.astype(np.float32)
        if samples.ndim != 1:
            raise AudioInputError("realtime audio must be mono (1-D)")
        if not np.all(np.isfinite(samples)):
            raise AudioInputError("realtime audio holds NaN or infinite samples")
        samples = self.resampler.push(torch.from_numpy(samples)).numpy()
        if self.vad is None:                            # the caller commits: everything is the turn
            self.clock_ms += samples.size * 1000 / SAMPLE_RATE
            self._utterance.append(samples)
            return
        for start in range(0, samples.size, VAD_FRAME):
            piece = samples[start:start + VAD_FRAME]
            for prob in self.vad.push(piece):
                await self._frame(prob)
            self._keep(piece)

    def _keep(self, piece: np.ndarray) -> None:
        if self.state in ("speaking", "paused"):
            self._utterance.append(piece)
        else:
            self._lookback = (self._lookback + [piece])[-10:]          # ~320 ms before the speech start

    async def _frame(self, prob: float) -> None:
        d = self.detection
        self.clock_ms += FRAME_MS
        if prob >= d.threshold:
            self._speech_run += 1
            self._silence_ms = 0.0
            if self._speech_run * FRAME_MS >= d.min_speech_ms and self.state != "speaking":
                await self._speech_started()
            return
        self._speech_run = 0
        if self.state not in ("speaking", "paused"):
            return
        if self._silence_ms == 0.0:
            self._speech_end_ms, self._speech_end_wall = self.clock_ms - FRAME_MS, time.monotonic()
        self._silence_ms += FRAME_MS
        if self.state == "speaking" and self._silence_ms >= d.pause_ms:
            self.state = "paused"
            if d.speculate and d.create_response:
                self._start_answer()
        if self.state == "paused" and self._silence_ms >= d.commit_ms:
            await self.commit()

    async def _speech_started(self) -> None:
        if self._response is not None:                  # a barge-in while the answer is generated
            await self._interrupt()
        elif self._playing is not None and self._played_ms(self._playing) < sum(self._playing.sentence_ms):
            await self._truncate(self._playing)         # a barge-in while its last audio plays
        self._playing = None
        if self.state == "paused":                      # the user goes on: the speculation was wrong
            await self._discard()
        else:
            self._utterance = list(self._lookback)
            await self.events.put(SpeechStarted(self.clock_ms - self._speech_run * FRAME_MS))
        self.state = "speaking"

    # ------------------------------------------------------------------ answers
    def _start_answer(self, audio: np.ndarray | None = None) -> None:
        if audio is None:
            audio = np.concatenate(self._utterance) if self._utterance else np.zeros(0, np.float32)
        words = asyncio.get_running_loop().create_future() if self.chat.transcriber is not None else None
        self._answer = _Answer(audio, words)
        self._answer.task = asyncio.create_task(self._run(self._answer))
        self.stats["speculations"] += 1

    async def _run(self, answer: _Answer) -> None:
        try:
            await self._answer_turn(answer)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the answer fails alone; the session takes the next turn
            if answer.live:
                await self.events.put(ResponseFailed(exc))
                if self._response is answer:
                    self._response, self.state = None, "idle"
            else:
                answer.held.append(ResponseFailed(exc))

    async def _answer_turn(self, answer: _Answer) -> None:
        # history="transcript" swaps the turn for the words the commit transcribes (one ASR run a turn)
        turn: Turn = await self.conversation.aprepare_turn(
            [{"type": "input_audio", "input_audio": {"data": answer.turn_audio, "sample_rate": SAMPLE_RATE}}],
            words=answer.words)
        answer.turn = turn
        kwargs = {"voice": self.voice, **self.respond_options}
        async with contextlib.aclosing(self.chat.arespond(None, prompt=turn.prompt, **kwargs)) as events:
            async for event in events:
                if isinstance(event, TextDelta):
                    answer.text_deltas += 1
                    await self._emit(answer, ResponseText(event.text))
                elif isinstance(event, AudioDelta):
                    if event.sentence == len(answer.sentence_ms):
                        answer.sentence_ms.append(0.0)
                        answer.sentences.append(event.text)
                    answer.sentence_ms[event.sentence] += event.audio.duration * 1e3
                    await self._emit(answer, ResponseAudio(event.audio, event.sentence))
                elif isinstance(event, ResponseDone):
                    answer.done = event
        if answer.live:                                 # else the commit finishes it (or it is discarded)
            await self._finish(answer)

    async def _finish(self, answer: _Answer) -> None:
        """A committed answer that ran to its end joins the history."""
        if answer.finished:
            return
        answer.finished = True
        await self.conversation.arecord(answer.turn, answer.done.text, answer.done.token_ids)
        await self.events.put(ResponseFinished(answer.done.text, False, sum(answer.sentence_ms), answer.first_audio_s))
        self._playing = answer
        if self._response is answer:
            self._response, self.state = None, "idle"

    async def _emit(self, answer: _Answer, event) -> None:
        if not answer.live:
            answer.held.append(event)
            return
        if isinstance(event, ResponseAudio) and answer.first_audio_clock is None:
            answer.first_audio_clock = self.clock_ms
            answer.first_audio_s = time.monotonic() - self._speech_end_wall
            self.stats["end_of_speech_to_first_audio_s"].append(answer.first_audio_s)
        await self.events.put(event)

    async def _discard(self) -> None:
        answer, self._answer = self._answer, None
        if answer is not None and answer.task is not None:
            answer.task.cancel()
            with contextlib.suppress(BaseException):
                await answer.task
            self.stats["discarded"] += 1
            self.stats["wasted_text_deltas"] += answer.text_deltas

    async def commit(self) -> None:
        """End the user's turn now (turn detection does it after `commit_ms` of silence). Its answer
        starts unless `create_response` is off or there is no turn detection: then the turn waits
        for `create_response()`."""
        if self.vad is None:
            if not self._utterance:
                raise TurnStateError("the input audio buffer is empty: nothing to commit",
                                     "input_audio_buffer_commit_empty")
            audio = np.concatenate(self._utterance)
            self._utterance = []
            self.stats["commits"] += 1
            await self.events.put(TurnCommitted(self.clock_ms, int(audio.size), False))
            self._committed.append((audio, self._transcribe_soon(audio)))
            return
        if self.state not in ("speaking", "paused"):
            return
        self.stats["commits"] += 1
        await self.events.put(SpeechStopped(self._speech_end_ms))
        if not self.detection.create_response:
            audio = np.concatenate(self._utterance) if self._utterance else np.zeros(0, np.float32)
            self._utterance, self.state = [], "idle"
            await self.events.put(TurnCommitted(self.clock_ms, int(audio.size), False))
            self._committed.append((audio, self._transcribe_soon(audio)))
            return
        speculative = self._answer is not None
        if not speculative:
            self._start_answer()
            self.stats["speculations"] -= 1             # started at the commit: not a speculation
        else:
            self.stats["promoted"] += 1
        answer, self._answer = self._answer, None
        await self.events.put(TurnCommitted(self.clock_ms, int(answer.turn_audio.size), True))
        self._transcribe_soon(answer.turn_audio, answer.words)
        await self._go_live(answer, speculative)

    async def create_response(self) -> None:
        """Answer the turns committed since the last answer (with `create_response` off, or no turn
        detection). TurnStateError when an answer is running or nothing was committed."""
        if self._response is not None:
            raise TurnStateError("an answer is in progress: cancel it first", "conversation_already_has_active_response")
        if not self._committed:
            raise TurnStateError("no committed user audio to answer", "no_committed_audio")
        committed, self._committed = self._committed, []
        self._speech_end_wall = time.monotonic()        # the request is the end of the turn
        self._start_answer(np.concatenate([audio for audio, _ in committed]))
        if self._answer.words is not None:              # the words of every turn it answers
            joining = asyncio.create_task(_join_words([w for _, w in committed], self._answer.words))
            self._transcripts.add(joining)
            joining.add_done_callback(self._transcripts.discard)
        self.stats["speculations"] -= 1
        answer, self._answer = self._answer, None
        await self._go_live(answer, False)

    def _transcribe_soon(self, audio: np.ndarray, words: asyncio.Future | None = None) -> asyncio.Future | None:
        """The user's words of a committed turn (UserTranscript), beside the answer, into `words`
        (a new future when None); None without ASR."""
        if self.chat.transcriber is None:
            return None
        words = words if words is not None else asyncio.get_running_loop().create_future()
        self._transcripts.add(asyncio.create_task(self._transcribe(audio, words)))
        return words

    async def _go_live(self, answer: _Answer, speculative: bool) -> None:
        await self.events.put(ResponseStarted(speculative))
        answer.live = True
        self._response, self.state = answer, "responding"
        held, answer.held = answer.held, []
        for event in held:
            await self._emit(answer, event)
        if answer.task.done() and answer.done is not None:      # it ran to its end while held back
            await self._finish(answer)
        elif answer.task.done() and self._response is answer:   # it failed while held back (reported)
            self._response, self.state = None, "idle"

    async def _interrupt(self) -> None:
        """Barge-in: stop the answer now; the history keeps the sentences played by now."""
        answer, self._response = self._response, None
        started = time.monotonic()
        answer.task.cancel()
        with contextlib.suppress(BaseException):
            await answer.task
        self.stats["barge_in_stop_s"].append(time.monotonic() - started)
        played = self._played_ms(answer)
        text = self._played_text(answer, played)
        await self.events.put(ResponseFinished(text, True, min(played, sum(answer.sentence_ms)), answer.first_audio_s))
        if answer.turn is not None:
            await self.conversation.arecord(answer.turn, text)
        self.state = "idle"

    async def _transcribe(self, audio: np.ndarray, words: asyncio.Future) -> None:
        loop = asyncio.get_running_loop()
        text = ""
        try:
            text = (await loop.run_in_executor(self.chat.tts.audio_executor, self.chat.transcriber.transcribe,
                                               audio, SAMPLE_RATE)).text
        except StepvoxError:                           # audio too short for a word: no words
            pass
        finally:
            if not words.done():
                words.set_result(text)
            self._transcripts.discard(asyncio.current_task())
        await self.events.put(UserTranscript(text))

    def _played_ms(self, answer: _Answer) -> float:
        """Audio of `answer` played by now: playback runs in real time from its first audio, which
        the session's clock (the user's audio) measures."""
        return 0.0 if answer.first_audio_clock is None else self.clock_ms - answer.first_audio_clock

    @staticmethod
    def _played_text(answer: _Answer, played_ms: float) -> str:
        kept, total = [], 0.0
        for text, ms in zip(answer.sentences, answer.sentence_ms):
            total += ms
            if total > played_ms:
                break
            kept.append(text)
        return "".join(kept)

    async def _truncate(self, answer: _Answer) -> None:
        played = self._played_ms(answer)
        text = self._played_text(answer, played)
        self.conversation.replace_last_answer(text)     # nothing left to cancel: the client stops playback
        await self.events.put(ResponseTruncated(text, played))

    async def clear(self) -> None:
        """Drop the user's turn in progress (and its speculative answer)."""
        await self._discard()
        self._utterance, self._speech_run, self._silence_ms = [], 0, 0.0
        if self.state in ("speaking", "paused"):
            self.state = "idle"

    async def cancel_response(self) -> None:
        """Stop the answer being generated (as a barge-in does); nothing when there is none."""
        if self._response is not None:
            await self._interrupt()

    async def close(self) -> None:
        tasks = [a.task for a in (self._answer, self._response) if a is not None and a.task is not None]
        for task in [*tasks, *self._transcripts]:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
