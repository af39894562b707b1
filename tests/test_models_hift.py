"""HiFT vocoder (engine/models/hift.py) against the independent eager implementation of SPEC §3.5
step 7 (tests/reference_cosyvoice.py), given the same SineGen phases and noise; the length-bucketed
forward that its CUDA graphs replay; the masked Snake kernel."""
from __future__ import annotations

import os

import pytest
import torch

import reference_cosyvoice as ref
from stepvox.engine.audio.decoder import SpeechDecoder
from stepvox.engine.models.cosyvoice_checkpoint import load_weights
from stepvox.engine.models.hift import HiFTGenerator
from stepvox.kernels.backend import INTERPRETER_ACTIVE
from stepvox.kernels.snake import snake, snake_reference


@pytest.fixture(scope="module")
def hift_state_dict(cosyvoice_dir):
    return ref.fold(torch.load(os.path.join(cosyvoice_dir, "hift.pt")))


def test_hift_matches_reference(tiny_decoder, hift_state_dict, cosyvoice_dir, reference_kernels):
    g = torch.Generator().manual_seed(1)
    mel = torch.randn(80, 40, generator=g) - 3
    phase = (torch.rand(9, generator=g) * 2 - 1) * torch.pi
    noise = torch.randn(9, 40 * 256, generator=g)
    expect = ref.hift_wav(hift_state_dict, mel, phase, noise)
    wav = tiny_decoder.mel2wav(mel, source_noise=noise, start_phase=phase)
    assert wav.shape == (40 * 256,)
    torch.testing.assert_close(wav, expect, atol=2e-5, rtol=1e-4)
    assert expect.abs().max() > 1e-3                  # not a trivially silent output
    # optional float64 phase sum: same math, finer rounding. A decoder of its own around a HiFT built
    # with phase_dtype=float64 (the shared session decoder is left as it is)
    assert tiny_decoder.hift.phase_dtype == torch.float32
    with torch.device("meta"):
        hift64 = HiFTGenerator(tiny_decoder.config.hift, reference_kernels, phase_dtype=torch.float64)
    load_weights(hift64, os.path.join(cosyvoice_dir, "hift.pt"), "cpu", torch.float32).eval()
    dec64 = SpeechDecoder(tiny_decoder.config, tiny_decoder.flow, hift64, None, "cpu", cuda_graphs=False)
    wav64 = dec64.mel2wav(mel, source_noise=noise, start_phase=phase)
    assert hift64.phase_dtype == torch.float64 and tiny_decoder.hift.phase_dtype == torch.float32
    torch.testing.assert_close(wav64, expect, atol=2e-4, rtol=0)
    torch.testing.assert_close(ref.hift_wav(hift_state_dict, mel, phase, noise, torch.float64), wav64,
                               atol=2e-5, rtol=1e-4)


def test_hift_bucketed_batch_equals_unpadded_items(tiny_decoder):
    """The forward a HiFT CUDA graph replays: items of different lengths right-padded to one
    bucket give, on their valid samples, what each gives alone (the graphs themselves are GPU-only;
    bench/vocoder.py checks them against this path)."""
    hift = tiny_decoder.hift
    g = torch.Generator().manual_seed(11)
    lengths, bucket = (29, 40), 48
    h, spf = hift.harmonics, hift.samples_per_frame
    mels = [torch.randn(80, t, generator=g) - 3 for t in lengths]
    phases = [(torch.rand(h, generator=g) * 2 - 1) * torch.pi for _ in lengths]
    noises = [torch.randn(h, t * spf, generator=g) for t in lengths]
    offsets = [torch.rand(h, generator=g, dtype=torch.float64) for _ in lengths]
    anchors = [3 * spf, 0]
    mel = torch.zeros(2, 80, bucket)
    noise = torch.zeros(2, h, bucket * spf)
    for i, t in enumerate(lengths):
        mel[i, :, :t] = mels[i]
        mel[i, :, t:] = 7.0 * torch.randn(80, bucket - t, generator=g)        # garbage must not leak in
        noise[i, :, :t * spf] = noises[i]
    wav, _, cycles = hift(mel, torch.stack(phases), noise, torch.stack(offsets), torch.tensor(anchors),
                          frames=torch.tensor(lengths))
    assert wav.shape == (2, bucket * spf)
    for i, t in enumerate(lengths):
        alone, _, cyc = hift(mels[i][None], phases[i][None], noises[i][None], offsets[i][None],
                             torch.tensor([anchors[i]]))
        n = t * spf
        torch.testing.assert_close(wav[i, :n], alone[0], atol=2e-5, rtol=1e-4)
        circular = torch.remainder(cycles[i, :, :n].double() - cyc[0].double() + 0.5, 1.0) - 0.5
        assert circular.abs().max() < 1e-4
        assert alone.abs().max() > 1e-3
    # the unmasked forward on the same padded input does differ near the end (the masks matter)
    unmasked, _, _ = hift(mel, torch.stack(phases), noise, torch.stack(offsets), torch.tensor(anchors))
    assert not torch.allclose(unmasked[0, :lengths[0] * spf], wav[0, :lengths[0] * spf], atol=1e-4)


@pytest.mark.skipif(not INTERPRETER_ACTIVE, reason="needs TRITON_INTERPRET=1")
def test_masked_snake_kernel():
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 5, 300, generator=g) * 3
    a = torch.rand(5, generator=g) + 0.2
    m = torch.ones(2, 1, 300)
    m[1, :, 170:] = 0
    out = snake(x, a, m, backend="triton")
    torch.testing.assert_close(out, snake_reference(x, a, m), atol=2e-6, rtol=1e-6)
    assert not out[1, :, 170:].any() and out[1, :, :170].abs().min() >= 0
