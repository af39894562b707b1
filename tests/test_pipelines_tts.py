"""stepvox TTS end to end on tiny random folders of the three releases (real formats): prompt ids
against an independent rendering of SPEC §7.4, voices (built-in, clone, registered across a
restart), modes and the Music decoder, streaming against offline, long text, formats, errors."""
from __future__ import annotations

import concurrent.futures
import io
import json
import os
import threading
import time

import numpy as np
import pytest
import soundfile as sf
import torch

from stepvox.engine.config import EngineConfig
from stepvox.engine.errors import AudioInputError, AudioTooShortError, ConfigError, InvalidRequestError
from stepvox.engine.frontend.audio_formats import FORMATS, OPUS_RATES, RATES
from stepvox.engine.pipelines.audio import Audio
from stepvox.engine.pipelines.tts import TTS, TTS_PREFILL_WHILE_DECODING, tagged_text
from stepvox.engine.pipelines.tts_text import (SYS_HUMMING, SYS_RAP, SYS_WITH_SPEAKER, SYS_WITHOUT_SPEAKER,
                                               token_budget)
from stepvox.engine.pipelines.voices import UnknownVoiceError, VoiceExistsError, VoiceRef, VoiceRegistry, check_name
from stepvox.testing.speech import espeak_wav
from stepvox.testing.tts import SPEAKERS, write_tts_folders

SMALL = dict(max_tokens=40, seed=3)          # keep the CPU runs short: 40 audio tokens ~ 1 s of speech


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return write_tts_folders(str(tmp_path_factory.mktemp("tts")))


@pytest.fixture(scope="module")
def tts(folders, tmp_path_factory):
    t = TTS.from_pretrained(folders["model"], folders["tokenizer"], folders["speakers"], device="cpu",
                            kernel_backend="reference", max_model_len=2048, num_kv_pages=256,
                            voices_dir=str(tmp_path_factory.mktemp("voices")))
    yield t
    t.shutdown()


