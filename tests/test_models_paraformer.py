"""vq02 path (engine/models/paraformer.py): FunASR folder loading, the chunked SAN-M encoder
(offline = Step-Audio's chunk mode, batched; a live stream reproduces it) and LinguisticTokenizer
(codes of whole utterances and of live streams)."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from stepvox.engine.errors import CheckpointError, ConfigError, MissingTensorsError
from stepvox.engine.models.paraformer import (PARAFORMER_SUBDIR, LinguisticTokenizer, load_paraformer,
                                              parse_paraformer_config, sinusoid_positions)
from stepvox.engine.models.yaml_reader import parse_inert_yaml, read_yaml
from stepvox.kernels import KernelConfig
from stepvox.kernels.backend import INTERPRETER_ACTIVE
from stepvox.testing.tokenizer import CONFIG_YAML, TINY, cmvn_values, write_paraformer_dir

from stepvox.testing.official_tokenizer import kmeans_codes, official_encoder, official_feature_calls

SEED = 3


@pytest.fixture(scope="module")
def para(tmp_path_factory, reference_kernels):
    folder = str(tmp_path_factory.mktemp("para") / PARAFORMER_SUBDIR)
    sd = write_paraformer_dir(folder, TINY, SEED)
    encoder, features = load_paraformer(folder, kernels=reference_kernels)
    return folder, sd, encoder, features


@pytest.fixture(scope="module")
def codebook():
    g = torch.Generator().manual_seed(SEED)
    return torch.randn(TINY.vq02_codes, TINY.p_model, generator=g)


def _noise_speech(n, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n) / 16000
    tone = 0.3 * torch.sin(2 * np.pi * (150 + 50 * torch.sin(3 * t)) * t)
    return (tone + 0.05 * torch.randn(n, generator=g)) * (0.5 + 0.5 * torch.sin(5 * t)).abs()


def test_config_yaml_tags_are_plain_data(tmp_path):
    """config.yaml is read as data: a hyperpyyaml tag becomes a plain dict, a Python tag is refused;
    neither runs code, and a tagged section still configures the model."""
    marker = tmp_path / "ran"
    path = tmp_path / "config.yaml"
    path.write_text("encoder: SANMEncoderChunkOpt\nfrontend_conf: !new:some.Module\n  n_mels: 80\n")
    data = read_yaml(path)
    assert data["frontend_conf"] == {"__class__": "some.Module", "n_mels": 80}
    path.write_text(f"x: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_yaml(path)
    assert not marker.exists()
    folder = tmp_path / "p"
    write_paraformer_dir(str(folder), TINY, SEED)
    text = (folder / "config.yaml").read_text()
    assert "frontend: WavFrontendOnline\nfrontend_conf:\n" in text
    (folder / "config.yaml").write_text(text.replace("frontend_conf:\n", "frontend_conf: !new:funasr.Frontend\n"))
    encoder, features = load_paraformer(str(folder))
    assert features.cfg.n_mels == TINY.n_mels and encoder.cfg.output_size == TINY.p_model


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
    chunked = encoder.encode_offline([rows], [counts])[0]
    assert chunked.shape == full_pass.shape
    assert (chunked[8:] - full_pass[8:]).abs().max() > 1e-2


def test_batched_equals_unbatched(para):
    _, _, encoder, features = para
    wavs = [_noise_speech(n, n) for n in (1500, 3840 * 3 + 17, 16000 * 2 + 5000)]
    feats = [features.offline(w) for w in wavs]
    batched = encoder.encode_offline([f for f, _ in feats], [c for _, c in feats])
    for (f, c), b in zip(feats, batched):
        torch.testing.assert_close(encoder.encode_offline([f], [c])[0], b, atol=1e-5, rtol=1e-5)


def test_padding_windows_leaves_real_windows_unchanged(para):
    """Neutral windows appended up to a bucket (what a graph replay computes) change no real
    window's output, and come out finite."""
    _, _, encoder, features = para
    feats = [features.offline(_noise_speech(n, n)) for n in (3840 * 3 + 17, 16000 * 2 + 5000)]
    args = ([f for f, _ in feats], [c for _, c in feats])
    plain = encoder.prepare_offline(*args)
    padded = encoder.prepare_offline(*args, pad_windows_to=plain.windows + 7)
    assert padded.h.shape[0] == plain.windows + 7 and padded.windows == plain.windows
    out = encoder.encode_windows(plain.h, plain.n_rows, plain.lb_len, plain.index)
    out_padded = encoder.encode_windows(padded.h, padded.n_rows, padded.lb_len, padded.index)
    torch.testing.assert_close(out_padded[:plain.windows], out, atol=1e-5, rtol=1e-5)
    assert bool(torch.isfinite(out_padded).all())


