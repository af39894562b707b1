"""The Paraformer front end (SPEC.md §4.2, §4.4): Kaldi fbank (dither 0) -> LFR 7/6 -> CMVN from
`am.mvn`, with the chunking of FunASR's online front end as Step-Audio drives it.

Step-Audio runs the streaming front end even for whole files: audio is cut into 3840-sample
(240 ms) calls, the last one flagged final. Per call, fbank frames are computed for every whole
25 ms frame (leftover samples carry over, so frames stay on the global 10 ms grid), and an LFR row
(7 stacked frames, hop 6, three copies of frame 0 in front) is emitted once all 7 frames exist.
The final call pads the tail with copies of the last frame. Every emitted row is therefore a row
of the offline LFR of the whole utterance; what the chunking decides is only *how many* rows come
out and in which call. `OnlineChunker` reproduces that count logic, including two quirks of the
official code that drop the padded tail:
  - a final call whose frames plus the carried splice frames number fewer than 7 emits nothing;
  - a final call with no new frame and <= 3 carried frames fails inside FunASR and is skipped.
Non-final calls always emit 4 rows (24 frames per 240 ms). Dither is fixed at 0: the official
default (1.0) adds unseeded noise, which makes its codes differ from run to run.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from ..errors import CheckpointError
from .fbank import kaldi_fbank, num_frames


@dataclass(frozen=True)
class FbankConfig:
    sample_rate: int = 16000
    window: str = "hamming"
    n_mels: int = 80
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    lfr_m: int = 7
    lfr_n: int = 6
    chunk_frames: int = 4                 # Step-Audio chunk_size[1]: LFR rows per call

    @property
    def frame_samples(self) -> int:
        return int(self.frame_length_ms * self.sample_rate / 1000)

    @property
    def shift_samples(self) -> int:
        return int(self.frame_shift_ms * self.sample_rate / 1000)

    @property
    def chunk_samples(self) -> int:
        # FunASR: chunk_size[1] * 960 samples (60 ms per LFR row at 16 kHz)
        return self.chunk_frames * self.lfr_n * self.shift_samples

    @property
    def feature_dim(self) -> int:
        return self.n_mels * self.lfr_m


def load_am_mvn(path: str | os.PathLike, dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a Kaldi nnet1 CMVN file: the numbers after `<AddShift>` and `<Rescale>` (each on the
    `<LearnRateCoef>` line that follows, between its 3rd token and the closing `]`).
    Returns (shift, scale) as float32 vectors; features are normalised as (x + shift) * scale."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise CheckpointError(f"cannot read CMVN file {path}: {exc}") from exc
    found = {}
    for i, line in enumerate(lines[:-1]):
        head = line.split()[:1]
        if head and head[0] in ("<AddShift>", "<Rescale>"):
            items = lines[i + 1].split()
            if items[:1] == ["<LearnRateCoef>"]:
                try:
                    found[head[0]] = torch.tensor([float(v) for v in items[3:-1]], dtype=torch.float32)
                except ValueError as exc:
                    raise CheckpointError(f"{path}: non-numeric value after {head[0]}") from exc
    missing = [k for k in ("<AddShift>", "<Rescale>") if k not in found]
    if missing:
        raise CheckpointError(f"{path}: no {' / '.join(missing)} block found (not a Kaldi am.mvn?)")
    shift, scale = found["<AddShift>"], found["<Rescale>"]
    if shift.numel() != scale.numel() or (dim is not None and shift.numel() != dim):
        raise CheckpointError(
            f"{path}: AddShift has {shift.numel()} values and Rescale {scale.numel()}, expected {dim or 'equal'}")
    return shift, scale


def paraformer_fbank(wav: torch.Tensor, cfg: FbankConfig) -> torch.Tensor:
    """[frames, n_mels] fbank of 16 kHz float audio in [-1, 1] as WavFrontendOnline computes it
    (samples scaled by 2**15, Hamming window, energy floor 0, dither 0)."""
    if cfg.window != "hamming":
        raise ValueError(f"paraformer_fbank: window {cfg.window!r} (the Paraformer front end is hamming)")
    return kaldi_fbank(wav, num_mel_bins=cfg.n_mels, sample_rate=cfg.sample_rate, frame_length_ms=cfg.frame_length_ms,
                       frame_shift_ms=cfg.frame_shift_ms, window="hamming", scale=float(1 << 15))


def lfr_stack(frames: torch.Tensor, num_rows: int, cfg: FbankConfig, left_pad: bool = True) -> torch.Tensor:
    """Rows of low-frame-rate features: row i stacks frames [i*n, i*n + m) of the sequence
    (with (m-1)//2 copies of frame 0 in front when left_pad); past the end, the last frame repeats."""
    if num_rows == 0:
        return frames.new_zeros(0, cfg.feature_dim)
    pad = (cfg.lfr_m - 1) // 2 if left_pad else 0
    idx = torch.arange(num_rows, device=frames.device)[:, None] * cfg.lfr_n \
        + torch.arange(cfg.lfr_m, device=frames.device)[None, :] - pad
    idx = idx.clamp(0, frames.shape[0] - 1)
    return frames[idx].reshape(num_rows, cfg.feature_dim)


class OnlineChunker:
    """Row-count logic of FunASR's online front end (frame cache + LFR splice cache), no data."""

    def __init__(self, cfg: FbankConfig):
        self.cfg = cfg
        self.carry_samples = 0        # samples carried into the next fbank call
        self.splice = None            # frames waiting in the LFR splice cache (None: not started)

    def step(self, num_samples: int, final: bool) -> tuple[int, int, int]:
        """One front-end call on `num_samples` new samples. Returns (new fbank frames, LFR rows
        emitted, frames dropped from the front of the splice cache)."""
        cfg, m, n = self.cfg, self.cfg.lfr_m, self.cfg.lfr_n
        total = self.carry_samples + num_samples
        new = num_frames(total, cfg.frame_samples, cfg.shift_samples)
        self.carry_samples = total - new * cfg.shift_samples
        half = (m - 1) // 2
        if new == 0:
            if final and self.splice is not None:
                # FunASR LFR-pads the splice cache alone; with <= 3 frames it raises and the
                # (short) call is skipped, which ceil(...) <= 0 expresses
                return 0, max(0, math.ceil((self.splice - half) / n)), 0
            return 0, 0, 0
        if self.splice is None:
            self.splice = half
        rows_total = self.splice + new
        if rows_total < m:
            self.splice = rows_total          # too few frames yet: everything waits (final: dropped)
            return new, 0, 0
        if final:
            return new, math.ceil((rows_total - half) / n), 0
        rows = min(math.ceil((rows_total - half) / n), (rows_total - m) // n + 1)
        consumed = min(rows_total - 1, rows * n)
        self.splice = rows_total - consumed
        return new, rows, consumed


def chunk_row_counts(num_samples: int, cfg: FbankConfig) -> list[int]:
    """LFR rows per encoder call that Step-Audio's whole-file path produces for `num_samples`
    samples (calls that emit nothing are left out)."""
    chunker = OnlineChunker(cfg)
    counts = []
    full, rest = divmod(num_samples, cfg.chunk_samples)
    for _ in range(full):
        rows = chunker.step(cfg.chunk_samples, final=False)[1]
        if rows:
            counts.append(rows)
    if rest:
        rows = chunker.step(rest, final=True)[1]
        if rows:
            counts.append(rows)
    return counts


def apply_cmvn(rows: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (rows + shift) * scale


class ParaformerFeatures:
    """Fbank + LFR + CMVN for the Paraformer: whole utterances and live streams."""

    def __init__(self, cfg: FbankConfig, cmvn_shift: torch.Tensor, cmvn_scale: torch.Tensor):
        self.cfg = cfg
        self.shift = cmvn_shift
        self.scale = cmvn_scale

    def to(self, device) -> "ParaformerFeatures":
        return ParaformerFeatures(self.cfg, self.shift.to(device), self.scale.to(device))

    def offline(self, wav: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """All rows of a 16 kHz utterance and their split into encoder calls (Step-Audio's chunking)."""
        counts = chunk_row_counts(wav.numel(), self.cfg)
        total = sum(counts)
        if total == 0:
            return wav.new_zeros(0, self.cfg.feature_dim), counts
        frames = paraformer_fbank(wav, self.cfg)
        rows = lfr_stack(frames, total, self.cfg)
        return apply_cmvn(rows, self.shift.to(rows.device), self.scale.to(rows.device)), counts

    def stream(self) -> "FeatureStream":
        return FeatureStream(self)


class FeatureStream:
    """Live version of `ParaformerFeatures.offline`: audio in any pieces; rows come out per
    240 ms call exactly as the whole-file path would produce them."""

    def __init__(self, features: ParaformerFeatures):
        self.features = features
        self.cfg = features.cfg
        self.chunker = OnlineChunker(self.cfg)
        self.samples = torch.zeros(0)      # not yet handed to a front-end call
        self.carry = torch.zeros(0)        # samples of the incomplete frame after the last call
        self.pending = None                # fbank frames not yet consumed by LFR rows
        self.finished = False

    def _call(self, chunk: torch.Tensor, final: bool) -> torch.Tensor | None:
        cfg = self.cfg
        new, rows, consumed = self.chunker.step(chunk.numel(), final)
        audio = torch.cat([self.carry.to(chunk.device), chunk])
        frames = paraformer_fbank(audio[: (new - 1) * cfg.shift_samples + cfg.frame_samples], cfg) if new else None
        self.carry = audio[new * cfg.shift_samples:]
        if frames is not None:
            if self.pending is None:
                self.pending = frames[:1].expand((cfg.lfr_m - 1) // 2, -1)
            self.pending = torch.cat([self.pending, frames])
        if not rows:
            return None
        out = lfr_stack(self.pending, rows, cfg, left_pad=False)
        self.pending = self.pending[consumed:]
        return apply_cmvn(out, self.features.shift.to(out.device), self.features.scale.to(out.device))

    def push(self, wav16k: torch.Tensor) -> list[torch.Tensor]:
        """Feed 16 kHz samples; returns the row blocks of every completed 240 ms call."""
        self.samples = torch.cat([self.samples.to(wav16k.device), wav16k.float()])
        blocks = []
        size = self.cfg.chunk_samples
        while self.samples.numel() >= size:
            chunk, self.samples = self.samples[:size], self.samples[size:]
            rows = self._call(chunk, final=False)
            if rows is not None:
                blocks.append(rows)
        return blocks

    def finish(self) -> list[torch.Tensor]:
        """End of audio: the remaining (< 240 ms) samples form the final call, if any."""
        self.finished = True
        if self.samples.numel() == 0:
            return []
        rows = self._call(self.samples, final=True)
        self.samples = self.samples[:0]
        return [rows] if rows is not None else []
