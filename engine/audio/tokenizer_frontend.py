"""Waveform preparation shared by both tokenizers (SPEC.md §4.5): checks, mono mix, resampling to
16 kHz (offline and streaming), peak ("energy") normalisation and the optional silence trim.

What stepvox does with awkward input (the official code only asserts sr > 16 kHz):
- dtype: float16/bfloat16/float32/float64 are taken as samples in [-1, 1]; int16 is divided by
  2**15 and int32 by 2**31; any other dtype (uint8, int8, int64, bool, complex) is refused.
- shape: (samples,) or (channels, samples) with at most 8 channels; channels are averaged, as
  Step-Audio's `load_audio` does. A (samples, channels) array is refused rather than guessed.
- values: NaN/Inf are refused; float audio whose peak exceeds 2.0 is refused (it looks like
  integer samples stored as float). Clipped audio is tokenized as it is: clipping is not repaired.
- rate: must be an integer >= 16000 Hz; lower rates (8 kHz telephony, ...) are refused, as the
  official path does, because upsampled narrow-band audio is outside what the tokenizers saw.
- empty audio is refused; audio too short for one token group is refused by the tokenizer.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torchaudio

from ..device_copy import to_device
from .tokenizer_errors import AudioInputError

TOKENIZER_SAMPLE_RATE = 16000
MAX_CHANNELS = 8
MAX_FLOAT_PEAK = 2.0

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_SCALES = {torch.int16: 2.0 ** 15, torch.int32: 2.0 ** 31}


def check_sample_rate(sample_rate) -> int:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)):
        if isinstance(sample_rate, float) and sample_rate.is_integer():
            sample_rate = int(sample_rate)
        else:
            raise AudioInputError(f"sample_rate must be an integer number of Hz, got {sample_rate!r}")
    sample_rate = int(sample_rate)
    if sample_rate < TOKENIZER_SAMPLE_RATE:
        raise AudioInputError(
            f"sample rate {sample_rate} Hz is below {TOKENIZER_SAMPLE_RATE} Hz: the tokenizers need "
            "wide-band 16 kHz audio and stepvox does not upsample (the official code refuses this too); "
            "resample it yourself if you accept the quality loss")
    return sample_rate


def to_mono_float(wav, sample_rate) -> tuple[torch.Tensor, int]:
    """Validate one waveform; return it as a 1-D float32 tensor (same device) and its rate."""
    sample_rate = check_sample_rate(sample_rate)
    if isinstance(wav, np.ndarray):
        if wav.dtype.kind not in "fi" or wav.dtype.itemsize > 8:
            raise AudioInputError(f"unsupported audio dtype {wav.dtype}")
        wav = torch.from_numpy(np.ascontiguousarray(wav))
    elif not isinstance(wav, torch.Tensor):
        raise AudioInputError(f"audio must be a torch.Tensor or numpy array, got {type(wav).__name__}")
    if wav.dtype in _INT_SCALES:
        wav = wav.to(torch.float32) / _INT_SCALES[wav.dtype]
    elif wav.dtype in _FLOAT_DTYPES:
        wav = wav.to(torch.float32)
    else:
        raise AudioInputError(
            f"unsupported audio dtype {wav.dtype}: use float in [-1, 1], int16 or int32 samples")
    if wav.dim() == 2:
        channels, samples = wav.shape
        if channels > MAX_CHANNELS:
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
        raise AudioInputError(
            f"float audio peaks at {peak:g}; samples must lie in [-1, 1] (integer-scaled samples should "
            "be passed with an integer dtype)")
    return wav, sample_rate


@functools.lru_cache(maxsize=32)
def _resampler(orig: int, new: int, device: str = "cpu") -> torchaudio.transforms.Resample:
    # the official path uses torchaudio.transforms.Resample with its defaults (sinc_interp_hann,
    # lowpass_filter_width 6, rolloff 0.99). Its kernel is built in float64 and rounded once;
    # functional.resample builds it in the waveform's dtype, which differs by ~1e-6.
    return torchaudio.transforms.Resample(orig_freq=orig, new_freq=new).to(device)


def resample(wav: torch.Tensor, sample_rate: int, target: int = TOKENIZER_SAMPLE_RATE) -> torch.Tensor:
    """torchaudio's default windowed-sinc resampling, as the official `resample_audio` calls it."""
    if sample_rate == target:
        return wav
    return _resampler(sample_rate, target, str(wav.device))(wav)


