"""Per-request sampling options, in vLLM's names."""
from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, Sequence

from . import checks
from .errors import InvalidRequestError

# A logits processor gets (output_token_ids, logits) or (prompt_token_ids, output_token_ids, logits),
# logits being this request's float32 row on the engine's device, and returns the row to use.
LogitsProcessor = Callable[..., "object"]


# Bounds beyond the obvious ones: a temperature is used as a float32 divisor, so it stays where
# neither it nor logits / temperature overflow; seeds seed 63-bit generators.
MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 1e4
MIN_TOP_P = 2.0 ** -126                   # float32's smallest normal: a smaller top_p rounds to 0 there
MAX_TOKENS = 2**31 - 1
MAX_SEED = 2**63 - 1
MAX_LIST_LEN = 1024                       # stop ids or processors of one request: each step goes through them


def _check_processor(fn) -> None:
    """InvalidRequestError unless `fn` can be called as the sampler calls it: with the prompt ids
    when it has 3 parameters, otherwise with (output ids, logits)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        raise InvalidRequestError(f"logits_processors: cannot read the parameters of {checks.shown(fn)}") from None
    arity = 3 if len(sig.parameters) == 3 else 2
    try:
        sig.bind(*range(arity))
    except TypeError:
        raise InvalidRequestError(f"logits_processors: {checks.shown(fn)} must take (output_token_ids, logits) or "
                                  f"(prompt_token_ids, output_token_ids, logits)") from None


@dataclasses.dataclass
class SamplingParams:
    """Every field is checked at construction (InvalidRequestError naming the field and the value)
    and numbers are normalised to Python ints and floats, so a bad request fails where it is made,
    never inside an engine step."""
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
    detokenize: bool = True             # False: the output's text stays "" (token ids only; no decode cost)
    n: int = 1

    def __post_init__(self):
        bad = InvalidRequestError
        if checks.integer(self.n, "n", bad) != 1:
            raise bad("only n=1 is supported; submit several requests instead")
        self.temperature = checks.real(self.temperature, "temperature", bad, 0.0, MAX_TEMPERATURE)
        if 0.0 < self.temperature < MIN_TEMPERATURE:
            raise bad(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {self.temperature!r}")
        self.top_p = checks.real(self.top_p, "top_p", bad, 0.0, 1.0, lo_open=True)
        if self.top_p < MIN_TOP_P:
            raise bad(f"top_p must be in (0, 1] and at least {MIN_TOP_P:.3g} (float32), got {self.top_p!r}")
        self.top_k = checks.integer(self.top_k, "top_k", bad, -1, 2**31 - 1)
        if self.seed is not None:
            self.seed = checks.integer(self.seed, "seed", bad, 0, MAX_SEED)
        if self.max_tokens is not None:
            self.max_tokens = checks.integer(self.max_tokens, "max_tokens", bad, 1, MAX_TOKENS)
        self.min_tokens = checks.integer(self.min_tokens, "min_tokens", bad, 0, MAX_TOKENS)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        for name in ("ignore_eos", "repetition_aware", "skip_special_tokens", "detokenize"):
            checks.flag(getattr(self, name), name, bad)
        self.stop_token_ids = self._stop_ids(self.stop_token_ids)
        self.logits_processors = self._processors(self.logits_processors)

    @staticmethod
    def _items(value, name: str, what: str) -> list:
        if value is None:
            return []
        not_a_list = InvalidRequestError(f"{name} must be a list of {what}, got {checks.shown(value)}")
        if isinstance(value, (str, bytes, dict)):
            raise not_a_list
        items = []
        try:
            for item in value:             # TypeError: not iterable, or like a 0-d tensor, only looks it
                if len(items) == MAX_LIST_LEN:
                    raise InvalidRequestError(f"{name}: more than {MAX_LIST_LEN} entries")
                items.append(item)
        except TypeError:
            raise not_a_list from None
        return items

    @classmethod
    def _stop_ids(cls, value) -> list[int]:
        return [checks.integer(t, "stop_token_ids entry", InvalidRequestError, 0, 2**31 - 1)
                for t in cls._items(value, "stop_token_ids", "token ids")]

    @classmethod
    def _processors(cls, value) -> list[LogitsProcessor]:
        fns = cls._items(value, "logits_processors", "functions")
        for fn in fns:
            if not callable(fn):
                raise InvalidRequestError(f"logits_processors entries must be callables, got {checks.shown(fn)}")
            _check_processor(fn)
        return fns

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def stop_ids(self, eos_token_id: int) -> list[int]:
        return list(self.stop_token_ids) + ([] if self.ignore_eos else [eos_token_id])
