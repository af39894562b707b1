"""Voice chat: a Step1 chat model writes text, Step-Audio-TTS-3B speaks it while it is written.

    chat = VoiceChat.from_pretrained("Step-Audio-Chat", tts="Step-Audio-TTS-3B", tokenizer="Step-Audio-Tokenizer",
                                     speakers="speakers", chat_tensor_parallel_size=4)
    for event in chat.respond([{"role": "user", "content": [{"type": "input_audio", "input_audio": {...}}]}]):
        if isinstance(event, TextDelta): print(event.text, end="")
        elif isinstance(event, AudioDelta): play(event.audio)
        else: print(event.usage)                                        # ResponseDone, last
    talk = chat.conversation(system="适配用户的语言，用简短口语化的文字回答", history="transcript")
    for event in talk.say(audio_message): ...                             # keeps the history

The released path (`stepaudio.py`) generates the whole answer, then speaks the whole answer. Here
the chat LM's text streams out as it is generated, each completed sentence (sentences.py) goes to
the TTS at once, and the TTS of sentence k runs beside the chat LM's generation of sentence k+1:
two engines, each on its own thread, on one GPU (or the chat model over tensor-parallel GPUs).
Audio of a sentence follows the audio of the one before it. Prompts are the official template's
(chat_template.py) with the official sampling (temperature 0.7, top-p 0.9, top-k 50, 2048 tokens).

A conversation keeps each turn's ids: user audio is tokenized once, answers stay the ids the model
wrote, so the next turn's prompt starts with the previous one and the engine's prefix cache serves
it (only the new turn is prefilled). history="transcript" replaces user audio by its transcript
(the tokenizer's own Paraformer ASR) once the answer is done, as the official demo does with a
separate ASR model: the history gets shorter, and that turn is prefilled again once.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from typing import AsyncIterator, Awaitable, Iterator

import torch

from .. import checks
from ..async_engine import AsyncLLMEngine
from ..config import EngineConfig
from ..errors import ConfigError, InvalidRequestError
from ..llm_engine import LLMEngine
from ..sampling_params import SamplingParams
from ..special_tokens import EOT_ID
from .audio import Audio
from .chat_messages import MAX_AUDIO_SECONDS, AudioClip, AudioTokens, Message, parse_messages
from .chat_template import ASSISTANT_HEADER, needs_assistant_header, prompt_ids, turn_ids
from .sentences import SentenceSplitter
from .tts import TTS, load_audio_tokenizer

HISTORY_POLICIES = ("audio", "transcript")
CHAT_MEMORY_FRACTION, TTS_MEMORY_FRACTION = 0.45, 0.35     # the default split of a GPU between the engines
MAX_MEMORY_FRACTION = 0.9          # of both together: the speech decoders and the audio tokenizer need the rest
# the official generate() call: temperature 0.7, top-p 0.9, do_sample, 2048 new tokens, and HF's
# default top-k of 50 (the model has no generation_config)
CHAT_DEFAULTS = dict(temperature=0.7, top_p=0.9, top_k=50, max_tokens=2048)


# ---------------------------------------------------------------- events
@dataclasses.dataclass
class TextDelta:
    text: str                       # new answer text


@dataclasses.dataclass
class AudioDelta:
    audio: Audio                    # the next chunk of speech
    sentence: int                   # index of the sentence it speaks
    text: str = ""                  # that sentence (as sent to the TTS)


@dataclasses.dataclass
class Usage:
    prompt_tokens: int              # chat prompt
    cached_tokens: int              # of those, served from the prefix cache
    completion_tokens: int          # chat answer tokens (the end-of-turn token included)
    speech_tokens: int = 0          # audio tokens the TTS generated


@dataclasses.dataclass
class ResponseDone:
    text: str                       # the whole answer
    token_ids: list[int]            # as generated (what a conversation keeps)
    finish_reason: str              # stop | length
    sentences: list[str]            # as sent to the TTS (with the answer's leading tags)
    audio_seconds: float
    usage: Usage
    timings: dict[str, float]       # seconds from the call: prompt_ready, first_token, first_sentence,
                                    # first_audio, text_done, done (those that happened)


Event = TextDelta | AudioDelta | ResponseDone


class VoiceChat:
    def __init__(self, chat_engine: AsyncLLMEngine, tts: TTS, transcriber=None,
                 max_audio_seconds: float = MAX_AUDIO_SECONDS):
        """`max_audio_seconds`: the longest audio part of a message (its tokens cost prompt length)."""
        self.chat_engine = chat_engine
        self.max_audio_seconds = checks.real(max_audio_seconds, "max_audio_seconds", ConfigError, 0.0, lo_open=True)
        self.tts = tts
        self.tokenizer = chat_engine.engine.tokenizer            # the chat model's text tokenizer
        self.audio_tokenizer = tts.tokenizer
        self.transcriber = transcriber
        self.sample_rate = tts.sample_rate
        self._loop: asyncio.AbstractEventLoop | None = None      # the sync API's loop, started on first use
        self._loop_thread: threading.Thread | None = None
        self._loop_lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, chat: str, tts: str, tokenizer: str, speakers: str | None = None, *,
                        chat_tensor_parallel_size: int = 1, device: str | None = None,
                        chat_memory_fraction: float = CHAT_MEMORY_FRACTION,
                        tts_memory_fraction: float = TTS_MEMORY_FRACTION,
                        chat_engine_args: dict | None = None, tts_engine_args: dict | None = None,
                        voices_dir: str | None = None, asr: bool = True, warm_up: bool | None = None,
                        max_audio_seconds: float = MAX_AUDIO_SECONDS, **tts_options) -> "VoiceChat":
        """`chat`: a Step1 folder (Step-Audio-Chat, or a smaller stand-in); `tts`, `tokenizer`,
        `speakers`: as TTS.from_pretrained. GPU memory is split explicitly: the chat engine (loaded
        first) may fill `chat_memory_fraction` of each of its GPUs with weights, KV cache and
        activations, the TTS engine `tts_memory_fraction` more of its GPU; the rest is left to the
        speech decoders and the audio tokenizer (at least 0.1 of the GPU). Engine arguments of
        either side go in `chat_engine_args` / `tts_engine_args` (an explicit num_kv_pages there
        overrides the fractions). `asr`: load the tokenizer's Paraformer ASR (transcripts);
        `max_audio_seconds`: the longest audio part of a message."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        chat_fraction, tts_fraction = memory_split(chat_memory_fraction, tts_memory_fraction)
        chat_args = dict(chat_engine_args or {})
        chat_args.setdefault("gpu_memory_utilization", chat_fraction)
        chat_args.setdefault("tensor_parallel_size", chat_tensor_parallel_size)
        # the TTS engine sizes its KV cache from what is left under its limit, counting the chat's use
        tts_args = dict(tts_engine_args or {})
        tts_args.setdefault("gpu_memory_utilization", chat_fraction + tts_fraction)
        chat_config = EngineConfig(device=device, **chat_args)
        chat_engine = AsyncLLMEngine(LLMEngine(chat, chat_config))
        try:
            audio_tokenizer = load_audio_tokenizer(tokenizer, device, chat_config.kernels, asr=asr)
            transcriber = audio_tokenizer.transcriber if asr else None
            speech = TTS.from_pretrained(tts, tokenizer, speakers, device=device, voices_dir=voices_dir,
                                         warm_up=warm_up, audio_tokenizer=audio_tokenizer, **tts_options, **tts_args)
        except BaseException:
            chat_engine.shutdown()
            raise
        return cls(chat_engine, speech, transcriber, max_audio_seconds)

    # ------------------------------------------------------------------ prompts
    def prepare(self, messages) -> list[Message]:
        """Checked messages with their audio tokenized (runs the audio tokenizer: call it off the
        event loop, or use `aprepare`). Already prepared Message lists pass through (their clips
        are tokenized)."""
        parsed = messages if _prepared(messages) else parse_messages(messages, max_audio_seconds=self.max_audio_seconds)
        clips = [(m, k, p) for m in parsed for k, p in enumerate(m.parts or ()) if isinstance(p, AudioClip)]
        if clips:
            ids = self.audio_tokenizer.encode_batch([p.samples for _, _, p in clips],
                                                    [p.sample_rate for _, _, p in clips])
            for (m, k, clip), audio_ids in zip(clips, ids):
                m.parts[k] = AudioTokens(tuple(audio_ids), clip)
        return parsed

    async def aprepare(self, messages) -> list[Message]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.tts.audio_executor, self.prepare, messages)

    def prompt_token_ids(self, messages) -> list[int]:
        """The chat model's prompt for `messages`: the ids the official `stepaudio.py` feeds its model
        (its template, encoded with BOS by the released tokenizer)."""
        return prompt_ids(self.tokenizer, self.prepare(messages))

    def transcribe(self, audio: AudioClip | AudioTokens) -> str:
        """The Paraformer ASR's text for an audio part (needs its clip)."""
        if self.transcriber is None:
            raise ConfigError("this VoiceChat was loaded without ASR (asr=False)")
        clip = audio.clip if isinstance(audio, AudioTokens) else audio
        if clip is None:
            raise InvalidRequestError("audio given as tokens only cannot be transcribed (its samples are gone)")
        return self.transcriber.transcribe(clip.samples, clip.sample_rate).text

    # ------------------------------------------------------------------ responses
    async def arespond(self, messages, voice: str = "Tingting", *, audio: bool = True,
                       temperature: float = CHAT_DEFAULTS["temperature"], top_p: float = CHAT_DEFAULTS["top_p"],
                       top_k: int = CHAT_DEFAULTS["top_k"], max_tokens: int = CHAT_DEFAULTS["max_tokens"],
                       seed: int | None = None, chat_params: SamplingParams | None = None,
                       prompt: list[int] | None = None, start_time: float | None = None,
                       **speech_options) -> AsyncIterator[Event]:
        """Events of one answer: TextDelta as the chat LM writes, AudioDelta as the TTS speaks each
        completed sentence (audio=False: text only), ResponseDone last. `chat_params` replaces the
        sampling fields; `speech_options` go to TTS.astream (emotion, speed_factor, volume,
        temperature of the TTS as tts_temperature...). `prompt`: ids to use instead of rendering
        `messages` (a conversation's); `start_time`: the time.monotonic() the timings count from
        (default: now). Stopping the iteration cancels both models' requests and frees their KV
        pages at once."""
        start = time.monotonic() if start_time is None else start_time
        timings: dict[str, float] = {}

        def mark(name: str) -> None:
            timings.setdefault(name, time.monotonic() - start)

        tts_kwargs = _speech_kwargs(speech_options)
        if audio:
            self.tts.voice_registry.get(voice)                  # an unknown voice fails before any work
        params = chat_params or SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k,
                                               max_tokens=max_tokens, seed=seed)
        if prompt is None:
            prepared = await self.aprepare(messages)
            prompt = prompt_ids(self.tokenizer, prepared)
        mark("prompt_ready")
        events: asyncio.Queue = asyncio.Queue()
        sentences: asyncio.Queue = asyncio.Queue()
        done = dict(text="", token_ids=[], finish_reason="", sentences=[], audio_samples=0,
                    usage=Usage(len(prompt), 0, 0))

        async def write():
            splitter = SentenceSplitter()
            async with contextlib.aclosing(self.chat_engine.generate(prompt, params)) as outputs:
                async for out in outputs:
                    mark("first_token")
                    completion = out.outputs[0]
                    if out.metrics is not None:
                        done["usage"].cached_tokens = out.metrics.num_cached_tokens
                    if completion.new_text:
                        await events.put(TextDelta(completion.new_text))
                        for sentence in splitter.push(completion.new_text):
                            await sentences.put(sentence)
                    if out.finished:
                        done.update(text=completion.text, token_ids=list(completion.token_ids),
                                    finish_reason=completion.finish_reason)
                        done["usage"].completion_tokens = len(completion.token_ids)
            for sentence in splitter.finish():
                await sentences.put(sentence)
            mark("text_done")
            await sentences.put(None)

        async def speak():
            index = 0
            while (sentence := await sentences.get()) is not None:
                mark("first_sentence")
                done["sentences"].append(sentence)
                if not audio:
                    continue
                agen = self.tts.astream(sentence, voice, on_output=_count_speech(done["usage"]), **tts_kwargs)
                async with contextlib.aclosing(agen) as chunks:
                    async for chunk in chunks:
                        mark("first_audio")
                        done["audio_samples"] += chunk.samples.size
                        await events.put(AudioDelta(chunk, index, sentence))
                index += 1

        tasks = [asyncio.create_task(write()), asyncio.create_task(speak())]
        getter = None
        try:
            while True:
                if all(t.done() for t in tasks) and events.empty():
                    break
                if getter is None:
                    getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, *(t for t in tasks if not t.done())},
                                   return_when=asyncio.FIRST_COMPLETED)
                for task in tasks:
                    if task.done() and not task.cancelled() and task.exception() is not None:
                        raise task.exception()
                if getter.done():
                    event, getter = getter.result(), None
                    yield event
        finally:
            if getter is not None:
                getter.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        mark("done")
        yield ResponseDone(done["text"], done["token_ids"], done["finish_reason"], done["sentences"],
                           done["audio_samples"] / self.sample_rate, done["usage"], timings)

    def respond(self, messages, voice: str = "Tingting", **kwargs) -> Iterator[Event]:
        """`arespond` for synchronous callers (not from inside a running event loop's thread)."""
        return _sync_iter(self.sync_loop(), self.arespond(messages, voice, **kwargs))

    def sync_loop(self) -> asyncio.AbstractEventLoop:
        """The event loop (on a thread of its own) that the synchronous API drives the async one on."""
        with self._loop_lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._loop_thread = threading.Thread(target=self._loop.run_forever, name="stepvox-chat-loop",
                                                     daemon=True)
                self._loop_thread.start()
            return self._loop

    def conversation(self, system: str | None = None, history: str = "audio", voice: str = "Tingting",
                     **respond_options) -> "Conversation":
        return Conversation(self, system, history, voice, **respond_options)

    def shutdown(self) -> None:
        self.chat_engine.shutdown()
        self.tts.shutdown()
        with self._loop_lock:
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._loop_thread.join(timeout=10)
                self._loop = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