class StreamingResampler:
    """torchaudio's windowed-sinc resampler fed piece by piece.

    The offline resampler is a strided conv1d of the signal, zero-padded by `width` on the left and
    `width + orig` on the right, with one kernel row per output phase. Block b of `orig` input
    samples gives `new` outputs and reads padded samples [b*orig, b*orig + 2*width + orig). Here a
    block is computed as soon as all its samples have arrived, so the concatenated outputs equal
    the offline resampling of the whole signal (up to float summation order).
    """

    def __init__(self, sample_rate: int, target: int = TOKENIZER_SAMPLE_RATE, device="cpu"):
        self.passthrough = sample_rate == target
        self.received = 0
        self.emitted = 0
        if self.passthrough:
            return
        module = _resampler(sample_rate, target, str(torch.device(device)))
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


def energy_normalize(wav: torch.Tensor) -> torch.Tensor:
    """Step-Audio's `energy_norm_fn`: scale the peak to 0.999, leaving near-silence (< 0.01) alone."""
    peak = torch.max(torch.abs(wav))
    return wav / torch.clamp(peak, min=0.01) * 0.999


def _nonsilent_span(wav: torch.Tensor, top_db: float, frame_length: int, hop_length: int) -> tuple[int, int]:
    # librosa 0.10 `effects.trim`: frame RMS with centred constant padding, dB relative to the
    # loudest frame (amin 1e-5 on the amplitude), frames above -top_db count as sound
    x = torch.nn.functional.pad(wav.float(), (frame_length // 2, frame_length // 2))
    frames = x.unfold(0, frame_length, hop_length)
    rms = frames.pow(2).mean(dim=-1).sqrt()
    power = rms.pow(2)
    db = 10.0 * torch.log10(torch.clamp(power, min=1e-10)) \
        - 10.0 * torch.log10(torch.clamp(power.max(), min=1e-10))
    loud = torch.nonzero(db > -top_db).flatten()
    if loud.numel() == 0:
        return 0, 0
    start = int(loud[0]) * hop_length
    end = min(wav.numel(), (int(loud[-1]) + 1) * hop_length)
    return start, end


def trim_silence(wav: torch.Tensor, sample_rate: int = TOKENIZER_SAMPLE_RATE, keep_left: float = 0.05,
                 keep_right: float = 0.22, hop_size: int = 240) -> torch.Tensor:
    """Step-Audio's `trim_silence`: cut to the loud span (top_db 20, 512/128 frames), keep 50 ms
    before it, and set the length to whole 240-sample hops plus 50 + 220 ms (zero-padding if short)."""
    start, end = _nonsilent_span(wav, top_db=20.0, frame_length=512, hop_length=128)
    num_hops = math.ceil((end - start) / hop_size)
    left = int(keep_left * sample_rate)
    out_len = int(num_hops * hop_size + (keep_left + keep_right) * sample_rate)
    begin = start - left
    out = wav[begin:] if begin > 0 else torch.nn.functional.pad(wav, (-begin, 0))
    if out_len < out.numel():
        return out[:out_len]
    return torch.nn.functional.pad(out, (0, out_len - out.numel()))


def prepare_waveform(wav, sample_rate, *, energy_norm: bool = True, trim: bool = False,
                     device=None) -> torch.Tensor:
    """The official pre-processing (`StepAudioTokenizer.preprocess_wav`): checks, mono, resample to
    16 kHz, optional peak normalisation, optional silence trim. Returns 1-D float32 at 16 kHz."""
    wav, sample_rate = to_mono_float(wav, sample_rate)
    if device is not None:
        wav = to_device(wav, device)
    wav = resample(wav, sample_rate)
    if energy_norm:
        wav = energy_normalize(wav)
    if trim:
        wav = trim_silence(wav)
    return wav
