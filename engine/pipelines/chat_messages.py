"""Chat messages as users hand them over (OpenAI's shapes, and the official `stepaudio.py` ones),
checked and turned into the parts the chat template renders (SPEC.md §7.3).

    [{"role": "system", "content": "适配用户的语言，用简短口语化的文字回答"},
     {"role": "user", "content": "你好"},                                           # a string
     {"role": "user", "content": [{"type": "text", "text": "What is this?"},       # OpenAI parts
                                  {"type": "input_audio", "input_audio": {"data": "<base64>", "format": "wav"}}]},
     {"role": "user", "content": {"type": "audio", "audio": "question.wav"}},       # the official dict
     {"role": "assistant", "content": "..."}]

Parts of a message's content: `text`; `input_audio` with base64 `data` in wav | mp3 | flac | ogg |
pcm16 (raw 16-bit little endian at `sample_rate`, default 24 kHz as OpenAI's pcm16) or, from Python,
a numpy array / tensor `data` with its `sample_rate`; `audio` (the official shape: a file path,
Python callers only; servers refuse paths); `audio_tokens` (interleaved LLM audio ids, as
`AudioTokenizer.encode` gives them: a conversation keeps audio it has tokenized this way).
Several parts in one message are rendered one after the other, without separators. A `None`
content leaves the turn open (the official template writes its header only): allowed last.
Every refusal is an InvalidRequestError (AudioInputError for audio) naming the message and part.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import os

import numpy as np
import torch

from ..errors import AudioInputError, InvalidRequestError
from ..frontend.audio_bytes import decode_audio_bytes
from ..frontend.wav import read_wav
from ..special_tokens import AUDIO_TOKEN_OFFSET, AUDIO_TOKENS_END

ROLES = ("system", "user", "assistant")
MAX_MESSAGES = 1024
MAX_TEXT_CHARS = 100_000           # per message; the engine refuses prompts longer than its context anyway
MAX_AUDIO_SECONDS = 120.0          # per audio part: 5000 LLM tokens at 41.7 Hz
PCM16_DEFAULT_RATE = 24000         # OpenAI's pcm16


@dataclasses.dataclass(frozen=True)
class AudioClip:
    """Audio to tokenize: mono float32 samples and their rate."""
    samples: np.ndarray
    sample_rate: int

    @property
    def seconds(self) -> float:
        return self.samples.size / self.sample_rate


@dataclasses.dataclass(frozen=True)
class AudioTokens:
    """Audio already tokenized: interleaved LLM ids (65536 + code), with its clip when kept."""
    ids: tuple[int, ...]
    clip: AudioClip | None = None


Part = str | AudioClip | AudioTokens


@dataclasses.dataclass
class Message:
    role: str                       # system | user | assistant
    parts: list[Part] | None        # None: an open turn (header only)

    @property
    def has_audio(self) -> bool:
        return any(not isinstance(p, str) for p in self.parts or ())


def parse_messages(messages, *, allow_paths: bool = True, max_audio_seconds: float = MAX_AUDIO_SECONDS,
                   max_text_chars: int = MAX_TEXT_CHARS) -> list[Message]:
    """Check `messages` and decode their audio (not yet tokenized). `allow_paths`: whether an
    `audio` part may name a file (servers pass False)."""
    if isinstance(messages, (str, bytes, dict)) or not hasattr(messages, "__iter__"):
        raise InvalidRequestError(f"messages must be a list of {{role, content}} objects, got "
                                  f"{type(messages).__name__}")
    messages = list(messages)
    if not messages:
        raise InvalidRequestError("messages is empty")
    if len(messages) > MAX_MESSAGES:
        raise InvalidRequestError(f"{len(messages)} messages; at most {MAX_MESSAGES}")
    out = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise InvalidRequestError(f"{where} must be an object with role and content, got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            raise InvalidRequestError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}")
        if "content" not in msg:
            raise InvalidRequestError(f"{where} has no content")
        content = msg["content"]
        if content is None:
            if i != len(messages) - 1:
                raise InvalidRequestError(f"{where}: a null content leaves the turn open; only the last message "
                                          "may do that")
            out.append(Message(role, None))
            continue
        parts = content if isinstance(content, list) else [content]
        if not parts:
            raise InvalidRequestError(f"{where}.content is an empty list")
        parsed = [_part(p, f"{where}.content" + (f"[{k}]" if isinstance(content, list) else ""), allow_paths,
                        max_audio_seconds) for k, p in enumerate(parts)]
        chars = sum(len(p) for p in parsed if isinstance(p, str))
        if chars > max_text_chars:
            raise InvalidRequestError(f"{where}: {chars} characters of text; at most {max_text_chars}")
        if role != "user" and any(not isinstance(p, str) for p in parsed):
            raise InvalidRequestError(f"{where}: audio is accepted in user messages only (the chat model "
                                      "writes text; its answers are spoken by the TTS)")
        out.append(Message(role, parsed))
    return out


def _part(part, where: str, allow_paths: bool, max_audio_seconds: float) -> Part:
    if isinstance(part, str):
        return part
    if not isinstance(part, dict):
        raise InvalidRequestError(f"{where} must be a string or a content part object, got {type(part).__name__}")
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise InvalidRequestError(f"{where}.text must be a string")
        return text
    if kind == "input_audio":
        spec = part.get("input_audio")
        if not isinstance(spec, dict):
            raise InvalidRequestError(f"{where}.input_audio must be an object with data and format")
        return _input_audio(spec, f"{where}.input_audio", max_audio_seconds)
    if kind == "audio":
        path = part.get("audio")
        if not allow_paths:
            raise InvalidRequestError(f"{where}: audio file paths are not accepted here; send input_audio "
                                      "with base64 data")
        if not isinstance(path, (str, os.PathLike)):
            raise InvalidRequestError(f"{where}.audio must be a file path")
        wav, rate = read_wav(os.fspath(path), max_seconds=max_audio_seconds)
        return AudioClip(wav.mean(axis=0).astype(np.float32), rate)
    if kind == "audio_tokens":
        return AudioTokens(_audio_ids(part.get("audio_tokens"), f"{where}.audio_tokens"))
    raise InvalidRequestError(f"{where}.type must be text, input_audio, audio or audio_tokens, got {kind!r}")


def _input_audio(spec: dict, where: str, max_audio_seconds: float) -> AudioClip:
    data, fmt, rate = spec.get("data"), spec.get("format"), spec.get("sample_rate")
    if isinstance(data, (np.ndarray, torch.Tensor)):          # Python callers: samples with their rate
        if rate is None:
            raise AudioInputError(f"{where}: samples need their sample_rate")
        samples = data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else data
        samples = np.asarray(samples)
        if samples.ndim == 2:
            samples = samples.mean(axis=0)
        if samples.ndim != 1 or samples.size == 0:
            raise AudioInputError(f"{where}: samples must be 1-D (or channels x samples) and not empty")
        if samples.size > max_audio_seconds * int(rate) + 1:
            raise AudioInputError(f"{where}: {samples.size / int(rate):.1f} s of audio; at most {max_audio_seconds:g} s")
        return AudioClip(samples, int(rate))
    if not isinstance(data, (str, bytes)):
        raise InvalidRequestError(f"{where}.data must be base64 text")
    if not isinstance(fmt, str):
        raise InvalidRequestError(f"{where}.format must name the audio format (wav, mp3, flac, ogg, pcm16)")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise AudioInputError(f"{where}.data is not base64: {exc}") from exc
    samples, sr = decode_audio_bytes(raw, where, max_audio_seconds, format=fmt,
                                     pcm_rate=PCM16_DEFAULT_RATE if rate is None else rate)
    return AudioClip(samples, sr)


def _audio_ids(ids, where: str) -> tuple[int, ...]:
    if isinstance(ids, (str, bytes, dict)) or not hasattr(ids, "__iter__"):
        raise InvalidRequestError(f"{where} must be a list of audio token ids")
    ids = list(ids)
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not AUDIO_TOKEN_OFFSET <= t < AUDIO_TOKENS_END:
            raise InvalidRequestError(f"{where}: {t!r} is not an audio token id ({AUDIO_TOKEN_OFFSET}.."
                                      f"{AUDIO_TOKENS_END - 1})")
    if not ids:
        raise InvalidRequestError(f"{where} is empty")
    return tuple(int(t) for t in ids)
