"""Step1 text tokenizer: the folder's SentencePiece model plus the audio and turn tokens.

`<audio_N>` always maps to id 65536 + N and `<|BOT|>`/`<|EOT|>` to their ids (SPEC.md §7), whether
or not the SentencePiece model knows those strings as pieces: the text is split on them first, so
each stays one token and nothing of it reaches SentencePiece.
"""
from __future__ import annotations

import os
import re

import sentencepiece as spm

from . import special_tokens as st
from .errors import CheckpointError, InvalidRequestError

_SPECIAL = re.compile(r"<audio_(\d+)>|<\|BOT\|>|<\|EOT\|>")


class Step1Tokenizer:
    def __init__(self, model_file: str, vocab_size: int | None = None):
        if not os.path.isfile(model_file):
            raise CheckpointError(f"tokenizer model not found: {model_file}")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=model_file)
        except Exception as exc:  # sentencepiece raises plain RuntimeError/OSError
            raise CheckpointError(f"{model_file} is not a SentencePiece model: {exc}") from exc
        self.vocab_size = vocab_size or self.sp.get_piece_size()
        self.bos_id, self.eot_id, self.bot_id = st.BOS_ID, st.EOT_ID, st.BOT_ID
        self._check_turn_pieces()

    @classmethod
    def from_folder(cls, folder: str, vocab_size: int | None = None) -> "Step1Tokenizer":
        return cls(os.path.join(folder, "tokenizer.model"), vocab_size)

    def _check_turn_pieces(self) -> None:
        # SPEC §7.1 infers <|BOT|> = 4 and <|EOT|> = 3; where the model names them, it must agree
        size = self.sp.get_piece_size()
        for piece, expected in (("<|BOT|>", st.BOT_ID), ("<|EOT|>", st.EOT_ID)):
            found = self.sp.piece_to_id(piece)
            if found != self.sp.unk_id() and found != expected and expected < size:
                raise CheckpointError(f"tokenizer maps {piece} to {found}, the engine expects {expected}")

    # ---------------------------------------------------------------- encode / decode
    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = [self.bos_id] if add_bos else []
        pos = 0
        for match in _SPECIAL.finditer(text):
            if match.start() > pos:
                ids += self.sp.encode(text[pos:match.start()])
            ids.append(self._special_id(match))
            pos = match.end()
        if pos < len(text):
            ids += self.sp.encode(text[pos:])
        return ids

    def _special_id(self, match: re.Match) -> int:
        if match.group(1) is not None:
            n = int(match.group(1))
            if n >= st.VQ02_CODES + st.VQ06_CODES:
                raise InvalidRequestError(f"{match.group(0)}: audio codes run from 0 to {st.VQ02_CODES + st.VQ06_CODES - 1}")
            return st.AUDIO_TOKEN_OFFSET + n
        return st.BOT_ID if match.group(0) == "<|BOT|>" else st.EOT_ID

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        parts, text_run = [], []

        def flush():
            if text_run:
                parts.append(self.sp.decode(text_run))
                text_run.clear()
        for i in ids:
            if st.is_audio_token(i):
                flush()
                parts.append(st.audio_token_str(i - st.AUDIO_TOKEN_OFFSET))
            elif i in (st.BOT_ID, st.EOT_ID):
                flush()
                if not skip_special:
                    parts.append("<|BOT|>" if i == st.BOT_ID else "<|EOT|>")
            elif i < self.sp.get_piece_size():
                if skip_special and (i == self.bos_id or self.sp.is_control(i) or self.sp.is_unused(i)):
                    continue
                text_run.append(i)
        flush()
        return "".join(parts)

    def check_ids(self, ids: list[int]) -> None:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise InvalidRequestError(f"token ids outside the vocabulary [0, {self.vocab_size}): {bad[:8]}")
