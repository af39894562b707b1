"""vq02 path: FunASR folder loading, the online front end's chunking, the chunked SAN-M encoder
(offline = Step-Audio's chunk mode, batched; live stream reproduces it)."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

import stepvox.kernels as K
from stepvox.engine.audio.kaldi_features import FbankConfig, chunk_row_counts, kaldi_fbank, lfr_stack, load_am_mvn
from stepvox.engine.audio.tokenizer_errors import TokenizerCheckpointError
from stepvox.engine.models.paraformer import (PARAFORMER_SUBDIR, EncoderStream, load_paraformer, read_yaml,
                                              sinusoid_positions)

from fixtures_tokenizer import (TINY, cmvn_values, official_encoder, official_feature_calls, write_am_mvn,
                                write_paraformer_dir)

SEED = 3


@pytest.fixture(scope="module")
def para(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("para") / PARAFORMER_SUBDIR)
    sd = write_paraformer_dir(folder, TINY, SEED)
    encoder, features = load_paraformer(folder)
    return folder, sd, encoder, features


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
    with pytest.raises(TokenizerCheckpointError, match="expected 80"):
        load_am_mvn(path, 80)
    (tmp_path / "bad.mvn").write_text("<Nnet>\n<Splice> 3 3\n[ 0 ]\n</Nnet>\n")
    with pytest.raises(TokenizerCheckpointError, match="AddShift"):
        load_am_mvn(str(tmp_path / "bad.mvn"))


def test_yaml_tags_are_plain_data(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("encoder: SANMEncoderChunkOpt\nfrontend_conf: !new:some.Module\n  n_mels: 80\n"
                    "x: !!python/object/apply:os.system ['echo hi']\n")
    data = read_yaml(path)
    assert data["frontend_conf"] == {"n_mels": 80}
    assert data["x"] == ["echo hi"]          # a tag never runs code: it is read as a list


@pytest.mark.parametrize("n", [0, 399, 479, 480, 1000, 1500, 3839, 3840, 3919, 3920, 4719, 4720,
                               2 * 3840 + 300, 5 * 3840 + 2000, 7 * 3840 + 3839])
def test_front_end_matches_funasr_online_chunking(para, n):
    """Row counts per call and the rows themselves equal a literal replay of FunASR's
    WavFrontendOnline + infer_encoder loop (including its dropped tails)."""
    _, sd, _, features = para
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
    import torchaudio.compliance.kaldi as kaldi
    wav = _noise_speech(n, n)
    ref = kaldi.fbank(wav[None] * (1 << 15), num_mel_bins=80, frame_length=25.0, frame_shift=10.0, dither=0.0,
                      energy_floor=0.0, window_type="hamming", sample_frequency=16000, snip_edges=True)
    assert torch.equal(kaldi_fbank(wav, FbankConfig()), ref)


def test_lfr_stack_definition():
    frames = torch.arange(10.0)[:, None].repeat(1, 2)
    cfg = FbankConfig(n_mels=2)
    rows = lfr_stack(frames, 2, cfg)
    # row 0: frame 0 three times in front, then frames 0..3; row 1: frames 3..9
    assert rows[0, ::2].tolist() == [0, 0, 0, 0, 1, 2, 3]
    assert rows[1, ::2].tolist() == [3, 4, 5, 6, 7, 8, 9]
    assert lfr_stack(frames, 3, cfg)[2, ::2].tolist() == [9] * 7        # past the end: last frame repeats


def test_positional_rows_follow_funasr_formula():
    pos = torch.tensor([1, 2, 7])
    pe = sinusoid_positions(pos, 8)
    inv = np.exp(-np.arange(4) * np.log(1e4) / 3)
    ref = np.concatenate([np.sin(pos.numpy()[:, None] * inv), np.cos(pos.numpy()[:, None] * inv)], axis=1)
    np.testing.assert_allclose(pe.numpy(), ref, atol=1e-6)


@pytest.mark.parametrize("n", [1000, 3840 * 2 + 1000, 16000 * 3 + 777])
def test_offline_encoder_matches_official_chunked_encoder(para, n):
    _, sd, encoder, features = para
    wav = _noise_speech(n, n + 1)
    calls = official_feature_calls(wav, *cmvn_values(TINY, SEED))
    ref = official_encoder(calls, sd, TINY.p_heads, TINY.p_model)
    rows, counts = features.offline(wav)
    with K.use_backend("reference"):
        out = encoder.encode_offline([rows], [counts])[0]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_chunked_encoder_differs_from_a_full_sequence_pass(para):
    """Documents why 'offline' means Step-Audio's chunk mode: one pass over all rows at once
    (full attention, FSMN over the whole sequence) gives different encoder outputs."""
    _, sd, encoder, features = para
    wav = _noise_speech(16000 * 2, 5)
    calls = official_feature_calls(wav, *cmvn_values(TINY, SEED))
    full_pass = official_encoder([torch.cat(calls)], sd, TINY.p_heads, TINY.p_model)
    rows, counts = features.offline(wav)
    with K.use_backend("reference"):
        chunked = encoder.encode_offline([rows], [counts])[0]
    assert chunked.shape == full_pass.shape
    assert (chunked[8:] - full_pass[8:]).abs().max() > 1e-2


def test_batched_equals_unbatched(para):
    _, _, encoder, features = para
    wavs = [_noise_speech(n, n) for n in (1500, 3840 * 3 + 17, 16000 * 2 + 5000)]
    feats = [features.offline(w) for w in wavs]
    with K.use_backend("reference"):
        batched = encoder.encode_offline([f for f, _ in feats], [c for _, c in feats])
        for (f, c), b in zip(feats, batched):
            torch.testing.assert_close(encoder.encode_offline([f], [c])[0], b, atol=1e-5, rtol=1e-5)


def test_padding_windows_leaves_real_windows_unchanged(para):
    """Neutral windows appended up to a bucket (what a graph replay computes) change no real
    window's output, and come out finite."""
    _, _, encoder, features = para
    feats = [features.offline(_noise_speech(n, n)) for n in (3840 * 3 + 17, 16000 * 2 + 5000)]
    args = ([f for f, _ in feats], [c for _, c in feats])
    with K.use_backend("reference"):
        plain = encoder.prepare_offline(*args)
        padded = encoder.prepare_offline(*args, pad_windows_to=plain.windows + 7)
        assert padded.h.shape[0] == plain.windows + 7 and padded.windows == plain.windows
        out = encoder.encode_windows(plain.h, plain.n_rows, plain.lb_len, plain.index)
        out_padded = encoder.encode_windows(padded.h, padded.n_rows, padded.lb_len, padded.index)
    torch.testing.assert_close(out_padded[:plain.windows], out, atol=1e-5, rtol=1e-5)
    assert bool(torch.isfinite(out_padded).all())


