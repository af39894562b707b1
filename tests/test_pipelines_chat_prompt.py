"""The voice chat's prompt: messages in OpenAI and official shapes, the chat template against an
independent rendering of SPEC §7.3 encoded by the official tokenizer (transformers 4.48.3), audio
parts in every input format against AudioTokenizer.encode, and the streaming sentence splitter."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import soundfile as sf

from stepvox.engine.audio.tokenizer import AudioTokenizer
from stepvox.engine.errors import AudioInputError, AudioTooLongError, InvalidRequestError
from stepvox.engine.frontend.audio_bytes import decode_audio_bytes
from stepvox.engine.pipelines.chat_messages import AudioClip, AudioTokens, parse_messages
from stepvox.engine.pipelines.chat_template import prompt_ids, render
from stepvox.engine.pipelines.sentences import SentenceSplitter
from stepvox.engine.tokenizer import Step1Tokenizer
from stepvox.testing.speech import espeak_wav
from stepvox.testing.step1 import write_tokenizer
from stepvox.testing.tokenizer import TINY, write_tokenizer_dir


HF_VERSION = "4.48.3"
SYSTEM = "适配用户的语言，用简短口语化的文字回答"


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    return write_tokenizer(str(tmp_path_factory.mktemp("chat-tokenizer")))


@pytest.fixture(scope="module")
def ours(text_folder):
    return Step1Tokenizer.from_folder(text_folder)


@pytest.fixture(scope="module")
def hf(text_folder):
    transformers = pytest.importorskip("transformers")
    if transformers.__version__ != HF_VERSION:
        pytest.skip(f"the official ids are those of transformers=={HF_VERSION}")
    return transformers.AutoTokenizer.from_pretrained(text_folder)


@pytest.fixture(scope="module")
def audio_tokenizer(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("audio-tokenizer"))
    write_tokenizer_dir(folder, TINY, seed=0)
    return AudioTokenizer.from_pretrained(folder, device="cpu")


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    wav, rate = espeak_wav(str(tmp_path_factory.mktemp("speech") / "q.wav"), "what is the weather like today")
    return wav.astype(np.float32), rate


def official_string(messages, audio_text) -> str:
    """SPEC §7.3 / stepaudio.py apply_chat_template, written once more: `audio_text(part)` gives the
    <audio_N> string of an audio part."""
    out = ""
    for msg in messages:
        role = "human" if msg["role"] == "user" else msg["role"]
        content = msg["content"]
        if content is None:
            out += f"<|BOT|>{role}\n"
            continue
        parts = content if isinstance(content, list) else [content]
        body = ""
        for p in parts:
            if isinstance(p, str):
                body += p
            elif p["type"] == "text":
                body += p["text"]
            else:
                body += audio_text(p)
        out += f"<|BOT|>{role}\n{body}<|EOT|>"
    if not out.endswith("<|BOT|>assistant\n"):
        out += "<|BOT|>assistant\n"
    return out


def tokens_part(ids):
    return {"type": "audio_tokens", "audio_tokens": ids}


def audio_string(part):
    return "".join(f"<audio_{i - 65536}>" for i in part["audio_tokens"])


A1 = [65536 + 5, 65536 + 900, 66560 + 3, 66560 + 4095, 66560 + 17]
A2 = [65536 + 1023, 65536 + 0, 66560 + 100, 66560 + 200, 66560 + 300] * 3

HISTORIES = {
    "text": [{"role": "user", "content": "你好，我是你的朋友，我叫小明，你叫什么名字？"}],
    "system+text": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello there!"}],
    "audio": [{"role": "user", "content": [tokens_part(A1)]}],
    "official dict": [{"role": "user", "content": {"type": "text", "text": "hi  there\n"}}],
    "mixed parts": [{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": [{"type": "text", "text": "Listen: "}, tokens_part(A1),
                                                 {"type": "text", "text": " and "}, tokens_part(A2)]}],
    "multi-turn": [{"role": "system", "content": SYSTEM},
                   {"role": "user", "content": [tokens_part(A2)]},
                   {"role": "assistant", "content": "今天天气很好。 We can go out."},
                   {"role": "user", "content": "What about tomorrow?"},
                   {"role": "assistant", "content": "(高兴1)Tomorrow it rains."},
                   {"role": "user", "content": [tokens_part(A1), {"type": "text", "text": "谢谢"}]}],
    "open assistant turn": [{"role": "user", "content": "说一句话"}, {"role": "assistant", "content": None}],
    "open user turn": [{"role": "user", "content": None}],
    "ends with assistant": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    "special text": [{"role": "user", "content": "<audio_7> and <|EOT|> typed as text"}],
}


@pytest.mark.parametrize("name", list(HISTORIES))
def test_prompt_ids_equal_official_template_encoded_by_transformers(name, ours, hf):
    messages = HISTORIES[name]
    parsed = parse_messages(messages)
    official = official_string(messages, audio_string)
    assert render(parsed) == official
    assert prompt_ids(ours, parsed) == hf.encode(official)       # turn by turn == the whole string at once


@pytest.mark.parametrize("name", list(HISTORIES))
def test_turn_by_turn_ids_equal_whole_string_ids(name, ours):
    parsed = parse_messages(HISTORIES[name])
    assert prompt_ids(ours, parsed) == ours.encode(render(parsed), add_bos=True)


def _encoded(samples, rate, fmt) -> dict:
    if fmt == "pcm16":
        data = (np.clip(samples, -1, 1) * 32767).round().astype("<i2").tobytes()
        spec = {"data": base64.b64encode(data).decode(), "format": "pcm16", "sample_rate": rate}
    else:
        buf = io.BytesIO()
        container = {"wav": "WAV", "flac": "FLAC", "mp3": "MP3", "ogg": "OGG"}[fmt]
        subtype = {"mp3": "MPEG_LAYER_III", "ogg": "VORBIS"}.get(fmt, "PCM_16")
        sf.write(buf, samples, rate, format=container, subtype=subtype)
        spec = {"data": base64.b64encode(buf.getvalue()).decode(), "format": fmt}
    return {"type": "input_audio", "input_audio": spec}


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "ogg", "pcm16"])
def test_audio_parts_in_every_format_tokenize_like_the_audio_tokenizer(fmt, speech, audio_tokenizer):
    from stepvox.engine.pipelines.voice_chat import VoiceChat
    samples, rate = speech
    part = _encoded(samples, rate, fmt)
    decoded, decoded_rate = decode_audio_bytes(base64.b64decode(part["input_audio"]["data"]), "t", 60,
                                               format=fmt, pcm_rate=rate)
    expected = audio_tokenizer.encode(decoded, decoded_rate)
    chat = VoiceChat.__new__(VoiceChat)            # prepare() needs only the audio tokenizer
    chat.audio_tokenizer, chat.max_audio_seconds = audio_tokenizer, 120.0
    prepared = chat.prepare([{"role": "user", "content": [part]}])
    got = prepared[0].parts[0]
    assert isinstance(got, AudioTokens) and list(got.ids) == expected and len(expected) > 0
    if fmt in ("wav", "flac", "pcm16"):            # lossless: the very samples the file was made from
        assert list(got.ids) == audio_tokenizer.encode((np.clip(samples, -1, 1) * 32767).round() / 32768, rate)


def test_numpy_and_path_parts(speech, audio_tokenizer, tmp_path):
    from stepvox.engine.pipelines.voice_chat import VoiceChat
    samples, rate = speech
    path = str(tmp_path / "q.wav")
    sf.write(path, samples, rate, subtype="FLOAT")
    chat = VoiceChat.__new__(VoiceChat)
    chat.audio_tokenizer, chat.max_audio_seconds = audio_tokenizer, 120.0
    expected = audio_tokenizer.encode(samples, rate)
    by_array = chat.prepare([{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": samples, "sample_rate": rate}}]}])
    by_path = chat.prepare([{"role": "user", "content": {"type": "audio", "audio": path}}])   # official shape
    assert list(by_array[0].parts[0].ids) == expected == list(by_path[0].parts[0].ids)
    assert isinstance(by_path[0].parts[0].clip, AudioClip)


@pytest.mark.parametrize("messages, match", [
    ("hello", "list"),
    ([], "empty"),
    ([{"role": "robot", "content": "x"}], "role"),
    ([{"role": "user"}], "no content"),
    ([{"role": "user", "content": None}, {"role": "user", "content": "x"}], "only the last"),
    ([{"role": "user", "content": []}], "empty list"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "type"),
    ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "text"),
    ([{"role": "assistant", "content": [tokens_part(A1)]}], "user messages only"),
    ([{"role": "user", "content": [tokens_part([5, 6])]}], "not an audio token"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "!!", "format": "wav"}}]}],
     "base64"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA"}}]}], "format"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "aiff"}}]}],
     "unknown audio format"),
    ([{"role": "user", "content": [{"type": "input_audio",
                                    "input_audio": {"data": base64.b64encode(b"not audio").decode(), "format": "wav"}}]}],
     "soundfile"),
])
def test_bad_messages_get_typed_errors(messages, match):
    with pytest.raises(InvalidRequestError, match=match):
        parse_messages(messages)


def test_paths_refused_where_not_allowed(tmp_path):
    with pytest.raises(InvalidRequestError, match="paths are not accepted"):
        parse_messages([{"role": "user", "content": {"type": "audio", "audio": "/etc/passwd"}}], allow_paths=False)
    with pytest.raises(AudioInputError):
        parse_messages([{"role": "user", "content": {"type": "audio", "audio": str(tmp_path / "none.wav")}}])


def test_audio_limits_refused_from_the_header():
    rate = 16000
    buf = io.BytesIO()
    sf.write(buf, np.zeros(rate * 5, np.float32), rate, format="WAV")
    with pytest.raises(AudioTooLongError, match="at most 2 s"):
        decode_audio_bytes(buf.getvalue(), "q", 2.0)
    part = _encoded(np.zeros(rate * 5, np.float32), rate, "wav")
    with pytest.raises(AudioTooLongError):
        parse_messages([{"role": "user", "content": [part]}], max_audio_seconds=2.0)
    with pytest.raises(AudioInputError, match="below"):
        decode_audio_bytes(b"\0\0" * 800, "q", 2.0, format="pcm16", pcm_rate=8000)
    with pytest.raises(AudioInputError, match="whole number"):
        decode_audio_bytes(b"\0\0\0", "q", 2.0, format="pcm16", pcm_rate=16000)


# ---------------------------------------------------------------- sentences
def split(text: str, step: int = 1, **kw) -> list[str]:
    s = SentenceSplitter(**kw)
    out = []
    for i in range(0, len(text), step):
        out += s.push(text[i:i + step])
    return out + s.finish()


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_sentences_cut_as_text_streams_in(step):
    assert split("你好！今天天气很好。我们去公园吧？好的", step) == ["你好！", "今天天气很好。", "我们去公园吧？", "好的"]
    assert split("Hello there. Pi is 3.14 today... Really?! Yes.\nNew line", step) == [
        "Hello there.", "Pi is 3.14 today...", "Really?!", "Yes.", "New line"]
    assert split('He said "hi." Then left.', step) == ['He said "hi."', "Then left."]


def test_leading_tags_stay_with_their_sentence_and_carry_over():
    assert split("(高兴1)你好！今天天气很好。") == ["(高兴1)你好！", "(高兴1)今天天气很好。"]
    assert split("(高兴1)。你好") == ["(高兴1)。你好"]                     # a tag alone is not spoken alone
    assert split("（生气1）（粤语）你又迟到了！下次早点。") == ["（生气1）（粤语）你又迟到了！", "（生气1）（粤语）下次早点。"]
    assert split("Look (not. cut. inside) here. Next") == ["Look (not. cut. inside) here.", "Next"]
    assert split("...!!") == []


def test_long_sentences_cut_at_commas():
    first = split("今天天气很好，我们一起去公园散步吧，然后再去吃饭，好吗？", first_comma_chars=12)
    assert first == ["今天天气很好，我们一起去公园散步吧，", "然后再去吃饭，好吗？"]
    long = split("这是一个很长的句子，" * 30 + "结束。", first_comma_chars=None, max_chars=60)
    assert all(len(s) <= 60 for s in long) and "".join(long) == "这是一个很长的句子，" * 30 + "结束。"


@pytest.mark.parametrize("step", [1, 7, 100000])
def test_text_without_punctuation_is_still_cut(step):
    """A model may write on without a sentence end (random weights always do): it is spoken in
    pieces of at most max_chars, cut at spaces where there are some, never as one endless sentence."""
    words = " ".join(f"word{i}" for i in range(400))
    pieces = split(words, step, max_chars=50, first_comma_chars=None)
    assert all(len(p) <= 50 for p in pieces) and " ".join(pieces) == words
    assert all(p.startswith("word") and p[-1].isdigit() for p in pieces)     # no word is cut
    han = "天" * 1234
    pieces = split(han, step, max_chars=50, first_comma_chars=None)
    assert [len(p) for p in pieces] == [50] * 24 + [34] and "".join(pieces) == han
    unclosed = "(" + "x" * 500
    pieces = split(unclosed, step, max_chars=50, first_comma_chars=None)
    assert all(len(p) <= 100 for p in pieces) and "".join(pieces) == unclosed
