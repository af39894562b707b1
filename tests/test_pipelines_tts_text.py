"""The TTS prompt text: tags, system prompts, segmentation, token budgets, output hygiene."""
from __future__ import annotations

from stepvox.engine.pipelines.tts_text import (SYS_HUMMING, SYS_RAP, SYS_WITH_SPEAKER, SYS_WITHOUT_SPEAKER,
                                               AudioTokenFilter, compose_tags, instruction_name, prompt_ids,
                                               segments, split_tags, system_prompt, token_budget)


def test_official_instruction_detection():
    assert instruction_name("(RAP)abc") == "RAP"
    assert instruction_name("（哼唱）你从一座叫") == "哼唱"           # full-width parentheses
    assert instruction_name("(高兴1)(英文)hello") == "高兴1"          # only the first tag
    assert instruction_name("hello (RAP)") == ""
    assert instruction_name("(Humming (哼唱))x") == ""               # the official app's broken nesting


def test_tags_compose_in_the_official_order():
    assert compose_tags() == ""
    assert compose_tags("normal", "高兴1", "英文", "慢速1") == "(高兴1)(英文)(慢速1)"
    assert compose_tags("rap", "生气2") == "(RAP)(生气2)"
    assert compose_tags("humming") == "(哼唱)"
    assert compose_tags("normal", "custom-emotion") == "(custom-emotion)"   # "not limited to" these


def test_system_prompts():
    assert system_prompt("(RAP)yo", "Tingting") == SYS_RAP
    assert system_prompt("(哼唱)la", None) == SYS_HUMMING
    assert system_prompt("(RAP)哼唱 in the text", "Tingting") == SYS_HUMMING   # official: "哼唱" anywhere
    assert system_prompt("hello", "Tingting") == SYS_WITH_SPEAKER.format("Tingting")
    assert "[Tingting]" in system_prompt("hello", "Tingting")
    assert system_prompt("hello", None) == SYS_WITHOUT_SPEAKER
    assert SYS_WITHOUT_SPEAKER.startswith("作为一名卓越的声优演员") and SYS_WITHOUT_SPEAKER.endswith("自由演绎。")


def test_prompt_ids_follow_the_spec_assembly():
    vocab = {}

    def encode(text):          # a stand-in tokenizer: BOS then one id per character
        return [1] + [vocab.setdefault(c, 100 + len(vocab)) for c in text]

    code = [65536 + 5, 65536 + 6, 66560 + 7, 66560 + 8, 66560 + 9]
    ids = prompt_ids(encode, "hi", "pt", code, "Tingting")
    e = encode
    nl = len(e("\n"))
    want = ([1, 4] + e("system\n" + SYS_WITH_SPEAKER.format("Tingting")) + [3]
            + [4] + e("human\n") + e("\npt")[nl:] + [3] + [4] + e("assistant\n") + code + [3]
            + [4] + e("human\n") + e("\nhi")[nl:] + [3] + [4] + e("assistant\n"))
    assert ids == want


def test_segments_cut_at_sentences_and_keep_the_tags():
    assert segments("(高兴1)你好。今天天气很好！We go. Then?", 10) == \
        ["(高兴1)你好。今天天气很好！", "(高兴1)We go.", "(高兴1)Then?"]
    assert segments("one. two. three.", 100) == ["one. two. three."]
    long = "，".join(["一二三四五"] * 10) + "。"
    parts = segments(long, 20)
    assert len(parts) > 1 and "".join(parts) == long and all(len(p) <= 20 for p in parts)
    assert segments("a\n\nb", 1) == ["a", "b"] and segments("a\n\nb") == ["a b"]
    assert split_tags("(RAP)(高兴1)yo") == ("(RAP)(高兴1)", "yo")


def test_token_budget_grows_with_the_text_in_whole_groups():
    short, long = token_budget("你好"), token_budget("你好" * 50)
    assert short % 5 == 0 and long % 5 == 0
    assert short >= 41 * 2 and long > 10 * short // 2
    assert token_budget("(RAP)你好") == short                     # tags are not spoken


def test_audio_token_filter_keeps_whole_groups_of_speech_ids():
    f = AudioTokenFilter()
    assert f.push([65536, 3, 70656, 65537, 1, 66560]) == []      # 3 speech ids so far
    assert f.push([66561, 66562, 65538]) == [0, 1, 1024, 1025, 1026]
    assert f.push([70655]) == []
    assert f.pending == [2, 5119]
