"""Per-request sampling options, in vLLM's names."""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from .errors import InvalidRequestError

# A logits processor gets (output_token_ids, logits) or (prompt_token_ids, output_token_ids, logits),
# logits being this request's float32 row on the engine's device, and returns the row to use.
LogitsProcessor = Callable[..., "object"]


@dataclasses.dataclass
class SamplingParams:
    temperature: float = 1.0            # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1                     # -1 or 0: off
    seed: int | None = None             # per-request generator; the same seed gives the same tokens
    max_tokens: int | None = 16         # None: up to the model's context
    min_tokens: int = 0                 # stop tokens are masked until this many tokens exist
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    repetition_aware: bool = False      # Step-Audio TTS rule: ban the last token if it fills >= 2 of the last 10
    logits_processors: Sequence[LogitsProcessor] | None = None
    skip_special_tokens: bool = True
    n: int = 1

    def __post_init__(self):
        if self.n != 1:
            raise InvalidRequestError("only n=1 is supported; submit several requests instead")
        if self.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise InvalidRequestError(f"top_k must be -1 (off), 0 (off) or positive, got {self.top_k}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            raise InvalidRequestError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logits_processors = list(self.logits_processors or [])

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def stop_ids(self, eos_token_id: int) -> list[int]:
        return list(self.stop_token_ids) + ([] if self.ignore_eos else [eos_token_id])
