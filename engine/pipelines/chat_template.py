"""The chat prompt of Step-Audio-Chat (SPEC.md §7.3, the official `stepaudio.py apply_chat_template`):

    <|BOT|>system\\n{text}<|EOT|><|BOT|>human\\n{text or <audio_N>...}<|EOT|>...<|BOT|>assistant\\n

`user` is written `human`; no default system prompt (the official code adds none); a turn whose
content is None is left open (its header only); `<|BOT|>assistant\\n` closes the prompt unless it
already ends with it. The official code encodes the whole string once, with BOS. Every turn starts
with the added token <|BOT|>, and the tokenizer cuts text at added tokens and treats each stretch
alike after one, so encoding turn by turn and joining gives the same ids: `prompt_ids` does that,
which lets a conversation keep each turn's ids (its audio tokenized once, its answers as the model
wrote them) instead of re-encoding the history every turn.
"""
from __future__ import annotations

from ..audio.tokenizer import ids_to_text
from ..special_tokens import BOS_ID
from .chat_messages import AudioClip, AudioTokens, Message

ROLE_NAMES = {"system": "system", "user": "human", "assistant": "assistant"}
ASSISTANT_HEADER = "<|BOT|>assistant\n"


def _body(message: Message) -> str:
    parts = []
    for p in message.parts:
        if isinstance(p, AudioClip):
            raise ValueError("render after tokenizing: audio clips must be AudioTokens by now")
        parts.append(ids_to_text(list(p.ids)) if isinstance(p, AudioTokens) else p)
    return "".join(parts)


def turn_text(message: Message) -> str:
    """One turn as the official template writes it."""
    header = f"<|BOT|>{ROLE_NAMES[message.role]}\n"
    return header if message.parts is None else f"{header}{_body(message)}<|EOT|>"


def render(messages: list[Message]) -> str:
    """The whole prompt string (audio as `<audio_N>` text), as the official code builds it."""
    text = "".join(turn_text(m) for m in messages)
    return text if text.endswith(ASSISTANT_HEADER) else text + ASSISTANT_HEADER


def turn_ids(tokenizer, message: Message) -> list[int]:
    """One turn's ids (no BOS): the tokenizer's encode of `turn_text`."""
    return tokenizer.encode(turn_text(message), add_bos=False)


def needs_assistant_header(messages: list[Message]) -> bool:
    """False only when the last turn is an open assistant turn (the prompt already ends with it)."""
    return not (messages and messages[-1].parts is None and messages[-1].role == "assistant")


def prompt_ids(tokenizer, messages: list[Message]) -> list[int]:
    """BOS + each turn's ids + the assistant header's ids where needed: the ids of the official
    `tokenizer.encode(render(messages))`."""
    ids = [BOS_ID]
    for m in messages:
        ids += turn_ids(tokenizer, m)
    if needs_assistant_header(messages):
        ids += tokenizer.encode(ASSISTANT_HEADER, add_bos=False)
    return ids
