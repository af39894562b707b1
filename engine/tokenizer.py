"""Step1 text tokenizer: the folder's SentencePiece model plus the audio and turn tokens.

It gives the ids that the official code gets from `AutoTokenizer.from_pretrained(folder)` under
transformers 4.48.3: a LlamaTokenizerFast converted from the slow tokenizer (tokenizer_config
`legacy: false`), which is not what SentencePiece's own `encode` does. Its rules:

1. The text is first cut at its added tokens, leftmost and longest match first: every CONTROL,
   USER_DEFINED and UNKNOWN piece of the model (<s>, </s>, <unk>, <|BOT|>, <|EOT|>, <audio_N> in
   the release). Each is one id. The engine also maps `<audio_N>` (N < 5120) to 65536 + N and
   <|BOT|>/<|EOT|> to 4/3 where the model lacks those pieces (SPEC.md §7.1).
2. No normalizer: the text reaches the pieces as it is (the model's own normalization rule,
   dummy prefix and whitespace removal are not applied).
3. Metaspace, prepend scheme "first": in each stretch between added tokens ' ' becomes '▁', and
   only the stretch that starts the text gets a '▁' in front, unless it already starts with one
   (so " x" encodes like "x"; a stretch after an added token gets none).
4. `tokenizers`' Unigram model cuts each stretch: the best-scoring path, scores summed in float64
   (SentencePiece sums in float32, which breaks the many exact ties, such as runs of spaces,
   differently), the earliest start winning a tie, over every piece of the vocabulary (BYTE and
   UNUSED ones too: text "<0x41>" is that byte piece); a character no piece covers costs
   min score - 10, a run of them becomes their UTF-8 byte pieces.
5. `encode(text)` puts <s> in front.
SentencePiece itself only loads the model and decodes.
"""
from __future__ import annotations

import os
import re

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb

from . import special_tokens as st
from .checks import shown
from .errors import CheckpointError, InvalidRequestError

_AUDIO_TEXT = re.compile(r"<audio_(\d+)>")   # refused when out of range, though HF would spell it out
MAX_MODEL_BYTES = 64 << 20      # Step1's tokenizer.model is about 1 MB; a larger file is not one
_PIECE = pb.ModelProto.SentencePiece
_ADDED_TYPES = (_PIECE.CONTROL, _PIECE.USER_DEFINED, _PIECE.UNKNOWN)
_UNK_PENALTY = 10.0             # tokenizers' K_UNK_PENALTY, as SentencePiece's kUnkPenalty
_SPACE = "\u2581"


def _longest_first(words) -> str:
    """A regex matching any of `words`, the longest where several start at one place: a trie, so
    that 5000 audio tokens cost a few steps a match, not 5000 tries."""
    trie: dict = {}
    for word in words:
        node = trie
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}

    def build(node: dict) -> str:
        alts = [re.escape(ch) + build(child) for ch, child in sorted(node.items()) if ch]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return f"(?:{body})?" if "" in node else body     # greedy: the longer word is tried first
    return build(trie)


