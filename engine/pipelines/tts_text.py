"""What Step-Audio-TTS-3B reads: instruction tags, system prompts, the prompt's token ids (SPEC.md
§7.4, the official `tts.py`), long text cut into sentences, and a token budget per text.

The official assembly, id by id (every `enc` is the model's tokenizer with its BOS, as
`tokenizer.encode` of the released LlamaTokenizer gives it):

  [1] + [4] + enc("system\\n" + SYS) + [3]
      + [4] + enc("human\\n") + P_text + [3] + [4] + enc("assistant\\n") + prompt_code + [3]
      + [4] + enc("human\\n") + T_text + [3] + [4] + enc("assistant\\n")
  P_text = enc("\\n" + prompt_text)[len(enc("\\n")):]   (T_text likewise for the target text)

SYS is the RAP or humming prompt when the text's leading tag is (RAP) / (哼唱), else the prompt
naming the built-in speaker, else (a cloned voice) the one naming nobody.
"""
from __future__ import annotations

import math
import re

from ..special_tokens import AUDIO_TOKEN_OFFSET, AUDIO_TOKENS_END, BOS_ID, BOT_ID, EOT_ID

# The official system prompts (tts.py `sys_prompt_dict`), character for character.
_TAGS_DOC = ('作为一名卓越的声优演员，你的任务是根据文本中（）或()括号内标注的情感、语种或方言、音乐哼唱、语音调整等标签，'
             '以丰富细腻的情感和自然顺畅的语调来朗读文本。\n# 情感标签涵盖了多种情绪状态，包括但不限于：\n- "高兴1"\n- "高兴2"\n'
             '- "生气1"\n- "生气2"\n- "悲伤1"\n- "撒娇1"\n\n# 语种或方言标签包含多种语言或方言，包括但不限于：\n- "中文"\n'
             '- "英文"\n- "韩语"\n- "日语"\n- "四川话"\n- "粤语"\n- "广东话"\n\n# 音乐哼唱标签包含多种类型歌曲哼唱，包括但不限于：\n'
             '- "RAP"\n- "哼唱"\n\n# 语音调整标签，包括但不限于：\n- "慢速1"\n- "慢速2"\n- "快速1"\n- "快速2"\n\n')
SYS_RAP = "请参考对话历史里的音色，用RAP方式将文本内容大声说唱出来。"
SYS_HUMMING = "请参考对话历史里的音色，用哼唱的方式将文本内容大声唱出来。"
SYS_WITHOUT_SPEAKER = (_TAGS_DOC + "请在朗读时，根据这些情感标签的指示，调整你的情感、语气、语调和哼唱节奏，以确保文本的情感和意义得到准确而"
                       "生动的传达，如果没有()或（）括号，则根据文本语义内容自由演绎。")
SYS_WITH_SPEAKER = (_TAGS_DOC + "请在朗读时，使用[{}]的声音，根据这些情感标签的指示，调整你的情感、语气、语调和哼唱节奏，以确保文本的情感和"
                    "意义得到准确而生动的传达，如果没有()或（）括号，则根据文本语义内容自由演绎。")

# Tag values the model was trained on (the system prompt lists them "not limited to": others pass)
EMOTIONS = ("高兴1", "高兴2", "生气1", "生气2", "悲伤1", "撒娇1")
LANGUAGES = ("中文", "英文", "韩语", "日语", "四川话", "粤语", "广东话")
SPEEDS = ("慢速1", "慢速2", "快速1", "快速2")
MODES = {"normal": "", "rap": "RAP", "humming": "哼唱"}
MUSIC_TAGS = ("RAP", "哼唱")

_LEADING_TAG = re.compile(r"^([（\(][^\(\)()]*[）\)]).*$", re.DOTALL)
_LEADING_TAGS = re.compile(r"^(?:\s*[（\(][^\(\)()]*[）\)])+")
# sentence ends, half and full width; a segment is cut after them (and at line breaks)
_SENTENCE_END = re.compile(r"(?<=[。！？；!?;…])|(?<=[.](?=\s))|\n+")

TOKENS_PER_SECOND = 41.667
GROUP = 5          # one 2 + 3 group of audio tokens = 120 ms


