"""Real speech for tests and benchmarks: espeak-ng synthesises it (22.05 kHz mono 16-bit), sox
resamples it when another rate is asked for."""
from __future__ import annotations

import os
import subprocess

import numpy as np

from stepvox.engine.frontend.wav import read_wav


def espeak_wav(path: str, text: str, rate: int | None = None) -> tuple[np.ndarray, int]:
    """Write `text` spoken by espeak-ng to the WAV file `path` (at `rate` Hz when given) and return
    its samples (float32 mono in [-1, 1]) and rate."""
    raw = path if rate is None else path + ".raw.wav"
    subprocess.run(["espeak-ng", "-w", raw, text], check=True, capture_output=True)
    if rate is not None:
        subprocess.run(["sox", raw, "-r", str(rate), path], check=True, capture_output=True)
        os.remove(raw)
    samples, sample_rate = read_wav(path)
    return samples.mean(axis=0), sample_rate