def test_linguistic_codes_of_utterances(para, codebook):
    """LinguisticTokenizer.launch: the nearest codebook row of every encoder row, per utterance,
    the same with and without bucket padding; nothing to encode gives no codes."""
    _, _, encoder, features = para
    feats = [features.offline(_noise_speech(n, n)) for n in (1500, 3840 * 3 + 17, 100, 16000 * 2 + 5000)]
    args = ([f for f, _ in feats], [c for _, c in feats])
    outs = encoder.encode_offline(*args)
    for bucket_eager in (False, True):
        tok = LinguisticTokenizer(encoder, codebook, use_cuda_graphs=False, bucket_eager=bucket_eager)
        flat, spans = tok.launch(*args)
        assert [n for _, n in spans] == [o.shape[0] for o in outs] and outs[2].shape[0] == 0
        for (first, n), o in zip(spans, outs):
            assert flat[first:first + n].tolist() == kmeans_codes(o, codebook.numpy())
    assert tok.launch([feats[2][0]], [feats[2][1]]) == (None, [(0, 0)])


def test_stream_equals_offline(para, codebook):
    _, _, encoder, features = para
    wav = _noise_speech(16000 * 3 + 1234, 9)
    rows, counts = features.offline(wav)
    offline = encoder.encode_offline([rows], [counts])[0]
    tok = LinguisticTokenizer(encoder, codebook, use_cuda_graphs=False)
    flat, [(first, n)] = tok.launch([rows], [counts])
    assert n == offline.shape[0]
    fs = features.stream()
    es = tok.stream()
    outs, codes = [], []
    rng = np.random.default_rng(0)
    i = 0
    while i < wav.numel():
        step = int(rng.integers(1, 6000))
        for block in fs.push(wav[i:i + step]):
            out, c = es.step(block)
            outs.append(out)
            codes.append(c)
        i += step
    for block in fs.finish():
        out, c = es.step(block)
        outs.append(out)
        codes.append(c)
    torch.testing.assert_close(torch.cat(outs), offline, atol=1e-5, rtol=1e-5)
    assert torch.cat(codes).tolist() == flat[first:first + n].tolist()


def test_loader_names_missing_extra_and_misshaped_tensors(tmp_path):
    folder = str(tmp_path / "p")
    sd = write_paraformer_dir(folder, TINY, SEED)
    bad = dict(sd)
    del bad["encoder.encoders.0.norm2.bias"]
    bad["encoder.encoders.0.self_attn.linear_out.weight"] = torch.zeros(3, 3)
    bad["encoder.encoders0.0.extra.weight"] = torch.zeros(2)
    torch.save(bad, os.path.join(folder, "model.pt"))
    with pytest.raises(MissingTensorsError) as err:
        load_paraformer(folder)
    msg = str(err.value)
    assert "encoders.0.norm2.bias" in msg and "encoders0.0.extra.weight" in msg
    assert f"encoders.0.self_attn.linear_out.weight: file [3, 3], model [{TINY.p_model}, {TINY.p_model}]" in msg


def test_loader_refuses_pickled_code_and_layer_count_mismatch(tmp_path):
    folder = str(tmp_path / "p")
    sd = write_paraformer_dir(folder, TINY, SEED)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(os.path.join(folder, "model.pt"), "wb") as f:
        pickle.dump({"encoder.after_norm.weight": Evil()}, f)
    with pytest.raises(CheckpointError, match=r"model.pt: (refused|not a readable tensor state dict)"):
        load_paraformer(folder)
    torch.save({k: v for k, v in sd.items() if not k.startswith("encoder.encoders.1.")},
               os.path.join(folder, "model.pt"))
    with pytest.raises(CheckpointError, match="num_blocks"):
        load_paraformer(folder)


def test_loader_refuses_other_paraformer_variants(tmp_path):
    """A config.yaml value the encoder does not implement is a ConfigError naming it."""
    folder = str(tmp_path / "p")
    write_paraformer_dir(folder, TINY, SEED)
    config = CONFIG_YAML.format(d=TINY.p_model, h=TINY.p_heads, f=TINY.p_ffn, n=TINY.p_blocks, m=TINY.n_mels)
    for old, new, named in [("encoder: SANMEncoderChunkOpt", "encoder: ConformerEncoder", "ConformerEncoder"),
                            ("window: hamming", "window: povey", "window 'povey'")]:
        assert old in config
        with open(os.path.join(folder, "config.yaml"), "w") as f:
            f.write(config.replace(old, new))
        with pytest.raises(ConfigError, match=named):
            load_paraformer(folder)


def test_decoder_and_predictor_are_ignored(para):
    _, sd, encoder, _ = para
    assert any(k.startswith("decoder.") for k in sd)
    names = set(encoder.state_dict())
    assert names == {k[len("encoder."):] for k in sd if k.startswith("encoder.")}
    torch.testing.assert_close(encoder.after_norm.weight, sd["encoder.after_norm.weight"])


