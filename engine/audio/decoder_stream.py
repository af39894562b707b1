"""Streaming token2wav bookkeeping: windows, caches and crossfades of one stream (SPEC.md §8).

The CosyVoice v1 recipe, with the Step-Audio rate (41.667 tokens/s, 5-token groups of 120 ms):

- Flow on sliding token windows: window k covers tokens [s, s + hop + overlap) (the last window:
  [s, end)); the next starts at s + hop, so `overlap` (20) tokens are look-ahead for one window and
  the head of the next. The hop starts small for a fast first chunk and grows to `max_hop_tokens`.
- Mel frames live on the offline time line: tokens [s, e) own frames [G(s), G(e)) with
  G(n) = int(n / 41.667 * 22050 / 256). The initial ODE noise z comes from a tape indexed by that
  frame position, so every window and the offline decode draw the same z for the same frame;
  the mel of the overlap is withheld and crossfaded with the next window's head, whose mu is also
  taken from the previous window (with the prompt's mu), as the upstream flow cache does.
- HiFT on the mel stream: each call prepends the last 20 mel frames of the previous call, the
  speech of those frames is withheld and crossfaded with the next call's head.
Deviations from upstream, both to stay close to the offline output: (a) the sine source keeps
each harmonic's phase across calls (pinned in the middle of the cached frames, where both calls
see enough context for the offline f0) and its noise comes from a tape indexed by sample
position, instead of pasting the previous call's source over the cached frames; (b) the
default crossfade is a complementary raised cosine (fade_in + fade_out = 1); upstream's Hamming
halves sum to about 1.08 (`crossfade="hamming"` restores it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from ..errors import ConfigError, StreamClosedError

TOKENS_PER_GROUP = 5          # 2 vq02 + 3 vq06 tokens = 120 ms


@dataclass(frozen=True)
class StreamConfig:
    first_hop_tokens: int = 15          # 3 groups: the first chunk needs first_hop + overlap tokens
    max_hop_tokens: int = 165           # ~4 s of tokens, upstream's 4 * input_frame_rate, group aligned
    hop_growth: int = 2
    overlap_tokens: int = 20            # upstream token_overlap_len
    hift_cache_frames: int = 20         # upstream mel_cache_len
    crossfade: str = "hann"             # or "hamming" (upstream)

    def validate(self) -> "StreamConfig":
        for name in ("first_hop_tokens", "max_hop_tokens", "overlap_tokens"):
            v = getattr(self, name)
            if v <= 0 or v % TOKENS_PER_GROUP:
                raise ConfigError(f"StreamConfig.{name} must be a positive multiple of "
                                         f"{TOKENS_PER_GROUP}, got {v}")
        if self.max_hop_tokens < self.first_hop_tokens or self.hop_growth < 1:
            raise ConfigError("StreamConfig: need max_hop_tokens >= first_hop_tokens and hop_growth >= 1")
        if self.hift_cache_frames < 1 or self.crossfade not in ("hann", "hamming"):
            raise ConfigError("StreamConfig: hift_cache_frames >= 1 and crossfade in ('hann', 'hamming')")
        return self


def fade_windows(n: int, kind: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(fade_in, fade_out) of length n for blending a new head (in) with a withheld tail (out)."""
    return _fade_windows(n, kind, str(torch.device(device)))