def test_stream_equals_offline(para):
    _, _, encoder, features = para
    wav = _noise_speech(16000 * 3 + 1234, 9)
    rows, counts = features.offline(wav)
    with K.use_backend("reference"):
        offline = encoder.encode_offline([rows], [counts])[0]
        fs = features.stream()
        es = EncoderStream(encoder, lambda r: r)
        outs = []
        rng = np.random.default_rng(0)
        i = 0
        while i < wav.numel():
            step = int(rng.integers(1, 6000))
            for block in fs.push(wav[i:i + step]):
                outs.append(es.step(block)[0])
            i += step
        for block in fs.finish():
            outs.append(es.step(block)[0])
    torch.testing.assert_close(torch.cat(outs), offline, atol=1e-5, rtol=1e-5)


def test_loader_names_missing_extra_and_misshaped_tensors(tmp_path):
    folder = str(tmp_path / "p")
    sd = write_paraformer_dir(folder, TINY, SEED)
    bad = dict(sd)
    del bad["encoder.encoders.0.norm2.bias"]
    bad["encoder.encoders.0.self_attn.linear_out.weight"] = torch.zeros(3, 3)
    bad["encoder.encoders0.0.extra.weight"] = torch.zeros(2)
    torch.save(bad, os.path.join(folder, "model.pt"))
    with pytest.raises(TokenizerCheckpointError) as err:
        load_paraformer(folder)
    msg = str(err.value)
    assert "encoders.0.norm2.bias" in msg and "encoders0.0.extra.weight" in msg
    assert "encoders.0.self_attn.linear_out.weight" in msg and "(3, 3)" in msg


def test_loader_refuses_pickled_code_and_layer_count_mismatch(tmp_path):
    folder = str(tmp_path / "p")
    sd = write_paraformer_dir(folder, TINY, SEED)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(os.path.join(folder, "model.pt"), "wb") as f:
        pickle.dump({"encoder.after_norm.weight": Evil()}, f)
    with pytest.raises(TokenizerCheckpointError, match="weights_only"):
        load_paraformer(folder)
    torch.save({k: v for k, v in sd.items() if not k.startswith("encoder.encoders.1.")},
               os.path.join(folder, "model.pt"))
    with pytest.raises(TokenizerCheckpointError, match="num_blocks"):
        load_paraformer(folder)


def test_decoder_and_predictor_are_ignored(para):
    _, sd, encoder, _ = para
    assert any(k.startswith("decoder.") for k in sd)
    names = set(encoder.state_dict())
    assert names == {k[len("encoder."):] for k in sd if k.startswith("encoder.")}
    torch.testing.assert_close(encoder.after_norm.weight, sd["encoder.after_norm.weight"])


def test_triton_kernels_in_the_encoder_match_reference(para):
    """The encoder through the Triton SAN-M + nearest-centroid kernels (interpreter on CPU)."""
    _, _, encoder, features = para
    if not (K.backend.INTERPRETER_ACTIVE or torch.cuda.is_available()):
        pytest.skip("Triton needs the interpreter or a GPU")
    rows, counts = features.offline(_noise_speech(3840 * 3 + 2000, 4))
    with K.use_backend("reference"):
        ref = encoder.encode_offline([rows], [counts])[0]
    with K.use_backend("triton"):
        out = encoder.encode_offline([rows], [counts])[0]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_cuda_stream_graph_equals_offline(para):
    from stepvox.engine.models.paraformer import StreamStepGraph
    _, _, encoder, features = para
    enc = encoder.to("cuda")
    feats = features.to("cuda")
    wav = _noise_speech(16000 * 3 + 1234, 9).cuda()
    rows, counts = feats.offline(wav)
    offline = enc.encode_offline([rows], [counts])[0]
    es = EncoderStream(enc, lambda r: r, StreamStepGraph(enc, lambda r: r))
    fs = feats.stream()
    outs = [es.step(b)[0] for b in fs.push(wav) + fs.finish()]
    torch.testing.assert_close(torch.cat(outs), offline, atol=1e-4, rtol=1e-4)
    encoder.to("cpu")
