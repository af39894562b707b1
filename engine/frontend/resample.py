"""Band-limited resampling, offline and streaming, at a bounded cost whatever the rate ratio.

Where its filter bank is small, torchaudio's windowed-sinc resampler with its defaults (Hann
window, lowpass width 6, rolloff 0.99): what the official pre-processing calls for its 16 kHz
(tokenizers, speaker embedding) and 22.05 kHz (prompt mel) copies. That filter bank has
new' * (2 * width + orig') taps (rates divided by their gcd), so a ratio such as 44101:16000
needs ~7e8 taps (gigabytes). Past `max_filter_taps` (default 2**20, 4 MB of float32) the audio
goes through libsoxr's polyphase resampler (python-soxr, "VHQ"), whose memory does not depend on
the ratio. Both paths give ceil(n * new / orig) samples, streamed or not.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import soxr
import torch
import torchaudio

from ..errors import AudioInputError, StreamClosedError

MAX_FILTER_TAPS = 2 ** 20
SOXR_QUALITY = "VHQ"
LOWPASS_FILTER_WIDTH = 6      # torchaudio.transforms.Resample defaults
ROLLOFF = 0.99


def sinc_filter_taps(orig_rate: int, new_rate: int) -> int:
    """Taps of torchaudio's windowed-sinc filter bank for this ratio (its own formula)."""
    g = math.gcd(orig_rate, new_rate)
    orig, new = orig_rate // g, new_rate // g
    width = math.ceil(LOWPASS_FILTER_WIDTH * orig / (min(orig, new) * ROLLOFF))
    return new * (2 * width + orig)


