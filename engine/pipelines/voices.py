"""Voices of the TTS pipeline: the built-in speakers of a folder in the official layout
(`speakers_info.json` {id: transcript} + `{id}_prompt.wav`) and registered clones.

A voice is processed once, as the official `preprocess_prompt_wav` does it: the prompt's LM ids
from the trimmed 16 kHz tokenization (`wav2token`, trim on), the decoder's prompt mel from the
untrimmed 22.05 kHz resample and the CAM++ embedding from the untrimmed 16 kHz one. Registered
voices are kept in memory and, with a voices folder, on disk: `{name}.safetensors` (prompt ids, mel,
embedding), `{name}.json` (transcript, what made it) and `{name}.flac` (the reference audio, so a
voice made by other model files is recomputed instead of trusted). A restart reloads them without
recomputing.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import threading

import numpy as np
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file

from .. import checks
from ..audio.decoder import SpeakerPrompt, SpeechDecoder
from ..audio.tokenizer import AudioTokenizer
from ..errors import AudioInputError, AudioTooShortError, ConfigError, InvalidRequestError
from ..frontend.audio_input import checked_audio
from ..frontend.wav import read_wav
from ..special_tokens import AUDIO_TOKEN_OFFSET

MIN_REFERENCE_SECONDS = 1.0
MAX_REFERENCE_SECONDS = 30.0
MAX_TRANSCRIPT_CHARS = 500
_NAME = re.compile(r"[\w\- ]{1,64}")          # whole names only: fullmatch ("$" passes "bob\n")
FORMAT_VERSION = "1"


class UnknownVoiceError(InvalidRequestError):
    """The request names a voice this TTS does not have (the message lists the known ones)."""


class VoiceExistsError(InvalidRequestError):
    """A voice of that name exists (or is being registered): delete it first; built-in voices stay."""


@dataclasses.dataclass(frozen=True)
class VoiceRef:
    """A reference for a one-off clone: audio (a path, or samples with their rate) and its transcript."""
    wav: object
    transcript: str
    sample_rate: int | None = None


@dataclasses.dataclass
class Voice:
    name: str
    transcript: str
    prompt_code: list[int]              # the prompt's interleaved LM ids (65536 + code)
    prompt: SpeakerPrompt               # decoder prompt: mel, CAM++ embedding, flow tokens
    builtin: bool = False               # a speaker of the speakers folder (named in the system prompt)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidRequestError(f"a voice name is 1-64 letters, digits, '_', '-' or spaces, got {name!r}")
    return name


def _load_audio(wav, sample_rate, max_seconds: float) -> tuple[torch.Tensor, int]:
    """(1-D float32 samples, rate) of a reference: a file goes through the frontend's reader
    (read_wav: [channels, samples], a file over the length limit refused from its header), raw
    samples with their rate; both then through the one input policy (checked_audio: channels
    averaged, values and rate checked)."""
    if isinstance(wav, (str, os.PathLike)):
        samples, file_rate = read_wav(os.fspath(wav), max_seconds=max_seconds)
        if sample_rate is not None and int(sample_rate) != file_rate:
            raise AudioInputError(f"sample_rate {sample_rate} given for a {file_rate} Hz file")
        wav, sample_rate = samples, file_rate
    if sample_rate is None:
        raise AudioInputError("sample_rate is required with raw samples")
    return checked_audio(wav, sample_rate)


def model_fingerprint(*folders: str) -> str:
    """Which model files a voice was made with (names, sizes, mtimes of the folders' files)."""
    h = hashlib.sha256()
    for folder in folders:
        for root, _, files in sorted(os.walk(folder)):
            for f in sorted(files):
                st = os.stat(os.path.join(root, f))
                h.update(f"{os.path.relpath(os.path.join(root, f), folder)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


class VoiceRegistry:
    """Built-in and registered voices, made with one tokenizer and one decoder (the common one:
    prompts of the music decoder are made by the common decoder's front end, as officially)."""

    def __init__(self, tokenizer: AudioTokenizer, decoder: SpeechDecoder, voices_dir: str | None = None,
                 fingerprint: str = "", max_reference_seconds: float = MAX_REFERENCE_SECONDS):
        """max_reference_seconds: the longest reference accepted (every request with the voice pays
        for its prompt: decode cost grows with the prompt's length)."""
        self.tokenizer, self.decoder = tokenizer, decoder
        self.max_reference_seconds = checks.real(max_reference_seconds, "max_reference_seconds", ConfigError,
                                                 MIN_REFERENCE_SECONDS, decoder.max_prompt_seconds)
        self.voices_dir = voices_dir
        self.fingerprint = fingerprint
        self._voices: dict[str, Voice] = {}
        self._reserved: set[str] = set()    # names being registered (not yet in _voices)
        self._lock = threading.Lock()
        if voices_dir is not None:
            os.makedirs(voices_dir, exist_ok=True)
            self._load_registered()

    # ------------------------------------------------------------------ making voices
    def make(self, name: str, wav, transcript: str, sample_rate: int | None = None, builtin: bool = False) -> Voice:
        """Process a reference into a Voice (not stored)."""
        if not isinstance(transcript, str) or not transcript.strip():
            raise InvalidRequestError(f"voice {name!r}: the reference needs its transcript (the words spoken in it)")
        if len(transcript) > MAX_TRANSCRIPT_CHARS:
            raise InvalidRequestError(f"voice {name!r}: transcript of {len(transcript)} characters; at most "
                                      f"{MAX_TRANSCRIPT_CHARS}")
        samples, rate = _load_audio(wav, sample_rate, self.max_reference_seconds)
        seconds = samples.numel() / rate
        if seconds < MIN_REFERENCE_SECONDS:
            raise AudioTooShortError(f"voice {name!r}: reference of {seconds:.2f} s; at least {MIN_REFERENCE_SECONDS:g} s")
        if seconds > self.max_reference_seconds:
            raise AudioInputError(f"voice {name!r}: reference of {seconds:.1f} s; at most {self.max_reference_seconds:g} s "
                                  "(max_reference_seconds: a longer voice prompt slows every request that uses it)")
        code = self.tokenizer.encode(samples, rate, trim=True)
        prompt = self.decoder.make_prompt(samples, rate, tokens=[i - AUDIO_TOKEN_OFFSET for i in code])
        return Voice(name, transcript.strip(), code, prompt, builtin)

    # ------------------------------------------------------------------ built-in speakers
    def load_speakers(self, folder: str) -> list[str]:
        """Add the speakers of an official speakers folder; returns their names."""
        info_path = os.path.join(folder, "speakers_info.json")
        try:
            with open(info_path, encoding="utf-8") as f:
                info = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{info_path}: cannot read speakers: {exc}") from exc
        if not isinstance(info, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in info.items()):
            raise ConfigError(f"{info_path}: expected {{speaker id: prompt transcript}}")
        wavs = {f[:-len("_prompt.wav")] for f in os.listdir(folder) if f.endswith("_prompt.wav")}
        missing, extra = sorted(set(info) - wavs), sorted(wavs - set(info))
        if missing or extra:
            raise ConfigError(f"{folder}: speakers_info.json and the prompt wavs disagree: "
                              + "; ".join(x for x in (f"no wav for {missing}" if missing else "",
                                                      f"no transcript for {extra}" if extra else "") if x))
        for sid, transcript in info.items():
            check_name(sid)
            voice = self.make(sid, os.path.join(folder, f"{sid}_prompt.wav"), transcript, builtin=True)
            with self._lock:
                self._voices[sid] = voice
        return list(info)

    # ------------------------------------------------------------------ registered clones
    def register(self, name: str, wav, transcript: str, sample_rate: int | None = None) -> Voice:
        """Process and keep a new voice; VoiceExistsError if `name` is taken (checked and reserved
        under the lock, so of two concurrent registrations of one name exactly one succeeds)."""
        check_name(name)
        with self._lock:
            if name in self._voices or name in self._reserved:
                kind = "built-in" if name in self._voices and self._voices[name].builtin else "registered"
                raise VoiceExistsError(f"a voice named {name!r} exists ({kind}); delete it first "
                                       "(built-in voices stay)")
            self._reserved.add(name)
        try:
            samples, rate = _load_audio(wav, sample_rate, self.max_reference_seconds)
            voice = self.make(name, samples, transcript, rate)
            if self.voices_dir is not None:
                self._save(voice, samples.numpy(), rate)
            with self._lock:
                self._voices[name] = voice
        finally:
            with self._lock:
                self._reserved.discard(name)
        return voice

    def remove(self, name: str) -> None:
        with self._lock:
            voice = self._voices.get(name)
            if voice is None or voice.builtin:
                raise UnknownVoiceError(f"no registered voice {name!r}; registered: {self._names(False)}")
            del self._voices[name]
        if self.voices_dir is not None:
            for ext in (".safetensors", ".json", ".flac"):
                path = os.path.join(self.voices_dir, name + ext)
                if os.path.exists(path):
                    os.remove(path)

    def get(self, name: str) -> Voice:
        with self._lock:
            voice = self._voices.get(name)
            if voice is None:
                raise UnknownVoiceError(f"unknown voice {name!r}; known voices: {self._names()}")
            return voice

    def names(self, builtin: bool | None = None) -> list[str]:
        with self._lock:
            return self._names(builtin)

    def _names(self, builtin: bool | None = None) -> list[str]:
        return sorted(n for n, v in self._voices.items() if builtin is None or v.builtin == builtin)

    # ------------------------------------------------------------------ disk
    def _save(self, voice: Voice, samples: np.ndarray, rate: int) -> None:
        base = os.path.join(self.voices_dir, voice.name)
        tmp = base + ".tmp"
        sf.write(tmp + ".flac", samples, rate, format="FLAC")
        save_file({"prompt_code": torch.tensor(voice.prompt_code, dtype=torch.int64),
                   "mel": voice.prompt.mel.float().contiguous().cpu(),
                   "embedding": voice.prompt.embedding.float().contiguous().cpu()}, tmp + ".safetensors")
        with open(tmp + ".json", "w", encoding="utf-8") as f:
            json.dump({"name": voice.name, "transcript": voice.transcript, "format": FORMAT_VERSION,
                       "models": self.fingerprint}, f, ensure_ascii=False, indent=1)
        for ext in (".flac", ".safetensors", ".json"):        # the .json last: it marks a complete voice
            os.replace(tmp + ext, base + ext)

    def _load_registered(self) -> None:
        for f in sorted(os.listdir(self.voices_dir)):
            if not f.endswith(".json") or f.endswith(".tmp.json"):
                continue
            name = f[:-len(".json")]
            base = os.path.join(self.voices_dir, name)
            try:
                with open(base + ".json", encoding="utf-8") as fh:
                    meta = json.load(fh)
                if meta.get("format") != FORMAT_VERSION or meta.get("models") != self.fingerprint:
                    # the kept reference audio, read as any reference file is (mono 1-D samples)
                    samples, rate = _load_audio(base + ".flac", None, self.max_reference_seconds)
                    voice = self.make(name, samples, meta["transcript"], rate)
                    self._save(voice, samples.numpy(), rate)  # made again with these model files
                else:
                    t = load_file(base + ".safetensors")
                    code = t["prompt_code"].tolist()
                    prompt = SpeakerPrompt(t["mel"], t["embedding"],
                                           torch.tensor([i - AUDIO_TOKEN_OFFSET for i in code], dtype=torch.long))
                    voice = Voice(name, meta["transcript"], code, prompt)
            except (OSError, KeyError, ValueError, RuntimeError, sf.LibsndfileError) as exc:
                raise ConfigError(f"{self.voices_dir}: registered voice {name!r} cannot be read: {exc}") from exc
            self._voices[name] = voice
