"""Text arriving token by token, cut into sentences that can be spoken while the rest is written.

A sentence ends after 。！？；!?; or … (a run of them, and closing quotes or brackets after it),
after '.' followed by white space (so 3.14 and file.txt stay whole; a '.' at the end of what has
arrived waits for the next character), and at line breaks. Nothing is cut inside parentheses, so a
tag such as (高兴1) stays whole, and a piece holding only tags or punctuation is not spoken alone:
it goes in front of the next sentence. A sentence running past `max_chars` is cut at its last
comma, else at its last space, else right there (text without any punctuation, as a model may
write, is still spoken in pieces), and at twice `max_chars` even inside parentheses. The first
sentence also ends at a comma once it has `first_comma_chars` characters, so that the first audio
does not wait for a long first sentence. The answer's leading tags go in front of every later
sentence too, as the TTS does with the segments of one text (tts_text.segments), so the whole
answer is spoken the same way.
"""
from __future__ import annotations

import re

from .tts_text import split_tags

_ENDS = "。！？；!?;…"
_CLOSERS = "”’」』）)]】\"'"
_COMMAS = "，,、：:"
_OPEN, _CLOSE = "(（", ")）"
_SPOKEN = re.compile(r"\w")          # a piece with no letter or digit is not spoken alone


class SentenceSplitter:
    def __init__(self, max_chars: int = 120, first_comma_chars: int | None = 12):
        self.max_chars = max_chars
        self.first_comma_chars = first_comma_chars
        self.buffer = ""
        self.carry = ""               # tags or punctuation waiting for the next sentence
        self.leading_tags: str | None = None      # the answer's, once its first sentence is out

    def push(self, text: str) -> list[str]:
        """Add text; return the sentences it completes."""
        self.buffer += text
        out = []
        while True:
            cut = self._cut(self.buffer)
            if cut is None:
                break
            piece, self.buffer = self.buffer[:cut], self.buffer[cut:]
            sentence = self._emit(piece)
            if sentence:
                out.append(sentence)
        return out

    def finish(self) -> list[str]:
        """The rest, as the last sentence (if it holds anything to speak)."""
        rest, self.buffer = self.buffer, ""
        sentence = self._emit(rest, last=True)
        return [sentence] if sentence else []

    def _cut(self, text: str) -> int | None:
        """The end of the first complete sentence in `text`, or None."""
        depth, last_comma, last_space = 0, None, None
        for i, ch in enumerate(text):
            if i + 1 >= 2 * self.max_chars:
                return i + 1             # an unclosed parenthesis does not hold everything back
            if ch in _OPEN:
                depth += 1
            elif ch in _CLOSE and depth:
                depth -= 1
            if depth:
                continue
            if ch == "\n":
                return i + 1
            if ch in _ENDS or ch == ".":
                j = i + 1
                while j < len(text) and (text[j] in _ENDS or text[j] in _CLOSERS or text[j] == "."):
                    j += 1
                if j == len(text):
                    return None          # the run (or what follows a '.') may go on
                if ch == "." and text[i + 1:j].strip(".") == "" and not text[j].isspace():
                    continue             # 3.14, file.txt, ...: not an end
                return j
            if ch in _COMMAS:
                last_comma = i + 1
                if (self.leading_tags is None and self.first_comma_chars is not None
                        and len(split_tags(text[:i])[1].strip()) >= self.first_comma_chars):
                    return last_comma
            elif ch.isspace():
                last_space = i + 1
            if i + 1 >= self.max_chars:
                return last_comma or last_space or i + 1
        return None

    def _emit(self, piece: str, last: bool = False) -> str:
        text = self.carry + piece
        if not last and not _SPOKEN.search(split_tags(text.strip())[1]):
            self.carry = text            # only tags or punctuation: wait for words to go with them
            return ""
        self.carry = ""
        text = text.strip()
        if not _SPOKEN.search(split_tags(text)[1]):
            return ""
        if self.leading_tags is None:
            self.leading_tags = split_tags(text)[0]
        elif self.leading_tags:
            text = self.leading_tags + text
        return text
