"""AudioTokenizer (engine/audio/tokenizer.py) end to end on real (espeak-ng) speech: equals an
independent replay of the official wav2token path; batched equals unbatched; bucket-padded equals
plain; a live stream equals offline; interleave and string form; bad audio handling."""
from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import torch

from stepvox.engine.audio.tokenizer import AudioTokenizer, interleave, ids_to_text, num_groups
from stepvox.engine.device.graphs import bucket_batch, bucket_length
from stepvox.engine.errors import (AudioInputError, AudioTooShortError, ConfigError, InvalidRequestError,
                                   StreamClosedError)
from stepvox.engine.frontend.resample import resample
from stepvox.engine.models.paraformer import WINDOW_GEOMETRIC_AFTER, WINDOW_UNIT
from stepvox.engine.models.s3tokenizer import MEL_CAP, MEL_GEOMETRIC_AFTER, MEL_UNIT
from stepvox.engine.special_tokens import AUDIO_TOKEN_OFFSET, VQ06_OFFSET
from stepvox.testing.speech import espeak_wav
from stepvox.testing.tokenizer import TINY, write_tokenizer_dir

from stepvox.testing.official_tokenizer import official_wav2token

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello there, how are you today?",
         "Streaming tokens arrive every two hundred and forty milliseconds."]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, reference_kernels):
    root = str(tmp_path_factory.mktemp("tok"))
    fixture = write_tokenizer_dir(root, TINY, seed=5)
    tok = AudioTokenizer.from_pretrained(root, kernels=reference_kernels)
    speech = [espeak_wav(os.path.join(root, f"s{i}.wav"), t) for i, t in enumerate(TEXTS)]
    return tok, fixture, speech, root


@pytest.mark.parametrize("which", range(len(TEXTS)))
def test_encode_equals_official_path(setup, which):
    tok, fixture, speech, _ = setup
    wav, sr = speech[which]
    assert sr == 22050
    out = tok.tokenize(wav, sr)
    vq02, vq06, ids = official_wav2token(wav, sr, fixture, TINY)
    assert out.vq02 == vq02 and out.vq06 == vq06 and out.ids == ids
    assert len(ids) == 5 * num_groups(len(vq02), len(vq06)) > 0
    assert abs(len(vq02) - len(wav) / sr * 16000 / 960) <= 2 and abs(len(vq06) - len(wav) / sr * 25) <= 2


def test_encode_batch_equals_unbatched(setup):
    tok, _, speech, _ = setup
    wavs = [speech[0][0], speech[1][0][:9000], speech[2][0]]
    rates = [22050, 22050, 22050]
    wavs.append(resample(torch.from_numpy(speech[1][0]), 22050, 16000).numpy())
    rates.append(16000)
    batched = tok.tokenize_batch(wavs, rates)
    single = [tok.tokenize(w, r) for w, r in zip(wavs, rates)]
    for b, s in zip(batched, single):
        assert (b.vq02, b.vq06, b.ids) == (s.vq02, s.vq06, s.ids)
    assert len({len(b.ids) for b in batched}) == len(batched)          # really different lengths


def test_bucket_padded_path_equals_unpadded(setup, reference_kernels):
    """The eager path padded exactly like a graph replay (Paraformer windows to a window-count
    bucket, S3 pieces to a mel-length bucket and a power-of-two batch of silent pieces) gives the
    same codes as the unpadded path, for utterances alone and batched."""
    tok, _, speech, root = setup
    padded_tok = AudioTokenizer.from_pretrained(root, use_cuda_graphs=False, bucket_eager=True,
                                                kernels=reference_kernels)
    wavs = [speech[0][0], speech[1][0][:9000], speech[2][0], np.resize(speech[1][0], 22050 * 31)]

    def recorded(t):
        """Run `t` (a tokenizer) with its code models' bodies recording their input shapes."""
        seen = {"vq02": [], "vq06": []}
        body02, body06 = t.linguistic._offline_body, t.semantic._body
        t.linguistic._offline_body = lambda key, h, *a: (seen["vq02"].append(h.shape[0]), body02(key, h, *a))[1]
        t.semantic._body = lambda key, mel, mel_len: (seen["vq06"].append((tuple(mel.shape), key)),
                                                      body06(key, mel, mel_len))[1]
        try:
            return t.tokenize_batch(wavs, 22050), [t.tokenize(w, 22050) for w in wavs], seen
        finally:
            del t.linguistic._offline_body, t.semantic._body

    plain, plain_single, plain_seen = recorded(tok)
    padded, padded_single, seen = recorded(padded_tok)
    for a, b in zip(plain + plain_single, padded + padded_single):
        assert (a.vq02, a.vq06, a.ids) == (b.vq02, b.vq06, b.ids)
    assert plain == plain_single
    # the padded runs really were padded, to bucket sizes
    assert seen["vq02"][0] == bucket_length(plain_seen["vq02"][0], WINDOW_UNIT,
                                            geometric_after=WINDOW_GEOMETRIC_AFTER) > plain_seen["vq02"][0]
    assert all(w % WINDOW_UNIT == 0 for w in seen["vq02"])
    shapes = [shape for shape, _ in seen["vq06"]]
    assert all(b == bucket_batch(b) and t == bucket_length(t, MEL_UNIT, MEL_CAP, MEL_GEOMETRIC_AFTER)
               for b, _, t in shapes)
    plain_shapes = [shape for shape, _ in plain_seen["vq06"]]
    assert plain_shapes[0] == (5, 128, MEL_CAP) and shapes[0] == (8, 128, MEL_CAP)   # 5 pieces -> batch of 8
    assert all(t > pt for (_, _, t), (_, _, pt) in zip(shapes[1:4], plain_shapes[1:4]))  # lengths padded