@dataclasses.dataclass
class Turn:
    """A user turn ready to be answered: its message (audio tokenized), its ids, the prompt of its
    answer, and the transcript being made beside it (history="transcript")."""
    message: Message
    ids: list[int]
    prompt: list[int]
    start_time: float
    transcript: Awaitable[str] | None = None


class Conversation:
    """A multi-turn voice chat that keeps its history as ids (see the module docstring). The context
    is bounded by `max_turns` (user + assistant pairs) and `max_history_tokens`: the oldest pairs
    go first, the system prompt is pinned."""

    def __init__(self, chat: VoiceChat, system: str | None = None, history: str = "audio",
                 voice: str = "Tingting", max_turns: int | None = None, max_history_tokens: int | None = None,
                 **respond_options):
        if history not in HISTORY_POLICIES:
            raise InvalidRequestError(f"history must be one of {HISTORY_POLICIES}, got {history!r}")
        if history == "transcript" and chat.transcriber is None:
            raise ConfigError("history='transcript' needs the ASR (VoiceChat.from_pretrained(asr=True))")
        self.max_turns = None if max_turns is None else checks.integer(max_turns, "max_turns", ConfigError, 1)
        self.max_history_tokens = (None if max_history_tokens is None else
                                   checks.integer(max_history_tokens, "max_history_tokens", ConfigError, 1))
        self.chat, self.history, self.voice = chat, history, voice
        self.respond_options = respond_options
        self.messages: list[Message] = []
        self._turn_ids: list[list[int]] = []                      # per message, as the prompt holds it
        self.compression: list[dict] = []                         # per transcribed turn (history="transcript")
        self._header = chat.tokenizer.encode(ASSISTANT_HEADER, add_bos=False)
        if system is not None:
            self._append(Message("system", [system]))

    def _append(self, message: Message, ids: list[int] | None = None) -> None:
        self.messages.append(message)
        self._turn_ids.append(ids if ids is not None else turn_ids(self.chat.tokenizer, message))

    def prompt_token_ids(self) -> list[int]:
        """The prompt of the next answer: BOS, the kept turns, the assistant header."""
        ids = [self.chat.tokenizer.bos_id]
        for turn in self._turn_ids:
            ids += turn
        if needs_assistant_header(self.messages):
            ids += self._header
        return ids

    async def aprepare_turn(self, content, words: Awaitable[str] | None = None) -> Turn:
        """A user turn (a string, a content part, or a list of parts) made ready to answer: checked,
        its audio tokenized (and transcribed beside, with history="transcript", unless `words`
        brings them from elsewhere, as the real-time session's own ASR does), its prompt built.
        Nothing joins the history until `arecord`."""
        start = time.monotonic()
        parsed = parse_messages([{"role": "user", "content": content}], max_audio_seconds=self.chat.max_audio_seconds)
        prepared = (await self.chat.aprepare(parsed))[0]
        transcript = None
        if self.history == "transcript" and prepared.has_audio:      # ASR beside the answer
            loop = asyncio.get_running_loop()
            transcript = words if words is not None else loop.run_in_executor(
                self.chat.tts.audio_executor, self._transcribe, prepared)
        user_ids = turn_ids(self.chat.tokenizer, prepared)
        prompt = [self.chat.tokenizer.bos_id] + [t for turn in self._turn_ids for t in turn] + user_ids + self._header
        return Turn(prepared, user_ids, prompt, start, transcript)

    async def arecord(self, turn: Turn, answer_text: str, answer_ids: list[int] | None = None) -> None:
        """Add `turn` and its answer to the history: `answer_ids` as generated (kept exactly, so the
        next prompt extends this one), or None for an answer known only as text (one cut short by
        a barge-in: the part that was played), encoded as the template writes it."""
        self._append(turn.message, turn.ids)
        if answer_ids is None:
            self._append(Message("assistant", [answer_text]))
        else:
            answer = list(answer_ids)
            if not answer or answer[-1] != EOT_ID:
                answer.append(EOT_ID)                            # a turn cut by max_tokens still closes
            self._append(Message("assistant", [answer_text]), self._header + answer)
        if turn.transcript is not None:
            self._swap_for_transcript(len(self.messages) - 2, await turn.transcript)
        self._bound()

    def replace_last_answer(self, text: str) -> None:
        """The last assistant turn becomes `text` (the part of it that was heard)."""
        if not self.messages or self.messages[-1].role != "assistant":
            raise InvalidRequestError("the conversation does not end with an answer")
        self.messages[-1] = Message("assistant", [text])
        self._turn_ids[-1] = turn_ids(self.chat.tokenizer, self.messages[-1])

    def _bound(self) -> None:
        """Drop the oldest user + assistant pairs (never the system prompt) past the limits."""
        first = 1 if self.messages and self.messages[0].role == "system" else 0

        def over() -> bool:
            pairs = (len(self.messages) - first) // 2
            tokens = sum(len(t) for t in self._turn_ids)
            return pairs > 1 and ((self.max_turns is not None and pairs > self.max_turns)
                                  or (self.max_history_tokens is not None and tokens > self.max_history_tokens))
        while over():
            del self.messages[first:first + 2], self._turn_ids[first:first + 2]

    async def asay(self, content, **options) -> AsyncIterator[Event]:
        """Add a user turn (a string, a content part, or a list of parts) and stream the answer;
        the answer joins the history when it completes (a cancelled answer leaves no user turn)."""
        turn = await self.aprepare_turn(content)
        kwargs = {"voice": self.voice, **self.respond_options, **options, "start_time": turn.start_time}
        final = None
        async with contextlib.aclosing(self.chat.arespond(None, prompt=turn.prompt, **kwargs)) as events:
            async for event in events:
                if isinstance(event, ResponseDone):
                    final = event
                yield event
        if final is not None:
            await self.arecord(turn, final.text, final.token_ids)

    def say(self, content, **options) -> Iterator[Event]:
        return _sync_iter(self.chat.sync_loop(), self.asay(content, **options))

    def _transcribe(self, message: Message) -> str:
        return "".join(self.chat.transcribe(p) if isinstance(p, AudioTokens) else p for p in message.parts)

    def _swap_for_transcript(self, index: int, text: str) -> None:
        """Replace user turn `index` by its transcript (the official demo's rule); record how much
        shorter the history got."""
        old = self.messages[index]
        audio_tokens = sum(len(p.ids) for p in old.parts if isinstance(p, AudioTokens))
        new = Message("user", [text])
        new_ids = turn_ids(self.chat.tokenizer, new)
        text_tokens = len(new_ids) - len(turn_ids(self.chat.tokenizer, Message("user", [""])))
        self.messages[index], self._turn_ids[index] = new, new_ids
        self.compression.append(dict(turn=index, audio_tokens=audio_tokens, transcript_tokens=text_tokens,
                                     ratio=audio_tokens / max(text_tokens, 1), transcript=text))


