"""Flow model (engine/models/flow.py, flow_encoder.py, flow_estimator.py, flow_solver.py) against the
independent eager implementation of SPEC §3.5 (tests/reference_cosyvoice.py), given the same noise;
the estimator's fused channels-last path against its plain modules. HiFT: test_models_hift.py."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import reference_cosyvoice as ref
from stepvox.engine.audio.decoder import SpeakerPrompt, SpeechDecoder
from stepvox.engine.models.cosyvoice_config import EstimatorConfig
from stepvox.engine.models.flow import FlowRequest, linear_interp_table
from stepvox.engine.models.flow_encoder import relative_to_absolute
from stepvox.engine.models.flow_estimator import FF_IN_UNFUSED_ROWS, ConditionalDecoder
from stepvox.kernels import KernelConfig
from stepvox.kernels.backend import INTERPRETER_ACTIVE
from stepvox.testing.cosyvoice import TINY_SIZES

MEL_PER_TOKEN = 22050 / 256 / 41.667


@pytest.fixture(scope="module")
def flow_state_dict(cosyvoice_dir):
    return ref.fold(torch.load(os.path.join(cosyvoice_dir, "flow.pt")))


def _case(seed, n_tokens=30, n_prompt=12, prompt_frames=25):
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, 5120, (n_tokens,), generator=g)
    ptoks = torch.randint(0, 5120, (n_prompt,), generator=g)
    pmel = torch.randn(prompt_frames, 80, generator=g) - 4
    emb = torch.randn(192, generator=g)
    z = torch.randn(80, prompt_frames + int(n_tokens * MEL_PER_TOKEN) + 3, generator=g)
    return toks, ptoks, pmel, emb, z


@pytest.mark.parametrize("with_prompt", [True, False])
def test_flow_mel_matches_reference(tiny_decoder, flow_state_dict, with_prompt):
    toks, ptoks, pmel, emb, z = _case(0)
    if not with_prompt:
        ptoks, pmel, emb = ptoks[:0], pmel[:0], torch.zeros(192)
    prompt = SpeakerPrompt(pmel, emb, ptoks) if with_prompt else None
    mine = tiny_decoder.token2mel(toks, prompt=prompt, noise=z)
    expect = ref.flow_mel(flow_state_dict, TINY_SIZES, toks, ptoks, pmel, emb, z[:, :pmel.shape[0] + 62])
    assert mine.shape == expect.shape == (80, int(30 / 41.667 * 22050 / 256))
    torch.testing.assert_close(mine, expect, atol=2e-5, rtol=1e-5)


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


def test_batch_with_padding_equals_single_requests(tiny_decoder):
    cases = [_case(3, n_tokens=20), _case(4, n_tokens=33, n_prompt=5, prompt_frames=12), _case(5, n_tokens=27)]
    prompts = [SpeakerPrompt(p, e, pt) for _, pt, p, e, _ in cases]
    toks = [c[0] for c in cases]
    noises = [c[4] for c in cases]
    batch = tiny_decoder.token2wav_batch(toks, prompts, seeds=[1, 2, 3], noises=noises)
    for i in range(3):
        single = tiny_decoder.token2wav(toks[i], prompt=prompts[i], noise=noises[i], seed=i + 1)
        torch.testing.assert_close(batch[i], single, atol=1e-5, rtol=1e-4)


def test_bucket_padded_solve_equals_unpadded(tiny_decoder):
    """The inputs a CUDA graph sees (length rounded up to the bucket, masked) give the same mel."""
    toks, ptoks, pmel, emb, z = _case(7, n_tokens=23)
    prompt = SpeakerPrompt(pmel, emb, ptoks)
    plain = tiny_decoder.token2mel(toks, prompt=prompt, noise=z)
    bucketed = tiny_decoder.variant(bucket_eager=True)                  # same weights, eager solve padded to buckets
    solver = bucketed.solver
    assert solver.bucket_eager and not tiny_decoder.solver.bucket_eager
    assert (pmel.shape[0] + plain.shape[1]) % solver.bucket != 0       # really padded
    padded = bucketed.token2mel(toks, prompt=prompt, noise=z)
    torch.testing.assert_close(padded, plain, atol=2e-5, rtol=1e-5)


def test_rel_shift_equivalence():
    x = torch.randn(2, 3, 7, 13)
    torch.testing.assert_close(relative_to_absolute(x), ref.rel_shift(x), atol=0, rtol=0)


def _micro_estimator(kernels: KernelConfig):
    torch.manual_seed(0)
    cfg = EstimatorConfig(in_channels=32, out_channels=8, channels=(16, 16), attention_head_dim=4, n_blocks=2,
                          num_mid_blocks=1, num_heads=2)
    est = ConditionalDecoder(cfg, kernels).eval()
    with torch.no_grad():
        for p in est.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return est


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("length", [21, 24])
def test_estimator_padding_is_invisible(length, fused, reference_kernels):
    """A request padded to a length bucket gives its unpadded velocity on the valid frames."""
    est = _micro_estimator(reference_kernels)
    x = torch.randn(2, 32, length)
    proj = est.time_projections(torch.tensor([0.3]))
    full = torch.ones(2, 1, length)
    with torch.no_grad():
        plain = est(x, full, proj, padded=False, fused=False)
        padded_x = torch.cat([x, torch.randn(2, 32, 11) * 50], dim=2)
        mask = torch.cat([full, torch.zeros(2, 1, 11)], dim=2)
        padded = est(padded_x, mask, proj, padded=True, fused=fused)
    torch.testing.assert_close(padded[..., :length], plain, atol=1e-5, rtol=1e-5)
    assert not padded[..., length:].any()


@pytest.mark.skipif(not INTERPRETER_ACTIVE, reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("variant", ["rows", "rows+library_ff"])
@pytest.mark.parametrize("padded", [True, False])
def test_fused_estimator_matches_unfused_under_interpreter(variant, padded):
    """The fused channels-last kernels (Triton, interpreted) against the plain modules. rows+library_ff:
    a sequence of FF_IN_UNFUSED_ROWS frames, so the outer U-Net level runs the feed-forward input as
    LayerNorm + library linear + GELU and the inner (half-length) level the fused kernel (the old
    variant lowered the module constant instead; stepvox module globals are not patched any more).
    ~45 s per case under the interpreter on two cores."""
    length = 20 if variant == "rows" else FF_IN_UNFUSED_ROWS
    pad = 6 if variant == "rows" else 70
    reference = _micro_estimator(KernelConfig(backend="reference"))
    est = _micro_estimator(KernelConfig(backend="triton"))
    for (ka, va), (kb, vb) in zip(reference.state_dict().items(), est.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    x = torch.randn(2, 32, length)
    mask = torch.ones(2, 1, length)
    if padded:
        mask[1, :, length - pad:] = 0
        x[1, :, length - pad:] = 30 * torch.randn(32, pad)          # garbage on padded frames must stay invisible
    proj = est.time_projections(torch.tensor([0.7]))
    with torch.no_grad():
        unfused = reference(x, mask, proj, padded=padded, fused=False)
        out = est(x, mask, proj, padded=padded, fused=True)
    torch.testing.assert_close(out, unfused, atol=1e-5, rtol=1e-4)
    assert unfused.abs().max() > 1e-2


def test_bf16_flow_tracks_fp32(cosyvoice_dir, tiny_decoder, reference_kernels):
    dec16 = SpeechDecoder.from_pretrained(cosyvoice_dir, device="cpu", flow_dtype=torch.bfloat16,
                                          kernels=reference_kernels)
    assert dec16.flow.dtype == torch.bfloat16 and dec16.hift.conv_pre.weight.dtype == torch.float32
    toks, ptoks, pmel, emb, z = _case(6, n_tokens=20)
    prompt = SpeakerPrompt(pmel, emb, ptoks)
    a = tiny_decoder.token2mel(toks, prompt=prompt, noise=z)
    b = dec16.token2mel(toks, prompt=prompt, noise=z)
    assert b.dtype == torch.float32
    rel = (a - b).norm() / a.norm()
    assert rel < 0.05, rel


def test_interpolation_table_matches_f_interpolate():
    g = torch.Generator().manual_seed(13)
    for n_in, n_out in [(12, 25), (30, 62), (7, 7), (40, 13), (1, 9), (125, 258)]:
        x = torch.randn(3, 5, n_in, generator=g)
        i0, i1, w0, w1 = (torch.from_numpy(a) for a in linear_interp_table(n_in, n_out))
        got = w0 * x[..., i0] + w1 * x[..., i1]
        torch.testing.assert_close(got, F.interpolate(x, size=n_out, mode="linear"), atol=1e-6, rtol=1e-6)


def test_bucketed_pre_solve_equals_eager_encode(tiny_decoder):
    """The inputs the pre-solve CUDA graph sees: a batch of requests (different token counts, one
    with a mu prefix, one without prompt) padded to token / frame buckets gives each request's
    eager mu and spks."""
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
