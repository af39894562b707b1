"""What the engine reports per request (vLLM's shapes: RequestOutput with CompletionOutputs)."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str                              # all text generated so far
    token_ids: list[int]                   # all tokens generated so far
    new_text: str = ""                     # the part of `text` new since the previous report
    new_token_ids: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None       # "stop", "length", "abort", "error" or None while running
    stop_reason: int | None = None         # the stop token id, for finish_reason == "stop"

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None
    finished_time: float | None
    num_cached_tokens: int                 # prompt tokens served from the prefix cache
    num_preemptions: int


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    error: Exception | None = None         # set when finish_reason == "error": a typed StepvoxError naming
                                           # the request and the cause (InvalidRequestError for its own
                                           # processors or values, KVCacheExhaustedError)