class Step1Tokenizer:
    def __init__(self, model_file: str, vocab_size: int | None = None):
        if not os.path.isfile(model_file):
            raise CheckpointError(f"tokenizer model not found: {model_file}")
        if os.path.getsize(model_file) > MAX_MODEL_BYTES:
            raise CheckpointError(f"{model_file}: {os.path.getsize(model_file)} bytes is too large for a "
                                  f"SentencePiece model (limit {MAX_MODEL_BYTES})")
        try:
            with open(model_file, "rb") as f:
                data = f.read()
            spm.SentencePieceProcessor(model_proto=data)        # its own checks of the file
            proto = pb.ModelProto.FromString(data)
            # decoding as HF does: no normalizer, so no space eaten at the start of a piece run
            spec = proto.normalizer_spec
            spec.name, spec.precompiled_charsmap = "identity", b""
            spec.add_dummy_prefix = spec.remove_extra_whitespaces = False
            self.sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        except Exception as exc:  # noqa: BLE001 - sentencepiece raises plain RuntimeError/OSError
            raise CheckpointError(f"{model_file} is not a SentencePiece model: {exc}") from None
        self.vocab_size = vocab_size or self.sp.get_piece_size()
        self.bos_id, self.eot_id, self.bot_id = st.BOS_ID, st.EOT_ID, st.BOT_ID
        self._check_turn_pieces()
        self._build_encoder(proto)

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

    def _build_encoder(self, proto: pb.ModelProto) -> None:
        self._added = {p.piece: i for i, p in enumerate(proto.pieces) if p.type in _ADDED_TYPES}
        self._added.update({st.audio_token_str(n): st.AUDIO_TOKEN_OFFSET + n for n in range(st.FLOW_VOCAB)})
        self._added.update({"<|BOT|>": st.BOT_ID, "<|EOT|>": st.EOT_ID})
        self._split = re.compile(_longest_first(self._added))
        # the Unigram model HF converts: every piece with its score, ids 0-2 scored 0 (LlamaConverter)
        self._pieces = {p.piece: (i, p.score if i > 2 else 0.0) for i, p in enumerate(proto.pieces)}
        self._unk_score = min(score for _, score in self._pieces.values()) - _UNK_PENALTY
        self._unk = self.sp.unk_id()
        self._longest: dict[str, int] = {}       # first character -> longest piece starting with it
        for piece in self._pieces:
            if len(piece) > self._longest.get(piece[:1], 0):
                self._longest[piece[:1]] = len(piece)
        self._byte_ids = {b: self._pieces[f"<0x{b:02X}>"][0] for b in range(256) if f"<0x{b:02X}>" in self._pieces}

    # ---------------------------------------------------------------- encode / decode
    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = [self.bos_id] if add_bos else []
        pos = 0
        for match in self._split.finditer(text):
            if match.start() > pos:
                ids += self._encode_stretch(text[pos:match.start()], first=pos == 0)
            ids.append(self._added[match.group(0)])
            pos = match.end()
        if pos < len(text):
            ids += self._encode_stretch(text[pos:], first=pos == 0)
        return ids

    def _encode_stretch(self, text: str, first: bool) -> list[int]:
        """Text between added tokens (rules 3 and 4)."""
        for match in _AUDIO_TEXT.finditer(text):
            digits = match.group(1)
            if len(digits) > 6 or int(digits) >= st.FLOW_VOCAB:    # int() of 5000 digits would raise
                raise InvalidRequestError(f"{shown(match.group(0))}: audio codes run from 0 to "
                                          f"{st.FLOW_VOCAB - 1}")
        text = text.replace(" ", _SPACE)
        if first and not text.startswith(_SPACE):
            text = _SPACE + text
        return self._unigram(text)

    def _unigram(self, text: str) -> list[int]:
        """tokenizers' `Unigram::encode_optimized` step for step (rule 4), then its byte fallback."""
        n, pieces, longest, unk = len(text), self._pieces, self._longest, self._unk
        best, start, ident = [0.0] * (n + 1), [-1] * (n + 1), [unk] * (n + 1)
        for s in range(n):
            here, single = best[s], False
            for end in range(s + 1, min(n, s + longest.get(text[s], 0)) + 1):
                hit = pieces.get(text[s:end])
                if hit is None:
                    continue
                score = here + hit[1]
                if start[end] < 0 or score > best[end]:       # strictly better: the earlier start keeps a tie
                    best[end], start[end], ident[end] = score, s, hit[0]
                single = single or end == s + 1
            if not single:
                score = here + self._unk_score
                if start[s + 1] < 0 or score > best[s + 1]:
                    best[s + 1], start[s + 1], ident[s + 1] = score, s, unk
        path, end = [], n
        while end > 0:
            path.append((start[end], end, ident[end]))
            end = start[end]
        path.reverse()
        ids, i = [], 0
        while i < len(path):
            s, end, piece = path[i]
            i += 1
            if piece != unk:
                ids.append(piece)
                continue
            while i < len(path) and path[i][2] == unk:            # a run of <unk> is fused, then spelt in bytes
                end = path[i][1]
                i += 1
            raw = text[s:end].encode()
            ids += [self._byte_ids[b] for b in raw] if all(b in self._byte_ids for b in raw) else [unk]
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        """As HF decodes: pieces joined, '▁' read as a space, one space dropped where the text
        starts with a piece (the '▁' rule 3 put there). `skip_special` drops <s>, </s>, <unk>
        (HF's special tokens: as if they were not there) and <|BOT|>/<|EOT|> (which still hold
        their place); otherwise they are spelt out, so that decode(encode(text), skip_special=False)
        gives the text back, up to a leading space."""
        parts, text_run = [], []
        lead = True                 # nothing before the run yet: the place of HF's Strip decoder

        def put(text: str) -> None:
            nonlocal lead
            parts.append(text[1:] if lead and text.startswith(" ") else text)
            lead = False

        def flush() -> None:
            if text_run:
                put(self.sp.decode(text_run))
                text_run.clear()
        size = self.sp.get_piece_size()
        for i in ids:
            if st.is_audio_token(i):
                flush()
                put(st.audio_token_str(i - st.AUDIO_TOKEN_OFFSET))
            elif i in (st.BOT_ID, st.EOT_ID):
                flush()
                put("" if skip_special else "<|BOT|>" if i == st.BOT_ID else "<|EOT|>")
            elif 0 <= i < size:
                if self.sp.is_control(i) or self.sp.is_unknown(i):
                    if not skip_special:
                        flush()
                        put(self.sp.id_to_piece(i))
                elif self.sp.is_unused(i):          # an ordinary piece to HF, spelt as it is
                    flush()
                    put(self.sp.id_to_piece(i))
                else:
                    text_run.append(i)
        flush()
        return "".join(parts)

    def check_ids(self, ids: list[int]) -> None:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise InvalidRequestError(f"token ids outside the vocabulary [0, {self.vocab_size}): {bad[:8]}")
