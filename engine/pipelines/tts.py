"""Step-Audio-TTS-3B end to end: text + voice -> Step1-TTS -> audio tokens -> speech decoder, streaming.

    tts = TTS.from_pretrained("Step-Audio-TTS-3B", tokenizer="Step-Audio-Tokenizer", speakers="speakers")
    audio = tts.synthesize("你好，世界。", voice="Tingting", emotion="高兴1")     # Audio (22.05 kHz)
    audio.save("hello.mp3")
    for chunk in tts.stream("A long text ...", voice="Tingting"): ...            # Audio chunks
    async for chunk in tts.astream(...): ...                                     # for servers

One LM engine (AsyncLLMEngine: its own thread, continuous batching, so concurrent requests share
it) and two speech decoders (the common one, and the Music one that RAP and humming use, as the
official code switches to it), whose work runs on one decoder thread, where a DecoderScheduler per
decoder batches the ready windows of concurrent requests, earliest deadline first. A request is: its text cut
into sentence segments; per segment the official prompt (tts_text.prompt_ids), the official
sampling (temperature 0.7, top-k 50, the repetition rule) capped by a token budget proportional to
the text, the audio ids streamed into a decoder stream in whole 5-token groups as the LM produces
them, and the decoder's chunks out (the first after 15 + 20 look-ahead tokens, then growing
windows: decoder_stream.StreamConfig). Segments join with 10 ms fades, so the stream has no step at
a joint. `speed_factor` (tempo without pitch) and `volume` apply to the chunks as they come.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import os
import random
import threading
from typing import AsyncIterator, Callable, Iterator

import numpy as np
import torch

from .. import checks
from ..async_engine import AsyncLLMEngine
from ..audio.decoder import SpeechDecoder
from ..audio.decoder_scheduler import DecoderScheduler, Playback
from ..audio.decoder_stream import StreamConfig
from ..audio.tokenizer import AudioTokenizer
from ..config import EngineConfig
from ..errors import CheckpointError, ConfigError, InvalidRequestError
from ..frontend.tempo import TempoStream, apply_volume, check_speed, check_volume
from ..llm_engine import LLMEngine
from ..outputs import RequestOutput
from ..sampling_params import SamplingParams
from .audio import Audio
from .tts_text import (EMOTIONS, LANGUAGES, MODES, MUSIC_TAGS, SPEEDS, AudioTokenFilter, compose_tags,
                       instruction_name, prompt_ids, segments, token_budget)
from .voices import MAX_REFERENCE_SECONDS, Voice, VoiceRef, VoiceRegistry, model_fingerprint

COMMON_DECODER = "CosyVoice-300M-25Hz"
MUSIC_DECODER = "CosyVoice-300M-25Hz-Music"
FADE_SECONDS = 0.01
MAX_TEXT_CHARS = 5000
TTS_PREFILL_WHILE_DECODING = 128     # prompt tokens per step while other streams decode (EngineConfig)


@dataclasses.dataclass
class _Plan:
    """What a request resolves to before anything runs."""
    texts: list[str]                 # segments, tags in front of each
    voice: Voice
    speaker: str | None              # built-in speaker named in the system prompt (None: a clone)
    music: bool


class TTS:
    def __init__(self, engine: AsyncLLMEngine, tokenizer: AudioTokenizer, decoder: SpeechDecoder,
                 music_decoder: SpeechDecoder, voices: VoiceRegistry, stream_config: StreamConfig | None = None,
                 max_text_chars: int = MAX_TEXT_CHARS, max_decoder_batch: int = 16):
        """max_decoder_batch: the most decoder windows (of as many concurrent requests) decoded in
        one launch."""
        self.engine = engine
        self.max_text_chars = checks.integer(max_text_chars, "max_text_chars", ConfigError, 1)
        self.tokenizer = tokenizer
        self.decoder, self.music_decoder = decoder, music_decoder
        self.voice_registry = voices
        self.stream_config = stream_config or StreamConfig()
        self.sample_rate = decoder.sample_rate
        self._text_tokenizer = engine.engine.tokenizer
        # decoder work (flow + HiFT) of every request runs on this one thread; per decoder, a scheduler
        # batches the ready windows of concurrent requests into one launch, earliest deadline first
        self._decoder_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="stepvox-decoder")
        batch = checks.integer(max_decoder_batch, "max_decoder_batch", ConfigError, 1)
        self._speech_scheduler = DecoderScheduler(decoder, self._decoder_thread, batch)
        self._music_scheduler = DecoderScheduler(music_decoder, self._decoder_thread, batch)
        # making voices (audio tokenizer + prompt features) from async callers runs on a thread of its
        # own, one at a time: the event loop stays free and the decoder thread keeps streaming
        self._voice_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="stepvox-voices")
        # the sync API drives the async one on a loop of its own
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="stepvox-tts-loop", daemon=True)
        self._loop_thread.start()

    @classmethod
    def from_pretrained(cls, model: str, tokenizer: str, speakers: str | None = None, device: str | None = None,
                        voices_dir: str | None = None, stream_config: StreamConfig | None = None,
                        max_text_chars: int = MAX_TEXT_CHARS, max_reference_seconds: float = MAX_REFERENCE_SECONDS,
                        warm_up: bool | None = None, audio_tokenizer: AudioTokenizer | None = None,
                        **engine_args) -> "TTS":
        """`model`: a Step-Audio-TTS-3B folder as released (Step1 LM files + CosyVoice-300M-25Hz/ +
        CosyVoice-300M-25Hz-Music/); `tokenizer`: a Step-Audio-Tokenizer folder; `speakers`: a folder
        in the official layout (speakers_info.json + {id}_prompt.wav); `voices_dir`: where registered
        voices are kept across restarts; `max_text_chars`: the longest text of one request;
        `max_reference_seconds`: the longest voice reference; `warm_up` (default: on GPUs): speak one
        short text before returning (see `warm_up`); `audio_tokenizer`: the tokenizer loaded from
        `tokenizer` already (a voice chat shares its own); `engine_args`: LLM engine options (EngineConfig)."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        folders = [os.path.join(model, COMMON_DECODER), os.path.join(model, MUSIC_DECODER)]
        for folder in folders:
            if not os.path.isdir(folder):
                raise CheckpointError(f"{model}: a Step-Audio-TTS-3B folder holds {COMMON_DECODER}/ and "
                                      f"{MUSIC_DECODER}/; {folder} is missing")
        # speech streams are deadlines: an arrival's prompt goes in smaller pieces than the engine's
        # default while others decode (a 128-token piece adds about half a 3B decode step on an H100,
        # from the 512-token prefill step measured in bench/RESULTS.md, session 4)
        engine_args.setdefault("max_prefill_while_decoding", TTS_PREFILL_WHILE_DECODING)
        config = EngineConfig(device=device, **engine_args)
        kernels = config.kernels
        engine = AsyncLLMEngine(LLMEngine(model, config))
        try:
            if audio_tokenizer is None:
                audio_tokenizer = load_audio_tokenizer(tokenizer, device, kernels)
            decoder = SpeechDecoder.from_pretrained(folders[0], device=device, kernels=kernels)
            music = SpeechDecoder.from_pretrained(folders[1], device=device, kernels=kernels, load_campplus=False)
            registry = VoiceRegistry(audio_tokenizer, decoder, voices_dir, model_fingerprint(tokenizer, folders[0]),
                                     max_reference_seconds)
            if speakers is not None:
                registry.load_speakers(speakers)
        except BaseException:
            engine.shutdown()
            raise
        tts = cls(engine, audio_tokenizer, decoder, music, registry, stream_config, max_text_chars)
        if warm_up if warm_up is not None else torch.device(device).type == "cuda":
            try:
                tts.warm_up()
            except BaseException:
                tts.shutdown()
                raise
        return tts

    def warm_up(self, voice: str | None = None) -> bool:
        """Speak one short text with `voice` (default: the first built-in one) so that the first
        user request does not pay the kernels' compilation and the first decoder graphs (the
        engine's first request took 1.6 s to first audio instead of 0.16 s on an H100). False when
        there is no voice to speak with."""
        names = self.voice_registry.names(builtin=True) if voice is None else [voice]
        if not names:
            return False
        first_window = self.stream_config.first_hop_tokens + self.stream_config.overlap_tokens
        self.synthesize("你好，世界。Hello.", names[0], seed=0, max_tokens=first_window + 5, ignore_eos=True)
        return True

    # ------------------------------------------------------------------ voices
    @property
    def audio_executor(self) -> concurrent.futures.Executor:
        """The one thread that runs the audio tokenizer (voices here; audio input of a voice chat):
        one call at a time, off the event loop and the decoder thread."""
        return self._voice_thread

    def voices(self) -> list[str]:
        return self.voice_registry.names()

    def register_voice(self, name: str, wav, transcript: str, sample_rate: int | None = None) -> None:
        """Process a reference (a path, or samples with their rate; 1-30 s) once and keep it as `name`
        (in memory, and in voices_dir across restarts)."""
        self.voice_registry.register(name, wav, transcript, sample_rate)

    async def aregister_voice(self, name: str, wav, transcript: str, sample_rate: int | None = None) -> None:
        """`register_voice` for async callers: the work runs on the voice thread."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._voice_thread, self.register_voice, name, wav, transcript, sample_rate)

    def remove_voice(self, name: str) -> None:
        self.voice_registry.remove(name)

    # ------------------------------------------------------------------ requests
    def _plan(self, text: str, voice: str, clone: VoiceRef | None, emotion, language, speed, mode) -> _Plan:
        full = tagged_text(text, emotion, language, speed, mode, self.max_text_chars)
        music_tag = instruction_name(full)
        music = music_tag in MUSIC_TAGS
        if clone is not None:
            if not isinstance(clone, VoiceRef):
                raise InvalidRequestError(f"clone must be a VoiceRef(wav, transcript), got {type(clone).__name__}")
            found = self.voice_registry.make("clone", clone.wav, clone.transcript, clone.sample_rate)
            speaker = None
        else:
            found = self.voice_registry.get(voice)
            speaker = voice if found.builtin else None
            if music and found.builtin:       # the official code takes the speaker's RAP / humming prompt
                found = self.voice_registry.get(f"{voice}{music_tag}")
        return _Plan(segments(full), found, speaker, music)

    def prompt_token_ids(self, text: str, voice: str = "Tingting", *, clone: VoiceRef | None = None,
                         emotion: str | None = None, language: str | None = None, speed: str | None = None,
                         mode: str = "normal") -> list[int]:
        """The exact prompt the LM sees for `text` (of its first segment, for a long text)."""
        plan = self._plan(text, voice, clone, emotion, language, speed, mode)
        return self._prompt(plan, plan.texts[0])

    def _prompt(self, plan: _Plan, text: str) -> list[int]:
        encode = functools.partial(self._text_tokenizer.encode, add_bos=True)      # the official tokenizer.encode
        return prompt_ids(encode, text, plan.voice.transcript, plan.voice.prompt_code, plan.speaker)

    async def astream(self, text: str, voice: str = "Tingting", *, clone: VoiceRef | None = None,
                      emotion: str | None = None, language: str | None = None, speed: str | None = None,
                      mode: str = "normal", speed_factor: float = 1.0, volume: float = 1.0, seed: int | None = None,
                      temperature: float = 0.7, top_k: int = 50, max_tokens: int | None = None,
                      ignore_eos: bool = False,
                      on_output: Callable[[RequestOutput], None] | None = None) -> AsyncIterator[Audio]:
        """Audio chunks as the LM produces tokens (see `synthesize` for the arguments). Stopping the
        iteration cancels the request: its KV pages are freed at once. `on_output` sees each LM
        output of each segment (token counts and timings, for servers' usage and metrics)."""
        speed_factor, volume = check_speed(speed_factor), check_volume(volume)
        playback = Playback(self.sample_rate, speed_factor)       # the request's deadlines, from its arrival
        loop = asyncio.get_running_loop()
        if clone is not None:       # a clone's voice is made from its audio: model work, off the event loop
            plan = await loop.run_in_executor(self._voice_thread, self._plan, text, voice, clone, emotion, language,
                                              speed, mode)
        else:
            plan = self._plan(text, voice, clone, emotion, language, speed, mode)
        scheduler = self._music_scheduler if plan.music else self._speech_scheduler
        base_seed = random.randrange(2 ** 62) if seed is None else checks.integer(seed, "seed", InvalidRequestError,
                                                                                   0, 2 ** 63 - 1)
        tempo = TempoStream(self.sample_rate, speed_factor)
        fade = int(FADE_SECONDS * self.sample_rate)
        for index, segment in enumerate(plan.texts):
            segment_seed = (base_seed + index) % 2 ** 63
            # the LM's output is audio ids for the decoder, never text: no detokenisation
            params = SamplingParams(temperature=temperature, top_k=top_k, repetition_aware=True, seed=segment_seed,
                                    max_tokens=max_tokens or token_budget(segment), ignore_eos=ignore_eos,
                                    detokenize=False)
            stream = scheduler.open(plan.voice.prompt, seed=segment_seed, config=self.stream_config, playback=playback)
            tokens = AudioTokenFilter()
            first, pushed = index > 0, 0
            try:
                # aclosing: a consumer that stops (or is cancelled) while this segment runs aborts its LM
                # request now, not when the generator is garbage-collected
                async with contextlib.aclosing(self.engine.generate(self._prompt(plan, segment), params)) as outputs:
                    async for out in outputs:
                        if out.error is not None:
                            raise out.error
                        if on_output is not None:
                            on_output(out)
                        new = tokens.push(out.outputs[0].new_token_ids)
                        pushed += len(new)
                        finished = out.finished
                        if not new and not (finished and pushed):
                            continue
                        chunks = await asyncio.wrap_future(stream.submit(new, finished))
                        for k, chunk in enumerate(chunks):
                            last = finished and k == len(chunks) - 1
                            samples = _fade(chunk, fade, fade_in=first, fade_out=last and index < len(plan.texts) - 1)
                            first = False
                            samples = apply_volume(tempo.push(samples), volume)
                            if samples.size:
                                yield Audio(samples, self.sample_rate)
            finally:
                stream.close()          # a request that stops leaves the decoder's schedule at once
        tail = apply_volume(tempo.finish(), volume)
        if tail.size:
            yield Audio(tail, self.sample_rate)

    def stream(self, text: str, voice: str = "Tingting", **kwargs) -> Iterator[Audio]:
        """`astream` for synchronous callers (not from inside a running event loop's thread)."""
        agen = self.astream(text, voice, **kwargs)
        try:
            while True:
                try:
                    chunk = asyncio.run_coroutine_threadsafe(_next(agen), self._loop).result()
                except StopAsyncIteration:
                    return
                yield chunk
        finally:
            asyncio.run_coroutine_threadsafe(agen.aclose(), self._loop).result()

    def synthesize(self, text: str, voice: str = "Tingting", *, clone: VoiceRef | None = None,
                   emotion: str | None = None, language: str | None = None, speed: str | None = None,
                   mode: str = "normal", speed_factor: float = 1.0, volume: float = 1.0, seed: int | None = None,
                   temperature: float = 0.7, top_k: int = 50, max_tokens: int | None = None,
                   ignore_eos: bool = False) -> Audio:
        """Speak `text` with a built-in or registered `voice` (or a one-off `clone`), tags as fields
        (emotion 高兴1..., language 中文/英文/粤语..., speed 慢速1..., mode normal | rap | humming;
        tags written inline in the text work too), tempo `speed_factor` (0.5-2, pitch kept),
        `volume` (peaks kept below full scale); sampling as the official defaults (temperature 0.7,
        top-k 50, 0 for greedy), `max_tokens` per sentence segment (default: proportional to its
        length). Returns the whole utterance (the stream collected)."""
        chunks = list(self.stream(text, voice, clone=clone, emotion=emotion, language=language, speed=speed,
                                  mode=mode, speed_factor=speed_factor, volume=volume, seed=seed,
                                  temperature=temperature, top_k=top_k, max_tokens=max_tokens, ignore_eos=ignore_eos))
        return Audio.concatenate(chunks, self.sample_rate)

    def shutdown(self) -> None:
        self.engine.shutdown()
        self._voice_thread.shutdown(wait=True)
        self._speech_scheduler.close()
        self._music_scheduler.close()
        self._decoder_thread.shutdown(wait=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


def load_audio_tokenizer(folder: str, device: str, kernels, **options) -> AudioTokenizer:
    """The tokenizer of a pipeline (voices; a voice chat's audio input), with CUDA graphs on GPUs (the
    replay hang on released sizes is fixed: bench/check_tok_hang.py, H100, 2026-12-06)."""
    return AudioTokenizer.from_pretrained(folder, device=device, kernels=kernels, **options)


def tagged_text(text: str, emotion: str | None = None, language: str | None = None, speed: str | None = None,
                mode: str = "normal", max_chars: int = MAX_TEXT_CHARS) -> str:
    """The text with its tags in front, as the LM reads it; InvalidRequestError for an empty or too
    long text, an unknown mode or a tag that is not one word (checkable before any model loads)."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequestError("the text to speak is empty")
    if len(text) > max_chars:
        raise InvalidRequestError(f"text of {len(text)} characters; at most {max_chars} per request (max_text_chars)")
    if mode not in MODES:
        raise InvalidRequestError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    for name, value in (("emotion", emotion), ("language", language), ("speed", speed)):
        if value is not None and (not isinstance(value, str) or not value.strip()
                                  or any(c in value for c in "()（）")):
            raise InvalidRequestError(f"{name} must be a tag word without parentheses (e.g. {EMOTIONS[0]}, "
                                      f"{LANGUAGES[1]}, {SPEEDS[0]}), got {value!r}")
    return compose_tags(mode, emotion, language, speed) + text.strip()


async def _next(agen):
    return await agen.__anext__()


def _fade(samples: np.ndarray, n: int, fade_in: bool, fade_out: bool) -> np.ndarray:
    """Raised-cosine fades at a segment's joints (a sentence starts and ends near silence anyway)."""
    if not (fade_in or fade_out) or samples.size == 0:
        return samples
    samples = samples.copy()
    k = min(n, samples.size)
    ramp = (0.5 - 0.5 * np.cos(np.pi * (np.arange(k) + 0.5) / k)).astype(np.float32)
    if fade_in:
        samples[:k] *= ramp
    if fade_out:
        samples[samples.size - k:] *= ramp[::-1]
    return samples
