"""The Paraformer front end (engine/frontend/paraformer_features.py): am.mvn parsing, the Kaldi
fbank, LFR stacking and the chunking of FunASR's online front end (offline and live)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchaudio.compliance.kaldi as kaldi

from stepvox.engine.errors import CheckpointError
from stepvox.engine.frontend.paraformer_features import (FbankConfig, ParaformerFeatures, chunk_row_counts,
                                                         lfr_stack, load_am_mvn, paraformer_fbank)
from stepvox.testing.tokenizer import TINY, cmvn_values, write_am_mvn

from stepvox.testing.official_tokenizer import official_feature_calls

SEED = 3


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mvn") / "am.mvn")
    write_am_mvn(path, *cmvn_values(TINY, SEED))
    cfg = FbankConfig()
    return ParaformerFeatures(cfg, *load_am_mvn(path, cfg.feature_dim))


def _noise_speech(n, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n) / 16000
    tone = 0.3 * torch.sin(2 * np.pi * (150 + 50 * torch.sin(3 * t)) * t)
    return (tone + 0.05 * torch.randn(n, generator=g)) * (0.5 + 0.5 * torch.sin(5 * t)).abs()


def test_am_mvn_parsing(tmp_path):
    shift, scale = cmvn_values(TINY, 1)
    path = str(tmp_path / "am.mvn")
    write_am_mvn(path, shift, scale)
    s, c = load_am_mvn(path, 560)
    np.testing.assert_allclose(s.numpy(), shift, atol=1e-6)
    np.testing.assert_allclose(c.numpy(), scale, atol=1e-6)
    with pytest.raises(CheckpointError, match="expected 80"):
        load_am_mvn(path, 80)
    (tmp_path / "bad.mvn").write_text("<Nnet>\n<Splice> 3 3\n[ 0 ]\n</Nnet>\n")
    with pytest.raises(CheckpointError, match="AddShift"):
        load_am_mvn(str(tmp_path / "bad.mvn"))


@pytest.mark.parametrize("n", [0, 399, 479, 480, 1000, 1500, 3839, 3840, 3919, 3920, 4719, 4720,
                               2 * 3840 + 300, 5 * 3840 + 2000, 7 * 3840 + 3839])
def test_front_end_matches_funasr_online_chunking(features, n):
    """Row counts per call and the rows themselves equal a literal replay of FunASR's
    WavFrontendOnline + infer_encoder loop (including its dropped tails)."""
    wav = _noise_speech(n, n)
    calls = official_feature_calls(wav, *cmvn_values(TINY, SEED))
    rows, counts = features.offline(wav)
    assert counts == [c.shape[0] for c in calls]
    assert chunk_row_counts(n, FbankConfig()) == counts
    if calls:
        torch.testing.assert_close(rows, torch.cat(calls), atol=2e-4, rtol=1e-5)


@pytest.mark.parametrize("n", [400, 559, 560, 3840 * 2 + 17, 16000 * 3 + 123])
def test_fbank_equals_torchaudio_bitwise(n):
    """The cached-constant fbank is torchaudio's kaldi.fbank with the front end's settings, bit for bit."""
    wav = _noise_speech(n, n)
    ref = kaldi.fbank(wav[None] * (1 << 15), num_mel_bins=80, frame_length=25.0, frame_shift=10.0, dither=0.0,
                      energy_floor=0.0, window_type="hamming", sample_frequency=16000, snip_edges=True)
    assert torch.equal(paraformer_fbank(wav, FbankConfig()), ref)


def test_lfr_stack_definition():
    frames = torch.arange(10.0)[:, None].repeat(1, 2)
    cfg = FbankConfig(n_mels=2)
    rows = lfr_stack(frames, 2, cfg)
    # row 0: frame 0 three times in front, then frames 0..3; row 1: frames 3..9
    assert rows[0, ::2].tolist() == [0, 0, 0, 0, 1, 2, 3]
    assert rows[1, ::2].tolist() == [3, 4, 5, 6, 7, 8, 9]
    assert lfr_stack(frames, 3, cfg)[2, ::2].tolist() == [9] * 7        # past the end: last frame repeats


@pytest.mark.parametrize("n", [1000, 3840 * 3, 16000 * 3 + 1234])
def test_feature_stream_equals_offline(features, n):
    """Audio pushed in pieces of any size gives, per 240 ms call, the rows (and row counts) of the
    whole-file path."""
    wav = _noise_speech(n, n + 2)
    rows, counts = features.offline(wav)
    fs = features.stream()
    blocks, i = [], 0
    rng = np.random.default_rng(n)
    while i < wav.numel():
        step = int(rng.integers(1, 6000))
        blocks += fs.push(wav[i:i + step])
        i += step
    blocks += fs.finish()
    assert [b.shape[0] for b in blocks] == counts
    if counts:
        torch.testing.assert_close(torch.cat(blocks), rows, atol=1e-5, rtol=1e-5)
