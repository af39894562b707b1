"""Tempo change without a pitch change (Rubber Band through pedalboard), offline and on a stream,
and output volume with the peaks kept inside [-1, 1].

A stream is stretched piece by piece: each piece is processed with the last `context` input samples
of the one before in front of it (so the stretcher sees continuous audio), the output that belongs
to that context is dropped, and `fade` samples around each joint are crossfaded with the withheld
end of the previous piece.
"""
from __future__ import annotations

import numpy as np
import pedalboard

from .. import checks
from ..errors import InvalidRequestError

MIN_SPEED, MAX_SPEED = 0.5, 2.0
MAX_VOLUME = 4.0


def check_speed(factor: float) -> float:
    return checks.real(factor, "speed_factor", InvalidRequestError, MIN_SPEED, MAX_SPEED)


def check_volume(volume: float) -> float:
    return checks.real(volume, "volume", InvalidRequestError, 0.0, MAX_VOLUME)


def change_tempo(samples: np.ndarray, sample_rate: int, factor: float) -> np.ndarray:
    """`samples` played `factor` times as fast (length / factor), same pitch."""
    if factor == 1.0 or samples.size == 0:
        return samples
    x = np.ascontiguousarray(samples, dtype=np.float32).reshape(1, -1)
    return pedalboard.time_stretch(x, float(sample_rate), stretch_factor=float(factor))[0]


def apply_volume(samples: np.ndarray, volume: float) -> np.ndarray:
    """Scale by `volume`; where that would clip, scale so the peak stays at 0.99 instead."""
    if volume == 1.0 or samples.size == 0:
        return samples
    y = samples * volume
    peak = float(np.abs(y).max())
    return y * (0.99 / peak) if peak > 0.99 else y


class TempoStream:
    def __init__(self, sample_rate: int, factor: float, context: int = 4096, fade: int = 256):
        self.sample_rate, self.factor = sample_rate, factor
        self.context, self.fade = context, fade
        self.in_tail = np.zeros(0, np.float32)
        self.out_tail = np.zeros(0, np.float32)

    def push(self, samples: np.ndarray) -> np.ndarray:
        if self.factor == 1.0:
            return samples
        if samples.size == 0:
            return samples
        inp = np.concatenate([self.in_tail, samples.astype(np.float32)])
        y = change_tempo(inp, self.sample_rate, self.factor)
        skip = min(int(round(self.in_tail.size / self.factor)), y.size)
        head = y[skip:]
        if self.out_tail.size:
            n = min(self.out_tail.size, skip)
            ramp = np.linspace(0.0, 1.0, n, dtype=np.float32) if n else np.zeros(0, np.float32)
            joint = self.out_tail[:self.out_tail.size - n]
            blend = self.out_tail[self.out_tail.size - n:] * (1 - ramp) + y[skip - n:skip] * ramp
            head = np.concatenate([joint, blend, head])
        self.in_tail = inp[-self.context:]
        keep = min(self.fade, head.size)
        self.out_tail = head[head.size - keep:]
        return head[:head.size - keep]

    def finish(self) -> np.ndarray:
        out, self.out_tail = self.out_tail, np.zeros(0, np.float32)
        return out