def test_triton_kernels_in_the_encoder_match_reference(para):
    """The encoder through the Triton SAN-M + nearest-centroid kernels (interpreter on CPU)."""
    folder, _, encoder, features = para
    if not (INTERPRETER_ACTIVE or torch.cuda.is_available()):
        pytest.skip("Triton needs the interpreter or a GPU")
    triton_encoder, _ = load_paraformer(folder, kernels=KernelConfig(backend="triton"))
    rows, counts = features.offline(_noise_speech(3840 * 3 + 2000, 4))
    ref = encoder.encode_offline([rows], [counts])[0]
    out = triton_encoder.encode_offline([rows], [counts])[0]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_cuda_stream_graph_equals_offline(para, codebook):
    """A live stream replaying the step graph gives the offline encoder rows and codes."""
    folder = para[0]
    enc, feats = load_paraformer(folder, device="cuda")
    wav = _noise_speech(16000 * 3 + 1234, 9).cuda()
    rows, counts = feats.offline(wav)
    offline = enc.encode_offline([rows], [counts])[0]
    tok = LinguisticTokenizer(enc, codebook, use_cuda_graphs=True)
    es = tok.stream()
    fs = feats.stream()
    steps = [es.step(b) for b in fs.push(wav) + fs.finish()]
    assert tok.graph_count == 1                               # one step graph, replayed by every full call
    torch.testing.assert_close(torch.cat([out for out, _ in steps]), offline, atol=1e-4, rtol=1e-4)
    assert torch.cat([c for _, c in steps]).tolist() == tok.codes_of_rows(offline).tolist()


@pytest.mark.parametrize("section,key,value,message", [
    ("encoder_conf", "output_size", "abc", r"`encoder_conf.output_size` must be an integer >= 1, got 'abc'"),
    ("encoder_conf", "attention_heads", 0, r"`encoder_conf.attention_heads` must be an integer >= 1, got 0"),
    ("encoder_conf", "attention_heads", 3, r"output_size` 16 is not divisible by `encoder_conf.attention_heads` 3"),
    ("encoder_conf", "num_blocks", -1, r"`encoder_conf.num_blocks` must be an integer >= 1, got -1"),
    ("encoder_conf", "linear_units", 2.5, r"`encoder_conf.linear_units` must be an integer >= 1, got 2.5"),
    ("encoder_conf", "kernel_size", True, r"`encoder_conf.kernel_size` must be an integer >= 1, got True"),
    ("encoder_conf", "sanm_shfit", 6, r"`encoder_conf.sanm_shfit` 6 shifts the FSMN window past its kernel_size 11"),
    ("encoder_conf", "sanm_shfit", -1, r"`encoder_conf.sanm_shfit` must be an integer >= 0"),
    ("frontend_conf", "n_mels", 2, r"`frontend_conf.n_mels` must be an integer >= 4, got 2"),
    ("frontend_conf", "n_mels", 9, r"n_mels \* lfr_m = 63 must be even"),
    ("frontend_conf", "lfr_m", 0, r"`frontend_conf.lfr_m` must be an integer >= 1, got 0"),
    ("frontend_conf", "lfr_n", "6", r"`frontend_conf.lfr_n` must be an integer >= 1, got '6'"),
    ("frontend_conf", "frame_length", 0, r"`frontend_conf.frame_length` must be a number of ms in \(0, 1000\]"),
    ("frontend_conf", "frame_length", 1e9, r"`frontend_conf.frame_length` must be a number of ms"),
    ("frontend_conf", "frame_shift", "x", r"`frontend_conf.frame_shift` must be a number of ms in \(0, 1000\], got 'x'"),
    ("frontend_conf", "frame_shift", 0.01, r"`frontend_conf.frame_shift` = 0.01 ms is shorter than one sample"),
    ("frontend_conf", "fs", "abc", r"frontend fs 'abc' \(expected 16000\)"),
])
def test_config_values_are_checked(section, key, value, message):
    """Every number of config.yaml is checked where it is read: a ConfigError naming the field and
    the value (not a ValueError or ZeroDivisionError later)."""
    data = parse_inert_yaml(CONFIG_YAML.format(d=16, h=2, f=32, n=2, m=8))
    encoder, fbank = parse_paraformer_config(data)
    assert (encoder.output_size, encoder.attention_heads, fbank.n_mels) == (16, 2, 8)
    data[section][key] = value
    with pytest.raises(ConfigError, match=message) as info:
        parse_paraformer_config(data, "para/config.yaml")
    assert str(info.value).startswith("para/config.yaml: ")
    data[section] = [1, 2]
    with pytest.raises(ConfigError, match=f"`{section}` must be a mapping"):
        parse_paraformer_config(data)
