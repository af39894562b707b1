"""OpenAI's `instructions` (free text such as "Speak in a cheerful tone, slowly") mapped to the tags
Step-Audio-TTS-3B was trained on. The model reads tags, not prose, so the words are matched against
a small vocabulary (English words and the tags themselves); what matches becomes the emotion,
language, speed tag or mode, what does not is ignored. Fields given explicitly win over words found
in `instructions`. The tags applied are reported back (X-Stepvox-Tags, the SSE done event)."""
from __future__ import annotations

import re

# (field, tag, pattern) in priority order: the first match of each field wins, so "very happy" is
# tried before "happy"
_RULES = [
    ("mode", "rap", r"\brap(ping)?\b"),
    ("mode", "humming", r"\bhum(ming|med)?\b|哼唱"),
    ("emotion", "高兴2", r"\bvery (happy|cheerful)\b|\b(excited|ecstatic|overjoyed|thrilled|elated)\b|高兴2"),
    ("emotion", "高兴1", r"\b(happy|cheerful|joyful|glad|upbeat|bright|positive)\b|高兴1?"),
    ("emotion", "生气2", r"\bvery angry\b|\b(furious|enraged|outraged|livid)\b|生气2"),
    ("emotion", "生气1", r"\b(angry|annoyed|irritated|mad)\b|生气1?"),
    ("emotion", "悲伤1", r"\b(sad|sorrowful|melancholy|melancholic|unhappy|gloomy|mournful)\b|悲伤1?"),
    ("emotion", "撒娇1", r"\b(coquettish|cute|coy|pouty|sweet|playful|flirty)\b|撒娇1?"),
    ("language", "四川话", r"\bsichuan(ese)?\b|四川话"),
    ("language", "广东话", r"广东话"),
    ("language", "粤语", r"\bcantonese\b|粤语"),
    ("language", "中文", r"\b(mandarin|chinese)\b|中文|普通话"),
    ("language", "英文", r"\benglish\b|英文|英语"),
    ("language", "韩语", r"\bkorean\b|韩语"),
    ("language", "日语", r"\bjapanese\b|日语"),
    ("speed", "慢速2", r"\bvery slow(ly)?\b|慢速2"),
    ("speed", "慢速1", r"\bslow(ly|er)?\b|慢速1?"),
    ("speed", "快速2", r"\bvery (fast|quick(ly)?)\b|快速2"),
    ("speed", "快速1", r"\b(fast|faster|quick(ly)?|rapid(ly)?)\b|快速1?"),
]
_COMPILED = [(field, tag, re.compile(pattern, re.IGNORECASE)) for field, tag, pattern in _RULES]


def tags_from_instructions(text: str | None) -> dict[str, str]:
    """{"emotion", "language", "speed", "mode"} found in `text` (absent keys: nothing found)."""
    found: dict[str, str] = {}
    if not text:
        return found
    for field, tag, pattern in _COMPILED:
        if field not in found and pattern.search(text):
            found[field] = tag
    return found
