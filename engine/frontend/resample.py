"""Band-limited resampling, offline and streaming: torchaudio's windowed-sinc resampler with its
defaults (Hann window, lowpass width 6, rolloff 0.99), which is what the official pre-processing
calls for its 16 kHz (tokenizers, speaker embedding) and 22.05 kHz (prompt mel) copies."""
from __future__ import annotations

import functools
import math

import torch
import torchaudio


@functools.lru_cache(maxsize=32)
def _resampler(orig: int, new: int, device: str = "cpu") -> torchaudio.transforms.Resample:
    # torchaudio.transforms.Resample builds its kernel in float64 and rounds it once (functional.resample
    # builds it in the waveform's dtype, which differs by ~1e-6); the official code uses the module
    return torchaudio.transforms.Resample(orig_freq=orig, new_freq=new).to(device)


def resample(wav: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """[..., N] float audio from `orig_rate` to `new_rate` Hz (identity when they match)."""
    orig_rate, new_rate = int(orig_rate), int(new_rate)
    if orig_rate == new_rate:
        return wav
    return _resampler(orig_rate, new_rate, str(wav.device))(wav.float())


class StreamingResampler:
    """The same resampler fed piece by piece.

    The offline resampler is a strided conv1d of the signal, zero-padded by `width` on the left and
    `width + orig` on the right, with one kernel row per output phase. Block b of `orig` input
    samples gives `new` outputs and reads padded samples [b*orig, b*orig + 2*width + orig). Here a
    block is computed as soon as all its samples have arrived, so the concatenated outputs equal
    the offline resampling of the whole signal (up to float summation order).
    """

    def __init__(self, orig_rate: int, new_rate: int, device="cpu"):
        self.passthrough = orig_rate == new_rate
        self.received = 0
        self.emitted = 0
        if self.passthrough:
            return
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
        self.received += wav.numel()
        if self.passthrough:
            self.emitted += wav.numel()
            return wav
        self.pending = torch.cat([self.pending, wav.to(self.pending.device)])
        padded_len = self.pending_start + self.pending.numel()
        ready = (padded_len - self.span) // self.orig + 1 if padded_len >= self.span else 0
        out = self._run_blocks(ready)
        self.emitted += out.numel()
        return out

    def finish(self) -> torch.Tensor:
        if self.passthrough:
            return torch.zeros(0)
        self.pending = torch.cat([self.pending, self.pending.new_zeros(self.width + self.orig)])
        total_blocks = self.received // self.orig + 1
        out = self._run_blocks(total_blocks)
        target = math.ceil(self.new * self.received / self.orig)
        out = out[: max(0, target - self.emitted)]
        self.emitted += out.numel()
        return out
