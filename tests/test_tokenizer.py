"""Step1Tokenizer (engine/tokenizer.py) against the official tokenizer: the ids that
`transformers.AutoTokenizer.from_pretrained(folder).encode(text)` gives under transformers 4.48.3
(the official requirements' pin) for a Llama-shaped fixture folder like the release's
(tokenizer.model + tokenizer_config.json), on the TTS prompt's own pieces and on text that probes
every rule: leading / repeated spaces, tabs, newlines, byte fallback, added tokens."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hst

from stepvox.engine.errors import InvalidRequestError
from stepvox.engine.pipelines.tts_text import (SYS_HUMMING, SYS_RAP, SYS_WITH_SPEAKER, SYS_WITHOUT_SPEAKER,
                                               prompt_ids)
from stepvox.engine.tokenizer import Step1Tokenizer
from stepvox.testing.step1 import write_tokenizer

HF_VERSION = "4.48.3"

TRANSCRIPTS = ["你好，世界。今天天气很好。", "Hello world, how are you today?",
               "我们一起说话吧 and then we talk about Step Audio.", "(高兴1)(英文)The quick brown fox.",
               "（生气1）你怎么又迟到了！", "(RAP)yo yo check it", "(哼唱)啦啦啦", "(高兴1)(英文)(慢速1)hi"]

TEXTS = [
    # the TTS prompt's pieces (SPEC §7.4)
    "\n", "human\n", "assistant\n", "system\n" + SYS_WITH_SPEAKER.format("Tingting"),
    "system\n" + SYS_WITHOUT_SPEAKER, "system\n" + SYS_RAP, "system\n" + SYS_HUMMING,
    *["\n" + t for t in TRANSCRIPTS], *TRANSCRIPTS,
    # whitespace
    "", " ", "  ", "\t", "\n\n", " hello", "  hello", "   hello", "hello ", "hello  ", "a  b", "a   b",
    "a\tb", "\ta", " \n x", "line one\n\nline three\n", "\r\n", "x\u3000y\u00a0z", "\u2581hello", "a\u2581b",
    # byte fallback, numbers, rare characters
    "😀", "emoji 😀🎉 end", "𠀀𠀁 rare", "ÅÉÎõü", "Ω≈ç√", "x\x00y", "1234567890", "3.14159 and 2,000,000",
    "２０２４年", "The quick brown fox jumps over the lazy dog.", "Speech turns into tokens.",
    # added tokens alone, inside text, at the start and at the end
    "<audio_0>", "<audio_5119>", "<audio_5>", " <audio_5>", "<audio_5> x", "x <audio_5>", "x<audio_5>y",
    "<audio_12><audio_1030><audio_7>", "说<audio_1>话", "<|BOT|>", "<|EOT|>", "<|BOT|>human\n你好<|EOT|>",
    "<|BOT|> hello", "a <|BOT|> b", "a<|EOT|>\n", "<|BOT|>system\n" + SYS_RAP + "<|EOT|><|BOT|>assistant\n",
    "<s>", "</s>", "<unk>", "<s> hi", "x</s>y", "<audio_1><|BOT|><s>",
    # look-alikes that are text to HF: strings of byte and unused pieces, non-canonical audio tokens
    "<0x41>", "a<0x0A>b", "<unused_400>", "ab<unused_400>", "<audio_05>", "<audio_>", "<audio_5", "audio_5>",
    "<|BOT|", "< |EOT|>",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tokenizer(str(tmp_path_factory.mktemp("step1-tokenizer")))


@pytest.fixture(scope="module")
def ours(folder):
    return Step1Tokenizer.from_folder(folder)


@pytest.fixture(scope="module")
def hf(folder):
    transformers = pytest.importorskip("transformers")
    if transformers.__version__ != HF_VERSION:
        pytest.skip(f"the official ids are those of transformers=={HF_VERSION} (found "
                    f"{transformers.__version__}; 5.x builds a different tokenizer from the same files)")
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert type(tok).__name__ == "LlamaTokenizerFast"        # what the official code runs
    return tok


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(ours, hf, text):
    assert ours.encode(text, add_bos=True) == hf.encode(text)
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_transformers(ours, hf, text):
    ids = hf.encode(text)
    assert ours.decode(ids, skip_special=False) == hf.decode(ids)
    if "<|" not in text:        # the engine also drops <|BOT|>/<|EOT|>, which HF counts as text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)


_FRAGMENTS = hst.sampled_from([" ", "  ", "\n", "\t", "a", "the", "fox", "Hello", "speech", "你好", "世界", "。", "，",
                               "😀", "é", "1", "42", "<", ">", "_", "|", "<audio_3>", "<audio_1024>", "<audio_",
                               "<|BOT|>", "<|EOT|>", "<s>", "<0x41>", "(高兴1)", "▁", "\u3000"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hst.lists(_FRAGMENTS | hst.text(max_size=3), max_size=12).map("".join))
def test_encode_matches_transformers_on_random_text(ours, hf, text):
    assert ours.encode(text, add_bos=True) == hf.encode(text)


@pytest.mark.parametrize("speaker", ["Tingting", None])
def test_tts_prompt_matches_transformers(ours, hf, speaker):
    code = [65536 + 3, 65536 + 7, 66560 + 1, 66560 + 2, 66560 + 4000]
    for text in ("(高兴1)(英文)Hello there.", "你好，世界。", "(RAP)yo", "(哼唱)啦啦"):
        for prompt_text in ("希望你以后能够做的比我还好呦。", "this is my voice"):
            assert (prompt_ids(lambda s: ours.encode(s, add_bos=True), text, prompt_text, code, speaker)
                    == prompt_ids(hf.encode, text, prompt_text, code, speaker))


def test_rules_that_make_the_official_ids(ours):
    """What the official tokenizer does, spelt out (each checked against transformers above)."""
    enc = lambda s: ours.encode(s, add_bos=True)          # noqa: E731
    space = ours.sp.piece_to_id("\u2581")
    assert enc("\n") == [1, space, ours.sp.piece_to_id("<0x0A>")]     # '▁' in front, newline a byte
    assert enc(" hello") == enc("hello")                    # a leading space is the '▁' itself
    assert enc("  hello") == [1, space] + enc("hello")[1:]
    assert enc("<|BOT|>hello")[2] != space and enc("<|BOT|> hello")[2] == space   # none after an added token
    assert enc("x<audio_5><audio_7>y")[-3:] == [65541, 65543, ours.sp.piece_to_id("y")]
    assert enc("<s></s><unk>") == [1, 1, 2, 0]


def test_out_of_range_audio_codes_are_refused(ours):
    assert ours.encode("<audio_5119>") == [65536 + 5119]
    for text in ("<audio_5120>", "x <audio_99999> y", "<audio_" + "9" * 5000 + ">"):
        with pytest.raises(InvalidRequestError, match="audio codes run from 0 to 5119"):
            ours.encode(text)


# " x" encodes as "x"; text "<0x41>" is the byte piece, which decodes to "A" (in HF too)
@pytest.mark.parametrize("text", [t for t in TEXTS if t[:1] not in (" ", "\u2581") and "<0x" not in t])
def test_decode_round_trips(ours, text):
    assert ours.decode(ours.encode(text), skip_special=False) == text.replace("\u2581", " ")
    if not any(s in text for s in ("<|", "<s>", "</s>", "<unk>")):
        assert ours.decode(ours.encode(text, add_bos=True)) == text.replace("\u2581", " ")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hst.text(hst.characters(blacklist_categories=("Cs",)), max_size=40).filter(
    lambda t: t[:1] not in (" ", "\u2581") and "<" not in t and "\u2581" not in t))
def test_decode_round_trips_random_text(ours, text):
    assert ours.decode(ours.encode(text, add_bos=True)) == text


def test_decode_keeps_the_space_after_a_special_token(ours):
    ids = ours.encode("<audio_5> hello <|EOT|> bye")
    assert ours.decode(ids, skip_special=False) == "<audio_5> hello <|EOT|> bye"
    assert ours.decode(ids) == "<audio_5> hello  bye"
    # a dropped <|BOT|> still holds its place (streamed text and whole text agree); HF's <s> does not
    assert ours.decode(ours.encode("<|BOT|> hi")) == " hi" and ours.decode(ours.encode("<s> hi")) == "hi"
