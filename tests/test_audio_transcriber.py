"""Speech recognition from the tokenizer's own Paraformer (engine/audio/transcriber.py,
models/paraformer_asr.py, models/asr_vocabulary.py) on a tiny folder in the released format: token
for token equal to an independent eager rendering of FunASR's streaming inference
(stepvox.testing.official_asr), offline (batched) and streaming (random piece sizes), on espeak-ng
and real speech; the end-of-audio cases; the vocabulary's text rules and the stream's committed
text; loading checks and typed errors."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torchaudio

from stepvox.engine.audio.tokenizer import AudioTokenizer
from stepvox.engine.audio.transcriber import Transcriber
from stepvox.engine.errors import (AudioInputError, AudioTooShortError, CheckpointError, ConfigError,
                                   MissingTensorsError, StreamClosedError, TensorShapeError, UnexpectedTensorsError)
from stepvox.engine.frontend.wav import read_wav
from stepvox.engine.models.asr_vocabulary import committed_text, tokens_to_text
from stepvox.engine.models.paraformer import (PARAFORMER_SUBDIR, ParaformerEncoder, load_paraformer,
                                              parse_paraformer_config)
from stepvox.engine.models.paraformer_asr import (CifPredictor, ParaformerDecoder, integrate_and_fire, load_recognizer,
                                                  parse_asr_config)
from stepvox.engine.models.yaml_reader import parse_inert_yaml
from stepvox.testing.official_asr import official_recognize, sentence_postprocess
from stepvox.testing.speech import espeak_wav
from stepvox.testing.tokenizer import (CONFIG_YAML, FULL, RECOGNIZER_YAML, TINY, recognizer_shapes, vocabulary,
                                       write_paraformer_dir, write_tokenizer_dir)

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello there, how are you today?",
         "Streaming tokens arrive every two hundred and forty milliseconds."]
SAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "step-audio")
REAL = ["examples/multilingual1.wav", "examples/speed_control1.wav", "speakers/Tingting_prompt.wav",
        "examples/prompt_wav_zhaobenshan.wav"]          # 22.05, 22.05, 44.1 and 48 kHz
SEED = 5


@pytest.fixture(scope="module")
def setup(tmp_path_factory, reference_kernels):
    root = str(tmp_path_factory.mktemp("asr"))
    fixture = write_tokenizer_dir(root, TINY, seed=SEED)
    tok = AudioTokenizer.from_pretrained(root, kernels=reference_kernels, asr=True)
    speech = [espeak_wav(os.path.join(root, f"s{i}.wav"), t) for i, t in enumerate(TEXTS)]
    return tok, fixture, speech, root


def official(wav, sr, fixture):
    """The reference on the same input: torchaudio's resampler, as Step-Audio's preprocessing."""
    audio = torch.as_tensor(np.asarray(wav, dtype=np.float32))
    if sr != 16000:
        audio = torchaudio.transforms.Resample(orig_freq=sr, new_freq=16000)(audio[None])[0]
    return official_recognize(audio, fixture, TINY)


def real_speech(name, seconds=4.5):
    path = os.path.join(SAMPLES, name)
    if not os.path.isfile(path):
        pytest.skip(f"sample audio {path} not available")
    wav, sr = read_wav(path)
    return wav.mean(axis=0)[: int(seconds * sr)], sr


def feed_randomly(stream, wav, sr, seed):
    rng = np.random.default_rng(seed)
    deltas, i = [], 0
    while i < len(wav):
        n = int(rng.integers(1, sr // 4))
        deltas.append(stream.feed(wav[i:i + n]))
        i += n
    return deltas, stream.finish()


# ---------------------------------------------------------------- equal to the FunASR rendering
@pytest.mark.parametrize("which", range(len(TEXTS)))
def test_offline_equals_official_streaming_inference(setup, which):
    tok, fixture, speech, _ = setup
    wav, sr = speech[which]
    out = tok.transcriber.transcribe(wav, sr)
    ids, text = official(wav, sr, fixture)
    assert out.token_ids == ids and out.text == text and len(ids) >= 5
    assert out.tokens == [fixture["tokens"][i] for i in ids]
    assert out.token_times == sorted(out.token_times) and 0 <= out.token_times[0]
    assert out.token_times[-1] <= len(wav) / sr + 1 / 16000          # (resampled length rounds up)


@pytest.mark.parametrize("name", REAL)
def test_real_speech_equals_official(setup, name):
    tok, fixture, _, _ = setup
    wav, sr = real_speech(name)
    out = tok.transcriber.transcribe(wav, sr)
    ids, text = official(wav, sr, fixture)
    assert out.token_ids == ids and out.text == text and len(ids) >= 5


@pytest.mark.parametrize("source,rate", [("espeak", 22050), ("espeak", 48000), ("real", None)])
def test_stream_equals_offline_and_official(setup, source, rate):
    tok, fixture, speech, _ = setup
    if source == "real":
        wav, rate = real_speech(REAL[3])
    else:
        wav = torchaudio.functional.resample(torch.from_numpy(speech[2][0]), 22050, rate).numpy()
    offline = tok.transcriber.transcribe(wav, rate)
    deltas, final = feed_randomly(tok.transcriber.stream(rate), wav, rate, seed=rate)
    assert final == offline
    assert (final.token_ids, final.text) == official(wav, rate, fixture)
    joined = "".join(deltas)
    assert final.text.startswith(joined) and sum(bool(d) for d in deltas) >= 2     # text arrived while streaming


def test_batch_equals_single_and_stream(setup):
    """Mixed lengths, rates and end cases in one batch: each equals its own call and a stream."""
    tok, fixture, speech, _ = setup
    wav16 = torchaudio.functional.resample(torch.from_numpy(speech[0][0]), 22050, 16000)
    cases = [wav16[:3840 * 9],             # ends on a call boundary: tail window
             wav16[:3840 * 9 + 200],       # last piece gives no feature row: tail window
             wav16[:3840 * 9 + 1500],      # a final call of its own
             wav16[:1500],                 # one short final call only
             wav16]
    batch = tok.transcriber.transcribe_batch(cases + [speech[1][0]], [16000] * len(cases) + [22050])
    for wav, out in zip(cases, batch):
        assert out == tok.transcriber.transcribe(wav, 16000)
        stream = tok.transcriber.stream()
        stream.feed(wav)
        assert stream.finish() == out
        assert (out.token_ids, out.text) == official_recognize(wav, fixture, TINY)
    assert batch[-1] == tok.transcriber.transcribe(speech[1][0], 22050)
    assert len({len(o.token_ids) for o in batch}) > 3


def test_energy_norm_option(setup):
    tok, fixture, speech, _ = setup
    wav, sr = speech[1]
    quiet = wav * 0.2
    out = tok.transcriber.transcribe(quiet, sr, energy_norm=True)
    audio = torchaudio.transforms.Resample(sr, 16000)(torch.from_numpy(quiet)[None])[0]
    audio = audio / max(audio.abs().max(), 0.01) * 0.999
    assert (out.token_ids, out.text) == official_recognize(audio, fixture, TINY)


def test_shares_the_tokenizer_encoder(setup, reference_kernels):
    tok, _, speech, root = setup
    assert tok.transcriber is tok.transcriber and tok.transcriber.encoder is tok.linguistic.encoder
    assert tok.transcriber.features is tok.features
    plain = AudioTokenizer.from_pretrained(root, kernels=reference_kernels)
    assert plain.recognizer is None
    assert plain.tokenize(*speech[0]) == tok.tokenize(*speech[0])        # asr changes nothing of the codes
    with pytest.raises(ConfigError, match="asr=True"):
        plain.transcriber
    with pytest.raises(ConfigError, match="asr=True"):
        Transcriber(plain)
    assert tok.variant(bucket_eager=True).transcriber.transcribe(*speech[0]) == tok.transcriber.transcribe(*speech[0])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_offline_equals_stream(tmp_path, dtype):
    """On the GPU (Triton kernels, batched windows vs one window per feed): fp32 equals the stream
    and the CPU rendering; bf16 runs both paths and mostly agrees."""
    fixture = write_tokenizer_dir(str(tmp_path), TINY, seed=SEED)
    tok = AudioTokenizer.from_pretrained(str(tmp_path), device="cuda", dtype=dtype, asr=True)
    t = np.arange(16000 * 5) / 16000
    wav = (0.3 * np.sin(2 * np.pi * (150 + 40 * np.sin(3 * t)) * t) * np.abs(np.sin(4 * t))
           + 0.01 * np.random.default_rng(0).standard_normal(t.size)).astype(np.float32)
    offline = tok.transcriber.transcribe(wav, 16000)
    stream = tok.transcriber.stream()
    for i in range(0, wav.size, 1234):
        stream.feed(wav[i:i + 1234])
    final = stream.finish()
    if dtype == torch.float32:
        assert final == offline
        assert (offline.token_ids, offline.text) == official_recognize(torch.from_numpy(wav), fixture, TINY)
    else:
        same = sum(a == b for a, b in zip(final.token_ids, offline.token_ids))
        assert offline.token_ids and same >= 0.8 * max(len(final.token_ids), len(offline.token_ids))


# ---------------------------------------------------------------- CIF
def test_integrate_and_fire_follows_funasr_loop():
    a = np.array([0.3, 0.5, 0.4, 0.9, 0.0, 0.2], np.float32)
    entries, fires, rest = integrate_and_fire(a, 0.25, 1.0)
    assert fires == [1, 3]                     # 0.25 carried + 0.3 + 0.5 >= 1 at frame 1; 0.05 + 0.4 + 0.9 at 3
    assert rest == pytest.approx(0.35 + 0.2, abs=1e-6)
    weights = {}
    for tok_, _, w in entries:
        weights[tok_] = weights.get(tok_, 0) + w
    assert weights[0] == pytest.approx(0.75) and weights[1] == pytest.approx(1.0) and weights[2] == pytest.approx(0.55)


# ---------------------------------------------------------------- text
@pytest.mark.parametrize("tokens,text", [
    (["你", "好", "世"], "你好世"),
    (["hello", "world"], "hello world"),
    (["hel@@", "lo", "wor@@", "ld"], "hello world"),
    (["我", "love", "you", "们"], "我love you们"),                   # the space before CJK is taken back
    (["<s>", "你", "<unk>", "好", "</s>"], "你好"),                   # specials dropped
    (["a", "b", "c", "good"], "ABC good"),                           # single letters: an abbreviation
    (["i", "x", "你"], "IX你"),
    (["hello", "wor@@"], "hello"),                                   # an unfinished word is dropped
    (["1", "2", "是"], "12是"),                                       # digits count as CJK
    (["ok@@", "你", "ay"], "你okay"),                                 # FunASR keeps the pending piece
    (["good", "-", "你"], "good 你"),                                 # ... and pops whatever came last
    (["it's", "你"], "it's你"),
    ([], ""),
])
def test_text_rules(tokens, text):
    assert tokens_to_text(tokens) == text == sentence_postprocess(tokens)


def test_text_equals_funasr_rules_on_random_tokens():
    vocab = vocabulary(TINY)[3:] + ["<unk>", "<s>", "a b", "x你", "é", "ABC", "@"]
    rng = np.random.default_rng(0)
    for _ in range(3000):
        tokens = [vocab[i] for i in rng.integers(0, len(vocab), int(rng.integers(0, 12)))]
        assert tokens_to_text(tokens) == sentence_postprocess(tokens), tokens


def test_committed_text_never_changes():
    """What a stream hands out is a prefix of the text of every longer token sequence."""
    vocab = vocabulary(TINY)[3:]
    rng = np.random.default_rng(1)
    for _ in range(400):
        tokens = [vocab[i] for i in rng.integers(0, len(vocab), 14)]
        for k in range(len(tokens) + 1):
            certain = committed_text(tokens[:k])
            assert all(tokens_to_text(tokens[:j]).startswith(certain) for j in range(k, len(tokens) + 1)), tokens


# ---------------------------------------------------------------- bad input
def test_bad_audio(setup):
    tok, _, speech, _ = setup
    asr = tok.transcriber
    wav, sr = speech[1]
    with pytest.raises(AudioInputError, match="empty"):
        asr.transcribe(np.zeros(0, np.float32), 16000)
    bad = wav.copy()
    bad[10] = np.nan
    with pytest.raises(AudioInputError, match="NaN"):
        asr.transcribe(bad, sr)
    with pytest.raises(AudioInputError, match="below 16000"):
        asr.transcribe(wav, 8000)
    with pytest.raises(AudioInputError, match="dtype"):
        asr.transcribe((wav * 100).astype(np.uint8), sr)
    with pytest.raises(AudioInputError, match="#1"):
        asr.transcribe_batch([wav, wav[:0]], sr)
    with pytest.raises(AudioInputError, match="2 waveforms but 1 sample rates"):
        asr.transcribe_batch([wav, wav], [sr])
    with pytest.raises(AudioTooShortError, match="too short"):
        asr.transcribe(wav[:600], sr)
    assert asr.transcribe(wav[:600], sr, allow_empty=True).text == ""
    assert asr.transcribe(np.stack([wav, wav]), sr) == asr.transcribe(wav, sr)        # channels averaged
    stream = asr.stream(sr)
    with pytest.raises(AudioInputError, match="opened at 22050 Hz"):
        stream.feed(wav[:100], sample_rate=16000)
    assert stream.feed(wav[:0]) == ""
    stream.feed(wav[:sr])
    stream.finish()
    with pytest.raises(StreamClosedError, match="finished"):
        stream.feed(wav[:100])
    with pytest.raises(StreamClosedError, match="finished"):
        stream.finish()
    closed = asr.stream(sr)
    closed.feed(wav[:sr])
    closed.close()
    with pytest.raises(StreamClosedError, match="closed"):
        closed.feed(wav[:100])
    with pytest.raises(AudioInputError, match="below"):
        asr.stream(8000)
    empty = asr.stream()
    assert empty.finish().text == ""


# ---------------------------------------------------------------- loading
@pytest.fixture
def para_dir(tmp_path):
    folder = str(tmp_path / PARAFORMER_SUBDIR)
    sd = write_paraformer_dir(folder, TINY, SEED)
    encoder, _ = load_paraformer(folder)
    return folder, sd, encoder.cfg


def test_tokenizer_only_folder_loads_without_recognizer(tmp_path, reference_kernels):
    """An older folder whose model.pt has the encoder only: a tokenizer as before; asr=True refuses."""
    root = str(tmp_path)
    fixture = write_tokenizer_dir(root, TINY, seed=SEED)
    model_pt = os.path.join(root, PARAFORMER_SUBDIR, "model.pt")
    torch.save({k: v for k, v in fixture["paraformer"].items() if k.startswith("encoder.")}, model_pt)
    os.remove(os.path.join(root, PARAFORMER_SUBDIR, "tokens.json"))
    tok = AudioTokenizer.from_pretrained(root, kernels=reference_kernels)
    assert tok.encode(np.sin(np.arange(16000) / 7).astype(np.float32) * 0.3, 16000)
    with pytest.raises(CheckpointError, match="holds only the encoder"):
        AudioTokenizer.from_pretrained(root, kernels=reference_kernels, asr=True)


def test_recognizer_tensors_are_checked_strictly(para_dir):
    folder, sd, enc_cfg = para_dir
    model_pt = os.path.join(folder, "model.pt")
    cases = [
        ({"decoder.decoders.1.src_attn.linear_q.weight": torch.zeros(3, 3)}, (), TensorShapeError,
         "decoders.1.src_attn.linear_q.weight: file [3, 3]"),
        ({"decoder.decoders.9.norm1.weight": torch.zeros(2)}, (), UnexpectedTensorsError, "decoders.9.norm1.weight"),
        ({}, ("predictor.cif_conv1d.bias",), MissingTensorsError, "cif_conv1d.bias"),
        ({}, ("decoder.embed.0.weight",), MissingTensorsError, "embed.0.weight"),
    ]
    for extra, drop, error, named in cases:
        bad = {k: v for k, v in sd.items() if k not in drop}
        bad.update(extra)
        torch.save(bad, model_pt)
        with pytest.raises(error, match=named.replace("[", r"\[").replace("]", r"\]")):
            load_recognizer(folder, enc_cfg)
    torch.save(sd, model_pt)
    rec = load_recognizer(folder, enc_cfg)
    assert rec.decoder.embed is None and len(rec.vocabulary) == TINY.vocab
    torch.testing.assert_close(rec.decoder.output_layer.weight, sd["decoder.output_layer.weight"])


@pytest.mark.parametrize("content,message", [
    ('{"0": "<blank>"}', "expected a JSON list"),
    ('["<blank>", 3]', "not strings at positions \\[1\\]"),
    ('["<blank>", "<s>", "</s>"]', "3 tokens, but the decoder has 48 outputs"),
    ("[not json", "not a readable JSON file"),
    (None, "not found"),
])
def test_vocabulary_is_checked(para_dir, content, message):
    folder, _, enc_cfg = para_dir
    path = os.path.join(folder, "tokens.json")
    if content is None:
        os.remove(path)
    else:
        with open(path, "w") as f:
            f.write(content)
    with pytest.raises(CheckpointError, match=message):
        load_recognizer(folder, enc_cfg)


@pytest.mark.parametrize("old,new,message", [
    ("decoder: ParaformerSANMDecoder", "decoder: FsmnDecoder", "decoder 'FsmnDecoder'"),
    ("predictor: CifPredictorV2", "predictor: CifPredictorV3", "predictor 'CifPredictorV3'"),
    ("sanm_shfit: 5", "sanm_shfit: 0", "look at later tokens"),
    ("att_layer_num: 2", "att_layer_num: 1", "att_layer_num` 1 != num_blocks 2"),
    ("idim: 32", "idim: 64", "idim` 64 != encoder output_size 32"),
    ("tail_threshold: 0.45", "tail_threshold: abc", "tail_threshold` must be a number"),
])
def test_recognizer_config_is_checked(para_dir, old, new, message):
    folder, _, enc_cfg = para_dir
    path = os.path.join(folder, "config.yaml")
    text = open(path).read()
    assert old in text
    with open(path, "w") as f:
        f.write(text.replace(old, new))
    with pytest.raises(ConfigError, match=message):
        load_recognizer(folder, enc_cfg)


def released_encoder_cfg():
    data = parse_inert_yaml(CONFIG_YAML.format(d=FULL.p_model, h=FULL.p_heads, f=FULL.p_ffn, n=FULL.p_blocks,
                                               m=FULL.n_mels))
    return parse_paraformer_config(data)


def meta_encoder(enc_cfg):
    with torch.device("meta"):
        return ParaformerEncoder(enc_cfg)


def test_absent_config_values_take_the_template_defaults():
    enc_cfg, _ = released_encoder_cfg()
    cfg = parse_asr_config({}, enc_cfg)
    assert (cfg.decoder_blocks, cfg.decoder_heads, cfg.decoder_units, cfg.decoder_kernel, cfg.decoder_shift) == \
        (16, 4, 2048, 11, 5)
    assert (cfg.l_order, cfg.r_order, cfg.threshold, cfg.tail_threshold, cfg.blank_id, cfg.sos_id, cfg.eos_id) == \
        (1, 1, 1.0, 0.45, 0, 1, 2)


def test_released_sizes_match_the_model():
    """FULL's recognizer tensors are exactly what the modules built from the released config hold,
    and with the encoder they make the 881 MB of model.pt."""
    enc_cfg, _ = released_encoder_cfg()
    data = parse_inert_yaml(RECOGNIZER_YAML.format(d=FULL.p_model, h=FULL.p_heads, f=FULL.d_ffn, n=FULL.d_blocks))
    cfg = parse_asr_config(data, enc_cfg)
    with torch.device("meta"):
        predictor, decoder = CifPredictor(cfg), ParaformerDecoder(cfg, FULL.vocab)
    model = {f"predictor.{k}": tuple(v.shape) for k, v in predictor.state_dict().items()}
    model.update({f"decoder.{k}": tuple(v.shape) for k, v in decoder.state_dict().items()})
    assert model == recognizer_shapes(FULL)
    assert model["decoder.output_layer.weight"] == (8501, 512) and model["predictor.cif_conv1d.weight"] == (512, 512, 3)
    assert len([k for k in model if k.endswith("src_attn.linear_k_v.weight")]) == 16
    encoder = sum(int(np.prod(v.shape)) for v in meta_encoder(enc_cfg).state_dict().values())
    total_mb = (encoder + sum(int(np.prod(s)) for s in model.values())) * 4 / 1e6
    assert 880 < total_mb < 881.5
    assert json.loads(json.dumps(vocabulary(FULL)))[:3] == ["<blank>", "<s>", "</s>"] and len(vocabulary(FULL)) == 8501