def output_length(num_samples: int, orig_rate: int, new_rate: int) -> int:
    return -(-num_samples * new_rate // orig_rate)


def _check_rates(orig_rate, new_rate, max_filter_taps) -> tuple[int, int]:
    orig_rate, new_rate = int(orig_rate), int(new_rate)
    if orig_rate < 1 or new_rate < 1:
        raise AudioInputError(f"cannot resample from {orig_rate} Hz to {new_rate} Hz: rates must be >= 1 Hz")
    if isinstance(max_filter_taps, bool) or not isinstance(max_filter_taps, int) or max_filter_taps < 0:
        raise AudioInputError(f"max_filter_taps must be an integer >= 0, got {max_filter_taps!r}")
    return orig_rate, new_rate


def _use_sinc(orig_rate: int, new_rate: int, max_filter_taps: int) -> bool:
    return sinc_filter_taps(orig_rate, new_rate) <= max_filter_taps


@functools.lru_cache(maxsize=32)   # at most 32 * max_filter_taps floats with the default bound: 128 MB
def _resampler(orig: int, new: int, device: str = "cpu") -> torchaudio.transforms.Resample:
    # torchaudio.transforms.Resample builds its kernel in float64 and rounds it once (functional.resample
    # builds it in the waveform's dtype, which differs by ~1e-6); the official code uses the module
    return torchaudio.transforms.Resample(orig_freq=orig, new_freq=new).to(device)


def _tail_zeros(orig_rate: int, new_rate: int) -> int:
    # soxr rounds its output length; enough trailing zeros make it reach ceil(n * new / orig), and
    # the last samples are then the filter's true response to the signal's end (as the sinc path)
    return -(-orig_rate // new_rate) + 1


def _soxr_offline(wav: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    rows = wav.detach().float().reshape(-1, wav.shape[-1]).cpu().numpy()
    rows = np.concatenate([rows, np.zeros((rows.shape[0], _tail_zeros(orig_rate, new_rate)), np.float32)], axis=1)
    out = soxr.resample(np.ascontiguousarray(rows.T), orig_rate, new_rate, quality=SOXR_QUALITY)
    out = out.reshape(-1, rows.shape[0]).T[:, :output_length(wav.shape[-1], orig_rate, new_rate)]
    return torch.from_numpy(np.ascontiguousarray(out)).reshape(*wav.shape[:-1], -1).to(wav.device)


def resample(wav: torch.Tensor, orig_rate: int, new_rate: int, max_filter_taps: int = MAX_FILTER_TAPS) -> torch.Tensor:
    """[..., N] float audio from `orig_rate` to `new_rate` Hz -> [..., ceil(N * new / orig)]
    (identity when they match): torchaudio's sinc filter when it has at most `max_filter_taps`
    taps, libsoxr otherwise."""
    orig_rate, new_rate = _check_rates(orig_rate, new_rate, max_filter_taps)
    if orig_rate == new_rate:
        return wav
    if _use_sinc(orig_rate, new_rate, max_filter_taps):
        return _resampler(orig_rate, new_rate, str(wav.device))(wav.float())
    return _soxr_offline(wav, orig_rate, new_rate)


class _SincStream:
    """torchaudio's resampler fed piece by piece.

    The offline resampler is a strided conv1d of the signal, zero-padded by `width` on the left and
    `width + orig` on the right, with one kernel row per output phase. Block b of `orig` input
    samples gives `new` outputs and reads padded samples [b*orig, b*orig + 2*width + orig). Here a
    block is computed as soon as all its samples have arrived, so the concatenated outputs equal
    the offline resampling of the whole signal (up to float summation order).
    """

    def __init__(self, orig_rate: int, new_rate: int, device):
        module = _resampler(orig_rate, new_rate, str(torch.device(device)))
        self.orig = module.orig_freq // module.gcd
        self.new = module.new_freq // module.gcd
        self.width = module.width
        self.kernel = module.kernel          # [new, 1, 2*width + orig]
        self.span = self.kernel.shape[-1]
        self.pending = torch.zeros(self.width, device=device)   # left zero padding
        self.next_block = 0                                      # first block not yet computed
        self.pending_start = 0                                   # padded index of pending[0]

    def _run_blocks(self, stop_block: int) -> torch.Tensor:
        if stop_block <= self.next_block:
            return self.pending.new_zeros(0)
        lo = self.next_block * self.orig - self.pending_start
        hi = (stop_block - 1) * self.orig + self.span - self.pending_start
        segment = self.pending[lo:hi]
        out = torch.nn.functional.conv1d(segment[None, None], self.kernel, stride=self.orig)
        self.next_block = stop_block
        drop = self.next_block * self.orig - self.pending_start
        self.pending = self.pending[drop:]
        self.pending_start += drop
        return out[0].transpose(0, 1).reshape(-1)

    def push(self, wav: torch.Tensor) -> torch.Tensor:
        self.pending = torch.cat([self.pending, wav.to(self.pending.device)])
        padded_len = self.pending_start + self.pending.numel()
        ready = (padded_len - self.span) // self.orig + 1 if padded_len >= self.span else 0
        return self._run_blocks(ready)

    def finish(self, received: int) -> torch.Tensor:
        self.pending = torch.cat([self.pending, self.pending.new_zeros(self.width + self.orig)])
        return self._run_blocks(received // self.orig + 1)


class _SoxrStream:
    """libsoxr's streaming resampler: the same samples as `_soxr_offline` of the whole signal."""

    def __init__(self, orig_rate: int, new_rate: int, device):
        self.device = torch.device(device)
        self.tail = _tail_zeros(orig_rate, new_rate)
        self.stream = soxr.ResampleStream(orig_rate, new_rate, 1, dtype="float32", quality=SOXR_QUALITY)

    def push(self, wav: torch.Tensor) -> torch.Tensor:
        out = self.stream.resample_chunk(np.ascontiguousarray(wav.detach().float().cpu().numpy()))
        return torch.from_numpy(out).to(self.device)

    def finish(self, received: int) -> torch.Tensor:
        out = self.stream.resample_chunk(np.zeros(self.tail, np.float32), last=True)
        return torch.from_numpy(out).to(self.device)


class StreamingResampler:
    """`resample` fed piece by piece: push(piece) returns the samples that are final, finish()
    the rest; concatenated they are the offline result (length ceil(n * new / orig)). Same
    choice of filter as `resample` for the same `max_filter_taps`."""

    def __init__(self, orig_rate: int, new_rate: int, device="cpu", max_filter_taps: int = MAX_FILTER_TAPS):
        orig_rate, new_rate = _check_rates(orig_rate, new_rate, max_filter_taps)
        self.orig_rate, self.new_rate = orig_rate, new_rate
        self.passthrough = orig_rate == new_rate
        self.received = 0
        self.emitted = 0
        self.finished = False
        if self.passthrough:
            self.impl = None
        elif _use_sinc(orig_rate, new_rate, max_filter_taps):
            self.impl = _SincStream(orig_rate, new_rate, device)
        else:
            self.impl = _SoxrStream(orig_rate, new_rate, device)

    def push(self, wav: torch.Tensor) -> torch.Tensor:
        if self.finished:
            raise StreamClosedError("the resampler was already finished")
        self.received += wav.numel()
        if self.passthrough:
            self.emitted += wav.numel()
            return wav
        out = self.impl.push(wav.reshape(-1))
        self.emitted += out.numel()
        return out

    def finish(self) -> torch.Tensor:
        if self.finished:
            raise StreamClosedError("the resampler was already finished")
        self.finished = True
        if self.passthrough:
            return torch.zeros(0)
        # neither path emits past the final length before the flush; the flush is cut to it
        out = self.impl.finish(self.received)
        out = out[: max(0, output_length(self.received, self.orig_rate, self.new_rate) - self.emitted)]
        self.emitted += out.numel()
        return out