@pytest.fixture(scope="module")
def reference_wav(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ref") / "ref.wav")
    espeak_wav(path, "this is my voice, please clone it for me")
    return path


def spec_prompt(encode, sys_prompt, prompt_text, prompt_code, text):
    """SPEC.md §7.4 written out once more, independently of stepvox's assembly."""
    head = encode("\n")
    return ([1] + [4] + encode(f"system\n{sys_prompt}") + [3]
            + [4] + encode("human\n") + encode("\n" + prompt_text)[len(head):] + [3]
            + [4] + encode("assistant\n") + prompt_code + [3]
            + [4] + encode("human\n") + encode("\n" + text)[len(head):] + [3]
            + [4] + encode("assistant\n"))


SYS_TAG_DOC_START = "作为一名卓越的声优演员"


def test_prompt_ids_of_each_kind_follow_the_spec(tts, reference_wav):
    tok = tts.engine.engine.tokenizer
    encode = lambda s: tok.encode(s, add_bos=True)  # noqa: E731 - the official tokenizer.encode adds BOS
    reg = tts.voice_registry
    ting, rap, hum = reg.get("Tingting"), reg.get("TingtingRAP"), reg.get("Tingting哼唱")
    assert tts.prompt_token_ids("你好。", "Tingting") == spec_prompt(
        encode, SYS_WITH_SPEAKER.format("Tingting"), ting.transcript, ting.prompt_code, "你好。")
    assert tts.prompt_token_ids("hi", "Tingting", emotion="高兴1", language="英文", speed="慢速1") == spec_prompt(
        encode, SYS_WITH_SPEAKER.format("Tingting"), ting.transcript, ting.prompt_code, "(高兴1)(英文)(慢速1)hi")
    assert tts.prompt_token_ids("yo", "Tingting", mode="rap") == spec_prompt(
        encode, SYS_RAP, rap.transcript, rap.prompt_code, "(RAP)yo")
    assert tts.prompt_token_ids("la", "Tingting", mode="humming") == spec_prompt(
        encode, SYS_HUMMING, hum.transcript, hum.prompt_code, "(哼唱)la")
    assert tts.prompt_token_ids("(RAP)yo", "Tingting") == tts.prompt_token_ids("yo", "Tingting", mode="rap")
    clone = VoiceRef(reference_wav, "this is my voice")
    ids = tts.prompt_token_ids("hi", clone=clone)
    code = tts.tokenizer.encode(*_wav(reference_wav), trim=True)
    assert ids == spec_prompt(encode, SYS_WITHOUT_SPEAKER, "this is my voice", code, "hi")
    assert SYS_WITHOUT_SPEAKER.startswith(SYS_TAG_DOC_START)
    assert ids[:3] == [1, 4, 1] and ids[-1] != 3          # ends with "assistant\n": the model speaks next


def _wav(path):
    samples, rate = sf.read(path, dtype="float32")
    return samples, rate


def test_builtin_voices_come_from_the_speakers_folder(tts):
    assert tts.voices() == sorted(SPEAKERS)
    v = tts.voice_registry.get("Tingting")
    assert v.builtin and v.transcript == SPEAKERS["Tingting"]
    assert len(v.prompt_code) % 5 == 0 and all(65536 <= i < 70656 for i in v.prompt_code)
    assert v.prompt.tokens.tolist() == [i - 65536 for i in v.prompt_code]
    assert v.prompt.mel.shape[1] == 80 and v.prompt.embedding.numel() == 192


def test_synthesize_and_stream_agree(tts):
    audio = tts.synthesize("你好。", "Tingting", **SMALL)
    chunks = list(tts.stream("你好。", "Tingting", **SMALL))
    assert isinstance(audio, Audio) and audio.sample_rate == 22050 and audio.samples.dtype == np.float32
    assert len(chunks) > 1                                        # audio arrives before the end
    joined = np.concatenate([c.samples for c in chunks])
    assert joined.size == audio.samples.size > 0
    np.testing.assert_allclose(joined, audio.samples, atol=1e-5)
    # no step at the chunk joints bigger than the signal's own steps
    steps = np.abs(np.diff(joined))
    joints = np.cumsum([c.samples.size for c in chunks])[:-1]
    assert steps[joints - 1].max() <= steps.max()


def test_long_text_is_segmented_and_joins_smoothly(tts, monkeypatch):
    prompts = []
    real = tts.engine.generate

    def spy(prompt, params=None, request_id=None):
        prompts.append((prompt, params))
        return real(prompt, params, request_id)

    monkeypatch.setattr(tts.engine, "generate", spy)
    text = "第一句话。" + "Second sentence here. " * 8 + "最后一句！"
    audio = tts.synthesize(text, "Tingting", emotion="高兴1", **SMALL)
    assert len(prompts) >= 2
    tok = tts.engine.engine.tokenizer
    for prompt, params in prompts:
        assert params.max_tokens == SMALL["max_tokens"] and params.repetition_aware and params.top_k == 50
        assert "(高兴1)" in tok.decode(prompt)                  # every segment keeps the tags
    assert audio.duration > 0 and np.isfinite(audio.samples).all() and np.abs(audio.samples).max() <= 1.0


def test_mode_selects_the_music_decoder(tts, monkeypatch):
    used = []
    for name in ("decoder", "music_decoder"):
        dec = getattr(tts, name)
        real = dec.open_stream
        monkeypatch.setattr(dec, "open_stream", lambda *a, real=real, name=name, **k: used.append(name) or real(*a, **k))
    tts.synthesize("yo", "Tingting", mode="rap", **SMALL)
    tts.synthesize("la", "Tingting", mode="humming", **SMALL)
    tts.synthesize("(RAP)yo", "Tingting", **SMALL)
    tts.synthesize("hello", "Tingting", **SMALL)
    assert used == ["music_decoder", "music_decoder", "music_decoder", "decoder"]


def test_default_sampling_is_the_official_one(tts, monkeypatch):
    seen = []
    real = tts.engine.generate
    monkeypatch.setattr(tts.engine, "generate", lambda p, params=None, request_id=None: seen.append(params)
                        or real(p, params, request_id))
    decoded = []
    tok = tts.engine.engine.tokenizer
    real_decode = tok.decode
    monkeypatch.setattr(tok, "decode", lambda *a, **k: decoded.append(a) or real_decode(*a, **k))
    tts.synthesize("好。", "Tingting", max_tokens=10)
    p = seen[0]
    assert (p.temperature, p.top_k, p.top_p, p.repetition_aware) == (0.7, 50, 1.0, True)
    assert p.detokenize is False and decoded == []             # audio ids are never decoded to text
    seen.clear()
    tts.synthesize("好。", "Tingting")
    assert seen[0].max_tokens == token_budget("好。")


def test_a_seed_repeats_and_greedy_is_available(tts):
    a = tts.synthesize("好。", "Tingting", **SMALL)
    b = tts.synthesize("好。", "Tingting", **SMALL)
    g = tts.synthesize("好。", "Tingting", temperature=0.0, max_tokens=40)
    np.testing.assert_array_equal(a.samples, b.samples)
    assert g.duration > 0


def test_speed_factor_and_volume(tts):
    base = tts.synthesize("好。", "Tingting", **SMALL)
    fast = tts.synthesize("好。", "Tingting", speed_factor=1.5, **SMALL)
    loud = tts.synthesize("好。", "Tingting", volume=3.0, **SMALL)
    assert abs(fast.samples.size - base.samples.size / 1.5) < 0.02 * base.samples.size
    assert np.abs(loud.samples).max() <= 0.99 + 1e-6                 # clipping guarded
    assert np.abs(loud.samples).max() > np.abs(base.samples).max()
    with pytest.raises(InvalidRequestError):
        tts.synthesize("好。", "Tingting", speed_factor=5.0)
    with pytest.raises(InvalidRequestError):
        tts.synthesize("好。", "Tingting", volume=float("nan"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_round_trips_at_every_rate(fmt):
    t = np.arange(22050) / 22050
    audio = Audio((0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32), 22050)
    for rate in RATES:
        if fmt == "opus" and rate not in OPUS_RATES:
            with pytest.raises(AudioInputError, match="Opus"):
                audio.to_bytes(fmt, rate)
            continue
        data = audio.to_bytes(fmt, rate)
        if fmt == "pcm":
            back = np.frombuffer(data, "<i2").astype(np.float32) / 32767
            got_rate = rate
        else:
            back, got_rate = sf.read(io.BytesIO(data), dtype="float32")
        assert got_rate == rate
        assert abs(back.size - rate) <= 0.05 * rate                  # 1 s (codecs pad a little)
        spectrum = np.abs(np.fft.rfft(back))
        assert abs(np.argmax(spectrum) * rate / back.size - 330) < 5
    with pytest.raises(AudioInputError, match="format"):
        audio.to_bytes("aac")
    with pytest.raises(AudioInputError, match="rate"):
        audio.to_bytes("wav", 11025)


def test_save_uses_the_extension(tmp_path):
    audio = Audio(np.zeros(2205, np.float32), 22050)
    for ext in ("wav", "flac", "mp3", "ogg"):
        path = audio.save(tmp_path / f"a.{ext}")
        assert sf.info(path).samplerate in (22050, 24000)
    with pytest.raises(AudioInputError):
        audio.save(tmp_path / "a.xyz")


def test_clone_and_registered_voice_survive_a_restart(folders, reference_wav, tmp_path):
    voices = str(tmp_path / "voices")
    kw = dict(device="cpu", kernel_backend="reference", max_model_len=2048, num_kv_pages=256, voices_dir=voices)
    with TTS.from_pretrained(folders["model"], folders["tokenizer"], None, **kw) as tts:
        samples, rate = _wav(reference_wav)
        tts.register_voice("me", samples, "this is my voice", sample_rate=rate)
        assert tts.voices() == ["me"]
        first = tts.voice_registry.get("me")
        a = tts.synthesize("hello", "me", **SMALL)
        clone = tts.synthesize("hello", clone=VoiceRef(reference_wav, "this is my voice"), **SMALL)
        np.testing.assert_array_equal(a.samples, clone.samples)      # a clone is the registered voice, once
    assert sorted(os.listdir(voices)) == ["me.flac", "me.json", "me.safetensors"]
    with TTS.from_pretrained(folders["model"], folders["tokenizer"], None, **kw) as tts:
        calls = []
        real = tts.tokenizer.encode
        tts.tokenizer.encode = lambda *x, **k: calls.append(1) or real(*x, **k)
        again = tts.voice_registry.get("me")
        assert calls == []                                           # reloaded, not recomputed
        assert again.prompt_code == first.prompt_code and again.transcript == first.transcript
        torch.testing.assert_close(again.prompt.mel, first.prompt.mel)
        np.testing.assert_array_equal(tts.synthesize("hello", "me", **SMALL).samples, a.samples)
        tts.remove_voice("me")
        assert tts.voices() == [] and os.listdir(voices) == []
        with pytest.raises(UnknownVoiceError):
            tts.remove_voice("me")


def test_a_voice_of_other_model_files_is_remade_from_its_kept_audio(tts, reference_wav, tmp_path, monkeypatch):
    """A registered voice whose files were made by other model files is recomputed on load from its
    kept audio, read as every reference file is (frontend read_wav: [channels, samples], then the
    one input policy), so a multi-channel file is averaged rather than taken for [samples, channels]."""
    voices = tmp_path / "voices"
    samples, rate = _wav(reference_wav)
    old = VoiceRegistry(tts.tokenizer, tts.decoder, str(voices), fingerprint="old-model-files")
    first = old.register("me", samples, "this is my voice", rate)
    kept, kept_rate = sf.read(voices / "me.flac", dtype="float32")
    assert kept_rate == rate and kept.shape == samples.shape                  # mono, as registered
    sf.write(voices / "me.flac", np.stack([kept, kept], axis=1), rate, format="FLAC")   # a stereo copy
    calls = []
    real = tts.tokenizer.encode
    monkeypatch.setattr(tts.tokenizer, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    new = VoiceRegistry(tts.tokenizer, tts.decoder, str(voices), fingerprint="new-model-files")
    again = new.get("me")
    assert calls == [1]                                                        # recomputed, once
    assert again.prompt_code == first.prompt_code and again.transcript == first.transcript
    torch.testing.assert_close(again.prompt.mel, first.prompt.mel)
    torch.testing.assert_close(again.prompt.embedding, first.prompt.embedding)
    assert json.loads((voices / "me.json").read_text(encoding="utf-8"))["models"] == "new-model-files"
    assert sf.info(voices / "me.flac").channels == 1                           # kept again as mono
    calls.clear()
    assert VoiceRegistry(tts.tokenizer, tts.decoder, str(voices), "new-model-files").get("me").prompt_code \
        == first.prompt_code and calls == []                                   # now reloaded as it is
    (voices / "me.flac").write_bytes(b"not audio")
    with pytest.raises(ConfigError, match="'me' cannot be read"):
        VoiceRegistry(tts.tokenizer, tts.decoder, str(voices), "yet-other-model-files")


def test_voice_names_are_whole_and_taken_once(tts, reference_wav):
    """A name is checked whole ("bob\\n" is refused); of two registrations of one name, the second is
    refused while the first is still being made (the name is reserved under the registry's lock)."""
    assert check_name("bob - 2_x") == "bob - 2_x"
    for bad in ("bob\n", "bob\r\n", "\nbob", "bad/name", "", "x" * 65):
        with pytest.raises(InvalidRequestError, match="a voice name is"):
            check_name(bad)
    reg = VoiceRegistry(tts.tokenizer, tts.decoder)
    samples, rate = _wav(reference_wav)
    gate, real_make = threading.Event(), reg.make
    reg.make = lambda *a, **k: gate.wait(30) and real_make(*a, **k)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(reg.register, "me", samples, "this is my voice", rate)
        deadline = time.monotonic() + 30
        while "me" not in reg._reserved:
            assert time.monotonic() < deadline and not first.done()
            time.sleep(0.01)
        with pytest.raises(VoiceExistsError, match="'me' exists"):
            reg.register("me", samples, "this is my voice", rate)
        gate.set()
        first.result(timeout=60)
    with pytest.raises(VoiceExistsError):
        reg.register("me", samples, "this is my voice", rate)
    assert reg.names() == ["me"] and not reg._reserved
    reg.remove("me")
    reg.register("me", samples, "this is my voice", rate)          # free again once removed
    assert reg.names() == ["me"]


def test_errors_are_typed(tts, folders, reference_wav, tmp_path):
    with pytest.raises(UnknownVoiceError, match="Tingting"):          # lists the known ones
        tts.synthesize("hi", "Nobody")
    with pytest.raises(InvalidRequestError, match="empty"):
        tts.synthesize("   ", "Tingting")
    with pytest.raises(InvalidRequestError, match="mode"):
        tts.synthesize("hi", "Tingting", mode="opera")
    with pytest.raises(InvalidRequestError, match="parenthes"):
        tts.synthesize("hi", "Tingting", emotion="(高兴1)")
    with pytest.raises(AudioInputError):
        tts.synthesize("hi", clone=VoiceRef(np.array(["not", "audio"]), "x", 16000))
    with pytest.raises(AudioInputError):
        tts.synthesize("hi", clone=VoiceRef(str(tmp_path / "missing.wav"), "x"))
    rate = 16000
    with pytest.raises(AudioTooShortError):
        tts.synthesize("hi", clone=VoiceRef(np.zeros(rate // 2, np.float32), "x", rate))
    with pytest.raises(AudioInputError, match="30"):
        tts.synthesize("hi", clone=VoiceRef(np.zeros(31 * rate, np.float32), "x", rate))
    with pytest.raises(InvalidRequestError, match="transcript"):
        tts.synthesize("hi", clone=VoiceRef(reference_wav, ""))
    with pytest.raises(InvalidRequestError):
        tts.register_voice("../escape", reference_wav, "x")
    bad = tmp_path / "speakers"
    bad.mkdir()
    (bad / "speakers_info.json").write_text('{"A": "text", "B": "text"}', encoding="utf-8")
    sf.write(bad / "A_prompt.wav", np.zeros(16000, np.float32), 16000)
    sf.write(bad / "C_prompt.wav", np.zeros(16000, np.float32), 16000)
    with pytest.raises(ConfigError, match="disagree"):
        tts.voice_registry.load_speakers(str(bad))


def test_a_cancelled_stream_frees_its_pages_at_once(tts):
    bm = tts.engine.engine.block_manager
    stream = tts.stream("一二三四五六七八九十。", "Tingting", max_tokens=400, seed=1)
    next(stream)
    assert bm.num_free_pages < bm.num_pages
    stream.close()
    deadline = time.monotonic() + 2.0
    while bm.num_free_pages < bm.num_pages and time.monotonic() < deadline:     # the engine thread frees them
        time.sleep(0.01)
    assert bm.num_free_pages == bm.num_pages


def test_limits_are_arguments_named_in_their_errors(tts, reference_wav):
    assert tagged_text("x" * 20, max_chars=20).endswith("x" * 20)
    with pytest.raises(InvalidRequestError, match="max_text_chars"):
        tagged_text("x" * 21, max_chars=20)
    with pytest.raises(InvalidRequestError, match="max_text_chars"):
        tts.synthesize("x" * (tts.max_text_chars + 1))
    samples, rate = sf.read(reference_wav, dtype="float32")
    assert samples.size > 2 * rate
    short = VoiceRegistry(tts.tokenizer, tts.decoder, max_reference_seconds=1.5)
    with pytest.raises(AudioInputError, match="max_reference_seconds"):
        short.make("a", samples[:int(2.0 * rate)], "some words", rate)
    assert short.make("a", samples[:int(1.4 * rate)], "some words", rate).prompt_code
    for bad in (0.5, 1e9, "30", float("nan")):     # below the 1 s minimum, above the decoder's prompt cap
        with pytest.raises(ConfigError, match="max_reference_seconds"):
            VoiceRegistry(tts.tokenizer, tts.decoder, max_reference_seconds=bad)


def test_warm_up_speaks_with_a_builtin_voice_and_frees_its_pages(tts):
    free = tts.engine.engine.block_manager.num_free_pages
    assert tts.warm_up() is True
    bm = tts.engine.engine.block_manager
    deadline = time.monotonic() + 10
    while bm.num_free_pages < free and time.monotonic() < deadline:     # the engine thread frees them
        time.sleep(0.01)
    assert bm.num_free_pages == free
    with pytest.raises(UnknownVoiceError):
        tts.warm_up("nobody")


def test_speech_prompts_go_in_small_pieces_while_others_decode(tts):
    # the TTS engine's own default (speech streams are deadlines), below the engine's general one
    assert tts.engine.engine.ecfg.max_prefill_while_decoding == TTS_PREFILL_WHILE_DECODING < \
        EngineConfig().max_prefill_while_decoding
    assert tts.engine.engine.scheduler.max_prefill_while_decoding == TTS_PREFILL_WHILE_DECODING
