"""One request's state as the scheduler and the block manager see it."""
from __future__ import annotations

import enum
import itertools

from .errors import InvalidRequestError
from .sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 prompt: str | None = None, arrival_time: float = 0.0):
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)      # prompt + generated
        self.params = params
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []             # KV pages in position order
        self.num_computed = 0                        # tokens whose K/V sit in the cache
        self.page_keys: list[int] = []               # prefix-cache keys of the leading full, computed pages
        self.num_cached_tokens = 0                   # prompt tokens served from the prefix cache at admission
        self.num_preemptions = 0
        self.finish_reason: str | None = None        # "stop", "length", "abort", "error"
        self.stop_reason: int | None = None          # the stop token, when finish_reason == "stop"
        self.error: Exception | None = None
        self.arrival_time = arrival_time
        self.first_token_time: float | None = None
        self.sampler_state = None                    # per-request generator, created by the sampler
        self.num_emitted = 0                         # output tokens already reported to the caller
        self.text_emitted = ""                       # detokenised text already reported
        self.detok_prefix = 0                        # incremental detokenisation window (output indices)
        self.detok_read = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def failure(self, what: str, exc: BaseException) -> InvalidRequestError:
        """The typed error of this request alone for `what` (its processor, its stop check, ...)
        having raised `exc` inside an engine step."""
        error = InvalidRequestError(f"{what} of request {self.request_id} raised {type(exc).__name__}: {exc}")
        error.__cause__ = exc
        return error

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, tokens={self.num_tokens}, computed={self.num_computed}, "
                f"pages={len(self.block_table)}, {self.status.value})")