@pytest.mark.parametrize("rate", [16000, 48000, 44101])     # 44101 Hz: the soxr path, offline and live
def test_stream_equals_offline(setup, rate):
    tok, _, speech, _ = setup
    wav22, _ = speech[2]
    wav = resample(torch.from_numpy(wav22), 22050, rate)
    offline = tok.tokenize(wav, rate, energy_norm=False)
    stream = tok.stream("call-1", sample_rate=rate)
    assert tok.stream("call-1") is stream                        # sessions are looked up by id
    with pytest.raises(AudioInputError, match="open at"):
        tok.stream("call-1", sample_rate=rate + 1)
    got = {"vq02": [], "vq06": [], "ids": []}
    rng = np.random.default_rng(rate)
    i, first_code_at = 0, None
    while i < wav.numel():
        n = int(rng.integers(50, rate // 5))
        upd = stream.feed(wav[i:i + n])
        i += n
        if upd.vq02 and first_code_at is None:
            first_code_at = i
        for k in got:
            got[k] += getattr(upd, k)
    upd = stream.finish()
    for k in got:
        got[k] += getattr(upd, k)
    assert got["vq02"] == offline.vq02 and got["vq06"] == offline.vq06 and got["ids"] == offline.ids
    held_back = 0.06 * rate if rate == 44101 else 0     # libsoxr's streaming delay (~20 ms of output)
    assert first_code_at <= rate * 0.24 + rate // 5 + 1 + held_back     # codes arrive with the first 240 ms
    assert "call-1" not in tok.open_sessions()                          # finished sessions are forgotten
    with pytest.raises(StreamClosedError):
        stream.feed(wav[:100])


def test_stream_vq06_and_ids_flush_per_30s_piece(setup):
    tok, _, _, _ = setup
    g = torch.Generator().manual_seed(0)
    wav = 0.2 * torch.randn(16000 * 31, generator=g)
    stream = tok.stream()
    first = stream.feed(wav[:480000 - 1])
    second = stream.feed(wav[480000 - 1:480000])
    rest = stream.feed(wav[480000:])
    last = stream.finish()
    assert first.vq06 == [] and first.ids == [] and len(first.vq02) > 100
    assert len(second.vq06) == 750 and len(second.ids) > 0             # the first 30 s piece is complete
    assert rest.vq06 == [] and len(last.vq06) == 25


def test_interleave_and_text_form():
    vq02 = [1, 2, 3, 4, 5]
    vq06 = [10, 11, 12, 13, 14, 15, 16]
    ids = interleave(vq02, vq06)
    assert ids == [AUDIO_TOKEN_OFFSET + 1, AUDIO_TOKEN_OFFSET + 2, VQ06_OFFSET + 10, VQ06_OFFSET + 11,
                   VQ06_OFFSET + 12, AUDIO_TOKEN_OFFSET + 3, AUDIO_TOKEN_OFFSET + 4, VQ06_OFFSET + 13,
                   VQ06_OFFSET + 14, VQ06_OFFSET + 15]                 # remainder (5, 16) dropped
    assert ids_to_text(ids[:5]) == "<audio_1><audio_2><audio_1034><audio_1035><audio_1036>"
    assert interleave(vq02, vq06, start_group=1) == ids[5:]
    assert interleave([1], [1, 2, 3]) == []


def test_bad_audio(setup):
    tok, _, speech, _ = setup
    wav, sr = speech[1]
    with pytest.raises(AudioInputError, match="empty"):
        tok.encode(np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioTooShortError, match="too short"):
        tok.encode(wav[:800], sr)
    assert tok.tokenize(wav[:800], sr, allow_empty=True).ids == []
    bad = wav.copy()
    bad[100] = np.nan
    with pytest.raises(AudioInputError, match="NaN"):
        tok.encode(bad, sr)
    with pytest.raises(AudioInputError, match="below 16000"):
        tok.encode(wav, 8000)
    with pytest.raises(AudioInputError, match="sample rate must be an integer"):
        tok.encode(wav, 22050.5)
    with pytest.raises(AudioInputError, match="dtype"):
        tok.encode((wav * 100).astype(np.uint8), sr)
    with pytest.raises(AudioInputError, match="channels"):
        tok.encode(np.stack([wav, wav], axis=1), sr)            # (samples, channels)
    with pytest.raises(AudioInputError, match="peaks"):
        tok.encode(wav * 32768, sr)                             # int-scaled floats
    with pytest.raises(AudioInputError, match="#1"):
        tok.encode_batch([wav, wav[:0]], sr)
    # documented handling
    ref = tok.encode(wav, sr)
    assert tok.encode(np.stack([wav, wav]), sr) == ref                         # stereo: channel mean
    assert tok.encode((wav * 32767).astype(np.int16), sr) == \
        tok.encode(np.round(wav * 32767) / 32768, sr)                          # int16: / 2**15
    assert tok.encode(torch.from_numpy(wav).double(), sr) == ref               # float64 accepted
    clipped = np.clip(wav * 4, -1, 1)
    assert len(tok.encode(clipped, sr)) == len(ref)                            # clipped: tokenized as is


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_stream_with_graphs_equals_offline(tmp_path, dtype):
    write_tokenizer_dir(str(tmp_path), TINY, seed=5)
    tok = AudioTokenizer.from_pretrained(str(tmp_path), device="cuda", dtype=dtype)
    wav, sr = espeak_wav(str(tmp_path / "speech.wav"), TEXTS[2])
    offline = tok.tokenize(wav, sr, energy_norm=False)
    stream = tok.stream(sample_rate=sr)
    got = []
    for i in range(0, wav.size, 1234):
        got += stream.feed(wav[i:i + 1234]).ids
    got += stream.finish().ids
    assert got == offline.ids
    batched = tok.tokenize_batch([wav, wav[:30000]], sr)
    assert batched[1].ids == tok.tokenize(wav[:30000], sr).ids


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_offline_graphs_equal_padded_eager(tmp_path, dtype):
    """Graph replays give the codes of the eager path padded the same way; graphs are reused."""
    write_tokenizer_dir(str(tmp_path), TINY, seed=5)
    tok = AudioTokenizer.from_pretrained(str(tmp_path), device="cuda", dtype=dtype)
    sr = 22050
    t = np.arange(sr * 3) / sr                             # a voiced synthetic signal (no espeak-ng needed)
    wav = (0.3 * np.sin(2 * np.pi * (150 + 40 * np.sin(3 * t)) * t) * np.abs(np.sin(4 * t))
           + 0.01 * np.random.default_rng(0).standard_normal(t.size)).astype(np.float32)
    wavs = [wav, wav[:30000], np.resize(wav, sr * 31)]
    graphs = tok.tokenize_batch(wavs, sr)
    single = tok.tokenize(wavs[0], sr)
    count = tok.graph_count
    assert count >= 3                                      # Paraformer + S3 buckets of the batch and single call
    assert tok.tokenize_batch(wavs, sr) == graphs and tok.graph_count == count
    eager_tok = AudioTokenizer.from_pretrained(str(tmp_path), device="cuda", dtype=dtype, use_cuda_graphs=False,
                                               bucket_eager=True)
    eager = eager_tok.tokenize_batch(wavs, sr)
    assert eager == graphs and graphs[0] == single
    assert eager_tok.warmup(3.0, (1, 2)) == 0              # no-op when graphs are off
    assert tok.warmup(3.0, (1, 2)) == tok.graph_count > count


# ---------------------------------------------------------------- stream sessions: rates, close/abort, idle timeout
def test_stream_sample_rate_is_checked(setup):
    tok, _, speech, _ = setup
    for bad, message in [(0, "0 Hz is below 16000 Hz"), (8000, "8000 Hz is below"), (-5, "below"),
                         ("abc", "integer number of Hz"), (16000.5, "integer number of Hz"), (10 ** 6, "above")]:
        with pytest.raises(AudioInputError, match=message):
            tok.stream("rate-check", sample_rate=bad)
        assert "rate-check" not in tok.open_sessions()
    assert tok.stream(sample_rate=None).sample_rate == 16000 and tok.stream(sample_rate=22050.0).sample_rate == 22050
    s = tok.stream("rate-check", 22050)
    with pytest.raises(AudioInputError, match="open at 22050 Hz, not 16000"):
        tok.stream("rate-check", 16000)
    with pytest.raises(AudioInputError, match="integer number of Hz"):
        s.feed(speech[0][0][:100], sample_rate="x")
    with pytest.raises(InvalidRequestError, match="session id must be a string"):
        tok.stream(["not", "hashable"])
    assert tok.close("rate-check")


def test_close_and_abort_forget_at_once(setup):
    tok, _, speech, _ = setup
    wav, sr = speech[0]
    for end in ("close", "abort"):
        s = tok.stream("call-x", sr)
        assert s.feed(wav[:sr]).vq02                            # mid-stream, with state held
        assert getattr(tok, end)("call-x") is True
        assert "call-x" not in tok.open_sessions() and s.resampler is None and s.piece is None
        with pytest.raises(StreamClosedError, match=f"stream 'call-x' is {end}"):
            s.feed(wav[sr:2 * sr])
        with pytest.raises(StreamClosedError, match=end):
            s.finish()
        assert getattr(tok, end)("call-x") is False             # nothing left to end
    # the id can be used again; the old object's close does not touch the new session
    fresh = tok.stream("call-x", sr)
    assert fresh is not s and fresh.feed(wav[:sr]).vq02
    s.close()
    assert "call-x" in tok.open_sessions()
    fresh.close()
    assert "call-x" not in tok.open_sessions()
    with pytest.raises(StreamClosedError, match="is closed"):
        fresh.feed(wav[:100])


def test_abort_during_a_feed_drops_its_output(setup):
    tok, _, speech, _ = setup
    wav, sr = speech[1]
    s = tok.stream("call-busy", sr)
    entered, release = threading.Event(), threading.Event()
    original = s.resampler.push          # a resampler step that waits until the abort has happened

    def slow_push(piece):
        entered.set()
        release.wait(5)
        return original(piece)

    s.resampler.push = slow_push
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("update", s.feed(wav[:sr])))
    worker.start()
    assert entered.wait(5)
    assert tok.abort("call-busy")
    assert s.closed and s.resampler is not None                 # state kept while the feed runs
    release.set()
    worker.join(10)
    assert result["update"].vq02 == [] and s.resampler is None  # no output after the abort; state let go
    with pytest.raises(StreamClosedError, match="aborted"):
        s.feed(wav[:100])


def test_idle_sessions_expire(setup):
    tok, _, speech, _ = setup
    wav, sr = speech[0]
    short = AudioTokenizer(tok.linguistic, tok.features, tok.semantic, stream_idle_timeout_s=1.0)
    assert tok.stream_idle_timeout_s == 300.0
    old = short.stream("old", sr)
    old.feed(wav[:sr])
    anonymous = short.stream(None, sr)
    time.sleep(0.6)
    kept = short.stream("kept", sr)
    time.sleep(0.6)                                             # "old" idle 1.2 s, "kept" 0.6 s
    assert short.open_sessions() == ["kept"]                    # dropped by the check, no thread needed
    assert old.resampler is None
    with pytest.raises(StreamClosedError, match=r"'old' is expired: not fed for 1 s \(stream_idle_timeout_s\)"):
        old.feed(wav[sr:2 * sr])
    with pytest.raises(StreamClosedError, match="expired"):
        anonymous.feed(wav[:sr])                                # an unregistered stream expires as well
    assert kept.feed(wav[:sr]).vq02 and short.stream("old", sr) is not old    # a new session under the id
    for bad in (0, -1, float("nan"), "300", None, True):
        with pytest.raises(ConfigError, match="stream_idle_timeout_s must be a number of seconds > 0"):
            AudioTokenizer(tok.linguistic, tok.features, tok.semantic, stream_idle_timeout_s=bad)