@lru_cache(maxsize=64)
def _fade_windows(n: int, kind: str, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "hamming":
        w = torch.from_numpy(np.hamming(2 * n).astype(np.float32))
        return w[:n].to(device), w[n:].to(device)
    i = torch.arange(n, dtype=torch.float64)
    fade_in = (0.5 - 0.5 * torch.cos(math.pi * (i + 0.5) / n)).float()
    return fade_in.to(device), (1.0 - fade_in).to(device)


class NoiseTape:
    """Reproducible N(0, 1) values [channels, position] drawn in fixed blocks from one seeded
    generator, so any [start, stop) slice is the same whatever the order of the requests."""

    def __init__(self, seed: int, channels: int, block: int, device):
        self.device = torch.device(device)
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(int(seed))
        self.channels, self.block = channels, block
        self.blocks: list[torch.Tensor | None] = []

    def take(self, start: int, stop: int) -> torch.Tensor:
        if stop <= start:
            return torch.zeros(self.channels, 0, device=self.device)
        while len(self.blocks) * self.block < stop:
            self.blocks.append(torch.randn(self.channels, self.block, generator=self.gen, device=self.device))
        first, last = start // self.block, (stop - 1) // self.block
        parts = self.blocks[first:last + 1]
        if any(p is None for p in parts):
            raise StreamClosedError("noise tape: the requested positions were already released")
        joined = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        offset = first * self.block
        return joined[:, start - offset:stop - offset]

    def release_before(self, position: int) -> None:
        for i in range(min(position // self.block, len(self.blocks))):
            self.blocks[i] = None


def derive_seed(seed: int, stream: int) -> int:
    """Independent sub-seeds for the flow noise, the source noise and the start phases."""
    return (int(seed) * 1_000_003 + 7919 * stream) % (2 ** 62)


@dataclass
class Window:
    start: int          # token index (window's first token)
    end: int            # one past the last token
    final: bool


class DecoderStream:
    """State of one token2wav stream. The SpeechDecoder drives it: pending_window ->
    (flow) -> take_mel -> hift_inputs -> (HiFT) -> take_wav."""

    def __init__(self, *, prompt_tokens, prompt_mel, speaker, seed: int, config: StreamConfig,
                 mel_frames, samples_per_frame: int, mel_channels: int, harmonics: int, device):
        self.cfg = config.validate()
        self.prompt_tokens, self.prompt_mel, self.speaker = prompt_tokens, prompt_mel, speaker
        self.mel_frames = mel_frames                 # G(n), FlowConfig.mel_frames
        self.spf = samples_per_frame
        self.device = torch.device(device)
        self.flow_tape = NoiseTape(derive_seed(seed, 0), mel_channels, 256, device)
        self.source_tape = NoiseTape(derive_seed(seed, 1), harmonics, 1 << 16, device)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(derive_seed(seed, 2))
        self.start_phase = (torch.rand(harmonics, generator=gen, device=self.device) * 2 - 1) * math.pi
        self.tokens: list[int] = []
        self.finished = False
        self.start, self.hop = 0, self.cfg.first_hop_tokens
        self.mu_prompt = self.mu_tail = self.mel_tail = None
        self.flow_done = False
        # vocoder side
        self.hift_frame = 0                           # first mel frame not yet handed to HiFT
        self.mel_cache = None                         # [80, c] frames before hift_frame
        self.speech_tail = None
        self.phase_offset = torch.zeros(harmonics, dtype=torch.float64, device=self.device)
        self.phase_anchor = 0                         # sample index in the next call's input
        self.closed = False

    # ------------------------------------------------------------------ tokens in
    def push(self, tokens: list[int]) -> None:
        if self.finished:
            raise StreamClosedError("tokens pushed to a finished stream")
        self.tokens.extend(tokens)

    def finish(self) -> None:
        self.finished = True

    @property
    def prompt_frames(self) -> int:
        return self.prompt_mel.shape[0]

    def pending_window(self) -> Window | None:
        if self.flow_done:
            return None
        n, span = len(self.tokens), self.hop + self.cfg.overlap_tokens
        if self.finished and self.start < n <= self.start + span:
            return Window(self.start, n, True)          # the rest fits: no look-ahead to keep
        if n - self.start >= span:
            return Window(self.start, self.start + span, False)
        return None

    # ------------------------------------------------------------------ flow side
    def flow_inputs(self, w: Window) -> dict:
        g0, g1, p = self.mel_frames(w.start), self.mel_frames(w.end), self.prompt_frames
        noise = torch.cat([self.flow_tape.take(0, p), self.flow_tape.take(p + g0, p + g1)], dim=1)
        prefix = None
        if self.mu_prompt is not None:
            prefix = torch.cat([self.mu_prompt, self.mu_tail], dim=1)
        return dict(tokens=torch.tensor(self.tokens[w.start:w.end], dtype=torch.long, device=self.device),
                    prompt_tokens=self.prompt_tokens, prompt_mel=self.prompt_mel, speaker=self.speaker,
                    mel_len=g1 - g0, noise=noise, mu_prefix=prefix)

    def take_mel(self, w: Window, mel: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        """Flow output [80, G(end) - G(start)] of window w -> mel frames ready for the vocoder."""
        mel = mel.float()
        if self.mel_tail is not None:
            ov = self.mel_tail.shape[1]
            fade_in, fade_out = fade_windows(ov, self.cfg.crossfade, mel.device)
            mel = mel.clone()
            mel[:, :ov] = mel[:, :ov] * fade_in + self.mel_tail * fade_out
        if w.final:
            self.mel_tail, self.flow_done = None, True
            return mel
        g0 = self.mel_frames(w.start)
        nxt = w.end - self.cfg.overlap_tokens
        keep = self.mel_frames(nxt) - g0
        p = self.prompt_frames
        if self.mu_prompt is None:
            self.mu_prompt = mu[:, :p]
        self.mu_tail = mu[:, p + keep:]
        self.mel_tail = mel[:, keep:]
        self.start = nxt
        self.hop = min(self.cfg.max_hop_tokens, self.hop * self.cfg.hop_growth)
        return mel[:, :keep]

    # ------------------------------------------------------------------ vocoder side
    def hift_inputs(self, piece: torch.Tensor) -> dict:
        """piece: new mel frames [80, P] -> HiFT inputs for [cached frames; piece]."""
        c = 0 if self.mel_cache is None else self.mel_cache.shape[1]
        x = piece if c == 0 else torch.cat([self.mel_cache, piece], dim=1)
        first = self.hift_frame - c
        last = self.hift_frame + piece.shape[1]
        noise = self.source_tape.take(first * self.spf, last * self.spf)
        return dict(mel=x, noise=noise, start_phase=self.start_phase, phase_offset=self.phase_offset,
                    phase_anchor=self.phase_anchor)

    def take_wav(self, mel_in: torch.Tensor, wav: torch.Tensor, cycles: torch.Tensor, final: bool) -> torch.Tensor:
        """HiFT output for hift_inputs(...)['mel'] -> the audio chunk to emit."""
        c_prev = 0 if self.mel_cache is None else self.mel_cache.shape[1]
        first = self.hift_frame - c_prev
        self.hift_frame = first + mel_in.shape[1]
        if self.speech_tail is not None and self.speech_tail.numel() > 0:
            n = self.speech_tail.numel()
            fade_in, fade_out = fade_windows(n, self.cfg.crossfade, wav.device)
            wav = wav.clone()
            wav[:n] = wav[:n] * fade_in + self.speech_tail * fade_out
        if final:
            self.closed = True
            self.mel_cache = self.speech_tail = None
            return wav
        c = min(self.cfg.hift_cache_frames, mel_in.shape[1])
        cut = wav.numel() - c * self.spf
        self.mel_cache = mel_in[:, mel_in.shape[1] - c:]
        self.speech_tail = wav[cut:]
        # phases continue from the middle of the cached frames, where both this call and the next
        # see c/2 frames of context on each side (f0 there is the offline f0)
        anchor = (mel_in.shape[1] - c // 2) * self.spf
        self.phase_offset = cycles[:, anchor - 1].clone()
        self.phase_anchor = (c - c // 2) * self.spf
        self.source_tape.release_before((self.hift_frame - c) * self.spf)
        return wav[:cut]
