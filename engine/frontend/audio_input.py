"""The one policy for audio handed to stepvox (tokenizers, speaker prompts, WAV files alike).

- dtype: float16 / bfloat16 / float32 / float64 samples in [-1, 1]; int16 is divided by 2**15 and
  int32 by 2**31; every other dtype (uint8, int8, int64, bool, complex) is refused.
- shape: (samples,) or (channels, samples) with at most 8 channels; channels are averaged, as
  Step-Audio's `load_audio` does. A (samples, channels) array is refused rather than guessed.
- values: NaN/Inf are refused; float audio whose peak exceeds 2.0 is refused (it looks like integer
  samples stored as float). Clipped audio is used as it is: clipping is not repaired.
- rate: an integer number of Hz in [16000, 192000]. Lower rates (8 kHz telephony, ...) are refused,
  as the official path refuses them: both tokenizers need wide-band 16 kHz audio, and upsampled
  narrow-band audio is outside what they saw.
- empty audio is refused; what is too short for a use is refused where it is used.
Every refusal is an AudioInputError that names the problem.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import AudioInputError

MIN_SAMPLE_RATE = 16000
MAX_SAMPLE_RATE = 192000
MAX_CHANNELS = 8
MAX_FLOAT_PEAK = 2.0

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_SCALES = {torch.int16: 2.0 ** 15, torch.int32: 2.0 ** 31}


def check_sample_rate(sample_rate) -> int:
    """The rate as an int; AudioInputError unless it is a whole number of Hz in the accepted range."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)):
        if isinstance(sample_rate, float) and sample_rate.is_integer():
            sample_rate = int(sample_rate)
        else:
            raise AudioInputError(f"sample rate must be an integer number of Hz, got {sample_rate!r}")
    sample_rate = int(sample_rate)
    if sample_rate < MIN_SAMPLE_RATE:
        raise AudioInputError(
            f"sample rate {sample_rate} Hz is below {MIN_SAMPLE_RATE} Hz: the tokenizers need wide-band 16 kHz "
            "audio and stepvox does not upsample (the official code refuses this too); resample it yourself "
            "if you accept the quality loss")
    if sample_rate > MAX_SAMPLE_RATE:
        raise AudioInputError(f"sample rate {sample_rate} Hz is above the supported {MAX_SAMPLE_RATE} Hz")
    return sample_rate


def to_mono_float(wav) -> torch.Tensor:
    """Check one waveform (numpy array or tensor; see the module doc) and return it as a 1-D float32
    tensor on its device."""
    if isinstance(wav, np.ndarray):
        if wav.dtype.kind not in "fi" or wav.dtype.itemsize > 8:
            raise AudioInputError(f"unsupported audio dtype {wav.dtype}: use float in [-1, 1], int16 or int32 samples")
        wav = torch.from_numpy(np.ascontiguousarray(wav))
    elif not isinstance(wav, torch.Tensor):
        raise AudioInputError(f"audio must be a torch.Tensor or numpy array, got {type(wav).__name__}")
    if wav.dtype in _INT_SCALES:
        wav = wav.to(torch.float32) / _INT_SCALES[wav.dtype]
    elif wav.dtype in _FLOAT_DTYPES:
        wav = wav.to(torch.float32)
    else:
        raise AudioInputError(f"unsupported audio dtype {wav.dtype}: use float in [-1, 1], int16 or int32 samples")
    if wav.dim() == 2:
        if wav.shape[0] > MAX_CHANNELS:
            raise AudioInputError(
                f"2-D audio must be (channels, samples) with at most {MAX_CHANNELS} channels, got shape "
                f"{tuple(wav.shape)}; transpose a (samples, channels) array first")
        wav = wav.mean(dim=0)
    elif wav.dim() != 1:
        raise AudioInputError(f"audio must be 1-D (samples,) or 2-D (channels, samples), got shape {tuple(wav.shape)}")
    if wav.numel() == 0:
        raise AudioInputError("audio is empty")
    if not bool(torch.isfinite(wav).all()):
        raise AudioInputError("audio contains NaN or Inf samples")
    peak = float(wav.abs().max())
    if peak > MAX_FLOAT_PEAK:
        raise AudioInputError(f"float audio peaks at {peak:g}; samples must lie in [-1, 1] (integer-scaled samples "
                              "should be passed with an integer dtype)")
    return wav


def checked_audio(wav, sample_rate) -> tuple[torch.Tensor, int]:
    """(1-D float32 samples, rate) of one waveform and its rate, both checked."""
    return to_mono_float(wav), check_sample_rate(sample_rate)
