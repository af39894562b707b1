"""Flow and HiFT against the independent eager implementation of SPEC §3.5, given the same noise."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import fixtures_cosyvoice_reference as ref
from fixtures_cosyvoice import TINY_SIZES, reference_kernels, tiny_decoder, tiny_dir  # noqa: F401 - fixtures
from stepvox.engine.cosyvoice_config import EstimatorConfig
from stepvox.engine.models.flow_encoder import relative_to_absolute
from stepvox.engine.models import flow_estimator
from stepvox.engine.models.flow_estimator import ConditionalDecoder
from stepvox.engine.speech_decoder import SpeakerPrompt, SpeechDecoder
from stepvox.kernels.backend import INTERPRETER_ACTIVE, use_backend

MEL_PER_TOKEN = 22050 / 256 / 41.667


@pytest.fixture(scope="module")
def state_dicts(tiny_dir):
    return (ref.fold(torch.load(os.path.join(tiny_dir, "flow.pt"))),
            ref.fold(torch.load(os.path.join(tiny_dir, "hift.pt"))))


def _case(seed, n_tokens=30, n_prompt=12, prompt_frames=25):
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, 5120, (n_tokens,), generator=g)
    ptoks = torch.randint(0, 5120, (n_prompt,), generator=g)
    pmel = torch.randn(prompt_frames, 80, generator=g) - 4
    emb = torch.randn(192, generator=g)
    z = torch.randn(80, prompt_frames + int(n_tokens * MEL_PER_TOKEN) + 3, generator=g)
    return toks, ptoks, pmel, emb, z


@pytest.mark.usefixtures("reference_kernels")
@pytest.mark.parametrize("with_prompt", [True, False])
def test_flow_mel_matches_reference(tiny_decoder, state_dicts, with_prompt):
    toks, ptoks, pmel, emb, z = _case(0)
    if not with_prompt:
        ptoks, pmel, emb = ptoks[:0], pmel[:0], torch.zeros(192)
    prompt = SpeakerPrompt(pmel, emb, ptoks) if with_prompt else None
    mine = tiny_decoder.token2mel(toks, prompt=prompt, noise=z)
    expect = ref.flow_mel(state_dicts[0], TINY_SIZES, toks, ptoks, pmel, emb, z[:, :pmel.shape[0] + 62])
    assert mine.shape == expect.shape == (80, int(30 / 41.667 * 22050 / 256))
    torch.testing.assert_close(mine, expect, atol=2e-5, rtol=1e-5)


@pytest.mark.usefixtures("reference_kernels")
def test_hift_matches_reference(tiny_decoder, state_dicts):
    g = torch.Generator().manual_seed(1)
    mel = torch.randn(80, 40, generator=g) - 3
    phase = (torch.rand(9, generator=g) * 2 - 1) * torch.pi
    noise = torch.randn(9, 40 * 256, generator=g)
    hift = tiny_decoder.hift
    expect = ref.hift_wav(state_dicts[1], mel, phase, noise)
    wav = tiny_decoder.mel2wav(mel, source_noise=noise, start_phase=phase)
    assert wav.shape == (40 * 256,)
    torch.testing.assert_close(wav, expect, atol=2e-5, rtol=1e-4)
    assert expect.abs().max() > 1e-3                  # not a trivially silent output
    try:                                              # optional float64 phase sum: same math, finer rounding
        hift.phase_dtype = torch.float64
        wav64 = tiny_decoder.mel2wav(mel, source_noise=noise, start_phase=phase)
    finally:
        hift.phase_dtype = torch.float32
    torch.testing.assert_close(wav64, expect, atol=2e-4, rtol=0)
    torch.testing.assert_close(ref.hift_wav(state_dicts[1], mel, phase, noise, torch.float64), wav64,
                               atol=2e-5, rtol=1e-4)


@pytest.mark.usefixtures("reference_kernels")
def test_token2wav_is_flow_then_hift_and_seeded(tiny_decoder):
    toks, ptoks, pmel, emb, z = _case(2, n_tokens=25)
    prompt = SpeakerPrompt(pmel, emb, ptoks)
    wav = tiny_decoder.token2wav(toks, prompt=prompt, noise=z, seed=5)
    mel = tiny_decoder.token2mel(toks, prompt=prompt, noise=z)
    assert wav.shape == (mel.shape[1] * 256,)
    torch.testing.assert_close(wav, tiny_decoder.mel2wav(mel, seed=5))
    again = tiny_decoder.token2wav(toks, prompt=prompt, seed=9)
    torch.testing.assert_close(again, tiny_decoder.token2wav(toks, prompt=prompt, seed=9), atol=0, rtol=0)
    other = tiny_decoder.token2wav(toks, prompt=prompt, seed=10)
    assert not torch.allclose(again, other)


@pytest.mark.usefixtures("reference_kernels")
def test_batch_with_padding_equals_single_requests(tiny_decoder):
    cases = [_case(3, n_tokens=20), _case(4, n_tokens=33, n_prompt=5, prompt_frames=12), _case(5, n_tokens=27)]
    prompts = [SpeakerPrompt(p, e, pt) for _, pt, p, e, _ in cases]
    toks = [c[0] for c in cases]
    noises = [c[4] for c in cases]
    batch = tiny_decoder.token2wav_batch(toks, prompts, seeds=[1, 2, 3], noises=noises)
    for i in range(3):
        single = tiny_decoder.token2wav(toks[i], prompt=prompts[i], noise=noises[i], seed=i + 1)
        torch.testing.assert_close(batch[i], single, atol=1e-5, rtol=1e-4)


@pytest.mark.usefixtures("reference_kernels")
def test_bucket_padded_solve_equals_unpadded(tiny_decoder):
    """The inputs a CUDA graph sees (length rounded up to the bucket, masked) give the same mel."""
    toks, ptoks, pmel, emb, z = _case(7, n_tokens=23)
    prompt = SpeakerPrompt(pmel, emb, ptoks)
    plain = tiny_decoder.token2mel(toks, prompt=prompt, noise=z)
    solver = tiny_decoder.solver
    assert (pmel.shape[0] + plain.shape[1]) % solver.bucket != 0       # really padded
    solver.pad_to_bucket = True
    try:
        padded = tiny_decoder.token2mel(toks, prompt=prompt, noise=z)
    finally:
        solver.pad_to_bucket = False
    torch.testing.assert_close(padded, plain, atol=2e-5, rtol=1e-5)


def test_rel_shift_equivalence():
    x = torch.randn(2, 3, 7, 13)
    torch.testing.assert_close(relative_to_absolute(x), ref.rel_shift(x), atol=0, rtol=0)


def _micro_estimator():
    torch.manual_seed(0)
    cfg = EstimatorConfig(in_channels=32, out_channels=8, channels=(16, 16), attention_head_dim=4, n_blocks=2,
                          num_mid_blocks=1, num_heads=2)
    est = ConditionalDecoder(cfg).eval()
    with torch.no_grad():
        for p in est.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return est


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("length", [21, 24])
def test_estimator_padding_is_invisible(length, fused):
    """A request padded to a length bucket gives its unpadded velocity on the valid frames."""
    est = _micro_estimator()
    x = torch.randn(2, 32, length)
    proj = est.time_projections(torch.tensor([0.3]))
    full = torch.ones(2, 1, length)
    with use_backend("reference"), torch.no_grad():
        plain = est(x, full, proj, padded=False, fused=False)
        padded_x = torch.cat([x, torch.randn(2, 32, 11) * 50], dim=2)
        mask = torch.cat([full, torch.zeros(2, 1, 11)], dim=2)
        padded = est(padded_x, mask, proj, padded=True, fused=fused)
    torch.testing.assert_close(padded[..., :length], plain, atol=1e-5, rtol=1e-5)
    assert not padded[..., length:].any()


@pytest.mark.skipif(not INTERPRETER_ACTIVE, reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("fused", [True, "elementwise", "rows+library_ff", "rows+sdpa+separate_res"])
@pytest.mark.parametrize("padded", [True, False])
def test_fused_estimator_matches_unfused_under_interpreter(fused, padded, monkeypatch):
    if fused == "rows+library_ff":           # the long-sequence variant of the feed-forward input
        monkeypatch.setattr(flow_estimator, "FF_IN_UNFUSED_ROWS", 0)
        fused = True
    if fused == "rows+sdpa+separate_res":    # the comparison variants bench/vocoder.py times
        monkeypatch.setattr(flow_estimator, "ATTENTION", "sdpa")
        monkeypatch.setattr(flow_estimator, "MERGE_RES_CONV", False)
        fused = True
    est = _micro_estimator()
    x = torch.randn(2, 32, 20)
    mask = torch.ones(2, 1, 20)
    if padded:
        mask[1, :, 14:] = 0
        x[1, :, 14:] = 30 * torch.randn(32, 6)          # garbage on padded frames must stay invisible
    proj = est.time_projections(torch.tensor([0.7]))
    with torch.no_grad():
        with use_backend("reference"):
            unfused = est(x, mask, proj, padded=padded, fused=False)
        with use_backend("triton"):
            out = est(x, mask, proj, padded=padded, fused=fused)
    torch.testing.assert_close(out, unfused, atol=1e-5, rtol=1e-4)
    assert unfused.abs().max() > 1e-2


@pytest.mark.usefixtures("reference_kernels")
def test_bf16_flow_tracks_fp32(tiny_dir, tiny_decoder):
    dec16 = SpeechDecoder.from_pretrained(tiny_dir, device="cpu", flow_dtype=torch.bfloat16)
    assert dec16.flow.dtype == torch.bfloat16 and dec16.hift.conv_pre.weight.dtype == torch.float32
    toks, ptoks, pmel, emb, z = _case(6, n_tokens=20)
    prompt = SpeakerPrompt(pmel, emb, ptoks)
    a = tiny_decoder.token2mel(toks, prompt=prompt, noise=z)
    b = dec16.token2mel(toks, prompt=prompt, noise=z)
    assert b.dtype == torch.float32
    rel = (a - b).norm() / a.norm()
    assert rel < 0.05, rel


@pytest.mark.usefixtures("reference_kernels")
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
    from stepvox.kernels.snake import snake, snake_reference
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 5, 300, generator=g) * 3
    a = torch.rand(5, generator=g) + 0.2
    m = torch.ones(2, 1, 300)
    m[1, :, 170:] = 0
    with use_backend("triton"):
        out = snake(x, a, m)
    torch.testing.assert_close(out, snake_reference(x, a, m), atol=2e-6, rtol=1e-6)
    assert not out[1, :, 170:].any() and out[1, :, :170].abs().min() >= 0


def test_interpolation_table_matches_f_interpolate():
    from stepvox.engine.models.flow import linear_interp_table
    g = torch.Generator().manual_seed(13)
    for n_in, n_out in [(12, 25), (30, 62), (7, 7), (40, 13), (1, 9), (125, 258)]:
        x = torch.randn(3, 5, n_in, generator=g)
        i0, i1, w0, w1 = (torch.from_numpy(a) for a in linear_interp_table(n_in, n_out))
        got = w0 * x[..., i0] + w1 * x[..., i1]
        torch.testing.assert_close(got, F.interpolate(x, size=n_out, mode="linear"), atol=1e-6, rtol=1e-6)


@pytest.mark.usefixtures("reference_kernels")
def test_bucketed_pre_solve_equals_eager_encode(tiny_decoder):
    """The inputs the pre-solve CUDA graph sees: a batch of requests (different token counts, one
    with a mu prefix, one without prompt) padded to token / frame buckets gives each request's
    eager mu and spks."""
    from stepvox.engine.models.flow import FlowRequest
    flow, prep = tiny_decoder.flow, tiny_decoder.flow_prep
    reqs = []
    for seed, n_tok, n_prompt, frames, prefix in [(20, 23, 12, 25, 0), (21, 31, 0, 0, 0), (22, 17, 5, 11, 14)]:
        toks, ptoks, pmel, emb, z = _case(seed, n_tokens=n_tok, n_prompt=n_prompt, prompt_frames=frames)
        mel_len = int(n_tok * MEL_PER_TOKEN)
        pre = torch.randn(80, prefix) if prefix else None
        reqs.append(FlowRequest(toks, ptoks[:n_prompt], pmel[:frames], emb, mel_len, z, pre))
    eager = flow.encode(reqs)
    spks = flow.speaker_condition(torch.stack([r.speaker for r in reqs]))
    bucket = 96
    mu, spks_b, mask = prep.run(reqs, bucket, graphs=False)
    assert mu.shape == (3, 80, bucket) and mask.shape == (3, 1, bucket)
    for i, r in enumerate(reqs):
        n = r.total_frames
        torch.testing.assert_close(mu[i, :, :n], eager[i], atol=2e-5, rtol=1e-5)
        assert not mu[i, :, n:].any() and mask[i, 0, :n].all() and not mask[i, 0, n:].any()
    torch.testing.assert_close(spks_b, spks, atol=1e-6, rtol=1e-6)