def instruction_name(text: str) -> str:
    """The official `detect_instruction_name`: the first tag, when the text starts with one."""
    match = _LEADING_TAG.match(text)
    return match.group(1).strip("()（）") if match else ""


def compose_tags(mode: str = "normal", emotion: str | None = None, language: str | None = None,
                 speed: str | None = None) -> str:
    """The leading tags for the fields, in the official order (mode, emotion, language, speed:
    `tts_app.py` prefixes "(emotion)(language)(speed)", and a music mode's tag must come first)."""
    tags = [MODES[mode]] if MODES[mode] else []
    tags += [t for t in (emotion, language, speed) if t]
    return "".join(f"({t})" for t in tags)


def system_prompt(text: str, speaker: str | None) -> str:
    """SYS for a target text (tags included) and the built-in speaker's name (None: a clone)."""
    if instruction_name(text) in MUSIC_TAGS:
        return SYS_HUMMING if "哼唱" in text else SYS_RAP
    return SYS_WITH_SPEAKER.format(speaker) if speaker else SYS_WITHOUT_SPEAKER


def prompt_ids(encode, text: str, prompt_text: str, prompt_code: list[int], speaker: str | None) -> list[int]:
    """The LM prompt of SPEC §7.4. `encode(str) -> ids` is the model tokenizer's encode with its BOS
    (the official code calls `tokenizer.encode`, which adds it); `prompt_code` the voice prompt's
    interleaved audio ids; `speaker` the built-in speaker's name or None for a clone."""
    newline = len(encode("\n"))
    human, assistant = encode("human\n"), encode("assistant\n")
    ids = [BOS_ID, BOT_ID] + encode("system\n" + system_prompt(text, speaker)) + [EOT_ID]
    ids += [BOT_ID] + human + encode("\n" + prompt_text)[newline:] + [EOT_ID]
    ids += [BOT_ID] + assistant + list(prompt_code) + [EOT_ID]
    ids += [BOT_ID] + human + encode("\n" + text)[newline:] + [EOT_ID]
    ids += [BOT_ID] + assistant
    return ids


def split_tags(text: str) -> tuple[str, str]:
    """(leading tags, the rest) of a text."""
    match = _LEADING_TAGS.match(text)
    return (match.group(0).strip(), text[match.end():]) if match else ("", text)


def segments(text: str, max_chars: int = 120) -> list[str]:
    """The text cut at sentence ends into segments of at most `max_chars` characters where
    sentences allow (a longer sentence stays whole, unless it has commas to cut at); the leading
    tags go in front of every segment, so each is spoken the same way."""
    tags, body = split_tags(text)
    pieces = [p.strip() for p in _SENTENCE_END.split(body) if p and p.strip()]
    out: list[str] = []
    for piece in pieces:
        parts = [piece]
        if len(piece) > max_chars:                  # a run-on sentence: cut at commas too
            parts = [p for p in re.split(r"(?<=[，,、：:])", piece) if p.strip()]
        for part in parts:
            if out and len(out[-1]) + len(part) <= max_chars:
                out[-1] = out[-1] + (" " if out[-1][-1:].isascii() and part[:1].isascii() else "") + part
            else:
                out.append(part)
    return [tags + s for s in out] or ([tags] if tags else [])


def token_budget(text: str) -> int:
    """A cap on the audio tokens of one text, whole groups: 2 s plus 0.5 s a character (speech runs
    at about 0.15-0.3 s a character), so a model caught in a repetition loop stops."""
    seconds = 2.0 + 0.5 * len(split_tags(text)[1])
    return GROUP * math.ceil(seconds * TOKENS_PER_SECOND / GROUP)


def is_audio_id(token: int) -> bool:
    return AUDIO_TOKEN_OFFSET <= token < AUDIO_TOKENS_END


class AudioTokenFilter:
    """The LM's output ids -> the flow tokens (id - 65536) fit for the decoder: only ids in
    [65536, 70656), released in whole 5-token groups."""

    def __init__(self):
        self.pending: list[int] = []

    def push(self, ids: list[int]) -> list[int]:
        self.pending += [i - AUDIO_TOKEN_OFFSET for i in ids if is_audio_id(i)]
        n = len(self.pending) // GROUP * GROUP
        out, self.pending = self.pending[:n], self.pending[n:]
        return out
