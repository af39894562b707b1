"""Step-Audio's waveform preparation before both tokenizers (SPEC.md §4.5, the official
`preprocess_wav`): audio checks, mono mix, resampling to 16 kHz, peak ("energy") normalisation and
the optional silence trim."""
from __future__ import annotations

import math

import numpy as np
import torch

from ..device.staging import to_device
from ..errors import AudioInputError
from .audio_input import checked_audio
from .resample import resample

TOKENIZER_SAMPLE_RATE = 16000


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
    wav, sample_rate = checked_audio(wav, sample_rate)
    if device is not None:
        wav = to_device(wav, device)
    wav = resample(wav, sample_rate, TOKENIZER_SAMPLE_RATE)
    if energy_norm:
        wav = energy_normalize(wav)
    if trim:
        wav = trim_silence(wav)
    return wav


def prepare_batch(wavs, sample_rates, *, energy_norm: bool = True, trim: bool = False,
                  device=None) -> list[torch.Tensor]:
    """prepare_waveform of each wav; `sample_rates` is one rate or one per wav. Errors name the
    audio's index in the batch."""
    if isinstance(sample_rates, (int, float, np.integer)):
        sample_rates = [sample_rates] * len(wavs)
    if len(sample_rates) != len(wavs):
        raise AudioInputError(f"{len(wavs)} waveforms but {len(sample_rates)} sample rates")
    prepared = []
    for i, (wav, rate) in enumerate(zip(wavs, sample_rates)):
        try:
            prepared.append(prepare_waveform(wav, rate, energy_norm=energy_norm, trim=trim, device=device))
        except AudioInputError as exc:
            raise type(exc)(f"audio #{i}: {exc}") from exc
    return prepared