def memory_split(chat_memory_fraction, tts_memory_fraction,
                 names: tuple[str, str] = ("chat_memory_fraction", "tts_memory_fraction")) -> tuple[float, float]:
    """The two fractions, checked (ConfigError naming them by `names`)."""
    chat = checks.real(chat_memory_fraction, names[0], ConfigError, 0.0, MAX_MEMORY_FRACTION, lo_open=True)
    tts = checks.real(tts_memory_fraction, names[1], ConfigError, 0.0, MAX_MEMORY_FRACTION, lo_open=True)
    if chat + tts > MAX_MEMORY_FRACTION:
        raise ConfigError(f"{names[0]} + {names[1]} = {chat + tts:.2f}; at most {MAX_MEMORY_FRACTION} (the speech "
                          "decoders and the audio tokenizer need the rest)")
    return chat, tts


def _prepared(messages) -> bool:
    return isinstance(messages, list) and bool(messages) and all(isinstance(m, Message) for m in messages)


_SPEECH_OPTIONS = ("emotion", "language", "speed", "speed_factor", "volume", "clone", "tts_temperature",
                   "tts_top_k", "tts_seed", "tts_max_tokens", "tts_ignore_eos")


def _speech_kwargs(options: dict) -> dict:
    unknown = sorted(set(options) - set(_SPEECH_OPTIONS))
    if unknown:
        raise InvalidRequestError(f"unknown option(s) {unknown}; speech options are {list(_SPEECH_OPTIONS)}")
    renamed = {"tts_temperature": "temperature", "tts_top_k": "top_k", "tts_seed": "seed",
               "tts_max_tokens": "max_tokens", "tts_ignore_eos": "ignore_eos"}
    return {renamed.get(k, k): v for k, v in options.items()}


def _count_speech(usage: Usage):
    seen: dict[str, int] = {}

    def on_output(out) -> None:
        usage.speech_tokens += len(out.outputs[0].token_ids) - seen.get(out.request_id, 0)
        seen[out.request_id] = len(out.outputs[0].token_ids)
    return on_output


def _sync_iter(loop: asyncio.AbstractEventLoop, agen) -> Iterator:
    """Drive an async generator on `loop` (another thread's) from synchronous code."""
    async def step():
        return await agen.__anext__()
    try:
        while True:
            try:
                item = asyncio.run_coroutine_threadsafe(step(), loop).result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        asyncio.run_coroutine_threadsafe(agen.aclose(), loop).result()
