"""The Paraformer's output vocabulary (`tokens.json`) and how FunASR turns its tokens into text.

tokens.json is a JSON list of strings, one per decoder output (8501 in the release); FunASR's
CharTokenizer maps id i to entry i. [inferred from FunASR's conventions, as tokens.json was not
readable:] id 0 is `<blank>`, 1 `<s>`, 2 `</s>`, the last `<unk>`; the model's blank / sos / eos
ids come from config.yaml's `model_conf` (FunASR defaults 0 / 1 / 2) and are dropped from the
decoded ids; the strings `<s>`, `</s>`, `<unk>`, `<OOV>` are dropped from the text.

Text (FunASR `sentence_postprocess`, rendered anew): English BPE pieces end in `@@` and glue to
the next piece; a whole English word is followed by a space, which a following CJK character
removes; CJK characters and digits are written without spaces; a run of single ASCII letters
separated by spaces becomes one upper-case abbreviation ("a b c" -> "ABC"); a trailing `@@`
piece that no word completes is dropped; the result is stripped. Two classification details are
kept as FunASR has them: whether the whole token list counts as "all CJK" compares each token
string as a whole (so digits and multi-character tokens starting with a CJK character count),
while the per-token test of the mixed case looks at every character.
"""
from __future__ import annotations

import json
import os

from ..errors import CheckpointError

DROPPED_STRINGS = frozenset({"<s>", "</s>", "<unk>", "<OOV>"})
BPE_CONTINUATION = "@@"
# continuations that can change text already written (a space taken back before a CJK character,
# a single letter joining an abbreviation); streams commit what all of them leave in place
_PROBES = (("中",), ("a",), ("word",))


def _cjk_or_digit(s: str) -> bool:
    # FunASR's isChinese: a string comparison (for one character, a range test), '@' included
    return "\u4e00" <= s <= "\u9fff" or "0" <= s <= "9" or s == "@"


def _cleaned(s: str) -> str:
    for special in (" ", "</s>", "<s>", "<unk>", "<OOV>"):
        s = s.replace(special, "")
    return s


def _all_cjk(items) -> bool:
    items = [_cleaned(i) for i in items]
    return bool(items) and all(_cjk_or_digit(i) for i in items)


def _all_alpha(items) -> bool:
    items = [_cleaned(i) for i in items]
    return bool(items) and all((i.isalpha() or i == "'") and not (i.isalpha() and _cjk_or_digit(i))
                               for i in items)


def _single_letter(piece: str) -> bool:
    return len(piece) == 1 and piece.isascii() and piece.isalpha()


def _join_abbreviations(pieces: list[str]) -> list[str]:
    """Runs `x`, " ", `y` (, " ", `z` ...) of single ASCII letters become one upper-case piece."""
    out, i, n = [], 0, len(pieces)
    while i < n:
        end = i
        while end + 2 < n and _single_letter(pieces[end]) and pieces[end + 1] == " " \
                and _single_letter(pieces[end + 2]):
            end += 2
        if end > i:
            out.append("".join(p.upper() for p in pieces[i:end + 1:2]))
            i = end + 1
        else:
            out.append(pieces[i])
            i += 1
    return out


def tokens_to_text(tokens: list[str]) -> str:
    """FunASR's sentence_postprocess of decoded token strings (see the module docstring)."""
    words = [t for t in tokens if t not in DROPPED_STRINGS]
    pieces: list[str] = []
    if _all_cjk(words):
        pieces = [w.replace(" ", "") for w in words]
    elif _all_alpha(words):
        for w in words:
            pieces += [w, " "]
    else:
        pending = ""             # BPE pieces of an unfinished English word
        after_word = False       # an English word was written last (a space, or what followed it)
        for w in words:
            if w and all(_cjk_or_digit(ch) for ch in w):
                if after_word:
                    pieces.pop()     # FunASR drops the last piece here, whatever it is
                pieces.append(w)
                after_word = False
            elif BPE_CONTINUATION in w:
                pending += w.replace(BPE_CONTINUATION, "")
                after_word = False
            elif _all_alpha(list(w)):
                pieces += [pending + w, " "]
                pending = ""
                after_word = True
            else:
                pieces.append(w)
    return "".join(_join_abbreviations(pieces)).strip()


def committed_text(tokens: list[str]) -> str:
    """The part of `tokens_to_text(tokens)` that no further token can change: what a stream may
    hand out before the utterance ends."""
    texts = [tokens_to_text(tokens)] + [tokens_to_text(list(tokens) + list(p)) for p in _PROBES]
    common = texts[0]
    for t in texts[1:]:
        n = 0
        while n < min(len(common), len(t)) and common[n] == t[n]:
            n += 1
        common = common[:n]
    return common


class Vocabulary:
    """tokens.json: id -> token string, and the ids decoding leaves out."""

    def __init__(self, tokens: list[str], blank_id: int = 0, sos_id: int = 1, eos_id: int = 2):
        self.tokens = list(tokens)
        self.dropped_ids = frozenset({blank_id, sos_id, eos_id})

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def from_json(cls, path: str | os.PathLike, size: int, blank_id: int = 0, sos_id: int = 1,
                  eos_id: int = 2) -> "Vocabulary":
        """Read and check tokens.json: a JSON list of `size` strings (the decoder's output size)."""
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                tokens = json.load(f)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: not found (the Paraformer's vocabulary, needed for speech "
                                  "recognition)") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable JSON file ({type(exc).__name__}: {exc})") from None
        if not isinstance(tokens, list):
            raise CheckpointError(f"{path}: expected a JSON list of token strings, found {type(tokens).__name__}")
        bad = [i for i, t in enumerate(tokens) if not isinstance(t, str)]
        if bad:
            raise CheckpointError(f"{path}: entries that are not strings at positions {bad[:8]}")
        if len(tokens) != size:
            raise CheckpointError(f"{path}: {len(tokens)} tokens, but the decoder has {size} outputs "
                                  "(decoder.output_layer in model.pt)")
        for name, i in (("blank", blank_id), ("sos", sos_id), ("eos", eos_id)):
            if not 0 <= i < size:
                raise CheckpointError(f"{path}: the {name} id {i} (config.yaml model_conf) is outside the "
                                      f"{size}-token vocabulary")
        return cls(tokens, blank_id, sos_id, eos_id)

    def kept_ids(self, ids: list[int]) -> list[int]:
        """The decoder's argmax ids without blank / sos / eos, as FunASR filters them."""
        return [i for i in ids if i not in self.dropped_ids]

    def strings(self, ids: list[int]) -> list[str]:
        return [self.tokens[i] for i in ids]
